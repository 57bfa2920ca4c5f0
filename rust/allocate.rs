//! Rollout allocation rules: argument checking, the reference options (exploration budget for
//! unseen prompts, mastery), and the "uniform" and "proportional" rules. The exact "neyman"
//! solver lives in `neyman.rs`.

use crate::error::{Error, Result};
use crate::estimator::{self, Estimator, Objective};
use crate::neyman;
use crate::parallel::map_chunks;
use crate::skip::{self, Selection};

/// Rollouts given to a never-seen prompt by the reference's exploration rule.
pub const DEFAULT_EXPLORATION_ROLLOUTS: i64 = 4;
/// Pass rate from which the reference treats a prompt as mastered.
pub const DEFAULT_MASTERY_THRESHOLD: f64 = 0.85;
/// The reference's priority floor (also the priority of mastered prompts).
pub const DEFAULT_PRIORITY_FLOOR: f64 = 0.01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Exact integer minimiser of Σ v_i/n_i.
    Neyman,
    /// The reference code's n_i ∝ max(v_i, floor) with water-filled bounds and largest remainders.
    Proportional,
    /// OpenRLHF's baseline: budget // N each, the remainder to the lowest indices.
    Uniform,
}

impl Rule {
    pub const NAMES: [&'static str; 3] = ["neyman", "proportional", "uniform"];

    pub fn parse(name: &str) -> Result<Rule> {
        match name {
            "neyman" => Ok(Rule::Neyman),
            "proportional" => Ok(Rule::Proportional),
            "uniform" => Ok(Rule::Uniform),
            other => Err(Error::invalid(format!(
                "rule must be one of 'neyman', 'proportional', 'uniform', got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rule::Neyman => "neyman",
            Rule::Proportional => "proportional",
            Rule::Uniform => "uniform",
        }
    }
}

/// The reference code's switches. `None` means "not given"; an option that would have no effect
/// (any option with rule "uniform", `exploration_rollouts` without `unseen`, ...) is refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    /// `true` marks a prompt never seen before: it gets `exploration_rollouts` (clamped into
    /// [lo, hi]) and the seen prompts share the rest of the budget.
    pub unseen: Option<&'a [bool]>,
    pub exploration_rollouts: Option<i64>,
    /// Cumulative pass rates in [0, 1] (entries of unseen prompts are ignored). A seen prompt with
    /// pass rate ≥ `mastery_threshold` is mastered: its priority (proportional) or variance
    /// (neyman) becomes `priority_floor`.
    pub pass_rates: Option<&'a [f64]>,
    pub mastery_threshold: Option<f64>,
    /// Proportional: priorities are max(v, floor). Neyman: only the value given to mastered prompts.
    pub priority_floor: Option<f64>,
    /// Rule "neyman" with `lo = 0` only: skip prompts with `0 < v < skip_factor · λ`, λ the
    /// exact allocation's shadow price (see `skip.rs`). `None` or 0 = off.
    pub skip_factor: Option<f64>,
    /// Rule "neyman" with `lo = 0` only: every prompt gets 0 or at least this many rollouts
    /// (see `skip.rs`). `None`, 0 or 1 = off.
    pub min_rollouts: Option<i64>,
    /// The advantage estimator whose update variance is minimised (`estimator.rs`); `None` =
    /// Σ v_i/n_i. Rule "neyman" only; "group_norm" needs posteriors (`PassRatePool::allocate`).
    pub estimator: Option<Estimator>,
}

impl Options<'_> {
    /// The joint-selection switches (`skip_factor`, `min_rollouts`).
    pub fn selection(&self) -> Selection {
        Selection {
            skip_factor: self.skip_factor,
            min_rollouts: self.min_rollouts,
        }
    }
}

/// Allocates `budget` rollouts over `variances.len()` prompts, each within `[lo, hi]`.
/// The result sums to `budget` exactly.
pub fn allocate(
    variances: &[f64],
    budget: i64,
    lo: i64,
    hi: i64,
    rule: Rule,
    options: &Options,
) -> Result<Vec<i64>> {
    allocate_guarded(variances, None, budget, lo, hi, rule, options)
}

/// [`allocate`] with an optional skip guard for `skip_factor` (see `skip::solve`): a prompt is
/// skipped only if both its variance and its guard value lie below the cut. `guard` must be
/// as long as `variances` (the pool passes its own plain posterior variances).
pub fn allocate_guarded(
    variances: &[f64],
    guard: Option<&[f64]>,
    budget: i64,
    lo: i64,
    hi: i64,
    rule: Rule,
    options: &Options,
) -> Result<Vec<i64>> {
    debug_assert!(guard.is_none_or(|g| g.len() == variances.len()));
    let (budget, lo, hi) = check_bounds(variances.len(), budget, lo, hi)?;
    let scan = neyman::scan(variances, lo, hi);
    if let Some(i) = scan.first_invalid {
        return Err(describe_invalid("variances", i, variances[i]));
    }
    check_options(variances.len(), rule, options)?;
    let selection = options.selection();
    let seen_weights = options.unseen.is_some() || options.pass_rates.is_some();
    if let Some(e) = options.estimator {
        check_estimator(e, rule, options, lo as i64)?;
        if e.objective() == Objective::GroupNorm {
            return Err(Error::invalid(
                "estimator 'group_norm' needs the Beta posteriors (its cost uses their exact \
                 moments, not only E[p(1-p)]): use PassRatePool.allocate",
            ));
        }
    }
    check_selection(
        rule,
        options,
        &selection,
        budget as i64,
        lo as i64,
        hi as i64,
    )?;
    let shifted = options.estimator.is_some();
    Ok(match rule {
        Rule::Neyman if shifted && selection.active() => {
            skip::solve(variances, guard, budget, hi, &scan, &selection, true)
        }
        Rule::Neyman if shifted => estimator::solve_shifted(variances, budget, lo, hi),
        Rule::Uniform => uniform(variances.len(), budget),
        Rule::Neyman if selection.active() => {
            skip::solve(variances, guard, budget, hi, &scan, &selection, false)
        }
        Rule::Neyman if !seen_weights => neyman::solve(variances, budget, lo, hi, &scan),
        _ => with_reference_options(variances, budget, lo, hi, rule, options),
    })
}

/// An estimator applies to rule "neyman" without the reference's options; then its own checks
/// of `lo` and the skip switches (`Estimator::check`).
pub fn check_estimator(e: Estimator, rule: Rule, o: &Options, lo: i64) -> Result<()> {
    if rule != Rule::Neyman {
        return Err(Error::invalid(format!(
            "estimator applies to rule 'neyman' only, got rule '{}' with estimator '{}'",
            rule.name(),
            e.name()
        )));
    }
    for (name, present) in [
        ("unseen", o.unseen.is_some()),
        ("pass_rates", o.pass_rates.is_some()),
    ] {
        if present {
            return Err(Error::invalid(format!(
                "estimator '{}' cannot be combined with {name} (the reference's exploration \
                 and mastery options)",
                e.name()
            )));
        }
    }
    e.check(lo, o.skip_factor, o.min_rollouts)
}

/// Checks signs, `lo ≤ hi` and feasibility of the budget; returns them as unsigned.
pub fn check_bounds(n: usize, budget: i64, lo: i64, hi: i64) -> Result<(u64, u64, u64)> {
    for (name, value) in [("budget", budget), ("lo", lo), ("hi", hi)] {
        if value < 0 {
            return Err(Error::invalid(format!(
                "{name} must be non-negative, got {value}"
            )));
        }
    }
    if lo > hi {
        return Err(Error::invalid(format!(
            "lo ({lo}) must not exceed hi ({hi})"
        )));
    }
    let (min, max) = (n as i128 * lo as i128, n as i128 * hi as i128);
    if (budget as i128) < min || (budget as i128) > max {
        return Err(Error::invalid(format!(
            "budget {budget} is infeasible: must lie in [N*lo, N*hi] = [{min}, {max}] \
             for N={n}, lo={lo}, hi={hi}"
        )));
    }
    Ok((budget as u64, lo as u64, hi as u64))
}

pub fn describe_invalid(name: &str, index: usize, value: f64) -> Error {
    let problem = if value.is_nan() {
        "is NaN".to_string()
    } else if value.is_infinite() {
        format!("is infinite ({value})")
    } else {
        format!("is negative ({value:?})")
    };
    Error::invalid(format!("{name}[{index}] {problem}"))
}

/// `skip_factor` and `min_rollouts`: rule "neyman" only (any value is refused with the other
/// rules), not with the reference options, and the checks of `Selection::check`.
fn check_selection(
    rule: Rule,
    o: &Options,
    selection: &Selection,
    budget: i64,
    lo: i64,
    hi: i64,
) -> Result<()> {
    let given = [
        ("skip_factor", o.skip_factor.is_some()),
        ("min_rollouts", o.min_rollouts.is_some()),
    ];
    for (name, present) in given {
        if present && rule != Rule::Neyman {
            return Err(Error::invalid(format!(
                "{name} applies to rule 'neyman' only, got rule '{}'",
                rule.name()
            )));
        }
    }
    selection.check(budget, lo, hi)?;
    if selection.active() {
        for (name, present) in [
            ("unseen", o.unseen.is_some()),
            ("pass_rates", o.pass_rates.is_some()),
        ] {
            if present {
                return Err(Error::invalid(format!(
                    "skip_factor and min_rollouts cannot be combined with {name} \
                     (the reference's exploration and mastery options)"
                )));
            }
        }
    }
    Ok(())
}

fn check_options(n: usize, rule: Rule, o: &Options) -> Result<()> {
    let given = [
        ("unseen", o.unseen.is_some()),
        ("exploration_rollouts", o.exploration_rollouts.is_some()),
        ("pass_rates", o.pass_rates.is_some()),
        ("mastery_threshold", o.mastery_threshold.is_some()),
        ("priority_floor", o.priority_floor.is_some()),
    ];
    if rule == Rule::Uniform {
        if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
            return Err(Error::invalid(format!(
                "{name} does not apply to rule 'uniform' (it takes no options)"
            )));
        }
        return Ok(());
    }
    let needs = |option: &str, present: bool, missing: &str| -> Result<()> {
        if present {
            return Err(Error::invalid(format!(
                "{option} has no effect without {missing}"
            )));
        }
        Ok(())
    };
    needs(
        "exploration_rollouts",
        o.exploration_rollouts.is_some() && o.unseen.is_none(),
        "unseen",
    )?;
    needs(
        "mastery_threshold",
        o.mastery_threshold.is_some() && o.pass_rates.is_none(),
        "pass_rates",
    )?;
    if rule == Rule::Neyman {
        needs(
            "priority_floor (rule 'neyman' uses it only for mastered prompts)",
            o.priority_floor.is_some() && o.pass_rates.is_none(),
            "pass_rates",
        )?;
    }
    if let Some(unseen) = o.unseen {
        if unseen.len() != n {
            return Err(Error::invalid(format!(
                "unseen has length {} but variances has length {n}",
                unseen.len()
            )));
        }
    }
    if let Some(e) = o.exploration_rollouts {
        if e < 0 {
            return Err(Error::invalid(format!(
                "exploration_rollouts must be non-negative, got {e}"
            )));
        }
    }
    if let Some(rates) = o.pass_rates {
        if rates.len() != n {
            return Err(Error::invalid(format!(
                "pass_rates has length {} but variances has length {n}",
                rates.len()
            )));
        }
        for (i, &r) in rates.iter().enumerate() {
            if o.unseen.is_some_and(|u| u[i]) {
                continue;
            }
            if r.is_nan() {
                return Err(Error::invalid(format!("pass_rates[{i}] is NaN")));
            }
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::invalid(format!(
                    "pass_rates[{i}] = {r:?} is outside [0, 1]"
                )));
            }
        }
    }
    if let Some(t) = o.mastery_threshold {
        if !t.is_finite() {
            return Err(Error::invalid(format!(
                "mastery_threshold must be finite, got {t}"
            )));
        }
    }
    if let Some(f) = o.priority_floor {
        if !(f.is_finite() && f >= 0.0) {
            return Err(Error::invalid(format!(
                "priority_floor must be a finite non-negative number, got {f}"
            )));
        }
    }
    Ok(())
}

