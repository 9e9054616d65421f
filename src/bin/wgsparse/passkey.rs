//! `wgsparse passkey`: passkey retrieval at a long context, per prompt attention method
//! (a five-digit number hidden at several depths of a novel; the model asked to repeat it).

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use wgsparse::model::engine::Engine;
use wgsparse::model::passkey::{PasskeyRun, passkey_found, passkey_prompt};
use wgsparse::model::sample::Sampler;
use wgsparse::{Error, Method, Result};

use crate::model::*;

#[derive(Args, Clone)]
pub struct PasskeyArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The filler text (UTF-8; its start is used).
    #[arg(long)]
    text: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Depths of the key in the filler (0 = its start, 1 = its end), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
    depths: Vec<f64>,
    /// Prompt attention methods, comma-separated (`--method` is ignored; `--thresholds`
    /// applies to `sale`).
    #[arg(long, value_delimiter = ',', default_value = "dense")]
    methods: Vec<Method>,
    /// Tokens generated after the question (greedy).
    #[arg(long, default_value_t = 8)]
    r#gen: usize,
    /// Seed of the keys (one per depth, the same for every method).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Success per method, and every run.
#[derive(Serialize)]
pub struct PasskeyReport {
    model: String,
    engine: String,
    backend: String,
    tokens: usize,
    /// (method, found, runs).
    success: Vec<(String, usize, usize)>,
    runs: Vec<PasskeyRun>,
}

impl fmt::Display for PasskeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "passkey retrieval, {} tokens, {}: {} decoder on {}",
            self.tokens, self.model, self.engine, self.backend
        )?;
        writeln!(
            f,
            "{:<24} {:>6} {:>7} {:>6} {:>8}  answer",
            "method", "depth", "key", "found", "s"
        )?;
        for r in &self.runs {
            writeln!(
                f,
                "{:<24} {:>6.2} {:>7} {:>6} {:>8.1}  {:?}",
                r.method,
                r.depth,
                format!("{:05}", r.key),
                r.found,
                r.seconds,
                r.answer
            )?;
        }
        for (m, ok, n) in &self.success {
            writeln!(f, "{m}: {ok} / {n}")?;
        }
        Ok(())
    }
}

/// `wgsparse passkey`.
pub fn run(a: &PasskeyArgs) -> Result<()> {
    if a.methods.is_empty() || a.depths.is_empty() {
        return Err(Error::InvalidArgument("no method or no depth".into()));
    }
    let filler = std::fs::read_to_string(&a.text)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let keys: Vec<u32> = a
        .depths
        .iter()
        .map(|_| rng.random_range(10_000..100_000))
        .collect();
    let mut runs = Vec::new();
    let mut success = Vec::new();
    // Loaded once (`--method`, `--thresholds` and `--budgets` are applied per method
    // below).
    let m_args = ModelArgs {
        method: Method::Dense,
        thresholds: None,
        budgets: None,
        ..a.m.clone()
    };
    let (tok, mut dec) = load(&m_args)?;
    for method in &a.methods {
        let thresholds =
            a.m.thresholds
                .as_ref()
                .filter(|_| matches!(method, Method::Sale(_)));
        let budgets =
            a.m.budgets
                .as_ref()
                .filter(|_| matches!(method, Method::Proxy(_)));
        dec.set_methods(method.clone(), layer_methods(method, thresholds, budgets)?);
        let label = match (thresholds, budgets) {
            (Some(_), _) => format!("{method} (calibrated)"),
            (_, Some(_)) => format!("{method} (budgets file)"),
            _ => method.to_string(),
        };
        let mut found = 0;
        for (&depth, &key) in a.depths.iter().zip(&keys) {
            let ids = passkey_prompt(&tok, &filler, a.tokens, depth, key)?;
            let t0 = Instant::now();
            let out = generate(&dec, &ids, a.r#gen, &tok.stop_ids)?;
            let answer = tok.decode(&out)?;
            let ok = passkey_found(&answer, key);
            found += ok as usize;
            eprintln!("{label} depth {depth}: key {key:05}, answer {answer:?} ({ok})");
            runs.push(PasskeyRun {
                method: label.clone(),
                depth,
                key,
                answer,
                found: ok,
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        success.push((label, found, a.depths.len()));
    }
    let report = PasskeyReport {
        model: a.m.model.display().to_string(),
        engine: dec.kind().to_string(),
        backend: dec.context().backend().to_string(),
        tokens: a.tokens,
        success,
        runs,
    };
    crate::report::emit(&report, a.json);
    Ok(())
}

fn generate(dec: &Engine, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>> {
    dec.generate_with(ids, n, stop, &mut Sampler::greedy(), &mut |_| {})
}
