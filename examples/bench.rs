//! GPU speed run of causal attention methods over a ladder of sequence lengths: dense
//! flash attention and the sparse methods side by side on the same inputs.
//!
//! ```text
//! cargo run --release --example bench -- [--seq-lens 4096,8192,16384,32768,65536,131072]
//!     [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--dtype f16] [--iters 10]
//!     [--warmup 2] [--budget-s 20] [--length-budget-s 60] [--json FILE] [--check-len N]
//!     [--methods dense,anchor,anchor:theta=8,window:window=4096] [--data structured]
//! ```
//!
//! `--methods` lists what runs at each length, on the same Q/K/V: `dense`, `anchor`
//! (optionally `:theta=T,step=S,init=I`), `window` (optionally `:window=W,sinks=S`),
//! `sale` (optionally `:tau=T,bits=B,local=L`), `proxy` (ProxyAttn, optionally
//! `:gamma=G,groups=N,stride=S,min_budget=M`), `blocks:p=P,block=B` (hashed random
//! block masks, the same ones `benches/peers/torch_flex.py` builds).
//! `--data gaussian` (the default for a dense-only run) has no attention structure;
//! `--data structured` plants sinks, a local band and heavy columns (synthetic: the
//! sparse methods' densities on it say nothing about a real model).
//!
//! The device is chosen as everywhere else in the crate (`WGSPARSE_BACKEND`,
//! `WGSPARSE_ADAPTER`, `WGSPARSE_REQUIRE_GPU`, ...). Per length it builds a dense causal
//! plan, uploads synthetic Q/K/V (independent standard-normal values from a fixed seed,
//! generated in parallel chunks: clearly synthetic, not a model's activations), runs
//! `--warmup` untimed and `--iters` timed runs, and reports the median of
//! [`wgsparse::AttentionReport::ms`] (GPU timestamps when the adapter has them, else the
//! wall clock of the submission) and TFLOP/s counting `4 · causal pairs · head_dim` FLOPs.
//!
//! Device-time guards: when a single run takes longer than `--budget-s`, no longer length
//! is tried; a length whose run is predicted (quadratic scaling from the last one) to take
//! longer than `--budget-s` is skipped; timed iterations at one length stop after
//! `--length-budget-s`.
//!
//! A method that fails at one length (an error, e.g. a buffer over the device's binding
//! limit) is recorded with its message (`status: "error"`) and not tried at longer
//! lengths; the other methods go on.
//!
//! `--check-len N` first compares the GPU output at N tokens (same heads) with the CPU twin
//! (`dense_attention_cpu` on the same dtype-rounded inputs) and exits non-zero on a
//! mismatch; `--check-only` stops after the check.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde::Serialize;
use wgsparse::attention::lut::{LutUnit, SparseLut};
use wgsparse::{AttentionShape, Context, ContextOptions, DType, Method, Tensor};

#[derive(Parser, Debug)]
#[command(about = "Dense causal flash attention speed run (wgsparse, WGSL through wgpu)")]
struct Args {
    /// Sequence lengths (queries = keys), comma-separated; `k` suffix = ×1024 (e.g. 128k).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_len,
        default_value = "4096,8192,16384,32768,65536,131072"
    )]
    seq_lens: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    /// Key/value heads (GQA when fewer than the query heads).
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head dimension (a multiple of 16 up to 256).
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Storage dtype of Q, K, V and the output (f16 or f32; accumulation is f32).
    #[arg(long, default_value = "f16")]
    dtype: DType,
    /// Timed runs per length.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed runs per length before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Longest single run (seconds, wall clock) before larger lengths are skipped.
    #[arg(long, default_value_t = 20.0)]
    budget_s: f64,
    /// Stop timed iterations at one length after this many seconds (at least one runs).
    #[arg(long, default_value_t = 60.0)]
    length_budget_s: f64,
    /// Write one JSON object per line (one per length) to this file (truncated first).
    #[arg(long)]
    json: Option<PathBuf>,
    /// First check the GPU output at this length against the CPU twin.
    #[arg(long)]
    check_len: Option<usize>,
    /// Max abs error allowed by the check (default 4e-3 for f16, 2e-5 for f32).
    #[arg(long)]
    check_tol: Option<f64>,
    /// Stop after the check.
    #[arg(long, requires = "check_len")]
    check_only: bool,
    /// Seed of the synthetic inputs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Methods to run at each length (see the module docs).
    #[arg(long, value_delimiter = ';', default_value = "dense")]
    methods: Vec<String>,
    /// Synthetic inputs: gaussian or structured.
    #[arg(long, default_value = "gaussian")]
    data: String,
}

