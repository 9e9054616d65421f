//! The GPU decoder and its kernels against their CPU twins, on lavapipe in CI: every
//! GGUF format's GEMV and tiled GEMM (split weights, residual, bias, ragged shapes,
//! NaN-poisoned outputs) against f64 products of the CPU dequantizer; the embedding
//! lookup; the split-K cache attention against the CPU cache attention; and the whole
//! forward pass of tiny random models of llama / qwen2 / gemma3 (every GPU format among
//! their tensors) against the CPU decoder's f32-activation oracle — the prompt, decode
//! steps, a chunked continuation, greedy tokens and a sparse prompt method.

mod common;

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::attention::decode::{DecodeAttentionGpu, DecodePos, DecodeShape, GpuKvLayer};
use wgsparse::attention::decode_cpu::{CacheAttention, CacheRows};
use wgsparse::attention::{Method, WindowConfig};
use wgsparse::model::decoder::{Decoder, KvPrecision};
use wgsparse::model::gguf::{Gguf, GgufBuilder, Value};
use wgsparse::model::gpu::{DENSE_CHUNK, GpuDecoder};
use wgsparse::model::sample::Sampler;
use wgsparse::moe::RouterScoring;
use wgsparse::moe::cpu::top_k;
use wgsparse::moe::experts_ggml::{ExpertsGgmlGpu, ExpertsScratch, ExpertsShape, experts_ggml_cpu};
use wgsparse::moe::router::top_k_step;
use wgsparse::ops::embed::{EmbedGpu, embed_cpu};
use wgsparse::ops::linear::{LinearKernel, LinearLayout, MatmulGpu};
use wgsparse::quant::ggml::{dequantize, random_bytes};
use wgsparse::quant::gpu::{GPU_FORMATS, GpuMatrix};
use wgsparse::quant::{GgmlType, qmat::scale_fields};
use wgsparse::{Context, DType, Recorder, Tensor};

/// Random bytes of a `[rows, cols]` matrix of `ty` whose values have RMS `rms` (the
/// block formats' scale fields rescaled to it).
fn matrix_bytes(ty: GgmlType, rows: usize, cols: usize, rms: f32, rng: &mut StdRng) -> Vec<u8> {
    let mut b = random_bytes(ty, rows * cols, rms, rng);
    let fields = scale_fields(ty);
    if fields.is_empty() {
        return b;
    }
    let v = dequantize(ty, &b, rows * cols).unwrap();
    let now = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let r = rms as f64 / now.max(1e-30);
    let (_, bb) = ty.block();
    for blk in b.chunks_exact_mut(bb) {
        for &at in fields {
            let s = f16::from_le_bytes([blk[at], blk[at + 1]]).to_f64() * r;
            blk[at..at + 2].copy_from_slice(&f16::from_f64(s).to_le_bytes());
        }
    }
    b
}

fn upload_f32(ctx: &Context, v: &[f32]) -> Tensor {
    Tensor::from_f32(ctx, &[v.len()], v, DType::F32).unwrap()
}

/// `y = x·Wᵀ (+ res) (+ bias)` in f64 on the dequantized weights, and Σ|x·w| per
/// output (the error bound's scale).
fn reference(
    x: &[f32],
    w: &[f32],
    t: usize,
    n: usize,
    k: usize,
    res: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; t * n];
    let mut mag = vec![0f32; t * n];
    for i in 0..t {
        for j in 0..n {
            let (mut s, mut m) = (0f64, 0f64);
            for p in 0..k {
                let v = x[i * k + p] as f64 * w[j * k + p] as f64;
                s += v;
                m += v.abs();
            }
            s += res.map_or(0.0, |r| r[i * n + j] as f64) + bias.map_or(0.0, |b| b[j] as f64);
            y[i * n + j] = s as f32;
            mag[i * n + j] = m as f32;
        }
    }
    (y, mag)
}

