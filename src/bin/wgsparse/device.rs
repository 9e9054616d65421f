//! The one place the CLI builds contexts: `--backend` (else `WGSPARSE_BACKEND`, else the
//! subcommand's default), an optional planned binding limit, and the cross-check GPU.

use clap::Args;
use wgsparse::{Backend, Context, ContextOptions, Result};

/// Flags every measuring subcommand shares (`#[command(flatten)]`).
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// auto, vulkan, metal, dx12, gl or cpu (also WGSPARSE_BACKEND).
    #[arg(long)]
    pub backend: Option<Backend>,
    /// Print exactly one JSON object (the report's fields) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Options from the environment with the command line's backend and binding limit.
pub fn options(backend: Option<Backend>, max_binding: Option<u64>) -> Result<ContextOptions> {
    let mut o = ContextOptions::from_env()?;
    if let Some(b) = backend {
        o.backend = b;
    }
    if max_binding.is_some() {
        o.max_binding_bytes = max_binding;
    }
    Ok(o)
}

/// The context of a subcommand (the best device unless told otherwise).
pub fn context(backend: Option<Backend>, max_binding: Option<u64>) -> Result<Context> {
    Context::new_blocking(options(backend, max_binding)?)
}

/// The context of a subcommand whose default is `default` when neither `--backend` nor
/// `WGSPARSE_BACKEND` names one (the model commands run on the CPU by default).
pub fn context_or(backend: Option<Backend>, default: Backend) -> Result<Context> {
    let env_set = std::env::var("WGSPARSE_BACKEND").is_ok();
    context(backend.or((!env_set).then_some(default)), None)
}

/// A GPU context for cross-checking a CPU run, if any GPU is there.
pub fn other_gpu(max_binding: Option<u64>) -> Option<Context> {
    let o = ContextOptions {
        require_gpu: true,
        ..options(Some(Backend::Auto), max_binding).ok()?
    };
    Context::new_blocking(o).ok()
}
