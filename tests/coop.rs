//! The matrix-unit (cooperative-matrix) attention kernel against its CPU twin: dense
//! (causal or not, ragged lengths, GQA, head_dim 64/128/256), the block-sparse and
//! stripe executors, and the two-pass selectors (SALE, AnchorAttention), all with f16
//! storage, fresh random inputs and NaN-poisoned outputs; every run asserts from its
//! report which kernel ran.
//!
//! On an adapter with f16 cooperative matrices (CI: Mesa 26.1's lavapipe through
//! `scripts/coop-lavapipe.sh`, which sets `WGSPARSE_REQUIRE_COOP=1`) the plans must pick
//! `flash_attention_coop`; with `WGSPARSE_NO_COOP=1` the same tests must run the portable
//! `flash_attention` and pass too. Elsewhere (no such adapter) they check the portable
//! kernel, so they hold on every machine.

mod common;

use std::sync::Arc;

use wgsparse::attention::flash_cpu::{CpuAttention, HostRowState, attention_cpu};
use wgsparse::attention::metrics::{ErrorStats, compare};
use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::verify::{
    dense_against_cpu_twin, dense_tolerance, method_against_cpu_twin,
};
use wgsparse::{AttentionReport, AttentionShape, Context, DType, Method};

/// The attention kernel the plans must pick on this context.
fn expected_kernel(ctx: &Context) -> &'static str {
    let caps = ctx.capabilities();
    let tile = caps.coop_tile.map(|t| t as usize);
    common::expected_kernel(tile, "flash_attention_coop", "flash_attention")
}

/// The GPU context, the attention kernel it must run, and this run's seed.
fn setup() -> Option<(Context, &'static str, u64)> {
    let ctx = common::gpu(None)?;
    let kernel = expected_kernel(&ctx);
    Some((ctx, kernel, common::seed()))
}

/// Every attention stage of the report ran `kernel`.
fn assert_kernel(report: &AttentionReport, kernel: &str, what: &str) {
    let attention: Vec<_> = report
        .timing
        .stages
        .iter()
        .filter(|s| {
            s.variant
                .as_deref()
                .is_some_and(|v| v.starts_with("flash_attention"))
        })
        .collect();
    assert!(
        !attention.is_empty(),
        "{what}: no attention stage in {report:?}"
    );
    for s in attention {
        assert_eq!(
            s.variant.as_deref(),
            Some(kernel),
            "{what}: stage {}",
            s.name
        );
    }
}

/// An f16 run on `kernel` within the f16 tolerance of its reference.
fn assert_f16_run(report: &AttentionReport, errors: &ErrorStats, kernel: &str, what: &str) {
    eprintln!("{what}: {errors:?}, density {:.3}", report.density);
    assert_kernel(report, kernel, what);
    assert!(
        errors.max_abs_err <= dense_tolerance(DType::F16),
        "{what}: {errors:?}"
    );
}

#[test]
fn dense_on_matrix_units_matches_the_cpu_twin() {
    let Some((ctx, kernel, seed)) = setup() else {
        return;
    };
    let cases = [
        (AttentionShape::new(2, 1, 77, 64), true),
        (AttentionShape::new(4, 2, 45, 128), true),
        (AttentionShape::new(3, 1, 19, 64), false),
        (AttentionShape::new(2, 1, 40, 256), true),
        (AttentionShape::new(2, 2, 9, 128), false),
        (AttentionShape::new(2, 1, 30, 128).with_kv_len(71), true),
        (AttentionShape::new(2, 1, 60, 64).with_kv_len(37), false),
        (AttentionShape::new(2, 1, 45, 80), true),
        (AttentionShape::new(4, 2, 33, 96), false),
        (AttentionShape::new(2, 1, 50, 112), true),
    ];
    for (i, (shape, causal)) in cases.into_iter().enumerate() {
        let v = dense_against_cpu_twin(&ctx, shape, DType::F16, causal, seed + i as u64).unwrap();
        let what = format!("{shape:?} causal={causal}");
        assert_f16_run(&v.report, &v.errors, kernel, &what);
    }
}

/// Keys whose scores grow along the sequence: each row's running maximum climbs far past
/// the reference the matrix-unit kernel keeps (it rescales its register accumulators
/// only when a key tile's maximum exceeds that reference by 2^8), so the rare rescale
/// path runs, in rows of every subgroup, and the result still matches the CPU twin.
#[test]
fn dense_on_matrix_units_rescales_when_the_maximum_grows() {
    let Some((ctx, kernel, seed)) = setup() else {
        return;
    };
    let shape = AttentionShape::new(2, 1, 150, 64);
    let (q, mut k, v) = qkv_host(&shape, seed);
    let (n, d) = (shape.seq_len, shape.head_dim);
    // Key j scaled by 1 + 7 j / n: score spreads from ~1 to ~8 (natural units).
    for (i, row) in k.chunks_mut(d).enumerate() {
        let j = i % n;
        let s = 1.0 + 7.0 * j as f32 / n as f32;
        row.iter_mut().for_each(|x| *x *= s);
    }
    // The data does what it is for: most late rows' maxima exceed their first 16 keys'
    // maximum by more than 8 log2 units.
    let scale = 1.0 / (d as f32).sqrt() * std::f32::consts::LOG2_E;
    let grows = (n / 2..n)
        .filter(|&r| {
            let score = |j: usize| -> f32 {
                (0..d).map(|c| q[r * d + c] * k[j * d + c]).sum::<f32>() * scale
            };
            let first = (0..16).map(score).fold(f32::MIN, f32::max);
            let all = (0..=r).map(score).fold(f32::MIN, f32::max);
            all > first + 8.0
        })
        .count();
    assert!(grows > n / 4, "only {grows} rows need a rescale");
    for causal in [true, false] {
        let (got, _) = method_against_cpu_twin(
            &ctx,
            shape,
            &Method::Dense,
            DType::F16,
            causal,
            (&q, &k, &v),
        )
        .unwrap();
        assert_f16_run(
            &got.report,
            &got.errors,
            kernel,
            &format!("rescale causal={causal}"),
        );
    }
}

