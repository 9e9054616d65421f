//! A small decoder-only transformer for the llama, qwen2, gemma3 and smallthinker GGUF
//! architectures, as far as SmolLM2-135M, Qwen2.5-Coder-1.5B, Gemma-3-270M and
//! SmallThinker need: RMSNorm, RoPE (adjacent pairs for llama GGUFs, whose Q/K rows are
//! permuted by the converter; NEOX half-split pairs for the others), GQA, QKV bias,
//! QK-norm, sliding-window layers with their own RoPE base, NoPE layers, SwiGLU / GeGLU,
//! routed ReGLU experts (SmallThinker: the router reads the layer's input, before
//! attention), tied embeddings, Gemma's embedding scaling, pre- and post-norms, and final
//! logit softcapping when the file sets it.
//!
//! Projections run on the CPU on the weights as the file stores them ([`QMat`]: GGUF
//! blocks multiplied in registers; integer dot products on 16-bit activations, or f32
//! ones on dequantized tiles with [`Decoder::f32_activations`]). MoE experts are read in
//! place from the memory-mapped file: only routed experts are touched, read ahead when
//! the router picks them, and dropped least recently used first under
//! [`Decoder::set_max_resident_experts`]. The KV cache is kept token
//! after token in f16 ([`Decoder::kv_precision`]). A prompt's attention from an empty cache
//! runs through the crate's [`crate::AttentionPlan`] on the decoder's [`Context`] with the
//! chosen [`Method`]; decode steps and continuations after cached tokens run dense: on
//! the CPU straight over the cache ([`CacheAttention`]), on a GPU through a dense plan
//! over the cache converted to f32. Gemma's sliding-window layers: while every key is
//! inside the window (prompt ≤ window) they are plain causal attention; a longer prompt
//! runs [`Method::Window`] (no sinks, block skipping) on the GPU or the CPU twin; a
//! one-token GPU decode step attends to the last `window` keys; the CPU cache attention
//! applies the window itself; a chunked prefill after cached tokens returns
//! [`Error::Model`] on a GPU.

use std::borrow::Cow;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::attention::decode_cpu::{CacheAttention, CacheRows, CacheScratch};
use crate::attention::{AttentionShape, Method, WindowConfig};
use crate::error::{Error, Result};
use crate::model::gguf::{Gguf, Value};
use crate::model::sample::Sampler;
pub use crate::model::sample::argmax;
use crate::ops::act::Gate;
use crate::ops::linear::{from_head_major, to_head_major};
use crate::ops::rmsnorm::rmsnorm_in_place;
use crate::ops::rope::{RopeStyle, rope_rows, rope_table_into};
use crate::quant::QMat;
use crate::quant::qmat::{ApplyScratch, FileMap};
use crate::runtime::context::Context;
use crate::runtime::tensor::DType;

/// Supported architectures (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// llama (SmolLM2).
    Llama,
    /// qwen2 (Qwen2.5).
    Qwen2,
    /// gemma3.
    Gemma3,
    /// smallthinker (SmallThinker MoE: pre-attention router, ReGLU experts, NoPE
    /// global layers between sliding-window RoPE ones when the file sets a window).
    SmallThinker,
}

/// Hyper-parameters read from a GGUF.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Architecture.
    pub arch: Arch,
    /// Layers.
    pub n_layer: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// FFN width (per expert for MoE layers): the widest layer's.
    pub ffn_dim: usize,
    /// FFN width of each layer (equal for most files; a cropped model's differ: the
    /// `feed_forward_length` metadata is then an array, as llama.cpp reads it).
    pub ffn_dims: Vec<usize>,
    /// Vocabulary size.
    pub vocab: usize,
    /// Trained context length.
    pub ctx_len: usize,
    /// RoPE base of global (full-attention) layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (gemma3: 10 000).
    pub rope_base_local: f32,
    /// NEOX RoPE (pairs `i`, `i + d/2`) instead of adjacent pairs.
    pub rope_neox: bool,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Sliding window of local layers (keys `p - window < j <= p`).
    pub window: Option<usize>,
    /// Per layer: true = full (global) attention, false = sliding window.
    pub global: Vec<bool>,
    /// Final logit softcapping.
    pub final_softcap: Option<f32>,
    /// Per layer: whether RoPE applies (false: a NoPE layer).
    pub rope: Vec<bool>,
    /// MoE: experts per layer (0 for dense FFNs).
    pub experts: usize,
    /// MoE: experts used per token.
    pub top_k: usize,
    /// MoE: router weights by sigmoid (SmallThinker) instead of softmax; the top-k
    /// weights are normalized to sum 1 either way.
    pub sigmoid_gating: bool,
}

impl Config {
    /// Reads the configuration of a llama / qwen2 / gemma3 GGUF.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch_name = g.str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            "smallthinker" => Arch::SmallThinker,
            o => {
                return Err(Error::Model(format!(
                    "architecture `{o}` is not supported (llama, qwen2, gemma3, smallthinker)"
                )));
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let u = |s: &str| g.u64(&k(s)).map(|v| v as usize);
        let n_layer = u("block_count")?;
        let d_model = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_kv_head = u("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = u("attention.key_length").unwrap_or(d_model / n_head.max(1));
        let vocab = g.tensor("token_embd.weight")?.dims[1] as usize;
        let rope_base = g.f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32;
        let window = match arch {
            Arch::Gemma3 => Some(u("attention.sliding_window")?),
            // SmallThinker-21B: a window of 4096 on 3 of every 4 layers (llama.cpp's
            // reading of the file's flag; the 4B sets none).
            Arch::SmallThinker => u("attention.sliding_window")
                .ok()
                .filter(|&w| w > 0)
                .map(|_| 4096),
            _ => None,
        };
        // gemma3: every 6th layer is global (5, 11, 17, ...), as in llama.cpp/transformers;
        // SmallThinker with a window: layers 0, 4, 8, ... are global NoPE layers, the
        // others sliding-window RoPE layers.
        let global: Vec<bool> = (0..n_layer)
            .map(|l| match arch {
                Arch::Gemma3 => l % 6 == 5,
                Arch::SmallThinker if window.is_some() => l % 4 == 0,
                _ => true,
            })
            .collect();
        // SmallThinker's global layers (with a window) are its NoPE layers.
        let nope = arch == Arch::SmallThinker && window.is_some();
        let rope = global.iter().map(|&g| !(nope && g)).collect();
        let moe = arch == Arch::SmallThinker;
        let ffn_key = k(if moe {
            "expert_feed_forward_length"
        } else {
            "feed_forward_length"
        });
        let ffn_dims: Vec<usize> = match g.require(&ffn_key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<Vec<_>>>()
                .filter(|v| v.len() == n_layer)
                .ok_or_else(|| Error::Model(format!("`{ffn_key}` must hold {n_layer} widths")))?,
            v => vec![
                v.as_u64()
                    .ok_or_else(|| Error::Model(format!("`{ffn_key}`: {v:?}")))?
                    as usize;
                n_layer
            ],
        };
        let ffn_dim = ffn_dims.iter().copied().max().unwrap_or(0);
        if g.get(&k("attn_logit_softcapping")).is_some() {
            return Err(Error::Model(
                "attention logit softcapping is not supported by the attention kernels".into(),
            ));
        }
        let cfg = Config {
            arch,
            n_layer,
            d_model,
            n_head,
            n_kv_head,
            head_dim,
            ffn_dim,
            ffn_dims,
            vocab,
            ctx_len: u("context_length")?,
            rope_base,
            rope_base_local: if arch == Arch::Gemma3 {
                10000.0
            } else {
                rope_base
            },
            rope_neox: arch != Arch::Llama,
            norm_eps: g.f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            window,
            global,
            final_softcap: g.f64(&k("final_logit_softcapping")).ok().map(|v| v as f32),
            rope,
            experts: if moe { u("expert_count")? } else { 0 },
            top_k: if moe { u("expert_used_count")? } else { 0 },
            // llama.cpp's gating functions: 1 softmax (the default), 2 sigmoid.
            sigmoid_gating: moe && u("expert_gating_func").unwrap_or(1) == 2,
        };
        if moe && (cfg.experts == 0 || cfg.top_k == 0 || cfg.top_k > cfg.experts) {
            return Err(Error::Model(format!(
                "{} experts, {} used per token",
                cfg.experts, cfg.top_k
            )));
        }
        if cfg.n_head == 0 || cfg.n_kv_head == 0 || !cfg.n_head.is_multiple_of(cfg.n_kv_head) {
            return Err(Error::Model(format!(
                "bad head counts {} / {}",
                cfg.n_head, cfg.n_kv_head
            )));
        }
        Ok(cfg)
    }
}

impl Config {
    /// The softmax scale of the attention (1/√head_dim).
    pub fn attention_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// The factor the embeddings are multiplied by (Gemma: √d_model).
    pub fn embedding_scale(&self) -> f32 {
        if self.arch == Arch::Gemma3 {
            (self.d_model as f32).sqrt()
        } else {
            1.0
        }
    }

