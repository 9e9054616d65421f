//! `wgsparse eval`: quality of attention methods on a real model, per layer and head and
//! end to end.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::attention::budgets::HeadBudgets;
use wgsparse::attention::metrics::Quality;
use wgsparse::attention::select::anchor::AnchorConfig;
use wgsparse::attention::select::proxy::ProxyConfig;
use wgsparse::attention::select::sale::SaleConfig;
use wgsparse::attention::select::sale_calibrate::SaleThresholds;
use wgsparse::model::decoder::LayerQkv;
use wgsparse::model::eval::{EvalMethod, HeadQuality, end_to_end, layer_quality};
use wgsparse::{AttentionShape, Backend, Error, Method, Result, WindowConfig};

use crate::model::*;

/// `wgsparse eval`.
#[derive(Args, Clone)]
pub struct EvalArgs {
    /// A GGUF file (llama, qwen2, gemma3 or smallthinker; see scripts/fetch-models.sh).
    #[arg(long)]
    model: PathBuf,
    /// A UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Prefill tokens from the start of the text (BOS included when the model wants one).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens after the prefill whose NLL and greedy predictions are compared.
    #[arg(long, default_value_t = 128)]
    continuation: usize,
    /// Layers measured per head: comma-separated indices, `all` (every global attention
    /// layer) or `none` (end to end only). Sliding-window layers are not measured.
    #[arg(long, default_value = "all")]
    layers: String,
    /// Methods, comma-separated: dense, anchor, window, oracle, sale, proxy; or a method
    /// with its parameters (`anchor:theta=8`, `sale:tau=0.002,bits=8`,
    /// `proxy:gamma=0.9`), which the flags below then do not change.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dense,anchor,window,oracle"
    )]
    methods: Vec<String>,
    /// SALE's τ; several comma-separated values give one sale row each (ignored with
    /// --thresholds).
    #[arg(long, value_delimiter = ',', default_value = "0.004")]
    tau: Vec<f32>,
    /// SALE: calibrated per-head thresholds (`wgsparse calibrate`) instead of --tau.
    #[arg(long)]
    thresholds: Option<PathBuf>,
    /// SALE: estimation bits, 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// AnchorAttention's θ; several comma-separated values give one anchor row each.
    #[arg(long, value_delimiter = ',', default_value = "12")]
    theta: Vec<f32>,
    /// ProxyAttn's γ; several comma-separated values give one proxy row each.
    #[arg(long, value_delimiter = ',', default_value = "0.95")]
    gamma: Vec<f32>,
    /// ProxyAttn: fewest keys every query block keeps; several comma-separated values
    /// give one proxy row each (per γ).
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    min_budget: Vec<usize>,
    /// ProxyAttn: proxy groups (must divide the model's key heads).
    #[arg(long, default_value_t = 1)]
    proxy_groups: usize,
    /// Fixed per-head budgets (`wgsparse budget`): one proxy row per file (and per
    /// --min-budget), next to the rows that estimate budgets per prompt (γ), one SALE
    /// row per file, next to its threshold rows, and one oracle row per file (the
    /// heaviest 64 × 64 blocks within the budgets).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<PathBuf>,
    /// Window method: keys per window.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Window method: sink keys.
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Oracle: attention-mass coverage γ.
    #[arg(long, default_value_t = 0.95)]
    coverage: f64,
    /// Skip the end-to-end prefill runs (per-layer figures only).
    #[arg(long)]
    no_end_to_end: bool,
    /// Where attention runs: auto, vulkan, metal, dx12, gl or cpu (default cpu; also
    /// WGSPARSE_BACKEND). Projections run on the CPU either way.
    #[arg(long)]
    backend: Option<Backend>,
    /// Print one JSON object (`rows`: per layer and head, `end_to_end`) instead of tables.
    #[arg(long)]
    json: bool,
}

