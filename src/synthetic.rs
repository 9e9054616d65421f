//! Synthetic Q/K/V for speed runs and tests. Clearly synthetic: random Gaussian vectors
//! (fixed seed), not a model's activations.

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::attention::AttentionShape;
use crate::context::Context;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// `len` standard-normal values from `seed` (Box–Muller).
pub fn gaussian(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(len);
    out
}

/// Host Q, K, V for a shape (`[q_heads, seq_len, d]`, `[kv_heads, kv_len, d]` twice).
pub fn qkv_host(shape: &AttentionShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let nq = shape.q_heads * shape.seq_len * shape.head_dim;
    let nk = shape.kv_heads * shape.kv_len * shape.head_dim;
    (
        gaussian(nq, seed),
        gaussian(nk, seed.wrapping_add(1)),
        gaussian(nk, seed.wrapping_add(2)),
    )
}

/// Q, K, V tensors on a context.
pub fn qkv(
    ctx: &Context,
    shape: &AttentionShape,
    dtype: DType,
    seed: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = qkv_host(shape, seed);
    Ok((
        Tensor::from_f32(ctx, &shape.q_dims(), &q, dtype)?,
        Tensor::from_f32(ctx, &shape.kv_dims(), &k, dtype)?,
        Tensor::from_f32(ctx, &shape.kv_dims(), &v, dtype)?,
    ))
}
