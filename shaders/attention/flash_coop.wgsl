// Flash attention on matrix units (WGSL cooperative matrices): the same dispatches,
// bindings, key modes (dense, KEYS_BLOCKS, KEYS_GATHER), masking and row-state
// import/export as the portable kernel (flash.wgsl), with Q·Kᵀ and P·V as
// coopMultiplyAdd on f16 tiles accumulated in f32.
//
// A workgroup of WG threads (several subgroups) computes BQ query rows of one q-head
// against key tiles of BK keys. Q (f16) stays in workgroup memory for the whole run;
// each key tile's K and V rows are staged there as f16. Cooperative matrices have no
// per-element access, so everything per element goes through workgroup memory:
//   1. S = Q·Kᵀ: the BQ x BK score tile as (BQ/T) x (BK/T) output tiles spread over
//      the subgroups, each summing D/T products (Q row-major as A; K row-major loaded
//      column-major, i.e. Kᵀ, as B), stored to S (f32);
//   2. per row (one thread each): scale, mask, online softmax; P = weights as f16;
//   3. the accumulator O (f32, BQ x D, in workgroup memory) is rescaled per row;
//   4. O += P·V: (BQ/T) x (D/T) output tiles over the subgroups, each loading its O tile
//      as C, adding BK/T products (P as A, V row-major as B) and storing it back.
// The f32 row sums l add the weights as P·V uses them (rounded to f16, unless the
// compiler folds the f32 → f16 → f32 round trip; either way within the f16 tolerance).
//
// Constants: D (head_dim, a multiple of T), T (tile: 8 or 16, TILE16 selects 16), BQ
// (rows per workgroup, a multiple of T), BK (keys per tile, a multiple of T), WG
// (threads), PF (vec4 of a K/V tile per thread: ceil(BK D / 4 / WG)). Storage is f16 (STORE_F16): the f16 operands are the stored values
// themselves.

#include "common/invocation.wgsl"
#include "common/storage.wgsl"
#include "common/online_softmax.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/coop.wgsl"

const RT: u32 = BQ / T;   // row tiles
const KT: u32 = BK / T;   // key tiles per key block
const DT: u32 = D / T;    // head_dim tiles
const D4: u32 = D / 4u;

#include "attention/flash_common.wgsl"

var<workgroup> q_s: array<f16, BQ * D>;   // Q rows [BQ][D]
var<workgroup> k_s: array<f16, BK * D>;   // K rows of the key tile [BK][D]
var<workgroup> v_s: array<f16, BK * D>;   // V rows [BK][D]
var<workgroup> s_s: array<f32, BQ * BK>;  // scores [BQ][BK]
var<workgroup> p_s: array<f16, BQ * BK>;  // weights [BQ][BK]
var<workgroup> o_s: array<f32, BQ * D>;   // accumulator [BQ][D]

fn store_f16x4(dst: u32, v: vec4<f32>, which: u32) {
    let h = vec4<f16>(v);
    if which == 0u {
        q_s[dst] = h.x;
        q_s[dst + 1u] = h.y;
        q_s[dst + 2u] = h.z;
        q_s[dst + 3u] = h.w;
    } else if which == 1u {
        k_s[dst] = h.x;
        k_s[dst + 1u] = h.y;
        k_s[dst + 2u] = h.z;
        k_s[dst + 3u] = h.w;
    } else {
        v_s[dst] = h.x;
        v_s[dst + 1u] = h.y;
        v_s[dst + 2u] = h.z;
        v_s[dst + 3u] = h.w;
    }
}

// This thread's share of a key tile's K and V rows (vec4 lid + u WG of the tile,
// u < PF), fetched one tile ahead: the second buffer of the K/V staging.
#unroll u PF
var<private> pk${u}: vec4<f32>;
var<private> pv${u}: vec4<f32>;
#endunroll

// Fetches key tile `it` into pk/pv (zero past the visible keys; nothing past the last
// tile).
fn fetch_tile(it: u32, lid: u32, kvh: u32, key_end: u32, n_tiles: u32) {
    if it >= n_tiles { return; }
#unroll u PF
    {
        let i = lid + ${u}u * WG;
        pk${u} = vec4<f32>(0.0);
        pv${u} = vec4<f32>(0.0);
        if i < BK * D4 {
            let key = tile_key(it, i / D4);
            if key < key_end {
                pk${u} = decode4(k_buf[kv_row_vec4(p.k_base, kvh, key) + i % D4]);
                pv${u} = decode4(v_buf[kv_row_vec4(p.v_base, kvh, key) + i % D4]);
            }
        }
    }
#endunroll
}

