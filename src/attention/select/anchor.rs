//! AnchorAttention (`docs/algorithms.md` §2): an exact anchor pass over the initial keys and the
//! query's own group, difference-aware stripe selection against the pooled anchor, and
//! a stripe pass that gathers the selected K/V rows and continues the anchor's row
//! state. GPU: three stages on the shared executors plus `shaders/anchor/select.wgsl`,
//! recorded into one submission. CPU twin: [`anchor_cpu`].
//!
//! Differences from the released code, on purpose:
//! - the candidate range of group g is `[init_keys, g · group)`, the keys the anchor pass
//!   did not visit (the released kernel scans `[128, g · 2048 − 128)`: it counts keys
//!   128..2047 twice and never considers the last 128 keys before the group);
//! - any length works: the last group and the last pooled block may be partial (the
//!   released patch runs the ragged tail with dense attention instead);
//! - GQA: each q-head selects its own stripes, K/V are read through the kv head (the
//!   released code expands K/V to every q-head first).

use std::ops::Range;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    GpuSelection, MethodStats, SelectBuild, SelectInput, SelectIo, Selection, Selector,
    planned_by_heads, planned_passes,
};
use super::{PassPairs, SelectionLayout};
use crate::attention::lut::{LutUnit, SparseLut};
use crate::attention::params::impl_params;
use crate::attention::sparse::{TwoPassRun, two_pass_cpu};
use crate::attention::{AttentionOptions, AttentionShape};
use crate::error::{Error, Result};
use crate::ops::linear::dot;
use crate::runtime::context::{Capabilities, Context};
use crate::runtime::launch::Bound;
use crate::runtime::launch::{Launch, check_axis, storage};
use crate::runtime::memory::{DeviceLimits, HeadChunk, PlannedBuffer, head_chunks};
use crate::runtime::preprocess::Defines;
use crate::runtime::tensor::DType;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// AnchorAttention's hyperparameters (the authors' defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnchorConfig {
    /// Admission margin θ in natural-log logit units: key j is kept for a group when
    /// `q̄·k_j/√d + θ ≥ ā` for one of the group's pooled rows.
    pub theta: f32,
    /// Rows per pooled query block, and the block size of the anchor pass (128).
    pub block: usize,
    /// Pooled blocks per query group sharing one stripe set (16: 2048 queries).
    pub step: usize,
    /// Initial keys every query attends exactly (2048).
    pub init_keys: usize,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        AnchorConfig {
            theta: 12.0,
            block: 128,
            step: 16,
            init_keys: 2048,
        }
    }
}

impl AnchorConfig {
    /// Query rows per group (`block · step`).
    pub fn group_rows(&self) -> usize {
        self.block * self.step
    }

    /// Checks the configuration; errors say what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("anchor: {m}")));
        if !self.theta.is_finite() {
            return bad(format!("theta {} is not finite", self.theta));
        }
        if self.block == 0 || !self.block.is_multiple_of(64) || self.block > 1024 {
            return bad(format!(
                "block {} must be a multiple of 64 in 64..=1024 (the executor's query tiles)",
                self.block
            ));
        }
        if !(1..=32).contains(&self.step) {
            return bad(format!("step {} must be in 1..=32", self.step));
        }
        if !self.init_keys.is_multiple_of(self.block) {
            return bad(format!(
                "init_keys {} must be a multiple of block {}",
                self.init_keys, self.block
            ));
        }
        Ok(())
    }

    /// Number of query groups for a length.
    pub fn groups(&self, seq_len: usize) -> usize {
        seq_len.div_ceil(self.group_rows())
    }

    /// Candidate keys of group `g`: `[init_keys, g · group_rows)` (empty when the anchor
    /// pass already covers everything before the group).
    pub fn candidates(&self, g: usize, seq_len: usize) -> Range<usize> {
        let start = self.init_keys.min(seq_len);
        let end = (g * self.group_rows()).min(seq_len);
        start..end.max(start)
    }

    /// The anchor pass's block LUT: for each `block`-row query block, the initial key
    /// blocks and the blocks of its own group up to the diagonal (causal masking in the
    /// executor trims the diagonal block).
    pub fn anchor_lut(&self, q_heads: usize, seq_len: usize) -> Result<SparseLut> {
        let init_blocks = self.init_keys.div_ceil(self.block);
        SparseLut::from_fn(
            q_heads,
            seq_len,
            self.block,
            LutUnit::Blocks(self.block),
            |_, qb| {
                let group_first = qb / self.step * self.step;
                let mut v: Vec<u32> = (0..init_blocks.min(group_first) as u32).collect();
                v.extend(group_first as u32..=qb as u32);
                v
            },
        )
    }

    /// Capacity of the stripe list of each group: its candidate count.
    fn capacity(&self, g: usize, seq_len: usize) -> usize {
        self.candidates(g, seq_len).len()
    }
}

