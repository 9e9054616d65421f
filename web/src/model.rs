//! A real GGUF model in the page: load a file's bytes, tokenize, prefill and generate on
//! WebGPU with the GPU decoder (the CPU decoder compiled to WASM when there is no
//! WebGPU), streaming each token to a JavaScript callback.
//!
//! ```js
//! const ctx = await WebContext.create("auto");
//! const bytes = new Uint8Array(await file.arrayBuffer());
//! const model = WebModel.load(ctx, bytes, file.name);      // the bytes are copied once
//! const r = JSON.parse(await model.generate("The capital of France is",
//!     JSON.stringify({ max_tokens: 16, method: "dense" }), (piece) => show(piece)));
//! // r.text, r.tokens, r.prefill_tok_s, r.decode_tok_s, r.ttft_ms, ...
//! ```

use std::cell::RefCell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wgsparse::Method;
use wgsparse::model::engine::{Engine, EngineKind};
use wgsparse::model::gguf::Gguf;
use wgsparse::model::sample::{Sampler, SamplerConfig};
use wgsparse::model::tokenizer::{ModelTokenizer, TextStream};

use crate::clock::now_ms;
use crate::{GivenQkv, RunOptions, WebContext};
use wgsparse::model::decoder::Decoder;
use wgsparse::{AttentionShape, Context};

/// A loaded model: its decoder (GPU or CPU) and tokenizer.
#[wasm_bindgen]
pub struct WebModel {
    inner: Rc<Loaded>,
}

struct Loaded {
    /// Borrowed mutably by one generation at a time (its prompt method is set).
    engine: RefCell<Engine>,
    /// The file (its one copy in WASM memory), kept when the engine runs on the GPU
    /// for the sparse-prefill view's CPU decoder (made from it on first use); dropped
    /// after loading a CPU engine, whose decoder serves the view itself.
    gguf: Option<Gguf>,
    /// The CPU decoder that gives the view a layer's Q/K/V (made on first use when the
    /// engine runs on the GPU).
    cpu: RefCell<Option<Decoder>>,
    /// The page's context (the view's attention runs on it).
    ctx: Context,
    tok: ModelTokenizer,
    name: String,
    file_bytes: u64,
    load_ms: f64,
}

/// What [`WebModel::info_json`] describes.
#[derive(Serialize)]
struct ModelInfo<'a> {
    name: &'a str,
    architecture: String,
    layers: usize,
    d_model: usize,
    heads: usize,
    kv_heads: usize,
    experts: usize,
    vocab: usize,
    tokenizer: &'a str,
    /// `gpu` (the whole forward pass on WebGPU) or `cpu` (WASM).
    engine: &'static str,
    file_bytes: u64,
    /// Bytes of the weights as the decoder holds them (on the GPU: the file's blocks).
    weight_bytes: u64,
    load_ms: f64,
}

/// Generation options (JSON from the page; every field optional).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct GenerateOptions {
    /// New tokens at most.
    pub max_tokens: usize,
    /// Prompt attention: any method spec (`dense`, `sale`, `proxy:gamma=0.9`, ...).
    pub method: String,
    /// Wrap the prompt in the model's chat format (one user turn).
    pub chat: bool,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Top-p (1: off).
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 32,
            method: "dense".into(),
            chat: false,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// What [`WebModel::generate`] resolves to (as JSON).
#[derive(Serialize)]
struct Generated {
    text: String,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    engine: &'static str,
    method: String,
    /// Prompt prefill: from the start to the first token's logits.
    ttft_ms: f64,
    prefill_tok_s: f64,
    /// Tokens after the first, over the time they took.
    decode_tok_s: f64,
    total_ms: f64,
    /// The largest total size of the crate's GPU buffers so far: 0 on the CPU, none in
    /// a browser (WebGPU reports no buffer memory to wgpu's counters).
    peak_gpu_bytes: Option<u64>,
}

