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
    /// Per-prompt noise scale s_i (finite, > 0, as long as `variances`): every rule except
    /// "uniform" works on w_i = s_i·v_i (the float64 product) instead of v_i, so "neyman" is the
    /// exact minimiser of Σ s_i·v_i/n_i (Σ s_i·v_i/(n_i − 1) with a shifted estimator) and
    /// "proportional" gives n ∝ max(s·v, floor). "uniform" only validates it. `None` = every
    /// s_i = 1, bit for bit.
    pub scale: Option<&'a [f64]>,
    /// Priced skipping (`priced.rs`): each prompt's cost of getting 0 rollouts, in the unit of
    /// the variances (finite, ≥ 0, as long as `variances`; multiplied by `scale` like them).
    /// Rule "neyman" with an rloo-family estimator, `lo = 0` and `min_rollouts ≥ 2` only; the
    /// result is the exact minimiser of Σ_served w_i/(n_i − 1) + Σ_skipped skip_cost_i.
    pub skip_costs: Option<&'a [f64]>,
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
    if let Some(costs) = options.skip_costs {
        return allocate_priced(variances, costs, budget, lo, hi, rule, options);
    }
    let selection = options.selection();
    let seen_weights = options.unseen.is_some() || options.pass_rates.is_some();
    let shifted = options.estimator.is_some();
    // With a scale every rule sees w = s·v (and the guard s·guard, in the same units). The plain
    // "neyman" solve (Σ w/n or Σ w/(n − 1)) reads the products where it needs them (no stored
    // copy of w on the paths the scan decides); every other path stores w first.
    let direct = options.scale.filter(|s| {
        s.len() == variances.len()
            && rule == Rule::Neyman
            && guard.is_none()
            && !seen_weights
            && !selection.active()
            && options
                .estimator
                .is_none_or(|e| e.objective() == Objective::Shifted)
    });
    if let Some(s) = direct {
        // Shifted: the Σ w/m problem over m = n − 1 (see `estimator::solve_shifted`).
        let (l, h) = if shifted && lo >= 1 {
            (lo - 1, hi - 1)
        } else {
            (lo, hi)
        };
        let scan = neyman::scan_scaled(variances, s, l, h);
        if scan.first_invalid.is_some() {
            return Err(scaled_input_error(variances, s));
        }
        check_options(variances.len(), rule, options)?;
        if let Some(e) = options.estimator {
            check_estimator(e, rule, options, lo as i64)?;
        }
        check_selection(
            rule,
            options,
            &selection,
            budget as i64,
            lo as i64,
            hi as i64,
        )?;
        return Ok(if shifted {
            estimator::solve_shifted_scaled(variances, s, budget, lo, hi, &scan)
        } else {
            neyman::solve_scaled(variances, s, budget, lo, hi, &scan)
        });
    }
    let weighted = options
        .scale
        .map(|s| scale_variances(variances, s, "variances"))
        .transpose()?;
    let weighted_guard = match (options.scale, guard) {
        (Some(s), Some(g)) => Some(scale_values(g, s)),
        _ => None,
    };
    let variances = weighted.as_deref().unwrap_or(variances);
    let guard = weighted_guard.as_deref().or(guard);
    let scan = neyman::scan(variances, lo, hi);
    if let Some(i) = scan.first_invalid {
        return Err(describe_invalid("variances", i, variances[i]));
    }
    check_options(variances.len(), rule, options)?;
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

