"""dynamo_openrlhf.allocation: the trainer's per-step allocator (torch-free)."""

import re

import numpy as np
import pytest

from dynamo_openrlhf import PassRatePool, allocate_rollouts
from dynamo_openrlhf.allocation import (
    AllocationConfig,
    RolloutAllocator,
    default_bounds,
    filter_counts,
    predicted_variance_ratio,
)


def _cfg(**kw):
    base = dict(rule="neyman", n_samples_per_prompt=4, prompts_per_step=8, lo=2, hi=6, fit_prior_every=0)
    base.update(kw)
    return AllocationConfig(**base)


def test_default_bounds():
    assert default_bounds(16, 1.0) == (12, 20)
    assert default_bounds(8, 1.0) == (6, 10)
    assert default_bounds(4, 1.0) == (3, 5)
    assert default_bounds(1, 1.0) == (1, 1)
    assert default_bounds(3, 1.0) == (3, 3)
    assert default_bounds(16, 2.0) == (0, 64)


def test_budget_and_candidates():
    c = _cfg(oversample=2.0, lo=0, hi=16)
    assert c.budget == 32 and c.candidates_per_step == 16
    assert c.budget_for(16) == 32 and c.budget_for(20) == 32  # never more than a full step
    assert c.budget_for(5) == 20  # end of data: what OpenRLHF spends on 5 prompts


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rule="bogus"), "--dynamo.allocation.rule: unknown rule 'bogus'"),
        (dict(lo=5), "--dynamo.allocation.lo/hi must admit --rollout.n_samples_per_prompt 4 (a step at the end of the "
                     "data has fewer prompts, 4 rollouts each): budget 4 is infeasible: must lie in [N*lo, N*hi] = "
                     "[5, 6] for N=1, lo=5, hi=6"),
        (dict(hi=3), "--dynamo.allocation.lo/hi must admit --rollout.n_samples_per_prompt 4 (a step at the end of the "
                     "data has fewer prompts, 4 rollouts each): budget 4 is infeasible: must lie in [N*lo, N*hi] = "
                     "[2, 3] for N=1, lo=2, hi=3"),
        (dict(lo=3, hi=2), "--dynamo.allocation.lo/hi: lo (3) must not exceed hi (2)"),
        (dict(lo=-1), "--dynamo.allocation.lo/hi: lo must be non-negative, got -1"),
        (dict(oversample=2.0, lo=3, hi=6),
         "infeasible rollout budget: --rollout.batch_size 8 x --rollout.n_samples_per_prompt 4 = 32 rollouts over 16 "
         "candidate prompts: budget 32 is infeasible: must lie in [N*lo, N*hi] = [48, 96] for N=16, lo=3, hi=6; "
         "change --dynamo.allocation.lo/hi or lower --dynamo.allocation.oversample"),
        (dict(oversample=0.5), "--dynamo.allocation.oversample must be a finite number >= 1, got 0.5"),
        (dict(skip_factor=4.0),
         "--dynamo.allocation.skip_factor: skip_factor requires lo = 0 (a skipped prompt gets 0 rollouts), got lo = 2"),
        (dict(skip_factor=-1.0, lo=0, hi=16),
         "--dynamo.allocation.skip_factor: skip_factor must be a finite non-negative number, got -1"),
        (dict(skip_factor=4.0, lo=0, hi=16, oversample=2.0),
         "--dynamo.allocation.skip_factor with --dynamo.allocation.oversample 2 and --rollout.n_samples_per_prompt 4: "
         "skip_factor 4 needs >= 3 rollouts per prompt on average, got 2 (budget 32 over 16 prompts): with fewer, "
         "prompts of equal variance fall below the skip cut and are skipped at random; lower "
         "--dynamo.allocation.oversample or set --dynamo.allocation.skip_factor 0"),
        (dict(rule="uniform", noise_scale="pisq"),
         "--dynamo.allocation.noise_scale pisq with --dynamo.allocation.rule uniform: noise_scale does not apply to "
         "rule 'uniform' (it weighs each prompt's variance by its noise scale: only rules 'neyman' and "
         "'proportional' weigh prompts by variance); use --dynamo.allocation.noise_scale off"),
        (dict(min_rollouts=2), "--dynamo.allocation.min_rollouts: min_rollouts requires lo = 0 (with lo > 0 no prompt "
                               "gets 0 rollouts; raise lo instead), got lo = 2"),
        (dict(min_rollouts=2, lo=0, rule="proportional"),
         "--dynamo.allocation.min_rollouts: min_rollouts applies to rule 'neyman' only, got rule 'proportional'"),
        (dict(min_rollouts=9, lo=0), "--dynamo.allocation.min_rollouts: min_rollouts (9) must not exceed hi (6)"),
        (dict(rule="uniform", calibrated=True),
         "--dynamo.pool.calibrated: calibrated does not apply to rule 'uniform' (it takes no options)"),
        (dict(rule="uniform", mastery=True), "--dynamo.allocation.exploration/mastery options: mastery does not apply "
                                             "to rule 'uniform' (it takes no options)"),
        (dict(exploration_rollouts=3),
         "--dynamo.allocation.exploration/mastery options: exploration_rollouts has no effect without exploration"),
        (dict(rule="proportional", priority_floor=-0.5), "--dynamo.allocation.exploration/mastery options: "
                                                         "priority_floor must be a finite non-negative number, got -0.5"),
        (dict(estimator="rloo", exploration=True), "--algo.advantage.estimator rloo with --dynamo.allocation.rule "
                                                   "neyman: estimator 'rloo' cannot be combined with exploration"),
        (dict(explore_seed=-2), "--dynamo.allocation.explore_seed must be an integer >= 0 here (None: no "
                                "exploration), got -2"),
        (dict(prior=(0.0, 1.0)), "--dynamo.pool.prior: prior alpha0 must be a finite positive number, got 0"),
        (dict(forget=1.5), "--dynamo.pool.forget: forget must lie in (0, 1], got 1.5"),
    ],
)
def test_config_errors_name_the_flag(kw, message):
    with pytest.raises(ValueError) as info:
        _cfg(**kw)
    assert message in str(info.value)


