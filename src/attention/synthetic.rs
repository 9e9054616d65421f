//! Synthetic Q/K/V for speed runs and tests. Clearly synthetic, not a model's
//! activations: random Gaussian vectors ([`qkv_host`]: attention with no structure, the
//! worst case for sparse methods), or [`structured_qkv_host`]: Gaussian vectors with
//! planted attention structure (sink keys, a local band, a few heavy key columns) and
//! RoPE, for speed and scale runs of sparse methods.

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;

use crate::attention::AttentionShape;
use crate::error::Result;
use crate::runtime::context::Context;
use crate::runtime::tensor::{DType, HostData, Tensor};

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

/// Parameters of [`structured_qkv_host`]. Logit sizes are in natural units after the
/// 1/√d softmax scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Structure {
    /// Leading keys every query attends strongly (attention sinks).
    pub sinks: usize,
    /// Logit boost of a sink key.
    pub sink_logit: f32,
    /// Heavy key columns per 1,000 keys, at random positions.
    pub heavy_per_1000: f32,
    /// Logit boost of a heavy column.
    pub heavy_logit: f32,
    /// Logit of the local band at distance 0 (decays with distance).
    pub local_logit: f32,
    /// Correlation length of the local band, in tokens.
    pub local_tokens: f32,
    /// RoPE base applied to Q and K afterwards (NEOX pairs `i`, `i + d/2`).
    pub rope_base: f32,
}

impl Default for Structure {
    fn default() -> Self {
        Structure {
            sinks: 4,
            sink_logit: 8.0,
            heavy_per_1000: 2.0,
            heavy_logit: 6.0,
            local_logit: 7.0,
            local_tokens: 64.0,
            rope_base: 1.0e6,
        }
    }
}

/// Q, K, V with planted attention structure (see [`Structure`]), labelled synthetic:
/// - a sink direction `u` and a heavy-column direction `w` in the four lowest-frequency
///   RoPE pairs (so they survive rotation over long distances) that every query carries
///   and that sink keys / heavy keys carry scaled to the requested logits;
/// - a content vector per position following an AR(1) process (correlation
///   `exp(-1/local_tokens)` per token) shared by queries and keys: a local band;
/// - Gaussian noise; V is plain Gaussian.
pub fn structured_qkv_host(
    shape: &AttentionShape,
    st: &Structure,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, n, nk) = (shape.head_dim, shape.seq_len, shape.kv_len);
    let group = shape.q_heads / shape.kv_heads;
    let sqrt_d = (d as f32).sqrt();
    let half = d / 2;
    // Directions in the lowest-frequency pairs: dims half-4..half and d-4..d.
    let slow: Vec<usize> = (half - 4..half).chain(d - 4..d).collect();
    let unit = |g: &[f32]| {
        let mut v = vec![0.0f32; d];
        for (i, &dim) in slow.iter().enumerate() {
            v[dim] = g[i];
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        v.iter_mut().for_each(|x| *x /= norm);
        v
    };
    let rho = (-1.0 / st.local_tokens.max(1e-3)).exp();
    let innov = (1.0 - rho * rho).sqrt();
    // Content scale: q·k of the shared content ≈ c² d / √d at distance 0.
    let c = (st.local_logit.max(0.0) / sqrt_d).sqrt();
    let base = mix(seed);

    // Per kv head: K, V, the content process, and the u and w directions.
    type KvHead = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let per_kv: Vec<KvHead> = (0..shape.kv_heads)
        .into_par_iter()
        .map(|kvh| {
            let hs = mix(base ^ (kvh as u64 + 1));
            let u = unit(&gaussian(8, hs));
            let w = unit(&gaussian(8, hs ^ 1));
            let mut rng = StdRng::seed_from_u64(hs ^ 2);
            let heavy: Vec<bool> = (0..nk)
                .map(|_| rng.random::<f32>() * 1000.0 < st.heavy_per_1000)
                .collect();
            // Content: AR(1) over positions (keys cover the queries' positions too).
            let len = nk.max(n);
            let noise = gaussian(len * d, hs ^ 3);
            let mut content = vec![0.0f32; len * d];
            for j in 0..len {
                for t in 0..d {
                    let prev = if j == 0 {
                        0.0
                    } else {
                        content[(j - 1) * d + t]
                    };
                    content[j * d + t] = if j == 0 {
                        noise[t]
                    } else {
                        rho * prev + innov * noise[j * d + t]
                    };
                }
            }
            let kn = gaussian(nk * d, hs ^ 4);
            let mut k = vec![0.0f32; nk * d];
            for j in 0..nk {
                let row = &mut k[j * d..(j + 1) * d];
                let sink = if j < st.sinks { st.sink_logit } else { 0.0 };
                let hv = if heavy[j] { st.heavy_logit } else { 0.0 };
                for t in 0..d {
                    // Query components along u and w are 1, so a key component of
                    // logit·√d gives that logit after the 1/√d scale.
                    row[t] = 0.5 * kn[j * d + t]
                        + c * content[j * d + t]
                        + sink * sqrt_d * u[t]
                        + hv * sqrt_d * w[t];
                }
            }
            let v = gaussian(nk * d, hs ^ 5);
            (k, v, content, [u, w].concat())
        })
        .collect();

    let q_heads: Vec<Vec<f32>> = (0..shape.q_heads)
        .into_par_iter()
        .map(|h| {
            let (_, _, content, uw) = &per_kv[h / group];
            let (u, w) = uw.split_at(d);
            let qn = gaussian(n * d, mix(base ^ (0x51 + h as u64)));
            let shift = nk - n.min(nk);
            let mut q = vec![0.0f32; n * d];
            for i in 0..n {
                for t in 0..d {
                    q[i * d + t] =
                        0.5 * qn[i * d + t] + c * content[(i + shift) * d + t] + u[t] + w[t];
                }
            }
            q
        })
        .collect();
    let mut q: Vec<f32> = q_heads.concat();
    let mut k: Vec<f32> = per_kv.iter().flat_map(|p| p.0.iter().copied()).collect();
    let v: Vec<f32> = per_kv.iter().flat_map(|p| p.1.iter().copied()).collect();
    rope_neox(&mut q, n, d, nk - n.min(nk), st.rope_base);
    rope_neox(&mut k, nk, d, 0, st.rope_base);
    (q, k, v)
}

