//! Oracle patterns: the smallest key sets that reach an attention-mass coverage γ,
//! computed exactly on the host from Q and K — the upper bound real methods are
//! compared with (`docs/algorithms.md` §5).
//!
//! - per row: for each query row, the fewest keys whose softmax mass is ≥ γ (the top
//!   keys of that row); its density is the fraction of causal pairs they make up;
//! - per block: for each (q-head, query block), the fewest key blocks whose mass,
//!   summed over the block's rows, is ≥ γ × rows; a [`SparseLut`] that the block-sparse
//!   executor runs (`Method::BlockSparse`), so its output error can be measured too;
//! - per block under per-head budgets ([`oracle_top_k`]): each query block of head `h`
//!   keeps its `⌈β_h · causal blocks⌉` key blocks of the largest mass — the best
//!   choice of blocks of that size under those budgets (a fixed top-k on exact
//!   scores).
//!
//! Cost: O(q_heads · N² · d) for the scores plus a sort per row; meant for evaluation
//! at up to tens of thousands of tokens.

use rayon::prelude::*;
use serde::Serialize;

use crate::attention::AttentionShape;
use crate::attention::lut::{LutUnit, SparseLut};
use crate::error::{Error, Result};

/// The oracle patterns of one attention.
#[derive(Clone, Debug, Serialize)]
pub struct Oracle {
    /// Coverage target.
    pub gamma: f64,
    /// Per-row oracle: fraction of causal pairs needed for coverage γ in every row.
    pub row_density: f64,
    /// Per-block oracle: fraction of causal pairs its blocks compute.
    pub block_density: f64,
    /// Per-block oracle: attention-mass recall it reaches (mean over rows; ≥ γ on
    /// average, as each block row reaches γ × rows).
    pub block_recall: f64,
    /// The per-block oracle's key blocks.
    #[serde(skip)]
    pub block_lut: SparseLut,
}

/// Computes both oracles (causal attention, `kv_len == seq_len`) for coverage `gamma`,
/// with `q_block × key_block` blocks for the block oracle.
pub fn oracle(
    shape: &AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    gamma: f64,
    q_block: usize,
    key_block: usize,
) -> Result<Oracle> {
    if !(gamma > 0.0 && gamma <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "coverage γ = {gamma} not in (0, 1]"
        )));
    }
    let (blocks, block_lut) = block_oracle(
        shape,
        scale,
        (q, k),
        Keep::Coverage(gamma),
        q_block,
        key_block,
    )?;
    let causal = shape.q_heads as f64 * (shape.seq_len as f64) * (shape.seq_len as f64 + 1.0) / 2.0;
    Ok(Oracle {
        gamma,
        row_density: blocks.iter().map(|b| b.row_keys).sum::<u64>() as f64 / causal,
        block_density: blocks.iter().map(|b| b.block_pairs).sum::<u64>() as f64 / causal,
        block_recall: blocks.iter().map(|b| b.block_mass).sum::<f64>()
            / (shape.q_heads * shape.seq_len) as f64,
        block_lut,
    })
}

/// The block oracle under per-head budgets: query block `b` of head `h` keeps the
/// `⌈β_h · C_b⌉` of its `C_b` causal key blocks that hold the most attention mass
/// (summed over its rows), `budgets[h]` = β_h in (0, 1]. Typed errors for a budget
/// count or value that does not fit.
pub fn oracle_top_k(
    shape: &AttentionShape,
    scale: f32,
    (q, k): (&[f32], &[f32]),
    budgets: &[f32],
    q_block: usize,
    key_block: usize,
) -> Result<SparseLut> {
    if budgets.len() != shape.q_heads {
        return Err(Error::InvalidArgument(format!(
            "{} budgets for {} q heads",
            budgets.len(),
            shape.q_heads
        )));
    }
    if let Some(b) = budgets.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
        return Err(Error::InvalidArgument(format!("budget {b} not in (0, 1]")));
    }
    Ok(block_oracle(
        shape,
        scale,
        (q, k),
        Keep::Budgets(budgets),
        q_block,
        key_block,
    )?
    .1)
}

/// How the block oracle chooses a query block's key blocks.
#[derive(Clone, Copy)]
enum Keep<'a> {
    /// The fewest reaching coverage γ (and each row's top keys reaching γ counted).
    Coverage(f64),
    /// `⌈β_h · causal blocks⌉` for head `h`.
    Budgets(&'a [f32]),
}

/// One (head, query block) of the block oracle: the per-row oracle's key count (for
/// a coverage), its chosen key blocks, the pairs and the mass they hold.
struct Block {
    row_keys: u64,
    blocks: Vec<u32>,
    block_pairs: u64,
    block_mass: f64,
}