def test_config_accepts_what_the_pool_accepts():
    # an explicit "off" switch is not an option rule uniform would use: the pool takes it, so does the config
    ra = RolloutAllocator(_cfg(rule="uniform", exploration=False, mastery=False))
    assert ra.allocate(np.arange(8)).tolist() == [4] * 8
    assert ra._options() == {"exploration": False, "mastery": False}
    # the reference options with rule proportional (exploration and mastery on by default)
    ra = RolloutAllocator(_cfg(rule="proportional", exploration_rollouts=3, mastery_threshold=0.9))
    assert ra.allocate(np.arange(8)).tolist() == [4] * 8  # all unseen, one prior: 4 each


def test_predicted_variance_ratio_hand_values():
    # uniform: J = sum v * N / B = (0.25 + 0.09) * 2 / 8 = 0.085
    assert predicted_variance_ratio([0.25, 0.09], [4, 4]) == pytest.approx(1.0)
    # n = (5, 3): 0.25/5 + 0.09/3 = 0.08 -> 0.08 / 0.085
    assert predicted_variance_ratio([0.25, 0.09], [5, 3]) == pytest.approx(0.08 / 0.085, rel=1e-12)
    # a skipped prompt costs its whole v: (0.25/8 + 0.09) / 0.085
    assert predicted_variance_ratio([0.25, 0.09], [8, 0]) == pytest.approx((0.25 / 8 + 0.09) / 0.085, rel=1e-12)
    assert predicted_variance_ratio([0.0, 0.0], [3, 5]) == 1.0


def test_allocate_matches_the_core_on_the_pool_posterior():
    ids = np.arange(100, 108, dtype=np.int64)
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0)
    pool.update(ids, [0, 1, 2, 3, 4, 4, 2, 1], [4] * 8)
    alloc = RolloutAllocator(_cfg(forget=1.0), pool=pool)
    counts = alloc.allocate(ids)
    v = pool.expected_variance(ids)
    assert counts.tolist() == allocate_rollouts(v, 32, 2, 6).tolist()
    assert counts.sum() == 32 and counts.min() >= 2 and counts.max() <= 6 and counts.dtype == np.int64
    m = alloc.metrics()
    assert m["dynamo/alloc_budget"] == 32 and m["dynamo/alloc_skipped"] == 0
    assert m["dynamo/alloc_min"] == counts.min() and m["dynamo/alloc_max"] == counts.max()
    assert m["dynamo/pred_var_ratio"] == pytest.approx(predicted_variance_ratio(v, counts))
    assert m["dynamo/pred_var_ratio"] < 1.0  # the posteriors differ, so neyman beats uniform on them
    assert m["dynamo/pool_size"] == 8


