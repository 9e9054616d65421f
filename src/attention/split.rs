//! How a dense attention problem is cut into dispatches so that no storage binding
//! exceeds the device's limit and no grid axis exceeds 65,535 workgroups.
//!
//! Two regimes:
//! - *whole heads*: when one head's rows fit a binding, a dispatch covers a group of
//!   heads over the full sequence (the common case: one or a few dispatches);
//! - *chunked*: otherwise one head per dispatch, rows cut into chunks, keys cut into
//!   chunks, and the online-softmax state `(m, l, acc)` carried from one key chunk to
//!   the next. A 128k-token prompt runs this way on 128 MiB bindings.

use crate::error::{Error, Result};

/// Granularity of row chunks: the largest query block of the dense kernel (64 rows; the
/// kernel's 32-row configuration divides it).
pub const BLOCK_Q: usize = 64;
/// The smallest query block of the dense kernel: grid sizes are checked with it.
pub const MIN_BLOCK_Q: usize = 32;
/// Keys per tile of the dense kernel.
pub const BLOCK_K: usize = 32;

/// The limits the split obeys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLimits {
    /// Bytes per storage binding.
    pub max_binding: u64,
    /// Alignment of binding offsets in bytes.
    pub offset_align: u64,
    /// Workgroups per grid axis.
    pub max_groups: u32,
    /// When not 0, no dispatch's heads cross a multiple of this (the row state is then
    /// held in buffers of this many heads each).
    pub head_run: usize,
}

impl From<&crate::runtime::memory::DeviceLimits> for SplitLimits {
    fn from(l: &crate::runtime::memory::DeviceLimits) -> Self {
        SplitLimits {
            max_binding: l.max_binding,
            offset_align: l.offset_align,
            max_groups: l.max_groups,
            head_run: 0,
        }
    }
}

/// Sizes the split needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitProblem {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query rows.
    pub q_len: usize,
    /// Keys.
    pub kv_len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Bytes per stored K/V/Q/O element.
    pub elem_bytes: usize,
    /// Causal masking (key j visible to row r iff j <= r + kv_len - q_len).
    pub causal: bool,
}

/// One dispatch: q-heads `h0..h1`, rows `r0..r1`, keys `c0..c1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseDispatch {
    /// First q head.
    pub h0: usize,
    /// One past the last q head.
    pub h1: usize,
    /// First query row.
    pub r0: usize,
    /// One past the last query row.
    pub r1: usize,
    /// First key.
    pub c0: usize,
    /// One past the last key.
    pub c1: usize,
    /// First key chunk of its (heads, rows): starts from a fresh (or imported) state.
    pub first: bool,
    /// Last key chunk of its (heads, rows): writes the output.
    pub last: bool,
}

impl DenseDispatch {
    /// Workgroups along x (query blocks of `bq` rows, `bq` dividing [`BLOCK_Q`]) and y
    /// (heads).
    pub fn grid(&self, bq: usize) -> (u32, u32) {
        (
            (self.r1 - self.r0).div_ceil(bq) as u32,
            (self.h1 - self.h0) as u32,
        )
    }
}

