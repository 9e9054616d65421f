//! Model throughput, measured the way a user meets it: a prompt prefilled from an empty
//! KV cache (time to first token includes the first logits), then greedy decoding of
//! new tokens one at a time against that cache. [`bench_decoder`] runs one measurement;
//! [`ModelBench`] is the report of `wgsparse bench-model` (one [`BenchRun`] per prompt
//! length).

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::decoder::{Decoder, argmax};
use crate::model::engine::Engine;
use crate::model::gpu::GpuDecoder;
use crate::runtime::recorder::Report;

/// One prompt length's figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRun {
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    pub gen_tokens: usize,
    /// Prefill throughput: prompt tokens per second of the prefill forward pass.
    pub prefill_tok_s: f64,
    /// Time to first token: the prefill and the first token's logits, in milliseconds.
    pub ttft_ms: f64,
    /// Decode throughput: new tokens per second (one forward pass and the logits of
    /// each), with the context growing from the prompt length.
    pub decode_tok_s: f64,
    /// The most GPU buffer memory live during the run (the runtime records wgpu-hal's
    /// count after every buffer it creates: the GPU decoder's weights, KV cache and
    /// activations, or the CPU decoder's attention buffers); `None` on the CPU backend.
    pub peak_gpu_bytes: Option<u64>,
    /// The process's peak resident memory so far (the high-water mark, which includes
    /// loading the model).
    pub peak_host_bytes: u64,
    /// MoE models with mapped experts: the most bytes of expert weights the decoder
    /// kept resident during the run (0 for dense models).
    pub peak_expert_bytes: u64,
    /// MoE models with ReGLU experts: the fraction of routed experts' up rows the decode
    /// steps skipped (gate off: not read); `None` for dense models.
    pub decode_up_rows_skipped: Option<f64>,
    /// The GPU decoder: the share of the prefill's GPU time spent in attention (the
    /// attention stages over all stages, from timestamps); `None` without timestamps or
    /// on the CPU decoder.
    pub prefill_attention_share: Option<f64>,
}

/// `wgsparse bench-model`'s report.
#[derive(Clone, Debug, Serialize)]
pub struct ModelBench {
    /// The model file.
    pub model: String,
    /// The device of the run's context (`cpu`, `vulkan`, ...).
    pub backend: String,
    /// The decoder: `cpu` (projections on the CPU, attention on the backend) or `gpu`
    /// (the whole forward pass on the backend).
    pub engine: String,
    /// The prefill's attention method.
    pub method: String,
    /// CPU threads of the projections.
    pub threads: usize,
    /// The GGUF file's size in bytes.
    pub file_bytes: u64,
    /// Bytes of the weights as the decoder holds them.
    pub weight_bytes: u64,
    /// Seconds to load the model.
    pub load_s: f64,
    /// Bytes of all expert weights (MoE models; 0 for dense ones).
    pub expert_bytes: u64,
    /// The cap on resident expert weights (`--max-resident-mb`), if any.
    pub expert_cap_bytes: Option<u64>,
    /// The first prompt length's figures, also at the report's top level in JSON
    /// (`prefill_tok_s`, `decode_tok_s`, `ttft_ms`, `peak_gpu_bytes`,
    /// `peak_host_bytes`, ...), where a consumer of one run reads them.
    #[serde(flatten)]
    pub first: BenchRun,
    /// One run per prompt length, in the order asked (the first one included).
    pub runs: Vec<BenchRun>,
}

