//! The sparse executors (block-sparse, stripe), the sliding window and AnchorAttention:
//! GPU vs the CPU twin on fresh random inputs with NaN-poisoned outputs, ragged
//! lengths, GQA, f32 and f16 storage, row-state import/export, lowered binding limits;
//! and the CPU twin vs a naive reference over the same key sets.

mod common;

use std::sync::Arc;

use wgsparse::attention::flash_cpu::{
    CpuAttention, HostRowState, attention_cpu, naive_masked_attention,
};
use wgsparse::attention::lut::{LutUnit, SparseLut};
use wgsparse::attention::metrics::compare;
use wgsparse::attention::select::anchor::{AnchorConfig, anchor_cpu, flags_coop_tile, select_cpu};
use wgsparse::attention::synthetic::{Structure, qkv_host, structured_qkv_host};
use wgsparse::attention::verify::{dense_tolerance, dense_tolerance_for, method_against_cpu_twin};
use wgsparse::attention::{WindowConfig, upload_qkv};
use wgsparse::{AttentionShape, Context, DType, Error, Method, RowState, Tensor};

fn check(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    dtype: DType,
    causal: bool,
    seed: u64,
) {
    let (q, k, v) = qkv_host(&shape, seed);
    let (got, twin) =
        method_against_cpu_twin(ctx, shape, method, dtype, causal, (&q, &k, &v)).unwrap();
    eprintln!(
        "{} {shape:?} {dtype:?} causal={causal}: {:?} density {:.3} ({} dispatches)",
        method.name(),
        got.errors,
        got.report.density,
        got.report.dispatches
    );
    assert!(
        got.errors.max_abs_err <= dense_tolerance(dtype),
        "{} {shape:?} {dtype:?}: {:?}",
        method.name(),
        got.errors
    );
    assert!((got.report.density - twin.density).abs() < 1e-12);
}

#[test]
fn cpu_twin_of_the_executors_matches_naive_reference() {
    let seed = common::seed();
    let shape = AttentionShape::new(4, 2, 203, 64);
    let (q, k, v) = qkv_host(&shape, seed);
    for lut in [
        common::random_block_lut(&shape, 64, 32, seed),
        common::random_block_lut(&shape, 128, 128, seed + 1),
        common::random_stripe_lut(&shape, 64, seed + 2),
    ] {
        let want = naive_masked_attention(&shape, 0.125, &q, &k, &v, |h, r, j| {
            j <= r && lut.keys_of(h, r / lut.q_block).contains(&(j as u32))
        });
        let opts = CpuAttention::sparse(0.125, &lut);
        let got = attention_cpu(&shape, &opts, &q, &k, &v, None);
        assert!(compare(&got, &want).max_abs_err < 1e-5, "{:?}", lut.unit);
    }
}

/// The fixed-LUT executors against their CPU twin on random LUTs: block-sparse (query
/// block, key block `Some(kb)`) and stripes (query block, `None`).
#[test]
fn fixed_lut_executors_match_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let sh = AttentionShape::new;
    let cases = [
        (sh(2, 1, 300, 64), 64, Some(32), DType::F32, true),
        (sh(4, 2, 257, 128), 128, Some(128), DType::F16, true),
        (sh(2, 2, 190, 256), 64, Some(64), DType::F32, false),
        (sh(3, 1, 97, 64), 32, Some(32), DType::F16, true),
        (sh(2, 1, 333, 64), 64, None, DType::F32, true),
        (sh(4, 2, 200, 128), 128, None, DType::F16, true),
        (sh(2, 2, 150, 64), 32, None, DType::F32, false),
        (sh(2, 1, 129, 256), 2048, None, DType::F32, true),
        (sh(2, 1, 200, 80), 64, Some(32), DType::F16, true),
        (sh(2, 2, 170, 112), 64, None, DType::F32, true),
    ];
    for (i, (shape, qb, kb, dtype, causal)) in cases.into_iter().enumerate() {
        let s = seed + i as u64;
        let lut = match kb {
            Some(kb) => common::random_block_lut(&shape, qb, kb, s),
            None => common::random_stripe_lut(&shape, qb, s + 10),
        };
        let method = match kb {
            Some(_) => Method::BlockSparse(Arc::new(lut)),
            None => Method::Stripes(Arc::new(lut)),
        };
        check(&ctx, shape, &method, dtype, causal, s);
    }
}

