//! `wgsparse eval`'s building blocks: per-head quality on synthetic GQA attention (no
//! model needed), the end-to-end continuation against `Decoder::nll` on SmolLM2 (skips
//! without the GGUF of `scripts/fetch-models.sh`, fails with
//! `WGSPARSE_REQUIRE_MODELS=1`), and the CLI's argument errors.

mod common;

use std::path::PathBuf;

use rand::{Rng, SeedableRng, rngs::StdRng};
use wgsparse::attention::select::anchor::AnchorConfig;
use wgsparse::model::decoder::Decoder;
use wgsparse::model::eval::{EvalMethod, end_to_end, layer_quality};
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::ModelTokenizer;
use wgsparse::{AttentionShape, Context, Method, WindowConfig};

fn random(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-spread..spread)).collect()
}

#[test]
fn layer_quality_per_head_on_synthetic_gqa() {
    // 4 query heads over 2 K/V heads, 384 tokens: peaked scores so sparse methods lose
    // visible but not total mass.
    let shape = AttentionShape::new(4, 2, 384, 64);
    let q = random(4 * 384 * 64, 1, 1.5);
    let k = random(2 * 384 * 64, 2, 1.5);
    let v = random(2 * 384 * 64, 3, 1.0);
    let scale = 1.0 / (64f32).sqrt();
    let methods = [
        EvalMethod::Dense,
        EvalMethod::Window(WindowConfig {
            window: 384,
            sinks: 0,
        }),
        EvalMethod::Window(WindowConfig {
            window: 64,
            sinks: 4,
        }),
        EvalMethod::Oracle { coverage: 1.0 },
        EvalMethod::Oracle { coverage: 0.5 },
        EvalMethod::Anchor(AnchorConfig {
            theta: 2.0,
            block: 64,
            step: 2,
            init_keys: 64,
        }),
    ];
    let rows = layer_quality(&Context::cpu(), 7, &shape, scale, (&q, &k, &v), &methods).unwrap();
    // Per method: the pooled row, then one row per head.
    assert_eq!(rows.len(), methods.len() * 5);
    for (mi, m) in methods.iter().enumerate() {
        let pooled = &rows[mi * 5];
        let heads = &rows[mi * 5 + 1..mi * 5 + 5];
        assert_eq!(pooled.head, None);
        assert_eq!(pooled.layer, 7);
        assert_eq!(pooled.method, m.label());
        for (h, r) in heads.iter().enumerate() {
            assert_eq!(r.head, Some(h));
            assert!(r.quality.density > 0.0 && r.quality.density <= 1.0 + 1e-12);
            assert!(r.quality.attn_recall > 0.0 && r.quality.attn_recall <= 1.0 + 1e-9);
        }
        let mean_density = heads.iter().map(|r| r.quality.density).sum::<f64>() / 4.0;
        assert!((pooled.quality.density - mean_density).abs() < 1e-12);
        let mean_recall = heads.iter().map(|r| r.quality.attn_recall).sum::<f64>() / 4.0;
        assert!(
            (pooled.quality.attn_recall - mean_recall).abs() < 1e-9,
            "{m:?}: pooled recall {} vs mean of heads {mean_recall}",
            pooled.quality.attn_recall
        );
    }
    let pooled = |i: usize| rows[i * 5].quality;
    // Dense against itself, and a window covering every key: exact.
    for i in [0, 1] {
        let qd = pooled(i);
        assert!((qd.density - 1.0).abs() < 1e-12, "{qd:?}");
        assert!((qd.attn_recall - 1.0).abs() < 1e-6, "{qd:?}");
        assert!(qd.rel_l2_err < 1e-5 && qd.tol_recall_01 == 1.0, "{qd:?}");
    }
    // A 64-key window drops keys: density and recall below 1, an output error.
    let w = pooled(2);
    assert!(
        w.density < 0.5 && w.attn_recall < 0.99 && w.rel_l2_err > 1e-3,
        "{w:?}"
    );
    // Oracle at γ = 1 keeps all the mass; at γ = 0.5 at least half of it (per block
    // row on average), with fewer pairs, and its per-row density is reported.
    let o1 = pooled(3);
    assert!(o1.attn_recall > 0.999 && o1.rel_l2_err < 1e-4, "{o1:?}");
    let o5 = pooled(4);
    assert!(
        o5.density < o1.density && o5.attn_recall >= 0.5 - 1e-6,
        "{o5:?}"
    );
    let rd = rows[4 * 5].oracle_row_density.unwrap();
    assert!(
        rd > 0.0 && rd < o5.density,
        "row oracle {rd} vs block {}",
        o5.density
    );
    assert!(rows[0].oracle_row_density.is_none());
    // Anchor with small groups on 384 tokens: sparse beyond its 64 initial keys.
    let a = pooled(5);
    assert!(a.density < 1.0 && a.attn_recall > 0.0, "{a:?}");

    // Bad input is an error, not a panic.
    assert!(
        layer_quality(
            &Context::cpu(),
            0,
            &shape,
            scale,
            (&q[1..], &k, &v),
            &methods
        )
        .is_err()
    );
    let odd = AttentionShape::new(3, 2, 384, 64);
    assert!(layer_quality(&Context::cpu(), 0, &odd, scale, (&q, &k, &v), &methods).is_err());
}

