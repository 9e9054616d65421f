//! The GPU decoder: the whole forward pass of a GGUF model on a GPU context, with the
//! weights kept in their file blocks ([`GpuMatrix`], decoded inside the kernels) and the
//! KV cache in GPU memory ([`GpuKvCache`]); only the ids go up and the last token's
//! logits come back.
//!
//! A call of `t` tokens after `start` cached ones records, per layer: RMSNorm → Q/K/V
//! projections (head-major, Qwen2's biases fused) → QK-norm (Gemma 3) → RoPE (adjacent
//! pairs for `llama` files, rotate-half for the others; NoPE layers skip it) → K/V
//! stored into the f16 cache → attention → output projection (+ residual, or Gemma's
//! post-norm added) → RMSNorm → gate/up → SwiGLU/GeGLU → down (+ residual, or
//! post-norm added); then the final norm of the last row and the logits. A prompt from
//! an empty cache attends through the crate's [`crate::AttentionPlan`] with the layer's
//! method (dense, or any sparse method; a sliding-window layer longer than its window
//! runs [`Method::Window`]); decode steps and continuations after cached tokens attend
//! over the cache with the split-K kernel of [`crate::attention::decode`] (dense, the
//! window applied). Everything of one call is one submission.
//!
//! Architectures: llama, qwen2, gemma3 and smallthinker. SmallThinker's layers route on
//! their input before attention (GGUF router weights projected, then the top-k kernel
//! of [`crate::moe::router`]) and run their ReGLU experts from the file's 3-D tensors
//! in place ([`crate::moe::experts_ggml`]: gate, up only where the gate is positive,
//! down weighted into the residual stream).
//!
//! The dispatches of a token count are built once per cache ([`GpuKvCache`]) and
//! recorded call after call: a decode step writes the ids, the RoPE tables and the
//! position uniform, records, submits and reads `vocab` floats back.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::attention::decode::{DecodeAttentionGpu, DecodePos, DecodeShape, GpuKvLayer};
use crate::attention::{AttentionPlan, AttentionShape, Method, WindowConfig};
use crate::error::{Error, Result};
use crate::model::decoder::{Config, choose_layer_method};
use crate::model::gguf::Gguf;
use crate::model::sample::Sampler;
use crate::moe::RouterScoring;
use crate::moe::experts_ggml::{ExpertsGgmlGpu, ExpertsScratch, ExpertsShape};
use crate::moe::router::top_k_step;
use crate::ops::act::ActGpu;
use crate::ops::embed::EmbedGpu;
use crate::ops::linear::{LinearLayout, MatmulGpu};
use crate::ops::rmsnorm::{RmsNormGpu, RmsNormMode};
use crate::ops::rope::{RopeStyle, rope_step, rope_table};
use crate::quant::gpu::GpuMatrix;
use crate::runtime::Recorder;
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{Bound, Dispatch, storage, storage_init};
use crate::runtime::recorder::Report;
use crate::runtime::tensor::{DType, Tensor};

/// Identifies a decoder, so that a cache is only ever run with the one that made it.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One layer's weights on the GPU.
struct GpuLayer {
    attn_norm: wgpu::Buffer,
    wq: GpuMatrix,
    wk: GpuMatrix,
    wv: GpuMatrix,
    wo: GpuMatrix,
    bq: Option<wgpu::Buffer>,
    bk: Option<wgpu::Buffer>,
    bv: Option<wgpu::Buffer>,
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
    post_attn_norm: Option<wgpu::Buffer>,
    ffn_norm: wgpu::Buffer,
    /// The FFN's matrices; for a MoE layer the experts' 3-D tensors as `[experts · rows,
    /// cols]` in parts of whole experts.
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
    /// A MoE layer's router `[experts, d_model]`.
    router: Option<GpuMatrix>,
    post_ffn_norm: Option<wgpu::Buffer>,
}

/// The longest prefill chunk of a dense prompt by default ([`GpuDecoder::default_chunk`]).
pub const DENSE_CHUNK: usize = 8192;

/// A GGUF model whose forward pass runs on a GPU.
pub struct GpuDecoder {
    /// Its configuration.
    pub cfg: Config,
    ctx: Context,
    id: u64,
    embd: GpuMatrix,
    output: Option<GpuMatrix>,
    out_norm: wgpu::Buffer,
    layers: Vec<GpuLayer>,
    method: Method,
    /// Layers whose prompt attention runs the method; the others run dense (all when
    /// empty).
    pub method_layers: Vec<usize>,
    /// Per-layer methods overriding the others (calibrated SALE thresholds:
    /// [`crate::attention::select::sale_calibrate::SaleThresholds::methods`]).
    pub layer_methods: std::collections::HashMap<usize, Method>,
    /// Prompt tokens per prefill chunk where the caller sets it (memory: a chunk's
    /// activations grow with its length); `None`: [`GpuDecoder::default_chunk`].
    pub prefill_chunk: Option<usize>,
    weight_bytes: u64,
    last: Mutex<Option<Report>>,
}

/// The KV cache of one sequence on the GPU (f16, room for `capacity` positions reserved
/// at creation), with the dispatches of the token counts it has run.
pub struct GpuKvCache {
    owner: u64,
    layers: Vec<GpuKvLayer>,
    len: usize,
    capacity: usize,
    pos: DecodePos,
    plans: HashMap<usize, TokenPlan>,
}

impl GpuKvCache {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions it has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets the cached tokens after the first `len` (a chat rewinding to a common
    /// prefix); the room stays.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Bytes of the cache buffers.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(GpuKvLayer::bytes).sum()
    }
}

