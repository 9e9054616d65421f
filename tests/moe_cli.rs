//! `wgsparse moe --check --json`: the JSON keys, on the GPU and on the CPU, for
//! f16 and Q4_0, with errors within the MoE tolerance; bad arguments fail cleanly.

mod common;

#[test]
fn moe_check_json_on_gpu_and_cpu() {
    let gpu = common::gpu(None).is_some();
    let mut backends = vec!["cpu"];
    if gpu {
        backends.push("auto");
    }
    for backend in backends {
        for (weights, tokens) in [("f16", "37"), ("q4_0", "3")] {
            let (ok, out, err) = common::wgsparse_line(&format!(
                "moe --backend {backend} --tokens {tokens} --hidden 128 --experts 8 --top-k 2 --ffn 64 --weights {weights} --iters 1 --check --json"
            ));
            assert!(ok, "{backend} {weights}: {err}");
            let v: serde_json::Value = common::one_json(&out);
            for key in [
                "ms",
                "tokens_per_s",
                "skip_frac",
                "max_abs_err",
                "rel_l2_err",
            ] {
                assert!(
                    v[key].is_number(),
                    "{backend} {weights}: no numeric `{key}` in {v}"
                );
            }
            assert!(v["max_abs_err"].as_f64().unwrap() < 2e-4, "{v}");
            assert!(v["rel_l2_err"].as_f64().unwrap() < 1e-5, "{v}");
            let skip = v["skip_frac"].as_f64().unwrap();
            assert!(skip > 0.0 && skip < 1.0, "{v}");
            assert_eq!(v["weights"], weights);
            let counts: u64 = v["expert_counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_u64().unwrap())
                .sum();
            assert_eq!(counts, 2 * tokens.parse::<u64>().unwrap());
        }
    }
}

#[test]
fn moe_bad_arguments_fail_with_a_message() {
    let (ok, _, err) = common::wgsparse(&["moe", "--backend", "cpu", "--hidden", "100"]);
    assert!(!ok);
    assert!(err.contains("hidden"), "{err}");
    let (ok, _, err) = common::wgsparse(&["moe", "--backend", "cpu", "--weights", "q8"]);
    assert!(!ok);
    assert!(err.contains("q8"), "{err}");
}

#[test]
fn layer_check_json_is_one_object_within_tolerance() {
    let mut backends = vec!["cpu"];
    if common::gpu(None).is_some() {
        backends.push("auto");
    }
    for backend in backends {
        let v = common::json_with(
            common::wgsparse_line(&format!(
                "layer --tokens 5 --iters 1 --check --json --backend {backend}"
            )),
            "ms tokens_per_s skip_frac stages attention",
        );
        let rel = v["rel_l2_err"].as_f64().expect("rel_l2_err");
        assert!(rel < 1e-3, "{backend}: rel_l2_err {rel}");
        assert_eq!(v["check_against"], "cpu layer");
    }
}
