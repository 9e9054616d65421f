// Linear layer y[t, n] = Σ_k x[t, k] · W[n, k] (+ res) on matrix units: the same
// bindings, weight formats and layouts as linear.wgsl, 32 tokens x 64 outputs per
// workgroup of 256 threads, K in chunks of 16.
//
// Precision: x (f32) is split into f16 halves (`split4`, common/coop.wgsl), and so is W
// where its format is not exactly f16 (Q4_0's (q - 8)·d has up to 15 significant bits,
// which the two halves hold exactly): f32-level accuracy, within the portable kernel's
// tolerance.
//
// Both 32 x 64 accumulators live in workgroup memory; their T x T tiles are spread over
// the subgroups, each loading its tiles as C, adding the chunk's products and storing.

#include "common/invocation.wgsl"
#include "quant/weights.wgsl"
#include "common/coop.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

const TM: u32 = 32u;
const TN: u32 = 64u;
const TK: u32 = 16u;
#include "ops/linear_common.wgsl"

var<workgroup> x_hi: array<f16, TM * TK>;  // [TM][TK]
var<workgroup> x_lo: array<f16, TM * TK>;  // (x - x_hi) · 2^11
var<workgroup> w_hi: array<f16, TN * TK>;  // [TN][TK] (rows of W)
#ifndef WEIGHTS_F16
var<workgroup> w_lo: array<f16, TN * TK>;  // (W - W_hi) · 2^11
#endif
var<workgroup> c_hi: array<f32, TM * TN>;  // Σ x_hi·W_hi [TM][TN]
var<workgroup> c_lo: array<f32, TM * TN>;  // Σ (x_lo·W_hi + x_hi·W_lo) · 2^11

@compute @workgroup_size(256)
fn linear_coop(me: InvocationSub) {
    let t0 = me.id.x * TM;
    let n0 = me.id.y * TN;
    for (var i = me.lid; i < TM * TN; i += 256u) {
        c_hi[i] = 0.0;
        c_lo[i] = 0.0;
    }
    // Thread lid stages one vec4 of W (row lid / 4) and, for lid < 128, one of x.
    let r = me.lid / (TK / 4u);
    let c4 = (me.lid % (TK / 4u)) * 4u;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        workgroupBarrier();
        if r < TM {
            var xv = vec4<f32>(0.0);
            if t0 + r < p.tokens {
                xv = x[x_index4(t0 + r, k0 + c4)];
            }
            let xs = split4(xv);
            for (var e = 0u; e < 4u; e++) {
                x_hi[r * TK + c4 + e] = xs.hi[e];
                x_lo[r * TK + c4 + e] = xs.lo[e];
            }
        }
        var wv = vec4<f32>(0.0);
        if n0 + r < p.n {
            wv = wload4(n0 + r, k0 + c4);
        }
        let ws = split4(wv);
        for (var e = 0u; e < 4u; e++) {
            w_hi[r * TK + c4 + e] = ws.hi[e];
#ifndef WEIGHTS_F16
            w_lo[r * TK + c4 + e] = ws.lo[e];
#endif
        }
        workgroupBarrier();
        for (var t = me.sid; t < (TM / T) * (TN / T); t += me.nsg) {
            let ot = tile_at(t, TN / T);
            let co = ot.x * TN + ot.y;
            var ch = coopLoadT<MatC>(&c_hi[co], TN);
            var cl = coopLoadT<MatC>(&c_lo[co], TN);
            for (var ks = 0u; ks < TK / T; ks++) {
                let xa = ot.x * TK + ks * T;
                let wb = ot.y * TK + ks * T;
                let ah = coopLoadT<MatA>(&x_hi[xa], TK);
                let al = coopLoadT<MatA>(&x_lo[xa], TK);
                // W's rows loaded column-major: the B operand is Wᵀ (k × n).
                let bh = coopLoad<MatB>(&w_hi[wb], TK);
                ch = coopMultiplyAdd(ah, bh, ch);
                cl = coopMultiplyAdd(al, bh, cl);
#ifndef WEIGHTS_F16
                let bl = coopLoad<MatB>(&w_lo[wb], TK);
                cl = coopMultiplyAdd(ah, bl, cl);
#endif
            }
            coopStoreT(ch, &c_hi[co], TN);
            coopStoreT(cl, &c_lo[co], TN);
        }
    }
    workgroupBarrier();
    for (var i = me.lid; i < TM * TN; i += 256u) {
        let t = t0 + i / TN;
        let n = n0 + i % TN;
        if t < p.tokens && n < p.n {
            store_y(t, n, c_hi[i] + c_lo[i] / LO);
        }
    }
}
