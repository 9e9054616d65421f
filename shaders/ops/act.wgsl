// Gated activation of a feed-forward block, in place: g[i] = act(g[i]) · u[i] over
// `p.count` values, act = SiLU (SwiGLU) or, with GELU, the tanh form of GELU (GeGLU).
// One thread per value on a 2D grid (flattened).

#include "common/invocation.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;

@compute @workgroup_size(256)
fn act(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg) * 256u + lid;
    if (i >= p.count) {
        return;
    }
    let x = g[i];
#ifdef GELU
    let a = 0.5 * x * (1.0 + tanh(clamp(0.7978846 * (x + 0.044715 * x * x * x), -15.0, 15.0)));
#else
    let a = x / (1.0 + exp(-x));
#endif
    g[i] = a * u[i];
}
