//! CPU twin of `shaders/flash_attention.wgsl`: blocked online-softmax attention,
//! multithreaded with rayon over (head, query block). Same semantics as the GPU kernel:
//! causal alignment at the end of the keys, GQA without copying K/V, optional import
//! and export of the row state `(m, l, acc)`.

use rayon::prelude::*;

use super::AttentionShape;

const NEG_BIG: f32 = -1.0e30;
/// Query rows per task.
const ROWS: usize = 16;
/// Keys per tile.
const KEYS: usize = 64;

/// Row state on the host: `ml` is `[q_heads, q_len, 2]` (m, l), `acc` is
/// `[q_heads, q_len, head_dim]` (unnormalized output).
#[derive(Clone, Debug, PartialEq)]
pub struct HostRowState {
    /// Interleaved (m, l) per row.
    pub ml: Vec<f32>,
    /// Unnormalized output rows.
    pub acc: Vec<f32>,
}

impl HostRowState {
    /// The empty state (m = -1e30, l = 0, acc = 0) for a shape.
    pub fn empty(shape: &AttentionShape) -> Self {
        let rows = shape.q_heads * shape.seq_len;
        let mut ml = vec![0.0; rows * 2];
        for r in 0..rows {
            ml[2 * r] = NEG_BIG;
        }
        HostRowState {
            ml,
            acc: vec![0.0; rows * shape.head_dim],
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums so the compiler vectorizes.
    let mut s = [0.0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            s[i] += x[i] * y[i];
        }
    }
    let mut t: f32 = s.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

/// Dense attention on the host. `q` is `[q_heads, seq_len, d]`, `k`/`v` are
/// `[kv_heads, kv_len, d]`, all f32. Returns the normalized output `[q_heads, seq_len, d]`.
/// With `state`, the rows start from it and it receives the final state.
pub fn dense_attention_cpu(
    shape: &AttentionShape,
    causal: bool,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    state: Option<&mut HostRowState>,
) -> Vec<f32> {
    let d = shape.head_dim;
    let n = shape.seq_len;
    let nk = shape.kv_len;
    let group = shape.q_heads / shape.kv_heads;
    let shift = nk.saturating_sub(n);
    let mut out = vec![0.0f32; shape.q_heads * n * d];
    let blocks_per_head = n.div_ceil(ROWS);
    let (ml_in, acc_in) = match &state {
        Some(s) => (Some(s.ml.as_slice()), Some(s.acc.as_slice())),
        None => (None, None),
    };
    // Each task computes one (head, row block) and returns its final state.
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..shape.q_heads * blocks_per_head)
        .into_par_iter()
        .map(|task| {
            let h = task / blocks_per_head;
            let r0 = (task % blocks_per_head) * ROWS;
            let r1 = (r0 + ROWS).min(n);
            let rows = r1 - r0;
            let kvh = h / group;
            let mut m = vec![NEG_BIG; rows];
            let mut l = vec![0.0f32; rows];
            let mut acc = vec![0.0f32; rows * d];
            if let (Some(mli), Some(acci)) = (ml_in, acc_in) {
                for i in 0..rows {
                    let row = h * n + r0 + i;
                    m[i] = mli[2 * row];
                    l[i] = mli[2 * row + 1];
                    acc[i * d..(i + 1) * d].copy_from_slice(&acci[row * d..(row + 1) * d]);
                }
            }
            let key_end = if causal { (r1 + shift).min(nk) } else { nk };
            let kbase = kvh * nk * d;
            let mut s = vec![0.0f32; KEYS];
            let mut c0 = 0;
            while c0 < key_end {
                let c1 = (c0 + KEYS).min(key_end);
                for i in 0..rows {
                    let r = r0 + i;
                    let qrow = &q[(h * n + r) * d..(h * n + r + 1) * d];
                    let visible_end = if causal { (r + shift + 1).min(c1) } else { c1 };
                    let mut mx = m[i];
                    for j in c0..c1 {
                        let val = if j < visible_end {
                            dot(qrow, &k[kbase + j * d..kbase + (j + 1) * d]) * scale
                        } else {
                            NEG_BIG
                        };
                        s[j - c0] = val;
                        mx = mx.max(val);
                    }
                    let alpha = (m[i] - mx).exp();
                    let arow = &mut acc[i * d..(i + 1) * d];
                    for a in arow.iter_mut() {
                        *a *= alpha;
                    }
                    let mut sum = 0.0;
                    for j in c0..c1 {
                        let sv = s[j - c0];
                        if sv > 0.5 * NEG_BIG {
                            let w = (sv - mx).exp();
                            sum += w;
                            let vrow = &v[kbase + j * d..kbase + (j + 1) * d];
                            for (a, x) in arow.iter_mut().zip(vrow) {
                                *a += w * x;
                            }
                        }
                    }
                    l[i] = l[i] * alpha + sum;
                    m[i] = mx;
                }
                c0 = c1;
            }
            let mut ml = vec![0.0f32; rows * 2];
            for i in 0..rows {
                ml[2 * i] = m[i];
                ml[2 * i + 1] = l[i];
            }
            (ml, acc)
        })
        .collect();
    for (task, (ml, acc)) in results.iter().enumerate() {
        let h = task / blocks_per_head;
        let r0 = (task % blocks_per_head) * ROWS;
        let rows = ml.len() / 2;
        for i in 0..rows {
            let row = h * n + r0 + i;
            let lv = ml[2 * i + 1];
            let inv = if lv > 0.0 { 1.0 / lv } else { 0.0 };
            for c in 0..d {
                out[row * d + c] = acc[i * d + c] * inv;
            }
        }
    }
    if let Some(st) = state {
        for (task, (ml, acc)) in results.into_iter().enumerate() {
            let h = task / blocks_per_head;
            let r0 = (task % blocks_per_head) * ROWS;
            let rows = ml.len() / 2;
            let row = h * n + r0;
            st.ml[2 * row..2 * (row + rows)].copy_from_slice(&ml);
            st.acc[row * d..(row + rows) * d].copy_from_slice(&acc);
        }
    }
    out
}

/// Straightforward O(N²) reference (f64 accumulation, full softmax), for tests.
pub fn naive_attention(
    shape: &AttentionShape,
    causal: bool,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let (d, n, nk) = (shape.head_dim, shape.seq_len, shape.kv_len);
    let group = shape.q_heads / shape.kv_heads;
    let mut out = vec![0.0; shape.q_heads * n * d];
    for h in 0..shape.q_heads {
        let kvh = h / group;
        for r in 0..n {
            let end = if causal { r + nk - n + 1 } else { nk };
            let qrow = &q[(h * n + r) * d..(h * n + r + 1) * d];
            let s: Vec<f64> = (0..end)
                .map(|j| {
                    let krow = &k[(kvh * nk + j) * d..(kvh * nk + j + 1) * d];
                    qrow.iter()
                        .zip(krow)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for c in 0..d {
                let mut a = 0.0;
                for (j, wj) in w.iter().enumerate() {
                    a += wj * v[(kvh * nk + j) * d + c] as f64;
                }
                out[(h * n + r) * d + c] = (a / sum) as f32;
            }
        }
    }
    out
}
