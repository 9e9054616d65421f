//! Device selection: a [`Context`] is either a wgpu GPU (adapter + device + queue + the
//! capabilities read from the adapter) or the CPU fallback (a rayon thread pool).
//!
//! Selection: best GPU by default, CPU when no adapter exists; by API and by environment
//! (`WGSPARSE_BACKEND=auto|vulkan|metal|dx12|gl|cpu`, `WGSPARSE_ADAPTER=<name substring>`).
//! `WGSPARSE_REQUIRE_GPU=1` turns the silent CPU fallback into an error (CI uses it so a
//! missing lavapipe fails the GPU tests instead of skipping them).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::runtime::kernel::{Kernel, KernelCache, KernelSpec};

/// Which compute API to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Best GPU found, else the CPU.
    #[default]
    Auto,
    /// Vulkan (Linux, Windows, Android; lavapipe in CI).
    Vulkan,
    /// Metal (macOS, iOS).
    Metal,
    /// Direct3D 12 (Windows).
    Dx12,
    /// OpenGL / GLES compute.
    Gl,
    /// The browser's WebGPU (wasm32 only).
    BrowserWebGpu,
    /// The multithreaded CPU path.
    Cpu,
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Backend::Auto,
            "vulkan" | "vk" => Backend::Vulkan,
            "metal" | "mtl" => Backend::Metal,
            "dx12" | "d3d12" => Backend::Dx12,
            "gl" | "gles" | "opengl" => Backend::Gl,
            "webgpu" | "browser" => Backend::BrowserWebGpu,
            "cpu" => Backend::Cpu,
            other => return Err(Error::UnknownBackend(other.to_string())),
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Backend::Auto => "auto",
            Backend::Vulkan => "vulkan",
            Backend::Metal => "metal",
            Backend::Dx12 => "dx12",
            Backend::Gl => "gl",
            Backend::BrowserWebGpu => "webgpu",
            Backend::Cpu => "cpu",
        };
        f.write_str(s)
    }
}

impl Backend {
    fn from_wgpu(b: wgpu::Backend) -> Self {
        match b {
            wgpu::Backend::Vulkan => Backend::Vulkan,
            wgpu::Backend::Metal => Backend::Metal,
            wgpu::Backend::Dx12 => Backend::Dx12,
            wgpu::Backend::Gl => Backend::Gl,
            wgpu::Backend::BrowserWebGpu => Backend::BrowserWebGpu,
            _ => Backend::Auto,
        }
    }
    fn wgpu_backends(self) -> wgpu::Backends {
        match self {
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
            Backend::Gl => wgpu::Backends::GL,
            Backend::BrowserWebGpu => wgpu::Backends::BROWSER_WEBGPU,
            Backend::Auto | Backend::Cpu => wgpu::Backends::all(),
        }
    }
}

/// How to pick the device, and testing knobs.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// API to use (`Auto`: best GPU, else CPU).
    pub backend: Backend,
    /// Only adapters whose name contains this (case-insensitive).
    pub adapter_name: Option<String>,
    /// Fail instead of falling back to the CPU when no GPU adapter is found.
    pub require_gpu: bool,
    /// Pretend the device allows at most this many bytes per storage binding (never more
    /// than the real limit). Lets tests drive the split paths with small data.
    pub max_binding_bytes: Option<u64>,
    /// Pretend the device allows buffers of at most this many bytes (never more than the
    /// real limit): a browser's 256 MiB, so that long prompts run in head groups
    /// ([`crate::attention::GroupedAttention`]) the way they would there.
    pub max_buffer_bytes: Option<u64>,
    /// Pretend the device has at most this much workgroup memory (never more than the
    /// real limit): makes the kernels pick the variants a browser with WebGPU's default
    /// 16 KiB would get, so tests cover them natively.
    pub max_workgroup_bytes: Option<u32>,
    /// Never pick the matrix-unit (cooperative-matrix) kernels, even where the adapter
    /// has them: every family runs its portable kernel (`WGSPARSE_NO_COOP=1`).
    pub no_coop: bool,
}

/// Artificially lowered limits (testing knobs; see [`ContextOptions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    /// Bytes per storage binding.
    pub max_binding_bytes: Option<u64>,
    /// Bytes per buffer.
    pub max_buffer_bytes: Option<u64>,
    /// Bytes of workgroup memory.
    pub max_workgroup_bytes: Option<u32>,
    /// Matrix-unit kernels off.
    pub no_coop: bool,
}