    /// The dense FFN's gate activation (GeGLU for Gemma, SwiGLU otherwise).
    pub fn gate(&self) -> Gate {
        if self.arch == Arch::Gemma3 {
            Gate::GeluTanh
        } else {
            Gate::Silu
        }
    }

    /// Applies the final logit soft-capping the file sets (`cap · tanh(v / cap)`), if any.
    pub fn softcap(&self, logits: &mut [f32]) {
        if let Some(cap) = self.final_softcap {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
    }
}

/// The prompt attention method of `layer`, as both decoders choose it: its own method
/// (`layer_methods`: calibrated per-layer thresholds), else `method` where
/// `method_layers` is empty or lists the layer, else dense.
pub fn choose_layer_method(
    method: &Method,
    method_layers: &[usize],
    layer_methods: &std::collections::HashMap<usize, Method>,
    layer: usize,
) -> Method {
    if let Some(m) = layer_methods.get(&layer) {
        m.clone()
    } else if method_layers.is_empty() || method_layers.contains(&layer) {
        method.clone()
    } else {
        Method::Dense
    }
}

/// A linear layer's weights `[rows, cols]` (`[out, in]`), kept in their GGUF format
/// ([`QMat`]: decoded in registers by each product, never stored as f32).
pub struct Mat {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    q: QMat,
}

impl Mat {
    fn load(g: &Gguf, name: &str) -> Result<Self> {
        let (t, rows, cols) = g.matrix(name)?;
        let wrap = |e: Error| Error::Gguf(format!("tensor `{name}`: {e}"));
        // From a file: packed straight from the mapped bytes, whose pages are dropped
        // again (no second copy of the tensor is ever held); in memory: copied.
        let q = match g.map_tensor(name)? {
            Some((map, range)) => QMat::from_mapped(t.ty, rows, cols, &map, range).map_err(wrap)?,
            None => QMat::new(t.ty, rows, cols, g.tensor_bytes(name)?).map_err(wrap)?,
        };
        // A NaN or infinite weight (or block scale) never reaches a product.
        q.check_finite(&format!("weight `{name}`"))?;
        Ok(Mat { cols, rows, q })
    }

    /// The `experts` matrices of a 3-D expert tensor (ggml dims `[cols, rows, experts]`):
    /// read in place from the mapped file when the GGUF is a file on disk (checked for
    /// non-finite scales, then dropped from memory until routed), else copied.
    fn load_experts(g: &Gguf, name: &str, experts: usize) -> Result<Vec<Self>> {
        let (t, rows, cols) = g.experts(name, experts)?;
        let wrap = |e: Error| Error::Gguf(format!("tensor `{name}`: {e}"));
        let mats = if let Some((map, range)) = g.map_tensor(name)? {
            let per = range.len() / experts;
            (0..experts)
                .map(|e| {
                    let r = range.start + e * per..range.start + (e + 1) * per;
                    QMat::mapped(t.ty, rows, cols, map.clone(), r).map_err(wrap)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            let bytes = g.tensor_bytes(name)?;
            bytes
                .chunks_exact(bytes.len() / experts)
                .map(|b| QMat::new(t.ty, rows, cols, b.to_vec()).map_err(wrap))
                .collect::<Result<Vec<_>>>()?
        };
        mats.into_iter()
            .map(|q| {
                q.check_finite(&format!("weight `{name}`"))?;
                q.advise(false);
                Ok(Mat { cols, rows, q })
            })
            .collect()
    }

    /// `x [t, cols]` times this matrix transposed: `[t, rows]` (f32 activations when
    /// `exact`, else the integer products of [`QMat::apply`]).
    pub fn apply(&self, x: &[f32], t: usize, exact: bool) -> Vec<f32> {
        if exact {
            self.q.apply_f32(x, t)
        } else {
            self.q.apply(x, t)
        }
    }

    /// [`Mat::apply`] into `out` with the product's buffers in `scratch` (no heap
    /// allocation for a decode step's 16-bit products once they have grown).
    pub fn apply_into(
        &self,
        x: &[f32],
        t: usize,
        exact: bool,
        out: &mut Vec<f32>,
        scratch: &mut ApplyScratch,
    ) {
        if exact {
            *out = self.q.apply_f32(x, t);
        } else {
            self.q.apply_into(x, t, out, scratch);
        }
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        self.q.row_f32(r, out)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.bytes()
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Mat,
    wk: Mat,
    wv: Mat,
    wo: Mat,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
    post_ffn_norm: Option<Vec<f32>>,
}

/// Which routed experts' mapped weights are kept in memory, least recently used first
/// out when a cap is set ([`Decoder::set_max_resident_experts`]).
#[derive(Debug, Default)]
struct ExpertResidency {
    /// Bytes allowed (`None`: no cap, the kernel decides).
    cap: Option<u64>,
    /// Routing steps so far.
    tick: u64,
    /// (layer, expert) → last step it was routed to, for the resident ones.
    last: std::collections::HashMap<(usize, usize), u64>,
    /// Bytes of the resident experts.
    bytes: u64,
    /// The most bytes resident after any step.
    peak: u64,
}

/// A layer's feed-forward block.
enum Ffn {
    /// SwiGLU / GeGLU.
    Dense { gate: Mat, up: Mat, down: Mat },
    /// Routed ReGLU experts: the router (on the layer's input) and per expert its
    /// gate, up and down matrices (slices of the file's 3-D expert tensors).
    Moe {
        router: Mat,
        gate: Vec<Mat>,
        up: Vec<Mat>,
        down: Vec<Mat>,
    },
}

impl Ffn {
    /// Whether the matrices have the configuration's shapes.
    fn shapes_match(&self, c: &Config, layer: usize) -> bool {
        let is = |m: &Mat, rows: usize, cols: usize| m.rows == rows && m.cols == cols;
        let f = c.ffn_dims[layer];
        match self {
            Ffn::Dense { gate, up, down } => {
                is(gate, f, c.d_model) && is(up, f, c.d_model) && is(down, c.d_model, f)
            }
            Ffn::Moe {
                router,
                gate,
                up,
                down,
            } => {
                is(router, c.experts, c.d_model)
                    && gate.iter().all(|m| is(m, f, c.d_model))
                    && up.iter().all(|m| is(m, f, c.d_model))
                    && down.iter().all(|m| is(m, c.d_model, f))
            }
        }
    }

    fn mats(&self) -> Vec<&Mat> {
        match self {
            Ffn::Dense { gate, up, down } => vec![gate, up, down],
            Ffn::Moe {
                router,
                gate,
                up,
                down,
            } => std::iter::once(router)
                .chain(gate)
                .chain(up)
                .chain(down)
                .collect(),
        }
    }
}

/// Post-RoPE Q `[heads, t, d]`, K and V `[kv_heads, t, d]` of one layer for the tokens
/// of one forward call, handed to a [`Decoder::forward`] observer.
pub struct LayerQkv<'a> {
    /// Layer index.
    pub layer: usize,
    /// Whether the layer attends globally (false: sliding window).
    pub global: bool,
    /// Position of the first token.
    pub start: usize,
    /// Tokens in this call.
    pub tokens: usize,
    /// Q `[n_head, tokens, head_dim]`.
    pub q: &'a [f32],
    /// K `[n_kv_head, tokens, head_dim]`.
    pub k: &'a [f32],
    /// V `[n_kv_head, tokens, head_dim]`.
    pub v: &'a [f32],
}

/// Precision of a KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    /// Half precision (half the memory; what llama.cpp keeps too).
    #[default]
    F16,
    /// Single precision: decode steps see exactly the values a prefill sees.
    F32,
}

/// One layer's cached keys or values, `[len, kv_heads, head_dim]` token after token,
/// in the cache's precision.
#[derive(Clone, Debug)]
enum KvRows {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvRows {
    fn new(precision: KvPrecision) -> Self {
        match precision {
            KvPrecision::F16 => KvRows::F16(Vec::new()),
            KvPrecision::F32 => KvRows::F32(Vec::new()),
        }
    }

