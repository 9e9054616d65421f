//! ggml's Q4_0 weight format and its u32-aligned repacking for WGSL.
//!
//! A block holds 32 weights in 18 bytes: an f16 scale `d`, then 16 bytes `qs` where
//! element `j` is the low nibble and element `j + 16` the high nibble of byte `j`. The
//! value of a nibble `q` is `(q − 8)·d`. Quantization follows ggml's
//! `quantize_row_q4_0_ref`: `max` is the signed value of largest magnitude, `d = max/−8`,
//! `q = min(15, trunc(x/d + 8.5))` (with `1/d` computed before `d` is rounded to f16).
//!
//! WGSL has no 16-bit loads and 18-byte blocks are not u32-aligned, so on upload the
//! blocks of a matrix are repacked ([`repack`]): first every block's 16 `qs` bytes as 4
//! little-endian words, then the scales, two per word (even block in the low half).
//! `shaders/quant/weights.wgsl` reads that layout.

use half::f16;

use crate::error::{Error, Result};

/// Weights per block.
pub const QK4_0: usize = 32;
/// Bytes per block in ggml's layout.
pub const BLOCK_BYTES: usize = 18;

/// One Q4_0 block, as ggml lays it out (`#[repr(C)]`: 18 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Nibbles: element `j` low, element `j + 16` high, of byte `j`.
    pub qs: [u8; 16],
}

impl BlockQ4_0 {
    /// The 4-bit code of element `j` (0..32).
    pub fn code(&self, j: usize) -> u8 {
        if j < 16 {
            self.qs[j] & 0x0f
        } else {
            self.qs[j - 16] >> 4
        }
    }
}

/// Quantizes one block of 32 values exactly like ggml's `quantize_row_q4_0_ref`.
pub fn quantize_block(x: &[f32]) -> BlockQ4_0 {
    assert_eq!(x.len(), QK4_0, "a Q4_0 block has 32 values");
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let q0 = ((x0 + 8.5) as i8).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8).min(15) as u8;
        qs[j] = q0 | (q1 << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// Quantizes a row (length a multiple of 32).
pub fn quantize_row(x: &[f32]) -> Result<Vec<BlockQ4_0>> {
    if !x.len().is_multiple_of(QK4_0) {
        return Err(Error::InvalidShape(format!(
            "Q4_0 rows need a multiple of 32 values, got {}",
            x.len()
        )));
    }
    Ok(x.chunks_exact(QK4_0).map(quantize_block).collect())
}

/// Dequantizes one block: `(q − 8)·d`.
pub fn dequantize_block(b: &BlockQ4_0, out: &mut [f32]) {
    decode(b.d.to_f32(), &b.qs, out);
}

/// Dequantizes one block in ggml's 18-byte layout (the GGUF reader's path).
pub fn dequantize_ggml_block(bytes: &[u8], out: &mut [f32]) {
    let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
    decode(d, &bytes[2..BLOCK_BYTES], out);
}

/// `(q − 8)·d` of the 32 nibbles of `qs` (element `j` low, `j + 16` high nibble).
fn decode(d: f32, qs: &[u8], out: &mut [f32]) {
    for (j, &byte) in qs.iter().enumerate().take(QK4_0 / 2) {
        out[j] = ((byte & 0x0f) as f32 - 8.0) * d;
        out[j + QK4_0 / 2] = ((byte >> 4) as f32 - 8.0) * d;
    }
}

/// Dequantizes blocks back to values.
pub fn dequantize(blocks: &[BlockQ4_0]) -> Vec<f32> {
    let mut out = vec![0.0; blocks.len() * QK4_0];
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK4_0)) {
        dequantize_block(b, o);
    }
    out
}

/// ggml's byte layout: 18 bytes per block (`d` little endian, then `qs`).
pub fn to_ggml_bytes(blocks: &[BlockQ4_0]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * BLOCK_BYTES);
    for b in blocks {
        out.extend_from_slice(&b.d.to_bits().to_le_bytes());
        out.extend_from_slice(&b.qs);
    }
    out
}

/// Reads ggml's byte layout.
pub fn from_ggml_bytes(bytes: &[u8]) -> Result<Vec<BlockQ4_0>> {
    if !bytes.len().is_multiple_of(BLOCK_BYTES) {
        return Err(Error::InvalidShape(format!(
            "{} bytes are not a whole number of 18-byte Q4_0 blocks",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(BLOCK_BYTES)
        .map(|c| {
            let mut qs = [0u8; 16];
            qs.copy_from_slice(&c[2..]);
            BlockQ4_0 {
                d: f16::from_bits(u16::from_le_bytes([c[0], c[1]])),
                qs,
            }
        })
        .collect())
}

/// The u32 layout the kernels read: `4 · n` nibble words, then `ceil(n / 2)` scale words.
/// Returns the words and the index of the first scale word.
pub fn repack(blocks: &[BlockQ4_0]) -> (Vec<u32>, u32) {
    let n = blocks.len();
    let mut words = Vec::with_capacity(4 * n + n.div_ceil(2));
    for b in blocks {
        for w in 0..4 {
            words.push(u32::from_le_bytes([
                b.qs[4 * w],
                b.qs[4 * w + 1],
                b.qs[4 * w + 2],
                b.qs[4 * w + 3],
            ]));
        }
    }
    let scale_base = words.len() as u32;
    for pair in blocks.chunks(2) {
        let lo = pair[0].d.to_bits() as u32;
        let hi = pair.get(1).map_or(0, |b| b.d.to_bits() as u32);
        words.push(lo | (hi << 16));
    }
    (words, scale_base)
}

/// Inverse of [`repack`] (`n` blocks).
pub fn unpack(words: &[u32], scale_base: u32, n: usize) -> Result<Vec<BlockQ4_0>> {
    let sb = scale_base as usize;
    if sb != 4 * n || words.len() < sb + n.div_ceil(2) {
        return Err(Error::Mismatch(format!(
            "{} words with scales at {sb} do not hold {n} repacked Q4_0 blocks",
            words.len()
        )));
    }
    Ok((0..n)
        .map(|i| {
            let mut qs = [0u8; 16];
            for w in 0..4 {
                qs[4 * w..4 * w + 4].copy_from_slice(&words[4 * i + w].to_le_bytes());
            }
            let s = words[sb + i / 2];
            let bits = if i.is_multiple_of(2) {
                s & 0xffff
            } else {
                s >> 16
            };
            BlockQ4_0 {
                d: f16::from_bits(bits as u16),
                qs,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_is_18_bytes() {
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), BLOCK_BYTES);
    }
}
