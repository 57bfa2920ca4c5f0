"""DynamoSamplesGenerator: per-prompt n per request, prompt-id tags, groups. No Ray cluster: fake engines
whose ``.remote`` returns the value itself, with ``ray.get``/``ray.wait`` patched to pass values through."""

from types import SimpleNamespace

import numpy as np
import pytest

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402
import torch  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator  # noqa: E402

from dynamo_openrlhf import samples_generator as sg  # noqa: E402
from dynamo_openrlhf.prompt_ids import prompt_id, prompt_ids  # noqa: E402
from dynamo_openrlhf.samples_generator import (  # noqa: E402
    GROUP_KEY,
    PROMPT_ID_KEY,
    DynamoSamplesGenerator,
    RolloutGroups,
)

# ---------------------------------------------------------------------------------------------- prompt ids


def test_prompt_id_regression_value_and_type():
    # computed once with blake2b(digest_size=8) over the length-prefixed encoding; must never change
    assert prompt_id("What is 3+4?", "7") == 7201295561293944602
    assert prompt_id("", "") == 1041621211125469266
    assert isinstance(prompt_id("a", "b"), int)
    assert -(2**63) <= prompt_id("a", "b") < 2**63


def test_prompt_id_properties():
    assert prompt_id("ab", "c") != prompt_id("a", "bc")
    assert prompt_id("abc", "") != prompt_id("", "abc")
    assert prompt_id("p", "1") != prompt_id("p", "2")
    assert prompt_id("p1", "x") != prompt_id("p2", "x")
    assert prompt_id("é", "∑") == prompt_id("é", "∑")
    ps = [f"What is {i}+{j}?" for i in range(30) for j in range(30)]
    ls = [str(i) for i in range(len(ps))]
    ids = prompt_ids(ps, ls)
    assert ids.dtype == np.int64 and ids.shape == (900,)
    assert len(set(ids.tolist())) == 900
    # order-independent: shuffling the dataset keeps each prompt's id
    perm = np.random.default_rng(0).permutation(900)
    assert (prompt_ids([ps[i] for i in perm], [ls[i] for i in perm]) == ids[perm]).all()
    assert [prompt_id(p, l) for p, l in zip(ps[:5], ls[:5])] == ids[:5].tolist()


def test_prompt_ids_errors():
    with pytest.raises(ValueError, match="2 prompts but 1 labels"):
        prompt_ids(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="needs a str prompt, got NoneType"):
        prompt_id(None, "x")
    with pytest.raises(ValueError, match=r"^prompt_ids: item 1: .*got set"):
        prompt_ids(["a", "b"], ["x", {1, 2}])  # not a JSON value


def test_prompt_id_non_string_labels():
    # OpenRLHF hands labels to the reward function as they are: ints, floats, None, lists, dicts all get ids
    labels = [7, 7.5, None, True, [1, "a"], {"b": 1, "a": [2]}, "7"]
    ids = prompt_ids(["q"] * len(labels), labels)
    assert len(set(ids.tolist())) == len(labels)  # the integer 7 and the string "7" are different labels
    assert prompt_id("q", "7") == prompt_ids(["q"], ["7"])[0]  # str labels keep their ids
    # canonical: key order, tuples vs lists and numpy scalars do not change the id
    assert prompt_id("q", {"a": [2], "b": 1}) == prompt_id("q", {"b": 1, "a": [2]})
    assert prompt_id("q", (1, "a")) == prompt_id("q", [1, "a"])
    assert prompt_id("q", np.int64(7)) == prompt_id("q", 7)
    assert prompt_id("q", np.array([1, 2])) == prompt_id("q", [1, 2])
    # regression values (computed once; must never change)
    assert prompt_id("q", 7) == -2749081448707188370
    assert prompt_id("q", None) == 5092637272984775890


# ---------------------------------------------------------------------------------------------- fakes


def _answer(prompt: str) -> str:
    a, b = prompt.removeprefix("What is ").removesuffix("?").split("+")
    return str(int(a) + int(b))


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Ref:
    """Stands for a Ray ObjectRef (hashable, compared by identity); ``ray.get`` unwraps it."""

    def __init__(self, value):
        self.value = value


