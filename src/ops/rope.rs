//! Rotary position embedding (`shaders/rope.wgsl`): the cos/sin table, launcher and CPU
//! twin. Rotate-half convention (HF Llama / Qwen / SmallThinker): dimension `i` pairs
//! with `i + D/2`, frequency `θ^(−2i/D)`.

use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{Dispatch, storage_init};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct RopeParams {
        heads: u32,
        tokens: u32,
        half: u32,
        _pad: u32,
    }
}

/// The RoPE kernel (rotate-half pairs).
pub fn rope_spec() -> KernelSpec {
    rope_spec_for(RopeStyle::Neox)
}

/// The RoPE kernel of a pairing style.
pub fn rope_spec_for(style: RopeStyle) -> KernelSpec {
    KernelSpec {
        file: "ops/rope.wgsl",
        entry: "rope",
        defines: Defines::new()
            .params::<RopeParams>()
            .flag_if("ADJACENT", style == RopeStyle::Adjacent),
        bindings: BindingKind::layout("urw"),
    }
}

/// `[tokens, head_dim/2, 2]` of (cos, sin) of `(pos0 + t) · θ^(−2i/head_dim)`, computed
/// in f64.
pub fn rope_table(tokens: usize, head_dim: usize, theta: f64, pos0: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens * head_dim);
    rope_table_into(tokens, head_dim, theta, pos0, &mut out);
    out
}

/// [`rope_table`] into `out` (cleared first; no allocation once it holds enough room).
pub fn rope_table_into(
    tokens: usize,
    head_dim: usize,
    theta: f64,
    pos0: usize,
    out: &mut Vec<f32>,
) {
    let half = head_dim / 2;
    out.clear();
    for t in 0..tokens {
        for i in 0..half {
            let inv = theta.powf(-(2.0 * i as f64) / head_dim as f64);
            let a = (pos0 + t) as f64 * inv;
            out.push(a.cos() as f32);
            out.push(a.sin() as f32);
        }
    }
}

/// The rotation of `[heads, tokens, head_dim]` tensors by a table bound at dispatch
/// time (bindings: the table `[tokens, head_dim / 2]` of (cos, sin), then the tensor):
/// a model writes the table of each call's positions into one buffer and records the
/// same dispatch call after call.
pub fn rope_step(
    ctx: &Context,
    style: RopeStyle,
    heads: usize,
    tokens: usize,
    head_dim: usize,
) -> Result<crate::runtime::launch::Step<RopeParams>> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::InvalidArgument(format!(
            "RoPE needs an even head_dim (got {head_dim})"
        )));
    }
    let p = RopeParams {
        heads: heads as u32,
        tokens: tokens as u32,
        half: (head_dim / 2) as u32,
        _pad: 0,
    };
    let groups = (heads as u64 * tokens as u64 * head_dim as u64 / 2).div_ceil(256);
    crate::runtime::launch::Step::flat(ctx, &rope_spec_for(style), &p, groups)
}

/// Which dimensions rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate-half (NeoX, HF Llama / Qwen / Gemma / SmallThinker): `i` with `i + d/2`.
    Neox,
    /// Adjacent pairs (original Llama / GGUF `llama`): `2i` with `2i + 1`.
    Adjacent,
}

