//! Quality of the attention methods on a real model (`wgsparse eval`):
//!
//! - **per layer and head**: on a layer's real post-RoPE Q/K/V (from a dense prefill),
//!   each method against dense attention on the same inputs: density, attention-mass
//!   recall, output relative L2 error, tolerance recall ([`crate::attention::metrics::Quality`]).
//!   Every head runs as its own one-head attention (its K/V head under GQA), so the
//!   figures are per head; the layer figures pool the heads' outputs and row states.
//!   The oracle is the per-block oracle LUT at coverage γ ([`crate::attention::select::oracle`]),
//!   run by the block-sparse executor; its per-row oracle density comes with it.
//! - **end to end**: the mean next-token NLL (and perplexity) of a continuation of `M`
//!   tokens after a prefill of `N` tokens done with the method in every global layer
//!   (sliding-window layers keep their window), against a dense prefill, and the top-1 agreement
//!   of the two runs' next-token predictions over the continuation. The continuation
//!   itself runs dense (a chunked prefill over the cache the sparse prefill left); the
//!   first of its `M` predictions comes from the prefill's last row.

use serde::Serialize;

use crate::attention::budgets::HeadBudgets;
use crate::attention::metrics::Quality;
use crate::attention::select::anchor::AnchorConfig;
use crate::attention::select::oracle::{oracle, oracle_top_k};
use crate::attention::select::proxy::ProxyConfig;
use crate::attention::select::sale::SaleConfig;
use crate::attention::select::sale_calibrate::SaleThresholds;
use crate::attention::{AttentionShape, Method, RowState, WindowConfig, upload_qkv};
use crate::error::{Error, Result};
use crate::model::decoder::{Decoder, LayerQkv, argmax, token_nll};
use crate::runtime::context::Context;
use crate::runtime::tensor::{DType, Tensor};

/// Block size of the oracle LUT (the block-sparse executor's 64 × 64 blocks).
pub const ORACLE_BLOCK: usize = 64;

/// A method as `wgsparse eval` compares it.
#[derive(Clone, Debug, PartialEq)]
pub enum EvalMethod {
    /// Dense attention (the reference; its rows are exact by construction).
    Dense,
    /// AnchorAttention with this configuration.
    Anchor(AnchorConfig),
    /// Sliding window with sinks.
    Window(WindowConfig),
    /// The per-block oracle at this coverage γ, computed from each layer's own Q/K.
    Oracle {
        /// Attention-mass coverage γ in (0, 1].
        coverage: f64,
    },
    /// The block oracle under per-head budgets: each query block keeps its head's
    /// budget of the 64 × 64 key blocks holding the most exact attention mass (the
    /// best choice of such blocks under those budgets; a selector with finer blocks or
    /// a local window can do better, EVALUATION.md).
    OracleBudgets(std::sync::Arc<HeadBudgets>),
    /// ProxyAttn (run on the whole layer: its proxy pools the heads; the per-head rows
    /// are slices of that run), estimating its per-head budgets or under fixed ones.
    Proxy {
        /// Its parameters (γ, groups, stride, block, minimum budget).
        cfg: ProxyConfig,
        /// Per-layer, per-head budgets (`wgsparse budget`) instead of the per-prompt
        /// estimate; every measured layer must be in the file.
        budgets: Option<std::sync::Arc<HeadBudgets>>,
    },
    /// SALE with one τ for every head, with calibrated per-layer, per-head τ, or under
    /// fixed per-head budgets.
    Sale {
        /// Bits, blocks, local window, and τ when neither file is given.
        cfg: SaleConfig,
        /// Calibrated thresholds (`wgsparse calibrate`); every measured layer must be in
        /// the file.
        thresholds: Option<std::sync::Arc<SaleThresholds>>,
        /// Per-layer, per-head budgets (`wgsparse budget`) instead of a threshold;
        /// every measured layer must be in the file.
        budgets: Option<std::sync::Arc<HeadBudgets>>,
    },
}

