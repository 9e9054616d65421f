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

/// The router kernel for a scoring rule (logits from f32 router weights, then the top
/// k).
pub fn router_spec(scoring: RouterScoring) -> KernelSpec {
    router_spec_with(scoring, false)
}

/// The router kernel; `logits_in`: the logits `[tokens, experts]` are an input (made by
/// a projection of GGUF router weights) and only the top k and their weights are made.
/// Its buffers are then `[logits, ids, weights]`.
pub fn router_spec_with(scoring: RouterScoring, logits_in: bool) -> KernelSpec {
    KernelSpec {
        file: "moe/router.wgsl",
        entry: "router",
        defines: Defines::new()
            .params::<RouterParams>()
            .const_u32("MAX_E", MAX_EXPERTS as u32)
            .const_u32("MAX_K", MAX_TOP_K as u32)
            .flag_if("SOFTMAX", scoring == RouterScoring::Softmax)
            .flag_if("LOGITS_IN", logits_in),
        bindings: BindingKind::layout(if logits_in { "urww" } else { "urrwww" }),
    }
}

/// Every router variant (shader dump, portability tests).
pub fn all_router_variants() -> Vec<KernelSpec> {
    [RouterScoring::Sigmoid, RouterScoring::Softmax]
        .into_iter()
        .flat_map(|s| [router_spec_with(s, false), router_spec_with(s, true)])
        .collect()
}

/// The top-k step over precomputed logits for `tokens` rows: buffers `[logits, ids,
/// weights]` (twin: [`super::cpu::top_k`]).
pub fn top_k_step(
    ctx: &Context,
    experts: usize,
    top_k: usize,
    scoring: RouterScoring,
    tokens: usize,
) -> Result<Step<RouterParams>> {
    if experts == 0 || experts > MAX_EXPERTS || top_k == 0 || top_k > MAX_TOP_K.min(experts) {
        return Err(crate::error::Error::InvalidArgument(format!(
            "router top-{top_k} of {experts} experts (at most {MAX_EXPERTS} experts and \
             {MAX_TOP_K} chosen)"
        )));
    }
    let p = RouterParams {
        tokens: tokens as u32,
        hidden: 0,
        experts: experts as u32,
        top_k: top_k as u32,
    };
    Step::flat(ctx, &router_spec_with(scoring, true), &p, tokens as u64)
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
