// Embedding lookup: out[t, :] = scale · W[ids[t] − row0, :] for the tokens whose id
// falls in this part of the table (rows row0 .. row0 + rows; a table split over several
// weight bindings runs one dispatch per part), any weight format of quant/ggml.wgsl or
// quant/weights.wgsl. One workgroup of 64 threads per token (2D grid, flattened).

#include "common/invocation.wgsl"
#include "quant/weights.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

#include "quant/ggml.wgsl"

@compute @workgroup_size(64)
fn embed(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wg);
    if (t >= p.tokens) {
        return;
    }
    let id = ids[t];
    if (id < p.row0 || id >= p.row0 + p.rows) {
        return;
    }
    let row = id - p.row0;
    for (var c = lid * 4u; c < p.cols; c += 256u) {
#ifdef GGML
        let v = ggml_load4(row, c, p.cols);
#else
        let l = wloc(row, c, p.cols, p.sb);
        let v = wdecode(w[l.w0], w[l.w1], l);
#endif
        out[(t * p.cols + c) / 4u] = v * p.scale;
    }
}