/// `budget // n` each, the remainder one each to the lowest indices. Within bounds whenever the
/// budget is feasible.
pub fn uniform(n: usize, budget: u64) -> Vec<i64> {
    if n == 0 {
        return Vec::new();
    }
    let base = (budget / n as u64) as i64;
    let extra = (budget % n as u64) as usize;
    let mut out = vec![base; n];
    for o in &mut out[..extra] {
        *o += 1;
    }
    out
}

/// Applies mastery, priority floor and the exploration budget, then the rule on the seen prompts.
fn with_reference_options(
    v: &[f64],
    budget: u64,
    lo: u64,
    hi: u64,
    rule: Rule,
    o: &Options,
) -> Vec<i64> {
    let floor = o.priority_floor.unwrap_or(DEFAULT_PRIORITY_FLOOR);
    let threshold = o.mastery_threshold.unwrap_or(DEFAULT_MASTERY_THRESHOLD);
    let is_unseen = |i: usize| o.unseen.is_some_and(|u| u[i]);
    let weight = |i: usize| -> f64 {
        let mastered = o.pass_rates.is_some_and(|r| r[i] >= threshold);
        match (rule, mastered) {
            (_, true) => floor,
            (Rule::Proportional, false) => v[i].max(floor),
            _ => v[i],
        }
    };
    let seen: Vec<usize> = (0..v.len()).filter(|&i| !is_unseen(i)).collect();
    let unseen: Vec<usize> = (0..v.len()).filter(|&i| is_unseen(i)).collect();
    let seen_weights: Vec<f64> = seen.iter().map(|&i| weight(i)).collect();

    let explore = (o
        .exploration_rollouts
        .unwrap_or(DEFAULT_EXPLORATION_ROLLOUTS) as u64)
        .clamp(lo, hi);
    let (s, u) = (seen.len() as u64, unseen.len() as u64);
    // The unseen prompts get `explore` each unless the seen prompts cannot absorb the rest; then
    // the seen prompts sit at their bound and the unseen ones share what is left evenly.
    let wanted = budget as i128 - (explore * u) as i128;
    let (seen_budget, unseen_budget) = if u == 0 {
        (budget, 0)
    } else if s == 0 {
        (0, budget)
    } else if wanted < (s * lo) as i128 {
        (s * lo, budget - s * lo)
    } else if wanted > (s * hi) as i128 {
        (s * hi, budget - s * hi)
    } else {
        (wanted as u64, explore * u)
    };
    let seen_counts = match rule {
        Rule::Neyman => {
            let scan = neyman::scan(&seen_weights, lo, hi);
            neyman::solve(&seen_weights, seen_budget, lo, hi, &scan)
        }
        _ => proportional(&seen_weights, seen_budget, lo, hi),
    };
    let mut out = vec![0i64; v.len()];
    for (&i, &c) in seen.iter().zip(&seen_counts) {
        out[i] = c;
    }
    for (&i, c) in unseen.iter().zip(uniform(unseen.len(), unseen_budget)) {
        out[i] = c;
    }
    out
}

