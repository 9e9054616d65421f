//! CPU twin of `shaders/flash_attention.wgsl`: blocked online-softmax attention,
//! multithreaded with rayon over (head, query block). Same semantics as the GPU kernel:
//! causal alignment at the end of the keys, GQA without copying K/V, optional import
//! and export of the row state `(m, l, acc)`.
//!
//! The inner loops are shaped like a GEMM micro-kernel so that each K and V element
//! loaded is reused across `MR` query rows held in registers:
//! - `S = Q·Kᵀ` runs on an `MR × NR` register tile. K is packed once per call into
//!   panels of `NR` keys laid out `[d][NR]` (and each row group of Q into `[d][MR]`),
//!   so the tile streams both operands contiguously: one K vector load feeds `MR`
//!   multiply-adds.
//! - `acc += P·V` runs on an `MR × NV` register tile of `acc`, walking the keys of a
//!   tile; one V vector load again feeds `MR` multiply-adds.
//! - `exp` of the scores is a branch-free polynomial (Cephes `expf`, about 1 ulp) that
//!   vectorizes; a libm call per score would cost as much as the two matmuls.
//!
//! The kernels are plain Rust over fixed-size arrays, generic over how a multiply-add
//! is done (a `MulAdd` trait). On x86-64 the whole per-task routine is instantiated a second
//! time inside a `#[target_feature(enable = "avx2,fma")]` function and picked at run
//! time, so the compiler emits 256-bit FMA code there while the crate itself still
//! targets baseline x86-64 (SSE2); other CPUs and wasm take the portable instance.

use rayon::prelude::*;

use super::AttentionShape;
use super::lut::SparseLut;

const NEG_BIG: f32 = -1.0e30;
/// Query rows per task (a multiple of `MR`).
const ROWS: usize = 48;
/// Query rows per register tile.
const MR: usize = 6;
/// Keys per packed K panel, the column width of the `S` register tile.
const NR: usize = 16;
/// Output columns per `P·V` register tile.
const NV: usize = 16;
/// Keys per tile (a multiple of `NR`): K and V tiles of 64 keys × 128 dims (64 KiB)
/// stay in L2 while every row group of the task uses them.
const KEYS: usize = 64;

/// Row state on the host: `ml` is `[q_heads, q_len, 2]` (m, l), `acc` is
/// `[q_heads, q_len, head_dim]` (unnormalized output).
#[derive(Clone, Debug, PartialEq)]
pub struct HostRowState {
    /// Interleaved (m, l) per row.
    pub ml: Vec<f32>,
    /// Unnormalized output rows.
    pub acc: Vec<f32>,
}

impl HostRowState {
    /// The empty state (m = -1e30, l = 0, acc = 0) for a shape.
    pub fn empty(shape: &AttentionShape) -> Self {
        let rows = shape.q_heads * shape.seq_len;
        let mut ml = vec![0.0; rows * 2];
        for r in 0..rows {
            ml[2 * r] = NEG_BIG;
        }
        HostRowState {
            ml,
            acc: vec![0.0; rows * shape.head_dim],
        }
    }
}

/// How the kernels do `a * b + c`. Rust never fuses a multiply and an add on its own,
/// so the fused form is spelled out, and used only where the CPU has FMA (elsewhere
/// `mul_add` would be a libm call).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// The `S = Q·Kᵀ` register tile ([`qk_tile`]).
    #[inline(always)]
    fn qk_tile(qg: &[f32], panel: &[f32]) -> [[f32; NR]; MR]
    where
        Self: Sized,
    {
        qk_tile::<Self>(qg, panel)
    }

    /// The `acc += P·V` register tile ([`pv_tile`]).
    #[inline(always)]
    fn pv_tile(p: &[[f32; KEYS]; MR], keys: usize, v: &[f32], d: usize, acc: &mut [f32])
    where
        Self: Sized,
    {
        pv_tile::<Self>(p, keys, v, d, acc)
    }
}

/// Separate multiply and add: baseline x86-64 (SSE2) and wasm.
#[cfg(not(target_arch = "aarch64"))]
struct Unfused;
#[cfg(not(target_arch = "aarch64"))]
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One fused multiply-add: AArch64 (always has it) and the AVX2+FMA x86-64 path.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// The AVX2 + FMA path: fused multiply-adds, and the two register tiles written with
/// 256-bit intrinsics ([`avx2`]). LLVM's auto-vectorizer kept the plain-Rust tiles in
/// scalar `vfmadd…ss` code with the accumulators in memory (10× slower), so the hot
/// loops do not depend on it here. Only instantiated inside [`run_task_avx2_fma`].
#[cfg(target_arch = "x86_64")]
struct Avx2Fma;
#[cfg(target_arch = "x86_64")]
impl MulAdd for Avx2Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn qk_tile(qg: &[f32], panel: &[f32]) -> [[f32; NR]; MR] {
        // SAFETY: only reached from `run_task_avx2_fma`, which runs after the CPU was
        // detected to have AVX2 and FMA.
        unsafe { avx2::qk_tile(qg, panel) }
    }

    #[inline(always)]
    fn pv_tile(p: &[[f32; KEYS]; MR], keys: usize, v: &[f32], d: usize, acc: &mut [f32]) {
        // SAFETY: as above.
        unsafe { avx2::pv_tile(p, keys, v, d, acc) }
    }
}

