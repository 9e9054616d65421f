//! [`MoePlan`]: the MoE layer built once for a token count, run many times, on a GPU
//! (router → dispatch → expert up → expert down → combine, one submission) or on the
//! CPU (the twins of [`super::cpu`]).

use std::sync::Mutex;

use serde::Serialize;

use super::combine::{CombineParams, combine_step};
use super::cpu;
use super::dispatch::{DispatchGpu, meta_words};
use super::expert_ffn::{FfnGpu, FfnIo, FfnWeights, TILE_MS, choose_tile_m, choose_tile_m_on};
use super::router::{RouterParams, router_step};
use super::stream::{
    ExpertCache, ExpertResidency, NOT_RESIDENT, StreamStats, expert_words, slot_buffer_words,
    slot_offsets, write_buffer_parallel,
};
use super::{MoeConfig, MoeWeights, PackedExperts, PackedMatrix, WeightFormat};
use crate::error::{Error, Result};
use crate::runtime::context::{Backend, Context, GpuDevice};
use crate::runtime::launch::{Step, storage, storage_init};
use crate::runtime::tensor::{DType, HostData, Tensor, read_buffer};
use crate::runtime::{Instant, Recorder, Report, StageTime, Submitted};

pub use super::expert_ffn::FfnKernel as FfnPath;

/// Up to this many tokens the plan picks the GEMV (decode) expert kernels.
pub const DECODE_MAX_TOKENS: usize = 8;

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct MoeReport {
    /// Backend that ran it.
    pub backend: Backend,
    /// Expert kernels: `tiled16`, `tiled32`, `tiled64` (tile height), `gemv`, or `cpu`.
    pub path: String,
    /// Weight format.
    pub weights: WeightFormat,
    /// Tokens.
    pub tokens: usize,
    /// Per-stage timing.
    pub timing: Report,
    /// Milliseconds (GPU timestamps where present, else wall clock).
    pub ms: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// What the expert kernels counted (serialized inline).
    #[serde(flatten)]
    pub experts: ExpertStats,
    /// Expert FLOPs without skipping (6 · tokens · k · ffn · hidden) per second, in
    /// TFLOP/s: the dense-equivalent rate.
    pub tflops: f64,
}

/// What the expert kernels of one run counted: the MoE report's and the decoder
/// layer's.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExpertStats {
    /// Fraction of (routed token, neuron) pairs whose gate was ≤ 0, counted by the
    /// kernels themselves.
    pub skip_frac: f64,
    /// Tiled (prefill) path with chunk skipping: the fraction of 16-neuron chunks of
    /// the down GEMM whose weights were not read (inactive for every position of the
    /// tile). `None` for the GEMV path (which skips per neuron) and the CPU.
    pub down_chunk_skip_frac: Option<f64>,
    /// Expert streaming: what this run uploaded (`None` when every expert is
    /// resident).
    pub stream: Option<StreamStats>,
    /// Assignments each expert received (read back from the GPU dispatch).
    pub expert_counts: Vec<u32>,
}

impl ExpertStats {
    /// The CPU path's counts: `skipped` of `tokens · top_k · ffn` neurons.
    pub fn cpu(cfg: &MoeConfig, tokens: usize, skipped: u64, expert_counts: Vec<u32>) -> Self {
        let evaluated = (tokens * cfg.top_k * cfg.ffn) as f64;
        ExpertStats {
            skip_frac: skipped as f64 / evaluated,
            expert_counts,
            ..Default::default()
        }
    }
}

/// The GPU intermediates of the last run (for tests and debugging).
#[derive(Clone, Debug)]
pub struct MoeIntermediates {
    /// Router logits `[tokens, experts]`.
    pub logits: Vec<f32>,
    /// Chosen experts `[tokens, k]`.
    pub ids: Vec<u32>,
    /// Their weights `[tokens, k]`.
    pub weights: Vec<f32>,
    /// Counts, offsets and tile starts (see `shaders/moe/dispatch.wgsl`).
    pub meta: Vec<u32>,
    /// Assignment at each expert-contiguous position.
    pub sorted: Vec<u32>,
    /// Position of each assignment.
    pub inv: Vec<u32>,
    /// ReGLU activations `[A, ffn]`.
    pub act: Vec<f32>,
    /// Expert outputs `[A, hidden]`.
    pub y: Vec<f32>,
    /// (skipped, evaluated) neuron counts, (skipped, all) down chunks of the tiled
    /// path.
    pub stats: [u32; 4],
}