impl ContextOptions {
    /// The limit overrides of these options.
    pub fn overrides(&self) -> LimitOverrides {
        LimitOverrides {
            max_binding_bytes: self.max_binding_bytes,
            max_buffer_bytes: self.max_buffer_bytes,
            max_workgroup_bytes: self.max_workgroup_bytes,
            no_coop: self.no_coop,
        }
    }

    /// Reads `WGSPARSE_BACKEND`, `WGSPARSE_ADAPTER`, `WGSPARSE_REQUIRE_GPU`,
    /// `WGSPARSE_MAX_BINDING_BYTES`, `WGSPARSE_MAX_BUFFER_BYTES`,
    /// `WGSPARSE_MAX_WORKGROUP_BYTES` and
    /// `WGSPARSE_NO_COOP`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let backend = match var("WGSPARSE_BACKEND") {
            Some(b) => b.parse()?,
            None => Backend::Auto,
        };
        fn number<T: FromStr>(name: &str, v: Option<String>) -> Result<Option<T>> {
            v.map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|_| Error::InvalidArgument(format!("{name}=`{v}` is not a number")))
            })
            .transpose()
        }
        let max_binding_bytes = number(
            "WGSPARSE_MAX_BINDING_BYTES",
            var("WGSPARSE_MAX_BINDING_BYTES"),
        )?;
        let max_buffer_bytes = number(
            "WGSPARSE_MAX_BUFFER_BYTES",
            var("WGSPARSE_MAX_BUFFER_BYTES"),
        )?;
        let max_workgroup_bytes = number(
            "WGSPARSE_MAX_WORKGROUP_BYTES",
            var("WGSPARSE_MAX_WORKGROUP_BYTES"),
        )?;
        Ok(Self {
            backend,
            adapter_name: var("WGSPARSE_ADAPTER"),
            require_gpu: matches!(
                var("WGSPARSE_REQUIRE_GPU").as_deref(),
                Some("1" | "true" | "yes")
            ),
            max_binding_bytes,
            max_buffer_bytes,
            max_workgroup_bytes,
            no_coop: matches!(
                var("WGSPARSE_NO_COOP").as_deref(),
                Some("1" | "true" | "yes")
            ),
        })
    }
    /// Overrides the backend (the CLI's `--backend`), keeping the rest.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
}

/// A cooperative-matrix shape the adapter offers (`m×n×k`, operand and accumulator types).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CoopMatrixShape {
    /// Rows of A and C.
    pub m: u32,
    /// Columns of B and C.
    pub n: u32,
    /// Inner dimension.
    pub k: u32,
    /// Type of A and B (`f16`, `f32`, ...).
    pub ab: String,
    /// Type of C and the result.
    pub cr: String,
}

/// What the device can do, read from the adapter (and, for limits, lowered by options).
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    /// `shader-f16`: f16 arithmetic in WGSL.
    pub f16: bool,
    /// `pack2x16float` / `unpack2x16float` work, so f16 tensors can be stored (two per
    /// `u32`) even without `shader-f16` (downlevel flag `SHADER_F16_IN_F32`).
    pub f16_storage: bool,
    /// Subgroup operations (native only through wgpu).
    pub subgroups: bool,
    /// Smallest subgroup size the adapter may use.
    pub subgroup_min_size: u32,
    /// Largest subgroup size.
    pub subgroup_max_size: u32,
    /// Cooperative-matrix shapes (empty when the feature is absent).
    pub coop_matrix: Vec<CoopMatrixShape>,
    /// The square tile (16 or 8) of f16 × f16 → f32 cooperative matrices the
    /// matrix-unit kernels use, or `None`: no such shape, no f16 or subgroup support,
    /// or turned off ([`ContextOptions::no_coop`]). The one place kernels are chosen
    /// from; [`Capabilities::coop_status`] says why.
    pub coop_tile: Option<u32>,
    /// Timestamp queries at pass boundaries.
    pub timestamps: bool,
    /// WGSL's `packed_4x8_integer_dot_product` language feature (`dot4I8Packed`):
    /// always on native wgpu (naga lowers it to the hardware instruction or a
    /// polyfill), what the browser reports on the web. `WGSPARSE_NO_INT_DOT4=1` turns it
    /// off (tests of the plain-integer variants).
    pub int_dot4: bool,
    /// Bytes per storage binding this crate plans with (the adapter's, or lower).
    pub max_storage_binding: u64,
    /// The adapter's own storage-binding limit.
    pub adapter_max_storage_binding: u64,
    /// Largest buffer.
    pub max_buffer: u64,
    /// Workgroup (shared) memory in bytes.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Workgroups per dispatch axis.
    pub max_workgroups_per_dim: u32,
    /// Storage buffers per shader stage.
    pub max_storage_buffers_per_stage: u32,
    /// Alignment of storage-binding offsets.
    pub storage_offset_alignment: u32,
}