/// The register tiles in AVX2 + FMA intrinsics: `MR × 16` accumulators as `MR × 2`
/// `__m256` (12 of the 16 ymm registers), one broadcast per row and two vector loads
/// per step feeding `2·MR` FMAs.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{KEYS, MR, NR, NV};
    use std::arch::x86_64::*;

    const _: () = assert!(NR == 16 && NV == 16, "the tiles are two __m256 wide");

    /// [`super::qk_tile`] for AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn qk_tile(qg: &[f32], panel: &[f32]) -> [[f32; NR]; MR] {
        let dims = (qg.len() / MR).min(panel.len() / NR);
        let (q, k) = (qg.as_ptr(), panel.as_ptr());
        let mut a = [[_mm256_setzero_ps(); 2]; MR];
        for c in 0..dims {
            // SAFETY: c < dims keeps every read inside `qg` (dims·MR) and `panel`
            // (dims·NR).
            unsafe {
                let k0 = _mm256_loadu_ps(k.add(c * NR));
                let k1 = _mm256_loadu_ps(k.add(c * NR + 8));
                for (i, ai) in a.iter_mut().enumerate() {
                    let qv = _mm256_set1_ps(*q.add(c * MR + i));
                    ai[0] = _mm256_fmadd_ps(qv, k0, ai[0]);
                    ai[1] = _mm256_fmadd_ps(qv, k1, ai[1]);
                }
            }
        }
        let mut s = [[0.0f32; NR]; MR];
        for (si, ai) in s.iter_mut().zip(&a) {
            // SAFETY: each row of `s` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(si.as_mut_ptr(), ai[0]);
                _mm256_storeu_ps(si.as_mut_ptr().add(8), ai[1]);
            }
        }
        s
    }

    /// [`super::pv_tile`] for AVX2 + FMA (leftover columns past a multiple of 16 go
    /// through the portable tile's scalar tail).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pv_tile(
        p: &[[f32; KEYS]; MR],
        keys: usize,
        v: &[f32],
        d: usize,
        acc: &mut [f32],
    ) {
        let keys = keys.min(KEYS);
        let v = &v[..keys * d];
        let acc = &mut acc[..MR * d];
        let (vp, ap) = (v.as_ptr(), acc.as_mut_ptr());
        let mut col = 0;
        while col + NV <= d {
            // SAFETY: rows i < MR and columns col..col + 16 ≤ d lie inside `acc`
            // (MR·d) and, for keys j < keys, inside `v` (keys·d).
            unsafe {
                let mut a = [[_mm256_setzero_ps(); 2]; MR];
                for (i, ai) in a.iter_mut().enumerate() {
                    ai[0] = _mm256_loadu_ps(ap.add(i * d + col));
                    ai[1] = _mm256_loadu_ps(ap.add(i * d + col + 8));
                }
                for j in 0..keys {
                    let v0 = _mm256_loadu_ps(vp.add(j * d + col));
                    let v1 = _mm256_loadu_ps(vp.add(j * d + col + 8));
                    for (ai, pi) in a.iter_mut().zip(p) {
                        let w = _mm256_set1_ps(pi[j]);
                        ai[0] = _mm256_fmadd_ps(w, v0, ai[0]);
                        ai[1] = _mm256_fmadd_ps(w, v1, ai[1]);
                    }
                }
                for (i, ai) in a.iter().enumerate() {
                    _mm256_storeu_ps(ap.add(i * d + col), ai[0]);
                    _mm256_storeu_ps(ap.add(i * d + col + 8), ai[1]);
                }
            }
            col += NV;
        }
        if col < d {
            super::pv_tail::<super::Fused>(p, keys, v, d, acc, col);
        }
    }
}

/// The multiply-add of the path taken when no run-time dispatch applies.
#[cfg(target_arch = "aarch64")]
type Portable = Fused;
#[cfg(not(target_arch = "aarch64"))]
type Portable = Unfused;

/// `e^x`, branch-free so that loops over it vectorize (Cephes `expf`: range reduction
/// by `ln 2`, degree-5 polynomial, about 1 ulp). Inputs below -87.3 (where `e^x` leaves
/// the normal range) give about 1e-38 instead of a subnormal or 0; callers here only
/// pass `x <= 0` and weigh the result against terms near 1.
#[inline(always)]
fn exp_approx<F: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits (round to nearest
    // even), which avoids a float-to-int conversion the SSE2 vectorizer lacks.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons rather than f32::clamp/max: those also order NaNs, which costs extra
    // instructions per lane.
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = F::mul_add(x, LOG2E, ROUND);
    let n = t - ROUND;
    let e = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = F::mul_add(n, -LN2_HI, x);
    let r = F::mul_add(n, -LN2_LO, r);
    let mut y = 1.987_569_2e-4;
    y = F::mul_add(y, r, 1.398_199_9e-3);
    y = F::mul_add(y, r, 8.333_452e-3);
    y = F::mul_add(y, r, 4.166_579_6e-2);
    y = F::mul_add(y, r, 1.666_666_5e-1);
    y = F::mul_add(y, r, 0.5);
    y = F::mul_add(y, r * r, r) + 1.0;
    // 2^n built in the exponent field; n is in [-126, 127] after the clamps above.
    y * f32::from_bits(((e + 127) as u32) << 23)
}