#[test]
fn every_gpu_format_matches_the_cpu_dequantizer() {
    let Some(ctx) = common::gpu(None) else { return };
    let g = ctx.gpu().unwrap();
    let mut rng = StdRng::seed_from_u64(common::seed());
    for ty in GPU_FORMATS {
        let (n, k) = (77usize, 512usize);
        let bytes = matrix_bytes(ty, n, k, 0.05, &mut rng);
        let wf = dequantize(ty, &bytes, n * k).unwrap();
        // Three parts of 26, 26 and 25 rows (the row limit of each part).
        let row_bytes = GpuMatrix::row_bytes(ty, k) as u64;
        let w = GpuMatrix::upload(&ctx, "w", ty, n, k, &bytes, Some(26 * row_bytes + 4)).unwrap();
        assert_eq!(w.parts.len(), 3, "{ty:?}");
        for (t, residual, bias) in [
            (1, false, false),
            (1, true, true),
            (5, false, true),
            (70, true, false),
        ] {
            let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let res: Vec<f32> = (0..t * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let bv: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let layout = LinearLayout {
                residual,
                bias,
                ..Default::default()
            };
            let mm = MatmulGpu::build(&ctx, "test", &w, t, 64, layout).unwrap();
            match mm.kernel() {
                LinearKernel::Gemv => assert_eq!(t, 1),
                // The matrix-unit run requires the coop kernel, the portable run forbids it.
                LinearKernel::Coop(tile) => {
                    common::check_coop_switches(Some(tile), "GGUF projections")
                }
                LinearKernel::Tiled => common::check_coop_switches(None, "GGUF projections"),
            }
            let (xt, rt, bt) = (
                upload_f32(&ctx, &x),
                upload_f32(&ctx, &res),
                upload_f32(&ctx, &bv),
            );
            let yt = Tensor::filled(&ctx, &[t * n], DType::F32, f32::NAN).unwrap();
            let list = mm
                .dispatches(
                    g,
                    xt.gpu_buffer().unwrap(),
                    yt.gpu_buffer().unwrap(),
                    residual.then(|| rt.gpu_buffer().unwrap()),
                    bias.then(|| bt.gpu_buffer().unwrap()),
                )
                .unwrap();
            let mut rec = Recorder::new(&ctx, "test", 1).unwrap();
            rec.dispatch_stage("matmul", &list);
            rec.submit_blocking().unwrap();
            let y = yt.to_f32_blocking().unwrap();
            let (r, mag) = reference(
                &x,
                &wf,
                t,
                n,
                k,
                residual.then_some(&res[..]),
                bias.then_some(&bv[..]),
            );
            for i in 0..t * n {
                let tol = 1e-5 * mag[i] + 1e-5;
                assert!(
                    (y[i] - r[i]).abs() <= tol,
                    "{ty:?} t={t} residual={residual} bias={bias} [{i}]: {} vs {} (tol {tol})",
                    y[i],
                    r[i]
                );
            }
        }
        // The lookup: ids in every part, scaled.
        let ids: Vec<u32> = (0..9).map(|_| rng.random_range(0..n as u32)).collect();
        let e = EmbedGpu::build(&ctx, &w, ids.len(), 1.5).unwrap();
        let it = Tensor::from_u32(&ctx, &[ids.len()], &ids).unwrap();
        let ot = Tensor::filled(&ctx, &[ids.len() * k], DType::F32, f32::NAN).unwrap();
        let mut rec = Recorder::new(&ctx, "embed", 1).unwrap();
        rec.dispatch_stage(
            "embed",
            &e.dispatches(g, it.gpu_buffer().unwrap(), ot.gpu_buffer().unwrap()),
        );
        rec.submit_blocking().unwrap();
        let got = ot.to_f32_blocking().unwrap();
        let want = embed_cpu(&wf, k, &ids, 1.5);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())),
            "{ty:?} lookup"
        );
    }
}

