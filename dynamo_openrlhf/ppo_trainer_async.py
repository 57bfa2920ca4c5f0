"""OpenRLHF 0.11.2's async trainer (``openrlhf/trainer/ppo_trainer_async.py``) with DynaMO.

``--train.async_enable`` runs three Ray actors: ``PPOTrainerAsync`` (the driver's handle) starts a
``GenerateSamplesActor`` (rollouts and rewards) and a ``TrainingActor`` (experience, PPO update, weight
broadcast), connected by a queue of ``--train.async_queue_size`` (q) batches and q slot tokens that carry the
trainer's step back to the generator. DynaMO subclasses all three (the upstream ``fit`` loops run unchanged):

* :class:`DynamoGenerateSamplesActor` owns the run's :class:`~dynamo_openrlhf.allocation.RolloutAllocator` and
  therefore the pass-rate pool: it is the pool's **only writer** (and its only reader). It allocates each batch
  from the pool as it stands when the batch is drawn, and as soon as the batch's rewards are in (they are
  computed here, at rollout time) it records the batch's outcomes, dropped dynamic-filtering groups included,
  in one pool update, before the next batch is allocated. So every generated rollout updates the pool once,
  in generation order (= step order: batch b is trained at step b + 1 of the run), whether or not the trainer
  has consumed it yet, and the sequence of pool updates is the one the sync trainer makes.
  ``dynamo/pool_staleness``: generated batches minus the trainer's finished steps when the batch is drawn
  (read from the slot token the generator waits on): 0 in the sync trainer, at most q here. It counts the
  policy updates that the pool's evidence (and the weights that generate) are behind the sync schedule.
* the per-batch DynaMO numbers (allocation metrics, the pool's stats, generated / filtered / dropped counts,
  the number of samples the trainer must receive, and on checkpoint steps the pool's state after this batch)
  travel with the batch through the queue, in its ``client_states`` under ``"dynamo_batch"``;
* :class:`DynamoTrainingActor` makes the experience with
  :class:`~dynamo_openrlhf.experience_maker.DynamoExperienceMaker` (group baselines from the batch's own group
  tags; the prompt-balanced loss's per-sample weights computed from those tags, so they belong to the batch
  whatever sits in the queue), checks the batch's size against its allocation, logs the batch's DynaMO metrics
  with the step, keeps the history (``<run_dir>/metrics.jsonl``, the run summary), and on checkpoint steps
  saves the pool state that came with the batch (``client_states["dynamo"]``, as the sync trainer does);
* :class:`DynamoPPOTrainerAsync` hands a checkpoint's pool back to the generator on resume, tells it the step
  it resumes at, saves ``<run_dir>/pass_rate_pool.bin`` at the end and answers ``get_dynamo_history``.

Checkpoints: a checkpoint at step s holds the pool after the batches trained in steps 1..s (the state the
generator attached to batch s) and the batches already generated for steps s+1.. (at most q), pickled with the
generator's state after them (pool, group serials, over-sampling buffer, data-loader state), which the generator
records in a :class:`QueueLedger` before it puts them in the queue. On resume the generator takes up its state
after the last of them and puts them back in the queue, in order, before generating: each rollout reaches the
pool once and no batch is generated twice (docs/async.md, "Checkpoints and resume": what is exact and what not).

Evaluation: ``--dynamo.eval_at_start`` / ``--dynamo.eval_at_end`` run in the generator (it owns the eval
loader), before the first and after the last step, and their rows go to the history like the sync trainer's.
OpenRLHF's periodic ``--eval.steps`` evaluation runs as upstream does (in the generator).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402
from openrlhf.trainer import ppo_trainer_async as _upstream  # noqa: E402
from openrlhf.trainer.ppo_trainer import compute_eval_metrics  # noqa: E402

from dynamo_openrlhf._core import PassRatePool  # noqa: E402
from dynamo_openrlhf.checkpoint import (  # noqa: E402
    QueueLedger,
    QueueLedgerActor,
    actor_rng_states,
    restore_actor_rng_states,
)
from dynamo_openrlhf.allocation import RolloutAllocator  # noqa: E402
from dynamo_openrlhf.experience_maker import DynamoExperienceMaker  # noqa: E402
from dynamo_openrlhf.ppo_actor import TRAINED_SAMPLES_KEY  # noqa: E402
from dynamo_openrlhf.ppo_trainer import (  # noqa: E402
    STATE_VERSION,
    eval_extras_and_row,
    pool_from_checkpoint,
    pool_to_checkpoint,
    scalars,
    untrained_note,
)
from dynamo_openrlhf.run_config import allocation_config, balancing_config  # noqa: E402
from dynamo_openrlhf.samples_generator import (  # noqa: E402
    DynamoSamplesGenerator,
    RolloutGroups,
    merge_filtered_groups,
    reward_source,
)

__all__ = ["BATCH_KEY", "DynamoGenerateSamplesActor", "DynamoPPOTrainerAsync", "DynamoTrainingActor", "QueueLedger",
           "checkpoint_queue", "may_save", "pool_staleness", "queued_at_a_save", "restore_queue", "samples_digest",
           "untrained_note"]

#: Where a batch's DynaMO numbers ride in its ``client_states`` through the async queue (popped by the trainer).
BATCH_KEY = "dynamo_batch"


def pool_staleness(generated_batches: int, trained_steps: int) -> int:
    """``dynamo/pool_staleness`` of the batch drawn now: batches generated before it (each one already in the
    pool) minus the steps the trainer has finished (the slot token's value; steps of this run segment, counted
    like the batches). 0 under the sync trainer; between 0 and ``--train.async_queue_size`` here. ValueError
    for a negative count or a trainer ahead of the generator."""
    if generated_batches < 0 or trained_steps < 0:
        raise ValueError(f"pool_staleness: counts must be >= 0, got generated {generated_batches}, "
                         f"trained {trained_steps}")
    if trained_steps > generated_batches:
        raise ValueError(f"pool_staleness: the trainer finished {trained_steps} steps but only "
                         f"{generated_batches} batches were generated")
    return generated_batches - trained_steps


def may_save(step: int, save_steps: float, eval_steps: float) -> bool:
    """Whether the trainer's ``step`` may write a checkpoint: a regular one (``--ckpt.save_steps``) or a best one
    at an evaluation (``--eval.steps``); either may be ``inf`` (never), as OpenRLHF sets -1."""
    return step % save_steps == 0 or step % eval_steps == 0


def queued_at_a_save(step: int, queue_size: int, first_step: int, save_steps: float, eval_steps: float) -> bool:
    """Whether batch ``step`` can be waiting in the async queue while the trainer writes a checkpoint: the
    generator runs at most ``queue_size`` (q) batches ahead of the trainer, so batch b can be queued at the save
    of step s only for b - q <= s <= b - 1; ``first_step``: the first step this run segment trains (a resume's
    step + 1; a step before it is not saved again)."""
    if queue_size < 1:
        raise ValueError(f"queued_at_a_save: queue_size must be >= 1, got {queue_size}")
    return any(may_save(s, save_steps, eval_steps) for s in range(max(first_step, step - queue_size), step))


def samples_digest(samples: Sequence[Any]) -> str:
    """sha256 (hex) of a batch's rollouts as the trainer receives them, in order: each sample's token ids
    (``sequences``, int64), rewards and scores (float64; absent ones skipped), prompts and labels. Equal digests:
    the same rollouts, with the same rewards, in the same order."""
    import numpy as np

    h = hashlib.sha256()
    for s in samples:
        h.update(np.ascontiguousarray(s.sequences.detach().cpu().numpy(), dtype=np.int64).tobytes())
        for name in ("rewards", "scores"):
            v = getattr(s, name, None)
            h.update(name.encode())
            if v is not None:
                h.update(np.ascontiguousarray(v.detach().cpu().double().numpy()).tobytes())
        h.update("\0".join(list(s.prompts) + ["|"] + [str(x) for x in s.labels]).encode())
    return h.hexdigest()


def restore_queue(queue: Sequence[Tuple[int, bytes]], start_step: int, queue_size: int) -> List[tuple]:
    """The queued batches of a checkpoint at step ``start_step`` (``(step, pickled payload)`` in queue order, as
    :class:`DynamoTrainingActor` saves them) back as queue payloads ``(samples, client_states, filter_pass_rate,
    generation_time)``, each with its ``BATCH_KEY`` entry. ValueError when their steps are not ``start_step + 1``,
    ``start_step + 2``, ..., when there are more than ``queue_size`` (the queue could not hold them), or when a
    payload is not a batch of that step."""
    steps = [int(b) for b, _ in queue]
    if steps != list(range(start_step + 1, start_step + 1 + len(steps))):
        raise ValueError(f"the checkpoint of step {start_step} holds queued batches for steps {steps}; expected "
                         f"{list(range(start_step + 1, start_step + 1 + len(steps)))}")
    if len(steps) > queue_size:
        raise ValueError(f"the checkpoint of step {start_step} holds {len(steps)} queued batches but "
                         f"--train.async_queue_size is {queue_size}: resume with --train.async_queue_size "
                         f">= {len(steps)}")
    payloads = []
    for b, blob in queue:
        payload = pickle.loads(blob)
        info = payload[1].get(BATCH_KEY) if _is_batch(payload) else None
        if not info or info.get("step") != b or "generator_state" not in info:
            raise ValueError(f"the checkpoint's queued batch for step {b} is not a batch of that step with the "
                             "generator's state after it")
        payloads.append(payload)
    return payloads


def checkpoint_queue(entries: Sequence[Dict[str, Any]]) -> List[Tuple[int, bytes]]:
    """The ``"queue"`` entry of a checkpoint's DynaMO state as ``(step, pickled payload)`` pairs, each payload's
    sha256 checked against the one saved with it (ValueError naming the step when it differs)."""
    out = []
    for e in entries:
        blob = pool_from_checkpoint(e["payload"])
        if hashlib.sha256(blob).hexdigest() != e["sha256"]:
            raise ValueError(f"the checkpoint's queued batch for step {e['step']} does not match its sha256 "
                             f"{e['sha256']}: the checkpoint file is damaged; resume from an earlier checkpoint")
        out.append((int(e["step"]), blob))
    return out




class _Tap:
    """A ``ray.util.queue.Queue`` seen through ``on_get`` / ``on_put`` (each may replace the item); everything
    else is the queue's. Lets the upstream ``fit`` loops run unchanged while DynaMO reads what passes."""

    def __init__(self, queue, on_get=None, on_put=None):
        self._queue = queue
        self._on_get = on_get
        self._on_put = on_put

    def get(self, *args, **kwargs):
        item = self._queue.get(*args, **kwargs)
        return self._on_get(item) if self._on_get is not None else item

    def put(self, item, *args, **kwargs):
        if self._on_put is not None:
            item = self._on_put(item)
        return self._queue.put(item, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


def _is_batch(payload) -> bool:
    """A training batch in the async queue: ``(samples, client_states, filter_pass_rate, generation_time)``
    (the other payloads are ``("eval", step, metrics)`` and ``"done"``)."""
    return isinstance(payload, tuple) and len(payload) == 4 and isinstance(payload[1], dict)


@contextlib.contextmanager
def _globals_of(function, **values):
    """Temporarily rebind names in ``function.__globals__``. Not the module's attributes: Ray pickles an actor class
    whose module attribute is its ActorClass wrapper by value, so in the actor's process the upstream methods read a
    copy of their module's globals, not the module."""
    g = function.__globals__
    old = {k: g[k] for k in values}
    g.update(values)
    try:
        yield
    finally:
        g.update(old)


class _WithKwargs:
    """An actor class whose ``.remote`` adds fixed keyword arguments (the upstream constructor call has none
    for DynaMO's initial pool)."""

    def __init__(self, actor_class, **kwargs):
        self._cls, self._kwargs = actor_class, kwargs

    def remote(self, *args, **kwargs):
        return self._cls.remote(*args, **{**kwargs, **self._kwargs})


# ----------------------------------------------------------------------------------------------
# The generator: allocation and the pool (its only writer)
# ----------------------------------------------------------------------------------------------


class DynamoGenerateSamplesActor(_upstream.GenerateSamplesActor.__ray_actor_class__):
    """OpenRLHF's ``GenerateSamplesActor`` with DynaMO's sequence level (module docstring)."""

    def __init__(self, pretrain, strategy, vllm_engines, *, vllm_lock, rollout_queue, rollout_slots,
                 dynamo_pool: Optional[PassRatePool] = None, dynamo_ledger=None, **generate_kwargs):
        cpu_backend.apply_if_chosen(strategy.args)
        super().__init__(pretrain, strategy, vllm_engines, vllm_lock=vllm_lock,
                         rollout_queue=_Tap(rollout_queue, on_put=self._attach_batch),
                         rollout_slots=_Tap(rollout_slots, on_get=self._slot_taken), **generate_kwargs)
        args = self.args
        config = allocation_config(args)
        self.allocator: Optional[RolloutAllocator] = None
        if config is not None:
            if dynamo_pool is not None and dynamo_pool.forget != config.forget:
                raise ValueError(f"dynamo_pool: forget {dynamo_pool.forget} != --dynamo.pool.forget {config.forget}")
            self.allocator = RolloutAllocator(config, pool=dynamo_pool)
            if dynamo_pool is not None:
                print(f"[dynamo] initial pass-rate pool (--dynamo.pool.load): {len(dynamo_pool)} prompts, sha256 "
                      f"{self.allocator.pool_digest()}, forget {dynamo_pool.forget:g}", flush=True)
            self.max_steps = max(1, config.scheduler_steps(len(self.prompts_dataloader.dataset),
                                                           args.train.batch_size, args.train.num_episodes,
                                                           args.train.max_epochs))
        old = self.samples_generator
        self.samples_generator = DynamoSamplesGenerator(
            strategy=strategy,
            prompts_dataloader=self.prompts_dataloader,
            eval_dataloader=self.eval_dataloader,
            tokenizer=old.tokenizer,
            vllm_engines=vllm_engines,
            rollout_allocator=self.allocator.allocate if config is not None else None,
            num_candidates=config.candidates_per_step if config is not None else None,
            reward_source=reward_source(args),
            refill_allocator=self.allocator.allocate_refill if config is not None else None,
            success_threshold=args.dynamo.pool.success_threshold,
        )
        self._generate = self.samples_generator.generate_samples
        self.samples_generator.generate_samples = self._generate_batch
        self.start_step = 0  # the run's step before this segment's first batch (a resume's step)
        self.batches = 0  # batches handed to the trainer in this segment
        self.trained = 0  # the trainer's steps of this segment, from the latest slot token
        self._pending: Optional[Dict[str, Any]] = None
        self._counted = (0, 0, 0, 0, 0, 0)
        self.ledger = dynamo_ledger  # a QueueLedger actor (None: no checkpoint holds the queue)
        self.queue_size = int(getattr(args.train, "async_queue_size", 1))
        self._restored_batches: List[tuple] = []

    # -- driver calls --------------------------------------------------------------------------
    def start_dynamo(self, start_step: int, allocator_state: Optional[Dict[str, Any]] = None,
                     queue: Optional[Sequence[Tuple[int, bytes]]] = None) -> None:
        """Before ``fit``: the step the run (re)starts at, and on resume the checkpoint's allocator state (the
        pool after the batches of steps 1..start_step) and the batches that were waiting in the queue at the save
        (``(step, pickled payload)``, :func:`restore_queue`). With queued batches the generator takes up its
        state after the last of them (pool, group serials, over-sampling buffer; the data loader in
        :meth:`load_state_dict`) and :meth:`fit` puts them back in the queue, in order, before it generates."""
        self.start_step = int(start_step)
        if allocator_state is not None and self.allocator is None:
            raise ValueError("the checkpoint holds a DynaMO pass-rate pool but the run has no allocation")
        if allocator_state is None and self.allocator is not None and self.start_step > 0:
            raise ValueError("the checkpoint has no DynaMO pass-rate pool (saved with --dynamo.allocation.rule "
                             "off or by an older version); cannot resume the allocation exactly")
        payloads = restore_queue(queue or [], self.start_step, self.queue_size)
        after = "the checkpoint's step"
        if payloads:
            last = payloads[-1][1][BATCH_KEY]
            gen = self.samples_generator
            gen._next_group = int(last["generator_state"]["next_group"])
            if last["generator_state"].get("sample_buffer"):
                gen._sample_buffer = list(last["generator_state"]["sample_buffer"])
            if self.allocator is not None:
                allocator_state = last["allocator_state"]  # the pool after the queued batches: each is in it once
            self._restored_batches = payloads
            self.batches = len(payloads)
            after = f"queued batch {last['step']}"
            print(f"[dynamo] restored {len(payloads)} queued batch(es) of steps "
                  f"{[p[1][BATCH_KEY]['step'] for p in payloads]}: "
                  + ", ".join(f"step {p[1][BATCH_KEY]['step']}: {len(p[0])} samples, samples sha256 "
                              f"{samples_digest(p[0])}" for p in payloads), flush=True)
        if allocator_state is not None:
            self.allocator.load_state_dict(allocator_state)
            print(f"[dynamo] restored pass-rate pool: {len(self.allocator.pool)} prompts, "
                  f"{self.allocator.steps} updates, sha256 {self.allocator.pool_digest()} (after {after})",
                  flush=True)

    def load_state_dict(self, state_dict):
        """The prompt loader's state on resume (OpenRLHF's call): the state after the last restored queued batch
        when the checkpoint held some (the state OpenRLHF saved is the checkpoint's step's)."""
        if self._restored_batches:
            state_dict = self._restored_batches[-1][1]["data_loader_state_dict"]
        super().load_state_dict(state_dict)
        if getattr(self.samples_generator, "_sample_buffer", None):
            # OpenRLHF opens a new loader iterator only once its buffer is empty; this one continues the loader
            self.samples_generator._dataloader_iter = iter(self.prompts_dataloader)

    def fit(self, episode: int, total_consumed_prompts: int) -> None:
        """OpenRLHF's generator loop, after putting the restored queued batches back (each takes its slot token,
        as when it was generated), from the episode and prompt count after the last of them."""
        restored, self._restored_batches = self._restored_batches, []
        for payload in restored:
            self.rollout_slots.get(block=True)
            self.rollout_queue.put(payload, block=True)
        if restored:
            episode = int(restored[-1][1]["episode"])
            total_consumed_prompts = int(restored[-1][1]["total_consumed_prompts"])
        return super().fit(episode, total_consumed_prompts)

    def save_pool(self, run_dir: Optional[str]) -> Optional[str]:
        """Write the pool to ``<run_dir>/pass_rate_pool.bin`` (after ``fit``); its sha256, or None."""
        if self.allocator is None or not run_dir:
            return None
        path = os.path.join(run_dir, "pass_rate_pool.bin")
        self.allocator.pool.save(path)
        digest = self.allocator.pool_digest()
        print(f"[dynamo] saved pass-rate pool: {len(self.allocator.pool)} prompts, sha256 {digest} -> {path}",
              flush=True)
        return digest

    def dynamo_evaluate(self, global_step: int) -> Dict[str, Any]:
        """One evaluation with the engines' current weights (``--dynamo.eval_at_start/_end``): the history row
        (:func:`~dynamo_openrlhf.ppo_trainer.eval_extras_and_row`), which the driver hands to the trainer's history."""
        kwargs = dict(self.generate_kwargs)
        kwargs["temperature"] = self.args.eval.temperature
        kwargs["n_samples_per_prompt"] = n = self.args.eval.n_samples_per_prompt
        ray.get(self.vllm_lock.acquire.remote())
        try:
            samples = self.samples_generator.generate_eval_samples(**kwargs)
        finally:
            ray.get(self.vllm_lock.release.remote())
        logs = compute_eval_metrics(self.eval_dataloader, samples, n)
        return eval_extras_and_row(global_step, logs, samples, n, self.args)[1]

    # -- the queue -----------------------------------------------------------------------------
    def _slot_taken(self, value):
        # The slot token carries the trainer's global step when it freed the slot.
        self.trained = max(0, int(value) - self.start_step)
        return value

    def _generate_batch(self, **generate_kwargs):
        staleness = pool_staleness(self.batches, min(self.trained, self.batches))
        out = self._generate(**generate_kwargs)
        samples = out[0]
        if samples:
            self.batches += 1
            self._pending = self._batch_info(samples, staleness)
        return out

    def _attach_batch(self, payload):
        if not _is_batch(payload):
            return payload
        if self._pending is not None:
            payload[1][BATCH_KEY] = self._pending
            self._pending = None
        info = payload[1].get(BATCH_KEY)
        if self.ledger is not None and info and "generator_state" in info:
            # before the queue has it: a checkpoint taken while it waits there finds it in the ledger
            ray.get(self.ledger.record.remote(info["step"], pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)))
        return payload

    def _batch_info(self, samples, staleness: int) -> Dict[str, Any]:
        """Record the batch in the pool (allocation on) and collect what the trainer logs with its step."""
        gen = self.samples_generator
        step = self.start_step + self.batches
        now = (gen.generated_rollouts, gen.generated_tokens, gen.filtered_groups, gen.filtered_rollouts,
               gen.nonfinite_dropped, gen.prompts_truncated)
        d = [a - b for a, b in zip(now, self._counted)]
        self._counted = now
        metrics = {"dynamo/generated_rollouts": float(d[0]), "dynamo/generated_tokens": float(d[1]),
                   "dynamo/nonfinite_dropped": float(d[4]), "dynamo/prompts_truncated": float(d[5]),
                   "dynamo/pool_staleness": float(staleness)}
        info: Dict[str, Any] = {"step": step, "metrics": metrics}
        a = self.args
        save = may_save(step, a.ckpt.save_steps, a.eval.steps)
        queued = self.ledger is not None and queued_at_a_save(step, self.queue_size, self.start_step + 1,
                                                               a.ckpt.save_steps, a.eval.steps)
        if queued:  # the generator's state after this batch, for a checkpoint taken while it waits in the queue
            info["generator_state"] = {"next_group": int(getattr(gen, "_next_group", 0)),
                                       "sample_buffer": list(getattr(gen, "_sample_buffer", None) or [])}
            # still under the rollout lock: the trainer's next broadcast, hence its next save, comes after this
            ray.get(self.ledger.announce.remote(step))
        if gen.filtering:
            metrics.update({"dynamo/filtered_groups": float(d[2]), "dynamo/filtered_rollouts": float(d[3])})
        if self.allocator is None:
            return info
        t0 = time.time()
        groups = RolloutGroups.from_experiences(samples, gen.success_threshold)
        ids, succ, trials, _, _ = merge_filtered_groups(groups, gen.take_filtered())
        self.allocator.record(ids, succ, trials)
        metrics.update(self.allocator.metrics())
        metrics["dynamo/pool_updates"] = float(self.allocator.steps)
        metrics["timing/dynamo_pool"] = time.time() - t0
        info["expected_samples"] = int(self.allocator.last.budget - gen.last_nonfinite_dropped
                                       - gen.last_filtered_rollouts)
        if save or queued:  # a step that may write a checkpoint, or may wait in the queue at one
            state = self.allocator.state_dict()
            info["allocator_state"] = state
            info["pool_sha256"] = hashlib.sha256(state["pool"]).hexdigest()
        return info


