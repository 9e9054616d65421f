//! `wgsparse`: the command-line front end (the crate's main job).
//!
//! - `wgsparse` with no arguments: a short demo of dense attention at a few lengths on
//!   the best device.
//! - `wgsparse info [--json]`: adapters, chosen backend, features, limits.
//! - `wgsparse attention --method dense ... [--check] [--json]`: one run on synthetic
//!   Q/K/V with per-stage times; `--check` compares with the other device.
//! - `wgsparse moe --tokens T --hidden H --experts E --top-k K --ffn F [--weights f16|q4_0]
//!   [--check] [--json]`: one MoE layer on synthetic data (see `cli_moe.rs`).
//! - `wgsparse layer --tokens T [--weights f16|q4_0] [--nope] [--check] [--json]`: one
//!   SmallThinker-4B decoder layer as one submission.
//! - `wgsparse shader [--list | NAME]`: prints the final WGSL of kernel variants.

mod cli_moe;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use wgsparse::attention::dense_cpu::naive_attention;
use wgsparse::attention::dense_gpu::all_dense_variants;
use wgsparse::metrics::{ErrorStats, compare};
use wgsparse::{
    AttentionPlan, AttentionShape, Backend, Context, ContextOptions, DType, Error, Method, Result,
    Tensor,
};

#[derive(Parser)]
#[command(
    name = "wgsparse",
    version,
    about = "Sparse long-context attention on any GPU (WGSL) and the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// List adapters, the chosen backend, features and limits.
    Info {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Backend to report as chosen (also WGSPARSE_BACKEND).
        #[arg(long)]
        backend: Option<Backend>,
    },
    /// Run attention on synthetic Q/K/V and print per-stage times.
    Attention(AttentionArgs),
    /// Run one MoE layer (router, dispatch, experts, combine) on synthetic data.
    Moe(cli_moe::MoeArgs),
    /// Run one SmallThinker-4B decoder layer (router, attention, MoE) on synthetic data.
    Layer(cli_moe::LayerArgs),
    /// Print the final WGSL of kernel variants (after includes and defines).
    Shader {
        /// List the variants instead of printing one.
        #[arg(long)]
        list: bool,
        /// Variant label (as `--list` prints it) or index.
        name: Option<String>,
    },
}

