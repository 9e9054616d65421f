//! wgsparse in the browser: the crate's attention plans exposed to JavaScript through
//! wasm-bindgen.
//!
//! ```js
//! import init, { WebContext, methods } from "./pkg/wgsparse_web.js";
//! await init();
//! const ctx = await WebContext.create("auto");      // WebGPU when the browser has it, else CPU
//! const r = await ctx.runAttention(JSON.stringify({ method: "dense", seq_len: 512 }));
//! const summary = JSON.parse(r.json);                 // timings, density, pattern, errors
//! const out = r.output;                               // Float32Array [q_heads, seq_len, d]
//! ```
//!
//! Everything here is async (no `pollster` on the web): device creation, the run, and the
//! readback await the browser's promises.

use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wgsparse::attention::flash_cpu::{naive_attention, naive_masked_attention};
use wgsparse::attention::metrics::{ErrorStats, Quality, compare};
use wgsparse::attention::select::anchor::AnchorConfig;
use wgsparse::attention::select::proxy::ProxyConfig;
use wgsparse::attention::select::sale::SaleConfig;
use wgsparse::attention::synthetic::{Structure, structured_qkv_host};
use wgsparse::attention::upload_qkv;
use wgsparse::{
    AttentionPlan, AttentionShape, Context, ContextOptions, DType, Method, RowState, Tensor,
    WindowConfig,
};

mod clock;
pub mod kernels;
pub mod model;
mod pattern;

pub use model::WebModel;

pub use pattern::{KeyPattern, Visibility};

/// Reports Rust panics on the browser console (with the message) instead of an opaque
/// `unreachable` trap.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&format!("wgsparse panic: {info}").into());
    }));
}

/// Names of every attention method this build has (the demo's picker lists them).
#[wasm_bindgen]
pub fn methods() -> Vec<String> {
    Method::all().iter().map(|m| m.name().to_string()).collect()
}

/// The CPU path's quantized products checked in this build against f64 (see
/// [`kernels::check`]): a JSON [`kernels::KernelCheck`].
#[wasm_bindgen]
pub fn check_cpu_kernels(seed: u64) -> String {
    serde_json::to_string(&kernels::check(seed)).expect("a plain report")
}

/// The crate version.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// One device: the browser's WebGPU or the CPU path compiled to WASM.
#[wasm_bindgen]
pub struct WebContext {
    ctx: Context,
    requested: String,
    fallback_reason: Option<String>,
}

/// Device description returned by [`WebContext::info_json`].
#[derive(Serialize)]
struct DeviceInfo<'a> {
    backend: String,
    is_cpu: bool,
    requested: &'a str,
    adapter: String,
    vendor: u32,
    device_id: u32,
    device_type: String,
    driver: String,
    fallback_reason: Option<&'a str>,
    capabilities: &'a wgsparse::Capabilities,
    dense_tile_rows: Option<usize>,
}

#[wasm_bindgen]
impl WebContext {
    /// Opens a device. `device`: `"auto"` (WebGPU when the browser offers an adapter,
    /// else the CPU), `"webgpu"` (error without it) or `"cpu"`.
    pub async fn create(device: String) -> Result<WebContext, JsError> {
        let requested = device.trim().to_ascii_lowercase();
        let (ctx, fallback_reason) = match requested.as_str() {
            "cpu" => (Context::cpu(), None),
            "webgpu" | "gpu" => match open_webgpu().await {
                Ok(c) => (c, None),
                Err(e) => return Err(JsError::new(&e)),
            },
            "" | "auto" => match open_webgpu().await {
                Ok(c) => (c, None),
                Err(e) => (Context::cpu(), Some(e)),
            },
            o => {
                return Err(JsError::new(&format!(
                    "unknown device `{o}` (auto, webgpu, cpu)"
                )));
            }
        };
        Ok(WebContext {
            ctx,
            requested,
            fallback_reason,
        })
    }

    /// `"webgpu"` or `"cpu"`.
    pub fn backend(&self) -> String {
        self.ctx.backend().to_string()
    }

