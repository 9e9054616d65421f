//! `wgsparse nll`: mean next-token negative log-likelihood of a model on a text.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::Result;

use crate::model::*;

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
/// Mean next-token NLL over the first tokens of a text.
pub fn run(a: &NllArgs) -> Result<()> {
    let (tok, dec) = load(&a.m)?;
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
