// What the two linear kernels (linear.wgsl: portable; linear_coop.wgsl: matrix units)
// share: bindings and the activation layouts (see linear.wgsl). Include after
// quant/weights.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
#ifdef RESIDUAL
@group(0) @binding(4) var<storage, read> res: array<f32>;
#endif


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
    return t * p.n + n;
#endif
}