/// The activation buffers of one token count.
struct Buffers {
    ids: wgpu::Buffer,
    /// Hidden states `[t, d_model]` (the residual stream) and its second copy (a
    /// projection cannot read and write one buffer).
    x: wgpu::Buffer,
    x2: wgpu::Buffer,
    xn: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    att: wgpu::Buffer,
    a: wgpu::Buffer,
    /// Gate products `[t, ffn]` (`[t · top_k, ffn]` for MoE layers), then the
    /// activation in place.
    g: wgpu::Buffer,
    u: wgpu::Buffer,
    /// MoE layers: router logits `[t, experts]`, the chosen experts and their weights
    /// `[t, top_k]`.
    route_logits: wgpu::Buffer,
    route_ids: wgpu::Buffer,
    route_w: wgpu::Buffer,
    /// MoE layers of a prompt: the grouped passes' scratch.
    experts: Option<ExpertsScratch>,
    xl: wgpu::Buffer,
    logits: wgpu::Buffer,
    rope: wgpu::Buffer,
    rope_local: wgpu::Buffer,
}

/// Everything recorded for a call of `t` tokens, built once per cache.
struct TokenPlan {
    bufs: Buffers,
    head: Vec<Dispatch>,
    pre: Vec<Vec<Dispatch>>,
    cached: Vec<Vec<Dispatch>>,
    post: Vec<Vec<Dispatch>>,
    tail: Vec<Dispatch>,
}

fn f32_buffer(g: &GpuDevice, label: &str, values: usize) -> Result<wgpu::Buffer> {
    storage(g, label, (values.max(1) * 4) as u64)
}

impl GpuDecoder {
    /// Uploads the weights of a llama / qwen2 / gemma3 GGUF to `ctx` (a GPU) tensor by
    /// tensor, straight from the mapped file (no f32 copy of a matrix is made); the
    /// prompt attention of every layer (or [`GpuDecoder::method_layers`]) runs `method`.
    pub fn load(g: &Gguf, ctx: &Context, method: Method) -> Result<Self> {
        Self::load_with(g, ctx, method, None)
    }

