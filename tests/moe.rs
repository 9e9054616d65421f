//! MoE kernels vs their CPU twins: router (logits, top-k with ties, weights), dispatch
//! (histogram, prefix sum, stable scatter, inverse map), expert FFN (tiled and GEMV,
//! f16 and Q4_0, neuron skipping) and combine, on fresh random inputs with every GPU
//! intermediate and the output poisoned (NaN / u32::MAX), ragged token counts, experts
//! with no token, all tokens on one expert, and router ties.
//!
//! Inputs to the router are drawn on a grid (multiples of 1/16) so that every logit is
//! an exact f32 sum on both devices: the GPU and the CPU then pick the same experts,
//! ties included, and the downstream kernels can be compared on identical routing.
//!
//! Tolerances (f32 accumulation, unit-scale data): logits and weights 1e-6 absolute;
//! activations, expert outputs and the layer output 2e-4 absolute and 1e-5 relative L2;
//! the skip count within 1e-4 of the evaluated pairs (+2) (gates within rounding of 0).

mod common;

use proptest::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::attention::metrics::compare;
use wgsparse::moe::cpu::{self, moe_cpu};
use wgsparse::moe::expert_ffn::ffn_coop_tile;
use wgsparse::moe::{FfnPath, MoeConfig, MoeWeights, RouterScoring, WeightFormat};
use wgsparse::{Context, DType, Error, Tensor};

const ACT_TOL: f64 = 2e-4;
const REL_TOL: f64 = 1e-5;

/// `n` values k/16 with k uniform in [-range·16, range·16].
fn grid_values(n: usize, range: i32, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-range * 16..=range * 16) as f32 / 16.0)
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum RouterKind {
    /// Independent random rows.
    Random,
    /// Rows 1 and 3 (and 2 and 5) equal: ties on every token between those experts.
    SomeTies,
    /// Every row equal: every logit ties, all tokens go to experts 0..k (the others get
    /// no token; with k = 1 everything goes to expert 0).
    AllTied,
}

struct Case {
    cfg: MoeConfig,
    tokens: usize,
    format: WeightFormat,
    path: FfnPath,
    router: RouterKind,
    /// Tile height of the tiled kernels (None: the plan's choice).
    tile_m: Option<usize>,
    /// Stream the experts through this many GPU slots (None: all resident).
    slots: Option<usize>,
}

impl Case {
    /// Random routing, the plan's tile height, every expert resident.
    fn new(cfg: MoeConfig, tokens: usize, format: WeightFormat, path: FfnPath) -> Self {
        Case {
            cfg,
            tokens,
            format,
            path,
            router: RouterKind::Random,
            tile_m: None,
            slots: None,
        }
    }
    fn router(self, router: RouterKind) -> Self {
        Case { router, ..self }
    }
    fn tile_m(self, tile_m: usize) -> Self {
        Case {
            tile_m: Some(tile_m),
            ..self
        }
    }
    fn slots(self, slots: usize) -> Self {
        Case {
            slots: Some(slots),
            ..self
        }
    }
    fn softmax(mut self) -> Self {
        self.cfg.scoring = RouterScoring::Softmax;
        self
    }
}

fn weights_for(case: &Case, rng: &mut StdRng, seed: u64) -> MoeWeights {
    let c = &case.cfg;
    let mut w = MoeWeights::random(c, seed);
    w.router = grid_values(c.experts * c.hidden, 1, rng);
    let h = c.hidden;
    match case.router {
        RouterKind::Random => {}
        RouterKind::SomeTies => {
            for (a, b) in [(1, 3), (2, 5)] {
                if b < c.experts {
                    let row = w.router[a * h..(a + 1) * h].to_vec();
                    w.router[b * h..(b + 1) * h].copy_from_slice(&row);
                }
            }
        }
        RouterKind::AllTied => {
            let row = w.router[..h].to_vec();
            for e in 1..c.experts {
                w.router[e * h..(e + 1) * h].copy_from_slice(&row);
            }
        }
    }
    w
}

