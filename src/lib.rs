//! # wgsparse
//!
//! Sparse long-context prefill attention and MoE kernels written in WGSL, run through
//! wgpu on Vulkan, Metal, DX12, GL and browser WebGPU, with a multithreaded CPU fallback
//! that is also every kernel's test oracle.
//!
//! Layers (each calls only the one below): [`Context`] (device + capabilities) →
//! [`Tensor`] → kernels (`shaders/*.wgsl`, one launcher and one CPU twin each) → plans
//! ([`AttentionPlan`]) built once and run many times → tools (the `wgsparse` CLI, the
//! benchmarks).

#![warn(missing_docs)]

pub mod attention;
pub mod error;
pub mod model;
pub mod moe;
pub mod ops;
pub mod quant;
pub mod runtime;

pub use attention::{
    AttentionOptions, AttentionPlan, AttentionPlanBuilder, AttentionReport, AttentionShape, Method,
    MethodStats, RowState, WindowConfig,
};
pub use error::{Error, Result};
pub use runtime::context::{
    AdapterSummary, Backend, Capabilities, Context, ContextOptions, LimitOverrides,
};
pub use runtime::tensor::{DType, HostData, Tensor};
pub use runtime::{Recorder, Report, StageTime};

/// Every kernel variant the crate can compile, for the shader dump (`wgsparse shader`)
/// and the portability tests (naga to SPIR-V, MSL, HLSL, GLSL).
pub fn all_kernel_variants() -> Vec<runtime::KernelSpec> {
    let mut v = attention::flash::all_flash_variants();
    v.extend(attention::select::anchor::all_anchor_variants());
    v.extend(attention::select::sale::all_sale_variants());
    v.extend(moe::all_moe_variants());
    v.extend(ops::all_ops_variants());
    v
}