/// The dispatches of one dense attention, in execution order.
pub fn split_dense(p: &SplitProblem, lim: &SplitLimits) -> Result<Vec<DenseDispatch>> {
    let d = p.head_dim as u64;
    let group = p.q_heads / p.kv_heads;
    // The aligned-down binding start can add up to `offset_align` bytes in front.
    let budget = lim.max_binding.saturating_sub(lim.offset_align);
    // q-side rows are planned at 4 bytes per element: the f32 ACC state is the widest.
    let q_row = d * 4;
    let kv_row = d * p.elem_bytes as u64;
    let max_groups = lim.max_groups as usize;
    let shift = p.kv_len.saturating_sub(p.q_len);

    let head_q = p.q_len as u64 * q_row;
    let head_kv = p.kv_len as u64 * kv_row;
    let blocks = p.q_len.div_ceil(MIN_BLOCK_Q);
    if head_q <= budget && head_kv <= budget && blocks <= max_groups {
        // Whole heads: as many q heads as fit, with the kv heads they touch.
        let mut per = ((budget / head_q.max(1)) as usize).clamp(1, p.q_heads.min(max_groups));
        loop {
            let kv_needed = (per.div_ceil(group) + 1).min(p.kv_heads) as u64;
            let in_run = lim.head_run == 0 || lim.head_run.is_multiple_of(per);
            if (kv_needed * head_kv <= budget && in_run) || per == 1 {
                break;
            }
            per -= 1;
        }
        let mut out = vec![];
        let mut h0 = 0;
        while h0 < p.q_heads {
            let h1 = (h0 + per).min(p.q_heads);
            out.push(DenseDispatch {
                h0,
                h1,
                r0: 0,
                r1: p.q_len,
                c0: 0,
                c1: p.kv_len,
                first: true,
                last: true,
            });
            h0 = h1;
        }
        return Ok(out);
    }

    // Chunked: one head per dispatch.
    let rows = ((budget / q_row) as usize).min(max_groups * MIN_BLOCK_Q) / BLOCK_Q * BLOCK_Q;
    let keys = (budget / kv_row) as usize / BLOCK_K * BLOCK_K;
    if rows == 0 || keys == 0 {
        let need = (BLOCK_Q as u64 * q_row).max(BLOCK_K as u64 * kv_row) + lim.offset_align;
        return Err(Error::too_large(
            "one 64-row tile of attention (Q/ACC or K/V)",
            need,
            lim.max_binding,
        ));
    }
    let mut out = vec![];
    for (h, r0, r1) in row_blocks(p, rows) {
        let key_end = if p.causal {
            (r1 - 1 + shift + 1).min(p.kv_len)
        } else {
            p.kv_len
        };
        let start = out.len();
        let mut c0 = 0;
        while c0 < key_end.max(1) {
            let c1 = (c0 + keys).min(p.kv_len);
            out.push(DenseDispatch {
                h0: h,
                h1: h + 1,
                r0,
                r1,
                c0,
                c1,
                first: c0 == 0,
                last: false,
            });
            c0 = c1;
        }
        out.last_mut().expect("at least one key chunk").last = true;
        debug_assert!(out[start].first);
    }
    Ok(out)
}

/// One head at a time, its query rows in blocks of `rows`: (head, r0, r1).
fn row_blocks(p: &SplitProblem, rows: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let q_len = p.q_len;
    (0..p.q_heads).flat_map(move |h| {
        (0..q_len)
            .step_by(rows)
            .map(move |r0| (h, r0, (r0 + rows).min(q_len)))
    })
}

