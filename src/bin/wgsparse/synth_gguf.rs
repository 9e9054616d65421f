//! `wgsparse synth-gguf`: a GGUF with a real model's shapes and random weights.

use std::io::BufWriter;
use std::path::PathBuf;

use clap::Args;
use wgsparse::model::synth::{SynthArch, default_preset, preset, write_synth};
use wgsparse::quant::GgmlType;
use wgsparse::{Error, Result};

#[derive(Args, Clone)]
pub struct SynthArgs {
    /// Architecture: qwen2, llama or smallthinker.
    #[arg(long)]
    arch: SynthArch,
    /// Shapes (default per architecture: qwen2.5-1.5b, llama-3.1-8b,
    /// smallthinker-4b-a0.6b; also qwen2.5-7b, smollm2-135m, smallthinker-21b-a3b and a
    /// tiny-<arch> one for tests).
    #[arg(long)]
    preset: Option<String>,
    /// Weight type: q4_0, q8_0 or f16.
    #[arg(long = "type", default_value = "q4_0")]
    ty: String,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `wgsparse synth-gguf`.
pub fn run(a: &SynthArgs) -> Result<()> {
    let cfg = preset(a.preset.as_deref().unwrap_or(default_preset(a.arch)))?;
    if cfg.arch != a.arch {
        return Err(Error::InvalidArgument(format!(
            "preset `{}` is a {} model, not {}",
            cfg.name,
            cfg.arch.name(),
            a.arch.name()
        )));
    }
    let ty = match a.ty.as_str() {
        "q4_0" => GgmlType::Q4_0,
        "q8_0" => GgmlType::Q8_0,
        "f16" => GgmlType::F16,
        o => {
            return Err(Error::InvalidArgument(format!(
                "--type {o}: q4_0, q8_0 or f16"
            )));
        }
    };
    let mut out = BufWriter::new(std::fs::File::create(&a.out)?);
    let report = write_synth(&cfg, ty, a.seed, &mut out)?;
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!("wrote {}: {report}", a.out.display());
    }
    Ok(())
}
