//! Launching kernels: the typed launcher [`Launch`] (a compiled kernel with its uniform
//! parameters of type `P`, producing [`Dispatch`]es that a [`crate::runtime::Recorder`]
//! records as one stage), and the helpers every launcher shares: labelled uniform and
//! storage buffers checked against the binding limit, bind groups over whole buffers,
//! grid checks and 2D grids for 1D work beyond 65,535 workgroups per axis.

use std::marker::PhantomData;
use std::sync::Arc;

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::{Kernel, KernelSpec};

/// One dispatch ready to record: a kernel, its bind group and its grid.
pub struct Dispatch {
    /// The compiled kernel.
    pub kernel: Arc<Kernel>,
    /// Bind group 0.
    pub bind_group: wgpu::BindGroup,
    /// Workgroups per axis.
    pub grid: (u32, u32, u32),
}

impl Dispatch {
    /// A dispatch binding buffer ranges (`bindings[i]` at binding `i`): for launchers
    /// that split one tensor over several dispatches by offset (the flash executor's
    /// limit-aware splitting) or share one parameter buffer between dispatches.
    pub fn ranges<'a>(
        g: &GpuDevice,
        kernel: Arc<Kernel>,
        bindings: impl IntoIterator<Item = wgpu::BufferBinding<'a>>,
        grid: (u32, u32, u32),
    ) -> Dispatch {
        let entries: Vec<wgpu::BindGroupEntry> = bindings
            .into_iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(b),
            })
            .collect();
        let bind_group = g.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.label),
            layout: &kernel.layout,
            entries: &entries,
        });
        Dispatch {
            kernel,
            bind_group,
            grid,
        }
    }
}

/// A storage binding of a dispatch: a whole buffer, or `size` bytes from `offset`.
#[derive(Clone, Copy)]
pub enum Bound<'a> {
    /// The whole buffer.
    Whole(&'a wgpu::Buffer),
    /// A byte range (offset aligned to the device's storage offset alignment).
    Range(&'a wgpu::Buffer, u64, u64),
}

/// A kernel and its uniform parameters `P` (binding 0, written once at plan build
/// time): binds the storage buffers of a run after them and yields a [`Dispatch`].
pub struct Launch<P: Pod> {
    kernel: Arc<Kernel>,
    params: wgpu::Buffer,
    _params: PhantomData<P>,
}

impl<P: Pod> Launch<P> {
    /// Compiles (or takes from the cache) `spec` and uploads `params`.
    pub fn new(ctx: &Context, spec: &KernelSpec, params: &P) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let kernel = ctx.kernel(spec)?;
        let label = format!("{} params", kernel.label);
        Ok(Launch {
            params: uniform(g, &label, bytemuck::bytes_of(params)),
            kernel,
            _params: PhantomData,
        })
    }

    /// A dispatch binding the parameters at 0 and `buffers` at 1, 2, ….
    pub fn dispatch(
        &self,
        g: &GpuDevice,
        buffers: &[&wgpu::Buffer],
        grid: (u32, u32, u32),
    ) -> Dispatch {
        Dispatch {
            bind_group: bind_params(g, &self.kernel, &self.kernel.label, &self.params, buffers),
            kernel: self.kernel.clone(),
            grid,
        }
    }

    /// A dispatch binding the parameters at 0 and `bindings` at 1, 2, … — whole buffers
    /// or byte ranges ([`Bound`]): for kernels that read one part of a tensor per
    /// dispatch (a tensor over one binding, split by heads).
    pub fn dispatch_bound(
        &self,
        g: &GpuDevice,
        bindings: &[Bound<'_>],
        grid: (u32, u32, u32),
    ) -> Dispatch {
        let all = std::iter::once(self.params.as_entire_buffer_binding()).chain(
            bindings.iter().map(|b| match *b {
                Bound::Whole(buf) => buf.as_entire_buffer_binding(),
                Bound::Range(buf, offset, size) => wgpu::BufferBinding {
                    buffer: buf,
                    offset,
                    size: std::num::NonZeroU64::new(size),
                },
            }),
        );
        Dispatch::ranges(g, self.kernel.clone(), all, grid)
    }

    /// The compiled kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The uniform buffer holding the parameters.
    pub fn params(&self) -> &wgpu::Buffer {
        &self.params
    }
}

/// A [`Launch`] with its grid fixed at build time: most kernels of a plan (router,
/// combine, RMSNorm, a projection) always cover the same work, so only the buffers
/// change from run to run ([`crate::runtime::Recorder::step`] records one).
pub struct Step<P: Pod> {
    /// The kernel and its parameters.
    pub launch: Launch<P>,
    /// Workgroups per axis.
    pub grid: (u32, u32, u32),
}

impl<P: Pod> Step<P> {
    /// Compiles `spec`, uploads `params` and keeps `grid`.
    pub fn new(
        ctx: &Context,
        spec: &KernelSpec,
        params: &P,
        grid: (u32, u32, u32),
    ) -> Result<Self> {
        Ok(Step {
            launch: Launch::new(ctx, spec, params)?,
            grid,
        })
    }

    /// A 1D amount of work (`groups` workgroups) laid out on a 2D grid (x first, flattened by the kernel).
    pub fn flat(ctx: &Context, spec: &KernelSpec, params: &P, groups: u64) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let (x, y) = grid_2d(groups, g.caps.max_workgroups_per_dim, &spec.label())?;
        Self::new(ctx, spec, params, (x, y, 1))
    }

    /// The dispatch over `buffers` (bindings 1, 2, …).
    pub fn dispatch(&self, g: &GpuDevice, buffers: &[&wgpu::Buffer]) -> Dispatch {
        self.launch.dispatch(g, buffers, self.grid)
    }
}