/// Priced skipping (`Options::skip_costs`): its preconditions, then the exact DP of `priced.rs`
/// on w = s·v and s·skip_cost.
fn allocate_priced(
    variances: &[f64],
    costs: &[f64],
    budget: u64,
    lo: u64,
    hi: u64,
    rule: Rule,
    options: &Options,
) -> Result<Vec<i64>> {
    crate::priced::check_settings(
        "skip_costs",
        rule,
        options.estimator,
        lo as i64,
        options.min_rollouts,
        options.skip_factor,
    )?;
    for (name, given) in [
        ("unseen", options.unseen.is_some()),
        ("pass_rates", options.pass_rates.is_some()),
    ] {
        if given {
            return Err(Error::invalid(format!(
                "skip_costs cannot be combined with {name}"
            )));
        }
    }
    let m = options.min_rollouts.unwrap_or(0) as u64; // >= 2: check_settings
    crate::priced::check(variances, costs, budget, m, hi)?;
    let Some(s) = options.scale else {
        return Ok(crate::priced::solve(variances, costs, budget, m, hi));
    };
    check_scale(s, variances.len(), "variances")?;
    let w: Vec<f64> = variances.iter().zip(s).map(|(x, y)| x * y).collect();
    let c: Vec<f64> = costs.iter().zip(s).map(|(x, y)| x * y).collect();
    // A product can still overflow to +inf: named by check.
    crate::priced::check(&w, &c, budget, m, hi)?;
    Ok(crate::priced::solve(&w, &c, budget, m, hi))
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

/// Largest input handled by one call of the product kernel (a stack-free, branch-free loop).
const SCALE_BLOCK: usize = 1 << 12;

/// w_i = s_i·v_i, the float64 product (exactly v_i where s_i = 1). Checks, in this order: the
/// variances (NaN, infinite, negative: `describe_invalid`), the length of `scale` (`other` names
/// the array it must match), each s_i finite and > 0, each product finite. One fused pass when
/// everything is valid; the errors are located by a second look only on failure.
pub fn scale_variances(v: &[f64], scale: &[f64], other: &str) -> Result<Vec<f64>> {
    if scale.len() != v.len() {
        if let Some(i) = v.iter().position(|&x| !(0.0..f64::INFINITY).contains(&x)) {
            return Err(describe_invalid("variances", i, v[i]));
        }
        return Err(Error::invalid(format!(
            "scale has length {} but {other} has length {}",
            scale.len(),
            v.len()
        )));
    }
    let mut w = vec![0.0f64; v.len()];
    let bad: u64 = crate::parallel::map_chunks_mut(v, &mut w, |offset, vs, ws| {
        let s = &scale[offset..offset + vs.len()];
        let mut bad = 0u64;
        for ((vb, sb), wb) in vs
            .chunks(SCALE_BLOCK)
            .zip(s.chunks(SCALE_BLOCK))
            .zip(ws.chunks_mut(SCALE_BLOCK))
        {
            bad += scale_block(vb, sb, wb);
        }
        bad
    })
    .into_iter()
    .sum();
    if bad > 0 {
        // The variances' own errors come first (as without a scale), then the scale's, then
        // a product that overflows.
        if let Some(i) = v.iter().position(|&x| !(0.0..f64::INFINITY).contains(&x)) {
            return Err(describe_invalid("variances", i, v[i]));
        }
        if let Some(i) = scale.iter().position(|&x| !(x > 0.0 && x < f64::INFINITY)) {
            return Err(describe_invalid_scale(i, scale[i]));
        }
        let i = w.iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(Error::invalid(format!(
            "scale[{i}] * {other}[{i}] overflows float64 ({:?} * {:?})",
            scale[i], v[i]
        )));
    }
    Ok(w)
}

/// The error of an input that `neyman::scan_scaled` flagged (see [`scale_variances`]).
fn scaled_input_error(v: &[f64], s: &[f64]) -> Error {
    match scale_variances(v, s, "variances") {
        Err(e) => e,
        Ok(_) => Error::invalid("variances or scale hold an invalid value"),
    }
}

/// Writes `w = v·s` for one block; returns the number of entries where `s` is not finite and
/// > 0 or `w` is not finite and ≥ 0 (covers invalid variances too: NaN, ∞ or negative stay so).
#[inline]
fn scale_block(v: &[f64], s: &[f64], w: &mut [f64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(v: &[f64], s: &[f64], w: &mut [f64]) -> u64 {
            scale_block_generic(v, s, w)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { avx2(v, s, w) };
        }
    }
    scale_block_generic(v, s, w)
}

#[inline(always)]
#[allow(clippy::manual_range_contains)] // `&` rather than `&&` keeps the loop branch-free
fn scale_block_generic(v: &[f64], s: &[f64], w: &mut [f64]) -> u64 {
    let mut bad = 0u64;
    for ((&x, &y), o) in v.iter().zip(s).zip(w.iter_mut()) {
        let p = x * y;
        *o = p;
        bad += (!((y > 0.0) & (y <= f64::MAX) & (p >= 0.0) & (p <= f64::MAX))) as u64;
    }
    bad
}

/// `g_i · s_i` for a guard already validated (finite, ≥ 0) and a validated scale; a product that
/// overflows saturates at f64::MAX (a guard only has to compare above the cut).
fn scale_values(g: &[f64], s: &[f64]) -> Vec<f64> {
    g.iter()
        .zip(s)
        .map(|(&x, &y)| (x * y).min(f64::MAX))
        .collect()
}

/// The message for an invalid scale entry: "scale[3] is NaN", "... is zero", ...
pub fn describe_invalid_scale(index: usize, value: f64) -> Error {
    let problem = if value.is_nan() {
        "is NaN".to_string()
    } else if value.is_infinite() {
        format!("is infinite ({value})")
    } else if value == 0.0 {
        format!("is zero ({value:?}); a scale must be > 0")
    } else {
        format!("is negative ({value:?}); a scale must be > 0")
    };
    Error::invalid(format!("scale[{index}] {problem}"))
}

/// Checks a scale on its own (length `n`, finite, > 0): for callers that do not multiply
/// variances by it (rule "uniform", group_norm's cost factors).
pub fn check_scale(scale: &[f64], n: usize, other: &str) -> Result<()> {
    if scale.len() != n {
        return Err(Error::invalid(format!(
            "scale has length {} but {other} has length {n}",
            scale.len()
        )));
    }
    match scale.iter().position(|&x| !(x > 0.0 && x < f64::INFINITY)) {
        Some(i) => Err(describe_invalid_scale(i, scale[i])),
        None => Ok(()),
    }
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
pub(crate) fn check_selection(
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

pub(crate) fn check_options(n: usize, rule: Rule, o: &Options) -> Result<()> {
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

    /// Brute-force DP over Σ cost(i, n_i), n_i ∈ [lo, hi], Σ n_i = budget; the minimum.
    fn dp_min(n: usize, budget: u64, lo: u64, hi: u64, cost: impl Fn(usize, u64) -> f64) -> f64 {
        let b = budget as usize;
        let mut best = vec![f64::INFINITY; b + 1];
        best[0] = 0.0;
        for i in 0..n {
            let mut next = vec![f64::INFINITY; b + 1];
            for (used, &so_far) in best.iter().enumerate() {
                if so_far.is_infinite() {
                    continue;
                }
                for k in lo..=hi {
                    let t = used + k as usize;
                    if t > b {
                        break;
                    }
                    next[t] = next[t].min(so_far + cost(i, k));
                }
            }
            best = next;
        }
        best[b]
    }

    /// Noise scales as measured: spread over 0.02–7× (plus ties and extremes).
    fn random_scale(rng: &mut crate::neyman::tests::Rng, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| match rng.below(6) {
                0 => 1.0,
                1 => 0.02,
                2 => 7.0,
                _ => 0.02 * 350f64.powf(rng.unit()),
            })
            .collect()
    }

    #[test]
    fn scale_gives_the_exact_minimiser_of_the_weighted_objective() {
        let mut rng = crate::neyman::tests::Rng::new(97);
        for case in 0..3000 {
            let n = 1 + rng.below(6) as usize;
            let shifted = case % 2 == 1;
            let lo = if shifted {
                2 + rng.below(2)
            } else {
                rng.below(3)
            };
            let hi = lo + rng.below(6);
            let (min, max) = (n as u64 * lo, n as u64 * hi);
            let budget = match case % 5 {
                0 => min,
                1 => max,
                _ => min + rng.below(max - min + 1),
            };
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    if rng.below(4) == 0 {
                        0.0
                    } else {
                        rng.unit() * 0.25
                    }
                })
                .collect();
            let s = random_scale(&mut rng, n);
            let w: Vec<f64> = v.iter().zip(&s).map(|(x, y)| x * y).collect();
            let e = shifted.then(|| [Estimator::Rloo, Estimator::DrGrpo][case % 4 / 2]);
            let o = Options {
                estimator: e,
                scale: Some(&s),
                ..Options::default()
            };
            let got = allocate(&v, budget as i64, lo as i64, hi as i64, Rule::Neyman, &o).unwrap();
            // Exactly the unscaled solver on w = s·v (same ties).
            let on_w = Options {
                estimator: e,
                ..Options::default()
            };
            assert_eq!(
                got,
                allocate(&w, budget as i64, lo as i64, hi as i64, Rule::Neyman, &on_w).unwrap()
            );
            let positive = w.iter().filter(|&&x| x > 0.0).count() as u64;
            if lo == 0 && budget < positive {
                continue; // every allocation is infinite: the documented rule decides
            }
            let m = |k: u64| if shifted { k - 1 } else { k };
            let cost = |i: usize, k: u64| {
                if v[i] == 0.0 {
                    0.0
                } else if m(k) == 0 {
                    f64::INFINITY
                } else {
                    s[i] * v[i] / m(k) as f64
                }
            };
            let best = dp_min(n, budget, lo, hi, cost);
            let ours: f64 = (0..n).map(|i| cost(i, got[i] as u64)).sum();
            assert!(
                (ours - best).abs() <= 1e-12 * best.max(1e-300),
                "v={v:?} s={s:?} {budget} [{lo}, {hi}] {e:?}: {got:?} {ours} vs {best}"
            );
        }
    }

    #[test]
    fn scale_with_the_other_rules_and_switches() {
        let mut rng = crate::neyman::tests::Rng::new(5);
        for _ in 0..500 {
            let n = 1 + rng.below(12) as usize;
            let hi = 2 + rng.below(10) as i64;
            let budget = rng.below(n as u64 * hi as u64 + 1) as i64;
            let v: Vec<f64> = (0..n)
                .map(|_| if rng.below(4) == 0 { 0.0 } else { rng.unit() })
                .collect();
            let s = random_scale(&mut rng, n);
            let w: Vec<f64> = v.iter().zip(&s).map(|(x, y)| x * y).collect();
            let with = |o: Options, rule: Rule| {
                allocate(
                    &v,
                    budget,
                    0,
                    hi,
                    rule,
                    &Options {
                        scale: Some(&s),
                        ..o
                    },
                )
            };
            let on_w = |o: Options, rule: Rule| allocate(&w, budget, 0, hi, rule, &o);
            // Proportional: n ∝ max(s·v, floor); skipping and the group floor: on s·v.
            for (o, rule) in [
                (Options::default(), Rule::Proportional),
                (
                    Options {
                        skip_factor: Some(4.0),
                        ..Options::default()
                    },
                    Rule::Neyman,
                ),
                (
                    Options {
                        min_rollouts: Some(2),
                        ..Options::default()
                    },
                    Rule::Neyman,
                ),
            ] {
                match (with(o, rule), on_w(o, rule)) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                    (a, b) => panic!("{a:?} vs {b:?}"),
                }
            }
            // Uniform ignores it.
            assert_eq!(
                with(Options::default(), Rule::Uniform).unwrap(),
                uniform(n, budget as u64)
            );
        }
    }

    #[test]
    fn unit_scale_is_bit_for_bit_no_scale() {
        let mut rng = crate::neyman::tests::Rng::new(3);
        let v: Vec<f64> = (0..100_000)
            .map(|i| if i % 3 == 0 { 0.0 } else { rng.unit() * 0.25 })
            .collect();
        let ones = vec![1.0; v.len()];
        for (lo, hi, e) in [
            (0i64, 64i64, None),
            (8, 24, None),
            (2, 64, Some(Estimator::Rloo)),
        ] {
            let plain = Options {
                estimator: e,
                ..Options::default()
            };
            let unit = Options {
                scale: Some(&ones),
                ..plain
            };
            let budget = 16 * v.len() as i64;
            assert_eq!(
                allocate(&v, budget, lo, hi, Rule::Neyman, &plain).unwrap(),
                allocate(&v, budget, lo, hi, Rule::Neyman, &unit).unwrap()
            );
        }
    }

    #[test]
    fn bad_scales_are_named_by_index_and_value() {
        let v = [0.1, 0.2, 0.0, 0.3];
        let err = |s: &[f64], v: &[f64], rule: Rule| {
            allocate(
                v,
                8,
                2,
                4,
                rule,
                &Options {
                    scale: Some(s),
                    ..Options::default()
                },
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            err(&[1.0, 1.0, 1.0], &v, Rule::Neyman),
            "scale has length 3 but variances has length 4"
        );
        assert_eq!(
            err(&[1.0, f64::NAN, 1.0, 1.0], &v, Rule::Neyman),
            "scale[1] is NaN"
        );
        assert_eq!(
            err(&[1.0, 1.0, 1.0, f64::INFINITY], &v, Rule::Uniform),
            "scale[3] is infinite (inf)"
        );
        assert_eq!(
            err(&[1.0, 1.0, 0.0, 1.0], &v, Rule::Proportional),
            "scale[2] is zero (0.0); a scale must be > 0"
        );
        assert_eq!(
            err(&[-2.0, 1.0, 1.0, 1.0], &v, Rule::Neyman),
            "scale[0] is negative (-2.0); a scale must be > 0"
        );
        // The variances' own errors come first, also with a scale of the wrong length.
        let bad_v = [0.1, f64::NAN, 0.0, 0.3];
        assert_eq!(
            err(&[0.0, 1.0, 1.0, 1.0], &bad_v, Rule::Neyman),
            "variances[1] is NaN"
        );
        assert_eq!(err(&[1.0], &bad_v, Rule::Neyman), "variances[1] is NaN");
        assert_eq!(
            err(
                &[1.0, 1.0, 1e300, 1e300],
                &[0.1, 0.2, 0.0, 1e10],
                Rule::Neyman
            ),
            "scale[3] * variances[3] overflows float64 (1e300 * 10000000000.0)"
        );
        // A large input finds the first bad entry too.
        let big = vec![0.2; 200_000];
        let mut s = vec![1.0; 200_000];
        s[150_001] = -0.0;
        assert_eq!(
            allocate(
                &big,
                400_000,
                0,
                4,
                Rule::Neyman,
                &Options {
                    scale: Some(&s),
                    ..Options::default()
                }
            )
            .unwrap_err()
            .to_string(),
            "scale[150001] is zero (-0.0); a scale must be > 0"
        );
    }

    #[test]
    fn scaled_paths_equal_the_solver_on_stored_products() {
        // Every path of the direct solve (lower bounds, all positive gains, threshold search,
        // budget below the positive count, tiny products) against the solver on w = s·v.
        let mut rng = crate::neyman::tests::Rng::new(23);
        for n in [7usize, 3_000, 150_000] {
            let v: Vec<f64> = (0..n)
                .map(|i| match i % 7 {
                    0 | 1 => 0.0,
                    2 => 1e-310, // subnormal: its products underflow or stay tiny
                    _ => rng.unit() * 0.25,
                })
                .collect();
            let s: Vec<f64> = (0..n)
                .map(|i| {
                    if i % 11 == 0 {
                        1e-20
                    } else {
                        0.02 * 350f64.powf(rng.unit())
                    }
                })
                .collect();
            let w: Vec<f64> = v.iter().zip(&s).map(|(x, y)| x * y).collect();
            let n = n as i64;
            let cases = [
                (8, 24, 8 * n, None),
                (8, 24, 16 * n, None),
                (8, 24, 24 * n - 1, None),
                (0, 64, 16 * n, None),
                (0, 64, n / 3, None),
                (0, 64, 0, None),
                (1, 4, 3 * n + 5, None),
                (2, 24, 16 * n, Some(Estimator::Rloo)),
                (2, 64, 2 * n, Some(Estimator::ReinforceBaseline)),
                (3, 9, 9 * n, Some(Estimator::DrGrpo)),
            ];
            for (lo, hi, budget, e) in cases {
                let scaled = Options {
                    estimator: e,
                    scale: Some(&s),
                    ..Options::default()
                };
                let plain = Options {
                    estimator: e,
                    ..Options::default()
                };
                assert_eq!(
                    allocate(&v, budget, lo, hi, Rule::Neyman, &scaled).unwrap(),
                    allocate(&w, budget, lo, hi, Rule::Neyman, &plain).unwrap(),
                    "n={n} [{lo}, {hi}] budget {budget} {e:?}"
                );
            }
        }
    }
}
