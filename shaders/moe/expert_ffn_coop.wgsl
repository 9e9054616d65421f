// The tiled (prefill) expert FFN of expert_ffn.wgsl on matrix units: the same bindings,
// tiles of TM positions of one expert (x 32 neurons for up, whose four accumulators
// would not fit 32 KiB of workgroup memory at 64; x 64 hidden columns for down), weight
// formats, expert slots, neuron counters and down-chunk skipping; the products are
// cooperative-matrix multiply-adds on T x T f16 tiles with f32 accumulators.
//
// Precision: the activations (f32) are split into f16 halves (`split4`,
// common/coop.wgsl), and so are the weights where their format is not exactly f16
// (Q4_0): f32-level accuracy, within the portable kernels' tolerance, so the gate
// signs (neuron skipping) agree with them but for values within rounding of 0.
//
// K runs in chunks of TK = 16 (hidden for up, neurons for down). Each chunk is staged
// in workgroup memory as f16 halves; the accumulators live in workgroup memory too,
// their T x T tiles spread over the subgroups, each loading its tiles as C, adding the
// chunk's products and storing. Up: gate and up accumulate side by side and the
// ReGLU is applied when the tile is written. Down with SKIP_CHUNKS: the down weights of
// a chunk whose TM x 16 activations are all 0 (inactive neurons for every position of
// the tile) are not read; its multiply-adds still run, on zeros. (Skipping them needs a
// workgroup-uniform branch around the matrix operations; one built on
// workgroupUniformLoad gave wrong results on an H200's driver.)

#include "common/invocation.wgsl"
#include "quant/weights.wgsl"
#include "common/coop.wgsl"
#include "moe/expert_common.wgsl"

// ---------------------------------------------------------------------------------------
#ifdef UP
var<workgroup> z_hi: array<f16, TM * TK>;  // [TM][TK] rows of z (gathered tokens)
var<workgroup> z_lo: array<f16, TM * TK>;
var<workgroup> g_hi: array<f16, TN * TK>;  // [TN][TK] gate rows
var<workgroup> u_hi: array<f16, TN * TK>;  // [TN][TK] up rows
#ifndef WEIGHTS_F16
var<workgroup> g_lo: array<f16, TN * TK>;
var<workgroup> u_lo: array<f16, TN * TK>;
#endif
var<workgroup> cg_hi: array<f32, TM * TN>;  // gate · z [TM][TN]
var<workgroup> cg_lo: array<f32, TM * TN>;
var<workgroup> cu_hi: array<f32, TM * TN>;  // up · z
var<workgroup> cu_lo: array<f32, TM * TN>;

