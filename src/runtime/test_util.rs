//! Helpers of the crate's own unit tests.

use crate::runtime::context::{Backend, Context, ContextOptions};

/// A GPU context; a missing adapter fails under `WGSPARSE_REQUIRE_GPU=1` (CI) and skips
/// otherwise.
pub(crate) fn gpu() -> Option<Context> {
    let mut opts = ContextOptions::from_env().expect("environment");
    if opts.backend == Backend::Cpu {
        opts.backend = Backend::Auto;
    }
    opts.require_gpu = true;
    match Context::new_blocking(opts) {
        Ok(c) => Some(c),
        Err(e) if std::env::var("WGSPARSE_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("WGSPARSE_REQUIRE_GPU=1 but no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// A fresh seed for random test inputs, or `WGSPARSE_SEED`'s (printed, so a failure
/// can be replayed).
pub(crate) fn seed() -> u64 {
    let s = std::env::var("WGSPARSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    eprintln!("seed = {s} (set WGSPARSE_SEED to replay)");
    s
}

/// `n` uniform values in `(-s, s)`.
pub(crate) fn rnd(rng: &mut rand::rngs::StdRng, n: usize, s: f32) -> Vec<f32> {
    use rand::Rng;
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

/// Asserts `|a − b| ≤ tol · (1 + |b|)` elementwise.
pub(crate) fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{i}: {x} vs {y}");
    }
}

/// `bytes` with byte `at % len` set to `v` for each edit, then cut at `cut` (the parser
/// fuzz tests' mutation: a valid file damaged in a few places or truncated).
pub(crate) fn mutated(
    mut bytes: Vec<u8>,
    edits: &[(usize, u8)],
    cut: Option<proptest::sample::Index>,
) -> Vec<u8> {
    for (at, v) in edits {
        let i = at % bytes.len();
        bytes[i] = *v;
    }
    if let Some(c) = cut {
        bytes.truncate(c.index(bytes.len()));
    }
    bytes
}
