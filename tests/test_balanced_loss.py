"""The prompt-balanced policy loss: weights, the exact gradient across micro-batches / gradient
accumulation / data-parallel ranks, the expected update under a changed allocation, and the wiring
through the experience maker and the actor."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.models.loss import PolicyLoss  # noqa: E402
from openrlhf.trainer.ray import ppo_actor as openrlhf_ppo_actor  # noqa: E402

from dynamo_openrlhf.advantages import (  # noqa: E402
    ESTIMATORS,
    GROUP_ESTIMATORS,
    LOSS_WEIGHT_KEY,
    PromptBalancing,
    estimator_spec,
    group_normalized_advantages,
    prompt_balanced_weights,
)
from dynamo_openrlhf.loss import DynaMOPolicyLoss, balanced_normalizers  # noqa: E402
from dynamo_openrlhf.modulation import ModulationConfig, modulate_advantages  # noqa: E402

# ---------------------------------------------------------------------------------------------- weights


def test_weights_hand_values_and_prompt_totals():
    sizes = [2, 0, 3, 1, 4]
    L = 4.0
    w = prompt_balanced_weights(sizes, "rloo", L)
    assert w.dtype == torch.float64 and w.shape == (10,)
    N = 4  # groups with n > 0
    want = [1 / (N * 2 * L)] * 2 + [1 / (N * 3 * L)] * 3 + [1 / (N * 1 * L)] + [1 / (N * 4 * L)] * 4
    assert torch.equal(w, torch.tensor(want, dtype=torch.float64))
    # every non-empty prompt has total weight 1/(N L), whatever its n_i
    totals = [float(t.sum()) for t in w.split([2, 3, 1, 4])]
    assert totals == pytest.approx([1 / (N * L)] * 4, rel=1e-15)
    # dr_grpo / reinforce_baseline: c(n) = n/(n-1) (1 for a group of one)
    for est in ("dr_grpo", "reinforce_baseline"):
        w = prompt_balanced_weights(sizes, est, L)
        want_c = [2 / (N * 2 * L)] * 2 + [1.5 / (N * 3 * L)] * 3 + [1 / (N * L)] + [(4 / 3) / (N * 4 * L)] * 4
        assert torch.allclose(w, torch.tensor(want_c, dtype=torch.float64), rtol=1e-15, atol=0)
    for est in ("group_norm", "reinforce", "gae"):
        assert torch.equal(prompt_balanced_weights(sizes, est, L), prompt_balanced_weights(sizes, "rloo", L))
    assert prompt_balanced_weights([0, 0], "rloo", 1.0).shape == (0,)


def test_weights_bad_input():
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpo'"):
        prompt_balanced_weights([2], "grpo", 1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="token_normalizer must be"):
            prompt_balanced_weights([2], "rloo", bad)
    with pytest.raises(ValueError, match="non-negative"):
        prompt_balanced_weights([2, -1], "rloo", 1.0)


def test_registry_has_each_openrlhf_estimator_once():
    assert set(ESTIMATORS) == {"group_norm", "dr_grpo", "reinforce_baseline", "rloo", "reinforce", "gae"}
    assert GROUP_ESTIMATORS == ("group_norm", "dr_grpo", "reinforce_baseline", "rloo")
    assert {k: s.variance_model for k, s in ESTIMATORS.items()} == {
        "group_norm": "group_norm", "dr_grpo": "dr_grpo", "reinforce_baseline": "reinforce_baseline",
        "rloo": "rloo", "reinforce": None, "gae": None}
    assert estimator_spec("dr_grpo").balance_factor(4) == 4 / 3 and estimator_spec("rloo").balance_factor(4) == 1.0
    from dynamo_openrlhf.advantages import register_estimator

    with pytest.raises(ValueError, match="already registered"):
        register_estimator(ESTIMATORS["rloo"])


def test_sample_weights_scale_by_optimizer_steps_per_rollout_step():
    b = PromptBalancing("rloo", 8.0, True, train_batch_size=4)
    w = b.sample_weights([3, 5])
    assert torch.equal(w, prompt_balanced_weights([3, 5], "rloo", 8.0) * (8 / 4))


# ---------------------------------------------------------------------------------------------- exact gradient


def _step_data(sizes, T=6, d=5, seed=0):
    """A step of S = sum(sizes) rollouts on a linear 'policy': log pi(token) = phi . theta."""
    g = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    phi = torch.randn(S, T, d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    lens = torch.randint(1, T + 1, (S,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    rewards = torch.randint(0, 2, (S,), generator=g).to(torch.float64)
    old = (phi @ theta).detach() + 0.2 * torch.randn(S, T, generator=g, dtype=torch.float64)  # ratios != 1: clipping
    return phi, theta, mask, rewards, old


def _per_token_loss(ratio, A, eps_low, eps_high, dual_clip):
    """OpenRLHF 0.11.2's PPO per-token loss (standard + dual clip), written out by hand."""
    surr1 = ratio * A
    surr2 = ratio.clamp(1 - eps_low, 1 + eps_high) * A
    clip1 = torch.min(surr1, surr2)
    return -torch.where(A < 0, torch.max(clip1, dual_clip * A), clip1)


