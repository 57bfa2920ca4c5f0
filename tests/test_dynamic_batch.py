"""``--train.dynamic_batch_enable`` with the prompt-balanced loss (issue #25 §3): the per-sample weights travel with
their samples through OpenRLHF 0.11.2's own DP balancing (``balance_experiences``), replay-buffer splitting and
token-budget micro-batching (``get_minimum_num_micro_batch_size`` / ``get_seqlen_balanced_partitions``, as
``NaiveReplayBuffer.setup_dynamic_batch`` calls them), and the update equals the fixed-micro-batch update
(float64, rtol 1e-10) across DP ranks and gradient accumulation.

DeepSpeed is simulated as OpenRLHF configures it: fixed micro-batches scale each backward by 1/gas; dynamic
batching sets gradient_accumulation_steps 1 (no scaling) and steps the optimizer after the step's last
micro-batch; gradients are averaged over the DP ranks in both."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.trainer.ppo_utils.experience import (  # noqa: E402
    Experience,
    balance_experiences,
    make_experience_batch,
    remove_padding_in_sequences,
    split_experience_batch,
)
from openrlhf.trainer.ray import ppo_actor as openrlhf_ppo_actor  # noqa: E402
from openrlhf.utils.seqlen_balancing import (  # noqa: E402
    get_minimum_num_micro_batch_size,
    get_seqlen_balanced_partitions,
)

from dynamo_openrlhf.advantages import (  # noqa: E402
    LOSS_WEIGHT_KEY,
    PromptBalancing,
    estimator_spec,
    group_normalized_advantages,
    prompt_balancing,
)

SIZES = [3, 1, 5, 2, 4, 1, 6, 2]  # 24 rollouts, 8 prompts (an allocation's variable group sizes)
T, D, L = 7, 5, 6.0
EPS_LOW, EPS_HIGH, DUAL = 0.2, 0.28, 3.0


def _step(estimator, seed=0):
    """A step on a linear 'policy' (log pi(token) = phi . theta), as the experience maker hands it over:
    micro-batches of 4 samples with advantages, old log-probs and the balanced weights in ``info``."""
    g = torch.Generator().manual_seed(seed)
    S = sum(SIZES)
    phi = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    theta = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    lens = torch.randint(1, T + 1, (S,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    rewards = torch.randint(0, 2, (S,), generator=g).to(torch.float64)
    old = (phi @ theta).detach() + 0.2 * torch.randn(S, T, generator=g, dtype=torch.float64)  # ratios != 1
    A = group_normalized_advantages(rewards, SIZES, estimator)[:, None].expand(S, T).contiguous()
    return phi, theta, mask, old, A, lens


def _experiences(mask, old, A, lens, w, micro=4):
    exps = []
    for part in torch.arange(mask.shape[0]).split(micro):
        B = part.numel()
        exps.append(Experience(
            sequences=torch.zeros(B, T + 1, dtype=torch.long), attention_mask=torch.ones(B, T + 1, dtype=torch.long),
            action_mask=mask[part], action_log_probs=old[part], advantages=A[part],
            total_length=(lens[part] + 1).to(torch.float32),  # prompt of 1 token + response: what the sort uses
            info={LOSS_WEIGHT_KEY: w[part], "row": part.clone()}))
    return exps


def _rows(info_value) -> torch.Tensor:
    if isinstance(info_value, list):
        return torch.stack([torch.as_tensor(v).reshape(()) for v in info_value]).long()
    return torch.as_tensor(info_value).reshape(-1).long()


def _actor(estimator, token_level, dp, gas, dynamic, S):
    from dynamo_openrlhf.ppo_actor import DynamoActorPPOTrainer

    t = object.__new__(DynamoActorPPOTrainer)
    t.args = NS(
        actor=NS(eps_clip_low_high=(EPS_LOW, EPS_HIGH), dual_clip=DUAL, policy_loss_type="ppo", entropy_coef=None,
                 loss_agg_mode="token-mean" if token_level else "seq-mean-token-mean", num_nodes=1,
                 num_gpus_per_node=dp),
        algo=NS(advantage=NS(estimator=estimator, is_correction_level="off", is_correction_mode="mask",
                             is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0))),
        rollout=NS(max_new_tokens=L),
        train=NS(batch_size=S, dynamic_batch_enable=dynamic, async_enable=False),
        ds=NS(ring_attn_size=1, tensor_parallel_size=1),
        dynamo=NS(loss=NS(prompt_weighting="balanced", token_normalizer=L if token_level else None),
                  allocation=NS(rule="neyman"),
                  modulation=NS(preset="off", mu_max=None, lambda_min=None, gamma=None, tau=None)),
    )
    t.strategy = NS(accumulated_gradient=gas)  # what OpenRLHF's strategy holds in both modes
    t.actor = torch.nn.Identity()
    t._init_dynamo()
    return t


def _run_rank(t, micro_batches, phi, theta0, ds_scale, monkeypatch):
    """The actor's training_step on each micro-batch (OpenRLHF's own step replaced by the policy term on the
    linear policy): the rank's accumulated gradient, each backward scaled by ``ds_scale`` (DeepSpeed)."""
    grad = torch.zeros_like(theta0)

    def fake_training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        nonlocal grad
        th = theta0.clone().requires_grad_()
        rows = _rows(experience.info["row"])
        m = experience.action_mask
        lp = (phi[rows] @ th) * m
        loss, *_ = self.actor_loss_fn(lp, experience.action_log_probs, experience.advantages, action_mask=m,
                                      rollout_log_probs=None, **loss_batch_info)
        (g,) = torch.autograd.grad(loss * ds_scale, th)
        grad = grad + g
        return {}

    monkeypatch.setattr(openrlhf_ppo_actor.ActorPPOTrainer, "training_step", fake_training_step)
    for step, (exp, info) in enumerate(micro_batches):
        t.training_step(exp, 0.0, step, info)
    return grad


