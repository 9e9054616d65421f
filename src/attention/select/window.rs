//! Sliding-window attention with sink keys: a fixed block LUT run in one pass of the
//! block-sparse executor (exact: the band and the sinks are computed, nothing else).

use serde::{Deserialize, Serialize};

use crate::attention::lut::{LutUnit, SparseLut};
use crate::attention::params::impl_params;
use crate::error::Result;

/// Sliding window with sinks: row r attends keys j ≤ r with `r − j < window` or
/// `j < sinks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    /// Keys per window (≥ 1).
    pub window: usize,
    /// Leading keys every row also attends.
    pub sinks: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            window: 4096,
            sinks: 4,
        }
    }
}

impl WindowConfig {
    /// The block LUT the window runs on: 64-row query blocks, 64-key blocks (sink
    /// blocks and the band).
    pub fn lut(&self, q_heads: usize, seq_len: usize) -> Result<SparseLut> {
        const B: usize = 64;
        let sink_blocks = self.sinks.div_ceil(B);
        SparseLut::from_fn(q_heads, seq_len, B, LutUnit::Blocks(B), |_, qb| {
            let first_row = qb * B;
            let lo = (first_row + 1).saturating_sub(self.window) / B;
            let mut v: Vec<u32> = (0..sink_blocks.min(lo) as u32).collect();
            v.extend(lo as u32..=qb as u32);
            v
        })
    }

    /// Causal pairs the window computes (all heads).
    pub fn pairs(&self, q_heads: usize, seq_len: usize) -> u64 {
        let per_head: u64 = (0..seq_len)
            .map(|r| {
                let band = (r + 1).min(self.window);
                let sinks = self.sinks.min(r + 1 - band);
                (band + sinks) as u64
            })
            .sum();
        per_head * q_heads as u64
    }
}

impl_params!(WindowConfig, "window" { window, sinks });
