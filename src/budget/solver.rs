//! The layer-wise budget problem and its exact solution.
//!
//! Each item `l` (a layer, a head, an expert) has a cost `C_l > 0` at full size (its
//! parameters, FLOPs or attention pairs), a weight `w_l > 0` (1 for PreCrop's plain
//! form; a measured need otherwise) and bounds `lo_l ≤ p_l ≤ hi_l` on its keep ratio
//! (`hi_l > 1` widens the item: the "reconfigure" form). The problem
//!
//! ```text
//! maximize Σ_l w_l · log p_l   subject to   Σ_l p_l · C_l ≤ B,   lo_l ≤ p_l ≤ hi_l
//! ```
//!
//! is concave, and its KKT conditions give `p_l = clamp(w_l / (λ · C_l), lo_l, hi_l)`
//! for one multiplier `λ ≥ 0`: every item not at a bound gets the same weighted cost
//! `w_l / (p_l · C_l) = λ` (with equal weights: the same absolute *amount* kept, so
//! cheap items keep a larger fraction), clipped items hold at their bound, and λ is the
//! one where the budget is spent exactly (0 when even the upper bounds fit). [`solve`]
//! finds λ by bisection on a function that is continuous and nonincreasing in it.
//!
//! [`round`] turns ratios into whole units of each item (channels, key blocks) that
//! are multiples of a hardware granule, within the bounds and the budget: every item is
//! rounded down, then the leftover budget buys granules greedily by marginal gain per
//! cost (`w_l · log((k + m) / k)` per `m · C_l / S_l`).

use serde::Serialize;

use crate::error::{Error, Result};

/// One item of a budget problem.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BudgetItem {
    /// Cost at keep ratio 1 (parameters, FLOPs, pairs); > 0.
    pub cost: f64,
    /// Weight of its `log p` in the objective; > 0.
    pub weight: f64,
    /// Smallest keep ratio, ≥ 0.
    pub min: f64,
    /// Largest keep ratio, ≥ `min` and > 0 (1: no widening).
    pub max: f64,
}

impl BudgetItem {
    /// An item of `cost` with weight 1 and ratio bounds (0, 1].
    pub fn new(cost: f64) -> Self {
        BudgetItem {
            cost,
            weight: 1.0,
            min: 0.0,
            max: 1.0,
        }
    }

    fn ratio(&self, lambda: f64) -> f64 {
        if lambda <= 0.0 {
            return self.max;
        }
        (self.weight / (lambda * self.cost)).clamp(self.min, self.max)
    }
}

/// The solution of the continuous problem.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    /// Keep ratio per item.
    pub ratios: Vec<f64>,
    /// The multiplier λ (0: the budget does not bind).
    pub lambda: f64,
    /// `Σ p_l · C_l`.
    pub cost: f64,
    /// `Σ w_l · log p_l`.
    pub objective: f64,
}

/// Checks the items and the budget: typed errors for non-positive or non-finite costs
/// and weights, bounds out of order, and a budget below what the lower bounds cost.
fn check(items: &[BudgetItem], budget: f64) -> Result<()> {
    if items.is_empty() {
        return Err(Error::InvalidArgument("a budget over no items".into()));
    }
    for (i, it) in items.iter().enumerate() {
        let ok = it.cost.is_finite()
            && it.cost > 0.0
            && it.weight.is_finite()
            && it.weight > 0.0
            && it.min.is_finite()
            && it.max.is_finite()
            && it.min >= 0.0
            && it.max > 0.0
            && it.min <= it.max;
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "budget item {i}: {it:?} (cost and weight > 0, 0 ≤ min ≤ max, max > 0)"
            )));
        }
    }
    let floor: f64 = items.iter().map(|it| it.min * it.cost).sum();
    if !budget.is_finite() || budget <= 0.0 || budget < floor * (1.0 - 1e-12) {
        return Err(Error::InvalidArgument(format!(
            "budget {budget} is below the {floor} the items' lower bounds cost (or not positive)"
        )));
    }
    Ok(())
}