/// A method as given on the command line: most are fixed; `blocks` is a random block
/// mask resolved per length.
#[derive(Clone, Debug)]
enum MethodSpec {
    Fixed(Method),
    /// Block-sparse executor, `block × block` blocks: block 0, the diagonal, and each
    /// other causal block with probability `p` by a hash of (head, query block, key
    /// block) — the same rule as `benches/peers/torch_flex.py`, so both run the same
    /// mask.
    RandomBlocks {
        p: f64,
        block: usize,
    },
}

impl MethodSpec {
    fn name(&self) -> &'static str {
        match self {
            MethodSpec::Fixed(m) => m.name(),
            MethodSpec::RandomBlocks { .. } => "block-sparse",
        }
    }

    fn resolve(&self, shape: &AttentionShape) -> Result<Method, Box<dyn std::error::Error>> {
        Ok(match self {
            MethodSpec::Fixed(m) => m.clone(),
            MethodSpec::RandomBlocks { p, block } => {
                let b = *block;
                let lut = SparseLut::from_fn(
                    shape.q_heads,
                    shape.seq_len,
                    b,
                    LutUnit::Blocks(b),
                    |h, qb| {
                        let qb = qb as u64;
                        (0..=qb)
                            .filter(|&kb| kb == 0 || kb == qb || keep(h as u64, qb, kb, *p))
                            .map(|kb| kb as u32)
                            .collect()
                    },
                )?;
                Method::BlockSparse(std::sync::Arc::new(lut))
            }
        })
    }
}

/// The shared hash rule of the random block masks: keep iff hash(h, qb, kb) < p.
fn keep(h: u64, qb: u64, kb: u64, p: f64) -> bool {
    let x = (h << 40) | (qb << 20) | kb;
    let y = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    (y as f64) / ((1u64 << 53) as f64) < p
}

/// `anchor:theta=8,step=16` → the method.
fn parse_method(s: &str) -> Result<MethodSpec, String> {
    let (name, params) = s.split_once(':').unwrap_or((s, ""));
    if name == "blocks" {
        let (mut p, mut block) = (0.1, 128);
        for kv in params.split(',').filter(|x| !x.is_empty()) {
            match kv.split_once('=') {
                Some(("p", v)) => p = v.parse().map_err(|_| format!("`{kv}`: not a number"))?,
                Some(("block", v)) => {
                    block = v.parse().map_err(|_| format!("`{kv}`: not a number"))?
                }
                _ => return Err(format!("`{kv}`: blocks takes p=P,block=B")),
            }
        }
        return Ok(MethodSpec::RandomBlocks { p, block });
    }
    let m: Method = s.parse().map_err(|e| format!("{e}"))?;
    Ok(MethodSpec::Fixed(m))
}

/// `4096`, `4k`, `128K` → tokens.
fn parse_len(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mul) = match t.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => (t.as_str(), 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a positive length (e.g. 4096 or 4k)"))
}

/// One row of the results (also one JSON line).
#[derive(Serialize, Debug)]
struct Row {
    bench: &'static str,
    method: &'static str,
    /// The method as `--methods` named it.
    label: String,
    /// The method's parameters and the data.
    config: String,
    /// Fraction of causal pairs computed.
    density: Option<f64>,
    /// Per-stage GPU times of the median run.
    stages: Vec<(String, Option<f64>)>,
    /// Milliseconds of the pattern-choosing stages of the median run (SALE: quantize,
    /// estimate, compact; AnchorAttention: pool, select, compact).
    est_ms: Option<f64>,
    adapter: String,
    backend: String,
    tokens: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: &'static str,
    causal: bool,
    /// "ok", "skipped" or "error".
    status: String,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    median_ms: Option<f64>,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
    median_wall_ms: Option<f64>,
    tflops: Option<f64>,
    flops: f64,
    dispatches: Option<usize>,
    /// "timestamp" or "wall".
    timing: Option<String>,
    iters: usize,
    warmup: usize,
    samples_ms: Vec<f64>,
    build_ms: Option<f64>,
    upload_ms: Option<f64>,
}

