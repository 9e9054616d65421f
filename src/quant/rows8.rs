//! Q4_0, Q4_1 and Q8_0 matrices repacked eight rows at a time for the decode product:
//! each lane of a 256-bit register then accumulates one row, so a block's scale is one
//! vector for eight rows, no horizontal sum is left at the end of a row, and the codes
//! reach 16-bit lanes by shifts and masks instead of byte shuffles.
//!
//! Layout of a group of eight rows: one record per block position `b` (the group's
//! blocks `b` side by side, as many bytes as their eight GGUF blocks):
//! - the eight rows' f16 scales `d` (16 bytes), then for Q4_1 their f16 mins `m`;
//! - the codes as registers of 16 lanes of 16 bits, lane `L` belonging to row `L / 2`
//!   and to the even (`L` even) or odd value of a pair of columns `(2p, 2p + 1)`:
//!   - Q4 (4 registers): lane bits `4s..4s + 4` hold the nibble of pair `p = 4·reg + s`;
//!   - Q8_0 (8 registers): the low byte is pair `2·reg`, the high byte pair `2·reg + 1`.
//!
//! Against a 16-bit activation pair broadcast to every 32-bit lane, one `pmaddwd`
//! multiplies two columns of eight rows and sums them per row. A matrix's last
//! `rows % 8` rows stay in GGUF order after the groups. [`group_row`] gives any row of
//! a group back in GGUF bytes (the dequantizer and the portable product read those).

use rayon::prelude::*;

use super::ggml::GgmlType;

/// Rows per group.
pub const GROUP: usize = 8;

/// Whether `ty` is repacked.
pub fn repacked(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Byte offset of the codes in a GGUF block of `ty`, and in a record.
fn offsets(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_0 => (2, 16),
        GgmlType::Q4_1 => (4, 32),
        _ => (2, 16),
    }
}

#[inline(always)]
/// Code `j` (0..32) of a GGUF block: a nibble (Q4) or a byte (Q8_0, as its bits).
fn code(ty: GgmlType, blk: &[u8], j: usize) -> u8 {
    let (at, _) = offsets(ty);
    match ty {
        GgmlType::Q8_0 => blk[at + j],
        _ if j < 16 => blk[at + j] & 0x0f,
        _ => blk[at + j - 16] >> 4,
    }
}

#[inline(always)]
/// Where code `j` of row `r` (0..8) sits in a record's code bytes: (byte, shift).
fn place(ty: GgmlType, r: usize, j: usize) -> (usize, u32) {
    let (p, e) = (j / 2, j % 2);
    let lane = 2 * r + e;
    match ty {
        GgmlType::Q8_0 => {
            let (reg, s) = (p / 2, p % 2);
            (reg * 32 + 2 * lane + s, 0)
        }
        _ => {
            let (reg, s) = (p / 4, p % 4);
            // Nibble s of the 16-bit lane: byte s / 2, shift 4 · (s % 2).
            (reg * 32 + 2 * lane + s / 2, 4 * (s as u32 % 2))
        }
    }
}

