//! `wgsparse moe`: one MoE layer (router → dispatch → experts → combine) on synthetic
//! weights and activations, with per-stage times, tokens/s, the measured skipped-neuron
//! fraction and, with `--check`, the error against the other device.

use clap::Args;
use serde_json::json;
use wgsparse::metrics::{ErrorStats, compare};
use wgsparse::moe::cpu::{moe_cpu, moe_reference_f64};
use wgsparse::moe::{
    FfnPath, MoeConfig, MoeReport, MoeWeights, RouterScoring, WeightFormat, grid_input,
};
use wgsparse::{Backend, Context, ContextOptions, DType, Result, Tensor};

/// Expert-kernel choice on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathArg {
    /// GEMV up to 8 tokens, tiled above.
    Auto,
    /// Tiled grouped GEMM.
    Tiled,
    /// GEMV-like decode kernels.
    Gemv,
}

#[derive(Args, Clone)]
pub struct MoeArgs {
    /// Tokens.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Model width (multiple of 32).
    #[arg(long, default_value_t = 1536)]
    hidden: usize,
    /// Experts.
    #[arg(long, default_value_t = 32)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// Expert FFN width (multiple of 16).
    #[arg(long, default_value_t = 768)]
    ffn: usize,
    /// Weight format: f16 or q4_0.
    #[arg(long, default_value = "f16")]
    weights: WeightFormat,
    /// Expert kernels.
    #[arg(long, value_enum, default_value_t = PathArg::Auto)]
    path: PathArg,
    /// Softmax router weights instead of SmallThinker's renormalized sigmoid.
    #[arg(long)]
    softmax: bool,
    /// auto, vulkan, metal, dx12, gl or cpu (also WGSPARSE_BACKEND).
    #[arg(long)]
    backend: Option<Backend>,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Also compute on the other device (CPU twin on a GPU run; the GPU, else an f64
    /// reference, on a CPU run) and print the errors.
    #[arg(long)]
    check: bool,
    /// Make the last line one JSON object.
    #[arg(long)]
    json: bool,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

struct Run {
    out: Vec<f32>,
    ms: f64,
    report: MoeReport,
}

fn run_on(ctx: &Context, a: &MoeArgs, cfg: MoeConfig, w: &MoeWeights, iters: usize) -> Result<Run> {
    let mut b = ctx.moe(cfg).tokens(a.tokens).format(a.weights);
    match a.path {
        PathArg::Auto => {}
        PathArg::Tiled => b = b.path(FfnPath::Tiled),
        PathArg::Gemv => b = b.path(FfnPath::Gemv),
    }
    let plan = b.build(w)?;
    let x = grid_input(a.tokens * a.hidden, a.seed ^ 0xabc);
    let xt = Tensor::from_f32(ctx, &[a.tokens, a.hidden], &x, DType::F32)?;
    let mut out = Tensor::zeros(ctx, &[a.tokens, a.hidden], DType::F32)?;
    plan.run_into(&xt, &xt, &xt, &mut out)?; // warm-up
    let mut times = vec![];
    let mut report = plan.report().expect("ran");
    for _ in 0..iters.max(1) {
        plan.run_into(&xt, &xt, &xt, &mut out)?;
        report = plan.report().expect("ran");
        times.push(report.ms);
    }
    times.sort_by(f64::total_cmp);
    Ok(Run {
        out: out.to_f32_blocking()?,
        ms: times[times.len() / 2],
        report,
    })
}

pub fn moe(a: &MoeArgs) -> Result<()> {
    let mut opts = ContextOptions::from_env()?;
    if let Some(b) = a.backend {
        opts.backend = b;
    }
    let ctx = Context::new_blocking(opts)?;
    let cfg = MoeConfig {
        scoring: if a.softmax {
            RouterScoring::Softmax
        } else {
            RouterScoring::Sigmoid
        },
        ..MoeConfig::new(a.hidden, a.experts, a.top_k, a.ffn)
    };
    cfg.validate()?;
    let w = MoeWeights::random(&cfg, a.seed);
    let r = run_on(&ctx, a, cfg, &w, a.iters)?;
    let flops = cfg.expert_flops(a.tokens);
    let tflops = flops / r.ms / 1e9;
    let tokens_per_s = a.tokens as f64 / (r.ms / 1e3);
    if !a.json {
        println!(
            "MoE on {} ({}), synthetic weights and inputs: {} tokens, hidden {}, {} experts, top-{}, ffn {}, {} weights, {} kernels",
            ctx.adapter_name(),
            ctx.backend(),
            a.tokens,
            a.hidden,
            a.experts,
            a.top_k,
            a.ffn,
            a.weights.name(),
            r.report.path
        );
        for s in &r.report.timing.stages {
            println!(
                "  stage {:<12} {:>10} ms",
                s.name,
                s.ms.map(|x| format!("{x:.3}")).unwrap_or("-".into())
            );
        }
        let counts = &r.report.expert_counts;
        println!(
            "  median {:.3} ms ({} timing), {:.0} tokens/s, {:.3} TFLOP/s dense-equivalent, skipped neurons {:.3}, tokens per expert {}..{}",
            r.ms,
            r.report.timing.timing,
            tokens_per_s,
            tflops,
            r.report.skip_frac,
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0)
        );
    }
    let mut check: Option<(ErrorStats, String)> = None;
    if a.check {
        let (other, name) = other_result(&ctx, a, cfg, &w)?;
        let s = compare(&r.out, &other);
        if !a.json {
            println!(
                "  check vs {name}: max_abs_err {:.3e}, rel_l2_err {:.3e}",
                s.max_abs_err, s.rel_l2_err
            );
        }
        check = Some((s, name));
    }
    if a.json {
        let mut v = json!({
            "backend": ctx.backend(), "adapter": ctx.adapter_name(), "tokens": a.tokens,
            "hidden": a.hidden, "experts": a.experts, "top_k": a.top_k, "ffn": a.ffn,
            "weights": a.weights, "path": r.report.path, "router": cfg.scoring,
            "ms": r.ms, "tokens_per_s": tokens_per_s, "tflops": tflops,
            "skip_frac": r.report.skip_frac, "expert_counts": r.report.expert_counts,
            "timing": r.report.timing.timing, "stages": r.report.timing.stages,
            "data": "synthetic",
        });
        if let Some((s, name)) = check {
            v["max_abs_err"] = json!(s.max_abs_err);
            v["rel_l2_err"] = json!(s.rel_l2_err);
            v["check_against"] = json!(name);
        }
        println!("{}", serde_json::to_string(&v).expect("serializable"));
    }
    Ok(())
}

/// The same layer elsewhere: the CPU twin after a GPU run; after a CPU run the best GPU,
/// else the f64 reference.
fn other_result(
    ctx: &Context,
    a: &MoeArgs,
    cfg: MoeConfig,
    w: &MoeWeights,
) -> Result<(Vec<f32>, String)> {
    let x = grid_input(a.tokens * a.hidden, a.seed ^ 0xabc);
    let packed = w.pack(a.weights)?;
    if !ctx.is_cpu() {
        return Ok((moe_cpu(&x, &x, &x, &packed).out, "cpu twin".into()));
    }
    let gpu_opts = ContextOptions {
        require_gpu: true,
        backend: Backend::Auto,
        ..ContextOptions::from_env()?
    };
    if let Ok(gpu) = Context::new_blocking(gpu_opts) {
        let r = run_on(&gpu, a, cfg, w, 1)?;
        return Ok((r.out, format!("gpu ({})", gpu.adapter_name())));
    }
    Ok((
        moe_reference_f64(&x, &x, &x, &packed),
        "f64 reference (no GPU found)".into(),
    ))
}

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
}

