//! Attention plans: built once for a shape and a [`Method`], run many times, with the
//! same API on a GPU and on the CPU.
//!
//! ```no_run
//! use wgsparse::{AttentionShape, Context, ContextOptions, DType, Method, Tensor};
//! let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
//! let shape = AttentionShape::new(32, 8, 4096, 128);
//! let plan = ctx.attention(shape).method(Method::Dense).dtype(DType::F16).build()?;
//! let (q, k, v) = wgsparse::attention::synthetic::qkv(&ctx, &shape, DType::F16, 7)?;
//! let out = plan.run(&q, &k, &v)?;
//! println!("{:?}", plan.report());
//! # Ok::<(), wgsparse::Error>(())
//! ```

pub mod budgets;
pub mod decode;
pub mod decode_cpu;
pub mod flash;
pub mod flash_cpu;
pub mod grouped;
pub mod lut;
pub mod method;
pub mod metrics;
pub mod params;
pub mod plan;
pub mod qkv_file;
pub mod select;
pub mod sparse;
pub mod split;
pub mod synthetic;
pub mod tune;
pub mod verify;

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::runtime::context::{Backend, Context};
use crate::runtime::tensor::{DType, HostData, Tensor};
use crate::runtime::{Recorder, Report, StageTime};
use flash::{ExecConfig, FlashGpu, FlashIo, KeyMode};
use flash_cpu::{CpuAttention, HostRowState, attention_cpu};
pub use grouped::GroupedAttention;
use lut::{LutUnit, SparseLut};
pub use method::{Method, MethodStats};
pub use select::window::WindowConfig;
use sparse::SparseGpu;

/// The largest head dimension the kernels take (any multiple of 16 up to it).
pub const MAX_HEAD_DIM: usize = 256;

/// Sizes of one attention problem (batch 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AttentionShape {
    /// Query heads (a multiple of `kv_heads`: GQA).
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query rows.
    pub seq_len: usize,
    /// Keys (≥ `seq_len` when causal; the queries are the last `seq_len` positions).
    pub kv_len: usize,
    /// Head dimension: a multiple of 16 up to [`MAX_HEAD_DIM`] (64, 80, 96, 112, 128, 256 in real models).
    pub head_dim: usize,
}

impl AttentionShape {
    /// Prefill shape: as many keys as queries.
    pub fn new(q_heads: usize, kv_heads: usize, seq_len: usize, head_dim: usize) -> Self {
        AttentionShape {
            q_heads,
            kv_heads,
            seq_len,
            kv_len: seq_len,
            head_dim,
        }
    }

    /// The same shape with `kv_len` keys (a prefix cache before the queries, or fewer
    /// keys than queries).
    pub fn with_kv_len(self, kv_len: usize) -> Self {
        AttentionShape { kv_len, ..self }
    }

    /// Checks the shape; a typed error says what is wrong.
    pub fn validate(&self, causal: bool) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidShape(m));
        if self.q_heads == 0 || self.kv_heads == 0 || self.seq_len == 0 || self.kv_len == 0 {
            return bad(format!("every size must be positive: {self:?}"));
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "q_heads {} is not a multiple of kv_heads {}",
                self.q_heads, self.kv_heads
            ));
        }
        if !(16..=MAX_HEAD_DIM).contains(&self.head_dim) || !self.head_dim.is_multiple_of(16) {
            return bad(format!(
                "head_dim {} is not a multiple of 16 from 16 to {MAX_HEAD_DIM}",
                self.head_dim
            ));
        }
        if causal && self.kv_len < self.seq_len {
            return bad(format!(
                "causal attention needs kv_len ({}) >= seq_len ({})",
                self.kv_len, self.seq_len
            ));
        }
        let elems =
            self.q_heads as u64 * self.seq_len.max(self.kv_len) as u64 * self.head_dim as u64;
        if elems > u32::MAX as u64 {
            return bad(format!(
                "{elems} elements per tensor exceed the 32-bit index range"
            ));
        }
        Ok(())
    }

    /// `[q_heads, seq_len, head_dim]`.
    pub fn q_dims(&self) -> [usize; 3] {
        [self.q_heads, self.seq_len, self.head_dim]
    }
    /// `[kv_heads, kv_len, head_dim]`.
    pub fn kv_dims(&self) -> [usize; 3] {
        [self.kv_heads, self.kv_len, self.head_dim]
    }

    /// Query–key pairs attended (the causal triangle, or the full rectangle).
    pub fn pairs(&self, causal: bool) -> f64 {
        let (n, nk) = (self.seq_len as f64, self.kv_len as f64);
        let per_head = if causal {
            n * (nk - n) + n * (n + 1.0) / 2.0
        } else {
            n * nk
        };
        per_head * self.q_heads as f64
    }

    /// FLOPs of dense attention (2 matmuls of 2 FLOPs per multiply-add).
    pub fn flops(&self, causal: bool) -> f64 {
        4.0 * self.pairs(causal) * self.head_dim as f64
    }
}

