//! SALE (`docs/algorithms.md` §3): low-bit estimation of every causal 64 × 32 block's scores, the
//! Relative Attention Score test against the exact sink + local + diagonal pass, and the
//! selected blocks through the block-sparse executor continuing that pass's row state.
//!
//! GPU: `shaders/sale/quantize.wgsl` (sequence means, per-row int4/int8 codes and the
//! mean-correction terms), the block executor (exact pass, exporting (m, l, acc)),
//! `shaders/sale/estimate.wgsl` (integer dot products, RAS test, block bits, compaction
//! into the executor's LUT) and the block executor again (selected blocks, importing
//! the state) — one submission. CPU twin: [`sale_cpu`].
//!
//! Choices (stated because they differ from the released CUDA code):
//! - **Scale groups**: one scale per row (token) and head, over all `head_dim` channels
//!   (the CUDA code shares scales between rows r and r+8 of Q and between 8 keys of a
//!   block, to match its tensor-core fragments; WGSL has none, and per-row scales are at
//!   least as accurate). Round trip error ≤ scale/2 per element, scale = amax/7 (int4)
//!   or amax/127 (int8) of the mean-subtracted row.
//! - **Mean correction**: both Q and K are smoothed by their sequence means; the
//!   estimate adds `q_mean·k'_j` (per key) and compares against a threshold lowered by
//!   `q_i·k_mean` (per row), so it approximates `q_i·k_j` in the units of the exact
//!   pass's row max. The exact passes use the original (unsmoothed) K.
//! - **Integer products**: int4 codes are widened to signed bytes times 16 and fed to
//!   `dot4I8Packed` (products are exactly 256× the true ones); int8 codes are used as
//!   they are. Without the WGSL feature the same sums come from plain integer math.
//! - **Two-pass thresholds** (the released default): (m, l) are frozen after the exact
//!   pass.

use serde::{Deserialize, Serialize};

use super::{
    GpuSelection, MethodStats, SelectBuild, SelectInput, SelectIo, Selection, Selector,
    planned_by_heads, planned_passes,
};
use super::{PassPairs, SelectionLayout};
use crate::attention::AttentionShape;
use crate::attention::flash_cpu;
use crate::attention::lut::{LutUnit, SparseLut};
use crate::attention::params::impl_params;
use crate::attention::sparse::{TwoPassRun, two_pass_cpu};
use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{Bound, Launch, check_axis, check_binding, storage, storage_init};
use crate::runtime::memory::{DeviceLimits, HeadChunk, PlannedBuffer, head_chunks};
use crate::runtime::preprocess::Defines;
use crate::runtime::tensor::DType;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Query rows per selection block.
pub const BLOCK_Q: usize = 64;
/// Keys per selection block.
pub const BLOCK_K: usize = 32;
/// Candidate key blocks per workgroup of the estimation (one bit each in a u32).
const CHUNK_BLOCKS: usize = 32;
/// Rows per partial sum of the sequence means.
const MEAN_CHUNK_ROWS: usize = 512;

/// SALE's hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaleConfig {
    /// RAS threshold τ of every head without its own (0 = dense).
    pub tau: f32,
    /// Estimation bits: 4 or 8.
    pub bits: u32,
    /// Query rows per block (64: the released kernel asserts it).
    pub block_q: usize,
    /// Keys per block (32).
    pub block_k: usize,
    /// Local window computed exactly before the diagonal, in keys (128; a multiple of
    /// 32).
    pub local: usize,
    /// Per-head thresholds (length `q_heads`), e.g. from calibration; overrides `tau`.
    pub head_tau: Option<Vec<f32>>,
    /// Per-head budgets (length `q_heads`, each in (0, 1]), e.g. from
    /// [`crate::attention::budgets`]: instead of the threshold test, each 64-row query
    /// block of head `h` keeps its `⌈β_h · causal blocks⌉` key blocks in all — the exact
    /// pass's sink, local window and diagonal, then the candidates of the largest
    /// estimated Relative Attention Score (each block's largest entry; ties to the lower
    /// block). Overrides `tau` and `head_tau`.
    #[serde(default)]
    pub head_budget: Option<Vec<f32>>,
}

impl Default for SaleConfig {
    fn default() -> Self {
        SaleConfig {
            tau: 0.004,
            bits: 4,
            block_q: BLOCK_Q,
            block_k: BLOCK_K,
            local: 128,
            head_tau: None,
            head_budget: None,
        }
    }
}

impl SaleConfig {
    /// Checks the configuration; errors say what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("sale: {m}")));
        if !(self.tau.is_finite() && self.tau >= 0.0) {
            return bad(format!("tau {} must be finite and >= 0", self.tau));
        }
        if self.bits != 4 && self.bits != 8 {
            return bad(format!("bits {} must be 4 or 8", self.bits));
        }
        if self.block_q != BLOCK_Q || self.block_k != BLOCK_K {
            return bad(format!(
                "blocks {}x{}: the estimation kernel is built for {BLOCK_Q}x{BLOCK_K}",
                self.block_q, self.block_k
            ));
        }
        if !self.local.is_multiple_of(BLOCK_K) || self.local > 1 << 16 {
            return bad(format!(
                "local window {} must be a multiple of {BLOCK_K} up to 65536",
                self.local
            ));
        }
        if let Some(t) = &self.head_tau
            && let Some(x) = t.iter().find(|x| !(x.is_finite() && **x >= 0.0))
        {
            return bad(format!("per-head tau {x} must be finite and >= 0"));
        }
        if let Some(b) = &self.head_budget
            && let Some(x) = b.iter().find(|x| !(**x > 0.0 && **x <= 1.0))
        {
            return bad(format!("per-head budget {x} must be in (0, 1]"));
        }
        Ok(())
    }

    /// Checks the per-head thresholds and budgets against a head count.
    pub fn validate_heads(&self, q_heads: usize) -> Result<()> {
        let check = |v: &Option<Vec<f32>>, what: &str| match v {
            Some(t) if t.len() != q_heads => Err(Error::InvalidArgument(format!(
                "sale: {} per-head {what} for {q_heads} q heads",
                t.len()
            ))),
            _ => Ok(()),
        };
        check(&self.head_tau, "thresholds")?;
        check(&self.head_budget, "budgets")
    }

    /// Candidate blocks query block `qb` of head `h` keeps under the per-head budgets
    /// (`None` without budgets): `⌈β_h · causal⌉` minus the exact pass's blocks, within
    /// `0..=candidates`, for a sequence of `seq_len` rows.
    pub fn budget_keep(&self, h: usize, qb: usize, seq_len: usize) -> Option<usize> {
        let beta = *self.head_budget.as_ref()?.get(h)?;
        let last = ((qb + 1) * BLOCK_Q).min(seq_len).max(1) - 1;
        let causal = last / BLOCK_K + 1;
        let cand = self.candidates(qb);
        let want = crate::budget::units_of(beta, causal);
        Some(want.saturating_sub(causal - cand).min(cand))
    }

    /// τ of head `h` (1 under per-head budgets: a block's margin against it is then
    /// its estimated ln RAS / scale, which the budgets rank).
    pub fn tau_of(&self, h: usize) -> f32 {
        if self.head_budget.is_some() {
            return 1.0;
        }
        self.head_tau.as_ref().map_or(self.tau, |t| t[h])
    }

    /// Local window in key blocks.
    pub fn local_blocks(&self) -> usize {
        self.local / BLOCK_K
    }

    /// Exclusive end of the candidate key blocks of query block `qb` (candidates start
    /// at block 1: block 0 is the sink).
    pub fn cand_end(&self, qb: usize) -> usize {
        let diag = qb * (BLOCK_Q / BLOCK_K);
        if diag > self.local_blocks() + 1 {
            diag - self.local_blocks()
        } else {
            1
        }
    }

    /// Candidate blocks of query block `qb`.
    pub fn candidates(&self, qb: usize) -> usize {
        self.cand_end(qb) - 1
    }

    /// The exact pass's LUT: sink block 0, the local window and the diagonal blocks of
    /// every 64-row query block (32-key blocks; causal masking trims the diagonal).
    pub fn exact_lut(&self, q_heads: usize, seq_len: usize) -> Result<SparseLut> {
        let nkb = seq_len.div_ceil(BLOCK_K);
        SparseLut::from_fn(
            q_heads,
            seq_len,
            BLOCK_Q,
            LutUnit::Blocks(BLOCK_K),
            |_, qb| {
                let end = ((qb + 1) * (BLOCK_Q / BLOCK_K)).min(nkb) as u32;
                let mut v = vec![0u32];
                v.extend(self.cand_end(qb) as u32..end);
                v
            },
        )
    }
}

/// Quantized Q and K with their scales and correction terms (the GPU layout).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedQk {
    /// 4 or 8.
    pub bits: u32,
    /// Packed codes of Q' `[q_heads, n, words]`.
    pub q_packed: Vec<u32>,
    /// Packed codes of K' `[kv_heads, n, words]`.
    pub k_packed: Vec<u32>,
    /// Per Q row: (scale, q_i · k_mean) `[q_heads, n]`.
    pub q_meta: Vec<[f32; 2]>,
    /// Per key and q head: (scale of k'_j, `q_mean[h] · k'_j`) `[q_heads, n]`.
    pub k_meta: Vec<[f32; 2]>,
}

impl QuantizedQk {
    /// Packed words per row.
    pub fn words(bits: u32, head_dim: usize) -> usize {
        head_dim * bits as usize / 32
    }

