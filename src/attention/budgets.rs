//! Per-head attention budgets: how much of each head's causal attention a block-sparse
//! selector may compute, shared out under one global density by the budget solver
//! ([`crate::budget`]).
//!
//! A head's *need* is measured on calibration text: the density of its per-block oracle
//! at a coverage γ (the fewest key blocks of each query block holding γ of the block's
//! attention mass, as a fraction of the causal pairs; [`head_needs`]). The solver then
//! maximizes `Σ need_h · log β_h` subject to `mean(β_h) ≤ target` and
//! `1 / blocks ≤ β_h ≤ 1`: every head not at a bound gets a budget proportional to its
//! need (PreCrop's weighted allocation with equal costs — all heads of a prompt have
//! the same number of causal pairs), and budgets are rounded to whole key blocks of the
//! last query block. [`Allocation::Uniform`] gives every head the target instead, the
//! baseline the solver is compared with.
//!
//! [`HeadBudgets`] is the file `wgsparse budget` writes and `--budgets FILE` reads; the
//! block-sparse selectors run under it with fixed per-head budgets: ProxyAttn keeps
//! its top `⌈β_h · blocks⌉` proxy-scored key blocks ([`ProxyConfig::head_budget`])
//! instead of estimating a budget per prompt, and SALE keeps the key blocks of the
//! largest estimated attention scores up to `⌈β_h · causal blocks⌉` per query block
//! ([`SaleConfig::head_budget`]) instead of testing them against a threshold. Budgets
//! are fractions of the causal pairs, so one file serves both block sizes (ProxyAttn's
//! block must be the file's, as its need was measured in those blocks; SALE's 64 × 32
//! blocks only round the fractions more finely).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::AttentionShape;
use super::method::Method;
use super::select::oracle::oracle;
use super::select::proxy::ProxyConfig;
use super::select::sale::SaleConfig;
use crate::budget::{BudgetItem, round, solve};
use crate::error::{Error, Result};

/// How a global density is shared among heads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// The budget solver: budgets proportional to each head's measured need, within
    /// bounds.
    #[default]
    Solver,
    /// Every head gets the target density.
    Uniform,
}

impl FromStr for Allocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "solver" => Ok(Allocation::Solver),
            "uniform" => Ok(Allocation::Uniform),
            _ => Err(Error::InvalidArgument(format!(
                "allocation `{s}`: solver or uniform"
            ))),
        }
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Allocation::Solver => "solver",
            Allocation::Uniform => "uniform",
        })
    }
}

/// One layer's measured needs and allocated budgets, per query head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerBudgets {
    /// Layer index.
    pub layer: usize,
    /// Per-block oracle density of each head at the file's coverage.
    pub need: Vec<f64>,
    /// Budget fraction β of each head, in (0, 1].
    pub budget: Vec<f32>,
}

/// What `wgsparse budget` writes and `--budgets FILE` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadBudgets {
    /// Model file name the needs were measured on.
    pub model: String,
    /// Calibration text file name.
    pub text: String,
    /// Tokens of calibration text.
    pub tokens: usize,
    /// Coverage γ of the oracle that measured the needs.
    pub coverage: f64,
    /// Target mean budget over all heads of all layers in the file.
    pub target: f64,
    /// Key block size (rows) the budgets are counted in.
    pub block: usize,
    /// How the target was shared.
    pub allocation: Allocation,
    /// Layers, in model order (the global attention layers measured).
    pub layers: Vec<LayerBudgets>,
}

/// Each query head's need: its per-block oracle density at coverage `coverage` with
/// `block × block` blocks, from the head's own Q and its key head's K (causal prefill,
/// `kv_len == seq_len`).
pub fn head_needs(
    shape: &AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    coverage: f64,
    block: usize,
) -> Result<Vec<f64>> {
    let (n, d) = (shape.seq_len, shape.head_dim);
    if q.len() != shape.q_heads * n * d || k.len() != shape.kv_heads * n * d {
        return Err(Error::Mismatch(format!(
            "head needs: Q has {} and K {} values for {shape:?}",
            q.len(),
            k.len()
        )));
    }
    let one = AttentionShape::new(1, 1, n, d);
    let group = shape.q_heads / shape.kv_heads.max(1);
    (0..shape.q_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let o = oracle(
                &one,
                scale,
                &q[h * n * d..(h + 1) * n * d],
                &k[kvh * n * d..(kvh + 1) * n * d],
                coverage,
                block,
                block,
            )?;
            Ok(o.block_density)
        })
        .collect()
}

