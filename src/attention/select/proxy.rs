//! ProxyAttn (`docs/algorithms.md` §3b): 128 × 128 blocks chosen per head from
//! head-pooled proxy scores under a per-head budget, run on the two-pass executor (the exact pass computes block 0 and
//! the diagonal block of every query block, the sparse pass the chosen rest).
//!
//! The idea: heads that share keys attend alike, so one *proxy* head per group of heads
//! — the mean of the group's query heads against the mean of its key heads — scores the
//! key blocks for all of them, at a fraction of the cost (only every `stride`-th query
//! row of a block is scored). How many blocks each head keeps is its own: a head whose
//! attention is spread out needs more than one whose attention sits on a few blocks.
//!
//! For a causal run with `Hq` query heads, `Hkv` key heads and blocks of `b` rows:
//!
//! 1. **Proxy heads**: for each of the `groups` groups (consecutive key heads and their
//!    query heads), Q̄ = mean of the group's query heads and K̄ = mean of its key heads,
//!    row by row (no pooling over positions).
//! 2. **Proxy probabilities**: for the kept rows `r` (in each query block, rows
//!    `block start + stride·i`), `P[r, ·] = softmax_{j ≤ r}(Q̄[r]·K̄[j] · scale)`.
//! 3. **Block scores**: `A[m, n]` = the largest `P[r, j]` over the kept rows `r` of query
//!    block `m` and the keys `j` of key block `n` (0 where no key is visible).
//! 4. **Budgets**: head `i`'s exact attention over the rows of the last query block,
//!    averaged over those rows and over the keys of each key block, gives a weight per
//!    block; sorted in decreasing order and normalised to sum 1, the smallest count `k`
//!    whose prefix reaches `gamma` sets the head's budget fraction `β = k / blocks`.
//! 5. **Mask**: query block `m` of head `i` keeps the `K = min(m + 1, max(⌈β·(m + 1)⌉,
//!    min_budget / b))` best blocks of its group's `A[m, 0..=m]` (equal scores: the
//!    lower block first), plus block 0 and its diagonal block.
//!
//! Budgets are whole blocks: head `i` keeps `k_i` of the last query block's `blocks` key
//! blocks, and `⌈β·(m + 1)⌉` is computed exactly as `⌈k_i·(m + 1) / blocks⌉`.
//!
//! GPU (`shaders/attention/select/proxy.wgsl`): `proxy_pool` (the proxy heads),
//! `proxy_block_scores` (steps 2–3: per kept row a sweep for the softmax max and sum,
//! then one for the block maxima; nothing of size `n × n` is stored),
//! `proxy_head_weights` and `proxy_budget` (step 4: the k-th largest weight found by
//! bisection on its float bits, no sort), `proxy_select` (step 5, the k-th largest
//! score by the same bisection, written ascending into the LUT). CPU twin:
//! [`proxy_select_cpu`] and the functions it calls, one per kernel.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    GpuSelection, MethodStats, SelectBuild, SelectInput, SelectIo, Selection, Selector,
    planned_by_heads, planned_passes,
};
use super::{PassPairs, SelectionLayout};
use crate::attention::AttentionShape;
use crate::attention::flash_cpu::{self, exp_fast};
use crate::attention::lut::{LutUnit, SparseLut};
use crate::attention::params::impl_params;
use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{
    Bound, Launch, check_axis, check_binding, grid_2d, storage, storage_init,
};
use crate::runtime::memory::{DeviceLimits, HeadChunk, PlannedBuffer, head_chunks};
use crate::runtime::preprocess::Defines;
use crate::runtime::tensor::DType;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Query rows one sweep of the score kernels handles (`ROWS` in proxy.wgsl).
const SWEEP_ROWS: usize = 8;

/// ProxyAttn's parameters (the defaults of the method's authors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// Share of a head's (last-block) attention its kept blocks must hold: sets the
    /// head's budget fraction.
    pub gamma: f32,
    /// Proxy groups (must divide the key heads): 1 = one proxy head for all heads.
    pub groups: usize,
    /// Every `stride`-th query row of a block is scored by the proxy.
    pub stride: usize,
    /// Query and key block size (rows).
    pub block: usize,
    /// Fewest keys every query block keeps (rounded down to whole blocks).
    pub min_budget: usize,
    /// Fixed per-head budget fractions β (length `q_heads`, each in (0, 1]), e.g. from a
    /// budgets file (`wgsparse budget`): head `i` keeps `⌈β_i · blocks⌉` of the last
    /// query block's key blocks and step 4 (the budget estimate) is skipped; `gamma`
    /// is then unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_budget: Option<Vec<f32>>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            gamma: 0.95,
            groups: 1,
            stride: 4,
            block: 128,
            min_budget: 2048,
            head_budget: None,
        }
    }
}

impl_params!(ProxyConfig, "proxy" { gamma, groups | "proxy_groups", stride, block, min_budget });

impl ProxyConfig {
    /// Checks the configuration against a shape; errors say what is wrong.
    pub fn validate(&self, shape: &AttentionShape) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("proxy: {m}")));
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return bad(format!("gamma {} must be in (0, 1]", self.gamma));
        }
        if self.block == 0 || !self.block.is_multiple_of(64) || self.block > 1024 {
            return bad(format!(
                "block {} must be a multiple of 64 in 64..=1024 (the executor's query tiles)",
                self.block
            ));
        }
        if self.stride == 0 || self.stride > self.block {
            return bad(format!("stride {} must be in 1..=block", self.stride));
        }
        if self.groups == 0 || !shape.kv_heads.is_multiple_of(self.groups) {
            return bad(format!(
                "groups {} must divide the {} key heads",
                self.groups, shape.kv_heads
            ));
        }
        if shape.kv_len != shape.seq_len {
            return bad("needs as many keys as queries (causal prefill)".into());
        }
        if let Some(b) = &self.head_budget {
            if b.len() != shape.q_heads {
                return bad(format!(
                    "{} per-head budgets for {} q heads",
                    b.len(),
                    shape.q_heads
                ));
            }
            if let Some(x) = b.iter().find(|x| !(**x > 0.0 && **x <= 1.0)) {
                return bad(format!("per-head budget {x} must be in (0, 1]"));
            }
        }
        Ok(())
    }

    /// The fixed per-head budgets in key blocks (`⌈β · blocks⌉`, at least 1) when
    /// [`ProxyConfig::head_budget`] is set.
    pub fn fixed_budgets(&self, blocks: usize) -> Option<Vec<u32>> {
        self.head_budget.as_ref().map(|b| {
            b.iter()
                .map(|&beta| crate::budget::units_of(beta, blocks).clamp(1, blocks.max(1)) as u32)
                .collect()
        })
    }

    /// The proxy group of query head `h`.
    pub fn group_of(&self, shape: &AttentionShape, h: usize) -> usize {
        let kvh = h / (shape.q_heads / shape.kv_heads);
        kvh / (shape.kv_heads / self.groups)
    }

    /// Kept (scored) rows of a full query block.
    pub fn kept_rows(&self) -> usize {
        self.block.div_ceil(self.stride)
    }

    /// The fewest blocks every query block keeps.
    pub fn min_blocks(&self) -> usize {
        self.min_budget / self.block
    }

    /// Blocks query block `m` (0-based) keeps when its head's budget is `budget` of
    /// `blocks` key blocks: `K` of the `m + 1` causal blocks (step 5 of the module
    /// docs), in integers.
    pub fn keep_count(&self, m: usize, budget: usize, blocks: usize) -> usize {
        let causal = m + 1;
        let by_budget = (budget * causal).div_ceil(blocks.max(1));
        causal.min(by_budget.max(self.min_blocks()))
    }

    /// The exact pass's LUT: block 0 and the diagonal block of every query block.
    pub fn exact_lut(&self, shape: &AttentionShape) -> Result<SparseLut> {
        SparseLut::from_fn(
            shape.q_heads,
            shape.seq_len,
            self.block,
            LutUnit::Blocks(self.block),
            |_, m| if m == 0 { vec![0] } else { vec![0, m as u32] },
        )
    }

    /// The selected LUT's layout: one row per (head, query block), room for the blocks
    /// strictly between block 0 and the diagonal.
    pub fn block_layout(&self, shape: &AttentionShape) -> SelectionLayout {
        let nb = shape.seq_len.div_ceil(self.block);
        SelectionLayout {
            q_block: self.block,
            unit: LutUnit::Blocks(self.block),
            capacity: (0..shape.q_heads * nb)
                .map(|i| (i % nb).saturating_sub(1) as u32)
                .collect(),
        }
    }
}