    /// The signed code of channel `c` of a packed row.
    pub fn code(bits: u32, row: &[u32], c: usize) -> i32 {
        let per = (32 / bits) as usize;
        let w = row[c / per] >> ((c % per) as u32 * bits);
        let shift = 32 - bits;
        ((w << shift) as i32) >> shift
    }

    /// The integer dot product of Q' row `(h, i)` and K' row `(kvh, j)`.
    pub fn int_dot(&self, shape: &AttentionShape, h: usize, i: usize, j: usize) -> i32 {
        let (n, d) = (shape.seq_len, shape.head_dim);
        let w = Self::words(self.bits, d);
        let kvh = h / (shape.q_heads / shape.kv_heads);
        let qr = &self.q_packed[(h * n + i) * w..(h * n + i + 1) * w];
        let kr = &self.k_packed[(kvh * n + j) * w..(kvh * n + j + 1) * w];
        (0..d)
            .map(|c| Self::code(self.bits, qr, c) * Self::code(self.bits, kr, c))
            .sum()
    }

    /// The estimate of `q_i · k_j` minus the row term `q_i · k_mean`.
    pub fn estimate(&self, shape: &AttentionShape, h: usize, i: usize, j: usize) -> f32 {
        let n = shape.seq_len;
        let [sq, _] = self.q_meta[h * n + i];
        let [sk, qmk] = self.k_meta[h * n + j];
        self.int_dot(shape, h, i, j) as f32 * sq * sk + qmk
    }
}

fn quantize_row(x: &[f32], bits: u32, out: &mut [u32]) -> f32 {
    let levels = ((1u32 << (bits - 1)) - 1) as f32;
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (scale, inv) = if amax > 0.0 {
        (amax / levels, levels / amax)
    } else {
        (0.0, 0.0)
    };
    let per = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    out.iter_mut().for_each(|w| *w = 0);
    // Round half to even by the float adder (|y| ≤ 127 < 2^22): the same as
    // `round_ties_even`, without a libm call per value on baseline x86-64.
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    for (c, &v) in x.iter().enumerate() {
        let y = (v * inv).clamp(-levels, levels);
        let q = ((y + MAGIC) - MAGIC) as i32;
        out[c / per] |= (q as u32 & mask) << ((c % per) as u32 * bits);
    }
    scale
}

fn head_means(x: &[f32], heads: usize, n: usize, d: usize) -> Vec<f32> {
    let mut m = vec![0.0f64; heads * d];
    for h in 0..heads {
        for r in 0..n {
            for c in 0..d {
                m[h * d + c] += x[(h * n + r) * d + c] as f64;
            }
        }
    }
    m.iter().map(|v| (v / n as f64) as f32).collect()
}

/// Quantization on the host (the CPU twin of `shaders/sale/quantize.wgsl`).
pub fn quantize_cpu(shape: &AttentionShape, bits: u32, q: &[f32], k: &[f32]) -> QuantizedQk {
    use rayon::prelude::*;
    let (hq, hk, n, d) = (shape.q_heads, shape.kv_heads, shape.seq_len, shape.head_dim);
    let group = hq / hk;
    let w = QuantizedQk::words(bits, d);
    let qm = head_means(q, hq, n, d);
    let km = head_means(k, hk, n, d);
    let mut out = QuantizedQk {
        bits,
        q_packed: vec![0; hq * n * w],
        k_packed: vec![0; hk * n * w],
        q_meta: vec![[0.0; 2]; hq * n],
        k_meta: vec![[0.0; 2]; hq * n],
    };
    // Rows in parallel: each writes only its own packed words and meta.
    out.q_packed
        .par_chunks_mut(w)
        .zip(out.q_meta.par_iter_mut())
        .enumerate()
        .for_each(|(row, (packed, meta))| {
            let (h, kvh) = (row / n, row / n / group);
            let x = &q[row * d..(row + 1) * d];
            let xs: Vec<f32> = x
                .iter()
                .zip(&qm[h * d..][..d])
                .map(|(a, m)| a - m)
                .collect();
            let s = quantize_row(&xs, bits, packed);
            let qkm: f32 = x.iter().zip(&km[kvh * d..][..d]).map(|(a, b)| a * b).sum();
            *meta = [s, qkm];
        });
    let k_scales: Vec<f32> = out
        .k_packed
        .par_chunks_mut(w)
        .enumerate()
        .map(|(row, packed)| {
            let kvh = row / n;
            let x = &k[row * d..(row + 1) * d];
            let xs: Vec<f32> = x
                .iter()
                .zip(&km[kvh * d..][..d])
                .map(|(a, m)| a - m)
                .collect();
            quantize_row(&xs, bits, packed)
        })
        .collect();
    out.k_meta
        .par_iter_mut()
        .enumerate()
        .for_each(|(hr, meta)| {
            let (h, r) = (hr / n, hr % n);
            let kvh = h / group;
            let x = &k[(kvh * n + r) * d..][..d];
            let qmk: f32 = qm[h * d..][..d]
                .iter()
                .zip(x.iter().zip(&km[kvh * d..][..d]))
                .map(|(a, (b, m))| a * (b - m))
                .sum();
            *meta = [k_scales[kvh * n + r], qmk];
        });
    out
}

/// The RAS threshold of a row in estimate units: `(m + ln(τ·l)) / scale − q_i·k_mean`
/// (−∞ for τ = 0: every block passes).
pub fn row_threshold(tau: f32, m: f32, l: f32, scale: f32, qkm: f32) -> f32 {
    if tau > 0.0 {
        (m + (tau * l).ln()) / scale - qkm
    } else {
        f32::NEG_INFINITY
    }
}

/// The selected blocks on the host: the LUT of kept candidate blocks and, per (head,
/// query block), each candidate's margin `max over its entries of (ŝ − threshold)`
/// (kept iff > 0), so tests can tell a real disagreement from a rounding tie.
#[derive(Clone, Debug)]
pub struct SaleSelection {
    /// Kept candidate key blocks per (head, 64-row query block), ascending.
    pub blocks: SparseLut,
    /// Margins per (head, query block) over its candidates in order.
    pub margins: Vec<Vec<f32>>,
}

impl SaleSelection {
    /// The selection from each (head, query block)'s kept blocks and margins, in order.
    fn from_rows(shape: &AttentionShape, per_row: Vec<(Vec<u32>, Vec<f32>)>) -> Result<Self> {
        let nqb = shape.seq_len.div_ceil(BLOCK_Q);
        let blocks = SparseLut::from_fn(
            shape.q_heads,
            shape.seq_len,
            BLOCK_Q,
            LutUnit::Blocks(BLOCK_K),
            |h, qb| per_row[h * nqb + qb].0.clone(),
        )?;
        let margins = per_row.into_iter().map(|(_, m)| m).collect();
        Ok(SaleSelection { blocks, margins })
    }
}

/// Block selection on the host from the quantized Q/K and the exact pass's row state
/// `ml` `[q_heads, n, 2]`. The codes are unpacked once, as f32 (their products and sums
/// are integers below 2^24, so f32 holds them exactly: the same sums as the kernel's
/// integer arithmetic), K in the flash kernel's key panels; (head, query block) rows run
/// in parallel through its register tile.
pub fn select_cpu(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    quant: &QuantizedQk,
    ml: &[f32],
) -> Result<SaleSelection> {
    select_host(shape, cfg, scale, quant, ml, true)
}

/// The selected blocks of [`select_cpu`] without the margins: a kept block's scan
/// stops at its first row over the threshold (the plan's host path).
pub fn select_cpu_blocks(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    quant: &QuantizedQk,
    ml: &[f32],
) -> Result<SparseLut> {
    Ok(select_host(shape, cfg, scale, quant, ml, false)?.blocks)
}

/// The host selection: with AVX-512 VNNI the dot products run on the codes as 8-bit
/// integers (64 multiply-adds an instruction, exact like the kernel), else as f32 on the
/// flash kernel's register tile; both give the same sums, so the same selection.
/// Without `full_margins` a kept block's margin is its first value over 0 (VNNI path).
fn select_host(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    quant: &QuantizedQk,
    ml: &[f32],
    full_margins: bool,
) -> Result<SaleSelection> {
    // Budgets rank every candidate's margin: none may stop early.
    let full_margins = full_margins || cfg.head_budget.is_some();
    #[cfg(target_arch = "x86_64")]
    if vnni::available() {
        return select_cpu_vnni(shape, cfg, scale, quant, ml, full_margins);
    }
    let _ = full_margins;
    select_cpu_f32(shape, cfg, scale, quant, ml)
}

/// [`select_cpu`] with the codes as f32 on the flash kernel's register tile.
fn select_cpu_f32(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    quant: &QuantizedQk,
    ml: &[f32],
) -> Result<SaleSelection> {
    use rayon::prelude::*;
    let (n, d) = (shape.seq_len, shape.head_dim);
    let group = shape.q_heads / shape.kv_heads;
    let w = QuantizedQk::words(quant.bits, d);
    let unpack = |packed: &[u32]| -> Vec<f32> {
        packed
            .chunks(w)
            .flat_map(|row| (0..d).map(move |c| QuantizedQk::code(quant.bits, row, c) as f32))
            .collect()
    };
    let qc = unpack(&quant.q_packed);
    let kc = unpack(&quant.k_packed);
    let panels: Vec<Vec<f32>> = kc
        .par_chunks(n * d)
        .map(|k| flash_cpu::pack_key_panels(k, n, d))
        .collect();
    let simd = flash_cpu::simd_tiles();
    select_block_rows(shape, cfg, scale, quant, ml, |h, qb, rows, thr| {
        let job = BlockRow {
            n,
            d,
            h,
            rows,
            cand_end: cfg.cand_end(qb),
            thr,
            qc: &qc,
            panels: &panels[h / group],
            quant,
            simd,
        };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (`simd_tiles`).
            return unsafe { job.select_avx2() };
        }
        job.select()
    })
}

