//! Real-model tests: tokenizers against reference ids, dequantized tensor statistics,
//! greedy generations and next-token NLL against the figures in the research notes.
//!
//! They need the GGUF files of `scripts/fetch-models.sh` under `data/models/` (or
//! `$WGSPARSE_DATA/models/`). Without them each test prints why and returns; with
//! `WGSPARSE_REQUIRE_MODELS=1` a missing file fails the test instead.

mod common;

use std::path::PathBuf;

use wgsparse::model::decoder::Decoder;
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::ModelTokenizer;
use wgsparse::quant::ggml::GgmlType;
use wgsparse::{Context, Method};

const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
const QWEN2: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";

fn model(name: &str) -> Option<Gguf> {
    let dir = std::env::var("WGSPARSE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data"));
    let path = dir.join("models").join(name);
    if !path.exists() {
        if std::env::var("WGSPARSE_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
            panic!(
                "WGSPARSE_REQUIRE_MODELS=1 but {} is missing (bash scripts/fetch-models.sh --all)",
                path.display()
            );
        }
        eprintln!(
            "skipping: {} not found (bash scripts/fetch-models.sh fetches it)",
            path.display()
        );
        return None;
    }
    Some(Gguf::open(&path).expect("the GGUF opens"))
}

fn check_tokens(model_file: &str, fixture: &str) {
    let Some(g) = model(model_file) else { return };
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let text = f["text"].as_str().unwrap();
    let want: Vec<u32> = f["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let got = tok.encode(text).unwrap();
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        (got.len(), first_diff),
        (want.len(), None),
        "{model_file}: ids differ from the reference (first difference at {first_diff:?})"
    );
    assert_eq!(
        tok.decode(&got).unwrap(),
        text,
        "{model_file}: decode round trip"
    );
}

#[test]
fn tokenizer_smollm2_matches_reference() {
    check_tokens(SMOLLM2, "tokens_smollm2_prideprejudice.json");
}

#[test]
fn tokenizer_gemma3_matches_reference() {
    check_tokens(GEMMA3, "tokens_gemma3_prideprejudice.json");
}

#[test]
fn tokenizer_qwen2_matches_reference() {
    check_tokens(QWEN2, "tokens_qwen2_prideprejudice.json");
}

/// The first tensor of every element type in the file dequantizes to finite values
/// with a plausible spread (weights, not noise or zeros).
fn check_tensor_stats(name: &str) {
    let Some(g) = model(name) else { return };
    let mut seen: Vec<GgmlType> = Vec::new();
    for t in &g.tensors {
        if seen.contains(&t.ty) || t.dims.len() != 2 {
            continue;
        }
        seen.push(t.ty);
        let w = g.tensor_f32(&t.name).unwrap();
        let n = w.len() as f64;
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        eprintln!("{name} {} {:?}: mean {mean:.5} std {std:.5}", t.name, t.ty);
        assert!(w.iter().all(|x| x.is_finite()), "{}", t.name);
        assert!(std > 1e-3 && std < 1.0, "{}: std {std}", t.name);
        assert!(mean.abs() < std, "{}: mean {mean} vs std {std}", t.name);
    }
    assert!(
        seen.len() >= 2,
        "{name}: expected several quantization types"
    );
}

#[test]
fn real_tensor_stats() {
    check_tensor_stats(SMOLLM2);
    check_tensor_stats(GEMMA3);
}

#[test]
fn smollm2_greedy_and_nll_match_the_research_notes() {
    let Some(g) = model(SMOLLM2) else { return };
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    let dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
    let run = |prompt: &str, n: usize| {
        let ids = tok.encode_prompt(prompt).unwrap();
        tok.decode(&dec.generate(&ids, n, &tok.stop_ids, &mut |_| {}).unwrap())
            .unwrap()
    };
    let chat = tok.chat_prompt("What is the capital of France?").unwrap();
    assert_eq!(run(&chat, 20), "The capital of France is Paris.");
    assert!(
        run("Once upon a time, there was a little girl named", 8)
            .starts_with(" Emma who loved to play in the sun"),
    );
    // research/data.md: NLL 2.8179 on the first 700 tokens of Pride and Prejudice.
    let ids = pride_ids(700);
    let (nll, n) = dec.nll(&ids).unwrap();
    eprintln!("SmolLM2 NLL over {n} predictions: {nll:.4}");
    assert!((nll - 2.8179).abs() < 0.01, "NLL {nll}");
}

/// The first `n` SmolLM2 token ids of Pride and Prejudice (tests/fixtures).
fn pride_ids(n: usize) -> Vec<u32> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokens_smollm2_prideprejudice.json");
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f["ids"].as_array().unwrap()[..n]
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The decoder with its attention on a GPU (lavapipe in CI) against the CPU path:
/// next-token NLL over 256 real tokens and a greedy continuation, dense and SALE.
#[test]
fn smollm2_decoder_on_the_gpu_matches_the_cpu() {
    let Some(g) = model(SMOLLM2) else { return };
    let Some(gpu) = common::gpu(None) else { return };
    let ids = pride_ids(256);
    let sale = Method::Sale(wgsparse::attention::select::sale::SaleConfig {
        tau: 0.01,
        ..Default::default()
    });
    for method in [Method::Dense, sale] {
        let on_cpu = Decoder::load(&g, &Context::cpu(), method.clone()).unwrap();
        let on_gpu = Decoder::load(&g, &gpu, method.clone()).unwrap();
        let (nll_cpu, n) = on_cpu.nll(&ids).unwrap();
        let (nll_gpu, _) = on_gpu.nll(&ids).unwrap();
        eprintln!(
            "{}: NLL over {n} tokens cpu {nll_cpu:.5} gpu ({}) {nll_gpu:.5}",
            method.name(),
            gpu.adapter_name()
        );
        assert!(
            (nll_cpu - nll_gpu).abs() < 2e-3,
            "{}: {nll_cpu} vs {nll_gpu}",
            method.name()
        );
        let greedy = |d: &Decoder| d.generate(&ids[..200], 12, &[], &mut |_| {}).unwrap();
        assert_eq!(
            greedy(&on_cpu),
            greedy(&on_gpu),
            "{}: greedy tokens",
            method.name()
        );
    }
}

#[test]
fn gemma3_greedy_matches_the_research_notes() {
    let Some(g) = model(GEMMA3) else { return };
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    let dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
    let ids = tok.encode_prompt("The capital of France is").unwrap();
    let out = tok
        .decode(&dec.generate(&ids, 16, &tok.stop_ids, &mut |_| {}).unwrap())
        .unwrap();
    assert_eq!(
        out,
        " the capital of the country of France. It is the largest city in France and"
    );
}