/// The `--methods` list: `oracle` (eval's own), or any [`Method`] spec
/// (`anchor:theta=8`, `window:window=1024,sinks=4`, `sale:tau=0.002`). A name without
/// parameters takes them from the flags: one anchor row per `--theta`, one sale row per
/// `--tau` (or the calibrated `--thresholds`), the window from `--window`/`--sinks`.
fn eval_methods(a: &EvalArgs) -> Result<Vec<EvalMethod>> {
    let mut out = Vec::new();
    // Each budgets file, read once for every method that runs under it.
    let budgets: Vec<std::sync::Arc<HeadBudgets>> = a
        .budgets
        .iter()
        .map(|p| HeadBudgets::load(p).map(std::sync::Arc::new))
        .collect::<Result<_>>()?;
    for spec in &a.methods {
        let spec = spec.trim();
        if spec == "oracle" {
            if !(a.coverage > 0.0 && a.coverage <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "--coverage {} not in (0, 1]",
                    a.coverage
                )));
            }
            out.push(EvalMethod::Oracle {
                coverage: a.coverage,
            });
            for b in &budgets {
                out.push(EvalMethod::OracleBudgets(b.clone()));
            }
            continue;
        }
        let method: Method = spec.parse().map_err(|e| {
            Error::InvalidArgument(format!(
                "unknown eval method `{spec}` (known: oracle and every --method spec: {e})"
            ))
        })?;
        let from_flags = !spec.contains(':');
        match method {
            Method::Dense => out.push(EvalMethod::Dense),
            Method::Anchor(c) if from_flags => {
                for &theta in &a.theta {
                    out.push(EvalMethod::Anchor(AnchorConfig { theta, ..c }));
                }
            }
            Method::Anchor(c) => out.push(EvalMethod::Anchor(c)),
            Method::Window(_) if from_flags => out.push(EvalMethod::Window(WindowConfig {
                window: a.window,
                sinks: a.sinks,
            })),
            Method::Window(w) => out.push(EvalMethod::Window(w)),
            Method::Proxy(c) if from_flags => {
                for &gamma in &a.gamma {
                    for &min_budget in &a.min_budget {
                        out.push(EvalMethod::Proxy {
                            cfg: ProxyConfig {
                                gamma,
                                min_budget,
                                groups: a.proxy_groups,
                                ..c.clone()
                            },
                            budgets: None,
                        });
                    }
                }
                for b in &budgets {
                    for &min_budget in &a.min_budget {
                        out.push(EvalMethod::Proxy {
                            cfg: ProxyConfig {
                                min_budget,
                                groups: a.proxy_groups,
                                block: b.block,
                                ..c.clone()
                            },
                            budgets: Some(b.clone()),
                        });
                    }
                }
            }
            Method::Proxy(c) => out.push(EvalMethod::Proxy {
                cfg: c,
                budgets: None,
            }),
            Method::Sale(c) => {
                let base = if from_flags {
                    SaleConfig { bits: a.bits, ..c }
                } else {
                    c
                };
                if let Some(path) = &a.thresholds {
                    out.push(EvalMethod::Sale {
                        cfg: base.clone(),
                        thresholds: Some(std::sync::Arc::new(SaleThresholds::load(path)?)),
                        budgets: None,
                    });
                } else if from_flags {
                    for &tau in &a.tau {
                        let cfg = SaleConfig {
                            tau,
                            ..base.clone()
                        };
                        out.push(EvalMethod::Sale {
                            cfg,
                            thresholds: None,
                            budgets: None,
                        });
                    }
                } else {
                    out.push(EvalMethod::Sale {
                        cfg: base.clone(),
                        thresholds: None,
                        budgets: None,
                    });
                }
                if from_flags {
                    for b in &budgets {
                        out.push(EvalMethod::Sale {
                            cfg: base.clone(),
                            thresholds: None,
                            budgets: Some(b.clone()),
                        });
                    }
                }
            }
            m => {
                return Err(Error::InvalidArgument(format!(
                    "eval does not run `{}` (known: dense, anchor, window, oracle, sale, proxy)",
                    m.name()
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument("no --methods given".into()));
    }
    for m in &out {
        match m {
            EvalMethod::Anchor(c) => c.validate()?,
            EvalMethod::Sale { cfg, .. } => cfg.validate()?,
            // The parts that do not depend on the model (groups vs its key heads are
            // checked per layer).
            EvalMethod::Proxy { cfg: c, .. } => c.validate(&AttentionShape::new(
                c.groups.max(1),
                c.groups.max(1),
                c.block,
                64,
            ))?,
            EvalMethod::Window(w) if w.window == 0 => {
                return Err(Error::InvalidArgument("--window must be ≥ 1".into()));
            }
            _ => {}
        }
    }
    Ok(out)
}

pub fn eval_layers(spec: &str, global: &[bool]) -> Result<Vec<usize>> {
    match spec.trim() {
        "all" => return Ok((0..global.len()).filter(|&l| global[l]).collect()),
        "none" => return Ok(Vec::new()),
        _ => {}
    }
    let mut out = Vec::new();
    for p in spec.split(',') {
        let l: usize = p.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "--layers: `{p}` is not a layer index, `all` or `none`"
            ))
        })?;
        if l >= global.len() {
            return Err(Error::InvalidArgument(format!(
                "layer {l} does not exist ({} layers)",
                global.len()
            )));
        }
        if !global[l] {
            return Err(Error::InvalidArgument(format!(
                "layer {l} is a sliding-window layer; eval measures global attention layers"
            )));
        }
        out.push(l);
    }
    Ok(out)
}

