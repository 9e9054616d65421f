// Flash attention on matrix units (WGSL cooperative matrices): the same dispatches,
// bindings, key modes (dense, KEYS_BLOCKS, KEYS_GATHER), masking and row-state
// import/export as the portable kernel (flash.wgsl), with Q·Kᵀ and P·V as
// coopMultiplyAdd on f16 tiles accumulated in f32.
//
// A workgroup computes BQ query rows of one q-head; each of its subgroups owns RS =
// RTS·T of those rows for the whole run and keeps their Q tiles (role A) and their output
// accumulator O (RTS × DT f32 tiles) in registers. The workgroup walks the key tiles
// (BK keys) together: K and V are staged in workgroup memory as f16 (the next tile is
// fetched into registers while the current one is computed), then each subgroup, on its
// own rows only:
//   1. S = Q·Kᵀ: RTS × KT score tiles, each summing DT products (K row-major loaded
//      column-major, i.e. Kᵀ, as B), stored to the subgroup's rows of S (f32);
//   2. the online softmax of its rows (lanes split a row's keys and combine with
//      subgroup shuffles); the weights P go to workgroup memory as f16;
//   3. O += P·V on the registers.
// Matrix tiles have no per-element access, so the usual per-row rescale of O when the
// running maximum grows is done lazily: a row keeps its reference maximum m until a
// key tile's maximum exceeds it by more than RESCALE_SLACK (log2 units; the weights are
// then at most 2^RESCALE_SLACK, well inside f16), and only then (rare: at most a few
// times per row) does the workgroup pass its accumulators through workgroup memory to
// scale them. Softmax is invariant to the reference; the row's true maximum is kept
// beside it, and the exported state (m, l, acc) is brought to that maximum on the way
// out, so the split and two-pass plans (and AnchorAttention, which reads m) see the
// same state as from the portable kernel.
//
// Constants: D (head_dim, a multiple of BK), T (tile: 8 or 16, TILE16 selects 16), BQ
// (rows per workgroup), BK (keys per tile, a multiple of T), RTS (row tiles per
// subgroup; the launcher sizes WG = BQ / (RTS T) subgroups), KT = BK / T, DT = D / T,
// NCH = D / BK, WG (threads), PF (key/value vec4 per thread and tile: ceil(BK D / 4 / WG)).
// Storage is f16 (STORE_F16): the operands are the stored values themselves. Row
// strides in workgroup memory are padded by 16 bytes so that the rows of a matrix tile
// fall in different banks.

#include "common/storage.wgsl"
#include "common/online_softmax.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/coop.wgsl"

const RS: u32 = RTS * T;      // rows per subgroup
const D4: u32 = D / 4u;
const DP: u32 = D + 8u;       // row stride of K and V (halves)
const SP: u32 = BK + 4u;      // row stride of S (floats)
const PP: u32 = BK + 8u;      // row stride of P (halves)
const RESCALE_SLACK: f32 = 8.0;

#include "attention/flash_common.wgsl"

var<workgroup> k_s: array<f16, BK * DP>;  // K rows of the key tile
var<workgroup> v_s: array<f16, BK * DP>;  // V rows
var<workgroup> s_s: array<f32, BQ * SP>;  // scores; a subgroup's scratch tile
var<workgroup> p_s: array<f16, BQ * PP>;  // weights; Q while it is loaded
var<workgroup> row_mx: array<f32, BQ>;   // each row's true running maximum (log2)
var<workgroup> wg_rescale: u32;           // some row of this key tile needs a rescale

// The four halves of a stored vec4 (f16 storage: two u32 words).
fn halves(w: Store4) -> vec4<f16> {
    return vec4<f16>(decode4(w));
}

// This thread's share of a key tile's K and V rows (vec4 lid + u WG of the tile,
// u < PF), fetched one tile ahead: the second buffer of the K/V staging.
#unroll u PF
var<private> pk${u}: Store4;
var<private> pv${u}: Store4;
#endunroll

// Fetches key tile `it` into pk/pv (zero past the visible keys; nothing past the last
// tile).
fn fetch_tile(it: u32, lid: u32, kvh: u32, key_end: u32, n_tiles: u32) {
    if it >= n_tiles { return; }
#unroll u PF
    {
        let i = lid + ${u}u * WG;
        pk${u} = Store4();
        pv${u} = Store4();
        if i < BK * D4 {
            let key = tile_key(it, i / D4);
            if key < key_end {
                pk${u} = k_buf[kv_row_vec4(p.k_base, kvh, key) + i % D4];
                pv${u} = v_buf[kv_row_vec4(p.v_base, kvh, key) + i % D4];
            }
        }
    }
#endunroll
}

