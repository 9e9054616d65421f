//! Launcher of `shaders/moe/combine.wgsl`: the weighted gather-add of the experts'
//! outputs back to token order, plus the residual.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{Launch, grid_2d};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Uniform parameters; mirrors `struct Params` in the WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct CombineParams {
    tokens: u32,
    hidden: u32,
    top_k: u32,
    _pad: u32,
}

/// The combine kernel.
pub fn combine_spec() -> KernelSpec {
    KernelSpec {
        file: "moe/combine.wgsl",
        entry: "moe_combine",
        defines: Defines::new(),
        bindings: BindingKind::layout("urrrrw"),
    }
}

/// The combine's buffers for one recording.
pub(crate) struct CombineIo<'a> {
    pub y: &'a wgpu::Buffer,
    pub weights: &'a wgpu::Buffer,
    pub inv: &'a wgpu::Buffer,
    pub residual: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
}

/// A built combine.
pub(crate) struct CombineGpu {
    launch: Launch<CombineParams>,
    grid: (u32, u32),
}

impl CombineGpu {
    pub(crate) fn build(ctx: &Context, tokens: usize, hidden: usize, top_k: usize) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let p = CombineParams {
            tokens: tokens as u32,
            hidden: hidden as u32,
            top_k: top_k as u32,
            _pad: 0,
        };
        let groups = (tokens as u64 * hidden as u64 / 4).div_ceil(256);
        Ok(CombineGpu {
            launch: Launch::new(ctx, &combine_spec(), &p)?,
            grid: grid_2d(groups, g.caps.max_workgroups_per_dim, "moe combine")?,
        })
    }

    pub(crate) fn record(&self, rec: &mut Recorder<'_>, io: &CombineIo<'_>) {
        let bufs = [io.y, io.weights, io.inv, io.residual, io.out];
        let (gx, gy) = self.grid;
        let d = self.launch.dispatch(rec.gpu(), &bufs, (gx, gy, 1));
        rec.dispatch_stage("combine", &[d]);
    }
}