/// What AnchorAttention computed in one run (serialized with the keys `causal_pairs`,
/// `anchor_pairs`, `stripe_pairs`, `stripes_per_group`).
#[derive(Clone, Debug, PartialEq)]
pub struct AnchorStats {
    /// Causal pairs, anchor-pass pairs (init keys + own group) and stripe-pass pairs
    /// (selected keys × the group's rows).
    pub pairs: PassPairs,
    /// Selected stripes per query group, averaged over heads.
    pub stripes_per_group: Vec<f64>,
}

impl AnchorStats {
    fn new(shape: &AttentionShape, cfg: &AnchorConfig, pairs: PassPairs, counts: &[u32]) -> Self {
        let groups = cfg.groups(shape.seq_len);
        let mut stripes_per_group = vec![0.0; groups];
        for (i, &c) in counts.iter().enumerate() {
            stripes_per_group[i % groups] += c as f64 / shape.q_heads as f64;
        }
        AnchorStats {
            pairs,
            stripes_per_group,
        }
    }
}

impl AnchorStats {
    /// The statistics of runs over consecutive runs of heads of one problem, as one:
    /// pair counts added, stripes per group averaged over every part's heads (each
    /// part given with its q-heads).
    pub fn concat_heads(parts: Vec<(usize, AnchorStats)>) -> Self {
        let heads: usize = parts.iter().map(|(h, _)| h).sum();
        let groups = parts.iter().map(|(_, p)| p.stripes_per_group.len()).max();
        let mut stripes_per_group = vec![0.0; groups.unwrap_or(0)];
        for (h, p) in &parts {
            for (acc, x) in stripes_per_group.iter_mut().zip(&p.stripes_per_group) {
                *acc += x * *h as f64 / heads.max(1) as f64;
            }
        }
        AnchorStats {
            pairs: PassPairs::sum(parts.iter().map(|(_, p)| p.pairs)),
            stripes_per_group,
        }
    }
}

impl Serialize for AnchorStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let per = serde_json::json!(self.stripes_per_group);
        let keys = ["anchor_pairs", "stripe_pairs"];
        self.pairs
            .serialize_with(s, keys, &[("stripes_per_group", per)])
    }
}

impl std::fmt::Display for AnchorStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per: Vec<String> = self
            .stripes_per_group
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect();
        let (anchor, stripes) = self.pairs.fractions();
        write!(
            f,
            "anchor: {} groups, stripes per group (mean over heads) {}, anchor pairs {anchor:.4} + stripe pairs {stripes:.4} of causal",
            per.len(),
            per.join(" "),
        )
    }
}

/// The stripe selection on the host: the stripe LUT (one row per group) and, for each
/// (head, group), each candidate's best margin `max_s (q̄_s·k_j·scale + θ − ā_s)` (kept
/// iff ≥ 0), so tests can tell a real disagreement from a rounding tie.
#[derive(Clone, Debug)]
pub struct AnchorSelection {
    /// Selected keys per (head, group), ascending.
    pub stripes: SparseLut,
    /// Margins per (head, group) over its candidates in order.
    pub margins: Vec<Vec<f32>>,
}

