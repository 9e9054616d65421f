//! Synthetic Q/K/V for speed runs and tests. Clearly synthetic: random Gaussian vectors
//! (fixed seed), not a model's activations.

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;

use crate::attention::AttentionShape;
use crate::context::Context;
use crate::error::Result;
use crate::tensor::{DType, HostData, Tensor};

/// Values per independently seeded chunk: large tensors are filled in parallel.
const CHUNK: usize = 1 << 20;

/// `len` standard-normal values from `seed` (Box–Muller).
pub fn gaussian(len: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0; len];
    fill_gaussian_chunk(&mut out, seed);
    out
}

fn fill_gaussian_chunk(out: &mut [f32], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for pair in out.chunks_mut(2) {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        pair[0] = (r * t.cos()) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (r * t.sin()) as f32;
        }
    }
}

/// SplitMix64: decorrelates the per-chunk seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` standard-normal values, generated in parallel chunks of 1 Mi values with their
/// own seeds (a 128k-token × 32-head × 128 Q is 512 Mi values).
pub fn gaussian_parallel(len: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0; len];
    let base = mix(seed);
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| fill_gaussian_chunk(c, mix(base ^ i as u64)));
    out
}

/// Host Q, K, V for a shape (`[q_heads, seq_len, d]`, `[kv_heads, kv_len, d]` twice).
pub fn qkv_host(shape: &AttentionShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let nq = shape.q_heads * shape.seq_len * shape.head_dim;
    let nk = shape.kv_heads * shape.kv_len * shape.head_dim;
    (
        gaussian_parallel(nq, seed),
        gaussian_parallel(nk, seed.wrapping_add(1)),
        gaussian_parallel(nk, seed.wrapping_add(2)),
    )
}

/// One tensor of Gaussian values stored as `dtype`, without an intermediate f32 copy
/// for f16.
pub fn tensor(ctx: &Context, dims: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let data = match dtype {
        DType::F16 => {
            let mut v = vec![f16::ZERO; n];
            let base = mix(seed);
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
                let g = gaussian(c.len(), mix(base ^ i as u64));
                for (d, s) in c.iter_mut().zip(g) {
                    *d = f16::from_f32(s);
                }
            });
            HostData::F16(v)
        }
        _ => HostData::from_f32(&gaussian_parallel(n, seed), dtype)?,
    };
    Tensor::from_host(ctx, dims, data)
}

/// Q, K, V tensors on a context: the same values as [`qkv_host`], rounded to `dtype`.
pub fn qkv(
    ctx: &Context,
    shape: &AttentionShape,
    dtype: DType,
    seed: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        tensor(ctx, &shape.q_dims(), dtype, seed)?,
        tensor(ctx, &shape.kv_dims(), dtype, seed.wrapping_add(1))?,
        tensor(ctx, &shape.kv_dims(), dtype, seed.wrapping_add(2))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_hold_the_host_values() {
        let shape = AttentionShape::new(2, 1, 9, 64);
        let (q, _, v) = qkv_host(&shape, 5);
        let ctx = Context::cpu();
        let (qt, _, vt) = qkv(&ctx, &shape, DType::F16, 5).unwrap();
        assert_eq!(
            qt.read_blocking().unwrap().to_f32(),
            DType::F16.round_trip(&q)
        );
        assert_eq!(
            vt.read_blocking().unwrap().to_f32(),
            DType::F16.round_trip(&v)
        );
        let g = gaussian(3 * CHUNK / 2, 1);
        let mean = g.iter().map(|&x| x as f64).sum::<f64>() / g.len() as f64;
        let var = g.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / g.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
    }
}
