// Dense flash attention, portable variant (no subgroups, no cooperative matrix).
//
// One workgroup of WG = 2*BQ threads computes BQ query rows (BQ = 32 or 64, a constant
// from the launcher) of one q-head against key tiles of BK = 32 keys. Threads form an
// 8 x (BQ/4) grid: thread (tx, ty) owns the scores of rows ty*4..+4 x keys {tx, tx+8, tx+16, tx+24} (interleaved so that the 8 threads of a
// quarter-warp hit 8 different banks of the padded K tile), and output columns
// c*32 + tx*4..+4 (c < D/32) of the same 4 rows. K/V pass through workgroup memory in
// 32-dimension chunks, and so does Q, chunk by chunk with K (BQ = 32: 13 KiB in all,
// fits WebGPU's 16 KiB default; BQ = 64: 21.5 KiB).
// Scores use exp2 with log2(e) folded into the scale; the exported state is converted
// back to natural-log units so every kernel and the CPU twin share one convention.
//
// Layouts: Q/O/ACC [heads, rows, D], K/V [kv_heads, keys, D], ML [heads, rows] of
// (m, l). A dispatch covers q-heads h0.., rows r0..r1, keys c0..c1; each binding starts
// at (h0, r0) or (kv0, c0), with *_base element offsets for the part of the start that
// the binding offset alignment could not absorb. This is how the host splits prompts
// whose tensors exceed one storage binding: per head group, per row chunk, and per key
// chunk, continuing the online softmax through ML/ACC between key chunks.
//
// Key sources (the sparse executors are this kernel with another key loop):
// - default: the contiguous keys c0..c1 (dense);
// - KEYS_BLOCKS: block-sparse. LUT row (h, row0 / lut_q_block) is a range of LUT_IDX
//   holding ascending key-block indices of lut_key_block keys (a multiple of BK), each
//   visited as lut_key_block / BK contiguous tiles;
// - KEYS_GATHER: stripes. LUT row (h, row0 / lut_q_block) is a range of LUT_IDX holding
//   ascending key positions; each tile gathers BK of those K/V rows.
// LUT_RANGES[h * lut_rows + block] = (first, end) entries of LUT_IDX. Entries past the
// causal horizon are skipped (they are ascending), so a LUT can be causal-agnostic.
// Every mode applies the causal mask per key, and the sliding window when window > 0:
// key j is visible to row r iff j <= r + shift and (j + window > r + shift or j < sinks).
//
// Flags: STORE_F16 (f16 storage), IMPORT_STATE (start from ML/ACC), EXPORT_STATE (write
// ML/ACC), WRITE_OUTPUT (write O = acc / l), KEYS_BLOCKS / KEYS_GATHER (with SPARSE_KEYS). Constants: D (head_dim, a multiple of 16;
// the last 32-dimension chunk of D = 80 or 112 is half empty: zero in, not written out),
// NC = ceil(D / 32), BQ (query rows per workgroup, 32 or 64), KPT = BK * DC4 / WG (K/V vec4s
// each thread moves per chunk). Loops that index the
// per-thread arrays are #unroll'ed so every index is a constant (registers, not local
// memory).

#include "common/invocation.wgsl"
#include "common/storage.wgsl"
#include "common/online_softmax.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

const WG: u32 = 2u * BQ;
const BK: u32 = 32u;
const DC: u32 = 32u;          // head_dim chunk staged in workgroup memory
const DC4: u32 = DC / 4u;     // vec4s per chunk row
const KV_STRIDE: u32 = DC4 + 1u;  // padded row stride of the K/V tile (bank spread)
const D4: u32 = D / 4u;

// Whether column vec4 `col` of a chunk exists: always, unless D is not a multiple of 32
// (PARTIAL_CHUNK: the last chunk is half empty). The guards are left out otherwise: a
// thread-dependent branch around the accumulator array makes some compilers (Chrome's
// SwiftShader) keep it in memory, many times slower.
fn col_exists(col: u32) -> bool {
#ifdef PARTIAL_CHUNK
    return col < D4;
#else
    return true;
#endif
}
#include "attention/flash_common.wgsl"

var<workgroup> q_tile: array<vec4<f32>, BQ * DC4>;       // [BQ rows][DC4]
var<workgroup> kv_tile: array<vec4<f32>, BK * KV_STRIDE>;  // [BK keys][KV_STRIDE]
var<workgroup> p_tile: array<vec4<f32>, BK * BQ / 4u>;     // [BK keys][BQ/4 row quads]