#[derive(Args, Clone)]
struct AttentionArgs {
    /// Algorithm: dense (sparse methods join as they land).
    #[arg(long, default_value = "dense")]
    method: Method,
    /// Query rows (= keys for prefill).
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    /// Key/value heads (GQA when fewer than q-heads).
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head dimension: 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Storage dtype: f16 or f32 (accumulation is always f32).
    #[arg(long, default_value = "f16")]
    dtype: DType,
    /// auto, vulkan, metal, dx12, gl or cpu (also WGSPARSE_BACKEND).
    #[arg(long)]
    backend: Option<Backend>,
    /// Attend to every key, not only the past ones.
    #[arg(long)]
    non_causal: bool,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Also run on the other device (CPU vs GPU) and print the errors.
    #[arg(long)]
    check: bool,
    /// Make the last line one JSON object.
    #[arg(long)]
    json: bool,
    /// Plan with at most this many bytes per storage binding (tests the split path).
    #[arg(long)]
    max_binding_bytes: Option<u64>,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn options(backend: Option<Backend>, max_binding: Option<u64>) -> Result<ContextOptions> {
    let mut o = ContextOptions::from_env()?;
    if let Some(b) = backend {
        o.backend = b;
    }
    if max_binding.is_some() {
        o.max_binding_bytes = max_binding;
    }
    Ok(o)
}

fn info(json_out: bool, backend: Option<Backend>) -> Result<()> {
    let adapters = pollster::block_on(Context::list_adapters());
    let ctx = Context::new_blocking(options(backend, None)?)?;
    if json_out {
        let v = json!({
            "chosen": { "backend": ctx.backend(), "adapter": ctx.adapter_name(),
                        "capabilities": ctx.capabilities() },
            "adapters": adapters,
        });
        println!("{}", serde_json::to_string(&v).expect("serializable"));
        return Ok(());
    }
    println!("adapters:");
    for a in &adapters {
        let c = &a.capabilities;
        println!(
            "  - {} [{}, {}] {}",
            a.name, a.backend, a.device_type, a.driver
        );
        if a.backend != Backend::Cpu {
            println!(
                "      f16={} subgroups={} ({}..{}) coop_matrix={} timestamps={}",
                c.f16,
                c.subgroups,
                c.subgroup_min_size,
                c.subgroup_max_size,
                c.coop_matrix
                    .iter()
                    .map(|s| format!("{}x{}x{} {}->{}", s.m, s.n, s.k, s.ab, s.cr))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.timestamps
            );
            println!(
                "      max_storage_binding={} max_buffer={} workgroup_storage={} invocations={} storage_buffers/stage={}",
                c.adapter_max_storage_binding,
                c.max_buffer,
                c.max_workgroup_storage,
                c.max_invocations,
                c.max_storage_buffers_per_stage
            );
        }
    }
    println!("chosen: {} on {}", ctx.adapter_name(), ctx.backend());
    Ok(())
}

/// One measured run: the output and the median report.
struct Measured {
    out: Vec<f32>,
    ms: f64,
    report: wgsparse::AttentionReport,
}

fn measure(
    ctx: &Context,
    a: &AttentionArgs,
    shape: AttentionShape,
    iters: usize,
) -> Result<Measured> {
    let plan: AttentionPlan = ctx
        .attention(shape)
        .method(a.method.clone())
        .causal(!a.non_causal)
        .dtype(a.dtype)
        .build()?;
    let (q, k, v) = wgsparse::synthetic::qkv(ctx, &shape, a.dtype, a.seed)?;
    let mut out = Tensor::zeros(ctx, &shape.q_dims(), a.dtype)?;
    plan.run_into(&q, &k, &v, &mut out)?; // warm-up (pipeline creation, first touch)
    let mut times = vec![];
    let mut report = plan.report().expect("ran");
    for _ in 0..iters.max(1) {
        plan.run_into(&q, &k, &v, &mut out)?;
        report = plan.report().expect("ran");
        times.push(report.ms());
    }
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        out: out.to_f32_blocking()?,
        ms: times[times.len() / 2],
        report,
    })
}