impl Capabilities {
    /// What the CPU path reports: no GPU features, host-sized limits.
    fn cpu() -> Self {
        Capabilities {
            f16: true,
            f16_storage: true,
            subgroups: false,
            int_dot4: false,
            subgroup_min_size: 0,
            subgroup_max_size: 0,
            coop_matrix: vec![],
            coop_tile: None,
            timestamps: false,
            max_storage_binding: u64::MAX,
            adapter_max_storage_binding: u64::MAX,
            max_buffer: u64::MAX,
            max_workgroup_storage: 0,
            max_invocations: 0,
            max_workgroups_per_dim: u32::MAX,
            max_storage_buffers_per_stage: u32::MAX,
            storage_offset_alignment: 1,
        }
    }

    /// What `adapter` can do with `features` and `limits` (an opened device's, or the
    /// adapter's own).
    fn of(
        adapter: &wgpu::Adapter,
        features: wgpu::Features,
        limits: &wgpu::Limits,
        overrides: LimitOverrides,
    ) -> Self {
        Capabilities::from_adapter(
            features,
            adapter.get_downlevel_capabilities().flags,
            limits,
            &adapter.get_info(),
            &adapter.cooperative_matrix_properties(),
            overrides,
        )
    }

    fn from_adapter(
        features: wgpu::Features,
        downlevel: wgpu::DownlevelFlags,
        limits: &wgpu::Limits,
        info: &wgpu::AdapterInfo,
        coop: &[wgpu::CooperativeMatrixProperties],
        overrides: LimitOverrides,
    ) -> Self {
        let adapter_binding = limits.max_storage_buffer_binding_size;
        let workgroup = overrides
            .max_workgroup_bytes
            .map(|m| m.min(limits.max_compute_workgroup_storage_size))
            .unwrap_or(limits.max_compute_workgroup_storage_size);
        let planned = overrides
            .max_binding_bytes
            .map(|m| m.min(adapter_binding))
            .unwrap_or(adapter_binding);
        let mut caps = Capabilities {
            f16: features.contains(wgpu::Features::SHADER_F16),
            f16_storage: downlevel.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            coop_matrix: if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
                coop.iter()
                    .map(|c| CoopMatrixShape {
                        m: c.m_size,
                        n: c.n_size,
                        k: c.k_size,
                        ab: format!("{:?}", c.ab_type).to_lowercase(),
                        cr: format!("{:?}", c.cr_type).to_lowercase(),
                    })
                    .collect()
            } else {
                vec![]
            },
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            int_dot4: int_dot4_available(info.backend),
            max_storage_binding: planned,
            adapter_max_storage_binding: adapter_binding,
            max_buffer: overrides
                .max_buffer_bytes
                .map(|m| m.min(limits.max_buffer_size))
                .unwrap_or(limits.max_buffer_size),
            max_workgroup_storage: workgroup,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_stage: limits.max_storage_buffers_per_shader_stage,
            storage_offset_alignment: limits.min_storage_buffer_offset_alignment,
            coop_tile: None,
        };
        if !overrides.no_coop {
            caps.coop_tile = caps.coop_f16_tile();
        }
        caps
    }

    /// The largest square f16 × f16 → f32 tile (16, else 8) the adapter offers, when it
    /// also has f16 arithmetic and subgroups (the kernels use both).
    fn coop_f16_tile(&self) -> Option<u32> {
        if !self.f16 || !self.subgroups {
            return None;
        }
        [16, 8].into_iter().find(|&t| {
            self.coop_matrix
                .iter()
                .any(|s| s.m == t && s.n == t && s.k == t && s.ab == "f16" && s.cr == "f32")
        })
    }

    /// The coop tile for a matrix-unit kernel of `threads` invocations that needs
    /// `workgroup_bytes` of workgroup memory: [`Capabilities::coop_tile`] where that memory
    /// fits and the subgroups divide the threads, else `None` (the portable kernel).
    /// Every kernel family that has no tiling choice of its own decides here.
    pub fn coop_tile_for(&self, workgroup_bytes: u32, threads: u32) -> Option<usize> {
        self.coop_tile.map(|t| t as usize).filter(|_| {
            workgroup_bytes <= self.max_workgroup_storage
                && threads.is_multiple_of(self.subgroup_max_size.max(1))
        })
    }

    /// A device for the kernel-choice unit tests: the CPU context's capabilities with a
    /// coop tile, workgroup memory and subgroup size of the caller's choice.
    #[cfg(test)]
    pub(crate) fn fake(coop: Option<u32>, workgroup: u32, subgroup: u32) -> Self {
        let mut c = Context::cpu().capabilities().clone();
        c.coop_tile = coop;
        c.max_workgroup_storage = workgroup;
        c.max_invocations = 1024;
        c.subgroup_min_size = subgroup;
        c.subgroup_max_size = subgroup;
        c
    }

    /// Which attention kernels this device runs and why: `matrix units, 16x16 tiles` or
    /// the reason for the portable kernels.
    pub fn coop_status(&self) -> String {
        match self.coop_tile {
            Some(t) => format!("matrix units ({t}x{t} f16 tiles, f32 accumulation)"),
            None if self.coop_matrix.is_empty() => {
                "portable (no cooperative matrices on this adapter)".into()
            }
            None if self.coop_f16_tile().is_some() => "portable (turned off: WGSPARSE_NO_COOP)".into(),
            None => "portable (no square f16 x f16 -> f32 cooperative-matrix shape with f16 and subgroups)".into(),
        }
    }
}