#[test]
fn routed_experts_match_the_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let g = ctx.gpu().unwrap();
    let mut rng = StdRng::seed_from_u64(common::seed());
    // Widths of whole K-quant blocks; 5 experts, 2 or 3 chosen per token.
    let (experts, hidden, ffn) = (5usize, 256usize, 256usize);
    for (i, ty) in GPU_FORMATS.into_iter().enumerate() {
        // The down matrix in another format than gate and up, as real files do.
        let ty_down = GPU_FORMATS[(i + 4) % GPU_FORMATS.len()];
        let gb = matrix_bytes(ty, experts * ffn, hidden, 1.0 / 16.0, &mut rng);
        let ub = matrix_bytes(ty, experts * ffn, hidden, 1.0 / 16.0, &mut rng);
        let db = matrix_bytes(ty_down, experts * hidden, ffn, 1.0 / 16.0, &mut rng);
        let deq = |t, b: &[u8], n| dequantize(t, b, n).unwrap();
        let (gf, uf, df) = (
            deq(ty, &gb, experts * ffn * hidden),
            deq(ty, &ub, experts * ffn * hidden),
            deq(ty_down, &db, experts * hidden * ffn),
        );
        // Parts of two experts (three parts) for gate and down, one part for up.
        let two = |t, rows, cols| Some((2 * rows * GpuMatrix::row_bytes(t, cols)) as u64 + 4);
        let up_mat =
            |max| GpuMatrix::upload_grouped(&ctx, "up", ty, experts * ffn, hidden, &ub, max, ffn);
        let gate = GpuMatrix::upload_grouped(
            &ctx,
            "gate",
            ty,
            experts * ffn,
            hidden,
            &gb,
            two(ty, ffn, hidden),
            ffn,
        )
        .unwrap();
        let up = up_mat(None).unwrap();
        let down = GpuMatrix::upload_grouped(
            &ctx,
            "down",
            ty_down,
            experts * hidden,
            ffn,
            &db,
            two(ty_down, hidden, ffn),
            hidden,
        )
        .unwrap();
        assert_eq!(
            (gate.parts.len(), up.parts.len(), down.parts.len()),
            (3, 1, 3)
        );
        // One token (matrix-vector passes); prompts (grouped passes: tiles of 8
        // assignments per expert, partial tiles, parts of the matrices): random routing,
        // and routing to experts 0 and 3 only (experts without assignments).
        for (tokens, top_k, only) in [
            (1usize, 2usize, None),
            (7, 3, None),
            (24, 2, None),
            (12, 2, Some([0u32, 3])),
        ] {
            let shape = ExpertsShape {
                tokens,
                top_k,
                experts,
                hidden,
                ffn,
            };
            let z: Vec<f32> = (0..tokens * hidden)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let res: Vec<f32> = (0..tokens * hidden)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut ids = Vec::new();
            let mut route_w = Vec::new();
            for _ in 0..tokens {
                let mut pick: Vec<u32> = match only {
                    Some(o) => o.to_vec(),
                    None => (0..experts as u32).collect(),
                };
                for j in 0..top_k {
                    let r = rng.random_range(j..pick.len());
                    pick.swap(j, r);
                }
                let w: Vec<f32> = (0..top_k).map(|_| rng.random_range(0.1f32..1.0)).collect();
                let sum: f32 = w.iter().sum();
                ids.extend_from_slice(&pick[..top_k]);
                route_w.extend(w.iter().map(|v| v / sum));
            }
            let run = ExpertsGgmlGpu::build(&ctx, shape, &gate, &up, &down).unwrap();
            let (zt, rt, it, wt) = (
                upload_f32(&ctx, &z),
                upload_f32(&ctx, &res),
                Tensor::from_u32(&ctx, &[ids.len()], &ids).unwrap(),
                upload_f32(&ctx, &route_w),
            );
            let h = Tensor::filled(&ctx, &[tokens * top_k * ffn], DType::F32, f32::NAN).unwrap();
            let out = Tensor::filled(&ctx, &[tokens * hidden], DType::F32, f32::NAN).unwrap();
            let b = |t: &Tensor| t.gpu_buffer().unwrap().clone();
            let scratch = ExpertsScratch::new(g, shape).unwrap();
            let list = run.dispatches(
                g,
                &b(&zt),
                &b(&it),
                &b(&wt),
                &b(&h),
                &b(&rt),
                &b(&out),
                &scratch,
            );
            let mut rec = Recorder::new(&ctx, "experts", 1).unwrap();
            rec.dispatch_stage("experts", &list);
            rec.submit_blocking().unwrap();
            let got = out.to_f32_blocking().unwrap();
            let (want, mag) = experts_ggml_cpu(shape, &z, &ids, &route_w, &gf, &uf, &df, &res);
            for (j, ((a, w), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                let tol = 2e-5 * m + 1e-5;
                assert!(
                    (a - w).abs() <= tol,
                    "{ty:?}/{ty_down:?} tokens {tokens} top-{top_k} {only:?} [{j}]: {a} vs {w} \
                     (tol {tol})"
                );
            }
            // Neuron skipping happened: some gates were off.
            let hv = h.to_f32_blocking().unwrap();
            let off = hv.iter().filter(|&&v| v == 0.0).count();
            assert!(
                off > hv.len() / 5 && off < hv.len() * 4 / 5,
                "{ty:?}: {off} of {} neurons off",
                hv.len()
            );
        }
        // Typed errors: a part splitting an expert, shapes that do not match the block.
        let split = GpuMatrix::upload(
            &ctx,
            "up",
            ty,
            experts * ffn,
            hidden,
            &ub,
            Some((ffn / 2 * GpuMatrix::row_bytes(ty, hidden)) as u64 + 4),
        )
        .unwrap();
        let shape = ExpertsShape {
            tokens: 2,
            top_k: 2,
            experts,
            hidden,
            ffn,
        };
        assert!(ExpertsGgmlGpu::build(&ctx, shape, &gate, &split, &down).is_err());
        let narrow = ExpertsShape { ffn: 128, ..shape };
        assert!(ExpertsGgmlGpu::build(&ctx, narrow, &gate, &up, &down).is_err());
        let too_many = ExpertsShape { top_k: 6, ..shape };
        assert!(ExpertsGgmlGpu::build(&ctx, too_many, &gate, &up, &down).is_err());
        assert!(up_mat(Some(100)).is_err(), "an expert larger than a part");
    }
}