/// Uploads host Q (`[q_heads, seq_len, d]`) and K, V (`[kv_heads, kv_len, d]`) of a
/// shape to `ctx`, stored as `dtype`. A NaN, an infinity or (f16) a value beyond f16's
/// range is refused with [`Error::NonFinite`]: attention over it would be NaN.
pub fn upload_qkv(
    ctx: &Context,
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let f16 = dtype == DType::F16;
    for (what, x) in [("Q", q), ("K", k), ("V", v)] {
        crate::error::check_finite(what, x, f16)?;
    }
    Ok((
        Tensor::from_f32(ctx, &shape.q_dims(), q, dtype)?,
        Tensor::from_f32(ctx, &shape.kv_dims(), k, dtype)?,
        Tensor::from_f32(ctx, &shape.kv_dims(), v, dtype)?,
    ))
}

/// Options of an attention plan.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionOptions {
    /// Causal masking (default true).
    pub causal: bool,
    /// Storage dtype of Q, K, V and the output (f32 or f16; accumulation is f32).
    pub dtype: DType,
    /// Softmax scale; `None` = 1/√head_dim.
    pub scale: Option<f32>,
    /// `run_with_state` starts the rows from the given state instead of an empty one.
    pub import_state: bool,
    /// Forces this flash kernel (tuning, tests) instead of the choice from the
    /// capabilities and the tuning table; it must be one the device can run.
    pub kernel: Option<flash::FlashKernel>,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            causal: true,
            dtype: DType::F32,
            scale: None,
            import_state: false,
            kernel: None,
        }
    }
}

impl AttentionOptions {
    /// The softmax scale for a shape.
    pub fn scale_for(&self, shape: &AttentionShape) -> f32 {
        self.scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt())
    }
}

/// The online-softmax state of every row: `ml` `[q_heads, seq_len, 2]` holds (m, l),
/// `acc` `[q_heads, seq_len, head_dim]` the unnormalized output, both f32. Sparse methods
/// compute one part of a row exactly, export this, and continue it with another kernel.
#[derive(Debug)]
pub struct RowState {
    /// Running max and sum per row.
    pub ml: Tensor,
    /// Unnormalized output per row.
    pub acc: Tensor,
}

impl RowState {
    /// The empty state (m = -1e30, l = 0, acc = 0) on a context.
    pub fn empty(ctx: &Context, shape: &AttentionShape) -> Result<Self> {
        let h = HostRowState::empty(shape);
        Ok(RowState {
            ml: Tensor::from_f32(ctx, &[shape.q_heads, shape.seq_len, 2], &h.ml, DType::F32)?,
            acc: Tensor::from_f32(ctx, &shape.q_dims(), &h.acc, DType::F32)?,
        })
    }
}

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionReport {
    /// Method name.
    pub method: String,
    /// Backend that ran it.
    pub backend: Backend,
    /// Per-stage timing.
    pub timing: Report,
    /// Fraction of causal query–key pairs computed (1.0 for dense; sparse methods
    /// count every pair they compute, AnchorAttention's anchor region included).
    pub density: f64,
    /// Dispatches recorded (GPU) or tasks (CPU).
    pub dispatches: usize,
    /// A sparse method's details (AnchorAttention: anchor vs stripe pairs, stripes per
    /// group; SALE: exact vs selected pairs, blocks per head), serialized under the
    /// method's name.
    #[serde(flatten)]
    pub stats: Option<MethodStats>,
}