    /// [`GpuDecoder::load`] with matrices split into parts of at most `max_part` bytes
    /// (tests of the splitting; `None`: the device's binding limit).
    pub fn load_with(
        g: &Gguf,
        ctx: &Context,
        method: Method,
        max_part: Option<u64>,
    ) -> Result<Self> {
        let dev = ctx.gpu().ok_or(Error::WrongContext)?;
        let cfg = Config::from_gguf(g)?;
        if !cfg.head_dim.is_multiple_of(4) || cfg.head_dim > 256 || !cfg.d_model.is_multiple_of(4) {
            return Err(Error::Model(format!(
                "the GPU decoder needs head_dim % 4 == 0 and ≤ 256, d_model % 4 == 0 ({cfg:?})"
            )));
        }
        let moe = cfg.experts > 0;
        if moe && cfg.experts > crate::moe::MAX_EXPERTS {
            return Err(Error::Model(format!(
                "{} experts: the GPU router takes at most {}",
                cfg.experts,
                crate::moe::MAX_EXPERTS
            )));
        }
        let mut bytes = 0u64;
        // A matrix, or (`experts` > 0) a 3-D expert tensor as `[experts · rows, cols]`
        // in parts of whole experts.
        let mut tensor = |name: &str, experts: usize| -> Result<GpuMatrix> {
            let (t, rows, cols, group) = if experts == 0 {
                let (t, rows, cols) = g.matrix(name)?;
                (t, rows, cols, 1)
            } else {
                let (t, rows, cols) = g.experts(name, experts)?;
                (t, rows * experts, cols, rows)
            };
            let m = match g.map_tensor(name)? {
                Some((map, range)) => {
                    let m = GpuMatrix::upload_grouped(
                        ctx,
                        name,
                        t.ty,
                        rows,
                        cols,
                        map.slice(range.clone()),
                        max_part,
                        group,
                    );
                    // The pages were only read to be copied: let them go.
                    map.advise(range, false);
                    m?
                }
                None => GpuMatrix::upload_grouped(
                    ctx,
                    name,
                    t.ty,
                    rows,
                    cols,
                    &g.tensor_bytes(name)?,
                    max_part,
                    group,
                )?,
            };
            bytes += m.bytes();
            Ok(m)
        };
        let embd = tensor("token_embd.weight", 0)?;
        let output = if g.has_tensor("output.weight") {
            Some(tensor("output.weight", 0)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let (wq, wk, wv, wo) = (
                tensor(&n("attn_q.weight"), 0)?,
                tensor(&n("attn_k.weight"), 0)?,
                tensor(&n("attn_v.weight"), 0)?,
                tensor(&n("attn_output.weight"), 0)?,
            );
            let e = cfg.experts;
            let (gate, up, down, router) = if moe {
                (
                    tensor(&n("ffn_gate_exps.weight"), e)?,
                    tensor(&n("ffn_up_exps.weight"), e)?,
                    tensor(&n("ffn_down_exps.weight"), e)?,
                    Some(tensor(&n("ffn_gate_inp.weight"), 0)?),
                )
            } else {
                (
                    tensor(&n("ffn_gate.weight"), 0)?,
                    tensor(&n("ffn_up.weight"), 0)?,
                    tensor(&n("ffn_down.weight"), 0)?,
                    None,
                )
            };
            let (qd, kd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
            if g.has_tensor(&n("post_attention_norm.weight"))
                != g.has_tensor(&n("post_ffw_norm.weight"))
            {
                return Err(Error::Model(format!(
                    "layer {l}: post-norms after attention and feed-forward come together \
                     (Gemma) or not at all"
                )));
            }
            let is = |m: &GpuMatrix, r: usize, c: usize| m.rows == r && m.cols == c;
            // A MoE layer's FFN matrices hold every expert's rows.
            let per = e.max(1);
            if !(is(&wq, qd, cfg.d_model)
                && is(&wk, kd, cfg.d_model)
                && is(&wv, kd, cfg.d_model)
                && is(&wo, cfg.d_model, qd)
                && is(&gate, per * cfg.ffn_dims[l], cfg.d_model)
                && is(&up, per * cfg.ffn_dims[l], cfg.d_model)
                && is(&down, per * cfg.d_model, cfg.ffn_dims[l])
                && router.as_ref().is_none_or(|r| is(r, e, cfg.d_model)))
                || (moe && g.has_tensor(&n("post_ffw_norm.weight")))
            {
                return Err(Error::Model(format!(
                    "layer {l}: projection shapes do not match the configuration {cfg:?}"
                )));
            }
            layers.push(GpuLayer {
                attn_norm: vec_buf(ctx, g, &n("attn_norm.weight"), cfg.d_model)?,
                wq,
                wk,
                wv,
                wo,
                bq: vec_opt(ctx, g, &n("attn_q.bias"), qd)?,
                bk: vec_opt(ctx, g, &n("attn_k.bias"), kd)?,
                bv: vec_opt(ctx, g, &n("attn_v.bias"), kd)?,
                q_norm: vec_opt(ctx, g, &n("attn_q_norm.weight"), cfg.head_dim)?,
                k_norm: vec_opt(ctx, g, &n("attn_k_norm.weight"), cfg.head_dim)?,
                post_attn_norm: vec_opt(ctx, g, &n("post_attention_norm.weight"), cfg.d_model)?,
                ffn_norm: vec_buf(ctx, g, &n("ffn_norm.weight"), cfg.d_model)?,
                gate,
                up,
                down,
                router,
                post_ffn_norm: vec_opt(ctx, g, &n("post_ffw_norm.weight"), cfg.d_model)?,
            });
        }
        let out_norm = vec_buf(ctx, g, "output_norm.weight", cfg.d_model)?;
        // Drop every page of the mapped file this process still holds (a page fault maps
        // a whole folio, so neighbours of the tensors read stay mapped otherwise).
        if let Some((map, _)) = g.map_tensor("token_embd.weight")? {
            map.advise(0..map.len(), false);
        }
        // Let the uploads finish, so that their staging copies are freed now.
        dev.queue.submit([]);
        let _ = dev.device.poll(wgpu::PollType::wait_indefinitely());
        log::info!(
            "GPU decoder: {:?}, {} layers, {:.1} MiB of weights on {}",
            cfg.arch,
            cfg.n_layer,
            bytes as f64 / (1 << 20) as f64,
            dev.info.name
        );
        Ok(GpuDecoder {
            cfg,
            ctx: ctx.clone(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            embd,
            output,
            out_norm,
            layers,
            method,
            method_layers: Vec::new(),
            layer_methods: Default::default(),
            prefill_chunk: None,
            weight_bytes: bytes,
            last: Mutex::new(None),
        })
    }

    /// The logits' matrix: `output.weight`, or the embedding when the file ties them.
    fn output_matrix(&self) -> &GpuMatrix {
        self.output.as_ref().unwrap_or(&self.embd)
    }

    /// Bytes of the weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The context it runs on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The method of layer `layer`'s prompt attention.
    pub fn layer_method(&self, layer: usize) -> Method {
        choose_layer_method(
            &self.method,
            &self.method_layers,
            &self.layer_methods,
            layer,
        )
    }

    /// Replaces the prompt attention method.
    pub fn set_method(&mut self, method: Method) {
        self.method = method;
    }

    /// The timing report of the last call (stages `layer{i}.pre`, `layer{i}.attention`,
    /// `layer{i}.post`, where the device has timestamps).
    pub fn last_report(&self) -> Option<Report> {
        self.last.lock().expect("report lock").clone()
    }

    /// An empty cache with room for `capacity` positions (each layer's keys and values
    /// in pages under the device's binding limit, so long contexts fit).
    pub fn new_cache(&self, capacity: usize) -> Result<GpuKvCache> {
        self.new_cache_with(capacity, None)
    }

    /// [`GpuDecoder::new_cache`] with pages of at most `max_page` bytes (tests of the
    /// paging).
    pub fn new_cache_with(&self, capacity: usize, max_page: Option<u64>) -> Result<GpuKvCache> {
        let c = &self.cfg;
        let layers = (0..c.n_layer)
            .map(|_| {
                GpuKvLayer::with_page_bytes(&self.ctx, c.n_kv_head, capacity, c.head_dim, max_page)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuKvCache {
            owner: self.id,
            layers,
            len: 0,
            capacity,
            pos: DecodePos::new(&self.ctx)?,
            plans: HashMap::new(),
        })
    }

    /// Builds the buffers and dispatches of a call of `t` tokens on `cache`.
    fn plan(&self, t: usize, cache: &GpuKvCache) -> Result<TokenPlan> {
        let ctx = &self.ctx;
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let c = &self.cfg;
        let (dm, d, h, kvh, f) = (c.d_model, c.head_dim, c.n_head, c.n_kv_head, c.ffn_dim);
        let vocab = self.output_matrix().rows;
        let post_norms = self.layers.iter().any(|l| l.post_attn_norm.is_some());
        let moe = c.experts > 0;
        let local_rope = c.rope_base_local != c.rope_base;
        // A dense FFN runs in parts of `ffn_rows` tokens when `[t, ffn]` is over the
        // binding limit or FFN_PART_BYTES (gate and up hold one part).
        let ffn_rows = if moe {
            t
        } else {
            ffn_part_rows(t, f, binding_limit(g))?
        };
        let experts_shape = moe.then_some(ExpertsShape {
            tokens: t,
            top_k: c.top_k,
            experts: c.experts,
            hidden: dm,
            ffn: f,
        });
        let bufs = Buffers {
            ids: storage(g, "token ids", (t * 4) as u64)?,
            x: f32_buffer(g, "hidden", t * dm)?,
            x2: f32_buffer(g, "hidden (second)", t * dm)?,
            xn: f32_buffer(g, "normed hidden", t * dm)?,
            q: f32_buffer(g, "q", t * h * d)?,
            k: f32_buffer(g, "k", t * kvh * d)?,
            v: f32_buffer(g, "v", t * kvh * d)?,
            att: f32_buffer(g, "attention output", t * h * d)?,
            // (Gemma's post-norms only)
            a: f32_buffer(g, "projection output", if post_norms { t * dm } else { 1 })?,
            g: f32_buffer(g, "ffn gate", ffn_rows * f * c.top_k.max(1))?,
            u: f32_buffer(g, "ffn up", if moe { 1 } else { ffn_rows * f })?,
            route_logits: f32_buffer(g, "router logits", t * c.experts)?,
            route_ids: storage(g, "routed experts", (t * c.top_k).max(1) as u64 * 4)?,
            route_w: f32_buffer(g, "routing weights", t * c.top_k)?,
            experts: experts_shape
                .map(|shape| ExpertsScratch::new(g, shape))
                .transpose()?,
            xl: f32_buffer(g, "last hidden", dm)?,
            logits: f32_buffer(g, "logits", vocab)?,
            rope: f32_buffer(g, "rope table", t * d)?,
            rope_local: f32_buffer(g, "rope table (local)", if local_rope { t * d } else { 1 })?,
        };
        let b = &bufs;
        let head =
            EmbedGpu::build(ctx, &self.embd, t, c.embedding_scale())?.dispatches(g, &b.ids, &b.x);
        let style = if c.rope_neox {
            RopeStyle::Neox
        } else {
            RopeStyle::Adjacent
        };
        let (rope_q, rope_k) = (
            rope_step(ctx, style, h, t, d)?,
            rope_step(ctx, style, kvh, t, d)?,
        );
        let norm = RmsNormGpu::build_for(ctx, t, dm, c.norm_eps, 0, RmsNormMode::Out)?;
        let norm_add = RmsNormGpu::build_for(ctx, t, dm, c.norm_eps, 0, RmsNormMode::Add)?;
        let qk_norm_q = RmsNormGpu::build_for(ctx, t * h, d, c.norm_eps, 0, RmsNormMode::InPlace)?;
        let qk_norm_k =
            RmsNormGpu::build_for(ctx, t * kvh, d, c.norm_eps, 0, RmsNormMode::InPlace)?;
        // The FFN's parts of the chunk: token rows [r0, r0 + rows).
        let ffn_parts: Vec<(usize, usize)> = (0..t)
            .step_by(ffn_rows)
            .map(|r0| (r0, ffn_rows.min(t - r0)))
            .collect();
        // The gated activation per FFN width and part length (one for most models; a
        // cropped model's layers differ).
        let mut acts: HashMap<(usize, usize), ActGpu> = HashMap::new();
        if !moe {
            for &fl in &c.ffn_dims {
                for &(_, rows) in &ffn_parts {
                    if let Entry::Vacant(e) = acts.entry((fl, rows)) {
                        e.insert(ActGpu::build(ctx, c.gate(), rows * fl)?);
                    }
                }
            }
        }
        let router_top_k = if moe {
            let scoring = if c.sigmoid_gating {
                RouterScoring::Sigmoid
            } else {
                RouterScoring::Softmax
            };
            Some(top_k_step(ctx, c.experts, c.top_k, scoring, t)?)
        } else {
            None
        };
        let splits = decode_splits(cache.capacity, h, t);
        // One cache attention per window (global / local layers), its partial states
        // shared by every layer (they run one after the other).
        let attn_for = |window: Option<usize>| {
            DecodeAttentionGpu::build(
                ctx,
                DecodeShape {
                    heads: h,
                    kv_heads: kvh,
                    tokens: t,
                    head_dim: d,
                    capacity: cache.capacity,
                    page_len: cache.layers[0].page_len,
                    window,
                    scale: self.attention_scale(),
                },
                splits,
            )
        };
        let attn_global = attn_for(None)?;
        let attn_local = match c.window {
            Some(w) => Some(attn_global.with_window(ctx, w)?),
            None => None,
        };
        let mut pre = Vec::with_capacity(c.n_layer);
        let mut cached = Vec::with_capacity(c.n_layer);
        let mut post = Vec::with_capacity(c.n_layer);
        for (li, l) in self.layers.iter().enumerate() {
            let hm = LinearLayout {
                out_head_major: true,
                ..Default::default()
            };
            let proj = |m: &GpuMatrix,
                        bias: &Option<wgpu::Buffer>,
                        out: &wgpu::Buffer|
             -> Result<Vec<Dispatch>> {
                let layout = LinearLayout {
                    bias: bias.is_some(),
                    ..hm
                };
                MatmulGpu::build(ctx, "projection", m, t, d, layout)?.dispatches(
                    g,
                    &b.xn,
                    out,
                    None,
                    bias.as_ref(),
                )
            };
            let mut list = vec![];
            // SmallThinker routes on the layer's input, before attention.
            if let (Some(router), Some(top_k)) = (&l.router, &router_top_k) {
                list.extend(
                    MatmulGpu::build(ctx, "router", router, t, d, LinearLayout::default())?
                        .dispatches(g, &b.x, &b.route_logits, None, None)?,
                );
                list.push(top_k.dispatch(g, &[&b.route_logits, &b.route_ids, &b.route_w]));
            }
            list.push(norm.dispatch(g, &[&b.x, &l.attn_norm, &b.xn]));
            list.extend(proj(&l.wq, &l.bq, &b.q)?);
            list.extend(proj(&l.wk, &l.bk, &b.k)?);
            list.extend(proj(&l.wv, &l.bv, &b.v)?);
            if let Some(w) = &l.q_norm {
                list.push(qk_norm_q.dispatch(g, &[&b.q, w]));
            }
            if let Some(w) = &l.k_norm {
                list.push(qk_norm_k.dispatch(g, &[&b.k, w]));
            }
            if c.rope[li] {
                let table = if c.global[li] || c.rope_base_local == c.rope_base {
                    &b.rope
                } else {
                    &b.rope_local
                };
                list.push(rope_q.dispatch(g, &[table, &b.q]));
                list.push(rope_k.dispatch(g, &[table, &b.k]));
            }
            let attn = match (&attn_local, c.global[li]) {
                (Some(local), false) => local,
                _ => &attn_global,
            };
            let kv = &cache.layers[li];
            list.extend(attn.store(g, &cache.pos, &b.k, &b.v, kv)?);
            pre.push(list);
            cached.push(attn.attend(g, &cache.pos, &b.q, kv, &b.att)?);
            // After attention: x2 = x + O·att (or x += norm(O·att)), then the FFN back
            // into x.
            let mut list = vec![];
            let o_res = l.post_attn_norm.is_none();
            let o_layout = LinearLayout {
                in_head_major: true,
                residual: o_res,
                ..Default::default()
            };
            let o = MatmulGpu::build(ctx, "attention output", &l.wo, t, d, o_layout)?;
            let stream = if o_res {
                list.extend(o.dispatches(g, &b.att, &b.x2, Some(&b.x), None)?);
                &b.x2
            } else {
                list.extend(o.dispatches(g, &b.att, &b.a, None, None)?);
                let w = l.post_attn_norm.as_ref().expect("checked");
                list.push(norm_add.dispatch(g, &[&b.a, w, &b.x]));
                &b.x
            };
            list.push(norm.dispatch(g, &[stream, &l.ffn_norm, &b.xn]));
            let plain = LinearLayout::default();
            let fl = c.ffn_dims[li];
            if let Some(shape) = experts_shape {
                let shape = ExpertsShape { ffn: fl, ..shape };
                // x = x2 + Σ_j w_j · expert_j(xn) (no post-norms in a MoE model).
                let experts = ExpertsGgmlGpu::build(ctx, shape, &l.gate, &l.up, &l.down)?;
                list.extend(experts.dispatches(
                    g,
                    &b.xn,
                    &b.route_ids,
                    &b.route_w,
                    &b.g,
                    &b.x2,
                    &b.x,
                    b.experts.as_ref().expect("made for MoE models"),
                ));
                post.push(list);
                continue;
            }
            let rows_of = |buf, r0, rows| token_rows(buf, r0, rows, t, dm);
            // x = x2 + down · h, or a = down · h (x += norm(a) after the last part).
            let down_layout = LinearLayout {
                residual: l.post_ffn_norm.is_none(),
                ..Default::default()
            };
            // The three products per part length (the parts but the last share one).
            let mut products: HashMap<usize, [MatmulGpu; 3]> = HashMap::new();
            for &(r0, rows) in &ffn_parts {
                if let Entry::Vacant(e) = products.entry(rows) {
                    e.insert([
                        MatmulGpu::build(ctx, "ffn gate", &l.gate, rows, d, plain)?,
                        MatmulGpu::build(ctx, "ffn up", &l.up, rows, d, plain)?,
                        MatmulGpu::build(ctx, "ffn down", &l.down, rows, d, down_layout)?,
                    ]);
                }
                let [gate, up, down] = &products[&rows];
                let xn = rows_of(&b.xn, r0, rows);
                list.extend(gate.dispatches_bound(g, xn, Bound::Whole(&b.g), None, None)?);
                list.extend(up.dispatches_bound(g, xn, Bound::Whole(&b.u), None, None)?);
                list.push(acts[&(fl, rows)].dispatch(g, &b.g, &b.u));
                let (y, residual) = match &l.post_ffn_norm {
                    None => (rows_of(&b.x, r0, rows), Some(rows_of(&b.x2, r0, rows))),
                    Some(_) => (rows_of(&b.a, r0, rows), None),
                };
                list.extend(down.dispatches_bound(g, Bound::Whole(&b.g), y, residual, None)?);
            }
            if let Some(w) = &l.post_ffn_norm {
                list.push(norm_add.dispatch(g, &[&b.a, w, &b.x]));
            }
            post.push(list);
        }
        let last = RmsNormGpu::build_for(ctx, 1, dm, c.norm_eps, t - 1, RmsNormMode::Out)?;
        let mut tail = vec![last.dispatch(g, &[&b.x, &self.out_norm, &b.xl])];
        let out = self.output_matrix();
        tail.extend(
            MatmulGpu::build(ctx, "logits", out, 1, d, LinearLayout::default())?
                .dispatches(g, &b.xl, &b.logits, None, None)?,
        );
        Ok(TokenPlan {
            bufs,
            head,
            pre,
            cached,
            post,
            tail,
        })
    }

    /// The softmax scale of the attention (1/√head_dim).
    pub fn attention_scale(&self) -> f32 {
        self.cfg.attention_scale()
    }

    /// The prompt attention method of layer `li` for `t` tokens from an empty cache: a
    /// sliding-window layer whose keys reach past its window runs that window (no sinks),
    /// every other layer its method — as the CPU decoder chooses.
    fn prompt_method(&self, li: usize, t: usize) -> Method {
        let c = &self.cfg;
        match (c.global[li], c.window) {
            (false, Some(w)) if t > w => Method::Window(WindowConfig {
                window: w,
                sinks: 0,
            }),
            _ => self.layer_method(li),
        }
    }

    /// Records and submits a prompt of `t` tokens from an empty cache: each layer's
    /// attention through an attention plan of its method. Layers of one method share one
    /// plan and one submission; where the method changes (calibrated per-layer SALE
    /// thresholds, a window layer) the recording so far is submitted and the next
    /// plan built, so that at most two plans' buffers are alive at once.
    async fn record_prompt(&self, plan: &TokenPlan, t: usize) -> Result<Report> {
        let c = &self.cfg;
        let (b, d) = (&plan.bufs, c.head_dim);
        let tensor = |buf: &wgpu::Buffer, heads: usize| {
            Tensor::from_buffer(&self.ctx, &[heads, t, d], DType::F32, buf.clone())
        };
        let (q, k, v, o) = (
            tensor(&b.q, c.n_head)?,
            tensor(&b.k, c.n_kv_head)?,
            tensor(&b.v, c.n_kv_head)?,
            tensor(&b.att, c.n_head)?,
        );
        let t0 = crate::runtime::recorder::Instant::now();
        let mut parts = Vec::new();
        let mut current: Option<(Method, AttentionPlan)> = None;
        let new_rec = |stages: u32| Recorder::new(&self.ctx, "gpu decoder prompt", stages);
        let mut rec: Option<Recorder<'_>> = None;
        for li in 0..c.n_layer {
            let m = self.prompt_method(li, t);
            if current.as_ref().is_none_or(|(cm, _)| *cm != m) {
                if let Some(r) = rec.take() {
                    parts.push(r.submit().await?);
                }
                current = Some((m.clone(), self.prompt_plan(m, t)?));
            }
            let (_, attention) = current.as_ref().expect("set above");
            let r = match &mut rec {
                Some(r) => r,
                None => {
                    // Room for every remaining layer's stages and the logits.
                    let per = 2 + attention.stage_count();
                    let mut r = new_rec(per * (c.n_layer - li) as u32 + 2)?;
                    if li == 0 {
                        r.dispatch_stage("embedding", &plan.head);
                    }
                    rec.insert(r)
                }
            };
            r.dispatch_stage(&format!("layer{li}.pre"), &plan.pre[li]);
            attention.record(r, &q, &k, &v, &o)?;
            r.dispatch_stage(&format!("layer{li}.post"), &plan.post[li]);
        }
        let mut r = rec.expect("a model has layers");
        r.dispatch_stage("logits", &plan.tail);
        parts.push(r.submit().await?);
        Ok(Report::concat(parts, t0.elapsed().as_secs_f64() * 1e3))
    }

    /// A prompt attention plan of `t` tokens running `method`.
    fn prompt_plan(&self, method: Method, t: usize) -> Result<AttentionPlan> {
        let c = &self.cfg;
        let shape = AttentionShape::new(c.n_head, c.n_kv_head, t, c.head_dim);
        self.ctx
            .attention(shape)
            .method(method)
            .dtype(DType::F32)
            .scale(self.attention_scale())
            .build()
    }

    /// Runs `ids` after what `cache` holds, appending their keys and values, and returns
    /// the logits of the last token (final soft-capping applied).
    pub fn forward(&self, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        pollster::block_on(self.forward_async(ids, cache))
    }

    /// [`GpuDecoder::forward`], async (the browser's form).
    pub async fn forward_async(&self, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        let g = self.ctx.gpu().ok_or(Error::WrongContext)?;
        let c = &self.cfg;
        let t = ids.len();
        if t == 0 {
            return Err(Error::InvalidArgument("no tokens to run".into()));
        }
        if cache.owner != self.id {
            return Err(Error::InvalidArgument(
                "this KV cache was made by another GPU decoder".into(),
            ));
        }
        let start = cache.len;
        if start + t > cache.capacity {
            return Err(Error::InvalidArgument(format!(
                "{t} tokens after {start} cached exceed the cache's {} positions",
                cache.capacity
            )));
        }
        let rows = self.embd.rows;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} outside the vocabulary ({rows})"
            )));
        }
        let vocab = self.output_matrix().rows;
        if !cache.plans.contains_key(&t) {
            // Keep the one-token plan and the newest other one.
            cache.plans.retain(|&k, _| k == 1);
            let plan = self.plan(t, cache)?;
            cache.plans.insert(t, plan);
        }
        let plan = &cache.plans[&t];
        let b = &plan.bufs;
        g.queue.write_buffer(&b.ids, 0, bytemuck::cast_slice(ids));
        let d = c.head_dim;
        g.queue.write_buffer(
            &b.rope,
            0,
            bytemuck::cast_slice(&rope_table(t, d, c.rope_base as f64, start)),
        );
        if c.rope_base_local != c.rope_base {
            g.queue.write_buffer(
                &b.rope_local,
                0,
                bytemuck::cast_slice(&rope_table(t, d, c.rope_base_local as f64, start)),
            );
        }
        cache.pos.set(g, start);
        let report = if start == 0 {
            self.record_prompt(plan, t).await?
        } else {
            // Decode steps and continuations: one submission.
            let stages = 2 + 3 * c.n_layer as u32;
            let mut rec = Recorder::new(&self.ctx, "gpu decoder", stages)?;
            rec.dispatch_stage("embedding", &plan.head);
            for (li, ((pre, cached), post)) in plan
                .pre
                .iter()
                .zip(&plan.cached)
                .zip(&plan.post)
                .enumerate()
            {
                rec.dispatch_stage(&format!("layer{li}.pre"), pre);
                rec.dispatch_stage(&format!("layer{li}.attention"), cached);
                rec.dispatch_stage(&format!("layer{li}.post"), post);
            }
            rec.dispatch_stage("logits", &plan.tail);
            rec.submit().await?
        };
        let bytes =
            crate::runtime::tensor::read_buffer(g, &b.logits, 0, (vocab * 4) as u64).await?;
        *self.last.lock().expect("report lock") = Some(report);
        cache.len += t;
        let mut logits: Vec<f32> = bytemuck::cast_slice(&bytes).to_vec();
        c.softcap(&mut logits);
        Ok(logits)
    }

    /// Runs a long prompt in chunks of at most `chunk` tokens (the first from an empty
    /// cache through the layer methods, the others over the cache): the activations of
    /// one chunk bound the memory. Returns the last token's logits.
    pub fn prefill(&self, ids: &[u32], cache: &mut GpuKvCache, chunk: usize) -> Result<Vec<f32>> {
        pollster::block_on(self.prefill_async(ids, cache, chunk))
    }

    /// [`GpuDecoder::prefill`], async (the browser's form).
    pub async fn prefill_async(
        &self,
        ids: &[u32],
        cache: &mut GpuKvCache,
        chunk: usize,
    ) -> Result<Vec<f32>> {
        if ids.is_empty() || chunk == 0 {
            return Err(Error::InvalidArgument(
                "prefill of no tokens, or chunks of 0".into(),
            ));
        }
        let mut logits = Vec::new();
        for part in ids.chunks(chunk) {
            logits = self.forward_async(part, cache).await?;
        }
        Ok(logits)
    }

    /// Generation: prefill `prompt` after what `cache` holds (in chunks of
    /// [`GpuDecoder::default_chunk`] tokens), then up to `max_new` tokens chosen by
    /// `sampler`, stopping early at any of `stop`. Calls `on_token` with each new id. The
    /// cache keeps everything, so a next chat turn prefills only its new tokens.
    pub fn generate_with(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampler: &mut Sampler,
        cache: &mut GpuKvCache,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>> {
        pollster::block_on(self.generate_async(prompt, max_new, stop, sampler, cache, on_token))
    }

    /// [`GpuDecoder::generate_with`], async (the browser's form: each step awaits the
    /// device, so the page repaints between tokens).
    pub async fn generate_async(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampler: &mut Sampler,
        cache: &mut GpuKvCache,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>> {
        let logits = self
            .prefill_async(prompt, cache, self.default_chunk())
            .await?;
        let first = sampler.sample(&logits);
        let step = async |t| Ok(sampler.sample(&self.forward_async(&[t], cache).await?));
        crate::model::sample::generation_loop_async(first, max_new, stop, on_token, step).await
    }
}

impl GpuDecoder {
    /// The longest prefill chunk whose activations fit one storage binding each (a
    /// multiple of 256 when over it).
    pub fn max_chunk(&self) -> usize {
        let c = &self.cfg;
        let limit = self.ctx.gpu().map_or(u64::MAX, binding_limit);
        // A dense FFN runs in parts of FFN_PART_ROWS tokens or more ([`ffn_part_rows`]);
        // a MoE layer's routed activations `[t · top_k, ffn]` and down products
        // `[t · top_k, d_model]` are one binding each.
        let ffn = if c.experts > 0 {
            (c.ffn_dim * c.top_k).max(c.d_model * c.top_k)
        } else if limit < (FFN_PART_ROWS * c.ffn_dim * 4) as u64 {
            c.ffn_dim
        } else {
            0
        };
        let widest = ffn.max(c.n_head * c.head_dim).max(c.d_model) as u64 * 4;
        let t = (limit / widest).min(1 << 24) as usize;
        if t > 256 { t - t % 256 } else { t.max(1) }
    }

    /// The prefill chunk of the engine's commands: [`GpuDecoder::prefill_chunk`] where
    /// set; else, when some layer's prompt attention is not dense, [`GpuDecoder::max_chunk`]
    /// — chunks after the first attend densely over the cache, so a sparse prompt runs
    /// in as few chunks as the device's bindings allow (the whole prompt where it fits);
    /// else at most [`DENSE_CHUNK`] tokens (a dense prompt does the same work in any
    /// chunks, and shorter ones hold less memory).
    pub fn default_chunk(&self) -> usize {
        if let Some(chunk) = self.prefill_chunk {
            return chunk.max(1);
        }
        let max = self.max_chunk();
        let sparse = (0..self.cfg.n_layer).any(|li| self.layer_method(li) != Method::Dense);
        if sparse { max } else { max.min(DENSE_CHUNK) }
    }

    /// Mean next-token negative log-likelihood (nats) of `ids` and the count of
    /// predictions: the prompt in chunks of `chunk` tokens (the first through the layer
    /// methods, the rest over the cache), every row's logits computed on the GPU 64
    /// rows at a time and read back.
    pub fn nll(&self, ids: &[u32], chunk: usize) -> Result<(f64, usize)> {
        let n = ids.len();
        if n < 2 || chunk == 0 {
            return Err(Error::InvalidArgument(format!(
                "an NLL needs at least two tokens and a chunk (got {n}, {chunk})"
            )));
        }
        let mut cache = self.new_cache(n)?;
        let mut total = 0f64;
        for (ci, part) in ids.chunks(chunk).enumerate() {
            let start = ci * chunk;
            self.forward(part, &mut cache)?;
            self.logit_rows(&cache, part.len(), &mut |r, row| {
                if let Some(&next) = ids.get(start + r + 1) {
                    total += crate::model::decoder::token_nll(row, next);
                }
            })?;
        }
        Ok((total / (n - 1) as f64, n - 1))
    }

    /// The logits of every row of the last call of `t` tokens on `cache` (its final
    /// hidden states are still in the plan's buffers): `f(row, logits)`.
    fn logit_rows(
        &self,
        cache: &GpuKvCache,
        t: usize,
        f: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        let ctx = &self.ctx;
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let c = &self.cfg;
        let plan = cache
            .plans
            .get(&t)
            .ok_or_else(|| Error::InvalidArgument(format!("no call of {t} tokens ran")))?;
        let b = &plan.bufs;
        let out = self.output_matrix();
        let vocab = out.rows;
        let rows = (g.caps.max_storage_binding / (vocab as u64 * 4)).clamp(1, 64) as usize;
        let rows = rows.min(t);
        let norm = RmsNormGpu::build_for(ctx, t, c.d_model, c.norm_eps, 0, RmsNormMode::Out)?;
        let xr = f32_buffer(g, "logit rows input", rows * c.d_model)?;
        let lr = f32_buffer(g, "logit rows", rows * vocab)?;
        let mm = MatmulGpu::build(
            ctx,
            "logits",
            out,
            rows,
            c.head_dim,
            LinearLayout::default(),
        )?;
        let list = mm.dispatches(g, &xr, &lr, None, None)?;
        let mut rec = Recorder::new(ctx, "final norm", 0)?;
        rec.dispatch_stage(
            "final norm",
            &[norm.dispatch(g, &[&b.x, &self.out_norm, &b.xn])],
        );
        rec.submit_blocking()?;
        let row_bytes = (c.d_model * 4) as u64;
        for r0 in (0..t).step_by(rows) {
            let m = rows.min(t - r0);
            let mut rec = Recorder::new(ctx, "logit rows", 0)?;
            rec.encoder().copy_buffer_to_buffer(
                &b.xn,
                r0 as u64 * row_bytes,
                &xr,
                0,
                m as u64 * row_bytes,
            );
            rec.dispatch_stage("logits", &list);
            rec.submit_blocking()?;
            let bytes = pollster::block_on(crate::runtime::tensor::read_buffer(
                g,
                &lr,
                0,
                (m * vocab * 4) as u64,
            ))?;
            let mut v: Vec<f32> = bytemuck::cast_slice(&bytes).to_vec();
            c.softcap(&mut v);
            for (i, row) in v.chunks_exact(vocab).enumerate() {
                f(r0 + i, row);
            }
        }
        Ok(())
    }
}

/// Token rows `[r0, r0 + rows)` of a `[t, width]` f32 buffer: the whole buffer, or a
/// byte range of it.
fn token_rows(buf: &wgpu::Buffer, r0: usize, rows: usize, t: usize, width: usize) -> Bound<'_> {
    if rows == t {
        Bound::Whole(buf)
    } else {
        Bound::Range(buf, (r0 * width * 4) as u64, (rows * width * 4) as u64)
    }
}

