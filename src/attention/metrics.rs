//! Quality metrics of a sparse attention against dense attention on the same Q/K/V
//! (`docs/algorithms.md` §6; every reported number says which one it is):
//! - output error: max abs and relative L2 ([`compare`]);
//! - AnchorAttention's elementwise tolerance recall: the fraction of output elements
//!   within `t` of dense ([`tolerance_recall`], t = 0.01 and 0.005);
//! - attention-mass recall: the true softmax mass of the computed key set, averaged
//!   over rows and heads ([`mass_recall`], from the row states `(m, l)` of the sparse
//!   and the dense run: `l_S e^{m_S} / (l_D e^{m_D})` per row, exact).

use serde::Serialize;

/// Errors of `got` against `want`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ErrorStats {
    /// max |got - want| (NaN anywhere gives infinity, so poisoned outputs show).
    pub max_abs_err: f64,
    /// ‖got − want‖₂ / ‖want‖₂.
    pub rel_l2_err: f64,
}

/// Compares two equally long vectors.
pub fn compare(got: &[f32], want: &[f32]) -> ErrorStats {
    assert_eq!(got.len(), want.len(), "compare: lengths differ");
    let mut max_abs = 0.0f64;
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        max_abs = max_abs.max(d);
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    ErrorStats {
        max_abs_err: max_abs,
        rel_l2_err: if den > 0.0 {
            num.sqrt() / den.sqrt()
        } else {
            num.sqrt()
        },
    }
}

/// Fraction of elements with `|got − want| < t` (AnchorAttention's "recall"; NaN
/// counts as outside).
pub fn tolerance_recall(got: &[f32], want: &[f32], t: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "tolerance_recall: lengths differ");
    let inside = got
        .iter()
        .zip(want)
        .filter(|(g, w)| ((**g as f64) - (**w as f64)).abs() < t)
        .count();
    inside as f64 / got.len().max(1) as f64
}

/// Attention-mass recall from row states `[rows, 2]` of (m, l) (natural-log m): per row
/// the softmax mass of the sparse run's keys, `l_S e^{m_S − m_D} / l_D`, averaged over
/// rows. A row the sparse run gave no key counts 0.
pub fn mass_recall(ml_sparse: &[f32], ml_dense: &[f32]) -> f64 {
    assert_eq!(
        ml_sparse.len(),
        ml_dense.len(),
        "mass_recall: lengths differ"
    );
    let rows = ml_dense.len() / 2;
    let sum: f64 = (0..rows)
        .map(|r| {
            let (ms, ls) = (ml_sparse[2 * r] as f64, ml_sparse[2 * r + 1] as f64);
            let (md, ld) = (ml_dense[2 * r] as f64, ml_dense[2 * r + 1] as f64);
            if ls > 0.0 && ld > 0.0 {
                (ls * (ms - md).exp() / ld).min(1.0)
            } else {
                0.0
            }
        })
        .sum();
    sum / rows.max(1) as f64
}

/// Everything `--check` reports for a method against dense on the same inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Quality {
    /// Fraction of causal (q, k) pairs computed (the method's own accounting; for
    /// AnchorAttention the anchor region is included).
    pub density: f64,
    /// Attention-mass recall (mean over rows and heads).
    pub attn_recall: f64,
    /// Relative L2 error of the output vs dense.
    pub rel_l2_err: f64,
    /// Max abs error of the output vs dense.
    pub max_abs_err: f64,
    /// Fraction of output elements within 0.01 of dense.
    pub tol_recall_01: f64,
    /// Fraction of output elements within 0.005 of dense.
    pub tol_recall_005: f64,
}

impl Quality {
    /// Computes the metrics from outputs and row states of the two runs.
    pub fn measure(
        density: f64,
        out: &[f32],
        ml: &[f32],
        dense_out: &[f32],
        dense_ml: &[f32],
    ) -> Self {
        let e = compare(out, dense_out);
        Quality {
            density,
            attn_recall: mass_recall(ml, dense_ml),
            rel_l2_err: e.rel_l2_err,
            max_abs_err: e.max_abs_err,
            tol_recall_01: tolerance_recall(out, dense_out, 0.01),
            tol_recall_005: tolerance_recall(out, dense_out, 0.005),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_is_infinite_error() {
        let s = compare(&[1.0, f32::NAN], &[1.0, 2.0]);
        assert!(s.max_abs_err.is_infinite());
        let s = compare(&[3.0, 4.0], &[3.0, 4.0]);
        assert_eq!(s.max_abs_err, 0.0);
        assert_eq!(s.rel_l2_err, 0.0);
        let s = compare(&[0.0, 0.0], &[3.0, 4.0]);
        assert!((s.rel_l2_err - 1.0).abs() < 1e-12);
    }

    #[test]
    fn recalls() {
        assert_eq!(
            tolerance_recall(&[0.0, 0.02, f32::NAN], &[0.0; 3], 0.01),
            1.0 / 3.0
        );
        // Row 0: sparse saw half the mass (same max); row 1: all of it with another
        // max; row 2: nothing.
        let dense = [0.0, 2.0, 1.0, 3.0, 0.5, 1.0];
        let sparse = [0.0, 1.0, 2.0, 3.0 * (-1.0f32).exp(), -1e30, 0.0];
        let r = mass_recall(&sparse, &dense);
        assert!((r - (0.5 + 1.0 + 0.0) / 3.0).abs() < 1e-6, "{r}");
    }
}
