// AnchorAttention stripe identification (docs/algorithms.md §2), in three kernels:
//
// anchor_pool    one workgroup per (128-row block, q-head): the block's mean query
//                q̄ [D] and its mean anchor ā (mean over the rows of m, the row max of
//                the anchor pass, natural-log units including the softmax scale).
// anchor_flags   one workgroup per (256-key chunk, 2048-query group, q-head): for each
//                candidate key j of the group, keep[j] = OR over the group's pooled rows
//                s of  q̄_s·k_j·scale + θ >= ā_s. Writes one bit per candidate and the
//                chunk's count of kept keys. With COOP (f16 K) the scores q̄·kᵀ of the
//                chunk are cooperative-matrix products, 128 keys at a time: q̄ split
//                into two f16 halves (high, and the unscaled rest: q̄ is f32), K exact
//                in f16, f32 accumulation; the decisions as above.
// anchor_compact same grid: the kept positions of the chunk, ascending, at the chunk's
//                offset (the counts of the group's earlier chunks) in the group's slice
//                of the stripe list; chunk 0 also writes the group's LUT range.
//
// Candidates of group g are [init_end, g * GROUP): the keys the anchor pass did not
// visit (not the released code's overlapping range, see docs/algorithms.md §2).
// Constants: D (head_dim), POOL (128 rows per pooled block), BLOCKS_PER_GROUP (16).

#include "common/invocation.wgsl"
#include "common/storage.wgsl"
#ifdef COOP
#include "common/coop.wgsl"
#endif

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

const D4: u32 = D / 4u;
const CHUNK: u32 = 256u;
const GROUP_ROWS: u32 = POOL * BLOCKS_PER_GROUP;
const NEG_BIG: f32 = -1.0e30;

// Each stage declares only the bindings it uses (WebGPU allows 8 storage buffers).
@group(0) @binding(0) var<uniform> p: Params;
#ifdef STAGE_POOL
@group(0) @binding(1) var<storage, read> q_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> ml_buf: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> qbar: array<vec4<f32>>;   // [h, n_pool, D4]
@group(0) @binding(4) var<storage, read_write> abar: array<f32>;         // [h, n_pool]
#endif
#ifdef STAGE_FLAGS
@group(0) @binding(1) var<storage, read> k_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> qbar: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> abar: array<f32>;
@group(0) @binding(4) var<storage, read_write> flags: array<u32>;        // [h, g, chunks * 8]
@group(0) @binding(5) var<storage, read_write> counts: array<u32>;       // [h, g, chunks]
#endif
#ifdef STAGE_COMPACT
@group(0) @binding(1) var<storage, read> flags: array<u32>;
@group(0) @binding(2) var<storage, read> counts: array<u32>;
@group(0) @binding(3) var<storage, read> group_base: array<u32>;         // [h, g] slice starts
@group(0) @binding(4) var<storage, read_write> lut_ranges: array<vec2<u32>>; // [h, g]
@group(0) @binding(5) var<storage, read_write> lut_idx: array<u32>;
#endif

#ifdef STAGE_COMPACT
const COMPACT_WG: u32 = 256u;
#include "common/compact.wgsl"
#else
var<workgroup> partial: array<u32, 256>;
#endif

// Candidate range of group g.
fn candidates(g: u32) -> vec2<u32> {
    let end = min(g * GROUP_ROWS, p.seq_len);
    return vec2<u32>(p.init_end, max(p.init_end, end));
}

// The (key chunk, query group, q-head) of a flags or compact workgroup, the group's
// candidate range and its row of the per-group arrays.
struct ChunkAt {
    chunk: u32,
    g: u32,
    h: u32,
    cand: vec2<u32>,
    row: u32,
}

fn chunk_at(id: vec3<u32>) -> ChunkAt {
    return ChunkAt(id.x, id.y, id.z, candidates(id.y), id.z * p.n_groups + id.y);
}

#ifdef STAGE_POOL
@compute @workgroup_size(64)
fn anchor_pool(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let b = wg.id.x;
    // Q may be over one binding: the pool runs once per run of whole heads, Q bound to
    // that part (head head_first at vec4 x_base).
    let h = p.head_first + wg.id.y;
    let r0 = b * POOL;
    let r1 = min(r0 + POOL, p.seq_len);
    let inv = 1.0 / f32(r1 - r0);
    // Thread c4 owns dimensions 4*c4..+4 (D4 <= 64 threads).
    if lid < D4 {
        var sum = vec4<f32>(0.0);
        for (var r = r0; r < r1; r++) {
            sum += decode4(q_buf[p.x_base + (wg.id.y * p.seq_len + r) * D4 + lid]);
        }
        qbar[(h * p.n_pool + b) * D4 + lid] = sum * inv;
    }
    if lid == 0u {
        var m = 0.0;
        for (var r = r0; r < r1; r++) {
            m += ml_buf[h * p.seq_len + r].x;
        }
        abar[h * p.n_pool + b] = m * inv;
    }
}