impl AttentionReport {
    /// Milliseconds of the run (GPU timestamps where present, else wall clock).
    pub fn ms(&self) -> f64 {
        self.timing.ms()
    }

    /// Milliseconds of the stages that choose the pattern rather than compute
    /// attention (SALE: quantize, estimate, compact; AnchorAttention: pool, select,
    /// compact); `None` for methods without such stages or without stage times.
    pub fn estimation_ms(&self) -> Option<f64> {
        const NAMES: [&str; 5] = ["quantize", "estimate", "pool", "select", "compact"];
        let mut total = None;
        for s in &self.timing.stages {
            if NAMES.contains(&s.name.as_str()) {
                *total.get_or_insert(0.0) += s.ms?;
            }
        }
        total
    }
}

/// Starts building an [`AttentionPlan`]; see [`Context::attention`].
pub struct AttentionPlanBuilder {
    ctx: Context,
    shape: AttentionShape,
    method: Method,
    opts: AttentionOptions,
}

impl Context {
    /// Starts an attention plan for `shape` on this context.
    pub fn attention(&self, shape: AttentionShape) -> AttentionPlanBuilder {
        AttentionPlanBuilder {
            ctx: self.clone(),
            shape,
            method: Method::Dense,
            opts: AttentionOptions::default(),
        }
    }
}

impl AttentionPlanBuilder {
    /// Algorithm.
    pub fn method(mut self, m: Method) -> Self {
        self.method = m;
        self
    }
    /// Causal masking.
    pub fn causal(mut self, c: bool) -> Self {
        self.opts.causal = c;
        self
    }
    /// Storage dtype.
    pub fn dtype(mut self, d: DType) -> Self {
        self.opts.dtype = d;
        self
    }
    /// Softmax scale.
    pub fn scale(mut self, s: f32) -> Self {
        self.opts.scale = Some(s);
        self
    }
    /// Forces the flash kernel (see [`AttentionOptions::kernel`]).
    pub fn kernel(mut self, k: flash::FlashKernel) -> Self {
        self.opts.kernel = Some(k);
        self
    }
    /// Start rows from the state passed to `run_with_state`.
    pub fn import_state(mut self, on: bool) -> Self {
        self.opts.import_state = on;
        self
    }
    /// All options at once.
    pub fn options(mut self, o: AttentionOptions) -> Self {
        self.opts = o;
        self
    }
    /// Validates, compiles the kernels and allocates the intermediates.
    pub fn build(self) -> Result<AttentionPlan> {
        self.shape.validate(self.opts.causal)?;
        if !matches!(self.opts.dtype, DType::F32 | DType::F16) {
            return Err(Error::UnsupportedDtype(self.opts.dtype, "attention"));
        }
        if let Some(s) = self.opts.scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(Error::InvalidArgument(format!(
                "scale {s} must be finite and positive"
            )));
        }
        if self.opts.dtype == DType::F16 && !self.ctx.capabilities().f16_storage {
            return Err(Error::UnsupportedDtype(
                DType::F16,
                "attention on this device (no pack2x16float/unpack2x16float); use f32",
            ));
        }
        let (exec, lut, pairs) = method_setup(&self.method, &self.shape, &self.opts)?;
        let gpu = match (self.ctx.gpu(), self.method.selector()) {
            (None, _) => None,
            (Some(_), Some(sel)) => Some(GpuPlan::Sparse(SparseGpu::build(
                &self.ctx,
                &self.shape,
                &self.opts,
                sel,
            )?)),
            (Some(g), None) => {
                let exec = FlashGpu::build(&self.ctx, &self.shape, &self.opts, &exec)?;
                let lut = match &lut {
                    None => None,
                    Some(l) => Some(upload_lut(&self.ctx, g, l)?),
                };
                Some(GpuPlan::Exec { exec, lut })
            }
        };
        Ok(AttentionPlan {
            ctx: self.ctx,
            shape: self.shape,
            method: self.method,
            opts: self.opts,
            gpu,
            lut,
            pairs,
            last: Mutex::new(None),
            cpu_selection: Mutex::new(None),
            cpu_row_stats: Mutex::new(None),
        })
    }
}