/// The router's top-k over logits made by a projection (the GPU decoder's MoE layers):
/// ids equal to the CPU twin's (ties to the lower expert), weights within 1e-6.
#[test]
fn router_top_k_matches_the_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let g = ctx.gpu().unwrap();
    let mut rng = StdRng::seed_from_u64(common::seed());
    for (tokens, experts, k) in [
        (1usize, 5usize, 2usize),
        (13, 33, 8),
        (4, 256, 3),
        (9, 7, 7),
    ] {
        for scoring in [RouterScoring::Sigmoid, RouterScoring::Softmax] {
            // Quarter steps: many ties.
            let logits: Vec<f32> = (0..tokens * experts)
                .map(|_| (rng.random_range(-8.0f32..8.0) * 4.0).round() / 4.0)
                .collect();
            let (want_ids, want_w) = top_k(&logits, experts, k, scoring);
            let step = top_k_step(&ctx, experts, k, scoring, tokens).unwrap();
            let lt = upload_f32(&ctx, &logits);
            let it = Tensor::from_u32(&ctx, &[tokens * k], &vec![u32::MAX; tokens * k]).unwrap();
            let wt = Tensor::filled(&ctx, &[tokens * k], DType::F32, f32::NAN).unwrap();
            let d = step.dispatch(
                g,
                &[
                    lt.gpu_buffer().unwrap(),
                    it.gpu_buffer().unwrap(),
                    wt.gpu_buffer().unwrap(),
                ],
            );
            let mut rec = Recorder::new(&ctx, "top-k", 1).unwrap();
            rec.dispatch_stage("top-k", &[d]);
            rec.submit_blocking().unwrap();
            let wgsparse::runtime::tensor::HostData::U32(ids) = it.read_blocking().unwrap() else {
                panic!("u32 ids")
            };
            let w = wt.to_f32_blocking().unwrap();
            assert_eq!(ids, want_ids, "{tokens} x {experts} top-{k} {scoring:?}");
            for (a, b) in w.iter().zip(&want_w) {
                assert!((a - b).abs() <= 1e-6, "{scoring:?}: weight {a} vs {b}");
            }
        }
    }
    assert!(top_k_step(&ctx, 257, 2, RouterScoring::Sigmoid, 1).is_err());
    assert!(top_k_step(&ctx, 4, 5, RouterScoring::Sigmoid, 1).is_err());
    assert!(top_k_step(&ctx, 16, 9, RouterScoring::Sigmoid, 1).is_err());
}

#[test]
fn bad_gpu_weights_are_typed_errors() {
    let Some(ctx) = common::gpu(None) else { return };
    let b = vec![0u8; 18 * 4];
    // Not on the GPU, wrong byte count, ragged width.
    assert!(GpuMatrix::upload(&ctx, "w", GgmlType::Q5_1, 1, 128, &[0u8; 96], None).is_err());
    assert!(GpuMatrix::upload(&ctx, "w", GgmlType::Q4_0, 3, 64, &b, None).is_err());
    assert!(GpuMatrix::upload(&ctx, "w", GgmlType::F16, 1, 20, &[0u8; 40], None).is_err());
    assert!(GpuMatrix::upload(&Context::cpu(), "w", GgmlType::Q4_0, 4, 32, &b, None).is_err());
}