/// Starts building a [`MoePlan`]; see [`Context::moe`].
pub struct MoePlanBuilder {
    ctx: Context,
    cfg: MoeConfig,
    tokens: usize,
    format: WeightFormat,
    path: Option<FfnPath>,
    tile_m: Option<usize>,
    residency: ExpertResidency,
    skip_chunks: bool,
}

impl Context {
    /// Starts a MoE plan for `cfg` on this context.
    pub fn moe(&self, cfg: MoeConfig) -> MoePlanBuilder {
        MoePlanBuilder {
            ctx: self.clone(),
            cfg,
            tokens: 1,
            format: WeightFormat::F16,
            path: None,
            tile_m: None,
            residency: ExpertResidency::Resident,
            skip_chunks: true,
        }
    }
}

/// The setters of the plan builders that run experts (the MoE layer and the
/// SmallThinker decoder layer): tokens, weight format, where the expert weights live.
/// The builder has fields `tokens`, `format` and `residency`.
macro_rules! expert_plan_setters {
    () => {
        /// Tokens per run.
        pub fn tokens(mut self, n: usize) -> Self {
            self.tokens = n;
            self
        }
        /// Weight storage format (of the experts and, in a decoder layer, of every
        /// matrix).
        pub fn format(mut self, f: $crate::quant::WeightFormat) -> Self {
            self.format = f;
            self
        }
        /// Keeps the expert weights in host memory and caches `slots` experts on the
        /// GPU; each run uploads the routed experts it misses (see
        /// [`crate::moe::stream`]): the router runs in its own submission, and whatever
        /// is queued behind it (a decoder layer's attention) hides the uploads. On the
        /// CPU the weights are host memory already and this changes nothing.
        pub fn stream_experts(self, slots: usize) -> Self {
            self.residency($crate::moe::stream::ExpertResidency::Streamed { slots })
        }
        /// Where the expert weights live (default: all resident on the GPU).
        pub fn residency(mut self, r: $crate::moe::stream::ExpertResidency) -> Self {
            self.residency = r;
            self
        }
    };
}
pub(crate) use expert_plan_setters;