/// Query rows of [`qk_tile_fast`]'s tile.
pub(crate) const TILE_ROWS: usize = MR;
/// Keys of [`qk_tile_fast`]'s tile.
pub(crate) const TILE_KEYS: usize = NR;

/// The flash kernel's `Q·Kᵀ` register tile for the other CPU kernels of the crate:
/// [`TILE_ROWS`] query rows packed `[d][TILE_ROWS]` against [`TILE_KEYS`] keys packed
/// `[d][TILE_KEYS]`, with explicit AVX2 + FMA intrinsics when `simd` (the caller checked
/// the CPU has both).
#[inline(always)]
pub(crate) fn qk_tile_fast(qg: &[f32], panel: &[f32], simd: bool) -> [[f32; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller passes `simd` only when the CPU has AVX2 and FMA.
        return unsafe { avx2::qk_tile(qg, panel) };
    }
    let _ = simd;
    qk_tile::<Portable>(qg, panel)
}

/// Whether [`qk_tile_fast`] may take its AVX2 + FMA path on this CPU.
pub(crate) fn simd_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of a `[n, d]` matrix packed in panels of [`TILE_KEYS`] keys, each
/// `[d][TILE_KEYS]` (keys past `n` zero): the operand layout of [`qk_tile_fast`].
pub(crate) fn pack_key_panels(k: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n.div_ceil(NR) * NR * d];
    for (j, krow) in k.chunks_exact(d).take(n).enumerate() {
        let panel = &mut out[(j / NR) * NR * d..];
        for (c, &x) in krow.iter().enumerate() {
            panel[c * NR + j % NR] = x;
        }
    }
    out
}

/// `e^x` for the other CPU kernels of the crate ([`exp_approx`] with the portable
/// multiply-add: inside a `target_feature` function it vectorizes like the flash
/// kernel's). About 1 ulp for `x <= 0`.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    exp_approx::<Portable>(x)
}

/// `S[i][j] = q_i · k_j` for the `MR` rows of a packed Q group (`[d][MR]`) and the `NR`
/// keys of a packed K panel (`[d][NR]`): a rank-1 update of an `MR × NR` register tile per
/// dimension, so each K vector loaded serves `MR` rows.
#[inline(always)]
fn qk_tile<F: MulAdd>(qg: &[f32], panel: &[f32]) -> [[f32; NR]; MR] {
    let mut s = [[0.0f32; NR]; MR];
    for (qc, kc) in qg.as_chunks::<MR>().0.iter().zip(panel.as_chunks::<NR>().0) {
        for (si, &qv) in s.iter_mut().zip(qc) {
            for (sv, &kv) in si.iter_mut().zip(kc) {
                *sv = F::mul_add(qv, kv, *sv);
            }
        }
    }
    s
}

