// RMSNorm: out[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * g. One workgroup of 64
// threads per token (2D grid of tokens, flattened); f32 rows read as vec4.

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn rmsnorm(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wg);
    if (t >= p.tokens) { return; }
    let h4 = p.hidden / 4u;
    var s = 0.0;
    for (var i = lid; i < h4; i += 64u) {
        let v = x[t * h4 + i];
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
        out[t * h4 + i] = x[t * h4 + i] * r * g[i];
    }
}
