//! Revisit calibration of the Beta posterior's expected variance (pure Rust, no PyO3).
//!
//! The Beta posterior of a prompt predicts E[p(1−p)]; when the policy moves, prompts that looked
//! mastered (or hopeless) an epoch ago may have changed, which the posterior cannot foresee. The
//! pool learns by how much, per *evidence cell*, from the prompts it sees again:
//!
//! - cells: a prompt's (forgotten) evidence (s, f) above the prior is binned on each axis into 13
//!   log₂ bins, edges `[0, 1e-6, 1, 2, 4, …, 1024, ∞)` (the first bin holds "no evidence"), so
//!   13 × 13 = 169 cells;
//! - at every `update` (training step) both sums of every cell decay by `forget`
//!   (`DEFAULT_FORGET` = 0.99); then each row with n ≥ 2 trials and k successes adds, to the cell
//!   of its id's evidence *before* the step, `observed += n · k(n−k)/(n(n−1))` (the unbiased
//!   variance estimate of the fresh rollouts) and `predicted += n · v̂`, v̂ the posterior expected
//!   variance before the step (with the prior of that moment);
//! - the calibrated variance of a prompt in cell c is `v̂ · (observed_c + τ) / (predicted_c + τ)`,
//!   τ = `DEFAULT_WEIGHT` = 2 (pseudo-evidence: a cell without data has factor 1).
//!
//! Static pools keep factors near 1; under drift the factors learn, e.g., that prompts whose
//! evidence says "solved" have become informative again. Empirical Bayes on revisits.

/// Per-step decay of the cell sums.
pub const DEFAULT_FORGET: f64 = 0.99;
/// Pseudo-evidence τ added to both sums of a cell.
pub const DEFAULT_WEIGHT: f64 = 2.0;
/// Bins per evidence axis.
pub const BINS: usize = 13;
/// Number of cells.
pub const CELLS: usize = BINS * BINS;

/// Upper edges of bins 0..12 (bin 12 is open-ended): bin 0 is [0, 1e-6), then [1e-6, 1), [1, 2),
/// [2, 4), …, [512, 1024), [1024, ∞).
const UPPER: [f64; BINS - 1] = [
    1e-6, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

#[inline]
fn bin(x: f64) -> usize {
    UPPER.iter().take_while(|&&e| x >= e).count()
}

/// Cell index of forgotten evidence (successes, failures).
#[inline]
pub fn cell(successes: f64, failures: f64) -> usize {
    bin(successes) * BINS + bin(failures)
}

#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    pub forget: f64,
    pub weight: f64,
    /// Σ n · (fresh unbiased variance), decayed, per cell.
    pub observed: Vec<f64>,
    /// Σ n · (posterior prediction), decayed, per cell.
    pub predicted: Vec<f64>,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            forget: DEFAULT_FORGET,
            weight: DEFAULT_WEIGHT,
            observed: vec![0.0; CELLS],
            predicted: vec![0.0; CELLS],
        }
    }
}

/// One row's contribution, computed before the pool changes.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub cell: usize,
    pub observed: f64,
    pub predicted: f64,
}

impl Observation {
    /// `k` successes in `n ≥ 2` trials of a prompt whose posterior predicted `predicted_variance`.
    pub fn new(cell: usize, predicted_variance: f64, k: i64, n: i64) -> Observation {
        let (k, n) = (k as f64, n as f64);
        Observation {
            cell,
            observed: n * (k * (n - k) / (n * (n - 1.0))),
            predicted: n * predicted_variance,
        }
    }
}

impl Calibration {
    /// One training step: decay every cell, then add the step's observations.
    pub fn step(&mut self, observations: &[Observation]) {
        for x in self.observed.iter_mut().chain(self.predicted.iter_mut()) {
            *x *= self.forget;
        }
        for o in observations {
            self.observed[o.cell] += o.observed;
            self.predicted[o.cell] += o.predicted;
        }
    }

    /// The factor applied to the posterior expected variance of a prompt in `cell`.
    #[inline]
    pub fn factor(&self, cell: usize) -> f64 {
        (self.observed[cell] + self.weight) / (self.predicted[cell] + self.weight)
    }

    /// Whether the stored state is usable (finite, non-negative sums; forget in (0, 1];
    /// weight > 0).
    pub fn is_valid(&self) -> bool {
        self.forget > 0.0
            && self.forget <= 1.0
            && self.weight > 0.0
            && self.weight.is_finite()
            && self.observed.len() == CELLS
            && self.predicted.len() == CELLS
            && self
                .observed
                .iter()
                .chain(&self.predicted)
                .all(|x| x.is_finite() && *x >= 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_the_documented_edges() {
        let cases = [
            (0.0, 0),
            (5e-7, 0),
            (1e-6, 1),
            (0.5, 1),
            (1.0, 2),
            (1.99, 2),
            (2.0, 3),
            (3.0, 3),
            (16.0, 6),
            (1023.0, 11),
            (1024.0, 12),
            (1e9, 12),
        ];
        for (x, b) in cases {
            assert_eq!(bin(x), b, "{x}");
        }
        assert_eq!(cell(0.0, 16.0), 6);
        assert_eq!(cell(16.0, 0.0), 6 * BINS);
    }

    #[test]
    fn factor_learns_from_revisits_and_decays() {
        let mut c = Calibration::default();
        assert_eq!(c.factor(7), 1.0);
        // 8 of 16 successes: unbiased variance 8·8/(16·15) = 4/15; predicted 0.05.
        c.step(&[Observation::new(7, 0.05, 8, 16)]);
        let (obs, pred) = (16.0 * 4.0 / 15.0, 16.0 * 0.05);
        assert!((c.observed[7] - obs).abs() < 1e-12 && (c.predicted[7] - pred).abs() < 1e-12);
        assert!((c.factor(7) - (obs + 2.0) / (pred + 2.0)).abs() < 1e-12);
        c.step(&[]);
        assert!((c.observed[7] - 0.99 * obs).abs() < 1e-12);
        assert_eq!(c.factor(8), 1.0);
        assert!(c.is_valid());
    }
}
