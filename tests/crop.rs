//! Structured cropping (`model::crop`): the cropped model equals the original with the
//! dropped channels masked out (their gate rows zeroed: SiLU(0) = ReLU(0) = 0), for a
//! dense and a MoE model whose down matrices are float and block types; the plan keeps
//! whole block groups within the budget; bad requests are typed errors. The GPU decoder
//! runs a cropped model (per-layer widths) as the CPU decoder does.

mod common;

use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::Context;
use wgsparse::attention::Method;
use wgsparse::model::crop::{
    ChannelScore, CropBy, CropMode, CropOptions, LayerWeights, plan, write, write_as,
};
use wgsparse::model::decoder::{Decoder, KvPrecision};
use wgsparse::model::gguf::{Gguf, GgufBuilder, Value};
use wgsparse::quant::GgmlType;
use wgsparse::quant::ggml::random_bytes;

const D: usize = 64;
const FFN: usize = 768;
const LAYERS: usize = 3;
const EXPERTS: usize = 3;

/// A random 3-layer model of `arch` (llama or smallthinker): gate rows f32 (so a test can
/// zero them), up Q8_0, down f32 / Q8_0 / (Q4_K with `kquant`, else f16) by layer;
/// `mask[l][e]` lists gate rows to zero.
fn model(arch: &str, seed: u64, mask: &[Vec<Vec<usize>>], kquant: bool) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let moe = arch == "smallthinker";
    let mut b = GgufBuilder::new().meta("general.architecture", Value::Str(arch.into()));
    let mut meta = vec![
        ("block_count", Value::U64(LAYERS as u64)),
        ("embedding_length", Value::U64(D as u64)),
        ("context_length", Value::U64(64)),
        ("attention.head_count", Value::U64(2)),
        ("attention.head_count_kv", Value::U64(1)),
        ("rope.freq_base", Value::F64(10000.0)),
        ("attention.layer_norm_rms_epsilon", Value::F64(1e-6)),
    ];
    if moe {
        meta.extend([
            ("expert_feed_forward_length", Value::U64(FFN as u64)),
            ("expert_count", Value::U64(EXPERTS as u64)),
            ("expert_used_count", Value::U64(2)),
            ("expert_gating_func", Value::U64(2)),
        ]);
    } else {
        meta.push(("feed_forward_length", Value::U64(FFN as u64)));
    }
    for (k, v) in meta {
        b = b.meta(&format!("{arch}.{k}"), v);
    }
    let vocab = 40usize;
    let mat = |b: GgufBuilder, name: &str, ty: GgmlType, dims: &[u64], rng: &mut StdRng| {
        let n: u64 = dims.iter().product();
        let bytes = random_bytes(ty, n as usize, 1.0 / (dims[0] as f32).sqrt(), rng);
        b.tensor(name, dims, ty, bytes)
    };
    let norm = |b: GgufBuilder, name: &str, rng: &mut StdRng| {
        let v: Vec<f32> = (0..D)
            .map(|_| 1.0 + rng.random_range(-0.1f32..0.1))
            .collect();
        b.tensor_f32(name, &[D as u64], &v)
    };
    b = mat(
        b,
        "token_embd.weight",
        GgmlType::F16,
        &[D as u64, vocab as u64],
        &mut rng,
    );
    b = norm(b, "output_norm.weight", &mut rng);
    let e = if moe { EXPERTS } else { 1 };
    let x = |dims: &[u64]| -> Vec<u64> {
        let mut v = dims.to_vec();
        if moe {
            v.push(EXPERTS as u64);
        }
        v
    };
    let sfx = if moe { "_exps" } else { "" };
    for l in 0..LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}");
        b = norm(b, &n("attn_norm.weight"), &mut rng);
        b = norm(b, &n("ffn_norm.weight"), &mut rng);
        for (s, rows, cols) in [
            ("attn_q", 64, D),
            ("attn_k", 32, D),
            ("attn_v", 32, D),
            ("attn_output", D, 64),
        ] {
            b = mat(
                b,
                &n(&format!("{s}.weight")),
                GgmlType::Q8_0,
                &[cols as u64, rows as u64],
                &mut rng,
            );
        }
        if moe {
            b = mat(
                b,
                &n("ffn_gate_inp.weight"),
                GgmlType::F32,
                &[D as u64, EXPERTS as u64],
                &mut rng,
            );
        }
        // Gate in f32 with the masked rows zeroed.
        let mut gate: Vec<f32> = (0..e * FFN * D)
            .map(|_| rng.random_range(-1.0f32..1.0) / (D as f32).sqrt())
            .collect();
        if let Some(m) = mask.get(l) {
            for (ex, rows) in m.iter().enumerate() {
                for &r in rows {
                    gate[(ex * FFN + r) * D..(ex * FFN + r + 1) * D].fill(0.0);
                }
            }
        }
        b = b.tensor_f32(
            &n(&format!("ffn_gate{sfx}.weight")),
            &x(&[D as u64, FFN as u64]),
            &gate,
        );
        b = mat(
            b,
            &n(&format!("ffn_up{sfx}.weight")),
            GgmlType::Q8_0,
            &x(&[D as u64, FFN as u64]),
            &mut rng,
        );
        let last = if kquant { GgmlType::Q4K } else { GgmlType::F16 };
        let down_ty = [GgmlType::F32, GgmlType::Q8_0, last][l % 3];
        b = mat(
            b,
            &n(&format!("ffn_down{sfx}.weight")),
            down_ty,
            &x(&[FFN as u64, D as u64]),
            &mut rng,
        );
    }
    b.build()
}