class FakeEngine:
    """Deterministic: each response echoes its own prompt and label, reward 1 iff label is the right sum."""

    def __init__(self, pending=0):
        self.calls = []
        self.pending = pending
        self.generate_responses = _Remote(self._generate)
        self.get_num_unfinished_requests = _Remote(lambda: self.pending)

    def _generate(self, **kw):
        self.calls.append(kw)
        n_prompt = len(kw["prompt"])
        out = []
        for k in range(kw["num_samples"]):
            toks = list(range(n_prompt)) + [100 + k, 101, 102]
            out.append(dict(observation_tokens=toks, action_ranges=[(n_prompt, n_prompt + 3)],
                            rollout_log_probs=None, prompt=kw["prompt"], label=kw["label"],
                            reward=float(_answer(kw["prompt"]) == kw["label"]),
                            scores=float(_answer(kw["prompt"]) == kw["label"])))
        return _Ref(out)


@pytest.fixture
def passthrough_ray(monkeypatch):
    def unwrap(x):
        return x.value if isinstance(x, _Ref) else x

    def get(x, *a, **k):
        return [unwrap(v) for v in x] if isinstance(x, list) else unwrap(x)

    def wait(refs, num_returns=1, timeout=None):
        refs = list(refs)
        # answer out of submission order (last first) to exercise the real completion-order path
        return refs[-num_returns:], refs[:-num_returns]

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", wait)


def _args(n=4):
    return SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off"), dynamic_filtering_enable=False),
        rollout=SimpleNamespace(n_samples_per_prompt=n, batch_size=4),
        vllm=SimpleNamespace(enable_sleep=False),
    )


def _gen(cls, engines, loader=None, **kw):
    return cls(SimpleNamespace(args=_args()), loader, None, "TOK", engines, **kw)


PROMPTS = ["What is 1+2?", "What is 2+2?", "What is 5+1?", "What is 0+9?"]
LABELS = ["3", "5", "6", "9"]  # prompt 2's label is wrong: reward depends on the prompt
GEN_KW = dict(temperature=0.7, top_p=0.9, max_new_tokens=16, max_len=64)


def _norm(call):
    c = dict(call)
    c["sampling_params"] = repr(c["sampling_params"])
    return c


# ---------------------------------------------------------------------------------------------- dispatch


def test_per_prompt_n_reaches_each_request(passthrough_ray):
    engines = [FakeEngine(), FakeEngine()]
    seen = []
    gen = _gen(DynamoSamplesGenerator, engines,
               rollout_allocator=lambda ids: (seen.append(ids), np.array([3, 0, 5, 1]))[1])
    refs = gen._dispatch_prompts_to_vllm(PROMPTS, LABELS, images=None, **GEN_KW)
    assert len(seen) == 1 and seen[0].dtype == np.int64 and seen[0].tolist() == prompt_ids(PROMPTS, LABELS).tolist()
    assert len(refs) == 3
    calls = [c for e in engines for c in e.calls]
    by_prompt = {c["prompt"]: c for c in calls}
    assert PROMPTS[1] not in by_prompt  # n = 0: not dispatched
    assert [by_prompt[PROMPTS[i]]["num_samples"] for i in (0, 2, 3)] == [3, 5, 1]
    assert [by_prompt[PROMPTS[i]]["label"] for i in (0, 2, 3)] == [LABELS[i] for i in (0, 2, 3)]
    # load-aware with each prompt's own n: e0 gets n=3, e1 n=5, then the lighter e0 gets n=1
    assert [c["prompt"] for c in engines[0].calls] == [PROMPTS[0], PROMPTS[3]]
    assert [c["prompt"] for c in engines[1].calls] == [PROMPTS[2]]
    for c in calls:
        assert c["max_length"] == 64 and c["hf_tokenizer"] == "TOK" and c["images"] is None
        assert c["sampling_params"].temperature == 0.7 and c["sampling_params"].max_tokens == 16