/// What the proxy estimated for one run.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyEstimate {
    /// Query (and key) blocks.
    pub blocks: usize,
    /// Block scores `A`, `[groups, blocks, blocks]` (key blocks past the diagonal: 0).
    pub scores: Vec<f32>,
    /// Budget of every query head in key blocks (`k_i`; the fraction is `k_i / blocks`).
    pub budgets: Vec<u32>,
}

impl ProxyEstimate {
    /// The budget fractions β of every query head.
    pub fn fractions(&self) -> Vec<f64> {
        fractions(&self.budgets, self.blocks)
    }
}

fn fractions(budgets: &[u32], blocks: usize) -> Vec<f64> {
    budgets
        .iter()
        .map(|&k| k as f64 / blocks.max(1) as f64)
        .collect()
}

/// Row `r` of a `d`-wide head-major tensor of `rows` rows per head.
fn row(x: &[f32], head: usize, rows: usize, r: usize, d: usize) -> &[f32] {
    let at = (head * rows + r) * d;
    &x[at..at + d]
}

/// The mean over `heads` of a head-major tensor at `rows` (row indices), `[rows, d]`
/// (heads summed in order, then divided by their count: the GPU's order).
fn mean_heads(
    x: &[f32],
    heads: std::ops::Range<usize>,
    n: usize,
    d: usize,
    rows: impl Iterator<Item = Option<usize>>,
) -> Vec<f32> {
    let count = heads.len() as f32;
    let mut out = vec![];
    for r in rows {
        let at = out.len();
        out.resize(at + d, 0.0);
        if let Some(r) = r {
            for h in heads.clone() {
                for (o, v) in out[at..].iter_mut().zip(row(x, h, n, r, d)) {
                    *o += v;
                }
            }
            out[at..].iter_mut().for_each(|o| *o /= count);
        }
    }
    out
}

/// Step 1, the CPU twin of `proxy_pool`: the proxy heads of every group, Q̄ at the kept
/// rows `[groups, blocks, kept_rows, d]` (rows past the end zero) and K̄ at every key
/// `[groups, n, d]`.
pub fn proxy_heads(x: &SelectInput<'_>, cfg: &ProxyConfig) -> (Vec<f32>, Vec<f32>) {
    let shape = x.shape;
    let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
    let nb = n.div_ceil(b);
    let kv_per_group = shape.kv_heads / cfg.groups;
    let q_per_kv = shape.q_heads / shape.kv_heads;
    let kept = cfg.kept_rows();
    let (mut qbar, mut kbar) = (vec![], vec![]);
    for g in 0..cfg.groups {
        let kv = g * kv_per_group..(g + 1) * kv_per_group;
        let qh = kv.start * q_per_kv..kv.end * q_per_kv;
        let rows = (0..nb * kept).map(|i| {
            let r = (i / kept) * b + (i % kept) * cfg.stride;
            (r < n).then_some(r)
        });
        qbar.extend(mean_heads(x.q, qh, n, d, rows));
        kbar.extend(mean_heads(x.k, kv, n, d, (0..n).map(Some)));
    }
    (qbar, kbar)
}

/// Query rows one call of [`score_rows`] scores together (the flash kernel's tile).
const TILE_ROWS: usize = flash_cpu::TILE_ROWS;
/// Keys per packed panel.
const PANEL: usize = flash_cpu::TILE_KEYS;

/// The scaled scores of up to [`TILE_ROWS`] query rows against the first `keys` keys of
/// `panels` (into `s[i][..keys]`), through the flash kernel's register tile.
#[inline(always)]
fn score_rows(
    rows: &[&[f32]],
    panels: &[f32],
    keys: usize,
    (d, scale, simd): (usize, f32, bool),
    s: &mut [Vec<f32>; TILE_ROWS],
) {
    let mut qg = vec![0.0f32; d * TILE_ROWS];
    for (i, q) in rows.iter().enumerate() {
        for (c, &x) in q[..d].iter().enumerate() {
            qg[c * TILE_ROWS + i] = x;
        }
    }
    for p in 0..keys.div_ceil(PANEL) {
        let panel = &panels[p * PANEL * d..(p + 1) * PANEL * d];
        let acc = flash_cpu::qk_tile_fast(&qg, panel, simd);
        let j0 = p * PANEL;
        let width = PANEL.min(keys - j0);
        for (si, a) in s.iter_mut().zip(&acc).take(rows.len()) {
            for (o, &x) in si[j0..j0 + width].iter_mut().zip(a) {
                *o = x * scale;
            }
        }
    }
}

/// Turns the scores `s` of one row into `e^(s - max)` in place; returns the sum
/// (eight partial sums).
#[inline(always)]
fn exp_row(s: &mut [f32]) -> f32 {
    let mut mx8 = [f32::NEG_INFINITY; 8];
    let (chunks, tail) = s.as_chunks::<8>();
    for c in chunks {
        for (m, &x) in mx8.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mx = tail
        .iter()
        .chain(&mx8)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum8 = [0.0f32; 8];
    let (chunks, tail) = s.as_chunks_mut::<8>();
    for c in chunks {
        for (acc, x) in sum8.iter_mut().zip(c.iter_mut()) {
            *x = exp_fast(*x - mx);
            *acc += *x;
        }
    }
    let mut sum: f32 = sum8.iter().sum();
    for x in tail {
        *x = exp_fast(*x - mx);
        sum += *x;
    }
    sum
}

/// Where a run of [`score_block_row`] or [`weigh_head`] reads: query rows (each `d`
/// wide), packed keys, the key count, head width, scale and block size.
struct RowJob<'a> {
    simd: bool,
    panels: &'a [f32],
    n: usize,
    d: usize,
    scale: f32,
    block: usize,
}

impl RowJob<'_> {
    /// For each query row `(r, q_r)`: `e^(s - max)` of keys `0..=r` and `1 / Σ` (the
    /// softmax's factor) handed to `per_row`. Rows go [`TILE_ROWS`] at a time through
    /// [`score_rows`].
    #[inline(always)]
    fn each_row(&self, rows: &[(usize, &[f32])], mut per_row: impl FnMut(&[f32], f32)) {
        let mut s: [Vec<f32>; TILE_ROWS] = std::array::from_fn(|_| vec![0.0f32; self.n]);
        for tile in rows.chunks(TILE_ROWS) {
            let q: Vec<&[f32]> = tile.iter().map(|x| x.1).collect();
            let keys = tile.iter().map(|x| x.0 + 1).max().unwrap_or(0);
            score_rows(
                &q,
                self.panels,
                keys,
                (self.d, self.scale, self.simd),
                &mut s,
            );
            for (i, &(r, _)) in tile.iter().enumerate() {
                let e = &mut s[i][..=r];
                let l = exp_row(e);
                per_row(e, 1.0 / l);
            }
        }
    }
}

/// Steps 2–3 for query block `m` of one group: the block maxima of the kept rows'
/// proxy probabilities into `a_row` (`[blocks]`).
#[inline(always)]
fn score_block_row(job: &RowJob<'_>, qbar: &[f32], cfg: &ProxyConfig, m: usize, a_row: &mut [f32]) {
    let (b, d) = (job.block, job.d);
    let rows: Vec<(usize, &[f32])> = (0..cfg.kept_rows())
        .map(|i| (m * b + i * cfg.stride, i))
        .filter(|&(r, _)| r < job.n && r < (m + 1) * b)
        .map(|(r, i)| (r, &qbar[i * d..(i + 1) * d]))
        .collect();
    job.each_row(&rows, |e, inv| {
        for (a, keys) in a_row.iter_mut().zip(e.chunks(b)) {
            let best = keys.iter().fold(0.0f32, |x, &y| if y > x { y } else { x });
            *a = a.max(best * inv);
        }
    });
}

