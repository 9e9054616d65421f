//! Weight matrices kept in their GGUF blocks on the CPU, multiplied without
//! dequantizing them to memory: the activations are quantized to 16 bits per block of
//! 32 (one f32 scale and the block's code sum each), each weight row is
//! decoded into 8-bit codes with a scale per 16 values and an offset per 32 (in
//! registers' worth of stack buffer, once per call and row), and the products are integer
//! dot products (8 × 16-bit products, the `pmaddwd` of x86; 16-bit activations cost the
//! same instructions as 8-bit ones here and keep the greedy text of the f32 path, where
//! ggml's 8-bit activations flip near-ties of small models). A 1.5B-parameter Q4_0 model
//! then holds ≈ 0.9 GB instead of 6 GB of f32.
//!
//! Every integer format of [`GgmlType`] that the crate dequantizes runs this way (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K); F32, F16 and BF16 rows are converted to f32 per
//! row and multiplied in f32. The result differs from an f32 product of the dequantized
//! weights only by the activations' 16-bit rounding (half a step of amax / 32767 per
//! value; tested against an f64 reference within that bound).

use rayon::prelude::*;

use super::ggml::{GgmlType, dequantize, dequantize_into, h, q5_values, scale_min_k4};
use super::rows8;
use crate::error::{Error, Result};

/// Values per activation block (and per weight offset).
const QK: usize = 32;

/// A file mapped read-only: the weights of memory-mapped matrices ([`QMat::mapped`]).
pub struct FileMap {
    #[cfg(unix)]
    map: memmap2::Mmap,
}

impl std::fmt::Debug for FileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileMap({} bytes)", self.bytes().len())
    }
}

impl FileMap {
    /// Maps `file` read-only.
    #[cfg(unix)]
    pub fn new(file: &std::fs::File) -> Result<Self> {
        // SAFETY: a read-only mapping of a file the crate never writes; like every mmap
        // reader (llama.cpp included), it assumes nobody truncates the file meanwhile.
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(FileMap { map })
    }

    /// The mapped bytes of `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.bytes()[range]
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        #[cfg(unix)]
        return &self.map;
        #[cfg(not(unix))]
        &[]
    }

    /// Asks the kernel to read `range` ahead (`need`) or to drop its pages from this
    /// process (they are read again from the file cache when touched). Whole pages
    /// inside the range only (and the file's last page when the range ends the file);
    /// errors are ignored (advice).
    pub fn advise(&self, range: std::ops::Range<usize>, need: bool) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            // The file's last page is the mapping's, past its end too.
            let hi = if range.end >= self.len() {
                range.end.next_multiple_of(PAGE)
            } else {
                range.end / PAGE * PAGE
            };
            let lo = range.start.next_multiple_of(PAGE);
            if hi <= lo {
                return;
            }
            let _ = if need {
                self.map
                    .advise_range(memmap2::Advice::WillNeed, lo, hi - lo)
            } else {
                // SAFETY: MADV_DONTNEED on a read-only file mapping only drops pages,
                // which the next access reads again from the file.
                unsafe {
                    self.map
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
                }
            };
        }
        #[cfg(not(unix))]
        let _ = (range, need);
    }
}

/// Where a matrix's bytes live.
#[derive(Clone, Debug)]
enum Store {
    Owned(Vec<u8>),
    Mapped(std::sync::Arc<FileMap>, std::ops::Range<usize>),
}

impl std::ops::Deref for Store {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Store::Owned(v) => v,
            Store::Mapped(m, r) => &m.bytes()[r.clone()],
        }
    }
}

/// A `[rows, cols]` weight matrix (a linear layer's `[out, in]`) in one GGUF format.
#[derive(Clone, Debug)]
pub struct QMat {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Leading rows held in groups of eight ([`rows8`]; 0 for formats kept as is).
    packed_rows: usize,
    bytes: Store,
}

/// The activations of [`QMat::apply`], quantized to 16 bits per block of 32 values.
struct Q16Rows {
    q: Vec<i16>,
    d: Vec<f32>,
    sum: Vec<i32>,
}

/// Values of elementwise work done on one thread before a parallel step pays
/// (quantizing activations, activation functions, RoPE).
pub const SERIAL_VALUES: usize = 1 << 13;

/// The largest 16-bit code.
const Q16_MAX: f32 = 32767.0;

impl Q16Rows {
    fn new(x: &[f32]) -> Self {
        let mut r = Q16Rows {
            q: Vec::new(),
            d: Vec::new(),
            sum: Vec::new(),
        };
        r.fill(x);
        r
    }

    /// `x` quantized into these buffers (grown only when too small).
    fn fill(&mut self, x: &[f32]) {
        let blocks = x.len() / QK;
        let Q16Rows { q, d, sum } = self;
        q.resize(x.len(), 0);
        d.resize(blocks, 0.0);
        sum.resize(blocks, 0);
        let quantize = |qb: &mut [i16], db: &mut f32, sb: &mut i32, xb: &[f32]| {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 { Q16_MAX / amax } else { 0.0 };
            let mut s = 0i32;
            for (o, &v) in qb.iter_mut().zip(xb) {
                // Round half to even by the float adder (|v · inv| ≤ 32767 < 2^22).
                let c = ((v * inv + 12_582_912.0) - 12_582_912.0) as i32;
                *o = c as i16;
                s += c;
            }
            *db = amax / Q16_MAX;
            *sb = s;
        };
        // A decode step's activations stay on this thread (a parallel step would wake a
        // worker for less work than the wake-up costs).
        q.par_chunks_mut(QK)
            .zip(d.par_iter_mut().zip(sum.par_iter_mut()))
            .zip(x.par_chunks(QK))
            .with_min_len(SERIAL_VALUES / QK)
            .for_each(|((qb, (db, sb)), xb)| quantize(qb, db, sb, xb));
    }
}

/// Buffers [`QMat::apply_into`] reuses from one product to the next (a decode step's
/// products then allocate nothing).
#[derive(Default)]
pub struct ApplyScratch {
    xq: Option<Q16Rows>,
    out_t: Vec<f32>,
}

thread_local! {
    /// A row dequantized to f32 (float formats' decode products), per thread.
    static ROW_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A packed row rebuilt in GGUF bytes ([`QMat::row_f32`]), per thread.
    static ROW_BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A row decoded to codes (formats without a fused kernel), per thread.
    static ROW_CODES: std::cell::RefCell<Option<RowCodes>> = const { std::cell::RefCell::new(None) };
}

