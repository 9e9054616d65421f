//! The decoder-layer ops (RMSNorm, RoPE, linear projections in every layout and weight
//! format) against their CPU twins, and the whole SmallThinker layer plan (one
//! submission: router → attention → MoE) against the straightforward CPU layer, on
//! fresh random inputs with poisoned outputs and ragged token counts.
//!
//! Tolerances (f32 activations and accumulation): ops 1e-5 relative L2 and 1e-4
//! absolute; the whole layer 5e-4 absolute and 1e-4 relative L2.

mod common;

use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::attention::metrics::compare;
use wgsparse::attention::synthetic::gaussian;
use wgsparse::model::smallthinker::{DecoderLayerConfig, DecoderLayerWeights, decoder_layer_cpu};
use wgsparse::moe::{MoeConfig, PackedMatrix, WeightFormat};
use wgsparse::ops::linear::{LinearGpu, LinearLayout, from_head_major, linear_cpu, to_head_major};
use wgsparse::ops::rmsnorm::{RmsNormGpu, rmsnorm_cpu};
use wgsparse::ops::rope::{RopeGpu, rope_cpu, rope_table};
use wgsparse::{Context, DType, Error, Method, Recorder, Tensor};

fn ok(e: wgsparse::attention::metrics::ErrorStats, abs: f64, rel: f64) -> bool {
    e.max_abs_err <= abs && e.rel_l2_err <= rel
}

#[test]
fn rmsnorm_matches_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    for (t, h) in [(37, 96), (1, 256), (130, 64)] {
        let x = gaussian(t * h, seed ^ t as u64);
        let g: Vec<f32> = gaussian(h, seed ^ 3)
            .iter()
            .map(|v| 1.0 + 0.1 * v)
            .collect();
        let xt = Tensor::from_f32(&ctx, &[t, h], &x, DType::F32).unwrap();
        let gt = Tensor::from_f32(&ctx, &[h], &g, DType::F32).unwrap();
        let out = Tensor::filled(&ctx, &[t, h], DType::F32, f32::NAN).unwrap();
        let k = RmsNormGpu::build(&ctx, t, h, 1e-6).unwrap();
        k.run_blocking(&ctx, &xt, &gt, &out).unwrap();
        let e = compare(&out.to_f32_blocking().unwrap(), &rmsnorm_cpu(&x, &g, 1e-6));
        assert!(ok(e, 1e-5, 1e-6), "t={t} h={h}: {e:?}");
    }
}

#[test]
fn rope_matches_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    for (heads, t, d, theta) in [(3, 37, 64, 1.5e6), (2, 70, 128, 1e4), (1, 5, 256, 1e6)] {
        let x = gaussian(heads * t * d, seed ^ d as u64);
        let kx = gaussian(d * t, seed ^ 7);
        let xt = Tensor::from_f32(&ctx, &[heads, t, d], &x, DType::F32).unwrap();
        let kt = Tensor::from_f32(&ctx, &[1, t, d], &kx, DType::F32).unwrap();
        let r = RopeGpu::build(&ctx, &[heads, 1], t, d, theta, 0).unwrap();
        let mut rec = Recorder::new(&ctx, "rope test", 1).unwrap();
        r.record(
            &mut rec,
            "rope",
            &[xt.buffer().unwrap(), kt.buffer().unwrap()],
        )
        .unwrap();
        rec.submit_blocking().unwrap();
        let table = rope_table(t, d, theta, 0);
        let (mut want, mut wk) = (x.clone(), kx.clone());
        rope_cpu(&mut want, t, d, &table);
        rope_cpu(&mut wk, t, d, &table);
        let e = compare(&xt.to_f32_blocking().unwrap(), &want);
        assert!(ok(e, 1e-5, 1e-6), "heads={heads} t={t} d={d}: {e:?}");
        let e = compare(&kt.to_f32_blocking().unwrap(), &wk);
        assert!(ok(e, 1e-5, 1e-6), "k t={t} d={d}: {e:?}");
        // Position 0 is the identity; the table is cos/sin of pos·θ^(-2i/d).
        assert_eq!(&table[..2], &[1.0, 0.0]);
    }
    assert!(RopeGpu::build(&ctx, &[1], 4, 63, 1e4, 0).is_err());
    assert!(RopeGpu::build(&ctx, &[1], 4, 64, 0.5, 0).is_err());
}