impl MoePlanBuilder {
    expert_plan_setters!();
    /// Forces the expert kernels (default: GEMV up to [`DECODE_MAX_TOKENS`] tokens,
    /// tiled above).
    pub fn path(mut self, p: FfnPath) -> Self {
        self.path = Some(p);
        self
    }
    /// Forces the tile height of the tiled kernels (16, 32 or 64; default
    /// [`super::expert_ffn::choose_tile_m_on`]: from the tokens per expert and, on a
    /// GPU, the heights its matrix-unit kernels run at).
    pub fn tile_m(mut self, m: usize) -> Self {
        self.tile_m = Some(m);
        self
    }
    /// Whether the tiled (prefill) down GEMM skips 16-neuron chunks that are
    /// inactive for a whole tile (default true; costs one extra barrier per chunk).
    pub fn skip_chunks(mut self, on: bool) -> Self {
        self.skip_chunks = on;
        self
    }
    /// Packs `weights` in the chosen format and builds.
    pub fn build(self, weights: &MoeWeights) -> Result<MoePlan> {
        if weights.config != self.cfg {
            return Err(Error::Mismatch(format!(
                "weights are for {:?}, the plan for {:?}",
                weights.config, self.cfg
            )));
        }
        let packed = weights.pack(self.format)?;
        self.build_packed(packed)
    }
    /// Builds with already packed weights (their format wins over [`Self::format`]).
    pub fn build_packed(self, weights: PackedExperts) -> Result<MoePlan> {
        self.cfg.validate()?;
        weights.validate()?;
        if weights.config != self.cfg {
            return Err(Error::Mismatch(format!(
                "weights are for {:?}, the plan for {:?}",
                weights.config, self.cfg
            )));
        }
        if self.tokens == 0 {
            return Err(Error::InvalidShape(
                "a MoE plan needs at least 1 token".into(),
            ));
        }
        let assignments = self.tokens as u64 * self.cfg.top_k as u64;
        if assignments * self.cfg.ffn.max(self.cfg.hidden) as u64 > u32::MAX as u64 {
            return Err(Error::InvalidShape(format!(
                "{} tokens x top-{} x {} exceed the 32-bit index range",
                self.tokens,
                self.cfg.top_k,
                self.cfg.ffn.max(self.cfg.hidden)
            )));
        }
        let path = self.path.unwrap_or(if self.tokens <= DECODE_MAX_TOKENS {
            FfnPath::Gemv
        } else {
            FfnPath::Tiled
        });
        let format = weights.format();
        let tile_m = self.tile_m.unwrap_or_else(|| {
            let (a, e) = (assignments as usize, self.cfg.experts);
            match self.ctx.gpu() {
                Some(g) => choose_tile_m_on(&g.caps, format, a, e),
                None => choose_tile_m(a, e),
            }
        });
        if !TILE_MS.contains(&tile_m) {
            return Err(Error::InvalidArgument(format!(
                "tile height {tile_m} is not one of {TILE_MS:?}"
            )));
        }
        // Resident weights over a binding are streamed through the most expert slots
        // that fit (the memory plan, `wgsparse moe --dry-run`, shows the same choice).
        let residency = match self.ctx.gpu() {
            Some(g) => {
                let lim = crate::runtime::memory::DeviceLimits::of(&g.caps);
                let r = super::memory::fitting_residency(&self.cfg, format, self.residency, &lim);
                if r != self.residency {
                    log::info!("moe: the resident expert weights do not fit a binding: {r:?}");
                }
                r
            }
            None => self.residency,
        };
        let streamed = match residency {
            ExpertResidency::Resident => None,
            ExpertResidency::Streamed { slots } => Some(ExpertCache::new(self.cfg.experts, slots)?),
        };
        let gpu = match self.ctx.gpu() {
            Some(g) => Some(MoeGpu::build(
                &self.ctx,
                g,
                &self.cfg,
                &weights,
                self.tokens,
                path,
                tile_m,
                self.skip_chunks,
                streamed,
            )?),
            None => None,
        };
        let keep_host = gpu.as_ref().is_none_or(|g| g.stream.is_some());
        Ok(MoePlan {
            host: if keep_host { Some(weights) } else { None },
            format,
            ctx: self.ctx,
            cfg: self.cfg,
            tokens: self.tokens,
            path,
            tile_m,
            chunk_skipping: path == FfnPath::Tiled && self.skip_chunks,
            gpu,
            last: Mutex::new(None),
        })
    }
}

struct MoeGpu {
    router: Step<RouterParams>,
    dispatch: DispatchGpu,
    ffn: FfnGpu,
    combine: Step<CombineParams>,
    router_w: wgpu::Buffer,
    w: FfnWeights,
    logits: wgpu::Buffer,
    ids: wgpu::Buffer,
    topk_w: wgpu::Buffer,
    block_counts: wgpu::Buffer,
    meta: wgpu::Buffer,
    sorted: wgpu::Buffer,
    inv: wgpu::Buffer,
    act: wgpu::Buffer,
    y: wgpu::Buffer,
    stats: wgpu::Buffer,
    /// Expert → weight slot (the identity when every expert is resident).
    slot_of: wgpu::Buffer,
    format: WeightFormat,
    /// Streaming state: the cache and the routing readback.
    stream: Option<StreamGpu>,
}

/// The GPU side of expert streaming.
struct StreamGpu {
    cache: Mutex<ExpertCache>,
    counts_readback: wgpu::Buffer,
}

