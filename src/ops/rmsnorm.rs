//! RMSNorm (`shaders/rmsnorm.wgsl`): launcher and CPU twin.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::Step;
use crate::runtime::preprocess::Defines;
use crate::runtime::tensor::Tensor;
use crate::runtime::{BindingKind, KernelSpec, Recorder, Report};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct RmsNormParams {
        tokens: u32,
        hidden: u32,
        eps: f32,
        row0: u32,
    }
}

/// Where an RMSNorm writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RmsNormMode {
    /// `out = norm(x) · g`.
    #[default]
    Out,
    /// `x = norm(x) · g` (QK-norm of head rows).
    InPlace,
    /// `out += norm(x) · g` (a post-norm added into the residual stream).
    Add,
}

/// The RMSNorm kernel.
pub fn rmsnorm_spec() -> KernelSpec {
    rmsnorm_spec_for(RmsNormMode::Out)
}

/// The RMSNorm kernel of a mode.
pub fn rmsnorm_spec_for(mode: RmsNormMode) -> KernelSpec {
    KernelSpec {
        file: "ops/rmsnorm.wgsl",
        entry: "rmsnorm",
        defines: Defines::new()
            .params::<RmsNormParams>()
            .flag_if("INPLACE", mode == RmsNormMode::InPlace)
            .flag_if("ADD", mode == RmsNormMode::Add),
        bindings: BindingKind::layout(if mode == RmsNormMode::InPlace {
            "uwr"
        } else {
            "urrw"
        }),
    }
}

/// Every RMSNorm variant.
pub fn all_rmsnorm_variants() -> Vec<KernelSpec> {
    [RmsNormMode::Out, RmsNormMode::InPlace, RmsNormMode::Add]
        .map(rmsnorm_spec_for)
        .to_vec()
}

/// CPU twin: `x [tokens, hidden]` normalized by its RMS and scaled by `g`.
pub fn rmsnorm_cpu(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    rmsnorm_in_place(&mut out, g, eps);
    out
}

/// RMSNorm of every `g.len()`-wide row of `x`, in place (sum of squares in f64).
pub fn rmsnorm_in_place(x: &mut [f32], g: &[f32], eps: f32) {
    let h = g.len();
    x.par_chunks_mut(h).for_each(|row| {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let r = 1.0 / ((ss / h as f64) as f32 + eps).sqrt();
        for (v, &gv) in row.iter_mut().zip(g) {
            *v = *v * r * gv;
        }
    });
}

/// A built RMSNorm for a token count and width.
pub struct RmsNormGpu {
    step: Step<RmsNormParams>,
}

impl RmsNormGpu {
    /// Compiles and writes the parameters.
    pub fn build(ctx: &Context, tokens: usize, hidden: usize, eps: f32) -> Result<Self> {
        Self::build_for(ctx, tokens, hidden, eps, 0, RmsNormMode::Out)
    }

    /// [`RmsNormGpu::build`] reading rows `row0 .. row0 + tokens` of its input, in `mode`.
    pub fn build_for(
        ctx: &Context,
        tokens: usize,
        hidden: usize,
        eps: f32,
        row0: usize,
        mode: RmsNormMode,
    ) -> Result<Self> {
        if hidden == 0 || !hidden.is_multiple_of(4) {
            return Err(Error::InvalidShape(format!(
                "RMSNorm width {hidden} must be a positive multiple of 4"
            )));
        }
        let p = RmsNormParams {
            tokens: tokens as u32,
            hidden: hidden as u32,
            eps,
            row0: row0 as u32,
        };
        Ok(RmsNormGpu {
            step: Step::flat(ctx, &rmsnorm_spec_for(mode), &p, tokens as u64)?,
        })
    }

    /// The dispatch over `buffers` (x, g, out; x, g in place).
    pub fn dispatch(
        &self,
        g: &crate::runtime::context::GpuDevice,
        buffers: &[&wgpu::Buffer],
    ) -> crate::runtime::launch::Dispatch {
        self.step.dispatch(g, buffers)
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
        rec.step(name, &self.step, &[x, g, out]);
    }

    /// The norm alone on GPU tensors, in its own submission (tools and tests).
    pub fn run_blocking(
        &self,
        ctx: &Context,
        x: &Tensor,
        g: &Tensor,
        out: &Tensor,
    ) -> Result<Report> {
        let mut rec = Recorder::new(ctx, "rmsnorm", 1)?;
        self.record(
            &mut rec,
            "rmsnorm",
            x.gpu_buffer()?,
            g.gpu_buffer()?,
            out.gpu_buffer()?,
        );
        rec.submit_blocking()
    }
}