/// Step 4's weights of one head: its probabilities over the rows of the last query
/// block, summed per key block and divided by the block's key count.
#[inline(always)]
fn weigh_head(job: &RowJob<'_>, q_head: &[f32], weight: &mut [f64]) {
    let (n, d, b) = (job.n, job.d, job.block);
    let last = (n - 1) / b * b;
    let rows: Vec<(usize, &[f32])> = (last..n)
        .map(|r| (r, &q_head[r * d..(r + 1) * d]))
        .collect();
    job.each_row(&rows, |e, inv| {
        for (nblk, (w, keys)) in weight.iter_mut().zip(e.chunks(b)).enumerate() {
            let width = ((nblk + 1) * b).min(n) - nblk * b;
            let mut sum8 = [0.0f32; 8];
            let (chunks, tail) = keys.as_chunks::<8>();
            for c in chunks {
                for (acc, &x) in sum8.iter_mut().zip(c) {
                    *acc += x;
                }
            }
            let sum = sum8.iter().chain(tail).sum::<f32>();
            *w += (sum * inv) as f64 / width as f64;
        }
    });
}

/// [`score_block_row`] and [`weigh_head`] compiled for AVX2 + FMA (8-lane loops).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn score_block_row(
        job: &RowJob<'_>,
        qbar: &[f32],
        cfg: &ProxyConfig,
        m: usize,
        a_row: &mut [f32],
    ) {
        super::score_block_row(job, qbar, cfg, m, a_row)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weigh_head(job: &RowJob<'_>, q_head: &[f32], weight: &mut [f64]) {
        super::weigh_head(job, q_head, weight)
    }
}

/// Steps 1–3, the CPU twin of `proxy_pool` and `proxy_block_scores`: the block scores
/// `A` of every proxy group, `[groups, blocks, blocks]`.
pub fn proxy_block_scores(x: &SelectInput<'_>, cfg: &ProxyConfig) -> Vec<f32> {
    let shape = x.shape;
    let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
    let nb = n.div_ceil(b);
    let (qbar, kbar) = proxy_heads(x, cfg);
    let kept = cfg.kept_rows();
    let panels: Vec<Vec<f32>> = kbar
        .par_chunks(n * d)
        .map(|k| flash_cpu::pack_key_panels(k, n, d))
        .collect();
    let simd = flash_cpu::simd_tiles();
    let mut scores = vec![0.0f32; cfg.groups * nb * nb];
    scores
        .par_chunks_mut(nb)
        .enumerate()
        .for_each(|(gm, a_row)| {
            let (g, m) = (gm / nb, gm % nb);
            let job = RowJob {
                simd,
                panels: &panels[g],
                n,
                d,
                scale: x.scale,
                block: b,
            };
            let q = &qbar[(g * nb + m) * kept * d..(g * nb + m + 1) * kept * d];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 and FMA (`simd`).
                return unsafe { avx2::score_block_row(&job, q, cfg, m, a_row) };
            }
            score_block_row(&job, q, cfg, m, a_row)
        });
    scores
}

/// Step 4's weights, the CPU twin of `proxy_head_weights` (the chunks summed): for
/// every query head, its exact attention over the rows of the last query block,
/// averaged over those rows' sum and over the keys of each key block, `[q_heads,
/// blocks]`.
pub fn head_weights(x: &SelectInput<'_>, cfg: &ProxyConfig) -> Vec<Vec<f64>> {
    let SelectInput {
        shape, scale, q, k, ..
    } = *x;
    let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
    let nb = n.div_ceil(b);
    let q_per_kv = shape.q_heads / shape.kv_heads;
    let panels: Vec<Vec<f32>> = k
        .par_chunks(n * d)
        .map(|k| flash_cpu::pack_key_panels(k, n, d))
        .collect();
    let simd = flash_cpu::simd_tiles();
    (0..shape.q_heads)
        .into_par_iter()
        .map(|h| {
            let job = RowJob {
                simd,
                panels: &panels[h / q_per_kv],
                n,
                d,
                scale,
                block: b,
            };
            let mut weight = vec![0.0f64; nb];
            let qh = &q[h * n * d..(h + 1) * n * d];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 and FMA (`simd`).
                unsafe { avx2::weigh_head(&job, qh, &mut weight) };
                return weight;
            }
            weigh_head(&job, qh, &mut weight);
            weight
        })
        .collect()
}

/// Step 4, the CPU twin of `proxy_budget`: every query head's budget in key blocks.
pub fn head_budgets(x: &SelectInput<'_>, cfg: &ProxyConfig) -> Vec<u32> {
    head_weights(x, cfg)
        .into_iter()
        .map(|mut w| budget_blocks(&mut w, cfg.gamma))
        .collect()
}

/// The budget of block weights: sorted in decreasing order and normalised, the
/// smallest count whose prefix sum reaches `gamma` (at least 1).
pub fn budget_blocks(weight: &mut [f64], gamma: f32) -> u32 {
    let total: f64 = weight.iter().sum();
    weight.sort_by(|a, b| b.total_cmp(a));
    let mut acc = 0.0;
    let mut k = weight.len();
    for (i, w) in weight.iter().enumerate() {
        acc += w / total.max(f64::MIN_POSITIVE);
        if acc >= gamma as f64 {
            k = i + 1;
            break;
        }
    }
    k.max(1) as u32
}