def test_unseen_batch_is_uniform_and_oversampling_keeps_the_budget():
    alloc = RolloutAllocator(_cfg())
    assert alloc.allocate(np.arange(8)).tolist() == [4] * 8  # same prior for all: the even spread
    over = RolloutAllocator(_cfg(oversample=2.0, lo=0, hi=16))
    counts = over.allocate(np.arange(16))
    assert counts.sum() == 32 and counts.size == 16
    assert over.allocate(np.arange(5)).sum() == 20  # a short last step


def test_record_holds_exactly_the_steps_counts_with_forgetting():
    alloc = RolloutAllocator(_cfg(forget=0.5))
    alloc.record([1, 2], [3, 0], [4, 4])
    s, f = alloc.pool.evidence([1, 2])
    assert s.tolist() == [3.0, 0.0] and f.tolist() == [1.0, 4.0]
    alloc.record([2, 3, 3], [1, 1, 2], [2, 2, 2])  # repeated ids add up
    s, f = alloc.pool.evidence([1, 2, 3])
    assert s.tolist() == [1.5, 1.0, 3.0] and f.tolist() == [0.5, 3.0, 1.0]
    m = alloc.metrics()
    assert m["dynamo/step_trials"] == 6 and m["dynamo/step_successes"] == 4 and m["dynamo/pool_size"] == 3
    assert m["dynamo/pool_mean_pass_rate"] == pytest.approx(5.5 / 10.0)


def test_prior_refit_cadence_and_degenerate_evidence():
    alloc = RolloutAllocator(_cfg(fit_prior_every=2, forget=1.0))
    alloc.record(np.arange(10), np.zeros(10, dtype=np.int64), np.full(10, 4))
    assert alloc.metrics()["dynamo/prior_refit"] == 0.0
    alloc.record(np.arange(10, 20), np.zeros(10, dtype=np.int64), np.full(10, 4))  # all failures: cannot fit
    assert alloc.pool.prior == (1.0, 1.0) and alloc.metrics()["dynamo/prior_refit"] == 0.0
    rng = np.random.default_rng(0)
    alloc.record(np.arange(20, 60), rng.integers(0, 5, 40), np.full(40, 4))
    alloc.record(np.arange(60, 100), rng.integers(0, 5, 40), np.full(40, 4))
    assert alloc.metrics()["dynamo/prior_refit"] == 1.0 and alloc.pool.prior != (1.0, 1.0)


def test_state_dict_round_trip_is_bit_for_bit():
    alloc = RolloutAllocator(_cfg(forget=0.9))
    rng = np.random.default_rng(1)
    for step in range(3):
        ids = rng.integers(-(2**62), 2**62, 8)
        alloc.allocate(ids)
        alloc.record(ids, rng.integers(0, 5, 8), np.full(8, 4))
    state = alloc.state_dict()
    other = RolloutAllocator(_cfg(forget=0.9))
    other.load_state_dict(state)
    assert other.steps == 3 and other.pool.to_bytes() == alloc.pool.to_bytes()
    ids = rng.integers(-(2**62), 2**62, 8)
    assert other.allocate(ids).tolist() == alloc.allocate(ids).tolist()
    with pytest.raises(ValueError, match="allocator state version 7 is not supported"):
        other.load_state_dict({"version": 7})


