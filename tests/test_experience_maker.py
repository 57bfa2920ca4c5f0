"""DynamoExperienceMaker (advantages on explicit groups) and DynamoActorPPOTrainer's loss, against
OpenRLHF 0.11.2's own RemoteExperienceMaker / PolicyLoss on the same samples. No Ray cluster."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.models import PolicyLoss  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

from dynamo_openrlhf.advantages import LOSS_WEIGHT_KEY, PromptBalancing  # noqa: E402
from dynamo_openrlhf.experience_maker import DynamoExperienceMaker  # noqa: E402
from dynamo_openrlhf.loss import DynaMOPolicyLoss  # noqa: E402
from dynamo_openrlhf.ppo_actor import DynamoActorPPOTrainer  # noqa: E402
from dynamo_openrlhf.samples_generator import GROUP_KEY, PROMPT_ID_KEY  # noqa: E402

A = 7  # response length


def _args(estimator="group_norm", n=4, overlong=None):
    return SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)),
        rollout=SimpleNamespace(n_samples_per_prompt=n, max_new_tokens=A),
        reward=SimpleNamespace(clip_range=(-10.0, 10.0), overlong_buffer_len=overlong, overlong_penalty_factor=1.0,
                               stop_properly_penalty_coef=None),
        data=SimpleNamespace(max_len=64),
    )


def _maker(cls, args, kl_coef=0.0, **kw):
    return cls(None, None, None, None, FixedKLController(kl_coef), SimpleNamespace(args=args), None, **kw)


def _step(sizes, micro=3, seed=0, shuffle=False, binary=True):
    """One step's samples as micro-batch Experiences (OpenRLHF's split), tagged like the generator
    does; ``shuffle`` scatters the rollout positions over the micro-batches (dynamic batching)."""
    rng = np.random.default_rng(seed)
    total = int(sum(sizes))
    group = np.repeat(np.arange(len(sizes)), sizes)
    pid = 1000 + group * 7
    rewards = rng.integers(0, 2, total).astype(np.float32) if binary else rng.random(total).astype(np.float32)
    lengths = rng.integers(1, A + 1, total)
    order = rng.permutation(total) if shuffle else np.arange(total)
    exps = []
    for start in range(0, total, micro):
        pos = order[start:start + micro]
        mask = torch.zeros(len(pos), A, dtype=torch.bool)
        for row, p in enumerate(pos):
            mask[row, : lengths[p]] = True
        exps.append(Experience(
            action_mask=mask,
            rewards=torch.from_numpy(rewards[pos].copy()),
            response_length=torch.from_numpy(lengths[pos].astype(np.float32)),
            kl=torch.from_numpy(rng.normal(0, 0.01, (len(pos), A)).astype(np.float32)),
            index=[int(p) for p in pos],
            info={"reward": torch.from_numpy(rewards[pos].copy()),
                  GROUP_KEY: torch.from_numpy(group[pos].astype(np.int64)),
                  PROMPT_ID_KEY: torch.from_numpy(pid[pos].astype(np.int64))},
        ))
    return exps, rewards, lengths, group


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "rloo", "reinforce_baseline"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_equal_groups_are_openrlhfs_own_result(estimator, shuffle):
    """Uniform allocation (DynaMO off): bit-for-bit OpenRLHF's advantages, returns and logs."""
    exps, *_ = _step([4] * 6, seed=3, shuffle=shuffle)
    theirs = copy.deepcopy(exps)
    for e in theirs:
        e.info.pop(GROUP_KEY), e.info.pop(PROMPT_ID_KEY)
    args = _args(estimator)
    ours = _maker(DynamoExperienceMaker, args, kl_coef=0.05).compute_advantages_and_returns(exps)
    ref = _maker(RemoteExperienceMaker, _args(estimator), kl_coef=0.05).compute_advantages_and_returns(theirs)
    assert len(ours) == len(ref) == len(exps) > 0
    for a, b in zip(ours, ref):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)
        assert torch.equal(a.info["return"], b.info["return"])
        assert torch.equal(a.info["group_reward_std"], b.info["group_reward_std"])
        assert set(a.info) == set(b.info)  # tags removed: OpenRLHF would log them as metrics