/// One adapter as `wgsparse info` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterSummary {
    /// Adapter name (e.g. "NVIDIA H200", "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// API.
    pub backend: Backend,
    /// Discrete, integrated, virtual, CPU (software) or other.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Capabilities read from the adapter.
    pub capabilities: Capabilities,
}

/// The GPU half of a context.
pub struct GpuDevice {
    /// The adapter the device was opened on.
    pub adapter: wgpu::Adapter,
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// Adapter info.
    pub info: wgpu::AdapterInfo,
    /// Capabilities the plans choose variants from.
    pub caps: Capabilities,
    pub(crate) kernels: KernelCache,
    /// Compile with wgpu's runtime bounds checks and loop bounding (debugging aid,
    /// `WGSPARSE_CHECKED_SHADERS=1`; the browser always checks).
    pub checked_shaders: bool,
    /// A fault the device reported outside any error scope: its loss (sticky) or an
    /// out-of-memory (taken by the next check).
    pub(crate) fault: Arc<std::sync::Mutex<Option<Fault>>>,
    /// The most buffer memory seen live after a buffer the runtime created
    /// ([`GpuDevice::peak_buffer_bytes`]).
    peak_buffer_bytes: std::sync::atomic::AtomicU64,
}

/// What went wrong with a device outside the plans' own error scopes.
#[derive(Clone, Debug)]
pub(crate) enum Fault {
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    Lost(String),
    OutOfMemory(String),
}

impl GpuDevice {
    /// Bytes of GPU memory held by live buffers now, as wgpu-hal counts them (the crate's
    /// buffers and wgpu's own; 0 where the backend counts nothing: the browser's WebGPU).
    pub fn buffer_bytes(&self) -> u64 {
        self.device
            .get_internal_counters()
            .hal
            .buffer_memory
            .read()
            .max(0) as u64
    }

    /// The most [`GpuDevice::buffer_bytes`] seen right after any buffer the runtime
    /// created since the last [`GpuDevice::reset_peak_buffer_bytes`] (the peak of live
    /// buffer memory: it only grows when a buffer is made).
    pub fn peak_buffer_bytes(&self) -> u64 {
        self.peak_buffer_bytes
            .load(Ordering::Relaxed)
            .max(self.buffer_bytes())
    }

    /// Starts a new peak from the buffer memory live now.
    pub fn reset_peak_buffer_bytes(&self) {
        self.peak_buffer_bytes
            .store(self.buffer_bytes(), Ordering::Relaxed);
    }

    /// Creates a buffer and records the live buffer memory into the peak: every buffer of
    /// the crate is made here.
    pub(crate) fn create_buffer(&self, desc: &wgpu::BufferDescriptor<'_>) -> wgpu::Buffer {
        let buf = self.device.create_buffer(desc);
        self.peak_buffer_bytes
            .fetch_max(self.buffer_bytes(), Ordering::Relaxed);
        buf
    }

    /// `Err` when the device was lost ([`Error::DeviceLost`], every later call too) or
    /// ran out of memory since the last check ([`Error::OutOfMemory`], once).
    pub fn check(&self) -> Result<()> {
        let mut f = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        match f.clone() {
            None => Ok(()),
            Some(Fault::Lost(m)) => Err(Error::DeviceLost(m)),
            Some(Fault::OutOfMemory(m)) => {
                *f = None;
                Err(Error::OutOfMemory(m))
            }
        }
    }

    /// Records an out-of-memory unless the device is already lost.
    pub(crate) fn note_out_of_memory(fault: &std::sync::Mutex<Option<Fault>>, message: String) {
        let mut f = fault.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*f, Some(Fault::Lost(_))) {
            *f = Some(Fault::OutOfMemory(message));
        }
    }
}

