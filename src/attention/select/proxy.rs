//! ProxyAttn's block selection on the host: the CPU twin the GPU kernels will be tested
//! against (the method is not in the [`Method`](crate::Method) registry yet: its GPU
//! stages are still missing, so no plan can run it).
//!
//! The idea: heads that share keys attend alike, so one *proxy* head per group of heads
//! — the mean of the group's query heads against the mean of its key heads — scores the
//! key blocks for all of them, at a fraction of the cost (only every `stride`-th query
//! row of a block is scored). How many blocks each head keeps is its own: a head whose
//! attention is spread out needs more than one whose attention sits on a few blocks.
//!
//! For a causal run with `Hq` query heads, `Hkv` key heads and blocks of `b` rows:
//!
//! 1. **Proxy heads**: for each of the `groups` groups (consecutive key heads and their
//!    query heads), Q̄ = mean of the group's query heads and K̄ = mean of its key heads,
//!    row by row (no pooling over positions).
//! 2. **Proxy probabilities**: for the kept rows `r` (in each query block, rows
//!    `block start + stride·i`), `P[r, ·] = softmax_{j ≤ r}(Q̄[r]·K̄[j] · scale)`.
//! 3. **Block scores**: `A[m, n]` = the largest `P[r, j]` over the kept rows `r` of query
//!    block `m` and the keys `j` of key block `n` (0 where no key is visible).
//! 4. **Budgets**: head `i`'s exact attention over the rows of the last query block,
//!    averaged over those rows and over the keys of each key block, gives a weight per
//!    block; sorted in decreasing order and normalised to sum 1, the smallest count `k`
//!    whose prefix reaches `gamma` sets the head's budget fraction `β = k / blocks`.
//! 5. **Mask**: query block `m` of head `i` keeps the `K = min(m + 1, max(⌈β·(m + 1)⌉,
//!    min_budget / b))` best blocks of its group's `A[m, 0..=m]` (equal scores: the
//!    lower block first), plus block 0 and its diagonal block.
//!
//! Step 2 never holds more than one row of scores: the block maxima of a row follow
//! from its running maximum and sum, as in flash attention.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::SelectInput;
use crate::attention::AttentionShape;
use crate::attention::lut::{LutUnit, SparseLut};
use crate::attention::params::impl_params;
use crate::error::{Error, Result};

/// ProxyAttn's parameters (the defaults of the method's authors).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// Share of a head's (last-block) attention its kept blocks must hold: sets the
    /// head's budget fraction.
    pub gamma: f32,
    /// Proxy groups (must divide the key heads): 1 = one proxy head for all heads.
    pub groups: usize,
    /// Every `stride`-th query row of a block is scored by the proxy.
    pub stride: usize,
    /// Query and key block size (rows).
    pub block: usize,
    /// Fewest keys every query block keeps (rounded down to whole blocks).
    pub min_budget: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            gamma: 0.95,
            groups: 1,
            stride: 4,
            block: 128,
            min_budget: 2048,
        }
    }
}

impl_params!(ProxyConfig, "proxy" { gamma, groups | "proxy_groups", stride, block, min_budget });

impl ProxyConfig {
    /// Checks the configuration against a shape; errors say what is wrong.
    pub fn validate(&self, shape: &AttentionShape) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("proxy: {m}")));
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return bad(format!("gamma {} must be in (0, 1]", self.gamma));
        }
        if self.block == 0 || !self.block.is_multiple_of(64) || self.block > 1024 {
            return bad(format!(
                "block {} must be a multiple of 64 in 64..=1024 (the executor's query tiles)",
                self.block
            ));
        }
        if self.stride == 0 || self.stride > self.block {
            return bad(format!("stride {} must be in 1..=block", self.stride));
        }
        if self.groups == 0 || !shape.kv_heads.is_multiple_of(self.groups) {
            return bad(format!(
                "groups {} must divide the {} key heads",
                self.groups, shape.kv_heads
            ));
        }
        if shape.kv_len != shape.seq_len {
            return bad("needs as many keys as queries (causal prefill)".into());
        }
        Ok(())
    }

    /// The proxy group of query head `h`.
    pub fn group_of(&self, shape: &AttentionShape, h: usize) -> usize {
        let kvh = h / (shape.q_heads / shape.kv_heads);
        kvh / (shape.kv_heads / self.groups)
    }

    /// Blocks query block `m` (0-based) keeps at budget fraction `beta`: `K` of the
    /// `m + 1` causal blocks (step 5 of the module docs).
    pub fn keep_count(&self, m: usize, beta: f32) -> usize {
        let causal = m + 1;
        let by_budget = (beta as f64 * causal as f64).ceil() as usize;
        causal.min(by_budget.max(self.min_budget / self.block))
    }
}

