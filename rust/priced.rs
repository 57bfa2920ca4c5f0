//! Priced skipping (pure Rust, no PyO3): the exact allocation when a prompt may get 0 rollouts
//! and skipping it costs the signal it would have carried.
//!
//! With a prompt-balanced update over the step's N candidates, G = (1/N) Σ_i ĝ_i, a served prompt
//! (n_i ≥ m ≥ 2 rollouts, leave-one-out baseline) contributes variance ∝ w_i/(n_i − 1)
//! (w_i = s_i·v_i, v_i = E[p(1−p)], s_i its noise scale), and a skipped one (n_i = 0) contributes
//! no variance but the squared bias ‖∇p_i‖², priced by the caller as `skip_cost_i` in the same
//! unit (see docs/allocation_objectives.md, "Priced skipping"). The objective
//!
//! ```text
//! J(n) = Σ_{n_i > 0} w_i/(n_i − 1) + Σ_{n_i = 0} skip_cost_i,
//! n_i ∈ {0} ∪ [m, hi],  Σ n_i = B
//! ```
//!
//! is not convex in n_i (the jump from 0 to m), so the marginal-gain greedy of `neyman.rs` is not
//! exact here. It is separable, so a dynamic programme over prompts and spent budget is:
//! F_k(b) = min(F_{k−1}(b) + skip_cost_k, min_{m ≤ n ≤ hi} F_{k−1}(b − n) + w_k/(n − 1)), the
//! optimum is F_N(B) and the counts are read back from the stored choices. Work is
//! O(N · B · (hi − m + 2)) and memory N · (B + 1) choices; both are checked against a cap
//! before any allocation ([`MAX_CELLS`], [`MAX_WORK`]) so an oversized batch is refused with a
//! message instead of running for minutes. Only budgets reachable by the remaining prompts are
//! visited (b ≥ B − (N − k)·hi).
//!
//! Ties: options are tried skip first, then n = m, m + 1, …, hi, and a later option replaces the
//! kept one only if strictly cheaper, so the result is a deterministic function of the inputs.

use crate::allocate::Rule;
use crate::error::{Error, Result};
use crate::estimator::{Estimator, Objective};

/// Most DP cells (prompts × (budget + 1)) the solver accepts (256 Mi cells of 2 bytes: 512 MiB).
pub const MAX_CELLS: u64 = 1 << 28;
/// Most inner-loop evaluations the solver accepts (about 10 s on one core).
pub const MAX_WORK: u64 = 1 << 34;

/// E[p²(1 − p)²] under Beta(α, β): the expected squared Bernoulli variance, the skip price's
/// model of ‖∇p‖² (up to the skip price κ and the noise scale). Exact:
/// αβ(α+1)(β+1) / ((α+β)(α+β+1)(α+β+2)(α+β+3)).
pub fn squared_variance_moment(alpha: f64, beta: f64) -> f64 {
    let t = alpha + beta;
    (alpha / t) * (beta / (t + 1.0)) * ((alpha + 1.0) / (t + 2.0)) * ((beta + 1.0) / (t + 3.0))
}