/// The groups of `rows` GGUF rows (`row_bytes` each, `rows` a multiple of 8) repacked.
pub fn pack(ty: GgmlType, rows: usize, row_bytes: usize, bytes: &[u8]) -> Vec<u8> {
    debug_assert!(repacked(ty) && rows.is_multiple_of(GROUP));
    let bb = ty.block().1;
    let (nb, rec) = (row_bytes / bb, GROUP * bb);
    let codes = offsets(ty).1;
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_exact_mut(GROUP * row_bytes)
        .enumerate()
        .for_each(|(g, grp)| {
            for (b, record) in grp.chunks_exact_mut(rec).enumerate() {
                for r in 0..GROUP {
                    let src = (g * GROUP + r) * row_bytes + b * bb;
                    let blk = &bytes[src..src + bb];
                    record[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                    if ty == GgmlType::Q4_1 {
                        record[16 + 2 * r..18 + 2 * r].copy_from_slice(&blk[2..4]);
                    }
                    let mut c = [0u16; 32];
                    for (j, c) in c.iter_mut().enumerate() {
                        *c = code(ty, blk, j) as u16;
                    }
                    // Each 16-bit lane of the row's two lanes (even, odd value of a pair).
                    let out = &mut record[codes..];
                    for e in 0..2 {
                        let at = 2 * (2 * r + e);
                        if ty == GgmlType::Q8_0 {
                            for reg in 0..8 {
                                let v = c[4 * reg + e] | c[4 * reg + 2 + e] << 8;
                                out[reg * 32 + at..reg * 32 + at + 2]
                                    .copy_from_slice(&v.to_le_bytes());
                            }
                        } else {
                            for reg in 0..4 {
                                let p = |s: usize| c[2 * (4 * reg + s) + e] << (4 * s);
                                let v = p(0) | p(1) | p(2) | p(3);
                                out[reg * 32 + at..reg * 32 + at + 2]
                                    .copy_from_slice(&v.to_le_bytes());
                            }
                        }
                    }
                }
            }
            debug_assert_eq!(grp.len(), nb * rec);
        });
    out
}

/// Row `r` (0..8) of a packed group, as its GGUF bytes, into `out` (`row_bytes`).
pub fn group_row(ty: GgmlType, group: &[u8], r: usize, out: &mut [u8]) {
    let bb = ty.block().1;
    let (at, codes) = offsets(ty);
    for (record, blk) in group.chunks_exact(GROUP * bb).zip(out.chunks_exact_mut(bb)) {
        blk[..2].copy_from_slice(&record[2 * r..2 * r + 2]);
        if ty == GgmlType::Q4_1 {
            blk[2..4].copy_from_slice(&record[16 + 2 * r..18 + 2 * r]);
        }
        blk[at..].fill(0);
        for j in 0..32 {
            let (byte, shift) = place(ty, r, j);
            let c = match ty {
                GgmlType::Q8_0 => record[codes + byte],
                _ => (record[codes + byte] >> shift) & 0x0f,
            };
            match ty {
                GgmlType::Q8_0 => blk[at + j] = c,
                _ if j < 16 => blk[at + j] |= c,
                _ => blk[at + j - 16] |= c << 4,
            }
        }
    }
}

/// The AVX2 product of a packed group against 16-bit activations.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// A Q4 record register's four code vectors: pair `4·reg + s` in vector `s`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn q4_codes(v: __m256i) -> [__m256i; 4] {
        let lo4 = _mm256_set1_epi16(0x0f);
        [
            _mm256_and_si256(v, lo4),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4),
            _mm256_and_si256(_mm256_srli_epi16(v, 8), lo4),
            _mm256_srli_epi16(v, 12),
        ]
    }

    /// A Q8_0 record register's two code vectors (pairs `2·reg` and `2·reg + 1`),
    /// sign-extended to 16 bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn q8_codes(v: __m256i) -> [__m256i; 2] {
        [
            _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8),
            _mm256_srai_epi16(v, 8),
        ]
    }

    /// The eight rows of a packed Q4_0 (`KIND` 0), Q4_1 (1) or Q8_0 (2) group (`nb`
    /// records of `RB` bytes) times one activation row: 16-bit codes `x` (`32 · nb`),
    /// block scales `xd` and code sums `xs`. Returns the eight dot products.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `group` holds `nb · RB` bytes; `x` points at `32 · nb` codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_group<const KIND: u8, const RB: usize>(
        group: &[u8],
        nb: usize,
        x: *const i16,
        xd: &[f32],
        xs: &[i32],
    ) -> [f32; 8] {
        assert!(group.len() >= nb * RB && xd.len() >= nb && xs.len() >= nb);
        let (mut accf, mut offv) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let codes = if KIND == 1 { 32 } else { 16 };
        unsafe {
            // The activation pair (2p, 2p + 1) in every 32-bit lane.
            let pair = |xb: *const i16, p: usize| {
                _mm256_set1_epi32(xb.add(2 * p).cast::<i32>().read_unaligned())
            };
            for b in 0..nb {
                let rec = group.as_ptr().add(b * RB);
                let xb = x.add(32 * b);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.cast()));
                let mut acc = [_mm256_setzero_si256(); 4];
                if KIND == 2 {
                    for reg in 0..8 {
                        let v = _mm256_loadu_si256(rec.add(codes + 32 * reg).cast());
                        let [w0, w1] = q8_codes(v);
                        let a = &mut acc[reg % 2 * 2..reg % 2 * 2 + 2];
                        a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(w0, pair(xb, 2 * reg)));
                        a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(w1, pair(xb, 2 * reg + 1)));
                    }
                } else {
                    for reg in 0..4 {
                        let v = _mm256_loadu_si256(rec.add(codes + 32 * reg).cast());
                        let w = q4_codes(v);
                        for (s, w) in w.into_iter().enumerate() {
                            acc[s] = _mm256_add_epi32(
                                acc[s],
                                _mm256_madd_epi16(w, pair(xb, 4 * reg + s)),
                            );
                        }
                    }
                }
                let sum = _mm256_add_epi32(
                    _mm256_add_epi32(acc[0], acc[1]),
                    _mm256_add_epi32(acc[2], acc[3]),
                );
                let xdb = _mm256_set1_ps(xd[b]);
                accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, xdb), accf);
                // Offsets: Q4_0's codes are nibble − 8, Q4_1 adds its min.
                let xsum = _mm256_set1_ps(xd[b] * xs[b] as f32);
                match KIND {
                    0 => offv = _mm256_fmadd_ps(d, _mm256_mul_ps(xsum, _mm256_set1_ps(-8.0)), offv),
                    1 => {
                        let m = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16).cast()));
                        offv = _mm256_fmadd_ps(m, xsum, offv);
                    }
                    _ => {}
                }
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(accf, offv));
            out
        }
    }

    /// The eight rows of a packed group dequantized into `out` (`8 · cols` values, row
    /// after row): `scale · code + offset` by one multiply-add, the values (and the
    /// operation order) of the single-row AVX2 dequantizer.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `group` holds `cols / 32` records of `RB` bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_f32<const KIND: u8, const RB: usize>(
        group: &[u8],
        cols: usize,
        out: &mut [f32],
    ) {
        let nb = cols / 32;
        assert!(group.len() >= nb * RB && out.len() >= 8 * cols);
        let codes = if KIND == 1 { 32 } else { 16 };
        let o = out.as_mut_ptr();
        unsafe {
            for b in 0..nb {
                let rec = group.as_ptr().add(b * RB);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.cast()));
                let off = match KIND {
                    0 => _mm256_mul_ps(_mm256_set1_ps(-8.0), d),
                    1 => _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16).cast())),
                    _ => _mm256_setzero_ps(),
                };
                // Lanes (2r, 2r + 1) of a pair's values belong to row r.
                let (lo_rows, hi_rows) = (
                    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                    _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
                );
                let (dlo, dhi) = (
                    _mm256_permutevar8x32_ps(d, lo_rows),
                    _mm256_permutevar8x32_ps(d, hi_rows),
                );
                let (olo, ohi) = (
                    _mm256_permutevar8x32_ps(off, lo_rows),
                    _mm256_permutevar8x32_ps(off, hi_rows),
                );
                // Stores pair p's two values of each of the eight rows.
                let store = |w: __m256i, p: usize| {
                    let at = o.add(b * 32 + 2 * p);
                    for (half, (s, of), r0) in [
                        (_mm256_castsi256_si128(w), (dlo, olo), 0),
                        (_mm256_extracti128_si256(w, 1), (dhi, ohi), 4),
                    ] {
                        let f =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(half)), s, of);
                        let (l, h) = (_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
                        let (l, h) = (_mm_castps_pd(l), _mm_castps_pd(h));
                        _mm_storel_pd(at.add(r0 * cols).cast(), l);
                        _mm_storeh_pd(at.add((r0 + 1) * cols).cast(), l);
                        _mm_storel_pd(at.add((r0 + 2) * cols).cast(), h);
                        _mm_storeh_pd(at.add((r0 + 3) * cols).cast(), h);
                    }
                };
                if KIND == 2 {
                    for reg in 0..8 {
                        let v = _mm256_loadu_si256(rec.add(codes + 32 * reg).cast());
                        for (s, w) in q8_codes(v).into_iter().enumerate() {
                            store(w, 2 * reg + s);
                        }
                    }
                } else {
                    for reg in 0..4 {
                        let v = _mm256_loadu_si256(rec.add(codes + 32 * reg).cast());
                        for (s, w) in q4_codes(v).into_iter().enumerate() {
                            store(w, 4 * reg + s);
                        }
                    }
                }
            }
        }
    }
}