/// Pooled queries `[h, n_pool, d]` and pooled anchors `[h, n_pool]` (mean of m).
pub fn pool_cpu(
    shape: &AttentionShape,
    cfg: &AnchorConfig,
    q: &[f32],
    ml: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let np = n.div_ceil(cfg.block);
    let mut qbar = vec![0.0f32; shape.q_heads * np * d];
    let mut abar = vec![0.0f32; shape.q_heads * np];
    for h in 0..shape.q_heads {
        for b in 0..np {
            let (r0, r1) = (b * cfg.block, ((b + 1) * cfg.block).min(n));
            let inv = 1.0 / (r1 - r0) as f32;
            let out = &mut qbar[(h * np + b) * d..(h * np + b + 1) * d];
            for r in r0..r1 {
                for (o, &x) in out.iter_mut().zip(&q[(h * n + r) * d..(h * n + r + 1) * d]) {
                    *o += x;
                }
            }
            out.iter_mut().for_each(|o| *o *= inv);
            abar[h * np + b] = (r0..r1).map(|r| ml[2 * (h * n + r)]).sum::<f32>() * inv;
        }
    }
    (qbar, abar)
}

/// Stripe selection on the host from the anchor pass's row state `ml` `[h, n, 2]`.
pub fn select_cpu(
    shape: &AttentionShape,
    cfg: &AnchorConfig,
    scale: f32,
    q: &[f32],
    k: &[f32],
    ml: &[f32],
) -> Result<AnchorSelection> {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let np = n.div_ceil(cfg.block);
    let group = shape.q_heads / shape.kv_heads;
    let (qbar, abar) = pool_cpu(shape, cfg, q, ml);
    // Every (head, query group) by itself, in parallel: its kept keys and margins.
    let groups = n.div_ceil(cfg.group_rows());
    let lists: Vec<(Vec<u32>, Vec<f32>)> = (0..shape.q_heads * groups)
        .into_par_iter()
        .map(|i| {
            let (h, g) = (i / groups, i % groups);
            let kvh = h / group;
            let s0 = g * cfg.step;
            let s1 = (s0 + cfg.step).min(np);
            let mut kept = vec![];
            let mut mg = vec![];
            for j in cfg.candidates(g, n) {
                let krow = &k[(kvh * n + j) * d..(kvh * n + j + 1) * d];
                let best = (s0..s1)
                    .map(|s| {
                        let qb = &qbar[(h * np + s) * d..(h * np + s + 1) * d];
                        dot(qb, krow) * scale + cfg.theta - abar[h * np + s]
                    })
                    .fold(f32::NEG_INFINITY, f32::max);
                if best >= 0.0 {
                    kept.push(j as u32);
                }
                mg.push(best);
            }
            (kept, mg)
        })
        .collect();
    let stripes = SparseLut::from_fn(shape.q_heads, n, cfg.group_rows(), LutUnit::Keys, |h, g| {
        lists[h * groups + g].0.clone()
    })?;
    let margins = lists.into_iter().map(|(_, m)| m).collect();
    Ok(AnchorSelection { stripes, margins })
}

/// What [`anchor_cpu`] returns.
#[derive(Clone, Debug)]
pub struct AnchorRun {
    /// The output `[q_heads, seq_len, head_dim]`.
    pub out: Vec<f32>,
    /// The stripes and the margins.
    pub selection: AnchorSelection,
    /// Pair counts.
    pub stats: AnchorStats,
    /// Final (m, l) per row `[q_heads, seq_len, 2]` (for attention-mass recall).
    pub ml: Vec<f32>,
}

