//! Attention plans: built once for a shape and a [`Method`], run many times, with the
//! same API on a GPU and on the CPU.
//!
//! ```no_run
//! use wgsparse::{AttentionShape, Context, ContextOptions, DType, Method, Tensor};
//! let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
//! let shape = AttentionShape::new(32, 8, 4096, 128);
//! let plan = ctx.attention(shape).method(Method::Dense).dtype(DType::F16).build()?;
//! let (q, k, v) = wgsparse::synthetic::qkv(&ctx, &shape, DType::F16, 7)?;
//! let out = plan.run(&q, &k, &v)?;
//! println!("{:?}", plan.report());
//! # Ok::<(), wgsparse::Error>(())
//! ```

pub mod dense_cpu;
pub mod dense_gpu;
pub mod lut;
pub mod split;

use std::sync::Mutex;

use serde::Serialize;

use crate::context::{Backend, Context};
use crate::error::{Error, Result};
use crate::pipeline::{Recorder, Report, StageTime};
use crate::tensor::{DType, HostData, Tensor};
use dense_cpu::{HostRowState, dense_attention_cpu};
use dense_gpu::{DenseBuffers, DenseGpu};

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
    /// Head dimension (64, 128 or 256).
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
        if ![64, 128, 256].contains(&self.head_dim) {
            return bad(format!(
                "head_dim {} is not one of 64, 128, 256",
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
/// shape to `ctx`, stored as `dtype`.
pub fn upload_qkv(
    ctx: &Context,
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        Tensor::from_f32(ctx, &shape.q_dims(), q, dtype)?,
        Tensor::from_f32(ctx, &shape.kv_dims(), k, dtype)?,
        Tensor::from_f32(ctx, &shape.kv_dims(), v, dtype)?,
    ))
}

/// Which attention algorithm a plan runs. Sparse methods (anchor, sale, proxy, window,
/// oracle) join this enum as they land.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub enum Method {
    /// Exact flash attention: the reference and the fallback.
    #[default]
    Dense,
}

impl Method {
    /// Every method this build has, in a stable order (the CLI's and the web demo's
    /// pickers list these).
    pub fn all() -> Vec<Method> {
        vec![Method::Dense]
    }

    /// Short name (`dense`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Dense => "dense",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(Method::Dense),
            o => Err(Error::InvalidArgument(format!(
                "unknown method `{o}` (known: dense)"
            ))),
        }
    }
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
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            causal: true,
            dtype: DType::F32,
            scale: None,
            import_state: false,
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
    /// Fraction of causal query–key pairs computed (1.0 for dense).
    pub density: f64,
    /// Dispatches recorded (GPU) or tasks (CPU).
    pub dispatches: usize,
}

impl AttentionReport {
    /// Milliseconds of the run (GPU timestamps where present, else wall clock).
    pub fn ms(&self) -> f64 {
        self.timing.ms()
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
        let gpu = match self.ctx.gpu() {
            Some(_) => Some(DenseGpu::build(&self.ctx, &self.shape, &self.opts)?),
            None => None,
        };
        Ok(AttentionPlan {
            ctx: self.ctx,
            shape: self.shape,
            method: self.method,
            opts: self.opts,
            gpu,
            last: Mutex::new(None),
        })
    }
}

/// A built attention: run it many times on tensors of its shape.
pub struct AttentionPlan {
    ctx: Context,
    shape: AttentionShape,
    method: Method,
    opts: AttentionOptions,
    gpu: Option<DenseGpu>,
    last: Mutex<Option<AttentionReport>>,
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
        let dt = self.opts.dtype;
        self.check(q, &self.shape.q_dims(), dt, "q")?;
        self.check(k, &self.shape.kv_dims(), dt, "k")?;
        self.check(v, &self.shape.kv_dims(), dt, "v")?;
        self.check(out, &self.shape.q_dims(), dt, "output")?;
        if let Some(st) = &state {
            self.check(
                &st.ml,
                &[self.shape.q_heads, self.shape.seq_len, 2],
                DType::F32,
                "state.ml",
            )?;
            self.check(&st.acc, &self.shape.q_dims(), DType::F32, "state.acc")?;
        }
        let report = match &self.gpu {
            Some(gpu) => {
                let mut rec = Recorder::new(&self.ctx, "attention", self.stage_count())?;
                self.record_checked(&mut rec, q, k, v, out, state.as_deref())?;
                let timing = rec.submit().await?;
                AttentionReport {
                    method: self.method.name().into(),
                    backend: self.ctx.backend(),
                    timing,
                    density: 1.0,
                    dispatches: gpu.dispatch_count(),
                }
            }
            None => self.run_cpu(q, k, v, out, state)?,
        };
        *self.last.lock().expect("report lock") = Some(report);
        Ok(())
    }

    /// How many timed stages a run records (size a shared [`Recorder`] with it).
    pub fn stage_count(&self) -> u32 {
        1
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
        let dt = self.opts.dtype;
        self.check(q, &self.shape.q_dims(), dt, "q")?;
        self.check(k, &self.shape.kv_dims(), dt, "k")?;
        self.check(v, &self.shape.kv_dims(), dt, "v")?;
        self.check(out, &self.shape.q_dims(), dt, "output")?;
        self.record_checked(rec, q, k, v, out, None)
    }

    fn record_checked(
        &self,
        rec: &mut Recorder<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        state: Option<&RowState>,
    ) -> Result<()> {
        let gpu = self.gpu.as_ref().ok_or_else(|| {
            Error::InvalidArgument("AttentionPlan::record needs a GPU context".into())
        })?;
        let buf = |t: &Tensor| t.buffer().expect("checked: same GPU context").clone();
        let st = state.map(|s| (buf(&s.ml), buf(&s.acc)));
        let io = DenseBuffers {
            q: &buf(q),
            k: &buf(k),
            v: &buf(v),
            o: &buf(out),
            state: st.as_ref().map(|(a, b)| (a, b)),
        };
        gpu.record(&self.ctx, rec, "dense", &io)
    }

    fn run_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        state: Option<&mut RowState>,
    ) -> Result<AttentionReport> {
        let start = crate::pipeline::Instant::now();
        let host = |t: &Tensor| t.host().expect("checked: CPU context").to_f32();
        let (qf, kf, vf) = (host(q), host(k), host(v));
        let scale = self.opts.scale_for(&self.shape);
        let result = match state {
            Some(st) => {
                let mut hs = if self.opts.import_state {
                    HostRowState {
                        ml: host(&st.ml),
                        acc: host(&st.acc),
                    }
                } else {
                    HostRowState::empty(&self.shape)
                };
                let o = dense_attention_cpu(
                    &self.shape,
                    self.opts.causal,
                    scale,
                    &qf,
                    &kf,
                    &vf,
                    Some(&mut hs),
                );
                *st.ml.host_mut().expect("CPU") = HostData::F32(hs.ml);
                *st.acc.host_mut().expect("CPU") = HostData::F32(hs.acc);
                o
            }
            None => dense_attention_cpu(&self.shape, self.opts.causal, scale, &qf, &kf, &vf, None),
        };
        *out.host_mut().expect("checked: CPU context") =
            HostData::from_f32(&result, self.opts.dtype)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(AttentionReport {
            method: self.method.name().into(),
            backend: Backend::Cpu,
            timing: Report {
                stages: vec![StageTime {
                    name: "dense".into(),
                    ms: Some(ms),
                    dispatches: 1,
                }],
                wall_ms: ms,
                gpu_ms: None,
                timing: "wall".into(),
            },
            density: 1.0,
            dispatches: 1,
        })
    }
}
