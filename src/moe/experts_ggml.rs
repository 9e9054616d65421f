//! Routed ReGLU experts with GGUF weights on the GPU (`shaders/moe/experts_ggml.wgsl`):
//! SmallThinker's experts in the GPU decoder. Each 3-D expert tensor of the file is one
//! [`GpuMatrix`] of `[experts · rows, cols]` (uploaded with
//! [`GpuMatrix::upload_grouped`], so a part holds whole experts), read in place in its
//! blocks. Per layer: gate products of every (token, chosen expert), up products only
//! for the neurons whose gate is positive (ReLU zeroes the others: neuron skipping),
//! then the down products weighted by the router and added to the residual stream. The
//! CPU twin is [`experts_ggml_cpu`].
//!
//! One token runs matrix-vector kernels per assignment. A prompt runs the grouped
//! passes: the router's assignments sorted into expert-contiguous order on the GPU
//! ([`super::dispatch`]), then one workgroup per tile of [`GROUPED_TILE`] assignments of
//! one expert and 8 output rows, which decodes each weight once for the whole tile (an
//! expert's weights are read once per tile instead of once per routed token), and the
//! down products gathered back to token order, weighted, onto the residual
//! ([`super::combine`]).

use crate::error::{Error, Result};
use crate::quant::GgmlType;
use crate::quant::gpu::{GPU_FORMATS, GpuMatrix, wgsl_flag};
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{Dispatch, Step, storage};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec};

use super::MAX_TOP_K;
use super::combine::{CombineParams, combine_step};
use super::dispatch::{DISPATCH_BLOCK, DispatchGpu, meta_words};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct ExpertsParams {
        tokens: u32,
        top_k: u32,
        n: u32,
        k: u32,
        e0: u32,
        experts: u32,
        row_blocks: u32,
        layer_experts: u32,
    }
}

/// Output rows per workgroup (the shader's `ROWS`).
const ROWS: usize = 8;

/// Assignments per tile of the grouped passes (the shader's `TILE`).
pub const GROUPED_TILE: usize = 8;

/// The passes of one layer's experts, in their order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertsPass {
    /// Gate products `g [assignments, ffn]`.
    Gate,
    /// Up products of the neurons with a positive gate, times the ReLU'd gate, in place.
    Up,
    /// Down products, weighted and added to the residual: the first part of the matrix.
    Down,
    /// Down products of a later part, added to the output.
    DownAccum,
}

/// The kernel of a pass over weights of type `ty`.
pub fn experts_ggml_spec(ty: GgmlType, pass: ExpertsPass) -> KernelSpec {
    let flag = wgsl_flag(ty).unwrap_or("GGML_UNSUPPORTED");
    let down = matches!(pass, ExpertsPass::Down | ExpertsPass::DownAccum);
    let (entry, layout) = match pass {
        ExpertsPass::Gate | ExpertsPass::Up => ("experts_gate_up", "urrrw"),
        ExpertsPass::Down => ("experts_down", "urrrrwr"),
        ExpertsPass::DownAccum => ("experts_down", "urrrrw"),
    };
    KernelSpec {
        file: "moe/experts_ggml.wgsl",
        entry,
        defines: Defines::new()
            .params::<ExpertsParams>()
            .flag("GGML")
            .flag(flag)
            .flag_if("UP", pass == ExpertsPass::Up)
            .flag_if("DOWN", down)
            .flag_if("ACCUM", pass == ExpertsPass::DownAccum),
        bindings: BindingKind::layout(layout),
    }
}

/// The grouped kernel of a prompt's pass over weights of type `ty` (`Gate`, `Up` or
/// `Down`: every part of the down matrix writes its own assignments' rows).
pub fn experts_grouped_spec(ty: GgmlType, pass: ExpertsPass) -> KernelSpec {
    let flag = wgsl_flag(ty).unwrap_or("GGML_UNSUPPORTED");
    KernelSpec {
        file: "moe/experts_ggml.wgsl",
        entry: "experts_grouped",
        defines: Defines::new()
            .params::<ExpertsParams>()
            .flag("GGML")
            .flag("GROUPED")
            .flag(flag)
            .flag_if("UP", pass == ExpertsPass::Up)
            .flag_if(
                "DOWN",
                matches!(pass, ExpertsPass::Down | ExpertsPass::DownAccum),
            ),
        bindings: BindingKind::layout("urrrrw"),
    }
}