/// Step 5 for one query block, the CPU twin of `proxy_select`: the kept key blocks of
/// `scores` (`A[m, 0..=m]` of the head's group) for a head whose budget is `budget` of
/// `blocks` key blocks, in increasing order, block 0 and the diagonal included.
pub fn select_blocks(
    cfg: &ProxyConfig,
    m: usize,
    scores: &[f32],
    budget: u32,
    blocks: usize,
) -> Vec<u32> {
    let mut order: Vec<u32> = (0..=m as u32).collect();
    // Decreasing score; equal scores keep the lower block first (a stable sort).
    order.sort_by(|&x, &y| scores[y as usize].total_cmp(&scores[x as usize]));
    let mut keep: Vec<u32> = order[..cfg.keep_count(m, budget as usize, blocks)].to_vec();
    keep.extend([0, m as u32]);
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// ProxyAttn's whole block mask on the host: for every head and query block the kept
/// key blocks (a [`LutUnit::Blocks`] LUT of `block × block` blocks, block 0 and the
/// diagonal included), with what the proxy estimated.
pub fn proxy_select_cpu(
    shape: &AttentionShape,
    cfg: &ProxyConfig,
    scale: f32,
    q: &[f32],
    k: &[f32],
) -> Result<(SparseLut, ProxyEstimate)> {
    cfg.validate(shape)?;
    let nb = shape.seq_len.div_ceil(cfg.block);
    let x = SelectInput {
        shape,
        scale,
        q,
        k,
        ml: &[],
    };
    let (scores, budgets) = rayon::join(
        || proxy_block_scores(&x, cfg),
        || {
            cfg.fixed_budgets(nb)
                .unwrap_or_else(|| head_budgets(&x, cfg))
        },
    );
    let est = ProxyEstimate {
        blocks: nb,
        scores,
        budgets,
    };
    let lut = mask_from(shape, cfg, &est)?;
    Ok((lut, est))
}

/// The mask of step 5 from an estimate (block 0 and the diagonal included).
pub fn mask_from(
    shape: &AttentionShape,
    cfg: &ProxyConfig,
    est: &ProxyEstimate,
) -> Result<SparseLut> {
    let nb = est.blocks;
    SparseLut::from_fn(
        shape.q_heads,
        shape.seq_len,
        cfg.block,
        LutUnit::Blocks(cfg.block),
        |h, m| {
            let g = cfg.group_of(shape, h);
            let a = &est.scores[(g * nb + m) * nb..(g * nb + m + 1) * nb];
            select_blocks(cfg, m, a, est.budgets[h], nb)
        },
    )
}

/// Steps 1–4 written plainly in f64, every score materialised (`O(n²)` memory per
/// row, slow): the reference the twin is tested against, on synthetic data here and on
/// real Q/K/V in the model tests. Returns the block scores `[groups, blocks, blocks]`
/// and each query head's budget in blocks; [`select_blocks`] gives the mask.
pub fn proxy_reference(
    shape: &AttentionShape,
    cfg: &ProxyConfig,
    scale: f64,
    q: &[f32],
    k: &[f32],
) -> (Vec<f64>, Vec<u32>) {
    let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
    let nb = n.div_ceil(b);
    let q_per_kv = shape.q_heads / shape.kv_heads;
    let kv_per_group = shape.kv_heads / cfg.groups;
    let softmax = |s: &[f64]| -> Vec<f64> {
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let l: f64 = e.iter().sum();
        e.iter().map(|x| x / l).collect()
    };
    let mut a = vec![0.0f64; cfg.groups * nb * nb];
    for g in 0..cfg.groups {
        let kvs: Vec<usize> = (g * kv_per_group..(g + 1) * kv_per_group).collect();
        let qs: Vec<usize> = (kvs[0] * q_per_kv..(kvs[kvs.len() - 1] + 1) * q_per_kv).collect();
        let mean = |x: &[f32], heads: &[usize], r: usize| -> Vec<f64> {
            (0..d)
                .map(|c| {
                    heads
                        .iter()
                        .map(|&h| x[(h * n + r) * d + c] as f64)
                        .sum::<f64>()
                        / heads.len() as f64
                })
                .collect()
        };
        for r in 0..n {
            if (r % b) % cfg.stride != 0 {
                continue;
            }
            let qr = mean(q, &qs, r);
            let s: Vec<f64> = (0..=r)
                .map(|j| {
                    let kj = mean(k, &kvs, j);
                    qr.iter().zip(&kj).map(|(x, y)| x * y).sum::<f64>() * scale
                })
                .collect();
            let p = softmax(&s);
            for (j, pj) in p.iter().enumerate() {
                let at = (g * nb + r / b) * nb + j / b;
                a[at] = a[at].max(*pj);
            }
        }
    }
    let mut betas = vec![];
    for h in 0..shape.q_heads {
        let kvh = h / q_per_kv;
        let mut w = vec![0.0f64; nb];
        for r in (nb - 1) * b..n {
            let s: Vec<f64> = (0..=r)
                .map(|j| {
                    (0..d)
                        .map(|c| q[(h * n + r) * d + c] as f64 * k[(kvh * n + j) * d + c] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            for (j, pj) in softmax(&s).iter().enumerate() {
                let width = ((j / b + 1) * b).min(n) - j / b * b;
                w[j / b] += pj / width as f64;
            }
        }
        betas.push(budget_blocks(&mut w, cfg.gamma));
    }
    (a, betas)
}

/// What ProxyAttn computed in one run (serialized with the keys `causal_pairs`,
/// `exact_pairs`, `selected_pairs`, `candidate_blocks`, `selected_blocks`,
/// `head_budgets`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyStats {
    /// Causal pairs, the exact pass's pairs (block 0 and the diagonal) and the selected
    /// blocks' pairs.
    pub pairs: PassPairs,
    /// Blocks strictly between block 0 and the diagonal (all heads): the candidates.
    pub candidate_blocks: u64,
    /// Candidates selected (all heads).
    pub selected_blocks: u64,
    /// Budget fraction β of every query head (its budget in blocks over the blocks).
    pub head_budgets: Vec<f64>,
}

impl ProxyStats {
    fn new(
        shape: &AttentionShape,
        cfg: &ProxyConfig,
        pairs: PassPairs,
        counts: &[u32],
        budgets: &[u32],
    ) -> Self {
        let nb = shape.seq_len.div_ceil(cfg.block);
        let per_head: u64 = (0..nb).map(|m| m.saturating_sub(1) as u64).sum();
        ProxyStats {
            pairs,
            candidate_blocks: per_head * shape.q_heads as u64,
            selected_blocks: counts.iter().map(|&c| c as u64).sum(),
            head_budgets: fractions(budgets, nb),
        }
    }
}

impl ProxyStats {
    /// The statistics of runs over consecutive runs of heads of one problem, as one
    /// (each part given with its q-heads).
    pub fn concat_heads(parts: Vec<(usize, ProxyStats)>) -> Self {
        let parts: Vec<ProxyStats> = parts.into_iter().map(|(_, p)| p).collect();
        ProxyStats {
            pairs: PassPairs::sum(parts.iter().map(|p| p.pairs)),
            candidate_blocks: parts.iter().map(|p| p.candidate_blocks).sum(),
            selected_blocks: parts.iter().map(|p| p.selected_blocks).sum(),
            head_budgets: parts.into_iter().flat_map(|p| p.head_budgets).collect(),
        }
    }
}

impl Serialize for ProxyStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde_json::json;
        let extra = [
            ("candidate_blocks", json!(self.candidate_blocks)),
            ("selected_blocks", json!(self.selected_blocks)),
            ("head_budgets", json!(self.head_budgets)),
        ];
        self.pairs
            .serialize_with(s, ["exact_pairs", "selected_pairs"], &extra)
    }
}

impl std::fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (exact, selected) = self.pairs.fractions();
        let b = &self.head_budgets;
        let (lo, hi) = b.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
        let mean = b.iter().sum::<f64>() / b.len().max(1) as f64;
        write!(
            f,
            "proxy: {} of {} candidate blocks selected, exact pairs {exact:.4} + selected pairs {selected:.4} of causal; head budgets mean {mean:.3} (min {lo:.3}, max {hi:.3})",
            self.selected_blocks, self.candidate_blocks,
        )
    }
}

impl Selector for ProxyConfig {
    fn name(&self) -> &'static str {
        "proxy"
    }
    fn validate(&self, shape: &AttentionShape) -> Result<()> {
        ProxyConfig::validate(self, shape)
    }
    fn head_unit(&self, shape: &AttentionShape) -> usize {
        // One proxy head scores the blocks of all its group's q-heads.
        shape.q_heads / self.groups.max(1)
    }
    fn exact_lut(&self, shape: &AttentionShape) -> Result<SparseLut> {
        ProxyConfig::exact_lut(self, shape)
    }
    fn layout(&self, shape: &AttentionShape) -> Result<SelectionLayout> {
        Ok(self.block_layout(shape))
    }
    fn select_cpu(&self, x: &SelectInput<'_>) -> Result<Selection> {
        let (mask, est) = proxy_select_cpu(x.shape, self, x.scale, x.q, x.k)?;
        // The exact pass has block 0 and the diagonal.
        let lut = SparseLut::from_fn(
            x.shape.q_heads,
            x.shape.seq_len,
            self.block,
            LutUnit::Blocks(self.block),
            |h, m| {
                let e = mask.entries(h, m);
                e.iter()
                    .copied()
                    .filter(|&n| n != 0 && n != m as u32)
                    .collect()
            },
        )?;
        Ok(Selection {
            lut,
            detail: est.budgets,
        })
    }
    fn build_gpu(&self, b: &SelectBuild<'_>) -> Result<Box<dyn GpuSelection>> {
        Ok(Box::new(ProxySelectGpu::build(b, self)?))
    }
    fn plan_buffers(
        &self,
        shape: &AttentionShape,
        dtype: DType,
        limits: &DeviceLimits,
    ) -> (Vec<PlannedBuffer>, Vec<(String, usize)>) {
        let (q, runs) = planned_by_heads(
            "Q, bound by runs of heads (proxy pool, head weights)",
            shape.q_heads,
            shape,
            dtype,
            limits,
        );
        let mut buffers = vec![q];
        buffers.extend(ProxyBuffers::of(self, shape, dtype).planned());
        let passes = [("pool", runs), ("estimate", runs + 2), ("select", 1)];
        (buffers, planned_passes(&passes))
    }
    fn stats(
        &self,
        shape: &AttentionShape,
        pairs: PassPairs,
        counts: &[u32],
        detail: &[u32],
    ) -> MethodStats {
        let budgets = &detail[..detail.len().min(shape.q_heads)];
        MethodStats::Proxy(ProxyStats::new(shape, self, pairs, counts, budgets))
    }
}

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters of the ProxyAttn kernels (`struct Params` in proxy.wgsl).
    pub struct ProxyParams {
        seq_len: u32,
        q_heads: u32,
        kv_heads: u32,
        groups: u32,
        block: u32,
        stride: u32,
        kept: u32,
        blocks: u32,
        chunks: u32,
        min_blocks: u32,
        scale: f32,
        gamma: f32,
        x_head0: u32,
        x_head1: u32,
        x_base: u32,
        first_run: u32,
    }
}

