//! Linear projections (`shaders/linear.wgsl`) with f16 or Q4_0 weights: launcher and
//! CPU twin. Used for the attention's Q/K/V/O projections in the decoder layer.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use rayon::prelude::*;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::launch::{bind, check_axis, storage_init, uniform};
use crate::moe::cpu::dot;
use crate::moe::{PackedMatrix, WeightFormat};
use crate::pipeline::{BindingKind, Kernel, KernelSpec, Recorder};
use crate::preprocess::Defines;

/// Uniform parameters; mirrors `struct Params` in the WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LinearParams {
    tokens: u32,
    k: u32,
    n: u32,
    head_dim: u32,
    sb: u32,
    _pad: [u32; 3],
}

/// Activation layouts of a projection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LinearLayout {
    /// Input is `[k / head_dim, tokens, head_dim]` (attention output).
    pub in_head_major: bool,
    /// Output is `[n / head_dim, tokens, head_dim]` (Q/K/V).
    pub out_head_major: bool,
    /// Output = residual `[tokens, n]` + projection.
    pub residual: bool,
}

/// The linear kernel for a weight format and layout.
pub fn linear_spec(format: WeightFormat, layout: LinearLayout) -> KernelSpec {
    use BindingKind::*;
    let mut bindings = vec![Uniform, StorageRead, StorageRead, StorageReadWrite];
    if layout.residual {
        bindings.push(StorageRead);
    }
    KernelSpec {
        file: "linear.wgsl",
        entry: "linear",
        defines: Defines::new()
            .flag(match format {
                WeightFormat::F16 => "WEIGHTS_F16",
                WeightFormat::Q4_0 => "WEIGHTS_Q4_0",
            })
            .flag_if("IN_HEAD_MAJOR", layout.in_head_major)
            .flag_if("OUT_HEAD_MAJOR", layout.out_head_major)
            .flag_if("RESIDUAL", layout.residual),
        bindings,
    }
}

/// Every linear variant the decoder layer uses.
pub fn all_linear_variants() -> Vec<KernelSpec> {
    let layouts = [
        LinearLayout::default(),
        LinearLayout {
            out_head_major: true,
            ..Default::default()
        },
        LinearLayout {
            in_head_major: true,
            residual: true,
            ..Default::default()
        },
    ];
    let mut out = vec![];
    for f in [WeightFormat::F16, WeightFormat::Q4_0] {
        for l in layouts {
            out.push(linear_spec(f, l));
        }
    }
    out
}

/// CPU twin on token-major activations: `y [tokens, n] = x [tokens, k] · Wᵀ` with the
/// decoded weights of `w` (`[n, k]`).
pub fn linear_cpu(x: &[f32], w: &PackedMatrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let wd = w.dequantize();
    let tokens = x.len() / k;
    let mut y = vec![0.0; tokens * n];
    y.par_chunks_mut(n).enumerate().for_each(|(t, yr)| {
        let xr = &x[t * k..(t + 1) * k];
        for (j, v) in yr.iter_mut().enumerate() {
            *v = dot(xr, &wd[j * k..(j + 1) * k]);
        }
    });
    y
}

/// `[tokens, heads * d]` → `[heads, tokens, d]`.
pub fn to_head_major(x: &[f32], tokens: usize, d: usize) -> Vec<f32> {
    let heads = x.len() / (tokens * d);
    let mut out = vec![0.0; x.len()];
    for h in 0..heads {
        for t in 0..tokens {
            out[(h * tokens + t) * d..(h * tokens + t + 1) * d]
                .copy_from_slice(&x[t * heads * d + h * d..t * heads * d + (h + 1) * d]);
        }
    }
    out
}

/// `[heads, tokens, d]` → `[tokens, heads * d]`.
pub fn from_head_major(x: &[f32], tokens: usize, d: usize) -> Vec<f32> {
    let heads = x.len() / (tokens * d);
    let mut out = vec![0.0; x.len()];
    for h in 0..heads {
        for t in 0..tokens {
            out[t * heads * d + h * d..t * heads * d + (h + 1) * d]
                .copy_from_slice(&x[(h * tokens + t) * d..(h * tokens + t + 1) * d]);
        }
    }
    out
}

/// A built projection with its weights on the GPU.
pub struct LinearGpu {
    kernel: Arc<Kernel>,
    params: wgpu::Buffer,
    weights: wgpu::Buffer,
    grid: (u32, u32),
    layout: LinearLayout,
}

impl LinearGpu {
    /// Uploads `w` (`[n, k]`) and compiles the variant for `layout`.
    pub fn build(
        ctx: &Context,
        label: &str,
        w: &PackedMatrix,
        tokens: usize,
        head_dim: usize,
        layout: LinearLayout,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        crate::launch::require_f16_storage(
            g,
            "projection weights on this device (no unpack2x16float)",
        )?;
        w.validate()?;
        let (n, k) = (w.rows, w.cols);
        let head_major = layout.in_head_major || layout.out_head_major;
        if head_major
            && (head_dim == 0
                || !head_dim.is_multiple_of(4)
                || (layout.in_head_major && !k.is_multiple_of(head_dim))
                || (layout.out_head_major && !n.is_multiple_of(head_dim)))
        {
            return Err(Error::InvalidShape(format!(
                "{label}: head-major layouts need head_dim ({head_dim}) % 4 == 0 dividing the width"
            )));
        }
        let p = LinearParams {
            tokens: tokens as u32,
            k: k as u32,
            n: n as u32,
            head_dim: head_dim as u32,
            sb: w.scale_base,
            _pad: [0; 3],
        };
        let max = g.caps.max_workgroups_per_dim;
        Ok(LinearGpu {
            kernel: ctx.kernel(&linear_spec(w.format, layout))?,
            params: uniform(g, &format!("{label} params"), bytemuck::bytes_of(&p)),
            weights: storage_init(
                g,
                &format!("{label} weights"),
                bytemuck::cast_slice(&w.words),
            )?,
            grid: (
                check_axis(tokens.div_ceil(64) as u64, max, label)?,
                check_axis(n.div_ceil(64) as u64, max, label)?,
            ),
            layout,
        })
    }

    /// Records `y = x · Wᵀ (+ residual)` as stage `name`.
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        name: &str,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        residual: Option<&wgpu::Buffer>,
    ) -> Result<()> {
        let mut bufs = vec![&self.params, x, &self.weights, y];
        match (self.layout.residual, residual) {
            (true, Some(r)) => bufs.push(r),
            (false, None) => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{name}: residual given {} but the kernel was built {}",
                    residual.is_some(),
                    self.layout.residual
                )));
            }
        }
        let bg = bind(rec.gpu(), &self.kernel, "linear bindings", &bufs);
        let (gx, gy) = self.grid;
        rec.stage(name, |pass| {
            pass.set_pipeline(&self.kernel.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
            1
        });
        Ok(())
    }
}