/// What the proxy estimated for one run.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyEstimate {
    /// Query (and key) blocks.
    pub blocks: usize,
    /// Block scores `A`, `[groups, blocks, blocks]` (key blocks past the diagonal: 0).
    pub scores: Vec<f32>,
    /// Budget fraction β of every query head.
    pub budgets: Vec<f32>,
}

/// Row `r` of a `d`-wide head-major tensor of `rows` rows per head.
fn row(x: &[f32], head: usize, rows: usize, r: usize, d: usize) -> &[f32] {
    let at = (head * rows + r) * d;
    &x[at..at + d]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The mean over `heads` of a head-major tensor, `[rows, d]` (step 1).
fn mean_heads(x: &[f32], heads: std::ops::Range<usize>, rows: usize, d: usize) -> Vec<f32> {
    let n = heads.len() as f32;
    let mut out = vec![0.0f32; rows * d];
    for h in heads {
        for (o, v) in out.iter_mut().zip(&x[h * rows * d..(h + 1) * rows * d]) {
            *o += v;
        }
    }
    out.iter_mut().for_each(|o| *o /= n);
    out
}

/// The scores of query row `qr` against the first `s.len()` rows of `keys` (`d` wide)
/// into `s`; returns their maximum and the softmax denominator `Σ exp(s - max)`.
fn causal_scores(qr: &[f32], keys: &[f32], d: usize, scale: f32, s: &mut [f32]) -> (f32, f32) {
    let mut mx = f32::NEG_INFINITY;
    for (sj, kj) in s.iter_mut().zip(keys.chunks_exact(d)) {
        *sj = dot(qr, kj) * scale;
        mx = mx.max(*sj);
    }
    (mx, s.iter().map(|&x| (x - mx).exp()).sum())
}

/// Steps 1–3: the block scores `A` of every proxy group, `[groups, blocks, blocks]`.
pub fn proxy_block_scores(x: &SelectInput<'_>, cfg: &ProxyConfig) -> Vec<f32> {
    let SelectInput {
        shape, scale, q, k, ..
    } = *x;
    let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
    let nb = n.div_ceil(b);
    let kv_per_group = shape.kv_heads / cfg.groups;
    let q_per_kv = shape.q_heads / shape.kv_heads;
    let mut scores = vec![0.0f32; cfg.groups * nb * nb];
    scores
        .par_chunks_mut(nb * nb)
        .enumerate()
        .for_each(|(g, a)| {
            let kv = g * kv_per_group..(g + 1) * kv_per_group;
            let qh = kv.start * q_per_kv..kv.end * q_per_kv;
            let qbar = mean_heads(q, qh, n, d);
            let kbar = mean_heads(k, kv, n, d);
            a.par_chunks_mut(nb).enumerate().for_each(|(m, a_row)| {
                let mut s = vec![0.0f32; n];
                for r in (m * b..((m + 1) * b).min(n)).step_by(cfg.stride) {
                    let qr = &qbar[r * d..(r + 1) * d];
                    let (mx, l) = causal_scores(qr, &kbar, d, scale, &mut s[..=r]);
                    for (nblk, keys) in s[..=r].chunks(b).enumerate() {
                        let best = keys.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        a_row[nblk] = a_row[nblk].max((best - mx).exp() / l);
                    }
                }
            });
        });
    scores
}

/// Step 4: the budget fraction β of every query head, from its exact attention over
/// the rows of the last query block.
pub fn head_budgets(x: &SelectInput<'_>, cfg: &ProxyConfig) -> Vec<f32> {
    let SelectInput {
        shape, scale, q, k, ..
    } = *x;
    let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
    let nb = n.div_ceil(b);
    let q_per_kv = shape.q_heads / shape.kv_heads;
    let last = (nb - 1) * b..n;
    (0..shape.q_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / q_per_kv;
            let mut weight = vec![0.0f64; nb];
            let mut s = vec![0.0f32; n];
            for r in last.clone() {
                let keys = &k[kvh * n * d..(kvh + 1) * n * d];
                let (mx, l) = causal_scores(row(q, h, n, r, d), keys, d, scale, &mut s[..=r]);
                for (nblk, keys) in s[..=r].chunks(b).enumerate() {
                    let sum: f32 = keys.iter().map(|&x| (x - mx).exp()).sum();
                    // Mean over the block's keys (the ragged last block: its own count).
                    let width = ((nblk + 1) * b).min(n) - nblk * b;
                    weight[nblk] += (sum / l) as f64 / width as f64;
                }
            }
            budget_fraction(&mut weight, cfg.gamma)
        })
        .collect()
}

