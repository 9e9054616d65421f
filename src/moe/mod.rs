//! Mixture-of-experts layer (SmallThinker style): a router on the residual entering the
//! layer (top-k, sigmoid weights renormalized), a GPU dispatch into expert-contiguous
//! order, a grouped ReGLU expert FFN that skips neurons whose gate is ≤ 0, and a weighted
//! combine with the residual. Weights in f16 or ggml's Q4_0.
//!
//! Kernels live in `shaders/moe/`; each has a launcher here and a CPU twin in [`cpu`]
//! (the fallback and the test oracle). [`MoePlan`] strings them into one submission.
//!
//! ```no_run
//! use wgsparse::moe::{MoeConfig, MoeWeights, WeightFormat};
//! use wgsparse::{Context, ContextOptions, DType, Tensor};
//! let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
//! let cfg = MoeConfig::new(1536, 32, 4, 768);
//! let weights = MoeWeights::random(&cfg, 1);
//! let plan = ctx.moe(cfg).tokens(512).format(WeightFormat::Q4_0).build(&weights)?;
//! let x = wgsparse::attention::synthetic::tensor(&ctx, &[512, 1536], DType::F32, 2)?;
//! let out = plan.run(&x)?;
//! println!("{:?}", plan.report());
//! # Ok::<(), wgsparse::Error>(())
//! ```

pub mod combine;
pub mod cpu;
pub mod dispatch;
pub mod expert_ffn;
pub mod experts_ggml;
pub mod memory;
pub mod plan;
pub mod router;
pub mod stream;

use serde::Serialize;

use crate::error::{Error, Result};
pub use crate::quant::{PackedMatrix, WeightFormat};
pub use plan::{FfnPath, MoePlan, MoePlanBuilder, MoeReport};

/// Largest expert count the router and dispatch kernels take (one workgroup's threads).
pub const MAX_EXPERTS: usize = 256;
/// Largest top-k.
pub const MAX_TOP_K: usize = 8;

/// How the router turns the chosen logits into weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterScoring {
    /// `sigmoid(logit)` renormalized to sum 1 over the chosen experts (SmallThinker).
    #[default]
    Sigmoid,
    /// Softmax over the chosen logits (= full softmax renormalized over the top k).
    Softmax,
}

/// Sizes of one MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MoeConfig {
    /// Model width (a multiple of 32).
    pub hidden: usize,
    /// Experts (1..=256).
    pub experts: usize,
    /// Experts per token (1..=min(8, experts)).
    pub top_k: usize,
    /// Expert FFN width (a multiple of 16).
    pub ffn: usize,
    /// Router weighting.
    pub scoring: RouterScoring,
}

impl MoeConfig {
    /// A sigmoid-routed config.
    pub fn new(hidden: usize, experts: usize, top_k: usize, ffn: usize) -> Self {
        MoeConfig {
            hidden,
            experts,
            top_k,
            ffn,
            scoring: RouterScoring::Sigmoid,
        }
    }

    /// SmallThinker-4B-A0.6B: hidden 1536, 32 experts, top-4, width 768.
    pub fn smallthinker_4b() -> Self {
        Self::new(1536, 32, 4, 768)
    }

    /// Checks the sizes; a typed error says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidShape(m));
        if self.hidden == 0 || !self.hidden.is_multiple_of(32) {
            return bad(format!(
                "hidden {} must be a positive multiple of 32",
                self.hidden
            ));
        }
        if self.ffn == 0 || !self.ffn.is_multiple_of(16) {
            return bad(format!(
                "ffn {} must be a positive multiple of 16",
                self.ffn
            ));
        }
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return bad(format!(
                "experts {} must be in 1..={MAX_EXPERTS}",
                self.experts
            ));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K.min(self.experts) {
            return bad(format!(
                "top_k {} must be in 1..={}",
                self.top_k,
                MAX_TOP_K.min(self.experts)
            ));
        }
        let rows = self.experts as u64 * self.ffn as u64 * self.hidden as u64;
        if rows > u32::MAX as u64 {
            return bad(format!(
                "{rows} weights per matrix exceed the 32-bit index range"
            ));
        }
        Ok(())
    }

    /// FLOPs of the expert FFNs for `tokens` tokens without neuron skipping (three
    /// matmuls of 2 FLOPs per multiply-add per routed token).
    pub fn expert_flops(&self, tokens: usize) -> f64 {
        6.0 * (tokens * self.top_k) as f64 * self.ffn as f64 * self.hidden as f64
    }
}

