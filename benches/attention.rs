//! Criterion benchmarks of dense causal attention: the CPU path at a few small sizes and,
//! when a GPU adapter is found, the GPU path (`cargo bench --bench attention`).
//!
//! Throughput is in FLOPs of the causal attention (`AttentionShape::flops(true)`), shown
//! by criterion as "elem/s". Samples are few and flat so that a run on lavapipe (a CPU
//! Vulkan driver) finishes in a few minutes; on a real GPU the group adds larger shapes.
//! `WGSPARSE_BACKEND=cpu` skips the GPU group; the other `WGSPARSE_*` variables pick the
//! adapter as everywhere else.

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use wgsparse::{AttentionShape, Context, ContextOptions, DType, Tensor};

/// Builds a causal plan for `shape` and benchmarks `run_into` (inputs and output
/// allocated once; each GPU iteration submits and waits for completion).
fn bench_shape(
    c: &mut Criterion,
    group_name: &str,
    ctx: &Context,
    shapes: &[AttentionShape],
    dtypes: &[DType],
) {
    let mut group = c.benchmark_group(group_name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for shape in shapes {
        for &dtype in dtypes {
            let plan = ctx
                .attention(*shape)
                .causal(true)
                .dtype(dtype)
                .build()
                .expect("attention plan");
            let (q, k, v) =
                wgsparse::attention::synthetic::qkv(ctx, shape, dtype, 7).expect("inputs");
            let mut out = Tensor::zeros(ctx, &shape.q_dims(), dtype).expect("output");
            let id = BenchmarkId::new(
                format!("causal_{}", dtype.name()),
                format!(
                    "{}h{}kv_{}x{}",
                    shape.q_heads, shape.kv_heads, shape.seq_len, shape.head_dim
                ),
            );
            group.throughput(Throughput::Elements(shape.flops(true) as u64));
            group.bench_function(id, |b| {
                b.iter(|| plan.run_into(&q, &k, &v, &mut out).expect("run"))
            });
        }
    }
    group.finish();
}

fn cpu(c: &mut Criterion) {
    let ctx = Context::cpu();
    let shapes = [
        AttentionShape::new(8, 2, 512, 128),
        AttentionShape::new(8, 2, 1024, 128),
    ];
    bench_shape(c, "dense_cpu", &ctx, &shapes, &[DType::F32]);
}

fn gpu(c: &mut Criterion) {
    let opts = match ContextOptions::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dense_gpu: skipped ({e})");
            return;
        }
    };
    let ctx = match Context::new_blocking(opts) {
        Ok(ctx) if !ctx.is_cpu() => ctx,
        Ok(_) => {
            eprintln!("dense_gpu: skipped (no GPU adapter; the CPU path is benched above)");
            return;
        }
        Err(e) => {
            eprintln!("dense_gpu: skipped ({e})");
            return;
        }
    };
    let software = ctx
        .gpu()
        .is_some_and(|g| g.info.device_type == wgpu::DeviceType::Cpu);
    eprintln!(
        "dense_gpu: {} on {}{}",
        ctx.adapter_name(),
        ctx.backend(),
        if software { " (software)" } else { "" }
    );
    let mut shapes = vec![AttentionShape::new(8, 2, 512, 128)];
    if !software {
        shapes.push(AttentionShape::new(32, 8, 4096, 128));
        shapes.push(AttentionShape::new(32, 8, 16384, 128));
    }
    bench_shape(c, "dense_gpu", &ctx, &shapes, &[DType::F32, DType::F16]);
}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
