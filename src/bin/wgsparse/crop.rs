//! `wgsparse crop`: a smaller dense model with whole FFN channels removed per layer at
//! the budget solver's ratios (PreCrop's structured cropping; no retraining).

use std::io::BufWriter;
use std::path::PathBuf;

use clap::Args;
use wgsparse::Result;
use wgsparse::model::crop::{
    ChannelScore, CropBy, CropMode, CropOptions, LayerWeights, plan, write_as,
};
use wgsparse::model::gguf::Gguf;

#[derive(Args, Clone)]
pub struct CropArgs {
    /// A GGUF file (llama, qwen2, gemma3 or smallthinker).
    #[arg(long)]
    model: PathBuf,
    /// Fraction of the whole model's cost to keep, in (0, 1]; only FFN channels are
    /// removed, so the FFNs keep less.
    #[arg(long, default_value_t = 0.9)]
    keep: f64,
    /// What the budget counts: params or flops (multiply-adds per token).
    #[arg(long, default_value = "params")]
    by: CropBy,
    /// Which channels stay: magnitude (‖gate_j‖·‖up_j‖·‖down_j‖, for pretrained weights)
    /// or none (the first ones: only the ratios matter).
    #[arg(long, default_value = "magnitude")]
    score: ChannelScore,
    /// The solver's layer weights: uniform (PreCrop) or magnitude (each layer's share of
    /// the channel magnitude).
    #[arg(long, default_value = "uniform")]
    weights: LayerWeights,
    /// Channels are kept in multiples of this (raised to the down matrices' block).
    #[arg(long, default_value_t = 32)]
    multiple: usize,
    /// Keep every shape and zero the dropped channels' gate and up rows instead (the
    /// same function at the full model's size and speed: what a mask gives a dense
    /// kernel).
    #[arg(long)]
    mask: bool,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `wgsparse crop`.
pub fn run(a: &CropArgs) -> Result<()> {
    let g = Gguf::open(&a.model)?;
    let opts = CropOptions {
        keep: a.keep,
        by: a.by,
        score: a.score,
        weights: a.weights,
        multiple: a.multiple,
    };
    let p = plan(&g, opts)?;
    let mut out = BufWriter::new(std::fs::File::create(&a.out)?);
    let mode = if a.mask {
        CropMode::Mask
    } else {
        CropMode::Remove
    };
    let report = write_as(&g, p, mode, &mut out)?;
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!("wrote {}:\n{report}", a.out.display());
    }
    Ok(())
}