fn check_case(ctx: &Context, case: &Case, seed: u64) {
    let c = &case.cfg;
    let (t, h, k, f) = (case.tokens, c.hidden, c.top_k, c.ffn);
    let mut rng = StdRng::seed_from_u64(seed);
    let w = weights_for(case, &mut rng, seed);
    let x = grid_values(t * h, 2, &mut rng);
    let z = wgsparse::attention::synthetic::gaussian(t * h, seed ^ 0x77);
    let res = wgsparse::attention::synthetic::gaussian(t * h, seed ^ 0x99);
    let mut b = ctx.moe(*c).tokens(t).format(case.format).path(case.path);
    if let Some(m) = case.tile_m {
        b = b.tile_m(m);
    }
    if let Some(s) = case.slots {
        b = b.stream_experts(s);
    }
    let plan = b.build(&w).unwrap();
    let packed = w.pack(case.format).unwrap();
    let want = moe_cpu(&x, &z, &res, &packed);

    let xt = Tensor::from_f32(ctx, &[t, h], &x, DType::F32).unwrap();
    let zt = Tensor::from_f32(ctx, &[t, h], &z, DType::F32).unwrap();
    let rt = Tensor::from_f32(ctx, &[t, h], &res, DType::F32).unwrap();
    let mut out = Tensor::filled(ctx, &[t, h], DType::F32, f32::NAN).unwrap();
    plan.poison_intermediates().unwrap();
    plan.run_into(&xt, &zt, &rt, &mut out).unwrap();
    let got = plan.intermediates_blocking().unwrap();
    let label = format!(
        "{:?} T={t} {:?} {:?} TM={} {:?} slots {:?}",
        c,
        case.format,
        case.path,
        plan.tile_m(),
        case.router,
        case.slots
    );

    // Router.
    let e_logits = compare(&got.logits, &want.logits);
    assert!(e_logits.max_abs_err <= 1e-6, "{label}: logits {e_logits:?}");
    assert_eq!(got.ids, want.ids, "{label}: expert ids");
    let e_w = compare(&got.weights, &want.weights);
    assert!(e_w.max_abs_err <= 1e-6, "{label}: router weights {e_w:?}");
    // Router on the GPU's own logits: the top-k logic alone, exactly.
    let (ids2, _) = cpu::top_k(&got.logits, c.experts, k, c.scoring);
    assert_eq!(got.ids, ids2, "{label}: top-k on the GPU logits");

    // Dispatch.
    let e = c.experts;
    assert_eq!(&got.meta[..e], &want.map.counts[..], "{label}: counts");
    assert_eq!(
        &got.meta[e..2 * e + 1],
        &want.map.offsets[..],
        "{label}: offsets"
    );
    assert_eq!(
        &got.meta[2 * e + 1..3 * e + 2],
        &want.map.tile_starts(plan.tile_m() as u32)[..],
        "{label}: tile starts"
    );
    assert_eq!(got.sorted, want.map.sorted, "{label}: sorted");
    assert_eq!(got.inv, want.map.inv, "{label}: inverse map");

    // Expert FFN.
    let e_act = compare(&got.act, &want.act);
    assert!(
        e_act.max_abs_err <= ACT_TOL && e_act.rel_l2_err <= REL_TOL,
        "{label}: act {e_act:?}"
    );
    let e_y = compare(&got.y, &want.y);
    assert!(
        e_y.max_abs_err <= ACT_TOL && e_y.rel_l2_err <= REL_TOL,
        "{label}: y {e_y:?}"
    );
    let evaluated = (t * k * f) as u32;
    assert_eq!(got.stats[1], evaluated, "{label}: evaluated pairs");
    let diff = (got.stats[0] as i64 - want.skipped as i64).unsigned_abs();
    assert!(
        diff as f64 <= 2.0 + 1e-4 * evaluated as f64,
        "{label}: skipped {} vs {}",
        got.stats[0],
        want.skipped
    );

    // Combine / output.
    let o = out.to_f32_blocking().unwrap();
    let e_out = compare(&o, &want.out);
    assert!(
        e_out.max_abs_err <= ACT_TOL && e_out.rel_l2_err <= REL_TOL,
        "{label}: out {e_out:?}"
    );
    let rep = plan.report().unwrap();
    assert_eq!(rep.experts.expert_counts, want.map.counts);
    // The tiled kernels on matrix units wherever the device runs them at this tile
    // height (the coop run of the test script requires them up to 32 rows: 32 KiB of
    // workgroup memory on lavapipe).
    if case.path == FfnPath::Tiled {
        let caps = ctx.capabilities();
        let at_32 = ffn_coop_tile(caps, case.format, plan.tile_m().min(32));
        common::check_coop_switches(at_32, "matrix-unit MoE GEMMs");
        let (up, down) = match ffn_coop_tile(caps, case.format, plan.tile_m()) {
            Some(_) => ("expert_up_coop", "expert_down_coop"),
            None => ("expert_up", "expert_down"),
        };
        let stage = |name: &str| {
            rep.timing
                .stages
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.variant.clone())
        };
        assert_eq!(stage("expert_up").as_deref(), Some(up), "{label}");
        assert_eq!(stage("expert_down").as_deref(), Some(down), "{label}");
    }
    match case.slots {
        None => assert!(rep.experts.stream.is_none()),
        Some(slots) => {
            // A fresh plan: nothing cached, every routed expert uploaded once.
            let st = rep
                .experts
                .stream
                .clone()
                .expect("streamed run reports its uploads");
            let routed = want.map.counts.iter().filter(|&&n| n > 0).count();
            assert_eq!(
                (st.slots, st.routed, st.hits),
                (slots, routed, 0),
                "{label}"
            );
            assert_eq!(st.uploads, routed, "{label}");
            assert_eq!(st.rounds, routed.div_ceil(slots).max(1), "{label}");
        }
    }
    if case.path == FfnPath::Tiled {
        let frac = rep
            .experts
            .down_chunk_skip_frac
            .expect("tiled runs count chunks");
        assert!((0.0..=1.0).contains(&frac), "{label}: chunk skip {frac}");
        assert!(got.stats[3] > 0, "{label}: chunks counted");
    } else {
        assert_eq!(rep.experts.down_chunk_skip_frac, None);
    }
    assert!((rep.experts.skip_frac - want.skipped as f64 / evaluated as f64).abs() < 1e-3);
    eprintln!(
        "{label}: out {e_out:?}, skip {:.3}, counts {:?}",
        rep.experts.skip_frac, rep.experts.expert_counts
    );
}