#[test]
fn fixed_sparse_executors_on_matrix_units_match_the_cpu_twin() {
    let Some((ctx, kernel, seed)) = setup() else {
        return;
    };
    let shape = AttentionShape::new(4, 2, 300, 128);
    let (q, k, v) = qkv_host(&shape, seed);
    let methods = [
        Method::BlockSparse(Arc::new(common::random_block_lut(&shape, 64, 32, seed))),
        Method::Stripes(Arc::new(common::random_stripe_lut(&shape, 64, seed ^ 9))),
    ];
    for method in methods {
        let (got, _) =
            method_against_cpu_twin(&ctx, shape, &method, DType::F16, true, (&q, &k, &v)).unwrap();
        let what = method.name();
        assert_f16_run(&got.report, &got.errors, kernel, what);
    }
}

/// The two-pass selectors with both passes on matrix units: the output equals the host's
/// exact pass continued over the LUT the device selected (the selection itself is
/// checked against the host, up to rounding ties, by the selectors' own tests).
#[test]
fn selectors_on_matrix_units_match_the_host_over_their_selection() {
    let Some((ctx, kernel, seed)) = setup() else {
        return;
    };
    let shape = AttentionShape::new(4, 2, 300, 128);
    let (q, k, v) = common::planted_qkv(&shape, DType::F16, seed);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let mut skipped = 0;
    for spec in [
        "sale:tau=0.05",
        "anchor:theta=4,block=64,step=2,init_keys=128",
    ] {
        let method: Method = spec.parse().unwrap();
        let (got, report, luts) = common::run_sparse(&ctx, shape, method, DType::F16, (&q, &k, &v));
        let mut st = HostRowState::empty(&shape);
        attention_cpu(
            &shape,
            &CpuAttention::sparse(scale, &luts[0]),
            &q,
            &k,
            &v,
            Some(&mut st),
        );
        let want = attention_cpu(
            &shape,
            &CpuAttention::sparse(scale, &luts[1]),
            &q,
            &k,
            &v,
            Some(&mut st),
        );
        assert_f16_run(&report, &compare(&got, &want), kernel, spec);
        if report.density < 1.0 {
            skipped += 1;
        }
    }
    // The sparse pass is only exercised when a selector left something out.
    assert!(skipped >= 1, "neither selector skipped anything");
}

/// SALE's estimation on matrix units computes the same integers as the integer path, so
/// the selection is bit-identical: with f32 storage (both contexts then run the same
/// portable attention kernel) the selected LUTs and the outputs of a matrix-unit context
/// and a `no_coop` context on the same device are equal, int4 and int8, d 64/128/256,
/// by threshold and under per-head budgets (the ranked margins).
#[test]
fn sale_estimation_on_matrix_units_is_bit_identical() {
    let Some(ctx) = common::gpu(None) else { return };
    let coop_expected = expected_kernel(&ctx) == "flash_attention_coop";
    let plain = Context::new_blocking(wgsparse::ContextOptions {
        no_coop: true,
        require_gpu: true,
        ..wgsparse::ContextOptions::from_env().unwrap()
    })
    .unwrap();
    assert_eq!(plain.capabilities().coop_tile, None);
    let seed = common::seed();
    let mut skipped = 0;
    let cases = [
        (64, 4, false),
        (128, 8, false),
        (256, 4, false),
        (128, 4, true),
    ];
    for (i, (d, bits, budgets)) in cases.into_iter().enumerate() {
        let shape = AttentionShape::new(2, 1, 333, d);
        let (q, k, v) = common::planted_qkv(&shape, DType::F32, seed + i as u64);
        let mut method: Method = format!("sale:tau=0.05,bits={bits}").parse().unwrap();
        if let (true, Method::Sale(c)) = (budgets, &mut method) {
            c.head_budget = Some(vec![0.3, 0.6]);
        }
        let run =
            |c: &Context| common::run_sparse(c, shape, method.clone(), DType::F32, (&q, &k, &v));
        let (out_c, rep_c, luts_c) = run(&ctx);
        let (out_p, rep_p, luts_p) = run(&plain);
        let estimate = |r: &AttentionReport| {
            r.timing
                .stages
                .iter()
                .find(|s| s.name == "estimate")
                .and_then(|s| s.variant.clone())
        };
        let want = if coop_expected {
            "sale_estimate_coop"
        } else {
            "sale_estimate"
        };
        assert_eq!(estimate(&rep_c).as_deref(), Some(want), "d {d} int{bits}");
        assert_eq!(estimate(&rep_p).as_deref(), Some("sale_estimate"));
        assert_eq!(
            luts_c[1], luts_p[1],
            "d {d} int{bits} budgets {budgets}: selections differ"
        );
        assert_eq!(
            out_c, out_p,
            "d {d} int{bits} budgets {budgets}: outputs differ"
        );
        if rep_c.density < 1.0 {
            skipped += 1;
        }
    }
    // Identical selections are only a test when something was left out.
    assert!(skipped >= 3, "only {skipped} of 4 cases skipped blocks");
}