def test_load_balance_respects_pending_counts(passthrough_ray):
    engines = [FakeEngine(pending=10), FakeEngine(pending=0)]
    gen = _gen(DynamoSamplesGenerator, engines, rollout_allocator=lambda ids: [8, 1, 1, 1])
    gen._dispatch_prompts_to_vllm(PROMPTS, LABELS, **GEN_KW)
    # e1 (load 0) takes n=8 → 8; e1 still < e0(10): takes 1 → 9, 1 → 10; tie (10,0)<(10,1): e0 takes the last
    assert [c["num_samples"] for c in engines[1].calls] == [8, 1, 1]
    assert [c["prompt"] for c in engines[0].calls] == [PROMPTS[3]]


def test_all_zero_and_bad_allocations(passthrough_ray):
    engines = [FakeEngine()]
    assert _gen(DynamoSamplesGenerator, engines, rollout_allocator=lambda ids: [0] * 4)._dispatch_prompts_to_vllm(
        PROMPTS, LABELS, **GEN_KW) == []
    assert engines[0].calls == []
    for bad, msg in (([1, 2], "2 counts for 4 prompts"), ([1, -1, 1, 1], "non-negative"),
                     ([1, 1.5, 1, 1], "non-negative integers")):
        with pytest.raises(ValueError, match=msg):
            _gen(DynamoSamplesGenerator, engines, rollout_allocator=lambda ids, b=bad: b)._dispatch_prompts_to_vllm(
                PROMPTS, LABELS, **GEN_KW)


def test_default_none_is_openrlhf_exactly(passthrough_ray):
    ours, theirs = [FakeEngine(1), FakeEngine(0)], [FakeEngine(1), FakeEngine(0)]
    r1 = _gen(DynamoSamplesGenerator, ours)._dispatch_prompts_to_vllm(PROMPTS, LABELS, images=None, **GEN_KW)
    r2 = _gen(SamplesGenerator, theirs)._dispatch_prompts_to_vllm(PROMPTS, LABELS, images=None, **GEN_KW)
    assert [r.value for r in r1] == [r.value for r in r2]
    for a, b in zip(ours, theirs):
        assert [_norm(c) for c in a.calls] == [_norm(c) for c in b.calls] and a.calls
    assert all(c["num_samples"] == 4 for e in ours for c in e.calls)


def test_eval_ignores_allocator(passthrough_ray):
    engines = [FakeEngine()]
    gen = _gen(DynamoSamplesGenerator, engines, rollout_allocator=lambda ids: [7, 0, 0, 0])
    gen.eval_dataloader = [(None, PROMPTS[:2], LABELS[:2], [None, None])]
    exps = gen.generate_eval_samples(n_samples_per_prompt=2, **GEN_KW)
    assert [c["num_samples"] for c in engines[0].calls] == [2, 2] and len(exps) == 4
    assert gen._evaluating is False


# ---------------------------------------------------------------------------------------------- alignment


def _loader(prompts, labels, batch=2):
    return [(None, prompts[i:i + batch], labels[i:i + batch], [None] * len(prompts[i:i + batch]))
            for i in range(0, len(prompts), batch)]


