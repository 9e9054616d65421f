//! Embedding lookup (`shaders/ops/embed.wgsl`) from a GGUF table on the GPU
//! ([`GpuMatrix`], any GPU format): launcher and CPU twin.

use crate::error::{Error, Result};
use crate::quant::GgmlType;
use crate::quant::gpu::GpuMatrix;
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{Dispatch, Step};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct EmbedParams {
        tokens: u32,
        cols: u32,
        row0: u32,
        rows: u32,
        scale: f32,
        sb: u32,
        _pad: [u32; 2],
    }
}

/// The lookup kernel for a table of type `ty`.
pub fn embed_spec(ty: GgmlType) -> KernelSpec {
    KernelSpec {
        file: "ops/embed.wgsl",
        entry: "embed",
        defines: Defines::new()
            .params::<EmbedParams>()
            .flag("GGML")
            .flag(crate::quant::gpu::wgsl_flag(ty).unwrap_or("GGML_UNSUPPORTED")),
        bindings: BindingKind::layout("urrw"),
    }
}

/// Every lookup variant.
pub fn all_embed_variants() -> Vec<KernelSpec> {
    crate::quant::gpu::GPU_FORMATS.map(embed_spec).to_vec()
}

/// CPU twin: rows `ids` of the dequantized table `[rows, cols]`, times `scale`.
pub fn embed_cpu(table: &[f32], cols: usize, ids: &[u32], scale: f32) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * cols..(id as usize + 1) * cols]
                .iter()
                .map(move |v| v * scale)
        })
        .collect()
}

/// A built lookup of `tokens` ids: one dispatch per part of the table.
pub struct EmbedGpu {
    steps: Vec<(Step<EmbedParams>, wgpu::Buffer)>,
}

impl EmbedGpu {
    /// Compiles the lookup of `tokens` rows of `table`, scaled by `scale`.
    pub fn build(ctx: &Context, table: &GpuMatrix, tokens: usize, scale: f32) -> Result<Self> {
        if tokens == 0 {
            return Err(Error::InvalidShape("embedding lookup of no tokens".into()));
        }
        let spec = embed_spec(table.ty);
        let steps = table
            .parts
            .iter()
            .map(|part| {
                let p = EmbedParams {
                    tokens: tokens as u32,
                    cols: table.cols as u32,
                    row0: part.row0 as u32,
                    rows: part.rows as u32,
                    scale,
                    ..Default::default()
                };
                Ok((
                    Step::flat(ctx, &spec, &p, tokens as u64)?,
                    part.buffer.clone(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EmbedGpu { steps })
    }

    /// The dispatches reading `ids` (`[tokens]` u32) into `out` (`[tokens, cols]` f32).
    /// Ids outside the table write nothing: the caller checks them.
    pub fn dispatches(
        &self,
        g: &GpuDevice,
        ids: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Vec<Dispatch> {
        self.steps
            .iter()
            .map(|(s, w)| s.dispatch(g, &[ids, w, out]))
            .collect()
    }
}
