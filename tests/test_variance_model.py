"""The per-prompt variance model of docs/variance.md, checked exactly against the project's advantage code.

For a group of n rollouts with 0/1 rewards, the score-noise part of the variance of the prompt's mean gradient
is S * E[sum_j A_j^2] / n^2 and its mean is E[(1/n) sum_j A_j mu(r_j)] with mu(1) = 1/p, mu(0) = -1/(1-p)
(gradient of p = 1). Both expectations are computed by enumerating all 2^n reward vectors and running
``group_normalized_advantages`` on each, then compared with the closed forms the allocator relies on.
"""

import itertools
import math

import pytest
import torch

from dynamo_openrlhf.advantages import group_normalized_advantages


def _moments(n: int, p: float, estimator: str):
    rewards = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)  # (2^n, n)
    adv = group_normalized_advantages(rewards.reshape(-1), [n] * rewards.shape[0], estimator).reshape(rewards.shape)
    k = rewards.sum(1)
    prob = p ** k * (1 - p) ** (n - k)
    mu = torch.where(rewards == 1, torch.tensor(1 / p, dtype=torch.float64), torch.tensor(-1 / (1 - p), dtype=torch.float64))
    second = (prob * (adv ** 2).sum(1)).sum().item() / n ** 2
    mean = (prob * (adv * mu).sum(1)).sum().item() / n
    return second, mean


CASES = [(n, p) for n in (2, 3, 5, 8, 11) for p in (0.05, 0.37, 0.5, 0.9)]


@pytest.mark.parametrize("n,p", CASES)
def test_rloo_variance_is_p_q_over_n_minus_1_and_unbiased(n, p):
    second, mean = _moments(n, p, "rloo")
    assert second == pytest.approx(p * (1 - p) / (n - 1), rel=1e-12)
    assert mean == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("estimator", ["dr_grpo", "reinforce_baseline"])
@pytest.mark.parametrize("n,p", CASES)
def test_mean_baseline_is_rloo_scaled_by_n_minus_1_over_n(estimator, n, p):
    second, mean = _moments(n, p, estimator)
    assert second == pytest.approx((n - 1) * p * (1 - p) / n ** 2, rel=1e-12)
    assert mean == pytest.approx((n - 1) / n, rel=1e-12)
    # rescaled by n/(n-1) (what the prompt-balanced loss does for these estimators) it is RLOO exactly
    r_second, r_mean = _moments(n, p, "rloo")
    assert second * (n / (n - 1)) ** 2 == pytest.approx(r_second, rel=1e-12)
    assert mean * n / (n - 1) == pytest.approx(r_mean, rel=1e-12)


@pytest.mark.parametrize("n,p", CASES)
def test_group_norm_variance_and_mean(n, p):
    second, mean = _moments(n, p, "group_norm")
    informative = 1 - p ** n - (1 - p) ** n
    # OpenRLHF divides by std + 1e-9: relative error ~1e-9
    assert second == pytest.approx((n - 1) / n ** 2 * informative, rel=1e-7)
    expected_mean = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) * math.sqrt(k * (n - k) * (n - 1) / n)
                        for k in range(1, n)) / (n * p * (1 - p))
    assert mean == pytest.approx(expected_mean, rel=1e-7)
    assert mean < 1 / math.sqrt(p * (1 - p))  # approaches 1/sigma from below as n grows