/// The reference rule: continuous n_i = clamp(c·w_i, lo, hi) with c set so the total is the
/// budget (the fixed point of "pin the violators at their bound, share the rest in proportion,
/// repeat"), then largest-remainder rounding with ties to the lower index. `w` must be finite and
/// non-negative. If every weight is 0 the prompts share evenly; if the positive-weight prompts
/// cannot absorb the budget even at `hi`, the zero-weight prompts share the rest evenly.
pub fn proportional(w: &[f64], budget: u64, lo: u64, hi: u64) -> Vec<i64> {
    let n = w.len();
    let (lo_f, hi_f, budget_f) = (lo as f64, hi as f64, budget as f64);
    if n == 0 || budget == n as u64 * lo || budget == n as u64 * hi {
        return vec![
            if n == 0 {
                0
            } else {
                (budget / n as u64) as i64
            };
            n
        ];
    }
    let positive: Vec<bool> = w.iter().map(|&x| x > 0.0).collect();
    let n_pos = positive.iter().filter(|&&p| p).count() as u64;
    if n_pos == 0 {
        return uniform(n, budget);
    }
    let zero_capacity = n_pos * hi + (n as u64 - n_pos) * lo;
    if budget >= zero_capacity {
        let zeros: Vec<usize> = (0..n).filter(|&i| !positive[i]).collect();
        let mut out: Vec<i64> = (0..n)
            .map(|i| if positive[i] { hi as i64 } else { 0 })
            .collect();
        for (&i, c) in zeros.iter().zip(uniform(zeros.len(), budget - n_pos * hi)) {
            out[i] = c;
        }
        return out;
    }
    let c = proportional_scale(w, budget_f, lo_f, hi_f);
    let x: Vec<f64> = w.iter().map(|&wi| (c * wi).max(lo_f).min(hi_f)).collect();
    round_largest_remainder(&x, budget, lo, hi)
}