@compute @workgroup_size(256)
fn expert_up_coop(me: InvocationSub) {
    // No early return (naga takes it as non-uniform flow around the matrix operations):
    // an invalid tile runs no chunk and writes nothing.
    let t = expert_tile(me.id.x);
    let n0 = me.id.y * TN;
    let h4 = p.hidden / 4u;
    for (var i = me.lid; i < TM * TN; i += 256u) {
        cg_hi[i] = 0.0;
        cg_lo[i] = 0.0;
        cu_hi[i] = 0.0;
        cu_lo[i] = 0.0;
    }
    if (me.lid == 0u) {
        atomicStore(&skipped_wg, 0u);
    }
    // Thread lid stages, for lid < 4 TN, one vec4 of a gate and an up row (neuron
    // n0 + lid / 4) and, for lid < 4 TM, one of z.
    let r = me.lid / 4u;
    let c4 = (me.lid % 4u) * 4u;
    let zload = r < TM;
    let zvalid = zload && t.row0 + r < t.row_end;
    var ztok = 0u;
    if (zvalid) {
        ztok = sorted[t.row0 + r] / p.top_k;
    }
    let wload = r < TN;
    let wvalid = wload && n0 + r < p.ffn;
    let wrow = t.slot * p.ffn + n0 + r;
    for (var k0 = 0u; k0 < select(0u, p.hidden, t.valid); k0 += TK) {
        workgroupBarrier();
        if (zload) {
            var zv = vec4<f32>(0.0);
            if (zvalid) {
                zv = z[ztok * h4 + (k0 + c4) / 4u];
            }
            let zs = split4(zv);
            for (var e = 0u; e < 4u; e++) {
                z_hi[r * TK + c4 + e] = zs.hi[e];
                z_lo[r * TK + c4 + e] = zs.lo[e];
            }
        }
        var gv = vec4<f32>(0.0);
        var uv = vec4<f32>(0.0);
        if (wvalid) {
            let lg = wloc(wrow, k0 + c4, p.hidden, p.gate_sb);
            gv = wdecode(gate[lg.w0], gate[lg.w1], lg);
            let lu = wloc(wrow, k0 + c4, p.hidden, p.up_sb);
            uv = wdecode(up[lu.w0], up[lu.w1], lu);
        }
        if (wload) {
            let gs = split4(gv);
            let us = split4(uv);
            for (var e = 0u; e < 4u; e++) {
                g_hi[r * TK + c4 + e] = gs.hi[e];
                u_hi[r * TK + c4 + e] = us.hi[e];
#ifndef WEIGHTS_F16
                g_lo[r * TK + c4 + e] = gs.lo[e];
                u_lo[r * TK + c4 + e] = us.lo[e];
#endif
            }
        }
        workgroupBarrier();
        for (var s = me.sid; s < (TM / T) * (TN / T); s += me.nsg) {
            let ot = tile_at(s, TN / T);
            let co = ot.x * TN + ot.y;
            var gh = coopLoadT<MatC>(&cg_hi[co], TN);
            var gl = coopLoadT<MatC>(&cg_lo[co], TN);
            var uh = coopLoadT<MatC>(&cu_hi[co], TN);
            var ul = coopLoadT<MatC>(&cu_lo[co], TN);
            for (var ks = 0u; ks < TK / T; ks++) {
                let za = ot.x * TK + ks * T;
                let wb = ot.y * TK + ks * T;
                let ah = coopLoadT<MatA>(&z_hi[za], TK);
                let al = coopLoadT<MatA>(&z_lo[za], TK);
                // Weight rows loaded column-major: the B operand is Wᵀ (k x n).
                let bg = coopLoad<MatB>(&g_hi[wb], TK);
                let bu = coopLoad<MatB>(&u_hi[wb], TK);
                gh = coopMultiplyAdd(ah, bg, gh);
                gl = coopMultiplyAdd(al, bg, gl);
                uh = coopMultiplyAdd(ah, bu, uh);
                ul = coopMultiplyAdd(al, bu, ul);
#ifndef WEIGHTS_F16
                gl = coopMultiplyAdd(ah, coopLoad<MatB>(&g_lo[wb], TK), gl);
                ul = coopMultiplyAdd(ah, coopLoad<MatB>(&u_lo[wb], TK), ul);
#endif
            }
            coopStoreT(gh, &cg_hi[co], TN);
            coopStoreT(gl, &cg_lo[co], TN);
            coopStoreT(uh, &cu_hi[co], TN);
            coopStoreT(ul, &cu_lo[co], TN);
        }
    }
    workgroupBarrier();
    var skipped = 0u;
    for (var i = me.lid; i < TM * TN; i += 256u) {
        let pos = t.row0 + i / TN;
        let n = n0 + i % TN;
        if (pos < t.row_end && n < p.ffn) {
            let g = cg_hi[i] + cg_lo[i] / LO;
            var v = 0.0;
            if (g > 0.0) {
                v = (cu_hi[i] + cu_lo[i] / LO) * g;
            } else {
                skipped += 1u;
            }
            act[pos * p.ffn + n] = v;
        }
    }
    count_up_tile(me.lid, t, n0, skipped, p.part_base + 2u * (me.id.x * me.count.y + me.id.y));
}
#endif