    /// Why `"auto"` fell back to the CPU (no `navigator.gpu`, no adapter, ...), if it did.
    #[wasm_bindgen(js_name = fallbackReason)]
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason.clone()
    }

    /// The device as JSON: backend, adapter, capabilities (limits, f16, subgroups) and
    /// the dense kernel's tile rows on this device.
    #[wasm_bindgen(js_name = infoJson)]
    pub fn info_json(&self) -> String {
        let gpu = self.ctx.gpu();
        let info = DeviceInfo {
            backend: self.backend(),
            is_cpu: self.ctx.is_cpu(),
            requested: &self.requested,
            adapter: match gpu {
                Some(g) => g.info.name.clone(),
                None => "CPU (WASM)".into(),
            },
            vendor: gpu.map(|g| g.info.vendor).unwrap_or(0),
            device_id: gpu.map(|g| g.info.device).unwrap_or(0),
            device_type: gpu
                .map(|g| format!("{:?}", g.info.device_type))
                .unwrap_or_else(|| "Cpu".into()),
            driver: gpu
                .map(|g| format!("{} {}", g.info.driver, g.info.driver_info))
                .unwrap_or_default(),
            fallback_reason: self.fallback_reason.as_deref(),
            capabilities: self.ctx.capabilities(),
            dense_tile_rows: gpu
                .map(|g| wgsparse::attention::flash::DenseTiles::choose(&g.caps).bq),
        };
        serde_json::to_string(&info).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Runs one attention problem (options as JSON, see [`RunOptions`]) and resolves to
    /// a [`RunResult`]: the output and a JSON summary (per-stage times, density, the
    /// selected block pattern, errors against dense attention on the WASM CPU path).
    #[wasm_bindgen(js_name = runAttention)]
    pub fn run_attention(&self, options_json: String) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let opts: RunOptions = serde_json::from_str(&options_json)
                .map_err(|e| JsError::new(&format!("bad options: {e}")))?;
            let (summary, output) = run(&ctx, &opts, None).await.map_err(|e| JsError::new(&e))?;
            let json = serde_json::to_string(&summary).map_err(|e| JsError::new(&e.to_string()))?;
            Ok(JsValue::from(RunResult { json, output }))
        })
    }
}

/// Opens the browser's WebGPU adapter, or says why not.
async fn open_webgpu() -> Result<Context, String> {
    if !wgpu::util::is_browser_webgpu_supported().await {
        return Err("this browser offers no WebGPU adapter (navigator.gpu missing, or requestAdapter() returned null)".into());
    }
    let opts = ContextOptions::default().with_backend(wgsparse::Backend::BrowserWebGpu);
    Context::new(opts)
        .await
        .map_err(|e| format!("WebGPU device: {e}"))
}

/// What to run (JSON from the page; every field optional).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct RunOptions {
    /// Method name (`dense`, ...).
    pub method: String,
    /// Query rows (= keys).
    pub seq_len: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension (64, 128, 256).
    pub head_dim: usize,
    /// Causal masking.
    pub causal: bool,
    /// `f32` or `f16` storage.
    pub dtype: String,
    /// Seed of the synthetic Gaussian Q/K/V.
    pub seed: u64,
    /// Compare against dense attention on the WASM CPU path (or, on the CPU, against a
    /// naive f64 reference when the problem is small enough).
    pub compare: bool,
    /// Query rows per row of the pattern picture.
    pub block: usize,
    /// The head the pattern picture shows.
    pub head: usize,
    /// With `compare` on WebGPU: also run the same method on the WASM CPU path and
    /// report the output's error against it.
    pub twin: bool,
    /// `structured` (sinks, local band, heavy columns, RoPE) or `gaussian`.
    pub data: String,
    /// AnchorAttention: θ, rows per pooled block, blocks per group, initial keys
    /// (demo-sized defaults: the paper's 2048-query groups need longer prompts).
    pub theta: f32,
    /// AnchorAttention: rows per pooled block.
    pub anchor_block: usize,
    /// AnchorAttention: pooled blocks per query group.
    pub step: usize,
    /// AnchorAttention: initial keys.
    pub init_keys: usize,
    /// Window method: keys per window.
    pub window: usize,
    /// Window method: sink keys.
    pub sinks: usize,
    /// SALE: Relative Attention Score threshold τ (0 = dense).
    pub tau: f32,
    /// SALE: estimation bits, 4 or 8.
    pub bits: u32,
    /// ProxyAttn: share γ of a head's attention its budget holds.
    pub gamma: f32,
    /// ProxyAttn: fewest keys a query block keeps (demo-sized default: the paper's 2048
    /// would keep everything of a 512-token prompt).
    pub min_budget: usize,
    /// ProxyAttn: query/key block (demo-sized default 64; the method's is 128).
    pub proxy_block: usize,
    /// ProxyAttn: proxy groups (must divide the KV heads).
    pub proxy_groups: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            method: "dense".into(),
            seq_len: 512,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 64,
            causal: true,
            dtype: "f32".into(),
            seed: 7,
            compare: true,
            block: 64,
            head: 0,
            twin: true,
            data: "structured".into(),
            theta: 5.0,
            anchor_block: 64,
            step: 2,
            init_keys: 128,
            window: 128,
            sinks: 4,
            tau: 0.004,
            bits: 4,
            gamma: 0.9,
            min_budget: 64,
            proxy_block: 64,
            proxy_groups: 1,
        }
    }
}

