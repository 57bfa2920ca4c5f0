//! Every problem with a set of allocation settings, found at once (pure Rust, no PyO3).
//!
//! `allocate` and `PassRatePool::allocate` stop at their first bad argument; a launcher wants
//! the whole list before a run starts, in the same words. [`problems`] runs the very checks
//! those calls run (`allocate::check_bounds`, `allocate::check_selection`,
//! `allocate::check_estimator` with `Estimator::check`, `allocate::check_options`, the pool's
//! `check_reference_options`, `check_uniform_switch`, `check_pool_estimator`,
//! `check_skip_price_settings` (with `priced::check_settings`), `check_explore_seed`,
//! `check_prior` and `check_forget`, and `filter::check_filter_band` of the trainer's rule
//! "filter") on settings instead of data, one check family at a time,
//! and tags each message with the [`Subject`] it is about, so that a caller can name its own
//! flag for it. No rule is restated here: a message is exactly what the allocation call would
//! raise. The one exception is asked for explicitly ([`Settings::run_policies`]): a trainer's
//! run policy that no allocation call enforces ([`check_skip_budget`]), kept here so that the
//! launcher and the library read every allocation rule from one place.

use crate::allocate::{
    check_bounds, check_estimator, check_options, check_selection, Options, Rule,
};
use crate::error::Error;
use crate::estimator::Estimator;
use crate::filter::check_filter_band;
use crate::pool::{
    check_explore_seed, check_forget, check_noise_scale_switch, check_pool_estimator, check_prior,
    check_reference_options, check_skip_price_settings, check_uniform_switch, reference_switches,
    PoolAllocateOptions,
};
use crate::skip::Selection;

/// What a [`Problem`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `lo` and `hi` themselves: a negative bound, or `lo > hi`.
    Bounds,
    /// The budget against `prompts × [lo, hi]` (or a negative budget).
    Budget,
    /// The reference's exploration and mastery switches and their numbers.
    ReferenceOptions,
    /// Allocating on the revisit-calibrated variances.
    Calibrated,
    /// Weighing each prompt's variance by its learnt noise scale.
    NoiseScale,
    /// The band of rule "filter" (`filter::filter_counts`).
    FilterBand,
    SkipFactor,
    /// A run policy ([`Settings::run_policies`]): the skip rule's rollouts per prompt.
    SkipBudget,
    MinRollouts,
    Estimator,
    /// Priced skipping's price and preconditions.
    SkipPrice,
    ExploreSeed,
    Prior,
    Forget,
}

impl Subject {
    pub const NAMES: [&'static str; 14] = [
        "bounds",
        "budget",
        "reference_options",
        "calibrated",
        "noise_scale",
        "filter_band",
        "skip_factor",
        "skip_budget",
        "min_rollouts",
        "estimator",
        "skip_price",
        "explore_seed",
        "prior",
        "forget",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Subject::Bounds => "bounds",
            Subject::Budget => "budget",
            Subject::ReferenceOptions => "reference_options",
            Subject::Calibrated => "calibrated",
            Subject::NoiseScale => "noise_scale",
            Subject::FilterBand => "filter_band",
            Subject::SkipFactor => "skip_factor",
            Subject::SkipBudget => "skip_budget",
            Subject::MinRollouts => "min_rollouts",
            Subject::Estimator => "estimator",
            Subject::SkipPrice => "skip_price",
            Subject::ExploreSeed => "explore_seed",
            Subject::Prior => "prior",
            Subject::Forget => "forget",
        }
    }
}

/// One problem: what it is about and the message the allocation call raises for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub subject: Subject,
    pub message: String,
}

