//! Expert streaming: the expert weights stay in host memory and the GPU holds a few
//! of them in "slots" (an LRU cache). Each run learns which experts its tokens were
//! routed to (the pre-attention router runs first), uploads the missing ones while the
//! GPU is still busy with what was submitted before (a decoder layer's attention), and
//! runs the experts in as many rounds as the slots require.
//!
//! This file holds the host side: the slot layout of the packed weights, the cache
//! state, and the round planner (pure logic, tested without a GPU). The GPU side is in
//! [`super::plan`].

use std::ops::Range;

use serde::Serialize;

use super::{PackedMatrix, WeightFormat};
use crate::error::{Error, Result};

/// Marks an expert that a round does not compute (`NOT_RESIDENT` in the WGSL).
pub const NOT_RESIDENT: u32 = u32::MAX;

/// Where the expert weights live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertResidency {
    /// Every expert uploaded once when the plan is built.
    #[default]
    Resident,
    /// Weights stay in host memory; the GPU caches `slots` experts and each run
    /// uploads the routed experts it misses.
    Streamed {
        /// Experts the GPU holds at once (1 ..= experts).
        slots: usize,
    },
}

/// What streaming did in one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StreamStats {
    /// GPU slots.
    pub slots: usize,
    /// Experts that received at least one token.
    pub routed: usize,
    /// Routed experts already in a slot.
    pub hits: usize,
    /// Routed experts uploaded by this run.
    pub uploads: usize,
    /// Bytes written to the GPU (weights and slot maps).
    pub uploaded_bytes: u64,
    /// Expert rounds (submissions of the expert kernels): 1 when the routed experts
    /// fit the slots.
    pub rounds: usize,
    /// Host milliseconds spent handing the uploads to the queue.
    pub upload_ms: f64,
    /// Host milliseconds from the routing being known to the first expert round being
    /// submitted.
    pub stall_ms: f64,
}

impl std::fmt::Display for StreamStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} slots, {} routed, {} cached, {} uploaded ({:.1} MB; {:.3} ms host upload, \
             {:.3} ms from routing known to experts submitted), {} rounds",
            self.slots,
            self.routed,
            self.hits,
            self.uploads,
            self.uploaded_bytes as f64 / 1e6,
            self.upload_ms,
            self.stall_ms,
            self.rounds
        )
    }
}

/// The words of expert `e` in a packed `[experts · ffn, hidden]` matrix: its weight
/// words, and (Q4_0) its scale words.
pub fn expert_words(
    m: &PackedMatrix,
    e: usize,
    ffn: usize,
) -> (Range<usize>, Option<Range<usize>>) {
    match m.format {
        WeightFormat::F16 => {
            let n = ffn * m.cols / 2;
            (e * n..(e + 1) * n, None)
        }
        WeightFormat::Q4_0 => {
            let blocks = ffn * m.cols / 32;
            let (nw, sw) = (blocks * 4, blocks / 2);
            let sb = m.scale_base as usize;
            (e * nw..(e + 1) * nw, Some(sb + e * sw..sb + (e + 1) * sw))
        }
    }
}

/// Words of a slot buffer holding `slots` experts of `m`'s shape, and its scale base.
pub fn slot_buffer_words(m: &PackedMatrix, slots: usize, ffn: usize) -> (usize, u32) {
    let (w, s) = expert_words(m, 0, ffn);
    let nw = w.len() * slots;
    let sw = s.map_or(0, |s| s.len() * slots);
    let base = match m.format {
        WeightFormat::F16 => 0,
        WeightFormat::Q4_0 => nw as u32,
    };
    (nw + sw, base)
}

/// Word offsets of slot `s` in a slot buffer (weights, and scales for Q4_0).
pub fn slot_offsets(
    m: &PackedMatrix,
    slots: usize,
    ffn: usize,
    s: usize,
) -> (usize, Option<usize>) {
    let (w, sc) = expert_words(m, 0, ffn);
    let (_, base) = slot_buffer_words(m, slots, ffn);
    (s * w.len(), sc.map(|sc| base as usize + s * sc.len()))
}

