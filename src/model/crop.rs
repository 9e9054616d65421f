//! Structured cropping of a GGUF model's feed-forward channels (PreCrop's idea for
//! inference): each layer keeps a whole number of FFN channels (intermediate neurons:
//! rows of gate and up, columns of down; for MoE layers the same count in every expert),
//! so the cropped model is a smaller dense model that the same kernels run at full
//! speed — unlike an unstructured mask of the same size, which a dense kernel computes
//! anyway.
//!
//! How many channels each layer keeps comes from the budget solver
//! ([`crate::budget::solve`]): maximize `Σ w_l · log p_l` subject to
//! `fixed + Σ p_l · C_l ≤ keep · total`, where `C_l` is layer `l`'s FFN cost (parameters
//! or FLOPs per token, [`CropBy`]), `fixed` everything that is not cropped (attention,
//! embeddings, norms), `w_l = 1` (PreCrop's objective; equal layers then keep equal
//! ratios) or the layer's share of the channel magnitude ([`LayerWeights::Magnitude`]),
//! rounded to multiples of 32 channels. Channels go in groups of the down matrix's
//! quantization block (32 consecutive channels for Q4_0/Q4_1/Q5_0/Q8_0, 256 for the
//! K-quants, single channels for float types): down's rows run along the channels, so
//! whole blocks can be copied and the cropped model is exactly the original with the
//! other channels removed — no requantization, no new rounding error. Which groups stay:
//! the largest data-free magnitude scores (`Σ_j ‖gate_j‖ · ‖up_j‖ · ‖down_{:,j}‖` over the
//! group) for a pretrained model, or the first ones by index (PreCrop's setting at
//! initialization, where only the ratios matter). Nothing is retrained: a cropped
//! pretrained model loses quality, and the NLL (`wgsparse nll`) measures how much.
//!
//! The cropped file keeps every other tensor and the metadata as they were, gate and up
//! rows and down blocks copied as stored; the per-layer widths go into the
//! `feed_forward_length` metadata as an array, as llama.cpp reads per-layer
//! hyper-parameters.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::str::FromStr;

use serde::Serialize;

use crate::budget::{BudgetItem, round, solve};
use crate::error::{Error, Result};
use crate::model::decoder::{Arch, Config};
use crate::model::gguf::{Gguf, GgufWriter, MetaValue};

/// What the budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CropBy {
    /// Parameters (an MoE layer counts every expert).
    Params,
    /// Multiply-adds per token (an MoE layer counts its chosen experts; the logits'
    /// matrix counts, the embedding lookup does not).
    Flops,
}

impl FromStr for CropBy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "params" => Ok(CropBy::Params),
            "flops" => Ok(CropBy::Flops),
            o => Err(Error::InvalidArgument(format!(
                "crop by `{o}`: params or flops"
            ))),
        }
    }
}

/// How the channels of a layer are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelScore {
    /// The largest `‖gate_j‖ · ‖up_j‖ · ‖down_{:,j}‖` (pretrained weights, data-free).
    Magnitude,
    /// The first channels by index (only the ratios matter: models trained after
    /// cropping).
    None,
}

impl FromStr for ChannelScore {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "magnitude" => Ok(ChannelScore::Magnitude),
            "none" => Ok(ChannelScore::None),
            o => Err(Error::InvalidArgument(format!(
                "channel score `{o}`: magnitude or none"
            ))),
        }
    }
}

/// The solver's weight of each layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerWeights {
    /// 1 for every layer (PreCrop).
    Uniform,
    /// The layer's total channel score over the mean layer's: layers whose channels
    /// carry more magnitude keep more of them.
    Magnitude,
}

impl FromStr for LayerWeights {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(LayerWeights::Uniform),
            "magnitude" => Ok(LayerWeights::Magnitude),
            o => Err(Error::InvalidArgument(format!(
                "layer weights `{o}`: uniform or magnitude"
            ))),
        }
    }
}

