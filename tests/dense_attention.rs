//! Dense flash attention: GPU kernel vs its CPU twin (and the CPU twin vs a naive
//! reference), on fresh random inputs with poisoned outputs, ragged lengths, GQA,
//! every head_dim, both dtypes, the row-state export/import, and the split paths.

mod common;

use wgsparse::attention::flash_cpu::{HostRowState, dense_attention_cpu, naive_attention};
use wgsparse::attention::metrics::compare;
use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::upload_qkv;
use wgsparse::attention::verify::{dense_against_cpu_twin, dense_tolerance};
use wgsparse::{AttentionShape, Context, DType, RowState, Tensor};

fn check_gpu_vs_cpu(ctx: &Context, shape: AttentionShape, dtype: DType, causal: bool, seed: u64) {
    let v = dense_against_cpu_twin(ctx, shape, dtype, causal, seed).unwrap();
    eprintln!(
        "{shape:?} {dtype:?} causal={causal}: {:?} ({} dispatches)",
        v.errors, v.report.dispatches
    );
    assert!(
        v.errors.max_abs_err <= dense_tolerance(dtype),
        "{shape:?} {dtype:?} causal={causal}: {:?}",
        v.errors
    );
}

#[test]
fn cpu_twin_matches_naive_reference() {
    let seed = common::seed();
    for (shape, causal) in [
        (AttentionShape::new(2, 1, 37, 64), true),
        (AttentionShape::new(3, 3, 70, 128), false),
        (AttentionShape::new(2, 2, 20, 64).with_kv_len(90), true),
    ] {
        let (q, k, v) = qkv_host(&shape, seed);
        let scale = 0.125;
        let a = dense_attention_cpu(&shape, causal, scale, &q, &k, &v, None);
        let b = naive_attention(&shape, causal, scale, &q, &k, &v);
        let err = compare(&a, &b);
        assert!(err.max_abs_err < 1e-5, "{shape:?}: {err:?}");
    }
}

#[test]
fn gpu_matches_cpu_twin_on_ragged_gqa_shapes() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let cases = [
        (AttentionShape::new(2, 1, 77, 64), DType::F32, true),
        (AttentionShape::new(4, 2, 45, 128), DType::F16, true),
        (AttentionShape::new(2, 2, 33, 256), DType::F32, false),
        (AttentionShape::new(3, 1, 19, 64), DType::F16, false),
        (AttentionShape::new(2, 1, 40, 256), DType::F16, true),
        (
            AttentionShape::new(2, 1, 30, 128).with_kv_len(71),
            DType::F32,
            true,
        ),
        (
            AttentionShape::new(2, 1, 60, 64).with_kv_len(37),
            DType::F32,
            false,
        ),
    ];
    check_all(&ctx, &cases, seed);
}

/// Head dims of real models that are not powers of two (80: Phi-2, StableLM; 96:
/// Phi-3-mini; 112: some Qwen/Falcon sizes): the portable kernel's last 32-dimension
/// chunk is half empty at 80 and 112; every multiple of 16 up to 256 runs; others are a
/// typed error.
#[test]
fn gpu_matches_cpu_twin_at_head_dims_80_96_112() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let cases = [
        (AttentionShape::new(2, 1, 53, 80), DType::F32, true),
        (AttentionShape::new(4, 2, 41, 80), DType::F16, true),
        (AttentionShape::new(2, 2, 37, 96), DType::F32, false),
        (AttentionShape::new(2, 1, 66, 96), DType::F16, true),
        (AttentionShape::new(3, 1, 29, 112), DType::F32, true),
        (
            AttentionShape::new(2, 1, 30, 112).with_kv_len(57),
            DType::F16,
            false,
        ),
    ];
    check_all(&ctx, &cases, seed);
    for d in [0, 8, 72, 264, 272] {
        let shape = AttentionShape::new(2, 1, 16, d);
        assert!(
            matches!(
                ctx.attention(shape).build(),
                Err(wgsparse::Error::InvalidShape(_))
            ),
            "head_dim {d}"
        );
    }
}

/// [`check_gpu_vs_cpu`] over (shape, dtype, causal) cases, seeds from `seed` on.
fn check_all(ctx: &Context, cases: &[(AttentionShape, DType, bool)], seed: u64) {
    for (i, &(shape, dtype, causal)) in cases.iter().enumerate() {
        check_gpu_vs_cpu(ctx, shape, dtype, causal, seed + i as u64);
    }
}