/// AnchorAttention on the host (the CPU twin of the GPU plan).
pub fn anchor_cpu(
    shape: &AttentionShape,
    cfg: &AnchorConfig,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<AnchorRun> {
    cfg.validate()?;
    let anchor_lut = cfg.anchor_lut(shape.q_heads, shape.seq_len)?;
    let luts = (&anchor_lut, &cfg.stripe_layout(shape));
    let run = two_pass_cpu(shape, luts, scale, (q, k, v), |ml| {
        let sel = select_cpu(shape, cfg, scale, q, k, ml)?;
        Ok((sel.stripes.clone(), sel))
    })?;
    let stats = AnchorStats::new(shape, cfg, run.pairs, &run.selected.counts());
    let TwoPassRun {
        out, detail, ml, ..
    } = run;
    Ok(AnchorRun {
        out,
        selection: detail,
        stats,
        ml,
    })
}

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters of the selection kernels; mirrors `struct Params` in the WGSL.
    pub struct SelectParams {
        seq_len: u32,
        q_heads: u32,
        group: u32,
        n_groups: u32,
        n_pool: u32,
        init_end: u32,
        chunks: u32,
        scale: f32,
        theta: f32,
        head_first: u32,
        x_base: u32,
        _pad: u32,
    }
}

/// Candidate keys per workgroup of the flag/compact kernels.
const CHUNK: usize = 256;

/// Workgroup memory of the matrix-unit flag kernel: the chunk's scores (pooled rows
/// padded to 16 x 128 keys, f32), one step of keys (128 x 16, f16) and of pooled rows
/// (two f16 halves), and the flag words.
pub fn flags_coop_workgroup_bytes(step: usize) -> u32 {
    let rows = step.div_ceil(16) * 16;
    (rows * 128 * 4 + 128 * 16 * 2 + 2 * rows * 16 * 2 + 8 * 4 + 8 * 4) as u32
}

/// The matrix-unit tile of the stripe-scoring kernel (`None`: the portable kernel):
/// f16 storage (K exact in f16; f32 plans keep the portable kernel and its f32
/// scores), a coop tile and the workgroup memory.
pub fn flags_coop_tile(caps: &Capabilities, dtype: DType, step: usize) -> Option<usize> {
    if dtype != DType::F16 {
        return None;
    }
    caps.coop_tile_for(flags_coop_workgroup_bytes(step), 256)
}

fn select_spec(
    stage: &str,
    d: usize,
    cfg: &AnchorConfig,
    dtype: DType,
    coop: Option<usize>,
) -> KernelSpec {
    let coop = coop.filter(|_| stage == "flags");
    let (entry, flag, bindings) = match stage {
        "pool" => ("anchor_pool", "STAGE_POOL", BindingKind::layout("urrww")),
        "flags" if coop.is_some() => (
            "anchor_flags_coop",
            "STAGE_FLAGS",
            BindingKind::layout("urrrww"),
        ),
        "flags" => ("anchor_flags", "STAGE_FLAGS", BindingKind::layout("urrrww")),
        _ => (
            "anchor_compact",
            "STAGE_COMPACT",
            BindingKind::layout("urrrww"),
        ),
    };
    KernelSpec {
        file: "attention/select/anchor.wgsl",
        entry,
        defines: Defines::new()
            .params::<SelectParams>()
            .flag(flag)
            .flag_if("COOP", coop.is_some())
            .flag_if("TILE16", coop == Some(16))
            .flag_if("STORE_F16", dtype == DType::F16)
            .const_u32("D", d as u32)
            .const_u32("POOL", cfg.block as u32)
            .const_u32("BLOCKS_PER_GROUP", cfg.step as u32),
        bindings,
    }
}

/// Every selection-kernel variant (shader dump and portability tests): the three
/// stages for d = 64/128/256, f32/f16, step 16 and 32.
pub fn all_anchor_variants() -> Vec<KernelSpec> {
    let mut out = vec![];
    for d in [64, 128, 256] {
        for dtype in [DType::F32, DType::F16] {
            for step in [16, 32] {
                let cfg = AnchorConfig {
                    step,
                    ..Default::default()
                };
                for stage in ["pool", "flags", "compact"] {
                    out.push(select_spec(stage, d, &cfg, dtype, None));
                }
            }
        }
    }
    out
}