fn main() {
    env_logger::init();
    let args = Args::parse();
    if let Err(e) = real_main(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn real_main(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if !matches!(args.dtype, DType::F16 | DType::F32) {
        return Err(format!("--dtype must be f16 or f32, not {}", args.dtype.name()).into());
    }
    let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
    let caps = ctx.capabilities();
    println!(
        "adapter: {} | backend: {}",
        ctx.adapter_name(),
        ctx.backend()
    );
    println!(
        "capabilities: f16={} subgroups={} coop_matrix_shapes={} timestamps={} max_storage_binding={} max_buffer={}",
        caps.f16,
        caps.subgroups,
        caps.coop_matrix.len(),
        caps.timestamps,
        caps.max_storage_binding,
        caps.max_buffer
    );
    if ctx.is_cpu() {
        println!(
            "warning: no GPU adapter, timing the CPU path (set WGSPARSE_REQUIRE_GPU=1 to fail instead)"
        );
    }

    if let Some(n) = args.check_len {
        let shape = AttentionShape::new(args.q_heads, args.kv_heads, n, args.head_dim);
        let tol = args
            .check_tol
            .unwrap_or(wgsparse::attention::verify::dense_tolerance(args.dtype));
        let t = Instant::now();
        let err = wgsparse::attention::verify::dense_against_cpu_twin(
            &ctx, shape, args.dtype, true, args.seed,
        )?
        .errors;
        let ok = err.max_abs_err <= tol;
        println!(
            "check {n} tokens ({} heads / {} kv heads, d {}, {}): max_abs_err {:.3e} rel_l2_err {:.3e} (tol {tol:.1e}) -> {} [{:.1} s]",
            args.q_heads,
            args.kv_heads,
            args.head_dim,
            args.dtype.name(),
            err.max_abs_err,
            err.rel_l2_err,
            if ok { "PASS" } else { "FAIL" },
            t.elapsed().as_secs_f64()
        );
        if !ok {
            return Err(format!("check failed at {n} tokens: {err:?} exceeds tol {tol:e}").into());
        }
        if args.check_only {
            return Ok(());
        }
    }

    let mut json = match &args.json {
        Some(p) => {
            Some(File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?)
        }
        None => None,
    };
    let mut rows: Vec<Row> = vec![];
    // (flops, wall ms of one run) of the last measured length, for the prediction.
    let mut last: Option<(f64, f64)> = None;
    let mut stop: Option<String> = None;
    let methods = args
        .methods
        .iter()
        .map(|m| parse_method(m))
        .collect::<Result<Vec<_>, _>>()?;
    // Per method: why it is no longer tried (it failed at a shorter length).
    let mut failed: Vec<Option<String>> = vec![None; methods.len()];
    for &n in &args.seq_lens {
        let shape = AttentionShape::new(args.q_heads, args.kv_heads, n, args.head_dim);
        let data = if stop.is_none() {
            let t = Instant::now();
            let d = inputs(&ctx, args, shape)?;
            println!(
                "{n:>7} tokens: {} inputs in {:.1} s",
                args.data,
                t.elapsed().as_secs_f64()
            );
            Some(d)
        } else {
            None
        };
        for (mi, (spec, label)) in methods.iter().zip(&args.methods).enumerate() {
            let method = &spec.resolve(&shape)?;
            let config = match spec {
                MethodSpec::Fixed(m) => serde_json::to_string(m)?,
                MethodSpec::RandomBlocks { p, block } => {
                    format!("random blocks p={p} block={block}")
                }
            };
            let mut row = Row {
                bench: "wgsparse",
                method: spec.name(),
                label: label.trim().to_string(),
                config: format!("{config} | data {}", args.data),
                density: None,
                stages: vec![],
                est_ms: None,
                adapter: ctx.adapter_name(),
                backend: ctx.backend().to_string(),
                tokens: n,
                q_heads: args.q_heads,
                kv_heads: args.kv_heads,
                head_dim: args.head_dim,
                dtype: args.dtype.name(),
                causal: true,
                status: "skipped".into(),
                note: None,
                median_ms: None,
                min_ms: None,
                max_ms: None,
                median_wall_ms: None,
                tflops: None,
                flops: shape.flops(true),
                dispatches: None,
                timing: None,
                iters: 0,
                warmup: 0,
                samples_ms: vec![],
                build_ms: None,
                upload_ms: None,
            };
            if stop.is_none()
                && let Some((f0, wall0)) = last
            {
                let predicted_s = wall0 * shape.flops(true) / f0 / 1e3;
                if predicted_s > args.budget_s {
                    stop = Some(format!(
                        "predicted {predicted_s:.1} s per run (quadratic from the previous length) > budget {} s",
                        args.budget_s
                    ));
                }
            }
            if let Some(why) = stop.as_ref().or(failed[mi].as_ref()) {
                println!("{n:>7} tokens {:<7} skipped ({why})", spec.name());
                row.note = Some(why.clone());
            } else {
                let (q, k, v) = data.as_ref().expect("inputs exist unless stopped");
                match bench_one(&ctx, args, shape, method, (q, k, v), &mut row) {
                    Ok(max_wall_ms) => {
                        row.status = "ok".into();
                        println!(
                            "{n:>7} tokens {:<7} median {:.3} ms ({}), {} dense-equiv. TFLOP/s, density {:.4}, {} dispatches, {} timed runs [build {:.0} ms, upload {:.0} ms]",
                            method.name(),
                            row.median_ms.unwrap_or(f64::NAN),
                            row.timing.as_deref().unwrap_or("?"),
                            fmt_tflops(row.tflops.unwrap_or(f64::NAN)),
                            row.density.unwrap_or(f64::NAN),
                            row.dispatches.unwrap_or(0),
                            row.iters,
                            row.build_ms.unwrap_or(f64::NAN),
                            row.upload_ms.unwrap_or(f64::NAN),
                        );
                        if std::ptr::eq(spec, &methods[0]) {
                            last = Some((
                                shape.flops(true),
                                row.median_wall_ms.unwrap_or(max_wall_ms),
                            ));
                        }
                        if max_wall_ms / 1e3 > args.budget_s {
                            stop = Some(format!(
                                "a run at {n} tokens took {:.1} s > budget {} s",
                                max_wall_ms / 1e3,
                                args.budget_s
                            ));
                        }
                    }
                    Err(e) => {
                        // This method is not tried at longer lengths; the others go on.
                        println!("{n:>7} tokens {:<7} error: {e}", spec.name());
                        row.status = "error".into();
                        row.note = Some(e.to_string());
                        failed[mi] = Some(format!("failed at {n} tokens"));
                    }
                }
            }
            if let Some(f) = json.as_mut() {
                writeln!(f, "{}", serde_json::to_string(&row)?)?;
                f.flush()?;
            }
            rows.push(row);
        }
    }

    println!();
    println!(
        "causal attention ({} data), {} q heads / {} kv heads, d {}, {}, on {} ({})",
        args.data,
        args.q_heads,
        args.kv_heads,
        args.head_dim,
        args.dtype.name(),
        ctx.adapter_name(),
        ctx.backend()
    );
    println!();
    println!(
        "| tokens | method | ms | speed-up vs dense | estimation ms (% of run, % of dense) | dense-equiv. TFLOP/s | density | dispatches | timing |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let dense_ms = rows
            .iter()
            .find(|d| d.tokens == r.tokens && d.method == "dense" && d.status == "ok")
            .and_then(|d| d.median_ms);
        match r.status.as_str() {
            "ok" => {
                let ms = r.median_ms.unwrap_or(f64::NAN);
                let est = match (r.est_ms, dense_ms) {
                    (Some(e), Some(d)) => {
                        format!("{e:.3} ({:.1} %, {:.1} %)", 100.0 * e / ms, 100.0 * e / d)
                    }
                    (Some(e), None) => format!("{e:.3} ({:.1} %)", 100.0 * e / ms),
                    _ => String::new(),
                };
                println!(
                    "| {} | {} | {:.3} | {} | {} | {} | {:.4} | {} | {} |",
                    r.tokens,
                    r.label,
                    ms,
                    dense_ms
                        .map(|d| format!("{:.2}x", d / ms))
                        .unwrap_or_default(),
                    est,
                    fmt_tflops(r.tflops.unwrap_or(f64::NAN)),
                    r.density.unwrap_or(f64::NAN),
                    r.dispatches.unwrap_or(0),
                    r.timing.as_deref().unwrap_or("?")
                )
            }
            s => println!("| {} | {} | {s} | | | | | | |", r.tokens, r.label),
        }
    }
    Ok(())
}

/// The inputs of one length: Gaussian (generated straight into the storage dtype) or
/// structured (see `wgsparse::attention::synthetic::structured_qkv_host`).
fn inputs(
    ctx: &Context,
    args: &Args,
    shape: AttentionShape,
) -> Result<(Tensor, Tensor, Tensor), Box<dyn std::error::Error>> {
    let seed = args
        .seed
        .wrapping_mul(1_000_003)
        .wrapping_add(shape.seq_len as u64);
    Ok(match args.data.as_str() {
        "gaussian" => wgsparse::attention::synthetic::qkv(ctx, &shape, args.dtype, seed)?,
        "structured" => {
            let st = wgsparse::attention::synthetic::Structure::default();
            let (q, k, v) = wgsparse::attention::synthetic::structured_qkv_host(&shape, &st, seed);
            wgsparse::attention::upload_qkv(ctx, &shape, &q, &k, &v, args.dtype)?
        }
        o => return Err(format!("--data {o}: expected gaussian or structured").into()),
    })
}

/// Times one method at one length; fills `row` and returns the longest single-run wall
/// time (ms).
fn bench_one(
    ctx: &Context,
    args: &Args,
    shape: AttentionShape,
    method: &Method,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    row: &mut Row,
) -> Result<f64, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let plan = ctx
        .attention(shape)
        .method(method.clone())
        .causal(true)
        .dtype(args.dtype)
        .build()?;
    row.build_ms = Some(t.elapsed().as_secs_f64() * 1e3);

    let t = Instant::now();
    let mut out = Tensor::zeros(ctx, &shape.q_dims(), args.dtype)?;
    row.upload_ms = Some(t.elapsed().as_secs_f64() * 1e3);

    let mut max_wall_ms: f64 = 0.0;
    let run = |out: &mut Tensor| -> Result<wgsparse::AttentionReport, Box<dyn std::error::Error>> {
        plan.run_into(q, k, v, out)?;
        Ok(plan.report().ok_or("the plan returned no report")?)
    };

    for _ in 0..args.warmup {
        let r = run(&mut out)?;
        row.warmup += 1;
        max_wall_ms = max_wall_ms.max(r.timing.wall_ms);
        if r.timing.wall_ms / 1e3 > args.budget_s {
            // Over budget already: this run is the measurement.
            record(row, &shape, &[r.ms()], &[r.timing.wall_ms], &r);
            return Ok(max_wall_ms);
        }
    }

    let start = Instant::now();
    let (mut ms, mut wall) = (vec![], vec![]);
    let mut last = None;
    for _ in 0..args.iters.max(1) {
        let r = run(&mut out)?;
        ms.push(r.ms());
        wall.push(r.timing.wall_ms);
        max_wall_ms = max_wall_ms.max(r.timing.wall_ms);
        last = Some(r);
        if max_wall_ms / 1e3 > args.budget_s || start.elapsed().as_secs_f64() > args.length_budget_s
        {
            break;
        }
    }
    let r = last.expect("at least one timed run");
    record(row, &shape, &ms, &wall, &r);
    Ok(max_wall_ms)
}

fn record(
    row: &mut Row,
    shape: &AttentionShape,
    ms: &[f64],
    wall: &[f64],
    r: &wgsparse::AttentionReport,
) {
    let med = median(ms);
    row.iters = ms.len();
    row.samples_ms = ms.to_vec();
    row.median_ms = Some(med);
    row.min_ms = ms.iter().copied().reduce(f64::min);
    row.max_ms = ms.iter().copied().reduce(f64::max);
    row.median_wall_ms = Some(median(wall));
    row.tflops = Some(shape.flops(true) / med / 1e9);
    row.dispatches = Some(r.dispatches);
    row.timing = Some(r.timing.timing.clone());
    row.density = Some(r.density);
    row.est_ms = r.estimation_ms();
    row.stages = r
        .timing
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.ms))
        .collect();
}

/// Two decimals, more for the tiny figures of software rasterizers.
fn fmt_tflops(t: f64) -> String {
    if t.abs() >= 1.0 || t == 0.0 || !t.is_finite() {
        format!("{t:.2}")
    } else {
        format!("{t:.2e}")
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}