#[wasm_bindgen]
impl WebModel {
    /// Reads a GGUF file's bytes (copied once into WASM memory; on WebGPU the weights
    /// are uploaded in their file blocks, in parts under the binding limit) and loads it
    /// on `ctx`: the GPU decoder on WebGPU, the CPU decoder otherwise. Resolves to the
    /// model; rejects with a message when the file is not a supported model or its
    /// buffers do not fit the adapter (out of memory, over a limit).
    pub fn load(ctx: &WebContext, bytes: Vec<u8>, name: String) -> js_sys::Promise {
        let ctx = ctx.ctx.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let m = load_model(&ctx, bytes, &name)
                .await
                .map_err(|e| JsError::new(&e))?;
            Ok(JsValue::from(m))
        })
    }

    /// Bytes of a GPU KV cache for `positions` tokens, made and dropped (how long a
    /// context fits; in pages under the binding limit). Errors when it does not fit, or
    /// on the CPU decoder (its cache grows as it goes).
    #[wasm_bindgen(js_name = kvCacheBytes)]
    pub fn kv_cache_bytes(&self, positions: usize) -> js_sys::Promise {
        let m = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let what = format!("a KV cache of {positions} positions");
            let bytes = within_scopes(&m.ctx, &what, || {
                let engine = m
                    .engine
                    .try_borrow()
                    .map_err(|_| "a generation is running")?;
                let Engine::Gpu(dec) = &*engine else {
                    return Err("the CPU decoder's cache grows as it goes".into());
                };
                dec.new_cache(positions)
                    .map(|c| c.bytes())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| JsError::new(&e))?;
            Ok(JsValue::from_f64(bytes as f64))
        })
    }

    /// The model as JSON: architecture, sizes, tokenizer, engine, bytes, load time.
    #[wasm_bindgen(js_name = infoJson)]
    pub fn info_json(&self) -> String {
        let m = &self.inner;
        let Ok(engine) = m.engine.try_borrow() else {
            return "{\"error\":\"a generation is running\"}".into();
        };
        let c = engine.cfg();
        let info = ModelInfo {
            name: &m.name,
            architecture: format!("{:?}", c.arch).to_lowercase(),
            layers: c.n_layer,
            d_model: c.d_model,
            heads: c.n_head,
            kv_heads: c.n_kv_head,
            experts: c.experts,
            vocab: m.tok.vocab_size(),
            tokenizer: m.tok.kind(),
            engine: engine_name(&engine),
            file_bytes: m.file_bytes,
            weight_bytes: engine.weight_bytes(),
            load_ms: m.load_ms,
        };
        serde_json::to_string(&info).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Generates a continuation of `prompt` (options as JSON, see [`GenerateOptions`]),
    /// calling `on_token(piece)` with the text of each new token as it comes, and
    /// resolves to a JSON summary: `text`, `tokens`, `prompt_tokens`, `ttft_ms`,
    /// `prefill_tok_s`, `decode_tok_s`, `peak_gpu_bytes`.
    pub fn generate(
        &self,
        prompt: String,
        options_json: String,
        on_token: js_sys::Function,
    ) -> js_sys::Promise {
        let m = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let opts: GenerateOptions = serde_json::from_str(&options_json)
                .map_err(|e| JsError::new(&format!("bad options: {e}")))?;
            let r = generate(&m, &prompt, &opts, &on_token)
                .await
                .map_err(|e| JsError::new(&e))?;
            Ok(JsValue::from_str(
                &serde_json::to_string(&r).map_err(|e| JsError::new(&e.to_string()))?,
            ))
        })
    }
}

/// Options of the sparse-prefill view (JSON; every field optional): the attention
/// options of the kernels demo ([`RunOptions`]: method and its parameters, pattern
/// block, head) plus the text's token count and the layer.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ViewOptions {
    /// Tokens of the text to prefill (the text's first ones).
    pub tokens: usize,
    /// The layer shown (a global-attention layer; default: the first).
    pub layer: Option<usize>,
    /// Method, its parameters, pattern block and head.
    #[serde(flatten)]
    pub run: RunOptions,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            tokens: 4096,
            layer: None,
            run: RunOptions::default(),
        }
    }
}

/// What the view resolves to (as JSON): the layer's dense and sparse runs side by side.
#[derive(Serialize)]
struct View {
    tokens: usize,
    layer: usize,
    head: usize,
    /// Prefill of layers `0..=layer` (dense) on the WASM CPU decoder, giving the Q/K/V.
    prefill_ms: f64,
    /// Dense attention over the layer's Q/K/V on the page's device (the method run's
    /// reference: same clock as its `attention_ms`).
    dense_ms: f64,
    /// Dense attention's pattern picture of the head (every causal pair).
    dense_pattern: crate::KeyPattern,
    /// The kernels demo's summary of the method over the layer's Q/K/V, with its
    /// density and attention-mass recall against dense.
    method: crate::Summary,
}