/// The largest binding of one activation buffer.
fn binding_limit(g: &GpuDevice) -> u64 {
    g.caps.max_storage_binding.min(g.caps.max_buffer)
}

/// Token rows per FFN part: a part's offset into `[t, d_model]` f32 rows is a multiple
/// of 64 rows (256 bytes times d_model: every device's storage offset alignment).
const FFN_PART_ROWS: usize = 64;

/// The most bytes of one FFN activation buffer (gate or up, `[rows, ffn]` f32) a chunk
/// holds, whatever the binding limit: a long chunk (a sparse prompt runs in the longest
/// the bindings allow) would otherwise hold its whole `[t, ffn]` twice — 14 GiB for
/// 100k tokens of a 7B model's 18,944-wide FFN; in parts of this size it holds 128 MiB,
/// and a part keeps hundreds of token rows or more (a 7B model: 832; SmolLM2: 10,880),
/// enough for a full-speed matrix product.
const FFN_PART_BYTES: u64 = 64 << 20;

/// Rows of one part of a `t`-token chunk's dense FFN: all `t` where `[t, ffn]` f32 fits
/// `min(limit, FFN_PART_BYTES)` bytes (`limit`: the device's binding limit), else the
/// most multiples of [`FFN_PART_ROWS`] that do — at least one, which must fit `limit`.
fn ffn_part_rows(t: usize, ffn: usize, limit: u64) -> Result<usize> {
    let row = (ffn * 4) as u64;
    let budget = limit.min(FFN_PART_BYTES);
    if t as u64 * row <= budget {
        return Ok(t);
    }
    let rows = ((budget / row) as usize / FFN_PART_ROWS * FFN_PART_ROWS).max(FFN_PART_ROWS);
    if rows as u64 * row > limit {
        return Err(Error::too_large(
            format!("{FFN_PART_ROWS} FFN rows of a {t}-token chunk (prefill in shorter chunks)"),
            FFN_PART_ROWS as u64 * row,
            limit,
        ));
    }
    Ok(rows)
}

