//! `wgsparse generate`: text generation with a real GGUF model (greedy, or sampled with
//! a temperature, top-k, top-p and a seed).

use std::io::Write;
use std::time::Instant;

use clap::Args;
use wgsparse::Result;

use crate::model::*;

#[derive(Args, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt, used as given (BOS first when the model wants one).
    #[arg(long)]
    prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Wrap the prompt in the model's chat format (one user turn).
    #[arg(long)]
    chat: bool,
    /// Print one JSON object instead of streaming: `text` (the continuation) and
    /// `tokens` (the generated ids).
    #[arg(long)]
    json: bool,
}

/// Generation, streamed to stdout.
pub fn run(a: &GenerateArgs) -> Result<()> {
    let mut sampler = a.sampling.sampler()?;
    let (tok, dec) = load(&a.m)?;
    let prompt = if a.chat {
        tok.chat_prompt(&a.prompt)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode_prompt(&prompt)?;
    let t0 = Instant::now();
    let mut text = wgsparse::model::tokenizer::TextStream::new(&tok);
    let out = dec.generate_with(&ids, a.tokens, &tok.stop_ids, &mut sampler, &mut |id| {
        if !a.json {
            print!("{}", text.push(id));
            let _ = std::io::stdout().flush();
        }
    })?;
    if a.json {
        let o = serde_json::json!({"text": tok.decode(&out)?, "tokens": out});
        println!("{o}");
        return Ok(());
    }
    println!();
    eprintln!(
        "{} prompt tokens, {} generated in {:.1} s",
        ids.len(),
        out.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
