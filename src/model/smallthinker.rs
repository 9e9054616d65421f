//! [`DecoderLayerPlan`]: one SmallThinker decoder layer as one GPU submission.
//!
//! ```text
//! router + dispatch on x_in        (pre-attention router: experts known before attention)
//! n1 = RMSNorm_1(x_in)
//! q, k, v = n1·Wqᵀ, n1·Wkᵀ, n1·Wvᵀ  (head-major), RoPE on q and k for RoPE layers
//! h  = x_in + Attn(q, k, v)·Woᵀ     (causal; full for NoPE layers)
//! z  = RMSNorm_2(h)
//! out = h + Σ_k w_k · Expert_k(z)
//! ```
//!
//! Attention goes through the public [`AttentionPlan`] (its `record` puts it in this
//! layer's [`Recorder`]). Full attention (NoPE layers) uses [`Method::Dense`]; a layer
//! with `window: Some(w)` (the 21B's RoPE layers: 4096 tokens, optional sinks) uses
//! [`Method::Window`].
//!
//! The prompt chunk is the whole context (no KV cache): positions are `0..tokens`.

use std::sync::Mutex;

use serde::Serialize;

use crate::attention::flash_cpu::{CpuAttention, attention_cpu};
use crate::attention::plan::{MemoryPlan, plan};
use crate::attention::{AttentionPlan, AttentionShape, Method, WindowConfig};
use crate::error::{Error, Result};
use crate::moe::memory::{MoeMemoryPlan, block_memory_plan};
use crate::moe::plan::ExpertStats;
use crate::moe::stream::ExpertResidency;
use crate::moe::{MoeConfig, MoePlan, MoeWeights, PackedExperts, PackedMatrix, WeightFormat};
use crate::ops::linear::{LinearGpu, LinearLayout, from_head_major, linear_cpu, to_head_major};
use crate::ops::rmsnorm::{RmsNormGpu, rmsnorm_cpu};
use crate::ops::rope::{RopeGpu, rope_cpu, rope_table};
use crate::runtime::context::{Backend, Context};
use crate::runtime::launch::storage_init;
use crate::runtime::memory::{
    DeviceLimits, PlannedBuffer, problems_of, write_buffers, write_verdict,
};
use crate::runtime::tensor::{DType, HostData, Tensor};
use crate::runtime::{Instant, Recorder, Report, StageTime, Submitted};

/// Sizes and per-layer attention kind of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DecoderLayerConfig {
    /// The MoE block (its `hidden` is the model width).
    pub moe: MoeConfig,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension (a multiple of 16 up to 256).
    pub head_dim: usize,
    /// RoPE base θ; `None` = NoPE layer.
    pub rope_theta: Option<f64>,
    /// Sliding-window width for RoPE layers; `None` = full causal attention.
    pub window: Option<usize>,
    /// Sink tokens always attended inside a sliding window.
    pub sinks: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl DecoderLayerConfig {
    /// SmallThinker-4B-A0.6B: hidden 1536, 12 q-heads / 2 kv-heads × 128, RoPE θ 1.5e6
    /// on every layer, full attention (the released config uses no sliding window).
    pub fn smallthinker_4b() -> Self {
        DecoderLayerConfig {
            moe: MoeConfig::smallthinker_4b(),
            q_heads: 12,
            kv_heads: 2,
            head_dim: 128,
            rope_theta: Some(1.5e6),
            window: None,
            sinks: 0,
            rms_eps: 1e-6,
        }
    }

    /// The 21B's 1-in-`step` pattern (llama.cpp, step 4): layer `il` with
    /// `il % step == 0` is NoPE + full attention; the others RoPE (θ from `self`, 1.5e6
    /// if unset) + a sliding window of `window` tokens.
    pub fn with_nope_pattern(mut self, il: usize, step: usize, window: usize) -> Self {
        if step > 0 && il.is_multiple_of(step) {
            self.rope_theta = None;
            self.window = None;
        } else {
            self.rope_theta = Some(self.rope_theta.unwrap_or(1.5e6));
            self.window = Some(window);
        }
        self
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        self.moe.validate()?;
        if self.q_heads * self.head_dim == 0 || self.kv_heads == 0 {
            return Err(Error::InvalidShape(format!("empty attention: {self:?}")));
        }
        if let Some(t) = self.rope_theta
            && (t.is_nan() || t <= 1.0)
        {
            return Err(Error::InvalidArgument(format!("RoPE θ {t} must be > 1")));
        }
        if self.rms_eps.is_nan() || self.rms_eps <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "RMSNorm eps {} must be positive",
                self.rms_eps
            )));
        }
        AttentionShape::new(self.q_heads, self.kv_heads, 1, self.head_dim).validate(true)
    }

    /// The attention method of this layer: dense (full causal) without a window,
    /// [`Method::Window`] with one.
    pub fn attention_method(&self) -> Result<Method> {
        match self.window {
            None => Ok(Method::Dense),
            Some(0) => Err(Error::InvalidArgument(
                "a sliding window needs at least 1 key".into(),
            )),
            Some(window) => Ok(Method::Window(WindowConfig {
                window,
                sinks: self.sinks,
            })),
        }
    }
}