def test_skipping_with_calibration_and_min_rollouts_keeps_budget_and_groups():
    cfg = _cfg(n_samples_per_prompt=8, oversample=2.0, lo=0, hi=32, skip_factor=4.0, min_rollouts=2,
               calibrated=True, forget=1.0)
    alloc = RolloutAllocator(cfg)
    ids = np.arange(16, dtype=np.int64)
    first = alloc.allocate(ids)  # nothing known: equal variances, nobody skipped (4 rollouts each)
    assert first.tolist() == [4] * 16
    # half of the prompts are clearly solved or impossible (100 trials), the others in between (8 trials)
    alloc.record(ids, [0, 100, 0, 100, 0, 100, 0, 100, 3, 4, 5, 2, 4, 3, 6, 1], [100] * 8 + [8] * 8)
    counts = alloc.allocate(ids)
    assert counts.sum() == 64 and ((counts == 0) | (counts >= 2)).all() and counts.max() <= 32
    assert (counts[:8] == 0).all() and (counts[8:] >= 2).all()  # no expected signal: skipped
    m = alloc.metrics()
    assert m["dynamo/alloc_skipped"] == 8 and m["dynamo/alloc_candidates"] == 16
    v = alloc.pool.calibrated_variance(ids)
    assert m["dynamo/pred_var_ratio"] == pytest.approx(predicted_variance_ratio(v, counts))


def test_allocation_module_needs_no_torch_ray_or_openrlhf():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator\n"
        "a = RolloutAllocator(AllocationConfig(n_samples_per_prompt=4, prompts_per_step=2, lo=2, hi=6))\n"
        "print(a.allocate([1, 2]).tolist())\n"
        "heavy = [m for m in ('torch', 'ray', 'openrlhf', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[4, 4]"


# ---------------------------------------------------------------------------------------------- estimator models


def test_prompt_costs_hand_values():
    from dynamo_openrlhf.allocation import prompt_costs

    v = np.array([0.25, 0.09, 0.16, 0.2])
    n = np.array([5, 3, 1, 0])
    assert prompt_costs(v, n).tolist() == pytest.approx([0.05, 0.03, 0.16, 0.2], rel=1e-15)
    for est in ("rloo", "dr_grpo", "reinforce_baseline"):  # v/(n-1); a group of one or none costs v
        assert prompt_costs(v, n, est).tolist() == pytest.approx([0.0625, 0.045, 0.16, 0.2], rel=1e-15)
    with pytest.raises(ValueError, match="needs the Beta posteriors"):
        prompt_costs(v, n, "group_norm")
    with pytest.raises(ValueError, match="unknown variance model 'gae'"):
        prompt_costs(v, n, "gae")


def _beta_moment(a, b, k):
    """E[p^k] under Beta(a, b) = prod_{j<k} (a+j)/(a+b+j)."""
    out = 1.0
    for j in range(k):
        out *= (a + j) / (a + b + j)
    return out


def test_group_norm_cost_is_the_beta_moment_formula():
    from dynamo_openrlhf.allocation import prompt_costs

    a = np.array([1.0, 0.7, 5.0, 2.5, 40.0])
    b = np.array([1.0, 3.2, 0.4, 2.5, 3.0])
    v = a * b / ((a + b) * (a + b + 1))
    for n in (2, 3, 4, 7, 16):
        got = prompt_costs(v, np.full(5, n), "group_norm", a, b)
        want = [v[i] * (n - 1) / (n * n * (1 - _beta_moment(a[i], b[i], n) - _beta_moment(b[i], a[i], n)))
                for i in range(5)]
        assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert np.allclose(prompt_costs(v, np.array([1, 0, 2, 2, 2]), "group_norm", a, b)[:2], v[:2], rtol=0)


def _brute_min(costs_fn, m, budget, lo, hi):
    import itertools

    best = None
    for n in itertools.product(range(lo, hi + 1), repeat=m):
        if sum(n) == budget:
            c = float(np.sum(costs_fn(np.array(n))))
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("estimator", ["rloo", "dr_grpo", "group_norm"])
def test_the_cores_allocation_minimises_our_cost_model(estimator):
    """The Python model behind dynamo/pred_var_ratio is the objective the core minimises: the core's
    allocation attains the brute-force minimum of our costs."""
    from dynamo_openrlhf.allocation import prompt_costs

    ids = np.arange(5, dtype=np.int64)
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0)
    pool.update(ids, [0, 1, 4, 7, 3], [8, 8, 8, 8, 4])
    counts = pool.allocate(ids, 20, 2, 8, estimator=estimator)
    v = pool.expected_variance(ids)
    s, f = pool.evidence(ids)
    a, b = 1.0 + s, 1.0 + f
    fn = lambda n: prompt_costs(v, n, estimator, a, b)  # noqa: E731
    assert float(np.sum(fn(counts))) == pytest.approx(_brute_min(fn, 5, 20, 2, 8), rel=1e-12)


