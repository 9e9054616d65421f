//! Linear projections (`shaders/linear.wgsl`) with f16 or Q4_0 weights: launcher and
//! CPU twin. Used for the attention's Q/K/V/O projections in the decoder layer.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::gpu::GpuMatrix;
use crate::quant::{GgmlType, PackedMatrix, WeightFormat};
use crate::runtime::context::Context;
use crate::runtime::launch::{Bound, Dispatch, Step, check_axis, storage_init};
use crate::runtime::preprocess::Defines;
use crate::runtime::tensor::Tensor;
use crate::runtime::{BindingKind, KernelSpec, Recorder, Report};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct LinearParams {
        tokens: u32,
        k: u32,
        n: u32,
        head_dim: u32,
        sb: u32,
        row0: u32,
        n_out: u32,
        _pad: u32,
    }
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
    /// Output + a bias `[n]` (Qwen2's Q/K/V).
    pub bias: bool,
}

/// Workgroup memory of the matrix-unit linear kernel: the x and W chunks as f16 halves
/// (W's low half only for Q4_0) and the two 32 × 64 f32 accumulators.
pub fn linear_coop_workgroup_bytes(format: WeightFormat) -> u32 {
    let w_halves = if format == WeightFormat::F16 { 1 } else { 2 };
    (2 * 32 * 16 * 2 + w_halves * 64 * 16 * 2 + 2 * 32 * 64 * 4) as u32
}

/// The matrix-unit tile for a projection on this device (`None`: the portable kernel):
/// a coop tile, the workgroup memory, and subgroups that divide its 256 threads.
pub fn linear_coop_tile(
    caps: &crate::runtime::context::Capabilities,
    format: WeightFormat,
) -> Option<usize> {
    caps.coop_tile_for(linear_coop_workgroup_bytes(format), 256)
}

/// The linear kernel for a weight format and layout (portable).
pub fn linear_spec(format: WeightFormat, layout: LinearLayout) -> KernelSpec {
    linear_spec_on(format, layout, None)
}

/// The linear kernel on matrix units of tile `coop` (8 or 16), or the portable one.
pub fn linear_spec_on(
    format: WeightFormat,
    layout: LinearLayout,
    coop: Option<usize>,
) -> KernelSpec {
    let kernel = match coop {
        Some(t) => LinearKernel::Coop(t),
        None => LinearKernel::Tiled,
    };
    let flag = match format {
        WeightFormat::F16 => "WEIGHTS_F16",
        WeightFormat::Q4_0 => "WEIGHTS_Q4_0",
    };
    linear_spec_flags(Defines::new().flag(flag), layout, kernel)
}

/// Which kernel computes a projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearKernel {
    /// One token: a matrix-vector product (`ops/gemv.wgsl`; layouts are moot).
    Gemv,
    /// Tiled on the portable path (`ops/linear.wgsl`).
    Tiled,
    /// Tiled on matrix units of tile 8 or 16 (`ops/linear_coop.wgsl`).
    Coop(usize),
}

/// The projection kernel for GGUF weights of type `ty` (see [`crate::quant::gpu`]).
pub fn ggml_linear_spec(ty: GgmlType, layout: LinearLayout, kernel: LinearKernel) -> KernelSpec {
    let flag = crate::quant::gpu::wgsl_flag(ty).unwrap_or("GGML_UNSUPPORTED");
    // F16 weights are exact in the matrix units' halves (no low half needed).
    let defines = Defines::new()
        .flag("GGML")
        .flag(flag)
        .flag_if("WEIGHTS_F16", ty == GgmlType::F16);
    linear_spec_flags(defines, layout, kernel)
}

fn linear_spec_flags(format: Defines, layout: LinearLayout, kernel: LinearKernel) -> KernelSpec {
    let mut bindings = BindingKind::layout("urrw");
    if layout.residual {
        bindings.push(BindingKind::StorageRead);
    }
    if layout.bias {
        bindings.push(BindingKind::StorageRead);
    }
    let (file, entry) = match kernel {
        LinearKernel::Coop(_) => ("ops/linear_coop.wgsl", "linear_coop"),
        LinearKernel::Tiled => ("ops/linear.wgsl", "linear"),
        LinearKernel::Gemv => ("ops/gemv.wgsl", "gemv"),
    };
    KernelSpec {
        file,
        entry,
        defines: format
            .flag_if("TILE16", kernel == LinearKernel::Coop(16))
            .params::<LinearParams>()
            .flag_if("IN_HEAD_MAJOR", layout.in_head_major)
            .flag_if("OUT_HEAD_MAJOR", layout.out_head_major)
            .flag_if("RESIDUAL", layout.residual)
            .flag_if("BIAS", layout.bias),
        bindings,
    }
}

