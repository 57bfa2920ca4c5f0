"""Priced skipping: the exact minimiser of Σ_served v/(n−1) + Σ_skipped skip_cost (core DP), the pool's
skip costs κ·E[p²(1−p)²], and the trainer config that turns it on by default with lo 0 and rloo."""

import itertools
import re
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dynamo_openrlhf import PassRatePool, allocate_rollouts
from dynamo_openrlhf.allocation import (DEFAULT_SKIP_PRICE, AllocationConfig, RolloutAllocator,
                                        predicted_variance_ratio, prompt_costs)


def _objective(v, c, counts):
    return sum(ci if n == 0 else (np.inf if n == 1 else vi / (n - 1)) for vi, ci, n in zip(v, c, counts))


def _brute_force(v, c, budget, m, hi):
    options = [0] + list(range(m, hi + 1))
    best = None
    for counts in itertools.product(options, repeat=len(v)):
        if sum(counts) == budget:
            j = _objective(v, c, counts)
            best = j if best is None else min(best, j)
    return best


def test_allocate_rollouts_with_skip_costs_is_the_exact_optimum():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 5))
        m = int(rng.integers(2, 4))
        hi = m + int(rng.integers(0, 4))
        budget = int(rng.integers(0, n * hi + 1))
        v = rng.uniform(0, 0.25, n)
        c = rng.uniform(0, 0.2, n)
        best = _brute_force(v, c, budget, m, hi)
        if best is None:
            with pytest.raises(ValueError, match="cannot be split|exceeds"):
                allocate_rollouts(v, budget, 0, hi, estimator="rloo", min_rollouts=m, skip_costs=c)
            continue
        counts = allocate_rollouts(v, budget, 0, hi, estimator="rloo", min_rollouts=m, skip_costs=c)
        assert counts.dtype == np.int64 and int(counts.sum()) == budget
        assert all(x == 0 or m <= x <= hi for x in counts)
        assert _objective(v, c, counts) == pytest.approx(best, rel=1e-12, abs=1e-15)
        checked += 1
    assert checked > 200


def test_settled_prompts_are_skipped_and_their_rollouts_concentrated():
    # 4 uncertain (Beta(4, 4)), 4 settled (Beta(1, 25)) candidates, 32 rollouts (oversampling 2, n = 8).
    v = np.array([0.25, 25 / (26 * 27)] * 4)
    u = np.array([4 * 5 * 4 * 5 / (8 * 9 * 10 * 11), 1 * 2 * 25 * 26 / (26 * 27 * 28 * 29)] * 4)
    counts = allocate_rollouts(v, 32, 0, 32, estimator="rloo", min_rollouts=2, skip_costs=DEFAULT_SKIP_PRICE * u)
    assert counts.tolist() == [8, 0] * 4
    # without prices, lo 0 with min_rollouts serves every candidate (budget // 2 >= 8 of them): nothing skipped
    assert allocate_rollouts(v, 32, 0, 32, estimator="rloo", min_rollouts=2).tolist() == [5, 3] * 4


def test_scale_multiplies_variances_and_skip_costs():
    rng = np.random.default_rng(1)
    v, c, s = rng.uniform(0, 0.25, 12), rng.uniform(0, 0.1, 12), rng.uniform(0.5, 3, 12)
    a = allocate_rollouts(v, 48, 0, 16, estimator="rloo", min_rollouts=2, skip_costs=c, scale=s)
    b = allocate_rollouts(v * s, 48, 0, 16, estimator="rloo", min_rollouts=2, skip_costs=c * s)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("kw, message", [
    (dict(skip_costs=[0.1, 0.1]), "skip_costs has length 2, variances 3"),
    (dict(skip_costs=[0.1, np.nan, 0.1]), "skip_costs[1] must be finite and >= 0, got NaN"),
    (dict(estimator=None), "skip_costs (priced skipping) needs rule 'neyman', estimator 'rloo', 'dr_grpo' or "
                           "'reinforce_baseline', lo = 0 and min_rollouts >= 2 (a skipped prompt gets 0 rollouts, a "
                           "served one a baseline); got rule 'neyman', estimator none, lo = 0, min_rollouts 2"),
    (dict(estimator="group_norm", lo=2), "skip_costs is not supported with estimator 'group_norm'"),
    (dict(rule="uniform"), "got rule 'uniform', estimator 'rloo', lo = 0, min_rollouts 2"),
    (dict(lo=2), "got rule 'neyman', estimator 'rloo', lo = 2, min_rollouts 2"),
    (dict(min_rollouts=None), "got rule 'neyman', estimator 'rloo', lo = 0, min_rollouts none"),
    (dict(skip_factor=4.0), "skip_costs cannot be combined with skip_factor"),
])
def test_bad_priced_skip_arguments_are_named(kw, message):
    args = dict(rule="neyman", estimator="rloo", lo=0, min_rollouts=2, skip_costs=[0.1, 0.1, 0.1])
    args.update(kw)
    rule, lo = args.pop("rule"), args.pop("lo")
    with pytest.raises(ValueError, match=re.escape(message)):
        allocate_rollouts([0.2, 0.1, 0.05], 8, lo, 6, rule, **args)