fn cfg(hidden: usize, experts: usize, top_k: usize, ffn: usize) -> MoeConfig {
    MoeConfig::new(hidden, experts, top_k, ffn)
}

#[test]
fn gpu_moe_matches_cpu_twins_tiled() {
    check_cases(&[
        Case::new(cfg(64, 8, 2, 48), 37, WeightFormat::F16, FfnPath::Tiled),
        Case::new(cfg(128, 16, 4, 80), 100, WeightFormat::Q4_0, FfnPath::Tiled)
            .router(RouterKind::SomeTies)
            .tile_m(32),
        Case::new(cfg(96, 8, 1, 32), 70, WeightFormat::F16, FfnPath::Tiled)
            .router(RouterKind::AllTied)
            .tile_m(64),
        Case::new(
            cfg(256, 32, 4, 128),
            130,
            WeightFormat::Q4_0,
            FfnPath::Tiled,
        )
        .tile_m(32)
        .softmax(),
        Case::new(cfg(64, 4, 3, 16), 300, WeightFormat::F16, FfnPath::Tiled)
            .router(RouterKind::AllTied),
        // Streamed experts: 16 routed through 5 slots (4 rounds), 3 through 1.
        Case::new(cfg(128, 16, 4, 80), 100, WeightFormat::Q4_0, FfnPath::Tiled)
            .tile_m(16)
            .slots(5),
        Case::new(cfg(64, 4, 3, 16), 300, WeightFormat::F16, FfnPath::Tiled)
            .router(RouterKind::AllTied)
            .slots(1),
    ]);
}