/// `queue.write_buffer`, with the copy into the queue's staging memory spread over the
/// rayon threads for large uploads (natively): one thread copies about 8 GB/s, which
/// made a streamed layer's uploads host-bound.
pub(crate) fn write_buffer_parallel(
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    data: &[u8],
) {
    #[cfg(not(target_arch = "wasm32"))]
    if data.len() >= 1 << 20
        && let Some(size) = std::num::NonZeroU64::new(data.len() as u64)
        && let Some(mut view) = queue.write_buffer_with(buffer, offset, size)
    {
        use rayon::prelude::*;
        /// The mapped staging memory, shared by the copying threads.
        struct Dst(*mut u8);
        // SAFETY: every thread below writes its own disjoint range of the mapping.
        unsafe impl Sync for Dst {}
        impl Dst {
            fn at(&self, i: usize) -> *mut u8 {
                // SAFETY: callers stay inside the mapping (see the loop below).
                unsafe { self.0.add(i) }
            }
        }
        let piece = (data.len() / (4 * rayon::current_num_threads().max(1))).max(1 << 18);
        let dst = Dst(view.slice(..).as_raw_ptr().as_ptr() as *mut u8);
        data.par_chunks(piece).enumerate().for_each(|(i, src)| {
            // SAFETY: the mapping holds data.len() bytes; chunk i covers
            // [i·piece, i·piece + src.len()) ⊆ [0, data.len()), disjoint from the others,
            // and `view` outlives this loop.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.at(i * piece), src.len()) }
        });
        return;
    }
    queue.write_buffer(buffer, offset, data);
}

/// One round of a streamed run: which experts it uploads into which slot, and the
/// expert → slot map its kernels read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    /// (expert, slot) uploads before the round.
    pub uploads: Vec<(usize, usize)>,
    /// Per expert: its slot if this round computes it, else [`NOT_RESIDENT`].
    pub slot_of: Vec<u32>,
}

/// Which expert each GPU slot holds, with a use clock for LRU eviction.
#[derive(Clone, Debug)]
pub struct ExpertCache {
    experts: usize,
    slot_expert: Vec<Option<usize>>,
    last_used: Vec<u64>,
    clock: u64,
}

impl ExpertCache {
    /// An empty cache of `slots` slots for `experts` experts.
    pub fn new(experts: usize, slots: usize) -> Result<Self> {
        if slots == 0 || slots > experts {
            return Err(Error::InvalidArgument(format!(
                "expert streaming needs 1 ..= {experts} slots, got {slots}"
            )));
        }
        Ok(ExpertCache {
            experts,
            slot_expert: vec![None; slots],
            last_used: vec![0; slots],
            clock: 0,
        })
    }

    /// Slots.
    pub fn slots(&self) -> usize {
        self.slot_expert.len()
    }

    /// The slot holding expert `e`, if any.
    pub fn slot_of(&self, e: usize) -> Option<usize> {
        self.slot_expert.iter().position(|&x| x == Some(e))
    }

