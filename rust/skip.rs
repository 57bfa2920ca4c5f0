//! Joint prompt selection and allocation for rule "neyman" with `lo = 0`: the skipping rule
//! (`skip_factor`) and the group-size floor (`min_rollouts`). Pure Rust, no PyO3.
//!
//! Both start from the exact allocation `n⁰ = neyman::solve(v, B, 0, hi)`.
//!
//! **Skipping.** The shadow price of `n⁰` is the marginal gain at the cut,
//!
//! ```text
//! λ = min { g(v_i, n⁰_i − 1) = v_i / ((n⁰_i − 1) n⁰_i)  :  v_i > 0,  n⁰_i ≥ 2 }    (0 if none)
//! ```
//!
//! i.e. the smallest gain of a rollout the allocation hands out (a prompt's first rollout is
//! left out: its gain is infinite, since v/0 = ∞). If a skipped prompt is charged v (the value of
//! a one-rollout group, which carries no GRPO gradient either), m rollouts cost v/m + λ·m ≥
//! 2√(vλ), so skipping pays when v < 4λ: the prompts with `0 < v_i < skip_factor · λ` are
//! skipped (strict inequality) and the budget is solved again, exactly, over the others.
//! At most `#(v > 0) − ⌈B/hi⌉` prompts are skipped, so that the remaining positive-variance
//! prompts can absorb the budget at `hi`; when more qualify, those with the smallest variance
//! go (ties: the higher index goes first). Re-solving can only lower λ, so no kept prompt
//! would qualify at the new allocation's λ either (one pass is a fixed point).
//!
//! **Group-size floor.** With `min_rollouts = m ≥ 2` every prompt gets 0 or between m and hi
//! rollouts. Served prompts are chosen first: the not-skipped prompts ranked by variance
//! (descending, ties: lower index first); the top `c` are served with
//! `c = max(⌈B/hi⌉, min(#(v > 0, not skipped), ⌊B/m⌋))`, i.e. every positive-variance prompt if
//! the budget gives each of them m rollouts, else the ⌊B/m⌋ largest variances; zero-variance
//! prompts are served only when the budget must be absorbed. The served prompts get the exact
//! optimum of Σ v_i/n_i with m ≤ n_i ≤ hi. A budget with no count c such that c·m ≤ B ≤ c·hi
//! (e.g. B = 5 with m = 3, hi = 4) cannot be split that way: an error.
//!
//! Budget and bounds always hold: Σ n_i = B, n_i ∈ {0} ∪ [1, hi] (∪ [m, hi] with the floor).

use crate::error::{Error, Result};
use crate::neyman::{self, marginal_gain, Scan};

/// The joint selection switches; `None` = off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Selection {
    /// Skip prompts with `0 < v < skip_factor · λ` (finite, ≥ 0; 0 = off).
    pub skip_factor: Option<f64>,
    /// Every prompt gets 0 or at least this many rollouts (≥ 0; 0 and 1 = off).
    pub min_rollouts: Option<i64>,
}

impl Selection {
    /// Whether any switch changes the result (`skip_factor > 0` or `min_rollouts ≥ 2`).
    pub fn active(&self) -> bool {
        self.skip_factor.is_some_and(|f| f > 0.0) || self.min_rollouts.is_some_and(|m| m >= 2)
    }