def _expected_group_norm(rewards, group):
    out = np.zeros_like(rewards, dtype=np.float64)
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        x = torch.from_numpy(rewards[idx])
        if len(idx) > 1 and x.max() != x.min():
            out[idx] = ((x - x.mean()) / (x.std() + 1e-9)).numpy()
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_variable_groups_get_their_own_baselines(shuffle):
    sizes = [3, 1, 6, 2, 4, 5, 3]  # sum 24 = 6 prompts x 4 on average
    exps, rewards, lengths, group = _step(sizes, seed=5, shuffle=shuffle, binary=False)
    seen = []
    maker = _maker(DynamoExperienceMaker, _args("group_norm"), on_groups=seen.append)
    out = maker.compute_advantages_and_returns(exps)
    want = _expected_group_norm(rewards, group)
    for e in out:
        for row, p in enumerate(e.index):
            adv = e.advantages[row]
            # no KL coefficient, gamma 1: the shaped reward sits at every valid action token
            assert torch.allclose(adv[: lengths[p]], torch.full((lengths[p],), want[p], dtype=adv.dtype), atol=1e-6)
            assert (adv[lengths[p]:] == 0).all()
            assert e.info["reward"][row].item() == rewards[p]  # the logged reward stays the raw one
            same = rewards[group == group[p]]
            std = torch.from_numpy(same).std().item() if len(same) > 1 else 0.0
            assert e.info["group_reward_std"][row].item() == pytest.approx(std, abs=1e-6)
    (g,) = seen  # handed over once, explicitly
    assert g.sizes.tolist() == sizes and g.prompt_ids.tolist() == [1000 + 7 * i for i in range(len(sizes))]
    assert g.successes.tolist() == [int((rewards[group == i] > 0.5).sum()) for i in range(len(sizes))]
    assert want[np.flatnonzero(group == 1)[0]] == 0.0  # a group of one sample has no baseline: 0


def test_variable_groups_rloo_and_length_penalty():
    sizes = [2, 5, 1]
    exps, rewards, lengths, group = _step(sizes, seed=9, binary=False)
    args = _args("rloo", n=4, overlong=2)  # overlong penalty on the last 2 of A tokens
    out = _maker(DynamoExperienceMaker, args).compute_advantages_and_returns(exps)
    pen = rewards - np.clip(lengths - (A - 2), 0, 2) / 2.0
    want = np.zeros_like(pen, dtype=np.float64)
    for g in range(len(sizes)):
        idx = np.flatnonzero(group == g)
        if len(idx) > 1:
            want[idx] = pen[idx] - (pen[idx].sum() - pen[idx]) / (len(idx) - 1)
    got = np.concatenate([e.advantages[:, 0].numpy() for e in out])
    assert np.allclose(got, want, atol=1e-6)
    logged = np.concatenate([e.info["reward"].numpy() for e in out])
    assert np.allclose(logged, pen, atol=1e-6)  # penalised once, as OpenRLHF logs it
    assert args.algo.advantage.estimator == "rloo" and args.reward.overlong_buffer_len == 2  # restored


def _expected_weights(sizes, estimator, L, train_batch_size):
    N, S = sum(1 for n in sizes if n > 0), sum(sizes)
    c = (lambda n: n / (n - 1) if n > 1 else 1.0) if estimator in ("dr_grpo", "reinforce_baseline") else (lambda n: 1.0)
    return np.concatenate([np.full(n, c(n) / (N * n * L) * S / train_batch_size) for n in sizes])


@pytest.mark.parametrize("sizes,estimator", [([4] * 6, "rloo"), ([3, 1, 6, 2, 4, 5, 3], "dr_grpo"),
                                             ([4] * 6, "group_norm"), ([2, 6, 4, 4, 5, 3], "group_norm")])