/// One weight row decoded for the integer dot: 8-bit codes, a scale per 16 values and
/// an offset per 32 (`w = scale · code + offset`).
struct RowCodes {
    q: Vec<i8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl RowCodes {
    fn new(cols: usize) -> Self {
        RowCodes {
            q: vec![0; cols],
            scale: vec![0.0; cols / 16],
            offset: vec![0.0; cols / QK],
        }
    }
}

pub use crate::quant::ggml::scale_fields;

/// Decodes one row of an integer format into `out`.
#[inline(always)]
fn decode_row(ty: GgmlType, row: &[u8], out: &mut RowCodes) {
    let (bw, bb) = ty.block();
    for (bi, b) in row.chunks_exact(bb).enumerate() {
        let q = &mut out.q[bi * bw..(bi + 1) * bw];
        let s16 = &mut out.scale[bi * bw / 16..(bi + 1) * bw / 16];
        let o32 = &mut out.offset[bi * bw / QK..(bi + 1) * bw / QK];
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let (d, m, qs) = match ty {
                    GgmlType::Q4_0 => (h(b, 0), None, &b[2..18]),
                    _ => (h(b, 0), Some(h(b, 2)), &b[4..20]),
                };
                let bias = if m.is_none() { 8 } else { 0 };
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0f) as i8 - bias;
                    q[j + 16] = (qs[j] >> 4) as i8 - bias;
                }
                s16.fill(d);
                o32[0] = m.unwrap_or(0.0);
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (d, m, qh, qs) = match ty {
                    GgmlType::Q5_0 => (h(b, 0), None, [b[2], b[3], b[4], b[5]], &b[6..22]),
                    _ => (h(b, 0), Some(h(b, 2)), [b[4], b[5], b[6], b[7]], &b[8..24]),
                };
                let bias = if m.is_none() { 16 } else { 0 };
                for (o, v) in q.iter_mut().zip(q5_values(u32::from_le_bytes(qh), qs)) {
                    *o = (v - bias) as i8;
                }
                s16.fill(d);
                o32[0] = m.unwrap_or(0.0);
            }
            GgmlType::Q8_0 => {
                for (o, &c) in q.iter_mut().zip(&b[2..34]) {
                    *o = c as i8;
                }
                s16.fill(h(b, 0));
                o32[0] = 0.0;
            }
            GgmlType::Q4K => {
                let (d, dmin) = (h(b, 0), h(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for c in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * c, scales);
                    let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                    let src = &qs[32 * c..32 * c + 32];
                    for l in 0..32 {
                        q[64 * c + l] = (src[l] & 0x0f) as i8;
                        q[64 * c + 32 + l] = (src[l] >> 4) as i8;
                    }
                    s16[4 * c..4 * c + 2].fill(d * sc1 as f32);
                    s16[4 * c + 2..4 * c + 4].fill(d * sc2 as f32);
                    o32[2 * c] = -dmin * m1 as f32;
                    o32[2 * c + 1] = -dmin * m2 as f32;
                }
            }
            GgmlType::Q6K => {
                let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(b, 208);
                for n in 0..2 {
                    let (ql, qh) = (&ql_all[64 * n..64 * n + 64], &qh_all[32 * n..32 * n + 32]);
                    let sc = &sc_all[8 * n..8 * n + 8];
                    let qn = &mut q[128 * n..128 * n + 128];
                    for l in 0..32 {
                        qn[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                        qn[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        qn[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        qn[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    }
                    // 16-value group i of this half has scale sc[i].
                    for (s, &c) in s16[8 * n..8 * n + 8].iter_mut().zip(sc) {
                        *s = d * (c as i8) as f32;
                    }
                }
                o32.fill(0.0);
            }
            _ => unreachable!("integer formats only"),
        }
    }
}

/// `Σ a·b` over 16 codes (|a| ≤ 128, |b| ≤ 32767: no overflow).
#[inline(always)]
fn dot16(a: &[i8; 16], b: &[i16; 16]) -> i32 {
    let mut s = 0i32;
    for k in 0..16 {
        s += a[k] as i32 * b[k] as i32;
    }
    s
}

/// `Σ a·b` in 8 lanes (vectorizes).
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One decoded row against one quantized activation row.
#[inline(always)]
fn row_dot(w: &RowCodes, xq: &[i16], xd: &[f32], xs: &[i32]) -> f32 {
    let mut acc = 0f32;
    for b in 0..xd.len() {
        let wq = &w.q[b * QK..(b + 1) * QK];
        let aq = &xq[b * QK..(b + 1) * QK];
        let lo = dot16(wq[..16].try_into().unwrap(), aq[..16].try_into().unwrap());
        let hi = dot16(wq[16..].try_into().unwrap(), aq[16..].try_into().unwrap());
        let ints = w.scale[2 * b] * lo as f32 + w.scale[2 * b + 1] * hi as f32;
        acc += xd[b] * (ints + w.offset[b] * xs[b] as f32);
    }
    acc
}

/// Decoding fused into the dot product on AVX2 (+ FMA, F16C): the 4- and 8-bit codes of
/// a block go from the row's bytes into 16-bit lanes and `vpmaddwd` against the 16-bit
/// activations, with no decoded row in between. Q4_0, Q4_1, Q8_0, Q4_K and Q6_K; the
/// other formats decode a row first ([`decode_row`]).
#[cfg(target_arch = "x86_64")]
mod fused_avx2 {
    use super::{GgmlType, QK};
    use crate::quant::ggml::scale_min_k4;
    use std::arch::x86_64::*;

    /// Whether this CPU runs the kernels.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Whether `ty` has a fused kernel.
    pub fn handles(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// 16 unsigned bytes times 16 activations: 8 lanes of pair sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn madd_u8(v: __m128i, x: *const i16) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_cvtepu8_epi16(v), _mm256_loadu_si256(x.cast())) }
    }

    /// 16 signed bytes times 16 activations.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn madd_i8(v: __m128i, x: *const i16) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_cvtepi8_epi16(v), _mm256_loadu_si256(x.cast())) }
    }

    /// Horizontal sum of 8 floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// A Q4_0 or Q4_1 block as `scale · nibble + offset`: the scale, the offset (Q4_1's
    /// min; Q4_0's −8 · scale, its codes being nibble − 8) and the low and high nibbles
    /// (values 0..16 and 16..32) as bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_block(ty: GgmlType, blk: &[u8]) -> (f32, f32, __m128i, __m128i) {
        let mask = _mm_set1_epi8(0x0f);
        let d = unsafe { f16_at(blk, 0) };
        let (offset, qs) = if ty == GgmlType::Q4_0 {
            (-8.0 * d, &blk[2..18])
        } else {
            (unsafe { f16_at(blk, 2) }, &blk[4..20])
        };
        let v = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
        let (lo, hi) = (
            _mm_and_si128(v, mask),
            _mm_and_si128(_mm_srli_epi16(v, 4), mask),
        );
        (d, offset, lo, hi)
    }

    /// The 4 runs of 32 codes of half `n` of a Q6_K block, each minus 32 as signed bytes
    /// (positions 32·k.. of the half; two 16-value scale groups a run).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_runs(blk: &[u8], n: usize) -> [__m256i; 4] {
        let (m4, m2, c32) = (
            _mm256_set1_epi8(0x0f),
            _mm256_set1_epi8(3),
            _mm256_set1_epi8(32),
        );
        let (ql0, ql1, qh) = unsafe {
            (
                _mm256_loadu_si256(blk[64 * n..].as_ptr().cast()),
                _mm256_loadu_si256(blk[64 * n + 32..].as_ptr().cast()),
                _mm256_loadu_si256(blk[128 + 32 * n..].as_ptr().cast()),
            )
        };
        let hb = |h: __m256i| _mm256_slli_epi16(_mm256_and_si256(h, m2), 4);
        let lo4 = |v: __m256i| _mm256_and_si256(v, m4);
        let hi4 = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        [
            _mm256_or_si256(lo4(ql0), hb(qh)),
            _mm256_or_si256(lo4(ql1), hb(_mm256_srli_epi16(qh, 2))),
            _mm256_or_si256(hi4(ql0), hb(_mm256_srli_epi16(qh, 4))),
            _mm256_or_si256(hi4(ql1), hb(_mm256_srli_epi16(qh, 6))),
        ]
        .map(|v| _mm256_sub_epi8(v, c32))
    }

    /// Stores `scale · codes + offset` for 16 codes (8-bit, sign- or zero-extended).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store16(v: __m128i, signed: bool, scale: f32, offset: f32, out: *mut f32) {
        let (s, o) = (_mm256_set1_ps(scale), _mm256_set1_ps(offset));
        let (a, b) = if signed {
            (
                _mm256_cvtepi8_epi32(v),
                _mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)),
            )
        } else {
            (
                _mm256_cvtepu8_epi32(v),
                _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)),
            )
        };
        unsafe {
            _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, o));
            _mm256_storeu_ps(out.add(8), _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), s, o));
        }
    }

    /// One row of `ty` dequantized into `out` (the SGEMM path's tiles): the values of
    /// [`super::decode_row`], `scale · code + offset`, in the same operation order.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C ([`available`]); `ty` one of [`handles`];
    /// `out` holds the row's values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_f32(ty: GgmlType, row: &[u8], out: &mut [f32]) {
        let mask = _mm_set1_epi8(0x0f);
        let o = out.as_mut_ptr();
        unsafe {
            match ty {
                GgmlType::Q4_0 | GgmlType::Q4_1 => {
                    let bb = if ty == GgmlType::Q4_0 { 18 } else { 20 };
                    for (b, blk) in row.chunks_exact(bb).enumerate() {
                        let (d, offset, lo, hi) = q4_block(ty, blk);
                        store16(lo, false, d, offset, o.add(b * QK));
                        store16(hi, false, d, offset, o.add(b * QK + 16));
                    }
                }
                GgmlType::Q8_0 => {
                    for (b, blk) in row.chunks_exact(34).enumerate() {
                        let d = f16_at(blk, 0);
                        let v0 = _mm_loadu_si128(blk[2..18].as_ptr().cast());
                        let v1 = _mm_loadu_si128(blk[18..34].as_ptr().cast());
                        store16(v0, true, d, 0.0, o.add(b * QK));
                        store16(v1, true, d, 0.0, o.add(b * QK + 16));
                    }
                }
                GgmlType::Q4K => {
                    for (sb, blk) in row.chunks_exact(144).enumerate() {
                        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                        let (scales, qs) = (&blk[4..16], &blk[16..144]);
                        for c in 0..4 {
                            let q0 = _mm_loadu_si128(qs[32 * c..].as_ptr().cast());
                            let q1 = _mm_loadu_si128(qs[32 * c + 16..].as_ptr().cast());
                            let (sc1, m1) = scale_min_k4(2 * c, scales);
                            let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                            let at = o.add(sb * 256 + 64 * c);
                            let (s1, o1) = (d * sc1 as f32, -dmin * m1 as f32);
                            let (s2, o2) = (d * sc2 as f32, -dmin * m2 as f32);
                            store16(_mm_and_si128(q0, mask), false, s1, o1, at);
                            store16(_mm_and_si128(q1, mask), false, s1, o1, at.add(16));
                            let h0 = _mm_and_si128(_mm_srli_epi16(q0, 4), mask);
                            let h1 = _mm_and_si128(_mm_srli_epi16(q1, 4), mask);
                            store16(h0, false, s2, o2, at.add(32));
                            store16(h1, false, s2, o2, at.add(48));
                        }
                    }
                }
                GgmlType::Q6K => {
                    for (sb, blk) in row.chunks_exact(210).enumerate() {
                        let d = f16_at(blk, 208);
                        for n in 0..2 {
                            let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
                            for (k, v) in q6k_runs(blk, n).into_iter().enumerate() {
                                let at = o.add(sb * 256 + 128 * n + 32 * k);
                                let s0 = d * (sc[2 * k] as i8) as f32;
                                let s1 = d * (sc[2 * k + 1] as i8) as f32;
                                store16(_mm256_castsi256_si128(v), true, s0, 0.0, at);
                                store16(_mm256_extracti128_si256(v, 1), true, s1, 0.0, at.add(16));
                            }
                        }
                    }
                }
                _ => unreachable!("only the formats of `handles`"),
            }
        }
    }

    /// Q4_0 (`KIND` 0, `BB` 18 bytes a block), Q4_1 (1, 20) or Q8_0 (2, 34) row against
    /// 16-bit activations: the integer sums scaled per block into a vector accumulator,
    /// and the offsets' sum. Eight blocks at a time: their f16 scales converted in one
    /// instruction (a scalar conversion per block chained every block to the last one
    /// through its merge register), their products into two accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn small_blocks<const BB: usize, const KIND: u8>(
        row: &[u8],
        x: *const i16,
        xd: &[f32],
        xs: &[i32],
    ) -> (__m256, f32) {
        let mask = _mm_set1_epi8(0x0f);
        let nb = row.len() / BB;
        assert!(xd.len() >= nb && xs.len() >= nb);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offv = _mm256_setzero_ps();
        let p = row.as_ptr();
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(8);
            let (mut dbits, mut mbits) = ([0u16; 8], [0u16; 8]);
            let (mut xd8, mut xs8) = ([0f32; 8], [0i32; 8]);
            unsafe {
                for j in 0..n {
                    let blk = p.add((b0 + j) * BB);
                    dbits[j] = blk.cast::<u16>().read_unaligned();
                    if KIND == 1 {
                        mbits[j] = blk.add(2).cast::<u16>().read_unaligned();
                    }
                }
                xd8[..n].copy_from_slice(&xd[b0..b0 + n]);
                xs8[..n].copy_from_slice(&xs[b0..b0 + n]);
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(dbits.as_ptr().cast()));
                let xdv = _mm256_loadu_ps(xd8.as_ptr());
                let sv = _mm256_mul_ps(dv, xdv);
                // Offsets: Q4_0's codes are nibble − 8, Q4_1 adds its min.
                let mv = match KIND {
                    0 => _mm256_mul_ps(dv, _mm256_set1_ps(-8.0)),
                    1 => _mm256_cvtph_ps(_mm_loadu_si128(mbits.as_ptr().cast())),
                    _ => _mm256_setzero_ps(),
                };
                if KIND != 2 {
                    offv = _mm256_fmadd_ps(
                        _mm256_mul_ps(mv, xdv),
                        _mm256_cvtepi32_ps(_mm256_loadu_si256(xs8.as_ptr().cast())),
                        offv,
                    );
                }
                let mut s8 = [0f32; 8];
                _mm256_storeu_ps(s8.as_mut_ptr(), sv);
                let dot = |j: usize| -> __m256 {
                    let blk = p.add((b0 + j) * BB);
                    let xb = x.add((b0 + j) * QK);
                    let q = if KIND == 2 {
                        let v0 = _mm_loadu_si128(blk.add(2).cast());
                        let v1 = _mm_loadu_si128(blk.add(18).cast());
                        _mm256_add_epi32(madd_i8(v0, xb), madd_i8(v1, xb.add(16)))
                    } else {
                        let v = _mm_loadu_si128(blk.add(BB - 16).cast());
                        let lo = _mm_and_si128(v, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                        _mm256_add_epi32(madd_u8(lo, xb), madd_u8(hi, xb.add(16)))
                    };
                    _mm256_cvtepi32_ps(q)
                };
                if n == 8 {
                    for j in (0..8).step_by(2) {
                        acc0 = _mm256_fmadd_ps(dot(j), _mm256_set1_ps(s8[j]), acc0);
                        acc1 = _mm256_fmadd_ps(dot(j + 1), _mm256_set1_ps(s8[j + 1]), acc1);
                    }
                } else {
                    for (j, &s) in s8.iter().enumerate().take(n) {
                        acc0 = _mm256_fmadd_ps(dot(j), _mm256_set1_ps(s), acc0);
                    }
                }
            }
            b0 += n;
        }
        (_mm256_add_ps(acc0, acc1), unsafe { hsum(offv) })
    }

    /// One row of `ty` against one activation row (16-bit codes `xq`, block scales
    /// `xd`, block code sums `xs`): `Σ_b xd_b · (scale_b · Σ q·x + offset_b · xs_b)`,
    /// the same sums as [`super::row_dot`] over the decoded row.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C ([`available`]); `ty` one of [`handles`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(ty: GgmlType, row: &[u8], xq: &[i16], xd: &[f32], xs: &[i32]) -> f32 {
        let mask = _mm_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_ps();
        let mut off = 0f32;
        let x = xq.as_ptr();
        unsafe {
            match ty {
                GgmlType::Q4_0 => {
                    let (a, o) = small_blocks::<18, 0>(row, x, xd, xs);
                    acc = a;
                    off = o;
                }
                GgmlType::Q4_1 => {
                    let (a, o) = small_blocks::<20, 1>(row, x, xd, xs);
                    acc = a;
                    off = o;
                }
                GgmlType::Q8_0 => {
                    let (a, o) = small_blocks::<34, 2>(row, x, xd, xs);
                    acc = a;
                    off = o;
                }
                GgmlType::Q4K => {
                    let mut offv = _mm256_setzero_ps();
                    for (sb, blk) in row.chunks_exact(144).enumerate() {
                        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                        let (scales, qs) = (&blk[4..16], &blk[16..144]);
                        // The 8 sub-blocks' factors at once: d·sc·xd and dmin·m·xd·xs.
                        let (mut sc8, mut m8) = ([0f32; 8], [0f32; 8]);
                        for j in 0..8 {
                            let (sc, m) = scale_min_k4(j, scales);
                            (sc8[j], m8[j]) = (sc as f32, m as f32);
                        }
                        let xdv = _mm256_loadu_ps(xd[sb * 8..].as_ptr());
                        let xsv =
                            _mm256_cvtepi32_ps(_mm256_loadu_si256(xs[sb * 8..].as_ptr().cast()));
                        let mut s8 = [0f32; 8];
                        _mm256_storeu_ps(
                            s8.as_mut_ptr(),
                            _mm256_mul_ps(
                                _mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(sc8.as_ptr())),
                                xdv,
                            ),
                        );
                        let mv = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_loadu_ps(m8.as_ptr()));
                        offv = _mm256_sub_ps(offv, _mm256_mul_ps(_mm256_mul_ps(mv, xdv), xsv));
                        for c in 0..4 {
                            // 32 bytes: low nibbles are sub-block 2c, high ones 2c + 1.
                            let q0 = _mm_loadu_si128(qs[32 * c..].as_ptr().cast());
                            let q1 = _mm_loadu_si128(qs[32 * c + 16..].as_ptr().cast());
                            let xb = x.add((sb * 8 + 2 * c) * QK);
                            let lo = _mm256_add_epi32(
                                madd_u8(_mm_and_si128(q0, mask), xb),
                                madd_u8(_mm_and_si128(q1, mask), xb.add(16)),
                            );
                            let hi = _mm256_add_epi32(
                                madd_u8(_mm_and_si128(_mm_srli_epi16(q0, 4), mask), xb.add(32)),
                                madd_u8(_mm_and_si128(_mm_srli_epi16(q1, 4), mask), xb.add(48)),
                            );
                            acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(lo),
                                _mm256_set1_ps(s8[2 * c]),
                                acc,
                            );
                            acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(hi),
                                _mm256_set1_ps(s8[2 * c + 1]),
                                acc,
                            );
                        }
                    }
                    off += hsum(offv);
                }
                GgmlType::Q6K => {
                    for (sb, blk) in row.chunks_exact(210).enumerate() {
                        let d = f16_at(blk, 208);
                        for n in 0..2 {
                            let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
                            let runs = q6k_runs(blk, n);
                            // The 8 groups' factors d·sc·xd at once (two groups a block).
                            let b0 = sb * 8 + 4 * n;
                            let scv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                sc.as_ptr().cast(),
                            )));
                            let xd8 = _mm256_permutevar8x32_ps(
                                _mm256_castps128_ps256(_mm_loadu_ps(xd[b0..].as_ptr())),
                                _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                            );
                            let mut s8 = [0f32; 8];
                            _mm256_storeu_ps(
                                s8.as_mut_ptr(),
                                _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), scv), xd8),
                            );
                            for (k, v) in runs.into_iter().enumerate() {
                                let b = b0 + k;
                                let xb = x.add(b * QK);
                                let p0 = madd_i8(_mm256_castsi256_si128(v), xb);
                                let p1 = madd_i8(_mm256_extracti128_si256(v, 1), xb.add(16));
                                let (s0, s1) = (s8[2 * k], s8[2 * k + 1]);
                                acc = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(p0),
                                    _mm256_set1_ps(s0),
                                    acc,
                                );
                                acc = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(p1),
                                    _mm256_set1_ps(s1),
                                    acc,
                                );
                            }
                        }
                    }
                }
                _ => unreachable!("only the formats of `handles`"),
            }
            hsum(acc) + off
        }
    }
}

