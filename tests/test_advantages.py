"""Tests of dynamo_openrlhf.advantages (docs/reference_notes.md, grouping pitfalls).

Equal-size groups are compared bit-for-bit with OpenRLHF 0.11.2's *actual* code path:
``RemoteExperienceMaker.compute_advantages_and_returns`` (openrlhf/trainer/ppo_utils/
experience_maker.py), called unbound on a minimal stand-in ``self``. It reshapes the rewards with
``reshape(-1, n_samples_per_prompt)``, applies the estimator's baseline, writes each sample's
value on its last action token (``compute_reward``) and accumulates returns with gamma = 1
(``get_cumulative_returns``); with one action token, no KL and no length penalty the advantage of
that token is exactly the shaped reward, so ``experience.advantages[:, 0]`` is what OpenRLHF's
baseline block produced. For ``reinforce_baseline`` OpenRLHF then whitens all token advantages of
the batch; that group-independent step is reproduced by running OpenRLHF's own ``reinforce`` path
(no baseline, same whitening) on our shaped rewards.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace as NS

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_openrlhf.cpu_backend import install_import_stand_ins

install_import_stand_ins()

from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402

from dynamo_openrlhf.advantages import (  # noqa: E402
    GROUP_ESTIMATORS,
    group_normalized_advantages,
    group_offsets,
    group_reward_std,
    sample_group_ids,
)


def openrlhf_advantages(rewards: torch.Tensor, n: int, estimator: str, seed: int = 0):
    """Run OpenRLHF 0.11.2's compute_advantages_and_returns; return (per-sample advantage, group std).

    The samples are spread over two experiences in a shuffled order, as the replay path does
    (``experience.index`` maps each row back to its position in prompt order)."""
    total = rewards.numel()
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    args = NS(
        rollout=NS(n_samples_per_prompt=n),
        algo=NS(advantage=NS(estimator=estimator, gamma=1.0, no_std_norm=False), kl=NS(use_loss=False)),
        reward=NS(clip_range=None),
    )
    maker = NS(strategy=NS(args=args), kl_ctl=NS(value=0.0), advantage_estimator=estimator)
    maker.get_cumulative_returns = functools.partial(RemoteExperienceMaker.get_cumulative_returns, maker)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    parts = perm.split([total // 2, total - total // 2])
    experiences = [
        NS(
            index=p.tolist(),
            rewards=rewards[p].clone(),
            action_mask=torch.ones(len(p), 1, dtype=torch.long),
            kl=torch.zeros(len(p), 1, dtype=dtype),
            info={},
        )
        for p in parts
    ]
    RemoteExperienceMaker.compute_advantages_and_returns(maker, experiences)
    adv = torch.empty(total, dtype=experiences[0].advantages.dtype)
    std = torch.full((total,), float("nan"), dtype=dtype)
    for e in experiences:
        idx = torch.tensor(e.index, dtype=torch.long)
        adv[idx] = e.advantages[:, 0]
        if "group_reward_std" in e.info:
            std[idx] = e.info["group_reward_std"]
    return adv, std


def reward_samples(kind: str, total: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        r = (torch.rand(total, generator=g) < 0.4).to(torch.float64)
    elif kind == "normal":
        r = torch.randn(total, generator=g, dtype=torch.float64) * 3 + 0.1
    else:  # "graded": partial credit on a grid
        r = torch.randint(0, 11, (total,), generator=g).to(torch.float64) / 10
    return r.to(dtype)


# ---------------------------------------------------------------------------------------------
# Bit-for-bit against OpenRLHF for equal sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "rloo"])
@pytest.mark.parametrize("n", [2, 4, 16])
@pytest.mark.parametrize("kind", ["binary", "normal", "graded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equal_sizes_bit_for_bit_openrlhf(estimator, n, kind, dtype):
    num_groups = 12
    rewards = reward_samples(kind, n * num_groups, dtype, seed=n)
    theirs, their_std = openrlhf_advantages(rewards, n, estimator)
    ours = group_normalized_advantages(rewards, [n] * num_groups, estimator)
    assert ours.dtype == theirs.dtype
    if kind == "graded" or kind == "binary":
        # Constant groups: OpenRLHF gives 0 exactly when the float mean is exact (0/1 rewards), but
        # rounding noise (amplified 1e9× by group_norm) for e.g. 0.7 — we give 0 by definition.
        x = rewards.to(ours.dtype).reshape(-1, n)
        const = (x.amax(-1) == x.amin(-1)).repeat_interleave(n)
        assert torch.equal(ours[const], torch.zeros_like(ours[const]))
        assert torch.equal(ours[~const], theirs[~const])
        if kind == "binary":
            assert torch.equal(ours, theirs)
    else:
        assert torch.equal(ours, theirs)
    assert torch.equal(group_reward_std(rewards, [n] * num_groups), their_std)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("kind", ["binary", "normal"])
def test_equal_sizes_reinforce_baseline_through_openrlhf_whitening(n, kind):
    rewards = reward_samples(kind, 10 * n, torch.float32, seed=3)
    theirs, _ = openrlhf_advantages(rewards, n, "reinforce_baseline")
    shaped = group_normalized_advantages(rewards, [n] * 10, "reinforce_baseline")
    ours, _ = openrlhf_advantages(shaped, n, "reinforce")  # OpenRLHF's whitening, no baseline
    assert torch.equal(ours, theirs)
    # and the shaped rewards themselves are dr_grpo's (both are "mean-only" in OpenRLHF)
    assert torch.equal(shaped, group_normalized_advantages(rewards, [n] * 10, "dr_grpo"))


def test_zero_variance_noise_in_openrlhf_is_zero_here():
    """16 rewards of 0.7: OpenRLHF's group_norm returns +0.95 for every sample (float rounding of
    the mean divided by std + 1e-9 = 1e-9); a constant group carries no signal: 0 here."""
    rewards = torch.full((16,), 0.7)
    theirs, _ = openrlhf_advantages(rewards, 16, "group_norm")
    assert (theirs.abs() > 0.5).all()
    ours = group_normalized_advantages(rewards, [16], "group_norm")
    assert torch.equal(ours, torch.zeros(16))


# ---------------------------------------------------------------------------------------------
# Variable sizes
# ---------------------------------------------------------------------------------------------
def test_hand_values_variable_sizes():
    rewards = torch.tensor([1.0, 0.0, 1.0, 5.0, 0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0])
    sizes = [3, 1, 2, 3, 2]  # the last group is constant
    gn = group_normalized_advantages(rewards, sizes, "group_norm")
    # group 0: mean 2/3, unbiased std sqrt(((1/3)² + (2/3)² + (1/3)²)/2) = sqrt(1/3)
    s0 = (1 / 3) ** 0.5
    # group 2: (0, 1): mean 0.5, std sqrt(0.5); group 3: (2, 3, 4): mean 3, std 1
    s2 = 0.5**0.5
    expected = [(1 / 3) / s0, -(2 / 3) / s0, (1 / 3) / s0, 0.0, -0.5 / s2, 0.5 / s2, -1.0, 0.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(gn, torch.tensor(expected), rtol=1e-6, atol=1e-6)

    mean_only = [1 / 3, -2 / 3, 1 / 3, 0.0, -0.5, 0.5, -1.0, 0.0, 1.0, 0.0, 0.0]
    for est in ("dr_grpo", "reinforce_baseline"):
        torch.testing.assert_close(
            group_normalized_advantages(rewards, sizes, est), torch.tensor(mean_only), rtol=1e-6, atol=1e-6
        )
    # rloo: r − (sum − r)/(k − 1)
    rloo = [1 - 0.5, 0 - 1.0, 1 - 0.5, 0.0, 0 - 1.0, 1 - 0.0, 2 - 3.5, 3 - 3.0, 4 - 2.5, 0.0, 0.0]
    torch.testing.assert_close(
        group_normalized_advantages(rewards, sizes, "rloo"), torch.tensor(rloo), rtol=1e-6, atol=1e-6
    )
    std = group_reward_std(rewards, sizes)
    torch.testing.assert_close(std, torch.tensor([s0] * 3 + [0.0] + [s2] * 2 + [1.0] * 3 + [0.0] * 2))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_size_one_and_zero_variance_groups_give_zero(estimator):
    rewards = torch.tensor([3.0, 0.25, 0.25, 0.25, 0.7, 0.7, 0.7, 0.7, 0.7, 1.0, 0.0])
    out = group_normalized_advantages(rewards, [1, 3, 5, 2], estimator)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:9], torch.zeros(9))
    assert out[9] > 0 > out[10]


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_each_group_equals_openrlhf_formula_on_that_group_alone(estimator):
    """Variable sizes: every group gets bit-for-bit what OpenRLHF computes for a batch made of that
    group alone (n = its size)."""
    sizes = [2, 5, 1, 8, 3, 5, 16, 0, 2]
    rewards = reward_samples("normal", sum(sizes), torch.float32, seed=21)
    out = group_normalized_advantages(rewards, sizes, estimator)
    starts, ends = group_offsets(sizes)
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < 2:
            assert torch.equal(out[s:e], torch.zeros(e - s))
            continue
        # reinforce_baseline's pre-whitening values are OpenRLHF's dr_grpo values (same line)
        est = "dr_grpo" if estimator == "reinforce_baseline" else estimator
        alone, _ = openrlhf_advantages(rewards[s:e].clone(), e - s, est)
        assert torch.equal(out[s:e], alone), (s, e)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_permuting_groups_permutes_the_output(estimator):
    sizes = [3, 7, 1, 4, 4, 9, 2]
    rewards = reward_samples("normal", sum(sizes), torch.float32, seed=5)
    out = group_normalized_advantages(rewards, sizes, estimator)
    starts, ends = group_offsets(sizes)
    blocks = [(s, e) for s, e in zip(starts.tolist(), ends.tolist())]
    perm = [4, 0, 6, 2, 5, 1, 3]
    r2 = torch.cat([rewards[blocks[j][0] : blocks[j][1]] for j in perm])
    o2 = group_normalized_advantages(r2, [sizes[j] for j in perm], estimator)
    assert torch.equal(o2, torch.cat([out[blocks[j][0] : blocks[j][1]] for j in perm]))


def test_never_groups_across_boundaries():
    """With sizes (2, 6) a reshape(-1, 4) would mix the groups; here the 6-group is its own group."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    out = group_normalized_advantages(rewards, [2, 6], "dr_grpo")
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5] + [1 / 6] * 5 + [-5 / 6]))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    seed=st.integers(0, 2**31 - 1),
    estimator=st.sampled_from(GROUP_ESTIMATORS),
)
def test_property_against_float64_reference(sizes, seed, estimator):
    total = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(total, generator=g, dtype=torch.float64).round(decimals=1)
    out = group_normalized_advantages(rewards, sizes, estimator)
    assert out.shape == (total,) and not torch.isnan(out).any()
    pos = 0
    for k in sizes:
        x = rewards[pos : pos + k].tolist()
        if k >= 2 and max(x) != min(x):
            mean = sum(x) / k
            if estimator == "group_norm":
                std = (sum((v - mean) ** 2 for v in x) / (k - 1)) ** 0.5
                exp = [(v - mean) / (std + 1e-9) for v in x]
            elif estimator == "rloo":
                exp = [v - (sum(x) - v) / (k - 1) for v in x]
            else:
                exp = [v - mean for v in x]
        else:
            exp = [0.0] * k
        torch.testing.assert_close(out[pos : pos + k], torch.tensor(exp, dtype=torch.float64), rtol=1e-9, atol=1e-9)
        pos += k