/// Key ranges per query row of the cache attention: enough workgroups to fill a GPU at
/// one token, few enough that the partial states stay small for a chunk of many.
fn decode_splits(capacity: usize, heads: usize, tokens: usize) -> usize {
    (capacity / 512)
        .min(4096 / (heads * tokens).max(1))
        .clamp(1, 32)
}

/// A 1-D f32 tensor of the file uploaded (checked for its length).
fn vec_buf(ctx: &Context, g: &Gguf, name: &str, len: usize) -> Result<wgpu::Buffer> {
    let v = g.tensor_f32(name)?;
    if v.len() != len {
        return Err(Error::Model(format!(
            "`{name}` has {} values, expected {len}",
            v.len()
        )));
    }
    let dev = ctx.gpu().ok_or(Error::WrongContext)?;
    storage_init(dev, name, bytemuck::cast_slice(&v))
}

fn vec_opt(ctx: &Context, g: &Gguf, name: &str, len: usize) -> Result<Option<wgpu::Buffer>> {
    if g.has_tensor(name) {
        Ok(Some(vec_buf(ctx, g, name, len)?))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_parts_are_whole_multiples_of_64_rows_under_the_binding() {
        // [t, 512] f32 rows are 2 KiB.
        assert_eq!(ffn_part_rows(150, 512, 300 << 10).unwrap(), 150);
        assert_eq!(ffn_part_rows(150, 512, 192 << 10).unwrap(), 64);
        assert_eq!(ffn_part_rows(1000, 512, 1 << 20).unwrap(), 512);
        assert!(matches!(
            ffn_part_rows(150, 512, 100 << 10),
            Err(Error::TooLarge { .. })
        ));
        // Under a large binding limit the parts hold at most FFN_PART_BYTES each.
        let ffn = 18_944;
        let rows = ffn_part_rows(100_000, ffn, 2 << 30).unwrap();
        assert_eq!(rows, 832);
        assert!(rows as u64 * ffn as u64 * 4 <= FFN_PART_BYTES);
        assert!((rows + FFN_PART_ROWS) as u64 * ffn as u64 * 4 > FFN_PART_BYTES);
        assert_eq!(ffn_part_rows(4096, 1536, 2 << 30).unwrap(), 4096);
        // A row wider than the budget still runs in parts of 64 rows where they fit.
        let wide = (FFN_PART_BYTES / 4 / 32) as usize;
        assert_eq!(ffn_part_rows(1000, wide, 2 << 30).unwrap(), 64);
    }
}