fn logits(file: Vec<u8>, ids: &[u32]) -> Vec<f32> {
    let g = Gguf::from_bytes(file).unwrap();
    let mut d = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
    d.f32_activations = true;
    d.kv_precision = KvPrecision::F32;
    let mut cache = d.new_cache();
    let h = d.forward(ids, &mut cache, &mut |_| Ok(())).unwrap();
    d.logits(&h)
}

#[test]
fn a_cropped_model_is_the_masked_original() {
    let seed = 7;
    let ids: Vec<u32> = (0..9).map(|i| (i * 7 % 40) as u32).collect();
    for arch in ["llama", "smallthinker"] {
        for (score, weights, keep, kquant) in [
            (ChannelScore::Magnitude, LayerWeights::Uniform, 0.8, true),
            (
                ChannelScore::Magnitude,
                LayerWeights::Magnitude,
                0.75,
                false,
            ),
            (ChannelScore::None, LayerWeights::Uniform, 0.6, false),
        ] {
            let full = Gguf::from_bytes(model(arch, seed, &[], kquant)).unwrap();
            let opts = CropOptions {
                keep,
                by: CropBy::Params,
                score,
                weights,
                multiple: 32,
            };
            let p = plan(&full, opts).unwrap();
            // A Q4_K down matrix: whole 256-channel blocks for every layer.
            assert_eq!(p.multiple, if kquant { 256 } else { 32 });
            assert!(
                p.layers.iter().any(|l| l.kept < FFN),
                "{arch}: nothing cropped\n{p}"
            );
            assert!(p.cost <= p.budget * (1.0 + 1e-9), "{p}");
            for (l, lc) in p.layers.iter().enumerate() {
                assert_eq!(lc.kept % p.multiple, 0);
                for ch in &p.channels[l] {
                    assert_eq!(ch.len(), lc.kept);
                    assert!(ch.windows(2).all(|w| w[0] < w[1]));
                }
            }
            let dropped: Vec<Vec<Vec<usize>>> = p
                .channels
                .iter()
                .map(|ex| {
                    ex.iter()
                        .map(|ch| (0..FFN).filter(|j| !ch.contains(j)).collect())
                        .collect()
                })
                .collect();
            let mut out = Vec::new();
            let report = write(&full, p, &mut out).unwrap();
            assert_eq!(report.file_bytes as usize, out.len());
            // The GPU decoder runs the per-layer widths too.
            if let Some(ctx) = common::gpu(None) {
                let g = Gguf::from_bytes(out.clone()).unwrap();
                let gpu = wgsparse::model::gpu::GpuDecoder::load(&g, &ctx, Method::Dense).unwrap();
                let on_gpu = gpu.forward(&ids, &mut gpu.new_cache(16).unwrap()).unwrap();
                let h = logits(out.clone(), &ids);
                let last = &h[h.len() - on_gpu.len()..];
                let worst = on_gpu
                    .iter()
                    .zip(last)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 2e-3,
                    "{arch}: GPU decoder on the cropped model: {worst}"
                );
            }
            // The masked file (same shapes, dropped gate and up rows zeroed) computes the
            // same function.
            let p = plan(&full, opts).unwrap();
            let mut masked = Vec::new();
            let r = write_as(&full, p, CropMode::Mask, &mut masked).unwrap();
            assert_eq!(r.tensor_bytes_out, r.tensor_bytes_in);
            let got_masked = logits(masked, &ids);
            let got = logits(out, &ids);
            let want = logits(model(arch, seed, &dropped, kquant), &ids);
            for (a, b) in got_masked.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{arch}: masked {a} vs {b}");
            }
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{arch} {score:?}: worst logit difference {worst}"
            );
        }
    }
}

#[test]
fn crop_plans_follow_the_budget_and_reject_bad_requests() {
    let full = Gguf::from_bytes(model("llama", 3, &[], false)).unwrap();
    let opts = CropOptions::default();
    // Keeping everything keeps every channel; less keeps less, within the budget.
    let all = plan(&full, CropOptions { keep: 1.0, ..opts }).unwrap();
    assert!(all.layers.iter().all(|l| l.kept == FFN));
    let mut last = FFN * LAYERS;
    for keep in [0.9, 0.7, 0.5] {
        for by in [CropBy::Params, CropBy::Flops] {
            let p = plan(&full, CropOptions { keep, by, ..opts }).unwrap();
            let kept: usize = p.layers.iter().map(|l| l.kept).sum();
            assert!(p.cost <= p.budget * (1.0 + 1e-9));
            // Equal layers, uniform weights: equal ratios up to one granule.
            let (lo, hi) = p
                .layers
                .iter()
                .fold((usize::MAX, 0), |(a, b), l| (a.min(l.kept), b.max(l.kept)));
            assert!(hi - lo <= 32, "{p}");
            if by == CropBy::Params {
                assert!(kept <= last, "keep {keep}: {kept} > {last}");
                last = kept;
            }
        }
    }
    for keep in [0.0, -0.5, 1.5, f64::NAN, 0.01] {
        assert!(
            plan(&full, CropOptions { keep, ..opts }).is_err(),
            "keep {keep}"
        );
    }
    assert!(
        plan(
            &full,
            CropOptions {
                multiple: 100,
                ..opts
            }
        )
        .is_err()
    );
    assert!("rows".parse::<CropBy>().is_err());
    assert!("random".parse::<ChannelScore>().is_err());
    assert!("flat".parse::<LayerWeights>().is_err());
}
