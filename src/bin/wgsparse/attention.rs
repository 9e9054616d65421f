//! `wgsparse attention`: one attention method on synthetic or real Q/K/V, per-stage
//! times, and with `--check` its quality against dense attention.

use std::fmt;

use clap::Parser;
use serde::Serialize;
use wgsparse::attention::budgets::HeadBudgets;
use wgsparse::attention::flash_cpu::naive_attention;
use wgsparse::attention::metrics::compare;
use wgsparse::attention::qkv_file::QkvFile;
use wgsparse::attention::select::oracle::oracle;
use wgsparse::attention::select::sale_calibrate::SaleThresholds;
use wgsparse::attention::synthetic::{Structure, structured_qkv_host};
use wgsparse::attention::upload_qkv;
use wgsparse::attention::verify::evaluate;
use wgsparse::{AttentionShape, Backend, Context, DType, Error, Method, Result, Tensor};

use crate::device;
use crate::report::{Check, emit, stage_lines, timed};
use wgsparse::AttentionReport;
use wgsparse::attention::MethodStats;
use wgsparse::runtime::StageTime;

#[derive(Parser, Clone)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub(crate) common: crate::device::CommonArgs,
    /// Algorithm: dense, anchor (AnchorAttention), window (sliding window + sinks),
    /// sale (SALE: low-bit estimation, 64 x 32 blocks) or proxy (ProxyAttn: pooled proxy
    /// scores, per-head budgets, 128 x 128 blocks).
    #[arg(long, default_value = "dense")]
    pub(crate) method: Method,
    /// SALE: Relative Attention Score threshold τ of every head (0 = dense).
    #[arg(long, conflicts_with = "thresholds")]
    pub(crate) tau: Option<f32>,
    /// SALE: per-head τ from `wgsparse calibrate` (the layer from --layer, from the
    /// Q/K/V file's `layer`, or the file's only layer).
    #[arg(long)]
    pub(crate) thresholds: Option<std::path::PathBuf>,
    /// ProxyAttn or SALE: fixed per-head budgets from `wgsparse budget` (the layer from
    /// --layer, from the Q/K/V file's `layer`, or the file's only layer); SALE then
    /// keeps each head's budget of blocks instead of testing --tau.
    #[arg(long, conflicts_with_all = ["thresholds", "tau"])]
    pub(crate) budgets: Option<std::path::PathBuf>,
    /// With --thresholds or --budgets: which layer of the file.
    #[arg(long)]
    pub(crate) layer: Option<usize>,
    /// SALE: estimation bits, 4 or 8.
    #[arg(long)]
    pub(crate) bits: Option<u32>,
    /// AnchorAttention: admission margin θ (natural-log logit units).
    #[arg(long)]
    pub(crate) theta: Option<f32>,
    /// AnchorAttention: pooled blocks per query group (16 = 2048 queries).
    #[arg(long)]
    pub(crate) step: Option<usize>,
    /// AnchorAttention: initial keys every query attends.
    #[arg(long)]
    pub(crate) init_keys: Option<usize>,
    /// ProxyAttn: share γ of a head's attention its budget must hold (0, 1].
    #[arg(long)]
    pub(crate) gamma: Option<f32>,
    /// ProxyAttn: proxy groups (must divide --kv-heads; 1 = one proxy for all heads).
    #[arg(long)]
    pub(crate) proxy_groups: Option<usize>,
    /// ProxyAttn: every stride-th query row of a block is scored by the proxy.
    #[arg(long)]
    pub(crate) stride: Option<usize>,
    /// ProxyAttn: fewest keys every query block keeps (whole 128-key blocks).
    #[arg(long)]
    pub(crate) min_budget: Option<usize>,
    /// Window method: keys per window.
    #[arg(long)]
    pub(crate) window: Option<usize>,
    /// Window method: leading sink keys every row attends.
    #[arg(long)]
    pub(crate) sinks: Option<usize>,
    /// Q/K/V file (safetensors with tensors q, k, v and a `source` label; see
    /// `wgsparse::qkv_file`); sets the shape. Without it, synthetic data.
    #[arg(long)]
    pub(crate) data: Option<std::path::PathBuf>,
    /// Non-finite values in `--data` (NaN, infinities, beyond f16's range for f16
    /// storage): `error` refuses the file, `zero` replaces them by 0 with a warning.
    #[arg(long, default_value = "error", value_parser = ["error", "zero"])]
    pub(crate) nonfinite: String,
    /// Synthetic data: `structured` (sinks, local band, heavy columns, RoPE) or
    /// `gaussian` (no structure).
    #[arg(long, default_value = "structured")]
    pub(crate) synthetic: String,
    /// Query rows (= keys for prefill).
    #[arg(long, default_value_t = 4096)]
    pub(crate) seq_len: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub(crate) q_heads: usize,
    /// Key/value heads (GQA when fewer than q-heads).
    #[arg(long, default_value_t = 8)]
    pub(crate) kv_heads: usize,
    /// Head dimension: a multiple of 16 up to 256 (64, 80, 96, 112, 128, 256 in real models).
    #[arg(long, default_value_t = 128)]
    pub(crate) head_dim: usize,
    /// Storage dtype: f16 or f32 (accumulation is always f32).
    #[arg(long, default_value = "f16")]
    pub(crate) dtype: DType,
    /// Attend to every key, not only the past ones (dense only).
    #[arg(long)]
    pub(crate) non_causal: bool,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) iters: usize,
    /// Dense: also run on the other device (CPU vs GPU) and print the errors. Sparse
    /// methods: density, attention-mass recall and output errors vs dense attention
    /// on the same device and data.
    #[arg(long)]
    pub(crate) check: bool,
    /// With --check: also the oracle densities for this attention-mass coverage
    /// (exact, on the CPU: slow beyond ~16k tokens).
    #[arg(long)]
    pub(crate) oracle: Option<f64>,
    #[command(flatten)]
    pub(crate) plan: device::PlanArgs,
}

