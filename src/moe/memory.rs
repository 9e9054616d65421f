//! The memory plan of a MoE layer without a device (`wgsparse moe --dry-run`): every
//! buffer a [`super::MoePlan`] allocates on a GPU, its size and binding, checked against
//! a device's limits. Expert weights that do not fit one binding are streamed: the plan
//! (and the build, [`fitting_residency`]) keeps the most experts that fit on the device
//! and uploads the routed ones it misses ([`super::stream`]).

use std::fmt;

use serde::Serialize;

use super::dispatch::{DISPATCH_BLOCK, meta_words};
use super::stream::ExpertResidency;
use super::{MoeConfig, WeightFormat};
use crate::error::Result;
use crate::runtime::memory::{
    DeviceLimits, PlannedBuffer, mib, problems_of, write_buffers, write_verdict,
};

/// Where the expert weights of a plan live under `limits`: as asked when it fits;
/// resident weights whose buffer (all experts of one matrix) is over a binding are
/// streamed with the most experts a binding holds instead (at least `top_k`, else as
/// asked: the build then reports the buffer).
pub fn fitting_residency(
    cfg: &MoeConfig,
    format: WeightFormat,
    asked: ExpertResidency,
    limits: &DeviceLimits,
) -> ExpertResidency {
    let per = format.packed_bytes(cfg.ffn, cfg.hidden);
    let room = limits.max_binding.min(limits.max_buffer);
    let slots = ((room / per.max(1)) as usize).min(cfg.experts);
    match asked {
        ExpertResidency::Resident if per * cfg.experts as u64 > room && slots >= cfg.top_k => {
            ExpertResidency::Streamed { slots }
        }
        a => a,
    }
}

/// The memory plan of one MoE layer on one set of limits.
#[derive(Clone, Debug, Serialize)]
pub struct MoeMemoryPlan {
    /// The layer.
    pub config: MoeConfig,
    /// Tokens per run.
    pub tokens: usize,
    /// Weight format.
    pub weights: WeightFormat,
    /// Where the expert weights live ([`fitting_residency`] of the asked one).
    pub residency: ExpertResidency,
    /// The limits planned for.
    pub limits: DeviceLimits,
    /// Every buffer (the layer's input and output included).
    pub buffers: Vec<PlannedBuffer>,
    /// What does not fit (empty when the plan fits).
    pub problems: Vec<String>,
}

impl MoeMemoryPlan {
    /// Whether every buffer fits.
    pub fn fits(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The memory plan of a MoE layer of `cfg` over `tokens` tokens, its input and output
/// tensors included.
pub fn memory_plan(
    cfg: &MoeConfig,
    tokens: usize,
    format: WeightFormat,
    residency: ExpertResidency,
    limits: &DeviceLimits,
) -> Result<MoeMemoryPlan> {
    plan_with(cfg, tokens, format, residency, limits, true)
}

/// [`memory_plan`] without the input and output tensors: the MoE block of a decoder
/// layer, whose activations are the layer's.
pub fn block_memory_plan(
    cfg: &MoeConfig,
    tokens: usize,
    format: WeightFormat,
    residency: ExpertResidency,
    limits: &DeviceLimits,
) -> Result<MoeMemoryPlan> {
    plan_with(cfg, tokens, format, residency, limits, false)
}

fn plan_with(
    cfg: &MoeConfig,
    tokens: usize,
    format: WeightFormat,
    residency: ExpertResidency,
    limits: &DeviceLimits,
    io: bool,
) -> Result<MoeMemoryPlan> {
    cfg.validate()?;
    let residency = fitting_residency(cfg, format, residency, limits);
    let (t, e, h, f) = (
        tokens as u64,
        cfg.experts as u64,
        cfg.hidden as u64,
        cfg.ffn as u64,
    );
    let a = t * cfg.top_k as u64;
    let per = format.packed_bytes(cfg.ffn, cfg.hidden);
    let held = match residency {
        ExpertResidency::Resident => e,
        ExpertResidency::Streamed { slots } => slots as u64,
    };
    let whole = |name: &str, bytes: u64| PlannedBuffer::whole(name, bytes);
    let mut buffers = vec![];
    if io {
        buffers.extend([
            whole("input x (router, residual)", t * h * 4),
            whole("input z (experts)", t * h * 4),
            whole("output", t * h * 4),
        ]);
    }
    buffers.push(whole("moe router weights", e * h * 4));
    let what = match residency {
        ExpertResidency::Resident => "weights",
        ExpertResidency::Streamed { .. } => "weight slots",
    };
    for m in ["gate", "up", "down (transposed)"] {
        buffers.push(PlannedBuffer::whole(format!("moe {m} {what}"), held * per));
    }
    buffers.extend([
        whole("moe router logits", t * e * 4),
        whole("moe expert ids", a * 4),
        whole("moe expert weights", a * 4),
        whole(
            "moe block counts",
            a.div_ceil(DISPATCH_BLOCK as u64) * e * 4,
        ),
        whole("moe dispatch meta", meta_words(cfg.experts) as u64 * 4),
        whole("moe sorted assignments", a * 4),
        whole("moe inverse map", a * 4),
        whole("moe activations", a * f * 4),
        whole("moe expert outputs", a * h * 4),
        whole("moe expert slots", e * 4),
    ]);
    let mut problems = problems_of(&buffers, limits);
    // Token-sized buffers over a binding: how many tokens one plan can take.
    let per_token = [h * 4, e * 4, cfg.top_k as u64 * f.max(h) * 4];
    let most = per_token
        .iter()
        .map(|b| limits.max_binding.min(limits.max_buffer) / b)
        .min()
        .unwrap_or(0);
    if t > most {
        problems.push(format!(
            "tokens: at most {most} tokens per plan fit these limits (run longer inputs in chunks of tokens)"
        ));
    }
    Ok(MoeMemoryPlan {
        config: *cfg,
        tokens,
        weights: format,
        residency,
        limits: *limits,
        buffers,
        problems,
    })
}

impl fmt::Display for MoeMemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "moe plan: {} tokens, hidden {}, {} experts (top-{}) x ffn {}, {:?} weights, {}",
            self.tokens,
            c.hidden,
            c.experts,
            c.top_k,
            c.ffn,
            self.weights,
            match self.residency {
                ExpertResidency::Resident => "all experts resident".to_string(),
                ExpertResidency::Streamed { slots } => format!("{slots} expert slots (streamed)"),
            }
        )?;
        writeln!(
            f,
            "  limits: binding {}, buffer {}",
            mib(self.limits.max_binding),
            mib(self.limits.max_buffer)
        )?;
        write_buffers(f, &self.buffers)?;
        let total: u64 = self.buffers.iter().map(|b| b.bytes).sum();
        writeln!(f, "  device memory: {}", mib(total))?;
        write_verdict(f, &self.problems)
    }
}