pub(crate) enum DeviceKind {
    Gpu(Box<GpuDevice>),
    Cpu,
}

pub(crate) struct ContextInner {
    pub(crate) id: u64,
    pub(crate) kind: DeviceKind,
    pub(crate) cpu_caps: Capabilities,
    /// Why this device was chosen ([`Context::choice`]).
    pub(crate) reason: std::sync::Mutex<String>,
}

/// A compute device: a GPU through wgpu, or the CPU. Cheap to clone; several contexts can
/// live at once (one per GPU).
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({} on {})", self.adapter_name(), self.backend())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// wgpu features this crate uses when the adapter has them.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::SUBGROUP_BARRIER
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
}

fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Ranks adapters: real GPUs before software ones, native APIs before GL.
fn adapter_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::BrowserWebGpu => 1,
        _ => 2,
    };
    (ty, api)
}

/// Whether WGSL's packed 4×8 integer dot product may be used on this backend.
fn int_dot4_available(backend: wgpu::Backend) -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    if std::env::var("WGSPARSE_NO_INT_DOT4").is_ok_and(|v| v == "1") {
        return false;
    }
    if backend == wgpu::Backend::BrowserWebGpu {
        return browser_has_int_dot4();
    }
    true
}

/// `navigator.gpu.wgslLanguageFeatures.has("packed_4x8_integer_dot_product")`: the
/// browser's WGSL compiler decides.
#[cfg(target_arch = "wasm32")]
fn browser_has_int_dot4() -> bool {
    use js_sys::{Function, Reflect};
    let get = |o: &wasm_bindgen::JsValue, k: &str| Reflect::get(o, &k.into()).ok();
    let features = get(&js_sys::global().into(), "navigator")
        .and_then(|n| get(&n, "gpu"))
        .and_then(|g| get(&g, "wgslLanguageFeatures"));
    let Some(features) = features else {
        return false;
    };
    get(&features, "has")
        .and_then(|h| {
            Function::from(h)
                .call1(&features, &"packed_4x8_integer_dot_product".into())
                .ok()
        })
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

#[cfg(not(target_arch = "wasm32"))]
fn browser_has_int_dot4() -> bool {
    false
}

fn instance(backend: Backend) -> wgpu::Instance {
    instance_for(backend.wgpu_backends())
}

fn instance_for(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

async fn matching_adapters(opts: &ContextOptions) -> Vec<wgpu::Adapter> {
    if opts.backend == Backend::Cpu {
        return vec![];
    }
    let wanted = opts.backend.wgpu_backends();
    // `auto` asks the native APIs first and starts GL only when they have nothing (GL's
    // instance prints EGL/Wayland errors on machines without a display).
    let mut adapters = if opts.backend == Backend::Auto && !cfg!(target_arch = "wasm32") {
        let primary = wanted & wgpu::Backends::PRIMARY;
        let found = instance_for(primary).enumerate_adapters(primary).await;
        if found.is_empty() {
            let secondary = wanted & wgpu::Backends::SECONDARY;
            instance_for(secondary).enumerate_adapters(secondary).await
        } else {
            found
        }
    } else {
        instance(opts.backend).enumerate_adapters(wanted).await
    };
    if let Some(name) = &opts.adapter_name {
        let needle = name.to_lowercase();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&needle));
    }
    adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
    adapters
}

/// What [`Context::new`] opens, from the ranked adapters' infos.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The adapter at this index of the ranked list.
    Adapter(usize, String),
    /// The CPU path.
    Cpu(String),
    /// Nothing fits the options.
    None,
}

/// The device rule: the best-ranked adapter, except that with `auto` (no adapter named,
/// no GPU required) a software rasterizer (llvmpipe, SwiftShader, WARP: device type CPU)
/// loses to the crate's own multithreaded CPU path, which is faster on the same cores;
/// a backend asked for by name, an adapter name or `require_gpu` still gets it. In the
/// browser the adapter always wins (the WASM CPU path is slower than SwiftShader).
pub(crate) fn choose(opts: &ContextOptions, ranked: &[wgpu::AdapterInfo]) -> Choice {
    let free = opts.backend == Backend::Auto && opts.adapter_name.is_none() && !opts.require_gpu;
    match ranked.first() {
        None if free => Choice::Cpu("no GPU adapter found: the CPU path".into()),
        None => Choice::None,
        Some(a)
            if free && a.device_type == wgpu::DeviceType::Cpu && !cfg!(target_arch = "wasm32") =>
        {
            Choice::Cpu(format!(
                "the CPU path: the only adapter, {} ({}), is a software rasterizer on the same cores \
                 (ask for it with --backend {} or WGSPARSE_REQUIRE_GPU=1)",
                a.name,
                Backend::from_wgpu(a.backend),
                Backend::from_wgpu(a.backend)
            ))
        }
        Some(a) => {
            let why = if a.device_type == wgpu::DeviceType::Cpu {
                "a software adapter, as asked"
            } else {
                "the best-ranked GPU (discrete, integrated, virtual, then other; native APIs before GL)"
            };
            Choice::Adapter(
                0,
                format!("{} on {}: {why}", a.name, Backend::from_wgpu(a.backend)),
            )
        }
    }
}