impl LinearLayout {
    /// Errors unless `head_dim` suits the head-major sides of an `[n, k]` projection (a
    /// multiple of 4 dividing the width).
    pub fn check(&self, label: &str, n: usize, k: usize, head_dim: usize) -> Result<()> {
        let head_major = self.in_head_major || self.out_head_major;
        if head_major
            && (head_dim == 0
                || !head_dim.is_multiple_of(4)
                || (self.in_head_major && !k.is_multiple_of(head_dim))
                || (self.out_head_major && !n.is_multiple_of(head_dim)))
        {
            return Err(Error::InvalidShape(format!(
                "{label}: head-major layouts need head_dim ({head_dim}) % 4 == 0 dividing the width"
            )));
        }
        Ok(())
    }

    /// The layouts a decoder layer uses: plain, head-major out (q/k/v projections),
    /// head-major in with the residual (the output projection).
    pub fn used() -> [LinearLayout; 3] {
        [
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
        ]
    }
}

/// Every linear variant the decoder layer uses.
pub fn all_linear_variants() -> Vec<KernelSpec> {
    let layouts = LinearLayout::used();
    let mut out = vec![];
    for f in [WeightFormat::F16, WeightFormat::Q4_0] {
        for l in layouts {
            out.push(linear_spec(f, l));
        }
    }
    out
}

/// The layouts the GPU decoder uses with GGUF weights: plain, head-major out with a bias
/// or not (Q/K/V), head-major in with the residual (attention output), residual
/// (feed-forward down).
pub fn ggml_layouts() -> [LinearLayout; 5] {
    let hm = LinearLayout {
        out_head_major: true,
        ..Default::default()
    };
    [
        LinearLayout::default(),
        hm,
        LinearLayout { bias: true, ..hm },
        LinearLayout {
            in_head_major: true,
            residual: true,
            ..Default::default()
        },
        LinearLayout {
            residual: true,
            ..Default::default()
        },
    ]
}

/// Every GGUF-weight projection variant (portable tiled and GEMV, every GPU format and
/// decoder layout).
pub fn all_ggml_linear_variants() -> Vec<KernelSpec> {
    let mut out = vec![];
    for ty in crate::quant::gpu::GPU_FORMATS {
        for l in ggml_layouts() {
            out.push(ggml_linear_spec(ty, l, LinearKernel::Tiled));
        }
        for l in [
            LinearLayout::default(),
            LinearLayout {
                bias: true,
                ..Default::default()
            },
            LinearLayout {
                residual: true,
                ..Default::default()
            },
        ] {
            out.push(ggml_linear_spec(ty, l, LinearKernel::Gemv));
        }
    }
    out
}

/// Every matrix-unit GGUF-weight projection variant at tile `tile`.
pub fn all_coop_ggml_linear_variants(tile: usize) -> Vec<KernelSpec> {
    let mut out = vec![];
    for ty in crate::quant::gpu::GPU_FORMATS {
        for l in ggml_layouts() {
            out.push(ggml_linear_spec(ty, l, LinearKernel::Coop(tile)));
        }
    }
    out
}

/// Every matrix-unit linear variant at tile `tile` (SPIR-V and MSL only).
pub fn all_coop_linear_variants(tile: usize) -> Vec<KernelSpec> {
    let mut out = vec![];
    for f in [WeightFormat::F16, WeightFormat::Q4_0] {
        for l in LinearLayout::used() {
            out.push(linear_spec_on(f, l, Some(tile)));
        }
    }
    out
}

