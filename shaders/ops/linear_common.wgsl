// What the linear kernels (linear.wgsl: portable; linear_coop.wgsl: matrix units;
// gemv.wgsl: one token) share: bindings, the weight reader and the activation layouts
// (see linear.wgsl). Include after quant/weights.wgsl.
//
// A kernel computes output features `row0 + (0 .. p.n)` of `p.n_out` (a matrix split
// over several weight bindings runs one dispatch per part); `res`, `bias` and `y` are
// indexed by the whole output width.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
#ifdef RESIDUAL
@group(0) @binding(4) var<storage, read> res: array<f32>;
#endif
#ifdef BIAS
#ifdef RESIDUAL
@group(0) @binding(5) var<storage, read> bias: array<f32>;
#else
@group(0) @binding(4) var<storage, read> bias: array<f32>;
#endif
#endif

#include "quant/ggml.wgsl"

// Values `col .. col + 3` of weight row `row` (of this part).
fn wload4(row: u32, col: u32) -> vec4<f32> {
#ifdef GGML
    return ggml_load4(row, col, p.k);
#else
    let l = wloc(row, col, p.k, p.sb);
    return wdecode(w[l.w0], w[l.w1], l);
#endif
}

// The finished output value `v` of token `t`, part row `n`: plus the residual and the
// bias, stored in the output layout.
fn store_y(t: u32, n: u32, v: f32) {
    let ng = p.row0 + n;
    var o = v;
#ifdef RESIDUAL
    o += res[t * p.n_out + ng];
#endif
#ifdef BIAS
    o += bias[ng];
#endif
    y[y_index(t, ng)] = o;
}


fn x_index4(t: u32, k: u32) -> u32 {
#ifdef IN_HEAD_MAJOR
    return ((k / p.head_dim) * p.tokens * p.head_dim + t * p.head_dim + k % p.head_dim) / 4u;
#else
    return (t * p.k + k) / 4u;
#endif
}

fn y_index(t: u32, n: u32) -> u32 {
#ifdef OUT_HEAD_MAJOR
    return (n / p.head_dim) * p.tokens * p.head_dim + t * p.head_dim + n % p.head_dim;
#else
    return t * p.n_out + n;
#endif
}
