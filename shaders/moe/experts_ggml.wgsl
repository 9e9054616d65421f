// Routed ReGLU experts with GGUF weights (SmallThinker on the GPU decoder): each
// expert's gate, up and down matrices are read in place from the file's 3-D expert
// tensors. ggml stores such a tensor as dims [cols, rows, experts], expert after expert,
// so expert e's matrix is rows e·R .. e·R + R of one [E·R, C] matrix in the file's
// blocks (quant/ggml.wgsl decodes them).
//
// One token: three entry points (a prompt: the grouped passes, GROUPED below),
// dispatched in this order for a layer; assignment a = i·K + j is
// token i's j-th routed expert e(a) = ids[a] (K = p.top_k):
//   experts_gate (GATE): y[a, n] = W_gate[e(a)][n] · x[i]                (y = g [A, R])
//   experts_up   (UP):   y[a, n] = max(y[a, n], 0) · (W_up[e(a)][n] · x[i]), in place
//                        on the gate: the up row is not read at all where the gate is
//                        ≤ 0 (neuron skipping: ReLU makes its product 0);
//   experts_down (DOWN): y[i, n] = base[i, n] + Σ_j route_w[a] · (W_down[e(a)][n] · x[a])
//                        with x = h [A, F]; a lane's four neurons are not read where
//                        their h are all 0. base = res (the stream) for the first part,
//                        y itself (ACCUM) for the others.
// One workgroup of 256 threads per (8 output rows, assignment) — per (8 rows, token)
// for DOWN — folded over a 2-D grid; the 32 lanes of a row stride over its columns
// four values at a time and reduce in workgroup memory (as ops/gemv.wgsl).
// A tensor too large for one binding is split into parts of whole experts
// [p.e0, p.e0 + p.experts): one dispatch per part, assignments of other experts left to
// the other dispatches.

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"

const ROWS: u32 = 8u;
const LANES: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
#ifdef GROUPED
@group(0) @binding(3) var<storage, read> sorted: array<u32>;
@group(0) @binding(4) var<storage, read> seg: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
#else
@group(0) @binding(3) var<storage, read> ids: array<u32>;
#ifdef DOWN
@group(0) @binding(4) var<storage, read> route_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
#ifndef ACCUM
@group(0) @binding(6) var<storage, read> res: array<f32>;
#endif
#else
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#endif
#endif

#include "quant/ggml.wgsl"
#include "common/row_sum.wgsl"

#ifdef GROUPED
// Prompts: the grouped passes. moe/dispatch.wgsl has sorted the assignments into
// expert-contiguous order (sorted[pos] = a; seg = counts [E], offsets [E + 1], tile
// starts [E + 1] for tiles of TILE assignments). One workgroup per (tile, 8 output rows):
// each lane decodes a weight row's four values once and multiplies them with the tile's
// TILE activation rows, so a prompt reads an expert's weights once per tile instead of
// once per assignment. GATE: y[a, n] = W_gate[e][n] · x[i(a)]; UP: y[a, n] =
// max(y[a, n], 0) · (W_up[e][n] · x[i(a)]) in place, the up row not read where the tile's
// gates are all ≤ 0; DOWN: y[pos, n] = W_down[e][n] · h[a] in sorted order (moe/combine.wgsl
// adds them, weighted, to the residual), four neurons skipped where every h is 0.

const TILE: u32 = 8u;

// The tile's TILE row sums at once (one set of barriers, not TILE): after the call,
// lane 0 of each row finds the row's sum for assignment m in tile_part[m * 256 + lid].
// Call from uniform control flow.
var<workgroup> tile_part: array<f32, 2048>;

fn tile_row_sums(acc: array<f32, TILE>, lid: u32) {
    let lane = lid % LANES;
    for (var m = 0u; m < TILE; m++) {
        tile_part[m * 256u + lid] = acc[m];
    }
    workgroupBarrier();
#unroll s 5
    if (lane < (16u >> ${s}u)) {
        for (var m = 0u; m < TILE; m++) {
            tile_part[m * 256u + lid] += tile_part[m * 256u + lid + (16u >> ${s}u)];
        }
    }
    workgroupBarrier();
#endunroll
}

struct Tile {
    e: u32,
    pos0: u32,
    count: u32,
}