/// `Σ a·b` with 8 independent lanes (vectorizes; the order differs from a plain loop
/// only by float rounding). Always inlined, so that a caller compiled with wider vector
/// features (the CPU attention kernels' AVX2 instances) gets them here too.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y[t, n] = x[t, k] · w[n, k]ᵀ` (SGEMM, parallel over row or column blocks).
pub fn matmul_t(x: &[f32], t: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), t * k);
    assert_eq!(w.len(), n * k);
    let mut y = vec![0f32; t * n];
    let gemm = |rows: usize, xs: &[f32], wcols: &[f32], ncols: usize, out: &mut [f32]| {
        // SAFETY: the pointers cover rows×k, ncols×k and rows×ncols elements with the
        // strides given; matrixmultiply reads/writes only within them.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                ncols,
                1.0,
                xs.as_ptr(),
                k as isize,
                1,
                wcols.as_ptr(),
                1,
                k as isize,
                0.0,
                out.as_mut_ptr(),
                ncols as isize,
                1,
            );
        }
    };
    if t >= 256 {
        // Row blocks: each sgemm call packs all of W, so the blocks are as large as
        // the threads allow (at least 128 rows) rather than many small ones.
        let rb = t.div_ceil(rayon::current_num_threads()).max(128);
        y.par_chunks_mut(rb * n)
            .zip(x.par_chunks(rb * k))
            .for_each(|(out, xs)| gemm(xs.len() / k, xs, w, n, out));
    } else {
        // Few rows (decode, logits of a continuation): split the output features, so
        // that every thread packs only its own slice of W.
        let cb = 256.min(n);
        let parts: Vec<(usize, Vec<f32>)> = w
            .par_chunks(cb * k)
            .enumerate()
            .map(|(i, wc)| {
                let nc = wc.len() / k;
                let mut out = vec![0f32; t * nc];
                gemm(t, x, wc, nc, &mut out);
                (i * cb, out)
            })
            .collect();
        for (c0, part) in parts {
            let nc = part.len() / t;
            for r in 0..t {
                y[r * n + c0..r * n + c0 + nc].copy_from_slice(&part[r * nc..(r + 1) * nc]);
            }
        }
    }
    y
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

/// The grid of the tiled kernels (`linear.wgsl`: 64 tokens, `linear_coop.wgsl`: 32, by
/// 64 outputs a workgroup) for `tokens` × `n` outputs, checked against the device.
fn tiled_grid(
    g: &crate::runtime::context::GpuDevice,
    label: &str,
    tokens: usize,
    n: usize,
    coop: bool,
) -> Result<(u32, u32, u32)> {
    let max = g.caps.max_workgroups_per_dim;
    let rows = if coop { 32 } else { 64 };
    Ok((
        check_axis(tokens.div_ceil(rows) as u64, max, label)?,
        check_axis(n.div_ceil(64) as u64, max, label)?,
        1,
    ))
}