/// Rotates every `head_dim` row of `x` in place with `table` (from [`rope_table`]);
/// `token_of(r)` is the table row (token) of row `r`. Parallel over rows.
pub fn rope_rows(
    x: &mut [f32],
    head_dim: usize,
    table: &[f32],
    style: RopeStyle,
    token_of: impl Fn(usize) -> usize + Sync,
) {
    use rayon::prelude::*;
    let half = head_dim / 2;
    // A decode step's few rows stay on this thread.
    x.par_chunks_exact_mut(head_dim)
        .enumerate()
        .with_min_len((1 << 13) / head_dim.max(1))
        .for_each(|(r, row)| {
            let t = token_of(r);
            for i in 0..half {
                let (c, s) = (table[(t * half + i) * 2], table[(t * half + i) * 2 + 1]);
                let (a, b) = match style {
                    RopeStyle::Neox => (i, i + half),
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (row[a], row[b]);
                row[a] = x1 * c - x2 * s;
                row[b] = x2 * c + x1 * s;
            }
        });
}

/// CPU twin: rotates `x [heads, tokens, head_dim]` in place with `table` (rotate-half).
pub fn rope_cpu(x: &mut [f32], tokens: usize, head_dim: usize, table: &[f32]) {
    rope_rows(x, head_dim, table, RopeStyle::Neox, |r| r % tokens);
}

/// A built RoPE for tensors `[heads[i], tokens, head_dim]` (one per entry of `heads`,
/// e.g. Q and K) at positions `pos0..`.
pub struct RopeGpu {
    /// One step per rotated tensor.
    params: Vec<crate::runtime::launch::Step<RopeParams>>,
    table: wgpu::Buffer,
}

impl RopeGpu {
    /// Compiles, uploads the table and writes the parameters.
    pub fn build(
        ctx: &Context,
        heads: &[usize],
        tokens: usize,
        head_dim: usize,
        theta: f64,
        pos0: usize,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        if theta.is_nan() || theta <= 1.0 {
            return Err(Error::InvalidArgument(format!(
                "RoPE needs θ > 1 (got {theta})"
            )));
        }
        let params = heads
            .iter()
            .map(|&h| rope_step(ctx, RopeStyle::Neox, h, tokens, head_dim))
            .collect::<Result<Vec<_>>>()?;
        let table = rope_table(tokens, head_dim, theta, pos0);
        Ok(RopeGpu {
            params,
            table: storage_init(g, "rope cos/sin table", bytemuck::cast_slice(&table))?,
        })
    }

    /// Records the rotation (in place) of `xs[i]`, shaped `[heads[i], tokens,
    /// head_dim]`, as one stage.
    pub fn record(&self, rec: &mut Recorder<'_>, name: &str, xs: &[&wgpu::Buffer]) -> Result<()> {
        if xs.len() != self.params.len() {
            return Err(Error::Mismatch(format!(
                "RoPE built for {} tensors, given {}",
                self.params.len(),
                xs.len()
            )));
        }
        let list: Vec<Dispatch> = xs
            .iter()
            .zip(&self.params)
            .map(|(x, step)| step.dispatch(rec.gpu(), &[&self.table, x]))
            .collect();
        rec.dispatch_stage(name, &list);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::test_util::rnd;
    use rand::{SeedableRng, rngs::StdRng};

    /// Rotates one head vector for position `pos`.
    fn rope(v: &mut [f32], pos: usize, base: f32, neox: bool) {
        let table = rope_table(1, v.len(), base as f64, pos);
        let style = if neox {
            RopeStyle::Neox
        } else {
            RopeStyle::Adjacent
        };
        rope_rows(v, v.len(), &table, style, |_| 0);
    }

    #[test]
    fn rope_depends_only_on_relative_position() {
        let mut rng = StdRng::seed_from_u64(2);
        for neox in [false, true] {
            let (q, k) = (rnd(&mut rng, 64, 1.0), rnd(&mut rng, 64, 1.0));
            let dot = |pq: usize, pk: usize| {
                let (mut a, mut b) = (q.clone(), k.clone());
                rope(&mut a, pq, 10000.0, neox);
                rope(&mut b, pk, 10000.0, neox);
                a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
            };
            assert!((dot(7, 3) - dot(104, 100)).abs() < 1e-3);
            assert!((dot(0, 0) - q.iter().zip(&k).map(|(x, y)| x * y).sum::<f32>()).abs() < 1e-5);
            assert!((dot(5, 0) - dot(0, 5)).abs() > 1e-4, "rotation must matter");
        }
        // Position 1, base 1: adjacent pair (0,1) rotates by 1 rad; NEOX pairs (0, d/2).
        let mut v = vec![0f32; 4];
        v[0] = 1.0;
        rope(&mut v, 1, 1.0, false);
        assert!((v[0] - 1f32.cos()).abs() < 1e-6 && (v[1] - 1f32.sin()).abs() < 1e-6);
        let mut v = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut v, 1, 1.0, true);
        assert!((v[0] - 1f32.cos()).abs() < 1e-6 && (v[2] - 1f32.sin()).abs() < 1e-6);
    }
}