impl AttentionArgs {
    /// The method with the command-line parameters applied (`data_layer`: the layer
    /// named by the Q/K/V file, for --thresholds).
    fn method(&self, data_layer: Option<usize>) -> Result<Method> {
        let sale_only = self.tau.is_some() || self.thresholds.is_some() || self.bits.is_some();
        if sale_only && !matches!(self.method, Method::Sale(_)) {
            return Err(Error::InvalidArgument(
                "--tau / --thresholds / --bits apply to --method sale".into(),
            ));
        }
        let proxy_only = self.gamma.is_some()
            || self.proxy_groups.is_some()
            || self.stride.is_some()
            || self.min_budget.is_some();
        if proxy_only && !matches!(self.method, Method::Proxy(_)) {
            return Err(Error::InvalidArgument(
                "--gamma / --proxy-groups / --stride / --min-budget apply to --method proxy".into(),
            ));
        }
        if self.layer.is_some() && self.thresholds.is_none() && self.budgets.is_none() {
            return Err(Error::InvalidArgument(
                "--layer picks a layer of --thresholds or --budgets".into(),
            ));
        }
        // The layer of a per-layer file: --layer, the Q/K/V file's, or the file's only.
        let pick = |path: &std::path::Path, layers: Vec<usize>| -> Result<usize> {
            match (self.layer, data_layer, layers.as_slice()) {
                (Some(l), _, _) | (None, Some(l), _) => Ok(l),
                (None, None, [only]) => Ok(*only),
                _ => Err(Error::InvalidArgument(format!(
                    "{} holds several layers: pick one with --layer",
                    path.display()
                ))),
            }
        };
        let method = match &self.method {
            Method::Sale(base) => {
                let mut c = base.clone();
                if let Some(t) = self.tau {
                    c.tau = t;
                }
                if let Some(b) = self.bits {
                    c.bits = b;
                }
                if let Some(path) = &self.thresholds {
                    let t = SaleThresholds::load(path)?;
                    let layer = pick(path, t.layers.iter().map(|l| l.layer).collect())?;
                    c = t.config_for(&c, layer)?;
                }
                Method::Sale(c)
            }
            Method::Anchor(base) => {
                let mut c = *base;
                if let Some(t) = self.theta {
                    c.theta = t;
                }
                if let Some(s) = self.step {
                    c.step = s;
                }
                if let Some(i) = self.init_keys {
                    c.init_keys = i;
                }
                Method::Anchor(c)
            }
            Method::Proxy(base) => {
                let mut c = base.clone();
                c.gamma = self.gamma.unwrap_or(c.gamma);
                c.groups = self.proxy_groups.unwrap_or(c.groups);
                c.stride = self.stride.unwrap_or(c.stride);
                c.min_budget = self.min_budget.unwrap_or(c.min_budget);
                Method::Proxy(c)
            }
            Method::Window(base) => {
                let mut w = *base;
                if let Some(x) = self.window {
                    w.window = x;
                }
                if let Some(x) = self.sinks {
                    w.sinks = x;
                }
                Method::Window(w)
            }
            m => {
                if self.theta.is_some() || self.window.is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "--theta / --window do not apply to --method {}",
                        m.name()
                    )));
                }
                m.clone()
            }
        };
        match &self.budgets {
            Some(path) => {
                let b = HeadBudgets::load(path)?;
                let layer = pick(path, b.layers.iter().map(|l| l.layer).collect())?;
                Ok(b.method_for(&method, layer)?)
            }
            None => Ok(method),
        }
    }

    /// Host Q/K/V, their shape, a label saying where they come from and the model
    /// layer they belong to (files that say so).
    pub fn data(&self) -> Result<(AttentionShape, HostQkv, String, Option<usize>)> {
        if let Some(path) = &self.data {
            let mut f = QkvFile::load(path)?;
            let label = f.describe();
            let layer = f.meta.get("layer").and_then(|l| l.parse().ok());
            if self.nonfinite == "zero" {
                let f16 = self.dtype == DType::F16;
                for (what, x) in [("Q", &mut f.q), ("K", &mut f.k), ("V", &mut f.v)] {
                    let n = wgsparse::error::zero_non_finite(x, f16);
                    if n > 0 {
                        log::warn!("{what}: {n} non-finite value(s) replaced by 0");
                        eprintln!(
                            "warning: {what} holds {n} non-finite value(s) ({}): replaced by 0 (--nonfinite zero)",
                            self.dtype.name()
                        );
                    }
                }
            }
            return Ok((f.shape, (f.q, f.k, f.v), label, layer));
        }
        let shape = AttentionShape::new(self.q_heads, self.kv_heads, self.seq_len, self.head_dim);
        shape.validate(!self.non_causal)?;
        Ok(match self.synthetic.as_str() {
            "structured" => (
                shape,
                structured_qkv_host(&shape, &Structure::default(), self.common.seed),
                "synthetic structured Q/K/V (sinks, local band, heavy columns, RoPE)".into(),
                None,
            ),
            "gaussian" => (
                shape,
                wgsparse::attention::synthetic::qkv_host(&shape, self.common.seed),
                "synthetic Gaussian Q/K/V (no attention structure)".into(),
                None,
            ),
            o => {
                return Err(Error::InvalidArgument(format!(
                    "--synthetic {o}: expected structured or gaussian"
                )));
            }
        })
    }
}