// Moves the fetched K/V vec4s into workgroup memory.
fn stage_tile(lid: u32) {
#unroll u PF
    {
        let i = lid + ${u}u * WG;
        if i < BK * D4 {
            let o = (i / D4) * DP + (i % D4) * 4u;
            let k = halves(pk${u});
            let v = halves(pv${u});
            k_s[o] = k.x;
            k_s[o + 1u] = k.y;
            k_s[o + 2u] = k.z;
            k_s[o + 3u] = k.w;
            v_s[o] = v.x;
            v_s[o + 1u] = v.y;
            v_s[o + 2u] = v.z;
            v_s[o + 3u] = v.w;
        }
    }
#endunroll
}

// The factor that moves row r's state from its reference maximum to its true maximum
// (1 for a row that has seen no key).
fn to_true_max(r: u32) -> f32 {
    return select(1.0, exp2(row_m[r] - row_mx[r]), is_live(row_mx[r]));
}

@compute @workgroup_size(WG)
fn flash_attention_coop(me: InvocationSub) {
    let h = p.h0 + me.id.y;
    let kvh = h / p.group;
    // Causal rows further down see more keys: the heaviest workgroups start first.
    let row0 = p.r0 + (me.count.x - 1u - me.id.x) * BQ;
    let row_end = min(row0 + BQ, p.r1);
    let scale2 = p.scale * LOG2E;
    let sr0 = me.sid * RS;         // this subgroup's first row in the workgroup
    let scr = sr0 * SP;            // its T x T scratch tile in s_s
    // Rows a lane works on in the softmax: RPL rows, lanes sharing a row split its keys.
    let parts = max(1u, me.sgs / RS);
    let part = me.lane / RS;
    let rpl = max(1u, RS / me.sgs);

    for (var r = me.lid; r < BQ; r += WG) {
        init_row_state(h, row0, r);
        row_mx[r] = row_m[r];
    }
    if me.lid == 0u {
        wg_rescale = 0u;
    }

    // Q into registers, BK columns at a time through p_s.
#unroll c NCH
    workgroupBarrier();
    for (var i = me.lid; i < BQ * BK / 4u; i += WG) {
        let r = i / (BK / 4u);
        let c4 = i % (BK / 4u);
        var q = vec4<f16>();
        if row0 + r < p.r1 {
            q = halves(q_buf[q_row_vec4(h, row0 + r) + ${c}u * (BK / 4u) + c4]);
        }
        let o = r * PP + c4 * 4u;
        p_s[o] = q.x;
        p_s[o + 1u] = q.y;
        p_s[o + 2u] = q.z;
        p_s[o + 3u] = q.w;
    }
    workgroupBarrier();
#unroll i RTS
#unroll j KT
    let qo${i}_${c}_${j} = (sr0 + ${i}u * T) * PP + ${j}u * T;
    let q${i}_${c}_${j} = coopLoadT<MatA>(&p_s[qo${i}_${c}_${j}], PP);
#endunroll
#endunroll
#endunroll

    // The accumulators: zero, or the imported state through the scratch tile.
#unroll i RTS
#unroll dt DT
    var o${i}_${dt} = MatC();
#ifdef IMPORT_STATE
    workgroupBarrier();
    for (var e = me.lane; e < T * T / 4u; e += me.sgs) {
        let r = e / (T / 4u);
        let c4 = e % (T / 4u);
        let row = row0 + sr0 + ${i}u * T + r;
        var a = vec4<f32>(0.0);
        if row < p.r1 {
            a = acc_buf[acc_row_vec4(h, row) + ${dt}u * (T / 4u) + c4];
        }
        let so = scr + r * SP + c4 * 4u;
        s_s[so] = a.x;
        s_s[so + 1u] = a.y;
        s_s[so + 2u] = a.z;
        s_s[so + 3u] = a.w;
    }
    workgroupBarrier();
    o${i}_${dt} = coopLoadT<MatC>(&s_s[scr], SP);
#endif
#endunroll
#endunroll

    let plan = key_plan(h, row0, row_end, me.lid);
    let key_end = plan.x;
    let n_tiles = plan.y;

    fetch_tile(0u, me.lid, kvh, key_end, n_tiles);
    for (var it = 0u; it < n_tiles; it++) {
        // Every subgroup is done with the previous tile's K/V and the rescale flag.
        workgroupBarrier();
        if me.lid == 0u {
            wg_rescale = 0u;
        }
        stage_tile(me.lid);
        workgroupBarrier();
        fetch_tile(it + 1u, me.lid, kvh, key_end, n_tiles);

        // 1. S = Q·Kᵀ on this subgroup's rows.
#unroll kt KT
        {
#unroll i RTS
            var c${i} = MatC();
#endunroll
#unroll c NCH
#unroll j KT
            let ko${c}_${j} = ${kt}u * T * DP + (${c}u * KT + ${j}u) * T;
            let kb${c}_${j} = coopLoad<MatB>(&k_s[ko${c}_${j}], DP);
#unroll i RTS
            c${i} = coopMultiplyAdd(q${i}_${c}_${j}, kb${c}_${j}, c${i});
#endunroll
#endunroll
#endunroll
#unroll i RTS
            let so${i} = (sr0 + ${i}u * T) * SP + ${kt}u * T;
            coopStoreT(c${i}, &s_s[so${i}], SP);
#endunroll
        }
#endunroll
        workgroupBarrier();

        // 2. Online softmax of the subgroup's rows against its reference maxima.
        for (var k = 0u; k < rpl; k++) {
            let r = sr0 + me.lane % RS + k * me.sgs;
            let row = row0 + r;
            var mt = NEG_BIG;
            for (var j = part; j < BK; j += parts) {
                let key = tile_key(it, j);
                let live = key_visible(row, key, key_end);
                let s = select(NEG_BIG, s_s[r * SP + j] * scale2, live);
                s_s[r * SP + j] = s;
                mt = max(mt, s);
            }
            for (var x = RS; x < me.sgs; x *= 2u) {
                mt = max(mt, subgroupShuffleXor(mt, x));
            }
            let m_old = row_m[r];
            let grow = is_live(m_old) && mt > m_old + RESCALE_SLACK;
            let m_new = select(m_old, mt, grow || !is_live(m_old));
            var sum = 0.0;
            for (var j = part; j < BK; j += parts) {
                let w = f16(softmax_weight(s_s[r * SP + j], m_new));
                p_s[r * PP + j] = w;
                sum += f32(w);
            }
            for (var x = RS; x < me.sgs; x *= 2u) {
                sum += subgroupShuffleXor(sum, x);
            }
            if part == 0u {
                let alpha = rescale_factor(m_old, m_new);
                row_alpha[r] = alpha;
                row_l[r] = row_l[r] * alpha + sum;
                row_m[r] = m_new;
                row_mx[r] = max(row_mx[r], mt);
                if grow {
                    wg_rescale = 1u;
                }
            }
        }

        // 3. Rare: scale the accumulators of the rows whose reference moved (every
        // subgroup takes part; rows that kept theirs have alpha = 1).
        if workgroupUniformLoad(&wg_rescale) != 0u {
#unroll i RTS
#unroll dt DT
            coopStoreT(o${i}_${dt}, &s_s[scr], SP);
            workgroupBarrier();
            for (var e = me.lane; e < T * T; e += me.sgs) {
                let r = e / T;
                s_s[scr + r * SP + e % T] *= row_alpha[sr0 + ${i}u * T + r];
            }
            workgroupBarrier();
            o${i}_${dt} = coopLoadT<MatC>(&s_s[scr], SP);
            workgroupBarrier();
#endunroll
#endunroll
        }

        // 4. O += P·V.
#unroll kt KT
        {
#unroll i RTS
            let po${i} = (sr0 + ${i}u * T) * PP + ${kt}u * T;
            let pa${i} = coopLoadT<MatA>(&p_s[po${i}], PP);
#endunroll
#unroll dt DT
            let vo${dt} = ${kt}u * T * DP + ${dt}u * T;
            let vb${dt} = coopLoadT<MatB>(&v_s[vo${dt}], DP);
#unroll i RTS
            o${i}_${dt} = coopMultiplyAdd(pa${i}, vb${dt}, o${i}_${dt});
#endunroll
#endunroll
        }
#endunroll
    }

    // The row state out: each accumulator tile through the scratch tile.
#unroll i RTS
#unroll dt DT
    workgroupBarrier();
    coopStoreT(o${i}_${dt}, &s_s[scr], SP);
    workgroupBarrier();
    for (var e = me.lane; e < T * T / 4u; e += me.sgs) {
        let r = e / (T / 4u);
        let c4 = e % (T / 4u);
        let lr = sr0 + ${i}u * T + r;
        if row0 + lr < p.r1 {
            let so = scr + r * SP + c4 * 4u;
            let a = vec4<f32>(s_s[so], s_s[so + 1u], s_s[so + 2u], s_s[so + 3u]);
            let col4 = ${dt}u * (T / 4u) + c4;
#ifdef EXPORT_STATE
            acc_buf[acc_row_vec4(h, row0 + lr) + col4] = a * to_true_max(lr);
#endif
#ifdef WRITE_OUTPUT
            let l = row_l[lr];
            let inv = select(0.0, 1.0 / l, l > 0.0);
            o_buf[o_row_vec4(h, row0 + lr) + col4] = encode4(a * inv);
#endif
        }
    }
#endunroll
#endunroll
#ifdef EXPORT_STATE
    for (var r = me.lid; r < BQ; r += WG) {
        if row0 + r < p.r1 {
            let mx = row_mx[r];
            ml_buf[ml_index(h, row0 + r)] = vec2<f32>(m_to_natural(mx), row_l[r] * to_true_max(r));
        }
    }
#endif
}