/// The host selection's frame, shared by its two dot-product paths: every (head h,
/// 64-row query block qb) in parallel, with its rows and their thresholds (the exact
/// pass's (m, l) and the Q row's mean correction); `block` returns the kept candidate
/// blocks and every candidate's margin. Under per-head budgets the kept blocks are
/// instead the row's [`SaleConfig::budget_keep`] largest margins ([`top_blocks`]).
fn select_block_rows(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    quant: &QuantizedQk,
    ml: &[f32],
    block: impl Fn(usize, usize, std::ops::Range<usize>, &[f32]) -> (Vec<u32>, Vec<f32>) + Sync,
) -> Result<SaleSelection> {
    use rayon::prelude::*;
    let n = shape.seq_len;
    let nqb = n.div_ceil(BLOCK_Q);
    let per_row: Vec<(Vec<u32>, Vec<f32>)> = (0..shape.q_heads * nqb)
        .into_par_iter()
        .map(|row| {
            let (h, qb) = (row / nqb, row % nqb);
            let rows = qb * BLOCK_Q..((qb + 1) * BLOCK_Q).min(n);
            let thr: Vec<f32> = rows
                .clone()
                .map(|i| {
                    let (m, l) = (ml[2 * (h * n + i)], ml[2 * (h * n + i) + 1]);
                    row_threshold(cfg.tau_of(h), m, l, scale, quant.q_meta[h * n + i][1])
                })
                .collect();
            let (kept, margins) = block(h, qb, rows, &thr);
            match cfg.budget_keep(h, qb, n) {
                Some(keep) => (top_blocks(&margins, keep), margins),
                None => (kept, margins),
            }
        })
        .collect();
    SaleSelection::from_rows(shape, per_row)
}

/// An f32's bits mapped so that unsigned order is the numbers' order (the key the GPU's
/// budgeted selection ranks margins by).
pub fn ordered_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The `keep` candidates of the largest margins (`margins[i]` is key block `1 + i`;
/// equal margins keep the lower block), ascending: SALE's choice under a budget.
pub fn top_blocks(margins: &[f32], keep: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..margins.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(ordered_bits(margins[i])), i));
    let mut kept: Vec<u32> = order[..keep.min(margins.len())]
        .iter()
        .map(|&i| 1 + i as u32)
        .collect();
    kept.sort_unstable();
    kept
}

/// [`select_cpu`] with the dot products on AVX-512 VNNI (`vpdpbusd`): Q codes + 128 as
/// unsigned bytes against K codes as signed bytes, minus 128 · Σ K codes: the exact
/// integers of the kernel, 64 multiply-adds an instruction.
#[cfg(target_arch = "x86_64")]
fn select_cpu_vnni(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    quant: &QuantizedQk,
    ml: &[f32],
    full_margins: bool,
) -> Result<SaleSelection> {
    use rayon::prelude::*;
    let (n, d) = (shape.seq_len, shape.head_dim);
    let group = shape.q_heads / shape.kv_heads;
    let w = QuantizedQk::words(quant.bits, d);
    // The signed code of channel `c` of packed row `row`.
    let code = |packed: &[u32], row: usize, c: usize| -> i8 {
        QuantizedQk::code(quant.bits, &packed[row * w..(row + 1) * w], c) as i8
    };
    let keys: Vec<vnni::KeyPanels> = (0..shape.kv_heads)
        .into_par_iter()
        .map(|kvh| vnni::KeyPanels::new(n, d, |j, c| code(&quant.k_packed, kvh * n + j, c)))
        .collect();
    select_block_rows(shape, cfg, scale, quant, ml, |h, qb, rows, thr| {
        let r0 = rows.start;
        let qu = vnni::QueryRows::new(rows.len(), d, |r, c| {
            code(&quant.q_packed, h * n + r0 + r, c)
        });
        let sq: Vec<f32> = rows.clone().map(|i| quant.q_meta[h * n + i][0]).collect();
        let kp = &keys[h / group];
        let mut kept = vec![];
        let mut mg = vec![];
        for kb in 1..cfg.cand_end(qb) {
            let mut best = f32::NEG_INFINITY;
            for p in (kb * BLOCK_K / vnni::KEYS)..((kb + 1) * BLOCK_K / vnni::KEYS) {
                let meta = &quant.k_meta[h * n + p * vnni::KEYS..][..vnni::KEYS];
                let sk: [f32; vnni::KEYS] = std::array::from_fn(|j| meta[j][0]);
                let qmk: [f32; vnni::KEYS] = std::array::from_fn(|j| meta[j][1]);
                for g in 0..qu.groups() {
                    let r0 = g * vnni::ROWS;
                    let live = (rows.len() - r0).min(vnni::ROWS);
                    let (a, t) = (&sq[r0..r0 + live], &thr[r0..r0 + live]);
                    // SAFETY: `available()` checked AVX-512F and VNNI.
                    best = best.max(unsafe { kp.block_max(&qu, g, p, a, t, &sk, &qmk) });
                    if best > 0.0 && !full_margins {
                        break;
                    }
                }
                if best > 0.0 && !full_margins {
                    break;
                }
            }
            if best > 0.0 {
                kept.push(kb as u32);
            }
            mg.push(best);
        }
        (kept, mg)
    })
}

/// Integer dot products of 8-bit codes on AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// Query rows per register tile.
    pub const ROWS: usize = 8;
    /// Keys per panel (one 512-bit register of i32 sums).
    pub const KEYS: usize = 16;

    /// Whether this CPU has AVX-512F and AVX-512 VNNI.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
    }

    /// One head's K codes as panels of 16 keys, `[d/4][16 keys][4 codes]` signed bytes
    /// (one 64-byte load per 4 dimensions), and 128 · Σ codes per key.
    pub struct KeyPanels {
        d4: usize,
        bytes: Vec<i8>,
        sums: Vec<i32>,
    }

    impl KeyPanels {
        /// From `n` keys of `d` codes, `code(key, channel)`.
        pub fn new(n: usize, d: usize, code: impl Fn(usize, usize) -> i8) -> Self {
            let d4 = d / 4;
            let panels = n.div_ceil(KEYS);
            let mut bytes = vec![0i8; panels * d4 * KEYS * 4];
            let mut sums = vec![0i32; panels * KEYS];
            for (j, s) in sums.iter_mut().enumerate().take(n) {
                let (p, k) = (j / KEYS, j % KEYS);
                let mut sum = 0i32;
                for c in 0..d {
                    let x = code(j, c);
                    bytes[((p * d4 + c / 4) * KEYS + k) * 4 + c % 4] = x;
                    sum += x as i32;
                }
                *s = 128 * sum;
            }
            KeyPanels { d4, bytes, sums }
        }

        /// The largest `(Σ · sq) · sk + qmk − t` over the live rows of group `g` (their
        /// `sq`, `t`) and the 16 keys of panel `p` (their `sk`, `qmk`): the kernel's
        /// estimate minus the row's threshold, in the kernel's operation order.
        ///
        /// # Safety
        /// The CPU must have AVX-512F and AVX-512 VNNI.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f,avx512vnni")]
        pub unsafe fn block_max(
            &self,
            q: &QueryRows,
            g: usize,
            p: usize,
            sq: &[f32],
            t: &[f32],
            sk: &[f32; KEYS],
            qmk: &[f32; KEYS],
        ) -> f32 {
            let dots = unsafe { self.dots(q, g, p) };
            let (skv, qmkv) =
                unsafe { (_mm512_loadu_ps(sk.as_ptr()), _mm512_loadu_ps(qmk.as_ptr())) };
            let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
            for ((d, &a), &t) in dots.iter().zip(sq).zip(t) {
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(*d), _mm512_set1_ps(a));
                let v = _mm512_add_ps(_mm512_mul_ps(v, skv), qmkv);
                best = _mm512_max_ps(best, _mm512_sub_ps(v, _mm512_set1_ps(t)));
            }
            _mm512_reduce_max_ps(best)
        }

        /// Σ_c q[r][c] · k[j][c] for the 8 rows of group `g` and the 16 keys of panel `p`.
        ///
        /// # Safety
        /// The CPU must have AVX-512F and AVX-512 VNNI.
        #[target_feature(enable = "avx512f,avx512vnni")]
        unsafe fn dots(&self, q: &QueryRows, g: usize, p: usize) -> [__m512i; ROWS] {
            let mut acc = [_mm512_setzero_si512(); ROWS];
            let panel = &self.bytes[p * self.d4 * KEYS * 4..][..self.d4 * KEYS * 4];
            let qg = &q.words[g * ROWS * self.d4..][..ROWS * self.d4];
            for c4 in 0..self.d4 {
                // SAFETY: 64 bytes inside the panel.
                let k = unsafe { _mm512_loadu_si512(panel.as_ptr().add(c4 * 64).cast()) };
                for (i, a) in acc.iter_mut().enumerate() {
                    let qv = _mm512_set1_epi32(qg[i * self.d4 + c4]);
                    *a = _mm512_dpbusd_epi32(*a, qv, k);
                }
            }
            let corr = unsafe { _mm512_loadu_si512(self.sums[p * KEYS..].as_ptr().cast()) };
            acc.map(|a| _mm512_sub_epi32(a, corr))
        }
    }

    /// A query block's codes + 128 as unsigned bytes, four per i32 word, rows padded to
    /// groups of 8.
    pub struct QueryRows {
        words: Vec<i32>,
        groups: usize,
    }

    impl QueryRows {
        /// From `rows` rows of `d` codes, `code(row, channel)`.
        pub fn new(rows: usize, d: usize, code: impl Fn(usize, usize) -> i8) -> Self {
            let d4 = d / 4;
            let groups = rows.div_ceil(ROWS);
            let mut words = vec![0x8080_8080u32 as i32; groups * ROWS * d4];
            for r in 0..rows {
                for c4 in 0..d4 {
                    let b: [u8; 4] =
                        std::array::from_fn(|e| (code(r, 4 * c4 + e) as i32 + 128) as u8);
                    words[r * d4 + c4] = i32::from_le_bytes(b);
                }
            }
            QueryRows { words, groups }
        }

        pub fn groups(&self) -> usize {
            self.groups
        }
    }
}

