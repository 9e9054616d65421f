//! `wgsparse dump-qkv`: real post-RoPE Q/K/V of chosen layers over a text, as Q/K/V files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::attention::qkv_file::QkvFile;
use wgsparse::{AttentionShape, DType, Error, Result};

use crate::model::*;

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

/// Prefill over a text, writing the chosen layers' post-RoPE Q/K/V as Q/K/V files.
pub fn run(a: &DumpArgs) -> Result<()> {
    let (tok, dec) = load_decoder(&a.m)?;
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
    let progress = crate::progress::Progress::new(a.layers.len() as u64, "dump-qkv", false);
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
            progress.step(&format!(
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
            ));
        }
        if l.layer == last {
            return Err(Error::InvalidArgument(stop.into()));
        }
        Ok(())
    });
    progress.finish();
    match r {
        Err(Error::InvalidArgument(m)) if m == stop => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}