// One vec4 of the Q chunk `chunk` (thread slot t of BQ x DC4), zero past the rows.
fn fetch_q(h: u32, row0: u32, chunk: u32, t: u32) -> vec4<f32> {
    let r = row0 + t / DC4;
    let col = chunk * DC4 + t % DC4;
    if r < p.r1 && col_exists(col) {
        return decode4(q_buf[q_row_vec4(h, r) + col]);
    }
    return vec4<f32>(0.0);
}
// One vec4 of the K (or V) chunk of key `j` (slot t of BK x DC4), zero past the
// visible keys. Each thread looks its slots' keys up once per tile (`fkeys`): a LUT
// read per fetch would put a dependent load in front of every K/V load.
fn fetch_k(kvh: u32, j: u32, key_end: u32, chunk: u32, t: u32) -> vec4<f32> {
    let col = chunk * DC4 + t % DC4;
    if j < key_end && col_exists(col) {
        return decode4(k_buf[kv_row_vec4(p.k_base, kvh, j) + col]);
    }
    return vec4<f32>(0.0);
}
fn fetch_v(kvh: u32, j: u32, key_end: u32, chunk: u32, t: u32) -> vec4<f32> {
    let col = chunk * DC4 + t % DC4;
    if j < key_end && col_exists(col) {
        return decode4(v_buf[kv_row_vec4(p.v_base, kvh, j) + col]);
    }
    return vec4<f32>(0.0);
}

// Writes this thread's fetched K/V vec4s into the padded tile.
fn store_kv_tile(lid: u32, vals: array<vec4<f32>, KPT>) {
    #unroll u KPT
    {
        let t = lid + ${u}u * WG;
        kv_tile[(t / DC4) * KV_STRIDE + t % DC4] = vals[${u}];
    }
    #endunroll
}