/// Host weights of one MoE layer, f32 masters (row-major).
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// The sizes.
    pub config: MoeConfig,
    /// Router `[experts, hidden]` (kept f32).
    pub router: Vec<f32>,
    /// Gate projections `[experts, ffn, hidden]`.
    pub gate: Vec<f32>,
    /// Up projections `[experts, ffn, hidden]`.
    pub up: Vec<f32>,
    /// Down projections stored transposed, `[experts, ffn, hidden]` (row n = neuron n's
    /// down weights).
    pub down_t: Vec<f32>,
}

impl MoeWeights {
    /// Synthetic weights from `seed` (Gaussian, scaled 1/√fan-in): clearly not a model's.
    /// The router's weights are rounded to multiples of 1/256: with inputs on a grid
    /// too ([`grid_input`]), every router logit is an exact f32 sum on every device, so
    /// a GPU and the CPU pick the same experts and `--check` compares like with like.
    pub fn random(cfg: &MoeConfig, seed: u64) -> Self {
        let (e, f, h) = (cfg.experts, cfg.ffn, cfg.hidden);
        let scaled = |len: usize, seed: u64, s: f32| -> Vec<f32> {
            crate::attention::synthetic::gaussian_parallel(len, seed)
                .into_iter()
                .map(|v| v * s)
                .collect()
        };
        let sh = 1.0 / (h as f32).sqrt();
        MoeWeights {
            config: *cfg,
            router: scaled(e * h, seed ^ 0x11, sh)
                .into_iter()
                .map(|v| (v * 256.0).round() / 256.0)
                .collect(),
            gate: scaled(e * f * h, seed ^ 0x22, sh),
            up: scaled(e * f * h, seed ^ 0x33, sh),
            down_t: scaled(e * f * h, seed ^ 0x44, 1.0 / (f as f32).sqrt()),
        }
    }

    /// Makes a fraction `frac` of each expert's 16-neuron chunks "cold" (synthetic):
    /// their gate rows become 0, so `gate · z = 0` and those neurons never fire. Random
    /// Gaussian gates fire about half the time independently per token, which a tiled
    /// kernel can never skip; trained ReGLU experts have neurons that rarely fire, and
    /// this is a plain stand-in for them when measuring the prefill chunk skipping.
    /// Chunks are picked per expert from `seed`.
    pub fn with_cold_chunks(mut self, frac: f64, seed: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&frac) {
            return Err(Error::InvalidArgument(format!(
                "cold chunk fraction {frac} not in [0, 1]"
            )));
        }
        use rand::seq::SliceRandom;
        use rand::{SeedableRng, rngs::StdRng};
        let c = self.config;
        let chunks = c.ffn / expert_ffn::SKIP_CHUNK;
        let cold = (frac * chunks as f64).round() as usize;
        let mut rng = StdRng::seed_from_u64(seed);
        for e in 0..c.experts {
            let mut ids: Vec<usize> = (0..chunks).collect();
            ids.shuffle(&mut rng);
            for &ch in &ids[..cold] {
                let n0 = e * c.ffn + ch * expert_ffn::SKIP_CHUNK;
                self.gate[n0 * c.hidden..(n0 + expert_ffn::SKIP_CHUNK) * c.hidden].fill(0.0);
            }
        }
        Ok(self)
    }

    /// Checks the lengths against the config.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let c = &self.config;
        let m = c.experts * c.ffn * c.hidden;
        for (name, v, want) in [
            ("router", &self.router, c.experts * c.hidden),
            ("gate", &self.gate, m),
            ("up", &self.up, m),
            ("down_t", &self.down_t, m),
        ] {
            if v.len() != want {
                return Err(Error::Mismatch(format!(
                    "{name} has {} values, the config needs {want}",
                    v.len()
                )));
            }
        }
        Ok(())
    }

    /// Packs the expert matrices for the GPU (and the CPU twin, which reads the same
    /// decoded values).
    pub fn pack(&self, format: WeightFormat) -> Result<PackedExperts> {
        self.validate()?;
        let c = &self.config;
        let rows = c.experts * c.ffn;
        Ok(PackedExperts {
            config: *c,
            router: self.router.clone(),
            gate: PackedMatrix::pack(format, rows, c.hidden, &self.gate)?,
            up: PackedMatrix::pack(format, rows, c.hidden, &self.up)?,
            down_t: PackedMatrix::pack(format, rows, c.hidden, &self.down_t)?,
        })
    }
}

