// MoE combine: out[t, :] = residual[t, :] + Σ_j weights[t, j] * y[inv[t * K + j], :]
// (the weighted gather-add of the experts' outputs back to token order, slots in
// order j = 0..K-1 as in the CPU twin). One thread per 4 elements of a row; the
// threads are on a 2D grid of 256-thread workgroups, flattened.

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> y: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read> inv: array<u32>;
@group(0) @binding(4) var<storage, read> residual: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(256)
fn moe_combine(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let h4 = p.hidden / 4u;
    let idx = flat_id(wg) * 256u + lid;
    if (idx >= p.tokens * h4) { return; }
    let t = idx / h4;
    let c4 = idx % h4;
    var acc = residual[idx];
    for (var j = 0u; j < p.top_k; j++) {
        let a = t * p.top_k + j;
        acc += weights[a] * y[inv[a] * h4 + c4];
    }
    out[idx] = acc;
}