#[test]
fn linear_matches_cpu_twin_in_every_layout() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let (t, k, n, d) = (70, 96, 80, 16);
    for format in [WeightFormat::F16, WeightFormat::Q4_0] {
        for layout in LinearLayout::used() {
            let w = gaussian(n * k, seed ^ 1);
            let m = PackedMatrix::pack(format, n, k, &w).unwrap();
            let x = gaussian(t * k, seed ^ 2);
            let res = gaussian(t * n, seed ^ 3);
            let x_dev = if layout.in_head_major {
                to_head_major(&x, t, d)
            } else {
                x.clone()
            };
            let xt = Tensor::from_f32(&ctx, &[t, k], &x_dev, DType::F32).unwrap();
            let rt = Tensor::from_f32(&ctx, &[t, n], &res, DType::F32).unwrap();
            let yt = Tensor::filled(&ctx, &[t, n], DType::F32, f32::NAN).unwrap();
            let lin = LinearGpu::build(&ctx, "test proj", &m, t, d, layout).unwrap();
            let with_res = layout.residual.then_some(&rt);
            let report = lin.run_blocking(&ctx, &xt, &yt, with_res).unwrap();
            // The matrix-unit kernel wherever the device has one (required in the coop
            // run of the test script), the portable one elsewhere.
            let coop = wgsparse::ops::linear::linear_coop_tile(ctx.capabilities(), format);
            let kernel = common::expected_kernel(coop, "linear_coop", "linear");
            assert_eq!(report.stages[0].variant.as_deref(), Some(kernel));
            let mut want = linear_cpu(&x, &m);
            if layout.residual {
                for (a, b) in want.iter_mut().zip(&res) {
                    *a += b;
                }
            }
            let mut got = yt.to_f32_blocking().unwrap();
            if layout.out_head_major {
                got = from_head_major(&got, t, d);
            }
            let e = compare(&got, &want);
            assert!(ok(e, 1e-4, 1e-5), "{format:?} {layout:?}: {e:?}");
            // A residual given to a kernel built without one is a typed error.
            if !layout.residual {
                assert!(matches!(
                    lin.run_blocking(&ctx, &xt, &yt, Some(&rt)),
                    Err(Error::InvalidArgument(_))
                ));
            }
        }
    }
}

#[test]
fn sliding_window_layer_matches_the_cpu_layer() {
    // A RoPE layer with a 40-key window and 4 sinks over 100 tokens: rows past the
    // window see only the sinks and the band, on both devices.
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let cfg = DecoderLayerConfig {
        window: Some(40),
        sinks: 4,
        ..small_layer(true)
    };
    let tokens = 100;
    let w = grid_router_weights(&cfg, seed);
    let h = cfg.moe.hidden;
    let x = grid_input(tokens * h, seed ^ 2);
    let plan = ctx.decoder_layer(cfg).tokens(tokens).build(&w).unwrap();
    let xt = Tensor::from_f32(&ctx, &[tokens, h], &x, DType::F32).unwrap();
    let mut out = Tensor::filled(&ctx, &[tokens, h], DType::F32, f32::NAN).unwrap();
    plan.run_into(&xt, &mut out).unwrap();
    let got = out.to_f32_blocking().unwrap();
    let packed = w.pack(WeightFormat::F16).unwrap();
    let want = decoder_layer_cpu(&x, &packed).unwrap();
    let e = compare(&got, &want);
    assert!(ok(e, 5e-4, 1e-4), "window layer: {e:?}");
    assert_eq!(plan.report().unwrap().attention, "window");
    // The window matters: the same layer with full attention differs.
    let full = DecoderLayerConfig {
        window: None,
        ..cfg
    };
    let wf = DecoderLayerWeights { config: full, ..w };
    let dense = decoder_layer_cpu(&x, &wf.pack(WeightFormat::F16).unwrap()).unwrap();
    assert!(compare(&dense, &want).max_abs_err > 1e-3);
}

