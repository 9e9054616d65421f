//! Error metrics between an output and a reference (same length, f32).

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
}