/// Priced skipping's preconditions on the settings (no data), one rule for every caller:
/// `name` is the argument that turns it on ("skip_costs" for `allocate`, "skip_price" for
/// `PassRatePool::allocate` and the settings check `rules::problems`). Estimator "group_norm"
/// is refused first (its own message); then rule "neyman" with an rloo-family estimator,
/// `lo = 0` and `min_rollouts ≥ 2` are required together (one message listing them all with
/// the values given); then `skip_factor > 0` (the other skipping rule) is refused.
pub fn check_settings(
    name: &str,
    rule: Rule,
    estimator: Option<Estimator>,
    lo: i64,
    min_rollouts: Option<i64>,
    skip_factor: Option<f64>,
) -> Result<()> {
    if estimator.is_some_and(|e| e.objective() == Objective::GroupNorm) {
        return Err(Error::invalid(format!(
            "{name} is not supported with estimator 'group_norm' (its skip price is derived \
             for the rloo family's sum v/(n-1)); use estimator 'rloo'"
        )));
    }
    let shifted = estimator.is_some_and(|e| e.objective() == Objective::Shifted);
    if rule != Rule::Neyman || !shifted || lo != 0 || min_rollouts.unwrap_or(0) < 2 {
        let given = |x: Option<String>| x.unwrap_or_else(|| "none".to_string());
        return Err(Error::invalid(format!(
            "{name} (priced skipping) needs rule 'neyman', estimator 'rloo', 'dr_grpo' or \
             'reinforce_baseline', lo = 0 and min_rollouts >= 2 (a skipped prompt gets 0 \
             rollouts, a served one a baseline); got rule '{}', estimator {}, lo = {lo}, \
             min_rollouts {}",
            rule.name(),
            given(estimator.map(|e| format!("'{}'", e.name()))),
            given(min_rollouts.map(|m| m.to_string())),
        )));
    }
    if skip_factor.is_some_and(|f| f > 0.0) {
        return Err(Error::invalid(format!(
            "{name} cannot be combined with skip_factor (two skipping rules)"
        )));
    }
    Ok(())
}

/// Checks the priced-skip inputs: lengths, finite non-negative values, m ≥ 2, m ≤ hi, the size
/// caps and that the budget can be made of groups of 0 or m..=hi rollouts.
pub fn check(w: &[f64], skip_cost: &[f64], budget: u64, m: u64, hi: u64) -> Result<()> {
    if skip_cost.len() != w.len() {
        return Err(Error::invalid(format!(
            "skip_costs has length {}, variances {}",
            skip_cost.len(),
            w.len()
        )));
    }
    for (name, xs) in [("variances", w), ("skip_costs", skip_cost)] {
        if let Some(i) = xs.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::invalid(format!(
                "{name}[{i}] must be finite and >= 0, got {}",
                xs[i]
            )));
        }
    }
    if m < 2 {
        return Err(Error::invalid(format!(
            "priced skipping needs min_rollouts >= 2 (a group of one has no baseline), got {m}"
        )));
    }
    if m > hi {
        return Err(Error::invalid(format!(
            "min_rollouts ({m}) must not exceed hi ({hi})"
        )));
    }
    let n = w.len() as u64;
    if budget > n.saturating_mul(hi) {
        return Err(Error::invalid(format!(
            "budget {budget} exceeds {n} prompts x hi {hi} = {}",
            n.saturating_mul(hi)
        )));
    }
    if budget > 0 && budget < m {
        return Err(Error::invalid(format!(
            "budget {budget} cannot be split into groups of min_rollouts..hi = {m}..{hi} rollouts"
        )));
    }
    if budget > 0 && budget.div_ceil(hi) > budget / m {
        return Err(Error::invalid(format!(
            "budget {budget} cannot be split into groups of min_rollouts..hi = {m}..{hi} \
             rollouts (no count c with c*{m} <= {budget} <= c*{hi})"
        )));
    }
    let cells = n.saturating_mul(budget + 1);
    let work = cells.saturating_mul(hi - m + 2);
    if cells > MAX_CELLS || work > MAX_WORK {
        return Err(Error::invalid(format!(
            "priced skipping is solved exactly by a dynamic programme over prompts x budget: {n} \
             prompts x budget {budget} x {} group sizes is {work} steps ({cells} cells), above the \
             cap {MAX_WORK} ({MAX_CELLS}); use fewer candidates per call, a smaller hi, or \
             min_rollouts without skip prices",
            hi - m + 1
        )));
    }
    Ok(())
}

