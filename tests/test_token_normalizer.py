"""``--dynamo.loss.token_normalizer auto``: the balanced loss's L is the running mean response length of the
earlier steps. Its arithmetic, one L per step for every micro-batch / rank, the expected update still
independent of the allocation, and the checkpoint round trip through the trainer's state code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

from dynamo_openrlhf.advantages import (  # noqa: E402
    LOSS_WEIGHT_KEY,
    PromptBalancing,
    RunningTokenNormalizer,
    balanced_mean_length,
    estimator_spec,
    parse_token_normalizer,
    prompt_balanced_weights,
)
from dynamo_openrlhf.experience_maker import DynamoExperienceMaker  # noqa: E402
from dynamo_openrlhf.samples_generator import GROUP_KEY, PROMPT_ID_KEY  # noqa: E402

MAX_NEW = 9  # --rollout.max_new_tokens of these steps: the first step's L

# ---------------------------------------------------------------------------------------------- pure parts


def test_balanced_mean_length_hand_values():
    # groups [3, 5] | (empty) | [10] | [2, 2, 2]: prompt means 4, 10, 2 -> 16/3
    assert balanced_mean_length([3, 5, 10, 2, 2, 2], [2, 0, 1, 3]) == 16 / 3
    # equal n_i: the plain mean over samples (what token-mean's count per sample is)
    assert balanced_mean_length(torch.tensor([1, 2, 3, 6]), [2, 2]) == 3.0
    assert balanced_mean_length([], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="group_sizes sum to 3 but rewards has 2 samples"):
        balanced_mean_length([1, 2], [3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        balanced_mean_length([1.0, -1.0], [2])
    with pytest.raises(ValueError, match="1-D"):
        balanced_mean_length([[1, 2]], [2])


def test_with_its_own_mean_as_L_the_balanced_weights_sum_to_one_over_tokens():
    """Why L is a mean response length: then Σ_s w_s len_s = 1, as token-mean's 1/(token count)."""
    sizes = [3, 1, 5, 2]
    lengths = torch.tensor([4, 7, 1, 9, 2, 2, 3, 8, 5, 6, 1], dtype=torch.float64)
    for estimator in ("rloo", "group_norm"):  # c(n) = 1
        w = prompt_balanced_weights(sizes, estimator, balanced_mean_length(lengths, sizes))
        assert math.isclose(float((w * lengths).sum()), 1.0, rel_tol=1e-15)


def test_running_mean_hand_sequence():
    r = RunningTokenNormalizer(16)
    assert r.value == 16.0 and r.steps == 0  # the first step: --rollout.max_new_tokens
    r.update(11.0)
    assert r.value == 11.0
    r.update(12.5)
    assert r.value == 11.75  # (11 + 12.5) / 2
    r.update(9.25)
    assert r.value == 32.75 / 3 and r.total == 32.75 and r.steps == 3  # each step counts once
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "11"):
        with pytest.raises(ValueError, match="mean response length must be a finite number > 0"):
            r.update(bad)
    assert r.value == 32.75 / 3  # a refused update changes nothing
    for bad in (0, -2.0, float("nan"), None):
        with pytest.raises(ValueError, match="first must be a finite number > 0"):
            RunningTokenNormalizer(bad)


def test_running_mean_state_round_trip_and_bad_states():
    r = RunningTokenNormalizer(16)
    for m in (11.0, 0.1, 1e-3 / 3):
        r.update(m)
    state = r.state_dict()
    assert state == {"version": 1, "total": r.total, "steps": 3}
    back = RunningTokenNormalizer(12)  # the run's own first-step L; irrelevant once steps > 0
    back.load_state_dict(state)
    assert back.value == r.value and back.total == r.total and back.steps == 3
    for bad, message in [
        ({"version": 2, "total": 1.0, "steps": 1}, "state version 2 is not supported"),
        ({"version": 1, "total": 1.0, "steps": -1}, "steps must be an int >= 0"),
        ({"version": 1, "total": 1.0, "steps": 1.0}, "steps must be an int >= 0"),
        ({"version": 1, "total": 0.0, "steps": 2}, "total must be a finite number of tokens, > 0 exactly when"),
        ({"version": 1, "total": 5.0, "steps": 0}, "total must be a finite number of tokens, > 0 exactly when"),
        ({"version": 1, "total": float("inf"), "steps": 1}, "total must be a finite number"),
        ([1, 2], "must be a dict"),
    ]:
        with pytest.raises(ValueError, match=message):
            back.load_state_dict(bad)
    assert back.value == r.value  # untouched by refused states


