//! Launcher of `shaders/moe/dispatch.wgsl`: histogram, scan and stable scatter of the
//! router's assignments into expert-contiguous order (three dispatches, one stage).

use crate::error::{Error, Result};
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{Dispatch, Launch, grid_2d};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec, Recorder};

/// Assignments per histogram / scatter workgroup.
pub const DISPATCH_BLOCK: usize = 256;

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct DispatchParams {
        assignments: u32,
        experts: u32,
        blocks: u32,
        tile_m: u32,
    }
}

/// The three passes of the dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchPass {
    /// Per-block expert counts.
    Histogram,
    /// Per-expert scan over blocks, offsets, tile starts.
    Scan,
    /// Stable scatter and inverse map.
    Scatter,
}

/// The kernel of one pass.
pub fn dispatch_spec(pass: DispatchPass) -> KernelSpec {
    let (entry, flag) = match pass {
        DispatchPass::Histogram => ("moe_histogram", "HISTOGRAM"),
        DispatchPass::Scan => ("moe_scan", "SCAN"),
        DispatchPass::Scatter => ("moe_scatter", "SCATTER"),
    };
    KernelSpec {
        file: "moe/dispatch.wgsl",
        entry,
        defines: Defines::new().params::<DispatchParams>().flag(flag),
        bindings: BindingKind::layout("urwwww"),
    }
}

/// Every dispatch variant.
pub fn all_dispatch_variants() -> Vec<KernelSpec> {
    [
        DispatchPass::Histogram,
        DispatchPass::Scan,
        DispatchPass::Scatter,
    ]
    .map(dispatch_spec)
    .to_vec()
}

/// Words of the `meta` buffer for `experts`: counts, offsets, tile starts.
pub fn meta_words(experts: usize) -> usize {
    3 * experts + 2
}

/// A built dispatch for an assignment count.
pub(crate) struct DispatchGpu {
    /// Histogram, scan, scatter.
    launches: [Launch<DispatchParams>; 3],
    grid: (u32, u32),
    /// Number of 256-assignment blocks.
    pub blocks: usize,
}

impl DispatchGpu {
    pub(crate) fn build(
        ctx: &Context,
        experts: usize,
        assignments: usize,
        tile_m: usize,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let blocks = assignments.div_ceil(DISPATCH_BLOCK);
        let p = DispatchParams {
            assignments: assignments as u32,
            experts: experts as u32,
            blocks: blocks as u32,
            tile_m: tile_m as u32,
        };
        let k = |pass| Launch::new(ctx, &dispatch_spec(pass), &p);
        Ok(DispatchGpu {
            launches: [
                k(DispatchPass::Histogram)?,
                k(DispatchPass::Scan)?,
                k(DispatchPass::Scatter)?,
            ],
            grid: grid_2d(blocks as u64, g.caps.max_workgroups_per_dim, "moe dispatch")?,
            blocks,
        })
    }

    /// The three passes over `[ids, block_counts, meta, sorted, inv]`, in order.
    pub(crate) fn dispatches(&self, g: &GpuDevice, bufs: &[&wgpu::Buffer; 5]) -> Vec<Dispatch> {
        let (gx, gy) = self.grid;
        let [histogram, scan, scatter] = &self.launches;
        vec![
            histogram.dispatch(g, bufs, (gx, gy, 1)),
            scan.dispatch(g, bufs, (1, 1, 1)),
            scatter.dispatch(g, bufs, (gx, gy, 1)),
        ]
    }

    /// Records the three passes over `[ids, block_counts, meta, sorted, inv]`.
    pub(crate) fn record(&self, rec: &mut Recorder<'_>, bufs: &[&wgpu::Buffer; 5]) {
        let list = self.dispatches(rec.gpu(), bufs);
        rec.dispatch_stage("dispatch", &list);
    }
}
