//! `wgsparse moe`: one MoE layer (router, dispatch, experts, combine) on synthetic data.

use std::fmt;

use clap::Args;
use serde::Serialize;
use wgsparse::attention::metrics::compare;
use wgsparse::moe::cpu::{moe_cpu, moe_reference_f64};
use wgsparse::moe::plan::ExpertStats;
use wgsparse::moe::stream::StreamStats;
use wgsparse::moe::{
    FfnPath, MoeConfig, MoeReport, MoeWeights, RouterScoring, WeightFormat, grid_input,
};
use wgsparse::runtime::StageTime;
use wgsparse::{Backend, Context, DType, Result, Tensor};

use crate::device;
use crate::report::{Check, emit, stage_lines, timed};

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
    #[command(flatten)]
    common: crate::device::CommonArgs,
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
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[command(flatten)]
    run: ExpertRunArgs,
    #[command(flatten)]
    plan: device::PlanArgs,
    /// Tiled path: do not skip 16-neuron chunks that are inactive for a whole tile.
    #[arg(long)]
    no_skip_chunks: bool,
    /// Synthetic "cold" neurons: zero the gate rows of this fraction of each expert's
    /// 16-neuron chunks (they never fire), a stand-in for trained ReGLU sparsity.
    #[arg(long, default_value_t = 0.0)]
    cold_chunks: f64,
}

/// The flags of the expert runs `moe` and `layer` share.
#[derive(Args, Clone)]
pub struct ExpertRunArgs {
    /// Also compute the run elsewhere and print the errors (`check_against` names
    /// what): the CPU twin after a GPU run; after a CPU run, `moe` uses the GPU, else an
    /// f64 reference, and `layer` the CPU twin.
    #[arg(long)]
    pub check: bool,
    /// Keep the expert weights in host memory and cache this many experts on the GPU:
    /// the router runs in its own submission, what is queued behind it (a layer's
    /// attention) runs while the routed experts that miss are uploaded (part of each
    /// run).
    #[arg(long)]
    pub stream_slots: Option<usize>,
    /// A fresh random input for every timed run (the routing changes from run to run,
    /// as from token to token in decoding: what a streamed expert cache sees); the
    /// output and --check use one more run on the usual input.
    #[arg(long)]
    pub vary_inputs: bool,
}

impl ExpertRunArgs {
    /// Where the expert weights are asked to live.
    pub fn residency(&self) -> wgsparse::moe::stream::ExpertResidency {
        use wgsparse::moe::stream::ExpertResidency;
        self.stream_slots
            .map_or(ExpertResidency::Resident, |slots| {
                ExpertResidency::Streamed { slots }
            })
    }
}

/// The measured part of the reports of `moe` and `layer` (flattened into their JSON).
#[derive(Serialize)]
pub struct ExpertRunFigures {
    /// Median milliseconds.
    pub ms: f64,
    pub tokens_per_s: f64,
    #[serde(flatten)]
    pub counted: ExpertStats,
    pub timing: String,
    pub stages: Vec<StageTime>,
    pub data: &'static str,
    pub wall_ms: f64,
}

impl ExpertRunFigures {
    /// Figures of `tokens` per run at a median of `ms` (synthetic data).
    pub fn new(
        tokens: usize,
        ms: f64,
        wall_ms: f64,
        counted: ExpertStats,
        t: wgsparse::Report,
    ) -> Self {
        ExpertRunFigures {
            ms,
            tokens_per_s: tokens as f64 / (ms / 1e3),
            counted,
            timing: t.timing,
            stages: t.stages,
            data: "synthetic",
            wall_ms,
        }
    }
}

/// Streaming figures of several runs added up (hits, uploads, bytes, times), `None` for
/// unstreamed runs.
pub fn sum_stream(runs: &[StreamStats]) -> Option<StreamStats> {
    let first = runs.first()?;
    let mut s = StreamStats {
        slots: first.slots,
        ..Default::default()
    };
    for r in runs {
        s.routed += r.routed;
        s.hits += r.hits;
        s.uploads += r.uploads;
        s.uploaded_bytes += r.uploaded_bytes;
        s.rounds += r.rounds;
        s.upload_ms += r.upload_ms;
        s.stall_ms += r.stall_ms;
    }
    Some(s)
}

struct Run {
    out: Vec<f32>,
    ms: f64,
    /// Median host wall clock of a run (uploads and submissions included).
    wall_ms: f64,
    report: MoeReport,
}