@pytest.mark.parametrize("shuffle", [False, True])
def test_balanced_weights_travel_with_their_samples(sizes, estimator, shuffle):
    """Both paths (all groups of n: OpenRLHF's own advantages; variable groups) attach every sample's
    weight, computed once from the step's groups, at the sample's own row."""
    exps, rewards, lengths, group = _step(sizes, seed=4, shuffle=shuffle)
    balancing = PromptBalancing(estimator, 7.0, True, train_batch_size=12)
    maker = _maker(DynamoExperienceMaker, _args(estimator), balancing=balancing)
    out = maker.compute_advantages_and_returns(exps)
    want = _expected_weights(sizes, estimator, 7.0, 12)
    for e in out:
        got = e.info[LOSS_WEIGHT_KEY]
        assert got.dtype == torch.float64 and got.shape == (len(e.index),)
        assert np.allclose(got.numpy(), want[e.index], rtol=1e-15, atol=0)
    # every prompt's total weight is the same: (1/N) x (optimizer steps per rollout step) x c-mean / L
    total = np.zeros(len(sizes))
    for e in out:
        np.add.at(total, group[e.index], e.info[LOSS_WEIGHT_KEY].numpy())
    if estimator == "rloo" or estimator == "group_norm":
        assert np.allclose(total, sum(sizes) / 12 / (len(sizes) * 7.0), rtol=1e-14)


def test_tokens_weighting_attaches_nothing_and_untagged_runs_get_groups_of_n():
    exps, *_ = _step([4] * 6, seed=2, shuffle=True)
    out = _maker(DynamoExperienceMaker, _args("rloo")).compute_advantages_and_returns(exps)
    assert all(LOSS_WEIGHT_KEY not in e.info for e in out)
    # allocation off (OpenRLHF's sampler, no tags): OpenRLHF's own result, plus the weights
    exps, *_ = _step([4] * 6, seed=2, shuffle=True)
    theirs = copy.deepcopy(exps)
    for e in exps + theirs:
        e.info.pop(GROUP_KEY), e.info.pop(PROMPT_ID_KEY)
    balancing = PromptBalancing("rloo", 7.0, True, train_batch_size=24)
    out = _maker(DynamoExperienceMaker, _args("rloo"), balancing=balancing, tagged=False) \
        .compute_advantages_and_returns(exps)
    ref = _maker(RemoteExperienceMaker, _args("rloo")).compute_advantages_and_returns(theirs)
    assert len(out) == len(ref) == len(exps) > 0  # an empty output must not pass the comparison below
    for a, b in zip(out, ref):
        assert torch.equal(a.advantages, b.advantages)
        assert set(a.info) == set(b.info) | {LOSS_WEIGHT_KEY}
        assert torch.equal(a.info[LOSS_WEIGHT_KEY], torch.full((len(a.index),), 1 / (6 * 4 * 7.0), dtype=torch.float64))


def test_unsupported_estimator_is_refused():
    with pytest.raises(ValueError, match="flash_reinforce: not supported with per-prompt rollout counts"):
        _maker(DynamoExperienceMaker, _args("flash_reinforce"))


# ---------------------------------------------------------------------------------------------- actor loss


class _FakeActor(torch.nn.Module):
    """Returns (log_probs, output) like OpenRLHF's Actor with return_output=True; output.entropy is
    (B, T-1) over the whole sequence, of which the loss needs the last A columns."""

    def __init__(self, log_probs, entropy_full):
        super().__init__()
        self.lp, self.ent = log_probs, entropy_full

    def forward(self, sequences, action_mask=None, **k):
        return self.lp, SimpleNamespace(entropy=self.ent)


def _actor_args(preset, entropy_coef=0.0):
    return SimpleNamespace(
        actor=SimpleNamespace(eps_clip_low_high=(0.2, 0.28), dual_clip=10.0, loss_agg_mode="token-mean",
                              policy_loss_type="ppo", entropy_coef=entropy_coef),
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off", is_correction_mode="mask",
                                                       is_correction_gating="ratio",
                                                       is_correction_threshold=(0.5, 5.0))),
        dynamo=SimpleNamespace(modulation=SimpleNamespace(preset=preset, mu_max=None, lambda_min=None, gamma=None,
                                                          tau=None)),
    )


def _trainer(preset, actor, entropy_coef=0.0):
    t = object.__new__(DynamoActorPPOTrainer)
    t.args, t.actor = _actor_args(preset, entropy_coef), actor
    t._init_dynamo()
    return t


def _batch(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, A, generator=g)
    old = lp + 0.1 * torch.randn(B, A, generator=g)
    adv = torch.randn(B, A, generator=g)
    mask = torch.ones(B, A, dtype=torch.bool)
    mask[1, 5:] = False
    ent = torch.rand(B, T - 1, generator=g) * 3
    return lp, old, adv, mask, ent


