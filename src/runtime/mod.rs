//! The runtime: everything between wgpu and the kernels of the layers above, and nothing
//! that knows about attention, MoE or models.
//!
//! - [`context`]: device selection and capabilities (a GPU through wgpu, or the CPU).
//! - [`dtype`]: element types.
//! - [`tensor`]: typed buffers with a shape, on either device.
//! - [`preprocess`]: the small WGSL preprocessor (includes, flags, constants, unrolling)
//!   and the table of shader files.
//! - [`kernel`]: kernel specs (file, entry, variant, bindings), compiled pipelines and the
//!   per-device cache.
//! - [`launch`]: the typed launcher every kernel goes through (params upload, bind group,
//!   grid checks) and buffer helpers.
//! - [`memory`]: buffers as plans describe them before allocating (size, binding).
//! - [`recorder`]: one command submission per plan run, per-stage GPU time.
//! - [`threads`]: the CPU path's thread pool, with the calling thread as a worker.
//!
//! Imports inside run down this list: `recorder` → `launch` → `tensor` → `context` →
//! `kernel` → `preprocess`.

pub mod context;
pub mod dtype;
pub mod kernel;
pub mod launch;
pub mod memory;
pub mod preprocess;
pub mod recorder;
pub mod tensor;
#[cfg(test)]
pub(crate) mod test_util;
pub mod threads;

pub use kernel::{BindingKind, Kernel, KernelSpec};
pub(crate) use recorder::Instant;
pub use recorder::{Recorder, Report, StageTime, Submitted};