def test_alignment_through_generate_samples(passthrough_ray):
    """A deterministic rollout whose reward depends on the prompt, with allocations that differ per
    prompt: every sample's reward, label and group are its own prompt's (docs/reference_notes.md, misalignment defect)."""
    engines = [FakeEngine(), FakeEngine(), FakeEngine()]
    alloc = [3, 0, 5, 1]
    seen = []
    gen = _gen(DynamoSamplesGenerator, engines, loader=_loader(PROMPTS, LABELS),
               rollout_allocator=lambda ids: (seen.append(ids.tolist()), alloc)[1], num_candidates=4)
    exps, filter_rate, consumed, exhausted = gen.generate_samples(**GEN_KW)
    assert seen == [prompt_ids(PROMPTS, LABELS).tolist()] and filter_rate is None and consumed == 4 and not exhausted
    assert len(exps) == sum(alloc)
    lab = dict(zip(PROMPTS, LABELS))
    for e in exps:
        p, l = e.prompts[0], e.labels[0]
        assert l == lab[p]
        assert e.info[PROMPT_ID_KEY].dtype == torch.int64 and e.info[PROMPT_ID_KEY].tolist() == [prompt_id(p, l)]
        assert e.rewards.item() == float(_answer(p) == l) == e.info["reward"].item()
    groups = RolloutGroups.from_experiences(exps)
    # groups arrive in completion order (the fake answers last-submitted first); each group's size is
    # its own prompt's allocation, and its successes its own prompt's rewards
    got = {pid: (n, s) for pid, n, s in zip(groups.prompt_ids.tolist(), groups.sizes.tolist(),
                                            groups.successes.tolist())}
    want = {prompt_id(p, l): (n, n * int(_answer(p) == l)) for p, l, n in zip(PROMPTS, LABELS, alloc) if n > 0}
    assert got == want and len(groups.sizes) == 3
    assert groups.prompt_ids.tolist() == [prompt_id(PROMPTS[i], LABELS[i]) for i in (3, 2, 0)]
    assert sorted({e.info[GROUP_KEY].item() for e in exps}) == [0, 1, 2]  # one serial per request
    # the loader is empty now: OpenRLHF's contract is an empty, exhausted step; then a new pass starts
    assert gen.generate_samples(**GEN_KW) == ([], None, 0, True)
    exps2, _, consumed2, _ = gen.generate_samples(**GEN_KW)
    assert consumed2 == 4 and len(exps2) == 9
    assert {e.info[GROUP_KEY].item() for e in exps2} == {3, 4, 5}


def test_duplicate_prompts_stay_separate_groups(passthrough_ray):
    engines = [FakeEngine()]
    prompts, labels = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [LABELS[0], LABELS[1], LABELS[0]]
    gen = _gen(DynamoSamplesGenerator, engines, loader=_loader(prompts, labels, batch=3),
               rollout_allocator=lambda ids: [2, 1, 3], num_candidates=3)
    exps, _, _, _ = gen.generate_samples(**GEN_KW)
    groups = RolloutGroups.from_experiences(exps)
    assert sorted(groups.sizes.tolist()) == [1, 2, 3] and len(set(groups.prompt_ids.tolist())) == 2


def test_engine_answering_for_another_prompt_is_an_error(passthrough_ray):
    class Misaligned(FakeEngine):
        def _generate(self, **kw):
            out = super()._generate(**kw)
            out.value[-1]["label"] = "wrong"
            return out

    gen = _gen(DynamoSamplesGenerator, [Misaligned()], loader=_loader(PROMPTS, LABELS, 4),
               rollout_allocator=lambda ids: [1, 1, 1, 1])
    with pytest.raises(RuntimeError, match="another prompt/label"):
        gen.generate_samples(**GEN_KW)

    class Short(FakeEngine):
        def _generate(self, **kw):
            return _Ref(super()._generate(**kw).value[:-1])

    gen = _gen(DynamoSamplesGenerator, [Short()], loader=_loader(PROMPTS, LABELS, 4),
               rollout_allocator=lambda ids: [2, 2, 2, 2])
    with pytest.raises(RuntimeError, match="returned 1 samples for a request of n=2"):
        gen.generate_samples(**GEN_KW)


def test_without_allocator_generate_samples_is_openrlhfs(passthrough_ray):
    engines = [FakeEngine()]
    gen = _gen(DynamoSamplesGenerator, engines, loader=_loader(PROMPTS, LABELS, 4))
    exps, _, consumed, _ = gen.generate_samples(**GEN_KW)
    assert consumed == 4 and len(exps) == 16 and all(c["num_samples"] == 4 for c in engines[0].calls)
    assert all(GROUP_KEY not in e.info for e in exps)


def _tagged(pid, group, k=1, index=None, scores=None):
    return Experience(
        info={PROMPT_ID_KEY: torch.tensor([pid] * k, dtype=torch.int64),
              GROUP_KEY: torch.tensor([group] * k, dtype=torch.int64)},
        index=index, rewards=torch.tensor(scores if scores is not None else [0.0] * k))