def test_actor_loss_gets_the_entropy_and_logs_the_statistics():
    lp, old, adv, mask, ent = _batch()
    actor = _FakeActor(lp, ent)
    t = _trainer("decay6", actor)
    t._entropy, t._info, t._extremes = None, {}, {}
    actor(None, mask)  # the training step's forward; the hook keeps output.entropy (OpenRLHF's, coef set)
    got = t.actor_loss_fn(lp, old, adv, action_mask=mask)
    ref = DynaMOPolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=10.0, modulation="decay6")
    want = ref(lp, old, adv, action_mask=mask, entropy=ent[:, -A:])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    stats = ref.last_modulation_stats
    # means go to info (OpenRLHF's token-weighted reduction), max/min to the step's extremes
    extremes = {k for k in stats if k.endswith(("_max", "_min"))}
    assert len(extremes) == 4
    assert set(t._info) == {"dynamo/" + k for k in stats if k not in extremes} | {"dynamo/token_entropy"}
    for k, v in stats.items():
        if k in extremes:
            assert t._extremes[k] == float(v)
        else:
            assert torch.equal(t._info["dynamo/" + k], v) and t._info["dynamo/" + k].dim() == 0
    e = ent[:, -A:]
    assert t._info["dynamo/token_entropy"].item() == pytest.approx(e[mask].double().mean().item(), rel=1e-6)
    plain = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=10.0)(lp, old, adv, action_mask=mask)
    assert not torch.equal(got[0], plain[0])  # decay6 does change the loss on this batch


def test_actor_loss_off_is_openrlhfs_policy_loss():
    lp, old, adv, mask, ent = _batch(seed=1)
    t = _trainer("off", _FakeActor(lp, ent), entropy_coef=None)
    t._entropy, t._info = None, {}
    got = t.actor_loss_fn(lp, old, adv, action_mask=mask)
    want = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=10.0)(lp, old, adv, action_mask=mask)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    assert t._info == {}


def test_modulation_no_longer_needs_entropy_coef():
    """Without --actor.entropy_coef OpenRLHF's forward has no output.entropy; the trainer builds and
    registers its own entropy hook (tests/test_entropy.py runs it through OpenRLHF's Actor)."""
    lp, old, adv, mask, ent = _batch()
    t = _trainer("decay5", _FakeActor(lp, ent), entropy_coef=None)
    assert len(t.actor._forward_hooks) == 1


@pytest.mark.parametrize("sizes", [[16, 16, 16], [12, 16, 20]])
def test_constant_partial_credit_group_gets_zero_whatever_the_allocation(sizes):
    """A group whose 16 rewards are all 0.7 (partial credit) gets advantage 0 on a uniform step as on a
    variable one (issue 15 item 6): OpenRLHF's own reshape path, which used to run on uniform steps,
    gives it its float32 mean's rounding error / (std + 1e-9) = +0.9528 per sample."""
    exps, rewards, lengths, group = _step(sizes, seed=4, binary=False)
    for e in exps:
        for row, p in enumerate(e.index):
            if group[p] == 1:
                e.rewards[row] = 0.7
                e.info["reward"][row] = 0.7
    theirs = copy.deepcopy(exps)
    out = _maker(DynamoExperienceMaker, _args("group_norm", n=16)).compute_advantages_and_returns(exps)
    checked = 0
    for e in out:
        for row, p in enumerate(e.index):
            if group[p] == 1:
                assert (e.advantages[row] == 0).all()
                checked += 1
    assert checked == sizes[1]  # every sample of the constant group was seen
    if sizes == [16, 16, 16]:  # what OpenRLHF's method does with the same uniform step
        for e in theirs:
            e.info.pop(GROUP_KEY), e.info.pop(PROMPT_ID_KEY)
        ref = _maker(RemoteExperienceMaker, _args("group_norm", n=16)).compute_advantages_and_returns(theirs)
        got = [e.advantages[row, 0].item() for e in ref for row, p in enumerate(e.index) if group[p] == 1]
        assert len(got) == 16 and min(got) >= 0.9528 - 1e-3  # the +0.9528 baseline term, after OpenRLHF's shaping