/// One allocation call's settings: `budget` rollouts over `prompts` prompts within
/// `[lo, hi]` each, by `rule` (`None`: only the bounds, budget and pool are checked) with the
/// switches as the call would get them (`None` = not given; the reference's switches and
/// `calibrated`, `explore_seed`, `skip_price` as `PassRatePool::allocate` takes them).
/// `prior` = (α₀, β₀) and `forget` of the pool the allocation reads, when there is one.
/// `filter_band`: the band of rule "filter" when it selects in front of the rule (rule
/// "uniform"). `run_policies`: also judge the trainer's run policies, which no allocation call enforces
/// ([`check_skip_budget`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    pub prompts: usize,
    pub budget: i64,
    pub lo: i64,
    pub hi: i64,
    pub rule: Option<Rule>,
    pub estimator: Option<Estimator>,
    pub skip_factor: Option<f64>,
    pub min_rollouts: Option<i64>,
    pub exploration: Option<bool>,
    pub mastery: Option<bool>,
    pub exploration_rollouts: Option<i64>,
    pub mastery_threshold: Option<f64>,
    pub priority_floor: Option<f64>,
    pub calibrated: Option<bool>,
    pub noise_scale: Option<bool>,
    pub filter_band: Option<f64>,
    pub explore_seed: Option<u64>,
    pub skip_price: Option<f64>,
    pub prior: Option<(f64, f64)>,
    pub forget: Option<f64>,
    pub run_policies: bool,
}

impl Settings {
    /// The switches as `PassRatePool::allocate` gets them.
    fn pool_options(&self) -> PoolAllocateOptions<'static> {
        PoolAllocateOptions {
            exploration: self.exploration,
            mastery: self.mastery,
            exploration_rollouts: self.exploration_rollouts,
            mastery_threshold: self.mastery_threshold,
            priority_floor: self.priority_floor,
            skip_factor: self.skip_factor,
            min_rollouts: self.min_rollouts,
            calibrated: self.calibrated,
            noise_scale: self.noise_scale,
            estimator: self.estimator,
            explore_seed: self.explore_seed,
            skip_price: self.skip_price,
            ..PoolAllocateOptions::default()
        }
    }
}

/// The reference options' own values (`exploration_rollouts` >= 0, a finite
/// `mastery_threshold`, `priority_floor` finite >= 0), as `allocate` checks them once the pool
/// has turned exploration/mastery into (here empty) `unseen`/`pass_rates`.
fn check_reference_values(rule: Rule, o: &PoolAllocateOptions) -> crate::Result<()> {
    check_reference_options(rule, o)?;
    let (exploration, mastery) = reference_switches(rule, o);
    let none: &[bool] = &[];
    let rates: &[f64] = &[];
    let options = Options {
        unseen: exploration.then_some(none),
        exploration_rollouts: o.exploration_rollouts,
        pass_rates: mastery.then_some(rates),
        mastery_threshold: o.mastery_threshold,
        priority_floor: o.priority_floor,
        ..Options::default()
    };
    check_options(0, rule, &options)
}

/// The fewest rollouts per prompt on average (budget / prompts) a run may give the skip rule.
pub const SKIP_MIN_MEAN_ROLLOUTS: i64 = 3;

/// A run policy, not an allocation rule (the skip rule is well defined at any budget, and
/// `allocate` takes it): a run with rule "neyman", `lo = 0` and `skip_factor > 0` needs at least
/// [`SKIP_MIN_MEAN_ROLLOUTS`] rollouts per prompt on average. Why: at n₀ = B/N rollouts each,
/// prompts of equal variance v (e.g. all unseen) have the shadow price λ = v/((n₀−1)n₀)
/// (`skip.rs`), and v < 4λ once n₀ < 2.56, so the default factor 4 would skip among equals,
/// i.e. at random; 3 leaves a margin. `prompts` = 0 (no step) passes.
pub fn check_skip_budget(
    rule: Rule,
    skip_factor: Option<f64>,
    prompts: usize,
    budget: i64,
    lo: i64,
) -> crate::Result<()> {
    let skipping = rule == Rule::Neyman && lo == 0 && skip_factor.is_some_and(|f| f > 0.0);
    if skipping && prompts > 0 && budget < SKIP_MIN_MEAN_ROLLOUTS * prompts as i64 {
        // two decimals, trailing zeros dropped: 2.67, 2.5, 2
        let mean = format!("{:.2}", budget as f64 / prompts as f64);
        let mean = mean.trim_end_matches('0').trim_end_matches('.');
        return Err(Error::invalid(format!(
            "skip_factor {} needs >= {SKIP_MIN_MEAN_ROLLOUTS} rollouts per prompt on average, got \
             {mean} (budget {budget} over {prompts} prompts): with fewer, prompts of equal variance \
             fall below the skip cut and are skipped at random",
            skip_factor.unwrap_or(0.0)
        )));
    }
    Ok(())
}