def test_pool_skip_costs_are_the_exact_beta_moment_and_allocate_uses_them():
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0)
    ids = np.arange(6, dtype=np.int64)
    pool.update(ids[:4], np.array([0, 24, 12, 3]), np.array([24, 24, 24, 6]))
    a, b = 1.0 + np.array([0, 24, 12, 3, 0, 0]), 1.0 + np.array([24, 0, 12, 3, 0, 0])
    t = a + b
    moment = a * b * (a + 1) * (b + 1) / (t * (t + 1) * (t + 2) * (t + 3))
    np.testing.assert_allclose(pool.skip_costs(ids, 4.0), 4.0 * moment, rtol=1e-14)
    assert pool.skip_costs(ids, 1.0)[4] == pytest.approx(1 / 30, rel=1e-14)  # Beta(1, 1): B(3, 3)/B(1, 1)
    got = pool.allocate(ids, 32, 0, 16, estimator="rloo", min_rollouts=2, skip_price=4.0)
    want = allocate_rollouts(pool.expected_variance(ids), 32, 0, 16, estimator="rloo", min_rollouts=2,
                             skip_costs=pool.skip_costs(ids, 4.0))
    assert got.tolist() == want.tolist()
    assert got[0] == 0 and got[1] == 0 and int(got.sum()) == 32  # 0/24 and 24/24: settled, skipped
    # exploration only ever raises a cost, and is a pure function of (seed, id, update count)
    e1 = pool.skip_costs(ids, 4.0, explore_seed=3)
    assert np.all(e1 >= pool.skip_costs(ids, 4.0)) and e1.tolist() == pool.skip_costs(ids, 4.0, explore_seed=3).tolist()
    with pytest.raises(ValueError, match="skip_price must be finite and > 0, got 0"):
        pool.skip_costs(ids, 0.0)
    with pytest.raises(ValueError, match="skip_price is not supported with estimator 'group_norm'"):
        pool.allocate(ids, 32, 2, 16, estimator="group_norm", skip_price=4.0)


def _args(estimator="rloo", lo=0, **al):
    d = dict(rule="neyman", lo=lo, hi=32, oversample=2.0, skip_factor=None, min_rollouts=None, exploration=None,
             exploration_rollouts=None, mastery=None, mastery_threshold=None, priority_floor=None)
    d.update(al)
    return NS(dynamo=NS(allocation=NS(**d), pool=NS(calibrated=True, prior=(1.0, 1.0), forget=0.999,
                                                    fit_prior_every=10, success_threshold=0.5)),
              rollout=NS(n_samples_per_prompt=8, batch_size=4), algo=NS(advantage=NS(estimator=estimator)),
              train=NS(seed=5))


def test_config_turns_priced_skipping_on_with_lo_0_and_rloo():
    c = AllocationConfig.from_args(_args())
    assert (c.skip_price, c.min_rollouts, c.explore_seed, c.skip_factor) == (4.0, 2, 5, None)
    assert AllocationConfig.from_args(_args(skip_price=2.5)).skip_price == 2.5
    assert AllocationConfig.from_args(_args(lo=6, hi=10, oversample=1.0)).skip_price is None  # no lo 0: off
    assert AllocationConfig.from_args(_args(estimator="group_norm", lo=2, hi=10, oversample=1.0)).skip_price is None
    with pytest.raises(ValueError) as info:
        AllocationConfig.from_args(_args(lo=6, hi=10, oversample=1.0, skip_price=4.0))
    assert str(info.value) == (
        "--dynamo.allocation.skip_price 4.0 (0 = off) with --dynamo.allocation.rule/lo/min_rollouts and "
        "--algo.advantage.estimator: skip_price (priced skipping) needs rule 'neyman', estimator 'rloo', 'dr_grpo' or "
        "'reinforce_baseline', lo = 0 and min_rollouts >= 2 (a skipped prompt gets 0 rollouts, a served one a "
        "baseline); got rule 'neyman', estimator 'rloo', lo = 6, min_rollouts none")
    with pytest.raises(ValueError, match=re.escape("--dynamo.allocation.skip_price nan (0 = off) with --dynamo."
                                                   "allocation.rule/lo/min_rollouts and --algo.advantage.estimator: "
                                                   "skip_price must be finite and > 0, got NaN")):
        AllocationConfig.from_args(_args(skip_price=float("nan")))


