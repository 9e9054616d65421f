//! Property tests (proptest): the CPU twin against the naive reference on random shapes,
//! the invariants of the dispatch split on random problems and device limits, typed
//! errors (never panics) for bad shapes and mismatched tensors, and a few random shapes
//! on the GPU against the CPU twin.

mod common;

use std::sync::Mutex;

use proptest::prelude::*;
use wgsparse::attention::flash_cpu::{dense_attention_cpu, naive_attention};
use wgsparse::attention::metrics::compare;
use wgsparse::attention::split::{
    BLOCK_K, BLOCK_Q, DenseDispatch, MIN_BLOCK_Q, SplitLimits, SplitProblem, split_dense,
};
use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::upload_qkv;
use wgsparse::attention::verify::{dense_against_cpu_twin, dense_tolerance};
use wgsparse::{AttentionShape, Context, DType, Error, Tensor};

// Every size the kernels take is a multiple of 16 up to 256; these cover powers of two,
// a half-empty 32-dimension chunk (80, 112) and three full ones (96).
const HEAD_DIMS: [usize; 6] = [64, 80, 96, 112, 128, 256];

// --- (a) CPU twin vs the naive reference ---------------------------------------------

/// A valid shape: GQA group 1..=`max_group` x kv_heads 1..=`max_kv`, 1..=`max_rows` rows,
/// 0..=40 extra keys. Non-causal shapes with fewer keys than rows are valid too, but
/// every layer panics on them in debug builds today: see
/// `non_causal_with_fewer_keys_than_queries` below.
fn shapes(
    max_group: usize,
    max_kv: usize,
    max_rows: usize,
) -> impl Strategy<Value = (AttentionShape, bool)> {
    (
        1usize..=max_group,
        1usize..=max_kv,
        1usize..=max_rows,
        prop::sample::select(HEAD_DIMS.to_vec()),
        any::<bool>(),
        0usize..=40,
    )
        .prop_map(move |(group, kv_heads, seq_len, head_dim, causal, extra)| {
            let kv_len = seq_len + extra;
            let shape = AttentionShape {
                q_heads: group * kv_heads,
                kv_heads,
                seq_len,
                kv_len,
                head_dim,
            };
            (shape, causal)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn cpu_twin_matches_naive(
        (shape, causal) in shapes(4, 3, 70),
        seed in any::<u64>(),
        scale_factor in 0.25f32..2.0,
    ) {
        shape.validate(causal).unwrap();
        let (q, k, v) = qkv_host(&shape, seed);
        let scale = scale_factor / (shape.head_dim as f32).sqrt();
        let got = dense_attention_cpu(&shape, causal, scale, &q, &k, &v, None);
        let want = naive_attention(&shape, causal, scale, &q, &k, &v);
        let err = compare(&got, &want);
        prop_assert!(err.max_abs_err <= 1e-5, "{shape:?} causal={causal}: {err:?}");
    }
}

// --- (b) split invariants --------------------------------------------------------------

fn split_case() -> impl Strategy<Value = (SplitProblem, SplitLimits)> {
    (
        (
            1usize..=4,
            1usize..=4,
            1usize..=2000,
            0usize..=600,
            prop::sample::select(HEAD_DIMS.to_vec()),
            prop::sample::select(vec![2usize, 4]),
            any::<bool>(),
        ),
        (
            // Log-uniform binding limits from 1 KiB to 64 MiB.
            10u32..=26,
            0.0f64..1.0,
            prop::sample::select(vec![4u64, 16, 64, 256]),
            // Real devices allow 65535; tiny grids stress the split (a single workgroup
            // column cannot hold a BLOCK_Q-row chunk of MIN_BLOCK_Q-row workgroups).
            prop::sample::select(vec![2u32, 3, 7, 64, 65535]),
            // Row state held in buffers of this many heads (0: one buffer).
            prop::sample::select(vec![0usize, 0, 1, 2, 3, 5]),
        ),
    )
        .prop_map(
            |(
                (group, kv_heads, q_len, extra, head_dim, elem_bytes, causal),
                (log2, frac, align, groups, head_run),
            )| {
                let kv_len = q_len + extra;
                let max_binding = ((1u64 << log2) as f64 * (1.0 + frac)) as u64;
                (
                    SplitProblem {
                        q_heads: group * kv_heads,
                        kv_heads,
                        q_len,
                        kv_len,
                        head_dim,
                        elem_bytes,
                        causal,
                    },
                    SplitLimits {
                        max_binding,
                        offset_align: align,
                        max_groups: groups,
                        head_run,
                    },
                )
            },
        )
}

/// Bytes of a binding of `start..end` once its offset is aligned down (what the launcher
/// binds).
fn bound_bytes(start: u64, end: u64, align: u64) -> u64 {
    (end - start / align * align).div_ceil(4) * 4
}

fn check_split(p: &SplitProblem, lim: &SplitLimits, ds: &[DenseDispatch]) -> Result<(), String> {
    let d = p.head_dim as u64;
    let (n, nk) = (p.q_len as u64, p.kv_len as u64);
    let group = p.q_heads / p.kv_heads;
    let shift = p.kv_len.saturating_sub(p.q_len);
    if ds.is_empty() {
        return Err("no dispatches".into());
    }
    // Per dispatch: sane ranges, grid and binding sizes within the limits.
    for (i, x) in ds.iter().enumerate() {
        if !(x.h0 < x.h1 && x.h1 <= p.q_heads && x.r0 < x.r1 && x.r1 <= p.q_len) {
            return Err(format!("#{i} {x:?}: bad head/row range"));
        }
        if !(x.c0 < x.c1 && x.c1 <= p.kv_len) {
            return Err(format!("#{i} {x:?}: bad key range"));
        }
        if lim.head_run > 0 && x.h0 / lim.head_run != (x.h1 - 1) / lim.head_run {
            return Err(format!(
                "#{i} {x:?}: heads cross a row-state buffer of {} heads",
                lim.head_run
            ));
        }
        // The smallest query block gives the largest grid.
        let (gx, gy) = x.grid(MIN_BLOCK_Q);
        if gx == 0 || gy == 0 || gx > lim.max_groups || gy > lim.max_groups {
            return Err(format!(
                "#{i} {x:?}: grid {gx}x{gy} vs max {}",
                lim.max_groups
            ));
        }
        let (h0, h1, r0, r1) = (x.h0 as u64, x.h1 as u64, x.r0 as u64, x.r1 as u64);
        let kv0 = h0 / group as u64;
        let kv1 = (h1 - 1) / group as u64 + 1;
        let q_rows = (h1 - 1 - h0) * n + r1 - r0;
        let kv_keys = (kv1 - 1 - kv0) * nk + x.c1 as u64 - x.c0 as u64;
        // Q/O/ACC at the widest (f32 ACC) element, K/V at the storage element.
        let q_span = q_rows * d * 4;
        let kv_span = kv_keys * d * p.elem_bytes as u64;
        if q_span + lim.offset_align > lim.max_binding {
            return Err(format!(
                "#{i} {x:?}: Q/ACC span {q_span} + align > {}",
                lim.max_binding
            ));
        }
        if kv_span + lim.offset_align > lim.max_binding {
            return Err(format!(
                "#{i} {x:?}: K/V span {kv_span} + align > {}",
                lim.max_binding
            ));
        }
        let q_start = (h0 * n + r0) * d * 4;
        let kv_start = (kv0 * nk + x.c0 as u64) * d * p.elem_bytes as u64;
        if bound_bytes(q_start, q_start + q_span, lim.offset_align) > lim.max_binding
            || bound_bytes(kv_start, kv_start + kv_span, lim.offset_align) > lim.max_binding
        {
            return Err(format!("#{i} {x:?}: an aligned binding exceeds the limit"));
        }
    }
    // Chains: a run of consecutive dispatches on the same (heads, rows) block, keys
    // contiguous from 0, `first` exactly on the first and `last` exactly on the last.
    // Consecutive because the launcher carries a chain's state through one shared
    // scratch buffer; one head per chain when it has more than one link (scratch size).
    let mut blocks = vec![];
    let mut i = 0;
    while i < ds.len() {
        let x = ds[i];
        let mut j = i;
        while j + 1 < ds.len() && !ds[j].last {
            j += 1;
        }
        let chain = &ds[i..=j];
        if !chain[chain.len() - 1].last {
            return Err(format!("chain from #{i} never ends"));
        }
        let key_end = if p.causal {
            (x.r1 + shift).min(p.kv_len)
        } else {
            p.kv_len
        };
        for (k, y) in chain.iter().enumerate() {
            if (y.h0, y.h1, y.r0, y.r1) != (x.h0, x.h1, x.r0, x.r1) {
                return Err(format!("chain from #{i}: link {y:?} changes heads/rows"));
            }
            if y.first != (k == 0) || y.last != (k == chain.len() - 1) {
                return Err(format!("chain from #{i}: wrong first/last on {y:?}"));
            }
            let expect_c0 = if k == 0 { 0 } else { chain[k - 1].c1 };
            if y.c0 != expect_c0 {
                return Err(format!("chain from #{i}: keys not contiguous at {y:?}"));
            }
            if y.c0 >= key_end {
                return Err(format!("chain from #{i}: {y:?} only sees masked keys"));
            }
        }
        if chain.len() > 1 && x.h1 != x.h0 + 1 {
            return Err(format!(
                "multi-link chain from #{i} spans heads {}..{}",
                x.h0, x.h1
            ));
        }
        let end = chain[chain.len() - 1].c1;
        if end < key_end {
            return Err(format!("chain from #{i} stops at key {end} < {key_end}"));
        }
        blocks.push(x);
        i = j + 1;
    }
    // The chains' (heads x rows) blocks tile the problem exactly once.
    for h in 0..p.q_heads {
        let mut rows: Vec<(usize, usize)> = blocks
            .iter()
            .filter(|b| b.h0 <= h && h < b.h1)
            .map(|b| (b.r0, b.r1))
            .collect();
        rows.sort();
        let mut next = 0;
        for (r0, r1) in rows {
            if r0 != next {
                return Err(format!(
                    "head {h}: rows {next}..{r0} covered {} times",
                    if r0 > next { "0" } else { ">1" }
                ));
            }
            next = r1;
        }
        if next != p.q_len {
            return Err(format!(
                "head {h}: rows covered up to {next} of {}",
                p.q_len
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn split_covers_every_row_once_within_limits((p, lim) in split_case()) {
        let d = p.head_dim as u64;
        let budget = lim.max_binding.saturating_sub(lim.offset_align);
        let whole_heads = p.q_len as u64 * d * 4 <= budget
            && p.kv_len as u64 * d * p.elem_bytes as u64 <= budget
            && p.q_len.div_ceil(MIN_BLOCK_Q) <= lim.max_groups as usize;
        let tile_fits = BLOCK_Q as u64 * d * 4 <= budget
            && BLOCK_K as u64 * d * p.elem_bytes as u64 <= budget;
        match split_dense(&p, &lim) {
            Ok(ds) => {
                prop_assert!(whole_heads || tile_fits, "{p:?} {lim:?}: split although no tile fits");
                if let Err(e) = check_split(&p, &lim, &ds) {
                    return Err(TestCaseError::fail(format!("{p:?} {lim:?}: {e}")));
                }
            }
            Err(Error::TooLarge { needed, limit, .. }) => {
                prop_assert!(!whole_heads && !tile_fits, "{p:?} {lim:?}: TooLarge although a tile fits");
                prop_assert_eq!(limit, lim.max_binding);
                prop_assert!(needed > limit);
            }
            Err(e) => prop_assert!(false, "{p:?} {lim:?}: unexpected error {e}"),
        }
    }
}

// --- (c) typed errors ------------------------------------------------------------------

/// One way a shape can be wrong.
#[derive(Clone, Copy, Debug)]
enum Breakage {
    ZeroQHeads,
    ZeroKvHeads,
    ZeroSeq,
    ZeroKv,
    NotAMultiple,
    HeadDim(usize),
    CausalShortKeys,
    TooManyElements,
}

fn bad_shape() -> impl Strategy<Value = (AttentionShape, bool, Breakage)> {
    let breakage = prop_oneof![
        Just(Breakage::ZeroQHeads),
        Just(Breakage::ZeroKvHeads),
        Just(Breakage::ZeroSeq),
        Just(Breakage::ZeroKv),
        Just(Breakage::NotAMultiple),
        prop::sample::select(vec![0usize, 1, 8, 63, 72, 100, 264, 512]).prop_map(Breakage::HeadDim),
        Just(Breakage::CausalShortKeys),
        Just(Breakage::TooManyElements),
    ];
    (shapes(4, 3, 70), breakage).prop_map(|((mut s, mut causal), b)| {
        match b {
            Breakage::ZeroQHeads => s.q_heads = 0,
            Breakage::ZeroKvHeads => s.kv_heads = 0,
            Breakage::ZeroSeq => s.seq_len = 0,
            Breakage::ZeroKv => s.kv_len = 0,
            Breakage::NotAMultiple => {
                s.kv_heads = s.kv_heads.max(2);
                s.q_heads = s.kv_heads * 2 + 1;
            }
            Breakage::HeadDim(d) => s.head_dim = d,
            Breakage::CausalShortKeys => {
                causal = true;
                s.seq_len = s.seq_len.max(2);
                s.kv_len = s.seq_len - 1;
            }
            Breakage::TooManyElements => {
                s.q_heads = 64 * s.kv_heads;
                s.seq_len = 1 << 20;
                s.kv_len = s.seq_len;
            }
        }
        (s, causal, b)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bad_shapes_are_invalid_shape_errors((shape, causal, why) in bad_shape()) {
        let ctx = Context::cpu();
        let r = ctx.attention(shape).causal(causal).build();
        prop_assert!(
            matches!(r, Err(Error::InvalidShape(_))),
            "{why:?} {shape:?} causal={causal}: {:?}",
            r.err()
        );
    }

    #[test]
    fn valid_shapes_build((shape, causal) in shapes(4, 3, 70)) {
        let r = Context::cpu().attention(shape).causal(causal).build();
        prop_assert!(r.is_ok(), "{shape:?} causal={causal}: {:?}", r.err());
    }
}

fn small_inputs(ctx: &Context, shape: &AttentionShape, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let (q, k, v) = qkv_host(shape, 1);
    (
        Tensor::from_f32(ctx, &shape.q_dims(), &q, dtype).unwrap(),
        Tensor::from_f32(ctx, &shape.kv_dims(), &k, dtype).unwrap(),
        Tensor::from_f32(ctx, &shape.kv_dims(), &v, dtype).unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn mismatched_tensors_are_typed_errors(
        (shape, causal) in shapes(4, 3, 20),
        which in 0usize..3,
        delta in 1usize..3,
    ) {
        let ctx = Context::cpu();
        let plan = ctx.attention(shape).causal(causal).dtype(DType::F32).build().unwrap();
        let (q, k, v) = small_inputs(&ctx, &shape, DType::F32);
        prop_assert!(plan.run(&q, &k, &v).is_ok());

        // Wrong shape on one of q, k, v.
        let grown = AttentionShape {
            seq_len: shape.seq_len + delta,
            kv_len: shape.kv_len + delta,
            ..shape
        };
        let (q2, k2, v2) = small_inputs(&ctx, &grown, DType::F32);
        let mut args = [&q, &k, &v];
        args[which] = [&q2, &k2, &v2][which];
        let r = plan.run(args[0], args[1], args[2]);
        prop_assert!(matches!(r, Err(Error::Mismatch(_))), "shape: {:?}", r.err());

        // Wrong dtype.
        let (q3, k3, v3) = small_inputs(&ctx, &shape, DType::F16);
        let mut args = [&q, &k, &v];
        args[which] = [&q3, &k3, &v3][which];
        let r = plan.run(args[0], args[1], args[2]);
        prop_assert!(matches!(r, Err(Error::Mismatch(_))), "dtype: {:?}", r.err());

        // Same shape and dtype on another context.
        let other = Context::cpu();
        let (q4, k4, v4) = small_inputs(&other, &shape, DType::F32);
        let mut args = [&q, &k, &v];
        args[which] = [&q4, &k4, &v4][which];
        let r = plan.run(args[0], args[1], args[2]);
        prop_assert!(matches!(r, Err(Error::WrongContext)), "context: {:?}", r.err());

        // A wrong output tensor for run_into.
        let mut out = Tensor::zeros(&ctx, &grown.q_dims(), DType::F32).unwrap();
        let r = plan.run_into(&q, &k, &v, &mut out);
        prop_assert!(matches!(r, Err(Error::Mismatch(_))), "output: {:?}", r.err());
    }
}

#[test]
fn bad_options_are_typed_errors() {
    let ctx = Context::cpu();
    let shape = AttentionShape::new(2, 1, 8, 64);
    for dtype in [DType::U32, DType::I32] {
        assert!(matches!(
            ctx.attention(shape).dtype(dtype).build(),
            Err(Error::UnsupportedDtype(..))
        ));
    }
    for scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            ctx.attention(shape).scale(scale).build(),
            Err(Error::InvalidArgument(_))
        ));
    }
}

// --- (d) GPU vs CPU twin on random shapes ----------------------------------------------

/// GPU contexts, opened once per binary and binding limit (adapter start-up is slow on
/// lavapipe). `None`: the adapter's own limits.
fn gpu(max_binding: Option<u64>) -> Option<Context> {
    static CONTEXTS: Mutex<Vec<(Option<u64>, Option<Context>)>> = Mutex::new(Vec::new());
    let mut all = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = all.iter().find(|(l, _)| *l == max_binding) {
        return c.clone();
    }
    let c = common::gpu(max_binding);
    all.push((max_binding, c.clone()));
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn gpu_matches_cpu_twin_on_random_shapes(
        (shape, causal) in shapes(2, 2, 64),
        f16 in any::<bool>(),
        split in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // `split`: bindings just over one BLOCK_Q-row f32 tile, so a head with more rows
        // or keys than that takes the chunked path (state carried between key chunks).
        let limit = split.then_some((BLOCK_Q * shape.head_dim * 4 + 512) as u64);
        let Some(ctx) = gpu(limit) else { return Ok(()) };
        let ctx = &ctx;
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        let v = dense_against_cpu_twin(ctx, shape, dtype, causal, seed).unwrap();
        let (err, dispatches) = (v.errors, v.report.dispatches);
        let tol = dense_tolerance(dtype);
        prop_assert!(
            err.max_abs_err <= tol,
            "{shape:?} {dtype:?} causal={causal} split={split} ({dispatches} dispatches): {err:?}"
        );
    }
}

/// Non-causal attention with fewer keys than queries is a valid shape: the causal
/// offset `kv_len - seq_len` must not underflow in the CPU twin, the split or the GPU
/// launcher.
#[test]
fn non_causal_with_fewer_keys_than_queries() {
    let shape = AttentionShape::new(2, 1, 100, 64).with_kv_len(37);
    shape.validate(false).unwrap();
    let (q, k, v) = qkv_host(&shape, 3);
    let want = naive_attention(&shape, false, 0.125, &q, &k, &v);
    let got = dense_attention_cpu(&shape, false, 0.125, &q, &k, &v, None);
    assert!(compare(&got, &want).max_abs_err <= 1e-5);
    let p = SplitProblem {
        q_heads: 2,
        kv_heads: 1,
        q_len: 100,
        kv_len: 37,
        head_dim: 64,
        elem_bytes: 4,
        causal: false,
    };
    let lim = SplitLimits {
        max_binding: 20 << 10,
        offset_align: 256,
        max_groups: 65535,
        head_run: 0,
    };
    check_split(&p, &lim, &split_dense(&p, &lim).unwrap()).unwrap();
    for limit in [None, Some(20 << 10)] {
        if let Some(ctx) = gpu(limit) {
            let plan = ctx
                .attention(shape)
                .causal(false)
                .scale(0.125)
                .build()
                .unwrap();
            let (qt, kt, vt) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
            let out = plan.run(&qt, &kt, &vt).unwrap().to_f32_blocking().unwrap();
            assert!(compare(&out, &want).max_abs_err <= 2e-5, "{ctx:?}");
        }
    }
}