/// Host Q, K, V (f32).
pub type HostQkv = (Vec<f32>, Vec<f32>, Vec<f32>);

/// One measured run: the output and the median report.
pub struct Measured {
    pub(crate) out: Vec<f32>,
    pub(crate) ms: f64,
    pub(crate) report: wgsparse::AttentionReport,
}

pub fn measure(
    ctx: &Context,
    a: &AttentionArgs,
    method: &Method,
    shape: AttentionShape,
    qkv: &HostQkv,
    iters: usize,
) -> Result<Measured> {
    let grouped = ctx
        .attention(shape)
        .method(method.clone())
        .causal(!a.non_causal)
        .dtype(a.dtype)
        .build_grouped()?;
    let Some(plan) = grouped.single() else {
        // Tensors over the buffer limit: each run uploads, runs and reads back one head
        // group at a time (the report's time is the groups' kernels).
        let run = || grouped.run_host(&qkv.0, &qkv.1, &qkv.2);
        run()?; // warm-up
        let mut out = vec![];
        let t = timed(
            iters,
            |r: &AttentionReport| r.ms(),
            |_| {
                out = run()?;
                Ok(grouped.report().expect("ran"))
            },
        )?;
        return Ok(Measured {
            out,
            ms: t.ms,
            report: t.runs.into_iter().last().expect("one run"),
        });
    };
    let (q, k, v) = upload_qkv(ctx, &shape, &qkv.0, &qkv.1, &qkv.2, a.dtype)?;
    let mut out = Tensor::zeros(ctx, &shape.q_dims(), a.dtype)?;
    plan.run_into(&q, &k, &v, &mut out)?; // warm-up (pipeline creation, first touch)
    let t = timed(
        iters,
        |r: &AttentionReport| r.ms(),
        |_| {
            plan.run_into(&q, &k, &v, &mut out)?;
            Ok(plan.report().expect("ran"))
        },
    )?;
    Ok(Measured {
        out: out.to_f32_blocking()?,
        ms: t.ms,
        report: t.runs.into_iter().last().expect("one run"),
    })
}

