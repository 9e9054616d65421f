//! Budgets: how much of a resource each layer (or head, or expert) keeps under a global
//! limit. [`solver`] allocates per-layer keep ratios `p_l` that maximize
//! `Σ w_l · log p_l` under `Σ p_l · C_l ≤ B` — the allocation PreCrop derives for
//! pruning at initialization, used here for attention density and channel cropping —
//! and rounds them to hardware multiples.

pub mod solver;

pub use solver::{Allocation, BudgetItem, RoundedAllocation, round, solve};
