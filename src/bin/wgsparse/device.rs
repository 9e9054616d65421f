//! The one place the CLI builds contexts: `--backend` (else `WGSPARSE_BACKEND`, else the
//! subcommand's default), an optional planned binding limit, and the cross-check GPU.

use clap::Args;
use wgsparse::attention::plan::DeviceLimits;
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

/// Lowered device limits for a real run or a dry run (`#[command(flatten)]`): the
/// buffers split the way they would on a device with these limits.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct LimitArgs {
    /// Plan with at most this many bytes per storage binding (never more than the
    /// device's): buffers split across bindings as they would on such a device.
    #[arg(long)]
    pub max_binding_bytes: Option<u64>,
    /// Plan with at most this many bytes per buffer (never more than the device's):
    /// attention over tensors larger than this runs in head groups.
    #[arg(long)]
    pub max_buffer_bytes: Option<u64>,
}

/// `--dry-run` and whose limits it plans for (`#[command(flatten)]`), with the limits a
/// real run is lowered to.
#[derive(Args, Clone, Debug)]
pub struct PlanArgs {
    /// Print the memory plan (every buffer, its size and how it is bound) for the
    /// limits of `--limits` instead of running: nothing is allocated.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: whose limits to plan for: `device` (the chosen one), `h200`,
    /// `webgpu` (a browser's defaults) or `lavapipe`; --max-binding-bytes and
    /// --max-buffer-bytes override parts of them.
    #[arg(long, default_value = "device", value_parser = ["device", "h200", "webgpu", "lavapipe"])]
    pub limits: String,
    #[command(flatten)]
    pub caps: LimitArgs,
}

impl PlanArgs {
    /// `--dry-run`: prints the plan `make` gives for the asked limits (text, or one
    /// JSON object with `json`).
    pub fn print<P: serde::Serialize + std::fmt::Display>(
        &self,
        backend: Option<Backend>,
        json: bool,
        make: impl FnOnce(&DeviceLimits) -> Result<P>,
    ) -> Result<()> {
        let p = make(&self.limits(backend)?)?;
        if json {
            println!("{}", serde_json::to_string(&p).expect("serializable"));
        } else {
            println!("{p}");
        }
        Ok(())
    }

    /// The limits to plan for.
    pub fn limits(&self, backend: Option<Backend>) -> Result<DeviceLimits> {
        let mut limits = match self.limits.as_str() {
            "h200" => DeviceLimits::H200,
            "webgpu" => DeviceLimits::WEBGPU_DEFAULT,
            "lavapipe" => DeviceLimits::LAVAPIPE,
            _ => DeviceLimits::of(context(backend, self.caps)?.capabilities()),
        };
        if let Some(b) = self.caps.max_binding_bytes {
            limits.max_binding = b;
        }
        if let Some(b) = self.caps.max_buffer_bytes {
            limits.max_buffer = b;
        }
        Ok(limits)
    }
}

/// Options from the environment with the command line's backend and limits.
pub fn options(backend: Option<Backend>, limits: LimitArgs) -> Result<ContextOptions> {
    let mut o = ContextOptions::from_env()?;
    if let Some(b) = backend {
        o.backend = b;
    }
    if limits.max_binding_bytes.is_some() {
        o.max_binding_bytes = limits.max_binding_bytes;
    }
    if limits.max_buffer_bytes.is_some() {
        o.max_buffer_bytes = limits.max_buffer_bytes;
    }
    Ok(o)
}

/// The context of a subcommand (the best device unless told otherwise).
pub fn context(backend: Option<Backend>, limits: LimitArgs) -> Result<Context> {
    Context::new_blocking(options(backend, limits)?)
}

/// The context of a subcommand whose default is `default` when neither `--backend` nor
/// `WGSPARSE_BACKEND` names one (the model commands run on the CPU by default).
pub fn context_or(backend: Option<Backend>, default: Backend) -> Result<Context> {
    let env_set = std::env::var("WGSPARSE_BACKEND").is_ok();
    context(
        backend.or((!env_set).then_some(default)),
        LimitArgs::default(),
    )
}

/// A GPU context for cross-checking a CPU run, if any GPU is there.
pub fn other_gpu(limits: LimitArgs) -> Option<Context> {
    let o = ContextOptions {
        require_gpu: true,
        ..options(Some(Backend::Auto), limits).ok()?
    };
    Context::new_blocking(o).ok()
}
