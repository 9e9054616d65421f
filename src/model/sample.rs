//! The next token from a step's logits: greedy, or drawn with a temperature, top-k and
//! top-p (nucleus) filtering from a seeded generator, so a seed replays a generation.

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::error::{Error, Result};

/// How [`Sampler`] chooses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 picks the largest logit (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` largest logits (0: all).
    pub top_k: usize,
    /// Keep the smallest set of the most likely tokens whose probability reaches `top_p`
    /// (1: all).
    pub top_p: f32,
    /// The generator's seed.
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// Greedy.
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Chooses tokens from logits; see the module documentation. Reuses its buffer: no
/// allocation per token once it has grown to the vocabulary.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    /// Candidates (token, logit, then probability weight).
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler; a typed error for a negative or non-finite temperature or a `top_p`
    /// outside (0, 1].
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "temperature {} (a finite value ≥ 0)",
                cfg.temperature
            )));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top_p {} (in (0, 1])",
                cfg.top_p
            )));
        }
        Ok(Sampler {
            cfg,
            rng: StdRng::seed_from_u64(cfg.seed),
            cand: Vec::new(),
        })
    }

    /// The greedy sampler.
    pub fn greedy() -> Self {
        Self::new(SamplerConfig::default()).expect("valid defaults")
    }

    /// The next token of `logits` (NaN logits are never chosen when sampling).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = self.cfg;
        if c.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (i as u32, l)),
        );
        if cand.is_empty() {
            return argmax(logits);
        }
        // Largest logits first (lower id first on ties); top-k cut before sorting.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.select_nth_unstable_by(c.top_k - 1, order);
            cand.truncate(c.top_k);
        }
        cand.sort_unstable_by(order);
        // Weights exp((l − max) / T), then the nucleus: the shortest prefix reaching
        // top_p of the total.
        let max = cand[0].1;
        let mut total = 0f64;
        for x in cand.iter_mut() {
            x.1 = ((x.1 - max) / c.temperature).exp();
            total += x.1 as f64;
        }
        if c.top_p < 1.0 {
            let mut acc = 0f64;
            let keep = cand
                .iter()
                .position(|x| {
                    acc += x.1 as f64;
                    acc >= c.top_p as f64 * total
                })
                .map_or(cand.len(), |i| i + 1);
            cand.truncate(keep);
            total = cand.iter().map(|x| x.1 as f64).sum();
        }
        let mut u = self.rng.random::<f64>() * total;
        for x in cand.iter() {
            u -= x.1 as f64;
            if u < 0.0 {
                return x.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest value (first on ties): the greedy choice.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The generation loop of every decoder: `first` is the token sampled from the
/// prompt's logits; each token is kept and shown to `on_token`, and, unless it is one of
/// `stop` or the `max_new`-th, fed to `step`, which runs it and returns the next token.
pub fn generation_loop(
    first: u32,
    max_new: usize,
    stop: &[u32],
    on_token: &mut dyn FnMut(u32),
    step: &mut dyn FnMut(u32) -> crate::error::Result<u32>,
) -> crate::error::Result<Vec<u32>> {
    // The step is ready at once: blocking on the async loop never waits.
    pollster::block_on(generation_loop_async(
        first,
        max_new,
        stop,
        on_token,
        async |t| step(t),
    ))
}

/// [`generation_loop`] with a step that awaits (the GPU decoder in a browser, whose
/// every step waits for the device's readback).
pub async fn generation_loop_async(
    first: u32,
    max_new: usize,
    stop: &[u32],
    on_token: &mut dyn FnMut(u32),
    mut step: impl AsyncFnMut(u32) -> crate::error::Result<u32>,
) -> crate::error::Result<Vec<u32>> {
    let mut out = Vec::with_capacity(max_new);
    let mut next = first;
    for i in 0..max_new {
        out.push(next);
        on_token(next);
        if stop.contains(&next) || i + 1 == max_new {
            break;
        }
        next = step(next).await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    /// Frequencies of `n` draws over `logits`.
    fn freq(c: SamplerConfig, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(c).unwrap();
        let mut f = vec![0f64; logits.len()];
        for _ in 0..n {
            f[s.sample(logits) as usize] += 1.0 / n as f64;
        }
        f
    }

    #[test]
    fn greedy_and_top_1_pick_the_largest_logit() {
        let logits = [0.1, 2.0, -1.0, 2.0, 0.5];
        assert_eq!(Sampler::greedy().sample(&logits), 1);
        let mut s = Sampler::new(cfg(1.5, 1, 1.0, 9)).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1, "top-1 at any temperature");
        }
    }

    #[test]
    fn draws_follow_the_softmax_and_its_filters() {
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = p.iter().map(|p| p.ln()).collect();
        let n = 40_000;
        // Temperature 1: the probabilities themselves (±0.01 at 40k draws).
        for (got, want) in freq(cfg(1.0, 0, 1.0, 1), &logits, n).iter().zip(p) {
            assert!((got - want as f64).abs() < 0.01, "{got} vs {want}");
        }
        // top_p 0.7: the nucleus is {0, 1} (0.5 + 0.3 ≥ 0.7), renormalized.
        let f = freq(cfg(1.0, 0, 0.7, 2), &logits, n);
        assert!(
            (f[0] - 0.625).abs() < 0.01 && (f[1] - 0.375).abs() < 0.01,
            "{f:?}"
        );
        assert_eq!(f[2] + f[3], 0.0);
        // top_k 3: the last token never comes; the others renormalized.
        let f = freq(cfg(1.0, 3, 1.0, 3), &logits, n);
        assert_eq!(f[3], 0.0);
        assert!((f[0] - 0.5 / 0.95).abs() < 0.01, "{f:?}");
        // Temperature 0.5 squares the odds: p ∝ p².
        let sq: f32 = p.iter().map(|p| p * p).sum();
        let f = freq(cfg(0.5, 0, 1.0, 4), &logits, n);
        assert!((f[0] - (0.25 / sq) as f64).abs() < 0.01, "{f:?}");
    }

    #[test]
    fn a_seed_replays_its_draws() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(cfg(0.8, 20, 0.9, seed)).unwrap();
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        for c in [
            cfg(-0.1, 0, 1.0, 0),
            cfg(f32::NAN, 0, 1.0, 0),
            cfg(1.0, 0, 0.0, 0),
            cfg(1.0, 0, 1.5, 0),
        ] {
            assert!(
                matches!(Sampler::new(c), Err(Error::InvalidArgument(_))),
                "{c:?}"
            );
        }
    }
}
