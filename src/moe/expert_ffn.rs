//! Launcher of `shaders/moe/expert_ffn.wgsl`: the grouped ReGLU expert FFN, as a tiled
//! grouped GEMM (prefill; the down GEMM skips 16-neuron chunks inactive for a whole
//! tile) or GEMV-like kernels that skip inactive neurons' weights (decode), with f16 or
//! Q4_0 weights, read through an expert → slot map (streamed experts). Two stages:
//! `expert_up` (gate, up, ReGLU) and `expert_down`. The tiled kernels have a
//! matrix-unit twin (`shaders/moe/expert_ffn_coop.wgsl`: the same tile heights and
//! counters, split f32 operands, 32-neuron up tiles, inactive chunks' down weights not
//! read but their multiply-adds run), chosen by [`ffn_coop_tile`] where the device
//! has cooperative matrices and the workgroup memory; the GEMV kernels (1–8 tokens)
//! stay on vector arithmetic, where a T x T tile would be mostly empty.

use serde::Serialize;

use super::{MoeConfig, WeightFormat};
use crate::error::{Error, Result};
use crate::runtime::context::{Capabilities, Context};
use crate::runtime::launch::{Launch, check_axis};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Positions per tile of the grouped GEMM: 16, 32 or 64 (see [`choose_tile_m`]).
pub const TILE_MS: [usize; 3] = [16, 32, 64];
/// Neurons (up) or hidden columns (down) per tile.
pub const TILE_N: usize = 64;
/// Neurons per tile of the matrix-unit up kernel (its four f32 accumulators at 64 would
/// not fit 32 KiB of workgroup memory at 32 positions).
pub const COOP_UP_TILE_N: usize = 32;

/// Neurons (up) or hidden columns (down) per tile of a kernel.
pub fn tile_n(down: bool, coop: bool) -> usize {
    if coop && !down {
        COOP_UP_TILE_N
    } else {
        TILE_N
    }
}
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