/// The prompt product of packed groups with AVX-512 VNNI: `vpdpwssd` (two 16-bit
/// products added to a 32-bit lane in one instruction) on the same layout, each group's
/// codes decoded once per block and used for several tokens.
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni {
    use std::arch::x86_64::*;

    /// Whether this CPU runs [`gemm_group`].
    pub fn available() -> bool {
        super::super::qmat::avx2_f16c()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// The eight rows of a packed Q4_0 (`KIND` 0), Q4_1 (1) or Q8_0 (2) group (`nb`
    /// records of `RB` bytes) times `TT` activation rows (16-bit codes `x[j]`, block
    /// scales `xd[j]`, code sums `xs[j]`): `out[j][r]`.
    ///
    /// # Safety
    /// AVX2, FMA, F16C, AVX-512 F, VL and VNNI ([`available`]); `group` holds `nb`
    /// records; each `x[j]` points at `32 · nb` codes and `xd[j]`, `xs[j]` at `nb` values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn gemm_group<const KIND: u8, const RB: usize, const TT: usize>(
        group: &[u8],
        nb: usize,
        x: [*const i16; TT],
        xd: [*const f32; TT],
        xs: [*const i32; TT],
    ) -> [[f32; 8]; TT] {
        assert!(group.len() >= nb * RB);
        let codes = if KIND == 1 { 32 } else { 16 };
        let mut facc = [_mm256_setzero_ps(); TT];
        unsafe {
            for b in 0..nb {
                let rec = group.as_ptr().add(b * RB);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.cast()));
                let mut acc = [_mm256_setzero_si256(); TT];
                let pair = |j: usize, p: usize| {
                    _mm256_set1_epi32(x[j].add(32 * b + 2 * p).cast::<i32>().read_unaligned())
                };
                if KIND == 2 {
                    for reg in 0..8 {
                        let v = _mm256_loadu_si256(rec.add(codes + 32 * reg).cast());
                        let [w0, w1] = super::avx2::q8_codes(v);
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_dpwssd_epi32(*a, w0, pair(j, 2 * reg));
                            *a = _mm256_dpwssd_epi32(*a, w1, pair(j, 2 * reg + 1));
                        }
                    }
                } else {
                    for reg in 0..4 {
                        let v = _mm256_loadu_si256(rec.add(codes + 32 * reg).cast());
                        let w = super::avx2::q4_codes(v);
                        for (s, w) in w.into_iter().enumerate() {
                            for (j, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_dpwssd_epi32(*a, w, pair(j, 4 * reg + s));
                            }
                        }
                    }
                }
                let m = if KIND == 1 {
                    _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16).cast()))
                } else {
                    _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                };
                for j in 0..TT {
                    let xdb = *xd[j].add(b);
                    facc[j] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(acc[j]),
                        _mm256_mul_ps(d, _mm256_set1_ps(xdb)),
                        facc[j],
                    );
                    if KIND != 2 {
                        let xsum = _mm256_set1_ps(xdb * *xs[j].add(b) as f32);
                        facc[j] = _mm256_fmadd_ps(m, xsum, facc[j]);
                    }
                }
            }
            let mut out = [[0f32; 8]; TT];
            for j in 0..TT {
                _mm256_storeu_ps(out[j].as_mut_ptr(), facc[j]);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn packing_round_trips_every_row() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let bb = ty.block().1;
            let (rows, nb) = (16, 5);
            let bytes: Vec<u8> = (0..rows * nb * bb).map(|_| rng.random()).collect();
            let packed = pack(ty, rows, nb * bb, &bytes);
            assert_eq!(packed.len(), bytes.len());
            let mut row = vec![0u8; nb * bb];
            for r in 0..rows {
                let g = &packed[(r / GROUP) * GROUP * nb * bb..][..GROUP * nb * bb];
                group_row(ty, g, r % GROUP, &mut row);
                assert_eq!(row, bytes[r * nb * bb..(r + 1) * nb * bb], "{ty:?} row {r}");
            }
        }
    }
}