#[test]
fn cache_attention_matches_the_cpu_twin() {
    let Some(ctx) = common::gpu(None) else { return };
    let g = ctx.gpu().unwrap();
    let mut rng = StdRng::seed_from_u64(common::seed());
    let (h, kvh, d, cap) = (6usize, 2usize, 64usize, 300usize);
    // Pages of `page` positions (None: one page), ragged against the splits.
    for (start, t, window, splits, page) in [
        (0, 1, None, 1, None),
        (37, 1, None, 4, Some(16)),
        (200, 3, Some(50), 7, Some(64)),
        (90, 21, None, 3, Some(13)),
        (250, 2, Some(8), 32, None),
        (298, 2, None, 5, Some(100)),
    ] {
        let n = start + t;
        // Rows token-major, as the CPU cache holds them: [n, kvh, d].
        let kr: Vec<f32> = (0..n * kvh * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let vr: Vec<f32> = (0..n * kvh * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let q: Vec<f32> = (0..t * h * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let k16: Vec<f16> = kr.iter().map(|&v| f16::from_f32(v)).collect();
        let v16: Vec<f16> = vr.iter().map(|&v| f16::from_f32(v)).collect();
        let scale = 0.125;
        let mut want = vec![0f32; t * h * d];
        CacheAttention {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            tokens: t,
            keys: n,
            window,
            scale,
        }
        .run(&q, CacheRows::F16(&k16), CacheRows::F16(&v16), &mut want)
        .unwrap();
        // The GPU: store the rows of positions 0..start and start..n through the store
        // kernel (head-major inputs), then attend.
        let page_bytes = page.map(|p: usize| (p * kvh * d * 2) as u64);
        let layer = GpuKvLayer::with_page_bytes(&ctx, kvh, cap, d, page_bytes).unwrap();
        assert_eq!(layer.page_len, page.unwrap_or(cap));
        assert_eq!(layer.pages.len(), cap.div_ceil(layer.page_len));
        let pos = DecodePos::new(&ctx).unwrap();
        let head_major = |x: &[f32], from: usize, to: usize| -> Vec<f32> {
            let mut o = Vec::new();
            for hh in 0..kvh {
                for p in from..to {
                    o.extend_from_slice(&x[(p * kvh + hh) * d..(p * kvh + hh + 1) * d]);
                }
            }
            o
        };
        let shape = |tokens| DecodeShape {
            heads: h,
            kv_heads: kvh,
            tokens,
            head_dim: d,
            capacity: cap,
            page_len: layer.page_len,
            window,
            scale,
        };
        for (from, to) in [(0, start), (start, n)] {
            if to == from {
                continue;
            }
            let a = DecodeAttentionGpu::build(&ctx, shape(to - from), 1).unwrap();
            let kt = upload_f32(&ctx, &head_major(&kr, from, to));
            let vt = upload_f32(&ctx, &head_major(&vr, from, to));
            pos.set(g, from);
            let mut rec = Recorder::new(&ctx, "store", 1).unwrap();
            let (kb, vb) = (kt.gpu_buffer().unwrap(), vt.gpu_buffer().unwrap());
            rec.dispatch_stage("store", &a.store(g, &pos, kb, vb, &layer).unwrap());
            rec.submit_blocking().unwrap();
        }
        // q head-major [h, t, d].
        let mut qh = vec![0f32; q.len()];
        for hh in 0..h {
            for i in 0..t {
                qh[(hh * t + i) * d..(hh * t + i + 1) * d]
                    .copy_from_slice(&q[(i * h + hh) * d..(i * h + hh + 1) * d]);
            }
        }
        let a = DecodeAttentionGpu::build(&ctx, shape(t), splits).unwrap();
        let qt = upload_f32(&ctx, &qh);
        let ot = Tensor::filled(&ctx, &[t * h * d], DType::F32, f32::NAN).unwrap();
        pos.set(g, start);
        let mut rec = Recorder::new(&ctx, "attend", 1).unwrap();
        rec.dispatch_stage(
            "attend",
            &a.attend(
                g,
                &pos,
                qt.gpu_buffer().unwrap(),
                &layer,
                ot.gpu_buffer().unwrap(),
            )
            .unwrap(),
        );
        rec.submit_blocking().unwrap();
        let got = ot.to_f32_blocking().unwrap();
        for hh in 0..h {
            for i in 0..t {
                for e in 0..d {
                    let (gv, wv) = (got[(hh * t + i) * d + e], want[(i * h + hh) * d + e]);
                    assert!(
                        (gv - wv).abs() < 2e-4,
                        "start {start} t {t} window {window:?} splits {splits} page {page:?}: head {hh} token {i} dim {e}: {gv} vs {wv}"
                    );
                }
            }
        }
    }
}

/// The formats the tiny models' tensors cycle through (every GPU format).
const CYCLE: [GgmlType; 9] = GPU_FORMATS;

/// A random 2-layer model of `arch` (d_model 256, 4 heads of 64 with 2 kv-heads, FFN
/// 512, vocabulary 300; smallthinker: 5 experts of 256 neurons, 2 chosen by sigmoid
/// gating, layer 0 NoPE and layer 1 RoPE), its matrices in every GPU format in turn.
fn tiny_model(arch: &str, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (dm, nh, nkv, hd, ff, vocab, nl) = (
        256usize, 4usize, 2usize, 64usize, 512usize, 300usize, 2usize,
    );
    let mut b = GgufBuilder::new().meta("general.architecture", Value::Str(arch.into()));
    for (key, value) in [
        ("block_count", Value::U64(nl as u64)),
        ("embedding_length", Value::U64(dm as u64)),
        ("feed_forward_length", Value::U64(ff as u64)),
        ("context_length", Value::U64(512)),
        ("attention.head_count", Value::U64(nh as u64)),
        ("attention.head_count_kv", Value::U64(nkv as u64)),
        ("attention.key_length", Value::U64(hd as u64)),
        ("rope.freq_base", Value::F64(10000.0)),
        ("attention.layer_norm_rms_epsilon", Value::F64(1e-6)),
    ] {
        b = b.meta(&format!("{arch}.{key}"), value);
    }
    let (experts, eff) = (5usize, 256usize);
    if arch == "smallthinker" {
        for (key, value) in [
            ("expert_feed_forward_length", Value::U64(eff as u64)),
            ("expert_count", Value::U64(experts as u64)),
            ("expert_used_count", Value::U64(2)),
            ("expert_gating_func", Value::U64(2)),
            // The 21B's flag: global NoPE layers 0, 4, ..., windowed RoPE layers between.
            ("attention.sliding_window", Value::U64(4096)),
        ] {
            b = b.meta(&format!("smallthinker.{key}"), value);
        }
    }
    if arch == "gemma3" {
        b = b.meta("gemma3.attention.sliding_window", Value::U64(6));
        b = b.meta("gemma3.final_logit_softcapping", Value::F64(30.0));
    }
    let mut next = 0usize;
    // `[rows, cols]`, or `depth` > 1 stacked matrices (expert tensors `[cols, rows, depth]`).
    let mut m = |b: GgufBuilder,
                 name: &str,
                 (rows, cols, depth): (usize, usize, usize),
                 rng: &mut StdRng| {
        let ty = CYCLE[next % CYCLE.len()];
        next += 1;
        let bytes = matrix_bytes(ty, rows * depth, cols, 1.0 / (cols as f32).sqrt(), rng);
        let mut dims = vec![cols as u64, rows as u64];
        if depth > 1 {
            dims.push(depth as u64);
        }
        b.tensor(name, &dims, ty, bytes)
    };
    let vecf = |b: GgufBuilder, name: &str, n: usize, base: f32, rng: &mut StdRng| {
        let v: Vec<f32> = (0..n)
            .map(|_| base + rng.random_range(-0.2f32..0.2))
            .collect();
        b.tensor_f32(name, &[n as u64], &v)
    };
    b = m(b, "token_embd.weight", (vocab, dm, 1), &mut rng);
    b = vecf(b, "output_norm.weight", dm, 1.0, &mut rng);
    for l in 0..nl {
        let n = |s: &str| format!("blk.{l}.{s}");
        b = vecf(b, &n("attn_norm.weight"), dm, 1.0, &mut rng);
        b = vecf(b, &n("ffn_norm.weight"), dm, 1.0, &mut rng);
        b = m(b, &n("attn_q.weight"), (nh * hd, dm, 1), &mut rng);
        b = m(b, &n("attn_k.weight"), (nkv * hd, dm, 1), &mut rng);
        b = m(b, &n("attn_v.weight"), (nkv * hd, dm, 1), &mut rng);
        b = m(b, &n("attn_output.weight"), (dm, nh * hd, 1), &mut rng);
        if arch == "smallthinker" {
            b = m(b, &n("ffn_gate_inp.weight"), (experts, dm, 1), &mut rng);
            b = m(b, &n("ffn_gate_exps.weight"), (eff, dm, experts), &mut rng);
            b = m(b, &n("ffn_up_exps.weight"), (eff, dm, experts), &mut rng);
            b = m(b, &n("ffn_down_exps.weight"), (dm, eff, experts), &mut rng);
        } else {
            b = m(b, &n("ffn_gate.weight"), (ff, dm, 1), &mut rng);
            b = m(b, &n("ffn_up.weight"), (ff, dm, 1), &mut rng);
            b = m(b, &n("ffn_down.weight"), (dm, ff, 1), &mut rng);
        }
        if arch == "qwen2" {
            b = vecf(b, &n("attn_q.bias"), nh * hd, 0.0, &mut rng);
            b = vecf(b, &n("attn_k.bias"), nkv * hd, 0.0, &mut rng);
            b = vecf(b, &n("attn_v.bias"), nkv * hd, 0.0, &mut rng);
        }
        if arch == "gemma3" {
            for s in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                b = vecf(b, &n(s), hd, 1.0, &mut rng);
            }
            for s in ["post_attention_norm.weight", "post_ffw_norm.weight"] {
                b = vecf(b, &n(s), dm, 1.0, &mut rng);
            }
        }
    }
    b.build()
}

/// Logits within `tol` (absolute, logits of order 1–10).
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol && got.iter().all(|v| v.is_finite()),
        "{what}: worst logit difference {worst} > {tol}"
    );
}