fn f(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "–".into())
}

/// Quality of attention methods on a real model's layers and end to end.
pub fn run(a: &EvalArgs) -> Result<()> {
    let methods = eval_methods(a)?;
    let m_args = ModelArgs {
        model: a.model.clone(),
        method: Method::Dense,
        backend: a.backend,
        engine: wgsparse::model::engine::EngineKind::Cpu,
        thresholds: None,
        budgets: None,
        exact: false,
        max_resident_mb: None,
        prefill_chunk: None,
    };
    let (tok, dec) = load_decoder(&m_args)?;
    let layers = eval_layers(&a.layers, &dec.cfg.global)?;
    if layers.is_empty() && a.no_end_to_end {
        return Err(Error::InvalidArgument(
            "--layers none with --no-end-to-end leaves nothing to measure".into(),
        ));
    }
    if a.continuation == 0 && !a.no_end_to_end {
        return Err(Error::InvalidArgument("--continuation must be ≥ 1".into()));
    }
    let total = a.tokens + if a.no_end_to_end { 0 } else { a.continuation };
    if total > dec.cfg.ctx_len {
        return Err(Error::InvalidArgument(format!(
            "{} prefill + {} continuation tokens exceed the model's {}-token context",
            a.tokens,
            total - a.tokens,
            dec.cfg.ctx_len
        )));
    }
    let ids = text_ids(&tok, &a.text, total)?;
    let c = dec.cfg.clone();
    let scale = dec.attention_scale();
    let ctx = dec.context().clone();
    let text_name = a
        .text
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let model_name = a
        .model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!(
        "eval: {model_name} on {text_name}, prefill {} tokens, continuation {}, layers {:?}, attention on {}",
        a.tokens,
        if a.no_end_to_end { 0 } else { a.continuation },
        layers,
        ctx.backend()
    );
    let t0 = Instant::now();
    let steps = layers.len()
        + if a.no_end_to_end {
            0
        } else {
            methods.len() + 1
        };
    let progress = crate::progress::Progress::new(steps as u64, "eval", a.json);
    let mut quality = Vec::new();
    let mut observe = |l: &LayerQkv<'_>| -> Result<()> {
        if layers.contains(&l.layer) {
            let shape = AttentionShape::new(c.n_head, c.n_kv_head, l.tokens, c.head_dim);
            let rows = layer_quality(&ctx, l.layer, &shape, scale, (l.q, l.k, l.v), &methods)?;
            progress.step(&format!(
                "layer {} measured ({:.1} s)",
                l.layer,
                t0.elapsed().as_secs_f64()
            ));
            quality.extend(rows);
        }
        Ok(())
    };
    let e2e = if a.no_end_to_end {
        // Only the layers up to the last measured one need to run.
        let last = layers.iter().max().map_or(0, |&l| l + 1);
        dec.observe_layers(&ids[..a.tokens], last, &mut observe)?;
        Vec::new()
    } else {
        end_to_end(
            &dec,
            &ids,
            a.tokens,
            a.continuation,
            &methods,
            &mut observe,
            &mut |r| {
                progress.step(&format!(
                    "end to end: {} done ({:.1} s)",
                    r.method,
                    t0.elapsed().as_secs_f64()
                ));
            },
        )?
    };
    progress.finish();
    if a.json {
        let report = serde_json::json!({
            "model": model_name, "text": text_name, "tokens": a.tokens,
            "continuation": if a.no_end_to_end { 0 } else { a.continuation },
            "backend": ctx.backend(), "rows": quality, "end_to_end": e2e,
        });
        println!("{report}");
        return Ok(());
    }
    println!(
        "\n## {model_name}, {text_name}, {} prefill tokens, attention on {}\n",
        a.tokens,
        ctx.backend()
    );
    if !quality.is_empty() {
        print_quality(&quality, &methods);
    }
    if !e2e.is_empty() {
        println!(
            "\nEnd to end: NLL of the next {} tokens after a {}-token prefill with the method in every global attention layer (continuation dense):\n",
            a.continuation, a.tokens
        );
        println!("| method | NLL (nats) | ppl | ΔNLL vs dense | top-1 agreement | prefill s |");
        println!("|---|---|---|---|---|---|");
        for r in &e2e {
            println!(
                "| {} | {:.4} | {:.3} | {:+.4} | {:.4} | {:.1} |",
                r.method, r.nll, r.ppl, r.nll_delta, r.top1_agreement, r.prefill_s
            );
        }
    }
    Ok(())
}

