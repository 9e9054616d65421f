//! Launcher of `shaders/moe/combine.wgsl`: the weighted gather-add of the experts'
//! outputs back to token order, plus the residual.

use crate::error::Result;
use crate::runtime::context::Context;
use crate::runtime::launch::Step;
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct CombineParams {
        tokens: u32,
        hidden: u32,
        top_k: u32,
        _pad: u32,
    }
}

/// The combine kernel.
pub fn combine_spec() -> KernelSpec {
    KernelSpec {
        file: "moe/combine.wgsl",
        entry: "moe_combine",
        defines: Defines::new().params::<CombineParams>(),
        bindings: BindingKind::layout("urrrrw"),
    }
}

/// The combine for `tokens` rows; its buffers are `[y, weights, inv, residual, out]`.
pub(crate) fn combine_step(
    ctx: &Context,
    tokens: usize,
    hidden: usize,
    top_k: usize,
) -> Result<Step<CombineParams>> {
    let p = CombineParams {
        tokens: tokens as u32,
        hidden: hidden as u32,
        top_k: top_k as u32,
        _pad: 0,
    };
    let groups = (tokens as u64 * hidden as u64 / 4).div_ceil(256);
    Step::flat(ctx, &combine_spec(), &p, groups)
}
