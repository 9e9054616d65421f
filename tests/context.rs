//! Contexts: wrapping a device the host app already has, several contexts at once, and
//! the capability read-out.

mod common;

use wgsparse::attention::verify::{dense_against_cpu_twin, dense_tolerance};
use wgsparse::{AttentionShape, Backend, Context, DType, LimitOverrides};

#[test]
fn wraps_a_host_device_and_runs_on_it() {
    // Only to learn whether a GPU exists (and to fail under WGSPARSE_REQUIRE_GPU=1).
    let Some(probe) = common::gpu(None) else {
        return;
    };
    let backend = probe.gpu().unwrap().info.backend;
    drop(probe);
    // The host application opens its own device, its own way ...
    let (adapter, device, queue) = pollster::block_on(async {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::from(backend);
        let instance = wgpu::Instance::new(desc);
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions::default())
            .await
            .expect("adapter");
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("host app device"),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .expect("device");
        (adapter, device, queue)
    });
    // ... and hands it to wgsparse.
    let ctx = Context::from_wgpu(adapter, device.clone(), queue);
    assert!(!ctx.is_cpu());
    // The capabilities are those of the device as opened (no shader-f16 requested here).
    assert!(!ctx.capabilities().f16);
    let shape = AttentionShape::new(2, 1, 40, 64);
    let v = dense_against_cpu_twin(&ctx, shape, DType::F32, true, common::seed()).unwrap();
    assert!(
        v.errors.max_abs_err <= dense_tolerance(DType::F32),
        "{:?}",
        v.errors
    );
    // The app's device stays usable by the app.
    let _ = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app buffer"),
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
}

#[test]
fn several_contexts_live_at_once() {
    let Some(first) = common::gpu(None) else {
        return;
    };
    let all = pollster::block_on(Context::all_gpus()).unwrap();
    assert!(!all.is_empty());
    let cpu = Context::cpu();
    let shape = AttentionShape::new(2, 2, 33, 64);
    let seed = common::seed();
    for ctx in all.iter().chain([&first, &cpu]) {
        let v = dense_against_cpu_twin(ctx, shape, DType::F32, false, seed).unwrap();
        eprintln!("{ctx:?}: {:?}", v.errors);
        assert!(
            v.errors.max_abs_err <= dense_tolerance(DType::F32),
            "{ctx:?}"
        );
    }
    // Tensors of one context are refused by a plan of another.
    let plan = first.attention(shape).build().unwrap();
    let (q, k, v) = wgsparse::attention::synthetic::qkv(&cpu, &shape, DType::F32, seed).unwrap();
    assert!(matches!(
        plan.run(&q, &k, &v),
        Err(wgsparse::Error::WrongContext)
    ));
}

#[test]
fn capabilities_and_overrides() {
    let adapters = pollster::block_on(Context::list_adapters());
    assert_eq!(adapters.last().unwrap().backend, Backend::Cpu);
    let Some(ctx) = common::gpu_limited(Some(1 << 20), Some(16384)) else {
        return;
    };
    let caps = ctx.capabilities();
    assert_eq!(caps.max_storage_binding, 1 << 20);
    assert!(caps.adapter_max_storage_binding >= 1 << 20);
    assert_eq!(caps.max_workgroup_storage, 16384);
    // Overrides never raise a limit.
    let a = pollster::block_on(async {
        let inst = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        inst.request_adapter(&Default::default()).await.unwrap()
    });
    let real = a.limits().max_storage_buffer_binding_size;
    let big = pollster::block_on(Context::from_adapter(
        a,
        LimitOverrides {
            max_binding_bytes: Some(u64::MAX),
            ..Default::default()
        },
    ))
    .unwrap();
    assert_eq!(big.capabilities().max_storage_binding, real);
}

/// The runtime records the peak of live GPU buffer memory: a 4 MiB tensor raises the
/// live count and the peak by at least its size; once it is dropped (and the device
/// has freed it) the live count falls back while the peak stays; a reset starts from
/// what is live.
#[test]
fn peak_gpu_buffer_memory_is_recorded() {
    let Some(ctx) = common::gpu(None) else {
        return;
    };
    let g = ctx.gpu().expect("a GPU context");
    let poll = || {
        let _ = g.device.poll(wgpu::PollType::wait_indefinitely());
    };
    poll();
    g.reset_peak_buffer_bytes();
    let before = g.buffer_bytes();
    let bytes = 4u64 << 20;
    let t = wgsparse::Tensor::zeros(&ctx, &[(bytes / 4) as usize], DType::F32).unwrap();
    let live = g.buffer_bytes();
    assert!(
        live >= before + bytes,
        "live {live} after {before} + {bytes}"
    );
    assert!(g.peak_buffer_bytes() >= live);
    drop(t);
    poll();
    let after = g.buffer_bytes();
    assert!(
        after + bytes <= live,
        "live {after} after dropping from {live}"
    );
    assert!(g.peak_buffer_bytes() >= before + bytes, "the peak stays");
    g.reset_peak_buffer_bytes();
    assert!(
        g.peak_buffer_bytes() < before + bytes,
        "reset to what is live"
    );
}