/// Every matrix-unit stripe-scoring variant at tile `tile` (SPIR-V and MSL only):
/// d = 64/128/256, step 16 and 32 (f16 storage).
pub fn all_coop_anchor_variants(tile: usize) -> Vec<KernelSpec> {
    let mut out = vec![];
    for d in [64, 128, 256] {
        for step in [16, 32] {
            let cfg = AnchorConfig {
                step,
                ..Default::default()
            };
            out.push(select_spec("flags", d, &cfg, DType::F16, Some(tile)));
        }
    }
    out
}

impl AnchorConfig {
    /// The stripe LUT's layout: one row per (head, group), room for every candidate.
    pub fn stripe_layout(&self, shape: &AttentionShape) -> SelectionLayout {
        let groups = self.groups(shape.seq_len);
        SelectionLayout {
            q_block: self.group_rows(),
            unit: LutUnit::Keys,
            capacity: (0..shape.q_heads * groups)
                .map(|i| self.capacity(i % groups, shape.seq_len) as u32)
                .collect(),
        }
    }
}

impl_params!(AnchorConfig, "anchor" { theta, block, step, init_keys | "init" });

impl Selector for AnchorConfig {
    fn name(&self) -> &'static str {
        "anchor"
    }
    fn pass_names(&self) -> [&'static str; 2] {
        ["anchor", "stripes"]
    }
    fn validate(&self, _shape: &AttentionShape) -> Result<()> {
        AnchorConfig::validate(self)
    }
    fn exact_lut(&self, shape: &AttentionShape) -> Result<SparseLut> {
        self.anchor_lut(shape.q_heads, shape.seq_len)
    }
    fn layout(&self, shape: &AttentionShape) -> Result<SelectionLayout> {
        Ok(self.stripe_layout(shape))
    }
    fn select_cpu(&self, x: &SelectInput<'_>) -> Result<Selection> {
        Ok(select_cpu(x.shape, self, x.scale, x.q, x.k, x.ml)?
            .stripes
            .into())
    }
    fn build_gpu(&self, b: &SelectBuild<'_>) -> Result<Box<dyn GpuSelection>> {
        Ok(Box::new(AnchorSelectGpu::build(
            b.ctx, b.shape, b.opts, self,
        )?))
    }
    fn plan_buffers(
        &self,
        shape: &AttentionShape,
        dtype: DType,
        limits: &DeviceLimits,
    ) -> (Vec<PlannedBuffer>, Vec<(String, usize)>) {
        let (q, runs) = planned_by_heads(
            "Q, bound by runs of heads (anchor pooling)",
            shape.q_heads,
            shape,
            dtype,
            limits,
        );
        let mut buffers = vec![q];
        buffers.extend(AnchorBuffers::of(self, shape, dtype).planned());
        let passes = [("pool", runs), ("flags", 1), ("compact", 1)];
        (buffers, planned_passes(&passes))
    }
    fn stats(
        &self,
        shape: &AttentionShape,
        pairs: PassPairs,
        counts: &[u32],
        _detail: &[u32],
    ) -> MethodStats {
        MethodStats::Anchor(AnchorStats::new(shape, self, pairs, counts))
    }
}

/// AnchorAttention's selection on a GPU context: pooling, flags, compaction.
struct AnchorSelectGpu {
    /// Pooling (once per run of whole heads of Q that fits a binding), flags and
    /// compaction.
    pool: Vec<(Launch<SelectParams>, HeadChunk)>,
    launches: [Launch<SelectParams>; 2],
    grid_pool: u32,
    grid_select: (u32, u32, u32),
    qbar: wgpu::Buffer,
    abar: wgpu::Buffer,
    flags: wgpu::Buffer,
    counts: wgpu::Buffer,
}

