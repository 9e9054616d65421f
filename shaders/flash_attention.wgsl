// Dense flash attention, portable variant (no subgroups, no cooperative matrix).
//
// One workgroup of 64 threads computes BQ = 32 query rows of one q-head against key
// tiles of BK = 32 keys. Threads form an 8x8 grid: thread (tx, ty) owns score entries
// rows ty*4..+4 x keys tx*4..+4, and output columns c*32 + tx*4..+4 (c < D/32) of the
// same 4 rows. Q and K/V pass through workgroup memory in 32-dimension chunks, so the
// workgroup memory is 12.5 KiB for every head_dim (fits WebGPU's 16 KiB default).
//
// Layouts: Q/O/ACC [heads, rows, D], K/V [kv_heads, keys, D], ML [heads, rows] of
// (m, l). A dispatch covers q-heads h0.., rows r0..r1, keys c0..c1; each binding starts
// at (h0, r0) or (kv0, c0), with *_base element offsets for the part of the start that
// the binding offset alignment could not absorb. This is how the host splits prompts
// whose tensors exceed one storage binding: per head group, per row chunk, and per key
// chunk, continuing the online softmax through ML/ACC between key chunks.
//
// Flags: STORE_F16 (f16 storage), IMPORT_STATE (start from ML/ACC), EXPORT_STATE (write
// ML/ACC), WRITE_OUTPUT (write O = acc / l). Constant D: head_dim, a multiple of 32.

#include "common/storage.wgsl"
#include "common/online_softmax.wgsl"

struct Params {
    q_base: u32,
    k_base: u32,
    v_base: u32,
    o_base: u32,
    ml_base: u32,
    acc_base: u32,
    q_head_stride: u32,
    kv_head_stride: u32,
    ml_head_stride: u32,
    h0: u32,
    kv0: u32,
    group: u32,
    r0: u32,
    r1: u32,
    c0: u32,
    c1: u32,
    causal: u32,
    causal_shift: u32,
    scale: f32,
    _pad: u32,
}

const BQ: u32 = 32u;
const BK: u32 = 32u;
const DC: u32 = 32u;         // head_dim chunk staged in workgroup memory
const DC4: u32 = DC / 4u;    // vec4s per chunk row
const NC: u32 = D / DC;      // chunks per row
const D4: u32 = D / 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> k_buf: array<Store4>;
@group(0) @binding(3) var<storage, read> v_buf: array<Store4>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<Store4>;
@group(0) @binding(5) var<storage, read_write> ml_buf: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> acc_buf: array<vec4<f32>>;

var<workgroup> q_tile: array<vec4<f32>, 256>;   // [BQ rows][DC4]
var<workgroup> kv_tile: array<vec4<f32>, 256>;  // [BK keys][DC4]
var<workgroup> p_tile: array<f32, 1024>;        // [BQ rows][BK keys]
var<workgroup> row_m: array<f32, 32>;
var<workgroup> row_l: array<f32, 32>;
var<workgroup> row_alpha: array<f32, 32>;

fn q_row_vec4(h: u32, r: u32) -> u32 {
    return (p.q_base + (h - p.h0) * p.q_head_stride + (r - p.r0) * D) / 4u;
}
fn kv_row_vec4(base: u32, kvh: u32, j: u32) -> u32 {
    return (base + (kvh - p.kv0) * p.kv_head_stride + (j - p.c0) * D) / 4u;
}
fn acc_row_vec4(h: u32, r: u32) -> u32 {
    return (p.acc_base + (h - p.h0) * p.q_head_stride + (r - p.r0) * D) / 4u;
}
fn o_row_vec4(h: u32, r: u32) -> u32 {
    return (p.o_base + (h - p.h0) * p.q_head_stride + (r - p.r0) * D) / 4u;
}
fn ml_index(h: u32, r: u32) -> u32 {
    return p.ml_base + (h - p.h0) * p.ml_head_stride + (r - p.r0);
}

