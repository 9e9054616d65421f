//! Dense layer ops of the decoder layer: RMSNorm, RoPE and linear projections (f16 or
//! Q4_0 weights). Each has a WGSL kernel, a launcher and a CPU twin.

pub mod linear;
pub mod rmsnorm;
pub mod rope;