/// Which ProxyAttn kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Pool,
    Scores,
    HeadWeights,
    Budget,
    Select,
}

fn proxy_spec(stage: Stage, d: usize, dtype: DType) -> KernelSpec {
    let (entry, flag, bindings) = match stage {
        Stage::Pool => ("proxy_pool", "STAGE_POOL", "urrww"),
        Stage::Scores => ("proxy_block_scores", "STAGE_SCORES", "urrw"),
        Stage::HeadWeights => ("proxy_head_weights", "STAGE_SCORES", "urrw"),
        Stage::Budget => ("proxy_budget", "STAGE_BUDGET", "urww"),
        Stage::Select => ("proxy_select", "STAGE_SELECT", "urrrww"),
    };
    // Only the stages that read Q or K depend on their storage type and width.
    let reads_qk = matches!(stage, Stage::Pool | Stage::HeadWeights);
    KernelSpec {
        file: "attention/select/proxy.wgsl",
        entry,
        defines: Defines::new()
            .params::<ProxyParams>()
            .flag(flag)
            .flag_if("HEAD_WEIGHTS", stage == Stage::HeadWeights)
            .flag_if("REDUCE", matches!(stage, Stage::Budget | Stage::Select))
            .flag_if("STORE_F16", reads_qk && dtype == DType::F16)
            .const_u32("D", d as u32),
        bindings: BindingKind::layout(bindings),
    }
}

/// Every ProxyAttn kernel variant (shader dump and portability tests): d = 64, 128 and
/// 256, f32 and f16 storage for the kernels that read Q and K.
pub fn all_proxy_variants() -> Vec<KernelSpec> {
    let mut out = vec![];
    for d in [64, 128, 256] {
        for stage in [
            Stage::Pool,
            Stage::Scores,
            Stage::HeadWeights,
            Stage::Budget,
            Stage::Select,
        ] {
            out.push(proxy_spec(stage, d, DType::F32));
            if matches!(stage, Stage::Pool | Stage::HeadWeights) {
                out.push(proxy_spec(stage, d, DType::F16));
            }
        }
    }
    out
}

/// ProxyAttn's selection on a GPU context: the proxy heads ("pool"), block scores,
/// head weights and budgets ("estimate"), top-K and compaction ("select").
pub(crate) struct ProxySelectGpu {
    shape: AttentionShape,
    cfg: ProxyConfig,
    /// Pool once per run of whole heads of Q that fits a binding.
    runs: Vec<(Launch<ProxyParams>, HeadChunk)>,
    /// Block scores and select.
    launches: [Launch<ProxyParams>; 2],
    /// The budget estimate (step 4): head weights per run of heads, then the budget;
    /// `None` under fixed budgets, whose kernels are then not built.
    estimate_budget: Option<(Vec<Launch<ProxyParams>>, Launch<ProxyParams>)>,
    grid_pool: (u32, u32),
    chunks: u32,
    qbar: wgpu::Buffer,
    kbar: wgpu::Buffer,
    scores: wgpu::Buffer,
    part: wgpu::Buffer,
    weights: wgpu::Buffer,
    budget: wgpu::Buffer,
}

impl ProxySelectGpu {
    fn build(b: &SelectBuild<'_>, cfg: &ProxyConfig) -> Result<Self> {
        let (ctx, shape, opts) = (b.ctx, b.shape, b.opts);
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let (hq, n, d) = (shape.q_heads, shape.seq_len, shape.head_dim);
        let nb = n.div_ceil(cfg.block);
        let kept = cfg.kept_rows();
        let sizes = ProxyBuffers::of(cfg, shape, opts.dtype);
        let chunks = sizes.chunks;
        let max = g.caps.max_workgroups_per_dim;
        check_axis(nb as u64, max, "proxy query blocks")?;
        check_axis(hq as u64, max, "proxy heads")?;
        // The pool and head-weight kernels bind K whole and Q one run of whole heads
        // at a time.
        check_binding(g, "K (proxy pool)", sizes.k_whole)?;
        let es = opts.dtype.size() as u64;
        let q_chunks = head_chunks(
            hq,
            (n * d) as u64 * es,
            4 * es,
            g.caps.max_storage_binding,
            g.caps.storage_offset_alignment as u64,
        )?;
        let pool_threads = ((cfg.groups * (nb * kept + n)) * (d / 4)) as u64;
        let grid_pool = grid_2d(pool_threads.div_ceil(64), max, "proxy pool")?;
        let params = ProxyParams {
            seq_len: n as u32,
            q_heads: hq as u32,
            kv_heads: shape.kv_heads as u32,
            groups: cfg.groups as u32,
            block: cfg.block as u32,
            stride: cfg.stride as u32,
            kept: kept as u32,
            blocks: nb as u32,
            chunks: chunks as u32,
            min_blocks: cfg.min_blocks() as u32,
            scale: opts.scale_for(shape),
            gamma: cfg.gamma,
            x_head0: 0,
            x_head1: hq as u32,
            x_base: 0,
            first_run: 1,
        };
        let spec = |s| proxy_spec(s, d, opts.dtype);
        let launch = |s| Launch::new(ctx, &spec(s), &params);
        let run_params = |i: usize, c: &HeadChunk| ProxyParams {
            x_head0: c.h0 as u32,
            x_head1: c.h1 as u32,
            x_base: c.base,
            first_run: (i == 0) as u32,
            ..params
        };
        let per_run = |stage: Stage| -> Result<Vec<Launch<ProxyParams>>> {
            q_chunks
                .iter()
                .enumerate()
                .map(|(i, c)| Launch::new(ctx, &spec(stage), &run_params(i, c)))
                .collect()
        };
        let runs = per_run(Stage::Pool)?
            .into_iter()
            .zip(q_chunks.iter().copied())
            .collect();
        let estimate_budget = match cfg.head_budget {
            None => Some((per_run(Stage::HeadWeights)?, launch(Stage::Budget)?)),
            Some(_) => None,
        };
        Ok(ProxySelectGpu {
            shape: *shape,
            cfg: cfg.clone(),
            runs,
            launches: [launch(Stage::Scores)?, launch(Stage::Select)?],
            estimate_budget,
            grid_pool,
            chunks: chunks as u32,
            qbar: storage(g, "proxy pooled q", sizes.qbar)?,
            kbar: storage(g, "proxy pooled k", sizes.kbar)?,
            scores: storage(g, "proxy block scores", sizes.scores)?,
            part: storage(g, "proxy head weight parts", sizes.part)?,
            weights: storage(g, "proxy head weights", sizes.weights)?,
            // Fixed budgets are written once here; estimated ones by `proxy_budget`.
            budget: match cfg.fixed_budgets(nb) {
                Some(b) => storage_init(g, "proxy head budgets", bytemuck::cast_slice(&b))?,
                None => storage(g, "proxy head budgets", sizes.budget)?,
            },
        })
    }
}

/// ProxyAttn's selection buffers and its bindings of Q and K, in bytes: one list for the
/// build and the memory plan.
struct ProxyBuffers {
    chunks: usize,
    k_whole: u64,
    qbar: u64,
    kbar: u64,
    scores: u64,
    part: u64,
    weights: u64,
    budget: u64,
}

impl ProxyBuffers {
    fn of(cfg: &ProxyConfig, shape: &AttentionShape, dtype: DType) -> Self {
        let (hq, hk, n, d) = (
            shape.q_heads as u64,
            shape.kv_heads as u64,
            shape.seq_len as u64,
            shape.head_dim as u64,
        );
        let nb = shape.seq_len.div_ceil(cfg.block);
        let kept = cfg.kept_rows() as u64;
        let chunks = (shape.seq_len - (nb - 1) * cfg.block).div_ceil(SWEEP_ROWS);
        let (nb, g, es, f) = (nb as u64, cfg.groups as u64, dtype.size() as u64, 4u64);
        ProxyBuffers {
            chunks,
            k_whole: hk * n * d * es,
            qbar: g * nb * kept * d * f,
            kbar: g * n * d * f,
            scores: g * nb * nb * f,
            part: hq * chunks as u64 * nb * f,
            weights: hq * nb * f,
            budget: hq * f,
        }
    }

