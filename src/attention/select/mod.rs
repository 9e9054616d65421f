//! Selectors: the part of a sparse method that decides which keys each query block
//! visits. Each method is one file here implementing [`Selector`]; the two-pass executor
//! ([`super::sparse`]) runs any of them, on the GPU and on the CPU, and the method
//! registry ([`super::method`]) names them.
//!
//! - [`anchor`]: AnchorAttention (stripes of discrete keys, gathered);
//! - [`sale`]: SALE (64 × 32 blocks from low-bit score estimates), calibrated by
//!   [`sale_calibrate`];
//! - [`window`]: sliding window with sinks (a fixed block LUT, single pass);
//! - [`oracle`]: the exact per-row and per-block oracle patterns for evaluation (a fixed
//!   LUT run through [`super::Method::BlockSparse`]).
//!
//! Adding a method: a file here with its config type implementing [`Selector`] (its
//! kernels under `shaders/attention/select/`), and one line in the registry of
//! [`super::method`].

pub mod anchor;
pub mod oracle;
pub mod sale;
pub mod sale_calibrate;
pub mod window;

use std::any::Any;

use super::lut::SparseLut;
pub use super::method::MethodStats;
use super::sparse::{PassPairs, SelectionLayout};
use super::{AttentionOptions, AttentionShape};
use crate::error::Result;
use crate::runtime::Recorder;
use crate::runtime::context::Context;

/// The buffers a selection reads and writes on the GPU: Q and K of the run, the exact
/// pass's row state `(m, l)` (`[q_heads, seq_len, 2]` f32), and the selected LUT (its
/// slice starts, ranges and indices in the [`SparseLut`] layout).
pub struct SelectIo<'a> {
    /// Queries.
    pub q: &'a wgpu::Buffer,
    /// Keys.
    pub k: &'a wgpu::Buffer,
    /// Row state of the exact pass.
    pub ml: &'a wgpu::Buffer,
    /// First index of every LUT row's slice (from [`SelectionLayout::row_base`]).
    pub row_base: &'a wgpu::Buffer,
    /// Written: `[start, end)` of every LUT row.
    pub ranges: &'a wgpu::Buffer,
    /// Written: the selected entries.
    pub indices: &'a wgpu::Buffer,
}

/// What a selection reads on the host: the run's shape, score scale, Q and K, and the
/// exact pass's row state `(m, l)` (`[q_heads, seq_len, 2]`).
#[derive(Clone, Copy)]
pub struct SelectInput<'a> {
    /// The run's shape.
    pub shape: &'a AttentionShape,
    /// Score scale (1/√d unless the caller set one).
    pub scale: f32,
    /// Queries `[q_heads, seq_len, head_dim]`.
    pub q: &'a [f32],
    /// Keys `[kv_heads, seq_len, head_dim]`.
    pub k: &'a [f32],
    /// Row state of the exact pass.
    pub ml: &'a [f32],
}

/// What a selector's GPU part is built for: the context, the run's shape and options,
/// and the layout of the LUT it writes.
#[derive(Clone, Copy)]
pub struct SelectBuild<'a> {
    /// A GPU context.
    pub ctx: &'a Context,
    /// The run's shape.
    pub shape: &'a AttentionShape,
    /// The plan's options (dtype, scale).
    pub opts: &'a AttentionOptions,
    /// Geometry and capacity of the selected LUT.
    pub layout: &'a SelectionLayout,
}

/// The GPU stages of a selector, built once per plan (tests downcast it through
/// [`Any`] to inspect a selector's buffers).
pub trait GpuSelection: Any + Send + Sync {
    /// Stages recorded before the exact pass (e.g. quantization); none by default.
    fn record_before(&self, _rec: &mut Recorder<'_>, _io: &SelectIo<'_>) -> Result<()> {
        Ok(())
    }
    /// The selection stages between the passes: from Q, K and `(m, l)` to the LUT.
    fn record(&self, rec: &mut Recorder<'_>, io: &SelectIo<'_>) -> Result<()>;
    /// Timed stages and dispatches the two methods above record, together.
    fn counts(&self) -> (u32, usize);
}

/// A sparse method's choice of keys, run on the two-pass executor.
pub trait Selector: std::fmt::Debug + Send + Sync {
    /// Short name (`anchor`, `sale`): stage labels and buffer names.
    fn name(&self) -> &'static str;
    /// Report names of the exact and the sparse pass.
    fn pass_names(&self) -> [&'static str; 2] {
        ["exact", "sparse"]
    }
    /// Checks the configuration against a shape (head counts, lengths).
    fn validate(&self, shape: &AttentionShape) -> Result<()>;
    /// The exact pass's block LUT.
    fn exact_lut(&self, shape: &AttentionShape) -> Result<SparseLut>;
    /// Geometry and capacity of the selected LUT.
    fn layout(&self, shape: &AttentionShape) -> Result<SelectionLayout>;
    /// The CPU twin of the selection: the selected LUT.
    fn select_cpu(&self, input: &SelectInput<'_>) -> Result<SparseLut>;
    /// Compiles the selection kernels and allocates their buffers.
    fn build_gpu(&self, build: &SelectBuild<'_>) -> Result<Box<dyn GpuSelection>>;
    /// Statistics of a run: the executor's pair counts and the selected entries per LUT
    /// row.
    fn stats(&self, shape: &AttentionShape, pairs: PassPairs, counts: &[u32]) -> MethodStats;
}