/// Solves Σ clamp(c·w_i, lo, hi) = budget for c by safeguarded Newton. The function is piecewise
/// linear, so once the pinned set is right the Newton step is the exact root.
fn proportional_scale(w: &[f64], budget: f64, lo: f64, hi: f64) -> f64 {
    let eval = |c: f64| -> (f64, f64) {
        let parts = map_chunks(w, |_, chunk| {
            let (mut pinned, mut free_w) = (0.0f64, 0.0f64);
            for &wi in chunk {
                let x = c * wi;
                if x <= lo {
                    pinned += lo;
                } else if x >= hi {
                    pinned += hi;
                } else {
                    free_w += wi;
                }
            }
            (pinned, free_w)
        });
        parts
            .into_iter()
            .fold((0.0, 0.0), |(p, f), (a, b)| (p + a, f + b))
    };
    let total_w: f64 = w.iter().sum();
    let (mut c_low, mut c_high) = (0.0f64, f64::INFINITY);
    let mut c = budget / total_w;
    for _ in 0..200 {
        let (pinned, free_w) = eval(c);
        let total = pinned + c * free_w;
        if total < budget {
            c_low = c;
        } else if total > budget {
            c_high = c;
        } else {
            return c;
        }
        let next = if free_w > 0.0 {
            (budget - pinned) / free_w
        } else {
            f64::NAN
        };
        if next == c {
            return c;
        }
        c = if next > c_low && next < c_high {
            next
        } else if c_high.is_finite() {
            0.5 * (c_low + c_high)
        } else {
            2.0 * c
        };
    }
    c
}

