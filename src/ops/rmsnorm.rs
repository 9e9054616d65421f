//! RMSNorm (`shaders/rmsnorm.wgsl`): launcher and CPU twin.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use rayon::prelude::*;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::launch::{bind, grid_2d, uniform};
use crate::pipeline::{BindingKind, Kernel, KernelSpec, Recorder};
use crate::preprocess::Defines;

/// Uniform parameters; mirrors `struct Params` in the WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RmsNormParams {
    tokens: u32,
    hidden: u32,
    eps: f32,
    _pad: u32,
}

/// The RMSNorm kernel.
pub fn rmsnorm_spec() -> KernelSpec {
    use BindingKind::*;
    KernelSpec {
        file: "rmsnorm.wgsl",
        entry: "rmsnorm",
        defines: Defines::new(),
        bindings: vec![Uniform, StorageRead, StorageRead, StorageReadWrite],
    }
}

/// CPU twin: `x [tokens, hidden]` normalized by its RMS and scaled by `g`.
pub fn rmsnorm_cpu(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let h = g.len();
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(o, xr)| {
            let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let r = 1.0 / ((ss / h as f64) as f32 + eps).sqrt();
            for ((ov, &xv), &gv) in o.iter_mut().zip(xr).zip(g) {
                *ov = xv * r * gv;
            }
        });
    out
}

/// A built RMSNorm for a token count and width.
pub struct RmsNormGpu {
    kernel: Arc<Kernel>,
    params: wgpu::Buffer,
    grid: (u32, u32),
}

impl RmsNormGpu {
    /// Compiles and writes the parameters.
    pub fn build(ctx: &Context, tokens: usize, hidden: usize, eps: f32) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        if hidden == 0 || !hidden.is_multiple_of(4) {
            return Err(Error::InvalidShape(format!(
                "RMSNorm width {hidden} must be a positive multiple of 4"
            )));
        }
        let p = RmsNormParams {
            tokens: tokens as u32,
            hidden: hidden as u32,
            eps,
            _pad: 0,
        };
        Ok(RmsNormGpu {
            kernel: ctx.kernel(&rmsnorm_spec())?,
            params: uniform(g, "rmsnorm params", bytemuck::bytes_of(&p)),
            grid: grid_2d(tokens as u64, g.caps.max_workgroups_per_dim, "rmsnorm")?,
        })
    }

    /// Records `out = rmsnorm(x) * g` as stage `name`.
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        name: &str,
        x: &wgpu::Buffer,
        g: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let bg = bind(
            rec.gpu(),
            &self.kernel,
            "rmsnorm bindings",
            &[&self.params, x, g, out],
        );
        let (gx, gy) = self.grid;
        rec.stage(name, |pass| {
            pass.set_pipeline(&self.kernel.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
            1
        });
    }
}