    /// Appends token-major rows.
    fn append(&mut self, x: &[f32]) {
        match self {
            KvRows::F16(v) => {
                let at = v.len();
                v.resize(at + x.len(), f16::ZERO);
                v[at..].convert_from_f32_slice(x);
            }
            KvRows::F32(v) => v.extend_from_slice(x),
        }
    }

    fn rows(&self) -> CacheRows<'_> {
        match self {
            KvRows::F16(v) => CacheRows::F16(v),
            KvRows::F32(v) => CacheRows::F32(v),
        }
    }

    /// All rows as f32 `[kv_heads, len, d]` (the attention plans' layout).
    fn head_major(&self, len: usize, d: usize) -> Vec<f32> {
        match self {
            KvRows::F16(v) => {
                let mut x = vec![0f32; v.len()];
                v.convert_to_f32_slice(&mut x);
                to_head_major(&x, len, d)
            }
            KvRows::F32(v) => to_head_major(v, len, d),
        }
    }
}

/// The KV cache of one sequence: per layer, K and V `[len, kv_heads, head_dim]` token
/// after token, in f16 (the default, [`Decoder::kv_precision`]) or f32. Appending a token
/// copies its rows once; the CPU decode step reads them in place.
pub struct KvCache {
    k: Vec<KvRows>,
    v: Vec<KvRows>,
    len: usize,
    /// Values of one token's K (or V) row in a layer.
    row: usize,
}

impl KvCache {
    /// Room for `tokens` more positions in every layer, so appending them (a decode
    /// loop's steps) never reallocates.
    pub fn reserve(&mut self, tokens: usize) {
        for rows in self.k.iter_mut().chain(self.v.iter_mut()) {
            match rows {
                KvRows::F16(v) => v.reserve(tokens * self.row),
                KvRows::F32(v) => v.reserve(tokens * self.row),
            }
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Forgets the cached tokens after the first `len` (a chat rewinding to the prefix
    /// its next prompt shares).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for rows in self.k.iter_mut().chain(self.v.iter_mut()) {
            match rows {
                KvRows::F16(v) => v.truncate(len * self.row),
                KvRows::F32(v) => v.truncate(len * self.row),
            }
        }
        self.len = len;
    }
    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|r| match r {
                KvRows::F16(v) => v.len() * 2,
                KvRows::F32(v) => v.len() * 4,
            })
            .sum()
    }
}

/// What picks each layer's attention method from its post-RoPE Q/K/V.
type LayerPick<'p> = &'p mut dyn FnMut(&LayerQkv<'_>) -> Result<Method>;

/// Buffers a decoder's forward pass writes into, kept from one call to the next by
/// [`Decoder::step`] (so a decode step allocates nothing once they have grown).
#[derive(Default)]
pub struct Workspace {
    /// Hidden states `[t, d_model]` (the result).
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    a: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    h: Vec<f32>,
    f: Vec<f32>,
    /// RoPE tables of the step's positions (global base, local base).
    rope: Vec<f32>,
    rope_local: Vec<f32>,
    logits: Vec<f32>,
    products: ApplyScratch,
    attention: CacheScratch,
    moe: MoeScratch,
}

/// A MoE layer's buffers in a [`Workspace`].
#[derive(Default)]
struct MoeScratch {
    /// Router logits `[t, experts]`.
    router: Vec<f32>,
    /// Each token's top-k (expert, weight), `[t, top_k]`.
    routes: Vec<(usize, f32)>,
    order: Vec<usize>,
    /// The layer's routed experts, and those read anew (not resident before).
    used: Vec<usize>,
    fresh: Vec<usize>,
    /// One expert's (token, weight) rows and its products.
    rows: Vec<(usize, f32)>,
    xe: Vec<f32>,
    gv: Vec<f32>,
    uv: Vec<f32>,
    h: Vec<f32>,
    y: Vec<f32>,
    active: Vec<bool>,
}

/// The routed ReGLU experts of `t` normed rows `z [t, d_model]` into `out`: for each
/// expert, the rows routed to it (`routes [t, top_k]`), `down · (ReLU(gate · z) ⊙
/// (up · z))`, added into each row with its weight. Neuron skipping: the gate product
/// runs first, and the up rows whose gate is off (≤ 0) for every routed row are not
/// read (their products would be multiplied by 0); `skips` counts the up rows skipped
/// and considered. Buffers in `s` and `products` (no allocation once grown).
#[allow(clippy::too_many_arguments)]
fn experts_cpu(
    z: &[f32],
    t: usize,
    (gate, up, down): (&[Mat], &[Mat], &[Mat]),
    exact: bool,
    skips: &NeuronSkips,
    s: &mut MoeScratch,
    products: &mut ApplyScratch,
    out: &mut Vec<f32>,
) {
    let dm = z.len() / t;
    let k = s.routes.len() / t;
    out.clear();
    out.resize(t * dm, 0.0);
    for (e, ((g, u), dn)) in gate.iter().zip(up).zip(down).enumerate() {
        s.rows.clear();
        for i in 0..t {
            if let Some(&(_, w)) = s.routes[i * k..(i + 1) * k].iter().find(|x| x.0 == e) {
                s.rows.push((i, w));
            }
        }
        if s.rows.is_empty() {
            continue;
        }
        let n = s.rows.len();
        s.xe.clear();
        for &(i, _) in &s.rows {
            s.xe.extend_from_slice(&z[i * dm..(i + 1) * dm]);
        }
        g.apply_into(&s.xe, n, exact, &mut s.gv, products);
        let inter = u.rows;
        s.active.clear();
        s.active.resize(inter, false);
        for gr in s.gv.chunks_exact(inter) {
            s.active
                .iter_mut()
                .zip(gr)
                .for_each(|(a, &g)| *a |= g > 0.0);
        }
        let on = s.active.iter().filter(|&&a| a).count();
        skips.record((inter - on) as u64, inter as u64);
        if exact {
            s.uv = u.apply(&s.xe, n, true);
        } else {
            u.q.apply_active_into(&s.xe, n, &s.active, &mut s.uv, products);
        }
        s.h.clear();
        s.h.extend(s.gv.iter().zip(&s.uv).map(|(g, u)| g.max(0.0) * u));
        dn.apply_into(&s.h, n, exact, &mut s.y, products);
        for (r, &(i, w)) in s.rows.iter().enumerate() {
            for (o, y) in out[i * dm..(i + 1) * dm]
                .iter_mut()
                .zip(&s.y[r * dm..(r + 1) * dm])
            {
                *o += w * y;
            }
        }
    }
}

/// Counts of ReGLU up rows skipped by [`experts_cpu`] and considered.
#[derive(Debug, Default)]
struct NeuronSkips {
    skipped: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

impl NeuronSkips {
    fn record(&self, skipped: u64, total: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.skipped.fetch_add(skipped, Relaxed);
        self.total.fetch_add(total, Relaxed);
    }
}

/// Bytes of one expert's three matrices.
fn expert_bytes(mats: [&Mat; 3]) -> u64 {
    mats.iter().map(|m| m.bytes() as u64).sum()
}

/// `x [t, heads, d]` as `[heads, t, d]` (the same thing when t = 1).
fn head_major(x: &[f32], t: usize, d: usize) -> Cow<'_, [f32]> {
    if t == 1 {
        Cow::Borrowed(x)
    } else {
        Cow::Owned(to_head_major(x, t, d))
    }
}

/// A loaded model.
pub struct Decoder {
    /// Its configuration.
    pub cfg: Config,
    embd: Mat,
    output: Option<Mat>,
    out_norm: Vec<f32>,
    layers: Vec<Layer>,
    ctx: Context,
    method: Method,
    /// Layers whose attention runs the plan's method; others run dense (all when empty).
    pub method_layers: Vec<usize>,
    /// Per-layer methods overriding the others (calibrated SALE thresholds:
    /// [`crate::attention::select::sale_calibrate::SaleThresholds::methods`]).
    pub layer_methods: std::collections::HashMap<usize, Method>,
    /// Precision of the KV caches [`Decoder::new_cache`] makes: f16 (the default, half
    /// the memory; a decode step then attends to keys and values rounded to f16) or f32
    /// (the oracle: every step sees the values the prefill saw).
    pub kv_precision: KvPrecision,
    /// Mapped expert weights kept in memory ([`Decoder::set_max_resident_experts`]).
    residency: std::sync::Mutex<ExpertResidency>,
    /// Every mapped expert matrix's byte range in the file, with its (layer, expert),
    /// sorted by start ([`Decoder::drop_stray_pages`]).
    expert_spans: Vec<(std::ops::Range<usize>, usize, usize)>,
    /// ReGLU up rows skipped (gate off for every routed token) and considered.
    skips: NeuronSkips,
    /// Projections with f32 activations on the dequantized weights (the oracle) instead
    /// of integer products on 16-bit activations (the default: within a few 1e-4 of the
    /// logits' range of it, and faster).
    pub f32_activations: bool,
}

fn vec_opt(g: &Gguf, name: &str) -> Result<Option<Vec<f32>>> {
    if g.has_tensor(name) {
        Ok(Some(g.tensor_f32(name)?))
    } else {
        Ok(None)
    }
}

impl Decoder {
    /// Loads and dequantizes every weight of a GGUF; attention runs on `ctx` with `method`.
    pub fn load(g: &Gguf, ctx: &Context, method: Method) -> Result<Self> {
        let cfg = Config::from_gguf(g)?;
        let embd = Mat::load(g, "token_embd.weight")?;
        let output = if g.has_tensor("output.weight") {
            Some(Mat::load(g, "output.weight")?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let layer = Layer {
                attn_norm: g.tensor_f32(&n("attn_norm.weight"))?,
                wq: Mat::load(g, &n("attn_q.weight"))?,
                wk: Mat::load(g, &n("attn_k.weight"))?,
                wv: Mat::load(g, &n("attn_v.weight"))?,
                wo: Mat::load(g, &n("attn_output.weight"))?,
                bq: vec_opt(g, &n("attn_q.bias"))?,
                bk: vec_opt(g, &n("attn_k.bias"))?,
                bv: vec_opt(g, &n("attn_v.bias"))?,
                q_norm: vec_opt(g, &n("attn_q_norm.weight"))?,
                k_norm: vec_opt(g, &n("attn_k_norm.weight"))?,
                post_attn_norm: vec_opt(g, &n("post_attention_norm.weight"))?,
                ffn_norm: g.tensor_f32(&n("ffn_norm.weight"))?,
                ffn: if cfg.experts > 0 {
                    let e = cfg.experts;
                    Ffn::Moe {
                        router: Mat::load(g, &n("ffn_gate_inp.weight"))?,
                        gate: Mat::load_experts(g, &n("ffn_gate_exps.weight"), e)?,
                        up: Mat::load_experts(g, &n("ffn_up_exps.weight"), e)?,
                        down: Mat::load_experts(g, &n("ffn_down_exps.weight"), e)?,
                    }
                } else {
                    Ffn::Dense {
                        gate: Mat::load(g, &n("ffn_gate.weight"))?,
                        up: Mat::load(g, &n("ffn_up.weight"))?,
                        down: Mat::load(g, &n("ffn_down.weight"))?,
                    }
                },
                post_ffn_norm: vec_opt(g, &n("post_ffw_norm.weight"))?,
            };
            let (qd, kd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
            if layer.wq.rows != qd
                || layer.wk.rows != kd
                || layer.wv.rows != kd
                || layer.wq.cols != cfg.d_model
                || layer.wo.cols != qd
                || layer.attn_norm.len() != cfg.d_model
                || !layer.ffn.shapes_match(&cfg, l)
            {
                return Err(Error::Model(format!(
                    "layer {l}: projection shapes do not match the configuration {cfg:?}"
                )));
            }
            layers.push(layer);
        }
        log::info!("loaded {:?}: {} layers", cfg.arch, cfg.n_layer);
        let mut expert_spans: Vec<(std::ops::Range<usize>, usize, usize)> = Vec::new();
        for (li, l) in layers.iter().enumerate() {
            if let Ffn::Moe { gate, up, down, .. } = &l.ffn {
                for mats in [gate, up, down] {
                    for (e, m) in mats.iter().enumerate() {
                        if let Some((_, r)) = m.q.mapping() {
                            expert_spans.push((r, li, e));
                        }
                    }
                }
            }
        }
        expert_spans.sort_by_key(|s| s.0.start);
        Ok(Decoder {
            out_norm: g.tensor_f32("output_norm.weight")?,
            cfg,
            embd,
            output,
            layers,
            ctx: ctx.clone(),
            method,
            method_layers: Vec::new(),
            layer_methods: Default::default(),
            kv_precision: KvPrecision::F16,
            f32_activations: false,
            residency: Default::default(),
            expert_spans,
            skips: Default::default(),
        })
    }

    /// Bytes of the weights as held (quantized matrices in their GGUF blocks, f32 norms
    /// and biases).
    pub fn weight_bytes(&self) -> usize {
        let v = |x: &Option<Vec<f32>>| x.as_ref().map_or(0, |x| x.len() * 4);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo]
                    .into_iter()
                    .chain(l.ffn.mats())
                    .map(|m| m.bytes())
                    .sum::<usize>()
                    + (l.attn_norm.len() + l.ffn_norm.len()) * 4
                    + [&l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm]
                        .iter()
                        .map(|x| v(x))
                        .sum::<usize>()
                    + v(&l.post_attn_norm)
                    + v(&l.post_ffn_norm)
            })
            .sum();
        layers
            + self.embd.bytes()
            + self.output.as_ref().map_or(0, |m| m.bytes())
            + self.out_norm.len() * 4
    }

    /// The attention context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// An empty KV cache of [`Decoder::kv_precision`].
    pub fn new_cache(&self) -> KvCache {
        let per = || vec![KvRows::new(self.kv_precision); self.cfg.n_layer];
        KvCache {
            k: per(),
            v: per(),
            len: 0,
            row: self.cfg.n_kv_head * self.cfg.head_dim,
        }
    }

    /// The method the decoder's plan runs in `layer` (the loaded method, or dense for a
    /// layer outside [`Decoder::method_layers`]).
    pub fn layer_method(&self, layer: usize) -> Method {
        choose_layer_method(
            &self.method,
            &self.method_layers,
            &self.layer_methods,
            layer,
        )
    }

    /// Replaces the attention method (for every layer in [`Decoder::method_layers`]).
    pub fn set_method(&mut self, method: Method) {
        self.method = method;
    }

    /// The softmax scale of the attention (1/√head_dim).
    pub fn attention_scale(&self) -> f32 {
        self.cfg.attention_scale()
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        method: Method,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        n: usize,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let d = c.head_dim;
        let scale = self.attention_scale();
        let window = if c.global[layer] { None } else { c.window };
        let run = |k: &[f32], v: &[f32], n: usize, method: Method| -> Result<Vec<f32>> {
            let shape = AttentionShape::new(c.n_head, c.n_kv_head, t, d).with_kv_len(n);
            let plan = self
                .ctx
                .attention(shape)
                .method(method)
                .dtype(DType::F32)
                .scale(scale)
                .build()?;
            let (qt, kt, vt) =
                crate::attention::upload_qkv(&self.ctx, &shape, q, k, v, DType::F32)?;
            plan.run(&qt, &kt, &vt)?.to_f32_blocking()
        };
        match window {
            Some(w) if n > w => {
                if t == 1 {
                    // One query: its window is the last `w` keys, all of them visible.
                    let slice = |x: &[f32]| -> Vec<f32> {
                        (0..c.n_kv_head)
                            .flat_map(|h| x[(h * n + n - w) * d..(h + 1) * n * d].iter().copied())
                            .collect()
                    };
                    run(&slice(k), &slice(v), w, Method::Dense)
                } else if t == n {
                    // A prefill from an empty cache: the crate's window method (block
                    // skipping on both the GPU and the CPU twin).
                    run(
                        k,
                        v,
                        n,
                        Method::Window(WindowConfig {
                            window: w,
                            sinks: 0,
                        }),
                    )
                } else {
                    Err(Error::Model(format!(
                        "layer {layer} has a {w}-token sliding window: a chunked prefill \
                         ({t} new tokens after {} cached) has no windowed GPU path yet \
                         (run with --backend cpu)",
                        n - t
                    )))
                }
            }
            // The sparse methods are prefill methods (as many keys as queries): decode
            // steps and chunked continuations over a cache run dense.
            _ if t != n => run(k, v, n, Method::Dense),
            _ => run(k, v, n, method),
        }
    }

    /// Runs `ids` through the model after what `cache` holds, appending to it. Returns
    /// the final-normed hidden states `[ids.len(), d_model]`. `observe` sees every
    /// layer's post-RoPE Q/K/V of these tokens.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        observe: &mut dyn FnMut(&LayerQkv<'_>) -> Result<()>,
    ) -> Result<Vec<f32>> {
        self.forward_with(ids, cache, &mut |l| {
            observe(l)?;
            Ok(self.layer_method(l.layer))
        })
    }