/// The largest logit's lead over the second.
fn margin(logits: &[f32]) -> f32 {
    let mut v = logits.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

/// Logit tolerance of the GPU forward against the CPU oracle.
const TOL: f32 = 2e-3;

#[test]
fn gpu_forward_matches_the_cpu_decoder() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    for arch in ["llama", "qwen2", "gemma3", "smallthinker"] {
        let g = Gguf::from_bytes(tiny_model(arch, seed)).unwrap();
        let mut cpu = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
        cpu.f32_activations = true;
        cpu.kv_precision = KvPrecision::F16;
        // Parts of at most 40 KiB: the embedding and the FFN matrices in several
        // (expert tensors: parts of whole experts, up to 2 of the f32 ones).
        let part = if arch == "smallthinker" {
            600 << 10
        } else {
            40 << 10
        };
        let gpu = GpuDecoder::load_with(&g, &ctx, Method::Dense, Some(part)).unwrap();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let ids: Vec<u32> = (0..11).map(|_| rng.random_range(0..300)).collect();
        let mut cc = cpu.new_cache();
        // A paged cache: pages of 5 positions (2 kv heads × 64 × f16 = 256 bytes each).
        let mut gc = gpu.new_cache_with(64, Some(5 * 256)).unwrap();
        // The prompt (attention plans), three decode steps, a chunk of four (cache
        // attention with several queries), each across page boundaries.
        let mut steps: Vec<Vec<u32>> = vec![ids.clone()];
        steps.extend((0..3).map(|_| vec![rng.random_range(0..300)]));
        steps.push((0..4).map(|_| rng.random_range(0..300)).collect());
        for (i, s) in steps.iter().enumerate() {
            let h = cpu.forward(s, &mut cc, &mut |_| Ok(())).unwrap();
            let want = cpu.logits(&h[h.len() - cpu.cfg.d_model..]);
            let got = gpu.forward(s, &mut gc).unwrap();
            assert_close(
                &format!("{arch} step {i} ({} tokens)", s.len()),
                &got,
                &want,
                TOL,
            );
        }
        assert_eq!(gc.len(), cc.len());
        // Greedy continuations agree wherever the CPU's top-2 margin exceeds the
        // tolerance (tiny random models have near-ties).
        let mut cc = cpu.new_cache();
        let mut gc = gpu.new_cache(64).unwrap();
        let h = cpu.forward(&ids, &mut cc, &mut |_| Ok(())).unwrap();
        let mut want = cpu.logits(&h[h.len() - cpu.cfg.d_model..]);
        let mut got = gpu.forward(&ids, &mut gc).unwrap();
        let mut compared = 0;
        for _ in 0..8 {
            let (a, b) = (
                wgsparse::model::decoder::argmax(&want),
                wgsparse::model::decoder::argmax(&got),
            );
            if margin(&want) > 2.0 * TOL {
                assert_eq!(a, b, "{arch}: greedy token");
                compared += 1;
            }
            let h = cpu.forward(&[a], &mut cc, &mut |_| Ok(())).unwrap();
            want = cpu.logits(&h[h.len() - cpu.cfg.d_model..]);
            got = gpu.forward(&[a], &mut gc).unwrap();
        }
        assert!(
            compared >= 4,
            "{arch}: only {compared} tokens had a clear margin"
        );
        // The KV cache is kept across calls: a token after a full cache is an error.
        let mut full = gpu.new_cache(12).unwrap();
        gpu.forward(&ids, &mut full).unwrap();
        gpu.forward(&[1], &mut full).unwrap();
        assert!(
            gpu.forward(&[1], &mut full).is_err(),
            "{arch}: past the cache's room"
        );
        assert!(
            gpu.forward(&[300], &mut gpu.new_cache(4).unwrap()).is_err(),
            "{arch}: id out of range"
        );
    }
}