/// The dispatches of a sparse attention (block-sparse or stripe executor): like
/// [`split_dense`] but keys are never cut into chunks, because a LUT addresses any key
/// of the head. One kv head must therefore fit a binding; rows are chunked as needed.
pub fn split_sparse(p: &SplitProblem, lim: &SplitLimits) -> Result<Vec<DenseDispatch>> {
    let budget = lim.max_binding.saturating_sub(lim.offset_align);
    let head_kv = p.kv_len as u64 * p.head_dim as u64 * p.elem_bytes as u64;
    // A kv head's binding starts at a multiple of its size: aligned when the size is.
    let slack = if head_kv.is_multiple_of(lim.offset_align.max(1)) {
        0
    } else {
        lim.offset_align
    };
    if head_kv + slack > lim.max_binding {
        return Err(Error::too_large(
            "one kv head of K (sparse attention visits any key, so keys are not chunked)",
            head_kv + slack,
            lim.max_binding,
        ));
    }
    let whole_heads = split_dense(p, lim)?;
    if whole_heads.iter().all(|x| x.first && x.last) {
        return Ok(whole_heads);
    }
    let q_row = p.head_dim as u64 * 4;
    let rows =
        ((budget / q_row) as usize).min(lim.max_groups as usize * MIN_BLOCK_Q) / BLOCK_Q * BLOCK_Q;
    if rows == 0 {
        return Err(Error::too_large(
            "one 64-row tile of attention (Q/ACC)",
            BLOCK_Q as u64 * q_row + lim.offset_align,
            lim.max_binding,
        ));
    }
    Ok(row_blocks(p, rows)
        .map(|(h, r0, r1)| DenseDispatch {
            h0: h,
            h1: h + 1,
            r0,
            r1,
            c0: 0,
            c1: p.kv_len,
            first: true,
            last: true,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prob(q_heads: usize, kv_heads: usize, n: usize, d: usize, eb: usize) -> SplitProblem {
        SplitProblem {
            q_heads,
            kv_heads,
            q_len: n,
            kv_len: n,
            head_dim: d,
            elem_bytes: eb,
            causal: true,
        }
    }
    const BIG: SplitLimits = SplitLimits {
        max_binding: 2 << 30,
        offset_align: 256,
        max_groups: 65535,
        head_run: 0,
    };
    const LAVAPIPE: SplitLimits = SplitLimits {
        max_binding: 128 << 20,
        offset_align: 256,
        max_groups: 65535,
        head_run: 0,
    };

    #[test]
    fn small_problem_is_one_dispatch() {
        let d = split_dense(&prob(8, 2, 100, 64, 4), &BIG).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].h0, d[0].h1, d[0].r1, d[0].c1), (0, 8, 100, 100));
    }

    #[test]
    fn many_heads_split_by_head_groups() {
        // 512 heads x 300 rows x 256 x f32 = 157 MB of Q: more than one lavapipe binding.
        let d = split_dense(&prob(512, 512, 300, 256, 4), &LAVAPIPE).unwrap();
        assert!(d.len() > 1);
        let whole_rows = d
            .iter()
            .all(|x| x.r0 == 0 && x.r1 == 300 && x.first && x.last);
        assert!(whole_rows);
        assert_eq!(d.last().unwrap().h1, 512);
    }

    #[test]
    fn long_prompt_chunks_rows_and_keys_and_skips_masked_chunks() {
        // 128k tokens, d=256, f32: one head is 128 MiB, over the budget.
        let d = split_dense(&prob(2, 1, 131072, 256, 4), &LAVAPIPE).unwrap();
        assert!(d.iter().all(|x| x.h1 == x.h0 + 1));
        // Causal: a row chunk never looks at key chunks past its last row.
        assert!(d.iter().all(|x| x.c0 < x.r1));
        for x in &d {
            let rows = (x.r1 - x.r0) as u64 * 256 * 4;
            let keys = (x.c1 - x.c0) as u64 * 256 * 4;
            assert!(rows + 256 <= LAVAPIPE.max_binding && keys + 256 <= LAVAPIPE.max_binding);
        }
        assert!(d.iter().any(|x| !x.first) && d.iter().any(|x| !x.last));
    }

    #[test]
    fn tiny_binding_is_a_typed_error() {
        let lim = SplitLimits {
            max_binding: 1024,
            ..LAVAPIPE
        };
        assert!(matches!(
            split_dense(&prob(1, 1, 64, 256, 4), &lim),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn sparse_split_never_cuts_keys() {
        // f16 K (64 MiB per head) fits; f32 Q/ACC rows (128 MiB per head) do not.
        let d = split_sparse(&prob(2, 1, 131072, 256, 2), &LAVAPIPE).unwrap();
        assert!(d.len() > 2);
        let whole_keys = d
            .iter()
            .all(|x| x.c0 == 0 && x.c1 == 131072 && x.first && x.last);
        assert!(whole_keys);
        assert!(d.iter().all(|x| x.r0 % BLOCK_Q == 0));
        // A kv head of exactly the binding limit fits (its start is aligned); one over
        // it is a typed error.
        assert!(split_sparse(&prob(2, 1, 131072, 256, 4), &LAVAPIPE).is_ok());
        assert!(matches!(
            split_sparse(&prob(2, 1, 131072 + 64, 256, 4), &LAVAPIPE),
            Err(Error::TooLarge { .. })
        ));
    }
}