impl AnchorSelectGpu {
    fn build(
        ctx: &Context,
        shape: &AttentionShape,
        opts: &AttentionOptions,
        cfg: &AnchorConfig,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let max = g.caps.max_workgroups_per_dim;
        let (h, n, d) = (shape.q_heads, shape.seq_len, shape.head_dim);
        let groups = cfg.groups(n);
        let n_pool = n.div_ceil(cfg.block);
        let sizes = AnchorBuffers::of(cfg, shape, opts.dtype);
        let chunks = sizes.chunks;
        let grid_select = (
            check_axis(chunks as u64, max, "anchor selection chunks")?,
            check_axis(groups as u64, max, "anchor selection groups")?,
            check_axis(h as u64, max, "anchor selection heads")?,
        );
        let grid_pool = check_axis(n_pool as u64, max, "anchor pooled blocks")?;
        crate::runtime::launch::check_binding(g, "K (anchor selection)", sizes.k_whole)?;
        let es = opts.dtype.size() as u64;
        let q_chunks = head_chunks(
            h,
            (n * d) as u64 * es,
            4 * es,
            g.caps.max_storage_binding,
            g.caps.storage_offset_alignment as u64,
        )?;
        let p = SelectParams {
            seq_len: n as u32,
            q_heads: h as u32,
            group: (h / shape.kv_heads) as u32,
            n_groups: groups as u32,
            n_pool: n_pool as u32,
            init_end: cfg.init_keys.min(n) as u32,
            chunks: chunks as u32,
            scale: opts.scale_for(shape),
            theta: cfg.theta,
            head_first: 0,
            x_base: 0,
            _pad: 0,
        };
        let coop = flags_coop_tile(&g.caps, opts.dtype, cfg.step);
        let spec = |stage| select_spec(stage, d, cfg, opts.dtype, coop);
        let launch = |stage| Launch::new(ctx, &spec(stage), &p);
        let pool = q_chunks
            .iter()
            .map(|c| {
                let pc = SelectParams {
                    head_first: c.h0 as u32,
                    x_base: c.base,
                    ..p
                };
                Ok((Launch::new(ctx, &spec("pool"), &pc)?, *c))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AnchorSelectGpu {
            pool,
            launches: [launch("flags")?, launch("compact")?],
            grid_pool,
            grid_select,
            qbar: storage(g, "anchor pooled q", sizes.qbar)?,
            abar: storage(g, "anchor pooled anchors", sizes.abar)?,
            flags: storage(g, "anchor selection flags", sizes.flags)?,
            counts: storage(g, "anchor chunk counts", sizes.counts)?,
        })
    }
}

/// AnchorAttention's selection buffers and its bindings of Q and K, in bytes: one list
/// for the build and the memory plan.
struct AnchorBuffers {
    chunks: usize,
    k_whole: u64,
    qbar: u64,
    abar: u64,
    flags: u64,
    counts: u64,
}

impl AnchorBuffers {
    fn of(cfg: &AnchorConfig, shape: &AttentionShape, dtype: DType) -> Self {
        let (h, n, d) = (shape.q_heads, shape.seq_len, shape.head_dim);
        let groups = cfg.groups(n);
        let n_pool = n.div_ceil(cfg.block);
        let chunks = (0..groups)
            .map(|gi| cfg.capacity(gi, n).div_ceil(CHUNK))
            .max()
            .unwrap_or(0)
            .max(1);
        let es = dtype.size() as u64;
        AnchorBuffers {
            chunks,
            k_whole: (shape.kv_heads * n * d) as u64 * es,
            qbar: (h * n_pool * d * 4) as u64,
            abar: (h * n_pool * 4) as u64,
            flags: (h * groups * chunks * 32) as u64,
            counts: (h * groups * chunks * 4) as u64,
        }
    }