/// `acc[i] += Σ_j p[j][i] · v_j` for the `MR` rows of `acc` (`[MR][d]`) and the first
/// `keys` rows of `v` (`[keys][d]`), `NV` columns at a time held in registers so that
/// each V vector loaded serves `MR` rows (the weights are broadcast from `p[i][j]`).
///
/// The shapes here are what LLVM turns into a register tile: fixed-size arrays filled
/// by `copy_from_slice`. Small changes can lose it (folding the softmax rescale into
/// the tile load made this loop scalar and the whole call 6x slower), so check the
/// bench after editing these kernels.
#[inline(always)]
fn pv_tile<F: MulAdd>(p: &[[f32; KEYS]; MR], keys: usize, v: &[f32], d: usize, acc: &mut [f32]) {
    let keys = keys.min(KEYS);
    let v = &v[..keys * d];
    let mut col = 0;
    while col + NV <= d {
        let mut a = [[0.0f32; NV]; MR];
        for (i, ai) in a.iter_mut().enumerate() {
            ai.copy_from_slice(&acc[i * d + col..i * d + col + NV]);
        }
        for j in 0..keys {
            let vc: [f32; NV] = v[j * d + col..j * d + col + NV]
                .try_into()
                .expect("NV columns");
            for i in 0..MR {
                let w = p[i][j];
                for c in 0..NV {
                    a[i][c] = F::mul_add(w, vc[c], a[i][c]);
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            acc[i * d + col..i * d + col + NV].copy_from_slice(ai);
        }
        col += NV;
    }
    pv_tail::<F>(p, keys, v, d, acc, col);
}

/// Columns `col..d` of [`pv_tile`], one at a time: the leftover when d is not a
/// multiple of `NV` (not a head_dim the crate validates, but the tiles take any shape).
#[inline(always)]
fn pv_tail<F: MulAdd>(
    p: &[[f32; KEYS]; MR],
    keys: usize,
    v: &[f32],
    d: usize,
    acc: &mut [f32],
    col: usize,
) {
    let v = &v[..keys.min(KEYS) * d];
    for c in col..d {
        for i in 0..MR {
            let mut sum = acc[i * d + c];
            for (&w, vrow) in p[i].iter().zip(v.chunks_exact(d)) {
                sum = F::mul_add(w, vrow[c], sum);
            }
            acc[i * d + c] = sum;
        }
    }
}

/// Scales the visible scores of a row, masks the rest to `NEG_BIG`, and returns the
/// larger of `m` and the row maximum. Lane `j` is visible iff `j < hi` and (`j <
/// sink_end` or `j >= lo`): the causal horizon, and a sliding window with sink keys.
/// Plain loops over the whole tile so they vectorize; eight running maxima break the
/// dependency chain.
#[inline(always)]
fn mask_and_max(row: &mut [f32; KEYS], vis: Visible, scale: f32, m: f32) -> f32 {
    for (j, sv) in row.iter_mut().enumerate() {
        let live = j < vis.hi && (j < vis.sink_end || j >= vis.lo);
        *sv = if live { *sv * scale } else { NEG_BIG };
    }
    let mut mx8 = [NEG_BIG; 8];
    for chunk in row.as_chunks::<8>().0 {
        for (mv, &sv) in mx8.iter_mut().zip(chunk) {
            *mv = if sv > *mv { sv } else { *mv };
        }
    }
    mx8.iter().fold(m, |a, &b| a.max(b))
}

/// `p[j] = e^(s[j] - mx)` for the unmasked scores (`> NEG_BIG / 2`, as the GPU kernel
/// tests) and 0 for the others; returns the sum of the weights. The exponential is
/// computed for every lane and then selected, so the loop has no branch.
#[inline(always)]
fn softmax_weights<F: MulAdd>(row: &[f32; KEYS], mx: f32, p: &mut [f32; KEYS]) -> f32 {
    for (pv, &sv) in p.iter_mut().zip(row) {
        let w = exp_approx::<F>(sv - mx);
        *pv = if sv > 0.5 * NEG_BIG { w } else { 0.0 };
    }
    let mut sum8 = [0.0f32; 8];
    for chunk in p.as_chunks::<8>().0 {
        for (sm, &w) in sum8.iter_mut().zip(chunk) {
            *sm += w;
        }
    }
    sum8.iter().sum()
}

/// Visible lanes of one row in one key tile (see [`mask_and_max`]).
#[derive(Clone, Copy)]
struct Visible {
    sink_end: usize,
    lo: usize,
    hi: usize,
}

/// Options of the CPU attention beyond the shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuAttention<'a> {
    /// Causal masking.
    pub causal: bool,
    /// Softmax scale.
    pub scale: f32,
    /// Sliding window in keys (0 = none): row r sees keys j with j + window > r.
    pub window: usize,
    /// Keys at the start that every row sees despite the window.
    pub sinks: usize,
    /// Sparse key lists (the block-sparse and stripe executors); None = every key.
    pub lut: Option<&'a SparseLut>,
}

impl<'a> CpuAttention<'a> {
    /// Causal attention over the keys of `lut` only (the CPU twin of the sparse
    /// executors).
    pub fn sparse(scale: f32, lut: &'a SparseLut) -> Self {
        CpuAttention {
            lut: Some(lut),
            ..CpuAttention::dense(true, scale)
        }
    }

    /// Every key (no window, no LUT).
    pub fn dense(causal: bool, scale: f32) -> Self {
        CpuAttention {
            causal,
            scale,
            window: 0,
            sinks: 0,
            lut: None,
        }
    }
}

/// What every task reads.
struct Inputs<'a> {
    d: usize,
    n: usize,
    nk: usize,
    group: usize,
    shift: usize,
    causal: bool,
    scale: f32,
    window: usize,
    sinks: usize,
    lut: Option<&'a SparseLut>,
    q: &'a [f32],
    /// K packed per kv head into `nk.div_ceil(NR)` panels of `[d][NR]`, zero-padded.
    kp: &'a [f32],
    /// K as given (sparse: keys outside whole aligned panels are gathered from it).
    k: &'a [f32],
    v: &'a [f32],
}

/// The key positions of one tile: a contiguous range, or gathered ones.
enum TileKeys<'a> {
    Range(usize, usize),
    List(&'a [u32]),
}

impl TileKeys<'_> {
    /// How many of the tile's keys are below position `x`.
    fn below(&self, x: usize) -> usize {
        match *self {
            TileKeys::Range(c0, kt) => x.saturating_sub(c0).min(kt),
            TileKeys::List(l) => l.partition_point(|&p| (p as usize) < x),
        }
    }
}

/// One (head, row block) of the output, with its slice of the row state if any.
struct Task<'a> {
    h: usize,
    r0: usize,
    out: &'a mut [f32],
    state: Option<(&'a mut [f32], &'a mut [f32])>,
}