/// Floors `x` (each within [lo, hi]) and hands the missing units to the largest fractional parts
/// (ties: lower index); float noise that overshoots is taken back from the smallest ones.
fn round_largest_remainder(x: &[f64], budget: u64, lo: u64, hi: u64) -> Vec<i64> {
    let mut out: Vec<i64> = x
        .iter()
        .map(|&xi| (xi.floor() as u64).clamp(lo, hi) as i64)
        .collect();
    let mut missing = budget as i64 - out.iter().sum::<i64>();
    while missing != 0 {
        let up = missing > 0;
        let mut eligible: Vec<(f64, usize)> = (0..x.len())
            .filter(|&i| {
                if up {
                    out[i] < hi as i64
                } else {
                    out[i] > lo as i64
                }
            })
            .map(|i| (x[i] - out[i] as f64, i))
            .collect();
        let take = (missing.unsigned_abs() as usize).min(eligible.len());
        debug_assert!(
            take > 0,
            "a feasible budget always leaves an eligible prompt"
        );
        let order = |a: &(f64, usize), b: &(f64, usize)| {
            if up {
                b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
            } else {
                a.0.total_cmp(&b.0).then(b.1.cmp(&a.1))
            }
        };
        if take < eligible.len() {
            eligible.select_nth_unstable_by(take - 1, order);
        }
        for &(_, i) in &eligible[..take] {
            out[i] += if up { 1 } else { -1 };
        }
        missing += if up { -(take as i64) } else { take as i64 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(v: &[f64], budget: i64, lo: i64, hi: i64, rule: Rule) -> Result<Vec<i64>> {
        allocate(v, budget, lo, hi, rule, &Options::default())
    }

    fn message(r: Result<Vec<i64>>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_argument_and_problem() {
        let v = [0.1; 16];
        assert_eq!(
            message(run(&v, 100, 8, 24, Rule::Neyman)),
            "budget 100 is infeasible: must lie in [N*lo, N*hi] = [128, 384] for N=16, lo=8, hi=24"
        );
        assert_eq!(
            message(run(&v, 200, 9, 8, Rule::Neyman)),
            "lo (9) must not exceed hi (8)"
        );
        assert_eq!(
            message(run(&v, 200, -1, 8, Rule::Neyman)),
            "lo must be non-negative, got -1"
        );
        assert_eq!(
            message(run(&v, -3, 1, 8, Rule::Uniform)),
            "budget must be non-negative, got -3"
        );
        let mut bad = vec![0.1; 20];
        bad[17] = f64::NAN;
        assert_eq!(
            message(run(&bad, 40, 1, 4, Rule::Neyman)),
            "variances[17] is NaN"
        );
        bad[17] = -0.5;
        assert_eq!(
            message(run(&bad, 40, 1, 4, Rule::Uniform)),
            "variances[17] is negative (-0.5)"
        );
        bad[3] = f64::INFINITY;
        assert_eq!(
            message(run(&bad, 40, 1, 4, Rule::Proportional)),
            "variances[3] is infinite (inf)"
        );
        assert_eq!(
            message(run(&[], 5, 8, 24, Rule::Neyman)),
            "budget 5 is infeasible: must lie in [N*lo, N*hi] = [0, 0] for N=0, lo=8, hi=24"
        );
        assert!(Rule::parse("greedy")
            .unwrap_err()
            .to_string()
            .contains("'neyman'"));
    }

    #[test]
    fn empty_input_with_zero_budget() {
        for rule in [Rule::Neyman, Rule::Proportional, Rule::Uniform] {
            assert_eq!(run(&[], 0, 8, 24, rule).unwrap(), Vec::<i64>::new());
        }
    }

    #[test]
    fn uniform_spreads_the_remainder_over_the_lowest_indices() {
        assert_eq!(
            run(&[0.3; 5], 13, 0, 10, Rule::Uniform).unwrap(),
            vec![3, 3, 3, 2, 2]
        );
        assert_eq!(
            run(&[0.0; 3], 24, 8, 8, Rule::Uniform).unwrap(),
            vec![8, 8, 8]
        );
    }

    #[test]
    fn proportional_follows_priorities_with_water_filling_and_largest_remainder() {
        // Weights 0.1, 0.2, 0.3, 0.4 (no floor effect), budget 10: exactly 1, 2, 3, 4.
        let v = [0.1, 0.2, 0.3, 0.4];
        assert_eq!(
            run(&v, 10, 0, 10, Rule::Proportional).unwrap(),
            vec![1, 2, 3, 4]
        );
        // Bounds [2, 3]: 0.1 and 0.2 pinned at 2, 0.3 and 0.4 pinned at 3.
        assert_eq!(
            run(&v, 10, 2, 3, Rule::Proportional).unwrap(),
            vec![2, 2, 3, 3]
        );
        // Floor 0.01 lifts zero-variance prompts: priorities 0.01, 0.01, 0.98 → continuous
        // 0.1, 0.1, 9.8; floors 0, 0, 9 and the largest remainder (0.8) takes the missing unit.
        assert_eq!(
            run(&[0.0, 0.0, 0.98], 10, 0, 10, Rule::Proportional).unwrap(),
            vec![0, 0, 10]
        );
        // Equal fractional parts: ties go to the lower index.
        assert_eq!(
            run(&[0.5, 0.5, 0.5], 7, 0, 10, Rule::Proportional).unwrap(),
            vec![3, 2, 2]
        );
        // Hi pins the big one; the others share the rest in proportion 1:3.
        assert_eq!(
            run(&[1.0, 0.01, 0.03], 12, 0, 8, Rule::Proportional).unwrap(),
            vec![8, 1, 3]
        );
    }

    #[test]
    fn proportional_keeps_budget_and_bounds_where_the_reference_breaks_them() {
        let mut rng = crate::neyman::tests::Rng::new(5);
        for _ in 0..2000 {
            let n = 1 + rng.below(40) as usize;
            let lo = rng.below(5) as i64;
            let hi = lo + rng.below(30) as i64;
            let budget = n as i64 * lo + rng.below((n as i64 * (hi - lo) + 1) as u64) as i64;
            let v: Vec<f64> = (0..n)
                .map(|_| if rng.below(3) == 0 { 0.0 } else { rng.unit() })
                .collect();
            let unseen: Vec<bool> = (0..n).map(|_| rng.below(3) == 0).collect();
            let rates: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
            for rule in [Rule::Proportional, Rule::Neyman] {
                let opts = Options {
                    unseen: Some(&unseen),
                    exploration_rollouts: Some(rng.below(6) as i64),
                    pass_rates: Some(&rates),
                    mastery_threshold: Some(0.85),
                    priority_floor: Some(0.01),
                    ..Options::default()
                };
                for o in [Options::default(), opts] {
                    let out = allocate(&v, budget, lo, hi, rule, &o).unwrap();
                    assert_eq!(out.iter().sum::<i64>(), budget);
                    assert!(
                        out.iter().all(|&c| c >= lo && c <= hi),
                        "{out:?} [{lo},{hi}]"
                    );
                }
            }
        }
    }

    #[test]
    fn exploration_budget_for_unseen_prompts() {
        let v = [0.2, 0.0, 0.1, 0.05];
        let unseen = [false, true, false, true];
        let o = Options {
            unseen: Some(&unseen),
            ..Options::default()
        };
        // Unseen get 4 each; seen share 16 in proportion 0.2 : 0.1 → 10.67, 5.33 → 11, 5.
        assert_eq!(
            allocate(&v, 24, 2, 12, Rule::Proportional, &o).unwrap(),
            vec![11, 4, 5, 4]
        );
        // exploration clamped into [lo, hi] = [6, 12]: unseen get 6.
        assert_eq!(
            allocate(&v, 24, 6, 12, Rule::Proportional, &o).unwrap(),
            vec![6, 6, 6, 6]
        );
        // Seen prompts full at hi: the unseen ones share the rest evenly.
        assert_eq!(
            allocate(&v, 40, 2, 12, Rule::Proportional, &o).unwrap(),
            vec![12, 8, 12, 8]
        );
        // Neyman on the seen prompts: exact optimum of 0.2/a + 0.1/b with a + b = 16.
        assert_eq!(
            allocate(&v, 24, 2, 12, Rule::Neyman, &o).unwrap(),
            vec![9, 4, 7, 4]
        );
        let all = [true; 4];
        let o = Options {
            unseen: Some(&all),
            exploration_rollouts: Some(3),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 14, 2, 12, Rule::Neyman, &o).unwrap(),
            vec![4, 4, 3, 3]
        );
    }

    #[test]
    fn mastered_prompts_get_the_floor() {
        let v = [0.2, 0.2, 0.2];
        let rates = [0.9, 0.5, 0.85];
        let o = Options {
            pass_rates: Some(&rates),
            ..Options::default()
        };
        // Proportional priorities 0.01, 0.2, 0.01 with budget 21 → 1, 19, 1.
        assert_eq!(
            allocate(&v, 21, 0, 30, Rule::Proportional, &o).unwrap(),
            vec![1, 19, 1]
        );
        let o = Options {
            pass_rates: Some(&rates),
            priority_floor: Some(0.0),
            ..o
        };
        assert_eq!(
            allocate(&v, 21, 1, 30, Rule::Neyman, &o).unwrap(),
            vec![1, 19, 1]
        );
    }

    #[test]
    fn options_that_cannot_apply_are_refused() {
        let v = [0.1, 0.2];
        let u = [true, false];
        let o = Options {
            unseen: Some(&u),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 4, 1, 3, Rule::Uniform, &o)
                .unwrap_err()
                .to_string(),
            "unseen does not apply to rule 'uniform' (it takes no options)"
        );
        let o = Options {
            exploration_rollouts: Some(2),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 4, 1, 3, Rule::Proportional, &o)
                .unwrap_err()
                .to_string(),
            "exploration_rollouts has no effect without unseen"
        );
        let o = Options {
            priority_floor: Some(0.1),
            ..Options::default()
        };
        assert!(allocate(&v, 4, 1, 3, Rule::Neyman, &o).is_err());
        assert!(allocate(&v, 4, 1, 3, Rule::Proportional, &o).is_ok());
        let short = [true];
        let o = Options {
            unseen: Some(&short),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 4, 1, 3, Rule::Neyman, &o)
                .unwrap_err()
                .to_string(),
            "unseen has length 1 but variances has length 2"
        );
        let rates = [0.5, 1.5];
        let o = Options {
            pass_rates: Some(&rates),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 4, 1, 3, Rule::Neyman, &o)
                .unwrap_err()
                .to_string(),
            "pass_rates[1] = 1.5 is outside [0, 1]"
        );
    }

    #[test]
    fn skip_factor_and_min_rollouts_are_neyman_lo_zero_options() {
        let v = [0.25, 0.25, 0.01, 0.01];
        let skip = Options {
            skip_factor: Some(4.0),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 8, 0, 8, Rule::Neyman, &skip).unwrap(),
            vec![4, 4, 0, 0]
        );
        let floor = Options {
            min_rollouts: Some(2),
            ..Options::default()
        };
        assert_eq!(
            allocate(&v, 7, 0, 8, Rule::Neyman, &floor).unwrap(),
            vec![3, 2, 2, 0]
        );
        // 0 / 1 = off: exactly today's result, with any lo.
        let off = Options {
            skip_factor: Some(0.0),
            min_rollouts: Some(1),
            ..Options::default()
        };
        for lo in [0, 1, 2] {
            assert_eq!(
                allocate(&v, 8, lo, 8, Rule::Neyman, &off).unwrap(),
                run(&v, 8, lo, 8, Rule::Neyman).unwrap()
            );
        }
        let err = |rule: Rule, lo: i64, o: &Options| {
            allocate(&v, 8, lo, 8, rule, o).unwrap_err().to_string()
        };
        assert_eq!(
            err(Rule::Proportional, 0, &skip),
            "skip_factor applies to rule 'neyman' only, got rule 'proportional'"
        );
        assert_eq!(
            err(Rule::Uniform, 0, &off),
            "skip_factor applies to rule 'neyman' only, got rule 'uniform'"
        );
        assert_eq!(
            err(Rule::Neyman, 1, &skip),
            "skip_factor requires lo = 0 (a skipped prompt gets 0 rollouts), got lo = 1"
        );
        let unseen = [false, true, false, false];
        let with_unseen = Options {
            unseen: Some(&unseen),
            ..skip
        };
        assert_eq!(
            err(Rule::Neyman, 0, &with_unseen),
            "skip_factor and min_rollouts cannot be combined with unseen (the reference's \
             exploration and mastery options)"
        );
        // Invalid variances are reported before the options.
        assert_eq!(
            allocate(&[0.1, f64::NAN], 2, 0, 8, Rule::Neyman, &skip)
                .unwrap_err()
                .to_string(),
            "variances[1] is NaN"
        );
    }
    #[test]
    fn estimators_minimise_the_shifted_objective_or_refuse() {
        let v = [0.2, 0.05, 0.0, 0.1];
        for e in [
            Estimator::Rloo,
            Estimator::DrGrpo,
            Estimator::ReinforceBaseline,
        ] {
            let o = Options {
                estimator: Some(e),
                ..Options::default()
            };
            // Exactly the Σ v/m problem with budget B − N and bounds lo−1..hi−1, plus one.
            let shifted: Vec<i64> = run(&v, 30 - 4, 1, 15, Rule::Neyman)
                .unwrap()
                .iter()
                .map(|c| c + 1)
                .collect();
            assert_eq!(allocate(&v, 30, 2, 16, Rule::Neyman, &o).unwrap(), shifted);
            let err = |lo: i64, rule: Rule, o: &Options| {
                allocate(&v, 16, lo, 8, rule, o).unwrap_err().to_string()
            };
            assert!(err(1, Rule::Neyman, &o)
                .contains("needs lo >= 2 (a group of one rollout has no baseline), got lo = 1"));
            assert!(err(0, Rule::Neyman, &o).contains("needs lo >= 2"));
            assert_eq!(
                err(2, Rule::Uniform, &o),
                format!("estimator applies to rule 'neyman' only, got rule 'uniform' with estimator '{}'", e.name())
            );
            let skip = Options {
                skip_factor: Some(4.0),
                min_rollouts: Some(2),
                ..o
            };
            assert!(err(0, Rule::Neyman, &skip)
                .starts_with("skip_factor is not supported with estimator"));
            let unseen = [false, true, false, false];
            let with_unseen = Options {
                unseen: Some(&unseen),
                ..o
            };
            assert!(err(2, Rule::Neyman, &with_unseen).contains("cannot be combined with unseen"));
        }
        let gn = Options {
            estimator: Some(Estimator::GroupNorm),
            ..Options::default()
        };
        assert!(allocate(&v, 16, 2, 8, Rule::Neyman, &gn)
            .unwrap_err()
            .to_string()
            .contains("needs the Beta posteriors"));
    }

    #[test]
    fn shifted_with_the_group_floor_serves_then_solves_exactly() {
        let mut rng = crate::neyman::tests::Rng::new(41);
        for _ in 0..2000 {
            let n = 1 + rng.below(8) as usize;
            let m = 2 + rng.below(3) as i64;
            let hi = m + rng.below(6) as i64;
            let budget = rng.below((n as i64 * hi + 1) as u64) as i64;
            let v: Vec<f64> = (0..n)
                .map(|_| if rng.below(4) == 0 { 0.0 } else { rng.unit() })
                .collect();
            let o = Options {
                estimator: Some(Estimator::Rloo),
                min_rollouts: Some(m),
                ..Options::default()
            };
            let plain_floor = Options {
                min_rollouts: Some(m),
                ..Options::default()
            };
            let Ok(out) = allocate(&v, budget, 0, hi, Rule::Neyman, &o) else {
                assert!(allocate(&v, budget, 0, hi, Rule::Neyman, &plain_floor).is_err());
                continue;
            };
            assert_eq!(out.iter().sum::<i64>(), budget);
            // The same prompts are served as with Σ v/n, each with 0 or m..hi rollouts, and the
            // served ones get the exact shifted optimum.
            let plain = allocate(&v, budget, 0, hi, Rule::Neyman, &plain_floor).unwrap();
            let served: Vec<usize> = (0..n).filter(|&i| out[i] > 0).collect();
            assert_eq!(served, (0..n).filter(|&i| plain[i] > 0).collect::<Vec<_>>());
            assert!(served.iter().all(|&i| out[i] >= m && out[i] <= hi));
            let sub: Vec<f64> = served.iter().map(|&i| v[i]).collect();
            let want = crate::estimator::solve_shifted(&sub, budget as u64, m as u64, hi as u64);
            let got: Vec<i64> = served.iter().map(|&i| out[i]).collect();
            assert_eq!(got, want);
        }
    }
}
