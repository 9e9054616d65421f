//! The keys a method computed, as a picture for the demo: query blocks (rows) × key
//! bins (columns, one key per column up to 512 keys), each cell the fraction of its
//! causal (query, key) pairs the method computed — stripes show as single columns,
//! blocks as rectangles.

use serde::Serialize;
use wgsparse::attention::lut::SparseLut;
use wgsparse::{AttentionShape, Method};

/// Cell value of a cell with no pair dense attention needs (above the diagonal).
pub const MASKED: f32 = -1.0;

/// Fraction of needed pairs computed per (query block, key bin) of one head.
#[derive(Clone, Debug, Serialize)]
pub struct KeyPattern {
    /// The head shown.
    pub head: usize,
    /// Query rows per picture row.
    pub block_q: usize,
    /// Keys per picture column.
    pub key_bin: usize,
    /// Picture rows.
    pub q_blocks: usize,
    /// Picture columns.
    pub k_bins: usize,
    /// `q_blocks × k_bins`, row-major: [`MASKED`] or the computed fraction in [0, 1].
    pub cells: Vec<f32>,
    /// Computed pairs / needed pairs of this head.
    pub head_density: f64,
}

/// Which keys row `r` of head `h` visits, from a method and the LUTs it reported.
pub struct Visibility<'a> {
    method: &'a Method,
    luts: Vec<&'a SparseLut>,
    causal: bool,
}

impl<'a> Visibility<'a> {
    /// `luts`: what [`wgsparse::AttentionPlan::selected_pattern`] returned (empty for
    /// dense and window, which need none).
    pub fn new(method: &'a Method, luts: &'a [SparseLut], causal: bool) -> Self {
        Visibility {
            method,
            luts: luts.iter().collect(),
            causal,
        }
    }

    /// The keys row `r` of head `h` visits, as a bitmap over the `n` keys.
    pub fn row_keys(&self, h: usize, r: usize, n: usize) -> Vec<bool> {
        let mut vis = vec![false; n];
        let horizon = if self.causal { r + 1 } else { n };
        match self.method {
            Method::Window(w) => {
                for (j, v) in vis.iter_mut().enumerate().take(horizon) {
                    *v = r - j < w.window || j < w.sinks;
                }
            }
            Method::Dense => vis[..horizon].iter_mut().for_each(|v| *v = true),
            _ => {
                for lut in &self.luts {
                    for j in lut.keys_of(h, r / lut.q_block) {
                        if (j as usize) < horizon {
                            vis[j as usize] = true;
                        }
                    }
                }
            }
        }
        vis
    }
}

impl KeyPattern {
    /// The picture of head `head`: `block_q` rows per picture row, at most `max_cols`
    /// columns.
    pub fn build(
        shape: &AttentionShape,
        vis: &Visibility,
        head: usize,
        block_q: usize,
        max_cols: usize,
    ) -> Self {
        let n = shape.seq_len;
        let key_bin = n.div_ceil(max_cols.max(1)).max(1);
        let (q_blocks, k_bins) = (n.div_ceil(block_q), n.div_ceil(key_bin));
        let mut computed = vec![0u64; q_blocks * k_bins];
        let mut needed = vec![0u64; q_blocks * k_bins];
        let (mut all_c, mut all_n) = (0u64, 0u64);
        for r in 0..n {
            let keys = vis.row_keys(head, r, n);
            let horizon = if vis.causal { r + 1 } else { n };
            let row = r / block_q;
            for (j, &k) in keys.iter().enumerate().take(horizon) {
                let c = row * k_bins + j / key_bin;
                needed[c] += 1;
                computed[c] += k as u64;
            }
            all_n += horizon as u64;
            all_c += keys.iter().filter(|&&k| k).count() as u64;
        }
        let cells = computed
            .iter()
            .zip(&needed)
            .map(|(&c, &nd)| {
                if nd == 0 {
                    MASKED
                } else {
                    c as f32 / nd as f32
                }
            })
            .collect();
        KeyPattern {
            head,
            block_q,
            key_bin,
            q_blocks,
            k_bins,
            cells,
            head_density: all_c as f64 / all_n.max(1) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgsparse::WindowConfig;

    #[test]
    fn dense_causal_is_a_full_triangle_and_window_a_band() {
        let shape = AttentionShape::new(2, 1, 256, 64);
        let vis = Visibility::new(&Method::Dense, &[], true);
        let p = KeyPattern::build(&shape, &vis, 0, 64, 512);
        assert_eq!((p.q_blocks, p.k_bins, p.key_bin), (4, 256, 1));
        for r in 0..4 {
            for c in 0..256 {
                let v = p.cells[r * 256 + c];
                assert_eq!(v, if c < (r + 1) * 64 { 1.0 } else { MASKED });
            }
        }
        assert_eq!(p.head_density, 1.0);
        let m = Method::Window(WindowConfig {
            window: 32,
            sinks: 4,
        });
        let vis = Visibility::new(&m, &[], true);
        let p = KeyPattern::build(&shape, &vis, 0, 64, 128);
        assert_eq!(p.key_bin, 2);
        // Last row block: sinks computed, the middle skipped, the band computed.
        let last = &p.cells[3 * 128..];
        assert_eq!(last[0], 1.0);
        assert_eq!(last[60], 0.0);
        assert_eq!(last[127], 1.0);
        assert!(p.head_density < 0.5);
    }
}
