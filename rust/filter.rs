//! The trainer's rule "filter" (what DAPO/GRESO-style filtering does without variable n), pure
//! Rust, no PyO3: prompts whose posterior mean pass rate lies outside (band, 1 − band) get 0
//! rollouts, the others share the budget by the core's uniform rule. It is a selection in front
//! of rule "uniform", not a [`Rule`] of `allocate`: it reads the mean pass rates, which
//! `allocate` does not take.

use crate::allocate::{allocate, describe_invalid, Options, Rule};
use crate::error::{Error, Result};

/// The band must lie in [0, 0.5) (0.5 or more would keep no prompt at all).
pub fn check_filter_band(band: f64) -> Result<()> {
    if !(0.0..0.5).contains(&band) {
        return Err(Error::invalid(format!(
            "filter_band must lie in [0, 0.5), got {band}"
        )));
    }
    Ok(())
}

/// Rule "filter": rollouts per prompt (N,), summing to `budget`. `means` (N,): each prompt's
/// posterior mean pass rate in [0, 1]; `variances` (N,): its expected variance p(1−p) (finite,
/// ≥ 0), which only orders readmissions. A prompt with `band < mean < 1 − band` is kept; if
/// none is, every prompt is. If the kept prompts cannot absorb the budget at `hi` each
/// (fewer than ⌈budget / hi⌉), skipped prompts are readmitted, largest variance first (ties:
/// lower index), until they can. The kept prompts share the budget by rule "uniform" within
/// [`lo`, `hi`] (`budget // K` each, the remainder one each to the first kept prompts);
/// skipped prompts get 0. Errors: a band outside [0, 0.5), mismatched lengths, a mean that is
/// NaN or outside [0, 1], a variance that is NaN, infinite or negative, and the uniform rule's
/// own bounds and budget checks over the kept prompts.
pub fn filter_counts(
    means: &[f64],
    variances: &[f64],
    budget: i64,
    lo: i64,
    hi: i64,
    band: f64,
) -> Result<Vec<i64>> {
    check_filter_band(band)?;
    if means.len() != variances.len() {
        return Err(Error::invalid(format!(
            "means has length {} but variances has length {}",
            means.len(),
            variances.len()
        )));
    }
    for (i, &m) in means.iter().enumerate() {
        if m.is_nan() {
            return Err(Error::invalid(format!("means[{i}] is NaN")));
        }
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::invalid(format!(
                "means[{i}] = {m:?} is outside [0, 1]"
            )));
        }
    }
    if let Some(i) = variances.iter().position(|&v| !(v >= 0.0 && v.is_finite())) {
        return Err(describe_invalid("variances", i, variances[i]));
    }
    let mut keep: Vec<bool> = means.iter().map(|&m| m > band && m < 1.0 - band).collect();
    if !keep.contains(&true) {
        keep.fill(true);
    }
    // prompts needed to place the budget at hi each (a bad budget or hi: the uniform rule says so)
    let need = if budget > 0 && hi > 0 {
        usize::try_from((budget + hi - 1) / hi).unwrap_or(usize::MAX)
    } else {
        0
    };
    let kept = keep.iter().filter(|&&k| k).count();
    if kept < need {
        let mut skipped: Vec<usize> = (0..keep.len()).filter(|&i| !keep[i]).collect();
        // largest variance first; a stable sort keeps the lower index first among equals
        skipped.sort_by(|&a, &b| variances[b].total_cmp(&variances[a]));
        for &i in skipped.iter().take(need - kept) {
            keep[i] = true;
        }
    }
    let kept: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
    let shares = allocate(
        &vec![1.0; kept.len()],
        budget,
        lo,
        hi,
        Rule::Uniform,
        &Options::default(),
    )?;
    let mut counts = vec![0; means.len()];
    for (&i, n) in kept.iter().zip(shares) {
        counts[i] = n;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<Vec<i64>>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn keeps_the_band_and_splits_uniformly() {
        let means = [0.05, 0.5, 0.95, 0.3, 0.7, 0.6];
        let v: Vec<f64> = means.iter().map(|m| m * (1.0 - m)).collect();
        // 4 kept: 40 // 4 = 10 each
        assert_eq!(
            filter_counts(&means, &v, 40, 2, 16, 0.1).unwrap(),
            [0, 10, 0, 10, 10, 10]
        );
        // remainder one each to the first kept prompts
        assert_eq!(
            filter_counts(&means, &v, 42, 2, 16, 0.1).unwrap(),
            [0, 11, 0, 11, 10, 10]
        );
        // band 0 keeps everything strictly inside (0, 1)
        assert_eq!(
            filter_counts(&[0.0, 0.5, 1.0], &[0.0, 0.25, 0.0], 8, 0, 8, 0.0).unwrap(),
            [0, 8, 0]
        );
    }

    #[test]
    fn readmits_the_largest_variances_when_the_kept_cannot_absorb_the_budget() {
        let means = [0.05, 0.5, 0.95, 0.3, 0.7, 0.6];
        let v = [0.0475, 0.25, 0.0475, 0.21, 0.21, 0.24];
        // 70 at hi 16 needs 5 prompts: the first of the two equal skipped variances comes back
        assert_eq!(
            filter_counts(&means, &v, 70, 2, 16, 0.1).unwrap(),
            [14, 14, 0, 14, 14, 14]
        );
        // nothing kept: everybody
        assert_eq!(
            filter_counts(&[0.0, 1.0, 0.99], &[0.0; 3], 7, 2, 16, 0.1).unwrap(),
            [3, 2, 2]
        );
        assert_eq!(
            filter_counts(&[], &[], 0, 2, 16, 0.1).unwrap(),
            Vec::<i64>::new()
        );
    }

    #[test]
    fn bad_input_is_named() {
        let ok = [0.5, 0.5];
        assert_eq!(
            err(filter_counts(&ok, &ok, 8, 2, 6, 0.5)),
            "filter_band must lie in [0, 0.5), got 0.5"
        );
        assert_eq!(
            err(filter_counts(&ok, &ok, 8, 2, 6, f64::NAN)),
            "filter_band must lie in [0, 0.5), got NaN"
        );
        assert_eq!(
            err(filter_counts(&ok, &ok, 8, 2, 6, -0.1)),
            "filter_band must lie in [0, 0.5), got -0.1"
        );
        assert_eq!(
            err(filter_counts(&ok, &[0.5], 8, 2, 6, 0.1)),
            "means has length 2 but variances has length 1"
        );
        assert_eq!(
            err(filter_counts(&[0.5, f64::NAN], &ok, 8, 2, 6, 0.1)),
            "means[1] is NaN"
        );
        assert_eq!(
            err(filter_counts(&[1.5, 0.5], &ok, 8, 2, 6, 0.1)),
            "means[0] = 1.5 is outside [0, 1]"
        );
        assert_eq!(
            err(filter_counts(&ok, &[0.1, -1.0], 8, 2, 6, 0.1)),
            "variances[1] is negative (-1.0)"
        );
        // the uniform rule's own checks, over the kept prompts
        assert_eq!(
            err(filter_counts(&[0.5, 0.0], &[0.25, 0.0], 2, 3, 6, 0.1)),
            "budget 2 is infeasible: must lie in [N*lo, N*hi] = [3, 6] for N=1, lo=3, hi=6"
        );
    }
}