/// One query block row of [`select_cpu`]: its candidate key blocks, decided from the
/// unpacked codes.
struct BlockRow<'a> {
    n: usize,
    d: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    cand_end: usize,
    thr: &'a [f32],
    /// Q codes `[q_heads, n, d]` as f32.
    qc: &'a [f32],
    /// The head's K codes as f32 key panels (`flash_cpu::pack_key_panels`).
    panels: &'a [f32],
    quant: &'a QuantizedQk,
    simd: bool,
}

impl BlockRow<'_> {
    /// (kept blocks, margin of every candidate block).
    #[inline(always)]
    fn select(&self) -> (Vec<u32>, Vec<f32>) {
        const MR: usize = flash_cpu::TILE_ROWS;
        const NR: usize = flash_cpu::TILE_KEYS;
        let (n, d, h) = (self.n, self.d, self.h);
        // The block's Q rows in groups of MR, each transposed to [d][MR].
        let rows: Vec<usize> = self.rows.clone().collect();
        let groups: Vec<Vec<f32>> = rows
            .chunks(MR)
            .map(|g| {
                let mut qg = vec![0.0f32; d * MR];
                for (i, &r) in g.iter().enumerate() {
                    for (c, &x) in self.qc[(h * n + r) * d..][..d].iter().enumerate() {
                        qg[c * MR + i] = x;
                    }
                }
                qg
            })
            .collect();
        let sq: Vec<f32> = rows
            .iter()
            .map(|&r| self.quant.q_meta[h * n + r][0])
            .collect();
        let mut kept = vec![];
        let mut mg = vec![];
        for kb in 1..self.cand_end {
            // Lane-wise maxima (one per key of a panel), so the epilogue vectorizes.
            let mut best = [f32::NEG_INFINITY; NR];
            for p in (kb * BLOCK_K / NR)..((kb + 1) * BLOCK_K / NR) {
                let panel = &self.panels[p * NR * d..(p + 1) * NR * d];
                let meta = &self.quant.k_meta[h * n + p * NR..][..NR];
                let sk: [f32; NR] = std::array::from_fn(|j| meta[j][0]);
                let qmk: [f32; NR] = std::array::from_fn(|j| meta[j][1]);
                for (g, qg) in groups.iter().enumerate() {
                    let dots = flash_cpu::qk_tile_fast(qg, panel, self.simd);
                    for (i, row_dots) in dots.iter().enumerate().take(rows.len() - g * MR) {
                        let (a, t) = (sq[g * MR + i], self.thr[g * MR + i]);
                        for j in 0..NR {
                            // Same operation order as the kernel: (Σ · sq) · sk + q_mean·k'.
                            let v = row_dots[j] * a * sk[j] + qmk[j] - t;
                            best[j] = if v > best[j] { v } else { best[j] };
                        }
                    }
                }
            }
            let best = best.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
            if best > 0.0 {
                kept.push(kb as u32);
            }
            mg.push(best);
        }
        (kept, mg)
    }

    /// [`BlockRow::select`] compiled for AVX2 + FMA (the epilogue vectorizes to 8 lanes).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn select_avx2(&self) -> (Vec<u32>, Vec<f32>) {
        self.select()
    }
}

/// What SALE computed in one run (serialized with the keys `causal_pairs`,
/// `exact_pairs`, `selected_pairs`, `candidate_blocks`, `selected_blocks`,
/// `selected_per_head`).
#[derive(Clone, Debug, PartialEq)]
pub struct SaleStats {
    /// Causal pairs, exact-pass pairs (sink block, local window, diagonal) and the
    /// selected blocks' pairs.
    pub pairs: PassPairs,
    /// Candidate 64 × 32 blocks (all heads).
    pub candidate_blocks: u64,
    /// Selected blocks (all heads).
    pub selected_blocks: u64,
    /// Fraction of candidate blocks selected, per q head.
    pub selected_per_head: Vec<f64>,
}

impl SaleStats {
    fn new(shape: &AttentionShape, cfg: &SaleConfig, pairs: PassPairs, counts: &[u32]) -> Self {
        let nqb = shape.seq_len.div_ceil(BLOCK_Q);
        let per_head_cand: u64 = (0..nqb).map(|qb| cfg.candidates(qb) as u64).sum();
        let mut per_head = vec![0u64; shape.q_heads];
        for (i, &c) in counts.iter().enumerate() {
            per_head[i / nqb] += c as u64;
        }
        SaleStats {
            pairs,
            candidate_blocks: per_head_cand * shape.q_heads as u64,
            selected_blocks: per_head.iter().sum(),
            selected_per_head: per_head
                .iter()
                .map(|&s| s as f64 / per_head_cand.max(1) as f64)
                .collect(),
        }
    }
}

impl SaleStats {
    /// The statistics of runs over consecutive runs of heads of one problem, as one
    /// (each part given with its q-heads).
    pub fn concat_heads(parts: Vec<(usize, SaleStats)>) -> Self {
        let parts: Vec<SaleStats> = parts.into_iter().map(|(_, p)| p).collect();
        SaleStats {
            pairs: PassPairs::sum(parts.iter().map(|p| p.pairs)),
            candidate_blocks: parts.iter().map(|p| p.candidate_blocks).sum(),
            selected_blocks: parts.iter().map(|p| p.selected_blocks).sum(),
            selected_per_head: parts
                .into_iter()
                .flat_map(|p| p.selected_per_head)
                .collect(),
        }
    }
}

impl Serialize for SaleStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde_json::json;
        let extra = [
            ("candidate_blocks", json!(self.candidate_blocks)),
            ("selected_blocks", json!(self.selected_blocks)),
            ("selected_per_head", json!(self.selected_per_head)),
        ];
        self.pairs
            .serialize_with(s, ["exact_pairs", "selected_pairs"], &extra)
    }
}

impl std::fmt::Display for SaleStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (exact, selected) = self.pairs.fractions();
        let share = self.selected_blocks as f64 / self.candidate_blocks.max(1) as f64;
        write!(
            f,
            "sale: {} of {} candidate 64x32 blocks selected ({share:.4}), exact pairs {exact:.4} + selected pairs {selected:.4} of causal",
            self.selected_blocks, self.candidate_blocks,
        )
    }
}

/// What [`sale_cpu`] returns.
#[derive(Clone, Debug)]
pub struct SaleRun {
    /// The output `[q_heads, seq_len, head_dim]`.
    pub out: Vec<f32>,
    /// The quantized Q/K the estimate used.
    pub quant: QuantizedQk,
    /// The selected blocks and margins.
    pub selection: SaleSelection,
    /// Pair and block counts.
    pub stats: SaleStats,
    /// Final (m, l) per row `[q_heads, seq_len, 2]`.
    pub ml: Vec<f32>,
}

/// SALE on the host (the CPU twin of the GPU plan).
pub fn sale_cpu(
    shape: &AttentionShape,
    cfg: &SaleConfig,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<SaleRun> {
    cfg.validate()?;
    cfg.validate_heads(shape.q_heads)?;
    let exact = cfg.exact_lut(shape.q_heads, shape.seq_len)?;
    let quant = quantize_cpu(shape, cfg.bits, q, k);
    let TwoPassRun {
        out,
        detail,
        ml,
        pairs,
        selected,
        ..
    } = two_pass_cpu(
        shape,
        (&exact, &cfg.block_layout(shape)),
        scale,
        (q, k, v),
        |ml| {
            let sel = select_cpu(shape, cfg, scale, &quant, ml)?;
            Ok((sel.blocks.clone(), sel))
        },
    )?;
    let stats = SaleStats::new(shape, cfg, pairs, &selected.counts());
    Ok(SaleRun {
        out,
        quant,
        selection: detail,
        stats,
        ml,
    })
}

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters of the quantization kernels (`struct Params` in quantize.wgsl).
    pub struct SaleQuantParams {
        seq_len: u32,
        q_heads: u32,
        kv_heads: u32,
        group: u32,
        chunks: u32,
        chunk_rows: u32,
        head_first: u32,
        x_head0: u32,
        x_base: u32,
        _pad: [u32; 3],
    }
}

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters of the estimation kernels (`struct Params` in estimate.wgsl).
    pub struct SaleEstimateParams {
        seq_len: u32,
        q_heads: u32,
        group: u32,
        n_qb: u32,
        chunks: u32,
        scale: f32,
        _pad: [u32; 2],
    }
}