/// The exact minimiser of J(n) (module documentation). Inputs must pass [`check`].
pub fn solve(w: &[f64], skip_cost: &[f64], budget: u64, m: u64, hi: u64) -> Vec<i64> {
    let n = w.len();
    let b_max = budget as usize;
    let (m, hi) = (m as usize, hi as usize);
    // f[b]: the least cost of the prompts so far spending exactly b rollouts (∞ if impossible).
    let mut f = vec![f64::INFINITY; b_max + 1];
    f[0] = 0.0;
    let mut next = vec![f64::INFINITY; b_max + 1];
    // choice[k * (B + 1) + b]: the count of prompt k on the optimal path through (k, b).
    let mut choice = vec![0u16; n * (b_max + 1)];
    let mut cost = vec![0.0f64; hi + 1];
    let hi16 = hi.min(u16::MAX as usize);
    debug_assert_eq!(hi16, hi, "hi above 65535 never passes check's caps");
    for k in 0..n {
        // Budgets the remaining prompts (after k) can still complete to B.
        let rest = (n - k - 1).saturating_mul(hi);
        let b_lo = b_max.saturating_sub(rest);
        let b_hi = b_max.min((k + 1).saturating_mul(hi));
        let row = &mut choice[k * (b_max + 1)..(k + 1) * (b_max + 1)];
        let (wk, sk) = (w[k], skip_cost[k]);
        // The served costs w/(c − 1), c = m..=hi, computed once per prompt (the same floats as
        // dividing in the loop, without a division per cell).
        for (c, slot) in cost.iter_mut().enumerate().take(hi + 1).skip(m) {
            *slot = wk / (c - 1) as f64;
        }
        next.fill(f64::INFINITY);
        for b in b_lo..=b_hi {
            let mut best = f[b] + sk;
            let mut arg = 0usize;
            let top = hi.min(b);
            // ∞ + finite stays ∞ and never compares below `best`, so no feasibility test is needed.
            for c in m..=top {
                let total = f[b - c] + cost[c];
                if total < best {
                    best = total;
                    arg = c;
                }
            }
            next[b] = best;
            row[b] = arg as u16;
        }
        std::mem::swap(&mut f, &mut next);
    }
    debug_assert!(f[b_max].is_finite(), "check() guarantees feasibility");
    let mut counts = vec![0i64; n];
    let mut b = b_max;
    for k in (0..n).rev() {
        let c = choice[k * (b_max + 1) + b] as usize;
        counts[k] = c as i64;
        b -= c;
    }
    debug_assert_eq!(b, 0);
    counts
}