@compute @workgroup_size(64)
fn flash_attention(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tx = lid % 8u;
    let ty = lid / 8u;
    let h = p.h0 + wg.y;
    let kvh = h / p.group;
    let row0 = p.r0 + wg.x * BQ;
    let row_end = min(row0 + BQ, p.r1);

    // Row state: m and l in workgroup memory (thread r < BQ owns row r), acc in registers.
    var acc: array<vec4<f32>, 4u * NC>;
    if lid < BQ {
        var m = NEG_BIG;
        var l = 0.0;
#ifdef IMPORT_STATE
        if row0 + lid < p.r1 {
            let s = ml_buf[ml_index(h, row0 + lid)];
            m = s.x;
            l = s.y;
        }
#endif
        row_m[lid] = m;
        row_l[lid] = l;
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + ty * 4u + i;
        for (var c = 0u; c < NC; c++) {
            var a = vec4<f32>(0.0);
#ifdef IMPORT_STATE
            if r < p.r1 {
                a = acc_buf[acc_row_vec4(h, r) + c * DC4 + tx];
            }
#endif
            acc[i * NC + c] = a;
        }
    }

    // Keys this block can see.
    var key_end = p.c1;
    if p.causal != 0u {
        key_end = min(key_end, row_end + p.causal_shift);
    }

    for (var kt = p.c0; kt < key_end; kt += BK) {
        // S = Q K^T for the tile, accumulated over head_dim chunks.
        var s: array<vec4<f32>, 4>;
        for (var c = 0u; c < NC; c++) {
            workgroupBarrier();
            for (var t = lid; t < BQ * DC4; t += 64u) {
                let rr = t / DC4;
                let cc = t % DC4;
                var qv = vec4<f32>(0.0);
                if row0 + rr < p.r1 {
                    qv = decode4(q_buf[q_row_vec4(h, row0 + rr) + c * DC4 + cc]);
                }
                q_tile[t] = qv;
                var kv = vec4<f32>(0.0);
                if kt + rr < key_end {
                    kv = decode4(k_buf[kv_row_vec4(p.k_base, kvh, kt + rr) + c * DC4 + cc]);
                }
                kv_tile[t] = kv;
            }
            workgroupBarrier();
            for (var d4 = 0u; d4 < DC4; d4++) {
                let b0 = kv_tile[(tx * 4u + 0u) * DC4 + d4];
                let b1 = kv_tile[(tx * 4u + 1u) * DC4 + d4];
                let b2 = kv_tile[(tx * 4u + 2u) * DC4 + d4];
                let b3 = kv_tile[(tx * 4u + 3u) * DC4 + d4];
                for (var i = 0u; i < 4u; i++) {
                    let a = q_tile[(ty * 4u + i) * DC4 + d4];
                    s[i] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
                }
            }
        }
        // Scale, mask, publish the scores.
        for (var i = 0u; i < 4u; i++) {
            let r = row0 + ty * 4u + i;
            for (var j = 0u; j < 4u; j++) {
                let key = kt + tx * 4u + j;
                var live = r < p.r1 && key < key_end;
                if p.causal != 0u {
                    live = live && key <= r + p.causal_shift;
                }
                p_tile[(ty * 4u + i) * BK + tx * 4u + j] = select(NEG_BIG, s[i][j] * p.scale, live);
            }
        }
        workgroupBarrier();
        // Online softmax per row: new max, weights, rescale factor.
        if lid < BQ {
            let m_old = row_m[lid];
            var m_new = m_old;
            for (var j = 0u; j < BK; j++) {
                m_new = max(m_new, p_tile[lid * BK + j]);
            }
            var sum = 0.0;
            for (var j = 0u; j < BK; j++) {
                let w = softmax_weight(p_tile[lid * BK + j], m_new);
                p_tile[lid * BK + j] = w;
                sum += w;
            }
            let alpha = rescale_factor(m_old, m_new);
            row_alpha[lid] = alpha;
            row_l[lid] = row_l[lid] * alpha + sum;
            row_m[lid] = m_new;
        }
        workgroupBarrier();
        for (var i = 0u; i < 4u; i++) {
            let alpha = row_alpha[ty * 4u + i];
            for (var c = 0u; c < NC; c++) {
                acc[i * NC + c] *= alpha;
            }
        }
        // acc += P V, V staged in head_dim chunks.
        for (var c = 0u; c < NC; c++) {
            workgroupBarrier();
            for (var t = lid; t < BK * DC4; t += 64u) {
                let kk = t / DC4;
                let cc = t % DC4;
                var vv = vec4<f32>(0.0);
                if kt + kk < key_end {
                    vv = decode4(v_buf[kv_row_vec4(p.v_base, kvh, kt + kk) + c * DC4 + cc]);
                }
                kv_tile[t] = vv;
            }
            workgroupBarrier();
            for (var k = 0u; k < BK; k++) {
                let v = kv_tile[k * DC4 + tx];
                for (var i = 0u; i < 4u; i++) {
                    acc[i * NC + c] += p_tile[(ty * 4u + i) * BK + k] * v;
                }
            }
        }
        workgroupBarrier();
    }

    workgroupBarrier();
#ifdef EXPORT_STATE
    if lid < BQ && row0 + lid < p.r1 {
        ml_buf[ml_index(h, row0 + lid)] = vec2<f32>(row_m[lid], row_l[lid]);
    }
#endif
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + ty * 4u + i;
        if r < p.r1 {
#ifdef EXPORT_STATE
            for (var c = 0u; c < NC; c++) {
                acc_buf[acc_row_vec4(h, r) + c * DC4 + tx] = acc[i * NC + c];
            }
#endif
#ifdef WRITE_OUTPUT
            let l = row_l[ty * 4u + i];
            let inv = select(0.0, 1.0 / l, l > 0.0);
            for (var c = 0u; c < NC; c++) {
                o_buf[o_row_vec4(h, r) + c * DC4 + tx] = encode4(acc[i * NC + c] * inv);
            }
#endif
        }
    }
}