/// Every selector method's statistics key (`anchor`, `sale`, …): `null` unless this
/// run's method filled it.
struct SelectorKeys(Option<MethodStats>);

impl Serialize for SelectorKeys {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeMap};
        let mut filled = match &self.0 {
            Some(st) => match serde_json::to_value(st).map_err(S::Error::custom)? {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            },
            None => serde_json::Map::new(),
        };
        let mut m = s.serialize_map(None)?;
        for method in Method::all().iter().filter(|m| m.manages_state()) {
            let v = filled
                .remove(method.name())
                .unwrap_or(serde_json::Value::Null);
            m.serialize_entry(method.name(), &v)?;
        }
        m.end()
    }
}

/// A sparse method against dense attention on the same device and data.
#[derive(Serialize)]
struct VsDense {
    attn_recall: f64,
    rel_l2_err: f64,
    max_abs_err: f64,
    tol_recall_01: f64,
    tol_recall_005: f64,
    dense_ms: f64,
    check_against: &'static str,
    #[serde(skip)]
    density: f64,
}

/// The oracle densities at one coverage.
#[derive(Serialize)]
struct OracleKeys {
    oracle_gamma: f64,
    oracle_row_density: f64,
    oracle_block_density: f64,
    #[serde(skip)]
    block_recall: f64,
}

/// What `wgsparse attention` reports (`--json`: these keys).
#[derive(Serialize)]
pub struct AttentionRun {
    backend: Backend,
    adapter: String,
    method: &'static str,
    config: Method,
    seq_len: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    causal: bool,
    /// Median milliseconds.
    ms: f64,
    density: f64,
    /// Dense-equivalent TFLOP/s.
    tflops: f64,
    timing: String,
    stages: Vec<StageTime>,
    dispatches: usize,
    data: String,
    est_ms: Option<f64>,
    #[serde(flatten)]
    selector: SelectorKeys,
    #[serde(flatten)]
    check: Option<Check>,
    #[serde(flatten)]
    vs_dense: Option<VsDense>,
    #[serde(flatten)]
    oracle: Option<OracleKeys>,
}

impl fmt::Display for AttentionRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} attention on {} ({}): {} q-heads / {} kv-heads x {} tokens x d={} {}{}",
            self.method,
            self.adapter,
            self.backend,
            self.q_heads,
            self.kv_heads,
            self.seq_len,
            self.head_dim,
            self.dtype.name(),
            if self.causal { ", causal" } else { "" }
        )?;
        writeln!(f, "  data: {}", self.data)?;
        stage_lines(f, &self.stages, 10, true)?;
        writeln!(
            f,
            "  median {:.3} ms ({} timing), {:.3} dense-equivalent TFLOP/s, density {:.4}",
            self.ms, self.timing, self.tflops, self.density
        )?;
        if let Some(st) = &self.selector.0 {
            writeln!(f, "  {st}")?;
        }
        if let Some(ms) = self.est_ms {
            writeln!(f, "  estimation {ms:.3} ms")?;
        }
        if let Some(c) = &self.check {
            write!(f, "{c}")?;
        }
        if let Some(q) = &self.vs_dense {
            writeln!(
                f,
                "  vs dense ({}): density {:.4}, attention-mass recall {:.4}, rel L2 err {:.3e}, max abs err {:.3e}, elementwise recall {:.4} (|err| < 0.01) / {:.4} (< 0.005)",
                self.data,
                q.density,
                q.attn_recall,
                q.rel_l2_err,
                q.max_abs_err,
                q.tol_recall_01,
                q.tol_recall_005
            )?;
            writeln!(
                f,
                "  dense on the same device: {:.3} ms -> speed-up {:.2}x",
                q.dense_ms,
                q.dense_ms / self.ms
            )?;
        }
        if let Some(o) = &self.oracle {
            writeln!(
                f,
                "  oracle at attention-mass coverage {}: per-row density {:.4}, per-block (64x64) density {:.4} (recall {:.4})",
                o.oracle_gamma, o.oracle_row_density, o.oracle_block_density, o.block_recall
            )?;
        }
        Ok(())
    }
}

