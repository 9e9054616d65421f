// MoE dispatch: sorts the tokens' (token, slot) assignments into expert-contiguous
// order on the GPU, deterministically, and builds the inverse map for the combine.
//
// An assignment is a = token * top_k + slot; its expert is ids[a]. Three entry points,
// dispatched in this order with the same bindings:
//   moe_histogram: one workgroup per block of 256 assignments counts each expert's
//                  assignments of the block (block_counts[block * E + e]);
//   moe_scan:      one workgroup; per expert an exclusive scan over the blocks (turning
//                  block_counts into each block's first position), the expert totals,
//                  their exclusive prefix (offsets) and the prefix of their tile counts
//                  (ceil(count / TILE_M) tiles of the grouped GEMM);
//   moe_scatter:   one workgroup per block; each assignment's rank among the block's
//                  earlier assignments of the same expert gives its position, so inside
//                  an expert the order is the token order (stable).
// seg layout: [0, E) counts, [E, 2E+1) offsets, [2E+1, 3E+2) tile starts.
// sorted[pos] = a and inv[a] = pos. E <= 256.

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> block_counts: array<u32>;
@group(0) @binding(3) var<storage, read_write> seg: array<u32>;
@group(0) @binding(4) var<storage, read_write> sorted: array<u32>;
@group(0) @binding(5) var<storage, read_write> inv: array<u32>;

#ifdef HISTOGRAM
var<workgroup> cnt: array<atomic<u32>, WG>;

@compute @workgroup_size(256)
fn moe_histogram(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let b = flat_id(wg);
    if (b >= p.blocks) { return; }
    atomicStore(&cnt[lid], 0u);
    workgroupBarrier();
    let a = b * WG + lid;
    if (a < p.assignments) {
        let e = ids[a];
        if (e < p.experts) {
            atomicAdd(&cnt[e], 1u);
        }
    }
    workgroupBarrier();
    if (lid < p.experts) {
        block_counts[b * p.experts + lid] = atomicLoad(&cnt[lid]);
    }
}
#endif

#ifdef SCAN
var<workgroup> tot: array<u32, WG>;

@compute @workgroup_size(256)
fn moe_scan(@builtin(local_invocation_index) lid: u32) {
    let ne = p.experts;
    var total = 0u;
    if (lid < ne) {
        for (var b = 0u; b < p.blocks; b++) {
            let c = block_counts[b * ne + lid];
            block_counts[b * ne + lid] = total;
            total += c;
        }
        seg[lid] = total;
    }
    tot[lid] = total;
    workgroupBarrier();
    if (lid == 0u) {
        var off = 0u;
        var tiles = 0u;
        for (var e = 0u; e < ne; e++) {
            let c = tot[e];
            seg[ne + e] = off;
            seg[2u * ne + 1u + e] = tiles;
            tot[e] = off;
            off += c;
            tiles += (c + p.tile_m - 1u) / p.tile_m;
        }
        seg[2u * ne] = off;
        seg[3u * ne + 1u] = tiles;
    }
    workgroupBarrier();
    if (lid < ne) {
        let base = tot[lid];
        for (var b = 0u; b < p.blocks; b++) {
            block_counts[b * ne + lid] += base;
        }
    }
}
#endif

#ifdef SCATTER
var<workgroup> blk: array<u32, WG>;

@compute @workgroup_size(256)
fn moe_scatter(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let b = flat_id(wg);
    if (b >= p.blocks) { return; }
    let a = b * WG + lid;
    var e = 0xffffffffu;
    if (a < p.assignments) {
        e = ids[a];
    }
    blk[lid] = e;
    workgroupBarrier();
    if (a < p.assignments && e < p.experts) {
        var rank = 0u;
        for (var j = 0u; j < lid; j++) {
            rank += select(0u, 1u, blk[j] == e);
        }
        let pos = block_counts[b * p.experts + e] + rank;
        sorted[pos] = a;
        inv[a] = pos;
    }
}
#endif