/// The executor configuration, the LUT and the computed pairs (when static) of a
/// method, after checking the method against the shape and options.
fn method_setup(
    method: &Method,
    shape: &AttentionShape,
    opts: &AttentionOptions,
) -> Result<(ExecConfig, Option<Arc<SparseLut>>, Option<u64>)> {
    let sparse_needs_square = || {
        if shape.kv_len != shape.seq_len {
            return Err(Error::InvalidShape(format!(
                "{} attention needs as many keys as queries (prefill), got {} and {}",
                method.name(),
                shape.kv_len,
                shape.seq_len
            )));
        }
        Ok(())
    };
    if let Some(sel) = method.selector() {
        sel.validate(shape)?;
        sparse_needs_square()?;
        if !opts.causal {
            return Err(Error::InvalidArgument(format!(
                "{} attention is a causal (prefill) method",
                method.name()
            )));
        }
        if opts.import_state {
            return Err(Error::InvalidArgument(format!(
                "{} attention starts from an empty row state (import_state is for the executors)",
                method.name()
            )));
        }
        return Ok((ExecConfig::default(), None, None));
    }
    Ok(match method {
        Method::Dense => (ExecConfig::default(), None, None),
        Method::Window(w) => {
            sparse_needs_square()?;
            if w.window == 0 || !opts.causal {
                return Err(Error::InvalidArgument(
                    "window attention needs causal masking and a window of at least 1 key".into(),
                ));
            }
            let lut = Arc::new(w.lut(shape.q_heads, shape.seq_len)?);
            let exec = ExecConfig {
                keys: KeyMode::Blocks {
                    q_block: lut.q_block,
                    key_block: 64,
                },
                window: w.window.min(u32::MAX as usize),
                sinks: w.sinks.min(u32::MAX as usize),
                ..Default::default()
            };
            (exec, Some(lut), Some(w.pairs(shape.q_heads, shape.seq_len)))
        }
        Method::BlockSparse(lut) | Method::Stripes(lut) => {
            sparse_needs_square()?;
            lut.validate(shape)?;
            let keys = match (method, lut.unit) {
                (Method::BlockSparse(_), LutUnit::Blocks(kb)) => KeyMode::Blocks {
                    q_block: lut.q_block,
                    key_block: kb,
                },
                (Method::Stripes(_), LutUnit::Keys) => KeyMode::Gather {
                    q_block: lut.q_block,
                },
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{} needs a LUT of {}",
                        method.name(),
                        if matches!(method, Method::BlockSparse(_)) {
                            "key blocks"
                        } else {
                            "key positions"
                        }
                    )));
                }
            };
            let exec = ExecConfig {
                keys,
                ..Default::default()
            };
            (exec, Some(lut.clone()), Some(lut.pairs(opts.causal)))
        }
        m => {
            return Err(Error::InvalidArgument(format!(
                "{} has no executor configuration",
                m.name()
            )));
        }
    })
}