/// Every (head, query block)'s exact block masses and the blocks `keep` picks from
/// them, and the LUT of those blocks.
fn block_oracle(
    shape: &AttentionShape,
    scale: f32,
    (q, k): (&[f32], &[f32]),
    keep: Keep<'_>,
    q_block: usize,
    key_block: usize,
) -> Result<(Vec<Block>, SparseLut)> {
    if shape.kv_len != shape.seq_len {
        return Err(Error::InvalidShape(
            "the oracle is for square (prefill) attention".into(),
        ));
    }
    let (n, d) = (shape.seq_len, shape.head_dim);
    let group = shape.q_heads / shape.kv_heads;
    let nqb = n.div_ceil(q_block);
    let nkb = n.div_ceil(key_block);
    // One task per (head, query block): per-row top-key counts, and block masses.
    let blocks: Vec<Block> = (0..shape.q_heads * nqb)
        .into_par_iter()
        .map(|t| {
            let (h, b) = (t / nqb, t % nqb);
            let kvh = h / group;
            let (r0, r1) = (b * q_block, ((b + 1) * q_block).min(n));
            let mut mass = vec![0.0f64; nkb];
            let mut row_keys = 0u64;
            // The block's scores against every key it can see, as one SGEMM.
            let (rows, keys) = (r1 - r0, r1);
            let mut s = vec![0.0f32; rows * keys];
            let qb = &q[(h * n + r0) * d..(h * n + r1) * d];
            let kb = &k[kvh * n * d..(kvh * n + keys) * d];
            // SAFETY: A is rows × d (row stride d), B = Kᵀ is d × keys (K row-major:
            // element (c, j) at j·d + c), C is rows × keys; all inside their slices.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    d,
                    keys,
                    scale,
                    qb.as_ptr(),
                    d as isize,
                    1,
                    kb.as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    s.as_mut_ptr(),
                    keys as isize,
                    1,
                );
            }
            let mut p = Vec::with_capacity(keys);
            for (i, srow) in s.chunks_exact(keys).enumerate() {
                let r = r0 + i;
                let srow = &srow[..=r];
                let mx = srow.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                p.clear();
                p.extend(srow.iter().map(|&x| (x - mx).exp() as f64));
                let inv = 1.0 / p.iter().sum::<f64>();
                for (j, x) in p.iter_mut().enumerate() {
                    *x *= inv;
                    mass[j / key_block] += *x;
                }
                if let Keep::Coverage(gamma) = keep {
                    row_keys += top_mass_count(&mut p, gamma) as u64;
                }
            }
            let rows = (r1 - r0) as f64;
            let mut order: Vec<usize> = (0..nkb).filter(|&kb| kb * key_block < r1).collect();
            // Equal masses: the lower block first.
            order.sort_unstable_by(|&a, &c| mass[c].total_cmp(&mass[a]).then(a.cmp(&c)));
            // Coverage: the fewest key blocks reaching γ × rows of the summed mass;
            // budgets: the head's count.
            let count = match keep {
                Keep::Coverage(_) => order.len(),
                Keep::Budgets(b) => {
                    crate::budget::units_of(b[h], order.len()).clamp(1, order.len())
                }
            };
            let mut acc = 0.0;
            let mut chosen = vec![];
            for &kb in &order[..count] {
                if let Keep::Coverage(gamma) = keep
                    && acc >= gamma * rows - 1e-9
                {
                    break;
                }
                acc += mass[kb];
                chosen.push(kb as u32);
            }
            chosen.sort_unstable();
            let block_pairs = chosen
                .iter()
                .map(|&kb| {
                    let (c0, c1) = (
                        kb as usize * key_block,
                        ((kb as usize + 1) * key_block).min(n),
                    );
                    (r0..r1)
                        .map(|r| (r + 1).min(c1).saturating_sub(c0) as u64)
                        .sum::<u64>()
                })
                .sum();
            Block {
                row_keys,
                blocks: chosen,
                block_pairs,
                block_mass: acc,
            }
        })
        .collect();
    let block_lut = SparseLut::from_fn(
        shape.q_heads,
        n,
        q_block,
        LutUnit::Blocks(key_block),
        |h, b| blocks[h * nqb + b].blocks.clone(),
    )?;
    Ok((blocks, block_lut))
}