/// Host weights of one decoder layer (f32 masters, row-major `[out, in]`).
#[derive(Clone, Debug)]
pub struct DecoderLayerWeights {
    /// The config.
    pub config: DecoderLayerConfig,
    /// `[q_heads·d, hidden]`.
    pub wq: Vec<f32>,
    /// `[kv_heads·d, hidden]`.
    pub wk: Vec<f32>,
    /// `[kv_heads·d, hidden]`.
    pub wv: Vec<f32>,
    /// `[hidden, q_heads·d]`.
    pub wo: Vec<f32>,
    /// RMSNorm before attention `[hidden]`.
    pub norm1: Vec<f32>,
    /// RMSNorm before the MoE `[hidden]`.
    pub norm2: Vec<f32>,
    /// The MoE block.
    pub moe: MoeWeights,
}

impl DecoderLayerWeights {
    /// Synthetic weights from `seed` (Gaussian, scaled 1/√fan-in; norms near 1).
    pub fn random(cfg: &DecoderLayerConfig, seed: u64) -> Self {
        let h = cfg.moe.hidden;
        let (qd, kd) = (cfg.q_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let g = |n: usize, s: u64, scale: f32| -> Vec<f32> {
            crate::attention::synthetic::gaussian_parallel(n, seed ^ s)
                .into_iter()
                .map(|v| v * scale)
                .collect()
        };
        let sh = 1.0 / (h as f32).sqrt();
        DecoderLayerWeights {
            config: *cfg,
            wq: g(qd * h, 0x101, sh),
            wk: g(kd * h, 0x102, sh),
            wv: g(kd * h, 0x103, sh),
            wo: g(h * qd, 0x104, 1.0 / (qd as f32).sqrt()),
            norm1: g(h, 0x105, 0.1).into_iter().map(|v| 1.0 + v).collect(),
            norm2: g(h, 0x106, 0.1).into_iter().map(|v| 1.0 + v).collect(),
            moe: MoeWeights::random(&cfg.moe, seed ^ 0x107),
        }
    }

    /// Packs every matrix in `format`.
    pub fn pack(&self, format: WeightFormat) -> Result<PackedLayer> {
        let c = &self.config;
        c.validate()?;
        if self.moe.config != c.moe {
            return Err(Error::Mismatch("MoE weights of another config".into()));
        }
        let h = c.moe.hidden;
        let (qd, kd) = (c.q_heads * c.head_dim, c.kv_heads * c.head_dim);
        if self.norm1.len() != h || self.norm2.len() != h {
            return Err(Error::Mismatch(format!(
                "norm weights must have {h} values"
            )));
        }
        Ok(PackedLayer {
            config: *c,
            wq: PackedMatrix::pack(format, qd, h, &self.wq)?,
            wk: PackedMatrix::pack(format, kd, h, &self.wk)?,
            wv: PackedMatrix::pack(format, kd, h, &self.wv)?,
            wo: PackedMatrix::pack(format, h, qd, &self.wo)?,
            norm1: self.norm1.clone(),
            norm2: self.norm2.clone(),
            moe: self.moe.pack(format)?,
        })
    }
}

/// A layer's weights in their storage format.
#[derive(Clone, Debug)]
pub struct PackedLayer {
    /// The config.
    pub config: DecoderLayerConfig,
    /// Q projection.
    pub wq: PackedMatrix,
    /// K projection.
    pub wk: PackedMatrix,
    /// V projection.
    pub wv: PackedMatrix,
    /// Output projection.
    pub wo: PackedMatrix,
    /// First norm.
    pub norm1: Vec<f32>,
    /// Second norm.
    pub norm2: Vec<f32>,
    /// The experts.
    pub moe: PackedExperts,
}

/// The layer computed by the CPU twins, step by step as the module doc writes it:
/// `x [tokens, hidden]` → `[tokens, hidden]`.
pub fn decoder_layer_cpu(x: &[f32], w: &PackedLayer) -> Result<Vec<f32>> {
    Ok(decoder_layer_cpu_moe(x, w)?.out)
}

/// [`decoder_layer_cpu`], returning the MoE block's intermediates too (its `out` is the
/// layer's output).
pub fn decoder_layer_cpu_moe(x: &[f32], w: &PackedLayer) -> Result<crate::moe::cpu::MoeCpu> {
    let c = &w.config;
    let method = c.attention_method()?;
    let (h, d) = (c.moe.hidden, c.head_dim);
    let t = x.len() / h;
    let n1 = rmsnorm_cpu(x, &w.norm1, c.rms_eps);
    let mut q = to_head_major(&linear_cpu(&n1, &w.wq), t, d);
    let mut k = to_head_major(&linear_cpu(&n1, &w.wk), t, d);
    let v = to_head_major(&linear_cpu(&n1, &w.wv), t, d);
    if let Some(theta) = c.rope_theta {
        let table = rope_table(t, d, theta, 0);
        rope_cpu(&mut q, t, d, &table);
        rope_cpu(&mut k, t, d, &table);
    }
    // Attention: the CPU twin of the method (dense, or the window with its sinks and
    // its block LUT, as the window plan runs it).
    let shape = AttentionShape::new(c.q_heads, c.kv_heads, t, d);
    let (window, sinks, lut) = match &method {
        Method::Window(wc) => (wc.window, wc.sinks, Some(wc.lut(c.q_heads, t)?)),
        _ => (0, 0, None),
    };
    let opts = CpuAttention {
        causal: true,
        scale: 1.0 / (d as f32).sqrt(),
        window,
        sinks,
        lut: lut.as_ref(),
    };
    let attn = attention_cpu(&shape, &opts, &q, &k, &v, None);
    let o = linear_cpu(&from_head_major(&attn, t, d), &w.wo);
    let hres: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
    let z = rmsnorm_cpu(&hres, &w.norm2, c.rms_eps);
    Ok(crate::moe::cpu::moe_cpu(x, &z, &hres, &w.moe))
}

/// What a layer run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// Backend.
    pub backend: Backend,
    /// Per-stage timing (GPU timestamps where present).
    pub timing: Report,
    /// Milliseconds.
    pub ms: f64,
    /// Tokens per second through the layer.
    pub tokens_per_s: f64,
    /// What the MoE's expert kernels counted (serialized inline).
    #[serde(flatten)]
    pub experts: ExpertStats,
    /// Attention method.
    pub attention: String,
}

