//! Budgets: how much of a resource each layer (or head, or expert) keeps under a global
//! limit. [`solver`] allocates per-layer keep ratios `p_l` that maximize
//! `Σ w_l · log p_l` under `Σ p_l · C_l ≤ B` — the allocation PreCrop derives for
//! pruning at initialization, used here for attention density and channel cropping —
//! and rounds them to hardware multiples.

pub mod solver;

pub use solver::{Allocation, BudgetItem, RoundedAllocation, round, solve};

/// The whole units a budget `fraction` of `count` units buys: `⌈fraction · count⌉`, a
/// product that is whole up to floating-point error (0.3 · 10) not rounded up past it.
/// The one rounding rule of per-head attention budgets (ProxyAttn's blocks, SALE's
/// blocks per query block, the top-k oracle's).
pub fn units_of(fraction: f32, count: usize) -> usize {
    (fraction as f64 * count as f64 - 1e-9).ceil().max(0.0) as usize
}
