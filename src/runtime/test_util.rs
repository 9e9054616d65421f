//! Helpers of the crate's own unit tests.

use crate::Context;

/// A GPU context; a missing adapter fails under `WGSPARSE_REQUIRE_GPU=1` (CI) and skips
/// otherwise.
pub(crate) fn gpu() -> Option<Context> {
    let mut opts = crate::ContextOptions::from_env().expect("environment");
    if opts.backend == crate::Backend::Cpu {
        opts.backend = crate::Backend::Auto;
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
