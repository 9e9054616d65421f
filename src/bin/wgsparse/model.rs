//! What the model subcommands share: the model flags, the context, loading a GGUF with
//! its tokenizer, and the token ids of a text.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::model::decoder::{Decoder, KvPrecision};
use wgsparse::model::engine::{Engine, EngineKind};
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::ModelTokenizer;
use wgsparse::{Backend, Error, Method, Result};

/// Options shared by the model commands.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file (llama, qwen2, gemma3 or smallthinker; see scripts/fetch-models.sh
    /// and `wgsparse synth-gguf`).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Attention method of the prefill.
    #[arg(long, default_value = "dense")]
    pub(crate) method: Method,
    /// The device: auto (the best GPU, else the CPU), vulkan, metal, dx12, gl or cpu
    /// (default cpu; also WGSPARSE_BACKEND). On a GPU the whole model runs there (the
    /// GPU decoder) unless `--engine cpu` keeps the projections on the CPU.
    #[arg(long)]
    pub(crate) backend: Option<Backend>,
    /// The decoder: auto (the GPU decoder on a GPU backend, the CPU decoder on the CPU
    /// or with `--exact` / `--max-resident-mb`), cpu (projections on the CPU, attention
    /// on the backend) or gpu.
    #[arg(long, default_value = "auto")]
    pub(crate) engine: EngineKind,
    /// SALE: calibrated per-head thresholds (`wgsparse calibrate`) for the layers the
    /// file holds (`--method sale` sets the other parameters).
    #[arg(long)]
    pub(crate) thresholds: Option<PathBuf>,
    /// ProxyAttn or SALE: fixed per-head budgets (`wgsparse budget`) for the layers the
    /// file holds, instead of ProxyAttn's per-prompt budgets or SALE's threshold
    /// (`--method proxy|sale` sets the other parameters).
    #[arg(long, conflicts_with = "thresholds")]
    pub(crate) budgets: Option<PathBuf>,
    /// The decoder's oracle form: f32 activations in the projections (instead of
    /// integer products on 16-bit activations) and an f32 KV cache (instead of f16).
    #[arg(long)]
    pub(crate) exact: bool,
    /// MoE models read from a file: keep at most this many MiB of routed expert weights
    /// in memory (least recently routed dropped first; experts are memory-mapped and
    /// only routed ones are touched either way).
    #[arg(long)]
    pub(crate) max_resident_mb: Option<u64>,
    /// GPU decoder: prompt tokens per prefill chunk. Default: with a sparse prompt
    /// method, the longest chunk the device's storage bindings allow (chunks after the
    /// first attend densely over the KV cache); dense, at most 8,192. Lower it where a
    /// long prompt's activations do not fit GPU memory.
    #[arg(long)]
    pub(crate) prefill_chunk: Option<usize>,
}

/// The per-layer methods of calibrated SALE `thresholds` or per-head `budgets` on
/// `method` (which must be SALE, resp. ProxyAttn or SALE; none without either file).
pub fn layer_methods(
    method: &Method,
    thresholds: Option<&PathBuf>,
    budgets: Option<&PathBuf>,
) -> Result<std::collections::HashMap<usize, Method>> {
    if let Some(path) = budgets {
        let b = wgsparse::attention::budgets::HeadBudgets::load(path)?;
        return Ok(b.methods(method)?.into_iter().collect());
    }
    let Some(path) = thresholds else {
        return Ok(Default::default());
    };
    let Method::Sale(base) = method else {
        return Err(Error::InvalidArgument(
            "--thresholds needs --method sale".into(),
        ));
    };
    let t = wgsparse::attention::select::sale_calibrate::SaleThresholds::load(path)?;
    Ok(t.methods(base).into_iter().collect())
}