#[test]
fn split_paths_with_lowered_binding_limit_match_cpu() {
    let seed = common::seed();
    // 24 KiB bindings: 64-dim f32 rows are 256 B, so one head of 100 rows (25.6 KB)
    // exceeds a binding and the chunked path (rows and keys, state carried) runs.
    // 40 KiB: whole heads fit, but only a few per binding -> several head groups.
    let cases = [
        (24, AttentionShape::new(2, 1, 100, 64), DType::F32, true),
        (24, AttentionShape::new(2, 2, 90, 64), DType::F16, false),
        (40, AttentionShape::new(8, 2, 50, 64), DType::F32, true),
        (40, AttentionShape::new(6, 3, 35, 128), DType::F16, true),
        (40, AttentionShape::new(2, 1, 120, 112), DType::F32, true),
    ];
    for (i, (kib, shape, dtype, causal)) in cases.into_iter().enumerate() {
        if let Some(ctx) = common::gpu(Some(kib << 10)) {
            check_gpu_vs_cpu(&ctx, shape, dtype, causal, seed + i as u64);
        }
    }
}

#[test]
fn webgpu_default_limit_variant_matches_cpu() {
    // 16 KiB of workgroup memory: the 32-row, Q-streaming variant a browser gets.
    let Some(ctx) = common::gpu_limited(None, Some(16384)) else {
        return;
    };
    let seed = common::seed();
    check_all(
        &ctx,
        &[
            (AttentionShape::new(2, 1, 77, 64), DType::F32, true),
            (AttentionShape::new(2, 2, 50, 256), DType::F16, true),
            (AttentionShape::new(4, 1, 37, 128), DType::F32, false),
        ],
        seed,
    );
}

#[test]
fn gl_backend_matches_cpu() {
    // GL compute (llvmpipe through EGL in CI). `WGSPARSE_REQUIRE_GL=1` (set by the test
    // script) makes a missing GL adapter a failure.
    let opts = wgsparse::ContextOptions {
        backend: wgsparse::Backend::Gl,
        ..Default::default()
    };
    let ctx = match Context::new_blocking(opts) {
        Ok(c) => c,
        Err(e) if std::env::var("WGSPARSE_REQUIRE_GL").is_ok_and(|v| v == "1") => {
            panic!("WGSPARSE_REQUIRE_GL=1 but no GL adapter: {e}")
        }
        Err(e) => return eprintln!("skipping GL test: {e}"),
    };
    assert_eq!(ctx.backend(), wgsparse::Backend::Gl);
    let seed = common::seed();
    // One kernel: llvmpipe's GL compiler takes ~50 s per flash-attention variant on a
    // 2-core machine. f32 storage, what every GL device can hold; the f16 kernels' WGSL
    // runs on Vulkan in every test here, and the GL backend's own part (GLSL
    // translation, bindings, dispatch) does not depend on the storage type.
    let cases = [(AttentionShape::new(2, 2, 45, 64), DType::F32, true)];
    check_all(&ctx, &cases, seed);
}

#[test]
fn row_state_export_and_import_continue_a_row() {
    let seed = common::seed();
    // 100 rows of 64 f32 dims = 25.6 KB per head: over the 20 KiB binding below, so
    // that context also carries the state through the chunked path.
    let shape = AttentionShape::new(2, 1, 100, 64);
    let (q, k, v) = qkv_host(&shape, seed);
    let scale = 1.0 / 8.0;
    let mut want_state = HostRowState::empty(&shape);
    let want = dense_attention_cpu(&shape, true, scale, &q, &k, &v, Some(&mut want_state));
    let mut contexts = vec![Context::cpu()];
    contexts.extend(common::gpu(None));
    contexts.extend(common::gpu(Some(20 << 10)));
    for ctx in contexts {
        let (qt, kt, vt) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
        let mut out = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
        let mut state = RowState::empty(&ctx, &shape).unwrap();
        // Poison the state: without import it must be ignored and fully overwritten.
        state.acc = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
        let export = ctx.attention(shape).build().unwrap();
        export
            .run_with_state(&qt, &kt, &vt, &mut out, &mut state)
            .unwrap();
        let ml = state.ml.to_f32_blocking().unwrap();
        let acc = state.acc.to_f32_blocking().unwrap();
        assert!(compare(&out.to_f32_blocking().unwrap(), &want).max_abs_err < 2e-5);
        assert!(
            compare(&ml, &want_state.ml).max_abs_err < 1e-4,
            "{ctx:?} ml"
        );
        assert!(
            compare(&acc, &want_state.acc).max_abs_err < 1e-4,
            "{ctx:?} acc"
        );
        // Continuing the exported rows over the same keys again sees every key twice:
        // m stays, l and acc double, and the normalized output is unchanged.
        let import = ctx.attention(shape).import_state(true).build().unwrap();
        let mut out2 = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
        import
            .run_with_state(&qt, &kt, &vt, &mut out2, &mut state)
            .unwrap();
        assert!(
            compare(&out2.to_f32_blocking().unwrap(), &want).max_abs_err < 2e-5,
            "{ctx:?}"
        );
        let ml2 = state.ml.to_f32_blocking().unwrap();
        for r in 0..ml.len() / 2 {
            assert!((ml2[2 * r] - ml[2 * r]).abs() < 1e-5);
            assert!((ml2[2 * r + 1] - 2.0 * ml[2 * r + 1]).abs() < 1e-3 * ml[2 * r + 1]);
        }
    }
}