/// What to crop and how.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CropOptions {
    /// Fraction of the whole model's cost (parameters or FLOPs) to keep, in (0, 1].
    pub keep: f64,
    /// What the budget counts.
    pub by: CropBy,
    /// How channels are chosen.
    pub score: ChannelScore,
    /// The solver's layer weights.
    pub weights: LayerWeights,
    /// Channels are kept in multiples of this, raised to the down matrices' block width
    /// where that is larger.
    pub multiple: usize,
}

impl Default for CropOptions {
    fn default() -> Self {
        CropOptions {
            keep: 0.9,
            by: CropBy::Params,
            score: ChannelScore::Magnitude,
            weights: LayerWeights::Uniform,
            multiple: 32,
        }
    }
}

/// One layer's crop.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerCrop {
    /// Layer index.
    pub layer: usize,
    /// Channels before.
    pub ffn: usize,
    /// Channels kept.
    pub kept: usize,
    /// The solver's continuous keep ratio (before rounding).
    pub ratio: f64,
    /// The layer's FFN cost at ratio 1.
    pub cost: f64,
    /// Its weight in the objective.
    pub weight: f64,
}

/// The crop of a model: per layer the channels kept (per expert for MoE layers).
#[derive(Clone, Debug, Serialize)]
pub struct CropPlan {
    /// The options.
    pub options: CropOptions,
    /// The whole model's cost at ratio 1.
    pub total_cost: f64,
    /// The part that is not cropped.
    pub fixed_cost: f64,
    /// `keep · total_cost`.
    pub budget: f64,
    /// The cropped model's cost.
    pub cost: f64,
    /// Per layer.
    pub layers: Vec<LayerCrop>,
    /// Channels kept in groups of this (the down matrices' block width).
    pub multiple: usize,
    /// Kept channel indices, ascending, whole groups: `[layer][expert]` (one expert for
    /// dense FFNs).
    #[serde(skip)]
    pub channels: Vec<Vec<Vec<usize>>>,
}

impl fmt::Display for CropPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "crop: keep {:.3} of the model's {:?} ({:.4e} of {:.4e}; fixed part {:.4e}); \
             channels by {:?}, layer weights {:?}, multiples of {}",
            self.cost / self.total_cost,
            o.by,
            self.cost,
            self.total_cost,
            self.fixed_cost,
            o.score,
            o.weights,
            self.multiple
        )?;
        writeln!(f, "| layer | FFN | kept | ratio | solver ratio | weight |")?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|")?;
        for l in &self.layers {
            writeln!(
                f,
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} |",
                l.layer,
                l.ffn,
                l.kept,
                l.kept as f64 / l.ffn as f64,
                l.ratio,
                l.weight
            )?;
        }
        Ok(())
    }
}

/// The FFN tensor names of layer `l`: gate, up, down (MoE: the expert tensors).
fn ffn_names(cfg: &Config, l: usize) -> [String; 3] {
    let e = if cfg.experts > 0 { "_exps" } else { "" };
    ["gate", "up", "down"].map(|m| format!("blk.{l}.ffn_{m}{e}.weight"))
}

/// Every FFN tensor's name → (layer, 0 gate / 1 up / 2 down).
fn ffn_roles(cfg: &Config) -> HashMap<String, (usize, usize)> {
    (0..cfg.n_layer)
        .flat_map(|l| {
            ffn_names(cfg, l)
                .into_iter()
                .enumerate()
                .map(move |(which, n)| (n, (l, which)))
        })
        .collect()
}

/// Σ of the squares of each row of a `[rows, cols]` matrix.
fn row_norms2(w: &[f32], cols: usize) -> Vec<f64> {
    w.chunks_exact(cols)
        .map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect()
}