// Tile `t` of the expert-contiguous order: its expert, first position and assignment
// count; expert 0xffffffff past the last tile.
fn find_tile(t: u32) -> Tile {
    let ne = p.layer_experts;
    let starts = 2u * ne + 1u;
    if (t >= seg[starts + ne]) {
        return Tile(0xffffffffu, 0u, 0u);
    }
    // The last expert whose first tile is at or before t (experts without tiles share
    // the next one's start and come before it).
    var lo = 0u;
    var hi = ne;
    while (lo + 1u < hi) {
        let mid = (lo + hi) / 2u;
        if (seg[starts + mid] <= t) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let first = (t - seg[starts + lo]) * TILE;
    return Tile(lo, seg[ne + lo] + first, min(TILE, seg[lo] - first));
}

@compute @workgroup_size(256)
fn experts_grouped(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let g = flat_id(wg);
    let tile = find_tile(g / p.row_blocks);
    let n = (g % p.row_blocks) * ROWS + lid / LANES;
    // Tiles of this part's experts only.
    let mine = tile.e != 0xffffffffu && tile.e >= p.e0 && tile.e < p.e0 + p.experts && n < p.n;
    let row = (tile.e - p.e0) * p.n + n;
    var a: array<u32, TILE>;
    var acc: array<f32, TILE>;
#ifdef UP
    var gate: array<f32, TILE>;
#endif
    var live = false;
    for (var m = 0u; m < TILE; m++) {
        if (mine && m < tile.count) {
            a[m] = sorted[tile.pos0 + m];
#ifdef UP
            gate[m] = max(y[a[m] * p.n + n], 0.0);
            live = live || gate[m] > 0.0;
#else
            live = true;
#endif
        }
    }
    if (live) {
        for (var c = lane * 4u; c < p.k; c += LANES * 4u) {
#ifdef DOWN
            var hv: array<vec4<f32>, TILE>;
            var nonzero = false;
            for (var m = 0u; m < TILE; m++) {
                if (m < tile.count) {
                    hv[m] = x[(a[m] * p.k + c) / 4u];
                    nonzero = nonzero || any(hv[m] != vec4<f32>(0.0));
                }
            }
            if (nonzero) {
                let wv = ggml_load4(row, c, p.k);
                for (var m = 0u; m < TILE; m++) {
                    acc[m] += dot(wv, hv[m]);
                }
            }
#else
            let wv = ggml_load4(row, c, p.k);
            for (var m = 0u; m < TILE; m++) {
                if (m < tile.count) {
                    acc[m] += dot(wv, x[((a[m] / p.top_k) * p.k + c) / 4u]);
                }
            }
#endif
        }
    }
    tile_row_sums(acc, lid);
    for (var m = 0u; m < TILE; m++) {
        let total = tile_part[m * 256u + lid];
        if (lane == 0u && mine && m < tile.count) {
#ifdef DOWN
            y[(tile.pos0 + m) * p.n + n] = total;
#else
#ifdef UP
            y[a[m] * p.n + n] = gate[m] * total;
#else
            y[a[m] * p.n + n] = total;
#endif
#endif
        }
    }
}
#else


// This lane's share of row `row` (of this part) times the activation row starting at
// vec4 index `x0`.
fn lane_dot(row: u32, x0: u32, lane: u32) -> f32 {
    var acc = 0.0;
    for (var c = lane * 4u; c < p.k; c += LANES * 4u) {
        let xv = x[x0 + c / 4u];
#ifdef DOWN
        if (any(xv != vec4<f32>(0.0))) {
            acc += dot(ggml_load4(row, c, p.k), xv);
        }
#else
        acc += dot(ggml_load4(row, c, p.k), xv);
#endif
    }
    return acc;
}

// The expert of assignment `a` as a row offset into this part, or -1 (as u32 max)
// where it lies in another part.
fn part_expert(a: u32) -> u32 {
    let e = ids[a];
    if (e >= p.e0 && e < p.e0 + p.experts) {
        return e - p.e0;
    }
    return 0xffffffffu;
}

#ifdef DOWN
@compute @workgroup_size(256)
fn experts_down(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let g = flat_id(wg);
    let i = g / p.row_blocks;
    let n = (g % p.row_blocks) * ROWS + lid / LANES;
    let valid = i < p.tokens && n < p.n;
    var acc = 0.0;
    if (valid) {
        for (var j = 0u; j < p.top_k; j++) {
            let a = i * p.top_k + j;
            let e = part_expert(a);
            if (e != 0xffffffffu) {
                acc += route_w[a] * lane_dot(e * p.n + n, a * p.k / 4u, lane);
            }
        }
    }
    let total = row_sum(acc, lid);
    if (lane == 0u && valid) {
#ifdef ACCUM
        y[i * p.n + n] += total;
#else
        y[i * p.n + n] = res[i * p.n + n] + total;
#endif
    }
}
#else
@compute @workgroup_size(256)
fn experts_gate_up(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let g = flat_id(wg);
    let a = g / p.row_blocks;
    let n = (g % p.row_blocks) * ROWS + lid / LANES;
    var e = 0xffffffffu;
    if (a < p.tokens * p.top_k && n < p.n) {
        e = part_expert(a);
    }
    let mine = e != 0xffffffffu;
    var acc = 0.0;
#ifdef UP
    var gate = 0.0;
    if (mine) {
        gate = max(y[a * p.n + n], 0.0);
    }
    if (gate > 0.0) {
        acc = lane_dot(e * p.n + n, (a / p.top_k) * p.k / 4u, lane);
    }
#else
    if (mine) {
        acc = lane_dot(e * p.n + n, (a / p.top_k) * p.k / 4u, lane);
    }
#endif
    let total = row_sum(acc, lid);
    if (lane == 0u && mine) {
#ifdef UP
        y[a * p.n + n] = gate * total;
#else
        y[a * p.n + n] = total;
#endif
    }
}
#endif
#endif