#[test]
fn gpu_moe_matches_cpu_twins_gemv() {
    check_cases(&[
        Case::new(cfg(256, 32, 4, 128), 1, WeightFormat::Q4_0, FfnPath::Gemv),
        Case::new(cfg(64, 8, 2, 48), 5, WeightFormat::F16, FfnPath::Gemv)
            .router(RouterKind::SomeTies),
        Case::new(cfg(128, 16, 1, 64), 8, WeightFormat::Q4_0, FfnPath::Gemv)
            .router(RouterKind::AllTied),
        Case::new(cfg(96, 8, 2, 32), 37, WeightFormat::F16, FfnPath::Gemv).softmax(),
        // Streamed decode: 4 routed experts through 3 slots; 8 slots for 8 experts.
        Case::new(cfg(256, 32, 4, 128), 1, WeightFormat::Q4_0, FfnPath::Gemv).slots(3),
        Case::new(cfg(64, 8, 2, 48), 5, WeightFormat::F16, FfnPath::Gemv)
            .router(RouterKind::SomeTies)
            .slots(8),
    ]);
}

/// [`check_case`] on each case (GPU contexts only), seeds from this run's on.
fn check_cases(cases: &[Case]) {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    for (i, case) in cases.iter().enumerate() {
        check_case(&ctx, case, seed + i as u64);
    }
}

/// Runs `plan` on (x, x, res) and returns the output.
fn run_plan(ctx: &Context, plan: &wgsparse::moe::MoePlan, x: &[f32], res: &[f32]) -> Vec<f32> {
    let dims = [plan.tokens(), plan.config().hidden];
    let xt = Tensor::from_f32(ctx, &dims, x, DType::F32).unwrap();
    let rt = Tensor::from_f32(ctx, &dims, res, DType::F32).unwrap();
    let mut out = Tensor::filled(ctx, &dims, DType::F32, f32::NAN).unwrap();
    plan.run_into(&xt, &xt, &rt, &mut out).unwrap();
    out.to_f32_blocking().unwrap()
}

#[test]
fn streamed_experts_reuse_the_cache_and_equal_resident() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let c = cfg(64, 8, 2, 48);
    let t = 40;
    let w = MoeWeights::random(&c, seed);
    let x = grid_values(t * c.hidden, 2, &mut rng);
    let res = wgsparse::attention::synthetic::gaussian(t * c.hidden, seed ^ 5);
    for format in [WeightFormat::F16, WeightFormat::Q4_0] {
        let resident = ctx.moe(c).tokens(t).format(format).build(&w).unwrap();
        let want = run_plan(&ctx, &resident, &x, &res);
        for slots in [8, 3] {
            let plan = ctx
                .moe(c)
                .tokens(t)
                .format(format)
                .stream_experts(slots)
                .build(&w)
                .unwrap();
            assert!(plan.is_streamed());
            for run in 0..2 {
                let got = run_plan(&ctx, &plan, &x, &res);
                // Same kernels on the same weights, read from slots: the same bits.
                assert_eq!(got, want, "{format:?} slots {slots} run {run}");
                let st = plan.report().unwrap().experts.stream.unwrap();
                let routed = st.routed;
                if slots >= routed {
                    // Everything fits: the second run uploads nothing.
                    let hits = if run == 0 { 0 } else { routed };
                    assert_eq!((st.hits, st.uploads, st.rounds), (hits, routed - hits, 1));
                } else {
                    // LRU with more experts than slots: the last round's experts stay.
                    assert_eq!(st.rounds, routed.div_ceil(slots));
                    assert_eq!(st.hits + st.uploads, routed);
                    if run == 1 {
                        assert!(st.hits >= 1, "{st:?}");
                    }
                }
                assert!(st.uploaded_bytes >= st.uploads as u64 * 3 * (c.ffn * c.hidden) as u64 / 4);
            }
        }
    }
}

