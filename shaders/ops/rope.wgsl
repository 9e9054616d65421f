// Rotary position embedding, in place on x [heads, tokens, D]: for i < D/2, with
// (c, s) = table[t, i] and the pair (a, b) = (i, i + D/2) (rotate-half convention of
// HF Llama/Qwen/Gemma/SmallThinker) or, with ADJACENT, (2i, 2i + 1) (GGUF `llama`,
// whose converter permuted the Q/K rows):
//   x[a] <- x[a] c - x[b] s
//   x[b] <- x[b] c + x[a] s
// The cos/sin table [tokens, D/2, 2] is computed on the host in f64 (GPU sin/cos lose
// accuracy at large angles). One thread per (head, token, i), on a flattened 2D grid.

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn rope(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let idx = flat_id(wg) * 256u + lid;
    if (idx >= p.heads * p.tokens * p.half) { return; }
    let i = idx % p.half;
    let row = idx / p.half;  // head * tokens + t
    let t = row % p.tokens;
    let cs = table[t * p.half + i];
    let base = row * 2u * p.half;
#ifdef ADJACENT
    let a = base + 2u * i;
    let b = a + 1u;
#else
    let a = base + i;
    let b = a + p.half;
#endif
    let x1 = x[a];
    let x2 = x[b];
    x[a] = x1 * cs.x - x2 * cs.y;
    x[b] = x2 * cs.x + x1 * cs.y;
}
