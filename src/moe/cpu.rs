//! CPU twins of the MoE kernels: the CPU fallback of [`super::MoePlan`] and the oracle
//! the GPU kernels are tested against. Same meaning, same layouts, same tie-breaking;
//! the expert FFN reads the same decoded (f16 / Q4_0) weights as the GPU.

use rayon::prelude::*;

use super::{PackedExperts, RouterScoring};
use crate::ops::linear::dot;

/// Router logits `[tokens, experts]` = `x [tokens, hidden] · routerᵀ`.
pub fn router_logits(x: &[f32], router: &[f32], hidden: usize, experts: usize) -> Vec<f32> {
    let tokens = x.len() / hidden;
    let mut out = vec![0.0; tokens * experts];
    out.par_chunks_mut(experts)
        .zip(x.par_chunks(hidden))
        .for_each(|(o, xt)| {
            for (e, v) in o.iter_mut().enumerate() {
                *v = dot(xt, &router[e * hidden..(e + 1) * hidden]);
            }
        });
    out
}

/// The top `k` experts of each token's logits, in the order (logit descending, index
/// ascending), and their weights (sigmoid or softmax of the chosen logits, normalized
/// to sum 1). Returns `(ids, weights)`, both `[tokens, k]`.
pub fn top_k(
    logits: &[f32],
    experts: usize,
    k: usize,
    scoring: RouterScoring,
) -> (Vec<u32>, Vec<f32>) {
    let tokens = logits.len() / experts;
    let mut ids = vec![0u32; tokens * k];
    let mut weights = vec![0.0f32; tokens * k];
    for t in 0..tokens {
        let row = &logits[t * experts..(t + 1) * experts];
        let mut order: Vec<usize> = (0..experts).collect();
        // Stable sort: equal logits keep the lower index first.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top = &order[..k];
        let v0 = row[top[0]];
        let s: Vec<f32> = top
            .iter()
            .map(|&e| match scoring {
                RouterScoring::Sigmoid => 1.0 / (1.0 + (-row[e]).exp()),
                RouterScoring::Softmax => (row[e] - v0).exp(),
            })
            .collect();
        let sum: f32 = s.iter().sum();
        for j in 0..k {
            ids[t * k + j] = top[j] as u32;
            weights[t * k + j] = s[j] / sum;
        }
    }
    (ids, weights)
}

/// The dispatch: assignments `a = token·k + slot` in expert-contiguous order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchMap {
    /// Assignments per expert.
    pub counts: Vec<u32>,
    /// Exclusive prefix of `counts` (`experts + 1` entries).
    pub offsets: Vec<u32>,
    /// `sorted[pos]` = the assignment at position `pos` (token order inside an expert).
    pub sorted: Vec<u32>,
    /// `inv[a]` = the position of assignment `a`.
    pub inv: Vec<u32>,
}

impl DispatchMap {
    /// Prefix of the per-expert tile counts (`ceil(count / tile_m)`), `experts + 1`
    /// entries, as the GPU scan writes them.
    pub fn tile_starts(&self, tile_m: u32) -> Vec<u32> {
        let mut out = vec![0];
        for &c in &self.counts {
            out.push(out.last().unwrap() + c.div_ceil(tile_m));
        }
        out
    }
}