/// Runs one task with the portable multiply-add.
fn run_task_portable(inp: &Inputs, task: Task) {
    run_task::<Portable>(inp, task)
}

/// The same routine compiled for AVX2 + FMA: the compiler vectorizes the kernels to
/// 8-lane `vfmadd` code inside this function.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_task_avx2_fma(inp: &Inputs, task: Task) {
    run_task::<Avx2Fma>(inp, task)
}

/// Computes `task`'s rows: online softmax over key tiles of `KEYS`, row groups of `MR`
/// inside, then writes the normalized output and exports the row state.
#[inline(always)]
fn run_task<F: MulAdd>(inp: &Inputs, task: Task) {
    let Inputs {
        d,
        n,
        nk,
        group,
        shift,
        causal,
        scale,
        window,
        sinks,
        lut,
        q,
        kp,
        k,
        v,
    } = *inp;
    let Task { h, r0, out, state } = task;
    let rows = out.len() / d;
    let r1 = r0 + rows;
    let groups = rows.div_ceil(MR);
    let kvh = h / group;
    // Dense: K pre-packed for the whole head. Sparse: this block's key list, and the
    // tile's keys gathered into `gk` (packed) and `gv` before use: a whole aligned
    // panel of consecutive keys (block LUTs) is copied from the packed K, other keys
    // one by one from K as given.
    let list = lut.map(|l| l.keys_of(h, r0 / l.q_block));
    let panels = nk.div_ceil(NR);
    let kp_head = &kp[kvh * panels * NR * d..(kvh + 1) * panels * NR * d];
    let k_head = &k[kvh * nk * d..(kvh + 1) * nk * d];
    let v_head = &v[kvh * nk * d..(kvh + 1) * nk * d];
    let (mut gk, mut gv) = match lut {
        None => (vec![], vec![]),
        Some(_) => (vec![0.0f32; KEYS * d], vec![0.0f32; KEYS * d]),
    };

    // Q rows of each group transposed to [d][MR]; rows past r1 stay zero (their
    // scores are masked, and their state is never written back).
    let mut qp = vec![0.0f32; groups * d * MR];
    for i in 0..rows {
        let qrow = &q[(h * n + r0 + i) * d..(h * n + r0 + i + 1) * d];
        let qg = &mut qp[(i / MR) * d * MR..(i / MR + 1) * d * MR];
        for (c, &x) in qrow.iter().enumerate() {
            qg[c * MR + i % MR] = x;
        }
    }
    let mut m = vec![NEG_BIG; groups * MR];
    let mut l = vec![0.0f32; groups * MR];
    let mut acc = vec![0.0f32; groups * MR * d];
    if let Some((ml, acc_in)) = &state {
        for i in 0..rows {
            m[i] = ml[2 * i];
            l[i] = ml[2 * i + 1];
        }
        acc[..rows * d].copy_from_slice(acc_in);
    }

    // Keys past the last row's causal horizon are masked for every row of the task.
    let key_end = if causal { (r1 + shift).min(nk) } else { nk };
    let total = match &list {
        None => key_end,
        Some(l) => l.partition_point(|&p| (p as usize) < key_end),
    };
    let mut s = [[0.0f32; KEYS]; MR];
    let mut p = [[0.0f32; KEYS]; MR];
    let mut c0 = 0;
    while c0 < total {
        let kt = KEYS.min(total - c0);
        let (tile, panels_t, v_t): (TileKeys, &[f32], &[f32]) = match &list {
            None => (
                TileKeys::Range(c0, kt),
                &kp_head[c0 * d..],
                &v_head[c0 * d..],
            ),
            Some(l) => {
                let pos = &l[c0..c0 + kt];
                // Only a partial last panel keeps columns no key writes: zero it.
                if kt % NR != 0 {
                    let last = kt / NR * NR * d;
                    gk[last..last + NR * d].fill(0.0);
                }
                let mut jj = 0;
                while jj < kt {
                    let key = pos[jj] as usize;
                    let whole = jj % NR == 0
                        && jj + NR <= kt
                        && key.is_multiple_of(NR)
                        && pos[jj + NR - 1] as usize == key + NR - 1;
                    if whole {
                        gk[jj * d..(jj + NR) * d]
                            .copy_from_slice(&kp_head[key * d..(key + NR) * d]);
                        gv[jj * d..(jj + NR) * d].copy_from_slice(&v_head[key * d..(key + NR) * d]);
                        jj += NR;
                        continue;
                    }
                    let krow = &k_head[key * d..(key + 1) * d];
                    let panel = &mut gk[(jj / NR) * NR * d..(jj / NR + 1) * NR * d];
                    for (c, &x) in krow.iter().enumerate() {
                        panel[c * NR + jj % NR] = x;
                    }
                    gv[jj * d..(jj + 1) * d].copy_from_slice(&v_head[key * d..(key + 1) * d]);
                    jj += 1;
                }
                (TileKeys::List(pos), &gk[..], &gv[..])
            }
        };
        for g in 0..groups {
            let gr0 = r0 + g * MR;
            let gr1 = (gr0 + MR).min(r1);
            // Keys of the tile this group sees at all (a prefix: keys are ascending). A
            // tile a group does not see is skipped, which leaves (m, l, acc) as the
            // masked update would.
            let kt_g = if causal { tile.below(gr1 + shift) } else { kt };
            if kt_g == 0 {
                continue;
            }

            // S for the group, one panel of NR keys at a time.
            let qg = &qp[g * d * MR..(g + 1) * d * MR];
            for t in 0..kt_g.div_ceil(NR) {
                let panel = &panels_t[t * NR * d..(t + 1) * NR * d];
                let tile_s = F::qk_tile(qg, panel);
                for (si, ti) in s.iter_mut().zip(&tile_s) {
                    si[t * NR..(t + 1) * NR].copy_from_slice(ti);
                }
            }

            // Online softmax per row; every loop runs over the whole KEYS array with
            // masks so that it vectorizes.
            for i in 0..MR {
                let r = gr0 + i;
                let vis = if r >= gr1 {
                    // Padding row: nothing visible.
                    Visible {
                        sink_end: 0,
                        lo: 0,
                        hi: 0,
                    }
                } else {
                    let horizon = if causal { r + shift + 1 } else { nk };
                    let hi = tile.below(horizon).min(kt_g);
                    if window > 0 {
                        Visible {
                            sink_end: tile.below(sinks),
                            lo: tile.below((r + shift + 1).saturating_sub(window)),
                            hi,
                        }
                    } else {
                        Visible {
                            sink_end: 0,
                            lo: 0,
                            hi,
                        }
                    }
                };
                let gi = g * MR + i;
                let mx = mask_and_max(&mut s[i], vis, scale, m[gi]);
                let alpha = (m[gi] - mx).exp();
                let sum = softmax_weights::<F>(&s[i], mx, &mut p[i]);
                l[gi] = l[gi] * alpha + sum;
                m[gi] = mx;
                for a in &mut acc[gi * d..(gi + 1) * d] {
                    *a *= alpha;
                }
            }

            F::pv_tile(&p, kt_g, v_t, d, &mut acc[g * MR * d..(g + 1) * MR * d]);
        }
        c0 += KEYS;
    }

    for i in 0..rows {
        let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
        for (o, &a) in out[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&acc[i * d..(i + 1) * d])
        {
            *o = a * inv;
        }
    }
    if let Some((ml, acc_out)) = state {
        for i in 0..rows {
            ml[2 * i] = m[i];
            ml[2 * i + 1] = l[i];
        }
        acc_out.copy_from_slice(&acc[..rows * d]);
    }
}

