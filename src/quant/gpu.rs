//! GGUF weight matrices on the GPU, kept in their file blocks: [`GpuMatrix`] uploads a
//! tensor's bytes as the file stores them (no repacking, no f32 copy) and the kernels
//! decode them in registers with the one WGSL include `shaders/quant/ggml.wgsl`, whose
//! CPU twin is [`crate::quant::ggml`]. A matrix larger than one storage binding is held
//! in parts of whole rows, each its own buffer, so that every kernel binds one part.

use crate::error::{Error, Result};
use crate::quant::GgmlType;
use crate::runtime::context::{Context, GpuDevice};

/// The WGSL flag of a format the GPU kernels decode (`None`: not on the GPU).
pub fn wgsl_flag(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "GGML_F32",
        GgmlType::F16 => "GGML_F16",
        GgmlType::BF16 => "GGML_BF16",
        GgmlType::Q4_0 => "GGML_Q4_0",
        GgmlType::Q4_1 => "GGML_Q4_1",
        GgmlType::Q5_0 => "GGML_Q5_0",
        GgmlType::Q8_0 => "GGML_Q8_0",
        GgmlType::Q4K => "GGML_Q4_K",
        GgmlType::Q6K => "GGML_Q6_K",
        _ => return None,
    })
}

/// Every format the GPU kernels decode.
pub const GPU_FORMATS: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q6K,
];

/// One part of a [`GpuMatrix`]: rows `row0 .. row0 + rows` in their own buffer.
pub struct MatrixPart {
    /// First row.
    pub row0: usize,
    /// Rows held.
    pub rows: usize,
    /// The rows' file bytes (plus one padding word).
    pub buffer: wgpu::Buffer,
}

/// A `[rows, cols]` weight matrix in its GGUF format on the GPU.
pub struct GpuMatrix {
    /// Element type (its blocks are what the buffers hold).
    pub ty: GgmlType,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// The parts, in row order.
    pub parts: Vec<MatrixPart>,
}

/// Bytes uploaded between two queue submissions: the staging copies of
/// `write_buffer` are freed once a submission completes, so host memory holds at most
/// about this much of them.
const UPLOAD_CHUNK: usize = 4 << 20;

impl GpuMatrix {
    /// Bytes of one row.
    pub fn row_bytes(ty: GgmlType, cols: usize) -> usize {
        let (bw, bb) = ty.block();
        cols / bw * bb
    }

    /// Uploads `bytes` (the tensor's bytes as the file stores them) as a `[rows, cols]`
    /// matrix of `ty`, in parts of at most `max_part` bytes (the device's storage-binding
    /// limit when `None`). Typed errors: a format the kernels do not decode, a width that
    /// is not whole blocks (or not a multiple of 32), a byte count that does not match.
    pub fn upload(
        ctx: &Context,
        label: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part: Option<u64>,
    ) -> Result<Self> {
        Self::upload_grouped(ctx, label, ty, rows, cols, bytes, max_part, 1)
    }

    /// [`GpuMatrix::upload`] of a matrix made of `group`-row blocks that a part must not
    /// split (a 3-D expert tensor as `[experts · rows, cols]`: `group` = one expert's
    /// rows, so that each part holds whole experts).
    #[allow(clippy::too_many_arguments)]
    pub fn upload_grouped(
        ctx: &Context,
        label: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part: Option<u64>,
        group: usize,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        if group == 0 || !rows.is_multiple_of(group) {
            return Err(Error::InvalidShape(format!(
                "{label}: {rows} rows are not whole groups of {group}"
            )));
        }
        if wgsl_flag(ty).is_none() {
            return Err(Error::Gguf(format!(
                "{label}: {ty:?} weights have no GPU kernel (supported: {GPU_FORMATS:?})"
            )));
        }
        crate::runtime::launch::require_f16_storage(g, "GGUF weights (unpack2x16float)")?;
        let (bw, _) = ty.block();
        if rows == 0 || cols == 0 || !cols.is_multiple_of(bw.max(32)) {
            return Err(Error::InvalidShape(format!(
                "{label}: [{rows}, {cols}] {ty:?}: the width must be a positive multiple of {}",
                bw.max(32)
            )));
        }
        let rb = Self::row_bytes(ty, cols);
        if bytes.len() != rb * rows {
            return Err(Error::Gguf(format!(
                "{label}: {rows} rows of {rb} bytes need {}, got {}",
                rb * rows,
                bytes.len()
            )));
        }
        let limit = max_part
            .unwrap_or(g.caps.max_storage_binding)
            .min(g.caps.max_buffer)
            .saturating_sub(4);
        // Parts of whole groups of rows, a multiple of 64 rows where more than 64 fit.
        let mut per = (limit / rb as u64) as usize;
        per -= per % group;
        if per == 0 {
            return Err(Error::too_large(
                format!("{label}: one group of {group} rows"),
                (rb * group) as u64 + 4,
                limit + 4,
            ));
        }
        if group == 1 && per > 64 {
            per -= per % 64;
        }
        let mut parts = Vec::new();
        for row0 in (0..rows).step_by(per) {
            let n = per.min(rows - row0);
            let src = &bytes[row0 * rb..(row0 + n) * rb];
            let size = (src.len() as u64).div_ceil(4) * 4 + 4;
            let buffer = g.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            upload(g, &buffer, src);
            parts.push(MatrixPart {
                row0,
                rows: n,
                buffer,
            });
        }
        Ok(GpuMatrix {
            ty,
            rows,
            cols,
            parts,
        })
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.buffer.size()).sum()
    }
}

/// Bytes written since the last flush of the queue (by any upload of the process).
static PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Writes `src` into `buffer` in chunks (whole words; the tail padded with zeros),
/// submitting the queue and waiting for it every [`UPLOAD_CHUNK`] bytes written (over
/// all matrices) so that the staging copies are freed as the model loads.
fn upload(g: &GpuDevice, buffer: &wgpu::Buffer, src: &[u8]) {
    use std::sync::atomic::Ordering;
    let whole = src.len() / 4 * 4;
    for (i, chunk) in src[..whole].chunks(UPLOAD_CHUNK).enumerate() {
        g.queue
            .write_buffer(buffer, (i * UPLOAD_CHUNK) as u64, chunk);
        if PENDING.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len() >= UPLOAD_CHUNK {
            PENDING.store(0, Ordering::Relaxed);
            g.queue.submit([]);
            let _ = g.device.poll(wgpu::PollType::wait_indefinitely());
        }
    }
    if whole < src.len() {
        let mut tail = [0u8; 4];
        tail[..src.len() - whole].copy_from_slice(&src[whole..]);
        g.queue.write_buffer(buffer, whole as u64, &tail);
    }
}