/// Random layer weights whose router weights lie on a grid (multiples of 1/32), so that
/// with grid inputs every router logit is exact and the GPU and the CPU route alike.
fn grid_router_weights(cfg: &DecoderLayerConfig, seed: u64) -> DecoderLayerWeights {
    let mut w = DecoderLayerWeights::random(cfg, seed);
    w.moe.router = grid_input(w.moe.router.len(), seed ^ 1)
        .into_iter()
        .map(|v| v / 2.0)
        .collect();
    w
}

fn small_layer(rope: bool) -> DecoderLayerConfig {
    DecoderLayerConfig {
        moe: MoeConfig::new(128, 8, 2, 64),
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
        rope_theta: rope.then_some(1.5e6),
        window: None,
        sinks: 0,
        rms_eps: 1e-6,
    }
}

/// Layer input on a grid of 1/16 (exact router logits: both devices route alike).
fn grid_input(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(-32i32..=32) as f32 / 16.0)
        .collect()
}

#[test]
fn decoder_layer_plan_matches_the_cpu_layer() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    for (i, (rope, tokens, format)) in [
        (true, 45, WeightFormat::F16),
        (false, 45, WeightFormat::Q4_0),
        (true, 3, WeightFormat::Q4_0),
        (true, 70, WeightFormat::Q4_0),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = small_layer(rope);
        let s = seed + i as u64;
        let w = grid_router_weights(&cfg, s);
        let h = cfg.moe.hidden;
        let x = grid_input(tokens * h, s ^ 2);
        let plan = ctx
            .decoder_layer(cfg)
            .tokens(tokens)
            .format(format)
            .build(&w)
            .unwrap();
        let xt = Tensor::from_f32(&ctx, &[tokens, h], &x, DType::F32).unwrap();
        let mut out = Tensor::filled(&ctx, &[tokens, h], DType::F32, f32::NAN).unwrap();
        plan.run_into(&xt, &mut out).unwrap();
        let want = decoder_layer_cpu(&x, &w.pack(format).unwrap()).unwrap();
        let e = compare(&out.to_f32_blocking().unwrap(), &want);
        let rep = plan.report().unwrap();
        eprintln!(
            "rope={rope} T={tokens} {format:?}: {e:?} skip {:.3}",
            rep.experts.skip_frac
        );
        assert!(
            ok(e, 5e-4, 1e-4),
            "rope={rope} T={tokens} {format:?}: {e:?}"
        );
        assert_eq!(
            rep.experts.expert_counts.iter().sum::<u32>() as usize,
            tokens * 2
        );
        let names: Vec<&str> = rep.timing.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names[0], "router",
            "the router is recorded first: {names:?}"
        );
        assert_eq!(names.contains(&"rope"), rope);
        assert_eq!(names.last(), Some(&"combine"));
    }
}

