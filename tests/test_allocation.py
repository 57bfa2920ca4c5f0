"""dynamo_openrlhf.allocation: the trainer's per-step allocator (torch-free)."""

import numpy as np
import pytest

from dynamo_openrlhf import PassRatePool, allocate_rollouts
from dynamo_openrlhf.allocation import (
    AllocationConfig,
    RolloutAllocator,
    default_bounds,
    predicted_variance_ratio,
)


def _cfg(**kw):
    base = dict(rule="neyman", n_samples_per_prompt=4, prompts_per_step=8, lo=2, hi=6, fit_prior_every=0)
    base.update(kw)
    return AllocationConfig(**base)


def test_default_bounds():
    assert default_bounds(16, 1.0) == (8, 24)
    assert default_bounds(4, 1.0) == (2, 6)
    assert default_bounds(1, 1.0) == (1, 1)
    assert default_bounds(3, 1.0) == (2, 4)
    assert default_bounds(16, 2.0) == (0, 64)


def test_budget_and_candidates():
    c = _cfg(oversample=2.0, lo=0, hi=16)
    assert c.budget == 32 and c.candidates_per_step == 16
    assert c.budget_for(16) == 32 and c.budget_for(20) == 32  # never more than a full step
    assert c.budget_for(5) == 20  # end of data: what OpenRLHF spends on 5 prompts


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rule="bogus"), "unknown rule 'bogus'"),
        (dict(lo=5), "need lo <= n_samples_per_prompt <= hi, got lo=5, n=4, hi=6"),
        (dict(hi=3), "need lo <= n_samples_per_prompt <= hi, got lo=2, n=4, hi=3"),
        (dict(lo=3, hi=2), "need 0 <= lo <= hi"),
        (dict(oversample=2.0, lo=3, hi=6),
         r"infeasible rollout budget: 16 candidate prompts x bounds \[3, 6\] = \[48, 96\] does not contain the "
         r"budget 32 \(--rollout.batch_size 8 x --rollout.n_samples_per_prompt 4\)"),
        (dict(oversample=0.5), "oversample must be a finite number >= 1"),
        (dict(skip_factor=4.0), "skip_factor needs --dynamo.allocation.lo 0 and rule neyman"),
        (dict(skip_factor=4.0, lo=0, hi=16, oversample=2.0),
         "skip_factor needs >= 3 rollouts per candidate prompt on average, got 2"),
        (dict(min_rollouts=2), "min_rollouts needs --dynamo.allocation.lo 0 and rule neyman"),
        (dict(min_rollouts=9, lo=0), "min_rollouts 9 > --dynamo.allocation.hi 6"),
        (dict(rule="uniform", calibrated=True), "calibrated does not apply"),
        (dict(rule="uniform", mastery=True), "uniform takes no exploration/mastery options"),
        (dict(prior=(0.0, 1.0)), "--dynamo.pool.prior"),
        (dict(forget=1.5), r"--dynamo.pool.forget must lie in \(0, 1\]"),
    ],
)
def test_config_errors_name_the_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)


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
