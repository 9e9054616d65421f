//! `wgsparse bench-model`: prefill and decode throughput of a GGUF model, time to first
//! token and peak memory, per prompt length.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::model::bench::{ModelBench, bench_engine};
use wgsparse::{Error, Result};

use crate::model::*;
use crate::progress::Progress;
use wgsparse::model::engine::Engine;

#[derive(Args, Clone)]
pub struct BenchModelArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt lengths in tokens (comma-separated): one prefill-then-decode run each.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prompt_tokens: Vec<usize>,
    /// Tokens decoded after each prompt (greedy, every one counted).
    #[arg(long, default_value_t = 32)]
    r#gen: usize,
    /// Take the prompts from the start of this text; without it they are random token
    /// ids (seeded), as llama.cpp's llama-bench uses.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// `wgsparse bench-model`.
pub fn run(a: &BenchModelArgs) -> Result<()> {
    let t0 = Instant::now();
    let (tok, dec) = load(&a.m)?;
    let load_s = t0.elapsed().as_secs_f64();
    let progress = Progress::new(a.prompt_tokens.len() as u64, "bench-model", a.json);
    if a.prompt_tokens.is_empty() {
        return Err(Error::InvalidArgument(
            "--prompt-tokens lists no length".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(1);
    let mut runs = Vec::new();
    for &n in &a.prompt_tokens {
        let prompt = match &a.text {
            Some(t) => text_ids(&tok, t, n)?,
            None => (0..n)
                .map(|_| rng.random_range(0..dec.cfg().vocab as u32))
                .collect(),
        };
        let r = bench_engine(&dec, &prompt, a.r#gen, &mut |_| {})?;
        progress.step(&format!(
            "{n} prompt tokens: prefill {:.2} tok/s, decode {:.2} tok/s",
            r.prefill_tok_s, r.decode_tok_s
        ));
        runs.push(r);
    }
    progress.finish();
    let report = ModelBench {
        model: a.m.model.display().to_string(),
        backend: dec.context().backend().to_string(),
        engine: dec.kind().to_string(),
        method: a.m.method.name().to_string(),
        threads: rayon::current_num_threads(),
        file_bytes: std::fs::metadata(&a.m.model)?.len(),
        weight_bytes: dec.weight_bytes(),
        load_s,
        expert_bytes: match &dec {
            Engine::Cpu(d) => d.expert_residency().2,
            Engine::Gpu(_) => 0,
        },
        expert_cap_bytes: a.m.max_resident_mb.map(|mb| mb << 20),
        first: runs[0].clone(),
        runs,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        print!("{report}");
    }
    Ok(())
}