def test_rollout_groups_follow_the_index_and_count_successes():
    # three groups in rollout order: g7 (positions 0-1), g3 (2-4), g9 (5); the experiences hold them
    # in another order (as OpenRLHF's dynamic batching would), with per-sample index
    exps = [_tagged(30, 3, 2, index=[3, 2], scores=[1.0, 0.0]),
            _tagged(90, 9, 1, index=[5], scores=[1.0]),
            _tagged(70, 7, 2, index=[1, 0], scores=[0.4, 0.6]),
            _tagged(30, 3, 1, index=[4], scores=[1.0])]
    g = RolloutGroups.from_experiences(exps, success_threshold=0.5, pop_tags=True)
    assert g.prompt_ids.tolist() == [70, 30, 90] and g.sizes.tolist() == [2, 3, 1]
    assert g.successes.tolist() == [1, 2, 1] and g.positions.tolist() == [3, 2, 5, 1, 0, 4]
    assert g.uniform_size() is None and g.num_samples == 6
    assert all(PROMPT_ID_KEY not in e.info and GROUP_KEY not in e.info for e in exps)
    even = RolloutGroups.from_experiences([_tagged(1, 0, 2), _tagged(2, 1, 2)])
    assert even.uniform_size() == 2 and even.positions.tolist() == [0, 1, 2, 3]


def test_rollout_groups_errors():
    with pytest.raises(ValueError, match="not contiguous"):
        RolloutGroups.from_experiences([_tagged(5, 0), _tagged(6, 1), _tagged(5, 0)])
    with pytest.raises(ValueError, match="no info"):
        RolloutGroups.from_experiences([Experience(info={})])
    with pytest.raises(ValueError, match="not a permutation"):
        RolloutGroups.from_experiences([_tagged(5, 0, 2, index=[0, 2])])
    with pytest.raises(ValueError, match="different prompts"):
        RolloutGroups.from_experiences([_tagged(5, 0), _tagged(6, 0)])
    empty = RolloutGroups.from_experiences([])
    assert empty.sizes.size == 0 and empty.num_samples == 0


def test_import_check_names_symbol(monkeypatch):
    def changed(self, prompts, labels, images=None):
        return []

    monkeypatch.setattr(SamplesGenerator, "_dispatch_prompts_to_vllm", changed)
    with pytest.raises(ImportError, match=r"SamplesGenerator\._dispatch_prompts_to_vllm.*openrlhf 0\.11\.2"):
        sg._check_openrlhf_api()
    monkeypatch.undo()
    sg._check_openrlhf_api()  # the installed openrlhf 0.11.2 passes
    monkeypatch.delattr(SamplesGenerator, "_process_response_into_experience")
    with pytest.raises(ImportError, match="_process_response_into_experience"):
        sg._check_openrlhf_api()


@pytest.mark.parametrize("oversample", [1.0, 1.34, 2.0])
@pytest.mark.parametrize("num_prompts", [64, 63, 7])
def test_scheduler_steps_count_the_rollouts_a_pass_spends(passthrough_ray, oversample, num_prompts):
    """The LR scheduler's step count (AllocationConfig.scheduler_steps, what the trainer hands OpenRLHF
    as max_steps) is OpenRLHF's formula over the rollouts this generator really spends in a pass: with a
    non-integer over-sampling ratio the old max_steps / oversample was a step short (issue 15 item 4)."""
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator

    n, bs, episodes = 4, 4, 2
    config = AllocationConfig(rule="neyman", n_samples_per_prompt=n, prompts_per_step=bs, lo=0, hi=16,
                              oversample=oversample)
    allocator = RolloutAllocator(config)
    prompts = [f"What is {i}+1?" for i in range(num_prompts)]
    labels = [str(i + 1) for i in range(num_prompts)]
    gen = _gen(DynamoSamplesGenerator, [FakeEngine()], loader=_loader(prompts, labels, batch=1),
               rollout_allocator=allocator.allocate,
               num_candidates=config.candidates_per_step)
    steps, total = 0, 0
    while True:  # OpenRLHF's PPOTrainer.fit loop over one episode
        exps, _, _, exhausted = gen.generate_samples(**GEN_KW)
        if exps:
            steps += 1
            total += len(exps)
        if exhausted:
            break
    assert total == config.samples_per_pass(num_prompts)
    train_bs = n * bs  # one optimizer step per full rollout step
    assert config.scheduler_steps(num_prompts, train_bs, episodes, 1) == total // train_bs * episodes
    if oversample == 1.0:  # OpenRLHF's own formula (prepare_datasets) exactly
        assert config.scheduler_steps(num_prompts, train_bs, episodes, 1) == num_prompts * n // train_bs * episodes
    if (oversample, num_prompts) == (1.34, 64):
        # 12 steps of 5 candidates and one of 4 prompts: 13 optimizer steps; the old count was int(16 / 1.34)
        assert (steps, config.scheduler_steps(64, 16, 1, 1)) == (13, 13) and int(16 / 1.34) == 11


