//! Selectors: the part of a sparse method that decides which keys each query block
//! visits. Each method is one file here implementing [`Selector`]; the two-pass executor
//! ([`super::sparse`]) runs any of them, on the GPU and on the CPU, and the method
//! registry ([`super::method`]) names them.
//!
//! - [`anchor`]: AnchorAttention (stripes of discrete keys, gathered);
//! - [`sale`]: SALE (64 × 32 blocks from low-bit score estimates), calibrated by
//!   [`sale_calibrate`];
//! - [`window`]: sliding window with sinks (a fixed block LUT, single pass);
//! - [`proxy`]: ProxyAttn (128 × 128 blocks chosen from head-pooled proxy scores under
//!   per-head budgets);
//! - [`oracle`]: the exact per-row and per-block oracle patterns for evaluation (a fixed
//!   LUT run through [`super::Method::BlockSparse`]).
//!
//! Adding a method: a file here with its config type implementing [`Selector`] (its
//! kernels under `shaders/attention/select/`), and one line in the registry of
//! [`super::method`].

pub mod anchor;
pub mod oracle;
pub mod proxy;
pub mod sale;
pub mod sale_calibrate;
pub mod window;

use std::any::Any;

use super::flash::KeyMode;
use super::lut::LutUnit;
use super::lut::SparseLut;
pub use super::method::MethodStats;
use super::{AttentionOptions, AttentionShape};
use crate::error::{Error, Result};
use crate::runtime::Recorder;
use crate::runtime::context::Context;
use crate::runtime::memory::{DeviceLimits, PlannedBuffer};

/// Where a selector writes its choice: one LUT row per head and `q_block` query rows,
/// each with room for `capacity[row]` entries (its candidates).
#[derive(Clone, Debug, PartialEq)]
pub struct SelectionLayout {
    /// Query rows per LUT row.
    pub q_block: usize,
    /// Key blocks or gathered keys.
    pub unit: LutUnit,
    /// Candidates of every LUT row, head-major (`[q_heads · rows]`).
    pub capacity: Vec<u32>,
}

impl SelectionLayout {
    /// The executor's key mode for this layout.
    pub fn keys(&self) -> KeyMode {
        match self.unit {
            LutUnit::Blocks(key_block) => KeyMode::Blocks {
                q_block: self.q_block,
                key_block,
            },
            LutUnit::Keys => KeyMode::Gather {
                q_block: self.q_block,
            },
        }
    }

    /// Start of every LUT row's slice and the total capacity.
    pub fn row_base(&self) -> Result<(Vec<u32>, u64)> {
        let mut base = Vec::with_capacity(self.capacity.len());
        let mut total = 0u64;
        for &c in &self.capacity {
            base.push(u32::try_from(total).map_err(|_| {
                Error::InvalidShape("sparse selection list over 2^32 entries".into())
            })?);
            total += c as u64;
        }
        Ok((base, total))
    }

    /// Pairs the selected entries cover: `counts[row]` entries × the row's query rows
    /// × keys per entry (selected keys lie strictly before their rows: no masking).
    pub fn selected_pairs(&self, seq_len: usize, counts: &[u32]) -> u64 {
        let rows_per_head = seq_len.div_ceil(self.q_block);
        let width = match self.unit {
            LutUnit::Blocks(kb) => kb as u64,
            LutUnit::Keys => 1,
        };
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let r = i % rows_per_head;
                let rows = ((r + 1) * self.q_block).min(seq_len) - r * self.q_block;
                c as u64 * rows as u64 * width
            })
            .sum()
    }
}

/// Pair counts of one two-pass run, all heads: the causal `(q, k)` pairs of the whole
/// attention, those the exact pass computed and those the selected LUT covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassPairs {
    /// Causal pairs of dense attention.
    pub causal: u64,
    /// Pairs of the exact pass (causal).
    pub exact: u64,
    /// Pairs of the selected entries.
    pub selected: u64,
}

impl PassPairs {
    /// The counts of a run with `exact` as its exact LUT and `counts` entries selected
    /// per row of `layout`.
    pub fn new(
        shape: &AttentionShape,
        exact: &SparseLut,
        layout: &SelectionLayout,
        counts: &[u32],
    ) -> Self {
        PassPairs {
            causal: shape.pairs(true) as u64,
            exact: exact.pairs(true),
            selected: layout.selected_pairs(shape.seq_len, counts),
        }
    }

    /// The counts of runs over disjoint heads of one problem, added.
    pub fn sum(parts: impl IntoIterator<Item = PassPairs>) -> Self {
        parts
            .into_iter()
            .fold(PassPairs::default(), |a, b| PassPairs {
                causal: a.causal + b.causal,
                exact: a.exact + b.exact,
                selected: a.selected + b.selected,
            })
    }