    fn planned(&self) -> Vec<PlannedBuffer> {
        vec![
            PlannedBuffer::whole("K, bound whole (anchor selection)", self.k_whole),
            PlannedBuffer::whole("anchor pooled q", self.qbar),
            PlannedBuffer::whole("anchor pooled anchors", self.abar),
            PlannedBuffer::whole("anchor selection flags", self.flags),
            PlannedBuffer::whole("anchor chunk counts", self.counts),
        ]
    }
}

impl GpuSelection for AnchorSelectGpu {
    fn record(&self, rec: &mut Recorder<'_>, io: &SelectIo<'_>) -> Result<()> {
        let g = rec.gpu();
        let [flags, compact] = &self.launches;
        let pool: Vec<_> = self
            .pool
            .iter()
            .map(|(l, c)| {
                let bufs = [
                    Bound::Range(io.q, c.offset, c.size),
                    Bound::Whole(io.ml),
                    Bound::Whole(&self.qbar),
                    Bound::Whole(&self.abar),
                ];
                l.dispatch_bound(g, &bufs, (self.grid_pool, (c.h1 - c.h0) as u32, 1))
            })
            .collect();
        let bufs = [io.k, &self.qbar, &self.abar, &self.flags, &self.counts];
        let flags = flags.dispatch(g, &bufs, self.grid_select);
        let bufs = [
            &self.flags,
            &self.counts,
            io.row_base,
            io.ranges,
            io.indices,
        ];
        let compact = compact.dispatch(g, &bufs, self.grid_select);
        rec.dispatch_stage("pool", &pool);
        rec.dispatch_stage("select", &[flags]);
        rec.dispatch_stage("compact", &[compact]);
        Ok(())
    }
    fn counts(&self) -> (u32, usize) {
        (3, self.pool.len() + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stripe scoring on matrix units only for f16 plans, with a coop tile and the
    /// workgroup memory of the group's pooled rows (padded to 16).
    #[test]
    fn stripe_scoring_kernel_follows_dtype_and_memory() {
        let lvp = Capabilities::fake(Some(8), 32 * 1024, 8);
        assert_eq!(flags_coop_tile(&lvp, DType::F16, 16), Some(8));
        assert_eq!(flags_coop_tile(&lvp, DType::F16, 3), Some(8));
        assert_eq!(flags_coop_tile(&lvp, DType::F16, 32), Some(8));
        assert_eq!(flags_coop_tile(&lvp, DType::F16, 64), None);
        assert_eq!(flags_coop_tile(&lvp, DType::F32, 16), None);
        let none = Capabilities::fake(None, 48 * 1024, 32);
        assert_eq!(flags_coop_tile(&none, DType::F16, 16), None);
        let cfg = AnchorConfig::default();
        let spec = select_spec("flags", 128, &cfg, DType::F16, Some(16));
        assert_eq!(spec.entry, "anchor_flags_coop");
        assert_eq!(
            select_spec("pool", 128, &cfg, DType::F16, Some(16)).entry,
            "anchor_pool"
        );
    }

    #[test]
    fn anchor_lut_covers_init_and_own_group_causally() {
        let cfg = AnchorConfig {
            block: 64,
            step: 2,
            init_keys: 128,
            ..Default::default()
        };
        let lut = cfg.anchor_lut(1, 300).unwrap();
        // Block 0, 1 (group 0): dense causal. Block 3 (group 1 = blocks 2, 3): init
        // blocks 0, 1 then 2, 3. Block 4 (group 2): 0, 1, 4.
        assert_eq!(lut.keys_of(0, 1), (0..128).collect::<Vec<u32>>());
        assert_eq!(lut.keys_of(0, 3), (0..256).collect::<Vec<u32>>());
        let b4: Vec<u32> = (0..128).chain(256..300).collect();
        assert_eq!(lut.keys_of(0, 4), b4);
        assert_eq!(cfg.candidates(0, 300), 128..128);
        assert_eq!(cfg.candidates(1, 300), 128..128);
        assert_eq!(cfg.candidates(2, 300), 128..256);
    }
}
