//! [`Tensor`]: a typed buffer with a shape on one [`Context`] (GPU buffer or host vector).

use half::f16;

use crate::error::{Error, Result};
use crate::runtime::context::Context;
pub use crate::runtime::dtype::DType;

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "u32" => Ok(DType::U32),
            "i32" => Ok(DType::I32),
            o => Err(Error::InvalidArgument(format!("unknown dtype `{o}`"))),
        }
    }
}

/// Host-side contents of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// u32 elements.
    U32(Vec<u32>),
    /// i32 elements.
    I32(Vec<i32>),
}

impl HostData {
    /// The dtype of these elements.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::U32(_) => DType::U32,
            HostData::I32(_) => DType::I32,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::U32(v) => v.len(),
            HostData::I32(v) => v.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Converts f32 values to `dtype` (f32 or f16).
    pub fn from_f32(values: &[f32], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(HostData::F32(values.to_vec())),
            DType::F16 => Ok(HostData::F16(
                values.iter().map(|&x| f16::from_f32(x)).collect(),
            )),
            d => Err(Error::UnsupportedDtype(d, "float data")),
        }
    }
    /// The elements as f32 (integers converted by value).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::U32(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
    /// Raw little-endian bytes, padded with zeros to a multiple of 4.
    pub fn to_padded_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = match self {
            HostData::F32(v) => bytemuck::cast_slice(v).to_vec(),
            HostData::F16(v) => bytemuck::cast_slice(v).to_vec(),
            HostData::U32(v) => bytemuck::cast_slice(v).to_vec(),
            HostData::I32(v) => bytemuck::cast_slice(v).to_vec(),
        };
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        bytes
    }
    fn from_bytes(bytes: &[u8], dtype: DType, len: usize) -> Self {
        let n = len * dtype.size();
        let b = &bytes[..n];
        match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(b)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(b)),
            DType::U32 => HostData::U32(bytemuck::pod_collect_to_vec(b)),
            DType::I32 => HostData::I32(bytemuck::pod_collect_to_vec(b)),
        }
    }
}

pub(crate) enum Storage {
    Gpu(wgpu::Buffer),
    Cpu(HostData),
}

/// A typed, shaped buffer on one context.
pub struct Tensor {
    pub(crate) ctx: Context,
    shape: Vec<usize>,
    dtype: DType,
    pub(crate) storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?} {:?} on {:?})",
            self.dtype, self.shape, self.ctx
        )
    }
}

/// Bytes a GPU buffer of `numel` elements of `dtype` occupies (rounded up to 4).
pub fn gpu_bytes(numel: usize, dtype: DType) -> u64 {
    ((numel * dtype.size()) as u64).div_ceil(4) * 4
}

