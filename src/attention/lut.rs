//! Sparse key lists: which keys each query block visits, the input of the two sparse
//! executors (block-sparse and stripe), whoever built it (a method on the GPU, an
//! oracle on the host, or the caller).
//!
//! Layout (the same on the host and in GPU buffers): `ranges[h * q_blocks + b]` is the
//! `[first, end)` slice of `indices` for query block `b` (rows `b * q_block ..`) of
//! q-head `h`; the slice is strictly ascending. In [`LutUnit::Blocks`] an index is a
//! key block (keys `i * key_block ..`), in [`LutUnit::Keys`] a key position. Entries
//! past a row's causal horizon are allowed (the executors mask per key), so one LUT can
//! serve every row of its block.

use serde::Serialize;

use super::AttentionShape;
use crate::error::{Error, Result};

/// What the indices of a [`SparseLut`] count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LutUnit {
    /// Key blocks of this many keys (a multiple of 32): the block-sparse executor.
    Blocks(usize),
    /// Single key positions: the stripe executor gathers those K/V rows.
    Keys,
}

/// Per (q-head, query block) ascending key lists; see the module docs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SparseLut {
    /// Query heads the LUT covers.
    pub q_heads: usize,
    /// Query rows (= keys: sparse prefill is square).
    pub seq_len: usize,
    /// Query rows per LUT row (a multiple of 32).
    pub q_block: usize,
    /// Blocks or positions.
    pub unit: LutUnit,
    /// `[first, end)` into `indices` per (head, query block).
    pub ranges: Vec<[u32; 2]>,
    /// Ascending key blocks or positions, row after row.
    pub indices: Vec<u32>,
}

impl SparseLut {
    /// Query blocks per head.
    pub fn q_blocks(&self) -> usize {
        self.seq_len.div_ceil(self.q_block)
    }

    /// Builds a LUT from a function giving each (head, query block)'s ascending list.
    pub fn from_fn(
        q_heads: usize,
        seq_len: usize,
        q_block: usize,
        unit: LutUnit,
        mut list: impl FnMut(usize, usize) -> Vec<u32>,
    ) -> Result<Self> {
        if q_block == 0 {
            return Err(Error::InvalidArgument("LUT query block of 0 rows".into()));
        }
        let nqb = seq_len.div_ceil(q_block);
        let mut ranges = Vec::with_capacity(q_heads * nqb);
        let mut indices = vec![];
        for h in 0..q_heads {
            for b in 0..nqb {
                let first = indices.len() as u32;
                indices.extend(list(h, b));
                ranges.push([first, indices.len() as u32]);
            }
        }
        let lut = SparseLut {
            q_heads,
            seq_len,
            q_block,
            unit,
            ranges,
            indices,
        };
        lut.validate_self()?;
        Ok(lut)
    }

