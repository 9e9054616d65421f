//! ggml tensor element types and their dequantization to f32.
//!
//! Block layouts follow ggml (`ggml-common.h`): every quantized type stores fixed-size
//! blocks of 32 (legacy types) or 256 (k-quants) weights with f16 scales. The types the
//! three real models of this crate use are all here: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q6_K. Other ggml types are recognized (sizes known, so a file that
//! holds them still opens) but [`dequantize`] returns a typed error for them.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// A ggml element type, by its GGUF id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// Blocks of 32: f16 scale d, 4-bit q; x = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 d and m, 4-bit q; x = d·q + m.
    Q4_1,
    /// Blocks of 32: f16 d, 5-bit q (high bits packed in a u32); x = d·(q − 16).
    Q5_0,
    /// Blocks of 32: f16 d and m, 5-bit q; x = d·q + m.
    Q5_1,
    /// Blocks of 32: f16 d, i8 q; x = d·q.
    Q8_0,
    /// Blocks of 32 with an f32-style sum (not used by model weights).
    Q8_1,
    /// 2-bit k-quant (not supported for dequantization).
    Q2K,
    /// 3-bit k-quant (not supported for dequantization).
    Q3K,
    /// Super-blocks of 256: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit q.
    Q4K,
    /// 5-bit k-quant (not supported for dequantization).
    Q5K,
    /// Super-blocks of 256: 16 sub-blocks of 16 with i8 scales, 6-bit q.
    Q6K,
    /// 8-bit k-quant (intermediate type of ggml; not supported).
    Q8K,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// The type with GGUF id `id`; a typed error for ids this reader does not know.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            o => return Err(Error::Gguf(format!("unknown ggml tensor type id {o}"))),
        })
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// (weights per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8K => (256, 292),
        }
    }

    /// Bytes of `n` weights (`n` must be a multiple of the block size).
    pub fn bytes_for(self, n: u64) -> Result<u64> {
        let (bw, bb) = self.block();
        if !n.is_multiple_of(bw as u64) {
            return Err(Error::Gguf(format!(
                "{n} weights of {self:?} are not a whole number of {bw}-weight blocks"
            )));
        }
        (n / bw as u64)
            .checked_mul(bb as u64)
            .ok_or_else(|| Error::Gguf(format!("{n} weights of {self:?} overflow u64 bytes")))
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        !matches!(
            self,
            GgmlType::Q8_1 | GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q5K | GgmlType::Q8K
        )
    }
}

/// The f16 at byte `at` of `b`, as f32 (a block's scale or min).
pub(crate) fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn dq_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: low nibbles from `qs`, bit 4 from `qh`.
pub(crate) fn q5_values(qh: u32, qs: &[u8]) -> [i32; 32] {
    let mut v = [0i32; 32];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        v[j] = ((qs[j] & 0x0f) as u32 | xh0) as i32;
        v[j + 16] = ((qs[j] >> 4) as u32 | xh1) as i32;
    }
    v
}

fn dq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (o, q) in y.iter_mut().zip(q5_values(qh, &b[6..22])) {
        *o = (q - 16) as f32 * d;
    }
}

fn dq_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (o, q) in y.iter_mut().zip(q5_values(qh, &b[8..24])) {
        *o = q as f32 * d + m;
    }
}

fn dq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block: 6 bits each, packed in 12
/// bytes (ggml's `get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn dq_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, chunk) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            chunk[l] = d1 * (q[l] & 0x0f) as f32 - min1;
            chunk[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

fn dq_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = h(b, 208);
    for (n, half) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = &sc_all[8 * n..8 * n + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            half[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            half[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            half[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            half[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Dequantizes one block (its bytes) into its values.
type BlockFn = fn(&[u8], &mut [f32]);

/// The block dequantizer of an integer type (`None` for the float types and the ones
/// not supported).
fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::Q4_0 => super::q4_0::dequantize_ggml_block,
        GgmlType::Q4_1 => dq_q4_1,
        GgmlType::Q5_0 => dq_q5_0,
        GgmlType::Q5_1 => dq_q5_1,
        GgmlType::Q8_0 => dq_q8_0,
        GgmlType::Q4K => dq_q4_k,
        GgmlType::Q6K => dq_q6_k,
        _ => return None,
    })
}

/// Dequantizes whole blocks of a type [`GgmlType::can_dequantize`] accepts: `bytes`
/// into `out` (as many values as the blocks hold), sequentially.
pub(crate) fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            let f = block_fn(ty).expect("a type the caller checked");
            let (bw, bb) = ty.block();
            for (y, b) in out.chunks_exact_mut(bw).zip(bytes.chunks_exact(bb)) {
                f(b, y);
            }
        }
    }
}