/// Which SALE kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    MeanPartial,
    MeanFinal,
    QuantQ,
    QuantK,
    Estimate,
    Dots,
    Compact,
    /// The estimation writing every candidate's margin (per-head budgets).
    Scores,
    /// The budgeted selection from the margins.
    TopK,
}

/// How the estimation kernel is built: `dot4I8Packed` or plain integer products, and
/// the unrolled register tile (native) or plain loops (the browser: Chromium's
/// SwiftShader loses the device compiling the unrolled body) — or the dot products on
/// matrix units with this cooperative-matrix tile (exact: the same integers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EstimateVariant {
    pub(crate) dot4: bool,
    pub(crate) portable_loops: bool,
    pub(crate) coop: Option<usize>,
}

fn sale_spec(
    stage: Stage,
    d: usize,
    bits: u32,
    local: usize,
    dtype: DType,
    ev: EstimateVariant,
) -> KernelSpec {
    let quant = |flag: &str| {
        Defines::new()
            .params::<SaleQuantParams>()
            .flag(flag)
            .flag_if("STORE_F16", dtype == DType::F16)
            .const_u32("D", d as u32)
            .const_u32("BITS", bits)
    };
    // The estimation's variant flags mean nothing to the selection kernels.
    let estimates = matches!(stage, Stage::Estimate | Stage::Dots | Stage::Scores);
    let est = |flag: &str| {
        Defines::new()
            .params::<SaleEstimateParams>()
            .flag(flag)
            .flag_if("INT4", bits == 4)
            .flag_if("INT_DOT4", ev.dot4)
            .flag_if("COOP", ev.coop.is_some() && estimates)
            .flag_if("TILE16", ev.coop == Some(16) && estimates)
            .flag_if("PORTABLE_LOOPS", ev.portable_loops && estimates)
            .const_u32("D", d as u32)
            .const_u32("BITS", bits)
            .const_u32("LOCAL_BLOCKS", (local / BLOCK_K) as u32)
    };
    let (quantize, estimate) = (
        "attention/select/sale_quantize.wgsl",
        "attention/select/sale_estimate.wgsl",
    );
    let estimate_entry = match ev.coop {
        Some(_) => "sale_estimate_coop",
        None => "sale_estimate",
    };
    let (file, entry, defines, bindings) = match stage {
        Stage::MeanPartial => (
            quantize,
            "sale_mean_partial",
            quant("STAGE_MEAN_PARTIAL"),
            "urw",
        ),
        Stage::MeanFinal => (
            quantize,
            "sale_mean_final",
            quant("STAGE_MEAN_FINAL"),
            "urw",
        ),
        Stage::QuantQ | Stage::QuantK => (
            quantize,
            "sale_quant",
            quant("STAGE_QUANT").flag_if("QUANT_K", stage == Stage::QuantK),
            "urrww",
        ),
        Stage::Estimate | Stage::Dots | Stage::Scores => (
            estimate,
            estimate_entry,
            est("STAGE_ESTIMATE")
                .flag_if("WRITE_DOTS", stage == Stage::Dots)
                .flag_if("SCORES", stage == Stage::Scores),
            "urrrrrrw",
        ),
        Stage::Compact => (estimate, "sale_compact", est("STAGE_COMPACT"), "urrww"),
        Stage::TopK => (estimate, "sale_topk", est("STAGE_TOPK"), "urrrww"),
    };
    KernelSpec {
        file,
        entry,
        defines,
        bindings: BindingKind::layout(bindings),
    }
}

/// Workgroup memory of the estimation kernel: the query block's packed rows and one key
/// block's packed rows (int4 d 256: 12 KiB; int8 d 256: 24 KiB, over WebGPU's default
/// 16 KiB).
pub fn estimate_workgroup_bytes(head_dim: usize, bits: u32) -> u32 {
    let words = QuantizedQk::words(bits, head_dim);
    ((BLOCK_Q + BLOCK_K) * words * 4 + 4) as u32
}

/// Workgroup memory of the matrix-unit estimation: the query block's packed rows, one
/// 32-dimension chunk of Q and K codes as f16, and the f32 dot tile.
pub fn estimate_coop_workgroup_bytes(head_dim: usize, bits: u32) -> u32 {
    let words = QuantizedQk::words(bits, head_dim);
    (BLOCK_Q * words * 4 + 4 + (BLOCK_Q + BLOCK_K) * 32 * 2 + BLOCK_Q * BLOCK_K * 4) as u32
}

/// The estimation variant for a device: matrix units when it has a coop tile, f16 and
/// the memory (the decisions are bit-identical either way), else integer products.
pub(crate) fn estimate_variant(
    caps: &crate::runtime::context::Capabilities,
    browser: bool,
    head_dim: usize,
    bits: u32,
) -> EstimateVariant {
    let coop = caps.coop_tile_for(estimate_coop_workgroup_bytes(head_dim, bits), 64);
    EstimateVariant {
        dot4: caps.int_dot4,
        portable_loops: browser,
        coop,
    }
}

/// Every SALE kernel variant (shader dump and portability tests): d = 64/128/256,
/// int4/int8, f32/f16 storage, with and without `dot4I8Packed`, the budgeted margins
/// and top-k selection and the test-only dot product output included.
pub fn all_sale_variants() -> Vec<KernelSpec> {
    let mut out = vec![];
    for d in [64, 128, 256] {
        for bits in [4, 8] {
            for dtype in [DType::F32, DType::F16] {
                for stage in [
                    Stage::MeanPartial,
                    Stage::MeanFinal,
                    Stage::QuantQ,
                    Stage::QuantK,
                ] {
                    let ev = EstimateVariant {
                        dot4: true,
                        portable_loops: false,
                        coop: None,
                    };
                    out.push(sale_spec(stage, d, bits, 128, dtype, ev));
                }
            }
            for dot4 in [true, false] {
                for portable_loops in [false, true] {
                    let ev = EstimateVariant {
                        dot4,
                        portable_loops,
                        coop: None,
                    };
                    for stage in [Stage::Estimate, Stage::Dots, Stage::Scores] {
                        out.push(sale_spec(stage, d, bits, 128, DType::F32, ev));
                    }
                }
            }
            let ev = EstimateVariant {
                dot4: false,
                portable_loops: false,
                coop: None,
            };
            for stage in [Stage::Compact, Stage::TopK] {
                out.push(sale_spec(stage, d, bits, 128, DType::F32, ev));
            }
        }
    }
    out
}

/// Every matrix-unit estimation variant at tile `tile` (8 or 16): d = 64/80/128/256,
/// int4/int8, the selection, the budgeted margins and the test-only dot product output.
pub fn all_coop_sale_variants(tile: usize) -> Vec<KernelSpec> {
    let ev = EstimateVariant {
        dot4: false,
        portable_loops: false,
        coop: Some(tile),
    };
    let mut out = vec![];
    for d in [64, 80, 128, 256] {
        for bits in [4, 8] {
            for stage in [Stage::Estimate, Stage::Dots, Stage::Scores] {
                out.push(sale_spec(stage, d, bits, 128, DType::F32, ev));
            }
        }
    }
    out
}

impl SaleConfig {
    /// The selected LUT's layout: one row per (head, 64-row query block), 32-key blocks,
    /// room for every candidate block.
    pub fn block_layout(&self, shape: &AttentionShape) -> SelectionLayout {
        let nqb = shape.seq_len.div_ceil(BLOCK_Q);
        SelectionLayout {
            q_block: BLOCK_Q,
            unit: LutUnit::Blocks(BLOCK_K),
            capacity: (0..shape.q_heads * nqb)
                .map(|i| self.candidates(i % nqb) as u32)
                .collect(),
        }
    }
}

impl_params!(SaleConfig, "sale" { tau, bits, local });

impl Selector for SaleConfig {
    fn name(&self) -> &'static str {
        "sale"
    }
    fn validate(&self, shape: &AttentionShape) -> Result<()> {
        SaleConfig::validate(self)?;
        self.validate_heads(shape.q_heads)
    }
    fn exact_lut(&self, shape: &AttentionShape) -> Result<SparseLut> {
        SaleConfig::exact_lut(self, shape.q_heads, shape.seq_len)
    }
    fn layout(&self, shape: &AttentionShape) -> Result<SelectionLayout> {
        Ok(self.block_layout(shape))
    }
    fn select_cpu(&self, x: &SelectInput<'_>) -> Result<Selection> {
        let quant = quantize_cpu(x.shape, self.bits, x.q, x.k);
        Ok(select_cpu_blocks(x.shape, self, x.scale, &quant, x.ml)?.into())
    }
    fn build_gpu(&self, b: &SelectBuild<'_>) -> Result<Box<dyn GpuSelection>> {
        Ok(Box::new(SaleSelectGpu::build(b, self)?))
    }
    fn plan_buffers(
        &self,
        shape: &AttentionShape,
        dtype: DType,
        limits: &DeviceLimits,
    ) -> (Vec<PlannedBuffer>, Vec<(String, usize)>) {
        let by_heads = |name, heads| planned_by_heads(name, heads, shape, dtype, limits);
        let (q, q_runs) = by_heads(
            "Q, bound by runs of heads (sale quantization)",
            shape.q_heads,
        );
        let (k, k_runs) = by_heads(
            "K, bound by runs of heads (sale quantization)",
            shape.kv_heads,
        );
        let mut buffers = vec![q, k];
        buffers.extend(SaleBuffers::of(self, shape).planned());
        // Mean partials and codes once per run of heads of Q and of K, the means once.
        let quantize = 2 * (q_runs + k_runs) + 1;
        let passes = [
            ("quantize", quantize),
            ("estimate", 1),
            (self.pick_stage(), 1),
        ];
        (buffers, planned_passes(&passes))
    }
    fn stats(
        &self,
        shape: &AttentionShape,
        pairs: PassPairs,
        counts: &[u32],
        _detail: &[u32],
    ) -> MethodStats {
        MethodStats::Sale(SaleStats::new(shape, self, pairs, counts))
    }
}

