//! Launcher of `shaders/moe/router.wgsl`: logits, top-k and weights, one workgroup per
//! token.

use super::{MAX_EXPERTS, MAX_TOP_K, MoeConfig, RouterScoring};
use crate::error::Result;
use crate::runtime::context::Context;
use crate::runtime::launch::Step;
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct RouterParams {
        tokens: u32,
        hidden: u32,
        experts: u32,
        top_k: u32,
    }
}

/// The router kernel for a scoring rule.
pub fn router_spec(scoring: RouterScoring) -> KernelSpec {
    KernelSpec {
        file: "moe/router.wgsl",
        entry: "router",
        defines: Defines::new()
            .params::<RouterParams>()
            .const_u32("MAX_E", MAX_EXPERTS as u32)
            .const_u32("MAX_K", MAX_TOP_K as u32)
            .flag_if("SOFTMAX", scoring == RouterScoring::Softmax),
        bindings: BindingKind::layout("urrwww"),
    }
}

/// Every router variant (shader dump, portability tests).
pub fn all_router_variants() -> Vec<KernelSpec> {
    vec![
        router_spec(RouterScoring::Sigmoid),
        router_spec(RouterScoring::Softmax),
    ]
}

/// The router for `tokens` rows (one workgroup each); its buffers are
/// `[x, w, logits, ids, weights]`.
pub(crate) fn router_step(
    ctx: &Context,
    cfg: &MoeConfig,
    tokens: usize,
) -> Result<Step<RouterParams>> {
    let p = RouterParams {
        tokens: tokens as u32,
        hidden: cfg.hidden as u32,
        experts: cfg.experts as u32,
        top_k: cfg.top_k as u32,
    };
    Step::flat(ctx, &router_spec(cfg.scoring), &p, tokens as u64)
}
