//! The block pattern a method computes: query blocks × key blocks, for the demo's
//! heatmap.

use serde::Serialize;
use wgsparse::{AttentionShape, Method};

/// Cell values of [`BlockPattern::cells`].
pub mod cell {
    /// Never needed: every pair in the block is above the causal diagonal.
    pub const MASKED: u8 = 0;
    /// Computed by the method.
    pub const COMPUTED: u8 = 1;
    /// Needed by dense attention but skipped by a sparse method.
    pub const SKIPPED: u8 = 2;
}

/// Which (query block, key block) tiles a method computes; the same for every head
/// for the methods this build has.
#[derive(Clone, Debug, Serialize)]
pub struct BlockPattern {
    /// Query rows per block.
    pub block_q: usize,
    /// Keys per block.
    pub block_k: usize,
    /// Number of query blocks (rows of the picture).
    pub q_blocks: usize,
    /// Number of key blocks (columns).
    pub k_blocks: usize,
    /// `q_blocks × k_blocks` cells, row-major: [`cell::MASKED`], [`cell::COMPUTED`] or
    /// [`cell::SKIPPED`].
    pub cells: Vec<u8>,
    /// Computed cells / cells dense causal attention needs.
    pub block_density: f64,
}

impl BlockPattern {
    /// The pattern of `method` on `shape` with square blocks of `block` rows and keys.
    /// `None` for a method whose selected blocks this crate cannot know ahead of the run
    /// (a sparse method reports its own pattern).
    pub fn for_method(
        method: &Method,
        shape: &AttentionShape,
        causal: bool,
        block: usize,
    ) -> Option<Self> {
        let (n, nk) = (shape.seq_len, shape.kv_len);
        let q_blocks = n.div_ceil(block);
        let k_blocks = nk.div_ceil(block);
        let shift = nk - n.min(nk);
        let needed = |qb: usize, kb: usize| {
            // The block's last row sees keys up to last_row + shift.
            let last_row = ((qb + 1) * block).min(n) - 1;
            !causal || kb * block <= last_row + shift
        };
        let mut cells = Vec::with_capacity(q_blocks * k_blocks);
        for qb in 0..q_blocks {
            for kb in 0..k_blocks {
                cells.push(if !needed(qb, kb) {
                    cell::MASKED
                } else {
                    match method {
                        Method::Dense => cell::COMPUTED,
                        // A sparse method's pattern must come from its own report (the
                        // blocks it selected), never be guessed here.
                        #[allow(unreachable_patterns)]
                        _ => return None,
                    }
                });
            }
        }
        let computed = cells.iter().filter(|&&c| c == cell::COMPUTED).count();
        let need = cells.iter().filter(|&&c| c != cell::MASKED).count();
        Some(BlockPattern {
            block_q: block,
            block_k: block,
            q_blocks,
            k_blocks,
            cells,
            block_density: computed as f64 / need.max(1) as f64,
        })
    }

    /// The recall (share of dense softmax mass inside computed blocks) when it is known
    /// without scores: 1 when every needed block is computed. `None` otherwise (the
    /// sparse methods compute it from the scores).
    pub fn recall_if_complete(&self) -> Option<f64> {
        (!self.cells.contains(&cell::SKIPPED)).then_some(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_causal_is_a_triangle() {
        let shape = AttentionShape::new(2, 1, 256, 64);
        let p = BlockPattern::for_method(&Method::Dense, &shape, true, 64).unwrap();
        assert_eq!((p.q_blocks, p.k_blocks), (4, 4));
        let computed: Vec<usize> = (0..4)
            .map(|r| {
                p.cells[r * 4..r * 4 + 4]
                    .iter()
                    .filter(|&&c| c == cell::COMPUTED)
                    .count()
            })
            .collect();
        assert_eq!(computed, vec![1, 2, 3, 4]);
        assert_eq!(p.block_density, 1.0);
        assert_eq!(p.recall_if_complete(), Some(1.0));
        let full = BlockPattern::for_method(&Method::Dense, &shape, false, 100).unwrap();
        assert!(full.cells.iter().all(|&c| c == cell::COMPUTED));
        assert_eq!((full.q_blocks, full.k_blocks), (3, 3));
    }
}