crate::runtime::preprocess::wgsl_params! {
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
        /// First stats word of the matrix-unit kernel's per-workgroup counter pairs.
        part_base: u32,
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

/// [`choose_tile_m`] on a device: where the matrix-unit kernels run at a smaller tile
/// but not at the chosen one (their accumulators live in workgroup memory), the largest
/// tile they run at.
pub fn choose_tile_m_on(
    caps: &Capabilities,
    format: WeightFormat,
    assignments: usize,
    experts: usize,
) -> usize {
    let m = choose_tile_m(assignments, experts);
    if ffn_coop_tile(caps, format, m).is_some() {
        return m;
    }
    TILE_MS
        .into_iter()
        .filter(|&t| t < m && ffn_coop_tile(caps, format, t).is_some())
        .max()
        .unwrap_or(m)
}

/// Workgroup memory of the matrix-unit kernels at tile height `tile_m`, the larger of
/// the two halves: up stages z and the gate/up chunks as f16 halves (the weights' low
/// half only for Q4_0) with four f32 accumulators (gate, up; high, low); down the
/// activations and the down chunk with two.
pub fn ffn_coop_workgroup_bytes(format: WeightFormat, tile_m: usize) -> u32 {
    let w_halves = if format == WeightFormat::F16 { 1 } else { 2 };
    let (k, nu, nd) = (SKIP_CHUNK, tile_n(false, true), tile_n(true, true));
    let up = 2 * tile_m * k * 2 + 2 * w_halves * nu * k * 2 + 4 * tile_m * nu * 4 + 4;
    let down = 2 * tile_m * k * 2 + w_halves * k * nd * 2 + 2 * tile_m * nd * 4 + 8;
    up.max(down) as u32
}

/// The matrix-unit tile of the tiled expert kernels on this device at tile height
/// `tile_m` (`None`: the portable kernels).
pub fn ffn_coop_tile(caps: &Capabilities, format: WeightFormat, tile_m: usize) -> Option<usize> {
    caps.coop_tile_for(ffn_coop_workgroup_bytes(format, tile_m), 256)
}

/// Neurons per chunk of the tiled down kernel (the unit [`expert_ffn_spec`]'s
/// `skip_chunks` skips).
pub const SKIP_CHUNK: usize = 16;

/// The kernel of one half (`down = false`: gate/up/ReGLU) for a path, weight format,
/// (tiled) tile height `tile_m` and (tiled down) whether inactive chunks are skipped:
/// the portable kernels.
pub fn expert_ffn_spec(
    down: bool,
    kernel: FfnKernel,
    format: WeightFormat,
    tile_m: usize,
    skip_chunks: bool,
) -> KernelSpec {
    expert_ffn_spec_on(down, kernel, format, tile_m, skip_chunks, None)
}

/// [`expert_ffn_spec`] on matrix units of tile `coop` (8 or 16; the tiled path only).
pub fn expert_ffn_spec_on(
    down: bool,
    kernel: FfnKernel,
    format: WeightFormat,
    tile_m: usize,
    skip_chunks: bool,
    coop: Option<usize>,
) -> KernelSpec {
    let coop = coop.filter(|_| kernel == FfnKernel::Tiled);
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
        })
        .flag_if("COOP", coop.is_some())
        .flag_if("TILE16", coop == Some(16))
        .flag_if(
            "SKIP_CHUNKS",
            down && kernel == FfnKernel::Tiled && skip_chunks,
        );
    let defines = match kernel {
        FfnKernel::Tiled => defines
            .const_u32("MI", (tile_m / 16) as u32)
            .const_u32("TN", tile_n(down, coop.is_some()) as u32)
            .const_u32("ZS_LEN", (tile_m * 5) as u32),
        FfnKernel::Gemv => defines,
    };
    let (file, entry) = match (coop, down) {
        (Some(_), false) => ("moe/expert_ffn_coop.wgsl", "expert_up_coop"),
        (Some(_), true) => ("moe/expert_ffn_coop.wgsl", "expert_down_coop"),
        (None, false) => ("moe/expert_ffn.wgsl", "expert_up"),
        (None, true) => ("moe/expert_ffn.wgsl", "expert_down"),
    };
    KernelSpec {
        file,
        entry,
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

/// Every matrix-unit expert-FFN variant at tile `tile` (SPIR-V and MSL only).
pub fn all_coop_expert_ffn_variants(tile: usize) -> Vec<KernelSpec> {
    let mut out = vec![];
    for down in [false, true] {
        for f in [WeightFormat::F16, WeightFormat::Q4_0] {
            for tm in TILE_MS {
                for skip in [false, true] {
                    if skip && !down {
                        continue;
                    }
                    let k = FfnKernel::Tiled;
                    out.push(expert_ffn_spec_on(down, k, f, tm, skip, Some(tile)));
                }
            }
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
    /// Per-workgroup counter pairs in the stats buffer after its four totals
    /// (matrix-unit kernels; 0 for the portable ones): up's, then down's.
    up_parts: usize,
    down_parts: usize,
}

/// The four counters (skipped and evaluated neurons, skipped and all down chunks)
/// from a stats buffer of `words`: the totals the portable kernels add atomically plus
/// the per-workgroup pairs of the matrix-unit kernels (up's pairs, then down's, from
/// word 4 on; `up_parts` of them are up's).
pub(crate) fn fold_counters(words: &[u32], up_parts: usize) -> [u32; 4] {
    let mut c = [words[0], words[1], words[2], words[3]];
    for (i, pair) in words[4..].chunks_exact(2).enumerate() {
        let at = if i < up_parts { 0 } else { 2 };
        c[at] += pair[0];
        c[at + 1] += pair[1];
    }
    c
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
        let coop = match kernel {
            FfnKernel::Tiled => ffn_coop_tile(&g.caps, format, tile_m),
            FfnKernel::Gemv => None,
        };
        let mut p = FfnParams {
            part_base: 4,
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
                let c = coop.is_some();
                (
                    (tiles, cfg.ffn.div_ceil(tile_n(false, c)) as u32),
                    (tiles, cfg.hidden.div_ceil(tile_n(true, c)) as u32),
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
        let spec = |down, skip| expert_ffn_spec_on(down, kernel, format, tile_m, skip, coop);
        let up = Launch::new(ctx, &spec(false, false), &p)?;
        let parts = |(x, y): (u32, u32)| {
            if coop.is_some() {
                x as usize * y as usize
            } else {
                0
            }
        };
        p.part_base = 4 + 2 * parts(up_grid) as u32;
        Ok(FfnGpu {
            up,
            down: Launch::new(ctx, &spec(true, skip_chunks), &p)?,
            up_grid,
            down_grid,
            up_parts: parts(up_grid),
            down_parts: parts(down_grid),
        })
    }

    /// Bytes of the stats buffer the kernels write.
    pub(crate) fn stats_bytes(&self) -> u64 {
        (4 + 2 * (self.up_parts + self.down_parts)) as u64 * 4
    }

    /// The four counters of a stats buffer read back (see [`fold_counters`]).
    pub(crate) fn counters(&self, words: &[u32]) -> [u32; 4] {
        let n = 4 + 2 * (self.up_parts + self.down_parts);
        fold_counters(&words[..n], self.up_parts)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Matrix units for the tiled kernels only with a coop tile and the workgroup memory
    /// of the tile height (lavapipe's 32 KiB: up to 32 rows; an H200's 48 KiB: 64); the
    /// default tile height drops to one that runs on them.
    #[test]
    fn coop_choice_follows_tile_height_and_memory() {
        let lvp = Capabilities::fake(Some(8), 32 * 1024, 8);
        let h200 = Capabilities::fake(Some(16), 48 * 1024, 32);
        for f in [WeightFormat::F16, WeightFormat::Q4_0] {
            for caps in [&lvp, &h200] {
                let t = caps.coop_tile.map(|t| t as usize);
                assert_eq!(ffn_coop_tile(caps, f, 16), t);
                assert_eq!(ffn_coop_tile(caps, f, 32), t);
                assert_eq!(choose_tile_m_on(caps, f, 64 * 10, 64), 16);
            }
            assert_eq!(ffn_coop_tile(&lvp, f, 64), None);
            assert_eq!(choose_tile_m_on(&lvp, f, 64 * 200, 64), 32);
            assert_eq!(ffn_coop_tile(&h200, f, 64), Some(16));
            assert_eq!(choose_tile_m_on(&h200, f, 64 * 200, 64), 64);
            let none = Capabilities::fake(None, 48 * 1024, 32);
            assert_eq!(ffn_coop_tile(&none, f, 16), None);
            assert_eq!(choose_tile_m_on(&none, f, 64 * 200, 64), 64);
            let small = Capabilities::fake(Some(16), 8 * 1024, 32);
            assert_eq!(ffn_coop_tile(&small, f, 16), None);
            let wide_subgroups = Capabilities::fake(Some(16), 48 * 1024, 512);
            assert_eq!(ffn_coop_tile(&wide_subgroups, f, 16), None);
        }
        // The GEMV path never takes the coop kernel.
        let spec = expert_ffn_spec_on(true, FfnKernel::Gemv, WeightFormat::F16, 0, false, Some(8));
        assert_eq!(spec.entry, "expert_down");
        assert_eq!(all_coop_expert_ffn_variants(16).len(), 2 * 3 + 2 * 3 * 2);
    }

    /// The host adds the matrix-unit kernels' per-workgroup pairs to the totals: up's
    /// pairs to the neuron counters, down's to the chunk counters.
    #[test]
    fn counters_fold_per_workgroup_pairs() {
        let words = [1, 2, 3, 4, 10, 20, 30, 40, 100, 200];
        assert_eq!(fold_counters(&words, 2), [41, 62, 103, 204]);
        assert_eq!(fold_counters(&words[..4], 0), [1, 2, 3, 4]);
        assert_eq!(fold_counters(&words, 0), [1, 2, 143, 264]);
    }
}