@pytest.mark.parametrize("estimator", ["rloo", "dr_grpo", "group_norm"])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dp,gas", [(1, 1), (1, 3), (2, 2)])
def test_balanced_gradient_is_the_per_prompt_mean_gradient(estimator, token_level, dp, gas):
    """Micro-batches x gradient accumulation x DP ranks, with DeepSpeed's 1/gas and DP averaging
    simulated, give exactly the hand-computed mean over prompts of per-prompt mean gradients."""
    sizes = [3, 1, 5, 2, 4, 1]  # 16 samples, 6 prompts
    S, N, L = sum(sizes), len(sizes), 6.0
    phi, theta0, mask, rewards, old = _step_data(sizes)
    A_seq = group_normalized_advantages(rewards, sizes, estimator)
    A = A_seq[:, None].expand_as(old).contiguous()
    eps_low, eps_high, dual = 0.2, 0.28, 3.0

    # hand: (1/N) sum_i (1/n_i) sum_j c(n_i) (token sum / L | token mean) of the unweighted per-token loss
    theta = theta0.clone().requires_grad_()
    lp = (phi @ theta) * mask
    tok = _per_token_loss((lp - old).exp(), A, eps_low, eps_high, dual) * mask
    per_seq = tok.sum(-1) / L if token_level else tok.sum(-1) / mask.sum(-1)
    c = estimator_spec(estimator).balance_factor
    total, start = 0.0, 0
    for n in sizes:
        total = total + c(n) * per_seq[start:start + n].mean() / N
        start += n
    (want,) = torch.autograd.grad(total, theta)

    # trainer: one optimizer step = the whole step (train_batch_size = S), split over dp ranks x gas micro-batches
    balancing = PromptBalancing(estimator, L if token_level else 1.0, token_level, train_batch_size=S)
    w = balancing.sample_weights(sizes)
    loss_fn = DynaMOPolicyLoss(clip_eps_low=eps_low, clip_eps_high=eps_high, dual_clip=dual,
                               token_level_loss=token_level, modulation="off")
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(1))  # shuffled like OpenRLHF's loader
    rank_grads = []
    for rank_idx in perm.chunk(dp):
        grad = torch.zeros_like(theta0)
        for mb in rank_idx.chunk(gas):
            th = theta0.clone().requires_grad_()
            lp_mb = (phi[mb] @ th) * mask[mb]
            loss, *_ = loss_fn(lp_mb, old[mb], A[mb], action_mask=mask[mb], sample_weight=w[mb],
                               **balanced_normalizers(dp, gas))
            (g,) = torch.autograd.grad(loss / gas, th)  # DeepSpeed scales each backward by 1/gas
            grad += g
        rank_grads.append(grad)
    got = torch.stack(rank_grads).mean(0)  # DP all-reduce average
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert want.abs().max() > 1e-3  # a real gradient


