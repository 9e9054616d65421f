// What the expert-FFN kernels (expert_ffn.wgsl: portable; expert_ffn_coop.wgsl: matrix
// units) share: bindings, the expert lookup of a tile or a position, and the neuron
// counters of the tiled up kernels. Include after quant/weights.wgsl.
//
// Counters: the portable kernels add to stats[0..4) atomically. The matrix-unit kernels
// (COOP) write one pair of words per workgroup from stats[p.part_base + 2 (x · grid_y +
// y)] on instead (the host adds them up): a device-scope atomic in a module with
// cooperative matrices needs a SPIR-V capability naga does not declare.
//
// seg (from the dispatch): [0, E) counts, [E, 2E+1) offsets, [2E+1, 3E+2) tile starts.

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#ifdef COOP
alias COUNTER = u32;
#else
alias COUNTER = atomic<u32>;
#endif

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> seg: array<u32>;

#ifdef UP
@group(0) @binding(2) var<storage, read> z: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> sorted: array<u32>;
@group(0) @binding(4) var<storage, read> gate: array<u32>;
@group(0) @binding(5) var<storage, read> up: array<u32>;
@group(0) @binding(6) var<storage, read_write> act: array<f32>;
@group(0) @binding(7) var<storage, read_write> stats: array<COUNTER>;
@group(0) @binding(8) var<storage, read> slot_of: array<u32>;
#endif

#ifdef DOWN
@group(0) @binding(2) var<storage, read> act4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> down: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> slot_of: array<u32>;
@group(0) @binding(6) var<storage, read_write> stats: array<COUNTER>;
#endif

const NOT_RESIDENT: u32 = 0xffffffffu;

// Largest expert e < E whose entry seg[base + e] is <= x (empty experts, whose entry
// equals the next one's, are passed over).
fn find_expert(base: u32, x: u32) -> u32 {
    var lo = 0u;
    var hi = p.experts - 1u;
    while (lo < hi) {
        let mid = (lo + hi + 1u) / 2u;
        if (seg[base + mid] <= x) {
            lo = mid;
        } else {
            hi = mid - 1u;
        }
    }
    return lo;
}

// The weight slot of the expert owning assignment position `pos` (GEMV kernels), or
// NOT_RESIDENT: that expert is not computed by this dispatch, or `pos` is past the
// last assignment.
fn position_slot(pos: u32) -> u32 {
    if (pos >= p.assignments) { return NOT_RESIDENT; }
    return slot_of[find_expert(p.experts, pos)];
}

#ifdef TILED
// TN (neurons or hidden columns per tile) comes from the launcher.
const TM: u32 = 16u * MI;
const TK: u32 = 16u;

// Grouped-GEMM tile `x` (over all experts): positions [row0, row_end) of one expert's
// segment, at most TM of them, and its weight slot.
struct ExpertTile {
    // false: past the last tile, or the expert is not computed by this dispatch (then
    // row0 = row_end = 0: no rows).
    valid: bool,
    slot: u32,
    row0: u32,
    row_end: u32,
}

fn expert_tile(x: u32) -> ExpertTile {
    let ne = p.experts;
    var t = ExpertTile(false, 0u, 0u, 0u);
    if (x >= seg[3u * ne + 1u]) {
        return t;
    }
    let e = find_expert(2u * ne + 1u, x);
    t.slot = slot_of[e];
    t.valid = t.slot != NOT_RESIDENT;
    if (t.valid) {
        t.row0 = seg[ne + e] + (x - seg[2u * ne + 1u + e]) * TM;
        t.row_end = min(seg[ne + e + 1u], t.row0 + TM);
    }
    return t;
}

#ifdef UP
var<workgroup> skipped_wg: atomic<u32>;

// Adds a tile's counters to stats: the (position, neuron) pairs whose gate was <= 0
// (each thread's `skipped`) and all pairs of the tile. Every thread calls it; `part` is
// the workgroup's pair of words (COOP).
fn count_up_tile(lid: u32, t: ExpertTile, n0: u32, skipped: u32, part: u32) {
    if (skipped > 0u) {
        atomicAdd(&skipped_wg, skipped);
    }
    workgroupBarrier();
    if (lid == 0u) {
        let total = (t.row_end - t.row0) * (min(p.ffn, n0 + TN) - min(p.ffn, n0));
#ifdef COOP
        if (t.valid) {
            stats[part] = atomicLoad(&skipped_wg);
            stats[part + 1u] = total;
        }
#else
        atomicAdd(&stats[0], atomicLoad(&skipped_wg));
        atomicAdd(&stats[1], total);
#endif
    }
}
#endif
#endif

#ifdef DOWN
#ifdef SKIP_CHUNKS
// Down-kernel chunk skipping: whether any thread staged a non-zero activation of the
// current 16-neuron chunk. Two flags by chunk parity: one is reset while the other is
// read. Every thread reads the same answer after the barrier; it may guard loads and
// arithmetic, never a barrier or a matrix operation.
var<workgroup> live_wg: array<atomic<u32>, 2>;

// A down kernel's skipping state: the current chunk's parity and (thread 0's count)
// the chunks found inactive.
struct ChunkSkip {
    par: u32,
    skipped: u32,
}

fn chunk_skip_start(lid: u32) -> ChunkSkip {
    if (lid == 0u) {
        atomicStore(&live_wg[0], 0u);
        atomicStore(&live_wg[1], 0u);
    }
    return ChunkSkip(0u, 0u);
}

// Every thread calls it once per chunk; contains a barrier.
fn chunk_live(lid: u32, nonzero: bool, s: ptr<function, ChunkSkip>) -> bool {
    let par = (*s).par;
    if (nonzero) {
        atomicOr(&live_wg[par], 1u);
    }
    workgroupBarrier();
    let live = atomicLoad(&live_wg[par]) != 0u;
    if (lid == 0u) {
        atomicStore(&live_wg[1u - par], 0u);
        if (!live) {
            (*s).skipped += 1u;
        }
    }
    (*s).par = 1u - par;
    return live;
}
#endif
#endif