/// Measures a built plan: a warm-up run, `iters` timed runs (each on a fresh input with
/// `--vary-inputs`), the medians, and the last run's report with the timed runs'
/// streaming figures summed.
fn run_on(ctx: &Context, a: &MoeArgs, cfg: MoeConfig, w: &MoeWeights, iters: usize) -> Result<Run> {
    let mut b = ctx
        .moe(cfg)
        .tokens(a.tokens)
        .format(a.weights)
        .skip_chunks(!a.no_skip_chunks);
    if let Some(s) = a.run.stream_slots {
        b = b.stream_experts(s);
    }
    match a.path {
        PathArg::Auto => {}
        PathArg::Tiled => b = b.path(FfnPath::Tiled),
        PathArg::Gemv => b = b.path(FfnPath::Gemv),
    }
    let plan = b.build(w)?;
    let dims = [a.tokens, a.hidden];
    let input =
        |seed: u64| Tensor::from_f32(ctx, &dims, &grid_input(dims[0] * dims[1], seed), DType::F32);
    let xt = input(a.common.seed ^ 0xabc)?;
    let mut out = Tensor::zeros(ctx, &dims, DType::F32)?;
    plan.run_into(&xt, &xt, &xt, &mut out)?; // warm-up
    let t = timed(
        iters,
        |r: &MoeReport| r.ms,
        |i| {
            let fresh = a
                .run
                .vary_inputs
                .then(|| input(a.common.seed ^ (0x1000 + i as u64)));
            let xi = fresh.transpose()?;
            let xi = xi.as_ref().unwrap_or(&xt);
            plan.run_into(xi, xi, xi, &mut out)?;
            Ok(plan.report().expect("ran"))
        },
    )?;
    let mut report = t.runs.last().expect("one run").clone();
    if a.run.vary_inputs {
        plan.run_into(&xt, &xt, &xt, &mut out)?;
        // Keep the timed runs' streaming figures (summed), the last run's counts.
        let streams: Vec<_> = t
            .runs
            .iter()
            .filter_map(|r| r.experts.stream.clone())
            .collect();
        report = plan.report().expect("ran");
        report.experts.stream = sum_stream(&streams);
    }
    Ok(Run {
        out: out.to_f32_blocking()?,
        ms: t.ms,
        wall_ms: t.wall_ms,
        report,
    })
}

/// What `wgsparse moe` reports (`--json`: these keys).
#[derive(Serialize)]
pub struct MoeRun {
    backend: Backend,
    adapter: String,
    tokens: usize,
    hidden: usize,
    experts: usize,
    top_k: usize,
    ffn: usize,
    weights: WeightFormat,
    path: String,
    router: RouterScoring,
    #[serde(flatten)]
    run: ExpertRunFigures,
    /// Dense-equivalent expert TFLOP/s.
    tflops: f64,
    cold_chunks: f64,
    #[serde(flatten)]
    check: Option<Check>,
}

impl fmt::Display for MoeRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "MoE on {} ({}), synthetic weights and inputs: {} tokens, hidden {}, {} experts, top-{}, ffn {}, {} weights, {} kernels",
            self.adapter,
            self.backend,
            self.tokens,
            self.hidden,
            self.experts,
            self.top_k,
            self.ffn,
            self.weights.name(),
            self.path
        )?;
        stage_lines(f, &self.run.stages, 12, false)?;
        let counts = &self.run.counted.expert_counts;
        writeln!(
            f,
            "  median {:.3} ms ({} timing), {:.0} tokens/s, {:.3} TFLOP/s dense-equivalent, skipped neurons {:.3}, tokens per expert {}..{}",
            self.run.ms,
            self.run.timing,
            self.run.tokens_per_s,
            self.tflops,
            self.run.counted.skip_frac,
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0)
        )?;
        if let Some(x) = self.run.counted.down_chunk_skip_frac {
            writeln!(
                f,
                "  down GEMM chunks skipped (inactive for a whole tile): {x:.3}"
            )?;
        }
        if let Some(st) = &self.run.counted.stream {
            writeln!(
                f,
                "  streamed experts: {st}; wall {:.3} ms",
                self.run.wall_ms
            )?;
        }
        if let Some(c) = &self.check {
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

pub fn run(a: &MoeArgs) -> Result<()> {
    let cfg = MoeConfig {
        scoring: if a.softmax {
            RouterScoring::Softmax
        } else {
            RouterScoring::Sigmoid
        },
        ..MoeConfig::new(a.hidden, a.experts, a.top_k, a.ffn)
    };
    cfg.validate()?;
    if a.plan.dry_run {
        use wgsparse::moe::memory::memory_plan;
        let (t, w, r) = (a.tokens, a.weights, a.run.residency());
        return a.plan.print(a.common.backend, a.common.json, |lim| {
            memory_plan(&cfg, t, w, r, lim)
        });
    }
    let ctx = device::context(a.common.backend, a.plan.caps)?;
    let w = MoeWeights::random(&cfg, a.common.seed)
        .with_cold_chunks(a.cold_chunks, a.common.seed ^ 0xc01d)?;
    let r = run_on(&ctx, a, cfg, &w, a.iters)?;
    let check = if a.run.check {
        let (other, name) = other_result(&ctx, a, cfg, &w)?;
        Some(Check::new(compare(&r.out, &other), name))
    } else {
        None
    };
    let rep = r.report;
    let report = MoeRun {
        backend: ctx.backend(),
        adapter: ctx.adapter_name(),
        tokens: a.tokens,
        hidden: a.hidden,
        experts: a.experts,
        top_k: a.top_k,
        ffn: a.ffn,
        weights: a.weights,
        path: rep.path,
        router: cfg.scoring,
        run: ExpertRunFigures::new(a.tokens, r.ms, r.wall_ms, rep.experts, rep.timing),
        tflops: cfg.expert_flops(a.tokens) / r.ms / 1e9,
        cold_chunks: a.cold_chunks,
        check,
    };
    emit(&report, a.common.json);
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
    let x = grid_input(a.tokens * a.hidden, a.common.seed ^ 0xabc);
    let packed = w.pack(a.weights)?;
    if !ctx.is_cpu() {
        return Ok((moe_cpu(&x, &x, &x, &packed).out, "cpu twin".into()));
    }
    if let Some(gpu) = device::other_gpu(Default::default()) {
        let r = run_on(&gpu, a, cfg, w, 1)?;
        return Ok((r.out, format!("gpu ({})", gpu.adapter_name())));
    }
    Ok((
        moe_reference_f64(&x, &x, &x, &packed),
        "f64 reference (no GPU found)".into(),
    ))
}
