//! Helpers shared by the integration tests.
#![allow(dead_code)]

use wgsparse::attention::lut::{LutUnit, SparseLut};
use wgsparse::attention::upload_qkv;
use wgsparse::{AttentionReport, AttentionShape, Context, ContextOptions, DType, Method, Tensor};

/// A GPU context, or `None` (test skipped) when no adapter exists and the environment
/// does not demand one. The test script sets `WGSPARSE_REQUIRE_GPU=1`, which turns a
/// missing adapter into a failure: in CI a skipped GPU test is not a pass.
pub fn gpu(max_binding_bytes: Option<u64>) -> Option<Context> {
    gpu_limited(max_binding_bytes, None)
}

/// Like [`gpu`], also lowering the workgroup memory the kernels may plan with (16384 =
/// WebGPU's default, the browser variants).
pub fn gpu_limited(
    max_binding_bytes: Option<u64>,
    max_workgroup_bytes: Option<u32>,
) -> Option<Context> {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_module("wgpu_hal::gles", log::LevelFilter::Off)
        .try_init();
    let mut opts = ContextOptions::from_env().expect("environment");
    if opts.backend == wgsparse::Backend::Cpu {
        opts.backend = wgsparse::Backend::Auto;
    }
    opts.require_gpu = true;
    opts.max_binding_bytes = max_binding_bytes;
    opts.max_workgroup_bytes = max_workgroup_bytes;
    match Context::new_blocking(opts) {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("WGSPARSE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("WGSPARSE_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// A fresh seed per run (inputs are never the same twice), printed so a failure can be
/// replayed with `WGSPARSE_SEED`.
pub fn seed() -> u64 {
    let s = std::env::var("WGSPARSE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed = {s} (set WGSPARSE_SEED to replay)");
    s
}

/// Runs a sparse `method` through an attention plan into a NaN-poisoned output (any row
/// it fails to write shows) and returns the output, the report and the blocks the plan
/// reports it selected.
pub fn run_sparse(
    ctx: &Context,
    shape: AttentionShape,
    method: Method,
    dtype: DType,
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> (Vec<f32>, AttentionReport, Vec<SparseLut>) {
    let plan = ctx
        .attention(shape)
        .method(method)
        .dtype(dtype)
        .build()
        .unwrap();
    let (qt, kt, vt) = upload_qkv(ctx, &shape, q, k, v, dtype).unwrap();
    let mut out = Tensor::filled(ctx, &shape.q_dims(), dtype, f32::NAN).unwrap();
    plan.run_into(&qt, &kt, &vt, &mut out).unwrap();
    let lut = pollster::block_on(plan.selected_pattern())
        .unwrap()
        .expect("a sparse plan reports its blocks");
    (out.to_f32_blocking().unwrap(), plan.report().unwrap(), lut)
}

/// Runs the `wgsparse` binary: (success, stdout, stderr).
pub fn wgsparse(args: &[&str]) -> (bool, String, String) {
    // Test crates built without the binary (no `cli` feature) still compile.
    let Some(bin) = option_env!("CARGO_BIN_EXE_wgsparse") else {
        panic!("the wgsparse binary is not built (feature `cli`)");
    };
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .expect("run wgsparse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `wgsparse` with a whitespace-separated command line.
pub fn wgsparse_line(line: &str) -> (bool, String, String) {
    wgsparse(&line.split_whitespace().collect::<Vec<_>>())
}

/// A successful `--json` run whose object has every key of `keys` (none null).
pub fn json_with((ok, out, err): (bool, String, String), keys: &str) -> serde_json::Value {
    assert!(ok, "{err}");
    let v = one_json(&out);
    for key in keys.split_whitespace() {
        assert!(!v[key].is_null(), "missing {key} in {v}");
    }
    v
}

/// The `--json` contract: stdout is exactly one JSON object and nothing else.
pub fn one_json(stdout: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {stdout}"));
    assert!(v.is_object(), "stdout is not a JSON object: {stdout}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    v
}

/// Structured Q/K/V (sinks, local band, heavy columns: 20 per 1,000 keys, RoPE) rounded
/// to `dtype`, so that a sparse selection is neither empty nor everything.
pub fn planted_qkv(
    shape: &AttentionShape,
    dtype: DType,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use wgsparse::attention::synthetic::{Structure, structured_qkv_host};
    let planted = Structure {
        heavy_per_1000: 20.0,
        ..Default::default()
    };
    let (q, k, v) = structured_qkv_host(shape, &planted, seed);
    (
        dtype.round_trip(&q),
        dtype.round_trip(&k),
        dtype.round_trip(&v),
    )
}

/// A GPU selection against its CPU twin: for every (head, LUT row) and each of the row's
/// candidate entries (`candidates(row)`, in the order of the twin's margins), both must
/// agree unless the twin's margin is a rounding tie (`|margin| < tol`). Returns the ties.
pub fn selection_ties(
    gpu: &SparseLut,
    cpu: &SparseLut,
    margins: &[Vec<f32>],
    candidates: impl Fn(usize) -> Vec<u32>,
    tol: f32,
) -> usize {
    let rows = gpu.ranges.len() / gpu.q_heads;
    let mut ties = 0;
    for h in 0..gpu.q_heads {
        for r in 0..rows {
            let (g, c) = (gpu.keys_of(h, r), cpu.keys_of(h, r));
            for (idx, key) in candidates(r).into_iter().enumerate() {
                if g.contains(&key) != c.contains(&key) {
                    let m = margins[h * rows + r][idx];
                    assert!(m.abs() < tol, "head {h} row {r} key {key}: margin {m}");
                    ties += 1;
                }
            }
        }
    }
    ties
}

/// A sparse method configured to keep everything (SALE τ = 0, AnchorAttention with a
/// huge θ) equals dense attention: density 1 on the GPU and the CPU twin, the GPU output
/// within 2e-5 of the naive f64 reference, and the twin's output alike.
pub fn assert_keeps_everything(ctx: &Context, shape: AttentionShape, method: &Method, seed: u64) {
    use wgsparse::attention::flash_cpu::naive_attention;
    use wgsparse::attention::metrics::compare;
    use wgsparse::attention::verify::method_against_cpu_twin;
    let (q, k, v) = wgsparse::attention::synthetic::qkv_host(&shape, seed);
    let (got, twin) =
        method_against_cpu_twin(ctx, shape, method, DType::F32, true, (&q, &k, &v)).unwrap();
    assert!(
        (got.report.density - 1.0).abs() < 1e-12,
        "{method}: {}",
        got.report.density
    );
    assert!(
        (twin.density - 1.0).abs() < 1e-12,
        "{method}: {}",
        twin.density
    );
    assert!(got.errors.max_abs_err <= 2e-5, "{method}: {:?}", got.errors);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let want = naive_attention(&shape, true, scale, &q, &k, &v);
    let (out, _, _) = run_sparse(ctx, shape, method.clone(), DType::F32, (&q, &k, &v));
    assert!(compare(&out, &want).max_abs_err < 2e-5, "{method}");
}

/// A small deterministic generator for LUT contents (the inputs are seeded per run).
struct Coin(u64);
impl Coin {
    fn flip(&mut self, percent: u64) -> bool {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % 100 < percent
    }
}

/// A random causal-ish block LUT: lists with holes, some rows empty, some past the
/// diagonal.
pub fn random_block_lut(
    shape: &AttentionShape,
    q_block: usize,
    key_block: usize,
    seed: u64,
) -> SparseLut {
    let mut c = Coin(seed);
    let n = shape.seq_len;
    SparseLut::from_fn(
        shape.q_heads,
        n,
        q_block,
        LutUnit::Blocks(key_block),
        |_, b| {
            // Causal-ish lists with holes; some rows empty, some past the diagonal.
            (0..n.div_ceil(key_block) as u32)
                .filter(|&i| (i as usize * key_block) < (b + 2) * q_block && c.flip(55))
                .collect()
        },
    )
    .unwrap()
}

/// A random key list (a quarter of all keys) for every LUT row.
pub fn random_stripe_lut(shape: &AttentionShape, q_block: usize, seed: u64) -> SparseLut {
    let mut c = Coin(seed);
    SparseLut::from_fn(
        shape.q_heads,
        shape.seq_len,
        q_block,
        LutUnit::Keys,
        |_, _| (0..shape.seq_len as u32).filter(|_| c.flip(25)).collect(),
    )
    .unwrap()
}

/// Holds the test script's switches against a family's matrix-unit tile (`tile`, from
/// the family's own choice function): with `WGSPARSE_REQUIRE_COOP=1` (the coop run) a
/// missing tile fails, with `WGSPARSE_NO_COOP=1` a present one does.
#[allow(dead_code)]
pub fn check_coop_switches(tile: Option<usize>, what: &str) {
    let flag = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
    if flag("WGSPARSE_NO_COOP") {
        assert_eq!(tile, None, "WGSPARSE_NO_COOP=1 must turn {what} off");
    } else if flag("WGSPARSE_REQUIRE_COOP") {
        assert!(tile.is_some(), "WGSPARSE_REQUIRE_COOP=1 but no {what} here");
    }
}

/// The kernel a family must run: `coop` when the device offers that family a
/// matrix-unit tile, else `portable` ([`check_coop_switches`] first).
#[allow(dead_code)]
pub fn expected_kernel(
    tile: Option<usize>,
    coop: &'static str,
    portable: &'static str,
) -> &'static str {
    check_coop_switches(tile, coop);
    if tile.is_some() { coop } else { portable }
}