/// Dequantizes `n` weights of type `ty` stored in `bytes` into f32 (in parallel over
/// blocks). Typed errors: the byte count does not match, or the type is not supported.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = ty.bytes_for(n as u64)?;
    if bytes.len() as u64 != need {
        return Err(Error::Gguf(format!(
            "{n} weights of {ty:?} need {need} bytes, got {}",
            bytes.len()
        )));
    }
    if !ty.can_dequantize() {
        return Err(Error::Gguf(format!(
            "dequantization of {ty:?} is not supported (supported: F32, F16, \
             BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)"
        )));
    }
    let mut out = vec![0f32; n];
    // Chunks of 64 blocks (of 4,096 values for the float types).
    let (bw, bb) = ty.block();
    let blocks = if bw == 1 { 4096 } else { 64 };
    out.par_chunks_mut(bw * blocks)
        .zip(bytes.par_chunks(bb * blocks))
        .for_each(|(ys, bs)| dequantize_into(ty, bs, ys));
    Ok(out)
}

/// Byte offsets of the f16 scale (and min) fields in a block of an integer format: a
/// block's values are finite iff these are (empty for the float formats).
pub fn scale_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// Random bytes of `n` values of `ty` (a whole number of blocks): uniform values in
/// ±`scale` for the float types; for the block types random codes with every f16 scale
/// (and min) field in ±`scale` / 16, so that all values stay finite and of the order
/// of `scale`. Test and benchmark data for every kernel that reads GGUF blocks.
pub fn random_bytes(ty: GgmlType, n: usize, scale: f32, rng: &mut impl rand::Rng) -> Vec<u8> {
    let (bw, bb) = ty.block();
    match ty {
        GgmlType::F32 => (0..n)
            .flat_map(|_| rng.random_range(-scale..scale).to_le_bytes())
            .collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.random_range(-scale..scale)).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_le_bytes())
            .collect(),
        _ => {
            let mut b: Vec<u8> = (0..n / bw * bb).map(|_| rng.random()).collect();
            let s = scale / 16.0;
            for blk in b.chunks_exact_mut(bb) {
                for &at in scale_fields(ty) {
                    blk[at..at + 2]
                        .copy_from_slice(&f16::from_f32(rng.random_range(-s..s)).to_le_bytes());
                }
            }
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_hand_block() {
        // d = 0.5; byte j holds q=j&15 low and q=15-j high.
        let mut b = f16b(0.5).to_vec();
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -4.0); // (0-8)*0.5
        assert_eq!(y[15], 3.5); // (15-8)*0.5
        assert_eq!(y[16], 3.5); // high nibble of byte 0 = 15
        assert_eq!(y[31], -4.0); // high nibble of byte 15 = 0
    }

    #[test]
    fn q4_1_hand_block() {
        let mut b = [f16b(0.25), f16b(-1.0)].concat();
        for j in 0..16u8 {
            b.push(j | (3 << 4));
        }
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0], -1.0);
        assert_eq!(y[7], 0.75); // 7*0.25-1
        assert_eq!(y[20], -0.25); // 3*0.25-1
    }

    #[test]
    fn q5_0_hand_block() {
        // qh bit j = 1 for even j (weights 0..16), bit 16+j = 1 for j = 3 (weight 19).
        let qh: u32 = 0x5555 | (1 << 19);
        let mut b = f16b(2.0).to_vec();
        b.extend_from_slice(&qh.to_le_bytes());
        b.extend([0x21u8; 16]); // low 1, high 2
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!(y[0], ((1 | 16) - 16) as f32 * 2.0); // 2
        assert_eq!(y[1], (1 - 16) as f32 * 2.0); // -30
        assert_eq!(y[16], (2 - 16) as f32 * 2.0); // -28
        assert_eq!(y[19], ((2 | 16) - 16) as f32 * 2.0); // 4
    }

    #[test]
    fn q5_1_hand_block() {
        let qh: u32 = 1 << 31; // weight 31 gets bit 4
        let mut b = [f16b(0.5), f16b(1.0)].concat();
        b.extend_from_slice(&qh.to_le_bytes());
        b.extend([0xf3u8; 16]);
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert_eq!(y[0], 3.0 * 0.5 + 1.0);
        assert_eq!(y[30], 15.0 * 0.5 + 1.0);
        assert_eq!(y[31], 31.0 * 0.5 + 1.0);
    }

    #[test]
    fn q8_0_hand_block() {
        let mut b = f16b(0.125).to_vec();
        for j in 0..32i32 {
            b.push(((j - 16) as i8) as u8);
        }
        b[2] = (-128i8) as u8;
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -16.0);
        assert_eq!(y[1], -15.0 * 0.125);
        assert_eq!(y[31], 15.0 * 0.125);
    }

    #[test]
    fn q4_k_hand_block() {
        // d = 1, dmin = 0.5. Sub-block scales 1..8, mins 0..7 (6-bit packing of ggml).
        let sc: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 40];
        let mn: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 33];
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
        }
        for j in 0..8 {
            assert_eq!(
                scale_min_k4(j, &s),
                (sc[j], mn[j]),
                "packing of sub-block {j}"
            );
        }
        let mut b = [f16b(1.0), f16b(0.5)].concat();
        b.extend_from_slice(&s);
        for l in 0..128usize {
            b.push((l % 16) as u8 | ((15 - l % 16) << 4) as u8);
        }
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        // weight 5: chunk 0, low nibble of qs[5] = 5, sub-block 0: 1*5 - 0.5*0
        assert_eq!(y[5], 5.0);
        // weight 32+5: high nibble of qs[5] = 10, sub-block 1: 2*10 - 0.5*1
        assert_eq!(y[37], 19.5);
        // weight 192+2: chunk 3, low nibble of qs[96+2] = 2, sub-block 6: 7*2 - 0.5*6
        assert_eq!(y[194], 11.0);
        // weight 224+2: high nibble = 13, sub-block 7: 40*13 - 0.5*33
        assert_eq!(y[226], 503.5);
    }

    #[test]
    fn q6_k_hand_block() {
        let mut b = vec![0u8; 210];
        // ql[0] = 0x21: q1 low = 1, q3 low = 2; qh[0] = 0b11_10_01_00: q1 hi 0, q2 hi 1,
        // q3 hi 2, q4 hi 3; ql[32] = 0x43: q2 low 3, q4 low 4.
        b[0] = 0x21;
        b[32] = 0x43;
        b[128] = 0b1110_0100;
        // second half: ql[64] low nibble 15, qh[32] low 2 bits 3 -> q = 63 - 32 = 31.
        b[64] = 0x0f;
        b[160] = 0x03;
        let scales: [i8; 16] = [2, -1, 3, 1, -2, 1, 4, 1, 5, 1, 1, 1, 1, 1, 1, 1];
        for (i, s) in scales.iter().enumerate() {
            b[192 + i] = *s as u8;
        }
        b[208..210].copy_from_slice(&f16b(0.5));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        assert_eq!(y[0], 0.5 * 2.0 * (1 - 32) as f32);
        assert_eq!(y[32], 0.5 * 3.0 * ((3 | 16) - 32) as f32);
        assert_eq!(y[64], 0.5 * -2.0 * ((2 | 32) - 32) as f32);
        assert_eq!(y[96], 0.5 * 4.0 * ((4 | 48) - 32) as f32);
        assert_eq!(y[1], 0.5 * 2.0 * -32.0);
        assert_eq!(y[16], -0.5 * -32.0); // l=16 uses scale index 1 (-1)
        assert_eq!(y[128], 0.5 * 5.0 * 31.0);
    }

    #[test]
    fn float_types() {
        let v = [1.5f32, -2.25, 0.0, 1e-3];
        let b32: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &b32, 4).unwrap(), v);
        let b16: Vec<u8> = v.iter().flat_map(|&x| f16b(x)).collect();
        let y = dequantize(GgmlType::F16, &b16, 4).unwrap();
        assert_eq!(&y[..3], &v[..3]);
        assert!((y[3] - 1e-3).abs() < 1e-6);
        let bb: Vec<u8> = v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(&dequantize(GgmlType::BF16, &bb, 4).unwrap()[..3], &v[..3]);
    }

    #[test]
    fn many_blocks_in_order() {
        // 130 Q8_0 blocks (more than one parallel chunk): block i has d = i, q = 1.
        let mut b = Vec::new();
        for i in 0..130 {
            b.extend_from_slice(&f16b(i as f32));
            b.extend_from_slice(&[1u8; 32]);
        }
        let y = dequantize(GgmlType::Q8_0, &b, 130 * 32).unwrap();
        for i in 0..130 {
            assert!(y[i * 32..i * 32 + 32].iter().all(|&x| x == i as f32));
        }
    }

    #[test]
    fn typed_errors() {
        assert!(matches!(GgmlType::from_id(99), Err(Error::Gguf(_))));
        assert!(matches!(
            dequantize(GgmlType::Q4_0, &[0u8; 17], 32),
            Err(Error::Gguf(_))
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_0, &[0u8; 18], 31),
            Err(Error::Gguf(_))
        ));
        assert!(matches!(
            dequantize(GgmlType::Q5K, &[0u8; 176], 256),
            Err(Error::Gguf(_))
        ));
        for id in [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30] {
            assert_eq!(GgmlType::from_id(id).unwrap().id(), id);
        }
    }
}
