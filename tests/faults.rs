//! Faults and long runs: a lost device is a typed error for every later call and a new
//! context goes on where the old one stopped; a soak of plans of changing shapes and
//! methods leaves no GPU buffers, kernels or host memory behind (wgpu's own resource
//! counters, the kernel cache, the process's resident memory).
//!
//! The soak runs `WGSPARSE_SOAK_S` seconds (default 20, as in CI; set more for longer soaks).

mod common;

use std::time::{Duration, Instant};

use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::upload_qkv;
use wgsparse::{AttentionShape, Context, DType, Error, Method, Tensor};

/// Runs `method` once on fresh random inputs and reads the output back.
fn run_once(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    dtype: DType,
    seed: u64,
) -> wgsparse::Result<Vec<f32>> {
    let plan = ctx
        .attention(shape)
        .method(method.clone())
        .dtype(dtype)
        .build()?;
    let (q, k, v) = qkv_host(&shape, seed);
    let (q, k, v) = upload_qkv(ctx, &shape, &q, &k, &v, dtype)?;
    let mut out = Tensor::filled(ctx, &shape.q_dims(), dtype, f32::NAN)?;
    plan.run_into(&q, &k, &v, &mut out)?;
    out.to_f32_blocking()
}

#[test]
fn a_lost_device_is_a_typed_error_and_a_new_context_goes_on() {
    let Some(ctx) = common::gpu(None) else { return };
    let shape = AttentionShape::new(2, 1, 70, 64);
    let plan = ctx.attention(shape).build().unwrap();
    let (q, k, v) = qkv_host(&shape, 3);
    let (q, k, v) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
    let mut out = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
    plan.run_into(&q, &k, &v, &mut out).unwrap();
    let before = out.to_f32_blocking().unwrap();

    // What a driver reset or an unplugged GPU does to the device.
    ctx.gpu().unwrap().device.destroy();
    for attempt in 0..2 {
        match plan.run_into(&q, &k, &v, &mut out) {
            Err(Error::DeviceLost(_)) => {}
            other => panic!("run {attempt} after the loss: {other:?}"),
        }
    }
    assert!(matches!(out.to_f32_blocking(), Err(Error::DeviceLost(_))));
    assert!(matches!(
        run_once(&ctx, shape, &Method::Dense, DType::F32, 3),
        Err(Error::DeviceLost(_))
    ));

    // A new context (and new plans) go on, with the same result.
    let fresh = common::gpu(None).unwrap();
    let again = run_once(&fresh, shape, &Method::Dense, DType::F32, 3).unwrap();
    assert_eq!(again, before);
}

/// Live GPU buffers and bind groups (wgpu's counters) and the host's resident memory.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    buffers: isize,
    buffer_bytes: isize,
    bind_groups: isize,
    kernels: usize,
    rss: u64,
}

fn footprint(ctx: &Context) -> Footprint {
    let g = ctx.gpu().unwrap();
    g.device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let c = g.device.get_internal_counters();
    Footprint {
        buffers: c.hal.buffers.read(),
        buffer_bytes: c.hal.buffer_memory.read(),
        bind_groups: c.hal.bind_groups.read(),
        kernels: ctx.cached_pipelines(),
        rss: resident_bytes(),
    }
}

/// The process's resident memory (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

#[test]
fn soak_of_changing_plans_leaves_nothing_behind() {
    let Some(ctx) = common::gpu(None) else { return };
    let secs: u64 = std::env::var("WGSPARSE_SOAK_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let methods: Vec<Method> = [
        "dense",
        "window:window=64,sinks=4",
        "sale:tau=0.01,local=64",
        "anchor:theta=4,block=64,step=2,init_keys=64",
        "proxy:block=64,min_budget=64",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let shapes = |i: usize| {
        let n = 96 + (i * 37) % 300;
        let d = [64, 80, 128][i % 3];
        let (hq, hk) = [(2, 1), (4, 2), (3, 3)][(i / 3) % 3];
        AttentionShape::new(hq, hk, n, d)
    };
    let dtypes = [DType::F32, DType::F16];
    let case = |i: usize| (shapes(i), &methods[i % methods.len()], dtypes[(i / 5) % 2]);
    // Warm-up: every (method, head_dim, dtype) once, so the kernel cache is full.
    let warm = methods.len() * 3 * 2 * 2;
    for i in 0..warm {
        let (shape, m, dt) = case(i);
        run_once(&ctx, shape, m, dt, i as u64).unwrap();
    }
    let base = footprint(&ctx);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0;
    let mut peak_rss = base.rss;
    while Instant::now() < deadline || runs < methods.len() {
        let i = warm + runs;
        let (shape, m, dt) = case(i);
        let out = run_once(&ctx, shape, m, dt, i as u64).unwrap();
        assert!(
            out.iter().all(|x| x.is_finite()),
            "run {runs}: {m:?} {shape:?}"
        );
        peak_rss = peak_rss.max(resident_bytes());
        runs += 1;
    }
    let end = footprint(&ctx);
    eprintln!("soak: {runs} runs in {secs} s; before {base:?}, after {end:?}, peak rss {peak_rss}");
    // Every plan, tensor and bind group of the runs is gone.
    assert_eq!(end.buffers, base.buffers, "live GPU buffers");
    assert_eq!(end.buffer_bytes, base.buffer_bytes, "GPU buffer memory");
    assert!(end.bind_groups <= base.bind_groups, "bind groups");
    // The kernel cache holds variants, not shapes: no new kernels after the warm-up.
    assert_eq!(end.kernels, base.kernels, "cached kernels");
    // The host's resident memory stays within 64 MiB of where it was (allocator slack).
    assert!(
        peak_rss <= base.rss + (64 << 20),
        "resident memory grew from {} to {peak_rss}",
        base.rss
    );
}