#[test]
fn streamed_expert_layer_equals_the_resident_layer() {
    // Router in its own submission, attention behind it, experts uploaded once the
    // routing is read back: the same output as the one-submission layer, bit for bit.
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    for (i, (tokens, format, slots)) in [
        (45, WeightFormat::F16, 3),
        (3, WeightFormat::Q4_0, 8),
        (70, WeightFormat::Q4_0, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = small_layer(true);
        let s = seed + 50 + i as u64;
        let w = DecoderLayerWeights::random(&cfg, s);
        let h = cfg.moe.hidden;
        let x = grid_input(tokens * h, s ^ 2);
        let xt = Tensor::from_f32(&ctx, &[tokens, h], &x, DType::F32).unwrap();
        let run = |plan: &wgsparse::model::smallthinker::DecoderLayerPlan| {
            let mut out = Tensor::filled(&ctx, &[tokens, h], DType::F32, f32::NAN).unwrap();
            plan.run_into(&xt, &mut out).unwrap();
            out.to_f32_blocking().unwrap()
        };
        let resident = ctx.decoder_layer(cfg).tokens(tokens).format(format);
        let want = run(&resident.build(&w).unwrap());
        let streamed = ctx
            .decoder_layer(cfg)
            .tokens(tokens)
            .format(format)
            .stream_experts(slots)
            .build(&w)
            .unwrap();
        for pass in 0..2 {
            let got = run(&streamed);
            assert_eq!(got, want, "T={tokens} {format:?} slots {slots} pass {pass}");
            let rep = streamed.report().unwrap();
            let st = rep.experts.stream.clone().unwrap();
            assert_eq!(
                st.routed,
                rep.experts.expert_counts.iter().filter(|&&n| n > 0).count()
            );
            assert_eq!(st.rounds, st.routed.div_ceil(slots).max(1));
            if pass == 0 {
                assert_eq!((st.hits, st.uploads), (0, st.routed));
            }
            let names: Vec<&str> = rep.timing.stages.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names[0], "router");
            let at = |n: &str| names.iter().position(|x| *x == n).expect(n);
            assert!(at("dispatch") < at("rmsnorm_1"), "{names:?}");
            assert!(at("o_proj") < at("rmsnorm_2") && at("rmsnorm_2") < at("expert_up"));
            assert_eq!(names.last(), Some(&"combine"));
        }
    }
}

#[test]
fn cpu_layer_plan_equals_the_twin_and_the_nope_pattern() {
    let ctx = Context::cpu();
    let cfg = small_layer(true);
    let w = DecoderLayerWeights::random(&cfg, 5);
    let x = gaussian(9 * 128, 6);
    let plan = ctx.decoder_layer(cfg).tokens(9).build(&w).unwrap();
    let xt = Tensor::from_f32(&ctx, &[9, 128], &x, DType::F32).unwrap();
    let out = plan.run(&xt).unwrap().to_f32_blocking().unwrap();
    assert_eq!(
        out,
        decoder_layer_cpu(&x, &w.pack(WeightFormat::F16).unwrap()).unwrap()
    );
    let rep = plan.report().unwrap();
    assert!(rep.experts.skip_frac > 0.0 && rep.experts.skip_frac < 1.0);

    // SmallThinker-21B pattern: every 4th layer NoPE + full, the others RoPE + window.
    let nope = cfg.with_nope_pattern(8, 4, 4096);
    assert_eq!((nope.rope_theta, nope.window), (None, None));
    assert_eq!(nope.attention_method().unwrap(), Method::Dense);
    let swa = cfg.with_nope_pattern(9, 4, 4096);
    assert_eq!((swa.rope_theta, swa.window), (Some(1.5e6), Some(4096)));
    assert!(matches!(swa.attention_method().unwrap(), Method::Window(_)));
    let zero = DecoderLayerConfig {
        window: Some(0),
        ..cfg
    };
    let wz = DecoderLayerWeights::random(&zero, 1);
    assert!(matches!(
        ctx.decoder_layer(zero).tokens(4).build(&wz),
        Err(Error::InvalidArgument(_))
    ));
    let bad = DecoderLayerConfig {
        head_dim: 40,
        ..cfg
    };
    assert!(bad.validate().is_err());
    let wrong = Tensor::zeros(&ctx, &[8, 128], DType::F32).unwrap();
    assert!(matches!(plan.run(&wrong), Err(Error::Mismatch(_))));
}