def test_allocator_skips_settled_candidates_and_predicts_the_mse_ratio():
    c = AllocationConfig.from_args(_args(explore_seed=-1))  # no exploration: deterministic costs
    ra = RolloutAllocator(c)
    ids = np.arange(8, dtype=np.int64)
    ra.pool.update(ids, np.array([0, 0, 0, 0, 12, 12, 24, 24]), np.full(8, 24))  # settled 0/24 and 24/24
    counts = ra.allocate(ids)
    assert int(counts.sum()) == 32 and counts.tolist() == ra.pool.allocate(
        ids, 32, 0, 32, estimator="rloo", min_rollouts=2, skip_price=4.0, calibrated=True).tolist()
    assert (counts[:4] == 0).all() and (counts[6:] == 0).all() and counts[4] + counts[5] == 32
    v = ra.pool.calibrated_variance(ids)
    sc = ra.pool.skip_costs(ids, 4.0, calibrated=True)
    m = ra.metrics()
    assert m["dynamo/alloc_skipped"] == 6.0
    # MSE over uniform's variance (4 rollouts each): Σ_served v/(n-1) + Σ_skipped cost over Σ v/3
    want = float(np.sum(prompt_costs(v, counts, "rloo", skip_costs=sc))) / float(np.sum(v / 3.0))
    assert m["dynamo/pred_var_ratio"] == pytest.approx(want, rel=1e-12)
    assert predicted_variance_ratio(v, counts, "rloo", skip_costs=sc) == pytest.approx(want, rel=1e-12)


def test_prompt_costs_with_skip_costs_hand_values():
    got = prompt_costs([0.2, 0.1, 0.3], [0, 3, 5], "rloo", skip_costs=[0.05, 9.0, 9.0])
    np.testing.assert_allclose(got, [0.05, 0.1 / 2, 0.3 / 4], rtol=1e-15)
    with pytest.raises(ValueError, match=r"skip_costs has shape \(2,\), variances \(3,\)"):
        prompt_costs([0.2, 0.1, 0.3], [0, 3, 5], "rloo", skip_costs=[0.05, 9.0])


def test_run_summary_names_the_predicted_mse_when_skips_are_priced():
    from dynamo_openrlhf.train import format_summary

    def summary_args(**al):
        a = _args(**al)
        a.dynamo.modulation = NS(preset="off")
        a.dynamo.run_dir = a.dynamo.reward_dump = None
        a.dynamo.loss = NS(prompt_weighting="auto", token_normalizer=16.0)
        a.actor = NS(loss_agg_mode="token-mean")
        a.rollout.max_new_tokens = 16
        a.train = NS(seed=5, batch_size=32, dynamic_batch_enable=False, async_enable=False)
        a.eval = NS(dataset=None)
        a.ckpt = NS(path="/nonexistent/ckpt", output_dir="/nonexistent/final")
        a.logger = NS(tensorboard_dir=None)
        return a

    row = {"type": "train", "step": 1, "dynamo/alloc_budget": 32.0, "dynamo/alloc_candidates": 8.0,
           "dynamo/alloc_min": 2.0, "dynamo/alloc_max": 12.0, "dynamo/alloc_skipped": 3.0,
           "dynamo/pred_var_ratio": 0.75, "dynamo/pool_size": 8.0, "dynamo/pool_mean_pass_rate": 0.5}
    text = format_summary([row], summary_args(), 1.0)
    assert ("rollouts per prompt 2..12, 3 prompts skipped, budget 32/step over 8 candidates; predicted mean squared "
            "error (variance + priced skip bias) vs uniform over the same candidates: mean 0.750, min 0.750") in text
    text = format_summary([row], summary_args(skip_price=0.0), 1.0)
    assert "predicted variance vs uniform over the same candidates: mean 0.750" in text