@compute @workgroup_size(WG)
fn flash_attention_coop(me: InvocationSub) {
    let h = p.h0 + me.id.y;
    let kvh = h / p.group;
    let row0 = p.r0 + me.id.x * BQ;
    let row_end = min(row0 + BQ, p.r1);
    let scale2 = p.scale * LOG2E;

    // Row state: m and l per row, the accumulator in o_s; Q as f16.
    for (var r = me.lid; r < BQ; r += WG) {
        init_row_state(h, row0, r);
    }
    for (var i = me.lid; i < BQ * D4; i += WG) {
        let r = i / D4;
        let c4 = i % D4;
        var q = vec4<f32>(0.0);
        var a = vec4<f32>(0.0);
        if row0 + r < p.r1 {
            q = decode4(q_buf[q_row_vec4(h, row0 + r) + c4]);
#ifdef IMPORT_STATE
            a = acc_buf[acc_row_vec4(h, row0 + r) + c4];
#endif
        }
        store_f16x4(i * 4u, q, 0u);
        o_s[i * 4u] = a.x;
        o_s[i * 4u + 1u] = a.y;
        o_s[i * 4u + 2u] = a.z;
        o_s[i * 4u + 3u] = a.w;
    }

    let plan = key_plan(h, row0, row_end, me.lid);
    let key_end = plan.x;
    let n_tiles = plan.y;

    // K/V double buffering: the next tile's rows are fetched into registers
    // (fetch_tile) while the current tile is computed from workgroup memory, and moved
    // there at the start of the next iteration.
    fetch_tile(0u, me.lid, kvh, key_end, n_tiles);
    for (var it = 0u; it < n_tiles; it++) {
        workgroupBarrier();
        // Stage the fetched K and V rows as f16 (zero past the visible keys), then
        // start fetching the next tile.
#unroll u PF
        if me.lid + ${u}u * WG < BK * D4 {
            store_f16x4((me.lid + ${u}u * WG) * 4u, pk${u}, 1u);
            store_f16x4((me.lid + ${u}u * WG) * 4u, pv${u}, 2u);
        }
#endunroll
        workgroupBarrier();
        fetch_tile(it + 1u, me.lid, kvh, key_end, n_tiles);
        // 1. S = Q·Kᵀ.
        for (var t = me.sid; t < RT * KT; t += me.nsg) {
            let ot = tile_at(t, KT);
            var c = MatC();
            for (var dt = 0u; dt < DT; dt++) {
                let qa = ot.x * D + dt * T;
                let kb = ot.y * D + dt * T;
                let a = coopLoadT<MatA>(&q_s[qa], D);
                let b = coopLoad<MatB>(&k_s[kb], D);
                c = coopMultiplyAdd(a, b, c);
            }
            let so = ot.x * BK + ot.y;
            coopStoreT(c, &s_s[so], BK);
        }
        workgroupBarrier();
        // 2. Online softmax per row.
        for (var r = me.lid; r < BQ; r += WG) {
            let row = row0 + r;
            let m_old = row_m[r];
            var m_new = m_old;
            for (var j = 0u; j < BK; j++) {
                let key = tile_key(it, j);
                let s = select(NEG_BIG, s_s[r * BK + j] * scale2, key_visible(row, key, key_end));
                s_s[r * BK + j] = s;
                m_new = max(m_new, s);
            }
            var sum = 0.0;
            for (var j = 0u; j < BK; j++) {
                let w = f16(softmax_weight(s_s[r * BK + j], m_new));
                p_s[r * BK + j] = w;
                sum += f32(w);
            }
            let alpha = rescale_factor(m_old, m_new);
            row_alpha[r] = alpha;
            row_l[r] = row_l[r] * alpha + sum;
            row_m[r] = m_new;
        }
        workgroupBarrier();
        // 3. Rescale the accumulator rows.
        for (var i = me.lid; i < BQ * D; i += WG) {
            o_s[i] *= row_alpha[i / D];
        }
        workgroupBarrier();
        // 4. O += P·V.
        for (var t = me.sid; t < RT * DT; t += me.nsg) {
            let ot = tile_at(t, DT);
            let oo = ot.x * D + ot.y;
            var c = coopLoadT<MatC>(&o_s[oo], D);
            for (var kt = 0u; kt < KT; kt++) {
                let pa = ot.x * BK + kt * T;
                let vb = kt * T * D + ot.y;
                let a = coopLoadT<MatA>(&p_s[pa], BK);
                let b = coopLoadT<MatB>(&v_s[vb], D);
                c = coopMultiplyAdd(a, b, c);
            }
            coopStoreT(c, &o_s[oo], D);
        }
    }

    workgroupBarrier();
#ifdef EXPORT_STATE
    for (var r = me.lid; r < BQ; r += WG) {
        if row0 + r < p.r1 {
            ml_buf[ml_index(h, row0 + r)] = vec2<f32>(m_to_natural(row_m[r]), row_l[r]);
        }
    }
#endif
    for (var i = me.lid; i < BQ * D4; i += WG) {
        let r = i / D4;
        let c4 = i % D4;
        if row0 + r < p.r1 {
            let a = vec4<f32>(o_s[i * 4u], o_s[i * 4u + 1u], o_s[i * 4u + 2u], o_s[i * 4u + 3u]);
#ifdef EXPORT_STATE
            acc_buf[acc_row_vec4(h, row0 + r) + c4] = a;
#endif
#ifdef WRITE_OUTPUT
            let l = row_l[r];
            let inv = select(0.0, 1.0 / l, l > 0.0);
            o_buf[o_row_vec4(h, row0 + r) + c4] = encode4(a * inv);
#endif
        }
    }
}