# ---------------------------------------------------------------------------------------------
# Representation helpers, dtypes, devices
# ---------------------------------------------------------------------------------------------
def test_group_helpers():
    starts, ends = group_offsets([2, 0, 3])
    assert starts.tolist() == [0, 2, 2] and ends.tolist() == [2, 2, 5]
    assert sample_group_ids(torch.tensor([2, 0, 3])).tolist() == [0, 0, 2, 2, 2]


def test_sizes_as_tensor_or_sequence_and_dtypes():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0], dtype=torch.float64)
    a = group_normalized_advantages(rewards, torch.tensor([2, 3], dtype=torch.int32))
    b = group_normalized_advantages(rewards, (2, 3))
    assert a.dtype == torch.float64 and torch.equal(a, b)
    ints = group_normalized_advantages(torch.tensor([1, 0, 1, 1]), [2, 2])
    assert ints.dtype == torch.float32  # promoted like OpenRLHF (at least float32)
    assert group_normalized_advantages(torch.zeros(0), []).shape == (0,)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    r = torch.rand(6)
    with pytest.raises(ValueError, match=r"group_sizes sum to 5 but rewards has 6 samples"):
        group_normalized_advantages(r, [2, 3])
    with pytest.raises(ValueError, match=r"group_sizes must be non-negative"):
        group_normalized_advantages(r, [7, -1])
    with pytest.raises(ValueError, match=r"rewards must be 1-D"):
        group_normalized_advantages(r.reshape(2, 3), [3, 3])
    with pytest.raises(ValueError, match=r"group_sizes must be 1-D"):
        group_normalized_advantages(r, torch.tensor([[3, 3]]))
    with pytest.raises(ValueError, match=r"group_sizes must have an integer dtype"):
        group_normalized_advantages(r, torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match=r"group_sizes must contain integers"):
        group_normalized_advantages(r, [3.0, 3.0])
    with pytest.raises(ValueError, match=r"group_sizes must contain integers"):
        group_normalized_advantages(r, [True, 5])
    with pytest.raises(ValueError, match=r"unknown estimator 'grpo'"):
        group_normalized_advantages(r, [3, 3], estimator="grpo")
    with pytest.raises(ValueError, match=r"unknown estimator 'gae'"):
        group_normalized_advantages(r, [3, 3], estimator="gae")
    with pytest.raises(ValueError, match=r"rewards must be a torch.Tensor"):
        group_normalized_advantages([1.0, 2.0], [2])