#[test]
fn sparse_prompt_and_sampling_match_the_cpu_decoder() {
    let Some(ctx) = common::gpu(None) else { return };
    let seed = common::seed();
    let g = Gguf::from_bytes(tiny_model("llama", seed)).unwrap();
    let method = Method::Window(WindowConfig {
        window: 4,
        sinks: 1,
    });
    let mut cpu = Decoder::load(&g, &Context::cpu(), method.clone()).unwrap();
    cpu.f32_activations = true;
    let gpu = GpuDecoder::load(&g, &ctx, method).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..40).map(|_| rng.random_range(0..300)).collect();
    let h = cpu
        .forward(&ids, &mut cpu.new_cache(), &mut |_| Ok(()))
        .unwrap();
    let want = cpu.logits(&h[h.len() - cpu.cfg.d_model..]);
    let got = gpu.forward(&ids, &mut gpu.new_cache(64).unwrap()).unwrap();
    assert_close("window prompt", &got, &want, TOL);
    // A dense prompt differs: the method ran.
    let mut dense = GpuDecoder::load(&g, &ctx, Method::Dense).unwrap();
    let d = dense
        .forward(&ids, &mut dense.new_cache(64).unwrap())
        .unwrap();
    assert!(d.iter().zip(&got).any(|(a, b)| (a - b).abs() > 1e-2));
    // Chunked prefill (the first chunk through the method, the rest over the cache)
    // equals one whole dense prompt when the method is dense.
    let mut c1 = dense.new_cache(64).unwrap();
    let chunked = dense.prefill(&ids, &mut c1, 16).unwrap();
    assert_close("chunked prefill", &chunked, &d, TOL);
    // Seeded sampling replays, and the chat cache continues.
    let cfg = wgsparse::model::sample::SamplerConfig {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        seed: 7,
    };
    // The first turn's 10 tokens prefill in two chunks.
    dense.prefill_chunk = Some(8);
    let run = || {
        let mut s = Sampler::new(cfg).unwrap();
        let mut c = dense.new_cache(64).unwrap();
        let first = dense
            .generate_with(&ids[..10], 5, &[], &mut s, &mut c, &mut |_| {})
            .unwrap();
        let second = dense
            .generate_with(&ids[10..14], 5, &[], &mut s, &mut c, &mut |_| {})
            .unwrap();
        assert_eq!(c.len(), 10 + 5 - 1 + 4 + 5 - 1);
        (first, second)
    };
    assert_eq!(run(), run());
}