#[test]
fn window_matches_cpu_twin_and_naive() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 301, 64);
    for (w, dtype) in [
        (
            WindowConfig {
                window: 70,
                sinks: 3,
            },
            DType::F32,
        ),
        (
            WindowConfig {
                window: 128,
                sinks: 0,
            },
            DType::F16,
        ),
        (
            WindowConfig {
                window: 1,
                sinks: 64,
            },
            DType::F32,
        ),
    ] {
        check(&ctx, shape, &Method::Window(w), dtype, true, seed);
    }
    // The twin itself against the definition.
    let (q, k, v) = qkv_host(&shape, seed);
    let w = WindowConfig {
        window: 70,
        sinks: 3,
    };
    let cpu = Context::cpu();
    let plan = cpu
        .attention(shape)
        .method(Method::Window(w))
        .build()
        .unwrap();
    let (qc, kc, vc) = upload_qkv(&cpu, &shape, &q, &k, &v, DType::F32).unwrap();
    let got = plan.run(&qc, &kc, &vc).unwrap().to_f32_blocking().unwrap();
    let want = naive_masked_attention(&shape, 0.125, &q, &k, &v, |_, r, j| {
        j <= r && (r - j < 70 || j < 3)
    });
    assert!(compare(&got, &want).max_abs_err < 1e-5);
    let density = plan.report().unwrap().density;
    let pairs: usize = (0..301)
        .map(|r: usize| (r + 1).min(70) + 3.min((r + 1).saturating_sub(70)))
        .sum();
    assert!((density - (pairs as f64 / (301.0 * 302.0 / 2.0))).abs() < 1e-12);
}

/// Dense over keys [0, 64) exported, then a stripe LUT of the remaining keys imported:
/// the result is dense attention (the executors continue each other's row state).
#[test]
fn executors_continue_row_state() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 200, 64);
    let (q, k, v) = qkv_host(&shape, seed);
    let head = SparseLut::from_fn(2, 200, 64, LutUnit::Blocks(64), |_, _| vec![0]).unwrap();
    let tail = SparseLut::from_fn(2, 200, 64, LutUnit::Keys, |_, _| (64..200).collect()).unwrap();
    let (qt, kt, vt) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
    let mut state = RowState::empty(&ctx, &shape).unwrap();
    let mut out = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
    let first = ctx
        .attention(shape)
        .method(Method::BlockSparse(Arc::new(head)))
        .build()
        .unwrap();
    first
        .run_with_state(&qt, &kt, &vt, &mut out, &mut state)
        .unwrap();
    let second = ctx
        .attention(shape)
        .method(Method::Stripes(Arc::new(tail)))
        .import_state(true)
        .build()
        .unwrap();
    let mut out = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
    second
        .run_with_state(&qt, &kt, &vt, &mut out, &mut state)
        .unwrap();
    let got = out.to_f32_blocking().unwrap();
    let want = wgsparse::attention::flash_cpu::naive_attention(&shape, true, 0.125, &q, &k, &v);
    let err = compare(&got, &want);
    assert!(err.max_abs_err < 2e-5, "{err:?}");
    // The exported state agrees with the CPU twin's.
    let mut hs = HostRowState::empty(&shape);
    let lut = SparseLut::from_fn(2, 200, 64, LutUnit::Keys, |_, _| (0..200).collect()).unwrap();
    let opts = CpuAttention::sparse(0.125, &lut);
    attention_cpu(&shape, &opts, &q, &k, &v, Some(&mut hs));
    let ml = state.ml.to_f32_blocking().unwrap();
    assert!(compare(&ml, &hs.ml).max_abs_err < 1e-4);
}

#[test]
fn sparse_executors_split_rows_under_low_binding_limits() {
    // 96 KiB bindings: one head's Q/ACC rows (600 x 64 x 4 = 150 KiB) need row chunks;
    // one kv head of f16 K (75 KiB) fits, as the sparse split requires.
    let Some(ctx) = common::gpu(Some(96 << 10)) else {
        return;
    };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 600, 64);
    let lut = common::random_block_lut(&shape, 64, 32, seed);
    let (q, k, v) = qkv_host(&shape, seed);
    let (got, _) = method_against_cpu_twin(
        &ctx,
        shape,
        &Method::BlockSparse(Arc::new(lut)),
        DType::F16,
        true,
        (&q, &k, &v),
    )
    .unwrap();
    assert!(got.report.dispatches > 2, "{}", got.report.dispatches);
    assert!(
        got.errors.max_abs_err <= dense_tolerance(DType::F16),
        "{:?}",
        got.errors
    );
}