impl EvalMethod {
    /// A short label naming the method and its parameters, e.g. `anchor θ=12`.
    pub fn label(&self) -> String {
        match self {
            EvalMethod::Dense => "dense".into(),
            EvalMethod::Anchor(c) => format!("anchor θ={}", c.theta),
            EvalMethod::Window(w) => format!("window {}+{} sinks", w.window, w.sinks),
            EvalMethod::Oracle { coverage } => format!("oracle γ={coverage}"),
            EvalMethod::OracleBudgets(b) => format!(
                "oracle top-k {} budgets (mean {:.3})",
                b.allocation,
                b.mean_budget()
            ),
            EvalMethod::Proxy { cfg: c, budgets } => {
                let mut s = match budgets {
                    None => format!("proxy γ={}", c.gamma),
                    Some(b) => format!(
                        "proxy {} budgets (mean {:.3})",
                        b.allocation,
                        b.mean_budget()
                    ),
                };
                let d = ProxyConfig::default();
                if c.min_budget != d.min_budget {
                    s += &format!(" min {}", c.min_budget);
                }
                if c.groups != d.groups {
                    s += &format!(" g={}", c.groups);
                }
                s
            }
            EvalMethod::Sale {
                cfg,
                budgets: Some(b),
                ..
            } => format!(
                "sale {} budgets (mean {:.3}) int{}",
                b.allocation,
                b.mean_budget(),
                cfg.bits
            ),
            EvalMethod::Sale {
                cfg,
                thresholds: Some(t),
                ..
            } => format!("sale calibrated (budget {}) int{}", t.budget, cfg.bits),
            EvalMethod::Sale { cfg, .. } => format!("sale τ={} int{}", cfg.tau, cfg.bits),
        }
    }

    /// The crate method that runs it on one attention of `layer` (`shape`, this Q/K,
    /// whose q heads are the layer's heads `heads`): the oracle computes its block LUT
    /// here, calibrated SALE picks those heads' τ. Also returns the per-row oracle
    /// density for the oracle.
    pub fn method_for(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        shape: &AttentionShape,
        scale: f32,
        q: &[f32],
        k: &[f32],
    ) -> Result<(Method, Option<f64>)> {
        Ok(match self {
            EvalMethod::Dense => (Method::Dense, None),
            EvalMethod::Anchor(c) => (Method::Anchor(*c), None),
            EvalMethod::Window(w) => (Method::Window(*w), None),
            EvalMethod::Proxy { cfg, budgets } => {
                let cfg = match budgets {
                    None => cfg.clone(),
                    Some(b) => b.proxy_for(cfg, layer)?,
                };
                // ProxyAttn runs on whole layers: `heads` is every head of `shape`.
                if heads != (0..shape.q_heads) {
                    return Err(Error::InvalidArgument(format!(
                        "proxy runs on a whole layer, heads {heads:?} of {} asked",
                        shape.q_heads
                    )));
                }
                (Method::Proxy(cfg), None)
            }
            EvalMethod::Sale {
                cfg,
                thresholds,
                budgets,
            } => {
                // The layer's budgets or calibrated τ, cut to these heads.
                let all = match (budgets, thresholds) {
                    (Some(b), _) => b.sale_for(cfg, layer)?,
                    (None, Some(t)) => t.config_for(cfg, layer)?,
                    (None, None) => return Ok((Method::Sale(cfg.clone()), None)),
                };
                let n = (all.head_budget.as_ref().or(all.head_tau.as_ref())).map_or(0, Vec::len);
                (
                    Method::Sale(all).for_heads(n, heads.start, heads.end)?,
                    None,
                )
            }
            EvalMethod::OracleBudgets(b) => {
                let all = b.layer_budgets(layer)?;
                let mine = all.get(heads.clone()).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "heads {heads:?} of {} budgets in layer {layer}",
                        all.len()
                    ))
                })?;
                let lut = oracle_top_k(shape, scale, (q, k), mine, ORACLE_BLOCK, ORACLE_BLOCK)?;
                (Method::BlockSparse(std::sync::Arc::new(lut)), None)
            }
            EvalMethod::Oracle { coverage } => {
                let o = oracle(shape, scale, q, k, *coverage, ORACLE_BLOCK, ORACLE_BLOCK)?;
                (
                    Method::BlockSparse(std::sync::Arc::new(o.block_lut)),
                    Some(o.row_density),
                )
            }
        })
    }
}