impl Tensor {
    /// Uploads host data with this shape.
    pub fn from_host(ctx: &Context, shape: &[usize], data: HostData) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::Mismatch(format!(
                "shape {shape:?} has {numel} elements but {} were given",
                data.len()
            )));
        }
        let dtype = data.dtype();
        let storage = match ctx.gpu() {
            None => Storage::Cpu(data),
            Some(g) => {
                let bytes = data.to_padded_bytes();
                let size = (bytes.len() as u64).max(4);
                check_buffer_size(ctx, "tensor", size)?;
                let buffer = new_storage_buffer(g, dtype, shape, size);
                if !bytes.is_empty() {
                    g.queue.write_buffer(&buffer, 0, &bytes);
                }
                Storage::Gpu(buffer)
            }
        };
        Ok(Tensor {
            ctx: ctx.clone(),
            shape: shape.to_vec(),
            dtype,
            storage,
        })
    }

    /// A tensor over an existing GPU buffer of at least the shape's bytes (a model's
    /// activation buffers handed to an attention plan).
    pub fn from_buffer(
        ctx: &Context,
        shape: &[usize],
        dtype: DType,
        buffer: wgpu::Buffer,
    ) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if ctx.gpu().is_none() || buffer.size() < gpu_bytes(numel, dtype) {
            return Err(Error::Mismatch(format!(
                "a {} byte buffer cannot hold {shape:?} {dtype:?} on {ctx:?}",
                buffer.size()
            )));
        }
        Ok(Tensor {
            ctx: ctx.clone(),
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Gpu(buffer),
        })
    }

    /// Uploads f32 values, stored as `dtype` (f32 or f16).
    pub fn from_f32(ctx: &Context, shape: &[usize], values: &[f32], dtype: DType) -> Result<Self> {
        Self::from_host(ctx, shape, HostData::from_f32(values, dtype)?)
    }

    /// Uploads u32 values.
    pub fn from_u32(ctx: &Context, shape: &[usize], values: &[u32]) -> Result<Self> {
        Self::from_host(ctx, shape, HostData::U32(values.to_vec()))
    }

    /// A tensor filled with `value` (f32 or f16). Tests use NaN here to poison outputs.
    pub fn filled(ctx: &Context, shape: &[usize], dtype: DType, value: f32) -> Result<Self> {
        let numel: usize = shape.iter().product();
        Self::from_f32(ctx, shape, &vec![value; numel], dtype)
    }

    /// A zero-filled tensor.
    pub fn zeros(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if let Some(g) = ctx.gpu() {
            // wgpu zero-initializes new buffers: no host array, no upload.
            let size = gpu_bytes(numel, dtype).max(4);
            check_buffer_size(ctx, "tensor", size)?;
            return Ok(Tensor {
                ctx: ctx.clone(),
                shape: shape.to_vec(),
                dtype,
                storage: Storage::Gpu(new_storage_buffer(g, dtype, shape, size)),
            });
        }
        let data = match dtype {
            DType::F32 => HostData::F32(vec![0.0; numel]),
            DType::F16 => HostData::F16(vec![half::f16::ZERO; numel]),
            DType::U32 => HostData::U32(vec![0; numel]),
            DType::I32 => HostData::I32(vec![0; numel]),
        };
        Self::from_host(ctx, shape, data)
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The context the tensor lives on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The GPU buffer (None on the CPU path).
    pub fn buffer(&self) -> Option<&wgpu::Buffer> {
        match &self.storage {
            Storage::Gpu(b) => Some(b),
            Storage::Cpu(_) => None,
        }
    }
    /// The GPU buffer, or [`Error::WrongContext`] for a host tensor.
    pub fn gpu_buffer(&self) -> Result<&wgpu::Buffer> {
        self.buffer().ok_or(Error::WrongContext)
    }
    /// The host data (None on a GPU context).
    pub fn host(&self) -> Option<&HostData> {
        match &self.storage {
            Storage::Cpu(h) => Some(h),
            Storage::Gpu(_) => None,
        }
    }
    pub(crate) fn host_mut(&mut self) -> Option<&mut HostData> {
        match &mut self.storage {
            Storage::Cpu(h) => Some(h),
            Storage::Gpu(_) => None,
        }
    }

    /// Downloads the contents (async; awaits the GPU on every platform, the web included).
    pub async fn read(&self) -> Result<HostData> {
        match &self.storage {
            Storage::Cpu(h) => Ok(h.clone()),
            Storage::Gpu(buffer) => {
                let g = self.ctx.gpu().expect("GPU storage implies a GPU context");
                let bytes = read_buffer(g, buffer, 0, buffer.size()).await?;
                Ok(HostData::from_bytes(&bytes, self.dtype, self.numel()))
            }
        }
    }

    /// Downloads as f32 values (async).
    pub async fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(self.read().await?.to_f32())
    }

    /// Blocking download (not on the web).
    pub fn read_blocking(&self) -> Result<HostData> {
        pollster::block_on(self.read())
    }

    /// Blocking download as f32 values (not on the web).
    pub fn to_f32_blocking(&self) -> Result<Vec<f32>> {
        pollster::block_on(self.to_f32())
    }
}

fn new_storage_buffer(
    g: &crate::runtime::context::GpuDevice,
    dtype: DType,
    shape: &[usize],
    size: u64,
) -> wgpu::Buffer {
    g.create_buffer(&wgpu::BufferDescriptor {
        label: Some(&format!("tensor {} {:?}", dtype.name(), shape)),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

pub(crate) fn check_buffer_size(ctx: &Context, what: &str, size: u64) -> Result<()> {
    let max = ctx.capabilities().max_buffer;
    if size > max {
        return Err(Error::too_large(format!("{what} buffer"), size, max));
    }
    Ok(())
}

/// Copies `size` bytes at `offset` of `buffer` to the host.
pub(crate) async fn read_buffer(
    g: &crate::runtime::context::GpuDevice,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
) -> Result<Vec<u8>> {
    g.check()?;
    let staging = g.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback staging"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = g
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("readback"),
        });
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    g.queue.submit([enc.finish()]);
    let (tx, rx) = futures::channel::oneshot::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    #[cfg(not(target_arch = "wasm32"))]
    g.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Readback(e.to_string()))?;
    let mapped = rx
        .await
        .map_err(|_| Error::Readback("map callback dropped".into()))?;
    // A device lost meanwhile fails the mapping: say so rather than "readback failed".
    g.check()?;
    mapped.map_err(|e| Error::Readback(e.to_string()))?;
    let data = staging
        .slice(..)
        .get_mapped_range()
        .map_err(|e| Error::Readback(e.to_string()))?
        .to_vec();
    staging.unmap();
    Ok(data)
}