/// Prints the per-layer and the mean quality tables (markdown).
fn print_quality(quality: &[HeadQuality], methods: &[EvalMethod]) {
    println!("Per layer (all heads pooled; per-head min–max of the attention-mass recall):\n");
    println!(
        "| layer | method | density | oracle row density | mass recall | recall min–max over heads | rel L2 err | tol. recall (<0.01) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in quality.iter().filter(|r| r.head.is_none()) {
        let heads = quality
            .iter()
            .filter(|h| h.head.is_some() && h.layer == r.layer && h.method == r.method);
        let (lo, hi) = heads.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), h| {
            (lo.min(h.quality.attn_recall), hi.max(h.quality.attn_recall))
        });
        println!(
            "| {} | {} | {:.4} | {} | {:.4} | {lo:.4}–{hi:.4} | {:.2e} | {:.4} |",
            r.layer,
            r.method,
            r.quality.density,
            f(r.oracle_row_density),
            r.quality.attn_recall,
            r.quality.rel_l2_err,
            r.quality.tol_recall_01
        );
    }
    println!("\nMean over the measured layers:\n");
    println!(
        "| method | density | mass recall | worst head recall | rel L2 err | tol. recall (<0.01) |"
    );
    println!("|---|---|---|---|---|---|");
    for m in methods {
        let label = m.label();
        let ls: Vec<_> = quality
            .iter()
            .filter(|r| r.head.is_none() && r.method == label)
            .collect();
        let worst = quality
            .iter()
            .filter(|r| r.head.is_some() && r.method == label)
            .map(|r| r.quality.attn_recall)
            .fold(f64::INFINITY, f64::min);
        let k = ls.len().max(1) as f64;
        let mean = |g: &dyn Fn(&Quality) -> f64| ls.iter().map(|r| g(&r.quality)).sum::<f64>() / k;
        println!(
            "| {label} | {:.4} | {:.4} | {worst:.4} | {:.2e} | {:.4} |",
            mean(&|q| q.density),
            mean(&|q| q.attn_recall),
            mean(&|q| q.rel_l2_err),
            mean(&|q| q.tol_recall_01)
        );
    }
}
