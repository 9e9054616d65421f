//! `wgsparse layer`: one SmallThinker-4B decoder layer (router, attention, MoE) on
//! synthetic data, as one submission.

use clap::Args;
use serde_json::json;
use wgsparse::attention::metrics::compare;
use wgsparse::moe::{WeightFormat, grid_input};
use wgsparse::{Backend, DType, Result, Tensor};

/// Expert-kernel choice on the command line.
use crate::device;
use crate::moe::*;

#[derive(Args, Clone)]
pub struct LayerArgs {
    /// Tokens (the whole causal context of the run; no KV cache).
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Weight format of every matrix: f16 or q4_0.
    #[arg(long, default_value = "f16")]
    weights: WeightFormat,
    /// A NoPE layer (no rotary embedding) instead of RoPE θ = 1.5e6.
    #[arg(long)]
    nope: bool,
    /// Sliding-window attention over this many keys (the 21B's RoPE layers: 4096)
    /// instead of full causal attention.
    #[arg(long)]
    window: Option<usize>,
    /// Sink keys every row attends inside the window.
    #[arg(long, default_value_t = 0)]
    sinks: usize,
    /// auto, vulkan, metal, dx12, gl or cpu (also WGSPARSE_BACKEND).
    #[arg(long)]
    backend: Option<Backend>,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Also run the CPU layer and print the errors.
    #[arg(long)]
    check: bool,
    /// Make the last line one JSON object.
    #[arg(long)]
    json: bool,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Stream the expert weights from host memory through this many GPU slots: the
    /// router runs alone, attention is queued behind it, and the routed experts that
    /// miss are uploaded while attention runs.
    #[arg(long)]
    stream_slots: Option<usize>,
    /// A fresh random input for every timed run (changing routing, as in decoding);
    /// --check uses one more run on the usual input.
    #[arg(long)]
    vary_inputs: bool,
}

/// `wgsparse layer`: one SmallThinker-4B decoder layer (router, RMSNorm, attention with
/// RoPE or NoPE, MoE) on synthetic weights, as one submission.
pub fn run(a: &LayerArgs) -> Result<()> {
    use wgsparse::model::smallthinker::{
        DecoderLayerConfig, DecoderLayerWeights, decoder_layer_cpu,
    };
    let ctx = device::context(a.backend, None)?;
    let mut cfg = DecoderLayerConfig::smallthinker_4b();
    if a.nope {
        cfg.rope_theta = None;
    }
    cfg.window = a.window;
    cfg.sinks = a.sinks;
    let w = DecoderLayerWeights::random(&cfg, a.seed);
    let h = cfg.moe.hidden;
    let x = grid_input(a.tokens * h, a.seed ^ 0xdef);
    let mut b = ctx.decoder_layer(cfg).tokens(a.tokens).format(a.weights);
    if let Some(s) = a.stream_slots {
        b = b.stream_experts(s);
    }
    let plan = b.build(&w)?;
    let xt = Tensor::from_f32(&ctx, &[a.tokens, h], &x, DType::F32)?;
    let mut out = Tensor::zeros(&ctx, &[a.tokens, h], DType::F32)?;
    plan.run_into(&xt, &mut out)?;
    let mut times = vec![];
    let mut walls = vec![];
    let mut report = plan.report().expect("ran");
    let mut stream = vec![];
    for i in 0..a.iters.max(1) {
        let fresh = if a.vary_inputs {
            let xv = grid_input(a.tokens * h, a.seed ^ (0x2000 + i as u64));
            Some(Tensor::from_f32(&ctx, &[a.tokens, h], &xv, DType::F32)?)
        } else {
            None
        };
        let t0 = std::time::Instant::now();
        plan.run_into(fresh.as_ref().unwrap_or(&xt), &mut out)?;
        walls.push(t0.elapsed().as_secs_f64() * 1e3);
        report = plan.report().expect("ran");
        times.push(report.ms);
        stream.extend(report.stream.clone());
    }
    if a.vary_inputs {
        plan.run_into(&xt, &mut out)?;
        report.stream = sum_stream(&stream);
    }
    times.sort_by(f64::total_cmp);
    walls.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let wall_ms = walls[walls.len() / 2];
    let tokens_per_s = a.tokens as f64 / (ms / 1e3);
    if !a.json {
        println!(
            "SmallThinker-4B decoder layer on {} ({}), synthetic: {} tokens, {} weights, {}, {} attention",
            ctx.adapter_name(),
            ctx.backend(),
            a.tokens,
            a.weights.name(),
            if a.nope { "NoPE" } else { "RoPE" },
            report.attention
        );
        for s in &report.timing.stages {
            println!(
                "  stage {:<12} {:>10} ms",
                s.name,
                s.ms.map(|x| format!("{x:.3}")).unwrap_or("-".into())
            );
        }
        println!(
            "  median {ms:.3} ms ({} timing), wall {wall_ms:.3} ms, {tokens_per_s:.0} tokens/s, skipped neurons {:.3}",
            report.timing.timing, report.skip_frac
        );
        if let Some(st) = &report.stream {
            println!("  streamed experts: {st}");
        }
    }
    let mut err = None;
    if a.check {
        let want = decoder_layer_cpu(&x, &w.pack(a.weights)?)?;
        let s = compare(&out.to_f32_blocking()?, &want);
        if !a.json {
            println!(
                "  check vs cpu layer: max_abs_err {:.3e}, rel_l2_err {:.3e}",
                s.max_abs_err, s.rel_l2_err
            );
        }
        err = Some(s);
    }
    if a.json {
        let mut v = json!({
            "backend": ctx.backend(), "adapter": ctx.adapter_name(), "tokens": a.tokens,
            "weights": a.weights, "rope": !a.nope, "attention": report.attention, "ms": ms,
            "tokens_per_s": tokens_per_s, "skip_frac": report.skip_frac,
            "expert_counts": report.expert_counts, "timing": report.timing.timing,
            "stages": report.timing.stages, "data": "synthetic", "wall_ms": wall_ms,
            "down_chunk_skip_frac": report.down_chunk_skip_frac, "stream": report.stream,
        });
        if let Some(s) = err {
            v["max_abs_err"] = json!(s.max_abs_err);
            v["rel_l2_err"] = json!(s.rel_l2_err);
            v["check_against"] = json!("cpu layer");
        }
        println!("{}", serde_json::to_string(&v).expect("serializable"));
    }
    Ok(())
}