def test_weight_is_applied_after_the_modulation():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 8
    lp = -torch.rand(B, T, generator=g)
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    H = torch.rand(B, T, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.long)
    w = torch.tensor([0.1, 3.0, 1.0, 10.0, 0.5], dtype=torch.float64)
    kw = balanced_normalizers(1, 1)
    got = DynaMOPolicyLoss(modulation="decay6")(lp, old, A, action_mask=mask, entropy=H, sample_weight=w, **kw)
    mod, _ = modulate_advantages(A, lp, old, H, mask, clip_low=0.2, clip_high=0.2,
                                 config=ModulationConfig.preset("decay6"))
    want = PolicyLoss()(lp, old, mod * w.float()[:, None], action_mask=mask.float(), **kw)
    assert torch.allclose(got[0], want[0], rtol=1e-6, atol=0)
    # weighting BEFORE the modulation would differ (its factors are normalised by micro-batch maxima)
    pre, _ = modulate_advantages(A * w.float()[:, None], lp, old, H, mask, clip_low=0.2, clip_high=0.2,
                                 config=ModulationConfig.preset("decay6"))
    other = PolicyLoss()(lp, old, pre, action_mask=mask.float(), **kw)
    assert not torch.allclose(got[0], other[0], rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(5,\)"):
        DynaMOPolicyLoss(modulation="off")(lp, old, A, action_mask=mask, sample_weight=w[:3])


def test_balanced_normalizers():
    assert balanced_normalizers(4, 8) == {"dp_size": 4, "batch_num_tokens": 0.125, "global_batch_size": 0.125}
    with pytest.raises(ValueError):
        balanced_normalizers(1, 0)


# ---------------------------------------------------------------------------------------------- expectation


def _expected_update(sizes, ps, estimator, weighting, L=1.0):
    """E[update] exactly, enumerating every reward vector of every group. Rollout j of prompt i has
    score mu(r_j) e_i with mu(1) = 1/p, mu(0) = -1/(1-p) (so E[r s] = grad p = e_i); its token sum is its
    score. ``weighting``: 'balanced' (our weights) or 'tokens' (OpenRLHF token-mean: 1/S each)."""
    N, S = len(sizes), sum(sizes)
    w_all = prompt_balanced_weights(sizes, estimator, L) if weighting == "balanced" else torch.full(
        (S,), 1.0 / S, dtype=torch.float64)
    out = np.zeros(N)
    start = 0
    for i, (n, p) in enumerate(zip(sizes, ps)):
        w = w_all[start:start + n]
        start += n
        for r in itertools.product([0.0, 1.0], repeat=n):
            k = sum(r)
            prob = p ** k * (1 - p) ** (n - k)
            rt = torch.tensor(r, dtype=torch.float64)
            A = group_normalized_advantages(rt, [n], estimator)
            score = torch.where(rt > 0, torch.tensor(1.0 / p, dtype=torch.float64),
                                torch.tensor(-1.0 / (1 - p), dtype=torch.float64))
            out[i] += prob * float((w * A * score).sum())
    return out


@pytest.mark.parametrize("estimator", ["rloo", "dr_grpo", "reinforce_baseline"])
def test_expected_update_does_not_depend_on_the_allocation(estimator):
    ps = [0.2, 0.5, 0.9, 0.35]
    base = _expected_update([4, 4, 4, 4], ps, estimator, "balanced", L=3.0)
    assert np.allclose(base, 1.0 / (4 * 3.0), rtol=1e-12, atol=0)  # = (1/N) grad p_i / L for every prompt
    for sizes in ([2, 4, 4, 6], [6, 2, 3, 5], [4, 4, 7, 2]):  # same budget 16, other n_i
        got = _expected_update(sizes, ps, estimator, "balanced", L=3.0)
        assert np.allclose(got, base, rtol=1e-12, atol=0)
    # OpenRLHF's token weighting: the prompt that gets more rollouts gets more weight in the update
    tok = _expected_update([2, 4, 4, 6], ps, estimator, "tokens")
    tok_uniform = _expected_update([4, 4, 4, 4], ps, estimator, "tokens")
    assert abs(tok[3] / tok_uniform[3] - 1) > 0.2


def test_group_norm_expected_update_still_moves_with_n():
    """Documented limitation: group_norm's mean is m(n, p) grad p, so balancing cannot make it invariant."""
    ps = [0.2, 0.5]
    a = _expected_update([4, 4], ps, "group_norm", "balanced")
    b = _expected_update([2, 6], ps, "group_norm", "balanced")
    assert not np.allclose(a, b, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- actor wiring


def _actor(weighting="balanced", gas=2, agg="token-mean"):
    from dynamo_openrlhf.ppo_actor import DynamoActorPPOTrainer

    t = object.__new__(DynamoActorPPOTrainer)
    t.args = SimpleNamespace(
        actor=SimpleNamespace(eps_clip_low_high=(0.2, 0.2), dual_clip=None, loss_agg_mode=agg, policy_loss_type="ppo",
                              entropy_coef=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="rloo", is_correction_level="off",
                                                       is_correction_mode="mask", is_correction_gating="ratio",
                                                       is_correction_threshold=(0.5, 5.0))),
        rollout=SimpleNamespace(max_new_tokens=7),
        train=SimpleNamespace(batch_size=8, dynamic_batch_enable=False, async_enable=False),
        dynamo=SimpleNamespace(loss=SimpleNamespace(prompt_weighting=weighting, token_normalizer=None),
                               allocation=SimpleNamespace(rule="neyman"),
                               modulation=SimpleNamespace(preset="off", mu_max=None, lambda_min=None, gamma=None,
                                                          tau=None)),
    )
    t.strategy = SimpleNamespace(accumulated_gradient=gas)
    t.actor = torch.nn.Identity()
    t._init_dynamo()
    return t


def test_actor_pops_the_weight_and_replaces_only_the_policy_normaliser(monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    lp, old, A = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    w = torch.rand(B, generator=g, dtype=torch.float64)
    seen = {}

    def fake_training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        seen["info_keys"] = set(experience.info)
        seen["out"] = self.actor_loss_fn(lp, old, A, action_mask=mask, rollout_log_probs=None, **loss_batch_info)
        return {}

    monkeypatch.setattr(openrlhf_ppo_actor.ActorPPOTrainer, "training_step", fake_training_step)
    t = _actor(gas=2)
    exp = SimpleNamespace(info={LOSS_WEIGHT_KEY: w, "reward": torch.zeros(B)})
    openrlhf_info = {"dp_size": 2, "batch_num_tokens": torch.tensor(99.0), "global_batch_size": torch.tensor(9.0)}
    t.training_step(exp, 0.0, 0, openrlhf_info)
    assert seen["info_keys"] == {"reward"}  # popped before OpenRLHF logs info as metrics
    want = PolicyLoss()(lp, old, A * w.float()[:, None], action_mask=mask, dp_size=2, batch_num_tokens=0.5)
    assert torch.equal(seen["out"][0], want[0])
    assert t._sample_weight is None
    # after OpenRLHF's replay buffer (split into samples, collated back) the weights arrive as a list of 0-d tensors
    from openrlhf.trainer.ppo_utils.experience import Experience, make_experience_batch, split_experience_batch

    batch = Experience(sequences=torch.zeros(B, 3, dtype=torch.long), attention_mask=torch.ones(B, 3, dtype=torch.long),
                       info={LOSS_WEIGHT_KEY: w})
    replayed = make_experience_batch(split_experience_batch(batch))
    assert isinstance(replayed.info[LOSS_WEIGHT_KEY], list)
    t.training_step(replayed, 0.0, 0, openrlhf_info)
    assert seen["info_keys"] == set() and torch.equal(seen["out"][0], want[0])
    # balanced on but no weight: a clear error, never a silent token-mean
    with pytest.raises(RuntimeError, match="carries no info\\['dynamo_loss_weight'\\]"):
        t.training_step(SimpleNamespace(info={}), 0.0, 0, openrlhf_info)
    # tokens: OpenRLHF's normaliser passes through untouched
    t = _actor(weighting="tokens")
    t.training_step(SimpleNamespace(info={}), 0.0, 0, openrlhf_info)
    want = PolicyLoss()(lp, old, A, action_mask=mask, **openrlhf_info)
    assert torch.equal(seen["out"][0], want[0])


def test_kl_and_entropy_terms_keep_openrlhfs_normalisation():
    """The replaced normaliser goes to the policy loss only: training_step's own kwargs are untouched."""
    t = _actor()
    info = {"dp_size": 1, "batch_num_tokens": torch.tensor(5.0), "global_batch_size": torch.tensor(2.0)}
    kw = dict(info)
    t._sample_weight = torch.ones(2, dtype=torch.float64)
    t.actor_loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), action_mask=torch.ones(2, 3), **kw)
    assert kw == info and math.isclose(float(kw["batch_num_tokens"]), 5.0)