def test_parse_token_normalizer():
    assert parse_token_normalizer(None) == "auto" and parse_token_normalizer("auto") == "auto"
    assert parse_token_normalizer("max_new_tokens") == "max_new_tokens"
    assert parse_token_normalizer("11") == 11.0 and parse_token_normalizer(7) == 7.0
    for bad in ("longest", True, [3]):
        with pytest.raises(ValueError, match="expected auto, max_new_tokens or a number > 0"):
            parse_token_normalizer(bad)
    for bad in ("0", -1.0, float("nan"), "inf"):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            parse_token_normalizer(bad)


def test_prompt_balancing_describes_its_L():
    auto = PromptBalancing("rloo", 16.0, True, 8, running=True)
    assert auto.normalizer() == RunningTokenNormalizer(16.0)
    assert "L = running mean response length of the earlier steps (first step: 16" in auto.describe()
    fixed = PromptBalancing("rloo", 16.0, True, 8)
    assert fixed.normalizer() is None and fixed.describe() == "token sum / 16"
    assert PromptBalancing("rloo", 1.0, False, 8).describe() == "token mean"
    # an explicit L overrides the fixed one; nothing else changes
    assert torch.equal(fixed.sample_weights([2, 3], 4.0), prompt_balanced_weights([2, 3], "rloo", 4.0) * (5 / 8))


# ---------------------------------------------------------------------------------------------- in the trainer


def _args(estimator="rloo", n=4):
    return SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)),
        rollout=SimpleNamespace(n_samples_per_prompt=n, max_new_tokens=MAX_NEW),
        reward=SimpleNamespace(clip_range=(-10.0, 10.0), overlong_buffer_len=None, overlong_penalty_factor=1.0,
                               stop_properly_penalty_coef=None),
        data=SimpleNamespace(max_len=64),
    )


def _maker(balancing, estimator="rloo"):
    return DynamoExperienceMaker(None, None, None, None, FixedKLController(0.0), SimpleNamespace(args=_args(estimator)),
                                 None, balancing=balancing)


def _step(sizes, lengths, micro=3, seed=0):
    """A tagged step's samples (rollout order: groups contiguous) scattered over micro-batch Experiences, as
    OpenRLHF splits a step over micro-batches and data-parallel ranks. ``lengths``: action tokens per sample."""
    rng = np.random.default_rng(seed)
    total = int(sum(sizes))
    group = np.repeat(np.arange(len(sizes)), sizes)
    rewards = rng.integers(0, 2, total).astype(np.float32)
    order = rng.permutation(total)
    exps = []
    for start in range(0, total, micro):
        pos = order[start:start + micro]
        mask = torch.zeros(len(pos), MAX_NEW, dtype=torch.bool)
        for row, p in enumerate(pos):
            mask[row, :lengths[p]] = True
        exps.append(Experience(
            action_mask=mask, rewards=torch.from_numpy(rewards[pos].copy()),
            response_length=torch.from_numpy(np.asarray(lengths)[pos].astype(np.float32)),
            kl=torch.zeros(len(pos), MAX_NEW), index=[int(p) for p in pos],
            info={"reward": torch.from_numpy(rewards[pos].copy()),
                  GROUP_KEY: torch.from_numpy(group[pos].astype(np.int64)),
                  PROMPT_ID_KEY: torch.from_numpy((1000 + group[pos] * 7).astype(np.int64))},
        ))
    return exps, group