/// A uniform buffer holding `bytes` (written now).
pub(crate) fn uniform(g: &GpuDevice, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let buf = g.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (bytes.len() as u64).div_ceil(16).max(1) * 16,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    g.queue.write_buffer(&buf, 0, bytes);
    buf
}

/// A storage buffer of `size` bytes (at least 16), checked against the planned binding
/// limit: a typed [`Error::TooLarge`] names it when it does not fit.
pub(crate) fn storage(g: &GpuDevice, label: &str, size: u64) -> Result<wgpu::Buffer> {
    check_binding(g, label, size)?;
    Ok(new_storage(g, label, size))
}

/// A storage buffer of `size` bytes (rounded up to whole words, at least one), unchecked.
fn new_storage(g: &GpuDevice, label: &str, size: u64) -> wgpu::Buffer {
    g.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.div_ceil(4).max(4) * 4,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// A storage buffer of `size` bytes that kernels only ever bind by ranges no larger than
/// the binding limit (the flash executor's row state, split with its rows): checked
/// against the device's buffer limit, not the binding limit.
pub(crate) fn storage_ranged(g: &GpuDevice, label: &str, size: u64) -> Result<wgpu::Buffer> {
    let limit = g.caps.max_buffer;
    if size > limit {
        return Err(Error::too_large(
            format!("{label} (one buffer)"),
            size,
            limit,
        ));
    }
    Ok(new_storage(g, label, size))
}

/// A storage buffer initialized with `words`.
pub(crate) fn storage_init(g: &GpuDevice, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    let buf = storage(g, label, bytes.len() as u64)?;
    if !bytes.is_empty() {
        g.queue.write_buffer(&buf, 0, bytes);
    }
    Ok(buf)
}

/// Errors when one binding of `size` bytes exceeds the device's storage-binding limit.
pub(crate) fn check_binding(g: &GpuDevice, what: &str, size: u64) -> Result<()> {
    let limit = g.caps.max_storage_binding;
    if size > limit {
        return Err(Error::too_large(
            format!("{what} (one storage binding)"),
            size,
            limit,
        ));
    }
    Ok(())
}

/// A bind group binding `buffers` (whole) to bindings 0, 1, ... of `kernel`.
pub(crate) fn bind(
    g: &GpuDevice,
    kernel: &Kernel,
    label: &str,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    g.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &kernel.layout,
        entries: &entries,
    })
}

/// A bind group with `params` (a uniform) at binding 0 and `buffers` at 1, 2, ...: the
/// layout of the selection kernels of the sparse attention plans.
pub(crate) fn bind_params(
    g: &GpuDevice,
    kernel: &Kernel,
    label: &str,
    params: &wgpu::Buffer,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let all: Vec<&wgpu::Buffer> = std::iter::once(params)
        .chain(buffers.iter().copied())
        .collect();
    bind(g, kernel, label, &all)
}

/// A 2D grid of at least `groups` workgroups (x ≤ `max_per_dim`), for kernels that
/// flatten `wid.x + wid.y * num_workgroups.x` and skip the excess.
pub(crate) fn grid_2d(groups: u64, max_per_dim: u32, what: &str) -> Result<(u32, u32)> {
    let max = max_per_dim.max(1) as u64;
    if groups <= max {
        return Ok((groups.max(1) as u32, 1));
    }
    let y = groups.div_ceil(max);
    if y > max {
        return Err(Error::InvalidShape(format!(
            "{what}: {groups} workgroups exceed the {max} x {max} dispatch grid"
        )));
    }
    Ok((max as u32, y as u32))
}

/// Checks one dispatch axis against the device limit.
pub(crate) fn check_axis(n: u64, max_per_dim: u32, what: &str) -> Result<u32> {
    if n > max_per_dim as u64 {
        return Err(Error::InvalidShape(format!(
            "{what}: {n} workgroups on one axis exceed the device's {max_per_dim}"
        )));
    }
    Ok(n.max(1) as u32)
}

/// Errors unless the device can `unpack2x16float` (f16 weights and Q4_0 scales).
pub(crate) fn require_f16_storage(g: &GpuDevice, what: &'static str) -> Result<()> {
    if !g.caps.f16_storage {
        return Err(Error::UnsupportedDtype(
            crate::runtime::tensor::DType::F16,
            what,
        ));
    }
    Ok(())
}
