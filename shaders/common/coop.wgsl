// The cooperative-matrix types of the matrix-unit kernels: square f16 operand tiles and
// f32 accumulators, T × T with T = 16 (TILE16: NVIDIA, AMD, Intel) or 8 (Apple, lavapipe).
// Cooperative matrices are subgroup-scoped and have no per-element access: the kernels
// load and store them through workgroup memory, in subgroup-uniform control flow.

enable f16;
enable wgpu_cooperative_matrix;

#ifdef TILE16
alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;
const T: u32 = 16u;
#else
alias MatA = coop_mat8x8<f16, A>;
alias MatB = coop_mat8x8<f16, B>;
alias MatC = coop_mat8x8<f32, C>;
const T: u32 = 8u;
#endif

#include "common/invocation.wgsl"

// The builtins of a matrix-unit kernel: those of `InvocationN`, the subgroup index
// and count (`me.sid`, `me.nsg`), the lane in the subgroup and its width (`me.lane`,
// `me.sgs`).
struct InvocationSub {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(num_workgroups) count: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sid: u32,
    @builtin(num_subgroups) nsg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sgs: u32,
}

// The element offsets (row, column) of output tile t of a grid with `cols` T x T tiles
// per row; the kernels spread the tiles over the subgroups (t = sid, sid + nsg, ...).
fn tile_at(t: u32, cols: u32) -> vec2<u32> {
    return vec2<u32>(t / cols, t % cols) * T;
}

// Split f32 operands (the projections and the MoE GEMMs): v = hi + lo / LO with hi and
// lo both f16. The low half is stored times 2^11 so that it stays a normal f16 number
// (devices may flush f16 subnormals); products with it accumulate in a second f32 tile
// that is added back divided by LO. Only lo·lo is left out (≈ 2^-22 relative).
const LO: f32 = 2048.0;

// The high half of v as an f32 that f16 holds exactly: v with its low 13 significand
// bits cleared. (Not `f32(f16(v))`: a compiler may fold that round trip to v.)
fn high_half(v: vec4<f32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(bitcast<vec4<u32>>(v) & vec4<u32>(0xFFFFE000u));
}

struct Split4 {
    hi: vec4<f16>,
    lo: vec4<f16>,
}

fn split4(v: vec4<f32>) -> Split4 {
    let h = high_half(v);
    return Split4(vec4<f16>(h), vec4<f16>((v - h) * LO));
}