impl SaleConfig {
    /// The name of the selection's last stage: `compact` (threshold test) or `top-k`
    /// (per-head budgets).
    fn pick_stage(&self) -> &'static str {
        if self.head_budget.is_some() {
            "top-k"
        } else {
            "compact"
        }
    }
}

/// SALE's selection on a GPU context: quantization (before the exact pass), estimation
/// and compaction (or, under per-head budgets, margins and a top-k per row).
pub(crate) struct SaleSelectGpu {
    cfg: SaleConfig,
    shape: AttentionShape,
    /// Mean partial sums, final means, Q codes, K codes: one step per run of whole
    /// heads of Q or K that fits a binding.
    quantize: Vec<QuantStep>,
    /// Estimation and compaction (budgets: margins and top-k).
    select: [Launch<SaleEstimateParams>; 2],
    est_params: SaleEstimateParams,
    grid_estimate: (u32, u32, u32),
    /// The grid of the second selection stage.
    grid_pick: (u32, u32, u32),
    partial: wgpu::Buffer,
    means: wgpu::Buffer,
    qq: wgpu::Buffer,
    kq: wgpu::Buffer,
    q_meta: wgpu::Buffer,
    k_meta: wgpu::Buffer,
    tau: wgpu::Buffer,
    /// The estimation's output: block bits, or under budgets every candidate's margin.
    picks: wgpu::Buffer,
    /// Under budgets: candidates each (head, query block) keeps.
    keep: Option<wgpu::Buffer>,
}

/// One quantization dispatch: its stage, kernel and parameters, grid, and the part of Q
/// or K it binds (`None`: neither).
struct QuantStep {
    stage: Stage,
    launch: Launch<SaleQuantParams>,
    grid: (u32, u32, u32),
    x: Option<(Tensor, HeadChunk)>,
}

/// Which of the caller's tensors a quantization step reads.
#[derive(Clone, Copy)]
enum Tensor {
    Q,
    K,
}

/// The buffers of SALE's selection and the bindings it makes of Q and K, in bytes:
/// one list for the build and the memory plan.
struct SaleBuffers {
    partial: u64,
    means: u64,
    qq: u64,
    kq: u64,
    q_meta: u64,
    k_meta: u64,
    tau: u64,
    /// Block bits, or under budgets one margin per candidate slot.
    picks: u64,
    /// Under budgets: kept candidates per (head, query block); else 0.
    keep: u64,
}

impl SaleBuffers {
    fn of(cfg: &SaleConfig, shape: &AttentionShape) -> Self {
        let (hq, hk, n, d) = (
            shape.q_heads as u64,
            shape.kv_heads as u64,
            shape.seq_len as u64,
            shape.head_dim as u64,
        );
        let n_qb = (shape.seq_len.div_ceil(BLOCK_Q)) as u64;
        let chunks = cfg
            .candidates(n_qb as usize - 1)
            .div_ceil(CHUNK_BLOCKS)
            .max(1) as u64;
        let mean_chunks = shape.seq_len.div_ceil(MEAN_CHUNK_ROWS) as u64;
        let words = QuantizedQk::words(cfg.bits, shape.head_dim) as u64;
        SaleBuffers {
            partial: (hq + hk) * mean_chunks * d * 4,
            means: (hq + hk) * d * 4,
            qq: hq * n * words * 4,
            kq: hk * n * words * 4,
            q_meta: hq * n * 8,
            k_meta: hq * n * 8,
            tau: hq * 4,
            picks: match cfg.head_budget {
                Some(_) => hq * n_qb * chunks * CHUNK_BLOCKS as u64 * 4,
                None => hq * n_qb * chunks * 4,
            },
            keep: match cfg.head_budget {
                Some(_) => hq * n_qb * 4,
                None => 0,
            },
        }
    }

    fn picks_name(&self) -> &'static str {
        if self.keep > 0 {
            "sale block margins"
        } else {
            "sale block bits"
        }
    }

    fn planned(&self) -> Vec<PlannedBuffer> {
        vec![
            PlannedBuffer::whole("sale mean partial sums", self.partial),
            PlannedBuffer::whole("sale sequence means", self.means),
            PlannedBuffer::whole("sale quantized q", self.qq),
            PlannedBuffer::whole("sale quantized k", self.kq),
            PlannedBuffer::whole("sale q scales and corrections", self.q_meta),
            PlannedBuffer::whole("sale k scales and corrections", self.k_meta),
            PlannedBuffer::whole("sale per-head tau", self.tau),
            PlannedBuffer::whole(self.picks_name(), self.picks),
        ]
        .into_iter()
        .chain((self.keep > 0).then(|| PlannedBuffer::whole("sale kept blocks", self.keep)))
        .collect()
    }
}

impl SaleSelectGpu {
    fn build(b: &SelectBuild<'_>, cfg: &SaleConfig) -> Result<Self> {
        let (ctx, shape, opts) = (b.ctx, b.shape, b.opts);
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let caps = &g.caps;
        let (hq, hk, n, d) = (shape.q_heads, shape.kv_heads, shape.seq_len, shape.head_dim);
        let n_qb = n.div_ceil(BLOCK_Q);
        let chunks = cfg.candidates(n_qb - 1).div_ceil(CHUNK_BLOCKS).max(1);
        let mean_chunks = n.div_ceil(MEAN_CHUNK_ROWS);
        debug_assert_eq!(b.layout.capacity.len(), hq * n_qb);
        let browser = ctx.backend() == crate::runtime::context::Backend::BrowserWebGpu;
        let ev = estimate_variant(caps, browser, d, cfg.bits);
        let need_wg = estimate_workgroup_bytes(d, cfg.bits);
        if need_wg > caps.max_workgroup_storage && ev.coop.is_none() {
            return Err(Error::too_large(
                format!(
                    "sale estimation workgroup memory (d {d}, int{}; int4 needs less)",
                    cfg.bits
                ),
                need_wg as u64,
                caps.max_workgroup_storage as u64,
            ));
        }
        let max = caps.max_workgroups_per_dim;
        let grid_estimate = (
            check_axis(chunks as u64, max, "sale candidate chunks")?,
            check_axis(n_qb as u64, max, "sale query blocks")?,
            check_axis(hq as u64, max, "sale heads")?,
        );
        check_axis((hq + hk) as u64, max, "sale heads")?;
        let grid_means = check_axis(mean_chunks as u64, max, "sale mean chunks")?;
        let sizes = SaleBuffers::of(cfg, shape);
        // Q and K are read one run of whole heads at a time, each bound by itself.
        let es = opts.dtype.size() as u64;
        let chunks_of = |heads: usize| {
            head_chunks(
                heads,
                (n * d) as u64 * es,
                4 * es,
                caps.max_storage_binding,
                caps.storage_offset_alignment as u64,
            )
        };
        let (q_chunks, k_chunks) = (chunks_of(hq)?, chunks_of(hk)?);
        let taus: Vec<f32> = (0..hq).map(|h| cfg.tau_of(h)).collect();
        let qp = |head_first: usize, base: u32| SaleQuantParams {
            seq_len: n as u32,
            q_heads: hq as u32,
            kv_heads: hk as u32,
            group: (hq / hk) as u32,
            chunks: mean_chunks as u32,
            chunk_rows: MEAN_CHUNK_ROWS as u32,
            head_first: head_first as u32,
            x_head0: head_first as u32,
            x_base: base,
            _pad: [0; 3],
        };
        let ep = SaleEstimateParams {
            seq_len: n as u32,
            q_heads: hq as u32,
            group: (hq / hk) as u32,
            n_qb: n_qb as u32,
            chunks: chunks as u32,
            scale: opts.scale_for(shape),
            _pad: [0; 2],
        };
        let spec = |s| sale_spec(s, d, cfg.bits, cfg.local, opts.dtype, ev);
        let est = |s| Launch::new(ctx, &spec(s), &ep);
        let row_blocks = n.div_ceil(64) as u32;
        let mut quantize = vec![];
        let mut step = |stage, first: usize, grid, x: Option<(Tensor, HeadChunk)>| -> Result<()> {
            let base = x.map_or(0, |(_, c)| c.base);
            quantize.push(QuantStep {
                stage,
                launch: Launch::new(ctx, &spec(stage), &qp(first, base))?,
                grid,
                x,
            });
            Ok(())
        };
        for c in &q_chunks {
            let grid = (grid_means, (c.h1 - c.h0) as u32, 1);
            step(Stage::MeanPartial, c.h0, grid, Some((Tensor::Q, *c)))?;
        }
        for c in &k_chunks {
            let grid = (grid_means, (c.h1 - c.h0) as u32, 1);
            step(Stage::MeanPartial, hq + c.h0, grid, Some((Tensor::K, *c)))?;
        }
        step(Stage::MeanFinal, 0, ((hq + hk) as u32, 1, 1), None)?;
        for c in &q_chunks {
            let grid = (row_blocks, (c.h1 - c.h0) as u32, 1);
            step(Stage::QuantQ, c.h0, grid, Some((Tensor::Q, *c)))?;
        }
        for c in &k_chunks {
            let grid = (row_blocks, (c.h1 - c.h0) as u32, 1);
            step(Stage::QuantK, c.h0, grid, Some((Tensor::K, *c)))?;
        }
        let (select, grid_pick, keep) = match cfg.head_budget {
            Some(_) => {
                let keep: Vec<u32> = (0..hq * n_qb)
                    .map(|r| cfg.budget_keep(r / n_qb, r % n_qb, n).unwrap_or(0) as u32)
                    .collect();
                let keep = storage_init(g, "sale kept blocks", bytemuck::cast_slice(&keep))?;
                let grid = (grid_estimate.1, grid_estimate.2, 1);
                ([est(Stage::Scores)?, est(Stage::TopK)?], grid, Some(keep))
            }
            None => (
                [est(Stage::Estimate)?, est(Stage::Compact)?],
                grid_estimate,
                None,
            ),
        };
        Ok(SaleSelectGpu {
            cfg: cfg.clone(),
            shape: *shape,
            quantize,
            select,
            est_params: ep,
            grid_estimate,
            grid_pick,
            partial: storage(g, "sale mean partial sums", sizes.partial)?,
            means: storage(g, "sale sequence means", sizes.means)?,
            qq: storage(g, "sale quantized q", sizes.qq)?,
            kq: storage(g, "sale quantized k", sizes.kq)?,
            q_meta: storage(g, "sale q scales and corrections", sizes.q_meta)?,
            k_meta: storage(g, "sale k scales and corrections", sizes.k_meta)?,
            tau: storage_init(g, "sale per-head tau", bytemuck::cast_slice(&taus))?,
            picks: storage(g, sizes.picks_name(), sizes.picks)?,
            keep,
        })
    }
}

