//! Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K matrices repacked eight rows at a time for the
//! products: each lane of a 256-bit register then accumulates one row, so a block's
//! scale is one vector for eight rows, no horizontal sum is left at the end of a row,
//! and the codes reach 16-bit lanes by shifts and masks instead of byte shuffles.
//!
//! Layout of a group of eight rows: one record per block position `b` (the group's
//! blocks `b` side by side):
//! - a header: the eight rows' f16 scales `d` (16 bytes); Q4_1 then their f16 mins;
//!   Q4_K then their f16 `dmin` and its sub-blocks' 6-bit scales and mins unpacked to
//!   bytes (`[sub-block][row]`, 64 bytes each); Q6_K its 16 scales a row as bytes;
//! - the codes of each run of 32 values (one run a block; eight for the 256-value
//!   K-quants) as registers of 16 lanes of 16 bits, lane `L` belonging to row `L / 2`
//!   and to the even (`L` even) or odd value of a pair of columns `(2p, 2p + 1)`:
//!   - Q4 (4 registers): lane bits `4s..4s + 4` hold the nibble of pair `p = 4·reg + s`;
//!   - Q5_0: its codes' low nibbles as Q4 registers, then 1 register of their high bits
//!     (lane bit `p` for pair `p`);
//!   - Q8_0 (8 registers): the low byte is pair `2·reg`, the high byte pair `2·reg + 1`;
//!   - Q6_K: its codes' low nibbles as Q4 registers, then 2 registers of their high 2
//!     bits (lane bits `2s..2s + 2` for pair `8·reg + s`).
//!
//! A record is as large as its eight GGUF blocks, except Q4_K's (1,184 bytes for 1,152:
//! its scales unpacked). Against a 16-bit activation pair broadcast to every 32-bit
//! lane, one `pmaddwd` multiplies two columns of eight rows and sums them per row. A
//! matrix's last `rows % 8` rows stay in GGUF order after the groups. [`group_row`]
//! gives any row of a group back in GGUF bytes (the dequantizer and the portable
//! product read those).

use rayon::prelude::*;

use super::ggml::GgmlType;

/// Rows per group.
pub const GROUP: usize = 8;

/// The formats repacked eight rows at a time.
pub const FORMATS: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q6K,
];

/// Whether `ty` is repacked.
pub fn repacked(ty: GgmlType) -> bool {
    FORMATS.contains(&ty)
}

/// Q4_K's header: `d`, `dmin`, then the sub-blocks' scales and mins as bytes.
const K4_SC: usize = 32;
const K4_M: usize = 96;
const K4_CODES: usize = 160;

/// Q6_K's header: `d`, then the 16 scales of each row as bytes (`[scale][row]`); a run
/// holds the codes' low 4 bits as Q4 registers, then their high 2 bits (2 registers:
/// lane bits `2s..2s + 2` hold pair `8·reg + s`).
const K6_SC: usize = 16;
const K6_CODES: usize = 144;
const K6_RUN: usize = 192;

/// Bytes of a record (eight rows' blocks at one position).
pub fn record_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4K => K4_CODES + 8 * 128,
        GgmlType::Q6K => K6_CODES + 8 * K6_RUN,
        _ => GROUP * ty.block().1,
    }
}

/// Bytes of a group of eight packed rows of `row_bytes` GGUF bytes each.
pub fn group_bytes(ty: GgmlType, row_bytes: usize) -> usize {
    row_bytes / ty.block().1 * record_bytes(ty)
}

/// Runs of 32 codes in a block, and where run `u`'s codes start in a record.
fn runs(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
        8
    } else {
        1
    }
}

fn run_at(ty: GgmlType, u: usize) -> usize {
    match ty {
        GgmlType::Q4_1 => 32,
        GgmlType::Q4K => K4_CODES + 128 * u,
        GgmlType::Q6K => K6_CODES + K6_RUN * u,
        _ => 16,
    }
}

/// Where the high 2 bits of row `r`'s code `j` of a Q6_K run sit: (byte, shift) after
/// the run's low-nibble registers.
fn k6_high(r: usize, j: usize) -> (usize, u32) {
    let (p, e) = (j / 2, j % 2);
    let (reg, s) = (p / 8, p % 8);
    (128 + reg * 32 + 2 * (2 * r + e) + s / 4, 2 * (s as u32 % 4))
}

/// Where the high bit of row `r`'s code `j` of a Q5_0 run sits: (byte, bit) after the
/// run's low-nibble registers (lane `2r + e` of one register, bit `p` for pair `p`).
fn q5_high(r: usize, j: usize) -> (usize, u32) {
    let (p, e) = (j / 2, j % 2);
    (128 + 2 * (2 * r + e) + p / 8, (p % 8) as u32)
}

/// Where value `v` (0..256) of a Q6_K block keeps its low 4 bits (`ql` byte, shift)
/// and its high 2 bits (`qh` byte, shift).
fn k6_place(v: usize) -> (usize, u32, usize, u32) {
    let (n, k, l) = (v / 128, v % 128 / 32, v % 32);
    let ql = 64 * n + l + 32 * (k % 2);
    (ql, 4 * (k as u32 / 2), 128 + 32 * n + l, 2 * k as u32)
}

/// The 32 codes of run `u` of a GGUF block: nibbles (Q4), bytes (Q8_0, as bits), 6-bit
/// codes (Q6_K, 0..64).
fn gguf_codes(ty: GgmlType, blk: &[u8], u: usize) -> [u16; 32] {
    std::array::from_fn(|j| match ty {
        GgmlType::Q8_0 => blk[2 + j] as u16,
        GgmlType::Q6K => {
            let (ql, sl, qh, sh) = k6_place(32 * u + j);
            (((blk[ql] >> sl) & 0x0f) | (((blk[qh] >> sh) & 3) << 4)) as u16
        }
        GgmlType::Q4K => ((blk[16 + 32 * (u / 2) + j] >> (4 * (u % 2))) & 0x0f) as u16,
        GgmlType::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let lo = if j < 16 {
                blk[6 + j] & 0x0f
            } else {
                blk[6 + j - 16] >> 4
            };
            (lo as u32 | ((qh >> j) & 1) << 4) as u16
        }
        _ => {
            let at = if ty == GgmlType::Q4_1 { 4 } else { 2 };
            (if j < 16 {
                blk[at + j] & 0x0f
            } else {
                blk[at + j - 16] >> 4
            }) as u16
        }
    })
}