/// J(n) for given counts (n_i = 0 costs skip_cost_i, n_i ≥ 2 costs w_i/(n_i − 1)); counts of 1
/// are outside the feasible set and cost +∞.
pub fn objective(w: &[f64], skip_cost: &[f64], counts: &[i64]) -> f64 {
    w.iter()
        .zip(skip_cost)
        .zip(counts)
        .map(|((&wi, &si), &c)| match c {
            0 => si,
            1 => f64::INFINITY,
            c => wi / (c - 1) as f64,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neyman::tests::Rng;

    /// Every feasible allocation, by enumeration.
    fn brute_force(w: &[f64], s: &[f64], budget: u64, m: u64, hi: u64) -> Option<f64> {
        let n = w.len();
        let options: Vec<i64> = std::iter::once(0).chain(m as i64..=hi as i64).collect();
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; n];
        loop {
            let counts: Vec<i64> = idx.iter().map(|&i| options[i]).collect();
            if counts.iter().sum::<i64>() == budget as i64 {
                let j = objective(w, s, &counts);
                best = Some(best.map_or(j, |b: f64| b.min(j)));
            }
            let mut k = 0;
            loop {
                if k == n {
                    return best;
                }
                idx[k] += 1;
                if idx[k] < options.len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    #[test]
    fn matches_brute_force_on_random_instances() {
        let mut rng = Rng::new(20261206);
        let mut checked = 0;
        for _ in 0..3000 {
            let n = 1 + rng.below(5) as usize;
            let m = 2 + rng.below(2);
            let hi = m + rng.below(4);
            let budget = rng.below(n as u64 * hi + 1);
            // Variances and skip costs with ties and zeros now and then.
            let w: Vec<f64> = (0..n)
                .map(|_| match rng.below(5) {
                    0 => 0.0,
                    1 => 0.25,
                    _ => rng.unit() * 0.25,
                })
                .collect();
            let s: Vec<f64> = (0..n)
                .map(|_| match rng.below(5) {
                    0 => 0.0,
                    1 => 0.0625,
                    _ => rng.unit() * 0.3,
                })
                .collect();
            let best = brute_force(&w, &s, budget, m, hi);
            match check(&w, &s, budget, m, hi) {
                Ok(()) => {
                    let counts = solve(&w, &s, budget, m, hi);
                    assert_eq!(counts.iter().sum::<i64>(), budget as i64);
                    assert!(counts
                        .iter()
                        .all(|&c| c == 0 || (c >= m as i64 && c <= hi as i64)));
                    let j = objective(&w, &s, &counts);
                    let b = best.expect("check passed, so a feasible allocation exists");
                    assert!(
                        (j - b).abs() <= 1e-12 * b.abs().max(1.0),
                        "w {w:?} s {s:?} B {budget} m {m} hi {hi}: dp {j} brute {b} {counts:?}"
                    );
                    checked += 1;
                }
                Err(e) => assert!(best.is_none(), "refused a feasible instance: {e}"),
            }
        }
        assert!(checked > 2000, "only {checked} feasible instances");
    }

    #[test]
    fn settled_prompts_are_skipped_and_uncertain_ones_concentrated() {
        // Two uncertain prompts (v = 0.25, skip price 4·E[p²(1−p)²] at Beta(4, 4)), two settled
        // ones (Beta(1, 25)), budget 16, groups 2..12.
        let (vu, uu) = (0.25, 4.0 * squared_variance_moment(4.0, 4.0));
        let (vs, us) = (
            25.0 / (26.0 * 27.0),
            4.0 * squared_variance_moment(1.0, 25.0),
        );
        let counts = solve(&[vu, vs, vu, vs], &[uu, us, uu, us], 16, 2, 12);
        assert_eq!(counts, vec![8, 0, 8, 0]);
    }

    #[test]
    fn a_free_skip_is_taken_and_an_expensive_one_never() {
        // Skip cost 0: the prompt is dropped whenever the others can take the budget.
        assert_eq!(
            solve(&[1.0, 1.0, 1.0], &[0.0, 9.0, 9.0], 8, 2, 8),
            vec![0, 4, 4]
        );
        // Skipping costs more than serving anyone at 2: everyone served.
        assert_eq!(
            solve(&[0.1, 0.2, 0.3], &[5.0, 5.0, 5.0], 6, 2, 4),
            vec![2, 2, 2]
        );
    }

    #[test]
    fn moment_is_exact() {
        // Beta(1, 1): E[p²(1−p)²] = B(3, 3)/B(1, 1) = 1/30.
        assert!((squared_variance_moment(1.0, 1.0) - 1.0 / 30.0).abs() < 1e-15);
        // Beta(2, 3): 2·3·3·4 / (5·6·7·8) = 72/1680.
        assert!((squared_variance_moment(2.0, 3.0) - 72.0 / 1680.0).abs() < 1e-15);
    }

    #[test]
    fn bad_inputs_are_named() {
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert!(msg(check(&[0.1], &[0.1, 0.2], 2, 2, 4)).contains("skip_costs has length 2"));
        assert!(msg(check(&[0.1, f64::NAN], &[0.1, 0.2], 2, 2, 4)).contains("variances[1]"));
        assert!(msg(check(&[0.1, 0.1], &[0.1, -1.0], 2, 2, 4)).contains("skip_costs[1]"));
        assert!(msg(check(&[0.1], &[0.1], 2, 1, 4)).contains("min_rollouts >= 2"));
        assert!(msg(check(&[0.1], &[0.1], 2, 5, 4)).contains("must not exceed hi"));
        assert!(msg(check(&[0.1, 0.1], &[0.1, 0.1], 9, 2, 4)).contains("exceeds 2 prompts"));
        assert!(msg(check(&[0.1, 0.1], &[0.1, 0.1], 5, 3, 4)).contains("cannot be split"));
        let big = vec![0.1; 100_000];
        assert!(msg(check(&big, &big, 100_000, 2, 4)).contains("dynamic programme"));
        assert!(check(&[0.1, 0.1], &[0.1, 0.1], 0, 2, 4).is_ok());
    }
}
