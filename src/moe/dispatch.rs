//! Launcher of `shaders/moe/dispatch.wgsl`: histogram, scan and stable scatter of the
//! router's assignments into expert-contiguous order (three dispatches, one stage).

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::{bind, grid_2d, uniform};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, Kernel, KernelSpec, Recorder};

/// Assignments per histogram / scatter workgroup.
pub const DISPATCH_BLOCK: usize = 256;

/// Uniform parameters; mirrors `struct Params` in the WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct DispatchParams {
    assignments: u32,
    experts: u32,
    blocks: u32,
    tile_m: u32,
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
    use BindingKind::*;
    let (entry, flag) = match pass {
        DispatchPass::Histogram => ("moe_histogram", "HISTOGRAM"),
        DispatchPass::Scan => ("moe_scan", "SCAN"),
        DispatchPass::Scatter => ("moe_scatter", "SCATTER"),
    };
    KernelSpec {
        file: "moe/dispatch.wgsl",
        entry,
        defines: Defines::new().flag(flag),
        bindings: vec![
            Uniform,
            StorageRead,
            StorageReadWrite,
            StorageReadWrite,
            StorageReadWrite,
            StorageReadWrite,
        ],
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

/// The dispatch's buffers for one recording.
pub(crate) struct DispatchIo<'a> {
    pub ids: &'a wgpu::Buffer,
    pub block_counts: &'a wgpu::Buffer,
    pub meta: &'a wgpu::Buffer,
    pub sorted: &'a wgpu::Buffer,
    pub inv: &'a wgpu::Buffer,
}

/// A built dispatch for an assignment count.
pub(crate) struct DispatchGpu {
    kernels: [Arc<Kernel>; 3],
    params: wgpu::Buffer,
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
        let k = |pass| ctx.kernel(&dispatch_spec(pass));
        Ok(DispatchGpu {
            kernels: [
                k(DispatchPass::Histogram)?,
                k(DispatchPass::Scan)?,
                k(DispatchPass::Scatter)?,
            ],
            params: uniform(g, "moe dispatch params", bytemuck::bytes_of(&p)),
            grid: grid_2d(blocks as u64, g.caps.max_workgroups_per_dim, "moe dispatch")?,
            blocks,
        })
    }

    pub(crate) fn record(&self, rec: &mut Recorder<'_>, io: &DispatchIo<'_>) {
        let bufs = [
            &self.params,
            io.ids,
            io.block_counts,
            io.meta,
            io.sorted,
            io.inv,
        ];
        let groups: Vec<wgpu::BindGroup> = self
            .kernels
            .iter()
            .map(|k| bind(rec.gpu(), k, "moe dispatch bindings", &bufs))
            .collect();
        let (gx, gy) = self.grid;
        rec.stage("dispatch", |pass| {
            for (i, (k, bg)) in self.kernels.iter().zip(&groups).enumerate() {
                pass.set_pipeline(&k.pipeline);
                pass.set_bind_group(0, bg, &[]);
                if i == 1 {
                    pass.dispatch_workgroups(1, 1, 1);
                } else {
                    pass.dispatch_workgroups(gx, gy, 1);
                }
            }
            3
        });
    }
}