/// The budget fraction of block weights: sorted in decreasing order and normalised,
/// the smallest count whose prefix sum reaches `gamma`, over the block count.
fn budget_fraction(weight: &mut [f64], gamma: f32) -> f32 {
    let total: f64 = weight.iter().sum();
    weight.sort_by(|a, b| b.total_cmp(a));
    let mut acc = 0.0;
    let mut k = weight.len();
    for (i, w) in weight.iter().enumerate() {
        acc += w / total.max(f64::MIN_POSITIVE);
        if acc >= gamma as f64 {
            k = i + 1;
            break;
        }
    }
    k as f32 / weight.len() as f32
}

/// Step 5 for one query block: the kept key blocks of `scores` (`A[m, 0..=m]` of the
/// head's group) at budget fraction `beta`, in increasing order.
pub fn select_blocks(cfg: &ProxyConfig, m: usize, scores: &[f32], beta: f32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..=m as u32).collect();
    // Decreasing score; equal scores keep the lower block first (a stable sort).
    order.sort_by(|&x, &y| scores[y as usize].total_cmp(&scores[x as usize]));
    let mut keep: Vec<u32> = order[..cfg.keep_count(m, beta)].to_vec();
    keep.extend([0, m as u32]);
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// ProxyAttn's whole block mask on the host: for every head and query block the kept
/// key blocks (a [`LutUnit::Blocks`] LUT of `block × block` blocks), with what the
/// proxy estimated.
pub fn proxy_select_cpu(
    shape: &AttentionShape,
    cfg: &ProxyConfig,
    scale: f32,
    q: &[f32],
    k: &[f32],
) -> Result<(SparseLut, ProxyEstimate)> {
    cfg.validate(shape)?;
    let nb = shape.seq_len.div_ceil(cfg.block);
    let x = SelectInput {
        shape,
        scale,
        q,
        k,
        ml: &[],
    };
    let scores = proxy_block_scores(&x, cfg);
    let budgets = head_budgets(&x, cfg);
    let lut = SparseLut::from_fn(
        shape.q_heads,
        shape.seq_len,
        cfg.block,
        LutUnit::Blocks(cfg.block),
        |h, m| {
            let g = cfg.group_of(shape, h);
            let a = &scores[(g * nb + m) * nb..(g * nb + m + 1) * nb];
            select_blocks(cfg, m, a, budgets[h])
        },
    )?;
    let est = ProxyEstimate {
        blocks: nb,
        scores,
        budgets,
    };
    Ok((lut, est))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::synthetic::qkv_host;

    /// Steps 1–5 written plainly in f64, every score materialised: the reference of the
    /// twin.
    fn reference(
        shape: &AttentionShape,
        cfg: &ProxyConfig,
        scale: f64,
        q: &[f32],
        k: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let (n, d, b) = (shape.seq_len, shape.head_dim, cfg.block);
        let nb = n.div_ceil(b);
        let q_per_kv = shape.q_heads / shape.kv_heads;
        let kv_per_group = shape.kv_heads / cfg.groups;
        let softmax = |s: &[f64]| -> Vec<f64> {
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let l: f64 = e.iter().sum();
            e.iter().map(|x| x / l).collect()
        };
        let mut a = vec![0.0f64; cfg.groups * nb * nb];
        for g in 0..cfg.groups {
            let kvs: Vec<usize> = (g * kv_per_group..(g + 1) * kv_per_group).collect();
            let qs: Vec<usize> = (kvs[0] * q_per_kv..(kvs[kvs.len() - 1] + 1) * q_per_kv).collect();
            let mean = |x: &[f32], heads: &[usize], r: usize| -> Vec<f64> {
                (0..d)
                    .map(|c| {
                        heads
                            .iter()
                            .map(|&h| x[(h * n + r) * d + c] as f64)
                            .sum::<f64>()
                            / heads.len() as f64
                    })
                    .collect()
            };
            for r in 0..n {
                if (r % b) % cfg.stride != 0 {
                    continue;
                }
                let qr = mean(q, &qs, r);
                let s: Vec<f64> = (0..=r)
                    .map(|j| {
                        let kj = mean(k, &kvs, j);
                        qr.iter().zip(&kj).map(|(x, y)| x * y).sum::<f64>() * scale
                    })
                    .collect();
                let p = softmax(&s);
                for (j, pj) in p.iter().enumerate() {
                    let at = (g * nb + r / b) * nb + j / b;
                    a[at] = a[at].max(*pj);
                }
            }
        }
        let mut betas = vec![];
        for h in 0..shape.q_heads {
            let kvh = h / q_per_kv;
            let mut w = vec![0.0f64; nb];
            for r in (nb - 1) * b..n {
                let s: Vec<f64> = (0..=r)
                    .map(|j| {
                        (0..d)
                            .map(|c| {
                                q[(h * n + r) * d + c] as f64 * k[(kvh * n + j) * d + c] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                for (j, pj) in softmax(&s).iter().enumerate() {
                    let width = ((j / b + 1) * b).min(n) - j / b * b;
                    w[j / b] += pj / width as f64;
                }
            }
            betas.push(budget_fraction(&mut w, cfg.gamma) as f64);
        }
        (a, betas)
    }

    fn small() -> ProxyConfig {
        ProxyConfig {
            block: 64,
            min_budget: 128,
            ..Default::default()
        }
    }

    /// The twin against the plain f64 reference: block scores within 1e-5 relative
    /// (plus a tiny absolute floor), the same budgets, and the same masks except where
    /// two candidate scores of a row are a near-tie (counted).
    #[test]
    fn twin_matches_a_plain_reference() {
        for (shape, groups, seed) in [
            (AttentionShape::new(4, 2, 300, 32), 1, 1u64),
            (AttentionShape::new(4, 2, 333, 64), 2, 2),
            (AttentionShape::new(2, 2, 130, 32), 2, 3),
        ] {
            let cfg = ProxyConfig { groups, ..small() };
            let (q, k, _) = qkv_host(&shape, seed);
            let scale = 1.0 / (shape.head_dim as f32).sqrt();
            let (lut, est) = proxy_select_cpu(&shape, &cfg, scale, &q, &k).unwrap();
            let (a, betas) = reference(&shape, &cfg, scale as f64, &q, &k);
            for (got, want) in est.scores.iter().zip(&a) {
                let tol = 1e-5 * want.abs() + 1e-7;
                assert!((*got as f64 - want).abs() <= tol, "{got} vs {want}");
            }
            // Budgets: the same block count, but for a prefix sum within rounding of
            // gamma (one block either way).
            for (got, want) in est.budgets.iter().zip(&betas) {
                let one = 1.0 / est.blocks as f64;
                assert!((*got as f64 - want).abs() <= one + 1e-6, "{got} vs {want}");
            }
            let nb = est.blocks;
            let mut ties = 0;
            for h in 0..shape.q_heads {
                let g = cfg.group_of(&shape, h);
                for m in 0..nb {
                    let row = &a[(g * nb + m) * nb..(g * nb + m) * nb + m + 1];
                    let row32: Vec<f32> = row.iter().map(|&x| x as f32).collect();
                    let want = select_blocks(&cfg, m, &row32, est.budgets[h]);
                    let got = lut.entries(h, m);
                    if got != want.as_slice() {
                        // Only a near-tie at the cut may differ.
                        let mut sorted = row.to_vec();
                        sorted.sort_by(|x, y| y.total_cmp(x));
                        let cut = cfg.keep_count(m, est.budgets[h]) - 1;
                        let near = sorted
                            .windows(2)
                            .skip(cut.saturating_sub(1))
                            .take(2)
                            .any(|w| (w[0] - w[1]).abs() <= 1e-5 * w[0].abs());
                        assert!(near, "head {h} block {m}: {got:?} vs {want:?}");
                        ties += 1;
                    }
                }
            }
            eprintln!("{shape:?} groups {groups}: {ties} near-ties");
        }
    }

    /// gamma = 1 with a budget of every key keeps every causal block: dense attention.
    #[test]
    fn full_budget_is_dense() {
        let shape = AttentionShape::new(2, 1, 450, 32);
        let cfg = ProxyConfig {
            gamma: 1.0,
            min_budget: 512,
            ..small()
        };
        let (q, k, _) = qkv_host(&shape, 9);
        let (lut, est) = proxy_select_cpu(&shape, &cfg, 0.2, &q, &k).unwrap();
        for h in 0..2 {
            for m in 0..est.blocks {
                assert_eq!(
                    lut.entries(h, m),
                    (0..=m as u32).collect::<Vec<_>>().as_slice()
                );
            }
        }
        assert!(est.budgets.iter().all(|&b| b > 0.0 && b <= 1.0));
    }

    /// A key block that every query of one head group attends strongly is kept for
    /// that group's heads, whose budgets stay small.
    #[test]
    fn a_planted_heavy_block_is_kept_for_its_group() {
        let shape = AttentionShape::new(4, 2, 64 * 8, 32);
        let cfg = ProxyConfig {
            groups: 2,
            gamma: 0.5,
            min_budget: 64,
            ..small()
        };
        let (mut q, mut k, _) = qkv_host(&shape, 11);
        q.iter_mut().for_each(|x| *x *= 0.1);
        k.iter_mut().for_each(|x| *x *= 0.1);
        // Key heads 1 (group 1): keys of block 3 all along one direction, and queries
        // of heads 2 and 3 (group 1) along it too.
        let (n, d) = (shape.seq_len, shape.head_dim);
        for j in 3 * 64..4 * 64 {
            k[(n + j) * d] = 4.0;
        }
        for h in 2..4 {
            for r in 0..n {
                q[(h * n + r) * d] = 4.0;
            }
        }
        let (lut, est) = proxy_select_cpu(&shape, &cfg, 1.0 / (d as f32).sqrt(), &q, &k).unwrap();
        let nb = est.blocks;
        for m in 4..8 {
            for h in 2..4 {
                assert!(lut.entries(h, m).contains(&3), "head {h} block {m}");
            }
            // Group 1's proxy puts the planted block first; group 0 has no such block.
            let best = |g: usize| {
                let a = &est.scores[(g * nb + m) * nb..(g * nb + m) * nb + m + 1];
                (0..=m).max_by(|&x, &y| a[x].total_cmp(&a[y])).unwrap()
            };
            assert_eq!(best(1), 3, "block {m}");
        }
        // A concentrated head needs few blocks: a small budget.
        assert!(
            est.budgets[2] <= 0.5 && est.budgets[3] <= 0.5,
            "{:?}",
            est.budgets
        );
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let shape = AttentionShape::new(4, 2, 256, 32);
        for cfg in [
            ProxyConfig {
                gamma: 0.0,
                ..small()
            },
            ProxyConfig {
                gamma: 1.5,
                ..small()
            },
            ProxyConfig {
                groups: 3,
                ..small()
            },
            ProxyConfig {
                stride: 0,
                ..small()
            },
            ProxyConfig {
                block: 100,
                ..small()
            },
        ] {
            assert!(
                matches!(cfg.validate(&shape), Err(Error::InvalidArgument(_))),
                "{cfg:?}"
            );
        }
        let mut c = ProxyConfig::default();
        use crate::attention::params::Params;
        c.set("proxy_groups", "2").unwrap();
        c.set("gamma", "0.9").unwrap();
        assert_eq!((c.groups, c.gamma), (2, 0.9));
        assert!(c.set("theta", "1").is_err());
    }
}