/// Every variant (each GPU weight format × pass, one-token and grouped), for the
/// shader dump and the portability tests.
pub fn all_experts_ggml_variants() -> Vec<KernelSpec> {
    GPU_FORMATS
        .iter()
        .flat_map(|&ty| {
            [
                ExpertsPass::Gate,
                ExpertsPass::Up,
                ExpertsPass::Down,
                ExpertsPass::DownAccum,
            ]
            .map(move |p| experts_ggml_spec(ty, p))
            .into_iter()
            .chain(
                [ExpertsPass::Gate, ExpertsPass::Up, ExpertsPass::Down]
                    .map(move |p| experts_grouped_spec(ty, p)),
            )
        })
        .collect()
}

/// Sizes of a routed-experts block for a fixed token count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertsShape {
    /// Tokens.
    pub tokens: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Experts of the layer.
    pub experts: usize,
    /// Model width.
    pub hidden: usize,
    /// Neurons per expert.
    pub ffn: usize,
}

impl ExpertsShape {
    /// Assignments (token, chosen expert).
    pub fn assignments(&self) -> usize {
        self.tokens * self.top_k
    }

    /// A prompt (more than one token) runs the grouped passes.
    pub fn grouped(&self) -> bool {
        self.tokens > 1
    }

    fn check(&self) -> Result<()> {
        if self.experts > super::MAX_EXPERTS {
            return Err(Error::InvalidShape(format!(
                "routed experts: {} experts, at most {}",
                self.experts,
                super::MAX_EXPERTS
            )));
        }
        if self.tokens == 0
            || self.experts == 0
            || self.top_k == 0
            || self.top_k > MAX_TOP_K.min(self.experts)
            || self.hidden == 0
            || self.ffn == 0
            || !self.hidden.is_multiple_of(4)
            || !self.ffn.is_multiple_of(4)
        {
            return Err(Error::InvalidShape(format!(
                "routed experts {self:?}: need tokens, 1 ≤ top_k ≤ min({MAX_TOP_K}, \
                 experts), widths that are positive multiples of 4"
            )));
        }
        Ok(())
    }
}

/// The scratch buffers of the grouped passes (shared by the layers of a plan, which run
/// one after the other): the dispatch's per-block counts, its `meta` (counts, offsets,
/// tile starts), the sorted order and its inverse, and the down products in sorted
/// order `[assignments, hidden]`.
pub struct ExpertsScratch {
    block_counts: wgpu::Buffer,
    meta: wgpu::Buffer,
    sorted: wgpu::Buffer,
    inv: wgpu::Buffer,
    down: wgpu::Buffer,
}

impl ExpertsScratch {
    /// Buffers for `shape` (a few bytes for one token, which runs no grouped pass).
    pub fn new(g: &GpuDevice, shape: ExpertsShape) -> Result<Self> {
        let grouped = shape.grouped();
        let a = if grouped { shape.assignments() } else { 1 };
        let blocks = a.div_ceil(DISPATCH_BLOCK);
        let words = |label: &str, n: usize| storage(g, label, (n.max(1) * 4) as u64);
        Ok(ExpertsScratch {
            block_counts: words("experts block counts", blocks * shape.experts)?,
            meta: words("experts meta", meta_words(shape.experts))?,
            sorted: words("experts sorted", a)?,
            inv: words("experts inverse", a)?,
            down: words(
                "experts down products",
                if grouped { a * shape.hidden } else { 1 },
            )?,
        })
    }
}

/// The grouped passes of a prompt: the dispatch, gate / up / down per part, the combine.
struct Grouped {
    dispatch: DispatchGpu,
    combine: Step<CombineParams>,
}