// ---------------------------------------------------------------------------------------
#ifdef DOWN
var<workgroup> a_hi: array<f16, TM * TK>;  // [TM][TK] activations of 16 neurons
var<workgroup> a_lo: array<f16, TM * TK>;
var<workgroup> d_hi: array<f16, TK * TN>;  // [TK][TN] down rows (one per neuron)
#ifndef WEIGHTS_F16
var<workgroup> d_lo: array<f16, TK * TN>;
#endif
var<workgroup> c_hi: array<f32, TM * TN>;  // y [TM][TN]
var<workgroup> c_lo: array<f32, TM * TN>;
@compute @workgroup_size(256)
fn expert_down_coop(me: InvocationSub) {
    // No early return (naga takes it as non-uniform flow around the matrix operations):
    // an invalid tile runs no chunk and writes nothing.
    let t = expert_tile(me.id.x);
    let h4 = p.hidden / 4u;
    let f4 = p.ffn / 4u;
    let col0 = me.id.y * TN;
    for (var i = me.lid; i < TM * TN; i += 256u) {
        c_hi[i] = 0.0;
        c_lo[i] = 0.0;
    }
    // Thread lid stages, for lid < 4 TM, one vec4 of activations (position lid / 4) and
    // one vec4 of a down row (neuron lid / 16, columns col0 + 4 (lid % 16) ..).
    let r = me.lid / 4u;
    let c4 = (me.lid % 4u) * 4u;
    let aload = r < TM;
    let avalid = aload && t.row0 + r < t.row_end;
    let kn = me.lid / 16u;
    let dc = (me.lid % 16u) * 4u;
    let dvalid = col0 + dc < p.hidden;
#ifdef SKIP_CHUNKS
    var skip = chunk_skip_start(me.lid);
#endif
    for (var k0 = 0u; k0 < select(0u, p.ffn, t.valid); k0 += TK) {
        workgroupBarrier();
        var av = vec4<f32>(0.0);
        if (avalid) {
            av = act4[(t.row0 + r) * f4 + (k0 + c4) / 4u];
        }
        if (aload) {
            let as_ = split4(av);
            for (var e = 0u; e < 4u; e++) {
                a_hi[r * TK + c4 + e] = as_.hi[e];
                a_lo[r * TK + c4 + e] = as_.lo[e];
            }
        }
#ifdef SKIP_CHUNKS
        let live = chunk_live(me.lid, any(av != vec4<f32>(0.0)), &skip);
#else
        let live = true;
#endif
        var dv = vec4<f32>(0.0);
        if (dvalid && live) {
            let l = wloc(t.slot * p.ffn + k0 + kn, col0 + dc, p.hidden, p.down_sb);
            dv = wdecode(down[l.w0], down[l.w1], l);
        }
        let ds = split4(dv);
        for (var e = 0u; e < 4u; e++) {
            d_hi[kn * TN + dc + e] = ds.hi[e];
#ifndef WEIGHTS_F16
            d_lo[kn * TN + dc + e] = ds.lo[e];
#endif
        }
        workgroupBarrier();
        for (var s = me.sid; s < (TM / T) * (TN / T); s += me.nsg) {
            let ot = tile_at(s, TN / T);
            let co = ot.x * TN + ot.y;
            var ch = coopLoadT<MatC>(&c_hi[co], TN);
            var cl = coopLoadT<MatC>(&c_lo[co], TN);
            for (var ks = 0u; ks < TK / T; ks++) {
                let aa = ot.x * TK + ks * T;
                let db = ks * T * TN + ot.y;
                let ah = coopLoadT<MatA>(&a_hi[aa], TK);
                let al = coopLoadT<MatA>(&a_lo[aa], TK);
                let bh = coopLoadT<MatB>(&d_hi[db], TN);
                ch = coopMultiplyAdd(ah, bh, ch);
                cl = coopMultiplyAdd(al, bh, cl);
#ifndef WEIGHTS_F16
                cl = coopMultiplyAdd(ah, coopLoadT<MatB>(&d_lo[db], TN), cl);
#endif
            }
            coopStoreT(ch, &c_hi[co], TN);
            coopStoreT(cl, &c_lo[co], TN);
        }
    }
    workgroupBarrier();
#ifdef SKIP_CHUNKS
    if (me.lid == 0u && t.valid) {
        let part = p.part_base + 2u * (me.id.x * me.count.y + me.id.y);
        stats[part] = skip.skipped;
        stats[part + 1u] = p.ffn / TK;
    }
#endif
    for (var i = me.lid; i < TM * (TN / 4u); i += 256u) {
        let pos = t.row0 + i / (TN / 4u);
        let cc = (i % (TN / 4u)) * 4u;
        if (pos < t.row_end && col0 + cc < p.hidden) {
            let o = (i / (TN / 4u)) * TN + cc;
            y[pos * h4 + (col0 + cc) / 4u] = vec4<f32>(
                c_hi[o] + c_lo[o] / LO,
                c_hi[o + 1u] + c_lo[o + 1u] / LO,
                c_hi[o + 2u] + c_lo[o + 2u] / LO,
                c_hi[o + 3u] + c_lo[o + 3u] / LO,
            );
        }
    }
}
#endif
