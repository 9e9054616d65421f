//! A GGUF model (llama, qwen2 or gemma3 architecture) generating text greedily, with
//! its prefill attention on the best device and a sparse method if asked.
//!
//! ```text
//! bash scripts/fetch-models.sh smollm2
//! cargo run --release --example generate -- data/models/smollm2-135m-instruct-q4_1.gguf \
//!     "The capital of France is" [METHOD]
//! ```

use std::io::Write;

use wgsparse::model::decoder::Decoder;
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::{ModelTokenizer, TextStream};
use wgsparse::{Context, ContextOptions, Error, Method, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || Error::InvalidArgument("usage: generate MODEL.gguf PROMPT [METHOD]".into());
    let path = args.next().ok_or_else(usage)?;
    let prompt = args.next().ok_or_else(usage)?;
    let method: Method = args.next().as_deref().unwrap_or("dense").parse()?;

    let gguf = Gguf::open(std::path::Path::new(&path))?;
    let tok = ModelTokenizer::from_gguf(&gguf)?;
    // Attention on the best adapter (else the CPU); projections run on the CPU.
    let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
    let dec = Decoder::load(&gguf, &ctx, method)?;

    let ids = tok.encode_prompt(&prompt)?;
    // Print the text as it grows.
    let mut text = TextStream::new(&tok);
    print!("{prompt}");
    dec.generate(&ids, 24, &tok.stop_ids, &mut |id| {
        print!("{}", text.push(id));
        let _ = std::io::stdout().flush();
    })?;
    println!();
    let new = text.ids().len();
    eprintln!(
        "{} prompt tokens, {new} generated, attention on {}",
        ids.len(),
        ctx.backend()
    );
    if new == 0 {
        return Err(Error::Mismatch("no token generated".into()));
    }
    Ok(())
}