# ----------------------------------------------------------------------------------------------
# The trainer: experience, loss weights, metrics, checkpoints
# ----------------------------------------------------------------------------------------------


class DynamoTrainingActor(_upstream.TrainingActor.__ray_actor_class__):
    """OpenRLHF's ``TrainingActor`` with DynaMO's experience maker, metrics and checkpoint state."""

    def __init__(self, pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                 reference_model_group, vllm_engines, *, vllm_lock, rollout_queue, rollout_slots, dynamo_ledger=None):
        cpu_backend.apply_if_chosen(strategy.args)
        super().__init__(pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                         reference_model_group, vllm_engines, vllm_lock=vllm_lock,
                         rollout_queue=_Tap(rollout_queue, on_get=self._take_batch), rollout_slots=rollout_slots)
        self.history: List[Dict[str, Any]] = []
        run_dir = self.args.dynamo.run_dir
        self._metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        self.allocation = allocation_config(self.args) is not None
        self.balancing = balancing_config(self.args)
        if self.allocation or self.balancing is not None:
            self.experience_maker = DynamoExperienceMaker(
                actor_model_group, critic_model_group, reward_model_group, reference_model_group, self.kl_ctl,
                strategy, self.tokenizer, success_threshold=self.args.dynamo.pool.success_threshold,
                balancing=self.balancing, tagged=self.allocation, on_groups=None, noise_proxy=None)
        self._batch: Dict[str, Any] = {}
        self._maker_dropped = 0
        self._restored = False
        self._resume_allocator: Optional[Dict[str, Any]] = None
        self._resume_queue: List[Tuple[int, bytes]] = []
        self.ledger = dynamo_ledger  # the QueueLedger actor: the batches waiting in the queue at a save
        self._samples_sha: Optional[str] = None

    def _take_batch(self, payload):
        if _is_batch(payload):
            self._batch = payload[1].pop(BATCH_KEY, None) or {}
        return payload

    def train_step(self, rollout_samples, global_step: int):
        info = self._batch
        expected = info.get("expected_samples")
        if expected is not None and len(rollout_samples) != expected:
            raise RuntimeError(f"step has {len(rollout_samples)} samples, the allocation's budget is {expected}")
        if "step" in info and info["step"] != global_step + 1:
            raise RuntimeError(f"the batch was generated for step {info['step']} but trains at step {global_step + 1}"
                               " (the generator's step count and the trainer's disagree)")
        self._samples_sha = samples_digest(rollout_samples)  # before the experience maker adds to them
        status, global_step = super().train_step(rollout_samples, global_step)
        status.update(info.get("metrics", {}))
        dropped = getattr(self.experience_maker, "nonfinite_dropped", 0)
        status["dynamo/nonfinite_dropped"] = status.get("dynamo/nonfinite_dropped", 0.0) + float(
            dropped - self._maker_dropped)
        self._maker_dropped = dropped
        L = getattr(self.experience_maker, "last_token_normalizer", None)
        if self.balancing is not None and self.balancing.token_level and L is not None:
            status["dynamo/token_normalizer"] = L
        trained = status.get(TRAINED_SAMPLES_KEY)
        if trained is not None and int(trained) < len(rollout_samples):
            print(untrained_note(global_step, len(rollout_samples), trained, self.args.train.micro_batch_size),
                  flush=True)
        return status, global_step

    # -- history -------------------------------------------------------------------------------
    def record_row(self, row: Dict[str, Any]) -> None:
        import json

        self.history.append(row)
        if self._metrics_path:
            os.makedirs(os.path.dirname(self._metrics_path) or ".", exist_ok=True)
            with open(self._metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def get_dynamo_history(self) -> List[Dict[str, Any]]:
        return list(self.history)

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        row = {"type": "train", "step": global_step, "time": time.time(), **scalars(logs_dict or {})}
        sha = getattr(self, "_samples_sha", None)
        if sha is not None:
            row["samples_sha256"] = sha  # the batch trained at this step (samples_digest)
        self.record_row(row)
        if client_states is not None and may_save(global_step, self.args.ckpt.save_steps, self.args.eval.steps):
            state: Dict[str, Any] = {"version": STATE_VERSION, "history": list(self.history)}
            if self.allocation:
                alloc = self._batch.get("allocator_state")
                if alloc is None:
                    raise RuntimeError(f"step {global_step} may write a checkpoint but its batch brought no pool "
                                       "state from the generator")
                state["allocator"] = {**alloc, "pool": pool_to_checkpoint(alloc["pool"])}
                print(f"[dynamo] step {global_step}: checkpoint pool = the pool after batch {global_step} "
                      f"({alloc['steps']} updates), sha256 {self._batch.get('pool_sha256')}", flush=True)
            running = getattr(self.experience_maker, "token_normalizer", None)
            if running is not None:
                state["token_normalizer"] = running.state_dict()
            if getattr(self, "ledger", None) is not None:
                state["queue"] = self._queue_state(global_step)
                # the policy actors' generator after this step: the next step's micro-batch order
                state["actor_rng"] = actor_rng_states(self.actor_model_group)
            client_states["dynamo"] = state
        return super().save_logs_and_checkpoints(global_step, logs_dict, client_states)

    def _queue_state(self, global_step: int) -> List[Dict[str, Any]]:
        """The batches generated for later steps and recorded by the generator by now (:class:`QueueLedger`):
        ``[{"step", "payload" (pickled, as a uint8 tensor), "sha256"}]`` in queue order."""
        queued = ray.get(self.ledger.after.remote(global_step))
        out = []
        for b, blob in queued:
            digest = hashlib.sha256(blob).hexdigest()
            out.append({"step": int(b), "payload": pool_to_checkpoint(blob), "sha256": digest})
            print(f"[dynamo] step {global_step}: checkpoint holds queued batch {b} ({len(blob)} bytes, sha256 "
                  f"{digest})", flush=True)
        if not out:
            print(f"[dynamo] step {global_step}: checkpoint holds no queued batch", flush=True)
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def init_checkpoint_states(self):
        """OpenRLHF's checkpoint states without ``"dynamo"`` (cached: the driver asks twice), DynaMO's trainer
        state (history, running token normaliser) restored from them once; the pool is kept for the generator
        (:meth:`take_resume_allocator_state`)."""
        cached = getattr(self, "_checkpoint_states", None)
        if cached is not None:
            return dict(cached)
        fresh = {"episode": 0, "global_step": 0, "total_consumed_prompts": 0, "data_loader_state_dict": {}}
        ckpt_path = os.path.join(self.args.ckpt.path, "_actor")
        states = fresh
        if self.args.ckpt.load_enable and os.path.exists(ckpt_path):
            states = ray.get(self.actor_model_group.async_run_method(method_name="get_checkpoint_states"))[0]
            if "global_step" not in states:
                print(f"[dynamo] no complete checkpoint in {ckpt_path}: starting from step 0", flush=True)
                states = fresh
        dyn = states.get("dynamo")
        if dyn and not self._restored:
            self._restored = True
            self.history = list(dyn.get("history", []))
            running = getattr(self.experience_maker, "token_normalizer", None)
            if running is not None:
                if "token_normalizer" not in dyn:
                    raise ValueError("the checkpoint has no running token normaliser; resume with "
                                     "--dynamo.loss.token_normalizer max_new_tokens or its number")
                running.load_state_dict(dyn["token_normalizer"])
            if self.allocation:
                if "allocator" not in dyn:
                    raise ValueError("the checkpoint has no DynaMO pass-rate pool (saved with --dynamo.allocation."
                                     "rule off or by an older version); cannot resume the allocation exactly")
                alloc = dict(dyn["allocator"])
                alloc["pool"] = pool_from_checkpoint(alloc.get("pool"))
                self._resume_allocator = alloc
            self._resume_queue = checkpoint_queue(dyn.get("queue") or [])
            if dyn.get("actor_rng") is not None:
                ok = restore_actor_rng_states(self.actor_model_group, dyn["actor_rng"])
                print(f"[dynamo] policy actors' torch generator (replay-buffer shuffle): "
                      f"{'restored' if ok else 'not restored (another number of ranks)'} from the checkpoint",
                      flush=True)
        self._checkpoint_states = {k: v for k, v in states.items() if k != "dynamo"}
        return dict(self._checkpoint_states)

    def take_resume_allocator_state(self) -> Optional[Dict[str, Any]]:
        alloc, self._resume_allocator = self._resume_allocator, None
        return alloc

    def take_resume_queue(self) -> List[Tuple[int, bytes]]:
        """The checkpoint's queued batches ``(step, pickled payload)`` for the generator (once)."""
        queue, self._resume_queue = self._resume_queue, []
        return queue

    def fit(self, global_step: int = 0) -> None:
        # OpenRLHF closes its loggers at the end of fit(); the driver may still log the final eval.
        self._closers = []
        for lg in (self.wandb_logger, self.tensorboard_logger):
            if lg is not None:
                self._closers.append(lg.close)
                lg.close = lambda: None
        super().fit(global_step)

    def log_eval_row(self, row: Dict[str, Any]) -> None:
        """An evaluation row from the generator (``--dynamo.eval_at_start/_end``): history and loggers."""
        logs = {k: v for k, v in row.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        for lg in (self.wandb_logger, self.tensorboard_logger):
            if lg is not None and logs:
                lg.log_eval(row["step"], logs)
        self.record_row(row)

    def close_loggers(self) -> None:
        for close in getattr(self, "_closers", []):
            close()
        self._closers = []

    def fresh_run(self) -> None:
        """A run from step 0 writes a new metrics.jsonl (a resumed one appends)."""
        if self._metrics_path and os.path.exists(self._metrics_path):
            os.remove(self._metrics_path)


# ----------------------------------------------------------------------------------------------
# The driver's actor
# ----------------------------------------------------------------------------------------------


class DynamoPPOTrainerAsync(_upstream.PPOTrainerAsync.__ray_actor_class__):
    """OpenRLHF's ``PPOTrainerAsync`` with the DynaMO generator and trainer (module docstring)."""

    def __init__(self, pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                 reference_model_group, vllm_engines, dynamo_pool: Optional[PassRatePool] = None,
                 **generate_kwargs):
        cpu_backend.apply_if_chosen(strategy.args)
        self.args = strategy.args
        # Each batch that may wait in the queue at a checkpoint is recorded here too (a queue cannot be read in place);
        # only when the run can write checkpoints (-1: never, as OpenRLHF reads it)
        a = strategy.args
        saves = any(0 < float(v) < float("inf") for v in (a.ckpt.save_steps, a.eval.steps))
        self.queue_ledger = ray.remote(num_cpus=0)(QueueLedgerActor).remote() if saves else None
        generator = _WithKwargs(DynamoGenerateSamplesActor, dynamo_pool=dynamo_pool, dynamo_ledger=self.queue_ledger)
        trainer = _WithKwargs(DynamoTrainingActor, dynamo_ledger=self.queue_ledger)
        upstream_init = super().__init__.__func__
        with _globals_of(upstream_init, GenerateSamplesActor=generator, TrainingActor=trainer):
            super().__init__(pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                             reference_model_group, vllm_engines, **generate_kwargs)

    def fit(self) -> None:
        dyn = self.args.dynamo
        trainer, generator = self.trainer_actor, self.generator_actor
        states = ray.get(trainer.init_checkpoint_states.remote())
        start = int(states["global_step"])
        alloc = ray.get(trainer.take_resume_allocator_state.remote())
        queue = ray.get(trainer.take_resume_queue.remote())
        ray.get(generator.start_dynamo.remote(start, alloc, queue))
        has_eval = self.args.eval.dataset is not None
        if start == 0:
            ray.get(trainer.fresh_run.remote())
            if has_eval and dyn.eval_at_start:
                ray.get(trainer.log_eval_row.remote(ray.get(generator.dynamo_evaluate.remote(0))))
        try:
            super().fit()
            history = ray.get(trainer.get_dynamo_history.remote())
            last = max([r["step"] for r in history if r.get("type") == "train"], default=0)
            evaluated = {r["step"] for r in history if r.get("type") == "eval"}
            if has_eval and dyn.eval_at_end and last > start and last not in evaluated:
                ray.get(trainer.log_eval_row.remote(ray.get(generator.dynamo_evaluate.remote(last))))
            ray.get(generator.save_pool.remote(dyn.run_dir))
        finally:
            ray.get(trainer.close_loggers.remote())

    def get_dynamo_history(self) -> List[Dict[str, Any]]:
        return ray.get(self.trainer_actor.get_dynamo_history.remote())


DynamoGenerateSamplesActor = ray.remote(DynamoGenerateSamplesActor)
DynamoTrainingActor = ray.remote(DynamoTrainingActor)
DynamoPPOTrainerAsync = ray.remote(DynamoPPOTrainerAsync)
