//! The CPU path's quantized products checked where they run: in this WASM build (its
//! SIMD128 kernels when built with `+simd128`, as `.cargo/config.toml` does), against an
//! f64 product of the dequantized weights. The browser test calls it on the page.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use wgsparse::quant::{GgmlType, QMat, dequantize};

/// One format's worst product error, as a fraction of its allowed bound.
#[derive(Serialize)]
pub struct FormatCheck {
    /// The GGUF format.
    pub format: String,
    /// Matrix rows and columns, and tokens, of the largest case.
    pub shape: [usize; 3],
    /// max over outputs of |got − f64| / bound (≤ 1 passes).
    pub worst: f64,
}

/// What [`check`] measured.
#[derive(Serialize)]
pub struct KernelCheck {
    /// Whether this build's CPU kernels use WebAssembly SIMD128.
    pub simd128: bool,
    /// The seed of the random weights and activations.
    pub seed: u64,
    /// Each format's worst case.
    pub formats: Vec<FormatCheck>,
    /// Whether every product was within its bound.
    pub ok: bool,
}

/// Random GGUF bytes of `rows × cols` values of `ty`, with finite f16 scales (±0.05).
fn random_bytes(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    wgsparse::quant::ggml::random_bytes(ty, rows * cols, 0.8, rng)
}

/// Every format the decoder keeps quantized, with ragged row counts (whole groups of
/// eight plus a tail) and 1–3 tokens (the integer decode products): bound 1e-4 of
/// Σ|w·x| plus half a 16-bit step of each block's activations times its Σ|w| (the
/// activations' rounding).
pub fn check(seed: u64) -> KernelCheck {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut formats = Vec::new();
    for ty in wgsparse::quant::rows8::FORMATS
        .into_iter()
        .chain([GgmlType::F16])
    {
        let mut worst = 0f64;
        let mut shape = [0; 3];
        for (rows, cols, t) in [(21, 256, 1), (8, 512, 3), (13, 768, 2)] {
            let bytes = random_bytes(ty, rows, cols, &mut rng);
            let w = dequantize(ty, &bytes, rows * cols).expect("valid bytes");
            let m = QMat::new(ty, rows, cols, bytes).expect("valid matrix");
            let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let y = m.apply(&x, t);
            for i in 0..t {
                let xr = &x[i * cols..(i + 1) * cols];
                for r in 0..rows {
                    let wr = &w[r * cols..(r + 1) * cols];
                    let (mut want, mut mag, mut rounding) = (0f64, 0f64, 0f64);
                    for (wb, xb) in wr.chunks(32).zip(xr.chunks(32)) {
                        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                        let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                        rounding += 0.5 * amax / 32767.0 * wsum * 1.001;
                        for (&a, &b) in wb.iter().zip(xb) {
                            want += a as f64 * b as f64;
                            mag += (a as f64 * b as f64).abs();
                        }
                    }
                    let bound = 1e-4 * mag + rounding + 1e-6;
                    let err = (y[i * rows + r] as f64 - want).abs() / bound;
                    // NaN counts as a failure.
                    if err.is_nan() || err > worst {
                        worst = if err.is_nan() { f64::INFINITY } else { err };
                        shape = [rows, cols, t];
                    }
                }
            }
        }
        formats.push(FormatCheck {
            format: format!("{ty:?}"),
            shape,
            worst,
        });
    }
    let ok = formats.iter().all(|f| f.worst <= 1.0);
    KernelCheck {
        simd128: cfg!(target_feature = "simd128"),
        seed,
        formats,
        ok,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_build_passes_its_own_check() {
        use std::hash::{BuildHasher, Hasher};
        // A fresh seed each run (std's randomly keyed hasher).
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let r = super::check(seed);
        assert!(r.ok, "{}", serde_json::to_string(&r).unwrap());
        assert_eq!(r.formats.len(), 7);
    }
}
