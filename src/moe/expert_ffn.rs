//! Launcher of `shaders/moe/expert_ffn.wgsl`: the grouped ReGLU expert FFN, as a tiled
//! grouped GEMM (prefill; the down GEMM skips 16-neuron chunks inactive for a whole
//! tile) or GEMV-like kernels that skip inactive neurons' weights (decode), with f16 or
//! Q4_0 weights, read through an expert → slot map (streamed experts). Two stages:
//! `expert_up` (gate, up, ReGLU) and `expert_down`.

use serde::Serialize;

use super::{MoeConfig, WeightFormat};
use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{Launch, check_axis};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Positions per tile of the grouped GEMM: 16, 32 or 64 (see [`choose_tile_m`]).
pub const TILE_MS: [usize; 3] = [16, 32, 64];
/// Neurons (up) or hidden columns (down) per tile.
pub const TILE_N: usize = 64;
/// Neurons per GEMV-up workgroup.
pub const GEMV_NEURONS: usize = 8;
/// Columns per GEMV-down workgroup (16 column groups of 4 x 16 neuron slices).
pub const GEMV_COLS: usize = 64;

/// Which expert-FFN kernels a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKernel {
    /// Tiled grouped GEMM, 64 x 64 tiles (prefill: many tokens per expert).
    Tiled,
    /// One workgroup per position and neuron block; skipped neurons' up and down rows
    /// are never read (decode: 1–8 tokens).
    Gemv,
}

crate::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct FfnParams {
        assignments: u32,
        hidden: u32,
        ffn: u32,
        experts: u32,
        top_k: u32,
        gate_sb: u32,
        up_sb: u32,
        down_sb: u32,
    }
}

/// The tile height for `assignments` spread over `experts`: the largest of 16, 32, 64
/// that the average expert fills at least one and a half times (fewer half-empty tiles
/// when each expert gets few tokens; more reuse of each weight tile when it gets many).
pub fn choose_tile_m(assignments: usize, experts: usize) -> usize {
    let per_expert = assignments / experts.max(1);
    match per_expert {
        n if n >= 96 => 64,
        n if n >= 48 => 32,
        _ => 16,
    }
}

/// Neurons per chunk of the tiled down kernel (the unit [`expert_ffn_spec`]'s
/// `skip_chunks` skips).
pub const SKIP_CHUNK: usize = 16;

/// The kernel of one half (`down = false`: gate/up/ReGLU) for a path, weight format,
/// (tiled) tile height `tile_m` and (tiled down) whether inactive chunks are skipped.
pub fn expert_ffn_spec(
    down: bool,
    kernel: FfnKernel,
    format: WeightFormat,
    tile_m: usize,
    skip_chunks: bool,
) -> KernelSpec {
    let bindings = if down {
        BindingKind::layout("urrrwrw")
    } else {
        BindingKind::layout("urrrrrwwr")
    };
    let defines = Defines::new()
        .params::<FfnParams>()
        .flag(if down { "DOWN" } else { "UP" })
        .flag(match kernel {
            FfnKernel::Tiled => "TILED",
            FfnKernel::Gemv => "GEMV",
        })
        .flag(match format {
            WeightFormat::F16 => "WEIGHTS_F16",
            WeightFormat::Q4_0 => "WEIGHTS_Q4_0",
        });
    let defines = match kernel {
        FfnKernel::Tiled => defines
            .const_u32("MI", (tile_m / 16) as u32)
            .const_u32("ZS_LEN", (tile_m * 5) as u32),
        FfnKernel::Gemv => defines,
    };
    let defines = if down && kernel == FfnKernel::Tiled && skip_chunks {
        defines.flag("SKIP_CHUNKS")
    } else {
        defines
    };
    KernelSpec {
        file: "moe/expert_ffn.wgsl",
        entry: if down { "expert_down" } else { "expert_up" },
        defines,
        bindings,
    }
}

/// Every expert-FFN variant.
pub fn all_expert_ffn_variants() -> Vec<KernelSpec> {
    let mut out = vec![];
    for down in [false, true] {
        for f in [WeightFormat::F16, WeightFormat::Q4_0] {
            for tm in TILE_MS {
                out.push(expert_ffn_spec(down, FfnKernel::Tiled, f, tm, false));
                if down {
                    out.push(expert_ffn_spec(down, FfnKernel::Tiled, f, tm, true));
                }
            }
            out.push(expert_ffn_spec(down, FfnKernel::Gemv, f, 0, false));
        }
    }
    out
}