/// The engine's prefill chunk: a dense prompt in chunks of at most `DENSE_CHUNK` tokens;
/// a sparse prompt method (in any layer) in the longest chunk the storage bindings allow,
/// since the chunks after the first attend densely over the cache; a caller's chunk
/// wins; lowered bindings shorten the longest chunk to what its widest activation
/// outside the FFN fits.
#[test]
fn prefill_chunks_follow_the_prompt_method_and_the_bindings() {
    let Some(ctx) = common::gpu(None) else { return };
    let g = Gguf::from_bytes(tiny_model("llama", common::seed())).unwrap();
    let mut dec = GpuDecoder::load(&g, &ctx, Method::Dense).unwrap();
    let max = dec.max_chunk();
    assert!(max > DENSE_CHUNK, "the tiny model's longest chunk {max}");
    assert_eq!(dec.default_chunk(), DENSE_CHUNK);
    let sale = Method::Sale(Default::default());
    dec.set_method(sale.clone());
    assert_eq!(dec.default_chunk(), max);
    dec.set_method(Method::Dense);
    dec.layer_methods.insert(1, sale);
    assert_eq!(dec.default_chunk(), max, "one sparse layer");
    dec.prefill_chunk = Some(100);
    assert_eq!(dec.default_chunk(), 100);

    let limit = 256 << 10;
    let small = common::gpu(Some(limit)).unwrap();
    let dec = GpuDecoder::load(&g, &small, Method::Sale(Default::default())).unwrap();
    let t = dec.max_chunk();
    let c = &dec.cfg;
    // The FFN runs in parts under the binding, so the widest other activation counts.
    let widest = (c.n_head * c.head_dim).max(c.d_model) as u64 * 4;
    assert!(widest < c.ffn_dim as u64 * 4);
    assert!(t >= 1 && t as u64 * widest <= limit && (t as u64 + 1) * widest > limit);
    assert_eq!(dec.default_chunk(), t);
}

/// A chunk longer than one binding of its FFN activations: the dense FFN runs in parts
/// of 64-token rows (bindings at offsets into the hidden states) and the forward pass
/// still equals the CPU decoder's, for the three dense architectures (Gemma's post-norm
/// after the parts); the longest chunk is then set by the other activations.
#[test]
fn a_chunk_over_the_ffn_binding_runs_its_ffn_in_parts() {
    // 192 KiB: 150 tokens of [d_model] or [heads · head_dim] f32 (150 KiB) fit, of the
    // 512-wide FFN (300 KiB) do not: parts of 64, 64 and 22 tokens.
    let limit = 192 << 10;
    let Some(small) = common::gpu(Some(limit)) else {
        return;
    };
    let seed = common::seed();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xff17);
    let ids: Vec<u32> = (0..150).map(|_| rng.random_range(0..300)).collect();
    for arch in ["llama", "qwen2", "gemma3"] {
        let g = Gguf::from_bytes(tiny_model(arch, seed)).unwrap();
        let mut cpu = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
        cpu.f32_activations = true;
        cpu.kv_precision = KvPrecision::F16;
        let gpu = GpuDecoder::load(&g, &small, Method::Dense).unwrap();
        let c = &gpu.cfg;
        assert!((ids.len() * c.ffn_dim * 4) as u64 > limit);
        assert!(gpu.max_chunk() >= ids.len(), "{arch}: {}", gpu.max_chunk());
        let h = cpu
            .forward(&ids, &mut cpu.new_cache(), &mut |_| Ok(()))
            .unwrap();
        let want = cpu.logits(&h[h.len() - cpu.cfg.d_model..]);
        let mut cache = gpu.new_cache(ids.len() + 1).unwrap();
        let got = gpu.forward(&ids, &mut cache).unwrap();
        assert_close(
            &format!("{arch}: 150 tokens, FFN in parts"),
            &got,
            &want,
            TOL,
        );
        // The cache the parts wrote serves a decode step.
        let h = cpu
            .forward(&[7], &mut cpu.new_cache(), &mut |_| Ok(()))
            .unwrap();
        assert!(h.iter().all(|v| v.is_finite()));
        let step = gpu.forward(&[7], &mut cache).unwrap();
        assert!(step.iter().all(|v| v.is_finite()), "{arch}: decode step");
    }
}