impl fmt::Display for ModelBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} decoder on {}, method {}, {} threads; file {:.1} MiB, weights held {:.1} MiB, loaded in {:.1} s",
            self.model,
            self.engine,
            self.backend,
            self.method,
            self.threads,
            mib(self.file_bytes),
            mib(self.weight_bytes),
            self.load_s
        )?;
        if self.expert_bytes > 0 {
            writeln!(
                f,
                "experts: {:.1} MiB in all, resident at most {}",
                mib(self.expert_bytes),
                self.expert_cap_bytes
                    .map_or("(no cap)".to_string(), |b| format!("{:.1} MiB", mib(b)))
            )?;
        }
        writeln!(
            f,
            "{:>8} {:>6} {:>12} {:>10} {:>11} {:>14} {:>14}",
            "prompt",
            "gen",
            "prefill t/s",
            "ttft ms",
            "decode t/s",
            "peak host MiB",
            "peak GPU MiB"
        )?;
        for r in &self.runs {
            writeln!(
                f,
                "{:>8} {:>6} {:>12.2} {:>10.1} {:>11.2} {:>14.1} {:>14}",
                r.prompt_tokens,
                r.gen_tokens,
                r.prefill_tok_s,
                r.ttft_ms,
                r.decode_tok_s,
                mib(r.peak_host_bytes),
                r.peak_gpu_bytes
                    .map_or("-".to_string(), |b| format!("{:.1}", mib(b)))
            )?;
        }
        let percents = |pick: fn(&BenchRun) -> Option<f64>| -> Option<String> {
            let v: Vec<String> = self
                .runs
                .iter()
                .filter_map(pick)
                .map(|s| format!("{:.1} %", 100.0 * s))
                .collect();
            (!v.is_empty()).then(|| v.join(", "))
        };
        if let Some(s) = percents(|r| r.prefill_attention_share) {
            writeln!(f, "attention's share of the prefill GPU time: {s}")?;
        }
        if let Some(s) = percents(|r| r.decode_up_rows_skipped) {
            writeln!(
                f,
                "ReGLU neuron skipping: routed up rows not read while decoding: {s}"
            )?;
        }
        Ok(())
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// The process's peak resident memory in bytes (0 where the platform does not say).
pub fn peak_host_bytes() -> u64 {
    #[cfg(unix)]
    {
        let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole rusage into the pointer it is given.
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } == 0;
        if ok {
            // SAFETY: initialized by the successful call above.
            let kb = unsafe { u.assume_init() }.ru_maxrss.max(0) as u64;
            return kb * 1024;
        }
    }
    0
}

/// The times of one measured run.
struct Timing {
    prefill_s: f64,
    ttft_s: f64,
    decode_s: f64,
}

/// Checks a benchmark's request (a prompt, within the model's `ctx_len`), then times it
/// on the decoder's state `cache`: `prefill` runs the prompt and returns the first token
/// with the instant its forward pass ended (before or after its logits), `step` decodes
/// one token into the next; `on_token` sees each new id.
fn time_run<C>(
    prompt: &[u32],
    ctx_len: usize,
    new_tokens: usize,
    on_token: &mut dyn FnMut(u32),
    cache: &mut C,
    mut prefill: impl FnMut(&mut C) -> Result<(u32, Instant)>,
    mut step: impl FnMut(&mut C, u32) -> Result<u32>,
) -> Result<Timing> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "a benchmark needs at least one prompt token".into(),
        ));
    }
    if prompt.len() + new_tokens > ctx_len {
        return Err(Error::InvalidArgument(format!(
            "{} prompt + {new_tokens} new tokens exceed the model's {ctx_len}-token context",
            prompt.len(),
        )));
    }
    let t0 = Instant::now();
    let (mut next, done) = prefill(cache)?;
    let prefill_s = done.duration_since(t0).as_secs_f64();
    let ttft_s = t0.elapsed().as_secs_f64();
    on_token(next);
    let t1 = Instant::now();
    for _ in 0..new_tokens {
        next = step(cache, next)?;
        on_token(next);
    }
    Ok(Timing {
        prefill_s,
        ttft_s,
        decode_s: t1.elapsed().as_secs_f64(),
    })
}

impl BenchRun {
    /// The throughput figures of a timed run (memory and MoE figures left to the
    /// caller: none held, nothing skipped).
    fn timed(prompt_tokens: usize, gen_tokens: usize, t: &Timing) -> Self {
        BenchRun {
            prompt_tokens,
            gen_tokens,
            prefill_tok_s: prompt_tokens as f64 / t.prefill_s,
            ttft_ms: t.ttft_s * 1e3,
            decode_tok_s: if gen_tokens == 0 {
                0.0
            } else {
                gen_tokens as f64 / t.decode_s
            },
            peak_gpu_bytes: None,
            peak_host_bytes: peak_host_bytes(),
            peak_expert_bytes: 0,
            decode_up_rows_skipped: None,
            prefill_attention_share: None,
        }
    }
}