/// Per expert, each channel's magnitude score `‖gate_j‖ · ‖up_j‖ · ‖down_{:,j}‖`.
fn channel_scores(g: &Gguf, cfg: &Config, l: usize) -> Result<Vec<Vec<f64>>> {
    let (f, d, e) = (cfg.ffn_dims[l], cfg.d_model, cfg.experts.max(1));
    let [gn, un, dn] = ffn_names(cfg, l);
    let gate = row_norms2(&g.tensor_f32(&gn)?, d);
    let up = row_norms2(&g.tensor_f32(&un)?, d);
    let down = g.tensor_f32(&dn)?;
    if gate.len() != e * f || up.len() != e * f || down.len() != e * d * f {
        return Err(Error::Model(format!(
            "layer {l}: FFN shapes do not match {cfg:?}"
        )));
    }
    Ok((0..e)
        .map(|x| {
            let mut col = vec![0f64; f];
            for r in down[x * d * f..(x + 1) * d * f].chunks_exact(f) {
                col.iter_mut()
                    .zip(r)
                    .for_each(|(c, &v)| *c += (v as f64) * (v as f64));
            }
            (0..f)
                .map(|j| (gate[x * f + j] * up[x * f + j] * col[j]).sqrt())
                .collect()
        })
        .collect())
}

/// Plans the crop of `g` (llama, qwen2, gemma3 or smallthinker). Typed errors: `keep`
/// outside (0, 1], a budget below the fixed part plus one granule per layer, widths
/// that are not a multiple of `multiple`.
pub fn plan(g: &Gguf, opts: CropOptions) -> Result<CropPlan> {
    let cfg = Config::from_gguf(g)?;
    if !(opts.keep > 0.0 && opts.keep <= 1.0) || opts.multiple == 0 {
        return Err(Error::InvalidArgument(format!(
            "keep {} must be in (0, 1] and the multiple positive",
            opts.keep
        )));
    }
    // Channel groups: the down matrices' blocks.
    let mut groups = Vec::with_capacity(cfg.n_layer);
    for l in 0..cfg.n_layer {
        groups.push(g.tensor(&ffn_names(&cfg, l)[2])?.ty.block().0.max(1));
    }
    let lcm = |a: usize, b: usize| {
        let (mut x, mut y) = (a, b);
        while y != 0 {
            (x, y) = (y, x % y);
        }
        a / x * b
    };
    let multiple = groups.iter().fold(opts.multiple, |m, &gr| lcm(m, gr));
    if let Some(l) = (0..cfg.n_layer).find(|&l| !cfg.ffn_dims[l].is_multiple_of(multiple)) {
        return Err(Error::InvalidArgument(format!(
            "layer {l}'s {} channels are not a multiple of {multiple} (--multiple and the \
             down matrices' blocks)",
            cfg.ffn_dims[l]
        )));
    }
    // Per-token multiply-adds of a matrix = its parameters; MoE: the chosen experts.
    let active = match opts.by {
        CropBy::Params => cfg.experts.max(1) as f64,
        CropBy::Flops => cfg.top_k.max(1) as f64,
    };
    let costs: Vec<f64> = (0..cfg.n_layer)
        .map(|l| active * 3.0 * (cfg.d_model * cfg.ffn_dims[l]) as f64)
        .collect();
    let roles = ffn_roles(&cfg);
    let mut total = 0.0;
    for t in &g.tensors {
        let name = &t.name;
        if roles.contains_key(name) {
            continue;
        }
        total += match opts.by {
            CropBy::Params => t.numel() as f64,
            // Matrices only; the embedding is a lookup (unless it is also the logits').
            CropBy::Flops if t.dims.len() < 2 => 0.0,
            CropBy::Flops if name == "token_embd.weight" => {
                if g.has_tensor("output.weight") {
                    0.0
                } else {
                    t.numel() as f64
                }
            }
            CropBy::Flops => t.numel() as f64,
        };
    }
    let fixed = total;
    total += costs.iter().sum::<f64>();
    let budget = opts.keep * total - fixed;
    let scores: Vec<Vec<Vec<f64>>> = match (opts.score, opts.weights) {
        (ChannelScore::None, LayerWeights::Uniform) => Vec::new(),
        _ => (0..cfg.n_layer)
            .map(|l| channel_scores(g, &cfg, l))
            .collect::<Result<_>>()?,
    };
    let weights: Vec<f64> = match opts.weights {
        LayerWeights::Uniform => vec![1.0; cfg.n_layer],
        LayerWeights::Magnitude => {
            let mass: Vec<f64> = scores
                .iter()
                .map(|e| e.iter().flatten().sum::<f64>())
                .collect();
            let mean = mass.iter().sum::<f64>() / mass.len() as f64;
            mass.iter().map(|m| (m / mean).max(1e-6)).collect()
        }
    };
    let items: Vec<BudgetItem> = costs
        .iter()
        .zip(&weights)
        .zip(&cfg.ffn_dims)
        .map(|((&cost, &weight), &f)| BudgetItem {
            cost,
            weight,
            min: multiple as f64 / f as f64,
            max: 1.0,
        })
        .collect();
    if budget <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "keeping {} of {total:.4e} leaves nothing for the FFNs after the {fixed:.4e} \
             that is not cropped",
            opts.keep
        )));
    }
    let alloc = solve(&items, budget)?;
    let rounded = round(&items, budget, &alloc, &cfg.ffn_dims, multiple)?;
    let channels = (0..cfg.n_layer)
        .map(|l| {
            let gr = groups[l];
            let n = cfg.ffn_dims[l] / gr;
            (0..cfg.experts.max(1))
                .map(|x| {
                    let mut idx: Vec<usize> = (0..n).collect();
                    if opts.score == ChannelScore::Magnitude {
                        let s: Vec<f64> = scores[l][x]
                            .chunks_exact(gr)
                            .map(|c| c.iter().sum())
                            .collect();
                        // Largest first; equal scores keep the lower index.
                        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
                    }
                    let mut kept = idx[..rounded.kept[l] / gr].to_vec();
                    kept.sort_unstable();
                    kept.iter().flat_map(|&b| b * gr..(b + 1) * gr).collect()
                })
                .collect()
        })
        .collect();
    let layers = (0..cfg.n_layer)
        .map(|l| LayerCrop {
            layer: l,
            ffn: cfg.ffn_dims[l],
            kept: rounded.kept[l],
            ratio: alloc.ratios[l],
            cost: costs[l],
            weight: weights[l],
        })
        .collect();
    Ok(CropPlan {
        options: opts,
        total_cost: total,
        fixed_cost: fixed,
        budget: opts.keep * total,
        cost: fixed + rounded.cost,
        multiple,
        layers,
        channels,
    })
}

