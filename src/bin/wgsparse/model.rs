//! What the model subcommands share: the model flags, the context, loading a GGUF with
//! its tokenizer, and the token ids of a text.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::model::decoder::{Decoder, KvPrecision};
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::ModelTokenizer;
use wgsparse::{Backend, Error, Method, Result};

/// Options shared by the model commands.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file (llama, qwen2 or gemma3; see scripts/fetch-models.sh).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Attention method of the prefill.
    #[arg(long, default_value = "dense")]
    pub(crate) method: Method,
    /// Where attention runs: auto, vulkan, metal, dx12, gl or cpu (default cpu; also
    /// WGSPARSE_BACKEND). Projections run on the CPU either way.
    #[arg(long)]
    pub(crate) backend: Option<Backend>,
    /// The decoder's oracle form: f32 activations in the projections (instead of
    /// integer products on 16-bit activations) and an f32 KV cache (instead of f16).
    #[arg(long)]
    pub(crate) exact: bool,
    /// MoE models read from a file: keep at most this many MiB of routed expert weights
    /// in memory (least recently routed dropped first; experts are memory-mapped and
    /// only routed ones are touched either way).
    #[arg(long)]
    pub(crate) max_resident_mb: Option<u64>,
}

/// `wgsparse generate`.
pub fn load(m: &ModelArgs) -> Result<(ModelTokenizer, Decoder)> {
    let t0 = Instant::now();
    let mut g = Gguf::open(&m.model)?;
    let tok = ModelTokenizer::from_gguf(&g)?;
    // The vocabulary's metadata (strings, scores, merges: tens of MiB for a 262k-token
    // vocabulary) is the tokenizer's now: free it before the weights are read.
    g.metadata.retain(|k, _| !k.starts_with("tokenizer.ggml."));
    wgsparse::runtime::threads::release_free_memory();
    let ctx = crate::device::context_or(m.backend, Backend::Cpu)?;
    let mut dec = Decoder::load(&g, &ctx, m.method.clone())?;
    if m.exact {
        dec.f32_activations = true;
        dec.kv_precision = KvPrecision::F32;
    }
    dec.set_max_resident_experts(m.max_resident_mb.map(|mb| mb << 20));
    eprintln!(
        "loaded {} ({:?}, {} layers, attention on {}) in {:.1} s",
        m.model.display(),
        dec.cfg.arch,
        dec.cfg.n_layer,
        ctx.backend(),
        t0.elapsed().as_secs_f64()
    );
    // The GGUF's metadata (the vocabulary's strings, the merges) is no longer needed:
    // free it and hand the heap's free pages back to the system.
    drop(g);
    wgsparse::runtime::threads::release_free_memory();
    Ok((tok, dec))
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