impl RunOptions {
    fn method(&self) -> Result<Method, String> {
        let m: Method = self.method.parse().map_err(|e| format!("{e}"))?;
        Ok(match m {
            Method::Anchor(_) => Method::Anchor(AnchorConfig {
                theta: self.theta,
                block: self.anchor_block,
                step: self.step,
                init_keys: self.init_keys,
            }),
            Method::Window(_) => Method::Window(WindowConfig {
                window: self.window,
                sinks: self.sinks,
            }),
            Method::Sale(c) => Method::Sale(SaleConfig {
                tau: self.tau,
                bits: self.bits,
                ..c
            }),
            Method::Proxy(c) => Method::Proxy(ProxyConfig {
                gamma: self.gamma,
                min_budget: self.min_budget,
                block: self.proxy_block,
                groups: self.proxy_groups,
                ..c
            }),
            m => m,
        })
    }
}

/// Host-measured time of one stage.
#[derive(Serialize)]
struct Stage {
    name: String,
    ms: f64,
    /// `host` (performance.now around an awaited step) or `gpu` (timestamp queries).
    clock: &'static str,
}

/// What one run reports (the JSON of [`RunResult::json`]).
#[derive(Serialize)]
pub(crate) struct Summary {
    backend: String,
    method: String,
    seq_len: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    dtype: String,
    seed: u64,
    /// Attention time: GPU timestamps where the adapter has them, else wall clock.
    attention_ms: f64,
    attention_timing: String,
    /// With `compare`: dense attention's time on the same inputs and device (the same
    /// clock as `attention_ms`).
    dense_ms: Option<f64>,
    total_ms: f64,
    stages: Vec<Stage>,
    density: f64,
    /// Attention-mass recall vs dense on the same device (1 for dense).
    recall: Option<f64>,
    /// Density, recall and output errors vs dense attention on the same device.
    quality: Option<Quality>,
    /// The method's parameters.
    config: Method,
    /// The keys computed for head 0 (query blocks × keys).
    pattern: Option<KeyPattern>,
    /// What the output was checked against: the same method on the WASM CPU path (a
    /// WebGPU run), or a naive f64 reference (a CPU run).
    reference: Option<String>,
    error: Option<ErrorStats>,
    checksum: f64,
    output_len: usize,
    nonfinite: usize,
    data: String,
}

/// The result of a run: `json` (the summary) and `output` (`[q_heads, seq_len, d]`).
#[wasm_bindgen]
pub struct RunResult {
    json: String,
    output: Vec<f32>,
}

#[wasm_bindgen]
impl RunResult {
    /// The summary as JSON.
    #[wasm_bindgen(getter)]
    pub fn json(&self) -> String {
        self.json.clone()
    }
    /// The attention output (a copy, as a Float32Array).
    #[wasm_bindgen(getter)]
    pub fn output(&self) -> Vec<f32> {
        self.output.clone()
    }
}

/// Problems up to this many query–key pairs × head_dim get the naive f64 reference on
/// the CPU path (a few hundred ms in WASM).
const NAIVE_BUDGET: f64 = 3e8;

/// Runs `plan` once more, returning its output and its final (m, l) per row.
async fn run_with_ml(
    ctx: &Context,
    plan: &AttentionPlan,
    shape: &AttentionShape,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dtype: DType,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let e = |x: wgsparse::Error| x.to_string();
    let mut out = Tensor::zeros(ctx, &shape.q_dims(), dtype).map_err(e)?;
    let ml = if plan.method().manages_state() {
        plan.run_async(q, k, v, &mut out, None).await.map_err(e)?;
        plan.row_stats()
            .await
            .map_err(e)?
            .ok_or("no row state kept")?
    } else {
        let mut st = RowState::empty(ctx, shape).map_err(e)?;
        plan.run_async(q, k, v, &mut out, Some(&mut st))
            .await
            .map_err(e)?;
        st.ml.to_f32().await.map_err(e)?
    };
    Ok((out.to_f32().await.map_err(e)?, ml))
}