/// The two-pass methods when their f32 row state `acc` is larger than one binding but
/// their f16 Q/K fit (how SALE failed at 128k on an H200: acc 2 GiB vs 2 GiB − 4): the
/// flash passes bind the state by row ranges, so the plans build and match the CPU twin.
#[test]
fn two_pass_methods_split_a_row_state_over_the_binding_limit() {
    // 300,000-byte bindings: f16 Q of 4 heads × 512 × 64 is 262,144 bytes (fits), the
    // f32 row state 524,288 (does not).
    let Some(ctx) = common::gpu(Some(300_000)) else {
        return;
    };
    let seed = common::seed();
    let shape = AttentionShape::new(4, 2, 512, 64);
    let (q, k, v) = structured_qkv_host(&shape, &Structure::default(), seed);
    let proxy = Method::Proxy(wgsparse::attention::select::proxy::ProxyConfig {
        block: 64,
        min_budget: 128,
        gamma: 0.9,
        ..Default::default()
    });
    for method in [proxy, Method::Anchor(small_anchor())] {
        let (got, report) =
            method_against_cpu_twin(&ctx, shape, &method, DType::F16, true, (&q, &k, &v))
                .unwrap_or_else(|e| panic!("{}: {e}", method.name()));
        assert!(
            report.density < 1.0,
            "{}: {}",
            method.name(),
            report.density
        );
        assert!(
            got.errors.max_abs_err <= dense_tolerance(DType::F16),
            "{}: {:?}",
            method.name(),
            got.errors
        );
    }
}

/// The selectors' first kernels (SALE's quantization, AnchorAttention's pooling,
/// ProxyAttn's pooling and head weights) when Q is over one binding but a
/// head is not (how Q of 32 heads × 256k × d 128 in f16, 2 GiB, meets an H200's 2 GiB − 4):
/// they read Q one run of whole heads at a time, and the plan matches the CPU twin.
#[test]
fn selectors_read_q_by_runs_of_heads_over_the_binding_limit() {
    // 150,000-byte bindings: f16 Q of 4 heads × 512 × 64 is 262,144 bytes (over), one
    // head 65,536 (two per binding).
    let Some(ctx) = common::gpu(Some(150_000)) else {
        return;
    };
    let seed = common::seed();
    let shape = AttentionShape::new(4, 2, 512, 64);
    let (q, k, v) = structured_qkv_host(&shape, &Structure::default(), seed);
    for spec in [
        "sale:tau=0.01",
        "anchor:theta=4,block=64,step=2,init_keys=128",
        "proxy:block=64,min_budget=128,gamma=0.9",
    ] {
        let method: Method = spec.parse().unwrap();
        let (got, report) =
            method_against_cpu_twin(&ctx, shape, &method, DType::F16, true, (&q, &k, &v))
                .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(report.density < 1.0, "{spec}: {}", report.density);
        assert!(
            got.errors.max_abs_err <= dense_tolerance(DType::F16),
            "{spec}: {:?}",
            got.errors
        );
        // The stage that reads Q ran once per run of heads (SALE: mean partials and
        // codes of Q and of K, the means; AnchorAttention: the pooling).
        let (stage, at_least) = match method {
            Method::Sale(_) => ("quantize", 6),
            _ => ("pool", 2),
        };
        let st = got
            .report
            .timing
            .stages
            .iter()
            .find(|s| s.name == stage)
            .unwrap_or_else(|| panic!("{spec}: no {stage} stage"));
        assert!(st.dispatches >= at_least, "{spec}: {st:?}");
    }
}

fn small_anchor() -> AnchorConfig {
    AnchorConfig {
        theta: 4.0,
        block: 64,
        step: 2,
        init_keys: 128,
    }
}