def _L_of_every_sample(exps, group, sizes, estimator, tbs):
    """Solve each attached weight w = c(n) / (N n L) x S / tbs for L."""
    N, S = sum(1 for n in sizes if n > 0), sum(sizes)
    c = estimator_spec(estimator).balance_factor
    out = []
    for e in exps:
        for w, g in zip(e.info[LOSS_WEIGHT_KEY].tolist(), group[e.index]):
            n = sizes[g]
            out.append(c(n) / (N * n * w) * S / tbs)
    return np.array(out)


def _hand_mean(sizes, lengths):
    starts = np.cumsum(sizes) - sizes
    return float(np.mean([np.mean(lengths[s:s + n]) for s, n in zip(starts, sizes) if n > 0]))


@pytest.mark.parametrize("estimator", ["rloo", "dr_grpo"])
def test_one_L_per_step_for_every_micro_batch_and_the_running_mean_across_steps(estimator):
    balancing = PromptBalancing(estimator, float(MAX_NEW), True, train_batch_size=8, running=True)
    maker = _maker(balancing, estimator)
    rng = np.random.default_rng(1)
    steps = [[4, 4, 4, 4], [2, 6, 3, 5], [1, 7, 0, 8]]  # budget 16; last step: a skipped prompt, a lone rollout
    seen = []
    for t, sizes in enumerate(steps):
        lengths = rng.integers(1, MAX_NEW + 1, sum(sizes))
        exps, group = _step(sizes, lengths, seed=t)
        out = maker.compute_advantages_and_returns(exps)
        Ls = _L_of_every_sample(out, group, sizes, estimator, 8)
        # one L for the whole step, whichever micro-batch (or rank) a sample is in: the mean of the EARLIER steps
        want = float(MAX_NEW) if t == 0 else sum(seen) / len(seen)
        assert np.allclose(Ls, want, rtol=1e-13, atol=0) and maker.last_token_normalizer == want
        seen.append(_hand_mean(sizes, lengths))
        assert maker.token_normalizer.steps == t + 1
        assert math.isclose(maker.token_normalizer.value, sum(seen) / len(seen), rel_tol=1e-15)


def test_a_steps_own_lengths_never_enter_its_weights():
    """What keeps the expected update independent of the n_i: step t's weights are the same whatever step t's
    response lengths (only the later steps' L moves)."""
    sizes = [2, 6, 3, 5]
    balancing = PromptBalancing("rloo", float(MAX_NEW), True, train_batch_size=16, running=True)
    a, b = _maker(balancing), _maker(balancing)
    first = np.full(16, 5)
    for m in (a, b):
        m.compute_advantages_and_returns(_step(sizes, first, seed=0)[0])
    short, long_ = np.full(16, 2), np.full(16, MAX_NEW)
    wa = [e.info[LOSS_WEIGHT_KEY] for e in a.compute_advantages_and_returns(_step(sizes, short, seed=1)[0])]
    wb = [e.info[LOSS_WEIGHT_KEY] for e in b.compute_advantages_and_returns(_step(sizes, long_, seed=1)[0])]
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert a.token_normalizer.value == (5 + 2) / 2 and b.token_normalizer.value == (5 + MAX_NEW) / 2


