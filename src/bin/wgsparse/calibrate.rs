//! `wgsparse calibrate`: SALE's per-head thresholds on a real model and text.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use wgsparse::attention::select::sale::SaleConfig;
use wgsparse::attention::select::sale_calibrate::{
    DEFAULT_BUDGET, LayerThresholds, SaleThresholds, calibrate as calibrate_layer,
};
use wgsparse::model::decoder::LayerQkv;
use wgsparse::{AttentionShape, Error, Method, Result};

use crate::eval::eval_layers;
use crate::model::*;

/// `wgsparse calibrate`.
#[derive(Args, Clone)]
pub struct CalibrateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A UTF-8 text file (calibrate on one text, evaluate on another).
    #[arg(long)]
    text: PathBuf,
    /// Tokens from the start of the text (BOS included when the model wants one).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Error budget: a head's τ halves until `Σ|O_sale − O_dense| < budget · N`.
    #[arg(long, default_value_t = DEFAULT_BUDGET)]
    budget: f64,
    /// Estimation bits, 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Layers to calibrate: comma-separated indices or `all` (every global attention
    /// layer).
    #[arg(long, default_value = "all")]
    layers: String,
    /// Output thresholds file (JSON), read by `--method sale --thresholds FILE`.
    #[arg(long)]
    out: PathBuf,
}

/// Per-head SALE thresholds on a model's real Q/K/V over a text (`docs/algorithms.md` §3).
pub fn run(a: &CalibrateArgs) -> Result<()> {
    if !matches!(a.m.method, Method::Sale(_)) {
        return Err(Error::InvalidArgument(
            "calibrate supports --method sale".into(),
        ));
    }
    let base = SaleConfig {
        bits: a.bits,
        ..SaleConfig::default()
    };
    base.validate()?;
    let m_args = ModelArgs {
        method: Method::Dense,
        ..a.m.clone()
    };
    let (tok, dec) = load_decoder(&m_args)?;
    let layers = eval_layers(&a.layers, &dec.cfg.global)?;
    let (ids, text_name) = calibration_ids(&tok, &dec, &a.text, a.tokens)?;
    let c = dec.cfg.clone();
    let scale = dec.attention_scale();
    let ctx = dec.context().clone();
    let t0 = Instant::now();
    let progress = crate::progress::Progress::new(layers.len() as u64, "calibrate", false);
    let mut out = Vec::new();
    let mut cache = dec.new_cache();
    dec.forward(&ids, &mut cache, &mut |l: &LayerQkv<'_>| -> Result<()> {
        if layers.contains(&l.layer) {
            let shape = AttentionShape::new(c.n_head, c.n_kv_head, l.tokens, c.head_dim);
            let cal = calibrate_layer(&ctx, shape, &base, a.budget, scale, (l.q, l.k, l.v))?;
            progress.step(&format!(
                "layer {:>2}: tau {:?} ({} runs, {:.1} s)",
                l.layer,
                cal.tau,
                cal.runs,
                t0.elapsed().as_secs_f64()
            ));
            out.push(LayerThresholds {
                layer: l.layer,
                tau: cal.tau,
                error_per_row: cal.error_per_row,
            });
        }
        Ok(())
    })?;
    progress.finish();
    let file = SaleThresholds {
        method: "sale".into(),
        model: file_name(&a.m.model),
        text: text_name,
        tokens: a.tokens,
        budget: a.budget,
        bits: a.bits,
        local: base.local,
        layers: out,
    };
    file.save(&a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