struct LayerGpu {
    moe: MoePlan,
    attn: AttentionPlan,
    norm: RmsNormGpu,
    norm1: wgpu::Buffer,
    norm2: wgpu::Buffer,
    q: LinearGpu,
    k: LinearGpu,
    v: LinearGpu,
    o: LinearGpu,
    rope: Option<RopeGpu>,
    n1: Tensor,
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    attn_out: Tensor,
    h: Tensor,
    z: Tensor,
}

/// Starts building a [`DecoderLayerPlan`]; see [`Context::decoder_layer`].
pub struct DecoderLayerPlanBuilder {
    ctx: Context,
    cfg: DecoderLayerConfig,
    tokens: usize,
    format: WeightFormat,
    residency: ExpertResidency,
}

impl Context {
    /// Starts a decoder-layer plan on this context.
    pub fn decoder_layer(&self, cfg: DecoderLayerConfig) -> DecoderLayerPlanBuilder {
        DecoderLayerPlanBuilder {
            ctx: self.clone(),
            cfg,
            tokens: 1,
            format: WeightFormat::F16,
            residency: ExpertResidency::Resident,
        }
    }
}

impl DecoderLayerPlanBuilder {
    crate::moe::plan::expert_plan_setters!();
    /// Packs the weights and builds.
    pub fn build(self, weights: &DecoderLayerWeights) -> Result<DecoderLayerPlan> {
        if weights.config != self.cfg {
            return Err(Error::Mismatch(
                "weights were made for another layer config".into(),
            ));
        }
        self.cfg.validate()?;
        let method = self.cfg.attention_method()?;
        if self.tokens == 0 {
            return Err(Error::InvalidShape("a layer needs at least 1 token".into()));
        }
        let packed = weights.pack(self.format)?;
        let (ctx, c, t) = (&self.ctx, &self.cfg, self.tokens);
        let gpu = match ctx.gpu() {
            None => None,
            Some(g) => {
                let (h, d) = (c.moe.hidden, c.head_dim);
                let shape = AttentionShape::new(c.q_heads, c.kv_heads, t, d);
                let attn = ctx
                    .attention(shape)
                    .method(method.clone())
                    .dtype(DType::F32)
                    .build()?;
                let moe = ctx
                    .moe(c.moe)
                    .tokens(t)
                    .residency(self.residency)
                    .build_packed(packed.moe.clone())?;
                let hm = LinearLayout {
                    out_head_major: true,
                    ..Default::default()
                };
                let o_layout = LinearLayout {
                    in_head_major: true,
                    residual: true,
                    ..Default::default()
                };
                let zeros = |dims: &[usize]| Tensor::zeros(ctx, dims, DType::F32);
                Some(LayerGpu {
                    norm: RmsNormGpu::build(ctx, t, h, c.rms_eps)?,
                    norm1: storage_init(g, "layer norm1", bytemuck::cast_slice(&packed.norm1))?,
                    norm2: storage_init(g, "layer norm2", bytemuck::cast_slice(&packed.norm2))?,
                    q: LinearGpu::build(ctx, "q_proj", &packed.wq, t, d, hm)?,
                    k: LinearGpu::build(ctx, "k_proj", &packed.wk, t, d, hm)?,
                    v: LinearGpu::build(ctx, "v_proj", &packed.wv, t, d, hm)?,
                    o: LinearGpu::build(ctx, "o_proj", &packed.wo, t, d, o_layout)?,
                    rope: match c.rope_theta {
                        Some(theta) => Some(RopeGpu::build(
                            ctx,
                            &[c.q_heads, c.kv_heads],
                            t,
                            d,
                            theta,
                            0,
                        )?),
                        None => None,
                    },
                    n1: zeros(&[t, h])?,
                    qt: zeros(&shape.q_dims())?,
                    kt: zeros(&shape.kv_dims())?,
                    vt: zeros(&shape.kv_dims())?,
                    attn_out: zeros(&shape.q_dims())?,
                    h: zeros(&[t, h])?,
                    z: zeros(&[t, h])?,
                    moe,
                    attn,
                })
            }
        };
        Ok(DecoderLayerPlan {
            host: if gpu.is_none() { Some(packed) } else { None },
            ctx: self.ctx,
            cfg: self.cfg,
            tokens: self.tokens,
            method,
            gpu,
            last: Mutex::new(None),
        })
    }
}