    /// Checks the values and that they can apply: rule "neyman" (checked by the caller),
    /// `lo = 0`, `min_rollouts ≤ hi`, and a budget that groups of `min_rollouts..=hi` can make up.
    pub fn check(&self, budget: i64, lo: i64, hi: i64) -> Result<()> {
        if let Some(f) = self.skip_factor {
            if !(f.is_finite() && f >= 0.0) {
                return Err(Error::invalid(format!(
                    "skip_factor must be a finite non-negative number, got {f}"
                )));
            }
            if f > 0.0 && lo != 0 {
                return Err(Error::invalid(format!(
                    "skip_factor requires lo = 0 (a skipped prompt gets 0 rollouts), got lo = {lo}"
                )));
            }
        }
        if let Some(m) = self.min_rollouts {
            if m < 0 {
                return Err(Error::invalid(format!(
                    "min_rollouts must be non-negative, got {m}"
                )));
            }
            if m >= 2 {
                if lo != 0 {
                    return Err(Error::invalid(format!(
                        "min_rollouts requires lo = 0 (with lo > 0 no prompt gets 0 rollouts; \
                         raise lo instead), got lo = {lo}"
                    )));
                }
                if m > hi {
                    return Err(Error::invalid(format!(
                        "min_rollouts ({m}) must not exceed hi ({hi})"
                    )));
                }
                // hi ≥ m ≥ 2 here; the smallest and largest number of groups of m..=hi.
                let (fewest, most) = (div_ceil(budget as u64, hi as u64), budget as u64 / m as u64);
                if fewest > most {
                    return Err(Error::invalid(format!(
                        "budget {budget} cannot be split into groups of min_rollouts..hi = \
                         {m}..{hi} rollouts (no count c with c*{m} <= {budget} <= c*{hi})"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn div_ceil(a: u64, b: u64) -> u64 {
    if b == 0 {
        0
    } else {
        a.div_ceil(b)
    }
}

/// The shadow price λ of an allocation (see the module documentation): the smallest finite
/// marginal gain `v_i/((n_i − 1) n_i)` over prompts with `v_i > 0` and `n_i ≥ 2`; 0 if none.
pub fn shadow_price(v: &[f64], n: &[i64]) -> f64 {
    let mut lambda = f64::INFINITY;
    for (&x, &c) in v.iter().zip(n) {
        if x > 0.0 && c >= 2 {
            lambda = lambda.min(marginal_gain(x, c as u64 - 1));
        }
    }
    if lambda.is_finite() {
        lambda
    } else {
        0.0
    }
}

/// Which prompts the skipping rule drops, given the exact allocation `n0` with `lo = 0`.
/// `positive` = number of prompts with v > 0. With a `guard` (same length as `v`), a prompt's
/// score is max(v_i, guard_i) instead of v_i: it is skipped only if both are below the cut.
pub fn skipped(
    v: &[f64],
    guard: Option<&[f64]>,
    n0: &[i64],
    budget: u64,
    hi: u64,
    factor: f64,
    positive: u64,
) -> Vec<bool> {
    let mut out = vec![false; v.len()];
    if factor <= 0.0 {
        return out;
    }
    let score = |i: usize| guard.map_or(v[i], |g| v[i].max(g[i]));
    let cut = factor * shadow_price(v, n0);
    let mut candidates: Vec<usize> = (0..v.len())
        .filter(|&i| v[i] > 0.0 && score(i) < cut)
        .collect();
    let most = positive.saturating_sub(div_ceil(budget, hi)) as usize;
    if candidates.len() > most {
        // Keep the `most` smallest scores (ties: the higher index is skipped first).
        let order = |&a: &usize, &b: &usize| score(a).total_cmp(&score(b)).then(b.cmp(&a));
        if most == 0 {
            candidates.clear();
        } else {
            candidates.select_nth_unstable_by(most - 1, order);
            candidates.truncate(most);
        }
    }
    for i in candidates {
        out[i] = true;
    }
    out
}

/// Solves the exact allocation over the prompts `served` (indices into `v`, any order) with
/// bounds `[lo, hi]` and scatters it; every other prompt gets 0.
/// `shifted`: minimise Σ v_i/(n_i − 1) instead (needs lo ≥ 2; `estimator::solve_shifted`).
fn solve_subset(
    v: &[f64],
    served: &[usize],
    budget: u64,
    lo: u64,
    hi: u64,
    shifted: bool,
) -> Vec<i64> {
    let sub: Vec<f64> = served.iter().map(|&i| v[i]).collect();
    let counts = if shifted {
        crate::estimator::solve_shifted(&sub, budget, lo, hi)
    } else {
        let scan = neyman::scan(&sub, lo, hi);
        neyman::solve(&sub, budget, lo, hi, &scan)
    };
    let mut out = vec![0i64; v.len()];
    for (&i, c) in served.iter().zip(counts) {
        out[i] = c;
    }
    out
}

/// The allocation with the switches of `sel` for validated input: finite non-negative `v`,
/// `lo = 0`, `0 ≤ budget ≤ len·hi`, `sel.check(..)` passed; `scan = neyman::scan(v, 0, hi)`.
/// Served prompts are solved over in increasing index order, so the tie rule of
/// `neyman::solve` (fewer rollouts first, then the lower index) carries over.
///
/// `guard`: optional second variances (e.g. the plain posterior's when `v` is calibrated): a
/// prompt is then skipped only if both its `v` and its `guard` value are below the cut.
///
/// `shifted`: the served prompts get the exact minimiser of Σ v_i/(n_i − 1) (estimators rloo,
/// dr_grpo, reinforce_baseline); needs `min_rollouts ≥ 2` and no `skip_factor` (checked by
/// `Estimator::check`).
pub fn solve(
    v: &[f64],
    guard: Option<&[f64]>,
    budget: u64,
    hi: u64,
    scan: &Scan,
    sel: &Selection,
    shifted: bool,
) -> Vec<i64> {
    let factor = sel.skip_factor.unwrap_or(0.0);
    let n0 = if factor > 0.0 || !shifted {
        neyman::solve(v, budget, 0, hi, scan)
    } else {
        Vec::new()
    };
    let skip = if factor > 0.0 {
        skipped(v, guard, &n0, budget, hi, factor, scan.positive)
    } else {
        vec![false; v.len()]
    };
    let any_skipped = skip.iter().any(|&s| s);
    let m = sel.min_rollouts.unwrap_or(0).max(0) as u64;
    if m >= 2 {
        let mut ranked: Vec<usize> = (0..v.len()).filter(|&i| !skip[i]).collect();
        let kept_positive = ranked.iter().filter(|&&i| v[i] > 0.0).count() as u64;
        let c = div_ceil(budget, hi).max(kept_positive.min(budget / m)) as usize;
        debug_assert!(c <= ranked.len());
        let order = |&a: &usize, &b: &usize| v[b].total_cmp(&v[a]).then(a.cmp(&b));
        if c == 0 {
            ranked.clear();
        } else if c < ranked.len() {
            ranked.select_nth_unstable_by(c - 1, order);
            ranked.truncate(c);
        }
        ranked.sort_unstable();
        return solve_subset(v, &ranked, budget, m, hi, shifted);
    }
    if !any_skipped {
        return n0;
    }
    let kept: Vec<usize> = (0..v.len()).filter(|&i| !skip[i]).collect();
    solve_subset(v, &kept, budget, 0, hi, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neyman::tests::Rng;

    fn run(v: &[f64], budget: u64, hi: u64, sel: Selection) -> Vec<i64> {
        sel.check(budget as i64, 0, hi as i64).unwrap();
        let scan = neyman::scan(v, 0, hi);
        solve(v, None, budget, hi, &scan, &sel, false)
    }

    fn skip(f: f64) -> Selection {
        Selection {
            skip_factor: Some(f),
            min_rollouts: None,
        }
    }

    fn floor(m: i64) -> Selection {
        Selection {
            skip_factor: None,
            min_rollouts: Some(m),
        }
    }

    #[test]
    fn shadow_price_is_the_smallest_finite_gain_handed_out() {
        // Gains of the last rollouts: 0.5/(3·4), 0.02/(1·2); the n = 1 prompt and the v = 0
        // prompt do not count.
        let v = [0.5, 0.02, 0.3, 0.0];
        assert_eq!(shadow_price(&v, &[4, 2, 1, 5]), 0.01);
        assert_eq!(shadow_price(&v, &[1, 1, 1, 0]), 0.0);
        assert_eq!(shadow_price(&[], &[]), 0.0);
    }

    #[test]
    fn skips_small_variances_and_re_solves() {
        // Plain: [0.25, 0.25, 0.01, 0.01] with B = 8, hi = 8 → [3, 3, 1, 1], λ = 0.25/6.
        let v = [0.25, 0.25, 0.01, 0.01];
        assert_eq!(run(&v, 8, 8, Selection::default()), vec![3, 3, 1, 1]);
        assert_eq!(shadow_price(&v, &[3, 3, 1, 1]), 0.25 / 6.0);
        // 0.01 < 4λ = 0.1667: both skipped, the budget goes to the two others.
        assert_eq!(run(&v, 8, 8, skip(4.0)), vec![4, 4, 0, 0]);
        // factor 0.2: 4λ·0.05 = 0.00833 < 0.01 → nothing skipped; factor 0 = off.
        assert_eq!(run(&v, 8, 8, skip(0.2)), vec![3, 3, 1, 1]);
        assert_eq!(run(&v, 8, 8, skip(0.0)), vec![3, 3, 1, 1]);
        // The threshold is strict: v = factor·λ exactly stays.
        let f = 0.01 / (0.25 / 6.0);
        assert_eq!(run(&v, 8, 8, skip(f)), vec![3, 3, 1, 1]);
    }

    #[test]
    fn skipping_stops_where_the_rest_cannot_absorb_the_budget() {
        // hi = 3, B = 8: at least ⌈8/3⌉ = 3 positive prompts must stay, so only one of the
        // two small ones goes: the smaller variance, and on a tie the higher index.
        let v = [0.25, 0.25, 0.01, 0.02];
        let plain = run(&v, 8, 3, Selection::default());
        assert_eq!(plain, vec![3, 3, 1, 1]);
        assert_eq!(run(&v, 8, 3, skip(4.0)), vec![3, 3, 0, 2]);
        let tied = [0.25, 0.25, 0.01, 0.01];
        assert_eq!(run(&tied, 8, 3, skip(4.0)), vec![3, 3, 2, 0]);
        // No room at all (2 prompts at hi = 4 take the budget): nothing is skipped.
        assert_eq!(run(&[0.25, 0.01], 8, 4, skip(4.0)), vec![4, 4]);
        // Zero-variance prompts never count as absorbing and stay at 0.
        assert_eq!(
            run(&[0.25, 0.0, 0.01, 0.25], 8, 4, skip(100.0)),
            vec![4, 0, 0, 4]
        );
    }

    #[test]
    fn budget_and_bounds_always_hold() {
        let mut rng = Rng::new(11);
        for _ in 0..3000 {
            let len = 1 + rng.below(12) as usize;
            let hi = 1 + rng.below(10);
            let budget = rng.below(len as u64 * hi + 1);
            let v: Vec<f64> = (0..len)
                .map(|_| match rng.below(4) {
                    0 => 0.0,
                    1 => 0.25,
                    _ => rng.unit() * 0.25,
                })
                .collect();
            let m = rng.below(hi + 1) as i64;
            let sel = Selection {
                skip_factor: Some([0.0, 1.0, 4.0, 20.0][rng.below(4) as usize]),
                min_rollouts: Some(m),
            };
            if sel.check(budget as i64, 0, hi as i64).is_err() {
                assert!(m >= 2);
                assert!(budget.div_ceil(hi) > budget / m as u64);
                continue;
            }
            let scan = neyman::scan(&v, 0, hi);
            let n = solve(&v, None, budget, hi, &scan, &sel, false);
            assert_eq!(n.iter().sum::<i64>(), budget as i64, "{v:?} {sel:?}");
            let floor = if m >= 2 { m } else { 1 };
            assert!(
                n.iter().all(|&c| c == 0 || (c >= floor && c <= hi as i64)),
                "{v:?} {budget} {hi} {sel:?} {n:?}"
            );
            // Off switches give the plain allocation.
            let off = Selection {
                skip_factor: Some(0.0),
                min_rollouts: Some(1),
            };
            assert_eq!(
                solve(&v, None, budget, hi, &scan, &off, false),
                neyman::solve(&v, budget, 0, hi, &scan)
            );
        }
    }

    #[test]
    fn skipped_prompts_are_never_re_skipped_fixed_point() {
        // After skipping, no kept positive-variance prompt lies below factor·λ of the new
        // allocation (one pass is a fixed point of the rule).
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let len = 2 + rng.below(40) as usize;
            let hi = 2 + rng.below(30);
            let budget = rng.below(len as u64 * hi + 1);
            let v: Vec<f64> = (0..len).map(|_| rng.unit() * rng.unit() * 0.25).collect();
            let n = run(&v, budget, hi, skip(4.0));
            let lambda = shadow_price(&v, &n);
            let again = run(
                &v.iter()
                    .zip(&n)
                    .map(|(&x, &c)| if c == 0 { 0.0 } else { x })
                    .collect::<Vec<_>>(),
                budget,
                hi,
                skip(4.0),
            );
            assert_eq!(again, n, "λ {lambda}");
        }
    }

    #[test]
    fn min_rollouts_gives_zero_or_at_least_m() {
        // Plain with hi = 8, B = 8: [3, 3, 1, 1]. With m = 2 all four prompts can be served
        // (⌊8/2⌋ = 4) and the floors use up the budget: 2 each.
        let v = [0.25, 0.25, 0.01, 0.01];
        assert_eq!(run(&v, 8, 8, floor(2)), vec![2, 2, 2, 2]);
        // B = 7, m = 2: ⌊7/2⌋ = 3 prompts served (largest variances; tie: lower index).
        assert_eq!(run(&v, 7, 8, floor(2)), vec![3, 2, 2, 0]);
        // B = 12, m = 3: all four served at ≥ 3; the rest by exact Neyman.
        assert_eq!(run(&v, 12, 8, floor(3)), vec![3, 3, 3, 3]);
        assert_eq!(run(&v, 14, 8, floor(3)), vec![4, 4, 3, 3]);
        // With skipping first: the small ones go, the big ones take everything.
        let both = Selection {
            skip_factor: Some(4.0),
            min_rollouts: Some(2),
        };
        assert_eq!(run(&v, 8, 8, both), vec![4, 4, 0, 0]);
        // Zero-variance prompts are served only to absorb the budget, at ≥ m each.
        assert_eq!(
            run(&[0.25, 0.0, 0.0, 0.0], 9, 4, floor(2)),
            vec![4, 3, 2, 0]
        );
        // m = 1 and 0 are "off".
        assert_eq!(run(&v, 8, 8, floor(1)), vec![3, 3, 1, 1]);
        assert_eq!(run(&v, 8, 8, floor(0)), vec![3, 3, 1, 1]);
        assert_eq!(run(&v, 0, 8, floor(2)), vec![0, 0, 0, 0]);
    }

    #[test]
    fn errors_name_the_problem() {
        let msg =
            |s: Selection, b: i64, lo: i64, hi: i64| s.check(b, lo, hi).unwrap_err().to_string();
        assert_eq!(
            msg(skip(4.0), 8, 8, 24),
            "skip_factor requires lo = 0 (a skipped prompt gets 0 rollouts), got lo = 8"
        );
        assert!(skip(0.0).check(200, 8, 24).is_ok());
        assert_eq!(
            msg(skip(f64::NAN), 8, 0, 24),
            "skip_factor must be a finite non-negative number, got NaN"
        );
        assert_eq!(
            msg(skip(-1.0), 8, 0, 24),
            "skip_factor must be a finite non-negative number, got -1"
        );
        assert_eq!(
            msg(floor(2), 8, 1, 24),
            "min_rollouts requires lo = 0 (with lo > 0 no prompt gets 0 rollouts; raise lo \
             instead), got lo = 1"
        );
        assert_eq!(
            msg(floor(5), 8, 0, 4),
            "min_rollouts (5) must not exceed hi (4)"
        );
        assert_eq!(
            msg(floor(-1), 8, 0, 4),
            "min_rollouts must be non-negative, got -1"
        );
        assert_eq!(
            msg(floor(3), 5, 0, 4),
            "budget 5 cannot be split into groups of min_rollouts..hi = 3..4 rollouts \
             (no count c with c*3 <= 5 <= c*4)"
        );
        assert!(floor(1).check(8, 3, 24).is_ok());
    }

    #[test]
    fn a_guard_keeps_prompts_the_guard_calls_informative() {
        let v = [0.25, 0.25, 0.01, 0.01];
        let scan = neyman::scan(&v, 0, 8);
        // Prompt 2's guard value 0.2 is above the cut 4·0.25/6: it stays; prompt 3 goes.
        let guard = [0.25, 0.25, 0.2, 0.001];
        let out = solve(&v, Some(&guard), 8, 8, &scan, &skip(4.0), false);
        assert_eq!(out, vec![4, 3, 1, 0]);
        // Without the guard both go.
        assert_eq!(
            solve(&v, None, 8, 8, &scan, &skip(4.0), false),
            vec![4, 4, 0, 0]
        );
    }
}
