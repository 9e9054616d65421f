//! Helpers shared by the integration tests.
#![allow(dead_code)]

use wgsparse::{Context, ContextOptions};

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
