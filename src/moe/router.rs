//! Launcher of `shaders/moe/router.wgsl`: logits, top-k and weights, one workgroup per
//! token.

use bytemuck::{Pod, Zeroable};

use super::{MAX_EXPERTS, MAX_TOP_K, MoeConfig, RouterScoring};
use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{Launch, grid_2d};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Uniform parameters; mirrors `struct Params` in the WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RouterParams {
    tokens: u32,
    hidden: u32,
    experts: u32,
    top_k: u32,
}

/// The router kernel for a scoring rule.
pub fn router_spec(scoring: RouterScoring) -> KernelSpec {
    KernelSpec {
        file: "moe/router.wgsl",
        entry: "router",
        defines: Defines::new()
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

/// The router's buffers for one recording.
pub(crate) struct RouterIo<'a> {
    pub x: &'a wgpu::Buffer,
    pub w: &'a wgpu::Buffer,
    pub logits: &'a wgpu::Buffer,
    pub ids: &'a wgpu::Buffer,
    pub weights: &'a wgpu::Buffer,
}

/// A built router for a token count.
pub(crate) struct RouterGpu {
    launch: Launch<RouterParams>,
    grid: (u32, u32),
}

impl RouterGpu {
    pub(crate) fn build(ctx: &Context, cfg: &MoeConfig, tokens: usize) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let p = RouterParams {
            tokens: tokens as u32,
            hidden: cfg.hidden as u32,
            experts: cfg.experts as u32,
            top_k: cfg.top_k as u32,
        };
        Ok(RouterGpu {
            launch: Launch::new(ctx, &router_spec(cfg.scoring), &p)?,
            grid: grid_2d(tokens as u64, g.caps.max_workgroups_per_dim, "moe router")?,
        })
    }

    pub(crate) fn record(&self, rec: &mut Recorder<'_>, io: &RouterIo<'_>) {
        let bufs = [io.x, io.w, io.logits, io.ids, io.weights];
        let (gx, gy) = self.grid;
        let d = self.launch.dispatch(rec.gpu(), &bufs, (gx, gy, 1));
        rec.dispatch_stage("router", &[d]);
    }
}