/// The fewest entries of `p` (probabilities of one row) whose sum reaches `gamma`: the
/// count of a descending sort's prefix, found by quickselect in expected linear time
/// (the slice is reordered). All of `p` when even its total falls short.
fn top_mass_count(p: &mut [f64], gamma: f64) -> usize {
    let mut target = gamma - 1e-12;
    let mut count = 0;
    let mut v = p;
    while !v.is_empty() {
        if target <= 0.0 {
            return count;
        }
        let mid = v.len() / 2;
        v.select_nth_unstable_by(mid, |a, b| b.total_cmp(a));
        let top: f64 = v[..mid].iter().sum();
        if top >= target {
            // The answer lies among the `mid` largest.
            v = &mut v[..mid];
        } else {
            // All of those and the pivot are needed (the pivot is the next largest).
            count += mid + 1;
            target -= top + v[mid];
            v = &mut v[mid + 1..];
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Quickselect gives the count of the sorted prefix reaching γ.
        #[test]
        fn top_mass_count_equals_the_sorted_prefix(
            raw in proptest::collection::vec(0.0f32..1.0, 1..300),
            sharp in 1.0f32..30.0,
            gamma in 0.05f64..1.0,
        ) {
            let w: Vec<f32> = raw.iter().map(|x| (x * sharp).exp()).collect();
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            let mut p: Vec<f64> = w.iter().map(|&x| x as f64 / total).collect();
            let mut sorted = p.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let mut acc = 0.0;
            let mut want = sorted.len();
            for (i, &x) in sorted.iter().enumerate() {
                acc += x;
                if acc >= gamma - 1e-12 {
                    want = i + 1;
                    break;
                }
            }
            let got = top_mass_count(&mut p, gamma);
            // Summation order differs: a boundary entry may flip on a near tie.
            prop_assert!((got as i64 - want as i64).abs() <= 1, "got {got}, want {want}");
        }
    }

    #[test]
    fn oracle_on_a_planted_pattern() {
        // One head, d = 4: every query puts almost all its mass on key 0 (a sink).
        let shape = AttentionShape::new(1, 1, 96, 4);
        let q: Vec<f32> = (0..96).flat_map(|_| [1.0, 0.0, 0.0, 0.0]).collect();
        let k: Vec<f32> = (0..96)
            .flat_map(|j| {
                if j == 0 {
                    [40.0, 0.0, 0.0, 0.0]
                } else {
                    [0.0, 1.0, 0.0, 0.0]
                }
            })
            .collect();
        let o = oracle(&shape, 0.5, &q, &k, 0.9, 32, 32).unwrap();
        // Per row one key suffices: density = 96 / (96·97/2).
        assert!((o.row_density - 96.0 / (96.0 * 97.0 / 2.0)).abs() < 1e-12);
        // Per block: key block 0 alone for every query block.
        for b in 0..3 {
            assert_eq!(o.block_lut.keys_of(0, b), (0..32).collect::<Vec<u32>>());
        }
        assert!(o.block_recall >= 0.9);
        // γ = 1 needs every key.
        let all = oracle(&shape, 0.5, &q, &k, 1.0, 32, 32).unwrap();
        assert!(all.row_density > 0.99 && all.block_density > 0.99);
        assert!(oracle(&shape, 0.5, &q, &k, 1.5, 32, 32).is_err());
    }

    /// Under budgets each query block keeps exactly its head's count of causal key
    /// blocks, and no block left out holds more mass than a kept one; budget 1 keeps
    /// every causal block; bad budgets are typed errors.
    #[test]
    fn top_k_oracle_keeps_the_heaviest_blocks_within_the_budget() {
        let shape = AttentionShape::new(3, 1, 200, 16);
        let (q, k, _) =
            crate::attention::synthetic::qkv_host(&shape, crate::runtime::test_util::seed());
        let budgets = [0.2f32, 0.5, 1.0];
        let lut = oracle_top_k(&shape, 0.25, (&q, &k), &budgets, 32, 32).unwrap();
        let (n, d) = (shape.seq_len, shape.head_dim);
        for (h, &beta) in budgets.iter().enumerate() {
            for b in 0..n.div_ceil(32) {
                let r1 = ((b + 1) * 32).min(n);
                let causal = r1.div_ceil(32);
                let kept = lut.entries(h, b);
                let want = ((beta as f64 * causal as f64 - 1e-9).ceil() as usize).max(1);
                assert_eq!(kept.len(), want, "head {h} block {b}");
                // The block masses, naively.
                let mut mass = vec![0.0f64; causal];
                for r in b * 32..r1 {
                    let s: Vec<f64> = (0..=r)
                        .map(|j| {
                            (0..d)
                                .map(|c| (q[(h * n + r) * d + c] * k[j * d + c]) as f64)
                                .sum::<f64>()
                                * 0.25
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                    for (j, x) in s.iter().enumerate() {
                        mass[j / 32] += (x - mx).exp() / z;
                    }
                }
                let low = kept
                    .iter()
                    .map(|&kb| mass[kb as usize])
                    .fold(f64::INFINITY, f64::min);
                for (kb, &m) in mass.iter().enumerate() {
                    if !kept.contains(&(kb as u32)) {
                        assert!(
                            m <= low + 1e-9,
                            "head {h} block {b}: left out {kb} ({m} > {low})"
                        );
                    }
                }
            }
        }
        assert!(oracle_top_k(&shape, 0.25, (&q, &k), &budgets[..2], 32, 32).is_err());
        assert!(oracle_top_k(&shape, 0.25, (&q, &k), &[0.2, 0.0, 1.0], 32, 32).is_err());
    }
}
