//! # wgsparse
//!
//! Sparse long-context prefill attention and MoE kernels written in WGSL, run through
//! wgpu on Vulkan, Metal, DX12, GL and browser WebGPU, with a multithreaded CPU fallback
//! that is also every kernel's test oracle.
//!
//! Layers, imports only downward (see `ARCHITECTURE.md`): [`runtime`] (the [`Context`]:
//! device and capabilities, [`Tensor`], the kernel cache, the typed launcher, the
//! recorder) → [`quant`] and [`ops`] → [`attention`], [`moe`] and [`model`] → the
//! `wgsparse` command line (feature `cli`, on by default; `default-features = false`
//! builds the library alone).
//!
//! A plan is built once for a shape and a [`Method`] and run many times; on a context
//! without a GPU the same plan runs the CPU twin of every kernel:
//!
//! ```
//! use wgsparse::{AttentionShape, Context, DType, Method};
//! use wgsparse::attention::upload_qkv;
//!
//! # fn main() -> wgsparse::Result<()> {
//! let ctx = Context::cpu(); // or Context::new_blocking(ContextOptions::default())?
//! // 4 query heads over 2 key/value heads, 256 tokens, head dimension 64.
//! let shape = AttentionShape::new(4, 2, 256, 64);
//! let method: Method = "window:window=64,sinks=4".parse()?;
//! let plan = ctx.attention(shape).method(method).dtype(DType::F32).build()?;
//!
//! let n = shape.q_heads * shape.seq_len * shape.head_dim;
//! let q: Vec<f32> = (0..n).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
//! let kv = &q[..n / 2];
//! let (q, k, v) = upload_qkv(&ctx, &shape, &q, kv, kv, DType::F32)?;
//! let out = plan.run(&q, &k, &v)?;
//! assert_eq!(out.shape(), shape.q_dims());
//! let report = plan.report().expect("ran");
//! assert!(report.density < 0.5); // a 64-key window over 256 tokens
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod attention;
pub mod budget;
pub mod error;
mod json_file;
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
    v.extend(attention::select::proxy::all_proxy_variants());
    v.extend(attention::decode::all_decode_variants());
    v.extend(moe::all_moe_variants());
    v.extend(ops::all_ops_variants());
    v
}

/// Every matrix-unit (cooperative-matrix) variant at tile `tile` (8 or 16): SPIR-V and
/// MSL only, so kept apart from [`all_kernel_variants`].
pub fn all_coop_variants(tile: usize) -> Vec<runtime::KernelSpec> {
    let mut v = attention::flash::all_coop_flash_variants(tile);
    v.extend(attention::select::sale::all_coop_sale_variants(tile));
    v.extend(attention::select::anchor::all_coop_anchor_variants(tile));
    v.extend(ops::linear::all_coop_linear_variants(tile));
    v.extend(ops::linear::all_coop_ggml_linear_variants(tile));
    v.extend(moe::expert_ffn::all_coop_expert_ffn_variants(tile));
    v
}