#endif

#ifdef STAGE_FLAGS
var<workgroup> words: array<atomic<u32>, 8>;

// The chunk's flag words and count of kept keys (after the threads' atomicOr into
// `words`; every thread calls it; `live`: the chunk has candidates).
fn write_chunk(lid: u32, row: u32, chunk: u32, live: bool) {
    workgroupBarrier();
    if live && lid < 8u {
        let w = atomicLoad(&words[lid]);
        flags[(row * p.chunks + chunk) * 8u + lid] = w;
        partial[lid] = countOneBits(w);
    }
    workgroupBarrier();
    if live && lid == 0u {
        var n = 0u;
        for (var w = 0u; w < 8u; w++) {
            n += partial[w];
        }
        counts[row * p.chunks + chunk] = n;
    }
}

#ifndef COOP

@compute @workgroup_size(256)
fn anchor_flags(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let at = chunk_at(wg.id);
    let c0 = at.cand.x + at.chunk * CHUNK;
    if c0 >= at.cand.y {
        return;  // workgroup-uniform: the whole chunk is past this group's candidates
    }
    if lid < 8u {
        atomicStore(&words[lid], 0u);
    }
    workgroupBarrier();
    let j = c0 + lid;
    let s0 = at.g * BLOCKS_PER_GROUP;
    let s1 = min(s0 + BLOCKS_PER_GROUP, p.n_pool);
    var keep = false;
    if j < at.cand.y {
        let kvh = at.h / p.group;
        // Scores of this key against the group's pooled rows, K read once; the
        // unrolled loops keep the dot products in registers. Pooled rows past the
        // sequence (a ragged last group) read row s1 - 1 again, which changes nothing.
        var dots: array<f32, BLOCKS_PER_GROUP>;
        #unroll s BLOCKS_PER_GROUP
        dots[${s}] = 0.0;
        #endunroll
        for (var c = 0u; c < D4; c++) {
            let kv = decode4(k_buf[(kvh * p.seq_len + j) * D4 + c]);
            #unroll s BLOCKS_PER_GROUP
            dots[${s}] += dot(qbar[(at.h * p.n_pool + min(s0 + ${s}u, s1 - 1u)) * D4 + c], kv);
            #endunroll
        }
        #unroll s BLOCKS_PER_GROUP
        keep = keep || dots[${s}] * p.scale + p.theta
            >= abar[at.h * p.n_pool + min(s0 + ${s}u, s1 - 1u)];
        #endunroll
    }
    if keep {
        atomicOr(&words[lid / 32u], 1u << (lid % 32u));
    }
    write_chunk(lid, at.row, at.chunk, true);
}
#else
const KC: u32 = 128u;  // keys per half chunk
const DK: u32 = 16u;   // dimensions per step
// Pooled rows padded to a multiple of 16 (rows past the group repeat its last one).
const SP: u32 = (BLOCKS_PER_GROUP + 15u) / 16u * 16u;
var<workgroup> q_hi: array<f16, SP * DK>;  // [SP][DK] pooled rows, high halves
var<workgroup> q_lo: array<f16, SP * DK>;  //   and the rest
var<workgroup> k_t: array<f16, KC * DK>;   // [KC][DK] keys
var<workgroup> sc: array<f32, SP * KC>;    // [SP][KC] scores q̄·kᵀ