/// Writes row `r`'s 32 codes `c` into a run's registers.
fn put_run(q8: bool, area: &mut [u8], r: usize, c: &[u16; 32]) {
    for e in 0..2 {
        let at = 2 * (2 * r + e);
        if q8 {
            for reg in 0..8 {
                let v = c[4 * reg + e] | c[4 * reg + 2 + e] << 8;
                area[reg * 32 + at..reg * 32 + at + 2].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            for reg in 0..4 {
                let p = |s: usize| c[2 * (4 * reg + s) + e] << (4 * s);
                let v = p(0) | p(1) | p(2) | p(3);
                area[reg * 32 + at..reg * 32 + at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Row `r`'s 32 codes from a run's registers.
fn get_run(q8: bool, area: &[u8], r: usize) -> [u8; 32] {
    std::array::from_fn(|j| {
        let (p, e) = (j / 2, j % 2);
        let lane = 2 * (2 * r + e);
        if q8 {
            area[(p / 2) * 32 + lane + p % 2]
        } else {
            let v = u16::from_le_bytes([area[(p / 4) * 32 + lane], area[(p / 4) * 32 + lane + 1]]);
            ((v >> (4 * (p % 4))) & 0x0f) as u8
        }
    })
}

/// Q4_K's 12 scale bytes as eight 6-bit (scale, min) pairs, and back (ggml's packing).
fn k4_unpack(q: &[u8]) -> [(u8, u8); 8] {
    std::array::from_fn(|j| super::ggml::scale_min_k4(j, q))
}

fn k4_pack(sm: &[(u8, u8); 8], q: &mut [u8]) {
    for j in 0..4 {
        let (sc, m) = sm[j];
        let (sc4, m4) = sm[j + 4];
        q[j] = (sc & 63) | ((sc4 >> 4) << 6);
        q[j + 4] = (m & 63) | ((m4 >> 4) << 6);
        q[j + 8] = (sc4 & 0x0f) | ((m4 & 0x0f) << 4);
    }
}

/// The groups of `rows` GGUF rows (`row_bytes` each, `rows` a multiple of 8) repacked,
/// followed by `tail` as is (one allocation of the final size).
pub fn pack(ty: GgmlType, rows: usize, row_bytes: usize, bytes: &[u8], tail: &[u8]) -> Vec<u8> {
    debug_assert!(repacked(ty) && rows.is_multiple_of(GROUP));
    let bb = ty.block().1;
    let rec = record_bytes(ty);
    let q8 = ty == GgmlType::Q8_0;
    let n = rows / GROUP * group_bytes(ty, row_bytes);
    let mut out = Vec::with_capacity(n + tail.len());
    out.resize(n, 0u8);
    out.par_chunks_exact_mut(group_bytes(ty, row_bytes))
        .enumerate()
        .for_each(|(g, grp)| {
            for (b, record) in grp.chunks_exact_mut(rec).enumerate() {
                for r in 0..GROUP {
                    let src = (g * GROUP + r) * row_bytes + b * bb;
                    let blk = &bytes[src..src + bb];
                    let d_at = if ty == GgmlType::Q6K { 208 } else { 0 };
                    record[2 * r..2 * r + 2].copy_from_slice(&blk[d_at..d_at + 2]);
                    if ty == GgmlType::Q6K {
                        for i in 0..16 {
                            record[K6_SC + 8 * i + r] = blk[192 + i];
                        }
                    }
                    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4K) {
                        record[16 + 2 * r..18 + 2 * r].copy_from_slice(&blk[2..4]);
                    }
                    if ty == GgmlType::Q4K {
                        for (j, (sc, m)) in k4_unpack(&blk[4..16]).into_iter().enumerate() {
                            record[K4_SC + 8 * j + r] = sc;
                            record[K4_M + 8 * j + r] = m;
                        }
                    }
                    for u in 0..runs(ty) {
                        let at = run_at(ty, u);
                        let c = gguf_codes(ty, blk, u);
                        if ty == GgmlType::Q6K {
                            put_run(false, &mut record[at..], r, &c.map(|c| c & 0x0f));
                            for (j, c) in c.into_iter().enumerate() {
                                let (byte, shift) = k6_high(r, j);
                                record[at + byte] |= ((c >> 4) as u8) << shift;
                            }
                        } else if ty == GgmlType::Q5_0 {
                            put_run(false, &mut record[at..], r, &c.map(|c| c & 0x0f));
                            for (j, c) in c.into_iter().enumerate() {
                                let (byte, bit) = q5_high(r, j);
                                record[at + byte] |= ((c >> 4) as u8) << bit;
                            }
                        } else {
                            put_run(q8, &mut record[at..], r, &c);
                        }
                    }
                }
            }
        });
    out.extend_from_slice(tail);
    out
}

/// Row `r` (0..8) of a packed group, as its GGUF bytes, into `out` (`row_bytes`).
pub fn group_row(ty: GgmlType, group: &[u8], r: usize, out: &mut [u8]) {
    let bb = ty.block().1;
    let q8 = ty == GgmlType::Q8_0;
    for (record, blk) in group
        .chunks_exact(record_bytes(ty))
        .zip(out.chunks_exact_mut(bb))
    {
        blk.fill(0);
        let d_at = if ty == GgmlType::Q6K { 208 } else { 0 };
        blk[d_at..d_at + 2].copy_from_slice(&record[2 * r..2 * r + 2]);
        if ty == GgmlType::Q6K {
            for i in 0..16 {
                blk[192 + i] = record[K6_SC + 8 * i + r];
            }
        }
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4K) {
            blk[2..4].copy_from_slice(&record[16 + 2 * r..18 + 2 * r]);
        }
        if ty == GgmlType::Q4K {
            let sm = std::array::from_fn(|j| (record[K4_SC + 8 * j + r], record[K4_M + 8 * j + r]));
            k4_pack(&sm, &mut blk[4..16]);
        }
        for u in 0..runs(ty) {
            let at = run_at(ty, u);
            let c = get_run(q8, &record[at..], r);
            for (j, c) in c.into_iter().enumerate() {
                match ty {
                    GgmlType::Q8_0 => blk[2 + j] = c,
                    GgmlType::Q6K => {
                        let (byte, shift) = k6_high(r, j);
                        let q = c | ((record[at + byte] >> shift) & 3) << 4;
                        let (ql, sl, qh, sh) = k6_place(32 * u + j);
                        blk[ql] |= (q & 0x0f) << sl;
                        blk[qh] |= (q >> 4) << sh;
                    }
                    GgmlType::Q4K => blk[16 + 32 * (u / 2) + j] |= c << (4 * (u % 2)),
                    GgmlType::Q5_0 => {
                        let (byte, bit) = q5_high(r, j);
                        let hi = (record[at + byte] >> bit) & 1;
                        blk[2 + j / 8] |= hi << (j % 8);
                        if j < 16 {
                            blk[6 + j] |= c;
                        } else {
                            blk[6 + j - 16] |= c << 4;
                        }
                    }
                    _ => {
                        let at = if ty == GgmlType::Q4_1 { 4 } else { 2 };
                        if j < 16 {
                            blk[at + j] |= c;
                        } else {
                            blk[at + j - 16] |= c << 4;
                        }
                    }
                }
            }
        }
    }
}

/// Runs `$body` with `$kind` and `$rb` bound as constants to a packed format's kernel
/// kind (0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4_K, 4 Q6_K, 5 Q5_0) and record bytes ([`record_bytes`]):
/// the one table from a format to the kernels' const parameters.
macro_rules! by_kind {
    ($ty:expr, |$kind:ident, $rb:ident| $body:expr) => {
        match $ty {
            GgmlType::Q4_0 => {
                const $kind: u8 = 0;
                const $rb: usize = 8 * 18;
                $body
            }
            GgmlType::Q4_1 => {
                const $kind: u8 = 1;
                const $rb: usize = 8 * 20;
                $body
            }
            GgmlType::Q5_0 => {
                const $kind: u8 = 5;
                const $rb: usize = 8 * 22;
                $body
            }
            GgmlType::Q4K => {
                const $kind: u8 = 3;
                const $rb: usize = 160 + 8 * 128;
                $body
            }
            GgmlType::Q6K => {
                const $kind: u8 = 4;
                const $rb: usize = 144 + 8 * 192;
                $body
            }
            _ => {
                const $kind: u8 = 2;
                const $rb: usize = 8 * 34;
                $body
            }
        }
    };
}
#[allow(unused_imports)] // only x86-64 builds use it outside this module
pub(crate) use by_kind;

/// The product of one packed group's eight rows with one activation row: 16-bit codes
/// `x` (`32 · nb`), block scales `xd` and code sums `xs`, `nb` blocks of 32 values.
///
/// # Safety
/// The CPU has the features of the kernel [`group_dot`] chose; `group` holds the records
/// of `nb` blocks; `x` points at `32 · nb` codes; `xd`, `xs` hold `nb` values.
pub(crate) type GroupDot = unsafe fn(&[u8], usize, *const i16, &[f32], &[i32]) -> [f32; 8];

/// The group product of `ty` (a [`repacked`] format) for this CPU, chosen in one place:
/// AVX2 on x86-64 (detected at run time), NEON on AArch64, SIMD128 in a WASM build
/// with that feature; the portable kernel without `simd` or any of these.
pub(crate) fn group_dot(ty: GgmlType, simd: bool) -> GroupDot {
    by_kind!(ty, |K, RB| {
        #[cfg(target_arch = "x86_64")]
        if simd
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return avx2::dot_group::<K, RB>;
        }
        #[cfg(target_arch = "aarch64")]
        if simd {
            return neon::dot_group::<K, RB>;
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        if simd {
            return simd128::dot_group::<K, RB>;
        }
        let _ = simd;
        portable::dot_group::<K, RB>
    })
}

/// Block `b` of a packed group of `KIND` (records of `RB` bytes), as the 128-bit and
/// portable kernels read it: where its codes start in `group`, the eight rows' scales of
/// its first and last 16 values (the same but for Q6_K) and their offsets (`w = scale ·
/// code + offset`), the values [`avx2::parts`] computes.
#[inline(always)]
fn parts<const KIND: u8, const RB: usize>(
    group: &[u8],
    b: usize,
) -> (usize, [f32; 8], [f32; 8], [f32; 8]) {
    let f16 = |at: usize| half::f16::from_le_bytes([group[at], group[at + 1]]).to_f32();
    let row8 = |at: usize| -> [f32; 8] { std::array::from_fn(|r| f16(at + 2 * r)) };
    if KIND == 3 || KIND == 4 {
        let (rec, j) = (b / 8 * RB, b % 8);
        let d = row8(rec);
        if KIND == 4 {
            let sc = |at: usize| -> [f32; 8] {
                std::array::from_fn(|r| d[r] * group[rec + at + r] as i8 as f32)
            };
            return (
                rec + K6_CODES + K6_RUN * j,
                sc(K6_SC + 16 * j),
                sc(K6_SC + 16 * j + 8),
                [0.0; 8],
            );
        }
        let dmin = row8(rec + 16);
        let sc = std::array::from_fn(|r| d[r] * group[rec + K4_SC + 8 * j + r] as f32);
        let off = std::array::from_fn(|r| -dmin[r] * group[rec + K4_M + 8 * j + r] as f32);
        (rec + K4_CODES + 128 * j, sc, sc, off)
    } else {
        let rec = b * RB;
        let d = row8(rec);
        match KIND {
            0 => (rec + 16, d, d, d.map(|d| -8.0 * d)),
            1 => (rec + 32, d, d, row8(rec + 16)),
            _ => (rec + 16, d, d, [0.0; 8]),
        }
    }
}

/// Bytes of one run of 32 codes of `KIND` in a record (Q6_K and Q5_0 carry high-bit
/// registers after the nibbles).
const fn run_bytes<const KIND: u8>() -> usize {
    match KIND {
        2 => 256,
        4 => 192,
        5 => 160,
        _ => 128,
    }
}

/// The portable group product: the packed codes read lane by lane, integer sums per
/// block, the floats of the SIMD kernels (the reference they are tested against, and
/// the kernel of CPUs with none of them).
pub(crate) mod portable {
    use super::{k6_high, parts, q5_high};

    /// Code `e` (0 even, 1 odd) of pair `p` of row `r` in the run at `run`.
    #[inline(always)]
    fn code<const KIND: u8>(run: &[u8], p: usize, r: usize, e: usize) -> i32 {
        let lane = 2 * (2 * r + e);
        if KIND == 2 {
            return run[(p / 2) * 32 + lane + p % 2] as i8 as i32;
        }
        let at = (p / 4) * 32 + lane;
        let v = u16::from_le_bytes([run[at], run[at + 1]]);
        let c = ((v >> (4 * (p % 4))) & 0x0f) as i32;
        match KIND {
            4 => {
                let (byte, shift) = k6_high(r, 2 * p + e);
                c | (((run[byte] >> shift) & 3) as i32) << 4
            }
            5 => {
                let (byte, bit) = q5_high(r, 2 * p + e);
                c | (((run[byte] >> bit) & 1) as i32) << 4
            }
            _ => c,
        }
    }

    /// [`dot_group`] of format `ty` (tests).
    #[cfg(test)]
    pub fn dot_group_of(
        ty: super::GgmlType,
        group: &[u8],
        nb: usize,
        x: &[i16],
        xd: &[f32],
        xs: &[i32],
    ) -> [f32; 8] {
        use super::GgmlType;
        assert!(x.len() >= 32 * nb);
        // SAFETY: `x` holds `32 · nb` codes.
        super::by_kind!(ty, |K, RB| unsafe {
            dot_group::<K, RB>(group, nb, x.as_ptr(), xd, xs)
        })
    }

    /// See [`super::GroupDot`].
    ///
    /// # Safety
    /// `x` points at `32 · nb` codes (every other read is through slices).
    pub unsafe fn dot_group<const KIND: u8, const RB: usize>(
        group: &[u8],
        nb: usize,
        x: *const i16,
        xd: &[f32],
        xs: &[i32],
    ) -> [f32; 8] {
        // SAFETY: the caller gives `32 · nb` codes at `x` (GroupDot's contract).
        let x = unsafe { std::slice::from_raw_parts(x, 32 * nb) };
        let mut acc = [0f32; 8];
        for b in 0..nb {
            let (at, d, d_hi, off) = parts::<KIND, RB>(group, b);
            let run = &group[at..at + super::run_bytes::<KIND>()];
            let xb = &x[32 * b..32 * b + 32];
            for r in 0..8 {
                let mut half = [0i32; 2];
                for p in 0..16 {
                    for e in 0..2 {
                        let mut c = code::<KIND>(run, p, r, e);
                        match KIND {
                            4 => c -= 32,
                            5 => c -= 16,
                            _ => {}
                        }
                        half[p / 8] += c * xb[2 * p + e] as i32;
                    }
                }
                let mut y = (half[0] as f32 * d[r] + half[1] as f32 * d_hi[r]) * xd[b];
                if KIND != 2 && KIND != 4 && KIND != 5 {
                    y += off[r] * (xd[b] * xs[b] as f32);
                }
                acc[r] += y;
            }
        }
        acc
    }
}

/// The group product on AArch64's NEON (part of the base architecture): each 32-byte
/// code register as two 128-bit halves (rows 0–3, rows 4–7), widening 16-bit
/// multiply-adds (`smlal`) and a pairwise add per block.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use super::parts;
    use std::arch::aarch64::*;

    /// Half `h` of register `reg`'s code vectors of a nibble kind (Q6_K with its high
    /// bits, minus 32): pairs `4·reg..4·reg + 4`.
    #[inline(always)]
    unsafe fn nibble_codes<const KIND: u8>(run: *const u8, reg: usize, h: usize) -> [int16x8_t; 4] {
        unsafe {
            let v = vld1q_u16(run.add(32 * reg + 16 * h).cast());
            let lo4 = vdupq_n_u16(0x0f);
            let nib = |s: i16| vandq_u16(vshlq_u16(v, vdupq_n_s16(-4 * s)), lo4);
            let c = [nib(0), nib(1), nib(2), nib(3)];
            if KIND == 5 {
                // Q5_0: the high bit of pair p is lane bit p of the run's fifth register.
                let hi = vld1q_u16(run.add(128 + 16 * h).cast());
                let (one, c16) = (vdupq_n_u16(1), vdupq_n_s16(16));
                return std::array::from_fn(|s| {
                    let sh = vdupq_n_s16(-((4 * reg + s) as i16));
                    let top = vshlq_n_u16::<4>(vandq_u16(vshlq_u16(hi, sh), one));
                    vsubq_s16(vreinterpretq_s16_u16(vorrq_u16(c[s], top)), c16)
                });
            }
            if KIND != 4 {
                return c.map(|v| vreinterpretq_s16_u16(v));
            }
            let hi = vld1q_u16(run.add(128 + 32 * (reg / 2) + 16 * h).cast());
            let (three, c32) = (vdupq_n_u16(3), vdupq_n_s16(32));
            std::array::from_fn(|s| {
                let sh = vdupq_n_s16(-((8 * (reg % 2) + 2 * s) as i16));
                let top = vshlq_n_u16::<4>(vandq_u16(vshlq_u16(hi, sh), three));
                vsubq_s16(vreinterpretq_s16_u16(vorrq_u16(c[s], top)), c32)
            })
        }
    }

    /// See [`super::GroupDot`].
    ///
    /// # Safety
    /// As [`super::GroupDot`] (NEON is always present on AArch64).
    pub unsafe fn dot_group<const KIND: u8, const RB: usize>(
        group: &[u8],
        nb: usize,
        x: *const i16,
        xd: &[f32],
        xs: &[i32],
    ) -> [f32; 8] {
        assert!(xd.len() >= nb && xs.len() >= nb);
        unsafe {
            let mut accf = [vdupq_n_f32(0.0); 2];
            for b in 0..nb {
                let (at, d, d_hi, off) = parts::<KIND, RB>(group, b);
                assert!(group.len() >= at + super::run_bytes::<KIND>());
                let run = group.as_ptr().add(at);
                let xb = x.add(32 * b);
                // The activation pair (2p, 2p + 1) in every 32-bit lane.
                let pair = |p: usize| {
                    vreinterpretq_s16_s32(vdupq_n_s32(xb.add(2 * p).cast::<i32>().read_unaligned()))
                };
                // [half][scale]: lanes (2r', 2r' + 1) of rows 0, 1 (low) and 2, 3 (high).
                let mut lo = [[vdupq_n_s32(0); 2]; 2];
                let mut hi = [[vdupq_n_s32(0); 2]; 2];
                let mut add = |h: usize, k: usize, w: int16x8_t, xp: int16x8_t| {
                    lo[h][k] = vmlal_s16(lo[h][k], vget_low_s16(w), vget_low_s16(xp));
                    hi[h][k] = vmlal_high_s16(hi[h][k], w, xp);
                };
                if KIND == 2 {
                    for reg in 0..8 {
                        for h in 0..2 {
                            let v = vld1q_s16(run.add(32 * reg + 16 * h).cast());
                            let w0 = vshrq_n_s16::<8>(vshlq_n_s16::<8>(v));
                            let w1 = vshrq_n_s16::<8>(v);
                            add(h, reg / 4, w0, pair(2 * reg));
                            add(h, reg / 4, w1, pair(2 * reg + 1));
                        }
                    }
                } else {
                    for reg in 0..4 {
                        for h in 0..2 {
                            let w = nibble_codes::<KIND>(run, reg, h);
                            for (s, w) in w.into_iter().enumerate() {
                                add(h, reg / 2, w, pair(4 * reg + s));
                            }
                        }
                    }
                }
                let xdb = vdupq_n_f32(xd[b]);
                for h in 0..2 {
                    let rows = |k: usize| vcvtq_f32_s32(vpaddq_s32(lo[h][k], hi[h][k]));
                    let dv = vmulq_f32(vld1q_f32(d.as_ptr().add(4 * h)), xdb);
                    let dh = vmulq_f32(vld1q_f32(d_hi.as_ptr().add(4 * h)), xdb);
                    let (s0, s1) = (rows(0), rows(1));
                    let y = if KIND == 4 {
                        vfmaq_f32(vmulq_f32(s0, dv), s1, dh)
                    } else {
                        vmulq_f32(vaddq_f32(s0, s1), dv)
                    };
                    accf[h] = vaddq_f32(accf[h], y);
                    if KIND != 2 && KIND != 4 && KIND != 5 {
                        let o = vld1q_f32(off.as_ptr().add(4 * h));
                        accf[h] = vfmaq_f32(accf[h], o, vdupq_n_f32(xd[b] * xs[b] as f32));
                    }
                }
            }
            let mut out = [0f32; 8];
            vst1q_f32(out.as_mut_ptr(), accf[0]);
            vst1q_f32(out.as_mut_ptr().add(4), accf[1]);
            out
        }
    }
}

/// The group product on WebAssembly SIMD128 (builds with `+simd128`, which every
/// current browser runs): `i32x4.dot_i16x8_s` is x86's `pmaddwd` on 128 bits, so each
/// half of a 32-byte code register (rows 0–3, rows 4–7) gives four rows' sums.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) mod simd128 {
    use super::parts;
    use std::arch::wasm32::*;

    /// Half `h` of register `reg`'s code vectors of a nibble kind (Q6_K with its high
    /// bits, minus 32): pairs `4·reg..4·reg + 4`.
    #[inline(always)]
    unsafe fn nibble_codes<const KIND: u8>(run: *const u8, reg: usize, h: usize) -> [v128; 4] {
        unsafe {
            let v = v128_load(run.add(32 * reg + 16 * h).cast());
            let lo4 = i16x8_splat(0x0f);
            let c: [v128; 4] = std::array::from_fn(|s| v128_and(u16x8_shr(v, 4 * s as u32), lo4));
            if KIND == 5 {
                // Q5_0: the high bit of pair p is lane bit p of the run's fifth register.
                let hi = v128_load(run.add(128 + 16 * h).cast());
                let (one, c16) = (i16x8_splat(1), i16x8_splat(16));
                return std::array::from_fn(|s| {
                    let top = i16x8_shl(v128_and(u16x8_shr(hi, (4 * reg + s) as u32), one), 4);
                    i16x8_sub(v128_or(c[s], top), c16)
                });
            }
            if KIND != 4 {
                return c;
            }
            let hi = v128_load(run.add(128 + 32 * (reg / 2) + 16 * h).cast());
            let (three, c32) = (i16x8_splat(3), i16x8_splat(32));
            std::array::from_fn(|s| {
                let sh = (8 * (reg % 2) + 2 * s) as u32;
                let top = i16x8_shl(v128_and(u16x8_shr(hi, sh), three), 4);
                i16x8_sub(v128_or(c[s], top), c32)
            })
        }
    }

    /// See [`super::GroupDot`].
    ///
    /// # Safety
    /// As [`super::GroupDot`] (SIMD128 is enabled at build time).
    pub unsafe fn dot_group<const KIND: u8, const RB: usize>(
        group: &[u8],
        nb: usize,
        x: *const i16,
        xd: &[f32],
        xs: &[i32],
    ) -> [f32; 8] {
        assert!(xd.len() >= nb && xs.len() >= nb);
        unsafe {
            let mut accf = [f32x4_splat(0.0); 2];
            for b in 0..nb {
                let (at, d, d_hi, off) = parts::<KIND, RB>(group, b);
                assert!(group.len() >= at + super::run_bytes::<KIND>());
                let run = group.as_ptr().add(at);
                let xb = x.add(32 * b);
                let pair = |p: usize| i32x4_splat(xb.add(2 * p).cast::<i32>().read_unaligned());
                // [half][scale]: four rows' sums each.
                let mut acc = [[i32x4_splat(0); 2]; 2];
                if KIND == 2 {
                    for reg in 0..8 {
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let v = v128_load(run.add(32 * reg + 16 * h).cast());
                            let w0 = i16x8_shr(i16x8_shl(v, 8), 8);
                            let w1 = i16x8_shr(v, 8);
                            let a = &mut acc[reg / 4];
                            *a = i32x4_add(*a, i32x4_dot_i16x8(w0, pair(2 * reg)));
                            *a = i32x4_add(*a, i32x4_dot_i16x8(w1, pair(2 * reg + 1)));
                        }
                    }
                } else {
                    for reg in 0..4 {
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let w = nibble_codes::<KIND>(run, reg, h);
                            let a = &mut acc[reg / 2];
                            for (s, w) in w.into_iter().enumerate() {
                                *a = i32x4_add(*a, i32x4_dot_i16x8(w, pair(4 * reg + s)));
                            }
                        }
                    }
                }
                let xdb = f32x4_splat(xd[b]);
                for h in 0..2 {
                    let (s0, s1) = (
                        f32x4_convert_i32x4(acc[h][0]),
                        f32x4_convert_i32x4(acc[h][1]),
                    );
                    let dv = f32x4_mul(v128_load(d.as_ptr().add(4 * h).cast()), xdb);
                    let dh = f32x4_mul(v128_load(d_hi.as_ptr().add(4 * h).cast()), xdb);
                    let y = if KIND == 4 {
                        f32x4_add(f32x4_mul(s0, dv), f32x4_mul(s1, dh))
                    } else {
                        f32x4_mul(f32x4_add(s0, s1), dv)
                    };
                    accf[h] = f32x4_add(accf[h], y);
                    if KIND != 2 && KIND != 4 && KIND != 5 {
                        let o = v128_load(off.as_ptr().add(4 * h).cast());
                        let xsum = f32x4_splat(xd[b] * xs[b] as f32);
                        accf[h] = f32x4_add(accf[h], f32x4_mul(o, xsum));
                    }
                }
            }
            let mut out = [0f32; 8];
            v128_store(out.as_mut_ptr().cast(), accf[0]);
            v128_store(out.as_mut_ptr().add(4).cast(), accf[1]);
            out
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

    /// A Q6_K run's four code vectors of pairs `4·reg..4·reg + 4`: the low nibbles of
    /// register `reg` with their high 2 bits from the run's high registers, minus 32.
    ///
    /// # Safety
    /// AVX2; `run` points at a Q6_K run (192 bytes).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn q6_codes(run: *const u8, reg: usize) -> [__m256i; 4] {
        unsafe {
            let lo = q4_codes(_mm256_loadu_si256(run.add(32 * reg).cast()));
            let h = _mm256_loadu_si256(run.add(128 + 32 * (reg / 2)).cast());
            let (three, c32) = (_mm256_set1_epi16(3), _mm256_set1_epi16(32));
            std::array::from_fn(|s| {
                let sh = _mm_cvtsi32_si128((8 * (reg % 2) + 2 * s) as i32);
                let hi = _mm256_and_si256(_mm256_srl_epi16(h, sh), three);
                _mm256_sub_epi16(_mm256_or_si256(lo[s], _mm256_slli_epi16(hi, 4)), c32)
            })
        }
    }

    /// A Q5_0 run's four code vectors of pairs `4·reg..4·reg + 4`: the low nibbles of
    /// register `reg` with their high bit from the run's fifth register, minus 16.
    ///
    /// # Safety
    /// AVX2; `run` points at a Q5_0 run (160 bytes).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn q5_codes(run: *const u8, reg: usize) -> [__m256i; 4] {
        unsafe {
            let lo = q4_codes(_mm256_loadu_si256(run.add(32 * reg).cast()));
            let h = _mm256_loadu_si256(run.add(128).cast());
            let (one, c16) = (_mm256_set1_epi16(1), _mm256_set1_epi16(16));
            std::array::from_fn(|s| {
                let sh = _mm_cvtsi32_si128((4 * reg + s) as i32);
                let hi = _mm256_and_si256(_mm256_srl_epi16(h, sh), one);
                _mm256_sub_epi16(_mm256_or_si256(lo[s], _mm256_slli_epi16(hi, 4)), c16)
            })
        }
    }

    /// Register `reg`'s four code vectors of a block of a nibble kind (Q4_0, Q4_1, Q4_K;
    /// Q6_K with its high bits): pairs `4·reg..4·reg + 4`.
    ///
    /// # Safety
    /// AVX2; `codes` points at the block's code registers.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn nibble_codes<const KIND: u8>(codes: *const u8, reg: usize) -> [__m256i; 4] {
        unsafe {
            match KIND {
                4 => q6_codes(codes, reg),
                5 => q5_codes(codes, reg),
                _ => q4_codes(_mm256_loadu_si256(codes.add(32 * reg).cast())),
            }
        }
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

    /// Block `b` (32 values) of a packed group of `KIND` (0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4_K,
    /// 4 Q6_K; records of `RB` bytes): its codes' address, the eight rows' scales of its
    /// first and last 16 values (the same but for Q6_K) and their offset (`w = scale ·
    /// code + offset`; Q4_0's offset −8·d, Q4_1's min, Q4_K's −dmin·m).
    ///
    /// # Safety
    /// AVX2 and F16C; `group` holds the record of block `b`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn parts<const KIND: u8, const RB: usize>(
        group: *const u8,
        b: usize,
    ) -> (*const u8, __m256, __m256, __m256) {
        unsafe {
            if KIND == 3 || KIND == 4 {
                let (rec, j) = (group.add(b / 8 * RB), b % 8);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.cast()));
                let row_bytes = |at: usize, signed: bool| {
                    let v = _mm_loadl_epi64(rec.add(at).cast());
                    _mm256_cvtepi32_ps(if signed {
                        _mm256_cvtepi8_epi32(v)
                    } else {
                        _mm256_cvtepu8_epi32(v)
                    })
                };
                if KIND == 4 {
                    let (lo, hi) = (
                        row_bytes(super::K6_SC + 16 * j, true),
                        row_bytes(super::K6_SC + 16 * j + 8, true),
                    );
                    return (
                        rec.add(super::K6_CODES + super::K6_RUN * j),
                        _mm256_mul_ps(d, lo),
                        _mm256_mul_ps(d, hi),
                        _mm256_setzero_ps(),
                    );
                }
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16).cast()));
                let neg = _mm256_sub_ps(_mm256_setzero_ps(), dmin);
                let sc = _mm256_mul_ps(d, row_bytes(super::K4_SC + 8 * j, false));
                (
                    rec.add(super::K4_CODES + 128 * j),
                    sc,
                    sc,
                    _mm256_mul_ps(neg, row_bytes(super::K4_M + 8 * j, false)),
                )
            } else {
                let rec = group.add(b * RB);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.cast()));
                match KIND {
                    0 => (rec.add(16), d, d, _mm256_mul_ps(_mm256_set1_ps(-8.0), d)),
                    1 => (
                        rec.add(32),
                        d,
                        d,
                        _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16).cast())),
                    ),
                    _ => (rec.add(16), d, d, _mm256_setzero_ps()),
                }
            }
        }
    }

    /// Records of `RB` bytes that `nb` blocks of 32 values of `KIND` take.
    pub const fn records<const KIND: u8>(nb: usize) -> usize {
        if KIND == 3 || KIND == 4 {
            nb.div_ceil(8)
        } else {
            nb
        }
    }

    /// The eight rows of a packed group of `KIND` ([`parts`]; `nb` blocks of 32 values)
    /// times one activation row: 16-bit codes `x` (`32 · nb`), block scales `xd` and
    /// code sums `xs`. Returns the eight dot products.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `group` holds the records of `nb` blocks; `x` points at
    /// `32 · nb` codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_group<const KIND: u8, const RB: usize>(
        group: &[u8],
        nb: usize,
        x: *const i16,
        xd: &[f32],
        xs: &[i32],
    ) -> [f32; 8] {
        assert!(group.len() >= records::<KIND>(nb) * RB && xd.len() >= nb && xs.len() >= nb);
        let (mut accf, mut offv) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        unsafe {
            // The activation pair (2p, 2p + 1) in every 32-bit lane.
            let pair = |xb: *const i16, p: usize| {
                _mm256_set1_epi32(xb.add(2 * p).cast::<i32>().read_unaligned())
            };
            for b in 0..nb {
                let (rec, d, d_hi, off) = parts::<KIND, RB>(group.as_ptr(), b);
                let xb = x.add(32 * b);
                let mut acc = [_mm256_setzero_si256(); 4];
                if KIND == 2 {
                    for reg in 0..8 {
                        let v = _mm256_loadu_si256(rec.add(32 * reg).cast());
                        let [w0, w1] = q8_codes(v);
                        let a = &mut acc[reg / 4 * 2..reg / 4 * 2 + 2];
                        a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(w0, pair(xb, 2 * reg)));
                        a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(w1, pair(xb, 2 * reg + 1)));
                    }
                } else {
                    for reg in 0..4 {
                        let w = nibble_codes::<KIND>(rec, reg);
                        for (s, w) in w.into_iter().enumerate() {
                            // Q6_K: registers 0, 1 hold values 0..16 and 2, 3 values
                            // 16..32 (two scales) into acc 0, 1 and 2, 3.
                            let k = if KIND == 4 { reg / 2 * 2 + s % 2 } else { s };
                            acc[k] = _mm256_add_epi32(
                                acc[k],
                                _mm256_madd_epi16(w, pair(xb, 4 * reg + s)),
                            );
                        }
                    }
                }
                let xdb = _mm256_set1_ps(xd[b]);
                let (lo, hi) = (
                    _mm256_add_epi32(acc[0], acc[1]),
                    _mm256_add_epi32(acc[2], acc[3]),
                );
                if KIND == 4 {
                    accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(d, xdb), accf);
                    accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(d_hi, xdb), accf);
                } else {
                    let sum = _mm256_add_epi32(lo, hi);
                    accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, xdb), accf);
                }
                // Offsets: Σ offset · x = offset · xd · (code sum).
                if KIND != 2 && KIND != 4 && KIND != 5 {
                    offv = _mm256_fmadd_ps(off, _mm256_set1_ps(xd[b] * xs[b] as f32), offv);
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
    /// AVX2, FMA and F16C; `group` holds the records of `cols / 32` blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_f32<const KIND: u8, const RB: usize>(
        group: &[u8],
        cols: usize,
        out: &mut [f32],
    ) {
        let nb = cols / 32;
        assert!(group.len() >= records::<KIND>(nb) * RB && out.len() >= 8 * cols);
        let o = out.as_mut_ptr();
        unsafe {
            for b in 0..nb {
                let (rec, d, d_hi, off) = parts::<KIND, RB>(group.as_ptr(), b);
                // Lanes (2r, 2r + 1) of a pair's values belong to row r.
                let (lo_rows, hi_rows) = (
                    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                    _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
                );
                let spread = |v: __m256| {
                    (
                        _mm256_permutevar8x32_ps(v, lo_rows),
                        _mm256_permutevar8x32_ps(v, hi_rows),
                    )
                };
                // Scales of pairs 0..8 and 8..16 (Q6_K's two; the same otherwise).
                let scales = [spread(d), spread(d_hi)];
                let (olo, ohi) = (
                    _mm256_permutevar8x32_ps(off, lo_rows),
                    _mm256_permutevar8x32_ps(off, hi_rows),
                );
                // Stores pair p's two values of each of the eight rows.
                let store = |w: __m256i, p: usize| {
                    let at = o.add(b * 32 + 2 * p);
                    let (dlo, dhi) = scales[p / 8];
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
                        let v = _mm256_loadu_si256(rec.add(32 * reg).cast());
                        for (s, w) in q8_codes(v).into_iter().enumerate() {
                            store(w, 2 * reg + s);
                        }
                    }
                } else {
                    for reg in 0..4 {
                        let w = nibble_codes::<KIND>(rec, reg);
                        for (s, w) in w.into_iter().enumerate() {
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
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// The eight rows of a packed group of `KIND` (see [`super::avx2::parts`]; `nb`
    /// blocks of 32 values) times `TT` activation rows (16-bit codes `x[j]`, block
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
        assert!(group.len() >= super::avx2::records::<KIND>(nb) * RB);
        let mut facc = [_mm256_setzero_ps(); TT];
        unsafe {
            for b in 0..nb {
                let (rec, d, d_hi, m) = super::avx2::parts::<KIND, RB>(group.as_ptr(), b);
                // Q6_K: the last 16 values (their own scale) in `acc_hi`.
                let mut acc = [_mm256_setzero_si256(); TT];
                let mut acc_hi = [_mm256_setzero_si256(); TT];
                let pair = |j: usize, p: usize| {
                    _mm256_set1_epi32(x[j].add(32 * b + 2 * p).cast::<i32>().read_unaligned())
                };
                if KIND == 2 {
                    for reg in 0..8 {
                        let v = _mm256_loadu_si256(rec.add(32 * reg).cast());
                        let [w0, w1] = super::avx2::q8_codes(v);
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_dpwssd_epi32(*a, w0, pair(j, 2 * reg));
                            *a = _mm256_dpwssd_epi32(*a, w1, pair(j, 2 * reg + 1));
                        }
                    }
                } else {
                    for reg in 0..4 {
                        let w = super::avx2::nibble_codes::<KIND>(rec, reg);
                        // Q6_K: values 16..32 (registers 2, 3) have their own scale.
                        let acc = if KIND == 4 && reg >= 2 {
                            &mut acc_hi
                        } else {
                            &mut acc
                        };
                        for (s, w) in w.into_iter().enumerate() {
                            for (j, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_dpwssd_epi32(*a, w, pair(j, 4 * reg + s));
                            }
                        }
                    }
                }
                for j in 0..TT {
                    let xdb = *xd[j].add(b);
                    facc[j] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(acc[j]),
                        _mm256_mul_ps(d, _mm256_set1_ps(xdb)),
                        facc[j],
                    );
                    if KIND == 4 {
                        facc[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(acc_hi[j]),
                            _mm256_mul_ps(d_hi, _mm256_set1_ps(xdb)),
                            facc[j],
                        );
                    }
                    if KIND != 2 && KIND != 4 && KIND != 5 {
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
    fn the_kernel_table_matches_the_records() {
        for ty in FORMATS {
            assert!(repacked(ty));
            let (kind, rb) = by_kind!(ty, |K, RB| (K, RB));
            assert_eq!(rb, record_bytes(ty), "{ty:?}");
            assert_eq!(kind == 2, ty == GgmlType::Q8_0);
        }
    }

    /// The kernel [`group_dot`] picks on this CPU (AVX2, NEON, SIMD128) and the portable
    /// one against an f64 product of the dequantized rows, on random groups with finite
    /// scales and 16-bit activation codes: the integer sums are exact, so the bound is
    /// the f32 rounding of the per-block scaling (1e-5 of Σ|w·x|).
    #[test]
    fn simd_and_portable_group_products_match_f64() {
        let mut rng = StdRng::seed_from_u64(crate::runtime::test_util::seed());
        for ty in FORMATS {
            let (bw, bb) = ty.block();
            for blocks in [1, 3] {
                let cols = blocks * bw;
                let row_bytes = blocks * bb;
                let mut bytes: Vec<u8> = (0..GROUP * row_bytes).map(|_| rng.random()).collect();
                // Finite scales (and mins): f16 values in ±0.05.
                for blk in bytes.chunks_exact_mut(bb) {
                    for &at in super::super::qmat::scale_fields(ty) {
                        let v = half::f16::from_f32(rng.random_range(-0.05f32..0.05));
                        blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
                    }
                }
                let group = pack(ty, GROUP, row_bytes, &bytes, &[]);
                let nb = cols / 32;
                let x: Vec<i16> = (0..cols).map(|_| rng.random()).collect();
                let xd: Vec<f32> = (0..nb).map(|_| rng.random_range(1e-5f32..1e-3)).collect();
                let xs: Vec<i32> = x
                    .chunks(32)
                    .map(|c| c.iter().map(|&v| v as i32).sum())
                    .collect();
                let w = super::super::ggml::dequantize(ty, &bytes, GROUP * cols).unwrap();
                // SAFETY: `group_dot` picks a kernel this CPU runs; the group and the
                // activations hold `nb` blocks.
                let simd = unsafe { group_dot(ty, true)(&group, nb, x.as_ptr(), &xd, &xs) };
                let portable = portable::dot_group_of(ty, &group, nb, &x, &xd, &xs);
                for r in 0..GROUP {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for c in 0..cols {
                        let xv = x[c] as f64 * xd[c / 32] as f64;
                        want += w[r * cols + c] as f64 * xv;
                        mag += (w[r * cols + c] as f64 * xv).abs();
                    }
                    let bound = 1e-5 * mag + 1e-9;
                    for (what, got) in [("selected", simd[r]), ("portable", portable[r])] {
                        assert!(
                            (got as f64 - want).abs() <= bound,
                            "{ty:?} {what} row {r}: {got} vs {want} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packing_round_trips_every_row() {
        let mut rng = StdRng::seed_from_u64(crate::runtime::test_util::seed());
        for ty in FORMATS {
            let bb = ty.block().1;
            let (rows, nb) = (16, 5);
            let bytes: Vec<u8> = (0..rows * nb * bb).map(|_| rng.random()).collect();
            let packed = pack(ty, rows, nb * bb, &bytes, &[]);
            let gb = group_bytes(ty, nb * bb);
            assert_eq!(packed.len(), rows / GROUP * gb);
            let mut row = vec![0u8; nb * bb];
            for r in 0..rows {
                let g = &packed[(r / GROUP) * gb..][..gb];
                group_row(ty, g, r % GROUP, &mut row);
                assert_eq!(row, bytes[r * nb * bb..(r + 1) * nb * bb], "{ty:?} row {r}");
            }
        }
    }
}
