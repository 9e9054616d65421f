//! SALE: the GPU plan vs its CPU twin (selection up to rounding ties, output within the
//! executor tolerance) on fresh random structured inputs with NaN-poisoned outputs,
//! ragged lengths, GQA, int4/int8, f32/f16; a planted heavy block is selected; τ = 0 is
//! dense attention; per-head thresholds; typed errors. (The quantization and the
//! integer dot products are checked against the host in `src/attention/sale.rs`.)

mod common;

use wgsparse::attention::MethodStats;
use wgsparse::attention::flash_cpu::{CpuAttention, HostRowState, attention_cpu};
use wgsparse::attention::metrics::compare;
use wgsparse::attention::select::sale::{BLOCK_K, BLOCK_Q, SaleConfig, sale_cpu};
use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::upload_qkv;
use wgsparse::attention::verify::dense_tolerance_for;
use wgsparse::{AttentionShape, Context, DType, Error, Method, RowState, Tensor};

fn run_gpu(
    ctx: &Context,
    shape: AttentionShape,
    cfg: &SaleConfig,
    dtype: DType,
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> (
    Vec<f32>,
    wgsparse::AttentionReport,
    Vec<wgsparse::attention::lut::SparseLut>,
) {
    common::run_sparse(ctx, shape, Method::Sale(cfg.clone()), dtype, (q, k, v))
}

/// SALE on the GPU vs its CPU twin: every candidate block decided the same way unless
/// its margin is a rounding tie; the output equals the host's attention over the blocks
/// the GPU chose.
#[test]
fn sale_matches_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let mut selected = 0;
    let mut skipped = 0;
    let cases = [
        (
            AttentionShape::new(2, 1, 700, 64),
            "sale:tau=0.01",
            DType::F32,
        ),
        (
            AttentionShape::new(4, 2, 555, 128),
            "sale:tau=0.005,bits=8,local=64",
            DType::F16,
        ),
        (
            AttentionShape::new(2, 2, 1111, 64),
            "sale:tau=0.02,local=0",
            DType::F32,
        ),
        // head_dim 80: the estimation's last 32-channel chunk is half empty.
        (
            AttentionShape::new(2, 1, 444, 80),
            "sale:tau=0.01",
            DType::F16,
        ),
    ];
    for (i, (shape, spec, dtype)) in cases.into_iter().enumerate() {
        let Ok(Method::Sale(cfg)) = spec.parse() else {
            unreachable!("{spec}")
        };
        let seed = seed + i as u64;
        let (q, k, v) = common::planted_qkv(&shape, dtype, seed);
        let (got, report, lut) = run_gpu(&ctx, shape, &cfg, dtype, (&q, &k, &v));
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let run = sale_cpu(&shape, &cfg, scale, &q, &k, &v).unwrap();
        assert_eq!(lut[0], cfg.exact_lut(shape.q_heads, shape.seq_len).unwrap());
        let gpu_blocks = &lut[1];
        // Candidates of query block qb: the first key of key blocks 1..cand_end(qb).
        let cands = |qb| {
            (1..cfg.cand_end(qb))
                .map(|kb| (kb * BLOCK_K) as u32)
                .collect()
        };
        let sel = &run.selection;
        let ties = common::selection_ties(gpu_blocks, &sel.blocks, &sel.margins, cands, 2e-2);
        // The host's attention over the GPU's blocks (exact pass, then the selection).
        let mut st = HostRowState::empty(&shape);
        let exec = |lut| CpuAttention::sparse(scale, lut);
        attention_cpu(&shape, &exec(&lut[0]), &q, &k, &v, Some(&mut st));
        let want = attention_cpu(&shape, &exec(gpu_blocks), &q, &k, &v, Some(&mut st));
        let err = compare(&got, &want);
        let Some(MethodStats::Sale(stats)) = &report.stats else {
            panic!("sale stats")
        };
        eprintln!(
            "sale {shape:?} int{} {dtype:?}: {err:?}, density gpu {:.4} cpu {:.4}, per head {:?}, ties {ties}",
            cfg.bits,
            report.density,
            run.stats.pairs.density(),
            stats.selected_per_head
        );
        let tol = dense_tolerance_for(dtype, shape.seq_len);
        assert!(err.max_abs_err <= tol, "{err:?}");
        assert!(!got.iter().any(|x| x.is_nan()), "a row was not written");
        if ties == 0 {
            assert_eq!(stats, &run.stats);
        }
        assert!(
            report.density < 1.0,
            "nothing skipped: the test would be vacuous"
        );
        if stats.selected_blocks == 0 {
            skipped += 1;
        }
        selected += stats.selected_blocks;
        assert!(report.estimation_ms().is_some());
    }
    assert!(
        selected > 0 && skipped < 3,
        "no block selected: the test would be vacuous"
    );
}