fn attention(a: &AttentionArgs) -> Result<()> {
    let ctx = Context::new_blocking(options(a.backend, a.max_binding_bytes)?)?;
    let shape = AttentionShape::new(a.q_heads, a.kv_heads, a.seq_len, a.head_dim);
    let causal = !a.non_causal;
    let m = measure(&ctx, a, shape, a.iters)?;
    let tflops = shape.flops(causal) / m.ms / 1e9;
    if !a.json {
        println!(
            "{} attention on {} ({}), synthetic Q/K/V: {} q-heads / {} kv-heads x {} tokens x d={} {}{}",
            a.method.name(),
            ctx.adapter_name(),
            ctx.backend(),
            a.q_heads,
            a.kv_heads,
            a.seq_len,
            a.head_dim,
            a.dtype.name(),
            if causal { ", causal" } else { "" }
        );
        for s in &m.report.timing.stages {
            println!(
                "  stage {:<10} {:>10} ms  ({} dispatch{})",
                s.name,
                s.ms.map(|x| format!("{x:.3}")).unwrap_or("-".into()),
                s.dispatches,
                if s.dispatches == 1 { "" } else { "es" }
            );
        }
        println!(
            "  median {:.3} ms ({} timing), {:.3} TFLOP/s, density {:.3}",
            m.ms, m.report.timing.timing, tflops, m.report.density
        );
    }
    let mut check: Option<(ErrorStats, String)> = None;
    if a.check {
        let (other_out, other_name) = other_device_result(&ctx, a, shape)?;
        let stats = compare(&m.out, &other_out);
        if !a.json {
            println!(
                "  check vs {other_name}: max_abs_err {:.3e}, rel_l2_err {:.3e}",
                stats.max_abs_err, stats.rel_l2_err
            );
        }
        check = Some((stats, other_name));
    }
    if a.json {
        let mut v = json!({
            "backend": ctx.backend(), "adapter": ctx.adapter_name(), "method": a.method.name(),
            "seq_len": a.seq_len, "q_heads": a.q_heads, "kv_heads": a.kv_heads,
            "head_dim": a.head_dim, "dtype": a.dtype, "causal": causal, "ms": m.ms,
            "density": m.report.density, "tflops": tflops, "timing": m.report.timing.timing,
            "stages": m.report.timing.stages, "dispatches": m.report.dispatches,
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

/// The same problem on the other device: the CPU when we ran on a GPU, else the best GPU,
/// else (no GPU at all) the naive f64 reference for problems small enough for it.
fn other_device_result(
    ctx: &Context,
    a: &AttentionArgs,
    shape: AttentionShape,
) -> Result<(Vec<f32>, String)> {
    if !ctx.is_cpu() {
        let m = measure(&Context::cpu(), a, shape, 1)?;
        return Ok((m.out, "cpu".into()));
    }
    let gpu_opts = ContextOptions {
        require_gpu: true,
        ..options(Some(Backend::Auto), a.max_binding_bytes)?
    };
    if let Ok(gpu) = Context::new_blocking(gpu_opts) {
        let m = measure(&gpu, a, shape, 1)?;
        return Ok((m.out, format!("gpu ({})", gpu.adapter_name())));
    }
    if shape.flops(!a.non_causal) > 2e10 {
        return Err(Error::InvalidArgument(
            "--check on the CPU needs a GPU, or a problem small enough for the naive reference"
                .into(),
        ));
    }
    let (q, k, v) = wgsparse::synthetic::qkv_host(&shape, a.seed);
    let round = |x: Vec<f32>| a.dtype.round_trip(&x);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let out = naive_attention(
        &shape,
        !a.non_causal,
        scale,
        &round(q),
        &round(k),
        &round(v),
    );
    Ok((round(out), "naive f64 reference (no GPU found)".into()))
}

fn shader(list: bool, name: Option<String>) -> Result<()> {
    let mut variants = all_dense_variants();
    variants.extend(wgsparse::moe::all_moe_variants());
    if list || name.is_none() {
        for (i, v) in variants.iter().enumerate() {
            println!("{i:3} {}", v.label());
        }
        return Ok(());
    }
    let name = name.expect("checked");
    let spec = variants
        .iter()
        .enumerate()
        .find(|(i, v)| v.label() == name || i.to_string() == name)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::InvalidArgument(format!("no variant `{name}` (see --list)")))?;
    print!("{}", spec.source()?);
    Ok(())
}

fn demo() -> Result<()> {
    let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
    println!(
        "wgsparse demo: dense causal attention on {} ({}), synthetic Q/K/V, 32 q-heads / 8 kv-heads, d=128, f16",
        ctx.adapter_name(),
        ctx.backend()
    );
    let lens: &[usize] = if ctx.is_cpu()
        || ctx
            .gpu()
            .is_some_and(|g| g.info.device_type == wgpu::DeviceType::Cpu)
    {
        &[256, 512, 1024]
    } else {
        &[1024, 4096, 16384]
    };
    let bar = ProgressBar::new(lens.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let mut rows = vec![];
    for &n in lens {
        bar.set_message(format!("{n} tokens"));
        let a = AttentionArgs {
            method: Method::Dense,
            seq_len: n,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: DType::F16,
            backend: None,
            non_causal: false,
            iters: 1,
            check: false,
            json: false,
            max_binding_bytes: None,
            seed: 7,
        };
        let shape = AttentionShape::new(32, 8, n, 128);
        let m = measure(&ctx, &a, shape, 1)?;
        rows.push((
            n,
            m.ms,
            shape.flops(true) / m.ms / 1e9,
            m.report.timing.timing.clone(),
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("| tokens | ms | TFLOP/s | timing |\n|---:|---:|---:|---|");
    for (n, ms, tf, t) in rows {
        println!("| {n} | {ms:.3} | {tf:.3} | {t} |");
    }
    println!("(try `wgsparse info`, `wgsparse attention --check`, `wgsparse --help`)");
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    .init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo(),
        Some(Command::Info { json, backend }) => info(json, backend),
        Some(Command::Attention(a)) => attention(&a),
        Some(Command::Moe(a)) => cli_moe::moe(&a),
        Some(Command::Layer(a)) => cli_moe::layer(&a),
        Some(Command::Shader { list, name }) => shader(list, name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
