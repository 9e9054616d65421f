//! `wgsparse layer`: one SmallThinker-4B decoder layer (router, attention, MoE) on
//! synthetic data, as one submission.

use std::fmt;

use clap::Args;
use serde::Serialize;
use wgsparse::attention::metrics::compare;
use wgsparse::model::smallthinker::LayerReport;
use wgsparse::moe::{WeightFormat, grid_input};
use wgsparse::{Backend, DType, Result, Tensor};

use crate::device;
use crate::moe::{ExpertRunFigures, sum_stream};
use crate::report::{Check, emit, stage_lines, timed};

#[derive(Args, Clone)]
pub struct LayerArgs {
    #[command(flatten)]
    common: crate::device::CommonArgs,
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
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[command(flatten)]
    run: crate::moe::ExpertRunArgs,
    #[command(flatten)]
    plan: device::PlanArgs,
}

/// `wgsparse layer`: one SmallThinker-4B decoder layer (router, RMSNorm, attention with
/// RoPE or NoPE, MoE) on synthetic weights, as one submission.
pub fn run(a: &LayerArgs) -> Result<()> {
    use wgsparse::model::smallthinker::{
        DecoderLayerConfig, DecoderLayerWeights, decoder_layer_cpu,
    };
    let mut cfg = DecoderLayerConfig::smallthinker_4b();
    if a.nope {
        cfg.rope_theta = None;
    }
    cfg.window = a.window;
    cfg.sinks = a.sinks;
    if a.plan.dry_run {
        use wgsparse::model::smallthinker::layer_memory_plan;
        let (t, w, r) = (a.tokens, a.weights, a.run.residency());
        return a.plan.print(a.common.backend, a.common.json, |lim| {
            layer_memory_plan(&cfg, t, w, r, lim)
        });
    }
    let ctx = device::context(a.common.backend, a.plan.caps)?;
    let w = DecoderLayerWeights::random(&cfg, a.common.seed);
    let h = cfg.moe.hidden;
    let x = grid_input(a.tokens * h, a.common.seed ^ 0xdef);
    let mut b = ctx.decoder_layer(cfg).tokens(a.tokens).format(a.weights);
    if let Some(s) = a.run.stream_slots {
        b = b.stream_experts(s);
    }
    let plan = b.build(&w)?;
    let xt = Tensor::from_f32(&ctx, &[a.tokens, h], &x, DType::F32)?;
    let mut out = Tensor::zeros(&ctx, &[a.tokens, h], DType::F32)?;
    plan.run_into(&xt, &mut out)?; // warm-up
    let input = |i: usize| {
        let xv = grid_input(a.tokens * h, a.common.seed ^ (0x2000 + i as u64));
        Tensor::from_f32(&ctx, &[a.tokens, h], &xv, DType::F32)
    };
    let t = timed(
        a.iters,
        |r: &LayerReport| r.ms,
        |i| {
            let fresh = a.run.vary_inputs.then(|| input(i)).transpose()?;
            plan.run_into(fresh.as_ref().unwrap_or(&xt), &mut out)?;
            Ok(plan.report().expect("ran"))
        },
    )?;
    let mut report = t.runs.last().expect("one run").clone();
    if a.run.vary_inputs {
        plan.run_into(&xt, &mut out)?;
        let streams: Vec<_> = t
            .runs
            .iter()
            .filter_map(|r| r.experts.stream.clone())
            .collect();
        report.experts.stream = sum_stream(&streams);
    }
    let check = if a.run.check {
        let want = decoder_layer_cpu(&x, &w.pack(a.weights)?)?;
        Some(Check::new(
            compare(&out.to_f32_blocking()?, &want),
            "cpu layer",
        ))
    } else {
        None
    };
    let r = LayerRun {
        backend: ctx.backend(),
        adapter: ctx.adapter_name(),
        tokens: a.tokens,
        weights: a.weights,
        rope: !a.nope,
        attention: report.attention,
        run: ExpertRunFigures::new(a.tokens, t.ms, t.wall_ms, report.experts, report.timing),
        check,
    };
    emit(&r, a.common.json);
    Ok(())
}

/// What `wgsparse layer` reports (`--json`: these keys).
#[derive(Serialize)]
pub struct LayerRun {
    backend: Backend,
    adapter: String,
    tokens: usize,
    weights: WeightFormat,
    rope: bool,
    attention: String,
    #[serde(flatten)]
    run: ExpertRunFigures,
    #[serde(flatten)]
    check: Option<Check>,
}

impl fmt::Display for LayerRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "SmallThinker-4B decoder layer on {} ({}), synthetic: {} tokens, {} weights, {}, {} attention",
            self.adapter,
            self.backend,
            self.tokens,
            self.weights.name(),
            if self.rope { "RoPE" } else { "NoPE" },
            self.attention
        )?;
        stage_lines(f, &self.run.stages, 12, false)?;
        writeln!(
            f,
            "  median {:.3} ms ({} timing), wall {:.3} ms, {:.0} tokens/s, skipped neurons {:.3}",
            self.run.ms,
            self.run.timing,
            self.run.wall_ms,
            self.run.tokens_per_s,
            self.run.counted.skip_frac
        )?;
        if let Some(st) = &self.run.counted.stream {
            writeln!(f, "  streamed experts: {st}")?;
        }
        if let Some(c) = &self.check {
            write!(f, "{c}")?;
        }
        Ok(())
    }
}