/// What [`write()`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct CropReport {
    /// The plan.
    #[serde(flatten)]
    pub plan: CropPlan,
    /// Bytes of the source file's tensors.
    pub tensor_bytes_in: u64,
    /// Bytes of the cropped file's tensors.
    pub tensor_bytes_out: u64,
    /// Bytes of the file written.
    pub file_bytes: u64,
}

impl fmt::Display for CropReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.plan)?;
        write!(
            f,
            "tensors {:.1} MiB → {:.1} MiB ({:.3}); file {:.1} MiB",
            self.tensor_bytes_in as f64 / (1 << 20) as f64,
            self.tensor_bytes_out as f64 / (1 << 20) as f64,
            self.tensor_bytes_out as f64 / self.tensor_bytes_in as f64,
            self.file_bytes as f64 / (1 << 20) as f64,
        )
    }
}

/// What [`write()`] does with the channels a plan drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Removes them: a smaller dense model.
    Remove,
    /// Keeps every shape and zeroes their gate and up rows (all-zero blocks decode to
    /// 0): the same function as [`CropMode::Remove`], at the full model's size and
    /// speed — what a mask gives a dense kernel.
    Mask,
}

/// Writes the model of `g` cropped by `plan` to `out`.
pub fn write(g: &Gguf, plan: CropPlan, out: &mut impl Write) -> Result<CropReport> {
    write_as(g, plan, CropMode::Remove, out)
}