/// The three passes of a layer's routed experts, built once for a token count
/// (one dispatch per part of each matrix; a prompt's grouped, see the module docs).
pub struct ExpertsGgmlGpu {
    gate: Vec<(Step<ExpertsParams>, wgpu::Buffer)>,
    up: Vec<(Step<ExpertsParams>, wgpu::Buffer)>,
    down: Vec<(Step<ExpertsParams>, wgpu::Buffer)>,
    grouped: Option<Grouped>,
}

impl ExpertsGgmlGpu {
    /// Compiles the passes for `shape` over `gate`, `up` (`[experts · ffn, hidden]`) and
    /// `down` (`[experts · hidden, ffn]`). Typed errors: shapes that do not match, a
    /// part that splits an expert.
    pub fn build(
        ctx: &Context,
        shape: ExpertsShape,
        gate: &GpuMatrix,
        up: &GpuMatrix,
        down: &GpuMatrix,
    ) -> Result<Self> {
        shape.check()?;
        let s = shape;
        let grouped = s.grouped();
        // Tiles of the grouped passes: at most one partial tile per expert.
        let tiles = s.assignments().div_ceil(GROUPED_TILE) + s.experts.min(s.assignments());
        let steps = |m: &GpuMatrix,
                     name: &str,
                     (rows, cols): (usize, usize),
                     pass: fn(usize) -> ExpertsPass|
         -> Result<Vec<(Step<ExpertsParams>, wgpu::Buffer)>> {
            if m.rows != s.experts * rows || m.cols != cols {
                return Err(Error::Mismatch(format!(
                    "expert {name}: [{}, {}], expected [{} · {rows}, {cols}]",
                    m.rows, m.cols, s.experts
                )));
            }
            let row_blocks = rows.div_ceil(ROWS);
            // Gate and up: one workgroup row per assignment; down: per token; grouped:
            // per tile.
            let items = if grouped {
                tiles
            } else if pass(0) == ExpertsPass::Down {
                s.tokens
            } else {
                s.assignments()
            };
            m.parts
                .iter()
                .enumerate()
                .map(|(i, part)| {
                    if !part.row0.is_multiple_of(rows) || !part.rows.is_multiple_of(rows) {
                        return Err(Error::InvalidShape(format!(
                            "expert {name}: part of rows {}..{} splits an expert of {rows}",
                            part.row0,
                            part.row0 + part.rows
                        )));
                    }
                    let p = ExpertsParams {
                        tokens: s.tokens as u32,
                        top_k: s.top_k as u32,
                        n: rows as u32,
                        k: cols as u32,
                        e0: (part.row0 / rows) as u32,
                        experts: (part.rows / rows) as u32,
                        row_blocks: row_blocks as u32,
                        layer_experts: s.experts as u32,
                    };
                    let spec = if grouped {
                        experts_grouped_spec(m.ty, pass(i))
                    } else {
                        experts_ggml_spec(m.ty, pass(i))
                    };
                    let step = Step::flat(ctx, &spec, &p, (row_blocks * items) as u64)?;
                    Ok((step, part.buffer.clone()))
                })
                .collect()
        };
        Ok(ExpertsGgmlGpu {
            gate: steps(gate, "gate", (s.ffn, s.hidden), |_| ExpertsPass::Gate)?,
            up: steps(up, "up", (s.ffn, s.hidden), |_| ExpertsPass::Up)?,
            down: steps(down, "down", (s.hidden, s.ffn), |i| {
                if i == 0 {
                    ExpertsPass::Down
                } else {
                    ExpertsPass::DownAccum
                }
            })?,
            grouped: if grouped {
                Some(Grouped {
                    dispatch: DispatchGpu::build(ctx, s.experts, s.assignments(), GROUPED_TILE)?,
                    combine: combine_step(ctx, s.tokens, s.hidden, s.top_k)?,
                })
            } else {
                None
            },
        })
    }