    /// Plans the rounds for a run whose experts received `counts` tokens, and updates
    /// the cache as if they ran. Every routed expert is computed by exactly one round;
    /// cached experts are computed in the first round without an upload; a slot is
    /// only reused by a later round after the round that used it.
    pub fn plan(&mut self, counts: &[u32]) -> Result<(Vec<Round>, usize)> {
        if counts.len() != self.experts {
            return Err(Error::Mismatch(format!(
                "{} expert counts for {} experts",
                counts.len(),
                self.experts
            )));
        }
        self.clock += 1;
        let routed: Vec<usize> = (0..self.experts).filter(|&e| counts[e] > 0).collect();
        let mut misses: std::collections::VecDeque<usize> = routed
            .iter()
            .copied()
            .filter(|&e| self.slot_of(e).is_none())
            .collect();
        let hits = routed.len() - misses.len();
        let mut rounds = Vec::new();
        // First round: the hits, plus misses in slots not needed by this run (empty
        // first, then least recently used).
        let mut busy = vec![false; self.slots()];
        let mut in_round: Vec<usize> = Vec::new();
        for &e in &routed {
            if let Some(s) = self.slot_of(e) {
                busy[s] = true;
                in_round.push(e);
            }
        }
        loop {
            let mut uploads = Vec::new();
            while !misses.is_empty() {
                let free = (0..self.slots())
                    .filter(|&s| !busy[s])
                    .min_by_key(|&s| (self.slot_expert[s].is_some(), self.last_used[s]));
                let Some(s) = free else { break };
                let e = misses.pop_front().expect("not empty");
                self.slot_expert[s] = Some(e);
                busy[s] = true;
                uploads.push((e, s));
                in_round.push(e);
            }
            let mut slot_of = vec![NOT_RESIDENT; self.experts];
            for &e in &in_round {
                let s = self.slot_of(e).expect("placed above");
                slot_of[e] = s as u32;
                self.last_used[s] = self.clock;
            }
            rounds.push(Round { uploads, slot_of });
            if misses.is_empty() {
                break;
            }
            // Every slot now holds an expert this run computed: all may be reused.
            busy.iter_mut().for_each(|b| *b = false);
            in_round.clear();
        }
        Ok((rounds, hits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(cache_before: &ExpertCache, counts: &[u32], rounds: &[Round]) {
        let e_n = counts.len();
        // Each routed expert computed exactly once, nothing else computed.
        let mut computed = vec![0; e_n];
        for r in rounds {
            for (e, &s) in r.slot_of.iter().enumerate() {
                if s != NOT_RESIDENT {
                    computed[e] += 1;
                    assert!((s as usize) < cache_before.slots());
                }
            }
            // Two experts never share a slot in one round.
            let mut used: Vec<u32> = r
                .slot_of
                .iter()
                .copied()
                .filter(|&s| s != NOT_RESIDENT)
                .collect();
            used.sort();
            let n = used.len();
            used.dedup();
            assert_eq!(used.len(), n);
            // Uploaded experts are computed in that round from the slot they went to.
            for &(e, s) in &r.uploads {
                assert_eq!(r.slot_of[e], s as u32);
            }
        }
        for e in 0..e_n {
            assert_eq!(computed[e], (counts[e] > 0) as i32, "expert {e}");
        }
        // A cached expert is never uploaded again.
        for r in rounds {
            for &(e, _) in &r.uploads {
                assert!(cache_before.slot_of(e).is_none(), "re-upload of {e}");
            }
        }
    }

    #[test]
    fn hits_need_no_upload_and_lru_evicts_the_oldest() {
        let mut c = ExpertCache::new(8, 3).unwrap();
        let (r, hits) = c.plan(&[1, 0, 2, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((r.len(), hits, r[0].uploads.len()), (1, 0, 2));
        let (r, hits) = c.plan(&[0, 0, 0, 0, 0, 0, 0, 5]).unwrap();
        assert_eq!((r.len(), hits), (1, 0));
        assert_eq!(r[0].uploads, vec![(7, 2)], "the empty slot first");
        // Experts 0 (used at clock 1) and 7 (clock 2) cached; 2 also at clock 1.
        let (r, hits) = c.plan(&[3, 0, 0, 1, 0, 0, 0, 0]).unwrap();
        assert_eq!(hits, 1);
        let (e, s) = r[0].uploads[0];
        assert_eq!(e, 3);
        assert_eq!(c.slot_of(3), Some(s));
        assert_eq!(c.slot_of(7), Some(2), "the most recently used survives");
        assert!(c.slot_of(0).is_some());
    }

    #[test]
    fn more_routed_experts_than_slots_take_rounds() {
        let mut c = ExpertCache::new(32, 4).unwrap();
        let counts = vec![1u32; 32];
        let before = c.clone();
        let (r, hits) = c.plan(&counts).unwrap();
        assert_eq!((r.len(), hits), (8, 0));
        check(&before, &counts, &r);
        let before = c.clone();
        let (r, hits) = c.plan(&counts).unwrap();
        // The last round's 4 experts are cached: computed first, 7 more rounds.
        assert_eq!((hits, r.len()), (4, 8));
        check(&before, &counts, &r);
    }

    #[test]
    fn parallel_staging_copies_land_where_write_buffer_would() {
        let Some(ctx) = crate::runtime::test_util::gpu() else {
            return;
        };
        let g = ctx.gpu().expect("GPU context");
        // Above the 1 MiB threshold (parallel pieces, a ragged last one) and below it.
        for len in [3 * (1 << 20) + 12, 4000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let buf = crate::runtime::launch::storage(g, "upload test", len as u64 + 16).unwrap();
            g.queue.write_buffer(&buf, 0, &vec![0xee; len + 16]);
            write_buffer_parallel(&g.queue, &buf, 8, &data);
            let back = pollster::block_on(crate::runtime::tensor::read_buffer(
                g,
                &buf,
                0,
                len as u64 + 16,
            ))
            .unwrap();
            assert_eq!(&back[..8], &[0xee; 8]);
            assert!(back[8..8 + len] == data[..], "len {len}");
            assert_eq!(&back[8 + len..], &[0xee; 8]);
        }
    }

    #[test]
    fn bad_slot_counts_are_typed_errors() {
        assert!(ExpertCache::new(8, 0).is_err());
        assert!(ExpertCache::new(8, 9).is_err());
        assert!(ExpertCache::new(8, 8).unwrap().plan(&[1; 7]).is_err());
    }

    proptest! {
        #[test]
        fn plans_compute_every_routed_expert_once(
            experts in 1usize..40,
            slots_frac in 0.0f64..1.0,
            runs in proptest::collection::vec(proptest::collection::vec(0u32..3, 40), 1..5),
        ) {
            let slots = 1 + ((experts - 1) as f64 * slots_frac) as usize;
            let mut c = ExpertCache::new(experts, slots).unwrap();
            for run in runs {
                let counts = &run[..experts];
                let before = c.clone();
                let (rounds, hits) = c.plan(counts).unwrap();
                check(&before, counts, &rounds);
                // Every round but the last fills all the slots.
                let routed = counts.iter().filter(|&&n| n > 0).count();
                prop_assert_eq!(rounds.len(), routed.div_ceil(slots).max(1));
                prop_assert!(hits <= routed.min(slots));
            }
        }
    }
}
