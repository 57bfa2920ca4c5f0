"""``--algo.dynamic_filtering_enable`` with an allocation (issue #25 §2): groups without reward spread are dropped
from the update but learnt by the pool (once, in the step's update), their rollouts are refilled over new prompts
by the allocator, and the spend is counted. Fake engines (``.remote`` returns the value), ``ray.get``/``ray.wait``
patched; one small e2e run on the tiny preset at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402

from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator  # noqa: E402
from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer  # noqa: E402
from dynamo_openrlhf.prompt_ids import prompt_ids  # noqa: E402
from dynamo_openrlhf.samples_generator import (  # noqa: E402
    DynamoSamplesGenerator,
    RolloutGroups,
    merge_filtered_groups,
    zero_reward_spread,
)

N = 4  # rollouts per prompt
GEN_KW = dict(temperature=1.0, max_new_tokens=16, max_len=64)
REWARD = {"all": lambda k: 1.0, "none": lambda k: 0.0, "half": lambda k: 0.5, "mixed": lambda k: float(k % 2),
          "nan": lambda k: float("nan")}


class _Ref:
    def __init__(self, value):
        self.value = value


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class Engine:
    """Sample k of a request has k + 1 response tokens and its label's reward (= score): 'all' 1, 'none' 0,
    'half' 0.5 (partial credit, no spread), 'mixed' k % 2, 'nan' NaN."""

    def __init__(self):
        self.requests = []
        self.generate_responses = _Remote(self._generate)
        self.get_num_unfinished_requests = _Remote(lambda: 0)

    def _generate(self, **kw):
        self.requests.append((kw["prompt"], kw["num_samples"]))
        out = []
        for k in range(kw["num_samples"]):
            r = REWARD[kw["label"]](k)
            toks = [7, 8] + [50 + j for j in range(k + 1)]
            out.append(dict(observation_tokens=toks, action_ranges=[(2, 2 + k + 1)], rollout_log_probs=None,
                            prompt=kw["prompt"], label=kw["label"], reward=r, scores=r))
        return _Ref(out)


@pytest.fixture
def passthrough_ray(monkeypatch):
    unwrap = lambda x: x.value if isinstance(x, _Ref) else x  # noqa: E731
    monkeypatch.setattr(ray, "get", lambda x, *a, **k: [unwrap(v) for v in x] if isinstance(x, list) else unwrap(x))
    # completion order: the last submitted first
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs)[-num_returns:],
                                                                                 list(refs)[:-num_returns]))


def _generator(labels, batch_size=2, num_candidates=None, **kw):
    args = NS(algo=NS(advantage=NS(is_correction_level="off"), dynamic_filtering_enable=True,
                      dynamic_filtering_range=(0.0, 1.0)),
              rollout=NS(n_samples_per_prompt=N, batch_size=batch_size),
              vllm=NS(enable_sleep=False))
    loader = [(None, [f"p{i}"], [lab], [None]) for i, lab in enumerate(labels)]
    engine = Engine()
    gen = DynamoSamplesGenerator(NS(args=args), loader, None, "TOK", [engine], num_candidates=num_candidates, **kw)
    return gen, engine


def _pid(i, label):
    return int(prompt_ids([f"p{i}"], [label])[0])


def _cfg(**kw):
    base = dict(rule="neyman", n_samples_per_prompt=N, prompts_per_step=2, lo=3, hi=5, forget=1.0, fit_prior_every=0)
    base.update(kw)
    return AllocationConfig(**base)


# ---------------------------------------------------------------------------------------------- the test


def test_zero_reward_spread():
    assert zero_reward_spread([0.5, 0.5, 0.5, 0.5])  # OpenRLHF's mean-range test (0, 1) keeps this group
    assert zero_reward_spread([1.0, 1.0]) and zero_reward_spread([0.0]) and zero_reward_spread([-2.0, -2.0])
    assert zero_reward_spread([0.5, 0.5 + 1e-7])  # float32 rounding of one value is no signal
    assert not zero_reward_spread([0.5, 0.5 + 1e-5])
    assert not zero_reward_spread([0.0, 1.0, 1.0])
    assert not zero_reward_spread([float("nan")] * 3)  # undefined: left to the --dynamo.nonfinite check
    assert not zero_reward_spread([1.0, float("inf")])
    assert not zero_reward_spread([])
    assert zero_reward_spread([0.0, 0.3], tol=0.3) and not zero_reward_spread([0.0, 0.3], tol=0.29)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0, got -1"):
        zero_reward_spread([1.0], tol=-1)


# ---------------------------------------------------------------------------------------------- the generator


def test_dropped_groups_are_refilled_by_the_allocator_and_kept_for_the_pool(passthrough_ray):
    """p0 (mixed) and p1 (all right) get 3 and 5; p1 has no spread: dropped, its 5 rollouts refilled on p2
    (constant 0.5: OpenRLHF would keep it, we drop it), whose 5 are refilled on p3 (mixed): kept."""
    labels = ["mixed", "all", "half", "mixed", "mixed"]
    refills = []
    gen, engine = _generator(labels, rollout_allocator=lambda ids: [3, 5],
                             refill_allocator=lambda ids, b: (refills.append((ids.tolist(), b)), [b] * len(ids))[1])
    samples, rate, consumed, exhausted = gen.generate_samples(**GEN_KW)
    assert engine.requests == [("p0", 3), ("p1", 5), ("p2", 5), ("p3", 5)]
    assert refills == [([_pid(2, "half")], 5), ([_pid(3, "mixed")], 5)]
    assert consumed == 4 and not exhausted
    assert rate == 50.0  # 2 of the step's 4 groups kept
    assert sorted((s.prompts[0] for s in samples)) == ["p0"] * 3 + ["p3"] * 5  # the budget 3 + 5 is trained
    assert [int(s.info["dynamo_step_index"]) for s in samples] == list(range(8))
    assert gen.last_filtered_rollouts == 10 and gen.filtered_rollouts == 10 and gen.filtered_groups == 2
    assert gen.generated_rollouts == 18  # spent: trained + dropped
    dropped = gen.take_filtered()
    assert dropped.prompt_ids.tolist() == [_pid(1, "all"), _pid(2, "half")]
    assert dropped.sizes.tolist() == [5, 5] and dropped.successes.tolist() == [5, 0]  # 0.5 is not > 0.5
    assert gen.take_filtered() is None  # taken once

    # the next step: p4 is kept; the loader is exhausted, nothing was dropped
    gen.rollout_allocator = lambda ids: [4]
    samples, rate, consumed, exhausted = gen.generate_samples(**GEN_KW)
    assert len(samples) == 4 and rate == 100.0 and consumed == 1 and exhausted
    assert gen.last_filtered_rollouts == 0 and gen.take_filtered() is None


def test_refill_stops_when_the_loader_is_exhausted(passthrough_ray):
    gen, engine = _generator(["all", "none", "none"], rollout_allocator=lambda ids: [4, 4],
                             refill_allocator=lambda ids, b: [min(4, b // len(ids))] * len(ids))  # hi 4
    samples, rate, consumed, exhausted = gen.generate_samples(**GEN_KW)
    # both dropped (8 rollouts) -> 2 refill prompts wanted, 1 left (p2: 4 at most, dropped too): nothing to train on
    assert engine.requests == [("p0", 4), ("p1", 4), ("p2", 4)]
    assert samples == [] and rate == 0.0 and consumed == 3 and exhausted
    assert gen.last_filtered_rollouts == 12
    # the dropped outcomes wait for the next pool update (a step without samples trains nothing)
    assert gen.take_filtered().sizes.tolist() == [4, 4, 4]


def test_oversampling_draws_more_refill_candidates(passthrough_ray):
    # num_candidates 4 for a batch of 2: twice the candidates per dropped group
    refills = []
    gen, engine = _generator(["all", "mixed", "mixed", "mixed", "mixed", "mixed"], num_candidates=4,
                             rollout_allocator=lambda ids: [4, 4, 0, 0],
                             refill_allocator=lambda ids, b: (refills.append((len(ids), b)), [b] + [0] * (len(ids) - 1))[1])
    samples, _, consumed, _ = gen.generate_samples(**GEN_KW)
    assert refills == [(2, 4)] and consumed == 6 and len(samples) == 8
    assert engine.requests == [("p0", 4), ("p1", 4), ("p4", 4)]


def test_nonfinite_rewards_are_never_filtered_silently(passthrough_ray):
    from dynamo_openrlhf.nonfinite import NonfiniteError

    gen, _ = _generator(["nan", "mixed"], rollout_allocator=lambda ids: [4, 4],
                        refill_allocator=lambda ids, b: [b] * len(ids))
    gen.nonfinite = "error"
    with pytest.raises(NonfiniteError, match="reward"):
        gen.generate_samples(**GEN_KW)
    assert gen.filtered_groups == 0


def test_filtering_with_an_allocator_needs_a_refill_allocator():
    with pytest.raises(ValueError, match="needs a refill_allocator"):
        _generator(["mixed"], rollout_allocator=lambda ids: [4])


# ---------------------------------------------------------------------------------------------- the allocator


def test_allocate_refill_spends_the_dropped_rollouts_by_the_rule_and_extends_the_step():
    a = RolloutAllocator(_cfg(lo=0, hi=8, min_rollouts=2))
    ids = np.arange(1, 5, dtype=np.int64)
    # evidence: 1 and 2 settled, 3 and 4 uncertain
    a.pool.update(ids, [10, 0, 5, 5], [10, 10, 10, 10])
    first = a.allocate(ids[:2])
    assert first.sum() == 8 and a.last.budget == 8
    refill_ids = np.array([3, 4, 1], dtype=np.int64)
    counts = a.allocate_refill(refill_ids, 12)
    want = a.pool.allocate(refill_ids, 12, 0, 8, "neyman", **a._options())
    assert counts.tolist() == np.asarray(want).tolist() == [5, 4, 3]
    assert counts[2] < counts[:2].min()  # the settled prompt gets the fewest
    assert a.last.counts.tolist() == first.tolist() + counts.tolist()
    assert a.last.budget == 20 and a.last.refills == 1 and a.last.variances.shape == (5,)
    assert a.metrics()["dynamo/alloc_candidates"] == 5.0 and a.metrics()["dynamo/alloc_budget"] == 20.0


def test_allocate_refill_bounds():
    a = RolloutAllocator(_cfg(lo=3, hi=5))
    a.allocate(np.array([1, 2]))
    # lo 3: 5 rollouts fit on one prompt only (the others get 0)
    assert a.allocate_refill(np.array([7, 8, 9]), 5).tolist() == [5, 0, 0]
    # hi 5: at most 10 on two prompts
    assert a.allocate_refill(np.array([7, 8]), 14).tolist() == [5, 5]
    assert a.allocate_refill(np.array([7]), 2).tolist() == [0]  # below lo: nothing
    assert a.last.budget == 8 + 5 + 10 and a.last.refills == 3
    with pytest.raises(ValueError, match="budget must be an integer >= 0"):
        a.allocate_refill(np.array([7]), -1)
    with pytest.raises(ValueError, match="no allocation this step yet"):
        RolloutAllocator(_cfg()).allocate_refill(np.array([7]), 4)


# ---------------------------------------------------------------------------------------------- the pool


def _trainer(gen, allocator):
    t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    t.samples_generator, t.allocator = gen, allocator
    return t


def test_every_rollout_updates_the_pool_once_dropped_groups_included(passthrough_ray):
    labels = ["mixed", "all", "half", "mixed", "none", "mixed"]
    allocator = RolloutAllocator(_cfg())
    gen, engine = _generator(labels, rollout_allocator=allocator.allocate, refill_allocator=allocator.allocate_refill)
    trainer = _trainer(gen, allocator)
    samples, _, _, _ = gen.generate_samples(**GEN_KW)
    # the trainer's budget check: what the step allocated less what was dropped is what it trains on
    assert len(samples) == allocator.last.budget - gen.last_filtered_rollouts == 2 * N
    trainer._record_groups(RolloutGroups.from_experiences(samples))  # what the experience maker hands over
    assert allocator.steps == 1  # one update (one forgetting step) for the whole step
    ids = prompt_ids([f"p{i}" for i in range(4)], labels[:4])
    s, f = allocator.pool.evidence(ids)
    sent = {p: n for p, n in engine.requests}
    assert (s + f).tolist() == [sent["p0"], sent["p1"], sent["p2"], sent["p3"]]  # trials: every rollout, once
    assert s.tolist() == [sent["p0"] // 2, sent["p1"], 0, sent["p3"] // 2]
    assert float((s + f).sum()) == gen.generated_rollouts == allocator.pool.stats()["successes"] + \
        allocator.pool.stats()["failures"]
    # the filtered groups were taken by that update: the next one does not add them again
    assert gen.take_filtered() is None
    assert trainer._filtered_since_last_step() == {"dynamo/filtered_groups": 2.0, "dynamo/filtered_rollouts": 8.0}
    assert trainer._filtered_since_last_step() == {"dynamo/filtered_groups": 0.0, "dynamo/filtered_rollouts": 0.0}


def test_train_step_expects_the_budget_less_the_dropped_and_logs_them(monkeypatch):
    from openrlhf.trainer import ppo_trainer as openrlhf_ppo_trainer

    monkeypatch.setattr(openrlhf_ppo_trainer.PPOTrainer.__ray_actor_class__, "train_step",
                        lambda self, samples, step: ({}, step + 1))
    t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    t.samples_generator = NS(filtering=True, generated_rollouts=13, generated_tokens=0, nonfinite_dropped=0,
                             last_nonfinite_dropped=0, prompts_truncated=0, filtered_groups=1, filtered_rollouts=5,
                             last_filtered_rollouts=5)
    t.experience_maker = NS(nonfinite_dropped=0, last_token_normalizer=None)
    t.balancing = None
    t.allocator = NS(last=NS(budget=13), metrics=lambda: {})  # 8 + a refill of the 5 dropped
    status, _ = t.train_step([None] * 8, 0)
    assert status["dynamo/filtered_rollouts"] == 5.0 and status["dynamo/filtered_groups"] == 1.0
    assert status["dynamo/generated_rollouts"] == 13.0
    with pytest.raises(RuntimeError, match="step has 9 samples, the allocation's budget is 8"):
        t.train_step([None] * 9, 1)


def test_merge_filtered_groups_counts_the_dropped_noise_at_the_class_means():
    kept = RolloutGroups(prompt_ids=np.array([1, 2]), sizes=np.array([4, 4]), successes=np.array([2, 1]),
                         positions=np.arange(8), noise_success=np.array([3.0, 1.0]), noise_failure=np.array([2.0, 6.0]))
    dropped = RolloutGroups(prompt_ids=np.array([3, 4]), sizes=np.array([5, 3]), successes=np.array([5, 0]),
                            positions=np.zeros(0, dtype=np.int64))
    ids, s, t, ns, nf = merge_filtered_groups(kept, dropped, (None, None))
    assert ids.tolist() == [1, 2, 3, 4] and s.tolist() == [2, 1, 5, 0] and t.tolist() == [4, 4, 5, 3]
    # no pool means yet: the kept groups' class means this step, (3 + 1) / 3 and (2 + 6) / 5
    assert ns.tolist() == [3.0, 1.0, 5 * (4.0 / 3), 0.0] and nf.tolist() == [2.0, 6.0, 0.0, 3 * (8.0 / 5)]
    # the pool's means win when it has them
    _, _, _, ns, nf = merge_filtered_groups(kept, dropped, (0.5, 2.0))
    assert ns.tolist() == [3.0, 1.0, 2.5, 0.0] and nf.tolist() == [2.0, 6.0, 0.0, 6.0]
    # no mean anywhere for a class a dropped group has: no noise this step
    only_fail = RolloutGroups(prompt_ids=np.array([1]), sizes=np.array([2]), successes=np.array([0]),
                              positions=np.arange(2), noise_success=np.array([0.0]), noise_failure=np.array([1.0]))
    assert merge_filtered_groups(only_fail, dropped, (None, None))[3:] == (None, None)
    # nothing dropped / no noise: the kept rows as they are
    ids, s, t, ns, nf = merge_filtered_groups(kept, None)
    assert ids is kept.prompt_ids and ns is kept.noise_success
    plain = RolloutGroups(prompt_ids=np.array([1]), sizes=np.array([2]), successes=np.array([1]), positions=np.arange(2))
    assert merge_filtered_groups(plain, dropped)[3:] == (None, None)


def test_the_launcher_no_longer_refuses_dynamic_filtering_with_an_allocation():
    from dynamo_openrlhf.train import _dynamo_problems

    args = NS(
        rollout=NS(n_samples_per_prompt=4, batch_size=8, vllm_generate_batch_size=None, max_new_tokens=12),
        algo=NS(dynamic_filtering_enable=True, advantage=NS(estimator="rloo")),
        train=NS(async_enable=False, batch_size=32, dynamic_batch_enable=False),
        actor=NS(policy_loss_type="ppo", loss_agg_mode="token-mean"),
        dynamo=NS(eval_pass_k=None, loss=NS(prompt_weighting="auto", token_normalizer=None),
                  allocation=NS(rule="neyman", lo=None, hi=None, oversample=1.0, skip_factor=None, exploration=None,
                                exploration_rollouts=None, mastery=None, mastery_threshold=None, priority_floor=None,
                                min_rollouts=None),
                  pool=NS(prior=(1.0, 1.0), forget=0.999, fit_prior_every=10, success_threshold=0.5, load=None,
                          calibrated=True),
                  modulation=NS(preset="decay6", mu_max=None, lambda_min=None, gamma=None, tau=None)))
    assert _dynamo_problems(args) == []


# ---------------------------------------------------------------------------------------------- e2e

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("DYNAMO_SKIP_E2E") == "1", reason="DYNAMO_SKIP_E2E=1")
def test_e2e_tiny_allocation_with_dynamic_filtering(tmp_path):
    """3 steps of the tiny arith task, neyman allocation + dynamic filtering: every generated rollout is in the
    pool once, each step trains on its budget, and the filtering metrics are logged."""
    pytest.importorskip("openrlhf")
    from dynamo_openrlhf import tiny
    from dynamo_openrlhf._core import PassRatePool

    tiny.prepare_tiny_assets()
    run_dir = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith",
           "--dynamo.run_dir", str(run_dir), "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "4",
           "--train.batch_size", "32", "--data.max_samples", "40", "--train.num_episodes", "1",
           "--no-dynamo.eval_at_start", "--no-dynamo.eval_at_end", "--ckpt.save_steps", "1000",
           "--dynamo.pool.forget", "1", "--dynamo.pool.fit_prior_every", "0",
           "--algo.dynamic_filtering_enable"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["type"] == "train"]
    assert len(train) >= 1
    pool = PassRatePool.load(str(run_dir / "pass_rate_pool.bin"))
    st = pool.stats()
    generated = sum(row["dynamo/generated_rollouts"] for row in train)
    filtered = sum(row["dynamo/filtered_rollouts"] for row in train)
    # forget 1: the pool's evidence is every rollout the engines generated, dropped ones included, once
    assert st["successes"] + st["failures"] == generated
    for row in train:
        assert row["dynamo/step_trials"] == row["dynamo/generated_rollouts"]
        # each step trains on its allocation's first budget (8 x 4) unless the loader ran out refilling
        assert row["dynamo/alloc_budget"] - row["dynamo/filtered_rollouts"] <= 32
        assert row["dynamo/filtered_groups"] >= 0 and "dynamic_filtering_pass_rate" in row
    assert train[0]["dynamo/alloc_budget"] - train[0]["dynamo/filtered_rollouts"] == 32
    print(f"e2e: {len(train)} steps, generated {generated}, filtered {filtered}, pool trials "
          f"{st['successes'] + st['failures']}")
