//! Exploring skip decisions (pure Rust, no PyO3): deterministic Thompson draws from the Beta
//! posteriors.
//!
//! With `lo = 0` and `skip_factor`, a prompt whose posterior calls it negligible gets 0 rollouts,
//! hence no new evidence, hence stays negligible: a prompt whose pass rate moved (or whose early
//! evidence was unlucky) can be skipped for ever. With an exploration seed, the skip decision also
//! looks at one exploration draw p̃ per prompt: the prompt is skipped only if its variance *and*
//! the draw's p̃(1 − p̃) are below the cut.
//!
//! The draw is Thompson sampling from a deliberately less confident posterior,
//! p̃ ~ Beta(1 + c·s, 1 + c·f) with c = min(1, 16/(s + f)): a uniform prior, and the evidence
//! (s, f) scaled down to at most 16 trials (one default group). Both changes bound how sure the
//! draw can be that a prompt is hopeless: the posterior itself can be sure for a bad reason (a
//! fitted U-shaped prior puts much mass near 0; a pass rate that rose makes old failures
//! misleading), and a skipped prompt gets no evidence to correct it. A prompt whose capped
//! evidence is all failures, Beta(1, 17), draws p̃ below 0.02 with probability
//! 1 − 0.98¹⁷ ≈ 0.29, so at a cut of about 0.02 it is re-probed on about 70% of its visits;
//! a prompt with recent successes is re-probed more often. The price is that truly hopeless
//! prompts are re-probed too (with the fewest rollouts the allocation gives).
//!
//! The draw is a pure function of (seed, prompt id, pool update count): the same call on a pool
//! restored from a file gives the same result (runs resume exactly), and a prompt gets a fresh
//! draw at every training step.

/// splitmix64: the stream of one draw.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): never 0, so logarithms are finite.
    fn open_unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        // Box–Muller (one of the pair).
        let (u, v) = (self.open_unit(), self.open_unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// ln of a Gamma(shape, 1) draw (Marsaglia–Tsang; shape < 1 by Gamma(shape + 1)·U^(1/shape),
/// kept in logs so that tiny shapes do not underflow).
fn ln_gamma_draw(shape: f64, rng: &mut SplitMix) -> f64 {
    if shape < 1.0 {
        let boost = rng.open_unit().ln() / shape;
        return ln_gamma_draw(shape + 1.0, rng) + boost;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = rng.open_unit();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d.ln() + v.ln();
        }
    }
}

/// The stream of the draw for (seed, id, step).
fn stream(seed: u64, id: i64, step: u64) -> SplitMix {
    let mut s = SplitMix(seed);
    let a = s.next();
    let mut s = SplitMix(a ^ id as u64);
    let b = s.next();
    SplitMix(b ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// One draw p̃ ~ Beta(alpha, beta) (both finite, > 0), a pure function of (seed, id, step).
pub fn beta_draw(alpha: f64, beta: f64, seed: u64, id: i64, step: u64) -> f64 {
    let mut rng = stream(seed, id, step);
    let (x, y) = (
        ln_gamma_draw(alpha, &mut rng),
        ln_gamma_draw(beta, &mut rng),
    );
    // X/(X+Y) = 1/(1 + exp(ln Y − ln X)).
    1.0 / (1.0 + (y - x).exp())
}

/// Trials of evidence beyond which the exploration draw scales the evidence down.
pub const EXPLORE_EVIDENCE_CAP: f64 = 16.0;

/// The exploration draw's Beta parameters for evidence (s, f): (1 + c·s, 1 + c·f),
/// c = min(1, EXPLORE_EVIDENCE_CAP/(s + f)).
pub fn exploration_beta(s: f64, f: f64) -> (f64, f64) {
    let c = if s + f > EXPLORE_EVIDENCE_CAP {
        EXPLORE_EVIDENCE_CAP / (s + f)
    } else {
        1.0
    };
    (1.0 + c * s, 1.0 + c * f)
}

/// p̃(1 − p̃) of the exploration draw for evidence (s, f) (see the module documentation).
pub fn exploration_variance(s: f64, f: f64, seed: u64, id: i64, step: u64) -> f64 {
    let (a, b) = exploration_beta(s, f);
    variance_draw(a, b, seed, id, step)
}

/// p̃(1 − p̃) of [`beta_draw`]: the draw's Bernoulli variance.
pub fn variance_draw(alpha: f64, beta: f64, seed: u64, id: i64, step: u64) -> f64 {
    let p = beta_draw(alpha, beta, seed, id, step);
    p * (1.0 - p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_have_the_beta_moments_and_are_deterministic() {
        for (a, b) in [
            (0.3, 0.7),
            (1.0, 1.0),
            (2.5, 40.0),
            (0.05, 3.0),
            (300.0, 200.0),
        ] {
            let n = 40_000;
            let draws: Vec<f64> = (0..n).map(|i| beta_draw(a, b, 7, i as i64, 3)).collect();
            assert!(draws.iter().all(|&p| (0.0..=1.0).contains(&p)));
            // E[p] and E[p(1−p)] within 5 standard errors (estimated from the draws).
            let check = |xs: Vec<f64>, want: f64| {
                let mean = xs.iter().sum::<f64>() / n as f64;
                let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
                assert!(
                    (mean - want).abs() < 5.0 * (var / n as f64).sqrt(),
                    "{a} {b}: {mean} vs {want}"
                );
            };
            check(draws.clone(), a / (a + b));
            check(
                draws.iter().map(|p| p * (1.0 - p)).collect(),
                a * b / ((a + b) * (a + b + 1.0)),
            );
        }
        assert_eq!(beta_draw(0.5, 2.0, 1, 42, 9), beta_draw(0.5, 2.0, 1, 42, 9));
        // Seed, id and step each change the draw.
        let base = beta_draw(0.5, 2.0, 1, 42, 9);
        assert_ne!(base, beta_draw(0.5, 2.0, 2, 42, 9));
        assert_ne!(base, beta_draw(0.5, 2.0, 1, 43, 9));
        assert_ne!(base, beta_draw(0.5, 2.0, 1, 42, 10));
        // Tiny shapes stay finite (logs): p̃ is 0 or 1 up to rounding, never NaN.
        let p = beta_draw(1e-9, 1e-9, 3, 1, 1);
        assert!(p.is_finite() && (0.0..=1.0).contains(&p));
        assert_eq!(variance_draw(0.5, 2.0, 1, 42, 9), base * (1.0 - base));
        // Exploration parameters: uniform prior, evidence capped at 16 trials.
        assert_eq!(exploration_beta(3.0, 5.0), (4.0, 6.0));
        assert_eq!(exploration_beta(0.0, 999.0), (1.0, 17.0));
        assert_eq!(exploration_beta(8.0, 24.0), (5.0, 13.0));
        let (a, b) = exploration_beta(2.0, 70.0);
        assert_eq!(
            exploration_variance(2.0, 70.0, 5, 7, 11),
            variance_draw(a, b, 5, 7, 11)
        );
    }
}
