//! Memory plans without a device (`wgsparse::attention::plan`): every method planned at
//! 128k and 256k tokens × 32 q-heads (8 kv-heads) × d 128, f16, against the H200's, a
//! browser's default WebGPU and lavapipe's limits; and the plan agreeing with what a real
//! build on this machine's GPU does under a lowered binding limit.

mod common;

use wgsparse::attention::plan::{Binding, DeviceLimits, MemoryPlan, plan};
use wgsparse::{AttentionShape, DType, Method};

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
    for n in [128 << 10, 256 << 10] {
        let shape = AttentionShape::new(32, 8, n, 128);
        for m in methods() {
            for (who, lim) in [
                ("h200", DeviceLimits::H200),
                ("webgpu", DeviceLimits::WEBGPU_DEFAULT),
                ("lavapipe", DeviceLimits::LAVAPIPE),
            ] {
                let p = plan(&shape, &m, DType::F16, true, &lim).unwrap();
                check_verdict(&p);
                // The flash passes split Q/O, K/V and the row state by ranges that fit
                // every device's bindings, at any length.
                for b in &p.buffers {
                    if matches!(b.binding, Binding::Ranges { .. }) {
                        assert!(b.largest_binding() <= lim.max_binding, "{who} {n}: {p}");
                    }
                }
                eprintln!("{who} {n} {}: {} problem(s)", m.name(), p.problems.len());
                match (who, n) {
                    // On the H200 every method fits at 128k and at 256k (Q alone is
                    // 2 GiB there: every kernel reads it by ranges or runs of heads).
                    ("h200", _) => assert!(p.fits(), "{p}"),
                    // A browser's 256 MiB buffers cannot hold a 1 GiB Q: the plan says
                    // so (one tensor per buffer), it does not fail.
                    ("webgpu", _) => {
                        assert!(p.problems.iter().any(|x| x.starts_with("Q:")), "{p}")
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