impl MoeGpu {
    #[allow(clippy::too_many_arguments)]
    fn build(
        ctx: &Context,
        g: &GpuDevice,
        cfg: &MoeConfig,
        w: &PackedExperts,
        tokens: usize,
        path: FfnPath,
        tile_m: usize,
        skip_chunks: bool,
        streamed: Option<ExpertCache>,
    ) -> Result<Self> {
        crate::runtime::launch::require_f16_storage(
            g,
            "MoE weights on this device (no unpack2x16float)",
        )?;
        let a = tokens * cfg.top_k;
        let (e, f, h) = (cfg.experts as u64, cfg.ffn as u64, cfg.hidden as u64);
        let a64 = a as u64;
        let dispatch = DispatchGpu::build(ctx, cfg.experts, a, tile_m)?;
        let words = |m: &PackedMatrix| bytemuck::cast_slice::<u32, u8>(&m.words).to_vec();
        // Resident: every expert's words as packed. Streamed: room for `slots` experts
        // (zeroed; runs upload into it) with the slot layout's scale bases.
        let (gate, up, down_t, bases, identity) = match &streamed {
            None => (
                storage_init(g, "moe gate weights", &words(&w.gate))?,
                storage_init(g, "moe up weights", &words(&w.up))?,
                storage_init(g, "moe down (transposed) weights", &words(&w.down_t))?,
                [w.gate.scale_base, w.up.scale_base, w.down_t.scale_base],
                (0..cfg.experts as u32).collect::<Vec<u32>>(),
            ),
            Some(c) => {
                let slots = c.slots();
                let sized = |m: &PackedMatrix, label: &str| -> Result<(wgpu::Buffer, u32)> {
                    let (n, base) = slot_buffer_words(m, slots, cfg.ffn);
                    Ok((storage(g, label, n as u64 * 4)?, base))
                };
                let (gb, gs) = sized(&w.gate, "moe gate weight slots")?;
                let (ub, us) = sized(&w.up, "moe up weight slots")?;
                let (db, ds) = sized(&w.down_t, "moe down (transposed) weight slots")?;
                (gb, ub, db, [gs, us, ds], vec![NOT_RESIDENT; cfg.experts])
            }
        };
        let stream = streamed.map(|cache| StreamGpu {
            cache: Mutex::new(cache),
            counts_readback: g.create_buffer(&wgpu::BufferDescriptor {
                label: Some("moe routed counts readback"),
                size: e * 4,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        });
        let ffn = FfnGpu::build(ctx, cfg, w.format(), bases, a, path, tile_m, skip_chunks)?;
        Ok(MoeGpu {
            router: router_step(ctx, cfg, tokens)?,
            combine: combine_step(ctx, tokens, cfg.hidden, cfg.top_k)?,
            router_w: storage_init(g, "moe router weights", bytemuck::cast_slice(&w.router))?,
            w: FfnWeights { gate, up, down_t },
            logits: storage(g, "moe router logits", tokens as u64 * e * 4)?,
            ids: storage(g, "moe expert ids", a64 * 4)?,
            topk_w: storage(g, "moe expert weights", a64 * 4)?,
            block_counts: storage(g, "moe block counts", dispatch.blocks as u64 * e * 4)?,
            meta: storage(g, "moe dispatch meta", meta_words(cfg.experts) as u64 * 4)?,
            sorted: storage(g, "moe sorted assignments", a64 * 4)?,
            inv: storage(g, "moe inverse map", a64 * 4)?,
            act: storage(g, "moe activations", a64 * f * 4)?,
            y: storage(g, "moe expert outputs", a64 * h * 4)?,
            stats: storage(g, "moe skip counters", ffn.stats_bytes())?,
            ffn,
            slot_of: storage_init(g, "moe expert slots", bytemuck::cast_slice(&identity))?,
            dispatch,
            format: w.format(),
            stream,
        })
    }
}

/// A whole GPU buffer read back as `T`s.
async fn words<T: bytemuck::Pod>(dev: &GpuDevice, b: &wgpu::Buffer) -> Result<Vec<T>> {
    Ok(bytemuck::pod_collect_to_vec(
        &read_buffer(dev, b, 0, b.size()).await?,
    ))
}

/// A built MoE layer.
pub struct MoePlan {
    ctx: Context,
    cfg: MoeConfig,
    tokens: usize,
    path: FfnPath,
    tile_m: usize,
    format: WeightFormat,
    host: Option<PackedExperts>,
    gpu: Option<MoeGpu>,
    /// The tiled down kernel counts (and skips) inactive chunks.
    chunk_skipping: bool,
    last: Mutex<Option<MoeReport>>,
}

impl MoePlan {
    /// The config.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }
    /// Tokens per run.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// The expert kernels chosen.
    pub fn path(&self) -> FfnPath {
        self.path
    }
    /// Positions per tile of the tiled kernels (and of the dispatch's tile starts).
    pub fn tile_m(&self) -> usize {
        self.tile_m
    }
    /// The weight format.
    pub fn format(&self) -> WeightFormat {
        self.gpu.as_ref().map_or(self.format, |g| g.format)
    }
    /// The context it runs on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The report of the last run.
    pub fn report(&self) -> Option<MoeReport> {
        self.last.lock().expect("report lock").clone()
    }
    /// Timed stages a GPU run records (router, dispatch, expert_up, expert_down,
    /// combine).
    pub fn stage_count(&self) -> u32 {
        5
    }

    fn check(&self, t: &Tensor, what: &str) -> Result<()> {
        if !t.context().same_device(&self.ctx) {
            return Err(Error::WrongContext);
        }
        let dims = [self.tokens, self.cfg.hidden];
        if t.shape() != dims {
            return Err(Error::Mismatch(format!(
                "{what} has shape {:?}, the plan expects {dims:?}",
                t.shape()
            )));
        }
        if t.dtype() != DType::F32 {
            return Err(Error::Mismatch(format!(
                "{what} is {:?}, the MoE plan takes f32 activations",
                t.dtype()
            )));
        }
        Ok(())
    }

    /// `x + MoE(x)` with the router and the experts both on `x` (blocking).
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(&self.ctx, x.shape(), DType::F32)?;
        pollster::block_on(self.run_async(x, x, x, &mut out))?;
        Ok(out)
    }

    /// Blocking [`MoePlan::run_async`] (not on the web): `x` routes, `z` enters the
    /// experts, `res` is the residual.
    pub fn run_into(&self, x: &Tensor, z: &Tensor, res: &Tensor, out: &mut Tensor) -> Result<()> {
        pollster::block_on(self.run_async(x, z, res, out))
    }

    /// `out = residual + Σ_k w_k · Expert_k(expert_in)` with experts routed on
    /// `router_in` (all `[tokens, hidden]` f32). Async: the only run usable in a browser.
    pub async fn run_async(
        &self,
        router_in: &Tensor,
        expert_in: &Tensor,
        residual: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        for (t, what) in [
            (router_in, "router input"),
            (expert_in, "expert input"),
            (residual, "residual"),
            (&*out, "output"),
        ] {
            self.check(t, what)?;
        }
        let report = match &self.gpu {
            Some(g) if g.stream.is_none() => {
                let mut rec = Recorder::new(&self.ctx, "moe", self.stage_count())?;
                self.record_route(&mut rec, router_in)?;
                self.record_experts(&mut rec, expert_in, residual, out)?;
                let timing = rec.submit().await?;
                self.gpu_report(timing, None).await?
            }
            Some(_) => {
                let start = Instant::now();
                let route = self.submit_route(router_in).await?;
                let counts = self.read_routing(&route).await?;
                let (rounds, stream) = self
                    .run_streamed_experts(&counts, expert_in, residual, out)
                    .await?;
                let subs = std::iter::once(route).chain(rounds).collect();
                let timing = Submitted::report_all(subs, start).await?;
                self.gpu_report(timing, Some(stream)).await?
            }
            None => self.run_cpu(router_in, expert_in, residual, out)?,
        };
        *self.last.lock().expect("report lock") = Some(report);
        Ok(())
    }

    /// Whether the expert weights are streamed from host memory (GPU plans built with
    /// [`MoePlanBuilder::stream_experts`]).
    pub fn is_streamed(&self) -> bool {
        self.gpu.as_ref().is_some_and(|g| g.stream.is_some())
    }

    fn stream_ref(&self) -> Result<(&MoeGpu, &StreamGpu)> {
        let g = self.gpu_ref()?;
        let s = g.stream.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this MoE plan keeps every expert resident".into())
        })?;
        Ok((g, s))
    }

    /// Streamed plans: submits the router and the dispatch on `router_in` alone, with
    /// the copy of the token counts that [`MoePlan::read_routing`] maps, without
    /// waiting; work submitted after it (a layer's attention) queues behind it.
    pub async fn submit_route(&self, router_in: &Tensor) -> Result<Submitted<'_>> {
        let mut rec = Recorder::new(&self.ctx, "moe route", 2)?;
        self.record_route(&mut rec, router_in)?;
        self.record_routing_readback(&mut rec)?;
        rec.submit_deferred().await
    }

    /// Streamed plans: records the copy of the per-expert token counts (written by
    /// [`MoePlan::record_route`]) into the readback buffer that
    /// [`MoePlan::read_routing`] maps. Record it right after the route, in the same
    /// recording, and submit that recording on its own.
    pub fn record_routing_readback(&self, rec: &mut Recorder<'_>) -> Result<()> {
        let (g, s) = self.stream_ref()?;
        let bytes = self.cfg.experts as u64 * 4;
        rec.encoder()
            .copy_buffer_to_buffer(&g.meta, 0, &s.counts_readback, 0, bytes);
        Ok(())
    }

    /// Streamed plans: waits for the routing submission alone (later submissions,
    /// such as a layer's attention, keep running) and returns the tokens each expert
    /// received.
    pub async fn read_routing(&self, route: &Submitted<'_>) -> Result<Vec<u32>> {
        let (g, s) = self.stream_ref()?;
        let _ = g;
        let dev = self.ctx.gpu().expect("GPU plan");
        let slice = s.counts_readback.slice(..);
        let (tx, rx) = futures::channel::oneshot::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        dev.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(route.index().clone()),
                timeout: None,
            })
            .map_err(|e| Error::Readback(e.to_string()))?;
        #[cfg(target_arch = "wasm32")]
        let _ = (dev, route);
        rx.await
            .map_err(|_| Error::Readback("map callback dropped".into()))?
            .map_err(|e| Error::Readback(e.to_string()))?;
        let counts: Vec<u32> = bytemuck::pod_collect_to_vec(
            &slice
                .get_mapped_range()
                .map_err(|e| Error::Readback(e.to_string()))?,
        );
        s.counts_readback.unmap();
        Ok(counts)
    }

    /// Streamed plans: plans the rounds for `counts` (from [`MoePlan::read_routing`]),
    /// uploads the missing experts into their slots and submits each round's expert
    /// kernels (the last one with the combine), without waiting for the GPU. The
    /// uploads are handed to the queue while earlier submissions still run.
    pub async fn run_streamed_experts<'s>(
        &'s self,
        counts: &[u32],
        expert_in: &Tensor,
        residual: &Tensor,
        out: &Tensor,
    ) -> Result<(Vec<Submitted<'s>>, StreamStats)> {
        self.check(expert_in, "expert input")?;
        self.check(residual, "residual")?;
        self.check(out, "output")?;
        let (g, s) = self.stream_ref()?;
        let dev = self.ctx.gpu().expect("GPU plan");
        let host = self
            .host
            .as_ref()
            .expect("streamed plans keep the host weights");
        let t0 = Instant::now();
        let (rounds, hits, slots) = {
            let mut cache = s.cache.lock().expect("cache lock");
            let (r, h) = cache.plan(counts)?;
            (r, h, cache.slots())
        };
        let mut stats = StreamStats {
            slots,
            routed: counts.iter().filter(|&&n| n > 0).count(),
            hits,
            rounds: rounds.len(),
            ..Default::default()
        };
        let ffn = self.cfg.ffn;
        let mut subs = Vec::with_capacity(rounds.len());
        for (i, round) in rounds.iter().enumerate() {
            let u0 = Instant::now();
            for &(e, slot) in &round.uploads {
                for (m, buf) in [
                    (&host.gate, &g.w.gate),
                    (&host.up, &g.w.up),
                    (&host.down_t, &g.w.down_t),
                ] {
                    let (words, scales) = expert_words(m, e, ffn);
                    let (w_at, s_at) = slot_offsets(m, slots, ffn, slot);
                    let data = bytemuck::cast_slice(&m.words[words]);
                    write_buffer_parallel(&dev.queue, buf, w_at as u64 * 4, data);
                    stats.uploaded_bytes += data.len() as u64;
                    if let (Some(sr), Some(s_at)) = (scales, s_at) {
                        let data = bytemuck::cast_slice(&m.words[sr]);
                        write_buffer_parallel(&dev.queue, buf, s_at as u64 * 4, data);
                        stats.uploaded_bytes += data.len() as u64;
                    }
                }
            }
            dev.queue
                .write_buffer(&g.slot_of, 0, bytemuck::cast_slice(&round.slot_of));
            stats.uploaded_bytes += round.slot_of.len() as u64 * 4;
            stats.uploads += round.uploads.len();
            stats.upload_ms += u0.elapsed().as_secs_f64() * 1e3;
            let last = i + 1 == rounds.len();
            let mut rec = Recorder::new(&self.ctx, "moe experts", if last { 3 } else { 2 })?;
            if i == 0 {
                rec.encoder().clear_buffer(&g.stats, 0, None);
            }
            self.record_ffn(&mut rec, g, expert_in);
            if last {
                self.record_combine(&mut rec, g, residual, out);
            }
            subs.push(rec.submit_deferred().await?);
            if i == 0 {
                stats.stall_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
        }
        Ok((subs, stats))
    }

    fn gpu_ref(&self) -> Result<&MoeGpu> {
        self.gpu
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("recording a MoE plan needs a GPU".into()))
    }

    /// Records the router and the dispatch (stages `router`, `dispatch`) on
    /// `router_in` into a caller's recorder: a decoder layer records these before its
    /// attention, so the chosen experts are known while attention runs.
    pub fn record_route(&self, rec: &mut Recorder<'_>, router_in: &Tensor) -> Result<()> {
        self.check(router_in, "router input")?;
        let g = self.gpu_ref()?;
        let x = router_in.buffer().expect("checked: GPU tensor");
        let route = [x, &g.router_w, &g.logits, &g.ids, &g.topk_w];
        rec.step("router", &g.router, &route);
        let sort = [&g.ids, &g.block_counts, &g.meta, &g.sorted, &g.inv];
        g.dispatch.record(rec, &sort);
        Ok(())
    }

    /// Records the experts and the combine (stages `expert_up`, `expert_down`,
    /// `combine`) after [`MoePlan::record_route`] in the same recorder (plans with
    /// resident experts; a streamed plan runs them with
    /// [`MoePlan::run_streamed_experts`]).
    pub fn record_experts(
        &self,
        rec: &mut Recorder<'_>,
        expert_in: &Tensor,
        residual: &Tensor,
        out: &Tensor,
    ) -> Result<()> {
        self.check(expert_in, "expert input")?;
        self.check(residual, "residual")?;
        self.check(out, "output")?;
        let g = self.gpu_ref()?;
        if g.stream.is_some() {
            return Err(Error::InvalidArgument(
                "a streamed MoE plan runs its experts with run_streamed_experts (the \
                 routing must be read back first)"
                    .into(),
            ));
        }
        rec.encoder().clear_buffer(&g.stats, 0, None);
        self.record_ffn(rec, g, expert_in);
        self.record_combine(rec, g, residual, out);
        Ok(())
    }

    fn record_ffn(&self, rec: &mut Recorder<'_>, g: &MoeGpu, expert_in: &Tensor) {
        g.ffn.record(
            rec,
            &g.w,
            &FfnIo {
                meta: &g.meta,
                slot_of: &g.slot_of,
                z: expert_in.buffer().expect("checked: GPU tensor"),
                sorted: &g.sorted,
                act: &g.act,
                stats: &g.stats,
                y: &g.y,
            },
        );
    }

    fn record_combine(&self, rec: &mut Recorder<'_>, g: &MoeGpu, residual: &Tensor, out: &Tensor) {
        let residual = residual.buffer().expect("checked: GPU tensor");
        let out = out.buffer().expect("checked: GPU tensor");
        let bufs = [&g.y, &g.topk_w, &g.inv, residual, out];
        rec.step("combine", &g.combine, &bufs);
    }

    /// What the kernels of the last GPU run counted (read back): tokens per expert,
    /// the skipped-neuron fraction, and the tiled down GEMM's skipped-chunk fraction
    /// (when that path with chunk skipping ran).
    pub async fn gpu_stats(&self) -> Result<ExpertStats> {
        let g = self.gpu_ref()?;
        let dev = self.ctx.gpu().expect("GPU plan");
        let e = self.cfg.experts as u64;
        let counts: Vec<u32> =
            bytemuck::pod_collect_to_vec(&read_buffer(dev, &g.meta, 0, e * 4).await?);
        let stats = g.ffn.counters(&words::<u32>(dev, &g.stats).await?);
        let frac = |a: u32, b: u32| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        Ok(ExpertStats {
            skip_frac: frac(stats[0], stats[1]),
            down_chunk_skip_frac: self.chunk_skipping.then(|| frac(stats[2], stats[3])),
            stream: None,
            expert_counts: counts,
        })
    }

    async fn gpu_report(&self, timing: Report, stream: Option<StreamStats>) -> Result<MoeReport> {
        let experts = ExpertStats {
            stream,
            ..self.gpu_stats().await?
        };
        let path = match self.path {
            FfnPath::Tiled => format!("tiled{}", self.tile_m),
            FfnPath::Gemv => "gemv".into(),
        };
        Ok(self.make_report(self.ctx.backend(), path, timing, experts))
    }

    fn make_report(
        &self,
        backend: Backend,
        path: String,
        timing: Report,
        experts: ExpertStats,
    ) -> MoeReport {
        let ms = timing.ms();
        MoeReport {
            backend,
            path,
            weights: self.format(),
            tokens: self.tokens,
            ms,
            tokens_per_s: self.tokens as f64 / (ms / 1e3),
            experts,
            tflops: self.cfg.expert_flops(self.tokens) / ms / 1e9,
            timing,
        }
    }

    /// Reads every GPU intermediate of the last run (GPU plans only).
    pub async fn intermediates(&self) -> Result<MoeIntermediates> {
        let g = self.gpu_ref()?;
        let dev = self.ctx.gpu().expect("GPU plan");
        let (t, e, k) = (self.tokens, self.cfg.experts, self.cfg.top_k);
        let a = t * k;
        let trim = |mut v: Vec<u32>, n: usize| {
            v.truncate(n);
            v
        };
        let trimf = |mut v: Vec<f32>, n: usize| {
            v.truncate(n);
            v
        };
        let stats = g.ffn.counters(&words::<u32>(dev, &g.stats).await?);
        Ok(MoeIntermediates {
            logits: trimf(words(dev, &g.logits).await?, t * e),
            ids: trim(words(dev, &g.ids).await?, a),
            weights: trimf(words(dev, &g.topk_w).await?, a),
            meta: trim(words(dev, &g.meta).await?, meta_words(e)),
            sorted: trim(words(dev, &g.sorted).await?, a),
            inv: trim(words(dev, &g.inv).await?, a),
            act: trimf(words(dev, &g.act).await?, a * self.cfg.ffn),
            y: trimf(words(dev, &g.y).await?, a * self.cfg.hidden),
            stats,
        })
    }

    /// Fills every GPU intermediate (ids, weights, dispatch, activations, expert
    /// outputs) with all-ones bits (NaN as f32, `u32::MAX` as an index), so that a test
    /// sees any element a kernel fails to write.
    pub fn poison_intermediates(&self) -> Result<()> {
        let g = self.gpu_ref()?;
        let dev = self.ctx.gpu().expect("GPU plan");
        for b in [
            &g.logits,
            &g.ids,
            &g.topk_w,
            &g.block_counts,
            &g.meta,
            &g.sorted,
            &g.inv,
            &g.act,
            &g.y,
            &g.stats,
        ] {
            dev.queue.write_buffer(b, 0, &vec![0xff; b.size() as usize]);
        }
        Ok(())
    }

    /// Blocking [`MoePlan::intermediates`].
    pub fn intermediates_blocking(&self) -> Result<MoeIntermediates> {
        pollster::block_on(self.intermediates())
    }

    fn run_cpu(
        &self,
        router_in: &Tensor,
        expert_in: &Tensor,
        residual: &Tensor,
        out: &mut Tensor,
    ) -> Result<MoeReport> {
        let w = self.host.as_ref().expect("CPU plans keep the host weights");
        let host = |t: &Tensor| t.host().expect("checked: CPU tensor").to_f32();
        let c = &self.cfg;
        let mut stages = vec![];
        let mut timed = |name: &str, start: Instant| {
            stages.push(StageTime::host(name, start.elapsed().as_secs_f64() * 1e3))
        };
        let total = Instant::now();
        let s = Instant::now();
        let logits = cpu::router_logits(&host(router_in), &w.router, c.hidden, c.experts);
        let (ids, weights) = cpu::top_k(&logits, c.experts, c.top_k, c.scoring);
        timed("router", s);
        let s = Instant::now();
        let map = cpu::dispatch(&ids, c.experts);
        timed("dispatch", s);
        let s = Instant::now();
        let (_act, y, skipped) = cpu::experts_ffn(&host(expert_in), w, &map, c.top_k);
        timed("experts", s);
        let s = Instant::now();
        let o = cpu::combine(&y, &weights, &map.inv, &host(residual), c.top_k, c.hidden);
        timed("combine", s);
        *out.host_mut().expect("checked: CPU tensor") = HostData::F32(o);
        let wall = total.elapsed().as_secs_f64() * 1e3;
        let timing = Report {
            stages,
            wall_ms: wall,
            gpu_ms: None,
            timing: "wall".into(),
        };
        let experts = ExpertStats::cpu(c, self.tokens, skipped, map.counts);
        Ok(self.make_report(Backend::Cpu, "cpu".into(), timing, experts))
    }
}