/// A key block that the queries of one block attend strongly is selected; most blocks of
/// plain random data are not.
#[test]
fn sale_selects_a_planted_heavy_block() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 1000, 64);
    let (mut q, mut k, v) = qkv_host(&shape, seed);
    q.iter_mut().chain(k.iter_mut()).for_each(|x| *x *= 0.4);
    let d = shape.head_dim;
    let n = shape.seq_len;
    let (qb, kb) = (12usize, 7usize);
    // A shared direction u: q·k gains A² = 64 (8 logits at scale 1/8) in the planted
    // block only.
    let u: Vec<f32> = (0..d)
        .map(|c| if c % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let a = 8.0 / (d as f32).sqrt();
    for h in 0..shape.q_heads {
        for i in qb * BLOCK_Q..(qb + 1) * BLOCK_Q {
            for c in 0..d {
                q[(h * n + i) * d + c] += a * u[c];
            }
        }
    }
    for j in kb * BLOCK_K..(kb + 1) * BLOCK_K {
        for c in 0..d {
            k[j * d + c] += a * u[c];
        }
    }
    for bits in [4, 8] {
        let cfg = SaleConfig {
            tau: 0.02,
            bits,
            ..Default::default()
        };
        let (_, report, lut) = run_gpu(&ctx, shape, &cfg, DType::F32, (&q, &k, &v));
        for h in 0..shape.q_heads {
            assert!(
                lut[1].keys_of(h, qb).contains(&((kb * BLOCK_K) as u32)),
                "int{bits} head {h}: planted block not selected"
            );
        }
        let Some(MethodStats::Sale(stats)) = report.stats else {
            panic!("sale stats")
        };
        eprintln!("int{bits}: selected {:?}", stats.selected_per_head);
        assert!(
            stats.selected_blocks * 4 < stats.candidate_blocks,
            "int{bits}: {} of {} blocks selected on random data",
            stats.selected_blocks,
            stats.candidate_blocks
        );
    }
}

/// τ = 0 keeps every block: SALE equals dense attention, GPU and CPU; per-head τ makes
/// only that head dense.
#[test]
fn sale_with_tau_zero_is_dense() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let shape = AttentionShape::new(2, 1, 650, 64);
    common::assert_keeps_everything(&ctx, shape, &"sale:tau=0".parse().unwrap(), seed);
    let (q, k, v) = qkv_host(&shape, seed);

    let per_head = SaleConfig {
        tau: 0.5,
        head_tau: Some(vec![0.0, 0.5]),
        ..Default::default()
    };
    let (_, report, _) = run_gpu(&ctx, shape, &per_head, DType::F32, (&q, &k, &v));
    let Some(MethodStats::Sale(s)) = report.stats else {
        panic!("sale stats")
    };
    assert_eq!(s.selected_per_head[0], 1.0);
    assert!(s.selected_per_head[1] < 1.0, "{:?}", s.selected_per_head);
}