class RaisingReward(FakeEngine):
    """The reward function raised for the sample of prompt 2: OpenRLHF's executor left its reward None."""

    def _generate(self, **kw):
        out = super()._generate(**kw)
        for r in out.value:
            if r["prompt"] == PROMPTS[2]:
                r["reward"] = r["scores"] = None
        return out


@pytest.mark.parametrize("path", ["allocated", "openrlhf", "eval"])
def test_a_sample_without_reward_is_one_clear_error(passthrough_ray, path):
    """With --dynamo.allocation.rule off (OpenRLHF's own generate path), with an allocator, and at
    evaluation: one error naming the sample and the reward file (issue 15 item 3), not a crash later in
    batch concatenation."""
    alloc = (lambda ids: [2, 2, 2, 2]) if path == "allocated" else None
    gen = _gen(DynamoSamplesGenerator, [RaisingReward()], loader=_loader(PROMPTS, LABELS, 4), rollout_allocator=alloc,
               reward_source="/data/my_reward.py")
    want = (r"^reward function /data/my_reward\.py gave no reward for a sample of prompt 'What is 5\+1\?' with "
            r"label '6': it raised an exception or returned no 'rewards'")
    with pytest.raises(RuntimeError, match=want):
        if path == "eval":
            gen.eval_dataloader = [(None, PROMPTS, LABELS, [None] * 4)]
            gen.generate_eval_samples(n_samples_per_prompt=2, **GEN_KW)
        else:
            gen.generate_samples(**GEN_KW)
    # rewards from a reward model (no reward function): None is expected at this point
    gen = _gen(DynamoSamplesGenerator, [RaisingReward()], loader=_loader(PROMPTS, LABELS, 4), rollout_allocator=alloc)
    if path != "eval":
        exps = gen.generate_samples(**GEN_KW)[0]
        assert sum(e.rewards is None for e in exps) == (2 if path == "allocated" else 4)


def test_reward_source_names_the_file_agent_or_urls():
    from dynamo_openrlhf.samples_generator import reward_source

    def args(url, agent=None):
        return SimpleNamespace(reward=SimpleNamespace(remote_url=url), train=SimpleNamespace(agent_func_path=agent))

    assert reward_source(args(None)) is None
    assert reward_source(args(["/r.py"])) == "/r.py"  # OpenRLHF splits the flag into a list
    assert reward_source(args("http://a,http://b")) == "http://a,http://b"
    assert reward_source(args("agent", "/agent.py")) == "/agent.py"


def test_prompt_ids_are_hashed_once_per_step(passthrough_ray, monkeypatch):
    """Each (prompt, label) of a step is hashed once, before the allocation; its samples carry that id
    (no second hash per sample)."""
    from dynamo_openrlhf import prompt_ids as pid_module

    hashed = []
    real = pid_module.prompt_id
    monkeypatch.setattr(pid_module, "prompt_id", lambda p, l: (hashed.append(p), real(p, l))[1])
    gen = _gen(DynamoSamplesGenerator, [FakeEngine()], loader=_loader(PROMPTS, LABELS, 4),
               rollout_allocator=lambda ids: [3, 0, 5, 1], num_candidates=4)
    exps = gen.generate_samples(**GEN_KW)[0]
    assert sorted(hashed) == sorted(PROMPTS) and len(exps) == 9
    assert sorted(e.info[PROMPT_ID_KEY].item() for e in exps) == sorted(
        [real(PROMPTS[0], LABELS[0])] * 3 + [real(PROMPTS[2], LABELS[2])] * 5 + [real(PROMPTS[3], LABELS[3])])
