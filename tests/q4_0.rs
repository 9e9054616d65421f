//! Q4_0: ggml's bit layout against hand-computed blocks, the quantizer's error bound,
//! the byte and u32-repacked round trips, and the GPU's decoding of the repacked layout
//! (a one-hot input through the linear kernel must return every weight exactly).

mod common;

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::moe::{PackedMatrix, WeightFormat};
use wgsparse::ops::linear::{LinearGpu, LinearLayout};
use wgsparse::quant::q4_0::{
    BLOCK_BYTES, dequantize, from_ggml_bytes, quantize_block, quantize_row, repack, to_ggml_bytes,
    unpack,
};
use wgsparse::{DType, Error, Tensor};

#[test]
fn hand_computed_block_ramp() {
    // x_j = j - 16: max = -16 (j = 0), d = -16 / -8 = 2, q = min(15, trunc(x/2 + 8.5)).
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let b = quantize_block(&x);
    assert_eq!(b.d, f16::from_f32(2.0));
    let qs = [
        0x80, 0x91, 0x91, 0xA2, 0xA2, 0xB3, 0xB3, 0xC4, 0xC4, 0xD5, 0xD5, 0xE6, 0xE6, 0xF7, 0xF7,
        0xF8,
    ];
    assert_eq!(b.qs, qs);
    let mut bytes = vec![0x00, 0x40]; // f16 2.0 = 0x4000, little endian
    bytes.extend_from_slice(&qs);
    assert_eq!(to_ggml_bytes(&[b]), bytes);
    let d = dequantize(&[b]);
    assert_eq!(d[0], -16.0);
    assert_eq!(d[1], -14.0); // code 1
    assert_eq!(d[16], 0.0); // code 8
    assert_eq!(d[31], 14.0); // clamped at 15: (15 - 8) * 2
    // Repacked: word w holds bytes 4w..4w+3 little endian; then the scale word.
    let (words, sb) = repack(&[b]);
    assert_eq!(sb, 4);
    assert_eq!(words[0], 0xA2_91_91_80);
    assert_eq!(words[3], 0xF8_F7_F7_E6);
    assert_eq!(words[4], 0x4000);
}

#[test]
fn hand_computed_block_positive_max_and_zeros() {
    let mut x = vec![0.0f32; 32];
    x[5] = 3.0;
    x[20] = -1.5;
    let b = quantize_block(&x);
    // max = 3, d = -0.375 (f16 0xB600), 1/d = -8/3.
    assert_eq!(b.d.to_bits(), 0xB600);
    let mut qs = [0x88u8; 16];
    qs[5] = 0x80; // x5: trunc(3 * -8/3 + 8.5) = 0; x21: 8
    qs[4] = 0xC8; // x4: 8; x20: trunc(-1.5 * -8/3 + 8.5) = 12
    assert_eq!(b.qs, qs);
    let d = dequantize(&[b]);
    assert_eq!(d[5], 3.0);
    assert_eq!(d[20], -1.5);
    assert!(
        d.iter()
            .enumerate()
            .all(|(j, &v)| j == 5 || j == 20 || v == 0.0)
    );
    let z = quantize_block(&[0.0; 32]);
    // ggml computes d = 0.0f / -8 = -0.0 for an all-zero block.
    assert_eq!(z.d.to_bits(), 0x8000);
    assert_eq!(z.qs, [0x88; 16]);
}

#[test]
fn quantizer_error_bound_and_round_trips() {
    let seed = common::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..32 * 50)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let blocks = quantize_row(&x).unwrap();
    let back = dequantize(&blocks);
    for (bi, b) in blocks.iter().enumerate() {
        let d = b.d.to_f32().abs();
        for j in 0..32 {
            let err = (x[32 * bi + j] - back[32 * bi + j]).abs();
            // Half a step, plus the f16 rounding of d (≤ 8·|d|·2⁻¹¹), except the one
            // clamped code (q = 16 → 15), which is off by up to a whole step.
            let clamped = b.code(j) == 15 && x[32 * bi + j] * b.d.to_f32().signum() > 7.0 * d;
            let bound = if clamped {
                1.01 * d
            } else {
                0.5 * d + d / 128.0 + 1e-7
            };
            assert!(err <= bound, "block {bi} elem {j}: err {err} > {bound}");
        }
    }
    let bytes = to_ggml_bytes(&blocks);
    assert_eq!(bytes.len(), blocks.len() * BLOCK_BYTES);
    assert_eq!(from_ggml_bytes(&bytes).unwrap(), blocks);
    let (words, sb) = repack(&blocks);
    assert_eq!(unpack(&words, sb, blocks.len()).unwrap(), blocks);
    // An odd block count leaves the last scale word half empty.
    let (w3, sb3) = repack(&blocks[..3]);
    assert_eq!(w3.len(), 12 + 2);
    assert_eq!(unpack(&w3, sb3, 3).unwrap(), blocks[..3].to_vec());
    // The packed matrix decodes to the same values (rows of 5 blocks).
    let m = PackedMatrix::pack(WeightFormat::Q4_0, 10, 160, &x).unwrap();
    assert_eq!(m.dequantize(), back);
}

#[test]
fn bad_lengths_are_typed_errors() {
    assert!(matches!(
        quantize_row(&[0.0; 33]),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        from_ggml_bytes(&[0; 19]),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        PackedMatrix::pack(WeightFormat::Q4_0, 2, 48, &[0.0; 96]),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        PackedMatrix::pack(WeightFormat::F16, 2, 64, &[0.0; 100]),
        Err(Error::Mismatch(_))
    ));
    assert!(matches!(unpack(&[0; 9], 4, 2), Err(Error::Mismatch(_))));
}

#[test]
fn gpu_decodes_the_repacked_layout_exactly() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let (n, k) = (40, 96); // 3 blocks per row, 120 blocks: odd scale pairs across rows
    for format in [WeightFormat::Q4_0, WeightFormat::F16] {
        let w = wgsparse::attention::synthetic::gaussian(n * k, seed);
        let m = PackedMatrix::pack(format, n, k, &w).unwrap();
        // Token t is the one-hot vector e_t: y[t, r] = W[r, t], exactly.
        let mut eye = vec![0.0f32; k * k];
        for t in 0..k {
            eye[t * k + t] = 1.0;
        }
        let x = Tensor::from_f32(&ctx, &[k, k], &eye, DType::F32).unwrap();
        let y = Tensor::filled(&ctx, &[k, n], DType::F32, f32::NAN).unwrap();
        let lin = LinearGpu::build(&ctx, "q4_0 probe", &m, k, 0, LinearLayout::default()).unwrap();
        lin.run_blocking(&ctx, &x, &y, None).unwrap();
        let got = y.to_f32_blocking().unwrap();
        let want = m.dequantize();
        for t in 0..k {
            for r in 0..n {
                assert_eq!(
                    got[t * n + r],
                    want[r * k + t],
                    "{format:?} row {r} col {t}"
                );
            }
        }
    }
}