impl Context {
    /// Opens the device the options ask for (async: the browser needs it).
    pub async fn new(opts: ContextOptions) -> Result<Self> {
        if opts.backend == Backend::Cpu {
            return Ok(Self::cpu());
        }
        let adapters = matching_adapters(&opts).await;
        let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
        match choose(&opts, &infos) {
            Choice::Cpu(reason) => Ok(Self::cpu().with_reason(reason)),
            Choice::Adapter(i, reason) => {
                let adapter = adapters.into_iter().nth(i).expect("a ranked adapter");
                Ok(Self::from_adapter(adapter, opts.overrides())
                    .await?
                    .with_reason(reason))
            }
            Choice::None => Err(Error::NoAdapter(
                match (&opts.backend, &opts.adapter_name) {
                    (Backend::Auto, None) => String::new(),
                    (b, None) => format!(" for backend {b}"),
                    (b, Some(n)) => format!(" for backend {b} named like `{n}`"),
                },
            )),
        }
    }

    /// Blocking version of [`Context::new`] (not on the web).
    pub fn new_blocking(opts: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::new(opts))
    }

    /// The CPU context.
    pub fn cpu() -> Self {
        Context {
            inner: Arc::new(ContextInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                kind: DeviceKind::Cpu,
                cpu_caps: Capabilities::cpu(),
                reason: std::sync::Mutex::new("the CPU path, asked for".into()),
            }),
        }
    }

    /// Opens a device on this adapter with every feature we use that it has and its real
    /// limits (never the 128 MiB WebGPU defaults); `overrides` lowers the limits the
    /// plans use (tests).
    pub async fn from_adapter(adapter: wgpu::Adapter, overrides: LimitOverrides) -> Result<Self> {
        let features = adapter.features() & wanted_features();
        let limits = adapter.limits();
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: cooperative matrix is only used by kernels chosen from the
            // capabilities read below; wgpu asks for this opt-in for experimental features.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgsparse device"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await?;
        Ok(Self::wrap(adapter, device, queue, overrides))
    }

    /// Wraps a device that the host application already has. The capabilities are read
    /// from the device's own features and limits (what it was opened with).
    pub fn from_wgpu(adapter: wgpu::Adapter, device: wgpu::Device, queue: wgpu::Queue) -> Self {
        Self::wrap(adapter, device, queue, LimitOverrides::default())
    }

    fn wrap(
        adapter: wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
        overrides: LimitOverrides,
    ) -> Self {
        let info = adapter.get_info();
        let caps = Capabilities::of(&adapter, device.features(), &device.limits(), overrides);
        log::info!(
            "wgsparse: {} ({:?}) caps {:?}",
            info.name,
            info.backend,
            caps
        );
        let fault = Arc::new(std::sync::Mutex::new(None));
        // Natively only: in a browser the device-lost promise also resolves when a wgpu
        // instance the page no longer holds is collected ("A valid external Instance
        // reference no longer exists") while the device goes on working, so a loss there
        // stays wgpu's own error.
        #[cfg(not(target_arch = "wasm32"))]
        {
            let lost = fault.clone();
            device.set_device_lost_callback(move |reason, message| {
                log::error!("wgpu: device lost ({reason:?}): {message}");
                *lost.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Fault::Lost(format!("{reason:?}: {message}")));
            });
        }
        let oom = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e| {
            log::error!("wgpu: {e}");
            if let wgpu::Error::OutOfMemory { .. } = e {
                GpuDevice::note_out_of_memory(&oom, e.to_string());
            }
        }));
        Context {
            inner: Arc::new(ContextInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                kind: DeviceKind::Gpu(Box::new(GpuDevice {
                    adapter,
                    device,
                    queue,
                    info,
                    caps,
                    kernels: KernelCache::default(),
                    checked_shaders: std::env::var("WGSPARSE_CHECKED_SHADERS")
                        .is_ok_and(|v| v == "1" || v == "true"),
                    fault,
                    peak_buffer_bytes: Default::default(),
                })),
                cpu_caps: Capabilities::cpu(),
                reason: std::sync::Mutex::new("the adapter given".into()),
            }),
        }
    }

    /// Why this device was chosen (`wgsparse info` prints it).
    pub fn choice(&self) -> String {
        self.inner.reason.lock().expect("reason lock").clone()
    }

    fn with_reason(self, reason: String) -> Self {
        log::info!("device: {reason}");
        *self.inner.reason.lock().expect("reason lock") = reason;
        self
    }

    /// Lists every adapter wgpu sees (all APIs), plus the CPU path, without opening devices.
    pub async fn list_adapters() -> Vec<AdapterSummary> {
        let opts = ContextOptions::default();
        let mut out: Vec<AdapterSummary> = matching_adapters(&opts)
            .await
            .into_iter()
            .map(|a| {
                let info = a.get_info();
                let caps = Capabilities::of(&a, a.features(), &a.limits(), Default::default());
                AdapterSummary {
                    name: info.name.clone(),
                    backend: Backend::from_wgpu(info.backend),
                    device_type: device_type_name(info.device_type).into(),
                    driver: format!("{} {}", info.driver, info.driver_info)
                        .trim()
                        .to_string(),
                    capabilities: caps,
                }
            })
            .collect();
        out.push(AdapterSummary {
            name: format!("CPU ({} threads)", rayon::current_num_threads()),
            backend: Backend::Cpu,
            device_type: "cpu".into(),
            driver: "wgsparse rayon path".into(),
            capabilities: Capabilities::cpu(),
        });
        out
    }

    /// Opens one context per GPU adapter found (for multi-GPU hosts).
    pub async fn all_gpus() -> Result<Vec<Context>> {
        let mut out = vec![];
        for a in matching_adapters(&ContextOptions::default()).await {
            out.push(Self::from_adapter(a, LimitOverrides::default()).await?);
        }
        Ok(out)
    }

    /// The GPU device, or `None` on the CPU path.
    pub fn gpu(&self) -> Option<&GpuDevice> {
        match &self.inner.kind {
            DeviceKind::Gpu(g) => Some(g),
            DeviceKind::Cpu => None,
        }
    }

    /// True on the CPU path.
    pub fn is_cpu(&self) -> bool {
        self.gpu().is_none()
    }

    /// The API in use.
    pub fn backend(&self) -> Backend {
        match self.gpu() {
            Some(g) => Backend::from_wgpu(g.info.backend),
            None => Backend::Cpu,
        }
    }

    /// The adapter's name (or "CPU (n threads)").
    pub fn adapter_name(&self) -> String {
        match self.gpu() {
            Some(g) => g.info.name.clone(),
            None => format!("CPU ({} threads)", rayon::current_num_threads()),
        }
    }

    /// Capabilities the plans choose kernel variants from.
    pub fn capabilities(&self) -> &Capabilities {
        match self.gpu() {
            Some(g) => &g.caps,
            None => &self.inner.cpu_caps,
        }
    }

    /// Two handles to the same device compare equal.
    pub fn same_device(&self, other: &Context) -> bool {
        self.inner.id == other.inner.id
    }
}