fn smollm2() -> Option<Gguf> {
    let dir = std::env::var("WGSPARSE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data"));
    let path = dir.join("models/smollm2-135m-instruct-q4_1.gguf");
    if !path.exists() {
        if std::env::var("WGSPARSE_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
            panic!(
                "WGSPARSE_REQUIRE_MODELS=1 but {} is missing",
                path.display()
            );
        }
        eprintln!("skipping: {} not found", path.display());
        return None;
    }
    Some(Gguf::open(&path).expect("the GGUF opens"))
}

#[test]
fn end_to_end_continuation_matches_full_nll_on_smollm2() {
    let Some(g) = smollm2() else { return };
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokens_smollm2_prideprejudice.json");
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let ids = tok.encode_prompt(f["text"].as_str().unwrap()).unwrap();
    let (n, m) = (96, 24);
    assert!(ids.len() >= n + m, "fixture text too short: {}", ids.len());
    let ids = &ids[..n + m];
    let dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();

    // The continuation's m predictions are the last m of a full prefill's.
    let (full, nf) = dec.nll(ids).unwrap();
    let (head, nh) = dec.nll(&ids[..n]).unwrap();
    let want = (full * nf as f64 - head * nh as f64) / m as f64;
    let mut seen = Vec::new();
    let rows = end_to_end(
        &dec,
        ids,
        n,
        m,
        &[
            EvalMethod::Dense,
            EvalMethod::Window(WindowConfig {
                window: n,
                sinks: 0,
            }),
            EvalMethod::Window(WindowConfig {
                window: 16,
                sinks: 0,
            }),
        ],
        &mut |l| {
            seen.push(l.layer);
            Ok(())
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(seen, (0..dec.cfg.n_layer).collect::<Vec<_>>());
    assert_eq!(rows.len(), 3, "dense once, then each other method");
    let d = &rows[0];
    assert!(
        (d.nll - want).abs() < 2e-3,
        "continuation NLL {} vs full-prefill NLL of the same tokens {want}",
        d.nll
    );
    assert_eq!(d.top1_agreement, 1.0);
    assert_eq!(d.nll_delta, 0.0);
    // A window holding every prefill key is dense.
    let w = &rows[1];
    assert!(w.nll_delta.abs() < 1e-3 && w.top1_agreement == 1.0, "{w:?}");
    // A 16-key window changes the prefill, so the continuation's NLL moves.
    let s = &rows[2];
    assert!(s.nll_delta.abs() > 1e-3, "{s:?}");
    assert!((s.ppl - s.nll.exp()).abs() < 1e-9);
    // Too few tokens is an error.
    assert!(end_to_end(&dec, &ids[..n], n, m, &[], &mut |_| Ok(()), &mut |_| {}).is_err());
}

#[test]
fn eval_cli_rejects_bad_arguments() {
    let base = "eval --model missing.gguf --text missing.txt";
    for (extra, says) in [
        ("--methods dense,bogus", "unknown eval method `bogus`"),
        ("--methods oracle --coverage 1.5", "--coverage"),
        ("", "missing.gguf"),
    ] {
        let (ok, _, err) = common::wgsparse_line(&format!("{base} {extra}"));
        assert!(!ok && err.contains(says), "{extra}: {err}");
    }
}