/// Rotates pairs (t, t + d/2) of every row by position × base^(−2t/d) (NEOX RoPE).
/// Rows are `[heads, len, d]`; row i has position `offset + i`.
fn rope_neox(x: &mut [f32], len: usize, d: usize, offset: usize, base: f32) {
    let half = d / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|t| (base as f64).powf(-2.0 * t as f64 / d as f64))
        .collect();
    x.par_chunks_mut(d).enumerate().for_each(|(row, v)| {
        let pos = (offset + row % len) as f64;
        for t in 0..half {
            let (sn, cs) = (pos * freqs[t]).sin_cos();
            let (a, b) = (v[t] as f64, v[t + half] as f64);
            v[t] = (a * cs - b * sn) as f32;
            v[t + half] = (a * sn + b * cs) as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_data_has_sinks_band_and_heavy_columns() {
        let shape = AttentionShape::new(2, 1, 600, 64);
        let st = Structure::default();
        let (q, k, _) = structured_qkv_host(&shape, &st, 3);
        // Softmax mass of the last query of head 0 on the sinks, the last 64 keys and
        // elsewhere.
        let (d, n) = (64, 600);
        let qi = &q[(n - 1) * d..n * d];
        let logits: Vec<f64> = (0..n)
            .map(|j| {
                qi.iter()
                    .zip(&k[j * d..(j + 1) * d])
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>()
                    / 8.0
            })
            .collect();
        let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
        let w: Vec<f64> = logits.iter().map(|x| (x - mx).exp()).collect();
        let total: f64 = w.iter().sum();
        let sinks: f64 = w[..4].iter().sum::<f64>() / total;
        let local: f64 = w[n - 64..].iter().sum::<f64>() / total;
        eprintln!("sinks {sinks} local {local}");
        assert!(sinks > 0.2, "sink mass {sinks}");
        assert!(local > 0.05, "local mass {local}");
        assert!(sinks + local < 0.99, "nothing left for heavy columns");
    }

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