/// The two LUT buffers (ranges, indices) on the GPU.
fn upload_lut(
    ctx: &Context,
    g: &crate::runtime::context::GpuDevice,
    lut: &SparseLut,
) -> Result<[wgpu::Buffer; 2]> {
    let limit = g.caps.max_storage_binding;
    if lut.gpu_bytes() > limit {
        return Err(Error::too_large("sparse LUT", lut.gpu_bytes(), limit));
    }
    crate::runtime::tensor::check_buffer_size(ctx, "sparse LUT", lut.gpu_bytes())?;
    let make = |label: &str, bytes: &[u8]| {
        let buf = g.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (bytes.len() as u64).max(16),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        g.queue.write_buffer(&buf, 0, bytes);
        buf
    };
    Ok([
        make("sparse lut ranges", bytemuck::cast_slice(&lut.ranges)),
        make("sparse lut indices", bytemuck::cast_slice(&lut.indices)),
    ])
}

/// What runs on a GPU context. (One per plan, never in a collection: the size
/// difference of the variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum GpuPlan {
    /// One executor pass (dense, window, fixed block or stripe LUT).
    Exec {
        exec: FlashGpu,
        lut: Option<[wgpu::Buffer; 2]>,
    },
    /// A selector on the two-pass sparse executor.
    Sparse(SparseGpu),
}

/// A built attention: run it many times on tensors of its shape.
pub struct AttentionPlan {
    ctx: Context,
    shape: AttentionShape,
    method: Method,
    opts: AttentionOptions,
    pub(crate) gpu: Option<GpuPlan>,
    /// The fixed LUT of window / block-sparse / stripe methods.
    lut: Option<Arc<SparseLut>>,
    /// Pairs computed, when the method fixes them (window, fixed LUTs).
    pairs: Option<u64>,
    last: Mutex<Option<AttentionReport>>,
    /// Sparse methods on the CPU: the LUTs of the last run.
    cpu_selection: Mutex<Option<Vec<SparseLut>>>,
    /// Sparse methods on the CPU: the final (m, l) of the last run.
    cpu_row_stats: Mutex<Option<Vec<f32>>>,
}

impl AttentionPlan {
    /// The shape the plan was built for.
    pub fn shape(&self) -> &AttentionShape {
        &self.shape
    }
    /// Its options.
    pub fn options(&self) -> &AttentionOptions {
        &self.opts
    }
    /// Its method.
    pub fn method(&self) -> &Method {
        &self.method
    }
    /// The context it runs on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The report of the last run.
    pub fn report(&self) -> Option<AttentionReport> {
        self.last.lock().expect("report lock").clone()
    }

    fn check(&self, t: &Tensor, dims: &[usize], dtype: DType, what: &str) -> Result<()> {
        if !t.context().same_device(&self.ctx) {
            return Err(Error::WrongContext);
        }
        if t.shape() != dims {
            return Err(Error::Mismatch(format!(
                "{what} has shape {:?}, the plan expects {dims:?}",
                t.shape()
            )));
        }
        if t.dtype() != dtype {
            return Err(Error::Mismatch(format!(
                "{what} is {:?}, the plan expects {dtype:?}",
                t.dtype()
            )));
        }
        Ok(())
    }

    /// Checks the inputs and the output against the plan's shape, dtype and device.
    fn check_io(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor) -> Result<()> {
        let dt = self.opts.dtype;
        self.check(q, &self.shape.q_dims(), dt, "q")?;
        self.check(k, &self.shape.kv_dims(), dt, "k")?;
        self.check(v, &self.shape.kv_dims(), dt, "v")?;
        self.check(out, &self.shape.q_dims(), dt, "output")
    }

    /// Runs and returns a new output tensor `[q_heads, seq_len, head_dim]`.
    pub fn run(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(&self.ctx, &self.shape.q_dims(), self.opts.dtype)?;
        self.run_into(q, k, v, &mut out)?;
        Ok(out)
    }

    /// Runs into an existing output tensor (blocking; not on the web).
    pub fn run_into(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &mut Tensor) -> Result<()> {
        pollster::block_on(self.run_async(q, k, v, out, None))
    }

    /// Runs continuing from / exporting to `state` (blocking; not on the web). With
    /// `import_state` the rows start from `state`; the final state is written back to it.
    pub fn run_with_state(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        state: &mut RowState,
    ) -> Result<()> {
        pollster::block_on(self.run_async(q, k, v, out, Some(state)))
    }