/// Shares `target` (a mean budget fraction in (0, 1]) among every head of `needs`
/// (`(layer, per-head need)`), each budget a whole number of the `blocks` key blocks
/// of the last query block: by the solver (proportional to need, see the module docs)
/// or uniformly. The mean of the rounded budgets is at most `target` (plus at most one
/// block per head where `target` is below one block).
pub fn allocate(
    needs: &[(usize, Vec<f64>)],
    blocks: usize,
    target: f64,
    allocation: Allocation,
) -> Result<Vec<LayerBudgets>> {
    if !(target > 0.0 && target <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "target density {target} not in (0, 1]"
        )));
    }
    if blocks == 0 || needs.is_empty() || needs.iter().any(|(_, n)| n.is_empty()) {
        return Err(Error::InvalidArgument(
            "budgets need at least one key block, layer and head".into(),
        ));
    }
    if let Some(x) = needs
        .iter()
        .flat_map(|(_, n)| n)
        .find(|x| !(x.is_finite() && **x > 0.0))
    {
        return Err(Error::InvalidArgument(format!(
            "head need {x} must be finite and > 0"
        )));
    }
    let heads: usize = needs.iter().map(|(_, n)| n.len()).sum();
    let lo = 1.0 / blocks as f64;
    let kept: Vec<usize> = match allocation {
        Allocation::Uniform => {
            // Whole blocks at or below the target, at least one.
            let k = ((target * blocks as f64 + 1e-9).floor() as usize).clamp(1, blocks);
            vec![k; heads]
        }
        Allocation::Solver => {
            let items: Vec<BudgetItem> = needs
                .iter()
                .flat_map(|(_, n)| n)
                .map(|&w| BudgetItem {
                    cost: 1.0,
                    weight: w,
                    min: lo,
                    max: 1.0,
                })
                .collect();
            let budget = (target * heads as f64).max(lo * heads as f64);
            let alloc = solve(&items, budget)?;
            round(&items, budget, &alloc, &vec![blocks; heads], 1)?.kept
        }
    };
    let mut it = kept.into_iter();
    Ok(needs
        .iter()
        .map(|(layer, n)| LayerBudgets {
            layer: *layer,
            need: n.clone(),
            budget: it
                .by_ref()
                .take(n.len())
                .map(|k| (k as f64 / blocks as f64) as f32)
                .collect(),
        })
        .collect())
}

impl HeadBudgets {
    /// Checks what a file must hold: budgets in (0, 1], as many as needs, a block of
    /// at least one row, no layer twice. Errors say what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("budgets: {m}")));
        if self.block == 0 {
            return bad("block 0".into());
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.layers {
            if !seen.insert(l.layer) {
                return bad(format!("layer {} twice", l.layer));
            }
            if l.budget.is_empty() || l.budget.len() != l.need.len() {
                return bad(format!(
                    "layer {}: {} budgets for {} needs",
                    l.layer,
                    l.budget.len(),
                    l.need.len()
                ));
            }
            if let Some(x) = l.budget.iter().find(|x| !(**x > 0.0 && **x <= 1.0)) {
                return bad(format!("layer {}: budget {x} not in (0, 1]", l.layer));
            }
        }
        Ok(())
    }

