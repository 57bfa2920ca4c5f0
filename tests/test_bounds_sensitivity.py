"""benchmarks/bounds_sensitivity.py on a hand-made run: exact ratios."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bounds_sensitivity as bs  # noqa: E402
from _noise_model import rloo_prompt_variance  # noqa: E402


def _batch():
    rows = [dict(bank_p=0.5, var_succ=1.0, var_fail=1.0, mean_gap2=0.0, pool_successes=4),
            dict(bank_p=0.9, var_succ=0.5, var_fail=20.0, mean_gap2=1.0, pool_successes=8)]
    return {"prompt_rows": rows, "budget": 16, "pool_prior_fitted": [1.0, 1.0]}


def test_pool_variances_are_beta_posterior_moments():
    v = bs.pool_variances(_batch())
    # Beta(5, 5) and Beta(9, 1): ab / ((a+b)(a+b+1))
    assert v == pytest.approx([25 / 110, 9 / 110], rel=1e-15)


def test_uniform_bounds_score_exactly_one_and_wider_bounds_follow_the_curves():
    batch = _batch()
    table = bs.bounds_table({"batches": [batch]}, [(0, 0), (6, 6)])
    assert table[0]["ratios"] == [1.0]
    # 2..14: the allocator (on pool variances 25/110 vs 9/110) moves rollouts to prompt 0
    from dynamo_openrlhf import allocate_rollouts
    counts = allocate_rollouts(bs.pool_variances(batch), 16, 2, 14, estimator="rloo")
    assert counts[0] > counts[1] and counts.sum() == 16
    rows = batch["prompt_rows"]
    want = sum(rloo_prompt_variance(int(n), r["bank_p"], r["var_succ"], r["var_fail"], r["mean_gap2"])
               for r, n in zip(rows, counts)) / sum(
        rloo_prompt_variance(8, r["bank_p"], r["var_succ"], r["var_fail"], r["mean_gap2"]) for r in rows)
    assert table[1]["ratios"][0] == pytest.approx(want, rel=1e-12)
    assert table[1]["mean"] == pytest.approx(want, rel=1e-12)
    assert np.isfinite(table[1]["ci"]).all()