/// Histogram, exclusive prefix sum and stable scatter of `ids` (`[tokens, k]`).
pub fn dispatch(ids: &[u32], experts: usize) -> DispatchMap {
    let mut counts = vec![0u32; experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    let mut offsets = vec![0u32; experts + 1];
    for e in 0..experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut next = offsets.clone();
    let mut sorted = vec![0u32; ids.len()];
    let mut inv = vec![0u32; ids.len()];
    for (a, &e) in ids.iter().enumerate() {
        let pos = next[e as usize];
        next[e as usize] += 1;
        sorted[pos as usize] = a as u32;
        inv[a] = pos;
    }
    DispatchMap {
        counts,
        offsets,
        sorted,
        inv,
    }
}

/// The grouped ReGLU FFN: `act [A, ffn]` (0 where gate ≤ 0), `y [A, hidden]` in
/// expert-contiguous order, and the number of (position, neuron) pairs skipped.
/// Skipped neurons' up and down rows are not used (PowerInfer's decode loop).
pub fn experts_ffn(
    z: &[f32],
    w: &PackedExperts,
    map: &DispatchMap,
    k: usize,
) -> (Vec<f32>, Vec<f32>, u64) {
    let c = &w.config;
    let (h, f) = (c.hidden, c.ffn);
    let per_expert: Vec<(Vec<f32>, Vec<f32>, u64)> = (0..c.experts)
        .into_par_iter()
        .map(|e| {
            let (o, n) = (map.offsets[e] as usize, map.counts[e] as usize);
            let mut act = vec![0.0f32; n * f];
            let mut y = vec![0.0f32; n * h];
            let mut skipped = 0u64;
            if n == 0 {
                return (act, y, 0);
            }
            let rows: Vec<&[f32]> = (o..o + n)
                .map(|p| {
                    let t = map.sorted[p] as usize / k;
                    &z[t * h..(t + 1) * h]
                })
                .collect();
            let (mut gr, mut ur, mut dr) = (vec![0.0; h], vec![0.0; h], vec![0.0; h]);
            let mut g = vec![0.0f32; n];
            for neuron in 0..f {
                let row = e * f + neuron;
                w.gate.row(row, &mut gr);
                let mut any = false;
                for (gi, zr) in g.iter_mut().zip(&rows) {
                    *gi = dot(&gr, zr);
                    any |= *gi > 0.0;
                }
                if !any {
                    skipped += n as u64;
                    continue;
                }
                w.up.row(row, &mut ur);
                w.down_t.row(row, &mut dr);
                for (i, zr) in rows.iter().enumerate() {
                    if g[i] <= 0.0 {
                        skipped += 1;
                        continue;
                    }
                    let a = dot(&ur, zr) * g[i];
                    act[i * f + neuron] = a;
                    for (yv, dv) in y[i * h..(i + 1) * h].iter_mut().zip(&dr) {
                        *yv += a * dv;
                    }
                }
            }
            (act, y, skipped)
        })
        .collect();
    let a = map.sorted.len();
    let mut act = Vec::with_capacity(a * f);
    let mut y = Vec::with_capacity(a * h);
    let mut skipped = 0;
    for (ae, ye, s) in per_expert {
        act.extend(ae);
        y.extend(ye);
        skipped += s;
    }
    (act, y, skipped)
}

/// `out[t] = residual[t] + Σ_j weights[t, j] · y[inv[t·k + j]]`.
pub fn combine(
    y: &[f32],
    weights: &[f32],
    inv: &[u32],
    residual: &[f32],
    k: usize,
    hidden: usize,
) -> Vec<f32> {
    let mut out = residual.to_vec();
    out.par_chunks_mut(hidden).enumerate().for_each(|(t, o)| {
        for j in 0..k {
            let a = t * k + j;
            let wgt = weights[a];
            let yr = &y[inv[a] as usize * hidden..(inv[a] as usize + 1) * hidden];
            for (ov, yv) in o.iter_mut().zip(yr) {
                *ov += wgt * yv;
            }
        }
    });
    out
}

/// Everything the CPU MoE computed (the intermediates are for the tests).
#[derive(Clone, Debug)]
pub struct MoeCpu {
    /// The output `[tokens, hidden]`.
    pub out: Vec<f32>,
    /// Router logits `[tokens, experts]`.
    pub logits: Vec<f32>,
    /// Chosen experts `[tokens, k]`.
    pub ids: Vec<u32>,
    /// Their weights `[tokens, k]`.
    pub weights: Vec<f32>,
    /// The dispatch.
    pub map: DispatchMap,
    /// Activations `[A, ffn]` (expert-contiguous).
    pub act: Vec<f32>,
    /// Expert outputs `[A, hidden]` (expert-contiguous).
    pub y: Vec<f32>,
    /// Skipped (position, neuron) pairs.
    pub skipped: u64,
}

/// The whole MoE layer on the CPU: router on `router_in`, experts on `expert_in`,
/// combined onto `residual` (all `[tokens, hidden]`).
pub fn moe_cpu(
    router_in: &[f32],
    expert_in: &[f32],
    residual: &[f32],
    w: &PackedExperts,
) -> MoeCpu {
    let c = &w.config;
    let logits = router_logits(router_in, &w.router, c.hidden, c.experts);
    let (ids, weights) = top_k(&logits, c.experts, c.top_k, c.scoring);
    let map = dispatch(&ids, c.experts);
    let (act, y, skipped) = experts_ffn(expert_in, w, &map, c.top_k);
    let out = combine(&y, &weights, &map.inv, residual, c.top_k, c.hidden);
    MoeCpu {
        out,
        logits,
        ids,
        weights,
        map,
        act,
        y,
        skipped,
    }
}

/// A straightforward reference of the whole layer in f64: the plain formula
/// `residual + Σ_k w_k · down((up·z) ⊙ ReLU(gate·z))` per token, no dispatch and no
/// skipping, on the routing of [`top_k`] (f32 logits). Slow; an independent oracle for
/// `--check` when no second device exists.
pub fn moe_reference_f64(
    router_in: &[f32],
    expert_in: &[f32],
    residual: &[f32],
    w: &PackedExperts,
) -> Vec<f32> {
    let c = &w.config;
    let (h, f, k) = (c.hidden, c.ffn, c.top_k);
    let logits = router_logits(router_in, &w.router, h, c.experts);
    let (ids, weights) = top_k(&logits, c.experts, k, c.scoring);
    let mut out = vec![0.0f32; residual.len()];
    out.par_chunks_mut(h).enumerate().for_each(|(t, o)| {
        let z = &expert_in[t * h..(t + 1) * h];
        let mut acc: Vec<f64> = residual[t * h..(t + 1) * h]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (mut gr, mut ur, mut dr) = (vec![0.0; h], vec![0.0; h], vec![0.0; h]);
        for j in 0..k {
            let e = ids[t * k + j] as usize;
            let wt = weights[t * k + j] as f64;
            for n in 0..f {
                let row = e * f + n;
                w.gate.row(row, &mut gr);
                w.up.row(row, &mut ur);
                w.down_t.row(row, &mut dr);
                let g: f64 = gr.iter().zip(z).map(|(a, b)| *a as f64 * *b as f64).sum();
                let u: f64 = ur.iter().zip(z).map(|(a, b)| *a as f64 * *b as f64).sum();
                let a = wt * u * g.max(0.0);
                for (o, d) in acc.iter_mut().zip(&dr) {
                    *o += a * *d as f64;
                }
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = a as f32;
        }
    });
    out
}