    /// Reads a budgets file (JSON). Errors say what is wrong.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let b: HeadBudgets = crate::json_file::load(path)?;
        b.validate()
            .map_err(|e| crate::json_file::bad_file(path, e))?;
        Ok(b)
    }

    /// Writes the file (pretty JSON).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::json_file::save(path.as_ref(), self)
    }

    /// The per-head budgets of `layer`, if the file has it.
    pub fn layer(&self, layer: usize) -> Option<&[f32]> {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .map(|l| l.budget.as_slice())
    }

    /// Mean budget over every head of every layer.
    pub fn mean_budget(&self) -> f64 {
        let (s, n) = self
            .layers
            .iter()
            .flat_map(|l| &l.budget)
            .fold((0.0, 0usize), |(s, n), &b| (s + b as f64, n + 1));
        s / n.max(1) as f64
    }

    /// ProxyAttn `base` with `layer`'s fixed per-head budgets (key blocks of the file's
    /// block size); a typed error for a layer not in the file or another block size.
    pub fn proxy_for(&self, base: &ProxyConfig, layer: usize) -> Result<ProxyConfig> {
        if base.block != self.block {
            return Err(Error::InvalidArgument(format!(
                "the budgets were counted in {}-row blocks, proxy runs {}-row blocks",
                self.block, base.block
            )));
        }
        Ok(ProxyConfig {
            head_budget: Some(self.layer_budgets(layer)?.to_vec()),
            ..base.clone()
        })
    }

    /// SALE `base` with `layer`'s per-head budgets (which replace its thresholds); a
    /// typed error for a layer not in the file.
    pub fn sale_for(&self, base: &SaleConfig, layer: usize) -> Result<SaleConfig> {
        Ok(SaleConfig {
            head_budget: Some(self.layer_budgets(layer)?.to_vec()),
            head_tau: None,
            ..base.clone()
        })
    }

    /// `method` under `layer`'s budgets: ProxyAttn or SALE, the block-sparse selectors
    /// that run under per-head budgets.
    pub fn method_for(&self, method: &Method, layer: usize) -> Result<Method> {
        match method {
            Method::Proxy(base) => Ok(Method::Proxy(self.proxy_for(base, layer)?)),
            Method::Sale(base) => Ok(Method::Sale(self.sale_for(base, layer)?)),
            m => Err(Error::InvalidArgument(format!(
                "per-head budgets run ProxyAttn or SALE (--method proxy|sale), not {}",
                m.name()
            ))),
        }
    }

    /// Every layer's method under these budgets (what a decoder's per-layer methods
    /// take; layers not in the file keep the decoder's method): `method` must be
    /// ProxyAttn or SALE.
    pub fn methods(&self, method: &Method) -> Result<Vec<(usize, Method)>> {
        self.layers
            .iter()
            .map(|l| Ok((l.layer, self.method_for(method, l.layer)?)))
            .collect()
    }

    /// `layer`'s budgets, or a typed error naming the file's layers.
    pub fn layer_budgets(&self, layer: usize) -> Result<&[f32]> {
        self.layer(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the budgets file has no layer {layer} (it has {:?})",
                self.layers.iter().map(|l| l.layer).collect::<Vec<_>>()
            ))
        })
    }
}

