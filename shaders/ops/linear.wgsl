// Linear layer y[t, n] = Σ_k x[t, k] · W[n, k] (W [N, K] in f16 or Q4_0, see
// common/weights.wgsl; K % 32 == 0), tiled 64 tokens x 64 outputs per workgroup of 256
// threads, K in chunks of 16 through workgroup memory; f32 activations and accumulation.
//
// Layout flags (head_dim D = p.head_dim):
//   IN_HEAD_MAJOR:  x is [K / D, tokens, D] (attention output) instead of [tokens, K];
//   OUT_HEAD_MAJOR: y is [N / D, tokens, D] (Q/K/V for attention) instead of [tokens, N];
//   RESIDUAL:       y = res + x·Wᵀ (res [tokens, N]).
// Thread (tx, ty) = (lid % 16, lid / 16) owns tokens ty + 16 i and outputs tx + 16 j.

#include "common/invocation.wgsl"
#include "quant/weights.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;
const S: u32 = 5u;

#include "ops/linear_common.wgsl"

var<workgroup> xs: array<vec4<f32>, 320>;
var<workgroup> ws: array<vec4<f32>, 320>;

@compute @workgroup_size(256)
fn linear(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let t0 = wg.id.x * TM;
    let n0 = wg.id.y * TN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let lr = lid / 4u;
    let lc = lid % 4u;
    let xt = t0 + lr;
    let xvalid = xt < p.tokens;
    let wn = n0 + lr;
    let wvalid = wn < p.n;
#unroll i 4
    var acc${i} = vec4<f32>(0.0);
    var a${i} = vec4<f32>(0.0);
#endunroll
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        var xv = vec4<f32>(0.0);
        if (xvalid) {
            xv = x[x_index4(xt, k0 + lc * 4u)];
        }
        xs[lr * S + lc] = xv;
        var wv = vec4<f32>(0.0);
        if (wvalid) {
            wv = wload4(wn, k0 + lc * 4u);
        }
        ws[lr * S + lc] = wv;
        workgroupBarrier();
#unroll k 4
#unroll i 4
        a${i} = xs[(ty + ${i}u * 16u) * S + ${k}u];
#endunroll
#unroll j 4
        {
            let b = ws[(tx + ${j}u * 16u) * S + ${k}u];
#unroll i 4
            acc${i}[${j}] += dot(a${i}, b);
#endunroll
        }
#endunroll
#endunroll
        workgroupBarrier();
    }
#unroll i 4
#unroll j 4
    {
        let t = t0 + ty + ${i}u * 16u;
        let n = n0 + tx + ${j}u * 16u;
        if (t < p.tokens && n < p.n) {
            store_y(t, n, acc${i}[${j}]);
        }
    }
#endunroll
#endunroll
}