/// [`write()`] with the dropped channels removed or masked.
pub fn write_as(
    g: &Gguf,
    plan: CropPlan,
    mode: CropMode,
    out: &mut impl Write,
) -> Result<CropReport> {
    let cfg = Config::from_gguf(g)?;
    if plan.channels.len() != cfg.n_layer {
        return Err(Error::Mismatch(format!(
            "a crop plan of {} layers for a model of {}",
            plan.channels.len(),
            cfg.n_layer
        )));
    }
    let moe = cfg.arch == Arch::SmallThinker;
    let ffn_key = format!(
        "{}.{}",
        g.str("general.architecture")?,
        if moe {
            "expert_feed_forward_length"
        } else {
            "feed_forward_length"
        }
    );
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        if k == "general.alignment" || *k == ffn_key {
            continue;
        }
        w.meta(k, MetaValue::from_value(k, v)?);
    }
    let kept: Vec<usize> = plan.layers.iter().map(|l| l.kept).collect();
    let widths = match mode {
        CropMode::Remove => &kept,
        CropMode::Mask => &cfg.ffn_dims,
    };
    w.meta(
        &ffn_key,
        MetaValue::I32s(widths.iter().map(|&k| k as i32).collect()),
    );
    // Per tensor: (layer, which: 0 gate, 1 up, 2 down) for the FFN tensors.
    let roles = ffn_roles(&cfg);
    let role: Vec<Option<(usize, usize)>> = g
        .tensors
        .iter()
        .map(|t| roles.get(&t.name).copied())
        .collect();
    for (t, r) in g.tensors.iter().zip(&role) {
        let mut dims = t.dims.clone();
        if let Some((l, which)) = *r {
            // Gate/up lose rows (dims[1]), down loses columns (dims[0]).
            dims[usize::from(which < 2)] = widths[l] as u64;
        }
        w.tensor(&t.name, &dims, t.ty)?;
    }
    let tensor_bytes_out: u64 = w.tensors().iter().map(|t| t.3).sum();
    let tensor_bytes_in: u64 = g
        .tensors
        .iter()
        .map(|t| t.ty.bytes_for(t.numel()))
        .sum::<Result<u64>>()?;
    let file_bytes = w.write(out, |i, buf| {
        let t = &g.tensors[i];
        let bytes = g.tensor_bytes(&t.name)?;
        let Some((l, which)) = role[i] else {
            buf.extend_from_slice(&bytes);
            return Ok(());
        };
        let experts = &plan.channels[l];
        let (f, d) = (cfg.ffn_dims[l], cfg.d_model);
        if mode == CropMode::Mask {
            buf.extend_from_slice(&bytes);
            if which < 2 {
                let rb = t.ty.bytes_for(d as u64)? as usize;
                for (x, ch) in experts.iter().enumerate() {
                    for j in (0..f).filter(|j| ch.binary_search(j).is_err()) {
                        buf[(x * f + j) * rb..(x * f + j + 1) * rb].fill(0);
                    }
                }
            }
        } else if which < 2 {
            // Rows of gate/up, in their blocks.
            let rb = t.ty.bytes_for(d as u64)? as usize;
            for (x, ch) in experts.iter().enumerate() {
                for &j in ch {
                    let r = (x * f + j) * rb;
                    buf.extend_from_slice(&bytes[r..r + rb]);
                }
            }
        } else {
            // Columns of down: the blocks of the kept channel groups, row by row.
            let (bw, bb) = t.ty.block();
            let rb = t.ty.bytes_for(f as u64)? as usize;
            for (x, ch) in experts.iter().enumerate() {
                for row in 0..d {
                    let r = (x * d + row) * rb;
                    for j in ch.iter().step_by(bw) {
                        let at = r + j / bw * bb;
                        buf.extend_from_slice(&bytes[at..at + bb]);
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(CropReport {
        plan,
        tensor_bytes_in,
        tensor_bytes_out,
        file_bytes,
    })
}