/// A built projection with its weights on the GPU.
pub struct LinearGpu {
    step: Step<LinearParams>,
    weights: wgpu::Buffer,
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
        crate::runtime::launch::require_f16_storage(
            g,
            "projection weights on this device (no unpack2x16float)",
        )?;
        w.validate()?;
        let (n, k) = (w.rows, w.cols);
        layout.check(label, n, k, head_dim)?;
        let p = LinearParams {
            tokens: tokens as u32,
            k: k as u32,
            n: n as u32,
            head_dim: head_dim as u32,
            sb: w.scale_base,
            row0: 0,
            n_out: n as u32,
            _pad: 0,
        };
        let coop = linear_coop_tile(&g.caps, w.format);
        let grid = tiled_grid(g, label, tokens, n, coop.is_some())?;
        let weights = bytemuck::cast_slice(&w.words);
        Ok(LinearGpu {
            step: Step::new(ctx, &linear_spec_on(w.format, layout, coop), &p, grid)?,
            weights: storage_init(g, &format!("{label} weights"), weights)?,
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
        let mut bufs = vec![x, &self.weights, y];
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
        rec.step(name, &self.step, &bufs);
        Ok(())
    }

    /// The projection alone on GPU tensors, in its own submission (tools and tests;
    /// a model records it with its other stages instead).
    pub fn run_blocking(
        &self,
        ctx: &Context,
        x: &Tensor,
        y: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Report> {
        let mut rec = Recorder::new(ctx, "linear", 1)?;
        let res = residual.map(Tensor::gpu_buffer).transpose()?;
        self.record(&mut rec, "linear", x.gpu_buffer()?, y.gpu_buffer()?, res)?;
        rec.submit_blocking()
    }
}

/// A projection `y = x · Wᵀ (+ residual) (+ bias)` with GGUF weights on the GPU
/// ([`GpuMatrix`]) for a fixed token count: one dispatch per part of the matrix, on the
/// matrix-vector kernel for one token, else the tiled kernel (on matrix units when the
/// device has them). Build once, make its dispatches over the run's buffers once
/// ([`MatmulGpu::dispatches`]) and record them as often as needed.
pub struct MatmulGpu {
    steps: Vec<(Step<LinearParams>, wgpu::Buffer)>,
    layout: LinearLayout,
    kernel: LinearKernel,
}

impl MatmulGpu {
    /// Compiles the kernel for `w`, `tokens` and `layout` (`head_dim` for the head-major
    /// layouts).
    pub fn build(
        ctx: &Context,
        label: &str,
        w: &GpuMatrix,
        tokens: usize,
        head_dim: usize,
        layout: LinearLayout,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let (n, k) = (w.rows, w.cols);
        if tokens == 0 {
            return Err(Error::InvalidShape(format!("{label}: no tokens")));
        }
        layout.check(label, n, k, head_dim)?;
        let coop = if tokens == 1 {
            None
        } else {
            linear_coop_tile(
                &g.caps,
                if w.ty == GgmlType::F16 {
                    WeightFormat::F16
                } else {
                    WeightFormat::Q4_0
                },
            )
        };
        let kernel = match (tokens, coop) {
            (1, _) => LinearKernel::Gemv,
            (_, Some(t)) => LinearKernel::Coop(t),
            _ => LinearKernel::Tiled,
        };
        let spec = ggml_linear_spec(w.ty, layout, kernel);
        let steps = w
            .parts
            .iter()
            .map(|part| {
                let p = LinearParams {
                    tokens: tokens as u32,
                    k: k as u32,
                    n: part.rows as u32,
                    head_dim: head_dim as u32,
                    sb: 0,
                    row0: part.row0 as u32,
                    n_out: n as u32,
                    _pad: 0,
                };
                let step = match kernel {
                    LinearKernel::Gemv => Step::flat(ctx, &spec, &p, part.rows.div_ceil(8) as u64)?,
                    _ => {
                        let grid = tiled_grid(g, label, tokens, part.rows, coop.is_some())?;
                        Step::new(ctx, &spec, &p, grid)?
                    }
                };
                Ok((step, part.buffer.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MatmulGpu {
            steps,
            layout,
            kernel,
        })
    }

    /// The kernel chosen.
    pub fn kernel(&self) -> LinearKernel {
        self.kernel
    }

    /// The dispatches over `x` (`[tokens, k]`, or head-major), `y` and, as the layout
    /// asks, the residual and the bias.
    pub fn dispatches(
        &self,
        g: &crate::runtime::context::GpuDevice,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        residual: Option<&wgpu::Buffer>,
        bias: Option<&wgpu::Buffer>,
    ) -> Result<Vec<Dispatch>> {
        self.dispatches_bound(
            g,
            Bound::Whole(x),
            Bound::Whole(y),
            residual.map(Bound::Whole),
            bias,
        )
    }

    /// [`MatmulGpu::dispatches`] over bindings that may be byte ranges of larger buffers
    /// (token rows `r0..r0 + tokens` of `[T, k]` activations: a long chunk's FFN in
    /// parts under the binding limit). Offsets must meet the device's storage offset
    /// alignment.
    pub fn dispatches_bound(
        &self,
        g: &crate::runtime::context::GpuDevice,
        x: Bound<'_>,
        y: Bound<'_>,
        residual: Option<Bound<'_>>,
        bias: Option<&wgpu::Buffer>,
    ) -> Result<Vec<Dispatch>> {
        if residual.is_some() != self.layout.residual || bias.is_some() != self.layout.bias {
            return Err(Error::InvalidArgument(format!(
                "projection built with residual {} and bias {}, given {} and {}",
                self.layout.residual,
                self.layout.bias,
                residual.is_some(),
                bias.is_some()
            )));
        }
        Ok(self
            .steps
            .iter()
            .map(|(step, w)| {
                let mut bound = vec![x, Bound::Whole(w), y];
                bound.extend(residual);
                bound.extend(bias.map(Bound::Whole));
                step.launch.dispatch_bound(g, &bound, step.grid)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::test_util::{close, rnd};
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn matmul_matches_naive() {
        let mut rng = StdRng::seed_from_u64(1);
        for (t, k, n) in [(1, 17, 300), (5, 64, 9), (70, 33, 513)] {
            let x = rnd(&mut rng, t * k, 1.0);
            let w = rnd(&mut rng, n * k, 1.0);
            let y = matmul_t(&x, t, k, &w, n);
            let mut r = vec![0f32; t * n];
            for i in 0..t {
                for j in 0..n {
                    r[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                }
            }
            close(&y, &r, 1e-4);
        }
    }
}