impl Context {
    /// Compiles a kernel once per (file, entry, variant) and caches it on this context.
    pub fn kernel(&self, spec: &KernelSpec) -> Result<Arc<Kernel>> {
        let g = self
            .gpu()
            .ok_or_else(|| Error::InvalidArgument("kernels need a GPU context".into()))?;
        g.kernels.get(&g.device, g.checked_shaders, spec)
    }

    /// Number of pipelines compiled so far on this context.
    pub fn cached_pipelines(&self) -> usize {
        self.gpu().map(|g| g.kernels.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for b in [
            Backend::Auto,
            Backend::Vulkan,
            Backend::Metal,
            Backend::Dx12,
            Backend::Gl,
            Backend::Cpu,
        ] {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
        }
        assert!(matches!(
            "cuda".parse::<Backend>(),
            Err(Error::UnknownBackend(_))
        ));
    }

    #[test]
    fn cpu_context_is_cpu() {
        let c =
            Context::new_blocking(ContextOptions::default().with_backend(Backend::Cpu)).unwrap();
        assert!(c.is_cpu());
        assert_eq!(c.backend(), Backend::Cpu);
        assert!(!c.same_device(&Context::cpu()));
    }

    /// The device rule on fake adapter lists: a real GPU wins; with `auto` a software
    /// rasterizer loses to the CPU path, unless a backend or adapter is named or a GPU
    /// is required; an empty list falls back to the CPU only with `auto`.
    #[test]
    fn device_choice_from_fake_adapter_lists() {
        let adapter = |name: &str, ty, backend| wgpu::AdapterInfo {
            name: name.into(),
            device_type: ty,
            backend,
            ..info(32)
        };
        let llvmpipe = adapter("llvmpipe", wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan);
        let gpu = adapter(
            "NVIDIA H200",
            wgpu::DeviceType::DiscreteGpu,
            wgpu::Backend::Vulkan,
        );
        let igpu = adapter("Intel", wgpu::DeviceType::IntegratedGpu, wgpu::Backend::Gl);
        let auto = ContextOptions::default();
        let rank = |mut v: Vec<wgpu::AdapterInfo>| {
            v.sort_by_key(adapter_rank);
            v
        };
        let all = rank(vec![llvmpipe.clone(), igpu.clone(), gpu.clone()]);
        assert_eq!(all[0].name, "NVIDIA H200");
        assert!(matches!(choose(&auto, &all), Choice::Adapter(0, r) if r.contains("H200")));
        assert!(matches!(
            choose(&auto, &rank(vec![llvmpipe.clone(), igpu])),
            Choice::Adapter(0, r) if r.contains("Intel")
        ));
        let soft = [llvmpipe];
        assert!(matches!(choose(&auto, &soft), Choice::Cpu(r) if r.contains("llvmpipe")));
        for asked in [
            ContextOptions {
                backend: Backend::Vulkan,
                ..Default::default()
            },
            ContextOptions {
                require_gpu: true,
                ..Default::default()
            },
            ContextOptions {
                adapter_name: Some("llvm".into()),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(choose(&asked, &soft), Choice::Adapter(0, _)),
                "{asked:?}"
            );
            assert_eq!(choose(&asked, &[]), Choice::None, "{asked:?}");
        }
        assert!(matches!(choose(&auto, &[]), Choice::Cpu(_)));
    }

    fn info(subgroup: u32) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            name: "fake".into(),
            vendor: 0,
            device: 0,
            device_type: wgpu::DeviceType::DiscreteGpu,
            device_pci_bus_id: String::new(),
            driver: String::new(),
            driver_info: String::new(),
            backend: wgpu::Backend::Vulkan,
            subgroup_min_size: subgroup,
            subgroup_max_size: subgroup,
            transient_saves_memory: None,
            limit_bucket: None,
        }
    }

    fn shape(t: u32, cr: wgpu::CooperativeScalarType) -> wgpu::CooperativeMatrixProperties {
        wgpu::CooperativeMatrixProperties {
            m_size: t,
            n_size: t,
            k_size: t,
            ab_type: wgpu::CooperativeScalarType::F16,
            cr_type: cr,
            saturating_accumulation: false,
        }
    }

    /// The matrix-unit tile comes from the device's features and shapes, from nothing
    /// else: no feature (DX12, GL, the browser, a device opened without it) or no f16
    /// accumulate-in-f32 shape means no coop path; `no_coop` turns it off.
    #[test]
    fn coop_tile_follows_features_shapes_and_the_switch() {
        use wgpu::CooperativeScalarType::{F16, F32};
        let all = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let limits = wgpu::Limits::default();
        let dl = wgpu::DownlevelFlags::all();
        let caps = |features, shapes: &[wgpu::CooperativeMatrixProperties], no_coop| {
            let o = LimitOverrides {
                no_coop,
                ..Default::default()
            };
            Capabilities::from_adapter(features, dl, &limits, &info(32), shapes, o)
        };
        let nv = [shape(16, F16), shape(16, F32), shape(8, F32)];
        let lvp = [shape(8, F16), shape(8, F32)];
        assert_eq!(caps(all, &nv, false).coop_tile, Some(16));
        assert_eq!(caps(all, &lvp, false).coop_tile, Some(8));
        assert_eq!(caps(all, &[shape(8, F16)], false).coop_tile, None);
        assert_eq!(caps(all, &nv, true).coop_tile, None);
        assert!(
            caps(all, &nv, true)
                .coop_status()
                .contains("WGSPARSE_NO_COOP")
        );
        let no_feature = all - wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        assert_eq!(caps(no_feature, &nv, false).coop_tile, None);
        assert!(caps(no_feature, &nv, false).coop_matrix.is_empty());
        let no_f16 = all - wgpu::Features::SHADER_F16;
        assert_eq!(caps(no_f16, &nv, false).coop_tile, None);
        let no_subgroups = all - wgpu::Features::SUBGROUP;
        assert_eq!(caps(no_subgroups, &nv, false).coop_tile, None);
        assert_eq!(Capabilities::cpu().coop_tile, None);
    }
}