/// Anchor on the GPU vs its CPU twin: same stripes (up to rounding ties), same output.
#[test]
fn anchor_matches_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let mut selected = 0;
    let small = "anchor:theta=4,block=64,init_keys=128";
    let cases = [
        (
            AttentionShape::new(2, 1, 700, 64),
            format!("{small},step=2"),
            DType::F32,
        ),
        (
            AttentionShape::new(4, 2, 555, 128),
            format!("{small},step=3"),
            DType::F16,
        ),
        (
            AttentionShape::new(2, 1, 600, 112),
            format!("{small},step=2"),
            DType::F16,
        ),
        // Groups of 2048 rows: a higher anchor (max over more keys) than the small
        // configs, so a wider margin.
        (
            AttentionShape::new(2, 2, 4300, 64),
            "anchor:theta=7".into(),
            DType::F32,
        ),
        // The default groups at f16 (matrix-unit stripe scoring where available), with
        // stripes over whole 256-key chunks.
        (
            AttentionShape::new(2, 1, 4300, 128),
            "anchor:theta=7".into(),
            DType::F16,
        ),
    ];
    for (i, (shape, spec, dtype)) in cases.into_iter().enumerate() {
        let seed = seed + i as u64;
        let Ok(Method::Anchor(cfg)) = spec.parse() else {
            unreachable!("{spec}")
        };
        // Planted structure (sinks, band, heavy columns): θ = 4 keeps the heavy columns
        // and drops most other keys, so the selection is neither empty nor everything.
        let (q, k, v) = common::planted_qkv(&shape, dtype, seed);
        let (got, report, lut) =
            common::run_sparse(&ctx, shape, Method::Anchor(cfg), dtype, (&q, &k, &v));
        let stripes = &lut[1];

        let run = anchor_cpu(
            &shape,
            &cfg,
            1.0 / (shape.head_dim as f32).sqrt(),
            &q,
            &k,
            &v,
        )
        .unwrap();
        let (want, sel, stats) = (run.out, run.selection, run.stats);
        // Selection: every candidate decided the same way unless its margin is a tie.
        let cands = |g| cfg.candidates(g, shape.seq_len).map(|j| j as u32).collect();
        let ties = common::selection_ties(stripes, &sel.stripes, &sel.margins, cands, 1e-3);
        let best = sel
            .margins
            .iter()
            .flatten()
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max);
        eprintln!("best margin {best}");
        let err = compare(&got, &want);
        eprintln!(
            "anchor {shape:?} {dtype:?}: {err:?}, density gpu {:.4} cpu {:.4}, stripes/group {:?}, ties {ties}",
            report.density,
            stats.pairs.density(),
            anchor_stats(&report).stripes_per_group
        );
        selected += anchor_stats(&report).pairs.selected;
        assert!(report.density < 1.0);
        // Stripe scoring on matrix units for f16 plans wherever the device has them
        // (required in the test script's coop run), else the portable kernel.
        let coop = flags_coop_tile(ctx.capabilities(), dtype, cfg.step);
        let kernel = match dtype {
            DType::F16 => common::expected_kernel(coop, "anchor_flags_coop", "anchor_flags"),
            _ => "anchor_flags",
        };
        let select = report
            .timing
            .stages
            .iter()
            .find(|s| s.name.ends_with("select"));
        assert_eq!(
            select.and_then(|s| s.variant.as_deref()),
            Some(kernel),
            "{:?}",
            report.timing.stages
        );
        if ties == 0 {
            assert_eq!(anchor_stats(&report), &stats);
            let tol = dense_tolerance_for(dtype, shape.seq_len);
            assert!(err.max_abs_err <= tol, "{err:?}");
        }
    }
    assert!(
        selected > 0,
        "no stripe selected in any case: the test would be vacuous"
    );
}

/// θ large keeps every candidate: anchor == dense. The selection twin agrees.
#[test]
fn anchor_with_huge_theta_is_dense() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 520, 64);
    let cfg = AnchorConfig {
        theta: 1e4,
        ..small_anchor()
    };
    common::assert_keeps_everything(&ctx, shape, &Method::Anchor(cfg), seed);
    let (q, k, v) = qkv_host(&shape, seed);
    // Host selection with the anchor-pass state keeps all candidates too.
    let mut st = HostRowState::empty(&shape);
    let lut = cfg.anchor_lut(2, 520).unwrap();
    let opts = CpuAttention::sparse(0.125, &lut);
    attention_cpu(&shape, &opts, &q, &k, &v, Some(&mut st));
    let sel = select_cpu(&shape, &cfg, 0.125, &q, &k, &st.ml).unwrap();
    assert_eq!(sel.stripes.keys_of(0, 4), (128..512).collect::<Vec<u32>>());
}

