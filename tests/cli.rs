//! The `wgsparse` binary: `info` and `attention --check --json` keep their contract.

mod common;

/// Without a runtime folder in the environment (containers, CI, ssh sessions) a plain
/// run prints nothing from the window-system probe of the Vulkan and GL backends.
#[test]
fn runs_without_xdg_runtime_dir_are_quiet() {
    let bin = env!("CARGO_BIN_EXE_wgsparse");
    for args in [
        &["info"][..],
        &[
            "attention",
            "--seq-len",
            "64",
            "--q-heads",
            "2",
            "--kv-heads",
            "1",
        ],
    ] {
        let out = std::process::Command::new(bin)
            .args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("run wgsparse");
        let err = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            !err.contains("XDG_RUNTIME_DIR") && !stdout.contains("XDG_RUNTIME_DIR"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn info_lists_the_cpu_backend_and_the_gpu() {
    let (ok, out, err) = common::wgsparse(&["info", "--json"]);
    assert!(ok, "{err}");
    let v = common::one_json(&out);
    let adapters = v["adapters"].as_array().unwrap();
    assert!(adapters.iter().any(|a| a["backend"] == "cpu"));
    if common::gpu(None).is_some() {
        assert!(adapters.iter().any(|a| a["backend"] == "vulkan"
            || a["backend"] == "metal"
            || a["backend"] == "dx12"));
        assert_ne!(v["chosen"]["backend"], "cpu");
    }
}

#[test]
fn attention_check_json_has_the_stable_keys() {
    let gpu = common::gpu(None).is_some();
    for backend in ["cpu", "auto"] {
        let v = common::json_with(
            common::wgsparse_line(&format!(
                "attention --method dense --seq-len 70 --q-heads 4 --kv-heads 2 --head-dim 64 --dtype f32 --iters 1 --backend {backend} --check --json"
            )),
            "backend adapter method seq_len q_heads kv_heads head_dim dtype ms density \
             max_abs_err rel_l2_err",
        );
        assert_eq!(v["seq_len"], 70);
        assert_eq!(v["density"], 1.0);
        assert!(v["max_abs_err"].as_f64().unwrap() <= 2e-5, "{v}");
        if backend == "auto" && gpu {
            assert_ne!(v["backend"], "cpu");
            assert_eq!(v["check_against"], "cpu");
        }
    }
}

/// `--method proxy --check --json`: the quality keys, `est_ms` and the per-head budgets,
/// on the CPU path and the GPU; the proxy flags, and their refusal with another method.
#[test]
fn proxy_check_json_has_the_quality_keys_and_budgets() {
    for backend in ["cpu", "auto"] {
        let v = common::json_with(
            common::wgsparse_line(&format!(
                "attention --method proxy --gamma 0.9 --min-budget 128 --proxy-groups 2 --stride 2 \
                 --seq-len 700 --q-heads 4 --kv-heads 2 --head-dim 64 --dtype f32 --iters 1 \
                 --backend {backend} --check --json"
            )),
            "density attn_recall rel_l2_err tol_recall_01 est_ms dense_ms proxy",
        );
        let p = &v["proxy"];
        let budgets = p["head_budgets"].as_array().expect("head_budgets");
        assert_eq!(budgets.len(), 4, "{v}");
        assert!(
            budgets
                .iter()
                .all(|b| b.as_f64().is_some_and(|x| x > 0.0 && x <= 1.0))
        );
        let d = v["density"].as_f64().unwrap();
        assert!(d > 0.0 && d < 1.0, "{v}");
        assert!(v["est_ms"].as_f64().is_some_and(|x| x >= 0.0), "{v}");
        let c = &v["config"]["Proxy"];
        assert_eq!(
            (c["groups"].as_u64(), c["stride"].as_u64()),
            (Some(2), Some(2)),
            "{v}"
        );
        assert_eq!(c["min_budget"], 128, "{v}");
    }
    let (ok, _, err) = common::wgsparse(&["attention", "--method", "sale", "--gamma", "0.9"]);
    assert!(!ok && err.contains("--method proxy"), "{err}");
    let (ok, _, err) = common::wgsparse(&[
        "attention",
        "--method",
        "proxy",
        "--proxy-groups",
        "3",
        "--seq-len",
        "256",
    ]);
    assert!(!ok && err.contains("groups"), "{err}");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let (ok, _, err) = common::wgsparse(&["attention", "--head-dim", "100", "--seq-len", "8"]);
    assert!(!ok);
    assert!(err.contains("head_dim"), "{err}");
    let (ok, _, err) = common::wgsparse(&["attention", "--backend", "cuda"]);
    assert!(!ok);
    assert!(err.contains("cuda"), "{err}");
}

/// `--method anchor --check --json` on a Q/K/V file: the quality keys the issue names,
/// and the data label from the file.
#[test]
fn anchor_check_on_a_data_file_has_the_quality_keys() {
    use wgsparse::attention::qkv_file::QkvFile;
    use wgsparse::attention::synthetic::{Structure, structured_qkv_host};
    let shape = wgsparse::AttentionShape::new(2, 1, 600, 64);
    let (q, k, v) = structured_qkv_host(&shape, &Structure::default(), common::seed());
    let file = QkvFile {
        shape,
        q,
        k,
        v,
        meta: [
            ("source".to_string(), "synthetic".to_string()),
            ("model".to_string(), "cli-test".to_string()),
        ]
        .into(),
    };
    let dir = std::env::temp_dir().join(format!("wgsparse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qkv.safetensors");
    file.save(&path, wgsparse::DType::F16).unwrap();
    for backend in ["cpu", "auto"] {
        let (ok, out, err) = common::wgsparse(&[
            "attention",
            "--method",
            "anchor",
            "--theta",
            "4",
            "--step",
            "2",
            "--init-keys",
            "128",
            "--data",
            path.to_str().unwrap(),
            "--dtype",
            "f32",
            "--iters",
            "1",
            "--backend",
            backend,
            "--check",
            "--oracle",
            "0.9",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v = common::one_json(&out);
        for key in [
            "density",
            "attn_recall",
            "rel_l2_err",
            "max_abs_err",
            "tol_recall_01",
            "oracle_row_density",
        ] {
            let x = v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("missing {key} in {v}"));
            assert!((0.0..=1e3).contains(&x), "{key} = {x}");
        }
        assert!(v["data"].as_str().unwrap().contains("cli-test"), "{v}");
        assert!(v["attn_recall"].as_f64().unwrap() <= 1.0);
        assert_eq!(v["seq_len"], 600);
    }
    // A bad θ is a typed error, not a panic.
    let (ok, _, err) = common::wgsparse_line("attention --method anchor --theta NaN --seq-len 64");
    assert!(!ok);
    assert!(err.contains("theta"), "{err}");
}

#[test]
fn tune_times_the_candidates_and_writes_the_table() {
    if common::gpu(None).is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("wgsparse-cli-tune-{}", std::process::id()));
    let file = dir.join("tune.json");
    let (ok, out, err) = common::wgsparse_line(&format!(
        "tune --seq-len 96 --head-dims 64,128 --iters 1 --json --out {}",
        file.display()
    ));
    assert!(ok, "{err}");
    let v = common::one_json(&out);
    let timings = v["timings"].as_array().unwrap();
    assert!(timings.len() >= 2, "{v}");
    assert!(timings.iter().all(|t| t["ms"].as_f64().unwrap() > 0.0));
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let adapter = v["adapter"].as_str().unwrap();
    for d in ["64", "128"] {
        let k = &table["adapters"][adapter][d]["kernel"];
        assert!(k == "portable" || k == "coop", "{table}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Q/K/V file holding a NaN (or, stored as f16, a value beyond f16's range) is refused
/// with a message naming the tensor and the element, on the CPU path and the GPU, never
/// run into a NaN output; the library refuses it the same way.
#[test]
fn non_finite_data_is_refused() {
    use wgsparse::attention::qkv_file::QkvFile;
    let shape = wgsparse::AttentionShape::new(2, 1, 64, 64);
    let (q, mut k, v) = wgsparse::attention::synthetic::qkv_host(&shape, common::seed());
    k[77] = f32::NAN;
    let file = QkvFile {
        shape,
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        meta: [("source".to_string(), "synthetic".to_string())].into(),
    };
    let dir = std::env::temp_dir().join(format!("wgsparse-cli-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qkv.safetensors");
    file.save(&path, wgsparse::DType::F32).unwrap();
    for backend in ["cpu", "auto"] {
        let (ok, _, err) = common::wgsparse(&[
            "attention",
            "--data",
            path.to_str().unwrap(),
            "--dtype",
            "f32",
            "--backend",
            backend,
        ]);
        assert!(!ok, "{backend}: a NaN input must fail");
        assert!(err.contains("K element 77 is NaN"), "{backend}: {err}");
        // Opting in: the value is replaced by 0 with a warning, and the run is finite.
        let (ok, out, err) = common::wgsparse(&[
            "attention",
            "--data",
            path.to_str().unwrap(),
            "--dtype",
            "f32",
            "--backend",
            backend,
            "--nonfinite",
            "zero",
            "--check",
            "--json",
        ]);
        assert!(ok, "{backend}: {err}");
        assert!(
            err.contains("K holds 1 non-finite value"),
            "{backend}: {err}"
        );
        let v = common::one_json(&out);
        assert!(
            v["max_abs_err"].as_f64().unwrap() < 1e-4,
            "{backend}: {out}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    let ctx = wgsparse::Context::cpu();
    let up = |k: &[f32], dtype| wgsparse::attention::upload_qkv(&ctx, &shape, &q, k, &v, dtype);
    assert!(matches!(
        up(&k, wgsparse::DType::F32),
        Err(wgsparse::Error::NonFinite { index: 77, .. })
    ));
    let mut big = v.clone();
    big[5] = 1e5;
    assert!(up(&big, wgsparse::DType::F32).is_ok());
    assert!(matches!(
        up(&big, wgsparse::DType::F16),
        Err(wgsparse::Error::NonFinite {
            index: 5,
            dtype: "f16",
            ..
        })
    ));
}

/// `--dry-run` plans without running: at 256k tokens under a browser's default limits
/// the problem runs in head groups and every binding fits; `--max-buffer-bytes` on a
/// real run makes it run in head groups with the density, recall and error against
/// dense (`--check`) of the run without the limit.
#[test]
fn dry_run_plans_and_a_lowered_buffer_limit_runs_in_head_groups() {
    let v = common::json_with(
        common::wgsparse_line(
            "attention --dry-run --limits webgpu --method sale --seq-len 262144 --q-heads 32 \
             --kv-heads 8 --head-dim 128 --dtype f16 --json",
        ),
        "groups q_heads_per_group plan",
    );
    assert!(v["groups"].as_u64().unwrap() > 1, "{v}");
    assert_eq!(v["plan"]["problems"].as_array().unwrap().len(), 0, "{v}");
    let limit = v["plan"]["limits"]["max_binding"].as_u64().unwrap();
    for b in v["plan"]["buffers"].as_array().unwrap() {
        let largest = match b["binding"]["bound"].as_str().unwrap() {
            "whole" => b["bytes"].as_u64().unwrap(),
            _ => b["binding"]["largest"].as_u64().unwrap(),
        };
        assert!(largest <= limit, "{b}");
    }
    // A real run with Q (4 heads x 600 x 64 x f32 = 614 KB) over a 400 KB buffer limit.
    let run = |extra: &str| {
        common::json_with(
            common::wgsparse_line(&format!(
                "attention --method sale --seq-len 600 --q-heads 4 --kv-heads 2 --head-dim 64 \
                 --dtype f32 --iters 1 --backend auto --check --json {extra}"
            )),
            "density attn_recall max_abs_err",
        )
    };
    let (grouped, whole) = (run("--max-buffer-bytes 400000"), run(""));
    assert_eq!(grouped["density"], whole["density"], "{grouped}\n{whole}");
    // The same pairs and outputs: the same errors against dense attention.
    assert_eq!(
        grouped["max_abs_err"], whole["max_abs_err"],
        "{grouped}\n{whole}"
    );
    assert_eq!(grouped["attn_recall"], whole["attn_recall"]);
    assert!(grouped["attn_recall"].as_f64().unwrap() > 0.9, "{grouped}");
}

/// `synth-gguf` writes a model every model command reads; `bench-model --json` and
/// `generate --json` keep their keys; a MoE file runs under a resident cap.
#[test]
fn synthetic_models_benchmark_and_generate() {
    let dir = std::env::temp_dir().join(format!("wgsparse-cli-synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for arch in ["qwen2", "llama", "smallthinker"] {
        let file = dir.join(format!("tiny-{arch}.gguf"));
        let f = file.to_str().unwrap();
        let (ok, out, err) = common::wgsparse(&[
            "synth-gguf",
            "--arch",
            arch,
            "--preset",
            &format!("tiny-{arch}"),
            "--type",
            "q8_0",
            "--out",
            f,
            "--json",
        ]);
        assert!(ok, "{err}");
        let v = common::one_json(&out);
        assert_eq!(
            v["bytes"].as_u64().unwrap(),
            std::fs::metadata(&file).unwrap().len()
        );
        let mut bench = vec![
            "bench-model",
            "--model",
            f,
            "--backend",
            "cpu",
            "--prompt-tokens",
            "9,20",
            "--gen",
            "5",
            "--json",
        ];
        if arch == "smallthinker" {
            bench.extend(["--max-resident-mb", "1"]);
        }
        let (ok, out, err) = common::wgsparse(&bench);
        assert!(ok, "{err}");
        let v = common::one_json(&out);
        for key in [
            "prefill_tok_s",
            "decode_tok_s",
            "ttft_ms",
            "peak_host_bytes",
        ] {
            assert!(v[key].as_f64().unwrap() > 0.0, "{arch}: {key} in {v}");
        }
        assert!(v["peak_gpu_bytes"].is_null());
        assert_eq!(v["runs"].as_array().unwrap().len(), 2);
        assert_eq!(v["runs"][1]["prompt_tokens"], 20);
        if arch == "smallthinker" {
            let cap = 1u64 << 20;
            assert_eq!(v["expert_cap_bytes"].as_u64(), Some(cap));
            assert!(v["expert_bytes"].as_u64().unwrap() > 0);
            // On a GPU the MoE model runs on the GPU decoder; the resident cap (a CPU
            // decoder option) chooses the CPU decoder.
            if common::gpu(None).is_some() {
                for (cap, engine) in [(None, "gpu"), (Some("1"), "cpu")] {
                    let mut args = vec![
                        "bench-model",
                        "--model",
                        f,
                        "--backend",
                        "vulkan",
                        "--prompt-tokens",
                        "9",
                        "--gen",
                        "3",
                        "--json",
                    ];
                    if let Some(c) = cap {
                        args.extend(["--max-resident-mb", c]);
                    }
                    let (ok, out, err) = common::wgsparse(&args);
                    assert!(ok, "{err}");
                    let v = common::one_json(&out);
                    assert_eq!(v["engine"], engine, "{v}");
                    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0, "{v}");
                }
            }
        }
        let (ok, out, err) = common::wgsparse(&[
            "generate",
            "--model",
            f,
            "--prompt",
            "hello world",
            "--tokens",
            "6",
            "--backend",
            "cpu",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v = common::one_json(&out);
        let tokens = v["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 6);
        assert!(v["text"].is_string());
        // Sampled: a seed replays its tokens.
        let sampled = |seed: &str| {
            let (ok, out, err) = common::wgsparse(&[
                "generate",
                "--model",
                f,
                "--prompt",
                "hello world",
                "--tokens",
                "6",
                "--backend",
                "cpu",
                "--temperature",
                "0.9",
                "--top-k",
                "50",
                "--top-p",
                "0.9",
                "--seed",
                seed,
                "--json",
            ]);
            assert!(ok, "{err}");
            common::one_json(&out)["tokens"].clone()
        };
        assert_eq!(sampled("5"), sampled("5"));
    }
    // `crop` writes a smaller model that `generate` runs; `--mask` keeps the shapes.
    let src = dir.join("tiny-llama.gguf");
    for mask in [false, true] {
        let out = dir.join(format!("tiny-llama-crop-{mask}.gguf"));
        let mut args = vec![
            "crop",
            "--model",
            src.to_str().unwrap(),
            "--keep",
            "0.8",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        if mask {
            args.push("--mask");
        }
        let (ok, stdout, err) = common::wgsparse(&args);
        assert!(ok, "{err}");
        let v = common::one_json(&stdout);
        let (tin, tout) = (
            v["tensor_bytes_in"].as_u64().unwrap(),
            v["tensor_bytes_out"].as_u64().unwrap(),
        );
        assert!(if mask { tout == tin } else { tout < tin }, "{v}");
        assert!(v["cost"].as_f64().unwrap() <= v["budget"].as_f64().unwrap() * 1.000001);
        assert_eq!(
            v["layers"][0]["kept"].as_u64().unwrap() % 32,
            0,
            "whole Q8_0 blocks: {v}"
        );
        let (ok, out, err) = common::wgsparse(&[
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "hello",
            "--tokens",
            "3",
            "--json",
        ]);
        assert!(ok, "{err}");
        assert!(
            !common::one_json(&out)["tokens"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
    let (ok, _, err) = common::wgsparse(&[
        "crop",
        "--model",
        src.to_str().unwrap(),
        "--keep",
        "1.5",
        "--out",
        "/dev/null",
    ]);
    assert!(!ok && err.contains("keep"), "{err}");
    let (ok, _, err) = common::wgsparse(&[
        "synth-gguf",
        "--arch",
        "llama",
        "--preset",
        "tiny-qwen2",
        "--out",
        "/dev/null",
    ]);
    assert!(!ok && err.contains("is a qwen2 model"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `chat` keeps the KV cache across turns: the second turn prefills only what its
/// transcript adds (the CPU decoder and, on the GPU, the GPU decoder, greedy replies
/// equal); `bench-model` on the GPU decoder reports its keys; `passkey` runs and scores.
#[test]
fn chat_reuses_the_cache_and_the_gpu_decoder_benchmarks() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("wgsparse-cli-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny-llama.gguf");
    let f = file.to_str().unwrap();
    let (ok, _, err) = common::wgsparse(&[
        "synth-gguf",
        "--arch",
        "llama",
        "--preset",
        "tiny-llama",
        "--type",
        "q8_0",
        "--out",
        f,
    ]);
    assert!(ok, "{err}");
    let gpu = common::gpu(None).is_some();
    let chat = |backend: &str| -> (String, Vec<(usize, usize)>) {
        let bin = env!("CARGO_BIN_EXE_wgsparse");
        let mut child = std::process::Command::new(bin)
            .args([
                "chat",
                "--model",
                f,
                "--tokens",
                "6",
                "--context",
                "512",
                "--backend",
                backend,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"hello there\nand a second question\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{backend}: {err}");
        // "[turn N: P of T prompt tokens prefilled, ...]"
        let turns: Vec<(usize, usize)> = err
            .lines()
            .filter_map(|l| l.strip_prefix("[turn "))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w[1].parse().unwrap(), w[3].parse().unwrap())
            })
            .collect();
        (String::from_utf8_lossy(&out.stdout).into_owned(), turns)
    };
    let (text, turns) = chat("cpu");
    assert_eq!(turns.len(), 2, "{text}");
    assert_eq!(turns[0].0, turns[0].1, "the first turn prefills everything");
    // At least the first turn's prompt is reused (the reply too where its text
    // re-encodes to the generated ids, as it does on real models).
    assert!(
        turns[1].0 <= turns[1].1 - turns[0].1,
        "second turn: {turns:?}"
    );
    if gpu {
        let (gtext, gturns) = chat("vulkan");
        assert_eq!(gturns.len(), 2);
        assert!(gturns[1].0 <= gturns[1].1 - gturns[0].1, "GPU: {gturns:?}");
        assert!(!gtext.trim().is_empty() || !text.trim().is_empty());
        let (ok, out, err) = common::wgsparse(&[
            "bench-model",
            "--model",
            f,
            "--backend",
            "vulkan",
            "--prompt-tokens",
            "9,20",
            "--gen",
            "4",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v = common::one_json(&out);
        assert_eq!(v["engine"], "gpu", "{v}");
        for key in [
            "prefill_tok_s",
            "decode_tok_s",
            "ttft_ms",
            "peak_gpu_bytes",
            "peak_host_bytes",
        ] {
            assert!(v[key].as_f64().unwrap() > 0.0, "GPU decoder: {key} in {v}");
        }
        // Weights stay in their blocks: live GPU memory stays near the file's size.
        let file_bytes = v["file_bytes"].as_f64().unwrap();
        assert!(
            v["weight_bytes"].as_f64().unwrap() <= 1.1 * file_bytes,
            "{v}"
        );
        // `--prefill-chunk`: the GPU decoder's prompt in chunks of 5 tokens; a chunk of
        // 0 and the CPU decoder (which prefills a prompt at once) are refused.
        let generate = |extra: &[&str]| {
            let base = [
                "generate",
                "--model",
                f,
                "--prompt",
                "hello there, how are you today my friend",
                "--tokens",
                "3",
                "--backend",
                "vulkan",
                "--json",
            ];
            common::wgsparse(&[&base[..], extra].concat())
        };
        let v = common::json_with(generate(&["--prefill-chunk", "5"]), "text tokens");
        let n = v["tokens"].as_array().unwrap().len();
        assert!((1..=3).contains(&n), "{v}");
        let (ok, _, err) = generate(&["--prefill-chunk", "0"]);
        assert!(!ok && err.contains("at least 1"), "{err}");
        let (ok, _, err) = generate(&["--prefill-chunk", "5", "--engine", "cpu"]);
        assert!(!ok && err.contains("GPU decoder option"), "{err}");
    }
    let text_file = dir.join("filler.txt");
    std::fs::write(
        &text_file,
        "It is a truth universally acknowledged, that a single man in possession of a \
         good fortune, must be in want of a wife. "
            .repeat(100),
    )
    .unwrap();
    let (ok, out, err) = common::wgsparse(&[
        "passkey",
        "--model",
        f,
        "--text",
        text_file.to_str().unwrap(),
        "--tokens",
        "400",
        "--depths",
        "0.2,0.8",
        "--methods",
        "dense,window:window=64",
        "--backend",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = common::one_json(&out);
    assert_eq!(v["runs"].as_array().unwrap().len(), 4, "{v}");
    assert_eq!(v["success"].as_array().unwrap().len(), 2, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `budget` measures each head's need on a model and text and writes per-head budgets
/// under the target; ProxyAttn and SALE run under them in `nll`, `eval` and
/// `passkey`-style model commands (`--budgets`), and wrong uses are refused with a
/// message.
#[test]
fn budget_writes_per_head_budgets_that_proxy_and_sale_run_under() {
    let dir = std::env::temp_dir().join(format!("wgsparse-cli-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny-llama.gguf");
    let m = model.to_str().unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man in possession of a good \
         fortune, must be in want of a wife. "
            .repeat(40),
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let (ok, _, err) = common::wgsparse(&[
        "synth-gguf",
        "--arch",
        "llama",
        "--preset",
        "tiny-llama",
        "--type",
        "q8_0",
        "--out",
        m,
    ]);
    assert!(ok, "{err}");
    let mut files = vec![];
    for allocation in ["solver", "uniform"] {
        let out = dir.join(format!("{allocation}.json"));
        let o = out.to_str().unwrap();
        let (ok, json, err) = common::wgsparse(&[
            "budget",
            "--model",
            m,
            "--text",
            t,
            "--tokens",
            "300",
            "--block",
            "64",
            "--attention",
            "0.5",
            "--allocation",
            allocation,
            "--out",
            o,
            "--json",
        ]);
        assert!(ok, "{err}");
        let v = common::one_json(&json);
        assert_eq!(v["allocation"], allocation);
        let layers = v["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "both layers of tiny-llama: {v}");
        let budgets: Vec<f64> = layers
            .iter()
            .flat_map(|l| l["budget"].as_array().unwrap())
            .map(|b| b.as_f64().unwrap())
            .collect();
        assert_eq!(budgets.len(), 2 * 4, "4 heads per layer");
        // 300 tokens in 64-row blocks: 5 blocks; budgets are whole blocks.
        assert!(
            budgets
                .iter()
                .all(|&b| b > 0.0 && b <= 1.0 && ((b * 5.0).round() - b * 5.0).abs() < 1e-4)
        );
        let mean = budgets.iter().sum::<f64>() / budgets.len() as f64;
        assert!(mean <= 0.5 + 1e-6, "{allocation}: mean {mean}");
        for l in layers {
            let need = l["need"].as_array().unwrap();
            assert!(need.iter().all(|x| x.as_f64().unwrap() > 0.0));
        }
        files.push(out);
    }
    let solver = files[0].to_str().unwrap();
    let nll_args = [
        "nll",
        "--model",
        m,
        "--text",
        t,
        "--tokens",
        "300",
        "--backend",
        "cpu",
        "--method",
        "proxy:block=64,min_budget=0",
        "--budgets",
        solver,
    ];
    let (ok, out, err) = common::wgsparse(&nll_args);
    assert!(ok, "{err}");
    assert!(out.contains("nats/token"), "{out}");
    // The same run as one JSON object: the typed report.
    let (ok, json, err) = common::wgsparse(&[&nll_args[..], &["--json"]].concat());
    assert!(ok, "{err}");
    let v = common::one_json(&json);
    assert_eq!(v["tokens"], 300, "{v}");
    assert_eq!(v["predictions"], 299, "{v}");
    assert_eq!(v["engine"], "cpu", "{v}");
    assert_eq!(v["per_layer_file"], solver, "{v}");
    let nll = v["nll"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{v}");
    assert!((v["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp());
    // Both forms report the same figure.
    assert!(out.contains(&format!("nll {nll:.4}")), "{out} vs {v}");
    let (ok, out, err) = common::wgsparse(&[
        "eval",
        "--model",
        m,
        "--text",
        t,
        "--tokens",
        "256",
        "--continuation",
        "8",
        "--layers",
        "1",
        "--methods",
        "dense,proxy,sale",
        "--min-budget",
        "0",
        "--budgets",
        solver,
        "--backend",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = common::one_json(&out);
    let labels: Vec<&str> = v["end_to_end"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert!(
        labels.iter().any(|l| l.contains("solver budgets")),
        "{labels:?}"
    );
    assert!(
        labels.iter().any(|l| l.starts_with("proxy γ=")),
        "{labels:?}"
    );
    assert!(
        labels.iter().any(|l| l.starts_with("sale solver budgets")),
        "{labels:?}"
    );
    // Budgets run ProxyAttn (in the file's block size) and SALE.
    let nll = |method: &str| {
        common::wgsparse_line(&format!(
            "nll --model {m} --text {t} --tokens 300 --backend cpu --method {method} --budgets {solver}"
        ))
    };
    let (ok, out, err) = nll("sale");
    assert!(ok && out.contains("nats/token"), "{err}");
    let (ok, _, err) = nll("anchor");
    assert!(!ok && err.contains("ProxyAttn or SALE"), "{err}");
    let (ok, _, err) = nll("proxy");
    assert!(!ok && err.contains("blocks"), "{err}");
    let (ok, _, err) = common::wgsparse_line(&format!(
        "budget --model {m} --text {t} --tokens 300 --attention 1.5 --out /dev/null"
    ));
    assert!(!ok && err.contains("--attention"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
