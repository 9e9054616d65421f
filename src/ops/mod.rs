//! Dense layer ops shared by the models (the SmallThinker layer, the GGUF decoder) and the
//! MoE layer: RMSNorm, RoPE (rotate-half and adjacent pairs), linear projections (packed
//! f16 or Q4_0 weights, or GGUF weights in their file blocks: tiled GEMM and one-token
//! GEMV; f32 SGEMM on the CPU), embedding lookup and gated activations. Each has a WGSL
//! kernel under `shaders/ops/`, a launcher and a CPU twin.

pub mod act;
pub mod embed;
pub mod linear;
pub mod rmsnorm;
pub mod rope;

use crate::runtime::KernelSpec;

/// Every kernel variant of the ops (RMSNorm, RoPE, linear), for the shader dump and the
/// portability tests.
pub fn all_ops_variants() -> Vec<KernelSpec> {
    let mut v = rmsnorm::all_rmsnorm_variants();
    v.push(rope::rope_spec());
    v.push(rope::rope_spec_for(rope::RopeStyle::Adjacent));
    v.extend(linear::all_linear_variants());
    v.extend(linear::all_ggml_linear_variants());
    v.extend(embed::all_embed_variants());
    v.extend(act::all_act_variants());
    v
}
