//! What every measuring subcommand shares: the timed-run loop (warm-up, median GPU time
//! and host wall clock), the cross-check figures, and printing a report — its `Display`
//! for people, or exactly one JSON object (and nothing else on stdout) with `--json`.

use std::fmt;

use serde::Serialize;
use wgsparse::Result;
use wgsparse::attention::metrics::ErrorStats;
use wgsparse::runtime::StageTime;

/// Prints `report`: one JSON object with `json`, else its `Display`.
pub fn emit<R: Serialize + fmt::Display>(report: &R, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("reports serialize")
        );
    } else {
        print!("{report}");
    }
}

/// Medians of timed runs and every run's result.
pub struct Timed<R> {
    /// Median of `ms_of` over the runs.
    pub ms: f64,
    /// Median host wall clock of a run, in milliseconds.
    pub wall_ms: f64,
    /// Each run's result, in order.
    pub runs: Vec<R>,
}

/// Runs `run(i)` for `i` in `0..iters` (at least once; the caller warms up first) and
/// takes the medians.
pub fn timed<R>(
    iters: usize,
    ms_of: impl Fn(&R) -> f64,
    mut run: impl FnMut(usize) -> Result<R>,
) -> Result<Timed<R>> {
    let mut runs = Vec::new();
    let mut walls = Vec::new();
    for i in 0..iters.max(1) {
        let t0 = std::time::Instant::now();
        runs.push(run(i)?);
        walls.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut times: Vec<f64> = runs.iter().map(ms_of).collect();
    Ok(Timed {
        ms: median(&mut times),
        wall_ms: median(&mut walls),
        runs,
    })
}

fn median(x: &mut [f64]) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// Output errors against a second computation of the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Largest absolute difference.
    pub max_abs_err: f64,
    /// ‖a − b‖₂ / ‖b‖₂.
    pub rel_l2_err: f64,
    /// What it was compared with.
    pub check_against: String,
}

impl Check {
    /// The errors of `stats` against `against`.
    pub fn new(stats: ErrorStats, against: impl Into<String>) -> Self {
        Check {
            max_abs_err: stats.max_abs_err,
            rel_l2_err: stats.rel_l2_err,
            check_against: against.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  check vs {}: max_abs_err {:.3e}, rel_l2_err {:.3e}",
            self.check_against, self.max_abs_err, self.rel_l2_err
        )
    }
}

/// The per-stage lines of a report (`width`: the stage-name column).
pub fn stage_lines(
    f: &mut fmt::Formatter<'_>,
    stages: &[StageTime],
    width: usize,
    dispatches: bool,
) -> fmt::Result {
    for s in stages {
        let ms = s.ms.map(|x| format!("{x:.3}")).unwrap_or("-".into());
        write!(f, "  stage {:<width$} {ms:>10} ms", s.name)?;
        if dispatches {
            let plural = if s.dispatches == 1 { "" } else { "es" };
            write!(f, "  ({} dispatch{plural})", s.dispatches)?;
        }
        if let Some(v) = &s.variant {
            write!(f, "  [{v}]")?;
        }
        writeln!(f)?;
    }
    Ok(())
}