#[wasm_bindgen]
impl WebModel {
    /// The sparse-prefill view: prefills the first `tokens` tokens of `text` through
    /// layer `layer` (dense, on the WASM CPU decoder), then runs that layer's attention
    /// with dense and with the chosen method on the page's device (options as JSON,
    /// see [`ViewOptions`]) and resolves to JSON: each run's attention time, density,
    /// recall against dense and the pattern picture of the chosen head.
    #[wasm_bindgen(js_name = prefillView)]
    pub fn prefill_view(&self, text: String, options_json: String) -> js_sys::Promise {
        let m = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let opts: ViewOptions = serde_json::from_str(&options_json)
                .map_err(|e| JsError::new(&format!("bad options: {e}")))?;
            let v = view(&m, &text, &opts).await.map_err(|e| JsError::new(&e))?;
            Ok(JsValue::from_str(
                &serde_json::to_string(&v).map_err(|e| JsError::new(&e.to_string()))?,
            ))
        })
    }
}

async fn view(m: &Loaded, text: &str, o: &ViewOptions) -> Result<View, String> {
    let (given, layer, prefill_ms) = layer_qkv(m, text, o)?;
    let opts = RunOptions {
        compare: true,
        twin: false,
        ..o.run.clone()
    };
    let (method, _) = crate::run(&m.ctx, &opts, Some(&given)).await?;
    let dense_vis = crate::Visibility::new(&Method::Dense, &[], true);
    Ok(View {
        tokens: given.shape.seq_len,
        layer,
        head: o.run.head,
        prefill_ms,
        dense_ms: method.dense_ms.ok_or("the dense run reported no time")?,
        dense_pattern: crate::KeyPattern::build(
            &given.shape,
            &dense_vis,
            o.run.head,
            o.run.block,
            512,
        ),
        method,
    })
}

/// The view's layer's Q/K/V from a dense prefill of the text's first tokens on the CPU
/// decoder, the layer, and the prefill's time (ms).
fn layer_qkv(m: &Loaded, text: &str, o: &ViewOptions) -> Result<(GivenQkv, usize, f64), String> {
    let e = |x: wgsparse::Error| x.to_string();
    let mut ids = m.tok.encode_prompt(text).map_err(e)?;
    ids.truncate(o.tokens);
    if ids.len() < 2 {
        return Err("the text has fewer than two tokens".into());
    }
    let engine = m
        .engine
        .try_borrow()
        .map_err(|_| "a generation is running")?;
    let mut made = m.cpu.try_borrow_mut().map_err(|_| "a view is running")?;
    let dec: &Decoder = match &*engine {
        Engine::Cpu(d) => d,
        Engine::Gpu(_) => {
            if made.is_none() {
                let g = m.gguf.as_ref().ok_or("the model file was not kept")?;
                *made = Some(Decoder::load(g, &Context::cpu(), Method::Dense).map_err(e)?);
            }
            made.as_ref().expect("made above")
        }
    };
    let c = &dec.cfg;
    let layer = o
        .layer
        .or_else(|| c.global.iter().position(|&g| g))
        .unwrap_or(0);
    if layer >= c.n_layer || !c.global[layer] {
        return Err(format!(
            "layer {layer}: pick a global-attention layer of {} ({:?})",
            c.n_layer,
            (0..c.n_layer).filter(|&l| c.global[l]).collect::<Vec<_>>()
        ));
    }
    let t0 = now_ms();
    let mut qkv = None;
    dec.observe_layers(&ids, layer + 1, &mut |l| {
        if l.layer == layer {
            qkv = Some((l.q.to_vec(), l.k.to_vec(), l.v.to_vec()));
        }
        Ok(())
    })
    .map_err(e)?;
    let prefill_ms = now_ms() - t0;
    let (q, k, v) = qkv.ok_or("the layer was not reached")?;
    let given = GivenQkv {
        shape: AttentionShape::new(c.n_head, c.n_kv_head, ids.len(), c.head_dim),
        q,
        k,
        v,
        scale: dec.attention_scale(),
        label: format!(
            "{} layer {layer}: Q/K/V of {} tokens of the text",
            m.name,
            ids.len()
        ),
    };
    Ok((given, layer, prefill_ms))
}

async fn load_model(ctx: &Context, bytes: Vec<u8>, name: &str) -> Result<WebModel, String> {
    let t0 = now_ms();
    let file_bytes = bytes.len() as u64;
    let err = |e: wgsparse::Error| format!("{name}: {e}");
    let g = Gguf::from_bytes(bytes).map_err(err)?;
    let tok = ModelTokenizer::from_gguf(&g).map_err(err)?;
    let what = format!("{name} ({:.0} MiB)", file_bytes as f64 / 1048576.0);
    let engine = within_scopes(ctx, &what, || {
        Engine::load(&g, ctx, Method::Dense, EngineKind::Auto).map_err(err)
    })
    .await?;
    let gguf = matches!(engine, Engine::Gpu(_)).then_some(g);
    Ok(WebModel {
        inner: Rc::new(Loaded {
            engine: RefCell::new(engine),
            gguf,
            cpu: RefCell::new(None),
            ctx: ctx.clone(),
            tok,
            name: name.to_string(),
            file_bytes,
            load_ms: now_ms() - t0,
        }),
    })
}