/// `--dry-run`: the memory plan for the asked limits, printed; nothing allocated.
fn dry_run(a: &AttentionArgs) -> Result<()> {
    use wgsparse::attention::plan::plan_groups;
    let shape = match &a.data {
        Some(path) => QkvFile::load(path)?.shape,
        None => AttentionShape::new(a.q_heads, a.kv_heads, a.seq_len, a.head_dim),
    };
    let method = a.method(None)?;
    a.plan.print(a.common.backend, a.common.json, |lim| {
        plan_groups(&shape, &method, a.dtype, !a.non_causal, lim)
    })
}

pub fn run(a: &AttentionArgs) -> Result<()> {
    if a.plan.dry_run {
        return dry_run(a);
    }
    let ctx = device::context(a.common.backend, a.plan.caps)?;
    let (shape, qkv, data_label, data_layer) = a.data()?;
    let method = a.method(data_layer)?;
    let causal = !a.non_causal;
    let m = measure(&ctx, a, &method, shape, &qkv, a.iters)?;
    let check = if a.check && method == Method::Dense {
        let (other_out, other_name) = other_device_result(&ctx, a, shape, &qkv)?;
        Some(Check::new(compare(&m.out, &other_out), other_name))
    } else {
        None
    };
    let vs_dense = if a.check && method != Method::Dense {
        let e = evaluate(&ctx, shape, &method, a.dtype, (&qkv.0, &qkv.1, &qkv.2))?;
        let q = e.quality;
        Some(VsDense {
            attn_recall: q.attn_recall,
            rel_l2_err: q.rel_l2_err,
            max_abs_err: q.max_abs_err,
            tol_recall_01: q.tol_recall_01,
            tol_recall_005: q.tol_recall_005,
            dense_ms: e.dense_report.ms(),
            check_against: "dense attention, same device and data",
            density: q.density,
        })
    } else {
        None
    };
    let oracle = match a.oracle {
        Some(gamma) => {
            let scale = 1.0 / (shape.head_dim as f32).sqrt();
            let o = oracle(&shape, scale, &qkv.0, &qkv.1, gamma, 64, 64)?;
            Some(OracleKeys {
                oracle_gamma: gamma,
                oracle_row_density: o.row_density,
                oracle_block_density: o.block_density,
                block_recall: o.block_recall,
            })
        }
        None => None,
    };
    let r = m.report;
    let report = AttentionRun {
        backend: ctx.backend(),
        adapter: ctx.adapter_name(),
        method: method.name(),
        config: method.clone(),
        seq_len: shape.seq_len,
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        dtype: a.dtype,
        causal,
        ms: m.ms,
        density: r.density,
        tflops: shape.flops(causal) / m.ms / 1e9,
        est_ms: r.estimation_ms(),
        timing: r.timing.timing,
        stages: r.timing.stages,
        dispatches: r.dispatches,
        data: data_label,
        selector: SelectorKeys(r.stats),
        check,
        vs_dense,
        oracle,
    };
    emit(&report, a.common.json);
    Ok(())
}

/// The same problem on the other device: the CPU when we ran on a GPU, else the best GPU,
/// else (no GPU at all) the naive f64 reference for problems small enough for it.
fn other_device_result(
    ctx: &Context,
    a: &AttentionArgs,
    shape: AttentionShape,
    qkv: &HostQkv,
) -> Result<(Vec<f32>, String)> {
    if !ctx.is_cpu() {
        let m = measure(&Context::cpu(), a, &Method::Dense, shape, qkv, 1)?;
        return Ok((m.out, "cpu".into()));
    }
    if let Some(gpu) = device::other_gpu(a.plan.caps) {
        let m = measure(&gpu, a, &Method::Dense, shape, qkv, 1)?;
        return Ok((m.out, format!("gpu ({})", gpu.adapter_name())));
    }
    if shape.flops(!a.non_causal) > 2e10 {
        return Err(Error::InvalidArgument(
            "--check on the CPU needs a GPU, or a problem small enough for the naive reference"
                .into(),
        ));
    }
    let round = |x: &[f32]| a.dtype.round_trip(x);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let out = naive_attention(
        &shape,
        !a.non_causal,
        scale,
        &round(&qkv.0),
        &round(&qkv.1),
        &round(&qkv.2),
    );
    Ok((round(&out), "naive f64 reference (no GPU found)".into()))
}
