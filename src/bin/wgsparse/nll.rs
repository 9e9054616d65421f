//! `wgsparse nll`: mean next-token negative log-likelihood of a model on a text.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
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
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// What `wgsparse nll` measured.
#[derive(Serialize)]
pub struct NllReport {
    model: String,
    text: String,
    /// `cpu` or `gpu`: the decoder that ran.
    engine: String,
    backend: String,
    /// The prompt method (per-layer files, where given, override it in their layers).
    method: String,
    /// Calibrated thresholds or a budgets file applied per layer.
    per_layer_file: Option<String>,
    tokens: usize,
    predictions: usize,
    /// Mean next-token negative log-likelihood, nats per token.
    nll: f64,
    perplexity: f64,
    seconds: f64,
}

impl fmt::Display for NllReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nll {:.4} nats/token (ppl {:.2}) over {} predictions of {} tokens of {}, method {}{}, \
             {} decoder on {}, {:.1} s",
            self.nll,
            self.perplexity,
            self.predictions,
            self.tokens,
            self.text,
            self.method,
            self.per_layer_file
                .as_ref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            self.engine,
            self.backend,
            self.seconds
        )
    }
}

/// `wgsparse nll`: the mean next-token NLL over the first tokens of a text.
pub fn run(a: &NllArgs) -> Result<()> {
    let (tok, dec) = load(&a.m)?;
    let ids = text_ids(&tok, &a.text, a.tokens)?;
    let t0 = Instant::now();
    let (nll, n) = dec.nll(&ids)?;
    let report = NllReport {
        model: a.m.model.display().to_string(),
        text: a.text.display().to_string(),
        engine: dec.kind().to_string(),
        backend: dec.context().backend().to_string(),
        method: a.m.method.to_string(),
        per_layer_file: a
            .m
            .thresholds
            .as_ref()
            .or(a.m.budgets.as_ref())
            .map(|p| p.display().to_string()),
        tokens: ids.len(),
        predictions: n,
        nll,
        perplexity: nll.exp(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    crate::report::emit(&report, a.json);
    Ok(())
}
