//! `wgsparse budget`: per-head attention budgets on a real model and text.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::attention::budgets::{Allocation, HeadBudgets, allocate, head_needs};
use wgsparse::model::decoder::LayerQkv;
use wgsparse::{AttentionShape, Error, Method, Result};

use crate::eval::eval_layers;
use crate::model::*;

/// `wgsparse budget`.
#[derive(Args, Clone)]
pub struct BudgetArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A UTF-8 calibration text (measure on one text, evaluate on another).
    #[arg(long)]
    text: PathBuf,
    /// Tokens from the start of the text (BOS included when the model wants one).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Target density: the mean budget over every head of the measured layers, as a
    /// fraction of dense attention (0.2 = 20 %).
    #[arg(long)]
    attention: f64,
    /// Coverage γ of the per-block oracle that measures each head's need.
    #[arg(long, default_value_t = 0.95)]
    coverage: f64,
    /// Key block size in rows (ProxyAttn's block).
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// How the target is shared: solver (by measured need) or uniform.
    #[arg(long, default_value = "solver")]
    allocation: Allocation,
    /// Layers: comma-separated indices or `all` (every global attention layer).
    #[arg(long, default_value = "all")]
    layers: String,
    /// Output budgets file (JSON), read by `--method proxy|sale --budgets FILE`.
    #[arg(long)]
    out: PathBuf,
    /// Print the file's summary as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Measures each head's need on the model's real Q/K over the text and writes the
/// allocated budgets.
pub fn run(a: &BudgetArgs) -> Result<()> {
    if !(a.coverage > 0.0 && a.coverage <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "--coverage {} not in (0, 1]",
            a.coverage
        )));
    }
    if a.block == 0 || a.tokens < a.block {
        return Err(Error::InvalidArgument(format!(
            "--tokens {} must hold at least one --block of {} rows",
            a.tokens, a.block
        )));
    }
    if !(a.attention > 0.0 && a.attention <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "--attention {} not in (0, 1]",
            a.attention
        )));
    }
    let m_args = ModelArgs {
        method: Method::Dense,
        thresholds: None,
        budgets: None,
        ..a.m.clone()
    };
    let (tok, dec) = load_decoder(&m_args)?;
    let layers = eval_layers(&a.layers, &dec.cfg.global)?;
    if layers.is_empty() {
        return Err(Error::InvalidArgument(
            "no global attention layer to budget".into(),
        ));
    }
    let (ids, text_name) = calibration_ids(&tok, &dec, &a.text, a.tokens)?;
    let c = dec.cfg.clone();
    let scale = dec.attention_scale();
    let t0 = Instant::now();
    let progress = crate::progress::Progress::new(layers.len() as u64, "budget", a.json);
    let mut needs = Vec::new();
    let mut cache = dec.new_cache();
    dec.forward(&ids, &mut cache, &mut |l: &LayerQkv<'_>| -> Result<()> {
        if layers.contains(&l.layer) {
            let shape = AttentionShape::new(c.n_head, c.n_kv_head, l.tokens, c.head_dim);
            let need = head_needs(&shape, scale, l.q, l.k, a.coverage, a.block)?;
            progress.step(&format!(
                "layer {:>2}: need mean {:.3} ({:.1} s)",
                l.layer,
                need.iter().sum::<f64>() / need.len() as f64,
                t0.elapsed().as_secs_f64()
            ));
            needs.push((l.layer, need));
        }
        Ok(())
    })?;
    progress.finish();
    let blocks = ids.len().div_ceil(a.block);
    let file = HeadBudgets {
        model: file_name(&a.m.model),
        text: text_name,
        tokens: ids.len(),
        coverage: a.coverage,
        target: a.attention,
        block: a.block,
        allocation: a.allocation,
        layers: allocate(&needs, blocks, a.attention, a.allocation)?,
    };
    file.save(&a.out)?;
    crate::report::emit(&file, a.json);
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
