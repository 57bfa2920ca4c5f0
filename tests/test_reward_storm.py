"""Reward storms (issue #21 §5): every sample of a step times out in math-verify (tests/data/storm_reward.py,
a reward file whose math-verify sleeps past the timeout). Each sample is one timeout (reward 0, logged in
``math_timeout``), counted once by the pool as a failure, and the scorer goes on working after the storm.
The time a storm costs is measured by benchmarks/bench_reward_storm.py (docs/faults.md)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

STORM = os.path.join(os.path.dirname(__file__), "data", "storm_reward.py")
N = 6


def _step():
    """N samples of 2 prompts (3 each), every answer well formed and correct."""
    prompts = ["What is 2+2?", "What is 3*3?"]
    labels = ["4", "9"]
    rows = [(prompts[i % 2], labels[i % 2]) for i in range(N)]
    queries = [p + f" The answer is \\boxed{{{a}}}" for p, a in rows]
    return queries, [p for p, _ in rows], [a for _, a in rows]


def test_a_storm_gives_one_timeout_per_sample_and_the_scorer_recovers(tmp_path, monkeypatch):
    from dynamo_openrlhf.reward import MathReward

    dump = tmp_path / "dump.jsonl"
    monkeypatch.setenv("DYNAMO_REWARD_DUMP", str(dump))
    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "3600")
    scorer = MathReward(timeout_s=0.5, workers=2, helper_file=STORM)
    try:
        out = scorer(*_step())
        assert out["rewards"].tolist() == [0.0] * N and out["scores"].tolist() == [0.0] * N
        assert out["extra_logs"] == {"math_correct": 0.0, "math_wrong": 0.0, "math_malformed": 0.0,
                                     "math_timeout": float(N), "math_error": 0.0}
        rows = [json.loads(line) for line in dump.read_text().splitlines()]
        assert [r["status"] for r in rows] == ["timeout"] * N  # each sample scored once
        # The storm ends (helpers started from now on check at once): the killed helpers are replaced and the
        # same samples are scored correct.
        monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "0")
        after = scorer(*_step())
        assert after["rewards"].tolist() == [1.0] * N
        assert after["extra_logs"]["math_correct"] == float(N)
    finally:
        scorer.close()


def test_the_pool_counts_each_timed_out_sample_as_one_failure(monkeypatch):
    """The storm's scores through the trainer's success rule into the pool: each prompt gains as many
    failures as it had samples, and no success."""
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator
    from dynamo_openrlhf.metrics import is_success

    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "3600")
    spec = importlib.util.spec_from_file_location("storm_reward", STORM)
    storm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(storm)
    monkeypatch.setenv("DYNAMO_REWARD_TIMEOUT_S", "0.5")
    try:
        out = storm.reward_func(*_step())
    finally:
        storm._SCORER.close()
    ok = is_success(out["scores"].numpy(), 0.5)
    allocator = RolloutAllocator(AllocationConfig(forget=1.0))
    ids = np.array([11, 22])
    allocator.record(ids, [int(ok[0::2].sum()), int(ok[1::2].sum())], [N // 2, N // 2])
    successes, failures = allocator.pool.evidence(ids)
    assert successes.tolist() == [0.0, 0.0] and failures.tolist() == [N // 2, N // 2]


def test_bad_scorer_settings_are_refused():
    from dynamo_openrlhf.reward import MathReward

    with pytest.raises(ValueError, match="timeout_s must be > 0 seconds, got 0.0"):
        MathReward(timeout_s=0)
    with pytest.raises(ValueError, match="helper_file /nonexistent/checker.py does not exist"):
        MathReward(helper_file="/nonexistent/checker.py")