def test_expected_update_is_allocation_independent_with_the_auto_L():
    """The exact expectation of test_balanced_loss, with L = auto's value after some earlier steps of other
    allocations: at a fixed L it does not depend on the n_i."""
    import itertools

    from dynamo_openrlhf.advantages import group_normalized_advantages

    r = RunningTokenNormalizer(16)
    for sizes, lengths in (([4, 4, 4, 4], [3] * 8 + [7] * 8), ([2, 6, 3, 5], list(range(1, 17)))):
        r.update(balanced_mean_length(lengths, sizes))
    L = r.value
    assert L == ((3 + 3 + 7 + 7) / 4 + (1.5 + 5.5 + 10 + 14) / 4) / 2

    def expected(sizes, ps):
        w_all = prompt_balanced_weights(sizes, "rloo", L)
        out, start = np.zeros(len(sizes)), 0
        for i, (n, p) in enumerate(zip(sizes, ps)):
            w = w_all[start:start + n]
            start += n
            for rew in itertools.product([0.0, 1.0], repeat=n):
                k = sum(rew)
                rt = torch.tensor(rew, dtype=torch.float64)
                A = group_normalized_advantages(rt, [n], "rloo")
                score = torch.where(rt > 0, torch.tensor(1.0 / p, dtype=torch.float64),
                                    torch.tensor(-1.0 / (1 - p), dtype=torch.float64))
                out[i] += p ** k * (1 - p) ** (n - k) * float((w * A * score).sum())
        return out

    ps = [0.2, 0.5, 0.9, 0.35]
    base = expected([4, 4, 4, 4], ps)
    assert np.allclose(base, 1.0 / (4 * L), rtol=1e-12, atol=0)
    for sizes in ([2, 4, 4, 6], [6, 2, 3, 5]):
        assert np.allclose(expected(sizes, ps), base, rtol=1e-12, atol=0)


def _trainer(maker, allocator=None):
    from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

    t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    t.history, t.allocator, t.experience_maker, t.balancing = [], allocator, maker, maker.balancing
    return t


def test_checkpoint_round_trip_continues_with_the_same_L(tmp_path, capsys):
    """The trainer's state (client_states["dynamo"], written by torch.save with OpenRLHF's checkpoint) restores
    the running L exactly: the resumed run's next step gets the weights the uninterrupted run gets."""
    from dynamo_openrlhf.ppo_trainer import STATE_VERSION

    balancing = PromptBalancing("rloo", float(MAX_NEW), True, train_batch_size=16, running=True)
    rng = np.random.default_rng(3)
    steps = [([4, 4, 4, 4], rng.integers(1, MAX_NEW + 1, 16)) for _ in range(3)]
    steps[1] = ([2, 6, 3, 5], steps[1][1])
    run = _trainer(_maker(balancing))
    for t, (sizes, lengths) in enumerate(steps[:2]):
        run.experience_maker.compute_advantages_and_returns(_step(sizes, lengths, seed=t)[0])
    state = run.dynamo_state_dict()
    assert state["version"] == STATE_VERSION == 3
    assert state["token_normalizer"] == {"version": 1, "total": run.experience_maker.token_normalizer.total, "steps": 2}
    torch.save({"dynamo": state}, tmp_path / "client_states.pt")

    resumed = _trainer(_maker(balancing))
    resumed.load_dynamo_state_dict(torch.load(tmp_path / "client_states.pt", weights_only=True)["dynamo"])
    L = run.experience_maker.token_normalizer.value
    assert f"[dynamo] restored token normaliser: L = {L!r} (running mean response length of 2 steps)" \
        in capsys.readouterr().out
    sizes, lengths = steps[2]
    w_run = [e.info[LOSS_WEIGHT_KEY] for e in run.experience_maker.compute_advantages_and_returns(
        _step(sizes, lengths, seed=2)[0])]
    w_resumed = [e.info[LOSS_WEIGHT_KEY] for e in resumed.experience_maker.compute_advantages_and_returns(
        _step(sizes, lengths, seed=2)[0])]
    assert all(torch.equal(x, y) for x, y in zip(w_run, w_resumed))
    assert resumed.experience_maker.last_token_normalizer == L
    assert resumed.experience_maker.token_normalizer == run.experience_maker.token_normalizer

    # a checkpoint without the running L (a fixed-L run, or saved before auto existed) cannot continue auto exactly
    with pytest.raises(ValueError, match="the checkpoint has no running token normaliser .* resume with the L the run "
                                         "was started with: --dynamo.loss.token_normalizer max_new_tokens"):
        _trainer(_maker(balancing)).load_dynamo_state_dict({"version": 2, "history": []})
    # a fixed L saves none and ignores one
    fixed = _trainer(_maker(PromptBalancing("rloo", 16.0, True, train_batch_size=16)))
    assert "token_normalizer" not in fixed.dynamo_state_dict()
    fixed.load_dynamo_state_dict(state)
    assert fixed.history == state["history"]