#[test]
fn prefill_skips_chunks_inactive_for_a_whole_tile() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // ffn 64 = four 16-neuron chunks; chunk 1's gate rows are 0 in every expert, so
    // gate · z = 0 (inactive) for every token: every tile skips that chunk.
    let c = cfg(64, 4, 2, 64);
    let t = 200;
    let mut w = MoeWeights::random(&c, seed);
    for e in 0..c.experts {
        for n in 16..32 {
            let row = (e * c.ffn + n) * c.hidden;
            w.gate[row..row + c.hidden].fill(0.0);
        }
    }
    let x = grid_values(t * c.hidden, 2, &mut rng);
    let res = wgsparse::attention::synthetic::gaussian(t * c.hidden, seed ^ 6);
    for format in [WeightFormat::F16, WeightFormat::Q4_0] {
        let on = ctx.moe(c).tokens(t).format(format).build(&w).unwrap();
        let off = ctx
            .moe(c)
            .tokens(t)
            .format(format)
            .skip_chunks(false)
            .build(&w)
            .unwrap();
        assert_eq!(on.path(), FfnPath::Tiled);
        let a = run_plan(&ctx, &on, &x, &res);
        let b = run_plan(&ctx, &off, &x, &res);
        let e = compare(&a, &b);
        assert!(
            e.max_abs_err == 0.0,
            "{format:?}: skipping changed the output {e:?}"
        );
        let frac = on.report().unwrap().experts.down_chunk_skip_frac.unwrap();
        // At least the dead chunk; random gates on 16+ tokens leave the others live.
        assert!((0.25..0.3).contains(&frac), "{format:?}: chunk skip {frac}");
        assert_eq!(off.report().unwrap().experts.down_chunk_skip_frac, None);
        // And the twin agrees on the output.
        let want = moe_cpu(&x, &x, &res, &w.pack(format).unwrap());
        let e = compare(&a, &want.out);
        assert!(e.max_abs_err <= ACT_TOL, "{format:?}: {e:?}");
    }
}

#[test]
fn plan_picks_gemv_for_decode_and_tiles_for_prefill() {
    let ctx = Context::cpu();
    let c = cfg(64, 4, 2, 32);
    let w = MoeWeights::random(&c, 3);
    assert_eq!(
        ctx.moe(c).tokens(8).build(&w).unwrap().path(),
        FfnPath::Gemv
    );
    assert_eq!(
        ctx.moe(c).tokens(9).build(&w).unwrap().path(),
        FfnPath::Tiled
    );
}

#[test]
fn cpu_plan_equals_the_twin() {
    let ctx = Context::cpu();
    let c = cfg(64, 8, 2, 48);
    let t = 29;
    let seed = common::seed();
    let w = MoeWeights::random(&c, seed);
    let x = wgsparse::attention::synthetic::gaussian(t * c.hidden, seed ^ 5);
    let plan = ctx
        .moe(c)
        .tokens(t)
        .format(WeightFormat::Q4_0)
        .build(&w)
        .unwrap();
    let xt = Tensor::from_f32(&ctx, &[t, c.hidden], &x, DType::F32).unwrap();
    let out = plan.run(&xt).unwrap().to_f32_blocking().unwrap();
    let want = moe_cpu(&x, &x, &x, &w.pack(WeightFormat::Q4_0).unwrap());
    assert_eq!(out, want.out);
    let rep = plan.report().unwrap();
    assert_eq!(
        rep.experts.expert_counts.iter().sum::<u32>() as usize,
        t * c.top_k
    );
    assert!(rep.experts.skip_frac > 0.0 && rep.experts.skip_frac < 1.0);
}