def test_predicted_variance_ratio_with_estimators():
    # rloo, uniform 4 each: J = (0.25 + 0.09) / 3; n = (5, 3): 0.25/4 + 0.09/2
    assert predicted_variance_ratio([0.25, 0.09], [4, 4], "rloo") == pytest.approx(1.0)
    assert predicted_variance_ratio([0.25, 0.09], [5, 3], "rloo") == pytest.approx(
        (0.25 / 4 + 0.09 / 2) / (0.34 / 3), rel=1e-12)
    # B/N = 3.5 is not an integer: uniform interpolates between 3 and 4 each
    base = 0.5 * (0.34 / 2) + 0.5 * (0.34 / 3)
    assert predicted_variance_ratio([0.25, 0.09], [5, 2], "rloo") == pytest.approx((0.25 / 4 + 0.09) / base, rel=1e-12)
    # None keeps today's continuous formula
    assert predicted_variance_ratio([0.25, 0.09], [5, 2]) == pytest.approx((0.25 / 5 + 0.09 / 2) / (0.34 * 2 / 7))


def test_allocator_passes_the_estimator_and_predicts_with_it():
    ids = np.arange(100, 108, dtype=np.int64)
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0)
    pool.update(ids, [0, 1, 2, 3, 4, 4, 2, 1], [4] * 8)
    for est in ("rloo", "group_norm"):
        p = PassRatePool.from_bytes(pool.to_bytes())
        alloc = RolloutAllocator(_cfg(forget=1.0, estimator=est, hi=8), pool=p)
        counts = alloc.allocate(ids)
        assert counts.tolist() == p.allocate(ids, 32, 2, 8, estimator=est).tolist()
        v = p.expected_variance(ids)
        s, f = p.evidence(ids)
        assert alloc.metrics()["dynamo/pred_var_ratio"] == pytest.approx(
            predicted_variance_ratio(v, counts, est, 1.0 + s, 1.0 + f), rel=1e-12)
    # uniform/proportional do not optimise a variance: nothing passed, but the estimator's prediction logged
    alloc = RolloutAllocator(_cfg(forget=1.0, estimator="rloo", rule="uniform"), pool=pool)
    assert alloc.allocate(ids).tolist() == [4] * 8 and alloc.metrics()["dynamo/pred_var_ratio"] == 1.0


