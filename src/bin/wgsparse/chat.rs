//! `wgsparse chat`: a conversation read from stdin, one user message per line; the KV
//! cache is kept from turn to turn, so each turn prefills only what its transcript adds.

use std::io::{BufRead, Write};
use std::time::Instant;

use clap::Args;
use wgsparse::Result;

use crate::model::*;

#[derive(Args, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// New tokens at most per reply.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Room of the conversation's KV cache in tokens (the GPU decoder reserves it).
    #[arg(long, default_value_t = 4096)]
    context: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// The conversation: each reply on its own line of stdout; per turn, on stderr, the
/// tokens prefilled (the new ones only) and the time.
pub fn run(a: &ChatArgs) -> Result<()> {
    let mut sampler = a.sampling.sampler()?;
    let (tok, dec) = load(&a.m)?;
    let mut session = dec.new_session(a.context)?;
    let mut turns: Vec<(String, Option<String>)> = Vec::new();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        turns.push((line, None));
        let prompt = tok.encode_prompt(&tok.chat_transcript(&turns)?)?;
        let t0 = Instant::now();
        let mut text = wgsparse::model::tokenizer::TextStream::new(&tok);
        let (out, prefilled) = dec.reply(
            &mut session,
            &prompt,
            a.tokens,
            &tok.stop_ids,
            &mut sampler,
            &mut |id| {
                print!("{}", text.push(id));
                let _ = std::io::stdout().flush();
            },
        )?;
        println!();
        let reply: Vec<u32> = out
            .iter()
            .copied()
            .filter(|id| !tok.stop_ids.contains(id))
            .collect();
        eprintln!(
            "[turn {}: {prefilled} of {} prompt tokens prefilled, {} generated, {:.2} s]",
            turns.len(),
            prompt.len(),
            out.len(),
            t0.elapsed().as_secs_f64()
        );
        if let Some(last) = turns.last_mut() {
            last.1 = Some(tok.decode(&reply)?);
        }
    }
    Ok(())
}
