//! `wgsparse`: the command-line front end (the crate's main job).
//!
//! - `wgsparse` with no arguments: a short demo of dense attention at a few lengths on
//!   the best device.
//! - `wgsparse info [--json]`: adapters, chosen backend, features, limits.
//! - `wgsparse attention --method dense ... [--check] [--json]`: one run on synthetic
//!   Q/K/V with per-stage times; `--check` compares with the other device.
//! - `wgsparse moe --tokens T --hidden H --experts E --top-k K --ffn F [--weights f16|q4_0]
//!   [--check] [--json]`: one MoE layer on synthetic data (see `cli_moe.rs`).
//! - `wgsparse layer --tokens T [--weights f16|q4_0] [--nope] [--window W [--sinks S]]
//!   [--check] [--json]`: one
//!   SmallThinker-4B decoder layer as one submission.
//! - `wgsparse shader [--list | NAME]`: prints the final WGSL of kernel variants.

mod attention;
mod bench_model;
mod budget;
mod calibrate;
mod chat;
mod crop;
mod demo;
mod device;
mod dump_qkv;
mod eval;
mod generate;
mod info;
mod layer;
mod model;
mod moe;
mod nll;
mod passkey;
mod progress;
mod report;
mod shader;
mod synth_gguf;
mod tune;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgsparse::Backend;

#[derive(Parser)]
#[command(
    name = "wgsparse",
    version,
    about = "Sparse long-context attention on any GPU (WGSL) and the CPU"
)]
struct Cli {
    /// CPU threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// List adapters, the chosen backend, features and limits.
    Info {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Backend to report as chosen (also WGSPARSE_BACKEND).
        #[arg(long)]
        backend: Option<Backend>,
    },
    /// Run attention on synthetic Q/K/V and print per-stage times.
    Attention(Box<attention::AttentionArgs>),
    /// Text generation with a GGUF model (llama, qwen2, gemma3, smallthinker).
    Generate(generate::GenerateArgs),
    /// Prefill and decode throughput, time to first token and peak memory of a GGUF
    /// model, per prompt length.
    BenchModel(bench_model::BenchModelArgs),
    /// Write a GGUF with a real model's shapes, random weights and a small tokenizer
    /// (benchmarks without downloads; llama.cpp reads it too).
    SynthGguf(synth_gguf::SynthArgs),
    /// Mean next-token negative log-likelihood of a model on the start of a text.
    Nll(nll::NllArgs),
    /// A conversation from stdin (one message per line), the KV cache kept across turns.
    Chat(chat::ChatArgs),
    /// Passkey retrieval at a long context, per prompt attention method.
    Passkey(passkey::PasskeyArgs),
    /// Remove whole FFN channels per layer at the budget solver's ratios (a smaller
    /// dense GGUF; PreCrop's structured cropping, no retraining).
    Crop(crop::CropArgs),
    /// Write real post-RoPE Q/K/V of chosen layers over a text as Q/K/V files.
    DumpQkv(dump_qkv::DumpArgs),
    /// Quality of attention methods on a real model: per layer and head, and end to end.
    Eval(eval::EvalArgs),
    /// Calibrate SALE's per-head thresholds on a real model and text.
    Calibrate(calibrate::CalibrateArgs),
    /// Per-head attention budgets under one global density, from each head's measured
    /// need on a real model and text (the budget solver), for `--method proxy|sale --budgets`.
    Budget(budget::BudgetArgs),
    /// Run one MoE layer (router, dispatch, experts, combine) on synthetic data.
    Moe(moe::MoeArgs),
    /// Run one SmallThinker-4B decoder layer (router, attention, MoE) on synthetic data.
    Layer(layer::LayerArgs),
    /// Time the attention kernel tilings this device can run and store the fastest in
    /// the tuning table.
    Tune(tune::TuneArgs),
    /// Print the final WGSL of kernel variants (after includes and defines).
    Shader {
        /// List the variants instead of printing one.
        #[arg(long)]
        list: bool,
        /// Variant label (as `--list` prints it) or index.
        name: Option<String>,
        /// Write every variant to this folder instead (`NNN.wgsl`, the `--list` index).
        #[arg(long)]
        dump: Option<std::path::PathBuf>,
    },
}

/// Gives the process a private runtime folder when it has none: Mesa's window-system
/// code, probed when the Vulkan and GL backends start (even headless), otherwise prints
/// "error: XDG_RUNTIME_DIR is invalid or not set" on every run. A folder of this user's
/// under the temporary directory, mode 0700, as the XDG spec asks.
fn quiet_window_system_probe() {
    let usable = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .is_some_and(|p| p.is_dir());
    if usable {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let dir = std::env::temp_dir().join(format!("wgsparse-runtime-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        let ours = std::fs::metadata(&dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o777 == 0o700);
        if ours {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

/// Output piped into a command that stops reading (`| head`) ends the program quietly,
/// as other command-line tools do, instead of a panic on the broken pipe.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    quiet_window_system_probe();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    .init();
    let cli = Cli::parse();
    // The main thread runs the models: make it one of the CPU pool's workers.
    if let Err(e) = wgsparse::runtime::threads::init_cpu_threads(cli.threads) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        None => demo::run(),
        Some(Command::Info { json, backend }) => info::run(json, backend),
        Some(Command::Attention(a)) => attention::run(&a),
        Some(Command::Moe(a)) => moe::run(&a),
        Some(Command::Layer(a)) => layer::run(&a),
        Some(Command::Shader { list, name, dump }) => shader::run(list, name, dump),
        Some(Command::Generate(a)) => generate::run(&a),
        Some(Command::Nll(a)) => nll::run(&a),
        Some(Command::Chat(a)) => chat::run(&a),
        Some(Command::Passkey(a)) => passkey::run(&a),
        Some(Command::Crop(a)) => crop::run(&a),
        Some(Command::BenchModel(a)) => bench_model::run(&a),
        Some(Command::SynthGguf(a)) => synth_gguf::run(&a),
        Some(Command::DumpQkv(a)) => dump_qkv::run(&a),
        Some(Command::Eval(a)) => eval::run(&a),
        Some(Command::Calibrate(a)) => calibrate::run(&a),
        Some(Command::Budget(a)) => budget::run(&a),
        Some(Command::Tune(a)) => tune::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