/// Upper bound of the tiles over all experts: Σ ceil(count_e / tile_m).
pub fn max_tiles(assignments: usize, experts: usize, tile_m: usize) -> usize {
    assignments.div_ceil(tile_m) + experts.min(assignments)
}

/// The FFN's buffers for one recording.
pub(crate) struct FfnIo<'a> {
    pub meta: &'a wgpu::Buffer,
    /// Expert → weight slot (`u32::MAX`: not computed by this recording).
    pub slot_of: &'a wgpu::Buffer,
    pub z: &'a wgpu::Buffer,
    pub sorted: &'a wgpu::Buffer,
    pub act: &'a wgpu::Buffer,
    pub stats: &'a wgpu::Buffer,
    pub y: &'a wgpu::Buffer,
}

/// Weight buffers on the GPU.
pub(crate) struct FfnWeights {
    pub gate: wgpu::Buffer,
    pub up: wgpu::Buffer,
    pub down_t: wgpu::Buffer,
}

/// A built expert FFN.
pub(crate) struct FfnGpu {
    up: Launch<FfnParams>,
    down: Launch<FfnParams>,
    up_grid: (u32, u32),
    down_grid: (u32, u32),
}

impl FfnGpu {
    /// `scale_bases` are the Q4_0 scale offsets (gate, up, down) of the weight buffers
    /// the kernels will read (all experts resident, or the slots of a streaming plan).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        ctx: &Context,
        cfg: &MoeConfig,
        format: WeightFormat,
        scale_bases: [u32; 3],
        assignments: usize,
        kernel: FfnKernel,
        tile_m: usize,
        skip_chunks: bool,
    ) -> Result<Self> {
        if kernel == FfnKernel::Tiled && !TILE_MS.contains(&tile_m) {
            return Err(Error::InvalidArgument(format!(
                "tile height {tile_m} is not one of {TILE_MS:?}"
            )));
        }
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let max = g.caps.max_workgroups_per_dim;
        let p = FfnParams {
            assignments: assignments as u32,
            hidden: cfg.hidden as u32,
            ffn: cfg.ffn as u32,
            experts: cfg.experts as u32,
            top_k: cfg.top_k as u32,
            gate_sb: scale_bases[0],
            up_sb: scale_bases[1],
            down_sb: scale_bases[2],
        };
        let (up_grid, down_grid) = match kernel {
            FfnKernel::Tiled => {
                let tiles = check_axis(
                    max_tiles(assignments, cfg.experts, tile_m) as u64,
                    max,
                    "expert FFN tiles",
                )?;
                (
                    (tiles, cfg.ffn.div_ceil(TILE_N) as u32),
                    (tiles, cfg.hidden.div_ceil(TILE_N) as u32),
                )
            }
            FfnKernel::Gemv => {
                let a = check_axis(assignments as u64, max, "expert FFN GEMV positions")?;
                (
                    (cfg.ffn.div_ceil(GEMV_NEURONS) as u32, a),
                    (cfg.hidden.div_ceil(GEMV_COLS) as u32, a),
                )
            }
        };
        let spec = |down, skip| expert_ffn_spec(down, kernel, format, tile_m, skip);
        Ok(FfnGpu {
            up: Launch::new(ctx, &spec(false, false), &p)?,
            down: Launch::new(ctx, &spec(true, skip_chunks), &p)?,
            up_grid,
            down_grid,
        })
    }

    /// Records both stages (the caller clears `io.stats` once per run).
    pub(crate) fn record(&self, rec: &mut Recorder<'_>, w: &FfnWeights, io: &FfnIo<'_>) {
        let g = rec.gpu();
        let (ux, uy) = self.up_grid;
        let up_bufs = [io.meta, io.z, io.sorted, &w.gate, &w.up, io.act, io.stats];
        let up = self
            .up
            .dispatch(g, &[&up_bufs[..], &[io.slot_of]].concat(), (ux, uy, 1));
        let (dx, dy) = self.down_grid;
        let down_bufs = [io.meta, io.act, &w.down_t, io.y, io.slot_of, io.stats];
        let down = self.down.dispatch(g, &down_bufs, (dx, dy, 1));
        rec.dispatch_stage("expert_up", &[up]);
        rec.dispatch_stage("expert_down", &[down]);
    }
}
