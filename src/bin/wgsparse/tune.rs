//! `wgsparse tune`: times every attention kernel tiling this device can run (dense,
//! causal, f16) per head_dim and stores the fastest matrix-unit tiling in the tuning
//! table, which later plans on this adapter prefer.

use std::fmt;

use clap::Args;
use serde::Serialize;
use wgsparse::attention::flash::{FlashKernel, KeyMode};
use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::tune::{TuneTable, adapter_key, default_path};
use wgsparse::attention::upload_qkv;
use wgsparse::{AttentionReport, AttentionShape, DType, Error, Result, Tensor};

use crate::device;
use crate::report::{emit, timed};

/// `wgsparse tune`.
#[derive(Args, Clone)]
pub struct TuneArgs {
    #[command(flatten)]
    common: device::CommonArgs,
    /// Head dimensions to tune, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    head_dims: Vec<usize>,
    /// Tokens of the timed problem (8 q-heads over 2 kv-heads).
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    /// Timed runs per candidate after one warm-up; the median counts.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// The tuning table to update (default: WGSPARSE_TUNE_FILE, else the user's cache).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// One timed candidate.
#[derive(Serialize)]
struct Timing {
    head_dim: usize,
    kernel: FlashKernel,
    ms: f64,
}

/// What `wgsparse tune` reports (`--json`: these keys).
#[derive(Serialize)]
pub struct TuneReport {
    adapter: String,
    file: String,
    timings: Vec<Timing>,
    /// The stored choice per head_dim.
    chosen: Vec<(usize, FlashKernel)>,
}

impl fmt::Display for TuneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "tuning {} -> {}", self.adapter, self.file)?;
        for t in &self.timings {
            writeln!(f, "  d={:<4} {:>10.3} ms  {:?}", t.head_dim, t.ms, t.kernel)?;
        }
        for (d, k) in &self.chosen {
            writeln!(f, "  d={d}: stored {k:?}")?;
        }
        Ok(())
    }
}

pub fn run(a: &TuneArgs) -> Result<()> {
    let ctx = device::context(a.common.backend, Default::default())?;
    let g = ctx
        .gpu()
        .ok_or_else(|| Error::InvalidArgument("tune needs a GPU context".into()))?;
    let path =
        a.out.clone().or_else(default_path).ok_or_else(|| {
            Error::InvalidArgument("no place for the tuning table: use --out".into())
        })?;
    let key = adapter_key(&g.info);
    let mut table = TuneTable::<FlashKernel>::load(&path)?;
    let mut timings = vec![];
    let mut chosen = vec![];
    for &d in &a.head_dims {
        let shape = AttentionShape::new(8, 2, a.seq_len, d);
        shape.validate(true)?;
        let (q, k, v) = qkv_host(&shape, a.common.seed);
        let (qt, kt, vt) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F16)?;
        let mut best: Option<(f64, FlashKernel)> = None;
        for kernel in FlashKernel::candidates(ctx.capabilities(), KeyMode::Range, DType::F16, d) {
            let plan = ctx
                .attention(shape)
                .dtype(DType::F16)
                .kernel(kernel)
                .build()?;
            let mut out = Tensor::zeros(&ctx, &shape.q_dims(), DType::F16)?;
            plan.run_into(&qt, &kt, &vt, &mut out)?; // warm-up
            let t = timed(
                a.iters,
                |r: &AttentionReport| r.ms(),
                |_| {
                    plan.run_into(&qt, &kt, &vt, &mut out)?;
                    Ok(plan.report().expect("ran"))
                },
            )?;
            if best.is_none_or(|(ms, _)| t.ms < ms) {
                best = Some((t.ms, kernel));
            }
            timings.push(Timing {
                head_dim: d,
                kernel,
                ms: t.ms,
            });
        }
        let (_, kernel) = best.expect("the portable kernel is always a candidate");
        table
            .adapters
            .entry(key.clone())
            .or_default()
            .insert(d, kernel);
        chosen.push((d, kernel));
    }
    table.save(&path)?;
    let report = TuneReport {
        adapter: key,
        file: path.display().to_string(),
        timings,
        chosen,
    };
    emit(&report, a.common.json);
    Ok(())
}
