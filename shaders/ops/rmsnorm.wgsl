// RMSNorm: out[t, :] = x[row0 + t, :] / sqrt(mean(x[row0 + t, :]^2) + eps) * g. One
// workgroup of 64 threads per token (2D grid of tokens, flattened); f32 rows read as vec4.
// INPLACE: x is normalized in place (no `out` binding; QK-norm of head rows).
// ADD: out[t, :] += the normalized row (a post-norm added into the residual stream).

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"
@group(0) @binding(0) var<uniform> p: Params;
#ifdef INPLACE
@group(0) @binding(1) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> g: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
#endif

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn rmsnorm(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wg);
    if (t >= p.tokens) { return; }
    let h4 = p.hidden / 4u;
    let xr = (p.row0 + t) * h4;
    var s = 0.0;
    for (var i = lid; i < h4; i += 64u) {
        let v = x[xr + i];
        s += dot(v, v);
    }
    red[lid] = s;
    workgroupBarrier();
#unroll k 6
    if (lid < (32u >> ${k}u)) {
        red[lid] += red[lid + (32u >> ${k}u)];
    }
    workgroupBarrier();
#endunroll
    let r = inverseSqrt(red[0] / f32(p.hidden) + p.eps);
    for (var i = lid; i < h4; i += 64u) {
        let v = x[xr + i] * r * g[i];
#ifdef INPLACE
        x[xr + i] = v;
#else
#ifdef ADD
        out[t * h4 + i] += v;
#else
        out[t * h4 + i] = v;
#endif
#endif
    }
}