impl GpuSelection for SaleSelectGpu {
    fn record_before(&self, rec: &mut Recorder<'_>, io: &SelectIo<'_>) -> Result<()> {
        let g = rec.gpu();
        let list: Vec<_> = self
            .quantize
            .iter()
            .map(|s| {
                let x = s.x.map(|(t, c)| {
                    let buf = match t {
                        Tensor::Q => io.q,
                        Tensor::K => io.k,
                    };
                    Bound::Range(buf, c.offset, c.size)
                });
                let w = Bound::Whole;
                let bindings = match (s.stage, x) {
                    (Stage::MeanPartial, Some(x)) => vec![x, w(&self.partial)],
                    (Stage::QuantQ, Some(x)) => {
                        vec![x, w(&self.means), w(&self.qq), w(&self.q_meta)]
                    }
                    (Stage::QuantK, Some(x)) => {
                        vec![x, w(&self.means), w(&self.kq), w(&self.k_meta)]
                    }
                    _ => vec![w(&self.partial), w(&self.means)],
                };
                s.launch.dispatch_bound(g, &bindings, s.grid)
            })
            .collect();
        rec.dispatch_stage("quantize", &list);
        Ok(())
    }

    fn record(&self, rec: &mut Recorder<'_>, io: &SelectIo<'_>) -> Result<()> {
        let g = rec.gpu();
        let [estimate, pick] = &self.select;
        let bufs = [
            &self.qq,
            &self.kq,
            &self.q_meta,
            &self.k_meta,
            io.ml,
            &self.tau,
            &self.picks,
        ];
        let estimate = estimate.dispatch(g, &bufs, self.grid_estimate);
        let pick = match &self.keep {
            Some(keep) => {
                let bufs = [&self.picks, keep, io.row_base, io.ranges, io.indices];
                pick.dispatch(g, &bufs, self.grid_pick)
            }
            None => {
                let bufs = [&self.picks, io.row_base, io.ranges, io.indices];
                pick.dispatch(g, &bufs, self.grid_pick)
            }
        };
        rec.dispatch_stage("estimate", &[estimate]);
        rec.dispatch_stage(self.cfg.pick_stage(), &[pick]);
        Ok(())
    }

    fn counts(&self) -> (u32, usize) {
        (3, self.quantize.len() + 2)
    }
}

