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
use super::sparse::SelectionLayout;
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

/// The GPU stages of a selector, built once per plan.
pub trait GpuSelection: Send + Sync {
    /// Stages recorded before the exact pass (e.g. quantization); none by default.
    fn record_before(&self, _rec: &mut Recorder<'_>, _io: &SelectIo<'_>) -> Result<()> {
        Ok(())
    }
    /// The selection stages between the passes: from Q, K and `(m, l)` to the LUT.
    fn record(&self, rec: &mut Recorder<'_>, io: &SelectIo<'_>) -> Result<()>;
    /// Timed stages and dispatches the two methods above record, together.
    fn counts(&self) -> (u32, usize);
    /// For tests and inspection: the concrete type.
    fn as_any(&self) -> &dyn Any;
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
    /// The CPU twin of the selection: the selected LUT from Q, K and the exact pass's
    /// `(m, l)`.
    fn select_cpu(
        &self,
        shape: &AttentionShape,
        scale: f32,
        q: &[f32],
        k: &[f32],
        ml: &[f32],
    ) -> Result<SparseLut>;
    /// Compiles the selection kernels and allocates their buffers.
    fn build_gpu(
        &self,
        ctx: &Context,
        shape: &AttentionShape,
        opts: &AttentionOptions,
        layout: &SelectionLayout,
    ) -> Result<Box<dyn GpuSelection>>;
    /// Statistics from the selected entries per LUT row.
    fn stats(&self, shape: &AttentionShape, exact: &SparseLut, counts: &[u32]) -> MethodStats;
}