@compute @workgroup_size(256)
fn anchor_flags_coop(me: InvocationSub) {
    let at = chunk_at(me.id);
    let c0 = at.cand.x + at.chunk * CHUNK;
    // No early return (naga takes it as non-uniform flow around the matrix operations):
    // a chunk past the group's candidates runs no step and writes nothing.
    let live = c0 < at.cand.y;
    if me.lid < 8u {
        atomicStore(&words[me.lid], 0u);
    }
    let s0 = at.g * BLOCKS_PER_GROUP;
    let s1 = min(s0 + BLOCKS_PER_GROUP, p.n_pool);
    let kvh = at.h / p.group;
    for (var half = 0u; half < CHUNK / KC; half++) {
        let k0 = c0 + half * KC;
        for (var i = me.lid; i < SP * KC; i += 256u) {
            sc[i] = 0.0;
        }
        for (var d0 = 0u; d0 < select(0u, D, live); d0 += DK) {
            workgroupBarrier();
            for (var i = me.lid; i < SP * DK / 4u; i += 256u) {
                let s = i / (DK / 4u);
                let c = i % (DK / 4u);
                let pooled = min(s0 + s, s1 - 1u);
                let v = qbar[(at.h * p.n_pool + pooled) * D4 + d0 / 4u + c];
                let hi = high_half(v);
                let vh = vec4<f16>(hi);
                let vl = vec4<f16>(v - hi);
                for (var e = 0u; e < 4u; e++) {
                    q_hi[s * DK + c * 4u + e] = vh[e];
                    q_lo[s * DK + c * 4u + e] = vl[e];
                }
            }
            for (var i = me.lid; i < KC * DK / 4u; i += 256u) {
                let kk = i / (DK / 4u);
                let c = i % (DK / 4u);
                var kv = vec4<f32>(0.0);
                if k0 + kk < at.cand.y {
                    kv = decode4(k_buf[(kvh * p.seq_len + k0 + kk) * D4 + d0 / 4u + c]);
                }
                let kh = vec4<f16>(kv);
                for (var e = 0u; e < 4u; e++) {
                    k_t[kk * DK + c * 4u + e] = kh[e];
                }
            }
            workgroupBarrier();
            for (var t = me.sid; t < (SP / T) * (KC / T); t += me.nsg) {
                let ot = tile_at(t, KC / T);
                let co = ot.x * KC + ot.y;
                var acc = coopLoadT<MatC>(&sc[co], KC);
                for (var ks = 0u; ks < DK / T; ks++) {
                    let qa = ot.x * DK + ks * T;
                    // Key rows loaded column-major: the B operand is Kᵀ (d x keys).
                    let b = coopLoad<MatB>(&k_t[ot.y * DK + ks * T], DK);
                    acc = coopMultiplyAdd(coopLoadT<MatA>(&q_hi[qa], DK), b, acc);
                    acc = coopMultiplyAdd(coopLoadT<MatA>(&q_lo[qa], DK), b, acc);
                }
                coopStoreT(acc, &sc[co], KC);
            }
        }
        workgroupBarrier();
        let j = k0 + me.lid;
        if live && me.lid < KC && j < at.cand.y {
            var keep = false;
            for (var s = 0u; s < BLOCKS_PER_GROUP; s++) {
                let a = abar[at.h * p.n_pool + min(s0 + s, s1 - 1u)];
                keep = keep || sc[s * KC + me.lid] * p.scale + p.theta >= a;
            }
            if keep {
                let bit = half * KC + me.lid;
                atomicOr(&words[bit / 32u], 1u << (bit % 32u));
            }
        }
        workgroupBarrier();
    }
    write_chunk(me.lid, at.row, at.chunk, live);
}
#endif
#endif

#ifdef STAGE_COMPACT
@compute @workgroup_size(256)
fn anchor_compact(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let at = chunk_at(wg.id);
    let used = (at.cand.y - at.cand.x + CHUNK - 1u) / CHUNK;  // chunks with candidates
    // Kept keys of this group's earlier chunks (chunk 0: of all its chunks, for the
    // range), summed by the whole workgroup.
    var upto = at.chunk;
    if at.chunk == 0u {
        upto = used;
    }
    var mine = 0u;
    for (var c = lid; c < upto; c += 256u) {
        mine += counts[at.row * p.chunks + c];
    }
    let base = group_base[at.row];
    let offset = compact_offset(lid, mine, at.chunk, at.row, base);
    if at.chunk >= used { return; }
    // This key's rank among the chunk's kept keys: set bits before it.
    let w = lid / 32u;
    let bit = lid % 32u;
    let word = flags[(at.row * p.chunks + at.chunk) * 8u + w];
    if (word & (1u << bit)) != 0u {
        var rank = countOneBits(word & ((1u << bit) - 1u));
        for (var v = 0u; v < w; v++) {
            rank += countOneBits(flags[(at.row * p.chunks + at.chunk) * 8u + v]);
        }
        lut_idx[base + offset + rank] = at.cand.x + at.chunk * CHUNK + lid;
    }
}
#endif