/// Synthetic activations `[tokens, hidden]` from `seed`: Gaussian values rounded to
/// multiples of 1/16 and clamped to ±4 (see [`MoeWeights::random`] for why).
pub fn grid_input(len: usize, seed: u64) -> Vec<f32> {
    crate::attention::synthetic::gaussian_parallel(len, seed)
        .into_iter()
        .map(|v| ((v * 16.0).round() / 16.0).clamp(-4.0, 4.0))
        .collect()
}

/// Every kernel variant of the MoE family (router, dispatch, expert FFN, combine), for
/// the shader dump and the portability tests.
pub fn all_moe_variants() -> Vec<crate::runtime::KernelSpec> {
    let mut v = router::all_router_variants();
    v.extend(dispatch::all_dispatch_variants());
    v.extend(expert_ffn::all_expert_ffn_variants());
    v.extend(experts_ggml::all_experts_ggml_variants());
    v.push(combine::combine_spec());
    v
}

/// Expert weights in their storage format.
#[derive(Clone, Debug)]
pub struct PackedExperts {
    /// The sizes.
    pub config: MoeConfig,
    /// Router `[experts, hidden]`, f32.
    pub router: Vec<f32>,
    /// Gate `[experts * ffn, hidden]`.
    pub gate: PackedMatrix,
    /// Up `[experts * ffn, hidden]`.
    pub up: PackedMatrix,
    /// Down, transposed: `[experts * ffn, hidden]`.
    pub down_t: PackedMatrix,
}

impl PackedExperts {
    /// The storage format.
    pub fn format(&self) -> WeightFormat {
        self.gate.format
    }

    /// Checks every matrix against the config: shape, format and word count (the
    /// kernels index the words without bounds checks, so a short buffer must never
    /// reach them).
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        if self.router.len() != c.experts * c.hidden {
            return Err(Error::Mismatch(format!(
                "router has {} values, the config needs {}",
                self.router.len(),
                c.experts * c.hidden
            )));
        }
        let rows = c.experts * c.ffn;
        for (name, m) in [
            ("gate", &self.gate),
            ("up", &self.up),
            ("down_t", &self.down_t),
        ] {
            let blocks = m.rows * m.cols / 32;
            let words = match m.format {
                WeightFormat::F16 => (m.rows * m.cols).div_ceil(2),
                WeightFormat::Q4_0 => 4 * blocks + blocks.div_ceil(2),
            };
            let scale_ok = match m.format {
                WeightFormat::F16 => true,
                WeightFormat::Q4_0 => m.scale_base as usize == 4 * blocks,
            };
            if m.rows != rows
                || m.cols != c.hidden
                || m.format != self.gate.format
                || m.words.len() != words
                || !scale_ok
            {
                return Err(Error::Mismatch(format!(
                    "{name} is a {} x {} {} matrix with {} words (scales at {}); the config \
                     needs {rows} x {} in one format with {words} words",
                    m.rows,
                    m.cols,
                    m.format.name(),
                    m.words.len(),
                    m.scale_base,
                    c.hidden
                )));
            }
        }
        Ok(())
    }
}
