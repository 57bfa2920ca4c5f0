"""Non-finite values (issue 21 §3): the pure checks of ``dynamo_openrlhf.nonfinite`` with exact expectations,
and the glue that calls them, on stand-in objects (fake engines, tagged experiences, a bare actor): no Ray
cluster, no models."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
from openrlhf.trainer.ray import ppo_actor as openrlhf_ppo_actor  # noqa: E402

from dynamo_openrlhf.experience_maker import DynamoExperienceMaker  # noqa: E402
from dynamo_openrlhf.nonfinite import (  # noqa: E402
    STEP_INDEX_KEY,
    NonfiniteError,
    find_nonfinite,
    keep_whole_groups,
    loss_report,
    nonfinite_mode,
    renumber_positions,
    select_samples,
)
from dynamo_openrlhf.ppo_actor import DynamoActorPPOTrainer  # noqa: E402
from dynamo_openrlhf.prompt_ids import prompt_id, prompt_ids  # noqa: E402
from dynamo_openrlhf.samples_generator import GROUP_KEY, PROMPT_ID_KEY, DynamoSamplesGenerator  # noqa: E402

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------------------------- pure checks


def test_find_nonfinite_per_sample_values():
    values = np.array([1.0, NAN, 0.0, INF, -INF], dtype=np.float32)
    pids = np.array([10, 11, 12, 13, 14])
    positions = np.array([4, 3, 2, 1, 0])  # reported sorted by position
    r = find_nonfinite("reward", values, pids, positions, prompts=["a", "b", "c", "d", "e"])
    assert not r.ok and r.checked == 5 and r.what == "reward"
    assert r.positions.tolist() == [0, 1, 3]
    assert r.prompt_ids.tolist() == [14, 13, 11]
    assert [repr(v) for v in r.values.tolist()] == ["-inf", "inf", "nan"]
    assert r.tokens.tolist() == [-1, -1, -1] and r.prompts == ("e", "d", "b")
    assert r.sample_lines() == ["sample 0 (prompt id 14, prompt 'e') has reward -inf",
                                "sample 1 (prompt id 13, prompt 'd') has reward inf",
                                "sample 3 (prompt id 11, prompt 'b') has reward nan"]
    ok = find_nonfinite("reward", torch.tensor([0.0, 1.0]), [1, 2], [0, 1])
    assert ok.ok and ok.positions.size == 0 and ok.checked == 2


def test_find_nonfinite_per_token_checks_only_the_mask_and_names_the_first_token():
    v = torch.zeros(3, 5)
    v[0, 4] = NAN  # padding: not checked
    v[1, 2], v[1, 3] = -INF, NAN  # first in token order: -inf at token 2
    v[2, 0] = INF
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    r = find_nonfinite("old log-prob", v.to(torch.bfloat16), [7, 8, 9], [5, 6, 7], mask=mask)
    assert r.positions.tolist() == [6, 7] and r.prompt_ids.tolist() == [8, 9]
    assert r.tokens.tolist() == [2, 0] and [repr(x) for x in r.values.tolist()] == ["-inf", "inf"]
    assert r.prompts is None
    assert r.sample_lines()[0] == "sample 6 (prompt id 8) has old log-prob -inf at response token 2"
    assert find_nonfinite("x", v, [7, 8, 9], [5, 6, 7]).positions.tolist() == [5, 6, 7]  # no mask: all tokens


def test_find_nonfinite_refuses_inconsistent_shapes():
    with pytest.raises(ValueError, match=r"3 rows of values but 2 prompt ids and 3 positions"):
        find_nonfinite("reward", np.zeros(3), [1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\) != values shape \(2, 4\)"):
        find_nonfinite("advantage", np.zeros((2, 4)), [1, 2], [0, 1], mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"values must be \(S,\) or \(S, T\), got shape \(1, 2, 3\)"):
        find_nonfinite("advantage", np.zeros((1, 2, 3)), [1], [0])


def test_the_error_message_names_each_sample_value_and_what_to_do():
    r = find_nonfinite("reward", [0.5, NAN, 1.0, NAN], [3, 4, 5, 6], [0, 1, 2, 3], prompts=["p", "q", "r", "s"])
    assert r.message("/data/my_reward.py") == (
        "non-finite reward in 2 of 4 samples checked: sample 1 (prompt id 4, prompt 'q') has reward nan; sample 3 "
        "(prompt id 6, prompt 's') has reward nan. A reward function must return a finite reward for every sample "
        "(reward function /data/my_reward.py). The run stopped at this step: the pass-rate pool was not updated "
        "from it and nothing is checkpointed after it. --dynamo.nonfinite drop drops such samples' groups instead "
        "(each one logged, counted as dynamo/nonfinite_dropped).")
    many = find_nonfinite("reward", [NAN] * 11, list(range(11)), list(range(11)))
    assert many.message().count("has reward nan") == 8 and "; and 3 more." in many.message()


def test_keep_whole_groups_and_renumber():
    group_of = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    keep = keep_whole_groups(group_of, [4, 8])
    assert keep.tolist() == [True, True, True, False, False, False, False, False, False, True]
    assert keep_whole_groups(group_of, []).all()
    assert renumber_positions([9, 0, 2, 1], keep).tolist() == [3, 0, 2, 1]
    with pytest.raises(ValueError, match="not kept"):
        renumber_positions([3], keep)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 10\)"):
        keep_whole_groups(group_of, [10])


def test_select_samples_keeps_every_per_sample_field():
    exp = Experience(sequences=torch.arange(12).reshape(3, 4), action_mask=torch.ones(3, 2, dtype=torch.bool),
                     action_log_probs=torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]),
                     rewards=torch.tensor([1.0, 2.0, 3.0]), index=[5, 6, 7], prompts=["a", "b", "c"],
                     labels=["x", "y", "z"], info={"reward": torch.tensor([1.0, 2.0, 3.0]), "scalar": torch.tensor(9.0)})
    sub = select_samples(exp, [0, 2])
    assert sub.sequences.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert torch.equal(sub.action_log_probs, exp.action_log_probs[[0, 2]])
    assert sub.rewards.tolist() == [1.0, 3.0] and sub.index == [5, 7]
    assert sub.prompts == ["a", "c"] and sub.labels == ["x", "z"]
    assert sub.info["reward"].tolist() == [1.0, 3.0] and sub.info["scalar"].item() == 9.0
    assert exp.rewards.tolist() == [1.0, 2.0, 3.0]  # the original is untouched


def test_loss_report():
    lp = torch.zeros(2, 3)
    old = torch.zeros(2, 3)
    adv = torch.ones(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert loss_report(torch.tensor(0.5), lp, old, adv, mask, [4, 9], [1, 2]) is None
    old[1, 1] = NAN
    msg = loss_report(torch.tensor(NAN), lp, old, adv, mask, [4, 9], [1, 2])
    assert msg.startswith("non-finite loss nan in the micro-batch of samples [4, 9] (prompt ids [1, 2]) of this "
                          "step: sample 9 (prompt id 2) has old log-prob nan at response token 1. The run stopped "
                          "before this micro-batch's backward")
    msg = loss_report(torch.tensor(INF), lp, torch.zeros(2, 3), adv, mask, [4, 9], [1, 2])
    assert "every log-prob and advantage of its response tokens is finite, so the loss itself overflowed" in msg
    assert msg.startswith("non-finite loss inf in")


def test_nonfinite_mode():
    assert nonfinite_mode(SimpleNamespace()) == "error"  # a stand-in without the flag
    assert nonfinite_mode(SimpleNamespace(dynamo=SimpleNamespace(nonfinite="drop"))) == "drop"
    with pytest.raises(ValueError, match=r"--dynamo.nonfinite 'skip': expected one of \['error', 'drop'\]"):
        nonfinite_mode(SimpleNamespace(dynamo=SimpleNamespace(nonfinite="skip")))


# ---------------------------------------------------------------------------------------------- generator glue


class _Ref:
    def __init__(self, value):
        self.value = value


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class Engine:
    """Each prompt "p<i>" gets reward float(label) for each sample, except label "nan"/"inf": that value for
    its sample 1 only. The engine keeps ``prompt_tokens`` tokens of each prompt (as if it had cut it)."""

    def __init__(self, prompt_tokens=None):
        self.prompt_tokens = prompt_tokens
        self.generate_responses = _Remote(self._generate)
        self.get_num_unfinished_requests = _Remote(lambda: 0)

    def _generate(self, **kw):
        out = []
        keep = self.prompt_tokens or len(kw["prompt"])
        for k in range(kw["num_samples"]):
            value = float(kw["label"]) if kw["label"] not in ("nan", "inf") or k == 1 else 0.0
            toks = list(range(keep)) + [50, 51]
            out.append(dict(observation_tokens=toks, action_ranges=[(keep, keep + 2)], rollout_log_probs=None,
                            prompt=kw["prompt"], label=kw["label"], reward=value, scores=value))
        return _Ref(out)


@pytest.fixture
def passthrough_ray(monkeypatch):
    unwrap = lambda x: x.value if isinstance(x, _Ref) else x  # noqa: E731
    monkeypatch.setattr(ray, "get", lambda x, *a, **k: [unwrap(v) for v in x] if isinstance(x, list) else unwrap(x))
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs)[:num_returns],
                                                                                 list(refs)[num_returns:]))


def _generator(labels, mode="error", dynamic_filtering=False, tokenizer="TOK", engine=None, n=3, **kw):
    args = SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off"),
                             dynamic_filtering_enable=dynamic_filtering, dynamic_filtering_range=(-1.0, 2.0)),
        rollout=SimpleNamespace(n_samples_per_prompt=n, batch_size=len(labels)),
        vllm=SimpleNamespace(enable_sleep=False), dynamo=SimpleNamespace(nonfinite=mode))
    loader = [(None, [f"p{i}"], [lab], [None]) for i, lab in enumerate(labels)]
    return DynamoSamplesGenerator(SimpleNamespace(args=args), loader, loader, tokenizer, [engine or Engine()], **kw)


GEN_KW = dict(temperature=1.0, max_new_tokens=2, max_len=64)


@pytest.mark.parametrize("allocated", [True, False])
def test_a_nan_reward_stops_the_step_before_anything_reads_it(passthrough_ray, allocated):
    kw = dict(rollout_allocator=lambda ids: [3] * len(ids), num_candidates=3) if allocated else {}
    gen = _generator(["1", "nan", "0"], reward_source="/data/r.py", **kw)
    with pytest.raises(NonfiniteError) as info:
        gen.generate_samples(**GEN_KW)
    # prompt p1's sample 1 is the 5th sample of the step (groups of 3 in request order)
    assert str(info.value).startswith(
        f"non-finite reward in 1 of 9 samples checked: sample 4 (prompt id {prompt_id('p1', 'nan')}, prompt 'p1') "
        "has reward nan. A reward function must return a finite reward for every sample (reward function "
        "/data/r.py). The run stopped at this step")


@pytest.mark.parametrize("allocated", [True, False])
def test_drop_removes_the_whole_group_and_counts_it(passthrough_ray, allocated, capsys):
    kw = dict(rollout_allocator=lambda ids: [3, 2, 3], num_candidates=3) if allocated else {}
    gen = _generator(["1", "inf", "0"], mode="drop", **kw)
    samples, _, consumed, _ = gen.generate_samples(**GEN_KW)
    n1 = 2 if allocated else 3
    assert [s.prompts[0] for s in samples] == ["p0"] * 3 + ["p2"] * 3 and consumed == 3
    # the step index is the position among the samples the engines returned, kept after the drop
    assert [int(s.info[STEP_INDEX_KEY]) for s in samples] == [0, 1, 2] + [3 + n1 + k for k in range(3)]
    assert gen.last_nonfinite_dropped == n1 and gen.nonfinite_dropped == n1
    out = capsys.readouterr().out
    assert (f"[dynamo] --dynamo.nonfinite drop: sample 4 (prompt id {prompt_id('p1', 'inf')}, prompt 'p1') has "
            "reward inf: its group is dropped from the update and the pool") in out
    assert f"dropped {n1} of the step's {6 + n1} samples (indices {list(range(3, 3 + n1))})" in out
    if allocated:
        assert {int(s.info[GROUP_KEY]) for s in samples} == {0, 2}


def test_dynamic_filtering_would_hide_a_nan_score_so_it_is_caught_as_it_arrives(passthrough_ray, capsys):
    gen = _generator(["1", "nan"], dynamic_filtering=True)
    with pytest.raises(NonfiniteError, match=rf"^non-finite score in 1 of 1 samples checked: a sample \(prompt id "
                                             rf"{prompt_id('p1', 'nan')}, prompt 'p1'\) has score nan"):
        gen.generate_samples(**GEN_KW)
    gen = _generator(["1", "nan"], mode="drop", dynamic_filtering=True)
    samples, *_ = gen.generate_samples(**GEN_KW)
    assert [s.prompts[0] for s in samples] == ["p0"] * 3  # OpenRLHF's filter discarded p1's group
    assert gen.nonfinite_dropped == 1
    assert "has score nan: its group is discarded by --algo.dynamic_filtering_enable" in capsys.readouterr().out


def test_evaluation_rewards_are_checked_too(passthrough_ray, capsys):
    gen = _generator(["1", "nan"])
    with pytest.raises(NonfiniteError, match=r"^evaluation: non-finite reward in 1 of 6 samples checked"):
        gen.generate_eval_samples(**GEN_KW, n_samples_per_prompt=3)
    gen = _generator(["1", "nan"], mode="drop")
    samples = gen.generate_eval_samples(**GEN_KW, n_samples_per_prompt=3)
    assert len(samples) == 6 and gen.nonfinite_dropped == 0  # pass@k keeps every sample; NaN counts as failure
    assert "evaluation sample 4" in capsys.readouterr().out


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def test_prompts_cut_to_the_budget_are_counted_and_warned_once(passthrough_ray, capsys):
    # prompts "p0".."p2" have 2 tokens; the engine kept 1: every prompt was cut
    gen = _generator(["1", "1", "0"], tokenizer=CharTokenizer(), engine=Engine(prompt_tokens=1))
    samples, *_ = gen.generate_samples(**GEN_KW)
    assert len(samples) == 9 and gen.prompts_truncated == 3
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1
    assert ("[dynamo] WARNING: 3 of the 3 prompts of this training step are longer than the prompt budget of 1 "
            "tokens (longest 2 tokens)") in out
    assert "The budget is --data.max_len minus --rollout.max_new_tokens; raise --data.max_len." in out
    gen._dataloader_iter = None
    gen.generate_samples(**GEN_KW)
    assert gen.prompts_truncated == 6 and "WARNING" not in capsys.readouterr().out  # counted again, warned once
    full = _generator(["1", "1"], tokenizer=CharTokenizer())  # the engine kept the whole prompt
    full.generate_samples(**GEN_KW)
    assert full.prompts_truncated == 0 and "WARNING" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- experience maker

A = 4


def _maker_args(mode, n=3, estimator="group_norm"):
    return SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)),
        rollout=SimpleNamespace(n_samples_per_prompt=n, max_new_tokens=A),
        reward=SimpleNamespace(clip_range=(-10.0, 10.0), overlong_buffer_len=None, overlong_penalty_factor=1.0,
                               stop_properly_penalty_coef=None),
        data=SimpleNamespace(max_len=64), dynamo=SimpleNamespace(nonfinite=mode))


def _tagged_step(sizes, micro=2, tagged=True):
    """The step's samples in micro-batches of ``micro`` (rollout order), tagged like the generator does,
    with finite log-probs, rewards (alternating 0/1) and KL."""
    total = sum(sizes)
    group = np.repeat(np.arange(len(sizes)), sizes)
    prompts = [f"q{g}" for g in group]
    labels = ["l"] * total
    pid = prompt_ids(prompts, labels)
    rewards = (np.arange(total) % 2).astype(np.float32)
    exps = []
    for s in range(0, total, micro):
        pos = np.arange(s, min(s + micro, total))
        info = {"reward": torch.from_numpy(rewards[pos].copy()), STEP_INDEX_KEY: torch.from_numpy(pos + 100)}
        if tagged:
            info[GROUP_KEY] = torch.from_numpy(group[pos])
            info[PROMPT_ID_KEY] = torch.from_numpy(pid[pos])
        exps.append(Experience(
            action_mask=torch.ones(len(pos), A, dtype=torch.bool), action_log_probs=-torch.ones(len(pos), A),
            rewards=torch.from_numpy(rewards[pos].copy()), kl=torch.zeros(len(pos), A), index=pos.tolist(),
            prompts=[prompts[p] for p in pos], labels=[labels[p] for p in pos], info=info))
    return exps, pid


def _maker(mode, kl_coef=0.0, **kw):
    return DynamoExperienceMaker(None, None, None, None, FixedKLController(kl_coef),
                                 SimpleNamespace(args=_maker_args(mode)), None, **kw)


def _set_row(exps, position, field, value, token=1):
    for e in exps:
        if position in e.index:
            getattr(e, field)[e.index.index(position), token] = value


@pytest.mark.parametrize("field,what,kl_coef", [("action_log_probs", "old log-prob", 0.0), ("kl", "advantage", 0.1)])
def test_maker_error_stops_before_the_pool_learns_the_step(field, what, kl_coef):
    exps, pid = _tagged_step([3, 3, 3])
    _set_row(exps, 4, field, NAN if field == "action_log_probs" else INF)
    seen = []
    with pytest.raises(NonfiniteError) as info:
        _maker("error", kl_coef, on_groups=seen.append).compute_advantages_and_returns(exps)
    assert seen == []  # the pool was not updated from this step
    msg = str(info.value)
    assert msg.startswith(f"non-finite {what} in 1 of 9 samples checked: sample 104 (prompt id {pid[4]}, "
                          f"prompt 'q1') has {what} ")
    assert "at response token" in msg and "The run stopped at this step" in msg


@pytest.mark.parametrize("field,kl_coef", [("action_log_probs", 0.0), ("kl", 0.1)])
def test_maker_drop_removes_the_group_from_the_update_and_the_pool(field, kl_coef, capsys):
    exps, pid = _tagged_step([3, 2, 3], micro=3)
    _set_row(exps, 3, field, NAN)  # position 3 = group 1's first sample
    seen = []
    maker = _maker("drop", kl_coef, on_groups=seen.append)
    out = maker.compute_advantages_and_returns(exps)
    (groups,) = seen
    assert groups.sizes.tolist() == [3, 3] and groups.prompt_ids.tolist() == [pid[0], pid[5]]
    assert groups.successes.tolist() == [1, 2]  # rewards 0,1,0 and 1,0,1
    kept_steps = sorted(int(s) for e in out for s in e.info[STEP_INDEX_KEY])
    assert kept_steps == [100, 101, 102, 105, 106, 107]
    assert sorted(i for e in out for i in e.index) == list(range(6))  # renumbered: a permutation again
    assert all(torch.isfinite(e.advantages).all() for e in out)
    assert all(GROUP_KEY not in e.info and PROMPT_ID_KEY not in e.info for e in out)
    assert maker.nonfinite_dropped == 2
    assert "dropped 2 of the step's 8 samples (indices [103, 104])" in capsys.readouterr().out


def test_maker_drop_of_every_group_is_an_error():
    exps, _ = _tagged_step([2, 2])
    for p in range(4):
        _set_row(exps, p, "action_log_probs", -INF)
    with pytest.raises(NonfiniteError, match="every group of the step has a sample with a non-finite old log-prob"):
        _maker("drop").compute_advantages_and_returns(exps)


def test_untagged_maker_drops_openrlhfs_contiguous_groups():
    exps, pid = _tagged_step([3, 3, 3], tagged=False)
    _set_row(exps, 7, "action_log_probs", NAN)
    with pytest.raises(NonfiniteError, match=rf"sample 107 \(prompt id {pid[7]}, prompt 'q2'\) has old log-prob nan"):
        DynamoExperienceMaker(None, None, None, None, FixedKLController(0.0),
                              SimpleNamespace(args=_maker_args("error")), None,
                              tagged=False).compute_advantages_and_returns(exps)
    exps, _ = _tagged_step([3, 3, 3], tagged=False)
    _set_row(exps, 7, "action_log_probs", NAN)
    maker = DynamoExperienceMaker(None, None, None, None, FixedKLController(0.0),
                                  SimpleNamespace(args=_maker_args("drop")), None, tagged=False)
    out = maker.compute_advantages_and_returns(exps)
    assert sorted(int(s) for e in out for s in e.info[STEP_INDEX_KEY]) == list(range(100, 106))
    assert maker.nonfinite_dropped == 3


# ---------------------------------------------------------------------------------------------- actor loss


def test_a_nonfinite_loss_stops_before_backward(monkeypatch):
    B = 2
    lp, adv, mask = torch.zeros(B, A), torch.ones(B, A), torch.ones(B, A, dtype=torch.bool)
    old = torch.zeros(B, A)
    old[1, 2] = NAN
    backward_calls = []

    def fake_training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        loss = self.actor_loss_fn(lp, experience.action_log_probs, adv, action_mask=mask)[0]
        self.strategy.backward(loss, None, None)
        return {}

    monkeypatch.setattr(openrlhf_ppo_actor.ActorPPOTrainer, "training_step", fake_training_step)
    t = object.__new__(DynamoActorPPOTrainer)
    t.args = SimpleNamespace(
        actor=SimpleNamespace(eps_clip_low_high=(0.2, 0.2), dual_clip=None, loss_agg_mode="token-mean",
                              policy_loss_type="ppo", entropy_coef=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off", is_correction_mode="mask",
                                                       is_correction_gating="ratio",
                                                       is_correction_threshold=(0.5, 5.0))),
        train=SimpleNamespace(batch_size=8, dynamic_batch_enable=False, async_enable=False),
        dynamo=SimpleNamespace(loss=SimpleNamespace(prompt_weighting="tokens", token_normalizer=None),
                               allocation=SimpleNamespace(rule="off"),
                               modulation=SimpleNamespace(preset="off", mu_max=None, lambda_min=None, gamma=None,
                                                          tau=None)))
    t.strategy = SimpleNamespace(accumulated_gradient=1, backward=lambda *a: backward_calls.append(a))
    t.actor = torch.nn.Identity()
    t._init_dynamo()
    exp = Experience(action_mask=mask, action_log_probs=torch.zeros(B, A), prompts=["x", "y"], labels=["1", "2"],
                     info={STEP_INDEX_KEY: torch.tensor([3, 8])})
    t.training_step(exp, 0.0, 0)
    assert len(backward_calls) == 1 and STEP_INDEX_KEY not in exp.info  # popped: never logged as a metric
    exp = Experience(action_mask=mask, action_log_probs=old, prompts=["x", "y"], labels=["1", "2"],
                     info={STEP_INDEX_KEY: [torch.tensor(3), torch.tensor(8)]})  # as the replay buffer collates it
    with pytest.raises(NonfiniteError) as info:
        t.training_step(exp, 0.0, 0)
    assert len(backward_calls) == 1  # no backward of the non-finite loss
    assert str(info.value).startswith(
        f"non-finite loss nan in the micro-batch of samples [3, 8] (prompt ids {prompt_ids(['x', 'y'], ['1', '2']).tolist()}) "
        f"of this step: sample 8 (prompt id {prompt_id('y', '2')}) has old log-prob nan at response token 2.")
    assert t.strategy.backward.__name__ == "<lambda>"  # the strategy's own backward is back


# ---------------------------------------------------------------------------------------------- trainer


def test_trainer_logs_the_counts_and_expects_the_budget_less_the_dropped(monkeypatch):
    from openrlhf.trainer import ppo_trainer as openrlhf_ppo_trainer

    from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

    monkeypatch.setattr(openrlhf_ppo_trainer.PPOTrainer.__ray_actor_class__, "train_step",
                        lambda self, samples, step: ({}, step + 1))
    t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    t.samples_generator = SimpleNamespace(generated_rollouts=0, generated_tokens=0, nonfinite_dropped=3,
                                          last_nonfinite_dropped=3, prompts_truncated=5)
    t.experience_maker = SimpleNamespace(nonfinite_dropped=2, last_token_normalizer=None)
    t.balancing = None
    t.allocator = SimpleNamespace(last=SimpleNamespace(budget=9), metrics=lambda: {})
    status, step = t.train_step([None] * 6, 4)  # 9 allocated, a group of 3 dropped by the generator
    assert step == 5 and status["dynamo/nonfinite_dropped"] == 5.0 and status["dynamo/prompts_truncated"] == 5.0
    with pytest.raises(RuntimeError, match="step has 9 samples, the allocation's budget is 6"):
        t.train_step([None] * 9, 5)
    t.samples_generator.last_nonfinite_dropped = 0
    t.experience_maker.nonfinite_dropped = 4
    status, _ = t.train_step([None] * 9, 5)  # counts since the previous step's log
    assert status["dynamo/nonfinite_dropped"] == 2.0 and status["dynamo/prompts_truncated"] == 0.0


# ---------------------------------------------------------------------------------------------- OpenRLHF's executor


class _FakeLLM:
    """Stands for the vLLM engine inside OpenRLHF's agent executor: every request gets ``max_tokens`` tokens."""

    def __init__(self):
        self.prompts = []

    async def generate(self, prompt_token_ids, params, multi_modal_data=None):
        self.prompts.append(list(prompt_token_ids))
        out = SimpleNamespace(token_ids=[5] * params.max_tokens, finish_reason="length", logprobs=None)
        return SimpleNamespace(outputs=[out])