@pytest.mark.parametrize("kw,message", [
    (dict(estimator="rloo", lo=1), "--algo.advantage.estimator rloo with --dynamo.allocation.rule neyman: estimator "
                                   "'rloo' needs lo >= 2 (a group of one rollout has no baseline), got lo = 1; to let "
                                   "prompts be skipped use lo = 0 with min_rollouts >= 2"),
    (dict(estimator="group_norm", lo=0, min_rollouts=2, oversample=2.0, hi=16),
     "--algo.advantage.estimator group_norm with --dynamo.allocation.rule neyman: estimator 'group_norm' needs lo >= 2 "
     "(a group of one rollout has zero advantage under group_norm), got lo = 0"),
    (dict(estimator="rloo", lo=0, hi=16, oversample=2.0, skip_factor=4.0, min_rollouts=2),
     "--algo.advantage.estimator rloo with --dynamo.allocation.rule neyman: skip_factor is not supported with "
     "estimator 'rloo' (its skipping rule is derived for the Σ v/n objective); with lo = 0 use min_rollouts >= 2 "
     "instead"),
    (dict(estimator="gae"), "--algo.advantage.estimator gae: no allocation variance model"),
])
def test_estimator_settings_errors_name_the_flags(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _cfg(**kw)


def test_estimator_settings_that_work():
    """Settings the config accepts are settings the core allocates with: each one's first step spends the budget
    within its bounds (and with min_rollouts, every prompt gets 0 or at least that many)."""
    cases = [dict(estimator="rloo", lo=0, hi=16, oversample=2.0, min_rollouts=2),  # lo 0 with min_rollouts 2
             dict(estimator="rloo", lo=1, rule="uniform"),  # the rule does not use the estimator
             dict(estimator="group_norm", lo=2)]
    for kw in cases:
        cfg = _cfg(**kw)
        counts = RolloutAllocator(cfg).allocate(np.arange(cfg.candidates_per_step))
        assert counts.size == cfg.candidates_per_step and int(counts.sum()) == cfg.budget == 32, kw
        assert counts.min() >= cfg.lo and counts.max() <= cfg.hi, (kw, counts)
        assert all(c == 0 or c >= (cfg.min_rollouts or 1) for c in counts.tolist()), (kw, counts)
    # unseen prompts are alike: 32 rollouts over 16 candidates at the floor of 2 serve them all; 4 each over 8
    assert RolloutAllocator(_cfg(**cases[0])).allocate(np.arange(16)).tolist() == [2] * 16
    assert RolloutAllocator(_cfg(**cases[1])).allocate(np.arange(8)).tolist() == [4] * 8
    assert RolloutAllocator(_cfg(**cases[2])).allocate(np.arange(8)).tolist() == [4] * 8


# ---------------------------------------------------------------------------------------------- calibration


def test_calibration_scores_exact():
    from dynamo_openrlhf.allocation import calibration_scores

    got = calibration_scores([0.5, 0.2, 0.9], [2, 0, 3], [4, 2, 4])
    # rollouts: group 0: 2 x (0.5-1)^2 + 2 x 0.5^2; group 1: 2 x 0.2^2; group 2: 3 x 0.1^2 + 1 x 0.9^2
    brier = (2 * 0.25 + 2 * 0.25 + 2 * 0.04 + 3 * 0.01 + 0.81) / 10
    assert got == pytest.approx({"dynamo/pool_brier": brier, "dynamo/pool_pred_mean": (2.0 + 0.4 + 3.6) / 10,
                                 "dynamo/pool_real_mean": 0.5}, rel=1e-14)
    assert calibration_scores([0.5], [0], [0]) == {}


def test_record_scores_the_pool_before_updating_it():
    alloc = RolloutAllocator(_cfg(forget=1.0, prior=(1.0, 3.0)))
    ids = np.array([7, 8], dtype=np.int64)
    alloc.record(ids, [3, 0], [4, 4])  # unseen: prior mean 0.25 for both
    m = alloc.metrics()
    assert m["dynamo/pool_pred_mean"] == pytest.approx(0.25) and m["dynamo/pool_real_mean"] == pytest.approx(3 / 8)
    assert m["dynamo/pool_brier"] == pytest.approx((3 * 0.75 ** 2 + 5 * 0.25 ** 2) / 8, rel=1e-14)
    alloc.record(ids, [4, 0], [4, 4])  # now Beta(4, 4) -> 0.5 and Beta(1, 7) -> 0.125
    m = alloc.metrics()
    assert m["dynamo/pool_pred_mean"] == pytest.approx((0.5 + 0.125) / 2)
    assert m["dynamo/pool_brier"] == pytest.approx((4 * 0.25 + 4 * 0.125 ** 2) / 8, rel=1e-14)


def test_skip_decisions_explore_by_default_seeded_by_the_run():
    from types import SimpleNamespace as NS

    def args(estimator="gae", lo=0, **al):
        d = dict(rule="neyman", lo=lo, hi=64, oversample=2.0, skip_factor=None, min_rollouts=None, exploration=None,
                 exploration_rollouts=None, mastery=None, mastery_threshold=None, priority_floor=None)
        d.update(al)
        return NS(dynamo=NS(allocation=NS(**d), pool=NS(calibrated=True, prior=(1.0, 1.0), forget=0.999,
                                                        fit_prior_every=10, success_threshold=0.5)),
                  rollout=NS(n_samples_per_prompt=16, batch_size=32), algo=NS(advantage=NS(estimator=estimator)),
                  train=NS(seed=7))

    c = AllocationConfig.from_args(args())
    assert (c.skip_factor, c.explore_seed) == (4.0, 7)  # the skip rule explores, seeded by --train.seed
    assert AllocationConfig.from_args(args(explore_seed=11)).explore_seed == 11
    assert AllocationConfig.from_args(args(explore_seed=-1)).explore_seed is None  # -1: no exploration
    assert AllocationConfig.from_args(args(lo=8, oversample=1.0)).explore_seed is None  # no skip rule, no draws
    r = AllocationConfig.from_args(args(estimator="rloo"))  # rloo with lo 0: priced skipping, exploring
    assert (r.skip_factor, r.skip_price, r.explore_seed) == (None, 4.0, 7)
    r = AllocationConfig.from_args(args(estimator="rloo", skip_price=0.0))  # 0 = off: the ranking rule, no draws
    assert (r.skip_price, r.explore_seed, r.min_rollouts) == (None, None, 2)
    # a seed without a skip rule: the launcher's config reports the pool's own message after the flag
    with pytest.raises(ValueError) as pool_error:
        PassRatePool().allocate(np.arange(32), 512, 8, 24, explore_seed=3)
    assert str(pool_error.value) == ("explore_seed applies to the skipping rules only (skip_factor > 0 or "
                                     "skip_price), got skip_factor = None")
    with pytest.raises(ValueError) as info:
        AllocationConfig(rule="neyman", n_samples_per_prompt=16, prompts_per_step=32, lo=8, hi=24, explore_seed=3)
    assert str(info.value) == f"--dynamo.allocation.explore_seed 3 (-1 = off): {pool_error.value}"
    # the allocator hands the seed to the pool: same counts as the pool's own call with it
    ra = RolloutAllocator(c)
    ids = np.arange(64, dtype=np.int64)
    ra.pool.update(ids, np.where(ids % 3 == 0, 0, 8), np.full(64, 8))
    assert ra._options()["explore_seed"] == 7
    got = ra.allocate(ids)
    want = ra.pool.allocate(ids, 512, 0, 64, "neyman", skip_factor=4.0, min_rollouts=2, calibrated=True, explore_seed=7)
    assert got.tolist() == np.asarray(want).tolist() and int(got.sum()) == 512


def test_core_group_norm_costs_checks_its_inputs():
    from dynamo_openrlhf._core import group_norm_costs

    assert group_norm_costs([1.0, 2.0], [1.0, 3.0], [0.2, 0.1], [1, 0]).tolist() == [0.0, 0.0]  # groups < 2
    with pytest.raises(ValueError, match=r"^alpha\[1\] must be a finite number > 0, got 0"):
        group_norm_costs([1.0, 0.0], [1.0, 1.0], [0.1, 0.1], [2, 2])
    with pytest.raises(ValueError, match=r"^weights\[0\] must be a finite number >= 0, got NaN"):
        group_norm_costs([1.0], [1.0], [float("nan")], [2])
    with pytest.raises(ValueError, match="same length, got 2, 2, 2, 1"):
        group_norm_costs([1.0, 1.0], [1.0, 1.0], [0.1, 0.1], [2])


def test_filter_rule_skips_confident_prompts_and_spreads_the_budget_evenly():
    means = np.array([0.02, 0.5, 0.95, 0.3, 0.9, 0.12])
    v = means * (1 - means)
    # band 0.1: 0.02 and 0.95 skipped, 0.9 too (>= 1 - band); 0.5, 0.3, 0.12 share 20 -> 7, 7, 6
    assert filter_counts(means, v, 20, 2, 16, 0.1).tolist() == [0, 7, 0, 7, 0, 6]
    # the kept three cannot take 60 at hi 16 (4 needed): the skipped with the largest variance (0.9) comes back,
    # for 70 (5 needed) the next one (0.95) too
    assert filter_counts(means, v, 60, 2, 16, 0.1).tolist() == [0, 15, 0, 15, 15, 15]
    assert filter_counts(means, v, 70, 2, 16, 0.1).tolist() == [0, 14, 14, 14, 14, 14]
    # nothing kept: everybody (the core's uniform split, remainder to the first)
    assert filter_counts(np.array([0.0, 1.0, 0.99]), np.zeros(3), 7, 2, 16, 0.1).tolist() == [3, 2, 2]
    with pytest.raises(ValueError, match=r"^filter_band must lie in \[0, 0.5\), got 0.5$"):
        filter_counts(means, v, 20, 2, 16, 0.5)
    with pytest.raises(ValueError, match="^means has length 6 but variances has length 3$"):
        filter_counts(means, v[:3], 20, 2, 16, 0.1)
    with pytest.raises(ValueError, match=r"^means must be 1-D, got an array of shape \(2, 3\)"):
        filter_counts(means.reshape(2, 3), v, 20, 2, 16, 0.1)
    with pytest.raises(ValueError, match=r"^means\[1\] = 1.5 is outside \[0, 1\]$"):
        filter_counts([0.5, 1.5], [0.25, 0.0], 8, 2, 6, 0.1)
    with pytest.raises(ValueError, match=r"^variances\[0\] is NaN$"):
        filter_counts([0.5, 0.5], [np.nan, 0.0], 8, 2, 6, 0.1)


def _filter_counts_reference(means, variances, budget, lo, hi, band):
    """The rule as the trainer computed it in Python before the core took it over (the same documented
    steps), to show that the core's counts are the same."""
    m, v = np.asarray(means, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    keep = (m > band) & (m < 1.0 - band)
    if not keep.any():
        keep[:] = True
    need = -(-int(budget) // max(int(hi), 1))
    if int(keep.sum()) < need:
        skipped = [i for i in np.argsort(-v, kind="stable") if not keep[i]]
        for i in skipped[:need - int(keep.sum())]:
            keep[i] = True
    counts = np.zeros(m.size, dtype=np.int64)
    kept = np.flatnonzero(keep)
    counts[kept] = allocate_rollouts(np.ones(kept.size), int(budget), int(lo), int(hi), rule="uniform")
    return counts


def test_filter_counts_are_the_python_rules_counts():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(400):
        n = int(rng.integers(1, 12))
        # means on a coarse grid (ties in the variance, means on the band's edges), some at 0 and 1
        means = rng.integers(0, 21, n) / 20.0
        v = means * (1.0 - means)
        lo, hi = int(rng.integers(0, 3)), int(rng.integers(3, 9))
        budget = int(rng.integers(n * lo, n * hi + 1))
        band = float(rng.choice([0.0, 0.1, 0.15, 0.25, 0.45]))
        try:
            want = _filter_counts_reference(means, v, budget, lo, hi, band)
        except ValueError as e:  # too few kept prompts for lo: both refuse, with the uniform rule's message
            with pytest.raises(ValueError) as info:
                filter_counts(means, v, budget, lo, hi, band)
            assert str(info.value) == str(e)
            continue
        got = filter_counts(means, v, budget, lo, hi, band)
        assert got.dtype == np.int64 and got.tolist() == want.tolist(), (means, budget, lo, hi, band)
        checked += 1
    assert checked >= 300


def test_filter_rule_through_the_allocator_uses_the_pool_posterior_means():
    c = _cfg(rule="filter", filter_band=0.1)
    ra = RolloutAllocator(c)
    ids = np.arange(8, dtype=np.int64)
    # prior Beta(1,1): 0/16 -> mean 1/18 (skipped), 16/16 -> 17/18 (skipped), 8/16 -> 0.5
    ra.pool.update(ids[:2], np.array([0, 16]), np.array([16, 16]))
    ra.pool.update(ids[2:4], np.array([8, 8]), np.array([16, 16]))
    counts = ra.allocate(ids)  # ids 4..7 unseen: prior mean 0.5, kept
    assert counts.tolist() == [0, 0, 6, 6, 5, 5, 5, 5] and int(counts.sum()) == c.budget == 32
    assert ra.metrics()["dynamo/alloc_skipped"] == 2.0
    with pytest.raises(ValueError, match="^--dynamo.allocation.filter_band 0.1: needs --dynamo.allocation.rule filter, "
                                         "got rule neyman"):
        _cfg(rule="neyman", filter_band=0.1)
    # the band's value: the core's message (filter_counts raises it too)
    with pytest.raises(ValueError) as core_error:
        filter_counts(np.full(8, 0.5), np.full(8, 0.25), 32, 2, 6, 0.6)
    with pytest.raises(ValueError) as info:
        _cfg(rule="filter", filter_band=0.6)
    assert str(info.value) == f"--dynamo.allocation.filter_band: {core_error.value}"
    # rule filter allocates with the core's uniform rule, which refuses calibration (as the pool does for it)
    with pytest.raises(ValueError) as pool_error:
        PassRatePool().allocate(ids, 32, 2, 6, "uniform", calibrated=True)
    with pytest.raises(ValueError) as info:
        _cfg(rule="filter", filter_band=0.1, calibrated=True)
    assert str(pool_error.value) == "calibrated does not apply to rule 'uniform' (it takes no options)"
    assert str(info.value) == ("--dynamo.pool.calibrated (rule filter allocates with the core's rule uniform): "
                               f"{pool_error.value}")
