//! The real-model subcommands of the CLI: `generate`, `nll` and `dump-qkv`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::model::decoder::Decoder;
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::ModelTokenizer;
use wgsparse::qkv_file::QkvFile;
use wgsparse::{AttentionShape, Backend, Context, ContextOptions, DType, Error, Method, Result};

/// Options shared by the model commands.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file (llama, qwen2 or gemma3; see scripts/fetch-models.sh).
    #[arg(long)]
    model: PathBuf,
    /// Attention method of the prefill.
    #[arg(long, default_value = "dense")]
    method: Method,
    /// Where attention runs: auto, vulkan, metal, dx12, gl or cpu (default cpu; also
    /// WGSPARSE_BACKEND). Projections run on the CPU either way.
    #[arg(long)]
    backend: Option<Backend>,
}

/// `wgsparse generate`.
#[derive(Args, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt, used as given (BOS first when the model wants one).
    #[arg(long)]
    prompt: String,
    /// New tokens at most (greedy).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Wrap the prompt in the model's chat format (one user turn).
    #[arg(long)]
    chat: bool,
}

/// `wgsparse nll`.
#[derive(Args, Clone)]
pub struct NllArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Tokens from the start of the text (BOS included when the model wants one).
    #[arg(long, default_value_t = 512)]
    tokens: usize,
}

/// `wgsparse dump-qkv`.
#[derive(Args, Clone)]
pub struct DumpArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Tokens from the start of the text (BOS included when the model wants one).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Layers to dump, comma-separated (e.g. 0,7,15).
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Output folder: one `<model>_L<layer>_T<tokens>.safetensors` per layer.
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of the files: f16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: DType,
}

fn context(b: Option<Backend>) -> Result<Context> {
    let mut o = ContextOptions::from_env()?;
    o.backend = b.unwrap_or(if std::env::var("WGSPARSE_BACKEND").is_ok() {
        o.backend
    } else {
        Backend::Cpu
    });
    Context::new_blocking(o)
}

fn load(m: &ModelArgs) -> Result<(Gguf, ModelTokenizer, Decoder)> {
    let t0 = Instant::now();
    let g = Gguf::open(&m.model)?;
    let tok = ModelTokenizer::from_gguf(&g)?;
    let ctx = context(m.backend)?;
    let dec = Decoder::load(&g, &ctx, m.method.clone())?;
    eprintln!(
        "loaded {} ({:?}, {} layers, attention on {}) in {:.1} s",
        m.model.display(),
        dec.cfg.arch,
        dec.cfg.n_layer,
        ctx.backend(),
        t0.elapsed().as_secs_f64()
    );
    Ok((g, tok, dec))
}

fn text_ids(tok: &ModelTokenizer, path: &PathBuf, n: usize) -> Result<Vec<u32>> {
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

/// Greedy generation, streamed to stdout.
pub fn generate(a: &GenerateArgs) -> Result<()> {
    let (_, tok, dec) = load(&a.m)?;
    let prompt = if a.chat {
        tok.chat_prompt(&a.prompt)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode_prompt(&prompt)?;
    let t0 = Instant::now();
    let mut shown = String::new();
    let mut all = Vec::new();
    let out = dec.generate(&ids, a.tokens, &tok.stop_ids, &mut |id| {
        all.push(id);
        if let Ok(s) = tok.decode(&all) {
            if let Some(new) = s.strip_prefix(shown.as_str()) {
                print!("{new}");
                let _ = std::io::stdout().flush();
            }
            shown = s;
        }
    })?;
    println!();
    eprintln!(
        "{} prompt tokens, {} generated in {:.1} s",
        ids.len(),
        out.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Mean next-token NLL over the first tokens of a text.
pub fn nll(a: &NllArgs) -> Result<()> {
    let (_, tok, dec) = load(&a.m)?;
    let ids = text_ids(&tok, &a.text, a.tokens)?;
    let t0 = Instant::now();
    let (nll, n) = dec.nll(&ids)?;
    println!(
        "nll {nll:.4} nats/token (ppl {:.2}) over {n} predictions of {} tokens of {}, method {}, {:.1} s",
        nll.exp(),
        ids.len(),
        a.text.display(),
        a.m.method.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prefill over a text, writing the chosen layers' post-RoPE Q/K/V as Q/K/V files.
pub fn dump_qkv(a: &DumpArgs) -> Result<()> {
    let (_, tok, dec) = load(&a.m)?;
    let c = dec.cfg.clone();
    if let Some(&bad) = a.layers.iter().find(|&&l| l >= c.n_layer) {
        return Err(Error::InvalidArgument(format!(
            "layer {bad} does not exist ({} layers)",
            c.n_layer
        )));
    }
    let ids = text_ids(&tok, &a.text, a.tokens)?;
    std::fs::create_dir_all(&a.out)?;
    let stem =
        a.m.model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
    let text_name = a
        .text
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let last = *a.layers.iter().max().expect("required");
    let t0 = Instant::now();
    let mut cache = dec.new_cache();
    // Stop the forward pass after the last dumped layer: the rest is not needed.
    let stop = "done: every asked layer is written";
    let r = dec.forward(&ids, &mut cache, &mut |l| {
        if a.layers.contains(&l.layer) {
            let mut meta = HashMap::new();
            meta.insert("source".to_string(), "real".to_string());
            meta.insert("model".to_string(), stem.clone());
            meta.insert("layer".to_string(), l.layer.to_string());
            meta.insert("text".to_string(), text_name.clone());
            meta.insert("tokens".to_string(), ids.len().to_string());
            meta.insert(
                "window".to_string(),
                match (l.global, c.window) {
                    (false, Some(w)) => w.to_string(),
                    _ => "none".into(),
                },
            );
            let f = QkvFile {
                shape: AttentionShape::new(c.n_head, c.n_kv_head, l.tokens, c.head_dim),
                q: l.q.to_vec(),
                k: l.k.to_vec(),
                v: l.v.to_vec(),
                meta,
            };
            let path = a
                .out
                .join(format!("{stem}_L{}_T{}.safetensors", l.layer, ids.len()));
            f.save(&path, a.dtype)?;
            eprintln!(
                "wrote {} (q [{}, {}, {}], k/v [{}, {}, {}], {}, {:.1} s)",
                path.display(),
                c.n_head,
                l.tokens,
                c.head_dim,
                c.n_kv_head,
                l.tokens,
                c.head_dim,
                if l.global { "global" } else { "sliding window" },
                t0.elapsed().as_secs_f64()
            );
        }
        if l.layer == last {
            return Err(Error::InvalidArgument(stop.into()));
        }
        Ok(())
    });
    match r {
        Err(Error::InvalidArgument(m)) if m == stop => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}