    fn validate_self(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("sparse LUT: {m}")));
        if self.q_block == 0 || !self.q_block.is_multiple_of(32) {
            return bad(format!(
                "query block {} is not a positive multiple of 32",
                self.q_block
            ));
        }
        let limit = match self.unit {
            LutUnit::Blocks(kb) => {
                if kb == 0 || !kb.is_multiple_of(32) {
                    return bad(format!("key block {kb} is not a positive multiple of 32"));
                }
                self.seq_len.div_ceil(kb)
            }
            LutUnit::Keys => self.seq_len,
        };
        if self.ranges.len() != self.q_heads * self.q_blocks() {
            return bad(format!(
                "{} ranges for {} heads x {} query blocks",
                self.ranges.len(),
                self.q_heads,
                self.q_blocks()
            ));
        }
        if self.indices.len() > u32::MAX as usize {
            return bad("more than 2^32 entries".into());
        }
        for (i, &[a, b]) in self.ranges.iter().enumerate() {
            if a > b || b as usize > self.indices.len() {
                return bad(format!("range {i} = [{a}, {b}) outside the indices"));
            }
            let list = &self.indices[a as usize..b as usize];
            if list.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("list {i} is not strictly ascending"));
            }
            if let Some(&last) = list.last()
                && last as usize >= limit
            {
                return bad(format!("list {i} has index {last} >= {limit}"));
            }
        }
        Ok(())
    }

    /// Checks the LUT against an attention shape (heads, length, sorted lists).
    pub fn validate(&self, shape: &AttentionShape) -> Result<()> {
        if self.q_heads != shape.q_heads || self.seq_len != shape.seq_len {
            return Err(Error::Mismatch(format!(
                "LUT for {} heads x {} rows, attention has {} x {}",
                self.q_heads, self.seq_len, shape.q_heads, shape.seq_len
            )));
        }
        self.validate_self()
    }

    /// The entries (key blocks or keys) of query block `b` of head `h`, as listed.
    pub fn entries(&self, h: usize, b: usize) -> &[u32] {
        let [a, e] = self.ranges[h * self.q_blocks() + b];
        &self.indices[a as usize..e as usize]
    }

    /// The key positions query block `b` of head `h` visits, ascending, all `< seq_len`.
    pub fn keys_of(&self, h: usize, b: usize) -> Vec<u32> {
        let [a, e] = self.ranges[h * self.q_blocks() + b];
        let list = &self.indices[a as usize..e as usize];
        match self.unit {
            LutUnit::Keys => list.to_vec(),
            LutUnit::Blocks(kb) => list
                .iter()
                .flat_map(|&i| {
                    let s = i as usize * kb;
                    (s..(s + kb).min(self.seq_len)).map(|j| j as u32)
                })
                .collect(),
        }
    }

    /// Entries of every LUT row (`[q_heads · rows]`).
    pub fn counts(&self) -> Vec<u32> {
        self.ranges.iter().map(|[a, b]| b - a).collect()
    }

    /// (row, key) pairs the executors compute with this LUT: per row, the listed keys
    /// at or before it (causal) or all listed keys.
    pub fn pairs(&self, causal: bool) -> u64 {
        (0..self.q_heads).map(|h| self.head_pairs(h, causal)).sum()
    }

    /// The pairs of [`SparseLut::pairs`] of query head `h` alone.
    pub fn head_pairs(&self, h: usize, causal: bool) -> u64 {
        let mut total = 0u64;
        {
            for b in 0..self.q_blocks() {
                let keys = self.keys_of(h, b);
                let (r0, r1) = (b * self.q_block, ((b + 1) * self.q_block).min(self.seq_len));
                total += if causal {
                    let mut seen = 0usize;
                    let mut sum = 0u64;
                    for r in r0..r1 {
                        while seen < keys.len() && keys[seen] as usize <= r {
                            seen += 1;
                        }
                        sum += seen as u64;
                    }
                    sum
                } else {
                    (keys.len() * (r1 - r0)) as u64
                };
            }
        }
        total
    }

    /// Bytes of the two GPU buffers.
    pub fn gpu_bytes(&self) -> u64 {
        (self.ranges.len() * 8 + self.indices.len().max(1) * 4) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lut_expands_and_counts_causal_pairs() {
        // 100 rows, 64-row query blocks, 32-key blocks: block 1 (rows 64..99) visits
        // key blocks 0 and 2 (keys 0..31 and 64..95).
        let lut = SparseLut::from_fn(1, 100, 64, LutUnit::Blocks(32), |_, b| {
            if b == 0 { vec![0, 1] } else { vec![0, 2] }
        })
        .unwrap();
        assert_eq!(lut.keys_of(0, 1).len(), 64);
        // Block 0: rows 0..63 see keys 0..=r: 64*65/2. Block 1: rows 64..99 see all 32
        // of block 0 and keys 64..=r of block 2 (r < 96) or all 32 (r >= 96).
        let b1: u64 = (64..100).map(|r| 32 + (r.min(95) - 64 + 1) as u64).sum();
        assert_eq!(lut.pairs(true), 64 * 65 / 2 + b1);
        assert_eq!(lut.pairs(false), 64 * 64 + 36 * 64);
    }

    #[test]
    fn bad_luts_are_typed_errors() {
        let up = |b: Vec<u32>| SparseLut::from_fn(1, 64, 64, LutUnit::Keys, move |_, _| b.clone());
        assert!(up(vec![3, 2]).is_err());
        assert!(up(vec![1, 1]).is_err());
        assert!(up(vec![64]).is_err());
        assert!(up(vec![0, 63]).is_ok());
        assert!(SparseLut::from_fn(1, 64, 48, LutUnit::Keys, |_, _| vec![]).is_err());
        assert!(SparseLut::from_fn(1, 64, 64, LutUnit::Blocks(40), |_, _| vec![]).is_err());
    }
}