/// `wgsparse layer`: one SmallThinker-4B decoder layer (router, RMSNorm, attention with
/// RoPE or NoPE, MoE) on synthetic weights, as one submission.
pub fn layer(a: &LayerArgs) -> Result<()> {
    use wgsparse::layer::{DecoderLayerConfig, DecoderLayerWeights, decoder_layer_cpu};
    let mut opts = ContextOptions::from_env()?;
    if let Some(b) = a.backend {
        opts.backend = b;
    }
    let ctx = Context::new_blocking(opts)?;
    let mut cfg = DecoderLayerConfig::smallthinker_4b();
    if a.nope {
        cfg.rope_theta = None;
    }
    cfg.window = a.window;
    cfg.sinks = a.sinks;
    let w = DecoderLayerWeights::random(&cfg, a.seed);
    let h = cfg.moe.hidden;
    let x = grid_input(a.tokens * h, a.seed ^ 0xdef);
    let plan = ctx
        .decoder_layer(cfg)
        .tokens(a.tokens)
        .format(a.weights)
        .build(&w)?;
    let xt = Tensor::from_f32(&ctx, &[a.tokens, h], &x, DType::F32)?;
    let mut out = Tensor::zeros(&ctx, &[a.tokens, h], DType::F32)?;
    plan.run_into(&xt, &mut out)?;
    let mut times = vec![];
    let mut report = plan.report().expect("ran");
    for _ in 0..a.iters.max(1) {
        plan.run_into(&xt, &mut out)?;
        report = plan.report().expect("ran");
        times.push(report.ms);
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
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
            "  median {ms:.3} ms ({} timing), {tokens_per_s:.0} tokens/s, skipped neurons {:.3}",
            report.timing.timing, report.skip_frac
        );
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
            "stages": report.timing.stages, "data": "synthetic",
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