impl fmt::Display for HeadBudgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} budgets of {} heads in {} layers: mean {:.3} (target {:.3}), {}-row blocks, needs at coverage {} over {} tokens of {}",
            self.allocation,
            self.layers.iter().map(|l| l.budget.len()).sum::<usize>(),
            self.layers.len(),
            self.mean_budget(),
            self.target,
            self.block,
            self.coverage,
            self.tokens,
            self.text
        )?;
        for l in &self.layers {
            let need = l.need.iter().sum::<f64>() / l.need.len().max(1) as f64;
            let (lo, hi) = l
                .budget
                .iter()
                .fold((f32::INFINITY, 0.0f32), |(a, b), &x| (a.min(x), b.max(x)));
            let mean = l.budget.iter().map(|&x| x as f64).sum::<f64>() / l.budget.len() as f64;
            writeln!(
                f,
                "  layer {:>3}: need mean {need:.3}, budget mean {mean:.3} (min {lo:.3}, max {hi:.3})",
                l.layer
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs() -> Vec<(usize, Vec<f64>)> {
        vec![(0, vec![0.05, 0.1, 0.4]), (3, vec![0.2, 0.02, 0.9])]
    }

    #[test]
    fn the_solver_follows_need_within_the_target() {
        let blocks = 64;
        for target in [0.05, 0.1, 0.2, 0.35, 0.6] {
            let l = allocate(&needs(), blocks, target, Allocation::Solver).unwrap();
            let b: Vec<f64> = l
                .iter()
                .flat_map(|l| &l.budget)
                .map(|&x| x as f64)
                .collect();
            let n: Vec<f64> = needs().into_iter().flat_map(|(_, n)| n).collect();
            let mean = b.iter().sum::<f64>() / b.len() as f64;
            assert!(mean <= target + 1e-6, "target {target}: mean {mean}");
            assert!(
                mean >= target - 1.0 / blocks as f64,
                "target {target}: mean {mean}"
            );
            for (i, j) in (0..n.len()).flat_map(|i| (0..n.len()).map(move |j| (i, j))) {
                if n[i] > n[j] {
                    // More need never gets fewer blocks (beyond one block of rounding).
                    assert!(b[i] + 1.0 / blocks as f64 >= b[j], "{n:?} {b:?}");
                }
            }
            for &x in &b {
                assert!(x >= 1.0 / blocks as f64 - 1e-7 && x <= 1.0);
                // Whole key blocks.
                assert!(((x * blocks as f64) - (x * blocks as f64).round()).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn uniform_gives_every_head_the_target_in_whole_blocks() {
        let l = allocate(&needs(), 10, 0.35, Allocation::Uniform).unwrap();
        assert!(
            l.iter()
                .flat_map(|l| &l.budget)
                .all(|&b| (b - 0.3).abs() < 1e-6)
        );
        let l = allocate(&needs(), 10, 0.01, Allocation::Uniform).unwrap();
        assert!(
            l.iter()
                .flat_map(|l| &l.budget)
                .all(|&b| (b - 0.1).abs() < 1e-6)
        );
    }

    #[test]
    fn bad_budgets_are_typed_errors() {
        assert!(allocate(&needs(), 64, 0.0, Allocation::Solver).is_err());
        assert!(allocate(&needs(), 64, 1.5, Allocation::Solver).is_err());
        assert!(allocate(&needs(), 0, 0.2, Allocation::Solver).is_err());
        assert!(allocate(&[], 64, 0.2, Allocation::Solver).is_err());
        assert!(allocate(&[(0, vec![0.1, 0.0])], 64, 0.2, Allocation::Solver).is_err());
        assert!(allocate(&[(0, vec![f64::NAN])], 64, 0.2, Allocation::Solver).is_err());
        assert!("greedy".parse::<Allocation>().is_err());
        let file = HeadBudgets {
            model: "m".into(),
            text: "t".into(),
            tokens: 1024,
            coverage: 0.95,
            target: 0.2,
            block: 128,
            allocation: Allocation::Solver,
            layers: allocate(&needs(), 8, 0.2, Allocation::Solver).unwrap(),
        };
        file.validate().unwrap();
        let base = ProxyConfig::default();
        let m = file.methods(&Method::Proxy(base.clone())).unwrap();
        assert_eq!(m.len(), 2);
        // SALE under budgets: the layer's budgets replace calibrated thresholds.
        let sale = SaleConfig {
            head_tau: Some(vec![0.01; 8]),
            ..Default::default()
        };
        let m = file.methods(&Method::Sale(sale)).unwrap();
        let Method::Sale(s) = &m[1].1 else { panic!() };
        assert_eq!(s.head_budget.as_deref(), file.layer(m[1].0));
        assert_eq!(s.head_tau, None);
        assert!(file.methods(&Method::Dense).is_err());
        assert!(
            file.sale_for(&SaleConfig::default(), 1).is_err(),
            "layer not in the file"
        );
        assert!(file.proxy_for(&base, 1).is_err(), "layer not in the file");
        let other = ProxyConfig { block: 64, ..base };
        assert!(file.proxy_for(&other, 0).is_err(), "another block size");
        let mut broken = file.clone();
        broken.layers[1].budget[0] = 0.0;
        assert!(broken.validate().is_err());
        let mut broken = file.clone();
        broken.layers[1].budget.pop();
        assert!(broken.validate().is_err());
        let mut broken = file.clone();
        broken.layers[1].layer = 0;
        assert!(broken.validate().is_err());
        // Round trip through a file, and a truncated file is a typed error.
        let path =
            std::env::temp_dir().join(format!("wgsparse-budgets-{}.json", std::process::id()));
        file.save(&path).unwrap();
        assert_eq!(HeadBudgets::load(&path).unwrap(), file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            HeadBudgets::load(&path),
            Err(Error::BadFile { .. })
        ));
        std::fs::remove_file(&path).ok();
        assert!(file.to_string().contains("layer   3"));
    }

    #[test]
    fn needs_are_per_head_oracle_densities() {
        let shape = AttentionShape::new(4, 2, 200, 32);
        let (q, k, _) = crate::attention::synthetic::qkv_host(&shape, 7);
        let n = head_needs(&shape, 0.2, &q, &k, 0.9, 64).unwrap();
        assert_eq!(n.len(), 4);
        // Head 2's need is the oracle of head 2 and key head 1 alone.
        let one = AttentionShape::new(1, 1, 200, 32);
        let o = oracle(
            &one,
            0.2,
            &q[2 * 200 * 32..3 * 200 * 32],
            &k[200 * 32..],
            0.9,
            64,
            64,
        )
        .unwrap();
        assert_eq!(n[2], o.block_density);
        assert!(n.iter().all(|&x| x > 0.0 && x <= 1.0));
        assert!(head_needs(&shape, 0.2, &q[1..], &k, 0.9, 64).is_err());
    }
}