fn allocation(items: &[BudgetItem], lambda: f64) -> Allocation {
    let ratios: Vec<f64> = items.iter().map(|it| it.ratio(lambda)).collect();
    let cost = items.iter().zip(&ratios).map(|(it, p)| p * it.cost).sum();
    let objective = items
        .iter()
        .zip(&ratios)
        .map(|(it, p)| it.weight * p.ln())
        .sum();
    Allocation {
        ratios,
        lambda,
        cost,
        objective,
    }
}

/// The exact solution of the weighted, bounded problem for `budget` (see the module
/// docs). A budget at least the items' cost at their upper bounds keeps every item at
/// its upper bound (λ = 0).
pub fn solve(items: &[BudgetItem], budget: f64) -> Result<Allocation> {
    check(items, budget)?;
    let spend = |lambda: f64| -> f64 { items.iter().map(|it| it.ratio(lambda) * it.cost).sum() };
    if spend(0.0) <= budget {
        return Ok(allocation(items, 0.0));
    }
    // Every item is at its upper bound below min_l w_l / (max_l C_l) and at its lower
    // bound above max_l w_l / (min_l C_l) (or arbitrarily small when min_l = 0):
    // bracket λ geometrically, then bisect in log space.
    let mut lo = items
        .iter()
        .map(|it| it.weight / (it.max * it.cost))
        .fold(f64::INFINITY, f64::min);
    let mut hi = lo.max(f64::MIN_POSITIVE) * 2.0;
    while spend(hi) > budget {
        hi *= 2.0;
        if !hi.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "budget {budget} cannot be met by these items"
            )));
        }
    }
    for _ in 0..200 {
        let mid = (lo * hi).sqrt();
        if mid <= lo || mid >= hi {
            break;
        }
        if spend(mid) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // `hi` spends at most the budget.
    Ok(allocation(items, hi))
}

/// Ratios rounded to whole units.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundedAllocation {
    /// Units kept per item (a multiple of its granule, within its bounds).
    pub kept: Vec<usize>,
    /// The ratios they make (`kept / size`).
    pub ratios: Vec<f64>,
    /// `Σ ratio_l · C_l`.
    pub cost: f64,
    /// `Σ w_l · log ratio_l`.
    pub objective: f64,
}