/// Prefills `prompt` from an empty cache, then decodes `new_tokens` greedy tokens (every one,
/// stop tokens included, so that runs of different models decode the same count);
/// `on_token` sees each new id.
pub fn bench_decoder(
    dec: &Decoder,
    prompt: &[u32],
    new_tokens: usize,
    on_token: &mut dyn FnMut(u32),
) -> Result<BenchRun> {
    let dm = dec.cfg.d_model;
    let mut cache = dec.new_cache();
    cache.reserve(prompt.len() + new_tokens);
    let mut ws = dec.workspace();
    let gpu = dec.context().gpu();
    if let Some(g) = gpu {
        g.reset_peak_buffer_bytes();
    }
    let mut skips0 = (0, 0);
    let timing = time_run(
        prompt,
        dec.cfg.ctx_len,
        new_tokens,
        on_token,
        &mut cache,
        |cache| {
            let h = dec.forward(prompt, cache, &mut |_| Ok(()))?;
            let done = Instant::now();
            let next = argmax(&dec.logits(&h[h.len() - dm..]));
            skips0 = dec.neuron_skips();
            Ok((next, done))
        },
        |cache, t| Ok(argmax(dec.step(t, cache, &mut ws)?)),
    )?;
    let (_, peak_expert_bytes, _) = dec.expert_residency();
    let skips = dec.neuron_skips();
    let considered = skips.1 - skips0.1;
    Ok(BenchRun {
        peak_gpu_bytes: gpu.map(|g| g.peak_buffer_bytes()),
        peak_expert_bytes,
        decode_up_rows_skipped: (considered > 0)
            .then(|| (skips.0 - skips0.0) as f64 / considered as f64),
        ..BenchRun::timed(prompt.len(), new_tokens, &timing)
    })
}

/// [`bench_decoder`] on the GPU decoder: the prompt prefilled in chunks of `chunk`
/// tokens into a cache with room for the whole run (its peak memory included), then
/// `new_tokens` greedy decode steps.
pub fn bench_gpu_decoder(
    dec: &GpuDecoder,
    prompt: &[u32],
    new_tokens: usize,
    chunk: usize,
    on_token: &mut dyn FnMut(u32),
) -> Result<BenchRun> {
    let g = dec.context().gpu().ok_or(Error::WrongContext)?;
    g.reset_peak_buffer_bytes();
    let mut cache = dec.new_cache(prompt.len() + new_tokens + 1)?;
    let mut share = None;
    let timing = time_run(
        prompt,
        dec.cfg.ctx_len,
        new_tokens,
        on_token,
        &mut cache,
        |cache| {
            // The logits come back with the prefill's submission.
            let logits = dec.prefill(prompt, cache, chunk)?;
            let done = Instant::now();
            share = dec.last_report().and_then(|r| attention_share(&r));
            Ok((argmax(&logits), done))
        },
        |cache, t| Ok(argmax(&dec.forward(&[t], cache)?)),
    )?;
    Ok(BenchRun {
        peak_gpu_bytes: Some(g.peak_buffer_bytes()),
        prefill_attention_share: share,
        ..BenchRun::timed(prompt.len(), new_tokens, &timing)
    })
}

/// The attention stages' share of a GPU decoder call's timed stages (every stage but
/// the embedding, the logits and the layers' `pre` / `post` stages).
pub fn attention_share(r: &Report) -> Option<f64> {
    let mut total = 0.0;
    let mut attention = 0.0;
    for s in &r.stages {
        let ms = s.ms?;
        total += ms;
        let other = s.name == "embedding"
            || s.name == "logits"
            || s.name.ends_with(".pre")
            || s.name.ends_with(".post");
        if !other {
            attention += ms;
        }
    }
    (total > 0.0).then(|| attention / total)
}

/// Runs [`bench_decoder`] or [`bench_gpu_decoder`] (in the GPU decoder's default chunks).
pub fn bench_engine(
    engine: &Engine,
    prompt: &[u32],
    new_tokens: usize,
    on_token: &mut dyn FnMut(u32),
) -> Result<BenchRun> {
    match engine {
        Engine::Cpu(d) => bench_decoder(d, prompt, new_tokens, on_token),
        Engine::Gpu(d) => bench_gpu_decoder(d, prompt, new_tokens, d.default_chunk(), on_token),
    }
}