/// Q/K/V a run is given instead of synthetic data (a model layer's, from the model
/// page's sparse-prefill view).
pub(crate) struct GivenQkv {
    pub shape: AttentionShape,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The model's attention scale.
    pub scale: f32,
    /// What they are, for the summary.
    pub label: String,
}

/// One run: its summary and its output.
async fn run(
    ctx: &Context,
    o: &RunOptions,
    given: Option<&GivenQkv>,
) -> Result<(Summary, Vec<f32>), String> {
    let t_all = clock::now_ms();
    let method = o.method()?;
    let dtype: DType = o.dtype.parse().map_err(|e| format!("{e}"))?;
    let shape = match given {
        Some(g) => g.shape,
        None => AttentionShape::new(o.q_heads, o.kv_heads, o.seq_len, o.head_dim),
    };
    shape.validate(o.causal).map_err(|e| e.to_string())?;
    if o.block == 0 || o.head >= shape.q_heads {
        return Err(format!(
            "block {} must be positive and head {} below {}",
            o.block, o.head, shape.q_heads
        ));
    }
    let mut stages = vec![];

    let t = clock::now_ms();
    let (qh, kh, vh, data) = match (given, o.data.as_str()) {
        (Some(g), _) => (g.q.clone(), g.k.clone(), g.v.clone(), g.label.as_str()),
        (None, "structured") => {
            let (q, k, v) = structured_qkv_host(&shape, &Structure::default(), o.seed);
            (
                q,
                k,
                v,
                "synthetic structured Q/K/V (sinks, local band, heavy columns, RoPE)",
            )
        }
        (None, "gaussian") => {
            let (q, k, v) = wgsparse::attention::synthetic::qkv_host(&shape, o.seed);
            (
                q,
                k,
                v,
                "synthetic Gaussian Q/K/V (fixed seed), not a model's activations",
            )
        }
        (None, other) => return Err(format!("data `{other}`: expected structured or gaussian")),
    };
    // Inputs as stored: every comparison below uses the same rounded values.
    let (qh, kh, vh) = (
        dtype.round_trip(&qh),
        dtype.round_trip(&kh),
        dtype.round_trip(&vh),
    );
    host_stage(&mut stages, "generate inputs", t);

    let t = clock::now_ms();
    let scale = given.map(|g| g.scale);
    let builder = |m: &Method| {
        let b = ctx
            .attention(shape)
            .method(m.clone())
            .causal(o.causal)
            .dtype(dtype);
        match scale {
            Some(s) => b.scale(s),
            None => b,
        }
    };
    let plan = builder(&method).build().map_err(|e| e.to_string())?;
    host_stage(&mut stages, "build plan (compile kernels)", t);

    let t = clock::now_ms();
    let (q, k, v) = upload_qkv(ctx, &shape, &qh, &kh, &vh, dtype).map_err(|e| e.to_string())?;
    let mut out =
        Tensor::filled(ctx, &shape.q_dims(), dtype, f32::NAN).map_err(|e| e.to_string())?;
    host_stage(&mut stages, "upload", t);

    let t = clock::now_ms();
    // With `compare`, the run keeps its final (m, l) for the quality measure: methods
    // that manage their own row state report it, the others get a state to fill.
    let mut state = match o.compare && !plan.method().manages_state() {
        true => Some(RowState::empty(ctx, &shape).map_err(|e| e.to_string())?),
        false => None,
    };
    plan.run_async(&q, &k, &v, &mut out, state.as_mut())
        .await
        .map_err(|e| e.to_string())?;
    host_stage(&mut stages, "attention (submit to done)", t);
    let report = plan.report().ok_or("the plan recorded no report")?;
    if report.timing.timing == "timestamp" {
        for s in &report.timing.stages {
            if let Some(ms) = s.ms {
                stages.push(Stage {
                    name: format!("kernel `{}` (GPU timestamps)", s.name),
                    ms,
                    clock: "gpu",
                });
            }
        }
    }

    let t = clock::now_ms();
    let output = out.to_f32().await.map_err(|e| e.to_string())?;
    host_stage(&mut stages, "readback", t);

    let t = clock::now_ms();
    let luts = plan
        .selected_pattern()
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let vis = Visibility::new(&method, &luts, o.causal);
    let pattern = Some(KeyPattern::build(&shape, &vis, o.head, o.block, 512));
    host_stage(&mut stages, "pattern", t);

    let (mut reference, mut error, mut quality, mut dense_ms) = (None, None, None, None);
    if o.compare {
        let t = clock::now_ms();
        let scale = plan.options().scale_for(&shape);
        let work = shape.pairs(o.causal) * shape.head_dim as f64;
        let (name, want) = if !ctx.is_cpu() && !o.twin {
            ("none (not asked)".to_string(), output.clone())
        } else if !ctx.is_cpu() {
            // The twin: the same method on the WASM CPU path, same inputs.
            let cpu = Context::cpu();
            let twin = cpu
                .attention(shape)
                .method(method.clone())
                .causal(o.causal)
                .dtype(DType::F32)
                .scale(scale)
                .build()
                .map_err(|e| e.to_string())?;
            let (q, k, v) =
                upload_qkv(&cpu, &shape, &qh, &kh, &vh, DType::F32).map_err(|e| e.to_string())?;
            let mut r =
                Tensor::zeros(&cpu, &shape.q_dims(), DType::F32).map_err(|e| e.to_string())?;
            twin.run_async(&q, &k, &v, &mut r, None)
                .await
                .map_err(|e| e.to_string())?;
            (
                format!("{}, WASM CPU path", method.name()),
                r.to_f32().await.map_err(|e| e.to_string())?,
            )
        } else if work <= NAIVE_BUDGET && method == Method::Dense {
            (
                "naive f64 attention, WASM".to_string(),
                naive_attention(&shape, o.causal, scale, &qh, &kh, &vh),
            )
        } else if work <= NAIVE_BUDGET {
            // Per head and row the keys the method reported, then plain softmax.
            let n = shape.seq_len;
            let rows: Vec<Vec<Vec<bool>>> = (0..shape.q_heads)
                .map(|h| (0..n).map(|r| vis.row_keys(h, r, n)).collect())
                .collect();
            (
                "naive f64 attention over the method's selected keys, WASM".to_string(),
                naive_masked_attention(&shape, scale, &qh, &kh, &vh, |h, r, j| rows[h][r][j]),
            )
        } else {
            (
                "none (problem too large for the naive reference)".to_string(),
                output.clone(),
            )
        };
        host_stage(&mut stages, "reference", t);
        reference = Some(name);
        error = Some(compare(&output, &want));

        // Quality against dense attention on this device.
        let t = clock::now_ms();
        let dense = builder(&Method::Dense).build().map_err(|e| e.to_string())?;
        let (dense_out, dense_ml) = run_with_ml(ctx, &dense, &shape, (&q, &k, &v), dtype).await?;
        dense_ms = dense.report().map(|r| r.ms());
        let m_ml = match &state {
            Some(st) => st.ml.to_f32().await.map_err(|e| e.to_string())?,
            None => plan
                .row_stats()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no row state kept")?,
        };
        quality = Some(Quality::measure(
            report.density,
            &output,
            &m_ml,
            &dense_out,
            &dense_ml,
        ));
        host_stage(&mut stages, "quality vs dense", t);
    }

    let summary = Summary {
        backend: ctx.backend().to_string(),
        method: method.name().into(),
        seq_len: shape.seq_len,
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        causal: o.causal,
        dtype: dtype.name().into(),
        seed: o.seed,
        attention_ms: report.ms(),
        attention_timing: report.timing.timing.clone(),
        dense_ms,
        total_ms: clock::now_ms() - t_all,
        stages,
        density: report.density,
        recall: quality.map(|q| q.attn_recall),
        quality,
        config: method.clone(),
        pattern,
        reference,
        error,
        checksum: output.iter().map(|&x| x as f64).sum(),
        output_len: output.len(),
        nonfinite: output.iter().filter(|x| !x.is_finite()).count(),
        data: data.into(),
    };
    Ok((summary, output))
}

/// Records a host-timed stage that started at `t0` (ms).
fn host_stage(stages: &mut Vec<Stage>, name: &str, t0: f64) {
    stages.push(Stage {
        name: name.into(),
        ms: clock::now_ms() - t0,
        clock: "host",
    });
}