/// Rounds `alloc` (from [`solve`] on `items` and `budget`) to units: item `l` has
/// `sizes[l]` units at ratio 1 (channels, key blocks) and keeps a multiple of
/// `multiple` of them (at least one granule, at most `max · size` rounded down), for a
/// total cost within `budget`. Typed errors: a size of 0, a granule of 0, or a budget
/// that one granule per item already exceeds.
pub fn round(
    items: &[BudgetItem],
    budget: f64,
    alloc: &Allocation,
    sizes: &[usize],
    multiple: usize,
) -> Result<RoundedAllocation> {
    check(items, budget)?;
    if sizes.len() != items.len() || alloc.ratios.len() != items.len() {
        return Err(Error::Mismatch(format!(
            "{} items, {} sizes, {} ratios",
            items.len(),
            sizes.len(),
            alloc.ratios.len()
        )));
    }
    if multiple == 0 || sizes.contains(&0) {
        return Err(Error::InvalidArgument(
            "sizes and the rounding multiple must be positive".into(),
        ));
    }
    let m = multiple;
    // Per item: the fewest and most units allowed, as multiples of m.
    let bounds: Vec<(usize, usize)> = items
        .iter()
        .zip(sizes)
        .map(|(it, &s)| {
            let lo = ((it.min * s as f64 - 1e-9).ceil().max(1.0) as usize).div_ceil(m) * m;
            let hi = ((it.max * s as f64 + 1e-9).floor() as usize) / m * m;
            (lo, hi.max(lo))
        })
        .collect();
    let unit_cost = |l: usize| items[l].cost / sizes[l] as f64;
    let mut kept: Vec<usize> = alloc
        .ratios
        .iter()
        .zip(sizes)
        .zip(&bounds)
        .map(|((p, &s), &(lo, hi))| {
            (((p * s as f64 + 1e-9).floor() as usize) / m * m).clamp(lo, hi)
        })
        .collect();
    let cost_of = |kept: &[usize]| -> f64 {
        kept.iter()
            .enumerate()
            .map(|(l, &k)| k as f64 * unit_cost(l))
            .sum()
    };
    let floor_cost: f64 = bounds
        .iter()
        .enumerate()
        .map(|(l, b)| b.0 as f64 * unit_cost(l))
        .sum();
    if floor_cost > budget * (1.0 + 1e-12) {
        return Err(Error::InvalidArgument(format!(
            "one granule of {m} units per item costs {floor_cost}, over the budget {budget}"
        )));
    }
    // Over budget after clamping up to the granule: give back granules of the items
    // that lose the least per cost saved.
    let mut spent = cost_of(&kept);
    while spent > budget * (1.0 + 1e-12) {
        let l = (0..kept.len())
            .filter(|&l| kept[l] >= bounds[l].0 + m)
            .min_by(|&a, &b| {
                let loss = |l: usize| {
                    items[l].weight * (kept[l] as f64 / (kept[l] - m) as f64).ln()
                        / (m as f64 * unit_cost(l))
                };
                loss(a).total_cmp(&loss(b))
            })
            .expect("the lower bounds fit the budget");
        kept[l] -= m;
        spent -= m as f64 * unit_cost(l);
    }
    // Spend what is left on the granules of largest gain per cost.
    loop {
        let best = (0..kept.len())
            .filter(|&l| {
                kept[l] + m <= bounds[l].1
                    && spent + m as f64 * unit_cost(l) <= budget * (1.0 + 1e-12)
            })
            .max_by(|&a, &b| {
                let gain = |l: usize| {
                    items[l].weight * ((kept[l] + m) as f64 / kept[l] as f64).ln()
                        / (m as f64 * unit_cost(l))
                };
                gain(a).total_cmp(&gain(b))
            });
        match best {
            Some(l) => {
                kept[l] += m;
                spent += m as f64 * unit_cost(l);
            }
            None => break,
        }
    }
    let ratios: Vec<f64> = kept
        .iter()
        .zip(sizes)
        .map(|(&k, &s)| k as f64 / s as f64)
        .collect();
    let objective = items
        .iter()
        .zip(&ratios)
        .map(|(it, p)| it.weight * p.ln())
        .sum();
    Ok(RoundedAllocation {
        kept,
        ratios,
        cost: spent,
        objective,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn items_strategy() -> impl Strategy<Value = Vec<BudgetItem>> {
        prop::collection::vec(
            (1.0f64..1000.0, 0.2f64..5.0, 0.0f64..0.3, 0.5f64..2.0),
            1..12,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(cost, weight, min, max)| BudgetItem {
                    cost,
                    weight,
                    min,
                    max,
                })
                .collect()
        })
    }

    proptest! {
        /// The KKT conditions: the budget is spent (or λ = 0 with every item at its
        /// upper bound), free items share w/(p·C) = λ, clipped ones sit on the side of
        /// λ their bound implies.
        #[test]
        fn solutions_meet_the_kkt_conditions(items in items_strategy(), frac in 0.05f64..1.5) {
            let floor: f64 = items.iter().map(|it| it.min * it.cost).sum();
            let top: f64 = items.iter().map(|it| it.max * it.cost).sum();
            let budget = floor + (top - floor) * frac + 1e-9;
            let a = solve(&items, budget).unwrap();
            prop_assert!(a.cost <= budget * (1.0 + 1e-9));
            if a.lambda == 0.0 {
                prop_assert!(top <= budget);
            } else {
                prop_assert!((a.cost - budget).abs() <= 1e-6 * budget);
                for (it, &p) in items.iter().zip(&a.ratios) {
                    let g = it.weight / (p * it.cost);
                    if p > it.min * (1.0 + 1e-9) && p < it.max * (1.0 - 1e-9) {
                        prop_assert!((g - a.lambda).abs() <= 1e-6 * a.lambda, "{g} vs {}", a.lambda);
                    } else if p >= it.max * (1.0 - 1e-9) {
                        prop_assert!(g >= a.lambda * (1.0 - 1e-6));
                    } else {
                        prop_assert!(g <= a.lambda * (1.0 + 1e-6));
                    }
                }
            }
        }

        /// Rounding keeps multiples within the bounds and the budget, leaves no granule
        /// that would still fit, and — unless lower bounds rounded up to a granule force
        /// other items below their rounded-down ratios — loses at most one granule's
        /// log-gain per item against the continuous optimum.
        #[test]
        fn rounding_is_feasible_and_close(items in items_strategy(), frac in 0.2f64..1.0) {
            let sizes: Vec<usize> = items.iter().enumerate().map(|(i, _)| 64 + 64 * (i % 5)).collect();
            let m = 8;
            let top: f64 = items.iter().map(|it| it.max * it.cost).sum();
            let floor: f64 = items.iter().zip(&sizes).map(|(it, &s)| {
                let lo = ((it.min * s as f64).ceil().max(1.0) as usize).div_ceil(m) * m;
                lo as f64 * it.cost / s as f64
            }).sum();
            let budget = floor + (top - floor).max(0.0) * frac + 1e-9;
            let a = solve(&items, budget).unwrap();
            let r = round(&items, budget, &a, &sizes, m).unwrap();
            prop_assert!(r.cost <= budget * (1.0 + 1e-9));
            let mut slack = 0.0;
            // The cost of every item rounded down to a granule, lower bounds rounded up.
            let mut forced = 0.0;
            for (((it, &k), &s), &p) in items.iter().zip(&r.kept).zip(&sizes).zip(&a.ratios) {
                prop_assert_eq!(k % m, 0);
                prop_assert!(k >= m && k as f64 <= it.max * s as f64 + 1e-9);
                prop_assert!(k as f64 >= it.min * s as f64 - 1e-9);
                slack += it.weight * ((k + m) as f64 / k as f64).ln();
                let unit = it.cost / s as f64;
                // Maximal: one more granule breaks the budget or the upper bound.
                prop_assert!(
                    (k + m) as f64 > it.max * s as f64 + 1e-9
                        || r.cost + m as f64 * unit > budget * (1.0 + 1e-12),
                    "a granule of item with cost {} still fits", it.cost
                );
                let lo = ((it.min * s as f64 - 1e-9).ceil().max(1.0) as usize).div_ceil(m) * m;
                let down = (((p * s as f64 + 1e-9).floor() as usize) / m * m).max(lo);
                forced += down as f64 * unit;
            }
            if forced <= budget * (1.0 + 1e-12) {
                prop_assert!(r.objective >= a.objective - slack, "{} vs {}", r.objective, a.objective);
            }
        }
    }

    /// Against brute force: a fine grid over two and three items never beats the
    /// solver, and the solver's objective is the grid's best within the grid's step.
    #[test]
    fn brute_force_agrees_on_small_problems() {
        let cases = [
            (vec![(100.0, 1.0), (300.0, 1.0)], 150.0),
            (vec![(100.0, 2.0), (300.0, 1.0)], 200.0),
            (vec![(50.0, 1.0), (200.0, 0.5), (400.0, 3.0)], 300.0),
        ];
        for (spec, budget) in cases {
            let items: Vec<BudgetItem> = spec
                .iter()
                .map(|&(cost, weight)| BudgetItem {
                    weight,
                    ..BudgetItem::new(cost)
                })
                .collect();
            let a = solve(&items, budget).unwrap();
            let n = 400usize;
            let mut best = f64::NEG_INFINITY;
            let grid = |i: usize| (i + 1) as f64 / n as f64;
            let eval = |ps: &[f64]| -> Option<f64> {
                let cost: f64 = items.iter().zip(ps).map(|(it, p)| p * it.cost).sum();
                (cost <= budget)
                    .then(|| items.iter().zip(ps).map(|(it, p)| it.weight * p.ln()).sum())
            };
            for i in 0..n {
                for j in 0..n {
                    if items.len() == 2 {
                        if let Some(v) = eval(&[grid(i), grid(j)]) {
                            best = best.max(v);
                        }
                    } else {
                        // The third ratio spends what is left (the optimum spends it all).
                        let used = grid(i) * items[0].cost + grid(j) * items[1].cost;
                        let p3 = ((budget - used) / items[2].cost).min(1.0);
                        if p3 > 0.0
                            && let Some(v) = eval(&[grid(i), grid(j), p3])
                        {
                            best = best.max(v);
                        }
                    }
                }
            }
            assert!(
                best <= a.objective + 1e-9,
                "grid {best} beats the solver {}",
                a.objective
            );
            assert!(
                best >= a.objective - 0.02,
                "grid {best}, solver {}",
                a.objective
            );
        }
        // Equal weights, no bound active: every item keeps the same amount, B / n.
        let items = [
            BudgetItem::new(100.0),
            BudgetItem::new(300.0),
            BudgetItem::new(600.0),
        ];
        let a = solve(&items, 300.0).unwrap();
        for (it, p) in items.iter().zip(&a.ratios) {
            assert!((p * it.cost - 100.0).abs() < 1e-6, "{p}");
        }
        // Clipped at 1: the cheap item is whole, the rest share what is left.
        let a = solve(&items, 700.0).unwrap();
        assert!((a.ratios[0] - 1.0).abs() < 1e-12);
        assert!(
            (a.ratios[1] * 300.0 - 300.0).abs() < 1e-6
                && (a.ratios[2] * 600.0 - 300.0).abs() < 1e-6
        );
        // Widening (the reconfigure form): max > 1 lets a cheap item grow past 1.
        let wide = [
            BudgetItem {
                max: 3.0,
                ..BudgetItem::new(100.0)
            },
            BudgetItem::new(300.0),
        ];
        let a = solve(&wide, 500.0).unwrap();
        assert!(a.ratios[0] > 1.0 && (a.cost - 500.0).abs() < 1e-6);
    }

    #[test]
    fn bad_problems_are_typed_errors() {
        let ok = BudgetItem::new(10.0);
        assert!(solve(&[], 1.0).is_err());
        assert!(solve(&[BudgetItem { cost: 0.0, ..ok }], 1.0).is_err());
        assert!(solve(&[BudgetItem { cost: -1.0, ..ok }], 1.0).is_err());
        assert!(solve(&[BudgetItem { weight: 0.0, ..ok }], 1.0).is_err());
        assert!(
            solve(
                &[BudgetItem {
                    min: 0.8,
                    max: 0.5,
                    ..ok
                }],
                10.0
            )
            .is_err()
        );
        assert!(
            solve(&[BudgetItem { min: 0.5, ..ok }], 4.0).is_err(),
            "below the floor"
        );
        assert!(solve(&[ok], f64::NAN).is_err());
        let a = solve(&[ok], 5.0).unwrap();
        assert!(round(&[ok], 5.0, &a, &[0], 8).is_err());
        assert!(round(&[ok], 5.0, &a, &[64], 0).is_err());
        assert!(round(&[ok, ok], 5.0, &a, &[64, 64], 8).is_err());
        // One granule of 32 of 64 units costs 5 of 10: a budget of 4 cannot hold it.
        let a = solve(&[ok], 4.0).unwrap();
        assert!(round(&[ok], 4.0, &a, &[64], 32).is_err());
    }
}
