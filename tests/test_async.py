"""DynaMO under OpenRLHF's async trainer (``--train.async_enable``; issue #25 §1, docs/async.md).

Unit checks of the launcher's refusals, the staleness count and the queue taps, then one end-to-end run of the
tiny preset with the allocation on and queue size 1 (3 steps, a checkpoint every step), resumed from its step-2
checkpoint, which holds batch 3 (queued at the save): the resumed run ends as the uninterrupted one."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("torch")
pytest.importorskip("openrlhf")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


def _args(**over):
    a = NS(
        rollout=NS(n_samples_per_prompt=4, batch_size=8, vllm_generate_batch_size=None, max_new_tokens=12),
        algo=NS(dynamic_filtering_enable=False, advantage=NS(estimator="rloo")),
        train=NS(async_enable=True, batch_size=32, dynamic_batch_enable=False, agent_func_path=None),
        reward=NS(remote_url=["reward.py"]),
        actor=NS(policy_loss_type="ppo", loss_agg_mode="token-mean"),
        dynamo=NS(eval_pass_k=None, loss=NS(prompt_weighting="auto", token_normalizer=None),
                  allocation=NS(rule="neyman", lo=2, hi=6, oversample=1.0, skip_factor=None, noise_scale="off",
                                exploration=None, exploration_rollouts=None, mastery=None, mastery_threshold=None,
                                priority_floor=None, min_rollouts=None),
                  pool=NS(prior=(1.0, 1.0), forget=0.999, fit_prior_every=10, success_threshold=0.5, load=None,
                          calibrated=True),
                  modulation=NS(preset="decay6", mu_max=None, lambda_min=None, gamma=None, tau=None)),
    )
    for path, value in over.items():
        obj = a
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return a


def _problems(**over):
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf.train import _dynamo_problems

    return _dynamo_problems(_args(**over))


def test_async_with_the_allocation_and_the_balanced_loss_is_accepted():
    from dynamo_openrlhf.advantages import PromptBalancing, prompt_balancing

    assert _problems() == []
    assert _problems(**{"train.async_queue_size": 2, "train.partial_rollout_enable": True}) == []
    # allocation off, balanced loss: the async trainer's experience maker attaches the weights
    assert _problems(**{"dynamo.allocation.rule": "off", "dynamo.loss.prompt_weighting": "balanced"}) == []
    b = prompt_balancing(_args(**{"dynamo.allocation.rule": "off", "dynamo.loss.prompt_weighting": "balanced"}))
    assert b == PromptBalancing("rloo", 12.0, True, 32, running=True)


def test_oversampling_through_vllm_generate_batch_size_is_refused_naming_the_dynamo_flag():
    (p,) = _problems(**{"rollout.vllm_generate_batch_size": 12})
    assert p == ("--rollout.vllm_generate_batch_size 12 != --rollout.batch_size 8: with --dynamo.allocation.rule "
                 "neyman each step draws and allocates its own candidate prompts; over-sample with "
                 "--dynamo.allocation.oversample 1.5 (draws 12 candidates per step) and leave "
                 "--rollout.vllm_generate_batch_size unset")
    # the same numbers through the DynaMO flag are accepted, and draw the same 12 candidates
    from dynamo_openrlhf.allocation import AllocationConfig

    a = _args(**{"dynamo.allocation.oversample": 1.5, "dynamo.allocation.lo": 0})
    assert _problems(**{"dynamo.allocation.oversample": 1.5, "dynamo.allocation.lo": 0}) == []
    assert AllocationConfig.from_args(a).candidates_per_step == 12
    # allocation off: OpenRLHF's own over-sampling stays available
    assert _problems(**{"rollout.vllm_generate_batch_size": 12, "dynamo.allocation.rule": "off",
                        "dynamo.loss.prompt_weighting": "tokens"}) == []


def test_async_allocation_refuses_the_noise_scale_and_a_reward_model():
    (p,) = _problems(**{"dynamo.allocation.noise_scale": "nll"})
    assert p.startswith("--dynamo.allocation.noise_scale nll is not supported with --train.async_enable")
    assert p.endswith("use --dynamo.allocation.noise_scale off")
    (p,) = _problems(**{"reward.remote_url": None})
    assert p == ("--train.async_enable with --dynamo.allocation.rule neyman needs the rewards at rollout time "
                 "(--reward.remote_url or --train.agent_func_path): the generator updates the pool from them; a "
                 "reward model scores later, in the trainer")
    assert _problems(**{"reward.remote_url": None, "train.agent_func_path": "agent.py"}) == []
    # sync: neither applies
    assert _problems(**{"train.async_enable": False, "reward.remote_url": None}) == []


def test_pool_staleness():
    from dynamo_openrlhf.ppo_trainer_async import pool_staleness

    assert pool_staleness(0, 0) == 0
    assert pool_staleness(1, 0) == 1
    assert pool_staleness(5, 3) == 2
    with pytest.raises(ValueError, match="the trainer finished 2 steps but only 1 batches were generated"):
        pool_staleness(1, 2)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        pool_staleness(-1, 0)


def test_queue_taps_see_batches_and_pass_everything_else():
    from dynamo_openrlhf.ppo_trainer_async import BATCH_KEY, _is_batch, _Tap

    class Q:
        def __init__(self):
            self.items = []

        def put(self, item, block=True):
            self.items.append(item)

        def get(self, block=True):
            return self.items.pop(0)

        def qsize(self):
            return len(self.items)

    seen = []
    q = Q()
    out = _Tap(q, on_put=lambda item: (item[1].__setitem__(BATCH_KEY, {"step": 1}) if _is_batch(item) else None)
               or item)
    inn = _Tap(q, on_get=lambda item: seen.append(item[1].pop(BATCH_KEY, None) if _is_batch(item) else item) or item)
    out.put((["s"], {"episode": 0}, None, 0.5), block=True)
    out.put(("eval", 3, {"x": 1}))
    out.put("done")
    assert out.qsize() == 3  # anything else is the queue's
    assert inn.get(block=True) == (["s"], {"episode": 0}, None, 0.5)  # popped on the way out
    assert inn.get() == ("eval", 3, {"x": 1}) and inn.get() == "done"
    assert seen == [{"step": 1}, ("eval", 3, {"x": 1}), "done"]


def test_upstream_globals_are_rebound_in_the_function_that_reads_them():
    from dynamo_openrlhf.ppo_trainer_async import _globals_of

    namespace = {"Thing": "upstream"}
    exec("def make():\n    return Thing", namespace)
    make = namespace["make"]
    with _globals_of(make, Thing="ours"):
        assert make() == "ours"
    assert make() == "upstream"


# ----------------------------------------------------------------------------------------------
# The generator and trainer actors' DynaMO parts, offline (test_dynamic_filtering's fake engine, no Ray)
# ----------------------------------------------------------------------------------------------

from test_dynamic_filtering import GEN_KW, _cfg, _generator, passthrough_ray  # noqa: E402,F401

from dynamo_openrlhf.ppo_trainer_async import _Tap  # noqa: E402


def test_generator_actor_writes_the_pool_once_per_batch_and_sends_its_numbers_with_it(passthrough_ray):  # noqa: F811
    from dynamo_openrlhf.allocation import RolloutAllocator
    from dynamo_openrlhf.ppo_trainer_async import BATCH_KEY, DynamoGenerateSamplesActor

    labels = ["mixed", "all", "half", "mixed", "none", "mixed", "mixed", "mixed", "mixed", "mixed"]
    allocator = RolloutAllocator(_cfg())
    gen, engine = _generator(labels, rollout_allocator=allocator.allocate, refill_allocator=allocator.allocate_refill)
    actor = object.__new__(DynamoGenerateSamplesActor.__ray_actor_class__)
    actor.args = NS(ckpt=NS(save_steps=2), eval=NS(steps=float("inf")))
    actor.allocator, actor.samples_generator, actor._generate = allocator, gen, gen.generate_samples
    actor.start_step, actor.batches, actor.trained, actor._pending, actor._counted = 0, 0, 0, None, (0,) * 6
    actor.ledger, actor.queue_size, actor._restored_batches = None, 1, []

    def trials():
        st = allocator.pool.stats()
        return st["successes"] + st["failures"]

    # batch 1: drawn before any step (slot token 0)
    actor._slot_taken(0)
    samples, _, _, _ = actor._generate_batch(**GEN_KW)
    payload = actor._attach_batch((samples, {"episode": 0}, 50.0, 0.1))
    info = payload[1][BATCH_KEY]
    m = info["metrics"]
    assert info["step"] == 1 and allocator.steps == 1  # recorded at once, before the trainer sees the batch
    assert info["expected_samples"] == len(samples) == allocator.last.budget - gen.last_filtered_rollouts
    assert m["dynamo/pool_staleness"] == 0.0 and m["dynamo/pool_updates"] == 1.0
    # every rollout of the batch, dropped groups included, is in the pool once
    assert m["dynamo/generated_rollouts"] == gen.generated_rollouts == trials() > len(samples)
    assert m["dynamo/filtered_rollouts"] == gen.filtered_rollouts > 0
    assert "allocator_state" not in info  # step 1 writes no checkpoint (save_steps 2)
    assert actor._attach_batch("done") == "done" and actor._pending is None
    # batch 2: drawn while the trainer trains step 1 (it freed the slot at step 0): staleness 1; step 2 saves
    actor._slot_taken(0)
    samples2, _, _, _ = actor._generate_batch(**GEN_KW)
    info2 = actor._attach_batch((samples2, {}, None, 0.0))[1][BATCH_KEY]
    assert info2["step"] == 2 and info2["metrics"]["dynamo/pool_staleness"] == 1.0 and allocator.steps == 2
    assert info2["allocator_state"]["pool"] == allocator.pool.to_bytes() and info2["allocator_state"]["steps"] == 2
    assert info2["pool_sha256"] == allocator.pool_digest()
    assert info["metrics"]["dynamo/generated_rollouts"] + info2["metrics"]["dynamo/generated_rollouts"] == trials()
    # a resumed segment counts from its step: the first token (0) is before any step of the segment
    actor.start_step, actor.batches = 7, 0
    actor._slot_taken(0)
    assert actor.trained == 0
    actor._slot_taken(9)
    assert actor.trained == 2


def test_trainer_actor_checks_each_batch_logs_its_numbers_and_checkpoints_its_pool(monkeypatch, tmp_path):
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    from dynamo_openrlhf.allocation import RolloutAllocator
    from dynamo_openrlhf.ppo_trainer import pool_from_checkpoint
    from dynamo_openrlhf.ppo_trainer_async import BATCH_KEY, DynamoTrainingActor

    import torch

    def _samples(k):
        return [NS(sequences=torch.tensor([[1, 2, i]]), rewards=torch.tensor([0.5]), scores=None, prompts=["p"],
                   labels=["l"]) for i in range(k)]

    saved = []
    monkeypatch.setattr(BasePPOTrainer, "train_step", lambda self, samples, step: ({"x": 1.0}, step + 1))
    monkeypatch.setattr(BasePPOTrainer, "save_logs_and_checkpoints",
                        lambda self, step, logs=None, cs=None: saved.append((step, dict(cs or {}))))
    t = object.__new__(DynamoTrainingActor.__ray_actor_class__)
    t.args = NS(ckpt=NS(save_steps=2), eval=NS(steps=float("inf")))
    t.history, t._metrics_path = [], str(tmp_path / "metrics.jsonl")
    t.allocation, t.balancing, t.experience_maker = True, None, NS(nonfinite_dropped=0)
    t._batch, t._maker_dropped = {}, 0

    def batch(**info):
        return t._take_batch((_samples(3), {"episode": 0, BATCH_KEY: info}, None, 0.0))

    payload = batch(step=1, expected_samples=3, metrics={"dynamo/pool_staleness": 0.0})
    assert BATCH_KEY not in payload[1]  # OpenRLHF never sees it (nor saves it)
    status, step = t.train_step(payload[0], 0)
    assert step == 1 and status["x"] == 1.0 and status["dynamo/pool_staleness"] == 0.0
    t.save_logs_and_checkpoints(step, status, payload[1])
    assert saved[-1] == (1, {"episode": 0})  # not a save step: no DynaMO state
    batch(step=2, expected_samples=4, metrics={})
    with pytest.raises(RuntimeError, match="step has 3 samples, the allocation's budget is 4"):
        t.train_step(_samples(3), 1)
    batch(step=3, expected_samples=3, metrics={})
    with pytest.raises(RuntimeError, match="generated for step 3 but trains at step 2"):
        t.train_step(_samples(3), 1)
    # step 2 saves the pool that came with its batch (not the generator's newer one)
    alloc = RolloutAllocator(_cfg())
    alloc.record([5, 6], [1, 0], [4, 3])
    state = alloc.state_dict()
    payload = batch(step=2, expected_samples=3, metrics={}, allocator_state=state, pool_sha256=alloc.pool_digest())
    status, step = t.train_step(payload[0], 1)
    t.save_logs_and_checkpoints(step, status, payload[1])
    dyn = saved[-1][1]["dynamo"]
    assert pool_from_checkpoint(dyn["allocator"]["pool"]) == state["pool"] and dyn["allocator"]["steps"] == 1
    assert [r["step"] for r in dyn["history"]] == [1, 2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    # a save step whose batch brought no pool state is an error, not a checkpoint without the pool
    payload = batch(step=4, expected_samples=3, metrics={})
    status, step = t.train_step(payload[0], 3)
    with pytest.raises(RuntimeError, match="step 4 may write a checkpoint but its batch brought no pool state"):
        t.save_logs_and_checkpoints(step, status, payload[1])


class _LedgerHandle:
    """A :class:`QueueLedger` seen as its Ray actor handle (``.record.remote``; ``passthrough_ray``'s ray.get
    returns the plain value)."""

    def __init__(self):
        from dynamo_openrlhf.ppo_trainer_async import QueueLedger

        self.ledger = QueueLedger()
        self.announce, self.record = NS(remote=self.ledger.announce), NS(remote=self.ledger.record)
        self.after = NS(remote=self.ledger.after)


class _ListQueue:
    def __init__(self, items=()):
        self.items = list(items)

    def put(self, item, block=True):
        self.items.append(item)

    def get(self, block=True):
        return self.items.pop(0)


def _generator_actor(allocator, gen, ledger, save_steps=2, queue_size=1):
    from dynamo_openrlhf.ppo_trainer_async import DynamoGenerateSamplesActor

    actor = object.__new__(DynamoGenerateSamplesActor.__ray_actor_class__)
    actor.args = NS(ckpt=NS(save_steps=save_steps), eval=NS(steps=float("inf")))
    actor.allocator, actor.samples_generator, actor._generate = allocator, gen, gen.generate_samples
    actor.start_step, actor.batches, actor.trained, actor._pending, actor._counted = 0, 0, 0, None, (0,) * 6
    actor.ledger, actor.queue_size, actor._restored_batches = ledger, queue_size, []
    return actor


def test_which_batches_can_wait_in_the_queue_at_a_save():
    from dynamo_openrlhf.ppo_trainer_async import may_save, queued_at_a_save

    inf = float("inf")
    assert may_save(4, 2, inf) and may_save(3, inf, 3) and not may_save(3, 2, inf) and not may_save(1, inf, inf)
    # q = 1, a save every 2 steps: batch b waits at the save of b - 1
    assert [b for b in range(1, 8) if queued_at_a_save(b, 1, 1, 2, inf)] == [3, 5, 7]
    # q = 2: batches b - 2 .. b - 1 ahead of the save
    assert [b for b in range(1, 8) if queued_at_a_save(b, 2, 1, 2, inf)] == [3, 4, 5, 6, 7]
    # a resumed segment (first step 5) does not save step 4 again
    assert not queued_at_a_save(5, 1, 5, 2, inf) and queued_at_a_save(7, 1, 5, 2, inf)
    assert not any(queued_at_a_save(b, 2, 1, inf, inf) for b in range(1, 8))  # no checkpoints: no ledger
    with pytest.raises(ValueError, match="queue_size must be >= 1, got 0"):
        queued_at_a_save(3, 0, 1, 2, inf)


def test_queued_batch_is_recorded_and_a_resumed_generator_restores_it_first_with_its_state(
        passthrough_ray, monkeypatch):  # noqa: F811
    """The generator of a q = 1 run with a checkpoint every 2 steps: batch 3 can wait in the queue at step 2's save,
    so it goes to the ledger (pickled, with the generator's state after it) before the queue; the trainer's save
    of step 2 takes it. A generator resumed from that checkpoint takes up the pool after batch 3 (not step 2's),
    its group serials and its loader state, puts batch 3 back first (taking its slot) and counts on from step 4."""
    import pickle

    from openrlhf.trainer import ppo_trainer_async as upstream

    from dynamo_openrlhf.allocation import RolloutAllocator
    from dynamo_openrlhf.ppo_trainer_async import BATCH_KEY, restore_queue, samples_digest

    labels = ["mixed", "all", "half", "mixed", "none", "mixed", "mixed", "mixed", "mixed", "mixed", "mixed", "all"]
    allocator = RolloutAllocator(_cfg())
    gen, _ = _generator(labels, rollout_allocator=allocator.allocate, refill_allocator=allocator.allocate_refill)
    handle = _LedgerHandle()
    actor = _generator_actor(allocator, gen, handle)
    put = []
    for b in (1, 2, 3):
        actor._slot_taken(max(0, b - 2))
        samples, _, _, _ = actor._generate_batch(**GEN_KW)
        put.append(actor._attach_batch((samples, {"episode": 0, "total_consumed_prompts": 2 * b,
                                                  "data_loader_state_dict": {"batches": b}}, None, 0.1)))
    infos = [p[1][BATCH_KEY] for p in put]
    assert ["generator_state" in i for i in infos] == [False, False, True]  # only batch 3 can wait at a save
    assert ["allocator_state" in i for i in infos] == [False, True, True]  # step 2 saves; batch 3 may be queued
    assert infos[2]["allocator_state"]["pool"] == allocator.pool.to_bytes() and allocator.steps == 3
    assert infos[2]["generator_state"] == {"next_group": gen._next_group, "sample_buffer": []}
    # the trainer's save of step 2 finds batch 3, byte for byte as it was put
    (entry,) = handle.ledger.after(2)
    assert entry[0] == 3 and pickle.loads(entry[1])[1] == put[2][1]
    assert samples_digest(pickle.loads(entry[1])[0]) == samples_digest(put[2][0])
    assert handle.ledger.after(3) == [] and handle.ledger.after(2) == []  # taken: forgotten

    # resume at step 2 from that checkpoint: fresh allocator and generator
    allocator2 = RolloutAllocator(_cfg())
    gen2, _ = _generator(labels, rollout_allocator=allocator2.allocate, refill_allocator=allocator2.allocate_refill)
    handle2 = _LedgerHandle()
    resumed = _generator_actor(allocator2, gen2, handle2)
    loaded = []
    resumed.prompts_dataloader = NS(load_state_dict=loaded.append)
    resumed.rollout_slots = _Tap(_ListQueue([0]), on_get=resumed._slot_taken)
    raw = _ListQueue()
    resumed.rollout_queue = _Tap(raw, on_put=resumed._attach_batch)
    resumed.start_dynamo(2, infos[1]["allocator_state"], [entry])
    assert allocator2.pool.to_bytes() == allocator.pool.to_bytes() and allocator2.steps == 3
    assert gen2._next_group == gen._next_group and resumed.batches == 1
    resumed.load_state_dict({"batches": 2})  # OpenRLHF hands over the checkpoint's (step 2's) loader state
    assert loaded == [{"batches": 3}]
    fits = []
    monkeypatch.setattr(upstream.GenerateSamplesActor.__ray_actor_class__, "fit",
                        lambda self, episode, total: fits.append((episode, total, list(raw.items))))
    resumed.fit(episode=0, total_consumed_prompts=4)
    ((episode, total, queued),) = fits
    assert (episode, total) == (0, 6) and resumed.rollout_slots.items == []  # batch 3 took the slot
    assert len(queued) == 1 and queued[0][1][BATCH_KEY]["step"] == 3
    assert samples_digest(queued[0][0]) == samples_digest(put[2][0])
    assert [b for b, _ in handle2.ledger.after(2)] == [3]  # recorded again: a save of step 2 would hold it again
    # the next batch generated is step 4, drawn one step ahead of the trainer (its first step not yet done)
    resumed._slot_taken(2)
    resumed._generate_batch(**GEN_KW)
    assert resumed._pending["step"] == 4 and resumed._pending["metrics"]["dynamo/pool_staleness"] == 1.0
    assert allocator2.steps == 4

    # a checkpoint whose queue the resumed run cannot hold, or whose steps do not follow its own, is refused
    with pytest.raises(ValueError, match="holds 2 queued batches but --train.async_queue_size is 1: resume with "
                                         "--train.async_queue_size >= 2"):
        restore_queue([(3, entry[1]), (4, entry[1])], 2, 1)
    with pytest.raises(ValueError, match=r"the checkpoint of step 3 holds queued batches for steps \[3\]; "
                                         r"expected \[4\]"):
        restore_queue([entry], 3, 1)
    with pytest.raises(ValueError, match="queued batch for step 3 is not a batch of that step"):
        restore_queue([(3, pickle.dumps("done"))], 2, 1)


def test_trainer_saves_the_queued_batches_with_their_sha256_and_refuses_a_damaged_one(passthrough_ray, monkeypatch,
                                                                                        tmp_path):  # noqa: F811
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    import torch

    from dynamo_openrlhf.ppo_trainer_async import DynamoTrainingActor, checkpoint_queue

    saved = []
    monkeypatch.setattr(BasePPOTrainer, "save_logs_and_checkpoints",
                        lambda self, step, logs=None, cs=None: saved.append((step, dict(cs or {}))))
    t = object.__new__(DynamoTrainingActor.__ray_actor_class__)
    t.args = NS(ckpt=NS(save_steps=2), eval=NS(steps=float("inf")))
    t.history, t._metrics_path = [], str(tmp_path / "metrics.jsonl")
    t.allocation, t.experience_maker, t._batch = False, NS(), {}
    handle = _LedgerHandle()
    t.ledger = handle
    t.actor_model_group = NS(_actor_handlers=[NS(__ray_call__=NS(remote=lambda fn, *args: fn(None, *args)))])
    handle.ledger.record(2, b"two")
    handle.ledger.announce(3)
    handle.ledger.announce(4)
    assert handle.ledger.unrecorded(2) == [3, 4]  # generated, on their way to the queue: a save waits for them
    handle.ledger.record(3, b"three")
    handle.ledger.record(4, b"four")
    assert handle.ledger.unrecorded(2) == []
    with pytest.raises(ValueError, match="batch 4 after batch 4"):
        handle.ledger.record(4, b"again")
    t.save_logs_and_checkpoints(2, {"x": 1.0}, {"episode": 0})
    queue = saved[-1][1]["dynamo"]["queue"]
    (rng,) = saved[-1][1]["dynamo"]["actor_rng"]  # one policy-actor rank (here this process)
    assert torch.equal(rng, torch.get_rng_state())
    assert [q["step"] for q in queue] == [3, 4]
    assert [q["sha256"] for q in queue] == [hashlib.sha256(b).hexdigest() for b in (b"three", b"four")]
    assert checkpoint_queue(queue) == [(3, b"three"), (4, b"four")]
    queue[1]["payload"] = queue[1]["payload"].clone()
    queue[1]["payload"][0] ^= 1
    with pytest.raises(ValueError, match="queued batch for step 4 does not match its sha256"):
        checkpoint_queue(queue)
    t.save_logs_and_checkpoints(3, {"x": 1.0}, {"episode": 0})  # not a save step: the ledger keeps its batches
    assert "dynamo" not in saved[-1][1] and [b for b, _ in handle.ledger.after(3)] == [4]


def test_ledger_actor_waits_for_an_announced_batch_before_answering_a_save():
    """A batch announced under the rollout lock but not yet recorded (on its way to the queue) is waited for, so the
    save of the step before it holds it; one never recorded ends the wait with an error naming it."""
    import asyncio

    from dynamo_openrlhf.checkpoint import QueueLedgerActor

    async def scenario():
        actor = QueueLedgerActor()
        await actor.announce(3)

        async def later():
            await asyncio.sleep(0.05)
            await actor.record(3, b"batch 3")

        task = asyncio.ensure_future(later())
        got = await actor.after(2)
        await task
        assert got == [(3, b"batch 3")]
        await actor.announce(4)
        with pytest.raises(RuntimeError, match=r"announced batches \[4\] but did not record them within 0.05 s"):
            await actor.after(3, timeout_s=0.05)

    asyncio.run(scenario())


def test_policy_actor_rng_states_are_read_and_restored_per_rank(passthrough_ray):  # noqa: F811
    """The replay buffer's shuffle draws from each policy actor's torch generator: saved per rank and set back, the
    next draws repeat; a group of another size is left alone (False)."""
    import torch

    from dynamo_openrlhf.checkpoint import actor_rng_states, restore_actor_rng_states

    handle = NS(__ray_call__=NS(remote=lambda fn, *args: fn(None, *args)))  # the actor runs in this process
    group = NS(_actor_handlers=[handle])
    torch.manual_seed(123)
    (state,) = actor_rng_states(group)
    first = torch.randperm(32).tolist()
    torch.manual_seed(7)
    assert restore_actor_rng_states(group, [state]) is True
    assert torch.randperm(32).tolist() == first
    assert restore_actor_rng_states(group, [state, state]) is False


# ----------------------------------------------------------------------------------------------
# End to end (tiny preset, CPU backend)
# ----------------------------------------------------------------------------------------------


def _run(args, timeout=1500):
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               RAY_DEDUP_LOGS="0", COLUMNS="100", RAY_worker_register_timeout_seconds="900")
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "dynamo_openrlhf.train"] + args, cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=timeout)
        # Ray gives its local node 30 s to start (hard-coded); on an overloaded machine that is retried
        if r.returncode == 0 or "The current node timed out during startup" not in r.stderr:
            return r
    return r


def _rows(run_dir, kind="train"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    """Transformers stand-in engine (starts faster than vLLM's CPU build). Allocation on (neyman, 4 rollouts per
    prompt within 2..6, forget 1, no prior refits: the pool's evidence is every rollout once), balanced loss,
    decay6 modulation, async queue size 1; 24 prompts = 3 steps, a checkpoint every step. Then the run is resumed
    from its step-2 checkpoint (``latest`` rewritten), as if it had been stopped after saving step 2: at that
    moment batch 3 was already generated (with the weights of step 1), in the generator's pool, and waiting in the
    queue. Run 1's step-3 model states are kept aside (the resumed run writes that checkpoint again)."""
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()
    base = tmp_path_factory.mktemp("async")
    run_dir = base / "run"
    common = ["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(run_dir),
              "--dynamo.cpu_engine", "transformers",
              "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "4", "--dynamo.allocation.lo", "2",
              "--dynamo.allocation.hi", "6", "--train.batch_size", "32", "--data.max_samples", "24",
              "--train.num_episodes", "1", "--no-dynamo.eval_at_start", "--no-dynamo.eval_at_end",
              "--ckpt.save_steps", "1", "--ckpt.max_num", "5", "--dynamo.pool.forget", "1",
              "--dynamo.pool.fit_prior_every", "0", "--train.async_enable", "--train.async_queue_size", "1"]
    first = _run(common)
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-5000:])
    rows1 = _rows(run_dir)
    pool1 = (run_dir / "pass_rate_pool.bin").read_bytes()
    (run_dir / "metrics.jsonl").rename(base / "metrics_run1.jsonl")
    states3 = run_dir / "ckpt" / "_actor" / "global_step3" / "mp_rank_00_model_states.pt"
    states3.rename(base / "run1_step3_model_states.pt")
    (run_dir / "ckpt" / "_actor" / "latest").write_text("global_step2")
    second = _run(common + ["--ckpt.load_enable"])
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-5000:])
    return dict(base=base, run_dir=run_dir, first=first, second=second, rows1=rows1, pool1=pool1)