/// The memory plan of one decoder layer without a device (`wgsparse layer --dry-run`):
/// the attention's (on the layer's own Q/K/V tensors, so one group), the MoE block's,
/// and the layer's own buffers (projections, norms, RoPE table, activations).
#[derive(Clone, Debug, Serialize)]
pub struct LayerMemoryPlan {
    /// Tokens per run.
    pub tokens: usize,
    /// The layer's own buffers.
    pub buffers: Vec<PlannedBuffer>,
    /// The attention's plan.
    pub attention: MemoryPlan,
    /// The MoE block's plan.
    pub moe: MoeMemoryPlan,
    /// What does not fit, of the three (empty when the layer fits).
    pub problems: Vec<String>,
}

impl LayerMemoryPlan {
    /// Whether every buffer of the layer fits.
    pub fn fits(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for LayerMemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "decoder layer plan: {} tokens; own buffers:",
            self.tokens
        )?;
        write_buffers(f, &self.buffers)?;
        writeln!(f, "{}", self.attention)?;
        writeln!(f, "{}", self.moe)?;
        write!(f, "layer:")?;
        write_verdict(f, &self.problems)
    }
}

/// The memory plan of a decoder layer of `cfg` over `tokens` tokens with `format`
/// weights and the asked expert residency, under `limits`.
pub fn layer_memory_plan(
    cfg: &DecoderLayerConfig,
    tokens: usize,
    format: WeightFormat,
    residency: ExpertResidency,
    limits: &DeviceLimits,
) -> Result<LayerMemoryPlan> {
    cfg.validate()?;
    let (t, h, d) = (tokens, cfg.moe.hidden, cfg.head_dim);
    let shape = AttentionShape::new(cfg.q_heads, cfg.kv_heads, t, d);
    let attention = plan(&shape, &cfg.attention_method()?, DType::F32, true, limits)?;
    // The MoE block's input and output are the layer's activations (listed below).
    let moe = block_memory_plan(&cfg.moe, t, format, residency, limits)?;
    let act = (t * h * 4) as u64;
    let (qd, kd) = (cfg.q_heads * d, cfg.kv_heads * d);
    let w = |name: &str, rows, cols| PlannedBuffer::whole(name, format.packed_bytes(rows, cols));
    let mut buffers = vec![
        w("q_proj weights", qd, h),
        w("k_proj weights", kd, h),
        w("v_proj weights", kd, h),
        w("o_proj weights", h, qd),
        PlannedBuffer::whole("layer norm1", h as u64 * 4),
        PlannedBuffer::whole("layer norm2", h as u64 * 4),
    ];
    if cfg.rope_theta.is_some() {
        buffers.push(PlannedBuffer::whole(
            "rope cos/sin table",
            (t * d * 4) as u64,
        ));
    }
    for name in [
        "normed input",
        "attention residual h",
        "normed h (MoE input)",
    ] {
        buffers.push(PlannedBuffer::whole(name, act));
    }
    let mut problems = problems_of(&buffers, limits);
    problems.extend(attention.problems.iter().map(|p| format!("attention {p}")));
    problems.extend(moe.problems.iter().cloned());
    Ok(LayerMemoryPlan {
        tokens,
        buffers,
        attention,
        moe,
        problems,
    })
}