/// K of every kv head as panels of `NR` keys laid out `[d][NR]` (keys past `nk` are
/// zero), the operand layout `qk_tile` streams. Built once per call and shared by the
/// `group` query heads of each kv head.
fn pack_k(k: &[f32], kv_heads: usize, nk: usize, d: usize) -> Vec<f32> {
    let panels = nk.div_ceil(NR);
    let mut kp = vec![0.0f32; kv_heads * panels * NR * d];
    kp.par_chunks_mut(NR * d)
        .enumerate()
        .for_each(|(idx, panel)| {
            let (kvh, pi) = (idx / panels, idx % panels);
            for jj in 0..NR.min(nk - pi * NR) {
                let key = pi * NR + jj;
                let krow = &k[(kvh * nk + key) * d..(kvh * nk + key + 1) * d];
                for (c, &x) in krow.iter().enumerate() {
                    panel[c * NR + jj] = x;
                }
            }
        });
    kp
}

/// Dense attention on the host. `q` is `[q_heads, seq_len, d]`, `k`/`v` are
/// `[kv_heads, kv_len, d]`, all f32. Returns the normalized output `[q_heads, seq_len, d]`.
/// With `state`, the rows start from it and it receives the final state.
pub fn dense_attention_cpu(
    shape: &AttentionShape,
    causal: bool,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    state: Option<&mut HostRowState>,
) -> Vec<f32> {
    let opts = CpuAttention::dense(causal, scale);
    attention_with(shape, &opts, q, k, v, state, true)
}

/// Attention on the host with every option: sliding window, sparse key lists (the CPU
/// twin of the block-sparse and stripe executors), row-state import/export. The LUT
/// must have been validated against `shape` (square: `kv_len == seq_len`).
pub fn attention_cpu(
    shape: &AttentionShape,
    opts: &CpuAttention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    state: Option<&mut HostRowState>,
) -> Vec<f32> {
    attention_with(shape, opts, q, k, v, state, true)
}