/// Runs `f` inside WebGPU error scopes (out of memory, validation) and turns what they
/// catch into a message naming `what` (the browser reports these asynchronously).
async fn within_scopes<T>(
    ctx: &Context,
    what: &str,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let Some(g) = ctx.gpu() else { return f() };
    let oom = g.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = g.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let r = f();
    let (invalid, oom) = (invalid.pop().await, oom.pop().await);
    if let Some(e) = oom {
        return Err(format!("{what} does not fit this adapter's memory: {e}"));
    }
    if let Some(e) = invalid {
        return Err(format!(
            "{what}: the adapter refused a buffer (over one of its limits?): {e}"
        ));
    }
    r
}

fn engine_name(e: &Engine) -> &'static str {
    match e.kind() {
        EngineKind::Gpu => "gpu",
        _ => "cpu",
    }
}

/// Prefill and generation: on the GPU decoder every step awaits the browser (so the
/// page repaints between tokens); the CPU decoder runs to the end in one call. The
/// engine stays borrowed across the awaits on purpose: a second generation started
/// meanwhile gets a "running" error from `try_borrow_mut` instead of interleaving.
#[allow(clippy::await_holding_refcell_ref)]
async fn generate(
    m: &Loaded,
    prompt: &str,
    o: &GenerateOptions,
    on_token: &js_sys::Function,
) -> Result<Generated, String> {
    let text_prompt = if o.chat {
        m.tok.chat_prompt(prompt).map_err(|e| e.to_string())?
    } else {
        prompt.to_string()
    };
    let ids = m
        .tok
        .encode_prompt(&text_prompt)
        .map_err(|e| e.to_string())?;
    if ids.is_empty() || o.max_tokens == 0 {
        return Err("an empty prompt, or no token to generate".into());
    }
    let method: Method = o.method.parse().map_err(|e| format!("method: {e}"))?;
    let mut engine = m
        .engine
        .try_borrow_mut()
        .map_err(|_| "a generation is already running on this model".to_string())?;
    engine.set_methods(method.clone(), Default::default());
    let engine = &*engine;
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        seed: o.seed,
    })
    .map_err(|e| e.to_string())?;
    let mut stream = TextStream::new(&m.tok);
    let t0 = now_ms();
    let mut ttft = None;
    // Each token's text to the page; the first one ends the time to first token.
    let mut on_id = |id: u32| {
        ttft.get_or_insert_with(|| now_ms() - t0);
        let piece = stream.push(id);
        let _ = on_token.call1(&JsValue::NULL, &JsValue::from_str(&piece));
    };
    let stop = &m.tok.stop_ids;
    let out = match engine {
        Engine::Gpu(dec) => {
            let mut cache = dec
                .new_cache(ids.len() + o.max_tokens)
                .map_err(|e| e.to_string())?;
            dec.generate_async(
                &ids,
                o.max_tokens,
                stop,
                &mut sampler,
                &mut cache,
                &mut on_id,
            )
            .await
        }
        Engine::Cpu(dec) => dec.generate_with(&ids, o.max_tokens, stop, &mut sampler, &mut on_id),
    }
    .map_err(|e| e.to_string())?;
    let ttft = ttft.unwrap_or(0.0);
    let total = now_ms() - t0;
    let decode_ms = total - ttft;
    Ok(Generated {
        text: m.tok.decode(&out).map_err(|e| e.to_string())?,
        prompt_tokens: ids.len(),
        engine: engine_name(engine),
        method: method.to_string(),
        ttft_ms: ttft,
        prefill_tok_s: ids.len() as f64 / (ttft / 1e3).max(1e-9),
        decode_tok_s: (out.len().saturating_sub(1)) as f64 / (decode_ms / 1e3).max(1e-9),
        total_ms: total,
        tokens: out,
        peak_gpu_bytes: match engine.context().gpu() {
            None => Some(0),
            Some(_) if engine.context().backend() == wgsparse::Backend::BrowserWebGpu => None,
            Some(g) => Some(g.peak_buffer_bytes()),
        },
    })
}