/// SALE under per-head budgets: every (head, query block) of the GPU keeps exactly its
/// budget of candidate blocks, those of the largest estimated margins — the CPU twin's
/// blocks unless two margins at the row's cut are a rounding tie; budget 1 keeps every
/// candidate; the output equals the host's attention over the GPU's blocks (NaN-poisoned,
/// ragged lengths, GQA, int4/int8, f32/f16); head groups keep their heads' budgets.
#[test]
fn sale_under_head_budgets_keeps_each_heads_top_blocks() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let cases = [
        (
            AttentionShape::new(4, 2, 777, 64),
            vec![0.1, 0.3, 0.6, 1.0],
            4,
            128,
            DType::F32,
        ),
        (
            AttentionShape::new(2, 1, 1000, 128),
            vec![0.05, 0.25],
            8,
            64,
            DType::F16,
        ),
    ];
    for (i, (shape, budgets, bits, local, dtype)) in cases.into_iter().enumerate() {
        let cfg = SaleConfig {
            bits,
            local,
            head_budget: Some(budgets.clone()),
            ..Default::default()
        };
        let (q, k, v) = common::planted_qkv(&shape, dtype, seed + i as u64);
        let (got, report, lut) = run_gpu(&ctx, shape, &cfg, dtype, (&q, &k, &v));
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let run = sale_cpu(&shape, &cfg, scale, &q, &k, &v).unwrap();
        assert_eq!(lut[0], cfg.exact_lut(shape.q_heads, shape.seq_len).unwrap());
        let (gpu, cpu) = (&lut[1], &run.selection.blocks);
        let nqb = shape.seq_len.div_ceil(BLOCK_Q);
        let (mut kept, mut ties) = (0, 0);
        for (h, &beta) in budgets.iter().enumerate() {
            for qb in 0..nqb {
                let keep = cfg.budget_keep(h, qb, shape.seq_len).unwrap();
                let (g, c) = (gpu.entries(h, qb), cpu.entries(h, qb));
                assert_eq!(g.len(), keep, "head {h} block {qb}: GPU kept {g:?}");
                assert_eq!(c.len(), keep, "head {h} block {qb}: CPU kept {c:?}");
                if beta == 1.0 {
                    assert_eq!(keep, cfg.candidates(qb), "budget 1 keeps every candidate");
                }
                kept += keep;
                if g == c {
                    continue;
                }
                // A disagreement is a tie at the cut: the margins of both choices are
                // within rounding of the row's keep-th largest margin.
                let m = &run.selection.margins[h * nqb + qb];
                let mut sorted = m.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let cut = sorted[keep - 1];
                for b in g
                    .iter()
                    .filter(|b| !c.contains(b))
                    .chain(c.iter().filter(|b| !g.contains(b)))
                {
                    let x = m[*b as usize - 1];
                    assert!(
                        (x - cut).abs() <= 1e-2 * cut.abs().max(1.0),
                        "head {h} block {qb}: block {b} margin {x}, cut {cut}"
                    );
                    ties += 1;
                }
            }
        }
        assert!(
            kept > 0 && ties * 50 <= kept,
            "{ties} ties of {kept} kept blocks"
        );
        let mut st = HostRowState::empty(&shape);
        let exec = |lut| CpuAttention::sparse(scale, lut);
        attention_cpu(&shape, &exec(&lut[0]), &q, &k, &v, Some(&mut st));
        let want = attention_cpu(&shape, &exec(gpu), &q, &k, &v, Some(&mut st));
        let err = compare(&got, &want);
        eprintln!(
            "sale budgets {budgets:?} {shape:?} int{bits} {dtype:?}: {err:?}, density {:.4}, ties {ties}",
            report.density
        );
        assert!(
            err.max_abs_err <= dense_tolerance_for(dtype, shape.seq_len),
            "{err:?}"
        );
        assert!(!got.iter().any(|x| x.is_nan()), "a row was not written");
        assert!(report.density < 1.0);
    }
    // A head group keeps its heads' budgets.
    let all = Method::Sale(SaleConfig {
        head_budget: Some(vec![0.1, 0.2, 0.3, 0.4]),
        ..Default::default()
    });
    let Method::Sale(part) = all.for_heads(4, 2, 4).unwrap() else {
        unreachable!()
    };
    assert_eq!(part.head_budget, Some(vec![0.3, 0.4]));
}

#[test]
fn bad_sale_requests_are_typed_errors() {
    let cpu = Context::cpu();
    let shape = AttentionShape::new(2, 1, 300, 64);
    let build = |ctx: &Context, shape: AttentionShape, cfg: SaleConfig, causal: bool| {
        ctx.attention(shape)
            .method(Method::Sale(cfg))
            .causal(causal)
            .build()
    };
    for cfg in [
        SaleConfig {
            bits: 3,
            ..Default::default()
        },
        SaleConfig {
            block_q: 128,
            ..Default::default()
        },
        SaleConfig {
            tau: -0.1,
            ..Default::default()
        },
        SaleConfig {
            head_tau: Some(vec![0.01; 3]),
            ..Default::default()
        },
        SaleConfig {
            head_budget: Some(vec![0.5; 3]),
            ..Default::default()
        },
        SaleConfig {
            head_budget: Some(vec![0.5, 0.0]),
            ..Default::default()
        },
        SaleConfig {
            head_budget: Some(vec![0.5, 1.5]),
            ..Default::default()
        },
    ] {
        assert!(matches!(
            build(&cpu, shape, cfg, true),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(build(&cpu, shape, SaleConfig::default(), false).is_err());
    let mut rect = shape;
    rect.kv_len = 400;
    assert!(matches!(
        build(&cpu, rect, SaleConfig::default(), true),
        Err(Error::InvalidShape(_))
    ));
    let plan = build(&cpu, shape, SaleConfig::default(), true).unwrap();
    let (q, k, v) = qkv_host(&shape, 3);
    let (qt, kt, vt) = upload_qkv(&cpu, &shape, &q, &k, &v, DType::F32).unwrap();
    let mut out = Tensor::zeros(&cpu, &shape.q_dims(), DType::F32).unwrap();
    let mut st = RowState::empty(&cpu, &shape).unwrap();
    assert!(matches!(
        plan.run_with_state(&qt, &kt, &vt, &mut out, &mut st),
        Err(Error::InvalidArgument(_))
    ));
    // int8 at d 256 needs 24 KiB of workgroup memory: over WebGPU's default 16 KiB.
    if let Some(ctx) = common::gpu_limited(None, Some(16384)) {
        let big = AttentionShape::new(1, 1, 200, 256);
        let int8 = SaleConfig {
            bits: 8,
            ..Default::default()
        };
        assert!(matches!(
            build(&ctx, big, int8, true),
            Err(Error::TooLarge { .. })
        ));
        assert!(build(&ctx, big, SaleConfig::default(), true).is_ok());
    }
}
