//! Launcher of `shaders/moe/combine.wgsl`: the weighted gather-add of the experts'
//! outputs back to token order, plus the residual.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{bind, grid_2d, uniform};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, Kernel, KernelSpec, Recorder};

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
    use BindingKind::*;
    KernelSpec {
        file: "moe/combine.wgsl",
        entry: "moe_combine",
        defines: Defines::new(),
        bindings: vec![
            Uniform,
            StorageRead,
            StorageRead,
            StorageRead,
            StorageRead,
            StorageReadWrite,
        ],
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
    kernel: Arc<Kernel>,
    params: wgpu::Buffer,
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
            kernel: ctx.kernel(&combine_spec())?,
            params: uniform(g, "moe combine params", bytemuck::bytes_of(&p)),
            grid: grid_2d(groups, g.caps.max_workgroups_per_dim, "moe combine")?,
        })
    }

    pub(crate) fn record(&self, rec: &mut Recorder<'_>, io: &CombineIo<'_>) {
        let bg = bind(
            rec.gpu(),
            &self.kernel,
            "moe combine bindings",
            &[&self.params, io.y, io.weights, io.inv, io.residual, io.out],
        );
        let (gx, gy) = self.grid;
        rec.stage("combine", |pass| {
            pass.set_pipeline(&self.kernel.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
            1
        });
    }
}
