//! Dense layer ops shared by the models (the SmallThinker layer, the GGUF decoder) and the
//! MoE layer: RMSNorm, RoPE (rotate-half and adjacent pairs) and linear projections (f16
//! or Q4_0 weights; f32 SGEMM on the CPU). Each has a WGSL kernel under `shaders/ops/`, a
//! launcher and a CPU twin.

pub mod linear;
pub mod rmsnorm;
pub mod rope;

use crate::runtime::KernelSpec;

/// Every kernel variant of the ops (RMSNorm, RoPE, linear), for the shader dump and the
/// portability tests.
pub fn all_ops_variants() -> Vec<KernelSpec> {
    let mut v = vec![rmsnorm::rmsnorm_spec(), rope::rope_spec()];
    v.extend(linear::all_linear_variants());
    v
}