/// A built decoder layer.
pub struct DecoderLayerPlan {
    ctx: Context,
    cfg: DecoderLayerConfig,
    tokens: usize,
    method: Method,
    host: Option<PackedLayer>,
    gpu: Option<LayerGpu>,
    last: Mutex<Option<LayerReport>>,
}

impl DecoderLayerPlan {
    /// The config.
    pub fn config(&self) -> &DecoderLayerConfig {
        &self.cfg
    }
    /// The report of the last run.
    pub fn report(&self) -> Option<LayerReport> {
        self.last.lock().expect("report lock").clone()
    }
    /// Timed stages of a GPU run.
    pub fn stage_count(&self) -> u32 {
        match &self.gpu {
            Some(g) => g.moe.stage_count() + 7 + g.attn.stage_count(),
            None => 1,
        }
    }

    /// Runs the layer on `x [tokens, hidden]` (f32) into a new tensor (blocking).
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(&self.ctx, x.shape(), DType::F32)?;
        pollster::block_on(self.run_async(x, &mut out))?;
        Ok(out)
    }

    /// Blocking [`DecoderLayerPlan::run_async`].
    pub fn run_into(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        pollster::block_on(self.run_async(x, out))
    }

    /// Runs the layer: one submission on a GPU (async: usable in a browser).
    pub async fn run_async(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let dims = [self.tokens, self.cfg.moe.hidden];
        for (t, what) in [(x, "input"), (&*out, "output")] {
            if !t.context().same_device(&self.ctx) {
                return Err(Error::WrongContext);
            }
            if t.shape() != dims || t.dtype() != DType::F32 {
                return Err(Error::Mismatch(format!(
                    "{what} is {:?} {:?}, the layer expects f32 {dims:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
        }
        let report = match &self.gpu {
            Some(g) => {
                let (timing, stream) = if !g.moe.is_streamed() {
                    let mut rec = Recorder::new(&self.ctx, "decoder layer", self.stage_count())?;
                    // Router first: the experts are known before attention runs.
                    g.moe.record_route(&mut rec, x)?;
                    self.record_attention(&mut rec, g, x)?;
                    g.moe.record_experts(&mut rec, &g.z, &g.h, out)?;
                    (rec.submit().await?, None)
                } else {
                    // Streamed experts: the router alone, then attention behind it; once
                    // the router's submission is done (attention still running), the
                    // missing experts are handed to the queue, then the expert rounds.
                    let start = Instant::now();
                    let route = g.moe.submit_route(x).await?;
                    let mut rec = Recorder::new(&self.ctx, "layer attention", self.stage_count())?;
                    self.record_attention(&mut rec, g, x)?;
                    let attn = rec.submit_deferred().await?;
                    let counts = g.moe.read_routing(&route).await?;
                    let (rounds, stream) =
                        g.moe.run_streamed_experts(&counts, &g.z, &g.h, out).await?;
                    let subs = [route, attn].into_iter().chain(rounds).collect();
                    (Submitted::report_all(subs, start).await?, Some(stream))
                };
                let experts = ExpertStats {
                    stream,
                    ..g.moe.gpu_stats().await?
                };
                self.make_report(self.ctx.backend(), timing, experts)
            }
            None => {
                let w = self.host.as_ref().expect("CPU plans keep the weights");
                let start = Instant::now();
                let xs = x.host().expect("CPU tensor").to_f32();
                let r = decoder_layer_cpu_moe(&xs, w)?;
                let ms = start.elapsed().as_secs_f64() * 1e3;
                *out.host_mut().expect("CPU tensor") = HostData::F32(r.out);
                let timing = Report {
                    stages: vec![StageTime::host("layer_cpu", ms)],
                    wall_ms: ms,
                    gpu_ms: None,
                    timing: "wall".into(),
                };
                let experts =
                    ExpertStats::cpu(&self.cfg.moe, self.tokens, r.skipped as u64, r.map.counts);
                self.make_report(Backend::Cpu, timing, experts)
            }
        };
        *self.last.lock().expect("report lock") = Some(report);
        Ok(())
    }

    /// Records RMSNorm 1, the projections, RoPE, attention, the output projection with
    /// the residual (into `h`) and RMSNorm 2 (into `z`).
    fn record_attention(&self, rec: &mut Recorder<'_>, g: &LayerGpu, x: &Tensor) -> Result<()> {
        let b = |t: &Tensor| t.buffer().expect("GPU tensor").clone();
        g.norm.record(rec, "rmsnorm_1", &b(x), &g.norm1, &b(&g.n1));
        g.q.record(rec, "q_proj", &b(&g.n1), &b(&g.qt), None)?;
        g.k.record(rec, "k_proj", &b(&g.n1), &b(&g.kt), None)?;
        g.v.record(rec, "v_proj", &b(&g.n1), &b(&g.vt), None)?;
        if let Some(r) = &g.rope {
            r.record(rec, "rope", &[&b(&g.qt), &b(&g.kt)])?;
        }
        g.attn.record(rec, &g.qt, &g.kt, &g.vt, &g.attn_out)?;
        g.o.record(rec, "o_proj", &b(&g.attn_out), &b(&g.h), Some(&b(x)))?;
        g.norm
            .record(rec, "rmsnorm_2", &b(&g.h), &g.norm2, &b(&g.z));
        Ok(())
    }

    fn make_report(&self, backend: Backend, timing: Report, experts: ExpertStats) -> LayerReport {
        let ms = timing.ms();
        LayerReport {
            backend,
            ms,
            tokens_per_s: self.tokens as f64 / (ms / 1e3),
            experts,
            attention: self.method.name().into(),
            timing,
        }
    }
}
