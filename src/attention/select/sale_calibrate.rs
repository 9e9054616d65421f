//! SALE's per-head calibration (`docs/algorithms.md` §3) and the thresholds file.
//!
//! For each head, τ starts at 0.008 and halves until the head's summed absolute output
//! error against dense attention, `Σ_{i,c} |O_sale − O_dense|`, is below `budget · N`
//! (default budget 0.4); a head whose τ falls to 1e-4 or below gets τ = 0 (dense). Heads
//! are independent in SALE (each selects its own blocks against its own row state), so
//! all heads of a layer run together with a per-head τ vector and only the failing
//! heads halve: the same result as calibrating one head at a time, in ~7 runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::sale::SaleConfig;
use crate::attention::{AttentionShape, Method, upload_qkv};
use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::tensor::DType;

/// First τ of the halving loop.
pub const TAU_START: f32 = 0.008;
/// At or below this τ a head becomes dense (τ = 0).
pub const TAU_FLOOR: f32 = 1e-4;
/// Default error budget per row.
pub const DEFAULT_BUDGET: f64 = 0.4;

/// Per-head τ of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerThresholds {
    /// Layer index in the model.
    pub layer: usize,
    /// τ per q head (0 = dense).
    pub tau: Vec<f32>,
    /// The calibration's final error per head, `Σ|ΔO| / N`.
    pub error_per_row: Vec<f64>,
}

/// What `wgsparse calibrate` writes and `--thresholds FILE` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaleThresholds {
    /// Always "sale".
    pub method: String,
    /// Model file name the thresholds were calibrated on.
    pub model: String,
    /// Calibration text file name.
    pub text: String,
    /// Tokens of calibration text.
    pub tokens: usize,
    /// Error budget per row.
    pub budget: f64,
    /// Estimation bits used while calibrating.
    pub bits: u32,
    /// Local window used while calibrating.
    pub local: usize,
    /// Layers, in model order (only the layers whose attention SALE runs).
    pub layers: Vec<LayerThresholds>,
}

impl SaleThresholds {
    /// Reads a thresholds file (JSON). Errors say what is wrong.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |m: String| crate::json_file::bad_file(path, m);
        let t: SaleThresholds = crate::json_file::load(path)?;
        if t.method != "sale" {
            return Err(bad(format!("method `{}` is not sale", t.method)));
        }
        if let Some(x) = t
            .layers
            .iter()
            .flat_map(|l| &l.tau)
            .find(|x| !(x.is_finite() && **x >= 0.0))
        {
            return Err(bad(format!("tau {x} is not finite and >= 0")));
        }
        Ok(t)
    }

    /// Writes the file (pretty JSON).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::json_file::save(path.as_ref(), self)
    }

    /// The per-head τ of `layer`, if calibrated.
    pub fn layer(&self, layer: usize) -> Option<&[f32]> {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .map(|l| l.tau.as_slice())
    }

    /// The SALE configuration of `layer`: `base` with that layer's per-head τ.
    pub fn config_for(&self, base: &SaleConfig, layer: usize) -> Result<SaleConfig> {
        let tau = self.layer(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the thresholds file has no layer {layer} (it has {:?})",
                self.layers.iter().map(|l| l.layer).collect::<Vec<_>>()
            ))
        })?;
        Ok(SaleConfig {
            head_tau: Some(tau.to_vec()),
            ..base.clone()
        })
    }

    /// Every calibrated layer's method: SALE `base` with that layer's per-head τ (what a
    /// decoder's per-layer methods take; uncalibrated layers keep the decoder's method).
    pub fn methods(&self, base: &SaleConfig) -> Vec<(usize, crate::attention::Method)> {
        self.layers
            .iter()
            .map(|l| {
                let cfg = SaleConfig {
                    head_tau: Some(l.tau.clone()),
                    ..base.clone()
                };
                (l.layer, crate::attention::Method::Sale(cfg))
            })
            .collect()
    }
}

/// Result of calibrating one attention.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// τ per q head.
    pub tau: Vec<f32>,
    /// Final `Σ|ΔO| / N` per head.
    pub error_per_row: Vec<f64>,
    /// SALE runs it took.
    pub runs: usize,
}

/// Calibrates per-head τ on one attention (host Q/K/V of `shape`, f32) on `ctx`: the
/// halving loop of `docs/algorithms.md` §3 against dense attention on the same device.
pub fn calibrate(
    ctx: &Context,
    shape: AttentionShape,
    base: &SaleConfig,
    budget: f64,
    scale: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> Result<Calibration> {
    if !(budget.is_finite() && budget > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "calibration budget {budget} must be finite and positive"
        )));
    }
    let (qt, kt, vt) = upload_qkv(ctx, &shape, q, k, v, DType::F32)?;
    let run = |method: Method| -> Result<Vec<f32>> {
        let plan = ctx.attention(shape).method(method).scale(scale).build()?;
        plan.run(&qt, &kt, &vt)?.to_f32_blocking()
    };
    let dense = run(Method::Dense)?;
    let (h, n, d) = (shape.q_heads, shape.seq_len, shape.head_dim);
    let mut tau = vec![TAU_START; h];
    let mut done = vec![false; h];
    let mut error = vec![0.0; h];
    let mut runs = 0;
    while done.iter().any(|x| !x) {
        let cfg = SaleConfig {
            head_tau: Some(tau.clone()),
            ..base.clone()
        };
        let out = run(Method::Sale(cfg))?;
        runs += 1;
        for hh in 0..h {
            if done[hh] {
                continue;
            }
            let range = hh * n * d..(hh + 1) * n * d;
            let err: f64 = out[range.clone()]
                .iter()
                .zip(&dense[range])
                .map(|(a, b)| (a - b).abs() as f64)
                .sum();
            error[hh] = err / n as f64;
            if err < budget * n as f64 {
                done[hh] = true;
            } else {
                tau[hh] *= 0.5;
                if tau[hh] <= TAU_FLOOR {
                    tau[hh] = 0.0;
                    error[hh] = 0.0;
                    done[hh] = true;
                }
            }
        }
    }
    Ok(Calibration {
        tau,
        error_per_row: error,
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> SaleThresholds {
        SaleThresholds {
            method: "sale".into(),
            model: "m.gguf".into(),
            text: "t.txt".into(),
            tokens: 4096,
            budget: 0.01,
            bits: 4,
            local: 128,
            layers: (0..3)
                .map(|l| LayerThresholds {
                    layer: l,
                    tau: vec![0.004, 0.0, 0.02],
                    error_per_row: vec![0.01, 0.0, 0.005],
                })
                .collect(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random byte changes and truncations of a valid thresholds file: `load` returns
        /// the file or a typed error naming it, never panics; whatever loads has only
        /// finite, non-negative τ.
        #[test]
        fn mutated_thresholds_files_never_panic(
            edits in proptest::collection::vec((0usize..2000, any::<u8>()), 1..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            case in 0u64..u64::MAX,
        ) {
            let path = std::env::temp_dir()
                .join(format!("wgsparse-thresholds-fuzz-{}-{case}.json", std::process::id()));
            sample().save(&path).unwrap();
            let b = crate::runtime::test_util::mutated(std::fs::read(&path).unwrap(), &edits, cut);
            std::fs::write(&path, &b).unwrap();
            let r = SaleThresholds::load(&path);
            std::fs::remove_file(&path).ok();
            match r {
                Ok(t) => prop_assert!(t.layers.iter().flat_map(|l| &l.tau).all(|x| x.is_finite() && *x >= 0.0)),
                Err(e) => prop_assert!(matches!(e, Error::BadFile { .. }), "{e}"),
            }
        }
    }
}
