//! Oracle patterns: the smallest key sets that reach an attention-mass coverage γ,
//! computed exactly on the host from Q and K — the upper bound real methods are
//! compared with (`docs/algorithms.md` §5).
//!
//! - per row: for each query row, the fewest keys whose softmax mass is ≥ γ (the top
//!   keys of that row); its density is the fraction of causal pairs they make up;
//! - per block: for each (q-head, query block), the fewest key blocks whose mass,
//!   summed over the block's rows, is ≥ γ × rows; a [`SparseLut`] that the block-sparse
//!   executor runs (`Method::BlockSparse`), so its output error can be measured too.
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
    struct Block {
        row_keys: u64,
        blocks: Vec<u32>,
        block_pairs: u64,
        block_mass: f64,
    }
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
                row_keys += top_mass_count(&mut p, gamma) as u64;
            }
            // Fewest key blocks reaching γ × rows of the block's summed mass.
            let rows = (r1 - r0) as f64;
            let mut order: Vec<usize> = (0..nkb).filter(|&kb| kb * key_block < r1).collect();
            order.sort_unstable_by(|&a, &c| mass[c].total_cmp(&mass[a]));
            let mut acc = 0.0;
            let mut chosen = vec![];
            for kb in order {
                if acc >= gamma * rows - 1e-9 {
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
    let causal = shape.q_heads as f64 * (n as f64) * (n as f64 + 1.0) / 2.0;
    let block_lut = SparseLut::from_fn(
        shape.q_heads,
        n,
        q_block,
        LutUnit::Blocks(key_block),
        |h, b| blocks[h * nqb + b].blocks.clone(),
    )?;
    Ok(Oracle {
        gamma,
        row_density: blocks.iter().map(|b| b.row_keys).sum::<u64>() as f64 / causal,
        block_density: blocks.iter().map(|b| b.block_pairs).sum::<u64>() as f64 / causal,
        block_recall: blocks.iter().map(|b| b.block_mass).sum::<f64>() / (shape.q_heads * n) as f64,
        block_lut,
    })
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
}
