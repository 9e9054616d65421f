//! Memory plans without a device (`wgsparse::attention::plan`): every method planned at
//! 128k and 256k tokens × 32 q-heads (8 kv-heads) × d 128, f16, against the H200's, a
//! browser's default WebGPU and lavapipe's limits; the plan agreeing with what a real
//! build on this machine's GPU does under a lowered binding limit; and real runs in head
//! groups (a lowered buffer limit) giving the whole problem's output and statistics.

mod common;

use wgsparse::attention::plan::{Binding, DeviceLimits, MemoryPlan, plan, plan_groups};
use wgsparse::{AttentionShape, Context, ContextOptions, DType, Method};

fn methods() -> Vec<Method> {
    ["dense", "window", "sale", "anchor", "proxy"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// The plan's verdict is its buffers': a problem for exactly the buffers over the
/// buffer limit or with a binding over the binding limit.
fn check_verdict(p: &MemoryPlan) {
    let lim = p.limits;
    let over: Vec<&str> = p
        .buffers
        .iter()
        .filter(|b| b.bytes > lim.max_buffer || b.largest_binding() > lim.max_binding)
        .map(|b| b.name.as_str())
        .collect();
    // Problems of buffers (a pass that cannot be split at all says `pass NAME: …`).
    let of_buffers: Vec<&String> = p
        .problems
        .iter()
        .filter(|m| !m.starts_with("pass "))
        .collect();
    for m in &of_buffers {
        assert!(
            over.iter().any(|b| m.starts_with(&format!("{b}:"))),
            "{m}: {p}"
        );
    }
    assert_eq!(over.len(), of_buffers.len(), "{p}");
    // Ranges never exceed their buffer.
    for b in &p.buffers {
        if let Binding::Ranges { largest, pieces } = b.binding {
            assert!(largest <= b.bytes + lim.offset_align && pieces >= 1, "{p}");
        }
    }
}

#[test]
fn long_prompts_plan_against_the_h200_browser_and_lavapipe_limits() {
    let mut all = methods();
    // One proxy head per kv-head: ProxyAttn's groups can then run apart.
    all.push("proxy:proxy_groups=8".parse().unwrap());
    for n in [128 << 10, 256 << 10] {
        let shape = AttentionShape::new(32, 8, n, 128);
        for m in all.clone() {
            for (who, lim) in [
                ("h200", DeviceLimits::H200),
                ("webgpu", DeviceLimits::WEBGPU_DEFAULT),
                ("lavapipe", DeviceLimits::LAVAPIPE),
            ] {
                let whole = plan(&shape, &m, DType::F16, true, &lim).unwrap();
                check_verdict(&whole);
                let gp = plan_groups(&shape, &m, DType::F16, true, &lim).unwrap();
                let p = &gp.plan;
                check_verdict(p);
                if m == Method::Proxy(Default::default()) && who != "h200" {
                    // ProxyAttn's default pools all 32 q-heads into one proxy head: they
                    // cannot run apart, and the plan says what would let them.
                    assert_eq!(gp.groups, 1);
                    if !gp.fits() {
                        assert!(
                            p.problems.iter().any(|x| x.contains("proxy_groups=8")),
                            "{gp}"
                        );
                    }
                    continue;
                }
                // Every binding of every buffer fits: the flash passes split Q/O, K/V
                // and the row state by ranges, the selectors read Q by runs of heads,
                // and what no binding split fixes runs in head groups.
                assert!(gp.fits(), "{who} {n}: {gp}");
                for b in &p.buffers {
                    assert!(b.largest_binding() <= lim.max_binding, "{who} {n}: {gp}");
                    assert!(b.bytes <= lim.max_buffer, "{who} {n}: {gp}");
                }
                // The groups cover the problem's heads exactly.
                assert_eq!(gp.groups * p.shape.q_heads, shape.q_heads, "{gp}");
                assert_eq!(gp.q_heads_per_group, p.shape.q_heads);
                eprintln!("{who} {n} {}: {} group(s)", m.name(), gp.groups);
                match who {
                    // On the H200 every method fits whole at 128k and at 256k (Q alone
                    // is 2 GiB there: every kernel reads it by ranges or runs of heads).
                    "h200" => assert!(whole.fits() && gp.groups == 1, "{whole}"),
                    // A browser's 256 MiB buffers cannot hold a 1 GiB Q: the whole
                    // problem's plan says so, and the grouped plan runs it in groups.
                    "webgpu" => {
                        assert!(
                            whole.problems.iter().any(|x| x.starts_with("Q:")),
                            "{whole}"
                        );
                        assert!(gp.groups >= 4, "{gp}");
                    }
                    _ => {}
                }
            }
        }
    }
}

/// What the plan says is what a build does: on this machine's GPU with bindings
/// lowered to a few hundred KiB, a method whose plan fits builds and runs, one whose
/// plan does not is refused with a typed error naming a buffer of the plan.
#[test]
fn plans_agree_with_builds_under_lowered_limits() {
    let shape = AttentionShape::new(4, 2, 1024, 64);
    let (mut built_n, mut refused_n) = (0, 0);
    for kib in [96u64, 192, 1024] {
        let Some(ctx) = common::gpu(Some(kib << 10)) else {
            return;
        };
        let lim = DeviceLimits::of(ctx.capabilities());
        assert_eq!(lim.max_binding, kib << 10);
        for m in methods() {
            let p = plan(&shape, &m, DType::F16, true, &lim).unwrap();
            check_verdict(&p);
            let built = ctx
                .attention(shape)
                .method(m.clone())
                .dtype(DType::F16)
                .build();
            match (&built, p.fits()) {
                (Ok(_), true) => built_n += 1,
                (Err(wgsparse::Error::TooLarge { what, .. }), false) => {
                    refused_n += 1;
                    let w = what.split(' ').next().unwrap_or("");
                    assert!(
                        p.problems.iter().any(|x| x.contains(w)),
                        "{kib} KiB {}: build refused `{what}`, plan: {p}",
                        m.name()
                    );
                }
                (b, fits) => panic!(
                    "{kib} KiB {}: build {:?} but plan fits = {fits}: {p}",
                    m.name(),
                    b.as_ref().err()
                ),
            }
        }
    }
    // Both outcomes happened: the test compared plans and builds on each side.
    assert!(
        built_n > 0 && refused_n > 0,
        "built {built_n}, refused {refused_n}"
    );
}

fn context_with_buffer_limit(max_buffer: Option<u64>) -> Option<Context> {
    let full = common::gpu(None)?;
    let _ = full;
    let mut o = ContextOptions::from_env().expect("environment");
    if o.backend == wgsparse::Backend::Cpu {
        o.backend = wgsparse::Backend::Auto;
    }
    o.require_gpu = true;
    o.max_buffer_bytes = max_buffer;
    Some(Context::new_blocking(o).expect("the GPU found above"))
}

/// Real runs under a lowered buffer limit: the problem runs in head groups (runs of
/// kv-heads, one kv-head's q-heads, and for ProxyAttn in f16 a row state held in two
/// buffers) and gives the output, density and statistics of the whole problem run at
/// once on the same GPU and on the CPU path (fresh random Q/K/V, ragged length).
#[test]
fn head_groups_under_a_lowered_buffer_limit_match_the_whole_problem() {
    let Some(gpu) = common::gpu(None) else {
        return;
    };
    let seed = common::seed();
    let shape = AttentionShape::new(8, 2, 600, 64);
    let mut methods: Vec<Method> = [
        "dense",
        "window:window=64,sinks=4",
        "sale",
        "anchor:theta=4,block=64,step=2,init_keys=64",
        "proxy:block=64,min_budget=64,gamma=0.9,proxy_groups=2",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    methods.push(Method::BlockSparse(std::sync::Arc::new(
        common::random_block_lut(&shape, 64, 64, seed),
    )));
    let cpu = Context::cpu();
    for dtype in [DType::F32, DType::F16] {
        let (q, k, v) = common::planted_qkv(&shape, dtype, seed);
        let es = dtype.size() as u64;
        let q_bytes = (shape.q_heads * shape.seq_len * shape.head_dim) as u64 * es;
        // Q of 4 q-heads fits, of all 8 does not; in f16 the f32 row state of 4 heads
        // (twice Q's bytes) does not fit either: held in two buffers.
        let limit = q_bytes * 5 / 8;
        let low = context_with_buffer_limit(Some(limit)).unwrap();
        for m in &methods {
            let run = |ctx: &Context| {
                let g = ctx
                    .attention(shape)
                    .method(m.clone())
                    .dtype(dtype)
                    .build_grouped()
                    .unwrap();
                let out = g.run_host(&q, &k, &v).unwrap();
                (g.groups(), out, g.report().unwrap())
            };
            let (g1, whole, rw) = run(&gpu);
            let (gn, grouped, rg) = run(&low);
            let (gc, on_cpu, rc) = run(&cpu);
            assert_eq!((g1, gc), (1, 1), "{}", m.name());
            assert!(
                gn >= 2,
                "{} {dtype:?}: {gn} group(s) under {limit} bytes",
                m.name()
            );
            assert!(grouped.iter().all(|x| x.is_finite()), "{}", m.name());
            let tol = if dtype == DType::F16 { 2e-3 } else { 2e-5 };
            // Each method here leaves pairs out (the groups are not all dense).
            if m.name() != "dense" {
                assert!(rw.density < 0.95, "{} keeps {}", m.name(), rw.density);
            }
            // Relative to the magnitude above 1 (an f16 ulp grows with it).
            let err = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
                    .fold(0.0f32, f32::max)
            };
            let (e_gpu, e_cpu) = (err(&grouped, &whole), err(&grouped, &on_cpu));
            eprintln!(
                "{} {dtype:?}: {gn} groups, max rel. |grouped - whole| {e_gpu:.2e}, vs cpu {e_cpu:.2e}, density {:.4} / {:.4}",
                m.name(),
                rg.density,
                rw.density
            );
            // Grouped and whole run the same kernels: equal within rounding (0 here);
            // the CPU path sums in another order (f32: up to a few 1e-5 relative) and
            // rounds to f16 by itself (f16: up to 2 ulps).
            let cpu_tol = if dtype == DType::F16 { 4e-3 } else { 1e-4 };
            assert!(e_gpu <= tol && e_cpu <= cpu_tol, "{} {dtype:?}", m.name());
            // The same pairs were computed: the statistics are the whole problem's.
            assert!((rg.density - rw.density).abs() < 1e-9, "{}", m.name());
            assert!((rg.density - rc.density).abs() < 0.01, "{}", m.name());
            assert_eq!(rg.stats, rw.stats, "{}", m.name());
            // In f16 the two-pass methods hold each group's row state in two buffers.
            let gp = plan_groups(
                &shape,
                m,
                dtype,
                true,
                &DeviceLimits::of(low.capabilities()),
            )
            .unwrap();
            assert_eq!(gp.groups, gn);
            let split_state = gp.plan.buffers.iter().any(|b| b.name.contains("acc 1/2"));
            assert_eq!(
                split_state,
                dtype == DType::F16 && m.manages_state(),
                "{gp}"
            );
        }
    }
}

/// `layer --dry-run`'s plan: a SmallThinker-4B decoder layer at 32k tokens fits the
/// H200; under a browser's limits its token-sized activations do not, and the plan says
/// how many tokens do.
#[test]
fn decoder_layer_plans_against_the_h200_and_browser_limits() {
    use wgsparse::model::smallthinker::{DecoderLayerConfig, layer_memory_plan};
    use wgsparse::moe::WeightFormat;
    use wgsparse::moe::stream::ExpertResidency;
    let cfg = DecoderLayerConfig::smallthinker_4b();
    let plan = |lim: &DeviceLimits, t| {
        layer_memory_plan(&cfg, t, WeightFormat::Q4_0, ExpertResidency::Resident, lim).unwrap()
    };
    let h200 = plan(&DeviceLimits::H200, 32768);
    assert!(h200.fits(), "{h200}");
    let web = plan(&DeviceLimits::WEBGPU_DEFAULT, 32768);
    assert!(!web.fits());
    let most: usize = web
        .problems
        .iter()
        .find_map(|p| {
            p.strip_prefix("tokens: at most ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{web}"));
    // That many tokens fit, one more block of them does not.
    assert!(
        plan(&DeviceLimits::WEBGPU_DEFAULT, most).moe.fits(),
        "{most}"
    );
    assert!(most < 32768);
}