impl SaleSelectGpu {
    /// The quantized Q and K of the last run (read back; inspection and tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) async fn quantized(&self, ctx: &Context) -> Result<QuantizedQk> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let read_u32 = |buf: &wgpu::Buffer| {
            let buf = buf.clone();
            async move {
                let bytes = crate::runtime::tensor::read_buffer(g, &buf, 0, buf.size()).await?;
                Ok::<Vec<u32>, Error>(bytemuck::cast_slice(&bytes).to_vec())
            }
        };
        let (hq, hk, n) = (self.shape.q_heads, self.shape.kv_heads, self.shape.seq_len);
        let w = QuantizedQk::words(self.cfg.bits, self.shape.head_dim);
        let pairs = |v: Vec<u32>| -> Vec<[f32; 2]> {
            v[..2 * hq * n]
                .chunks_exact(2)
                .map(|c| [f32::from_bits(c[0]), f32::from_bits(c[1])])
                .collect()
        };
        Ok(QuantizedQk {
            bits: self.cfg.bits,
            q_packed: read_u32(&self.qq).await?[..hq * n * w].to_vec(),
            k_packed: read_u32(&self.kq).await?[..hk * n * w].to_vec(),
            q_meta: pairs(read_u32(&self.q_meta).await?),
            k_meta: pairs(read_u32(&self.k_meta).await?),
        })
    }

    /// The exact pass's (m, l) is overwritten by the sparse pass, so tests of the
    /// selection recompute it on the host; this runs the estimation kernel in its
    /// dot-product mode on quantized data and returns the integer sums `[q_heads, n, n]`
    /// (entries outside the candidate blocks keep `fill`). `ml` is the plan's row state.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) async fn dots(
        &self,
        ctx: &Context,
        ml: &wgpu::Buffer,
        quant: &QuantizedQk,
        fill: i32,
        (dot4, portable_loops, coop): (bool, bool, Option<usize>),
    ) -> Result<Vec<i32>> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let (hq, n, d) = (self.shape.q_heads, self.shape.seq_len, self.shape.head_dim);
        let size = (hq * n * n * 4) as u64;
        check_binding(g, "sale dot products", size)?;
        let spec = sale_spec(
            Stage::Dots,
            d,
            self.cfg.bits,
            self.cfg.local,
            DType::F32,
            EstimateVariant {
                dot4,
                portable_loops,
                coop,
            },
        );
        let launch = Launch::new(ctx, &spec, &self.est_params)?;
        g.queue
            .write_buffer(&self.qq, 0, bytemuck::cast_slice(&quant.q_packed));
        g.queue
            .write_buffer(&self.kq, 0, bytemuck::cast_slice(&quant.k_packed));
        let dots = storage_init(
            g,
            "sale dot products",
            bytemuck::cast_slice(&vec![fill; hq * n * n]),
        )?;
        let bufs = [
            &self.qq,
            &self.kq,
            &self.q_meta,
            &self.k_meta,
            ml,
            &self.tau,
            &dots,
        ];
        let mut rec = Recorder::new(ctx, "sale dot products", 1)?;
        rec.dispatch_stage("dots", &[launch.dispatch(g, &bufs, self.grid_estimate)]);
        rec.submit().await?;
        let bytes = crate::runtime::tensor::read_buffer(g, &dots, 0, size).await?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_lut_and_candidates_partition_the_causal_blocks() {
        let cfg = SaleConfig::default();
        let n = 700;
        let lut = cfg.exact_lut(1, n).unwrap();
        for qb in 0..n.div_ceil(BLOCK_Q) {
            let exact: Vec<u32> =
                lut.indices[lut.ranges[qb][0] as usize..lut.ranges[qb][1] as usize].to_vec();
            let mut all: Vec<u32> = exact.clone();
            all.extend(1..cfg.cand_end(qb) as u32);
            all.sort();
            all.dedup();
            let last = ((qb + 1) * 2).min(n.div_ceil(BLOCK_K)) as u32;
            assert_eq!(all, (0..last).collect::<Vec<_>>(), "query block {qb}");
            assert_eq!(
                all.len(),
                exact.len() + cfg.candidates(qb),
                "overlap at {qb}"
            );
        }
        // Query block 10: sink, local blocks 16..20, diagonal 20, 21; candidates 1..16.
        assert_eq!(cfg.cand_end(10), 16);
    }

    /// Budgets: a row keeps `⌈β · causal⌉` blocks in all (the exact pass's first),
    /// within its candidates; the top-k order is the margins' with ties to the lower
    /// block, through bits whose unsigned order is the floats' order.
    #[test]
    fn budgets_keep_the_largest_margins_within_the_candidates() {
        let cfg = SaleConfig {
            head_budget: Some(vec![0.25, 1.0, 0.01]),
            ..Default::default()
        };
        let n = 1000usize;
        for (h, &beta) in [0.25f64, 1.0, 0.01].iter().enumerate() {
            for qb in 0..n.div_ceil(BLOCK_Q) {
                let keep = cfg.budget_keep(h, qb, n).unwrap();
                let cand = cfg.candidates(qb);
                let causal = (((qb + 1) * BLOCK_Q).min(n) - 1) / BLOCK_K + 1;
                let exact = causal - cand;
                let want = ((beta * causal as f64).ceil() as usize).clamp(exact, causal);
                assert_eq!(keep + exact, want, "head {h} block {qb}");
            }
        }
        assert_eq!(SaleConfig::default().budget_keep(0, 3, n), None);
        assert_eq!(top_blocks(&[0.5, -1.0, 2.0, 0.5, 0.5], 3), vec![1, 3, 4]);
        assert_eq!(top_blocks(&[0.5, -1.0], 0), Vec::<u32>::new());
        assert_eq!(top_blocks(&[0.5, -1.0], 5), vec![1, 2]);
        let xs = [
            f32::NEG_INFINITY,
            -3e38,
            -2.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.75,
            3e38,
        ];
        for w in xs.windows(2) {
            assert!(ordered_bits(w[0]) < ordered_bits(w[1]), "{w:?}");
        }
        assert!(cfg.tau_of(0) == 1.0 && cfg.validate().is_ok());
    }

    #[test]
    fn quantize_round_trip_within_half_a_step() {
        for bits in [4u32, 8] {
            let d = 64;
            let x: Vec<f32> = (0..d)
                .map(|i| ((i * 37 % 17) as f32 - 8.3) * 0.37)
                .collect();
            let mut w = vec![0u32; QuantizedQk::words(bits, d)];
            let s = quantize_row(&x, bits, &mut w);
            for (c, &v) in x.iter().enumerate() {
                let back = QuantizedQk::code(bits, &w, c) as f32 * s;
                assert!(
                    (back - v).abs() <= s * 0.5 + 1e-6,
                    "bits {bits} c {c}: {back} vs {v}"
                );
            }
        }
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        // Text-settable parameters: `method::tests`; these two are not.
        for cfg in [
            SaleConfig {
                block_q: 128,
                ..Default::default()
            },
            SaleConfig {
                head_tau: Some(vec![0.1, f32::INFINITY]),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(cfg.validate(), Err(Error::InvalidArgument(_))),
                "{cfg:?}"
            );
        }
        let cfg = SaleConfig {
            head_tau: Some(vec![0.1; 3]),
            ..Default::default()
        };
        assert!(cfg.validate_heads(4).is_err());
        assert!(cfg.validate_heads(3).is_ok());
    }

    use crate::runtime::test_util::{gpu, seed};

    /// Random Q, K, V with a non-zero mean per channel (so the smoothing matters).
    fn random_qkv(shape: &AttentionShape, seed: u64) -> [Vec<f32>; 3] {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let d = shape.head_dim;
        let offsets: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut make = |heads: usize| -> Vec<f32> {
            (0..heads * shape.seq_len * d)
                .map(|i| rng.random_range(-1.5f32..1.5) + offsets[i % d])
                .collect()
        };
        [
            make(shape.q_heads),
            make(shape.kv_heads),
            make(shape.kv_heads),
        ]
    }

    /// The host selection's two ways of computing the integer dot products (8-bit codes
    /// on AVX-512 VNNI where the CPU has it, f32 on the register tile otherwise) give the
    /// same blocks and the same margins, bit for bit, int4 and int8, ragged lengths, d 64
    /// to 128, with a plausible (m, l).
    #[test]
    fn vnni_and_f32_selection_agree_exactly() {
        #[cfg(target_arch = "x86_64")]
        {
            if !vnni::available() {
                eprintln!("no AVX-512 VNNI here: only the f32 path runs");
                return;
            }
            let mut partial = 0;
            for (i, (shape, bits)) in [
                (AttentionShape::new(4, 2, 333, 64), 4u32),
                (AttentionShape::new(2, 1, 200, 128), 8),
                (AttentionShape::new(2, 2, 130, 80), 4),
            ]
            .into_iter()
            .enumerate()
            {
                use crate::attention::flash_cpu::{CpuAttention, HostRowState, attention_cpu};
                let [q, k, v] = random_qkv(&shape, seed() + i as u64);
                let quant = quantize_cpu(&shape, bits, &q, &k);
                let scale = 1.0 / (shape.head_dim as f32).sqrt();
                // The rows' full causal (m, l): a threshold as tight as any exact pass's.
                let mut st = HostRowState::empty(&shape);
                attention_cpu(
                    &shape,
                    &CpuAttention::dense(true, scale),
                    &q,
                    &k,
                    &v,
                    Some(&mut st),
                );
                let ml = st.ml;
                for tau in [0.001f32, 0.01, 0.05, 0.2] {
                    let cfg = SaleConfig {
                        bits,
                        tau,
                        local: 64,
                        ..Default::default()
                    };
                    let a = select_cpu_vnni(&shape, &cfg, scale, &quant, &ml, true).unwrap();
                    let b = select_cpu_f32(&shape, &cfg, scale, &quant, &ml).unwrap();
                    assert_eq!(a.blocks, b.blocks, "{shape:?} int{bits} tau {tau}");
                    // Stopping a kept block's scan early keeps the same blocks.
                    let early = select_cpu_vnni(&shape, &cfg, scale, &quant, &ml, false).unwrap();
                    assert_eq!(early.blocks, a.blocks, "{shape:?} int{bits} tau {tau}");
                    assert_eq!(a.margins, b.margins, "{shape:?} int{bits} tau {tau}");
                    let kept: usize = a.blocks.indices.len();
                    let cand: usize = a.margins.iter().map(|m| m.len()).sum();
                    partial += (kept > 0 && kept < cand) as usize;
                }
            }
            // The comparison covered kept and dropped blocks.
            assert!(partial > 0, "every case kept all or nothing");
        }
    }

    /// GPU quantization vs the CPU twin, then the estimation kernel's integer dot
    /// products (both the dot4I8Packed and the plain-integer variant) vs the host, bit
    /// for bit on the GPU's own codes, at a ragged length with GQA.
    #[test]
    fn gpu_quantization_and_integer_dots_match_the_host() {
        let Some(ctx) = gpu() else { return };
        let shape = AttentionShape::new(4, 2, 333, 64);
        let [q, k, v] = random_qkv(&shape, seed());
        for bits in [4u32, 8] {
            let cfg = SaleConfig {
                bits,
                local: 64,
                ..Default::default()
            };
            let plan = ctx
                .attention(shape)
                .method(crate::attention::Method::Sale(cfg.clone()))
                .build()
                .unwrap();
            let (tq, tk, tv) =
                crate::attention::upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
            plan.run(&tq, &tk, &tv).unwrap();
            let Some(crate::attention::GpuPlan::Sparse(exec)) = &plan.gpu else {
                panic!("a GPU plan")
            };
            let sel: &dyn std::any::Any = exec.selection_gpu();
            let sg = sel
                .downcast_ref::<SaleSelectGpu>()
                .expect("SALE's selection");
            let gq = pollster::block_on(sg.quantized(&ctx)).unwrap();
            let cq = quantize_cpu(&shape, bits, &q, &k);
            // Codes: rounding ties may flip by one step (GPU division is not exact).
            let w = QuantizedQk::words(bits, shape.head_dim);
            let mut flips = 0;
            for (packed_g, packed_c) in [(&gq.q_packed, &cq.q_packed), (&gq.k_packed, &cq.k_packed)]
            {
                for (rg, rc) in packed_g.chunks(w).zip(packed_c.chunks(w)) {
                    for c in 0..shape.head_dim {
                        let (a, b) = (
                            QuantizedQk::code(bits, rg, c),
                            QuantizedQk::code(bits, rc, c),
                        );
                        assert!((a - b).abs() <= 1, "bits {bits}: code {a} vs {b}");
                        flips += (a != b) as usize;
                    }
                }
            }
            let total = (shape.q_heads + shape.kv_heads) * shape.seq_len * shape.head_dim;
            assert!(
                flips * 1000 <= total,
                "bits {bits}: {flips} of {total} codes differ"
            );
            for (metas_g, metas_c) in [(&gq.q_meta, &cq.q_meta), (&gq.k_meta, &cq.k_meta)] {
                for (a, b) in metas_g.iter().zip(metas_c) {
                    assert!(
                        (a[0] - b[0]).abs() <= 1e-5 * b[0].abs() + 1e-7,
                        "scale {a:?} vs {b:?}"
                    );
                    assert!((a[1] - b[1]).abs() <= 1e-3, "correction {a:?} vs {b:?}");
                }
            }
            let fill = i32::MIN;
            // Every integer variant, and the matrix-unit one where the device has it:
            // the same exact integers.
            let coop = ctx.capabilities().coop_tile.map(|t| t as usize);
            let variants = [(true, false), (false, false), (true, true), (false, true)]
                .map(|(d, p)| (d, p, None))
                .into_iter()
                .chain(coop.map(|t| (false, false, Some(t))));
            for (dot4, portable, coop) in variants {
                eprintln!(
                    "bits {bits}: dots with dot4 {dot4}, portable loops {portable}, coop {coop:?}"
                );
                let dots = pollster::block_on(sg.dots(
                    &ctx,
                    exec.ml_buffer(),
                    &gq,
                    fill,
                    (dot4, portable, coop),
                ))
                .unwrap();
                let n = shape.seq_len;
                let mut checked = 0;
                for h in 0..shape.q_heads {
                    for i in 0..n {
                        let qb = i / BLOCK_Q;
                        let cand = BLOCK_K..cfg.cand_end(qb) * BLOCK_K;
                        for j in 0..n {
                            let got = dots[(h * n + i) * n + j];
                            if cand.contains(&j) {
                                assert_eq!(
                                    got,
                                    gq.int_dot(&shape, h, i, j),
                                    "bits {bits} dot4 {dot4} coop {coop:?} h {h} i {i} j {j}"
                                );
                                checked += 1;
                            } else {
                                assert_eq!(
                                    got, fill,
                                    "bits {bits}: wrote outside the candidates at h {h} i {i} j {j}"
                                );
                            }
                        }
                    }
                }
                assert!(checked > 50_000, "{checked} entries checked");
            }
        }
    }
}