/// [`attention_cpu`] with the run-time SIMD dispatch switchable, so that tests on an
/// AVX2 machine also cover the portable path.
fn attention_with(
    shape: &AttentionShape,
    opts: &CpuAttention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    state: Option<&mut HostRowState>,
    allow_simd: bool,
) -> Vec<f32> {
    let CpuAttention {
        causal,
        scale,
        window,
        sinks,
        lut,
    } = *opts;
    let d = shape.head_dim;
    let n = shape.seq_len;
    let nk = shape.kv_len;
    let mut out = vec![0.0f32; shape.q_heads * n * d];
    if out.is_empty() {
        // No rows or no columns: nothing to compute (and chunks of 0 would panic).
        return out;
    }
    let inp = Inputs {
        d,
        n,
        nk,
        group: shape.q_heads / shape.kv_heads,
        shift: nk.saturating_sub(n),
        causal,
        scale,
        window,
        sinks,
        lut,
        q,
        kp: &pack_k(k, shape.kv_heads, nk, d),
        k,
        v,
    };
    // A task's rows must lie in one LUT row (query block, a multiple of 32).
    let rows_per_task = match lut {
        None => ROWS,
        Some(l) if l.q_block.is_multiple_of(64) => 64,
        Some(_) => 32,
    };

    // Split the output (and the state) into disjoint per-task slices up front, so that
    // the tasks write their rows in place.
    let mut tasks = Vec::with_capacity(shape.q_heads * n.div_ceil(rows_per_task));
    let mut state_rows = state.map(|st| {
        (
            st.ml
                .chunks_mut(2 * n)
                .map(|c| c.chunks_mut(2 * rows_per_task)),
            st.acc
                .chunks_mut(n * d)
                .map(|c| c.chunks_mut(rows_per_task * d)),
        )
    });
    for (h, out_h) in out.chunks_mut(n * d).enumerate() {
        let mut st_h = state_rows.as_mut().map(|(ml, acc)| {
            (
                ml.next().expect("state ml rows"),
                acc.next().expect("state acc rows"),
            )
        });
        for (b, out_b) in out_h.chunks_mut(rows_per_task * d).enumerate() {
            let st = st_h.as_mut().map(|(ml, acc)| {
                (
                    ml.next().expect("state ml block"),
                    acc.next().expect("state acc block"),
                )
            });
            tasks.push(Task {
                h,
                r0: b * rows_per_task,
                out: out_b,
                state: st,
            });
        }
    }

    #[cfg(target_arch = "x86_64")]
    let avx2_fma = allow_simd && simd_tiles();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = allow_simd;
    tasks.into_par_iter().for_each(|task| {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma {
            // SAFETY: the CPU was just checked to support AVX2 and FMA, the only
            // requirement of a `#[target_feature(enable = "avx2,fma")]` function.
            unsafe { run_task_avx2_fma(&inp, task) };
            return;
        }
        run_task_portable(&inp, task);
    });
    out
}

/// Straightforward O(N²) reference (f64 accumulation, full softmax), for tests.
pub fn naive_attention(
    shape: &AttentionShape,
    causal: bool,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let shift = shape.kv_len - shape.seq_len.min(shape.kv_len);
    naive_masked_attention(shape, scale, q, k, v, |_, r, j| !causal || j <= r + shift)
}