    /// The async run behind every other (the only one usable in a browser).
    pub async fn run_async(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        state: Option<&mut RowState>,
    ) -> Result<()> {
        self.check_io(q, k, v, out)?;
        if let Some(st) = &state {
            self.check(
                &st.ml,
                &[self.shape.q_heads, self.shape.seq_len, 2],
                DType::F32,
                "state.ml",
            )?;
            self.check(&st.acc, &self.shape.q_dims(), DType::F32, "state.acc")?;
        }
        if state.is_some() && self.method.manages_state() {
            return Err(Error::InvalidArgument(format!(
                "{} attention manages its own row state; run it without one",
                self.method.name()
            )));
        }
        let report = match &self.gpu {
            Some(gpu) => {
                let mut rec = Recorder::new(&self.ctx, "attention", self.stage_count())?;
                self.record_checked(&mut rec, [q, k, v], out, state.as_deref())?;
                let timing = rec.submit().await?;
                let (stats, dispatches) = match gpu {
                    GpuPlan::Exec { exec, .. } => (None, exec.dispatch_count()),
                    GpuPlan::Sparse(sp) => (Some(sp.stats(&self.ctx).await?), sp.dispatch_count()),
                };
                AttentionReport {
                    method: self.method.name().into(),
                    backend: self.ctx.backend(),
                    timing,
                    density: stats
                        .as_ref()
                        .map_or(self.static_density(), |s| s.density()),
                    dispatches,
                    stats,
                }
            }
            None => self.run_cpu([q, k, v], out, state)?,
        };
        *self.last.lock().expect("report lock") = Some(report);
        Ok(())
    }

    /// Density of methods whose pattern does not depend on the data.
    fn static_density(&self) -> f64 {
        match self.pairs {
            Some(p) => p as f64 / self.shape.pairs(self.opts.causal).max(1.0),
            None => 1.0,
        }
    }

    /// How many timed stages a run records (size a shared [`Recorder`] with it).
    pub fn stage_count(&self) -> u32 {
        match &self.gpu {
            Some(GpuPlan::Sparse(sp)) => sp.stage_count(),
            _ => 1,
        }
    }