#[test]
fn cpu_twin_expert_ffn_matches_a_dense_reference() {
    // The skipping twin vs the plain formula down((up·z) ⊙ ReLU(gate·z)) per token.
    let c = cfg(64, 4, 2, 32);
    let t = 11;
    let seed = common::seed();
    let w = MoeWeights::random(&c, seed);
    let p = w.pack(WeightFormat::F16).unwrap();
    let (g, u, d) = (
        p.gate.dequantize(),
        p.up.dequantize(),
        p.down_t.dequantize(),
    );
    let z = wgsparse::attention::synthetic::gaussian(t * c.hidden, seed ^ 9);
    let zero = vec![0.0; t * c.hidden];
    let r = moe_cpu(&z, &z, &zero, &p);
    let (h, f) = (c.hidden, c.ffn);
    for tok in 0..t {
        let zr = &z[tok * h..(tok + 1) * h];
        let mut want = vec![0.0f64; h];
        for j in 0..c.top_k {
            let e = r.ids[tok * c.top_k + j] as usize;
            let wt = r.weights[tok * c.top_k + j] as f64;
            for n in 0..f {
                let row = (e * f + n) * h;
                let gv: f64 = (0..h).map(|i| (g[row + i] * zr[i]) as f64).sum();
                let uv: f64 = (0..h).map(|i| (u[row + i] * zr[i]) as f64).sum();
                let a = uv * gv.max(0.0);
                for i in 0..h {
                    want[i] += wt * a * d[row + i] as f64;
                }
            }
        }
        for (i, w) in want.iter().enumerate() {
            let got = r.out[tok * h + i] as f64;
            assert!((got - w).abs() < 1e-4, "token {tok} col {i}: {got} vs {w}");
        }
    }
}

#[test]
fn bad_configs_and_tensors_are_typed_errors() {
    let ctx = Context::cpu();
    for bad in [
        cfg(33, 8, 2, 32),
        cfg(0, 8, 2, 32),
        cfg(64, 0, 1, 32),
        cfg(64, 8, 0, 32),
        cfg(64, 8, 9, 32),
        cfg(64, 4, 5, 32),
        cfg(64, 300, 2, 32),
        cfg(64, 8, 2, 24),
    ] {
        assert!(
            matches!(bad.validate(), Err(Error::InvalidShape(_))),
            "{bad:?}"
        );
    }
    let c = cfg(64, 4, 2, 32);
    let w = MoeWeights::random(&c, 1);
    assert!(matches!(
        ctx.moe(c).tokens(0).build(&w),
        Err(Error::InvalidShape(_))
    ));
    assert!(matches!(
        ctx.moe(cfg(64, 8, 2, 32)).build(&w),
        Err(Error::Mismatch(_))
    ));
    let plan = ctx.moe(c).tokens(4).build(&w).unwrap();
    let wrong_shape = Tensor::zeros(&ctx, &[5, 64], DType::F32).unwrap();
    assert!(matches!(plan.run(&wrong_shape), Err(Error::Mismatch(_))));
    let wrong_dtype = Tensor::zeros(&ctx, &[4, 64], DType::F16).unwrap();
    assert!(matches!(plan.run(&wrong_dtype), Err(Error::Mismatch(_))));
    // Packed weights that do not match their config never reach a kernel.
    let mut p = w.pack(WeightFormat::Q4_0).unwrap();
    p.up.words.pop();
    assert!(matches!(
        ctx.moe(c).tokens(4).build_packed(p),
        Err(Error::Mismatch(_))
    ));
    let mut p = w.pack(WeightFormat::F16).unwrap();
    p.down_t = w.pack(WeightFormat::Q4_0).unwrap().down_t;
    assert!(matches!(
        ctx.moe(c).tokens(4).build_packed(p),
        Err(Error::Mismatch(_))
    ));
    let other = Tensor::zeros(&Context::cpu(), &[4, 64], DType::F32).unwrap();
    assert!(matches!(plan.run(&other), Err(Error::WrongContext)));
    assert!("q8".parse::<WeightFormat>().is_err());
}