    /// The dispatches, in order: `z` the normed rows `[tokens, hidden]`, `ids` and
    /// `route_w` the router's choice `[tokens, top_k]`, `h` scratch `[assignments,
    /// ffn]`, `out = res + Σ` `[tokens, hidden]` (`out` and `res` distinct buffers);
    /// `scratch` for the grouped passes of a prompt ([`ExpertsScratch::new`] of the same
    /// shape).
    #[allow(clippy::too_many_arguments)]
    pub fn dispatches(
        &self,
        g: &GpuDevice,
        z: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        route_w: &wgpu::Buffer,
        h: &wgpu::Buffer,
        res: &wgpu::Buffer,
        out: &wgpu::Buffer,
        scratch: &ExpertsScratch,
    ) -> Vec<Dispatch> {
        if let Some(gr) = &self.grouped {
            let mut list = gr.dispatch.dispatches(
                g,
                &[
                    ids,
                    &scratch.block_counts,
                    &scratch.meta,
                    &scratch.sorted,
                    &scratch.inv,
                ],
            );
            list.extend(
                self.gate
                    .iter()
                    .chain(&self.up)
                    .map(|(s, w)| s.dispatch(g, &[z, w, &scratch.sorted, &scratch.meta, h])),
            );
            list.extend(self.down.iter().map(|(s, w)| {
                s.dispatch(g, &[h, w, &scratch.sorted, &scratch.meta, &scratch.down])
            }));
            list.push(
                gr.combine
                    .dispatch(g, &[&scratch.down, route_w, &scratch.inv, res, out]),
            );
            return list;
        }
        let gate_up = self
            .gate
            .iter()
            .chain(&self.up)
            .map(|(s, w)| s.dispatch(g, &[z, w, ids, h]));
        let down = self.down.iter().enumerate().map(|(i, (s, w))| {
            if i == 0 {
                s.dispatch(g, &[h, w, ids, route_w, out, res])
            } else {
                s.dispatch(g, &[h, w, ids, route_w, out])
            }
        });
        gate_up.chain(down).collect()
    }
}

/// CPU twin of the three passes: `out[i] = res[i] + Σ_j route_w[i, j] ·
/// down_e (ReLU(gate_e · z_i) ⊙ (up_e · z_i))` with `e = ids[i, j]`, on f32 matrices
/// `gate`, `up` `[experts · ffn, hidden]` and `down` `[experts · hidden, ffn]`
/// (dequantized), accumulated in f64. Also returns Σ|terms| per output (the scale of a
/// rounding-error bound).
#[allow(clippy::too_many_arguments)]
pub fn experts_ggml_cpu(
    shape: ExpertsShape,
    z: &[f32],
    ids: &[u32],
    route_w: &[f32],
    gate: &[f32],
    up: &[f32],
    down: &[f32],
    res: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let ExpertsShape {
        tokens,
        top_k,
        hidden: d,
        ffn: f,
        ..
    } = shape;
    let dot = |w: &[f32], x: &[f32]| -> (f64, f64) {
        w.iter().zip(x).fold((0.0, 0.0), |(s, m), (&a, &b)| {
            let v = a as f64 * b as f64;
            (s + v, m + v.abs())
        })
    };
    let mut out: Vec<f64> = res.iter().map(|&v| v as f64).collect();
    let mut mag: Vec<f64> = res.iter().map(|v| v.abs() as f64).collect();
    let mut h = vec![0f32; f];
    for i in 0..tokens {
        let zi = &z[i * d..(i + 1) * d];
        for j in 0..top_k {
            let e = ids[i * top_k + j] as usize;
            let wgt = route_w[i * top_k + j] as f64;
            for (n, hn) in h.iter_mut().enumerate() {
                let r = (e * f + n) * d;
                let g = dot(&gate[r..r + d], zi).0;
                *hn = if g > 0.0 {
                    (g * dot(&up[r..r + d], zi).0) as f32
                } else {
                    0.0
                };
            }
            for n in 0..d {
                let r = (e * d + n) * f;
                let (s, m) = dot(&down[r..r + f], &h);
                out[i * d + n] += wgt * s;
                mag[i * d + n] += wgt.abs() * m;
            }
        }
    }
    (
        out.into_iter().map(|v| v as f32).collect(),
        mag.into_iter().map(|v| v as f32).collect(),
    )
}
