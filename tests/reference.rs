//! The decoder's logits against an independent reference: `tests/reference/
//! llama_reference.py`, a numpy (float64) forward pass of SmolLM2 that reads the GGUF
//! with the `gguf` package and shares no code with the Rust decoder.
//!
//! Needs the SmolLM2 GGUF (`scripts/fetch-models.sh smollm2`) and a Python with numpy
//! and gguf: `$WGSPARSE_REFERENCE_PYTHON`, else `data/venv/bin/python` (see
//! `scripts/test.sh`). Without them the test prints why and returns; with
//! `WGSPARSE_REQUIRE_MODELS=1` it fails instead.

use std::path::PathBuf;
use std::process::Command;

use wgsparse::model::decoder::{Decoder, argmax};
use wgsparse::model::gguf::Gguf;
use wgsparse::model::tokenizer::ModelTokenizer;
use wgsparse::{Context, Method};

/// Tokens compared.
const TOKENS: usize = 64;
/// Max |logit difference| allowed of the decoder's oracle form (f32 activations and KV),
/// in logit units (logits here reach about 30; 9.3e-5 measured when written): both sides
/// use the same dequantized weights, the rest is f32 (ours) vs f64 (numpy) arithmetic
/// through 30 layers.
const TOL: f32 = 2e-3;
/// The same for the default decoder, whose projections round the activations to 16
/// bits per block of 32 (1.2e-2 measured when written, 4e-4 of the logits' range).
const TOL_16BIT: f32 = 5e-2;

fn require() -> bool {
    std::env::var("WGSPARSE_REQUIRE_MODELS").is_ok_and(|v| v == "1")
}

fn skip(why: String) {
    assert!(!require(), "WGSPARSE_REQUIRE_MODELS=1 but {why}");
    eprintln!("skipping: {why}");
}

/// The data folder (`$WGSPARSE_DATA`, else `data/`).
fn data_dir() -> PathBuf {
    std::env::var("WGSPARSE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data"))
}

/// The Python with numpy and gguf (`$WGSPARSE_REFERENCE_PYTHON`, else the data folder's
/// venv), or why there is none.
fn reference_python() -> Result<PathBuf, String> {
    let python = std::env::var("WGSPARSE_REFERENCE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| data_dir().join("venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import numpy, gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import numpy and gguf (scripts/test.sh makes that venv)",
            python.display()
        ))
    }
}

#[test]
fn smollm2_logits_match_the_numpy_reference() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = data_dir().join("models/smollm2-135m-instruct-q4_1.gguf");
    if !model.exists() {
        return skip(format!("{} is missing", model.display()));
    }
    let python = match reference_python() {
        Ok(p) => p,
        Err(why) => return skip(why),
    };

    let g = Gguf::open(&model).unwrap();
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/tokens_smollm2_prideprejudice.json"))
            .unwrap(),
    )
    .unwrap();
    let mut ids = tok.encode_prompt(f["text"].as_str().unwrap()).unwrap();
    assert!(ids.len() >= TOKENS);
    ids.truncate(TOKENS);

    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (ids_path, out_path) = (
        tmp.join("reference_ids.bin"),
        tmp.join("reference_logits.bin"),
    );
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(&ids_path, bytes).unwrap();
    let o = Command::new(&python)
        .arg(root.join("tests/reference/llama_reference.py"))
        .arg(&model)
        .arg(&ids_path)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want: Vec<f32> = std::fs::read(&out_path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();

    let mut dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
    for (exact, tol) in [(true, TOL), (false, TOL_16BIT)] {
        dec.f32_activations = exact;
        let mut cache = dec.new_cache();
        let h = dec.forward(&ids, &mut cache, &mut |_| Ok(())).unwrap();
        let got = dec.logits(&h);
        assert_eq!(got.len(), want.len(), "logit counts differ");
        let vocab = got.len() / TOKENS;
        let mut max_diff = 0f32;
        let mut argmax_same = 0;
        for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
            for (a, b) in g.iter().zip(w) {
                max_diff = max_diff.max((a - b).abs());
            }
            argmax_same += usize::from(argmax(g) == argmax(w));
        }
        eprintln!(
            "SmolLM2, {TOKENS} tokens, f32 activations {exact}: max |Δlogit| {max_diff:.2e}, greedy token equal at {argmax_same}/{TOKENS} positions"
        );
        assert!(max_diff < tol, "max |Δlogit| {max_diff} ≥ {tol}");
        assert_eq!(argmax_same, TOKENS);
    }
}

/// `synth-gguf`'s files read back by the `gguf` package (`tests/reference/read_gguf.py`):
/// every tensor's name, dims and type, and its values dequantized by `gguf.quants`
/// against the crate's dequantizer, for each architecture and weight type the writer
/// offers, and the architecture's name.
#[test]
fn synthetic_files_read_back_with_the_gguf_package() {
    use wgsparse::model::synth::{preset, write_synth};
    use wgsparse::quant::{GgmlType, dequantize};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = match reference_python() {
        Ok(p) => p,
        Err(why) => return skip(why),
    };
    let dir = std::env::temp_dir().join(format!("wgsparse-synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["tiny-llama", "tiny-qwen2", "tiny-smallthinker"] {
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16] {
            let cfg = preset(name).unwrap();
            let path = dir.join(format!("{name}-{ty:?}.gguf"));
            write_synth(&cfg, ty, 3, &mut std::fs::File::create(&path).unwrap()).unwrap();
            let out = Command::new(&python)
                .arg(root.join("tests/reference/read_gguf.py"))
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name} {ty:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(py["arch"], cfg.arch.name(), "{name}");
            let g = Gguf::open(&path).unwrap();
            let tensors = py["tensors"].as_array().unwrap();
            assert_eq!(
                tensors.len(),
                g.tensors.len(),
                "{name} {ty:?}: tensor count"
            );
            for t in tensors {
                let tname = t["name"].as_str().unwrap();
                let ours = g.tensor(tname).unwrap();
                let dims: Vec<u64> = t["dims"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect();
                assert_eq!(dims, ours.dims, "{name} {tname}: dims");
                assert_eq!(
                    t["type"].as_u64().unwrap() as u32,
                    ours.ty.id(),
                    "{name} {tname}"
                );
                let v = dequantize(
                    ours.ty,
                    &g.tensor_bytes(tname).unwrap(),
                    ours.numel() as usize,
                )
                .unwrap();
                let sum: f64 = v.iter().map(|&x| x as f64).sum();
                let abs: f64 = v.iter().map(|&x| (x as f64).abs()).sum();
                let (ps, pa) = (t["sum"].as_f64().unwrap(), t["abs"].as_f64().unwrap());
                assert!(
                    (abs - pa).abs() <= 1e-9 * pa.max(1.0)
                        && (sum - ps).abs() <= 1e-9 * pa.max(1.0),
                    "{name} {tname}: values differ (sum {sum} vs {ps}, |x| {abs} vs {pa})"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