def _openrlhf_info(dp, mbs):
    """OpenRLHF's loss_batch_info for these micro-batches (global tokens / samples; replaced for the policy term)."""
    tokens = float(sum(int(m.action_mask.sum()) for m in mbs))
    return {"dp_size": dp, "batch_num_tokens": torch.tensor(tokens), "global_batch_size": torch.tensor(float(len(mbs)))}


def _hand_gradient(estimator, token_level, phi, theta0, mask, old, A):
    """(1/N) sum_i c(n_i) (1/n_i) sum_j (token sum / L | token mean) of OpenRLHF's per-token PPO loss."""
    theta = theta0.clone().requires_grad_()
    lp = (phi @ theta) * mask
    ratio = (lp - old).exp()
    surr = torch.min(ratio * A, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * A)
    tok = -torch.where(A < 0, torch.max(surr, DUAL * A), surr) * mask
    per_seq = tok.sum(-1) / L if token_level else tok.sum(-1) / mask.sum(-1)
    c = estimator_spec(estimator).balance_factor
    total, start = 0.0, 0
    for n in SIZES:
        total = total + c(n) * per_seq[start:start + n].mean() / len(SIZES)
        start += n
    (want,) = torch.autograd.grad(total, theta)
    return want


@pytest.mark.parametrize("estimator", ["rloo", "group_norm"])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dp,gas", [(1, 1), (1, 3), (2, 2), (3, 2)])
def test_dynamic_batch_update_equals_the_fixed_micro_batch_update(estimator, token_level, dp, gas, monkeypatch):
    S = sum(SIZES)
    phi, theta0, mask, old, A, lens = _step(estimator)
    balancing = PromptBalancing(estimator, L if token_level else 1.0, token_level, train_batch_size=S)
    w = balancing.sample_weights(SIZES)
    want = _hand_gradient(estimator, token_level, phi, theta0, mask, old, A)

    # fixed micro-batches: OpenRLHF's replay buffer (split into samples), its shuffled loader, gas micro-batches
    # of S / (dp gas) per rank, DeepSpeed's 1/gas
    t = _actor(estimator, token_level, dp, gas, dynamic=False, S=S)
    items = remove_padding_in_sequences([i for e in _experiences(mask, old, A, lens, w) for i in
                                         split_experience_batch(e)])
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(1)).tolist()
    fixed = []
    for r in range(dp):
        mine = [items[i] for i in perm[r::dp]]
        mbs = [make_experience_batch(mine[k::gas]) for k in range(gas)]
        fixed.append(_run_rank(t, [(mb, _openrlhf_info(dp, mbs)) for mb in mbs], phi, theta0, 1.0 / gas,
                               monkeypatch))
    got_fixed = torch.stack(fixed).mean(0)

    # dynamic: OpenRLHF's DP balancing by length, then per rank the token-budget micro-batches of
    # setup_dynamic_batch (the number synchronised as the max over ranks), DeepSpeed's gas 1
    t = _actor(estimator, token_level, dp, gas, dynamic=True, S=S)
    args = NS(actor=NS(num_nodes=1, num_gpus_per_node=dp), ds=NS(ring_attn_size=1, tensor_parallel_size=1))
    per_rank = balance_experiences(_experiences(mask, old, A, lens, w), args)
    assert len(per_rank) == dp
    rank_items = [remove_padding_in_sequences(split_experience_batch(e)) for e in per_rank]
    max_tokens = 14  # a few samples per micro-batch: several micro-batches of different sizes per rank
    num_mbs = max(get_minimum_num_micro_batch_size([int(i.total_length) for i in its], max_tokens, 1, 1)
                  for its in rank_items)
    dynamic, sizes_seen = [], set()
    for its in rank_items:
        parts = get_seqlen_balanced_partitions([int(i.total_length) for i in its], num_mbs, equal_size=False)
        mbs = [make_experience_batch([its[k] for k in part]) for part in parts]
        sizes_seen |= {len(p) for p in parts}
        dynamic.append(_run_rank(t, [(mb, _openrlhf_info(dp, mbs)) for mb in mbs], phi, theta0, 1.0, monkeypatch))
    got_dynamic = torch.stack(dynamic).mean(0)
    assert num_mbs >= 2 and len(sizes_seen) >= 2  # really variable micro-batches

    assert want.abs().max() > 1e-3  # a real gradient
    assert torch.allclose(got_fixed, want, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got_dynamic, want, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got_dynamic, got_fixed, rtol=1e-10, atol=1e-14)


