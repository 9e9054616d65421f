// MoE router: logits = W_router · x for every token (x is the un-normalized residual
// entering the layer), then the top-k experts per token and their weights: sigmoid of
// the chosen logits renormalized to sum 1 (SOFTMAX: softmax over the chosen logits,
// which equals the full softmax renormalized over the top k).
//
// One workgroup of 64 threads per token (tokens on a 2D grid, flattened). Thread e
// computes the logits of experts e, e+64, ...; thread 0 then picks the top k in the
// total order (logit descending, expert index ascending), so ties go to the lower
// expert index, as in the CPU twin.
//
// Layouts: x [tokens, hidden], w [experts, hidden] (f32, read as vec4), logits
// [tokens, experts], ids / weights [tokens, top_k]. Constants: MAX_E (256), MAX_K (8).
// LOGITS_IN: the logits were computed by another kernel (the GPU decoder's projection
// of GGUF router weights); only the top k and the weights are made (no x, no w).

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
#ifdef LOGITS_IN
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> weights: array<f32>;
#else
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;
@group(0) @binding(4) var<storage, read_write> ids: array<u32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;
#endif

var<workgroup> lg: array<f32, MAX_E>;

@compute @workgroup_size(64)
fn router(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wg);
    if (t >= p.tokens) { return; }
#ifdef LOGITS_IN
    for (var e = lid; e < p.experts; e += WG) {
        lg[e] = logits[t * p.experts + e];
    }
#else
    let h4 = p.hidden / 4u;
    for (var e = lid; e < p.experts; e += WG) {
        var acc = vec4<f32>(0.0);
        for (var i = 0u; i < h4; i++) {
            acc += x[t * h4 + i] * w[e * h4 + i];
        }
        let s = (acc.x + acc.y) + (acc.z + acc.w);
        lg[e] = s;
        logits[t * p.experts + e] = s;
    }
#endif
    workgroupBarrier();
    if (lid != 0u) { return; }
    var vals: array<f32, MAX_K>;
    var sel: array<u32, MAX_K>;
    var prev_v = 0.0;
    var prev_i = 0u;
    for (var j = 0u; j < p.top_k; j++) {
        var best_v = 0.0;
        var best_i = p.experts;
        for (var e = 0u; e < p.experts; e++) {
            let v = lg[e];
            let eligible = j == 0u || v < prev_v || (v == prev_v && e > prev_i);
            if (eligible && (best_i == p.experts || v > best_v)) {
                best_v = v;
                best_i = e;
            }
        }
        vals[j] = best_v;
        sel[j] = best_i;
        prev_v = best_v;
        prev_i = best_i;
    }
    var sum = 0.0;
    let v0 = vals[0];
    for (var j = 0u; j < p.top_k; j++) {
#ifdef SOFTMAX
        let s = exp(vals[j] - v0);
#else
        let s = 1.0 / (1.0 + exp(-vals[j]));
#endif
        vals[j] = s;
        sum += s;
    }
    for (var j = 0u; j < p.top_k; j++) {
        ids[t * p.top_k + j] = sel[j];
        weights[t * p.top_k + j] = vals[j] / sum;
    }
}