#[test]
fn more_tokens_than_one_grid_axis() {
    // 70,000 tokens: the router's one-workgroup-per-token grid exceeds 65,535 on one
    // axis and is folded into 2D; dispatch and experts see 70,000 assignments.
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let case = Case::new(cfg(32, 2, 1, 16), 70_000, WeightFormat::F16, FfnPath::Tiled);
    check_case(&ctx, &case, seed);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Random small configs on the GPU against the CPU twins (every path, format and
    /// tile, resident or streamed experts).
    #[test]
    fn random_configs_on_the_gpu(
        h in prop::sample::select(vec![32usize, 64, 96, 160]),
        e in 1usize..20,
        k in 1usize..5,
        f in prop::sample::select(vec![16usize, 32, 48, 112]),
        t in 1usize..90,
        q4 in any::<bool>(),
        gemv in any::<bool>(),
        tm in prop::sample::select(vec![16usize, 32, 64]),
        slots in prop::option::of(1usize..20),
        seed in any::<u64>(),
    ) {
        let Some(ctx) = common::gpu(None) else { return Ok(()) };
        let case = Case {
            cfg: cfg(h, e, k.min(e), f),
            tokens: t,
            format: if q4 { WeightFormat::Q4_0 } else { WeightFormat::F16 },
            path: if gemv { FfnPath::Gemv } else { FfnPath::Tiled },
            router: RouterKind::Random,
            tile_m: Some(tm),
            slots: slots.map(|s| s.min(e)),
        };
        check_case(&ctx, &case, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn config_validation_never_panics(h in 0usize..600, e in 0usize..300, k in 0usize..12, f in 0usize..200) {
        let c = cfg(h, e, k, f);
        let ok = c.validate().is_ok();
        let want = h > 0 && h % 32 == 0 && f > 0 && f % 16 == 0 && (1..=256).contains(&e)
            && k >= 1 && k <= e.min(8);
        prop_assert_eq!(ok, want);
    }

    #[test]
    fn cpu_dispatch_is_a_stable_permutation(
        e in 1usize..40, k in 1usize..5, t in 1usize..200, seed in any::<u64>()
    ) {
        let k = k.min(e);
        let mut rng = StdRng::seed_from_u64(seed);
        // Distinct experts per token, like the router's.
        let mut ids = vec![];
        for _ in 0..t {
            let mut chosen: Vec<u32> = vec![];
            while chosen.len() < k {
                let x = rng.random_range(0..e as u32);
                if !chosen.contains(&x) {
                    chosen.push(x);
                }
            }
            ids.extend(chosen);
        }
        let m = cpu::dispatch(&ids, e);
        prop_assert_eq!(m.counts.iter().sum::<u32>() as usize, t * k);
        for (a, &pos) in m.inv.iter().enumerate() {
            prop_assert_eq!(m.sorted[pos as usize] as usize, a);
        }
        for ex in 0..e {
            let seg = &m.sorted[m.offsets[ex] as usize..m.offsets[ex + 1] as usize];
            prop_assert!(seg.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(seg.iter().all(|&a| ids[a as usize] as usize == ex));
        }
    }
}

#[test]
fn oversized_bindings_are_typed_errors() {
    // 64 KiB per binding: the f16 expert matrices (8 x 128 x 256 x 2 B = 512 KiB) do
    // not fit, and the error says which buffer and by how much.
    let Some(ctx) = common::gpu(Some(64 * 1024)) else {
        return;
    };
    let c = cfg(256, 8, 2, 128);
    let w = MoeWeights::random(&c, 1);
    match ctx.moe(c).tokens(16).build(&w) {
        Err(Error::TooLarge {
            what,
            needed,
            limit,
            over,
        }) => {
            assert!(what.contains("weights"), "{what}");
            assert_eq!(limit, 64 * 1024);
            assert_eq!(over, needed - limit);
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|_| ())),
    }
    // Small weights but too many tokens for one activation binding.
    let c = cfg(64, 4, 2, 32);
    let w = MoeWeights::random(&c, 2);
    assert!(matches!(
        ctx.moe(c).tokens(200).build(&w),
        Err(Error::TooLarge { .. })
    ));
    assert!(ctx.moe(c).tokens(100).build(&w).is_ok());
}

#[test]
fn tile_height_follows_tokens_per_expert() {
    use wgsparse::moe::expert_ffn::choose_tile_m;
    assert_eq!(choose_tile_m(4096 * 4, 32), 64);
    assert_eq!(choose_tile_m(512 * 4, 32), 32);
    assert_eq!(choose_tile_m(64 * 4, 32), 16);
    let ctx = Context::cpu();
    let c = cfg(64, 4, 2, 32);
    let w = MoeWeights::random(&c, 3);
    assert!(matches!(
        ctx.moe(c).tokens(20).tile_m(48).build(&w),
        Err(Error::InvalidArgument(_))
    ));
}

/// The memory plan and the build agree: with the binding limit lowered below the
/// resident expert weights, the plan streams them through the most slots that fit and
/// the build does the same, with the resident plan's output (same bits). SmallThinker
/// shapes at long inputs: the H200 fits, a browser's limits name the token count that
/// does.
#[test]
fn expert_weights_over_a_binding_stream_as_the_plan_says() {
    use wgsparse::attention::plan::DeviceLimits;
    use wgsparse::moe::memory::memory_plan;
    use wgsparse::moe::stream::ExpertResidency;
    let seed = common::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let c = cfg(256, 8, 2, 256);
    let t = 20;
    let w = MoeWeights::random(&c, seed);
    let x = grid_values(t * c.hidden, 2, &mut rng);
    let res = wgsparse::attention::synthetic::gaussian(t * c.hidden, seed ^ 5);
    let Some(full) = common::gpu(None) else {
        return;
    };
    for format in [WeightFormat::F16, WeightFormat::Q4_0] {
        let want = run_plan(
            &full,
            &full.moe(c).tokens(t).format(format).build(&w).unwrap(),
            &x,
            &res,
        );
        let per = format.packed_bytes(c.ffn, c.hidden);
        // Room for 3 experts per binding.
        let ctx = common::gpu(Some(per * 3 + 4)).unwrap();
        let lim = DeviceLimits::of(ctx.capabilities());
        let p = memory_plan(&c, t, format, ExpertResidency::Resident, &lim).unwrap();
        assert_eq!(p.residency, ExpertResidency::Streamed { slots: 3 }, "{p}");
        assert!(p.fits(), "{p}");
        let plan = ctx.moe(c).tokens(t).format(format).build(&w).unwrap();
        assert!(plan.is_streamed());
        assert_eq!(run_plan(&ctx, &plan, &x, &res), want, "{format:?}");
    }
    let st = wgsparse::moe::MoeConfig::smallthinker_4b();
    for (lim, fits) in [
        (DeviceLimits::H200, true),
        (DeviceLimits::WEBGPU_DEFAULT, false),
    ] {
        let p = memory_plan(
            &st,
            32768,
            WeightFormat::Q4_0,
            ExpertResidency::Resident,
            &lim,
        )
        .unwrap();
        assert_eq!(p.fits(), fits, "{p}");
        if !fits {
            assert!(
                p.problems.iter().any(|x| x.starts_with("tokens: at most")),
                "{p}"
            );
        }
    }
}