def test_dynamic_batch_normaliser_ignores_the_strategys_gas():
    """Under dynamic batching DeepSpeed's gas is 1: the policy term must not undo a 1/gas that never happens."""
    t = _actor("rloo", True, dp=2, gas=4, dynamic=True, S=8)
    assert t._deepspeed_gas() == 1
    assert _actor("rloo", True, dp=2, gas=4, dynamic=False, S=8)._deepspeed_gas() == 4
    seen = {}
    t.dynamo_loss.forward = lambda *a, **kw: seen.update(kw) or (torch.zeros(()),) * 5
    t._sample_weight = torch.ones(2, dtype=torch.float64)
    t.actor_loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), action_mask=torch.ones(2, 3), dp_size=2,
                    batch_num_tokens=torch.tensor(9.0), global_batch_size=torch.tensor(2.0))
    assert (seen["dp_size"], seen["batch_num_tokens"], seen["global_batch_size"]) == (2, 1.0, 1.0)


def test_prompt_balancing_accepts_dynamic_batching():
    args = NS(dynamo=NS(loss=NS(prompt_weighting="balanced", token_normalizer=None), allocation=NS(rule="neyman")),
              algo=NS(advantage=NS(estimator="rloo")), actor=NS(loss_agg_mode="token-mean"),
              rollout=NS(max_new_tokens=16), train=NS(batch_size=32, dynamic_batch_enable=True, async_enable=False))
    b = prompt_balancing(args)
    assert b is not None and b.token_level and b.train_batch_size == 32