/// Every problem of `s`, at most one per [`Subject`], in the order of the subjects (empty:
/// an allocation call with these settings passes its argument checks for any valid data).
/// With a rule, the reference options, `calibrated`, `noise_scale` and `explore_seed` are judged
/// always (the pool checks them before the bounds); the other rule-dependent checks (skip
/// switches, estimator, skip price) only when the bounds and budget hold, as in the allocation
/// call, whose later checks assume them. With `run_policies`, [`check_skip_budget`] after a
/// valid `skip_factor`.
pub fn problems(s: &Settings) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut push = |subject: Subject, r: crate::Result<()>| {
        if let Err(e) = r {
            out.push(Problem {
                subject,
                message: e.to_string(),
            });
        }
    };
    // With no prompt and no budget only the signs and the order of lo and hi can fail.
    let bounds = check_bounds(0, 0, s.lo, s.hi).map(|_| ());
    let bounds_ok = bounds.is_ok();
    push(Subject::Bounds, bounds);
    let budget_ok = bounds_ok && check_bounds(s.prompts, s.budget, s.lo, s.hi).is_ok();
    if bounds_ok {
        push(
            Subject::Budget,
            check_bounds(s.prompts, s.budget, s.lo, s.hi).map(|_| ()),
        );
    }
    let pool = s.pool_options();
    // the filter's band is judged when given, whatever the rule (`filter_counts` checks it first)
    let filter = s.filter_band.map_or(Ok(()), check_filter_band);
    if let Some(rule) = s.rule {
        push(
            Subject::ReferenceOptions,
            check_reference_values(rule, &pool),
        );
        push(
            Subject::Calibrated,
            check_uniform_switch(rule, "calibrated", s.calibrated),
        );
        push(
            Subject::NoiseScale,
            check_noise_scale_switch(rule, s.noise_scale),
        );
    }
    push(Subject::FilterBand, filter);
    if let (Some(rule), true) = (s.rule, budget_ok) {
        for (subject, sel) in [
            (
                Subject::SkipFactor,
                Selection {
                    skip_factor: s.skip_factor,
                    min_rollouts: None,
                },
            ),
            (
                Subject::MinRollouts,
                Selection {
                    skip_factor: None,
                    min_rollouts: s.min_rollouts,
                },
            ),
        ] {
            let options = Options {
                skip_factor: sel.skip_factor,
                min_rollouts: sel.min_rollouts,
                ..Options::default()
            };
            let checked = check_selection(rule, &options, &sel, s.budget, s.lo, s.hi);
            let skip_ok = subject == Subject::SkipFactor && checked.is_ok();
            push(subject, checked);
            if skip_ok && s.run_policies {
                push(
                    Subject::SkipBudget,
                    check_skip_budget(rule, s.skip_factor, s.prompts, s.budget, s.lo),
                );
            }
        }
        if let Some(e) = s.estimator {
            let options = Options {
                skip_factor: s.skip_factor,
                min_rollouts: s.min_rollouts,
                ..Options::default()
            };
            push(
                Subject::Estimator,
                check_pool_estimator(e, rule, &pool)
                    .and_then(|_| check_estimator(e, rule, &options, s.lo)),
            );
        }
        push(
            Subject::SkipPrice,
            check_skip_price_settings(rule, &pool, s.lo),
        );
    }
    if s.rule.is_some() {
        push(Subject::ExploreSeed, check_explore_seed(&pool));
    }
    if let Some((a, b)) = s.prior {
        push(Subject::Prior, check_prior(a, b));
    }
    if let Some(f) = s.forget {
        push(Subject::Forget, check_forget(f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocate::allocate;
    use crate::pool::{PassRatePool, PoolAllocateOptions};

    fn settings(prompts: usize, budget: i64, lo: i64, hi: i64) -> Settings {
        Settings {
            prompts,
            budget,
            lo,
            hi,
            rule: Some(Rule::Neyman),
            ..Settings::default()
        }
    }

    fn found(s: &Settings) -> Vec<(&'static str, String)> {
        problems(s)
            .into_iter()
            .map(|p| (p.subject.name(), p.message))
            .collect()
    }

    /// The message `allocate` raises for the same settings (unit variances).
    fn allocate_error(s: &Settings) -> String {
        let v = vec![0.25; s.prompts];
        let o = Options {
            skip_factor: s.skip_factor,
            min_rollouts: s.min_rollouts,
            estimator: s.estimator,
            ..Options::default()
        };
        allocate(&v, s.budget, s.lo, s.hi, s.rule.unwrap(), &o)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn valid_settings_have_no_problem() {
        assert!(problems(&settings(16, 64, 2, 6)).is_empty());
        let s = Settings {
            skip_factor: Some(4.0),
            min_rollouts: Some(2),
            prior: Some((1.0, 1.0)),
            forget: Some(1.0),
            ..settings(32, 64, 0, 8)
        };
        assert!(problems(&s).is_empty());
        let s = Settings {
            estimator: Some(Estimator::Rloo),
            min_rollouts: Some(2),
            ..settings(32, 64, 0, 8)
        };
        assert!(problems(&s).is_empty());
        // no rule: the rule-dependent switches are not looked at
        let s = Settings {
            rule: None,
            skip_factor: Some(f64::NAN),
            ..settings(4, 8, 2, 2)
        };
        assert!(problems(&s).is_empty());
    }

    #[test]
    fn each_problem_is_the_allocation_calls_message() {
        let cases = [
            (
                settings(4, 8, 3, 1),
                "bounds",
                "lo (3) must not exceed hi (1)",
            ),
            (
                settings(4, 8, -1, 4),
                "bounds",
                "lo must be non-negative, got -1",
            ),
            (
                settings(48, 128, 4, 16),
                "budget",
                "budget 128 is infeasible: must lie in [N*lo, N*hi] = [192, 768] for N=48, \
                 lo=4, hi=16",
            ),
            (
                settings(4, -8, 0, 4),
                "budget",
                "budget must be non-negative, got -8",
            ),
            (
                Settings {
                    skip_factor: Some(4.0),
                    ..settings(8, 32, 2, 8)
                },
                "skip_factor",
                "skip_factor requires lo = 0 (a skipped prompt gets 0 rollouts), got lo = 2",
            ),
            (
                Settings {
                    skip_factor: Some(f64::NAN),
                    ..settings(8, 32, 0, 8)
                },
                "skip_factor",
                "skip_factor must be a finite non-negative number, got NaN",
            ),
            (
                Settings {
                    rule: Some(Rule::Uniform),
                    min_rollouts: Some(2),
                    ..settings(8, 32, 0, 8)
                },
                "min_rollouts",
                "min_rollouts applies to rule 'neyman' only, got rule 'uniform'",
            ),
            (
                Settings {
                    min_rollouts: Some(9),
                    ..settings(8, 32, 0, 8)
                },
                "min_rollouts",
                "min_rollouts (9) must not exceed hi (8)",
            ),
            (
                Settings {
                    min_rollouts: Some(3),
                    ..settings(2, 5, 0, 4)
                },
                "min_rollouts",
                "budget 5 cannot be split into groups of min_rollouts..hi = 3..4 rollouts \
                 (no count c with c*3 <= 5 <= c*4)",
            ),
            (
                Settings {
                    estimator: Some(Estimator::Rloo),
                    ..settings(2, 8, 1, 6)
                },
                "estimator",
                "estimator 'rloo' needs lo >= 2 (a group of one rollout has no baseline), got \
                 lo = 1; to let prompts be skipped use lo = 0 with min_rollouts >= 2",
            ),
            (
                Settings {
                    estimator: Some(Estimator::Rloo),
                    rule: Some(Rule::Proportional),
                    ..settings(2, 8, 2, 6)
                },
                "estimator",
                "estimator applies to rule 'neyman' only, got rule 'proportional' with \
                 estimator 'rloo'",
            ),
        ];
        for (s, subject, message) in cases {
            assert_eq!(found(&s), vec![(subject, message.to_string())], "{s:?}");
            assert_eq!(allocate_error(&s), message, "{s:?}");
        }
    }

    #[test]
    fn every_problem_at_once_one_per_subject() {
        let s = Settings {
            skip_factor: Some(-1.0),
            min_rollouts: Some(12),
            estimator: Some(Estimator::GroupNorm),
            prior: Some((0.0, 1.0)),
            forget: Some(1.5),
            ..settings(8, 32, 0, 8)
        };
        let subjects: Vec<_> = found(&s).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            subjects,
            [
                "skip_factor",
                "min_rollouts",
                "estimator",
                "prior",
                "forget"
            ]
        );
        let p = found(&s);
        assert_eq!(
            p[3].1,
            "prior alpha0 must be a finite positive number, got 0"
        );
        assert_eq!(p[4].1, "forget must lie in (0, 1], got 1.5");
        // bad bounds: the budget and the rule's switches are not judged against them
        let s = Settings {
            skip_factor: Some(-1.0),
            forget: Some(0.0),
            ..settings(8, 32, 9, 8)
        };
        let subjects: Vec<_> = found(&s).into_iter().map(|(k, _)| k).collect();
        assert_eq!(subjects, ["bounds", "forget"]);
        // an infeasible budget: the switches are not judged either
        let s = Settings {
            skip_factor: Some(-1.0),
            ..settings(8, 100, 0, 8)
        };
        let subjects: Vec<_> = found(&s).into_iter().map(|(k, _)| k).collect();
        assert_eq!(subjects, ["budget"]);
    }

    /// The message `PassRatePool::allocate` raises for the same settings (an empty pool).
    fn pool_error(s: &Settings) -> String {
        let pool = PassRatePool::new(1.0, 1.0, 1.0, 0).unwrap();
        let ids: Vec<i64> = (0..s.prompts as i64).collect();
        pool.allocate(
            &ids,
            s.budget,
            s.lo,
            s.hi,
            s.rule.unwrap(),
            &s.pool_options(),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn the_pools_switches_are_judged_with_the_pools_messages() {
        let rloo = Some(Estimator::Rloo);
        let cases = [
            (
                Settings {
                    rule: Some(Rule::Uniform),
                    mastery: Some(true),
                    ..settings(8, 32, 2, 8)
                },
                "reference_options",
                "mastery does not apply to rule 'uniform' (it takes no options)",
            ),
            (
                Settings {
                    exploration_rollouts: Some(4),
                    ..settings(8, 32, 2, 8)
                },
                "reference_options",
                "exploration_rollouts has no effect without exploration",
            ),
            (
                Settings {
                    rule: Some(Rule::Proportional),
                    exploration_rollouts: Some(-1),
                    ..settings(8, 32, 2, 8)
                },
                "reference_options",
                "exploration_rollouts must be non-negative, got -1",
            ),
            (
                Settings {
                    rule: Some(Rule::Proportional),
                    priority_floor: Some(f64::NAN),
                    ..settings(8, 32, 2, 8)
                },
                "reference_options",
                "priority_floor must be a finite non-negative number, got NaN",
            ),
            (
                Settings {
                    rule: Some(Rule::Uniform),
                    calibrated: Some(true),
                    ..settings(8, 32, 2, 8)
                },
                "calibrated",
                "calibrated does not apply to rule 'uniform' (it takes no options)",
            ),
            (
                Settings {
                    rule: Some(Rule::Uniform),
                    noise_scale: Some(true),
                    ..settings(8, 32, 2, 8)
                },
                "noise_scale",
                "noise_scale does not apply to rule 'uniform' (it weighs each prompt's variance by \
                 its noise scale: only rules 'neyman' and 'proportional' weigh prompts by variance)",
            ),
            (
                Settings {
                    estimator: rloo,
                    mastery: Some(true),
                    ..settings(8, 32, 2, 8)
                },
                "estimator",
                "estimator 'rloo' cannot be combined with mastery (the reference's exploration \
                 and mastery options)",
            ),
            (
                Settings {
                    estimator: rloo,
                    min_rollouts: Some(2),
                    skip_price: Some(f64::NAN),
                    ..settings(8, 32, 0, 8)
                },
                "skip_price",
                "skip_price must be finite and > 0, got NaN",
            ),
            (
                Settings {
                    skip_price: Some(4.0),
                    ..settings(8, 32, 2, 8)
                },
                "skip_price",
                "skip_price (priced skipping) needs rule 'neyman', estimator 'rloo', 'dr_grpo' \
                 or 'reinforce_baseline', lo = 0 and min_rollouts >= 2 (a skipped prompt gets 0 \
                 rollouts, a served one a baseline); got rule 'neyman', estimator none, lo = 2, \
                 min_rollouts none",
            ),
            (
                Settings {
                    estimator: rloo,
                    skip_price: Some(4.0),
                    ..settings(8, 32, 2, 8)
                },
                "skip_price",
                "skip_price (priced skipping) needs rule 'neyman', estimator 'rloo', 'dr_grpo' \
                 or 'reinforce_baseline', lo = 0 and min_rollouts >= 2 (a skipped prompt gets 0 \
                 rollouts, a served one a baseline); got rule 'neyman', estimator 'rloo', lo = 2, \
                 min_rollouts none",
            ),
            (
                Settings {
                    estimator: Some(Estimator::GroupNorm),
                    skip_price: Some(4.0),
                    ..settings(8, 32, 2, 8)
                },
                "skip_price",
                "skip_price is not supported with estimator 'group_norm' (its skip price is \
                 derived for the rloo family's sum v/(n-1)); use estimator 'rloo'",
            ),
            (
                Settings {
                    explore_seed: Some(3),
                    ..settings(8, 32, 2, 8)
                },
                "explore_seed",
                "explore_seed applies to the skipping rules only (skip_factor > 0 or \
                 skip_price), got skip_factor = None",
            ),
        ];
        for (s, subject, message) in cases {
            assert_eq!(found(&s), vec![(subject, message.to_string())], "{s:?}");
            assert_eq!(pool_error(&s), message, "{s:?}");
        }
        // the same priced-skipping preconditions for allocate's skip_costs, under that name
        let o = Options {
            estimator: rloo,
            skip_costs: Some(&[0.1; 4]),
            ..Options::default()
        };
        let e = allocate(&[0.25; 4], 16, 2, 8, Rule::Neyman, &o).unwrap_err();
        assert_eq!(
            e.to_string(),
            "skip_costs (priced skipping) needs rule 'neyman', estimator 'rloo', 'dr_grpo' or \
             'reinforce_baseline', lo = 0 and min_rollouts >= 2 (a skipped prompt gets 0 \
             rollouts, a served one a baseline); got rule 'neyman', estimator 'rloo', lo = 2, \
             min_rollouts none"
        );
        // accepted: priced skipping with its preconditions, exploring; the reference options
        // with rule proportional
        let s = Settings {
            estimator: rloo,
            min_rollouts: Some(2),
            skip_price: Some(4.0),
            explore_seed: Some(7),
            calibrated: Some(true),
            ..settings(16, 64, 0, 16)
        };
        assert!(problems(&s).is_empty());
        let s = Settings {
            rule: Some(Rule::Proportional),
            exploration_rollouts: Some(3),
            mastery_threshold: Some(0.9),
            priority_floor: Some(0.02),
            ..settings(16, 64, 2, 8)
        };
        assert!(problems(&s).is_empty());
    }

    #[test]
    fn the_filter_band_is_filter_counts_message() {
        let s = Settings {
            rule: Some(Rule::Uniform),
            filter_band: Some(0.6),
            ..settings(8, 32, 2, 8)
        };
        let message = crate::filter::filter_counts(&[0.5; 8], &[0.25; 8], 32, 2, 8, 0.6)
            .unwrap_err()
            .to_string();
        assert_eq!(message, "filter_band must lie in [0, 0.5), got 0.6");
        assert_eq!(found(&s), [("filter_band", message)]);
        // judged whatever the bounds, in the subjects' order
        let s = Settings {
            filter_band: Some(f64::NAN),
            noise_scale: Some(true),
            ..s
        };
        let bad_bounds = Settings { lo: 9, ..s };
        let subjects: Vec<_> = found(&bad_bounds).into_iter().map(|(k, _)| k).collect();
        assert_eq!(subjects, ["bounds", "noise_scale", "filter_band"]);
        let ok = Settings {
            filter_band: Some(0.0),
            noise_scale: None,
            ..s
        };
        assert!(problems(&ok).is_empty());
    }

    #[test]
    fn the_skip_budget_is_a_run_policy_judged_on_request() {
        // 2x over-sampling of 16 prompts x 8 rollouts: 128 over 48 candidates, 2.67 each
        let s = Settings {
            skip_factor: Some(4.0),
            ..settings(48, 128, 0, 32)
        };
        assert!(problems(&s).is_empty(), "the allocation call takes it");
        assert!(allocate(
            &[0.25; 48],
            128,
            0,
            32,
            Rule::Neyman,
            &Options {
                skip_factor: Some(4.0),
                ..Options::default()
            }
        )
        .is_ok());
        let run = Settings {
            run_policies: true,
            ..s
        };
        assert_eq!(
            found(&run),
            [(
                "skip_budget",
                "skip_factor 4 needs >= 3 rollouts per prompt on average, got 2.67 (budget 128 \
                 over 48 prompts): with fewer, prompts of equal variance fall below the skip cut \
                 and are skipped at random"
                    .to_string()
            )]
        );
        // exactly 3 each passes; 2.5 is written as such
        let three = Settings { budget: 144, ..run };
        assert!(problems(&three).is_empty());
        let half = Settings { budget: 120, ..run };
        assert!(found(&half)[0]
            .1
            .contains("got 2.5 (budget 120 over 48 prompts)"));
        // not skipping (factor 0, or lo > 0, or another rule): no policy
        for other in [
            Settings {
                skip_factor: Some(0.0),
                ..run
            },
            Settings {
                skip_factor: None,
                ..run
            },
            Settings {
                rule: Some(Rule::Proportional),
                skip_factor: None,
                ..run
            },
        ] {
            assert!(problems(&other).is_empty(), "{other:?}");
        }
        // a bad skip_factor is reported as such, the policy is not judged on it
        let bad = Settings {
            skip_factor: Some(f64::NAN),
            ..run
        };
        let subjects: Vec<_> = found(&bad).into_iter().map(|(k, _)| k).collect();
        assert_eq!(subjects, ["skip_factor"]);
        assert_eq!(
            check_skip_budget(Rule::Neyman, Some(4.0), 0, 0, 0).map_err(|e| e.to_string()),
            Ok(())
        );
    }

    #[test]
    fn the_pools_switches_are_judged_whatever_the_bounds() {
        let s = Settings {
            rule: Some(Rule::Uniform),
            mastery: Some(true),
            calibrated: Some(true),
            noise_scale: Some(true),
            explore_seed: Some(1),
            ..settings(8, 32, 9, 8)
        };
        let subjects: Vec<_> = found(&s).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            subjects,
            [
                "bounds",
                "reference_options",
                "calibrated",
                "noise_scale",
                "explore_seed"
            ]
        );
        // skip_price's preconditions involve lo: judged only with valid bounds and budget
        let s = Settings {
            skip_price: Some(-1.0),
            ..settings(8, 32, 9, 8)
        };
        let subjects: Vec<_> = found(&s).into_iter().map(|(k, _)| k).collect();
        assert_eq!(subjects, ["bounds"]);
    }

    #[test]
    fn the_pool_raises_the_same_messages() {
        let pool = PassRatePool::new(1.0, 1.0, 1.0, 0).unwrap();
        let ids: Vec<i64> = (0..8).collect();
        let cases = [
            Settings {
                min_rollouts: Some(9),
                ..settings(8, 32, 0, 8)
            },
            Settings {
                estimator: Some(Estimator::GroupNorm),
                ..settings(8, 32, 1, 8)
            },
            settings(8, 100, 0, 8),
        ];
        for s in cases {
            let o = PoolAllocateOptions {
                skip_factor: s.skip_factor,
                min_rollouts: s.min_rollouts,
                estimator: s.estimator,
                ..PoolAllocateOptions::default()
            };
            let e = pool
                .allocate(&ids, s.budget, s.lo, s.hi, Rule::Neyman, &o)
                .unwrap_err()
                .to_string();
            assert_eq!(
                found(&s).into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
                [e]
            );
        }
    }
}