@compute @workgroup_size(WG)
fn flash_attention(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 8u;
    let ty = lid / 8u;
    let h = p.h0 + wg.id.y;
    let kvh = h / p.group;
    let row0 = p.r0 + wg.id.x * BQ;
    let row_end = min(row0 + BQ, p.r1);
    // Scores are kept in log2 units: s2 = q.k * scale * log2(e).
    let scale2 = p.scale * LOG2E;

    // Row state: m and l in workgroup memory (thread r < BQ owns row r), acc in registers.
    var acc: array<vec4<f32>, 4u * NC>;
    if lid < BQ {
        init_row_state(h, row0, lid);
    }
#ifdef IMPORT_STATE
    #unroll i 4
    if row0 + ty * 4u + ${i}u < p.r1 {
        let base = acc_row_vec4(h, row0 + ty * 4u + ${i}u) + tx;
        #unroll c NC
#ifdef PARTIAL_CHUNK
        if ${c}u * DC4 + tx < D4 {
            acc[${i}u * NC + ${c}u] = acc_buf[base + ${c}u * DC4];
        }
#else
        acc[${i}u * NC + ${c}u] = acc_buf[base + ${c}u * DC4];
#endif
        #endunroll
    }
    #endunroll
#endif

    // Keys this block can see and the key tiles to visit (workgroup-uniform: the loop
    // below has barriers).
    let plan = key_plan(h, row0, row_end, lid);
    let key_end = plan.x;
    let n_tiles = plan.y;

    // Software pipelining: each stage's Q/K (or V) chunk was fetched into registers
    // while the previous stage computed, so global-memory latency overlaps the math.
    // Per thread: 4 vec4 of Q and KPT = BK * DC4 / WG vec4 of K or V per chunk.
    var q_next: array<vec4<f32>, 4>;
    var kv_next: array<vec4<f32>, KPT>;
    var fkeys: array<u32, KPT>;  // keys of this thread's fetch slots, tile being fetched
    if n_tiles > 0u {
        #unroll u 4
        q_next[${u}] = fetch_q(h, row0, 0u, lid + ${u}u * WG);
        #endunroll
        #unroll u KPT
        fkeys[${u}] = tile_key(0u, (lid + ${u}u * WG) / DC4);
        kv_next[${u}] = fetch_k(kvh, fkeys[${u}], key_end, 0u, lid + ${u}u * WG);
        #endunroll
    }
    for (var it = 0u; it < n_tiles; it++) {
        // S = Q K^T for the tile, accumulated over head_dim chunks.
        // s[i][j]: row ty*4+i, key tx+8j. Explicitly zeroed: Tint (Chrome) does not
        // re-zero an uninitialized `var` declared inside a loop on every iteration.
        var s = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
        #unroll c NC
        workgroupBarrier();
        #unroll u 4
        q_tile[lid + ${u}u * WG] = q_next[${u}];
        #endunroll
        store_kv_tile(lid, kv_next);
        workgroupBarrier();
        if ${c}u + 1u < NC {
            #unroll u 4
            q_next[${u}] = fetch_q(h, row0, ${c}u + 1u, lid + ${u}u * WG);
            #endunroll
            #unroll u KPT
            kv_next[${u}] = fetch_k(kvh, fkeys[${u}], key_end, ${c}u + 1u, lid + ${u}u * WG);
            #endunroll
        } else {
            #unroll u KPT
            kv_next[${u}] = fetch_v(kvh, fkeys[${u}], key_end, 0u, lid + ${u}u * WG);
            #endunroll
        }
        for (var d4 = 0u; d4 < DC4; d4++) {
            let b0 = kv_tile[(tx + 0u) * KV_STRIDE + d4];
            let b1 = kv_tile[(tx + 8u) * KV_STRIDE + d4];
            let b2 = kv_tile[(tx + 16u) * KV_STRIDE + d4];
            let b3 = kv_tile[(tx + 24u) * KV_STRIDE + d4];
            #unroll i 4
            {
                let a = q_tile[(ty * 4u + ${i}u) * DC4 + d4];
                s[${i}] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
            }
            #endunroll
        }
        #endunroll
        // Scale, mask, publish the scores (transposed: one vec4 = 4 rows of one key).
        #unroll j 4
        {
            let key = tile_key(it, tx + 8u * ${j}u);
            var quad: vec4<f32>;
            #unroll i 4
            {
                let r = row0 + ty * 4u + ${i}u;
                let live = key_visible(r, key, key_end);
                quad[${i}] = select(NEG_BIG, s[${i}][${j}] * scale2, live);
            }
            #endunroll
            p_tile[(tx + 8u * ${j}u) * (BQ / 4u) + ty] = quad;
        }
        #endunroll
        workgroupBarrier();
        // Online softmax per row: new max, weights, rescale factor.
        if lid < BQ {
            let quad_index = lid / 4u;
            let lane = lid % 4u;
            let m_old = row_m[lid];
            var m_new = m_old;
            for (var j = 0u; j < BK; j++) {
                m_new = max(m_new, p_tile[j * (BQ / 4u) + quad_index][lane]);
            }
            var sum = 0.0;
            for (var j = 0u; j < BK; j++) {
                let sj = p_tile[j * (BQ / 4u) + quad_index][lane];
                let w = softmax_weight(sj, m_new);
                p_tile[j * (BQ / 4u) + quad_index][lane] = w;
                sum += w;
            }
            let alpha = rescale_factor(m_old, m_new);
            row_alpha[lid] = alpha;
            row_l[lid] = row_l[lid] * alpha + sum;
            row_m[lid] = m_new;
        }
        workgroupBarrier();
        #unroll i 4
        {
            let alpha = row_alpha[ty * 4u + ${i}u];
            #unroll c NC
            acc[${i}u * NC + ${c}u] *= alpha;
            #endunroll
        }
        #endunroll
        // acc += P V, V staged in head_dim chunks.
        #unroll c NC
        workgroupBarrier();
        store_kv_tile(lid, kv_next);
        workgroupBarrier();
        if ${c}u + 1u < NC {
            #unroll u KPT
            kv_next[${u}] = fetch_v(kvh, fkeys[${u}], key_end, ${c}u + 1u, lid + ${u}u * WG);
            #endunroll
        } else if it + 1u < n_tiles {
            #unroll u 4
            q_next[${u}] = fetch_q(h, row0, 0u, lid + ${u}u * WG);
            #endunroll
            #unroll u KPT
            fkeys[${u}] = tile_key(it + 1u, (lid + ${u}u * WG) / DC4);
            kv_next[${u}] = fetch_k(kvh, fkeys[${u}], key_end, 0u, lid + ${u}u * WG);
            #endunroll
        }
        for (var k = 0u; k < BK; k++) {
            let v = kv_tile[k * KV_STRIDE + tx];
            let w = p_tile[k * (BQ / 4u) + ty];
            acc[0u * NC + ${c}u] += w.x * v;
            acc[1u * NC + ${c}u] += w.y * v;
            acc[2u * NC + ${c}u] += w.z * v;
            acc[3u * NC + ${c}u] += w.w * v;
        }
        #endunroll
    }

    workgroupBarrier();
#ifdef EXPORT_STATE
    if lid < BQ && row0 + lid < p.r1 {
        let m = row_m[lid];
        ml_buf[ml_index(h, row0 + lid)] = vec2<f32>(m_to_natural(m), row_l[lid]);
    }
#endif
    #unroll i 4
    if row0 + ty * 4u + ${i}u < p.r1 {
        let r = row0 + ty * 4u + ${i}u;
#ifdef EXPORT_STATE
        let abase = acc_row_vec4(h, r) + tx;
        #unroll c NC
#ifdef PARTIAL_CHUNK
        if ${c}u * DC4 + tx < D4 {
            acc_buf[abase + ${c}u * DC4] = acc[${i}u * NC + ${c}u];
        }
#else
        acc_buf[abase + ${c}u * DC4] = acc[${i}u * NC + ${c}u];
#endif
        #endunroll
#endif
#ifdef WRITE_OUTPUT
        let l = row_l[ty * 4u + ${i}u];
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let obase = o_row_vec4(h, r) + tx;
        #unroll c NC
#ifdef PARTIAL_CHUNK
        if ${c}u * DC4 + tx < D4 {
            o_buf[obase + ${c}u * DC4] = encode4(acc[${i}u * NC + ${c}u] * inv);
        }
#else
        o_buf[obase + ${c}u * DC4] = encode4(acc[${i}u * NC + ${c}u] * inv);
#endif
        #endunroll
#endif
    }
    #endunroll
}
