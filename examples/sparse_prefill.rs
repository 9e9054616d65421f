//! Sparse prefill attention on the application's own `wgpu::Device`.
//!
//! An app that already renders or computes with wgpu hands its device to wgsparse
//! (`Context::from_wgpu`), builds a plan once for its shape and method, and runs it on
//! its own buffers. Without a GPU adapter the example falls back to the CPU path.
//!
//! ```text
//! cargo run --release --example sparse_prefill -- [METHOD] [TOKENS]
//! cargo run --release --example sparse_prefill -- sale:tau=0.004 2048
//! ```

use wgsparse::attention::synthetic::{Structure, structured_qkv_host};
use wgsparse::attention::upload_qkv;
use wgsparse::{AttentionShape, Context, DType, Method, Result};

/// The app's own device: the first adapter wgpu offers (any backend).
fn app_device() -> Option<(wgpu::Adapter, wgpu::Device, wgpu::Queue)> {
    let instance = wgpu::Instance::default();
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .ok()?;
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).ok()?;
    Some((adapter, device, queue))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let method: Method = args.next().as_deref().unwrap_or("anchor").parse()?;
    let tokens: usize = args.next().map_or(Ok(4096), |t| t.parse()).map_err(|_| {
        wgsparse::Error::InvalidArgument("TOKENS must be a positive integer".into())
    })?;

    let ctx = match app_device() {
        Some((adapter, device, queue)) => Context::from_wgpu(adapter, device, queue),
        None => Context::cpu(),
    };
    // 8 query heads sharing 2 key/value heads, head dimension 64, f32 storage (every
    // adapter has it; f16 storage halves the memory where `capabilities().f16_storage`).
    let shape = AttentionShape::new(8, 2, tokens, 64);
    let plan = ctx
        .attention(shape)
        .method(method.clone())
        .dtype(DType::F32)
        .build()?;
    let dense = ctx.attention(shape).dtype(DType::F32).build()?;
    // Structured synthetic Q/K/V (attention sinks, a local band, heavy columns, RoPE);
    // an app passes its own tensors here.
    let (hq, hk, hv) = structured_qkv_host(&shape, &Structure::default(), 7);
    let (q, k, v) = upload_qkv(&ctx, &shape, &hq, &hk, &hv, DType::F32)?;

    let out = plan.run(&q, &k, &v)?;
    let reference = dense.run(&q, &k, &v)?;
    let report = plan.report().expect("the plan ran");
    let (a, b) = (out.to_f32_blocking()?, reference.to_f32_blocking()?);
    let max_err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);

    println!(
        "{method} on {} ({}), {tokens} tokens",
        ctx.adapter_name(),
        ctx.backend()
    );
    for s in &report.timing.stages {
        println!(
            "  stage {:<10} {:>9} ms",
            s.name,
            s.ms.map_or("-".into(), |x| format!("{x:.3}"))
        );
    }
    println!(
        "  density {:.3}, max |sparse - dense| {max_err:.2e}",
        report.density
    );
    if let Some(stats) = &report.stats {
        println!("  {stats}");
    }
    if !max_err.is_finite() {
        return Err(wgsparse::Error::InvalidArgument("non-finite output".into()));
    }
    Ok(())
}