    fn planned(&self) -> Vec<PlannedBuffer> {
        vec![
            PlannedBuffer::whole("K, bound whole (proxy pool)", self.k_whole),
            PlannedBuffer::whole("proxy pooled q", self.qbar),
            PlannedBuffer::whole("proxy pooled k", self.kbar),
            PlannedBuffer::whole("proxy block scores", self.scores),
            PlannedBuffer::whole("proxy head weight parts", self.part),
            PlannedBuffer::whole("proxy head weights", self.weights),
            PlannedBuffer::whole("proxy head budgets", self.budget),
        ]
    }
}

impl GpuSelection for ProxySelectGpu {
    fn record(&self, rec: &mut Recorder<'_>, io: &SelectIo<'_>) -> Result<()> {
        let g = rec.gpu();
        let [scores, select] = &self.launches;
        let nb = self.shape.seq_len.div_ceil(self.cfg.block) as u32;
        let hq = self.shape.q_heads as u32;
        let (gx, gy) = self.grid_pool;
        let w = Bound::Whole;
        let q_part = |c: &HeadChunk| Bound::Range(io.q, c.offset, c.size);
        let pool: Vec<_> = self
            .runs
            .iter()
            .map(|(pool, c)| {
                let bufs = [q_part(c), w(io.k), w(&self.qbar), w(&self.kbar)];
                pool.dispatch_bound(g, &bufs, (gx, gy, 1))
            })
            .collect();
        let mut estimate = vec![scores.dispatch(
            g,
            &[&self.qbar, &self.kbar, &self.scores],
            (nb, self.cfg.groups as u32, 1),
        )];
        // Step 4 only where the budgets are estimated (fixed ones are in the buffer).
        if let Some((head_weights, budget)) = &self.estimate_budget {
            for (weights, (_, c)) in head_weights.iter().zip(&self.runs) {
                let bufs = [q_part(c), w(io.k), w(&self.part)];
                let grid = (self.chunks, (c.h1 - c.h0) as u32, 1);
                estimate.push(weights.dispatch_bound(g, &bufs, grid));
            }
            estimate.push(budget.dispatch(
                g,
                &[&self.part, &self.weights, &self.budget],
                (hq, 1, 1),
            ));
        }
        let bufs = [
            &self.scores,
            &self.budget,
            io.row_base,
            io.ranges,
            io.indices,
        ];
        let select = select.dispatch(g, &bufs, (nb, hq, 1));
        rec.dispatch_stage("pool", &pool);
        rec.dispatch_stage("estimate", &estimate);
        rec.dispatch_stage("select", &[select]);
        Ok(())
    }

    fn counts(&self) -> (u32, usize) {
        match self.estimate_budget {
            None => (3, self.runs.len() + 2),
            Some(_) => (3, 2 * self.runs.len() + 3),
        }
    }

    fn detail(&self) -> Option<&wgpu::Buffer> {
        Some(&self.budget)
    }
}

/// What the GPU stages of the last run computed (read back; tests).
#[derive(Clone, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct ProxyGpuState {
    pub qbar: Vec<f32>,
    pub kbar: Vec<f32>,
    pub estimate: ProxyEstimate,
    pub weights: Vec<f32>,
}