def test_e2e_async_trains_logs_metrics_and_the_summary_counts_the_steps(async_run):
    rows = async_run["rows1"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "dynamo_openrlhf run summary: 3 steps" in async_run["first"].stdout
    for r in rows:
        # every step trains on its allocation's budget; the balanced loss and the modulation ran
        assert r["rollout/num_samples"] == r["dynamo/alloc_budget"] == 32
        assert r["dynamo/generated_rollouts"] == 32 and r["dynamo/step_trials"] == 32
        assert "dynamo/token_normalizer" in r and "dynamo/token_entropy" in r
    # queue size 1: the first batch is drawn before any step, the others one step ahead of the trainer
    assert [r["dynamo/pool_staleness"] for r in rows] == [0.0, 1.0, 1.0]


def test_e2e_async_every_rollout_updates_the_pool_once_in_step_order(async_run):
    from dynamo_openrlhf._core import PassRatePool

    pool = PassRatePool.from_bytes(async_run["pool1"])
    st = pool.stats()
    rows = async_run["rows1"]
    assert st["successes"] + st["failures"] == sum(r["dynamo/generated_rollouts"] for r in rows) == 96
    assert st["prompts"] == 24
    # one pool update per batch, in step order
    assert [r["dynamo/pool_updates"] for r in rows] == [1.0, 2.0, 3.0]


def test_e2e_async_resume_restores_the_queued_batch_and_ends_as_the_uninterrupted_run(async_run):
    """Exactness of the resume (docs/async.md, "Checkpoints and resume"): the step-2 checkpoint holds batch 3, which
    waited in the queue, and the generator's pool after it; the resumed run trains step 3 on that very batch (same
    samples and rewards, in the same micro-batch order: the policy actors' generator is in the checkpoint) and ends
    with the uninterrupted run's pool (sha256) and model parameters (bit for bit)."""
    import torch

    from dynamo_openrlhf._core import PassRatePool

    first, second = async_run["first"].stdout, async_run["second"].stdout
    saved = dict(re.findall(r"\[dynamo\] step (\d+): checkpoint pool = the pool after batch \d+ \((\d+) updates\)",
                            first))
    assert saved == {"1": "1", "2": "2", "3": "3"}
    digests = dict(re.findall(r"\[dynamo\] step (\d+): checkpoint pool = .*sha256 ([0-9a-f]{64})", first))
    assert digests["1"] != digests["2"] != digests["3"] == hashlib.sha256(async_run["pool1"]).hexdigest()
    # q = 1: at the saves of steps 1 and 2 the next batch was already generated and queued; at step 3's, none
    queued = re.findall(r"\[dynamo\] step (\d+): checkpoint holds queued batch (\d+) \((\d+) bytes", first)
    assert [(s, b) for s, b, _ in queued] == [("1", "2"), ("2", "3")]
    assert "[dynamo] step 3: checkpoint holds no queued batch" in first
    # the resumed generator puts batch 3 back and takes up its pool after batch 3 (not the step-2 pool)
    rows1 = async_run["rows1"]
    restored = re.search(r"\[dynamo\] restored 1 queued batch\(es\) of steps \[3\]: step 3: 32 samples, samples "
                         r"sha256 ([0-9a-f]{64})", second)
    assert restored is not None, second[-3000:]
    assert restored.group(1) == rows1[2]["samples_sha256"]
    assert (f"[dynamo] restored pass-rate pool: 24 prompts, 3 updates, sha256 {digests['3']} (after queued batch 3)"
            in second)
    # step 3 trained on the same rollouts with the same rewards, and nothing was generated again
    rows2 = _rows(async_run["run_dir"])
    assert [r["step"] for r in rows2] == [3]
    assert rows2[0]["samples_sha256"] == rows1[2]["samples_sha256"]
    for key in ("rollout/reward_mean", "dynamo/alloc_budget", "dynamo/pool_updates", "dynamo/pool_staleness",
                "dynamo/generated_rollouts", "dynamo/step_trials", "dynamo/pool_size"):
        assert rows2[0][key] == rows1[2][key], key
    assert "dynamo_openrlhf run summary: 3 steps" in second
    # the pool at the end: sha256-equal to the uninterrupted run's (every rollout once: 96 = 3 x 32)
    pool2 = (async_run["run_dir"] / "pass_rate_pool.bin").read_bytes()
    assert hashlib.sha256(pool2).hexdigest() == hashlib.sha256(async_run["pool1"]).hexdigest()
    st = PassRatePool.from_bytes(pool2).stats()
    assert st["successes"] + st["failures"] == 96 and st["prompts"] == 24
    # and the step-3 parameters, bit for bit
    assert "[dynamo] policy actors' torch generator (replay-buffer shuffle): restored from the checkpoint" in second
    a = torch.load(async_run["base"] / "run1_step3_model_states.pt", map_location="cpu", weights_only=False)["module"]
    b = torch.load(async_run["run_dir"] / "ckpt" / "_actor" / "global_step3" / "mp_rank_00_model_states.pt",
                   map_location="cpu", weights_only=False)["module"]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert rows2[0]["policy_loss"] == rows1[2]["policy_loss"]


def _tiny_async_off_args(run_dir, max_samples: int, *extra: str) -> list:
    """The tiny preset, async with queue size 2, DynaMO's allocation off: 8 prompts x 4 per step,
    ``max_samples`` prompts, one episode, no eval, no checkpoint; ``extra`` flags appended."""
    return ["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(run_dir),
            "--dynamo.cpu_engine", "transformers",
            "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "4", "--train.batch_size", "32",
            "--data.max_samples", str(max_samples), "--train.num_episodes", "1", "--no-dynamo.eval_at_start",
            "--no-dynamo.eval_at_end", "--ckpt.save_steps", "1000", "--dynamo.allocation.rule", "off",
            "--train.async_enable", "--train.async_queue_size", "2", *extra]


def test_e2e_async_allocation_off_with_dynamic_filtering_and_partial_rollouts_keeps_metrics_and_summary(tmp_path):
    """The issue's new-user run, DynaMO's allocation off: ``--train.async_enable --algo.dynamic_filtering_enable``
    (here also ``--train.partial_rollout_enable`` and queue size 2) on the tiny preset trains 3 steps, and the
    modulation's statistics, metrics.jsonl and the run summary follow the async trainer (it said "0 steps")."""
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()
    run_dir = tmp_path / "run"
    r = _run(_tiny_async_off_args(run_dir, 64, "--train.partial_rollout_enable", "--algo.dynamic_filtering_enable"))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    rows = _rows(run_dir)
    steps = [row["step"] for row in rows]
    assert steps == list(range(1, len(rows) + 1)) and 2 <= len(rows) <= 8
    assert f"dynamo_openrlhf run summary: {len(rows)} steps" in r.stdout
    for row in rows:
        assert "dynamic_filtering_pass_rate" in row
        # OpenRLHF's actor trains micro-batches of --train.micro_batch_size 16 with drop_last: dynamic filtering's
        # last batch (what the loader had left) can hold fewer than 16 samples and then trains nothing, so it has
        # no modulation statistics (a CI run's step 3 once had 8 samples). DynaMO logs how many were trained.
        n = int(row["rollout/num_samples"])  # metrics.jsonl stores OpenRLHF's counts as floats
        assert row["dynamo/trained_samples"] == n - n % 16 and row["dynamo/untrained_samples"] == n % 16
        assert ("dynamo/token_entropy" in row) == (row["dynamo/trained_samples"] > 0)
        if n < 16:
            assert f"[dynamo] step {row['step']}: the batch's {n} samples are fewer than one micro-batch" in r.stdout
        # OpenRLHF's dynamic filtering fills each batch to 8 groups of 4 (the last one: what the loader had left)
        assert row["rollout/num_samples"] <= 32 and row["rollout/num_samples"] % 4 == 0
        # every generated rollout is counted, the filtered-out groups' included (the last batch: what was left)
        assert row["dynamo/generated_rollouts"] >= row["rollout/num_samples"]
        assert 0 <= row["dynamo/pool_staleness"] <= 2
    # one episode over 64 prompts x 4: each prompt is drawn once, 256 rollouts in all (a CI run's last batch had 6
    # prompts left: 24 generated, 12 kept); only a last draw (<= 8 prompts) whose groups were all filtered out forms
    # no batch, and its rollouts then reach no row
    assert 64 * 4 - 8 * 4 <= sum(row["dynamo/generated_rollouts"] for row in rows) <= 64 * 4
    assert rows[0]["dynamo/pool_staleness"] == 0 and rows[0]["rollout/num_samples"] == 32
    assert "dynamo/token_entropy" in rows[0]
    assert not (run_dir / "pass_rate_pool.bin").exists()  # no allocation, no pool


def test_untrained_note_names_the_step_and_the_micro_batch():
    from dynamo_openrlhf.ppo_trainer_async import untrained_note

    assert untrained_note(3, 32, 32.0, 16) is None and untrained_note(3, 32, None, 16) is None
    assert untrained_note(3, 8, 0.0, 16) == (
        "[dynamo] step 3: the batch's 8 samples are fewer than one micro-batch (--train.micro_batch_size 16 per "
        "rank): OpenRLHF's actor trained on none of them (no loss or modulation statistics this step)")
    assert untrained_note(2, 20, 16.0, 16) == (
        "[dynamo] step 2: OpenRLHF's actor trained 16 of the batch's 20 samples (each rank drops its remainder of "
        "--train.micro_batch_size 16)")


@pytest.mark.parametrize("buffered,epochs,trained", [(40, 2, 32), (8, 1, 0), (32, 1, 32)])
def test_actor_counts_the_samples_that_reached_the_loss(monkeypatch, buffered, epochs, trained):
    """The policy actor's ``dynamo/trained_samples`` / ``untrained_samples`` against OpenRLHF's loop: micro-batches
    of 16 from the replay buffer with ``drop_last=True`` (the parent's ppo_train stubbed with that loop over a torch
    DataLoader, its training_step stubbed); each epoch trains the same samples, so they count once."""
    import torch
    from openrlhf.trainer.ray import ppo_actor as openrlhf_ppo_actor
    from torch.utils.data import DataLoader

    from dynamo_openrlhf.ppo_actor import TRAINED_SAMPLES_KEY, UNTRAINED_SAMPLES_KEY, DynamoActorPPOTrainer

    def parent_ppo_train(self, kl_ctl):
        status = {}
        for _ in range(self.max_epochs):
            for idx in DataLoader(list(range(len(self.replay_buffer))), batch_size=16, drop_last=True):
                exp = NS(action_mask=torch.ones(len(idx), 3), info={})
                status = self.training_step(exp, kl_ctl, 0)
        return dict(status)

    monkeypatch.setattr(openrlhf_ppo_actor.ActorPPOTrainer, "ppo_train", parent_ppo_train)
    monkeypatch.setattr(openrlhf_ppo_actor.ActorPPOTrainer, "training_step",
                        lambda self, exp, kl, step, info=None: {"policy_loss": 1.0})
    t = object.__new__(DynamoActorPPOTrainer)
    t.replay_buffer, t.max_epochs, t.strategy = [None] * buffered, epochs, NS()
    t.dynamo_loss = NS(modulation=NS(is_identity=True))
    t._trained_samples = 0
    status = t.ppo_train(0.0)
    assert status[TRAINED_SAMPLES_KEY] == trained and status[UNTRAINED_SAMPLES_KEY] == buffered - trained
    assert ("policy_loss" in status) == (trained > 0)