    /// Records the attention into someone else's [`Recorder`] (GPU contexts only), so
    /// that a bigger plan (a decoder layer) submits it together with its own stages. The
    /// caller submits; [`AttentionPlan::report`] is not updated by a recorded run.
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
    ) -> Result<()> {
        self.check_io(q, k, v, out)?;
        self.record_checked(rec, [q, k, v], out, None)
    }

    fn record_checked(
        &self,
        rec: &mut Recorder<'_>,
        [q, k, v]: [&Tensor; 3],
        out: &Tensor,
        state: Option<&RowState>,
    ) -> Result<()> {
        let gpu = self.gpu.as_ref().ok_or_else(|| {
            Error::InvalidArgument("AttentionPlan::record needs a GPU context".into())
        })?;
        let buf = |t: &Tensor| t.buffer().expect("checked: same GPU context").clone();
        match gpu {
            GpuPlan::Exec { exec, lut } => {
                let st = state.map(|s| (buf(&s.ml), buf(&s.acc)));
                let io = FlashIo {
                    q: &buf(q),
                    k: &buf(k),
                    v: &buf(v),
                    o: &buf(out),
                    state: st.as_ref().map(|(a, b)| (a, std::slice::from_ref(b))),
                    lut: lut.as_ref().map(|[r, i]| (r, i)),
                };
                exec.record(&self.ctx, rec, self.method.name(), &io)
            }
            GpuPlan::Sparse(sp) => sp.record(
                &self.ctx,
                rec,
                [q, k, v, out].map(|t| t.buffer().expect("checked: same GPU context")),
            ),
        }
    }

    /// The keys the last run visited, as LUTs: the fixed LUT of window / block-sparse /
    /// stripe plans; for AnchorAttention the anchor pass's block LUT and the stripes it
    /// selected (read back from the GPU). `None` for dense (every key) or before a run.
    pub async fn selected_pattern(&self) -> Result<Option<Vec<SparseLut>>> {
        match (&self.method, &self.gpu) {
            (Method::Dense, _) => Ok(None),
            (_, Some(GpuPlan::Sparse(sp))) => {
                if self.report().is_none() {
                    return Ok(None);
                }
                let (exact, selected) = sp.selection(&self.ctx).await?;
                Ok(Some(vec![exact, selected]))
            }
            (m, _) if m.manages_state() => {
                Ok(self.cpu_selection.lock().expect("selection lock").clone())
            }
            _ => Ok(self.lut.as_ref().map(|l| vec![(**l).clone()])),
        }
    }

    /// The final (m, l) of every row of the last run `[q_heads, seq_len, 2]`, for
    /// methods that keep their own row state (AnchorAttention); `None` for the others,
    /// whose state a caller gets with [`AttentionPlan::run_with_state`].
    pub async fn row_stats(&self) -> Result<Option<Vec<f32>>> {
        if self.report().is_none() {
            return Ok(None);
        }
        match &self.gpu {
            Some(GpuPlan::Sparse(sp)) => Ok(Some(sp.row_stats(&self.ctx).await?)),
            _ => Ok(self.cpu_row_stats.lock().expect("row stats lock").clone()),
        }
    }

    /// The run on the host (Q, K, V and `out` checked by the caller).
    fn run_cpu(
        &self,
        [q, k, v]: [&Tensor; 3],
        out: &mut Tensor,
        state: Option<&mut RowState>,
    ) -> Result<AttentionReport> {
        let start = crate::runtime::Instant::now();
        let host = |t: &Tensor| t.host().expect("checked: CPU context").to_f32();
        let (qf, kf, vf) = (host(q), host(k), host(v));
        let scale = self.opts.scale_for(&self.shape);
        let (window, sinks) = match &self.method {
            Method::Window(w) => (w.window, w.sinks),
            _ => (0, 0),
        };
        let copts = CpuAttention {
            causal: self.opts.causal,
            scale,
            window,
            sinks,
            lut: self.lut.as_deref(),
        };
        let mut stats = None;
        let mut stages = None;
        let result = match (self.method.selector(), state) {
            (Some(sel), _) => {
                let run = sparse::run_cpu(&*sel, &self.shape, scale, (&qf, &kf, &vf))?;
                *self.cpu_selection.lock().expect("selection lock") = Some(run.luts);
                *self.cpu_row_stats.lock().expect("row stats lock") = Some(run.ml);
                stats = Some(run.stats);
                stages = Some(run.stages);
                run.out
            }
            (None, Some(st)) => {
                let mut hs = if self.opts.import_state {
                    HostRowState {
                        ml: host(&st.ml),
                        acc: host(&st.acc),
                    }
                } else {
                    HostRowState::empty(&self.shape)
                };
                let o = attention_cpu(&self.shape, &copts, &qf, &kf, &vf, Some(&mut hs));
                *st.ml.host_mut().expect("CPU") = HostData::F32(hs.ml);
                *st.acc.host_mut().expect("CPU") = HostData::F32(hs.acc);
                o
            }
            (None, None) => attention_cpu(&self.shape, &copts, &qf, &kf, &vf, None),
        };
        *out.host_mut().expect("checked: CPU context") =
            HostData::from_f32(&result, self.opts.dtype)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let density = stats
            .as_ref()
            .map_or(self.static_density(), |s| s.density());
        Ok(AttentionReport {
            method: self.method.name().into(),
            backend: Backend::Cpu,
            timing: Report {
                stages: stages.unwrap_or_else(|| vec![StageTime::host(self.method.name(), ms)]),
                wall_ms: ms,
                gpu_ms: None,
                timing: "wall".into(),
            },
            density,
            dispatches: 1,
            stats,
        })
    }
}
