//! Helpers shared by the integration tests.
#![allow(dead_code)]

use wgsparse::attention::lut::SparseLut;
use wgsparse::attention::upload_qkv;
use wgsparse::{AttentionReport, AttentionShape, Context, ContextOptions, DType, Method, Tensor};

/// A GPU context, or `None` (test skipped) when no adapter exists and the environment
/// does not demand one. The test script sets `WGSPARSE_REQUIRE_GPU=1`, which turns a
/// missing adapter into a failure: in CI a skipped GPU test is not a pass.
pub fn gpu(max_binding_bytes: Option<u64>) -> Option<Context> {
    gpu_limited(max_binding_bytes, None)
}

/// Like [`gpu`], also lowering the workgroup memory the kernels may plan with (16384 =
/// WebGPU's default, the browser variants).
pub fn gpu_limited(
    max_binding_bytes: Option<u64>,
    max_workgroup_bytes: Option<u32>,
) -> Option<Context> {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_module("wgpu_hal::gles", log::LevelFilter::Off)
        .try_init();
    let mut opts = ContextOptions::from_env().expect("environment");
    if opts.backend == wgsparse::Backend::Cpu {
        opts.backend = wgsparse::Backend::Auto;
    }
    opts.require_gpu = true;
    opts.max_binding_bytes = max_binding_bytes;
    opts.max_workgroup_bytes = max_workgroup_bytes;
    match Context::new_blocking(opts) {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("WGSPARSE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("WGSPARSE_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// A fresh seed per run (inputs are never the same twice), printed so a failure can be
/// replayed with `WGSPARSE_SEED`.
pub fn seed() -> u64 {
    let s = std::env::var("WGSPARSE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed = {s} (set WGSPARSE_SEED to replay)");
    s
}

/// Runs a sparse `method` through an attention plan into a NaN-poisoned output (any row
/// it fails to write shows) and returns the output, the report and the blocks the plan
/// reports it selected.
pub fn run_sparse(
    ctx: &Context,
    shape: AttentionShape,
    method: Method,
    dtype: DType,
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> (Vec<f32>, AttentionReport, Vec<SparseLut>) {
    let plan = ctx
        .attention(shape)
        .method(method)
        .dtype(dtype)
        .build()
        .unwrap();
    let (qt, kt, vt) = upload_qkv(ctx, &shape, q, k, v, dtype).unwrap();
    let mut out = Tensor::filled(ctx, &shape.q_dims(), dtype, f32::NAN).unwrap();
    plan.run_into(&qt, &kt, &vt, &mut out).unwrap();
    let lut = pollster::block_on(plan.selected_pattern())
        .unwrap()
        .expect("a sparse plan reports its blocks");
    (out.to_f32_blocking().unwrap(), plan.report().unwrap(), lut)
}

/// Runs the `wgsparse` binary: (success, stdout, stderr).
pub fn wgsparse(args: &[&str]) -> (bool, String, String) {
    // Test crates built without the binary (no `cli` feature) still compile.
    let Some(bin) = option_env!("CARGO_BIN_EXE_wgsparse") else {
        panic!("the wgsparse binary is not built (feature `cli`)");
    };
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .expect("run wgsparse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `--json` contract: stdout is exactly one JSON object and nothing else.
pub fn one_json(stdout: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {stdout}"));
    assert!(v.is_object(), "stdout is not a JSON object: {stdout}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    v
}