#[test]
fn bad_sparse_requests_are_typed_errors() {
    let ctx = Context::cpu();
    let shape = AttentionShape::new(2, 1, 100, 64);
    let blocks = Arc::new(common::random_block_lut(&shape, 64, 32, 1));
    // A block LUT handed to the stripe executor, and vice versa.
    assert!(matches!(
        ctx.attention(shape)
            .method(Method::Stripes(blocks.clone()))
            .build(),
        Err(Error::InvalidArgument(_))
    ));
    // A LUT for another length.
    let other = AttentionShape::new(2, 1, 90, 64);
    assert!(matches!(
        ctx.attention(other)
            .method(Method::BlockSparse(blocks))
            .build(),
        Err(Error::Mismatch(_))
    ));
    // Anchor: non-causal, bad config, a row state.
    assert!(
        ctx.attention(shape)
            .method(Method::Anchor(small_anchor()))
            .causal(false)
            .build()
            .is_err()
    );
    assert!(
        ctx.attention(shape)
            .method(Method::Anchor(AnchorConfig {
                block: 100,
                ..Default::default()
            }))
            .build()
            .is_err()
    );
    let plan = ctx
        .attention(shape)
        .method(Method::Anchor(small_anchor()))
        .build()
        .unwrap();
    let (q, k, v) = qkv_host(&shape, 3);
    let (qt, kt, vt) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
    let mut out = Tensor::zeros(&ctx, &shape.q_dims(), DType::F32).unwrap();
    let mut st = RowState::empty(&ctx, &shape).unwrap();
    assert!(matches!(
        plan.run_with_state(&qt, &kt, &vt, &mut out, &mut st),
        Err(Error::InvalidArgument(_))
    ));
    // Anchor keeps its own row state: importing one is refused at build (CPU and GPU).
    assert!(matches!(
        ctx.attention(shape)
            .method(Method::Anchor(small_anchor()))
            .import_state(true)
            .build(),
        Err(Error::InvalidArgument(_))
    ));
    // Window 0, and sparse methods with kv_len != seq_len.
    assert!(
        ctx.attention(shape)
            .method(Method::Window(WindowConfig {
                window: 0,
                sinks: 0
            }))
            .build()
            .is_err()
    );
    let ragged = shape.with_kv_len(120);
    assert!(matches!(
        ctx.attention(ragged)
            .method(Method::Window(WindowConfig::default()))
            .build(),
        Err(Error::InvalidShape(_))
    ));
}

/// The evaluation path on the GPU and the CPU: dense scores perfectly against itself;
/// a window keeps less than all the mass; the two devices agree on every metric.
#[test]
fn evaluation_metrics_agree_between_gpu_and_cpu() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 700, 64);
    let (q, k, v) = structured_qkv_host(&shape, &Structure::default(), seed);
    let cpu = Context::cpu();
    let dense = wgsparse::attention::verify::evaluate(
        &ctx,
        shape,
        &Method::Dense,
        DType::F32,
        (&q, &k, &v),
    )
    .unwrap();
    assert!(
        (dense.quality.attn_recall - 1.0).abs() < 1e-5,
        "{:?}",
        dense.quality
    );
    assert_eq!(dense.quality.tol_recall_01, 1.0);
    for m in [
        Method::Window(WindowConfig {
            window: 100,
            sinks: 4,
        }),
        Method::Anchor(small_anchor()),
    ] {
        let g = wgsparse::attention::verify::evaluate(&ctx, shape, &m, DType::F32, (&q, &k, &v))
            .unwrap();
        let c = wgsparse::attention::verify::evaluate(&cpu, shape, &m, DType::F32, (&q, &k, &v))
            .unwrap();
        eprintln!(
            "{} gpu {:?}\n{} cpu {:?}",
            m.name(),
            g.quality,
            m.name(),
            c.quality
        );
        assert!(g.quality.attn_recall < 1.0 && g.quality.attn_recall > 0.5);
        assert!((g.quality.attn_recall - c.quality.attn_recall).abs() < 1e-4);
        assert!((g.quality.rel_l2_err - c.quality.rel_l2_err).abs() < 1e-4);
        assert!((g.quality.density - c.quality.density).abs() < 1e-9);
    }
}

fn anchor_stats(
    report: &wgsparse::AttentionReport,
) -> &wgsparse::attention::select::anchor::AnchorStats {
    match &report.stats {
        Some(wgsparse::MethodStats::Anchor(a)) => a,
        o => panic!("anchor stats expected, got {o:?}"),
    }
}