impl ProxySelectGpu {
    /// Reads the proxy heads, block scores, head weights and budgets back.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) async fn state(&self, ctx: &Context) -> Result<ProxyGpuState> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        async fn words<T: bytemuck::Pod>(
            g: &crate::runtime::context::GpuDevice,
            b: &wgpu::Buffer,
        ) -> Result<Vec<T>> {
            let bytes = crate::runtime::tensor::read_buffer(g, b, 0, b.size()).await?;
            Ok(bytemuck::cast_slice(&bytes).to_vec())
        }
        let hq = self.shape.q_heads;
        let mut budgets: Vec<u32> = words(g, &self.budget).await?;
        budgets.truncate(hq);
        Ok(ProxyGpuState {
            qbar: words(g, &self.qbar).await?,
            kbar: words(g, &self.kbar).await?,
            estimate: ProxyEstimate {
                blocks: self.shape.seq_len.div_ceil(self.cfg.block),
                scores: words(g, &self.scores).await?,
                budgets,
            },
            weights: words(g, &self.weights).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::synthetic::qkv_host;

    fn small() -> ProxyConfig {
        ProxyConfig {
            block: 64,
            min_budget: 128,
            ..Default::default()
        }
    }

    /// The twin against the plain f64 reference: block scores within 1e-5 relative
    /// (plus a tiny absolute floor), the same budgets, and the same masks except where
    /// two candidate scores of a row are a near-tie (counted).
    #[test]
    fn twin_matches_a_plain_reference() {
        for (shape, groups, seed) in [
            (AttentionShape::new(4, 2, 300, 32), 1, 1u64),
            (AttentionShape::new(4, 2, 333, 64), 2, 2),
            (AttentionShape::new(2, 2, 130, 32), 2, 3),
        ] {
            let cfg = ProxyConfig { groups, ..small() };
            let (q, k, _) = qkv_host(&shape, seed);
            let scale = 1.0 / (shape.head_dim as f32).sqrt();
            let (lut, est) = proxy_select_cpu(&shape, &cfg, scale, &q, &k).unwrap();
            let (a, betas) = proxy_reference(&shape, &cfg, scale as f64, &q, &k);
            for (got, want) in est.scores.iter().zip(&a) {
                let tol = 1e-5 * want.abs() + 1e-7;
                assert!((*got as f64 - want).abs() <= tol, "{got} vs {want}");
            }
            // Budgets: the same block count, but for a prefix sum within rounding of
            // gamma (one block either way).
            for (got, want) in est.budgets.iter().zip(&betas) {
                assert!(got.abs_diff(*want) <= 1, "{got} vs {want}");
            }
            let nb = est.blocks;
            let mut ties = 0;
            for h in 0..shape.q_heads {
                let g = cfg.group_of(&shape, h);
                for m in 0..nb {
                    let row = &a[(g * nb + m) * nb..(g * nb + m) * nb + m + 1];
                    let row32: Vec<f32> = row.iter().map(|&x| x as f32).collect();
                    let want = select_blocks(&cfg, m, &row32, est.budgets[h], nb);
                    let got = lut.entries(h, m);
                    if got != want.as_slice() {
                        // Only a near-tie at the cut may differ.
                        let mut sorted = row.to_vec();
                        sorted.sort_by(|x, y| y.total_cmp(x));
                        let cut = cfg.keep_count(m, est.budgets[h] as usize, nb) - 1;
                        let near = sorted
                            .windows(2)
                            .skip(cut.saturating_sub(1))
                            .take(2)
                            .any(|w| (w[0] - w[1]).abs() <= 1e-5 * w[0].abs());
                        assert!(near, "head {h} block {m}: {got:?} vs {want:?}");
                        ties += 1;
                    }
                }
            }
            eprintln!("{shape:?} groups {groups}: {ties} near-ties");
        }
    }

    /// gamma = 1 with a budget of every key keeps every causal block: dense attention.
    #[test]
    fn full_budget_is_dense() {
        let shape = AttentionShape::new(2, 1, 450, 32);
        let cfg = ProxyConfig {
            gamma: 1.0,
            min_budget: 512,
            ..small()
        };
        let (q, k, _) = qkv_host(&shape, 9);
        let (lut, est) = proxy_select_cpu(&shape, &cfg, 0.2, &q, &k).unwrap();
        for h in 0..2 {
            for m in 0..est.blocks {
                assert_eq!(
                    lut.entries(h, m),
                    (0..=m as u32).collect::<Vec<_>>().as_slice()
                );
            }
        }
        assert!(est.fractions().iter().all(|&b| b > 0.0 && b <= 1.0));
    }

    /// A key block that every query of one head group attends strongly is kept for
    /// that group's heads, whose budgets stay small.
    #[test]
    fn a_planted_heavy_block_is_kept_for_its_group() {
        let shape = AttentionShape::new(4, 2, 64 * 8, 32);
        let cfg = ProxyConfig {
            groups: 2,
            gamma: 0.5,
            min_budget: 64,
            ..small()
        };
        let (mut q, mut k, _) = qkv_host(&shape, 11);
        q.iter_mut().for_each(|x| *x *= 0.1);
        k.iter_mut().for_each(|x| *x *= 0.1);
        // Key heads 1 (group 1): keys of block 3 all along one direction, and queries
        // of heads 2 and 3 (group 1) along it too.
        let (n, d) = (shape.seq_len, shape.head_dim);
        for j in 3 * 64..4 * 64 {
            k[(n + j) * d] = 4.0;
        }
        for h in 2..4 {
            for r in 0..n {
                q[(h * n + r) * d] = 4.0;
            }
        }
        let (lut, est) = proxy_select_cpu(&shape, &cfg, 1.0 / (d as f32).sqrt(), &q, &k).unwrap();
        let nb = est.blocks;
        for m in 4..8 {
            for h in 2..4 {
                assert!(lut.entries(h, m).contains(&3), "head {h} block {m}");
            }
            // Group 1's proxy puts the planted block first; group 0 has no such block.
            let best = |g: usize| {
                let a = &est.scores[(g * nb + m) * nb..(g * nb + m) * nb + m + 1];
                (0..=m).max_by(|&x, &y| a[x].total_cmp(&a[y])).unwrap()
            };
            assert_eq!(best(1), 3, "block {m}");
        }
        // A concentrated head needs few blocks: a small budget.
        let beta = est.fractions();
        assert!(beta[2] <= 0.5 && beta[3] <= 0.5, "{beta:?}");
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let shape = AttentionShape::new(4, 2, 256, 32);
        for cfg in [
            ProxyConfig {
                gamma: 0.0,
                ..small()
            },
            ProxyConfig {
                gamma: 1.5,
                ..small()
            },
            ProxyConfig {
                groups: 3,
                ..small()
            },
            ProxyConfig {
                stride: 0,
                ..small()
            },
            ProxyConfig {
                block: 100,
                ..small()
            },
        ] {
            assert!(
                matches!(cfg.validate(&shape), Err(Error::InvalidArgument(_))),
                "{cfg:?}"
            );
        }
        let mut c = ProxyConfig::default();
        use crate::attention::params::Params;
        c.set("proxy_groups", "2").unwrap();
        c.set("gamma", "0.9").unwrap();
        assert_eq!((c.groups, c.gamma), (2, 0.9));
        assert!(c.set("theta", "1").is_err());
    }

    use crate::attention::{GpuPlan, Method, upload_qkv};
    use crate::runtime::test_util::{gpu, seed};

    fn close_rel(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs() + abs,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Every ProxyAttn kernel against its CPU twin on fresh random inputs, ragged
    /// lengths (not a multiple of the block), one proxy group and one per key head,
    /// f32 and f16 storage, GQA; the selected LUT against the host's step 5 on the
    /// GPU's own scores and budgets (exactly), and the output against the host's
    /// attention over that mask, written into a NaN-poisoned tensor.
    #[test]
    fn gpu_kernels_match_the_cpu_twin() {
        let Some(ctx) = gpu() else { return };
        let cases = [
            (AttentionShape::new(4, 2, 333, 64), 1, 64, DType::F32),
            (AttentionShape::new(4, 2, 333, 64), 2, 64, DType::F16),
            (AttentionShape::new(6, 3, 200, 64), 3, 64, DType::F32),
            (AttentionShape::new(2, 1, 300, 128), 1, 128, DType::F32),
            (AttentionShape::new(2, 1, 260, 96), 1, 64, DType::F16),
        ];
        let mut near_budget = 0;
        for (shape, groups, block, dtype) in cases {
            let cfg = ProxyConfig {
                groups,
                block,
                min_budget: block,
                gamma: 0.9,
                ..Default::default()
            };
            let (q, k, v) = qkv_host(&shape, seed());
            let (q, k, v) = (
                dtype.round_trip(&q),
                dtype.round_trip(&k),
                dtype.round_trip(&v),
            );
            let plan = ctx
                .attention(shape)
                .method(Method::Proxy(cfg.clone()))
                .dtype(dtype)
                .build()
                .unwrap();
            let (tq, tk, tv) = upload_qkv(&ctx, &shape, &q, &k, &v, dtype).unwrap();
            let mut out = crate::Tensor::filled(&ctx, &shape.q_dims(), dtype, f32::NAN).unwrap();
            plan.run_into(&tq, &tk, &tv, &mut out).unwrap();
            let Some(GpuPlan::Sparse(exec)) = &plan.gpu else {
                panic!("a GPU plan")
            };
            let sel: &dyn std::any::Any = exec.selection_gpu();
            let st = pollster::block_on(
                sel.downcast_ref::<ProxySelectGpu>()
                    .expect("ProxyAttn's selection")
                    .state(&ctx),
            )
            .unwrap();
            let label = format!("{shape:?} groups {groups} block {block} {dtype:?}");
            let scale = 1.0 / (shape.head_dim as f32).sqrt();
            let x = SelectInput {
                shape: &shape,
                scale,
                q: &q,
                k: &k,
                ml: &[],
            };
            // Step 1: the same sums in the same order.
            let (qbar, kbar) = proxy_heads(&x, &cfg);
            close_rel("qbar", &st.qbar[..qbar.len()], &qbar, 1e-6, 1e-7);
            close_rel("kbar", &st.kbar[..kbar.len()], &kbar, 1e-6, 1e-7);
            // Steps 2–3: the block scores (the GPU combines its threads' sums).
            let nb = st.estimate.blocks;
            let scores = proxy_block_scores(&x, &cfg);
            close_rel(
                "scores",
                &st.estimate.scores[..scores.len()],
                &scores,
                1e-4,
                1e-9,
            );
            // Step 4: weights, then budgets equal but where a prefix is a near-tie
            // with gamma.
            let weights = head_weights(&x, &cfg);
            for (h, head) in weights.iter().enumerate() {
                let want: Vec<f32> = head.iter().map(|&w| w as f32).collect();
                close_rel(
                    "weights",
                    &st.weights[h * nb..(h + 1) * nb],
                    &want,
                    1e-4,
                    1e-9,
                );
                let mut w = head.clone();
                let cpu = budget_blocks(&mut w, cfg.gamma);
                let gpu = st.estimate.budgets[h];
                if gpu != cpu {
                    let total: f64 = w.iter().sum();
                    let at = gpu.min(cpu) as usize;
                    let prefix: f64 = w[..at].iter().sum::<f64>() / total;
                    assert!(
                        (prefix - cfg.gamma as f64).abs() < 1e-5 && gpu.abs_diff(cpu) == 1,
                        "{label}: head {h} budget {gpu} vs {cpu} (prefix {prefix})"
                    );
                    near_budget += 1;
                }
            }
            // Step 5 on the GPU's own scores and budgets: exactly the host's choice.
            let mask = mask_from(&shape, &cfg, &st.estimate).unwrap();
            let pattern = pollster::block_on(plan.selected_pattern())
                .unwrap()
                .unwrap();
            let (exact, selected) = (&pattern[0], &pattern[1]);
            for h in 0..shape.q_heads {
                for m in 0..nb {
                    let mut got: Vec<u32> = exact.entries(h, m).to_vec();
                    got.extend(selected.entries(h, m));
                    got.sort_unstable();
                    assert_eq!(got, mask.entries(h, m), "{label}: head {h} block {m}");
                }
            }
            // The output: attention over that mask.
            let want = crate::attention::flash_cpu::naive_masked_attention(
                &shape,
                scale,
                &q,
                &k,
                &v,
                |h, r, j| j <= r && mask.entries(h, r / block).contains(&((j / block) as u32)),
            );
            let got = out.to_f32_blocking().unwrap();
            let tol = if dtype == DType::F16 { 2e-3 } else { 2e-5 };
            crate::runtime::test_util::close(&got, &want, tol);
            // The report: budgets and pair counts.
            let report = plan.report().unwrap();
            let Some(MethodStats::Proxy(stats)) = &report.stats else {
                panic!("proxy statistics")
            };
            assert_eq!(stats.head_budgets, st.estimate.fractions(), "{label}");
            let pairs: u64 = mask.pairs(true);
            assert_eq!(stats.pairs.exact + stats.pairs.selected, pairs, "{label}");
            assert!(report.estimation_ms().is_some_and(|ms| ms >= 0.0));
            // The CPU plan (the twin) chooses the same blocks but for near-ties.
            let cpu = crate::Context::cpu();
            let cpu_plan = cpu
                .attention(shape)
                .method(Method::Proxy(cfg))
                .build()
                .unwrap();
            let (cq, ck, cv) = upload_qkv(&cpu, &shape, &q, &k, &v, DType::F32).unwrap();
            let cpu_out = cpu_plan
                .run(&cq, &ck, &cv)
                .unwrap()
                .to_f32_blocking()
                .unwrap();
            let cpu_report = cpu_plan.report().unwrap();
            assert!(cpu_report.estimation_ms().is_some(), "CPU est_ms");
            let dens = (cpu_report.density - report.density).abs();
            assert!(
                dens < 0.05,
                "{label}: density {} vs {}",
                cpu_report.density,
                report.density
            );
            assert!(cpu_out.iter().all(|x| x.is_finite()));
        }
        eprintln!("{near_budget} budgets differed at a near-tie with gamma");
    }

    /// Fixed per-head budgets (a budgets file's): the GPU skips the budget estimate,
    /// keeps exactly those budgets, selects the host's mask over its own scores and
    /// matches attention over that mask; the CPU twin keeps the same budgets; a head
    /// group of the problem keeps its heads' budgets; bad budgets are typed errors.
    #[test]
    fn fixed_head_budgets_run_on_gpu_and_cpu() {
        let shape = AttentionShape::new(4, 2, 333, 64);
        let cfg = ProxyConfig {
            block: 64,
            min_budget: 0,
            head_budget: Some(vec![0.2, 1.0, 0.5, 0.01]),
            ..Default::default()
        };
        let nb = shape.seq_len.div_ceil(64);
        let want_budgets = cfg.fixed_budgets(nb).unwrap();
        assert_eq!(want_budgets, vec![2, 6, 3, 1]);
        let (q, k, v) = qkv_host(&shape, seed());
        let scale = 1.0 / 8.0;
        // The CPU twin: the fixed budgets, and the mask of step 5 under them.
        let (mask, est) = proxy_select_cpu(&shape, &cfg, scale, &q, &k).unwrap();
        assert_eq!(est.budgets, want_budgets);
        for (h, &budget) in want_budgets.iter().enumerate() {
            for m in 0..nb {
                let k = cfg.keep_count(m, budget as usize, nb);
                let n = mask.entries(h, m).len();
                assert!(
                    n >= k && n <= k + 2,
                    "head {h} block {m}: {n} blocks, K {k}"
                );
            }
        }
        // Head groups keep their heads' budgets.
        let two = ProxyConfig {
            groups: 2,
            ..cfg.clone()
        };
        let part = Method::Proxy(two).for_heads(4, 2, 4).unwrap();
        let Method::Proxy(p) = part else { panic!() };
        assert_eq!(p.head_budget, Some(vec![0.5, 0.01]));
        for bad in [
            vec![0.2, 0.3],
            vec![0.2, 0.0, 0.5, 0.5],
            vec![0.2, 1.5, 0.5, 0.5],
        ] {
            let c = ProxyConfig {
                head_budget: Some(bad),
                ..cfg.clone()
            };
            assert!(c.validate(&shape).is_err());
        }
        let Some(ctx) = gpu() else { return };
        let plan = ctx
            .attention(shape)
            .method(Method::Proxy(cfg.clone()))
            .build()
            .unwrap();
        let (tq, tk, tv) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
        let mut out = crate::Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
        plan.run_into(&tq, &tk, &tv, &mut out).unwrap();
        let Some(GpuPlan::Sparse(exec)) = &plan.gpu else {
            panic!("a GPU plan")
        };
        let sel: &dyn std::any::Any = exec.selection_gpu();
        let gpu_sel = sel.downcast_ref::<ProxySelectGpu>().unwrap();
        // One run of heads: pool, scores, select — no head weights, no budget kernel.
        assert_eq!(gpu_sel.counts(), (3, gpu_sel.runs.len() + 2));
        let st = pollster::block_on(gpu_sel.state(&ctx)).unwrap();
        assert_eq!(st.estimate.budgets, want_budgets);
        let mask = mask_from(&shape, &cfg, &st.estimate).unwrap();
        let pattern = pollster::block_on(plan.selected_pattern())
            .unwrap()
            .unwrap();
        for h in 0..shape.q_heads {
            for m in 0..nb {
                let mut got: Vec<u32> = pattern[0].entries(h, m).to_vec();
                got.extend(pattern[1].entries(h, m));
                got.sort_unstable();
                assert_eq!(got, mask.entries(h, m), "head {h} block {m}");
            }
        }
        let want = crate::attention::flash_cpu::naive_masked_attention(
            &shape,
            scale,
            &q,
            &k,
            &v,
            |h, r, j| j <= r && mask.entries(h, r / 64).contains(&((j / 64) as u32)),
        );
        crate::runtime::test_util::close(&out.to_f32_blocking().unwrap(), &want, 2e-5);
        let report = plan.report().unwrap();
        let Some(MethodStats::Proxy(stats)) = &report.stats else {
            panic!("proxy statistics")
        };
        let fractions: Vec<f64> = want_budgets.iter().map(|&b| b as f64 / nb as f64).collect();
        assert_eq!(stats.head_budgets, fractions);
    }

    /// γ = 1 with a minimum budget of every key: the plan computes every causal pair,
    /// on the GPU and on the CPU, and its output is dense attention's.
    #[test]
    fn full_budget_runs_dense_attention() {
        let shape = AttentionShape::new(4, 2, 320, 64);
        let cfg = ProxyConfig {
            gamma: 1.0,
            min_budget: 512,
            block: 64,
            ..Default::default()
        };
        let (q, k, v) = qkv_host(&shape, seed());
        let mut contexts = vec![crate::Context::cpu()];
        contexts.extend(gpu());
        for ctx in contexts {
            let (tq, tk, tv) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
            let run = |m: Method| {
                let plan = ctx.attention(shape).method(m).build().unwrap();
                let out = plan.run(&tq, &tk, &tv).unwrap().to_f32_blocking().unwrap();
                (out, plan.report().unwrap().density)
            };
            let (sparse, density) = run(Method::Proxy(cfg.clone()));
            let (dense, _) = run(Method::Dense);
            assert_eq!(density, 1.0, "{:?}", ctx.backend());
            crate::runtime::test_util::close(&sparse, &dense, 2e-5);
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            /// Any configuration either is refused with a typed error or gives masks
            /// that hold block 0 and the diagonal, ascend, stay causal and keep between
            /// `K` and `K + 2` blocks (`K` from the head's budget), with budgets in
            /// `1..=blocks`.
            #[test]
            fn masks_hold_their_invariants(
                kv in 1usize..4,
                per_kv in 1usize..3,
                groups in 1usize..4,
                n in 1usize..400,
                block in prop::sample::select(vec![64usize, 128, 96]),
                stride in 0usize..9,
                gamma in prop::sample::select(vec![0.0f32, 0.5, 0.9, 0.95, 1.0, 1.5]),
                min_budget in 0usize..600,
                seed in 0u64..1000,
            ) {
                let shape = AttentionShape::new(kv * per_kv, kv, n, 64);
                let cfg = ProxyConfig { gamma, groups, stride, block, min_budget, head_budget: None };
                let (q, k, _) = qkv_host(&shape, seed);
                match proxy_select_cpu(&shape, &cfg, 0.125, &q, &k) {
                    Err(e) => prop_assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}"),
                    Ok((lut, est)) => {
                        let nb = n.div_ceil(block);
                        prop_assert_eq!(est.blocks, nb);
                        for h in 0..shape.q_heads {
                            let budget = est.budgets[h];
                            prop_assert!(budget >= 1 && budget as usize <= nb);
                            for m in 0..nb {
                                let e = lut.entries(h, m);
                                prop_assert!(e.windows(2).all(|w| w[0] < w[1]));
                                prop_assert!(e.first() == Some(&0) && e.last() == Some(&(m as u32)));
                                let kk = cfg.keep_count(m, budget as usize, nb);
                                prop_assert!(e.len() >= kk.max(1) && e.len() <= (kk + 2).min(m + 1));
                            }
                        }
                    }
                }
            }
        }
    }
}