/// How the generating commands choose tokens.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the smallest set of most likely tokens reaching this probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (the same seed replays a generation).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// The sampler these flags describe.
    pub fn sampler(&self) -> Result<wgsparse::model::sample::Sampler> {
        wgsparse::model::sample::Sampler::new(wgsparse::model::sample::SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// The model on the engine `--engine` and `--backend` ask for.
pub fn load(m: &ModelArgs) -> Result<(ModelTokenizer, Engine)> {
    load_on(m, m.engine)
}

/// The model on the CPU decoder (attention on `--backend`): the commands that observe
/// its layers.
pub fn load_decoder(m: &ModelArgs) -> Result<(ModelTokenizer, Decoder)> {
    match load_on(m, EngineKind::Cpu)? {
        (tok, Engine::Cpu(d)) => Ok((tok, d)),
        _ => unreachable!("the CPU engine was asked"),
    }
}

fn load_on(m: &ModelArgs, kind: EngineKind) -> Result<(ModelTokenizer, Engine)> {
    let t0 = Instant::now();
    let mut g = Gguf::open(&m.model)?;
    let tok = ModelTokenizer::from_gguf(&g)?;
    // The vocabulary's metadata (strings, scores, merges: tens of MiB for a 262k-token
    // vocabulary) is the tokenizer's now: free it before the weights are read.
    g.metadata.retain(|k, _| !k.starts_with("tokenizer.ggml."));
    wgsparse::runtime::threads::release_free_memory();
    let ctx = crate::device::context_or(m.backend, Backend::Cpu)?;
    // The options only the CPU decoder has choose it where the engine is left to choose.
    let kind = match kind {
        EngineKind::Auto if m.exact || m.max_resident_mb.is_some() => EngineKind::Cpu,
        k => k,
    };
    let mut dec = Engine::load(&g, &ctx, m.method.clone(), kind)?;
    dec.set_methods(
        m.method.clone(),
        layer_methods(&m.method, m.thresholds.as_ref(), m.budgets.as_ref())?,
    );
    match &mut dec {
        Engine::Cpu(d) => {
            if m.exact {
                d.f32_activations = true;
                d.kv_precision = KvPrecision::F32;
            }
            d.set_max_resident_experts(m.max_resident_mb.map(|mb| mb << 20));
        }
        Engine::Gpu(_) if m.exact || m.max_resident_mb.is_some() => {
            return Err(Error::InvalidArgument(
                "--exact and --max-resident-mb are CPU decoder options (--engine cpu)".into(),
            ));
        }
        Engine::Gpu(d) => d.prefill_chunk = m.prefill_chunk,
    }
    match (m.prefill_chunk, &dec) {
        (Some(0), _) => {
            return Err(Error::InvalidArgument(
                "--prefill-chunk must be at least 1 token".into(),
            ));
        }
        (Some(_), Engine::Cpu(_)) => {
            return Err(Error::InvalidArgument(
                "--prefill-chunk is a GPU decoder option (the CPU decoder prefills a prompt \
                 at once)"
                    .into(),
            ));
        }
        _ => {}
    }
    let (cfg, engine) = (dec.cfg(), dec.kind());
    eprintln!(
        "loaded {} ({:?}, {} layers, {engine} decoder on {}) in {:.1} s",
        m.model.display(),
        cfg.arch,
        cfg.n_layer,
        ctx.backend(),
        t0.elapsed().as_secs_f64()
    );
    // The GGUF's metadata (the vocabulary's strings, the merges) is no longer needed:
    // free it and hand the heap's free pages back to the system.
    drop(g);
    wgsparse::runtime::threads::release_free_memory();
    Ok((tok, dec))
}

/// The first `n` tokens of a calibration text for `dec`'s model (within its context),
/// and the text's file name (what a calibration file records).
pub fn calibration_ids(
    tok: &ModelTokenizer,
    dec: &Decoder,
    path: &PathBuf,
    n: usize,
) -> Result<(Vec<u32>, String)> {
    if n > dec.cfg.ctx_len {
        return Err(Error::InvalidArgument(format!(
            "{n} tokens exceed the model's {}-token context",
            dec.cfg.ctx_len
        )));
    }
    Ok((text_ids(tok, path, n)?, file_name(path)))
}

/// A path's file name (empty when it has none).
pub fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn text_ids(tok: &ModelTokenizer, path: &PathBuf, n: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)?;
    // Enough characters for n tokens (≥ 2 chars per token in prose), then cut.
    let cut: String = text.chars().take(n.saturating_mul(8) + 64).collect();
    let mut ids = tok.encode_prompt(&cut)?;
    if ids.len() < n {
        return Err(Error::InvalidArgument(format!(
            "{} holds only {} tokens, {n} asked",
            path.display(),
            ids.len()
        )));
    }
    ids.truncate(n);
    Ok(ids)
}