class ExecutorEngine:
    """A rollout engine whose responses come from OpenRLHF 0.11.2's real ``SingleTurnAgentExecutor`` (its prompt
    truncation and its reward-function call), with a fake LLM."""

    def __init__(self, reward_file):
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        self.executor = SingleTurnAgentExecutor(remote_rm_url=str(reward_file))
        self.llm = _FakeLLM()
        self.generate_responses = _Remote(self._generate)
        self.get_num_unfinished_requests = _Remote(lambda: 0)

    def _generate(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples, images=None):
        import asyncio

        async def all_samples():
            return await asyncio.gather(*[
                self.executor.execute(prompt, label, sampling_params, max_length, hf_tokenizer, self.llm)
                for _ in range(num_samples)])

        return _Ref(asyncio.run(all_samples()))


def test_openrlhfs_executor_cut_prompts_and_nan_rewards_are_caught(passthrough_ray, tmp_path, capsys):
    """The issue's two observations on the tiny preset's budget (--data.max_len 48, --rollout.max_new_tokens 16:
    32 prompt tokens): a 45-token prompt reaches the engine and the reward function cut from the left, and a
    reward function that returns NaN for one prompt's samples stops the step."""
    pytest.importorskip("tokenizers")
    from dynamo_openrlhf import tiny

    tok = tiny.build_tokenizer()
    reward_file = tmp_path / "nan_reward.py"
    reward_file.write_text(
        "def reward_func(queries, prompts, labels, **kw):\n"
        "    r = [float('nan') if p.startswith('Long') else 1.0 for p in prompts]\n"
        "    return {'rewards': r, 'scores': r}\n")
    long_prompt = "Long: " + "1+1=2, " * 5 + "so 2+3=?"  # 49 characters = 49 tokens of the char tokenizer
    short_prompt = "What is 2+3?"
    assert len(tok(long_prompt, add_special_tokens=False)["input_ids"]) == 49
    labels = ["5", "5"]
    args = SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off"), dynamic_filtering_enable=False),
        rollout=SimpleNamespace(n_samples_per_prompt=2, batch_size=2), vllm=SimpleNamespace(enable_sleep=False),
        dynamo=SimpleNamespace(nonfinite="drop"))
    loader = [(None, [p], [l], [None]) for p, l in zip([short_prompt, long_prompt], labels)]
    engine = ExecutorEngine(reward_file)
    gen = DynamoSamplesGenerator(SimpleNamespace(args=args), loader, None, tok, [engine],
                                 reward_source=str(reward_file))
    samples, *_ = gen.generate_samples(max_new_tokens=16, max_len=48, temperature=1.0)
    # the engine saw the long prompt's last 32 tokens only
    assert sorted(len(p) for p in engine.llm.prompts) == [12, 12, 32, 32]
    assert gen.prompts_truncated == 1
    out = capsys.readouterr().out
    assert ("WARNING: 1 of the 2 prompts of this training step are longer than the prompt budget of 32 tokens "
            "(longest 49 tokens)") in out
    # its NaN rewards: the group is dropped (drop mode), the short prompt's samples are trained on
    assert [s.prompts[0] for s in samples] == [short_prompt] * 2 and gen.last_nonfinite_dropped == 2
    assert f"(prompt id {prompt_id(long_prompt, '5')}, prompt {long_prompt!r}) has reward nan" in out