/// One method on one head (or on the whole layer when `head` is `None`).
#[derive(Clone, Debug, Serialize)]
pub struct HeadQuality {
    /// Layer index.
    pub layer: usize,
    /// Query head; `None` for the layer's pooled figures.
    pub head: Option<usize>,
    /// [`EvalMethod::label`].
    pub method: String,
    /// Density, attention-mass recall, errors, tolerance recalls vs dense.
    #[serde(flatten)]
    pub quality: Quality,
    /// The per-row oracle's density (oracle only).
    pub oracle_row_density: Option<f64>,
}

/// A plan of `method` for one attention with its inputs uploaded (f32) and a
/// NaN-poisoned output.
struct Prepared {
    plan: crate::attention::AttentionPlan,
    qkv: [Tensor; 3],
    out: Tensor,
}

fn prepare(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    scale: f32,
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<Prepared> {
    let (q, k, v) = upload_qkv(ctx, &shape, qkv.0, qkv.1, qkv.2, DType::F32)?;
    let plan = ctx
        .attention(shape)
        .method(method.clone())
        .dtype(DType::F32)
        .scale(scale)
        .build()?;
    let out = Tensor::filled(ctx, &shape.q_dims(), DType::F32, f32::NAN)?;
    Ok(Prepared {
        plan,
        qkv: [q, k, v],
        out,
    })
}

/// Runs `method` on one attention and returns its output, its final row state (m, l)
/// per row, and its density.
fn run_rows(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    scale: f32,
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>, f64)> {
    let Prepared {
        plan,
        qkv: [qt, kt, vt],
        mut out,
    } = prepare(ctx, shape, method, scale, qkv)?;
    let ml = if method.manages_state() {
        plan.run_into(&qt, &kt, &vt, &mut out)?;
        pollster::block_on(plan.row_stats())?
            .ok_or_else(|| Error::InvalidArgument("the plan kept no row state".into()))?
    } else {
        let mut st = RowState::empty(ctx, &shape)?;
        plan.run_with_state(&qt, &kt, &vt, &mut out, &mut st)?;
        st.ml.to_f32_blocking()?
    };
    let density = plan
        .report()
        .ok_or_else(|| Error::InvalidArgument("the plan kept no report".into()))?
        .density;
    Ok((out.to_f32_blocking()?, ml, density))
}

/// A whole-layer run: output, final (m, l) and each head's density.
type LayerRun = (Vec<f32>, Vec<f32>, Vec<f64>);

/// Runs a method that needs every head at once ([`EvalMethod::Proxy`]) on the whole
/// layer: its output, final (m, l) and each head's density.
fn run_layer(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    scale: f32,
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<LayerRun> {
    let Prepared {
        plan,
        qkv: [qt, kt, vt],
        mut out,
    } = prepare(ctx, shape, method, scale, qkv)?;
    plan.run_into(&qt, &kt, &vt, &mut out)?;
    let ml = pollster::block_on(plan.row_stats())?
        .ok_or_else(|| Error::InvalidArgument("the plan kept no row state".into()))?;
    let luts = pollster::block_on(plan.selected_pattern())?
        .ok_or_else(|| Error::InvalidArgument("the plan kept no pattern".into()))?;
    let causal = AttentionShape::new(1, 1, shape.seq_len, shape.head_dim).pairs(true);
    let density = (0..shape.q_heads)
        .map(|h| luts.iter().map(|l| l.head_pairs(h, true)).sum::<u64>() as f64 / causal)
        .collect();
    Ok((out.to_f32_blocking()?, ml, density))
}

/// Per-head and per-layer quality of `methods` against dense on one layer's causal
/// self-attention: `q` `[q_heads, n, d]`, `k`/`v` `[kv_heads, n, d]` (post-RoPE).
/// Returns, per method, the layer's pooled row (`head: None`) followed by one row per
/// head. A [`EvalMethod::Dense`] entry is measured too (its errors are 0).
pub fn layer_quality(
    ctx: &Context,
    layer: usize,
    shape: &AttentionShape,
    scale: f32,
    qkv: (&[f32], &[f32], &[f32]),
    methods: &[EvalMethod],
) -> Result<Vec<HeadQuality>> {
    let (n, d) = (shape.seq_len, shape.head_dim);
    if shape.kv_len != n || shape.kv_heads == 0 || !shape.q_heads.is_multiple_of(shape.kv_heads) {
        return Err(Error::InvalidShape(format!(
            "layer quality needs square causal attention with whole GQA groups, got {shape:?}"
        )));
    }
    let (q, k, v) = qkv;
    if q.len() != shape.q_heads * n * d || k.len() != shape.kv_heads * n * d || v.len() != k.len() {
        return Err(Error::Mismatch(format!(
            "Q/K/V lengths {}/{}/{} do not fit {shape:?}",
            q.len(),
            k.len(),
            v.len()
        )));
    }
    let group = shape.q_heads / shape.kv_heads;
    let one = AttentionShape::new(1, 1, n, d);
    // Per head: dense output and row state, then each method's.
    struct Acc {
        out: Vec<f32>,
        ml: Vec<f32>,
        density: f64,
        row_density: f64,
    }
    let mut dense_out = Vec::with_capacity(q.len());
    let mut dense_ml = Vec::with_capacity(shape.q_heads * n * 2);
    let mut acc: Vec<Acc> = methods
        .iter()
        .map(|_| Acc {
            out: Vec::with_capacity(q.len()),
            ml: Vec::with_capacity(shape.q_heads * n * 2),
            density: 0.0,
            row_density: 0.0,
        })
        .collect();
    let mut rows = Vec::new();
    let mut per_head: Vec<Vec<HeadQuality>> = vec![Vec::new(); methods.len()];
    // Methods that pool the heads run once on the whole layer.
    let whole: Vec<Option<LayerRun>> = methods
        .iter()
        .map(|m| match m {
            EvalMethod::Proxy { .. } => {
                let (method, _) = m.method_for(layer, 0..shape.q_heads, shape, scale, q, k)?;
                run_layer(ctx, *shape, &method, scale, qkv).map(Some)
            }
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    for h in 0..shape.q_heads {
        let kvh = h / group;
        let qh = &q[h * n * d..(h + 1) * n * d];
        let kh = &k[kvh * n * d..(kvh + 1) * n * d];
        let vh = &v[kvh * n * d..(kvh + 1) * n * d];
        let (dout, dml, _) = run_rows(ctx, one, &Method::Dense, scale, (qh, kh, vh))?;
        for (mi, m) in methods.iter().enumerate() {
            let (out, ml, density, row_density) = match &whole[mi] {
                Some((out, ml, density)) => (
                    out[h * n * d..(h + 1) * n * d].to_vec(),
                    ml[h * n * 2..(h + 1) * n * 2].to_vec(),
                    density[h],
                    None,
                ),
                None => {
                    let (method, row_density) =
                        m.method_for(layer, h..h + 1, &one, scale, qh, kh)?;
                    let (out, ml, density) = run_rows(ctx, one, &method, scale, (qh, kh, vh))?;
                    (out, ml, density, row_density)
                }
            };
            per_head[mi].push(HeadQuality {
                layer,
                head: Some(h),
                method: m.label(),
                quality: Quality::measure(density, &out, &ml, &dout, &dml),
                oracle_row_density: row_density,
            });
            let a = &mut acc[mi];
            a.out.extend_from_slice(&out);
            a.ml.extend_from_slice(&ml);
            a.density += density / shape.q_heads as f64;
            a.row_density += row_density.unwrap_or(0.0) / shape.q_heads as f64;
        }
        dense_out.extend_from_slice(&dout);
        dense_ml.extend_from_slice(&dml);
    }
    for (mi, m) in methods.iter().enumerate() {
        let a = &acc[mi];
        rows.push(HeadQuality {
            layer,
            head: None,
            method: m.label(),
            // Every head has the same number of causal pairs: the layer density is
            // the mean of the heads'.
            quality: Quality::measure(a.density, &a.out, &a.ml, &dense_out, &dense_ml),
            oracle_row_density: matches!(m, EvalMethod::Oracle { .. }).then_some(a.row_density),
        });
        rows.append(&mut per_head[mi]);
    }
    Ok(rows)
}

/// The next-token distribution rows of a prefill-then-continuation run.
struct Continuation {
    /// Mean NLL (nats) of the `m` continuation tokens.
    nll: f64,
    /// Greedy predictions of the `m` positions.
    top1: Vec<u32>,
    /// Seconds of the prefill.
    prefill_s: f64,
}

/// Prefill `ids[..n]` with `method` (every layer; the oracle per layer from its own Q/K),
/// then run `ids[n..n + m - 1]` dense over the cache and score `ids[n..n + m]`.
fn continuation(
    dec: &Decoder,
    ids: &[u32],
    n: usize,
    m: usize,
    method: &EvalMethod,
    observe: &mut dyn FnMut(&LayerQkv<'_>) -> Result<()>,
) -> Result<Continuation> {
    let c = dec.cfg.clone();
    let scale = dec.attention_scale();
    let mut cache = dec.new_cache();
    let t0 = std::time::Instant::now();
    let h = dec.forward_with(&ids[..n], &mut cache, &mut |l| {
        observe(l)?;
        if !l.global {
            // A sliding-window layer keeps its window (dense while the keys fit in it).
            return Ok(Method::Dense);
        }
        let shape = AttentionShape::new(c.n_head, c.n_kv_head, l.tokens, c.head_dim);
        Ok(method
            .method_for(l.layer, 0..c.n_head, &shape, scale, l.q, l.k)?
            .0)
    })?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let dm = c.d_model;
    let mut hidden = h[h.len() - dm..].to_vec();
    if m > 1 {
        let rest = dec.forward_with(&ids[n..n + m - 1], &mut cache, &mut |_| Ok(Method::Dense))?;
        hidden.extend_from_slice(&rest);
    }
    let mut total = 0f64;
    let mut top1 = Vec::with_capacity(m);
    dec.logit_rows(&hidden[..m * dm], |i, row| {
        total += token_nll(row, ids[n + i]);
        top1.push(argmax(row));
    });
    Ok(Continuation {
        nll: total / m as f64,
        top1,
        prefill_s,
    })
}

/// End-to-end figures of one method.
#[derive(Clone, Debug, Serialize)]
pub struct EndToEnd {
    /// [`EvalMethod::label`].
    pub method: String,
    /// Prefill tokens.
    pub prefill_tokens: usize,
    /// Continuation tokens scored.
    pub continuation_tokens: usize,
    /// Mean next-token NLL (nats) over the continuation.
    pub nll: f64,
    /// exp(nll).
    pub ppl: f64,
    /// `nll` minus the dense prefill's.
    pub nll_delta: f64,
    /// Fraction of continuation positions whose greedy next token equals the dense
    /// prefill run's.
    pub top1_agreement: f64,
    /// Wall-clock seconds of the prefill (whole model, this machine; for the dense row
    /// it includes what `observe_dense` did, e.g. the per-layer measurements).
    pub prefill_s: f64,
}

/// Runs the end-to-end comparison: a dense prefill of `ids[..n]` and one per method,
/// each followed by the dense continuation `ids[n..n + m]`. The first row is dense.
/// `observe_dense` sees every layer's Q/K/V of the dense prefill (where
/// [`layer_quality`] can run); `progress` each row as it is done.
pub fn end_to_end(
    dec: &Decoder,
    ids: &[u32],
    n: usize,
    m: usize,
    methods: &[EvalMethod],
    observe_dense: &mut dyn FnMut(&LayerQkv<'_>) -> Result<()>,
    progress: &mut dyn FnMut(&EndToEnd),
) -> Result<Vec<EndToEnd>> {
    if n == 0 || m == 0 || ids.len() < n + m {
        return Err(Error::InvalidArgument(format!(
            "end to end needs {n} prefill + {m} continuation tokens (> 0 each), {} given",
            ids.len()
        )));
    }
    let dense = continuation(dec, ids, n, m, &EvalMethod::Dense, observe_dense)?;
    let row = |label: String, r: &Continuation| EndToEnd {
        method: label,
        prefill_tokens: n,
        continuation_tokens: m,
        nll: r.nll,
        ppl: r.nll.exp(),
        nll_delta: r.nll - dense.nll,
        top1_agreement: r
            .top1
            .iter()
            .zip(&dense.top1)
            .filter(|(a, b)| a == b)
            .count() as f64
            / m as f64,
        prefill_s: r.prefill_s,
    };
    let mut out = vec![row(EvalMethod::Dense.label(), &dense)];
    progress(&out[0]);
    for meth in methods.iter().filter(|x| **x != EvalMethod::Dense) {
        let r = continuation(dec, ids, n, m, meth, &mut |_| Ok(()))?;
        out.push(row(meth.label(), &r));
        progress(out.last().expect("pushed"));
    }
    Ok(out)
}