/// Weights per parallel task of a product at least (small matrices then run on fewer
/// threads instead of paying a fork-join per 16 rows).
const TASK_WEIGHTS: usize = 1 << 16;

/// The output of the SGEMM path, shared by tasks that write disjoint columns.
struct SendPtr(*mut f32);
// SAFETY: the tasks holding it write disjoint elements only.
unsafe impl Sync for SendPtr {}
/// From this many tokens on, a product dequantizes tiles of rows to f32 and multiplies
/// them by SGEMM (prefill: the decoding is then a small part of the work).
pub const GEMM_TOKENS: usize = 8;
/// The fewest rows of a dequantized tile of the SGEMM path.
const GEMM_ROWS: usize = 64;
/// Weight bytes per task of the VNNI prompt product.
#[cfg(target_arch = "x86_64")]
const VNNI_TASK_BYTES: usize = 256 << 10;
/// The most bytes of a dequantized f32 tile of the SGEMM path.
const GEMM_TILE_BYTES: usize = 8 << 20;

impl QMat {
    /// A `[rows, cols]` matrix of `ty` from its GGUF bytes (row after row). Typed errors
    /// for a row that is not a whole number of blocks, a byte count that does not match,
    /// or a type the crate cannot decode.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        Self::build(ty, rows, cols, std::borrow::Cow::Owned(bytes))
    }

    /// [`QMat::new`] from borrowed GGUF bytes (a mapped file's): the held copy is
    /// written once, at its final size, with no intermediate buffer.
    pub fn from_slice(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        Self::build(ty, rows, cols, std::borrow::Cow::Borrowed(bytes))
    }

    /// [`QMat::from_slice`] of `range` of a mapped file, a few MiB of rows at a time,
    /// each run's pages dropped again once it is held: the process never holds much
    /// more than the matrix itself (a whole-slice copy would hold the tensor twice
    /// for a moment: a 178 MiB embedding, 356 MiB).
    pub fn from_mapped(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        map: &FileMap,
        range: std::ops::Range<usize>,
    ) -> Result<Self> {
        const RUN_BYTES: usize = 8 << 20;
        let row_bytes = ty.bytes_for(cols as u64)? as usize;
        if range.len() != rows * row_bytes || range.end > map.len() {
            return Err(Error::Gguf(format!(
                "a [{rows}, {cols}] {ty:?} matrix needs {} bytes, got {}",
                rows * row_bytes,
                range.len()
            )));
        }
        let run = (RUN_BYTES / row_bytes.max(1))
            .max(1)
            .next_multiple_of(rows8::GROUP);
        if rows <= run {
            let m = QMat::from_slice(ty, rows, cols, map.slice(range.clone()));
            map.advise(range, false);
            return m;
        }
        // Runs of whole groups of eight rows: their packed bytes laid end to end are the
        // whole matrix's (groups in order, the last run's tail rows last).
        let packed_rows = if rows8::repacked(ty) {
            rows - rows % rows8::GROUP
        } else {
            0
        };
        let total = packed_rows / rows8::GROUP * rows8::group_bytes(ty, row_bytes)
            + (rows - packed_rows) * row_bytes;
        let mut bytes = Vec::with_capacity(total);
        for r0 in (0..rows).step_by(run) {
            let n = run.min(rows - r0);
            let src = range.start + r0 * row_bytes..range.start + (r0 + n) * row_bytes;
            let part = QMat::from_slice(ty, n, cols, map.slice(src.clone()))?;
            map.advise(src, false);
            bytes.extend_from_slice(&part.bytes);
        }
        debug_assert_eq!(bytes.len(), total);
        Ok(QMat {
            ty,
            rows,
            cols,
            row_bytes,
            packed_rows,
            bytes: Store::Owned(bytes),
        })
    }

    fn build(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: std::borrow::Cow<'_, [u8]>,
    ) -> Result<Self> {
        if !ty.can_dequantize() {
            return Err(Error::Gguf(format!("{ty:?} matrices are not supported")));
        }
        // Whole blocks per row (32 or 256 values for the integer formats).
        let row_bytes = ty.bytes_for(cols as u64)? as usize;
        if bytes.len() != rows * row_bytes {
            return Err(Error::Gguf(format!(
                "a [{rows}, {cols}] {ty:?} matrix needs {} bytes, got {}",
                rows * row_bytes,
                bytes.len()
            )));
        }
        let packed_rows = if rows8::repacked(ty) {
            rows - rows % rows8::GROUP
        } else {
            0
        };
        let bytes = if packed_rows > 0 {
            let (groups, tail) = bytes.split_at(packed_rows * row_bytes);
            rows8::pack(ty, packed_rows, row_bytes, groups, tail)
        } else {
            bytes.into_owned()
        };
        Ok(QMat {
            ty,
            rows,
            cols,
            row_bytes,
            packed_rows,
            bytes: Store::Owned(bytes),
        })
    }

    /// A `[rows, cols]` matrix of `ty` whose GGUF bytes are `range` of a mapped file,
    /// read in place (as the file lays them out: no rows are regrouped), so only the
    /// pages a product touches become resident. Typed errors as [`QMat::new`].
    pub fn mapped(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        map: std::sync::Arc<FileMap>,
        range: std::ops::Range<usize>,
    ) -> Result<Self> {
        if !ty.can_dequantize() {
            return Err(Error::Gguf(format!("{ty:?} matrices are not supported")));
        }
        let row_bytes = ty.bytes_for(cols as u64)? as usize;
        if range.len() != rows * row_bytes || range.end > map.bytes().len() {
            return Err(Error::Gguf(format!(
                "a [{rows}, {cols}] {ty:?} matrix needs {} bytes, the mapped range {range:?} \
                 of a {}-byte file does not hold them",
                rows * row_bytes,
                map.bytes().len()
            )));
        }
        Ok(QMat {
            ty,
            rows,
            cols,
            row_bytes,
            packed_rows: 0,
            bytes: Store::Mapped(map, range),
        })
    }

    /// For a mapped matrix: reads its pages ahead (`need`) or drops them from this
    /// process ([`FileMap::advise`]); nothing for one held in memory.
    pub fn advise(&self, need: bool) {
        if let Store::Mapped(m, r) = &self.bytes {
            m.advise(r.clone(), need);
        }
    }

    /// For a mapped matrix: its file mapping and the byte range of its weights in it.
    pub fn mapping(&self) -> Option<(&std::sync::Arc<FileMap>, std::ops::Range<usize>)> {
        match &self.bytes {
            Store::Mapped(m, r) => Some((m, r.clone())),
            Store::Owned(_) => None,
        }
    }

    /// Whether the bytes are read from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Store::Mapped(..))
    }

    /// The format held (the file's).
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    fn is_float(&self) -> bool {
        matches!(self.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    /// Bytes of one group of eight packed rows.
    fn group_bytes(&self) -> usize {
        rows8::group_bytes(self.ty, self.row_bytes)
    }

    /// The packed group holding rows `8·g..8·g + 8`.
    fn group(&self, g: usize) -> &[u8] {
        let gb = self.group_bytes();
        &self.bytes[g * gb..(g + 1) * gb]
    }

    /// Row `r` (at or after the packed rows) in its GGUF bytes.
    fn plain_row(&self, r: usize) -> &[u8] {
        let (rb, at) = (
            self.row_bytes,
            self.packed_rows / rows8::GROUP * self.group_bytes(),
        );
        let i = r - self.packed_rows;
        &self.bytes[at + i * rb..at + (i + 1) * rb]
    }

    /// Row `r`'s GGUF bytes: in place, or (a row of a group of eight) rebuilt in
    /// `scratch`.
    fn gguf_row<'a>(&'a self, r: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        if r < self.packed_rows {
            scratch.resize(self.row_bytes, 0);
            let g = r / rows8::GROUP;
            rows8::group_row(self.ty, self.group(g), r % rows8::GROUP, scratch);
            scratch
        } else {
            self.plain_row(r)
        }
    }

    /// Row `r` dequantized into `out` (`cols` values): ggml's dequantizer, or the same
    /// values from the fused AVX2 kernels.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        // A packed row is rebuilt in GGUF bytes first: in this thread's buffer (an
        // embedding lookup per decode step then allocates nothing).
        ROW_BYTES.with_borrow_mut(|scratch| self.row_f32_with(r, out, scratch))
    }

    /// [`QMat::row_f32`] with a scratch buffer for rebuilt rows.
    fn row_f32_with(&self, r: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
        let row = self.gguf_row(r, scratch);
        #[cfg(target_arch = "x86_64")]
        if fused_avx2::handles(self.ty) && fused_avx2::available() {
            // SAFETY: the features were detected; `out` holds the row.
            return unsafe { fused_avx2::row_f32(self.ty, row, out) };
        }
        dequantize_into(self.ty, row, out);
    }

    /// Rows `r0..` dequantized into `out` (whole rows): groups of eight at once where
    /// the rows are packed and the AVX2 kernels run, row by row otherwise.
    fn rows_f32(&self, r0: usize, out: &mut [f32]) {
        let cols = self.cols;
        let mut scratch = Vec::new();
        #[cfg(target_arch = "x86_64")]
        let groups = fused_avx2::available();
        let mut i = 0;
        while i < out.len() / cols {
            let r = r0 + i;
            #[cfg(target_arch = "x86_64")]
            if groups
                && r.is_multiple_of(rows8::GROUP)
                && r < self.packed_rows
                && (i + 8) * cols <= out.len()
            {
                let group = self.group(r / rows8::GROUP);
                let o = &mut out[i * cols..(i + rows8::GROUP) * cols];
                // SAFETY: the features were detected; the group holds cols / 32 records.
                unsafe {
                    rows8::by_kind!(self.ty, |K, RB| rows8::avx2::group_f32::<K, RB>(
                        group, cols, o
                    ))
                }
                i += rows8::GROUP;
                continue;
            }
            self.row_f32_with(r, &mut out[i * cols..(i + 1) * cols], &mut scratch);
            i += 1;
        }
    }

    /// A typed [`Error::NonFinite`] when a weight (or a block scale) is NaN or
    /// infinite, naming `what` (checked row by row, nothing held).
    pub fn check_finite(&self, what: &str) -> Result<()> {
        // Integer formats: a value is finite iff its block's f16 scale (and min) is.
        let scales = scale_fields(self.ty);
        if !scales.is_empty() {
            let (bw, bb) = self.ty.block();
            let nb = self.row_bytes / bb;
            let bad_value = |b: &[u8], fields: &[usize]| {
                fields.iter().map(|&at| h(b, at)).find(|v| !v.is_finite())
            };
            let fail = |index: usize, value: f32| Error::NonFinite {
                what: format!("{what} (block scale)"),
                index,
                value,
                dtype: "f32",
            };
            // Groups of eight rows: a record starts with the eight scales (and mins).
            let split = self.packed_rows / rows8::GROUP * self.group_bytes();
            let record = rows8::record_bytes(self.ty);
            let fields: Vec<usize> = (0..scales.len() * rows8::GROUP).map(|i| 2 * i).collect();
            let bad = self.bytes[..split]
                .par_chunks(record)
                .position_first(|rec| bad_value(rec, &fields).is_some());
            if let Some(at) = bad {
                let rec = &self.bytes[at * record..(at + 1) * record];
                let i = fields
                    .iter()
                    .position(|&f| !h(rec, f).is_finite())
                    .unwrap_or(0);
                let (g, b, r) = (at / nb, at % nb, i % rows8::GROUP);
                let index = (g * rows8::GROUP + r) * self.cols + b * bw;
                return Err(fail(index, bad_value(rec, &fields).unwrap_or(f32::NAN)));
            }
            let bad = self.bytes[split..]
                .par_chunks(bb)
                .position_first(|b| bad_value(b, scales).is_some());
            if let Some(blk) = bad {
                let b = &self.bytes[split + blk * bb..split + (blk + 1) * bb];
                let index = self.packed_rows * self.cols + blk * bw;
                return Err(fail(index, bad_value(b, scales).unwrap_or(f32::NAN)));
            }
            return Ok(());
        }
        (0..self.rows).into_par_iter().try_for_each_init(
            || vec![0f32; self.cols],
            |row, r| {
                self.row_f32(r, row);
                crate::error::check_finite(what, row, false)
            },
        )
    }

    /// The whole matrix dequantized (tests, the GPU upload).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        if self.packed_rows == 0 {
            return dequantize(self.ty, &self.bytes, self.rows * self.cols);
        }
        // The SGEMM tiles' dequantizer, a group of eight rows a task.
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(rows8::GROUP * self.cols)
            .enumerate()
            .for_each(|(g, rows)| self.rows_f32(g * rows8::GROUP, rows));
        Ok(out)
    }

    /// `x [t, cols]` times this matrix transposed: `[t, rows]`. Under [`GEMM_TOKENS`]
    /// tokens (decoding) by integer dot products on 16-bit activations; from it on
    /// (prefill) the same integer products on AVX-512 VNNI for the formats held in
    /// groups of eight rows ([`rows8`]), else SGEMM on tiles of rows dequantized to
    /// f32 ([`QMat::apply_f32`]).
    pub fn apply(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut out = Vec::new();
        self.apply_rows(x, t, None, &mut out, &mut ApplyScratch::default());
        out
    }

    /// [`QMat::apply`] into `out` (resized to `t · rows`), with `scratch` reused: under
    /// [`GEMM_TOKENS`] tokens no heap allocation once the buffers have grown to size.
    pub fn apply_into(&self, x: &[f32], t: usize, out: &mut Vec<f32>, scratch: &mut ApplyScratch) {
        self.apply_rows(x, t, None, out, scratch)
    }

    /// [`QMat::apply`] of the rows where `active` is true only, the others 0: under
    /// [`GEMM_TOKENS`] tokens their weights are not read (a ReGLU expert's up rows whose
    /// gate is off for every token: neuron skipping); from it on every row is computed
    /// and the inactive ones zeroed.
    pub fn apply_active(&self, x: &[f32], t: usize, active: &[bool]) -> Vec<f32> {
        assert_eq!(active.len(), self.rows, "one flag a row");
        let mut out = Vec::new();
        self.apply_rows(x, t, Some(active), &mut out, &mut ApplyScratch::default());
        out
    }

    /// [`QMat::apply_active`] into `out`, with `scratch` reused (see
    /// [`QMat::apply_into`]).
    pub fn apply_active_into(
        &self,
        x: &[f32],
        t: usize,
        active: &[bool],
        out: &mut Vec<f32>,
        scratch: &mut ApplyScratch,
    ) {
        assert_eq!(active.len(), self.rows, "one flag a row");
        self.apply_rows(x, t, Some(active), out, scratch)
    }

    fn apply_rows(
        &self,
        x: &[f32],
        t: usize,
        active: Option<&[bool]>,
        out: &mut Vec<f32>,
        s: &mut ApplyScratch,
    ) {
        assert_eq!(x.len(), t * self.cols, "activations of the wrong size");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { self.apply_avx2(x, t, active, out, s) };
        }
        // NEON (AArch64) and SIMD128 (WASM built with it) need no run-time check.
        let simd = cfg!(any(
            target_arch = "aarch64",
            all(target_arch = "wasm32", target_feature = "simd128")
        ));
        self.apply_with(x, t, simd, active, out, s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2(
        &self,
        x: &[f32],
        t: usize,
        active: Option<&[bool]>,
        out: &mut Vec<f32>,
        s: &mut ApplyScratch,
    ) {
        self.apply_with(x, t, true, active, out, s)
    }

    /// The product by the portable kernels only (the SIMD kernels' reference in tests).
    #[cfg(test)]
    fn apply_portable(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut out = Vec::new();
        self.apply_with(x, t, false, None, &mut out, &mut ApplyScratch::default());
        out
    }

    /// `x [t, cols]` times this matrix transposed with f32 activations: SGEMM on tiles
    /// of rows dequantized to f32, for any token count. The oracle of [`QMat::apply`]
    /// (whose integer products round the activations to 16 bits), and its prompt path
    /// on CPUs without AVX-512 VNNI.
    pub fn apply_f32(&self, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.cols, "activations of the wrong size");
        self.apply_sgemm(x, t)
    }

    fn apply_sgemm(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        // Each tile writes its own columns of `out [t, rows]` directly.
        let mut out = vec![0f32; t * rows];
        let base = SendPtr(out.as_mut_ptr());
        // Tiles as large as 8 MiB of f32 rows allow (every SGEMM call packs all of
        // x again), but at least one per thread.
        let per = (GEMM_TILE_BYTES / (cols * 4))
            .min(rows.div_ceil(rayon::current_num_threads()))
            .max(GEMM_ROWS);
        (0..rows.div_ceil(per)).into_par_iter().for_each(|task| {
            let r0 = task * per;
            let rt = per.min(rows - r0);
            let mut w = vec![0f32; rt * cols];
            self.rows_f32(r0, &mut w);
            let base = &base;
            // out[j, r0 + i] = Σ_c w[i, c] · x[j, c]: C = w · xᵀ with C's rows
            // (tile rows) 1 apart and its columns (tokens) `rows` apart.
            // SAFETY: the strides describe `w`, `x` and columns r0..r0 + rt of
            // `out`, which no other task writes.
            unsafe {
                matrixmultiply::sgemm(
                    rt,
                    cols,
                    t,
                    1.0,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    0.0,
                    base.0.add(r0),
                    1,
                    rows as isize,
                );
            }
        });
        out
    }

    /// A prompt's product with packed rows on AVX-512 VNNI: integer dot products of the
    /// 16-bit activations, eight tokens at a time per decoded block; the rows past the
    /// last group of eight by the decode kernel. Writes `[t, rows]` directly.
    #[cfg(target_arch = "x86_64")]
    fn apply_vnni(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (rows, cols, rb) = (self.rows, self.cols, self.row_bytes);
        let nb = cols / QK;
        let xq = Q16Rows::new(x);
        let mut out = vec![0f32; t * rows];
        let base = SendPtr(out.as_mut_ptr());
        let groups = self.packed_rows / rows8::GROUP;
        // Groups per task: about 256 KiB of weights (reused by every token tile), and
        // at least one task per thread.
        let per = (VNNI_TASK_BYTES / (rows8::GROUP * rb))
            .clamp(1, groups.div_ceil(rayon::current_num_threads()).max(1));
        // Eight rows of group g for tokens j..j + TT.
        fn run<const TT: usize>(m: &QMat, xq: &Q16Rows, g: usize, j: usize) -> [[f32; 8]; TT] {
            let cols = m.cols;
            let nb = cols / QK;
            let group = m.group(g);
            let xs: [*const i16; TT] = std::array::from_fn(|k| xq.q[(j + k) * cols..].as_ptr());
            let xd: [*const f32; TT] = std::array::from_fn(|k| xq.d[(j + k) * nb..].as_ptr());
            let xsum: [*const i32; TT] = std::array::from_fn(|k| xq.sum[(j + k) * nb..].as_ptr());
            // SAFETY: `apply_with` checked the features; every pointer covers `nb`
            // blocks of one token's activations.
            unsafe {
                rows8::by_kind!(m.ty, |K, RB| rows8::vnni::gemm_group::<K, RB, TT>(
                    group, nb, xs, xd, xsum
                ))
            }
        }
        let kernel = |g: usize, j: usize, tt: usize| -> [[f32; 8]; 8] {
            let mut y = [[0f32; 8]; 8];
            match tt {
                8 => y = run::<8>(self, &xq, g, j),
                4 => y[..4].copy_from_slice(&run::<4>(self, &xq, g, j)),
                _ => y[0] = run::<1>(self, &xq, g, j)[0],
            }
            y
        };
        (0..groups.div_ceil(per)).into_par_iter().for_each(|task| {
            let base = &base;
            let mut j = 0;
            while j < t {
                let tt = [8, 4, 1].into_iter().find(|&n| j + n <= t).unwrap_or(1);
                for g in task * per..((task + 1) * per).min(groups) {
                    let y = kernel(g, j, tt);
                    for (k, y) in y.iter().enumerate().take(tt) {
                        for (r, &v) in y.iter().enumerate() {
                            // SAFETY: row g·8 + r of token j + k is written by this task only.
                            unsafe { *base.0.add((j + k) * rows + g * rows8::GROUP + r) = v };
                        }
                    }
                }
                j += tt;
            }
        });
        // The rows after the groups, token by token.
        let fused = fused_avx2::handles(self.ty);
        let mut codes = None;
        for r in self.packed_rows..rows {
            let row = self.plain_row(r);
            if !fused {
                let w = codes.get_or_insert_with(|| RowCodes::new(cols));
                decode_row(self.ty, row, w);
            }
            for j in 0..t {
                let (xq, xd, xs) = (
                    &xq.q[j * cols..(j + 1) * cols],
                    &xq.d[j * nb..(j + 1) * nb],
                    &xq.sum[j * nb..(j + 1) * nb],
                );
                out[j * rows + r] = match &codes {
                    Some(w) => row_dot(w, xq, xd, xs),
                    // SAFETY: `apply_with` checked AVX2, FMA and F16C (VNNI implies them).
                    _ => unsafe { fused_avx2::row_dot(self.ty, row, xq, xd, xs) },
                };
            }
        }
        out
    }

    /// The product: by SGEMM tiles writing `[t, rows]` directly, or (decoding) as
    /// `[rows, t]` in parallel over runs of rows, then transposed.
    #[inline(always)]
    fn apply_with(
        &self,
        x: &[f32],
        t: usize,
        simd: bool,
        active: Option<&[bool]>,
        result: &mut Vec<f32>,
        scratch: &mut ApplyScratch,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        if t >= GEMM_TOKENS {
            #[cfg(target_arch = "x86_64")]
            let mut out = if simd && self.packed_rows > 0 && rows8::vnni::available() {
                self.apply_vnni(x, t)
            } else {
                self.apply_sgemm(x, t)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let mut out = self.apply_sgemm(x, t);
            if let Some(active) = active {
                for y in out.chunks_exact_mut(rows) {
                    y.iter_mut()
                        .zip(active)
                        .for_each(|(y, &a)| *y = if a { *y } else { 0.0 });
                }
            }
            *result = out;
            return;
        }
        // Whether row r is computed.
        let on = |r: usize| active.is_none_or(|a| a[r]);
        // Decoding: `[rows, t]` (the result itself when t = 1), zeroed (skipped rows
        // stay 0), then transposed.
        let out_t = if t == 1 {
            &mut *result
        } else {
            &mut scratch.out_t
        };
        out_t.clear();
        out_t.resize(rows * t, 0.0);
        // Whole groups of eight rows a task.
        let per_task = (TASK_WEIGHTS / cols).max(16).next_multiple_of(rows8::GROUP);
        if self.is_float() {
            out_t
                .par_chunks_mut(per_task * t)
                .enumerate()
                .for_each(|(task, o)| {
                    ROW_F32.with_borrow_mut(|w| {
                        w.resize(cols, 0.0);
                        for (ri, orow) in o.chunks_mut(t).enumerate() {
                            if !on(task * per_task + ri) {
                                continue;
                            }
                            self.row_f32(task * per_task + ri, w);
                            for (i, y) in orow.iter_mut().enumerate() {
                                *y = dot_f32(w, &x[i * cols..(i + 1) * cols]);
                            }
                        }
                    });
                });
        } else {
            let xq = scratch.xq.get_or_insert_with(|| Q16Rows::new(&[]));
            xq.fill(x);
            let xq = &*xq;
            let nb = cols / QK;
            // Formats with a fused AVX2 kernel skip the decoded row.
            #[cfg(target_arch = "x86_64")]
            let fused = simd && fused_avx2::handles(self.ty) && fused_avx2::available();
            let group_dot = rows8::group_dot(self.ty, simd);
            out_t
                .par_chunks_mut(per_task * t)
                .enumerate()
                .for_each(|(task, o)| {
                    let mut scratch = Vec::new();
                    let mut ri = 0;
                    let task_rows = o.len() / t;
                    while ri < task_rows {
                        let r = task * per_task + ri;
                        if r < self.packed_rows {
                            // A group of eight rows (tasks start on a group), skipped
                            // when none of them is active.
                            if (r..r + rows8::GROUP).all(|r| !on(r)) {
                                ri += rows8::GROUP;
                                continue;
                            }
                            let group = self.group(r / rows8::GROUP);
                            for i in 0..t {
                                let (xq, xd, xs) = (
                                    xq.q[i * cols..].as_ptr(),
                                    &xq.d[i * nb..(i + 1) * nb],
                                    &xq.sum[i * nb..(i + 1) * nb],
                                );
                                // SAFETY: `group_dot` chose a kernel this CPU runs; the
                                // group and activations hold `nb` blocks.
                                let y = unsafe { group_dot(group, nb, xq, xd, xs) };
                                for (k, y) in y.into_iter().enumerate() {
                                    o[(ri + k) * t + i] = if on(r + k) { y } else { 0.0 };
                                }
                            }
                            ri += rows8::GROUP;
                            continue;
                        }
                        let orow = &mut o[ri * t..(ri + 1) * t];
                        ri += 1;
                        if !on(r) {
                            continue;
                        }
                        let row = self.gguf_row(r, &mut scratch);
                        #[cfg(target_arch = "x86_64")]
                        if fused && active.is_some() {
                            // Rows skipped here and there break the hardware's
                            // sequential prefetch: fetch the next active row's bytes
                            // while this one is multiplied.
                            let end = task * per_task + task_rows;
                            if let Some(n) = (r + 1..end).find(|&n| on(n)) {
                                let next = self.plain_row(n);
                                for at in (0..next.len()).step_by(64) {
                                    // SAFETY: a prefetch hint of an address inside `next`.
                                    unsafe {
                                        std::arch::x86_64::_mm_prefetch::<
                                            { std::arch::x86_64::_MM_HINT_T0 },
                                        >(
                                            next.as_ptr().add(at).cast()
                                        )
                                    };
                                }
                            }
                        }
                        #[cfg(target_arch = "x86_64")]
                        if fused {
                            for (i, y) in orow.iter_mut().enumerate() {
                                // SAFETY: `fused` is set only where AVX2, FMA and F16C
                                // were detected.
                                *y = unsafe {
                                    fused_avx2::row_dot(
                                        self.ty,
                                        row,
                                        &xq.q[i * cols..(i + 1) * cols],
                                        &xq.d[i * nb..(i + 1) * nb],
                                        &xq.sum[i * nb..(i + 1) * nb],
                                    )
                                };
                            }
                            continue;
                        }
                        ROW_CODES.with_borrow_mut(|w| {
                            if w.as_ref().is_none_or(|w| w.q.len() != cols) {
                                *w = Some(RowCodes::new(cols));
                            }
                            let w = w.as_mut().expect("just made");
                            decode_row(self.ty, row, w);
                            for (i, y) in orow.iter_mut().enumerate() {
                                *y = row_dot(
                                    w,
                                    &xq.q[i * cols..(i + 1) * cols],
                                    &xq.d[i * nb..(i + 1) * nb],
                                    &xq.sum[i * nb..(i + 1) * nb],
                                );
                            }
                        });
                    }
                });
        }
        if t == 1 {
            return;
        }
        result.clear();
        result.resize(t * rows, 0.0);
        for (r, col) in scratch.out_t.chunks(t).enumerate() {
            for (i, &y) in col.iter().enumerate() {
                result[i * rows + r] = y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Random bytes of `rows` rows of `ty` with finite f16 scales (±0.05) where the
    /// format keeps them.
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
        crate::quant::ggml::random_bytes(ty, rows * cols, 0.8, rng)
    }

    /// Every format against an f64 product of the dequantized weights, within the bound
    /// of the activations' 16-bit rounding (half a step of each block's scale times the
    /// block's |w|); ragged row counts, 1 and several tokens.
    #[test]
    fn every_format_matches_the_dequantized_f64_product() {
        let mut rng = StdRng::seed_from_u64(crate::runtime::test_util::seed());
        let types = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ];
        for ty in types {
            // Ragged rows; decoding (1–3 tokens) and the SGEMM path (9 tokens); for the
            // 32-value formats also rows of 3 and 18 blocks (kernels that take eight
            // blocks at a time then end on a partial group).
            let mut shapes = vec![(37, 256, 1), (5, 512, 3), (19, 768, 2), (70, 256, 9)];
            if ty.block().0 == 32 {
                shapes.extend([(11, 96, 1), (7, 576, 2), (9, 96, 9), (17, 96, 13)]);
            }
            for (rows, cols, t) in shapes {
                let m = QMat::new(ty, rows, cols, random_matrix(ty, rows, cols, &mut rng)).unwrap();
                let w = m.dequantize().unwrap();
                let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let y = m.apply(&x, t);
                // Whether the products quantized the activations to 16 bits: decoding, and
                // prompts of packed rows on AVX-512 VNNI (the portable path runs SGEMM on
                // f32 activations from GEMM_TOKENS on).
                #[cfg(target_arch = "x86_64")]
                let vnni = m.packed_rows > 0 && rows8::vnni::available();
                #[cfg(not(target_arch = "x86_64"))]
                let vnni = false;
                let quantized = !m.is_float() && (t < GEMM_TOKENS || vnni);
                // Half a 16-bit step of each block's amax times the block's |w| sum.
                let qbound = |wr: &[f32], xr: &[f32]| -> f64 {
                    wr.chunks(QK)
                        .zip(xr.chunks(QK))
                        .map(|(wb, xb)| {
                            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                            let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                            0.5 * amax / 32767.0 * wsum * 1.001
                        })
                        .sum()
                };
                // The SIMD paths (fused AVX2 kernels, the AVX2 build) against the portable
                // one: the same integer sums, floats added in another order (and, for
                // VNNI prompts against SGEMM, the activations' rounding).
                let portable = m.apply_portable(&x, t);
                for i in 0..t {
                    for r in 0..rows {
                        let (wr, xr) = (&w[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
                        let mag: f32 = wr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                        let mut bound = 1e-5 * mag as f64 + 1e-6;
                        if quantized && t >= GEMM_TOKENS {
                            bound += qbound(wr, xr);
                        }
                        let (a, b) = (portable[i * rows + r], y[i * rows + r]);
                        assert!(
                            ((a - b).abs() as f64) <= bound,
                            "{ty:?}: {a} vs {b} (|w·x| {mag})"
                        );
                    }
                }
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.row_f32(r, &mut row);
                    assert_eq!(row, w[r * cols..(r + 1) * cols], "{ty:?} row {r}");
                }
                // The SGEMM tiles' dequantizer (eight packed rows at a time) gives the
                // same values, from any first row.
                for r0 in [0, 3, 8].into_iter().filter(|&r0| r0 < rows) {
                    let mut tile = vec![f32::NAN; (rows - r0) * cols];
                    m.rows_f32(r0, &mut tile);
                    assert_eq!(tile, w[r0 * cols..], "{ty:?} rows from {r0}");
                }
                for i in 0..t {
                    for r in 0..rows {
                        let (wr, xr) = (&w[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
                        let want: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mut bound = 1e-4
                            * wr.iter()
                                .zip(xr)
                                .map(|(a, b)| (a * b).abs() as f64)
                                .sum::<f64>();
                        if quantized {
                            bound += qbound(wr, xr);
                        }
                        let got = y[i * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= bound + 1e-6,
                            "{ty:?} [{rows}x{cols}] t {i} row {r}: {got} vs {want} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    /// The product of the active rows only equals the whole product with the inactive
    /// rows zeroed (the same kernels: bit for bit), for grouped and single rows, every
    /// group fully off, partly off and on, decode and prompt token counts.
    #[test]
    fn active_rows_match_the_whole_product() {
        let mut rng = StdRng::seed_from_u64(crate::runtime::test_util::seed());
        for ty in [GgmlType::Q4_0, GgmlType::Q6K, GgmlType::Q5_1, GgmlType::F16] {
            let (rows, cols) = (27, 256);
            let m = QMat::new(ty, rows, cols, random_matrix(ty, rows, cols, &mut rng)).unwrap();
            // Rows 0..8 all off, 8..16 partly, 16..24 all on, the tail mixed.
            let active: Vec<bool> = (0..rows)
                .map(|r| match r / 8 {
                    0 => false,
                    2 => true,
                    _ => rng.random_bool(0.5),
                })
                .collect();
            for t in [1, 3, GEMM_TOKENS + 1] {
                let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut want = m.apply(&x, t);
                for y in want.chunks_exact_mut(rows) {
                    for (y, &a) in y.iter_mut().zip(&active) {
                        if !a {
                            *y = 0.0;
                        }
                    }
                }
                assert_eq!(m.apply_active(&x, t, &active), want, "{ty:?} t {t}");
            }
        }
    }

    /// A NaN or infinite block scale (integer formats) or value (float formats) is a
    /// typed error before any product.
    #[test]
    fn non_finite_weights_are_refused() {
        let mut rng = StdRng::seed_from_u64(7);
        for (ty, at) in [
            (GgmlType::Q4_0, 18 * 3),
            (GgmlType::Q4K, 144 + 2),
            (GgmlType::Q6K, 208),
            (GgmlType::F16, 10),
        ] {
            let mut b = random_matrix(ty, 4, 256, &mut rng);
            let ok = QMat::new(ty, 4, 256, b.clone()).unwrap();
            assert!(ok.check_finite("w").is_ok(), "{ty:?}");
            b[at..at + 2].copy_from_slice(&f16::NAN.to_le_bytes());
            let bad = QMat::new(ty, 4, 256, b).unwrap();
            assert!(
                matches!(bad.check_finite("w"), Err(Error::NonFinite { .. })),
                "{ty:?}"
            );
        }
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        assert!(QMat::new(GgmlType::Q4_0, 2, 48, vec![0; 2 * 27]).is_err());
        assert!(QMat::new(GgmlType::Q4_0, 2, 64, vec![0; 71]).is_err());
        assert!(QMat::new(GgmlType::Q2K, 1, 256, vec![0; 84]).is_err());
    }
}