    /// Fraction of causal pairs computed, exact pass included.
    pub fn density(&self) -> f64 {
        (self.exact + self.selected) as f64 / self.causal.max(1) as f64
    }

    /// The exact and the selected pairs as fractions of the causal pairs.
    pub fn fractions(&self) -> (f64, f64) {
        let c = self.causal.max(1) as f64;
        (self.exact as f64 / c, self.selected as f64 / c)
    }

    /// Serializes the counts under a method's key names (`causal_pairs`, then
    /// `keys[0]`, `keys[1]`) followed by the method's own `extra` entries.
    pub fn serialize_with<S: serde::Serializer>(
        &self,
        s: S,
        keys: [&str; 2],
        extra: &[(&str, serde_json::Value)],
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(3 + extra.len()))?;
        m.serialize_entry("causal_pairs", &self.causal)?;
        m.serialize_entry(keys[0], &self.exact)?;
        m.serialize_entry(keys[1], &self.selected)?;
        for (k, v) in extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

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
    /// The buffer of the words the selection reports beside its LUT (see
    /// [`Selection::detail`]), read back after a run; none by default.
    fn detail(&self) -> Option<&wgpu::Buffer> {
        None
    }
}

/// A selection's choice: the selected LUT and the words a selector reports beside it
/// (ProxyAttn: each head's budget in key blocks; empty for the others), the same on the
/// GPU and on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// The LUT of the sparse pass.
    pub lut: SparseLut,
    /// The selector's own words.
    pub detail: Vec<u32>,
}

impl From<SparseLut> for Selection {
    fn from(lut: SparseLut) -> Self {
        Selection {
            lut,
            detail: vec![],
        }
    }
}

/// A `[heads, seq_len, head_dim]` tensor of `shape` that a selection kernel reads one
/// run of whole heads at a time ([`crate::runtime::memory::head_chunks`]), as a planned
/// binding, and how many runs (dispatches) that takes under `limits`.
pub(crate) fn planned_by_heads(
    name: &str,
    heads: usize,
    shape: &AttentionShape,
    dtype: crate::runtime::dtype::DType,
    limits: &DeviceLimits,
) -> (PlannedBuffer, usize) {
    let es = dtype.size() as u64;
    let head = (shape.seq_len * shape.head_dim) as u64 * es;
    let b = PlannedBuffer::by_heads(name, heads, head, 4 * es, limits);
    let runs = match b.binding {
        crate::runtime::memory::Binding::Ranges { pieces, .. } => pieces,
        crate::runtime::memory::Binding::Whole => 1,
    };
    (b, runs)
}

/// The passes of a selection's memory plan as (name, dispatches).
pub(crate) fn planned_passes(passes: &[(&str, usize)]) -> Vec<(String, usize)> {
    passes.iter().map(|(p, c)| (p.to_string(), *c)).collect()
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
    /// The fewest consecutive q-heads whose selection depends on their own Q and K
    /// alone, so that a problem may run in groups of a multiple of them
    /// ([`crate::attention::GroupedAttention`]): 1 for a per-head selector, a proxy
    /// group's q-heads for one that pools heads.
    fn head_unit(&self, shape: &AttentionShape) -> usize {
        let _ = shape;
        1
    }
    /// The exact pass's block LUT.
    fn exact_lut(&self, shape: &AttentionShape) -> Result<SparseLut>;
    /// Geometry and capacity of the selected LUT.
    fn layout(&self, shape: &AttentionShape) -> Result<SelectionLayout>;
    /// The CPU twin of the selection: the selected LUT and the selector's words.
    fn select_cpu(&self, input: &SelectInput<'_>) -> Result<Selection>;
    /// Compiles the selection kernels and allocates their buffers.
    fn build_gpu(&self, build: &SelectBuild<'_>) -> Result<Box<dyn GpuSelection>>;
    /// The selection's own buffers and the bindings it makes of the caller's tensors
    /// (the memory plan, [`crate::attention::plan`]; the build allocates the same
    /// sizes), and its dispatches per stage.
    fn plan_buffers(
        &self,
        shape: &AttentionShape,
        dtype: crate::runtime::dtype::DType,
        limits: &DeviceLimits,
    ) -> (Vec<PlannedBuffer>, Vec<(String, usize)>);
    /// Statistics of a run: the executor's pair counts, the selected entries per LUT
    /// row and the selection's words ([`Selection::detail`]).
    fn stats(
        &self,
        shape: &AttentionShape,
        pairs: PassPairs,
        counts: &[u32],
        detail: &[u32],
    ) -> MethodStats;
}