/// Straightforward reference over any key set: row `r` of head `h` attends key `j`
/// iff `visible(h, r, j)` (f64 accumulation). A row that sees no key gets zeros.
pub fn naive_masked_attention(
    shape: &AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    visible: impl Fn(usize, usize, usize) -> bool,
) -> Vec<f32> {
    let (d, n, nk) = (shape.head_dim, shape.seq_len, shape.kv_len);
    let group = shape.q_heads / shape.kv_heads;
    let mut out = vec![0.0; shape.q_heads * n * d];
    for h in 0..shape.q_heads {
        let kvh = h / group;
        for r in 0..n {
            let keys: Vec<usize> = (0..nk).filter(|&j| visible(h, r, j)).collect();
            if keys.is_empty() {
                continue;
            }
            let qrow = &q[(h * n + r) * d..(h * n + r + 1) * d];
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let krow = &k[(kvh * nk + j) * d..(kvh * nk + j + 1) * d];
                    qrow.iter()
                        .zip(krow)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for c in 0..d {
                let mut a = 0.0;
                for (&j, wj) in keys.iter().zip(&w) {
                    a += wj * v[(kvh * nk + j) * d + c] as f64;
                }
                out[(h * n + r) * d + c] = (a / sum) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Both paths (portable and, where the CPU has it, AVX2+FMA) against the f64
    /// reference, on ragged shapes: row blocks and key tiles with tails, GQA, causal
    /// offsets, a head_dim that is not a multiple of the register tile width.
    #[test]
    fn both_paths_match_naive() {
        let shapes = [
            (AttentionShape::new(2, 1, 37, 64), true),
            (AttentionShape::new(3, 3, 70, 128), false),
            (AttentionShape::new(4, 2, 101, 64).with_kv_len(133), true),
            (AttentionShape::new(2, 2, 20, 40).with_kv_len(90), false),
            (AttentionShape::new(1, 1, 1, 8), true),
        ];
        for (i, (shape, causal)) in shapes.into_iter().enumerate() {
            let q = fill(shape.q_heads * shape.seq_len * shape.head_dim, 3 * i as u64);
            let k = fill(
                shape.kv_heads * shape.kv_len * shape.head_dim,
                3 * i as u64 + 1,
            );
            let v = fill(
                shape.kv_heads * shape.kv_len * shape.head_dim,
                3 * i as u64 + 2,
            );
            let scale = 1.0 / (shape.head_dim as f32).sqrt();
            let want = naive_attention(&shape, causal, scale, &q, &k, &v);
            for simd in [false, true] {
                let dense = CpuAttention::dense(causal, scale);
                let got = attention_with(&shape, &dense, &q, &k, &v, None, simd);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{shape:?} causal={causal} simd={simd}: {err}");
            }
        }
    }

    /// Exporting the state after a first half of the keys and importing it for the
    /// second half gives the one-pass result, on the portable path too.
    #[test]
    fn state_round_trip_both_paths() {
        let full = AttentionShape::new(2, 1, 50, 64);
        let (d, nk) = (full.head_dim, full.kv_len);
        let q = fill(full.q_heads * full.seq_len * d, 11);
        let k = fill(full.kv_heads * nk * d, 12);
        let v = fill(full.kv_heads * nk * d, 13);
        let want = naive_attention(&full, false, 0.125, &q, &k, &v);
        for simd in [false, true] {
            let mut st = HostRowState::empty(&full);
            let (k0, k1) = (&k[..25 * d], &k[25 * d..]);
            let (v0, v1) = (&v[..25 * d], &v[25 * d..]);
            let part = AttentionShape { kv_len: 25, ..full };
            let dense = CpuAttention::dense(false, 0.125);
            attention_with(&part, &dense, &q, k0, v0, Some(&mut st), simd);
            let got = attention_with(&part, &dense, &q, k1, v1, Some(&mut st), simd);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 1e-5, "simd={simd}: {err}");
        }
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The sparse twins (block lists, gathered key lists) and the sliding window
    /// against the naive reference over the same key sets, ragged lengths, GQA, both
    /// SIMD paths, with a state round trip.
    #[test]
    fn sparse_lists_and_window_match_naive() {
        use crate::attention::lut::{LutUnit, SparseLut};
        let shape = AttentionShape::new(4, 2, 157, 64);
        let (d, n) = (shape.head_dim, shape.seq_len);
        let q = fill(shape.q_heads * n * d, 21);
        let k = fill(shape.kv_heads * n * d, 22);
        let v = fill(shape.kv_heads * n * d, 23);
        let scale = 0.3;
        let mut x = 7u64;
        let mut coin = move |p: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % 100 < p
        };
        let blocks = SparseLut::from_fn(4, n, 64, LutUnit::Blocks(32), |_, b| {
            (0..n.div_ceil(32) as u32)
                .filter(|&i| i as usize <= 2 * b + 1 && coin(60))
                .collect()
        })
        .unwrap();
        let stripes = SparseLut::from_fn(4, n, 32, LutUnit::Keys, |_, _| {
            (0..n as u32).filter(|_| coin(30)).collect()
        })
        .unwrap();
        for lut in [&blocks, &stripes] {
            let want = naive_masked_attention(&shape, scale, &q, &k, &v, |h, r, j| {
                j <= r && lut.keys_of(h, r / lut.q_block).contains(&(j as u32))
            });
            let opts = CpuAttention::sparse(scale, lut);
            for simd in [false, true] {
                let got = attention_with(&shape, &opts, &q, &k, &v, None, simd);
                assert!(max_err(&got, &want) < 1e-5, "{:?} simd={simd}", lut.unit);
            }
        }
        // Window 40 with 5 sinks, dense and through a block list.
        let want = naive_masked_attention(&shape, scale, &q, &k, &v, |_, r, j| {
            j <= r && (j + 40 > r || j < 5)
        });
        let all = SparseLut::from_fn(4, n, 64, LutUnit::Blocks(32), |_, _| {
            (0..n.div_ceil(32) as u32).collect()
        })
        .unwrap();
        for lut in [None, Some(&all)] {
            let opts = CpuAttention {
                causal: true,
                scale,
                window: 40,
                sinks: 5,
                lut,
            };
            for simd in [false, true] {
                let got = attention_with(&shape, &opts, &q, &k, &v, None, simd);
                assert!(max_err(&got, &want) < 1e-5, "window simd={simd}");
            }
        }
        // Dense keys 0..64 exported, then a stripe list of the rest imported.
        let want = naive_attention(&shape, true, scale, &q, &k, &v);
        let head = SparseLut::from_fn(4, n, 64, LutUnit::Keys, |_, _| (0..64).collect()).unwrap();
        let tail =
            SparseLut::from_fn(4, n, 64, LutUnit::Keys, |_, _| (64..n as u32).collect()).unwrap();
        let mut st = HostRowState::empty(&shape);
        let mk = |lut| CpuAttention::sparse(scale, lut);
        attention_with(&shape, &mk(&head), &q, &k, &v, Some(&mut st), true);
        let got = attention_with(&shape, &mk(&tail), &q, &k, &v, Some(&mut st), true);
        assert!(max_err(&got, &want) < 1e-5);
    }
}