    /// [`Decoder::forward`] where `pick` sees every layer's post-RoPE Q/K/V of these
    /// tokens and returns the method that layer's attention runs (a sliding-window
    /// layer keeps its window whenever the keys reach past it, whatever `pick` says).
    /// Lets a method depend on the layer's own Q/K, as the oracle does.
    pub fn forward_with(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        pick: &mut dyn FnMut(&LayerQkv<'_>) -> Result<Method>,
    ) -> Result<Vec<f32>> {
        let mut ws = Workspace::default();
        self.run_layers(ids, cache, Some(pick), self.layers.len(), &mut ws)?;
        Ok(ws.x)
    }

    /// Runs `ids` from an empty cache through the first `layers` layers only (dense
    /// attention), showing each one's post-RoPE Q/K/V to `observe`: what a per-layer
    /// measurement of the early layers needs, without paying for the rest of the model.
    pub fn observe_layers(
        &self,
        ids: &[u32],
        layers: usize,
        observe: &mut dyn FnMut(&LayerQkv<'_>) -> Result<()>,
    ) -> Result<()> {
        if layers > self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "{layers} layers asked of a {}-layer model",
                self.layers.len()
            )));
        }
        let mut cache = self.new_cache();
        self.run_layers(
            ids,
            &mut cache,
            Some(&mut |l| {
                observe(l)?;
                Ok(self.layer_method(l.layer))
            }),
            layers,
            &mut Workspace::default(),
        )?;
        Ok(())
    }

    /// The body of [`Decoder::forward_with`] over the first `limit` layers, on the
    /// buffers of `ws` (the hidden states end in `ws.x`); the final norm applies only
    /// when every layer ran (and `cache.len` advances only then). Without `pick`, each
    /// layer runs [`Decoder::layer_method`]. A CPU decode step over the cache makes no
    /// heap allocation once `ws` and `cache` have room (16-bit activations): every
    /// product, norm, rotation, the attention and the experts write into `ws`.
    fn run_layers(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        mut pick: Option<LayerPick<'_>>,
        limit: usize,
        ws: &mut Workspace,
    ) -> Result<()> {
        let c = &self.cfg;
        let (t, dm, d) = (ids.len(), c.d_model, c.head_dim);
        let start = cache.len;
        let exact = self.f32_activations;
        if t == 0 {
            return Err(Error::InvalidArgument("no tokens to run".into()));
        }
        let Workspace {
            x,
            xn,
            q,
            k,
            v,
            att,
            a,
            g,
            u,
            h,
            f,
            rope,
            rope_local,
            products,
            attention,
            moe,
            ..
        } = ws;
        x.clear();
        for &id in ids {
            let id = id as usize;
            if id >= self.embd.rows {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} outside the vocabulary ({})",
                    self.embd.rows
                )));
            }
            let at = x.len();
            x.resize(at + dm, 0.0);
            self.embd.row(id, &mut x[at..]);
        }
        if c.embedding_scale() != 1.0 {
            let s = c.embedding_scale();
            x.iter_mut().for_each(|v| *v *= s);
        }
        // The rotation tables of these positions, once for all layers.
        rope_table_into(t, d, c.rope_base as f64, start, rope);
        if c.rope_base_local != c.rope_base {
            rope_table_into(t, d, c.rope_base_local as f64, start, rope_local);
        }
        let style = if c.rope_neox {
            RopeStyle::Neox
        } else {
            RopeStyle::Adjacent
        };
        // A decode step or a continuation on the CPU attends straight over the cache.
        let over_cache = start > 0 && self.ctx.is_cpu();
        for (li, l) in self.layers.iter().enumerate().take(limit) {
            // SmallThinker routes on the layer's input, before attention.
            if let Ffn::Moe { router, .. } = &l.ffn {
                router.apply_into(x, t, exact, &mut moe.router, products);
                self.route_into(&moe.router, t, &mut moe.order, &mut moe.routes);
                self.touch_experts(li, moe);
            }
            xn.clear();
            xn.extend_from_slice(x);
            rmsnorm_in_place(xn, &l.attn_norm, c.norm_eps);
            let mut proj = |m: &Mat, b: &Option<Vec<f32>>, y: &mut Vec<f32>| {
                m.apply_into(xn, t, exact, y, products);
                if let Some(b) = b {
                    y.chunks_exact_mut(b.len())
                        .for_each(|r| r.iter_mut().zip(b).for_each(|(a, b)| *a += b));
                }
            };
            proj(&l.wq, &l.bq, q);
            proj(&l.wk, &l.bk, k);
            proj(&l.wv, &l.bv, v);
            if let Some(w) = &l.q_norm {
                rmsnorm_in_place(q, w, c.norm_eps);
            }
            if let Some(w) = &l.k_norm {
                rmsnorm_in_place(k, w, c.norm_eps);
            }
            let table = if c.global[li] || c.rope_base_local == c.rope_base {
                &*rope
            } else {
                &*rope_local
            };
            if c.rope[li] {
                rope_rows(q, d, table, style, |i| i / c.n_head);
                rope_rows(k, d, table, style, |i| i / c.n_kv_head);
            }
            // Head-major views for the observer and the attention plans ([h, t, d] is
            // [t, h, d] when t = 1), made once for both.
            let views = (pick.is_some() || !over_cache).then(|| {
                (
                    head_major(q, t, d),
                    head_major(k, t, d),
                    head_major(v, t, d),
                )
            });
            let method = match (pick.as_mut(), &views) {
                (Some(pick), Some((qh, kh, vh))) => pick(&LayerQkv {
                    layer: li,
                    global: c.global[li],
                    start,
                    tokens: t,
                    q: qh,
                    k: kh,
                    v: vh,
                })?,
                _ if over_cache => Method::Dense,
                _ => self.layer_method(li),
            };
            cache.k[li].append(k);
            cache.v[li].append(v);
            let n = start + t;
            if over_cache {
                att.clear();
                att.resize(t * c.n_head * d, 0.0);
                CacheAttention {
                    heads: c.n_head,
                    kv_heads: c.n_kv_head,
                    head_dim: d,
                    tokens: t,
                    keys: n,
                    window: if c.global[li] { None } else { c.window },
                    scale: self.attention_scale(),
                }
                .run_with(
                    q,
                    cache.k[li].rows(),
                    cache.v[li].rows(),
                    att,
                    attention,
                )?;
            } else {
                let (qh, kh, vh) = views.expect("made for a plan's attention");
                let (kc, vc) = if start == 0 {
                    (kh, vh)
                } else {
                    (
                        Cow::Owned(cache.k[li].head_major(n, d)),
                        Cow::Owned(cache.v[li].head_major(n, d)),
                    )
                };
                let o = self.attend(li, method, &qh, &kc, &vc, t, n)?;
                *att = from_head_major(&o, t, d);
            }
            l.wo.apply_into(att, t, exact, a, products);
            if let Some(w) = &l.post_attn_norm {
                rmsnorm_in_place(a, w, c.norm_eps);
            }
            x.iter_mut().zip(a.iter()).for_each(|(x, a)| *x += a);
            xn.clear();
            xn.extend_from_slice(x);
            rmsnorm_in_place(xn, &l.ffn_norm, c.norm_eps);
            match &l.ffn {
                Ffn::Dense { gate, up, down } => {
                    gate.apply_into(xn, t, exact, g, products);
                    up.apply_into(xn, t, exact, u, products);
                    let gate_fn = c.gate();
                    h.clear();
                    h.resize(g.len(), 0.0);
                    h.par_iter_mut()
                        .zip(g.par_iter().zip(u.par_iter()))
                        .with_min_len(crate::quant::qmat::SERIAL_VALUES)
                        .for_each(|(h, (&g, &u))| *h = gate_fn.apply(g) * u);
                    down.apply_into(h, t, exact, f, products);
                }
                Ffn::Moe { gate, up, down, .. } => {
                    experts_cpu(
                        xn,
                        t,
                        (gate, up, down),
                        exact,
                        &self.skips,
                        moe,
                        products,
                        f,
                    );
                    self.drop_stray_pages(li, &moe.fresh);
                }
            }
            if let Some(w) = &l.post_ffn_norm {
                rmsnorm_in_place(f, w, c.norm_eps);
            }
            x.iter_mut().zip(f.iter()).for_each(|(x, f)| *x += f);
        }
        if limit < self.layers.len() {
            return Ok(());
        }
        cache.len += t;
        rmsnorm_in_place(x, &self.out_norm, c.norm_eps);
        Ok(())
    }

    /// A workspace for [`Decoder::step`] (and the buffers of any forward pass).
    pub fn workspace(&self) -> Workspace {
        Workspace::default()
    }

    /// One decode step: runs token `id` after what `cache` holds and returns the next
    /// token's logits, on the reused buffers of `ws`. On the CPU backend with 16-bit
    /// activations ([`Decoder::f32_activations`] off), a step makes no heap allocation
    /// once `ws` has served a step and `cache` has room ([`KvCache::reserve`]), MoE
    /// layers included (routing, expert products, residency); the exact form
    /// allocates.
    pub fn step<'w>(
        &self,
        id: u32,
        cache: &mut KvCache,
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        self.run_layers(&[id], cache, None, self.layers.len(), ws)?;
        let Workspace {
            x,
            logits,
            products,
            ..
        } = ws;
        self.logits_into(x, logits, products);
        Ok(logits)
    }

    /// Caps the bytes of routed expert weights kept in memory when the experts are read
    /// from the mapped file (`None`: no cap). Over the cap, the least recently routed
    /// experts are dropped from memory (read again from the file when routed again).
    pub fn set_max_resident_experts(&self, cap: Option<u64>) {
        let mut r = self.residency.lock().expect("residency lock");
        r.cap = cap;
        self.evict(&mut r, None);
    }

    /// Bytes of expert weights resident now and at most so far, as the decoder counts
    /// them (experts routed since and not dropped), and the bytes of all experts.
    pub fn expert_residency(&self) -> (u64, u64, u64) {
        let r = self.residency.lock().expect("residency lock");
        let total = (0..self.layers.len())
            .flat_map(|li| (0..self.cfg.experts).filter_map(move |e| self.expert(li, e)))
            .map(expert_bytes)
            .sum();
        (r.bytes, r.peak, total)
    }

    /// Up rows of routed ReGLU experts skipped so far because their gate was off for
    /// every token routed to the expert (not read: neuron skipping), and up rows
    /// considered; both 0 for dense models.
    pub fn neuron_skips(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.skips.skipped.load(Relaxed),
            self.skips.total.load(Relaxed),
        )
    }

    /// The three matrices of expert `e` of layer `li`.
    fn expert(&self, li: usize, e: usize) -> Option<[&Mat; 3]> {
        match &self.layers[li].ffn {
            Ffn::Moe { gate, up, down, .. } => Some([&gate[e], &up[e], &down[e]]),
            Ffn::Dense { .. } => None,
        }
    }

    /// After a layer's experts ran: drops the pages the kernel mapped around the newly
    /// read experts `fresh` that belong to no resident expert (only under a cap). A
    /// file system with large folios maps a whole folio (up to 2 MiB, aligned in the
    /// file) on one touch, over neighbouring experts and tensors, which no eviction
    /// would ever drop: the cap would bound the counted bytes but not the process's
    /// resident memory.
    fn drop_stray_pages(&self, li: usize, fresh: &[usize]) {
        const FOLIO: usize = 2 << 20;
        let r = self.residency.lock().expect("residency lock");
        if r.cap.is_none() || fresh.is_empty() {
            return;
        }
        for &e in fresh {
            let Some(mats) = self.expert(li, e) else {
                return;
            };
            for m in mats {
                let Some((map, range)) = m.q.mapping() else {
                    return;
                };
                let lo = range.start / FOLIO * FOLIO;
                let hi = range.end.next_multiple_of(FOLIO).min(map.len());
                self.drop_unowned(&r, map, lo, hi);
            }
        }
    }

    /// Drops the pages of `lo..hi` of the mapped file that no resident expert's
    /// matrix overlaps (a page shared with a resident one stays).
    fn drop_unowned(&self, r: &ExpertResidency, map: &FileMap, lo: usize, hi: usize) {
        let spans = &self.expert_spans;
        let first = spans.partition_point(|s| s.0.end <= lo);
        let mut at = lo;
        for (span, sl, se) in spans[first..].iter().take_while(|s| s.0.start < hi) {
            if r.last.contains_key(&(*sl, *se)) {
                if span.start > at {
                    map.advise(at..span.start, false);
                }
                at = at.max(span.end);
            }
        }
        if hi > at {
            map.advise(at..hi, false);
        }
    }

    /// Marks layer `li`'s routed experts (`moe.routes`) as used now: the ones not
    /// resident are read ahead (the router runs before attention, so the reads overlap
    /// it), then the least recently used others are dropped while over the cap. The
    /// experts read anew end in `moe.fresh`.
    fn touch_experts(&self, li: usize, moe: &mut MoeScratch) {
        let MoeScratch {
            routes,
            used,
            fresh,
            ..
        } = moe;
        used.clear();
        used.extend(routes.iter().map(|x| x.0));
        used.sort_unstable();
        used.dedup();
        fresh.clear();
        let mut r = self.residency.lock().expect("residency lock");
        r.tick += 1;
        let tick = r.tick;
        for &e in used.iter() {
            let Some(mats) = self.expert(li, e) else {
                return;
            };
            if !mats[0].q.is_mapped() {
                return;
            }
            if r.last.insert((li, e), tick).is_none() {
                mats.iter().for_each(|m| m.q.advise(true));
                r.bytes += expert_bytes(mats);
                fresh.push(e);
            }
        }
        self.evict(&mut r, Some((li, used)));
        r.peak = r.peak.max(r.bytes);
    }

    /// Drops least recently used experts (not those of `keep`: a layer and experts)
    /// while over the cap.
    fn evict(&self, r: &mut ExpertResidency, keep: Option<(usize, &[usize])>) {
        let Some(cap) = r.cap else {
            return;
        };
        while r.bytes > cap {
            let Some((&key, _)) = r
                .last
                .iter()
                .filter(|(k, _)| keep.is_none_or(|(l, es)| k.0 != l || !es.contains(&k.1)))
                .min_by_key(|&(k, t)| (*t, *k))
            else {
                break;
            };
            r.last.remove(&key);
            if let Some(mats) = self.expert(key.0, key.1) {
                // Its pages, and the edge pages it shares with no resident expert.
                const PAGE: usize = 4096;
                for m in mats {
                    if let Some((map, range)) = m.q.mapping() {
                        let (lo, hi) =
                            (range.start / PAGE * PAGE, range.end.next_multiple_of(PAGE));
                        self.drop_unowned(r, map, lo, hi.min(map.len()));
                    }
                }
                r.bytes -= expert_bytes(mats);
            }
        }
    }

    /// Each token's experts and weights from its router logits `[t, experts]`: the
    /// top-k by logit, weighted by softmax or sigmoid of the logits, normalized to 1.
    fn route_into(
        &self,
        logits: &[f32],
        t: usize,
        order: &mut Vec<usize>,
        routes: &mut Vec<(usize, f32)>,
    ) {
        let (e, k) = (self.cfg.experts, self.cfg.top_k);
        routes.clear();
        for i in 0..t {
            let row = &logits[i * e..(i + 1) * e];
            order.clear();
            order.extend(0..e);
            // Equal logits keep the lower expert first.
            order.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = &order[..k];
            let at = routes.len();
            if self.cfg.sigmoid_gating {
                routes.extend(top.iter().map(|&j| (j, 1.0 / (1.0 + (-row[j]).exp()))));
            } else {
                // Softmax over all experts, then the top-k renormalized: the same as a
                // softmax over the top-k logits.
                let m = row[top[0]];
                routes.extend(top.iter().map(|&j| (j, (row[j] - m).exp())));
            }
            let sum: f32 = routes[at..].iter().map(|x| x.1).sum();
            routes[at..].iter_mut().for_each(|x| x.1 /= sum);
        }
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, d_model]`.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let mut y = Vec::new();
        self.logits_into(hidden, &mut y, &mut ApplyScratch::default());
        y
    }

    /// [`Decoder::logits`] into `out`, with the product's buffers in `scratch`.
    fn logits_into(&self, hidden: &[f32], out: &mut Vec<f32>, scratch: &mut ApplyScratch) {
        let m = self.output.as_ref().unwrap_or(&self.embd);
        let rows = hidden.len() / self.cfg.d_model;
        m.apply_into(hidden, rows, self.f32_activations, out, scratch);
        self.cfg.softcap(out);
    }

    /// Greedy generation: prefill `prompt`, then up to `max_new` tokens, stopping early
    /// at any of `stop`. Calls `on_token` with each new id.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>> {
        self.generate_with(prompt, max_new, stop, &mut Sampler::greedy(), on_token)
    }

    /// [`Decoder::generate`] with each token chosen by `sampler` (temperature, top-k,
    /// top-p, seed).
    pub fn generate_with(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>> {
        let mut cache = self.new_cache();
        cache.reserve(prompt.len() + max_new);
        let h = self.forward(prompt, &mut cache, &mut |_| Ok(()))?;
        let dm = self.cfg.d_model;
        let first = sampler.sample(&self.logits(&h[h.len() - dm..]));
        // The decode steps reuse one workspace.
        let mut ws = self.workspace();
        crate::model::sample::generation_loop(first, max_new, stop, on_token, &mut |t| {
            Ok(sampler.sample(self.step(t, &mut cache, &mut ws)?))
        })
    }

    /// Mean next-token negative log-likelihood (nats) of `ids` (prefill of all of them,
    /// then each position predicts the next), and the count of predictions.
    pub fn nll(&self, ids: &[u32]) -> Result<(f64, usize)> {
        let mut cache = self.new_cache();
        let h = self.forward(ids, &mut cache, &mut |_| Ok(()))?;
        let n = ids.len() - 1;
        let mut total = 0f64;
        self.logit_rows(&h[..n * self.cfg.d_model], |i, row| {
            total += token_nll(row, ids[i + 1]);
        });
        Ok((total / n.max(1) as f64, n))
    }

    /// The logits of each row of `hidden` (`[rows, d_model]`), 64 rows at a time:
    /// `f(row index, logits)`.
    pub fn logit_rows(&self, hidden: &[f32], mut f: impl FnMut(usize, &[f32])) {
        let dm = self.cfg.d_model;
        let rows = hidden.len() / dm;
        for r0 in (0..rows).step_by(64) {
            let r1 = (r0 + 64).min(rows);
            let logits = self.logits(&hidden[r0 * dm..r1 * dm]);
            let vocab = logits.len() / (r1 - r0);
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                f(r0 + i, row);
            }
        }
    }
}

/// Negative log-likelihood (nats) of token `target` under the logits `row`.
pub fn token_nll(row: &[f32], target: u32) -> f64 {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m as f64
        + row
            .iter()
            .map(|&x| ((x - m) as f64).exp())
            .sum::<f64>()
            .ln();
    lse - row[target as usize] as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{GgufBuilder, Value};
    use crate::runtime::test_util::{close, rnd};
    use rand::{SeedableRng, rngs::StdRng};

    /// A random 2-layer model of an architecture (head_dim 64, like SmolLM2).
    pub(crate) fn tiny_model(arch: &str, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (dm, nh, nkv, hd, ff, vocab, nl) =
            (96usize, 2usize, 1usize, 64usize, 80usize, 40usize, 2usize);
        let mut b = GgufBuilder::new().meta("general.architecture", Value::Str(arch.into()));
        for (key, value) in [
            ("block_count", Value::U64(nl as u64)),
            ("embedding_length", Value::U64(dm as u64)),
            ("feed_forward_length", Value::U64(ff as u64)),
            ("context_length", Value::U64(512)),
            ("attention.head_count", Value::U64(nh as u64)),
            ("attention.head_count_kv", Value::U64(nkv as u64)),
            ("attention.key_length", Value::U64(hd as u64)),
            ("rope.freq_base", Value::F64(10000.0)),
            ("attention.layer_norm_rms_epsilon", Value::F64(1e-6)),
        ] {
            b = b.meta(&format!("{arch}.{key}"), value);
        }
        if arch == "gemma3" {
            b = b.meta("gemma3.attention.sliding_window", Value::U64(6));
        }
        let mut m = |b: GgufBuilder, name: &str, rows: usize, cols: usize| {
            let s = 1.0 / (cols as f32).sqrt();
            b.tensor_f32(
                name,
                &[cols as u64, rows as u64],
                &rnd(&mut rng, rows * cols, s),
            )
        };
        b = m(b, "token_embd.weight", vocab, dm);
        let ones = |n: usize| vec![1.0f32; n];
        b = b.tensor_f32("output_norm.weight", &[dm as u64], &ones(dm));
        for l in 0..nl {
            let n = |s: &str| format!("blk.{l}.{s}");
            b = b.tensor_f32(&n("attn_norm.weight"), &[dm as u64], &ones(dm));
            b = b.tensor_f32(&n("ffn_norm.weight"), &[dm as u64], &ones(dm));
            b = m(b, &n("attn_q.weight"), nh * hd, dm);
            b = m(b, &n("attn_k.weight"), nkv * hd, dm);
            b = m(b, &n("attn_v.weight"), nkv * hd, dm);
            b = m(b, &n("attn_output.weight"), dm, nh * hd);
            b = m(b, &n("ffn_gate.weight"), ff, dm);
            b = m(b, &n("ffn_up.weight"), ff, dm);
            b = m(b, &n("ffn_down.weight"), dm, ff);
            if arch == "qwen2" {
                b = m(b, &n("attn_q.bias"), 1, nh * hd);
                b = m(b, &n("attn_k.bias"), 1, nkv * hd);
                b = m(b, &n("attn_v.bias"), 1, nkv * hd);
            }
            if arch == "gemma3" {
                for s in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                    b = b.tensor_f32(&n(s), &[hd as u64], &ones(hd));
                }
                for s in ["post_attention_norm.weight", "post_ffw_norm.weight"] {
                    b = b.tensor_f32(&n(s), &[dm as u64], &ones(dm));
                }
            }
        }
        b.build()
    }

    #[test]
    fn kv_cache_decode_matches_prefill() {
        // gemma3 with window 6 and 11 tokens: layer 0 and 1 are local (window binds).
        for arch in ["llama", "qwen2", "gemma3"] {
            let g = Gguf::from_bytes(tiny_model(arch, 11)).unwrap();
            let mut dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
            let ids: Vec<u32> = (0..11).map(|i| (i * 7 % 40) as u32).collect();
            // An f32 cache: decode steps see exactly what the prefill saw; an f16 cache
            // rounds keys and values to 11 bits (hidden states of size ~1 move by less
            // than 1e-2 after two layers).
            for (precision, tol) in [(KvPrecision::F32, 2e-4), (KvPrecision::F16, 1e-2)] {
                dec.kv_precision = precision;
                let mut c1 = dec.new_cache();
                let full = dec.forward(&ids, &mut c1, &mut |_| Ok(())).unwrap();
                let mut c2 = dec.new_cache();
                let mut inc = dec.forward(&ids[..4], &mut c2, &mut |_| Ok(())).unwrap();
                // A 3-token continuation, then one token at a time.
                inc.extend(dec.forward(&ids[4..7], &mut c2, &mut |_| Ok(())).unwrap());
                for &id in &ids[7..] {
                    inc.extend(dec.forward(&[id], &mut c2, &mut |_| Ok(())).unwrap());
                }
                assert_eq!(c2.len(), 11);
                let half = if precision == KvPrecision::F16 { 2 } else { 4 };
                assert_eq!(c2.bytes(), 2 * 2 * 11 * 64 * half);
                close(&inc, &full, tol);
            }
            let (nll, n) = dec.nll(&ids).unwrap();
            assert_eq!(n, 10);
            assert!(nll.is_finite() && nll > 0.0);
        }
    }

    #[test]
    fn window_changes_gemma_local_layers() {
        // The same weights with a huge window give different hidden states once the
        // prompt is longer than the real window: the window is applied.
        let g = Gguf::from_bytes(tiny_model("gemma3", 5)).unwrap();
        let mut dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
        let ids: Vec<u32> = (0..12).map(|i| (i * 3 % 40) as u32).collect();
        let a = dec
            .forward(&ids, &mut dec.new_cache(), &mut |_| Ok(()))
            .unwrap();
        dec.cfg.window = Some(1000);
        let b = dec
            .forward(&ids, &mut dec.new_cache(), &mut |_| Ok(()))
            .unwrap();
        let dm = dec.cfg.d_model;
        close(&a[..6 * dm], &b[..6 * dm], 1e-5);
        assert!(
            a[6 * dm..]
                .iter()
                .zip(&b[6 * dm..])
                .any(|(x, y)| (x - y).abs() > 1e-3)
        );
    }

    #[test]
    fn window_method_matches_the_cache_attention() {
        // The crate's Method::Window (sinks 0), which every prefill uses for Gemma's local
        // layers, means the same mask as the cache attention of decode steps and chunked
        // prefills.
        let mut rng = StdRng::seed_from_u64(4);
        let (h, kvh, t, d, w) = (4, 1, 70, 64, 9);
        let q = rnd(&mut rng, h * t * d, 1.0);
        let k = rnd(&mut rng, kvh * t * d, 1.0);
        let v = rnd(&mut rng, kvh * t * d, 1.0);
        let ctx = Context::cpu();
        let shape = AttentionShape::new(h, kvh, t, d);
        let plan = ctx
            .attention(shape)
            .method(Method::Window(WindowConfig {
                window: w,
                sinks: 0,
            }))
            .scale(0.125)
            .build()
            .unwrap();
        let (qt, kt, vt) =
            crate::attention::upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
        let got = plan.run(&qt, &kt, &vt).unwrap().to_f32_blocking().unwrap();
        // The cache attention of a chunked continuation, over all t tokens at once.
        let mut want = vec![f32::NAN; q.len()];
        CacheAttention {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            tokens: t,
            keys: t,
            window: Some(w),
            scale: 0.125,
        }
        .run(
            &from_head_major(&q, t, d),
            CacheRows::F32(&from_head_major(&k, t, d)),
            CacheRows::F32(&from_head_major(&v, t, d)),
            &mut want,
        )
        .unwrap();
        close(&got, &to_head_major(&want, t, d), 1e-4);
    }

    /// A synthetic model's file (`model::synth`), f16 weights unless asked.
    fn synth_model(cfg: &crate::model::synth::SynthConfig, ty: crate::quant::GgmlType) -> Gguf {
        let mut bytes = Vec::new();
        crate::model::synth::write_synth(cfg, ty, 5, &mut bytes).unwrap();
        Gguf::from_bytes(bytes).unwrap()
    }

    #[test]
    fn smallthinker_decode_matches_prefill() {
        use crate::model::synth::preset;
        use crate::quant::GgmlType;
        for ty in [GgmlType::F16, GgmlType::Q4_0] {
            let g = synth_model(&preset("tiny-smallthinker").unwrap(), ty);
            let mut dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
            assert_eq!(dec.cfg.arch, Arch::SmallThinker);
            assert_eq!(
                (dec.cfg.experts, dec.cfg.top_k, dec.cfg.ffn_dim),
                (8, 2, 64)
            );
            assert!(dec.cfg.sigmoid_gating);
            let ids: Vec<u32> = (0..13).map(|i| (i * 37 % 400) as u32).collect();
            for (exact, precision, tol) in [
                (true, KvPrecision::F32, 2e-4),
                (false, KvPrecision::F16, 2e-2),
            ] {
                dec.f32_activations = exact;
                dec.kv_precision = precision;
                let full = dec
                    .forward(&ids, &mut dec.new_cache(), &mut |_| Ok(()))
                    .unwrap();
                let mut c = dec.new_cache();
                let mut inc = dec.forward(&ids[..9], &mut c, &mut |_| Ok(())).unwrap();
                for &id in &ids[9..] {
                    inc.extend(dec.forward(&[id], &mut c, &mut |_| Ok(())).unwrap());
                }
                close(&inc, &full, tol);
            }
        }
    }

    /// KiB of `path` mapped into this process and resident (`/proc/self/smaps`).
    #[cfg(target_os = "linux")]
    fn mapped_rss_kib(path: &std::path::Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_str().unwrap();
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if head.contains('-') && !head.ends_with(':') {
                inside = line.ends_with(name);
            } else if inside && let Some(v) = line.strip_prefix("Rss:") {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        kib
    }

    #[test]
    fn mapped_experts_honour_the_resident_cap() {
        use crate::model::synth::preset;
        use crate::quant::GgmlType;
        let cfg = preset("tiny-smallthinker").unwrap();
        let mut bytes = Vec::new();
        crate::model::synth::write_synth(&cfg, GgmlType::Q4_0, 9, &mut bytes).unwrap();
        let path = std::env::temp_dir().join(format!(
            "wgsparse-mapped-experts-{}.gguf",
            std::process::id()
        ));
        std::fs::write(&path, &bytes).unwrap();
        let on_disk = Gguf::open(&path).unwrap();
        let mut mapped = Decoder::load(&on_disk, &Context::cpu(), Method::Dense).unwrap();
        let mut owned = Decoder::load(
            &Gguf::from_bytes(bytes).unwrap(),
            &Context::cpu(),
            Method::Dense,
        )
        .unwrap();
        let (_, _, total) = mapped.expert_residency();
        // One expert's three matrices; room for three experts.
        let one = total / (cfg.layers * cfg.experts) as u64;
        let cap = 3 * one;
        mapped.set_max_resident_experts(Some(cap));
        for d in [&mut mapped, &mut owned] {
            d.f32_activations = true;
            d.kv_precision = KvPrecision::F32;
        }
        let (mut cm, mut co) = (mapped.new_cache(), owned.new_cache());
        for i in 0..24u32 {
            let id = [(i * 53 + 7) % 400];
            let a = mapped.forward(&id, &mut cm, &mut |_| Ok(())).unwrap();
            let b = owned.forward(&id, &mut co, &mut |_| Ok(())).unwrap();
            close(&a, &b, 1e-5);
            let (now, peak, _) = mapped.expert_residency();
            assert!(
                now <= cap && peak <= cap,
                "{now} / {peak} bytes over the cap {cap}"
            );
            assert!(
                now >= cfg.top_k as u64 * one,
                "the routed experts stay resident"
            );
            // The process holds no more of the file than the pages of the resident
            // experts (whole large folios mapped on a touch are trimmed back).
            #[cfg(target_os = "linux")]
            {
                let pages: std::collections::BTreeSet<usize> = {
                    let r = mapped.residency.lock().unwrap();
                    mapped
                        .expert_spans
                        .iter()
                        .filter(|s| r.last.contains_key(&(s.1, s.2)))
                        .flat_map(|s| s.0.start / 4096..s.0.end.div_ceil(4096))
                        .collect()
                };
                let rss = mapped_rss_kib(&path);
                assert!(
                    rss * 1024 <= pages.len() as u64 * 4096,
                    "token {i}: {rss} KiB of the file resident, the resident experts span {} pages",
                    pages.len()
                );
            }
        }
        // Without a cap every routed expert stays (counted).
        mapped.set_max_resident_experts(None);
        assert_eq!(
            owned.expert_residency().0,
            0,
            "owned experts are not counted"
        );
        drop(on_disk);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn smallthinker_routes_and_layer_pattern() {
        use crate::model::synth::{SynthConfig, preset};
        use crate::quant::GgmlType;
        // A window makes layers 0, 4, ... global NoPE layers (llama.cpp's reading).
        let cfg = SynthConfig {
            layers: 5,
            window: Some(64),
            ..preset("tiny-smallthinker").unwrap()
        };
        let g = synth_model(&cfg, GgmlType::F16);
        let mut dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
        assert_eq!(dec.cfg.global, [true, false, false, false, true]);
        assert_eq!(dec.cfg.rope, [false, true, true, true, false]);
        assert_eq!(dec.cfg.window, Some(4096));
        // Top-2 of 8 by logit, weights normalized: sigmoid, then softmax.
        let logits = [0.0, 2.0, -1.0, 1.0, 0.5, -3.0, 1.5, 0.2];
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (mut order, mut r) = (Vec::new(), Vec::new());
        dec.route_into(&logits, 1, &mut order, &mut r);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 6]);
        let want = sig(2.0) / (sig(2.0) + sig(1.5));
        assert!((r[0].1 - want).abs() < 1e-6);
        dec.cfg.sigmoid_gating = false;
        dec.route_into(&logits, 1, &mut order, &mut r);
        let want = 1.0 / (1.0 + (-0.5f32).exp());
        assert!((r[0].1 - want).abs() < 1e-6 && (r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_architecture_is_typed_error() {
        let g = GgufBuilder::new()
            .meta("general.architecture", Value::Str("mamba".into()))
            .build();
        let g = Gguf::from_bytes(g).unwrap();
        assert!(matches!(Config::from_gguf(&g), Err(Error::Model(_))));
    }
}
