"""OpenRLHF 0.11.2's single-controller ``PPOTrainer`` (``openrlhf/trainer/ppo_trainer.py``) with DynaMO.

``DynamoPPOTrainer(PPOTrainer)``:

* sequence level (unless ``--dynamo.allocation.rule off``): its ``samples_generator`` is a
  :class:`~dynamo_openrlhf.samples_generator.DynamoSamplesGenerator` whose allocator is a
  :class:`~dynamo_openrlhf.allocation.RolloutAllocator` (pass-rate pool posterior -> n_i per prompt),
  its ``experience_maker`` a :class:`~dynamo_openrlhf.experience_maker.DynamoExperienceMaker`
  (baselines on the explicit groups); after each step the pool is updated from the step's verified
  outcomes (successes and trials per prompt id);
* prompt-balanced loss (``--dynamo.loss.prompt_weighting``, default on with allocation): the experience
  maker attaches every sample's loss weight, computed once per step from the step's groups (also with
  allocation off, from OpenRLHF's contiguous groups of n), with the step's L
  (``--dynamo.loss.token_normalizer``; ``auto``: the running mean response length of the earlier steps),
  logged as ``dynamo/token_normalizer``;
* with ``--dynamo.allocation.noise_scale``, the pool also learns each prompt's gradient-noise scale from a
  per-rollout proxy of the step's own log-probs (the experience maker sums it per group and outcome class),
  the allocation weighs each prompt's variance by it, logged as ``dynamo/noise_scale_mean``/``_spread``;
* with ``--algo.dynamic_filtering_enable`` and an allocation, the groups without reward spread are dropped
  from the update but learnt by the pool in the step's update, their rollouts refilled over new prompts by
  the allocator (:meth:`~dynamo_openrlhf.allocation.RolloutAllocator.allocate_refill`), and logged as
  ``dynamo/filtered_groups`` / ``dynamo/filtered_rollouts``;
* logs ``dynamo/generated_rollouts`` and ``dynamo/generated_tokens`` every step: what the rollout engines
  returned for training since the previous step, including the groups OpenRLHF's
  ``--algo.dynamic_filtering_enable`` discards (``rollout/num_samples`` counts only the trained ones);
* logs ``dynamo/*`` metrics through OpenRLHF's status dict (console, wandb, TensorBoard) and keeps
  a per-step history (``<run_dir>/metrics.jsonl``);
* saves its state (pool bit for bit, step counter, the running token normaliser, history) in every OpenRLHF checkpoint
  (``client_states["dynamo"]``) and restores it on ``--ckpt.load_enable``;
* adds unbiased pass@k (``--dynamo.eval_pass_k``) and solved/unsolved fractions to OpenRLHF's
  in-training evaluation (``--eval.steps``, ``--eval.dataset``, ``--eval.n_samples_per_prompt``,
  ``--eval.temperature``), logged through the same loggers as ``eval_pass@k``;
* can evaluate before the first and after the last step (``--dynamo.eval_at_start/_end``).

Importing this module imports OpenRLHF (the import stand-ins are installed first when needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import warnings
from typing import Any, Dict, List, Optional

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from openrlhf.trainer import ppo_trainer as _openrlhf_ppo_trainer  # noqa: E402

from dynamo_openrlhf._core import FORMAT_VERSION, PassRatePool  # noqa: E402
from dynamo_openrlhf.allocation import RolloutAllocator  # noqa: E402
from dynamo_openrlhf.checkpoint import MODEL_STATES, latest_tag  # noqa: E402
from dynamo_openrlhf.metrics import default_ks, is_success, train_eval_logs  # noqa: E402
from dynamo_openrlhf.experience_maker import DynamoExperienceMaker  # noqa: E402
from dynamo_openrlhf.ppo_actor import TRAINED_SAMPLES_KEY  # noqa: E402
from dynamo_openrlhf.run_config import allocation_config, balancing_config  # noqa: E402
from dynamo_openrlhf.samples_generator import (  # noqa: E402
    DynamoSamplesGenerator,
    RolloutGroups,
    merge_filtered_groups,
    outcome_values,
    reward_source,
)

__all__ = ["DynamoPPOTrainer", "POOL_STALENESS_KEY", "STATE_VERSION", "eval_extras_and_row", "pool_from_checkpoint",
           "pool_to_checkpoint", "restored_pool_digest", "scalars", "untrained_note"]

STATE_VERSION = 3  # of client_states["dynamo"]; 1 = history only; 2 = + pool; 3 = + running token normaliser
#: Policy updates by which the pool (and the generating weights) lag the sync schedule: always 0 here, up to
#: --train.async_queue_size under the async trainer (dynamo_openrlhf.ppo_trainer_async, docs/async.md).
POOL_STALENESS_KEY = "dynamo/pool_staleness"


def pool_to_checkpoint(data: bytes) -> torch.Tensor:
    """The pool's file-format bytes (``PassRatePool.to_bytes``) as they go into a checkpoint's client_states:
    a 1-D uint8 tensor of the same length sharing their memory (no copy). Why not the bytes: torch.save
    pickles with protocol 2, which writes a bytes object as a latin-1 string (~1.5 output bytes per byte, slow:
    12.6 s against 2.1 s for a tensor, 240 MB, measured in docs/bench_pool_in_run.md), while a tensor's storage
    goes to its own zip record as is."""
    if not isinstance(data, bytes):
        raise ValueError(f"pool_to_checkpoint: expected bytes, got {type(data).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory: the tensor is never written to
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8))


def pool_from_checkpoint(value: Any) -> bytes:
    """Inverse of :func:`pool_to_checkpoint`: the bytes of a 1-D uint8 tensor, or ``value`` itself when it
    is bytes (checkpoints written before the tensor form). ValueError for anything else."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        return value.numpy().tobytes()
    raise ValueError(f"the pool state is neither bytes nor a 1-D uint8 tensor: {type(value).__name__} "
                     f"{getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}")


def restored_pool_digest(data: bytes, pool: PassRatePool) -> str:
    """sha256 (hex) of ``pool.to_bytes()``, for a ``pool`` just restored from the checkpoint bytes ``data``
    (``PassRatePool.from_bytes``, then possibly given this run's forget factor).

    The file format is canonical: a loaded pool writes the bytes it was loaded from whenever ``data`` is the current
    format version, the pool keeps the file's forget factor (header bytes 32..40, f64) and its table size (bytes
    64..72, u64; a load keeps it unless the table was far larger than the prompts need). Records are written in table
    order from just after an empty slot, which a load re-inserts into the same layout, and every other field round-trips
    bit for bit. Then the digest is that of ``data``, which saves re-serialising the pool (0.5-0.7 s CPU and a second
    copy of its bytes at 10M prompts, docs/bench_pool_in_run.md); otherwise it is that of ``pool.to_bytes()``."""
    version, = struct.unpack_from("<I", data, 8)
    forget, = struct.unpack_from("<d", data, 32)
    slots, = struct.unpack_from("<Q", data, 64)
    same = (version == FORMAT_VERSION and struct.pack("<d", forget) == struct.pack("<d", pool.forget)
            and slots == pool.stats()["slots"])
    return hashlib.sha256(data if same else pool.to_bytes()).hexdigest()


def scalars(d: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of a status dict that go into a metrics.jsonl row: numbers (0-d tensors as numbers), strings,
    booleans and None."""
    out = {}
    for k, v in d.items():
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


_scalars = scalars


def eval_extras_and_row(global_step: int, logs: Optional[Dict[str, Any]], samples, n: int, args):
    """DynaMO's part of one in-training evaluation: ``(extra, row)``. ``extra``: unbiased pass@k
    (``--dynamo.eval_pass_k``, default :func:`~dynamo_openrlhf.metrics.default_ks`) and the solved/unsolved
    fractions of the eval samples (the pool's success rule: score, else reward, > ``--dynamo.pool.success_threshold``),
    for OpenRLHF's loggers; ``row``: the history row (``type`` eval, ``step``, OpenRLHF's ``logs`` and ``extra``, and
    the successes and samples per distinct prompt text for the run summary's paired start -> end difference).
    ``samples``: the evaluation's experiences, ``n``: eval samples per prompt."""
    text = args.dynamo.eval_pass_k
    ks = default_ks(n) if not text else [int(k) for k in str(text).split(",")]
    threshold = args.dynamo.pool.success_threshold
    values = np.concatenate([outcome_values(s, i) for i, s in enumerate(samples)]) if samples else []
    extra = train_eval_logs(values, n, ks, threshold)
    row = {"type": "eval", "step": global_step, "time": time.time(), **scalars({**(logs or {}), **(extra or {})})}
    prompts = [p for s in samples for p in s.prompts]
    if len(values) and len(prompts) == len(values):
        # Sorted by prompt (vLLM does not keep the eval order from one evaluation to the next); the hash of the
        # sorted prompts tells whether two evaluations scored the same prompts.
        ok = is_success(values, threshold)
        per: Dict[str, List[int]] = {}
        for p, good in zip(prompts, ok):
            per.setdefault(p, [0, 0])
            per[p][0] += int(good)
            per[p][1] += 1
        keys = sorted(per)
        row["eval_prompt_successes"] = [per[p][0] for p in keys]
        row["eval_prompt_samples"] = [per[p][1] for p in keys]
        row["eval_prompts_sha256"] = hashlib.sha256("\0".join(keys).encode()).hexdigest()
    return extra, row


def untrained_note(step: int, samples: int, trained: Optional[float], micro_batch_size: int) -> Optional[str]:
    """The line printed for a step whose batch OpenRLHF's actor did not train in full, else None.
    ``trained``: the actor's ``dynamo/trained_samples`` (None when it did not report: nothing to say).
    OpenRLHF reads each rank's replay buffer in micro-batches of ``micro_batch_size`` with ``drop_last``, so a
    batch with fewer samples than one micro-batch (dynamic filtering's or a short data set's last batch) trains
    nothing: its row then has no loss and no modulation statistics."""
    if trained is None or int(trained) >= samples:
        return None
    trained = int(trained)
    if trained == 0:
        return (f"[dynamo] step {step}: the batch's {samples} samples are fewer than one micro-batch "
                f"(--train.micro_batch_size {micro_batch_size} per rank): OpenRLHF's actor trained on none of them "
                "(no loss or modulation statistics this step)")
    return (f"[dynamo] step {step}: OpenRLHF's actor trained {trained} of the batch's {samples} samples (each rank "
            f"drops its remainder of --train.micro_batch_size {micro_batch_size})")


class DynamoPPOTrainer(_openrlhf_ppo_trainer.PPOTrainer.__ray_actor_class__):
    """OpenRLHF's ``PPOTrainer`` with DynaMO's allocation loop (see module docstring)."""

    def __init__(self, pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                 reference_model_group, vllm_engines, dynamo_pool: Optional[PassRatePool] = None, **generate_kwargs):
        """OpenRLHF's arguments, plus ``dynamo_pool``: the initial pass-rate pool (``--dynamo.pool.load``,
        read once by the launcher, with the run's ``--dynamo.pool.forget``; a checkpoint's pool replaces
        it on resume)."""
        cpu_backend.apply_if_chosen(strategy.args)
        self.history: List[Dict[str, Any]] = []
        self._evaluated_steps = set()
        self._last_step = 0
        self._restored = False
        run_dir = strategy.args.dynamo.run_dir
        self._metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        super().__init__(pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                         reference_model_group, vllm_engines, **generate_kwargs)
        self.allocator: Optional[RolloutAllocator] = None
        config = allocation_config(self.args)
        if config is not None:
            if dynamo_pool is not None and dynamo_pool.forget != config.forget:
                raise ValueError(f"dynamo_pool: forget {dynamo_pool.forget} != --dynamo.pool.forget {config.forget} "
                                 "(load it with dynamo_openrlhf.allocation.load_pool)")
            self.allocator = RolloutAllocator(config, pool=dynamo_pool)
            if dynamo_pool is not None:
                print(f"[dynamo] initial pass-rate pool (--dynamo.pool.load): {len(dynamo_pool)} prompts, sha256 "
                      f"{self.allocator.pool_digest()}, forget {dynamo_pool.forget:g}", flush=True)
        # Without an allocator (rule off) this is OpenRLHF's generator exactly, plus pass@k at eval.
        self.samples_generator = DynamoSamplesGenerator(
            strategy=strategy,
            prompts_dataloader=self.prompts_dataloader,
            eval_dataloader=self.eval_dataloader,
            tokenizer=self.tokenizer,
            vllm_engines=vllm_engines,
            rollout_allocator=self.allocator.allocate if config is not None else None,
            num_candidates=config.candidates_per_step if config is not None else None,
            reward_source=reward_source(self.args),
            refill_allocator=self.allocator.allocate_refill if config is not None else None,
            success_threshold=self.args.dynamo.pool.success_threshold,
        )
        self.balancing = balancing_config(self.args)
        if config is not None or self.balancing is not None:
            # With allocation off (OpenRLHF's sampler, untagged samples) only for the balanced loss's weights.
            self.experience_maker = DynamoExperienceMaker(
                actor_model_group,
                critic_model_group,
                reward_model_group,
                reference_model_group,
                self.kl_ctl,
                strategy,
                self.tokenizer,
                success_threshold=self.args.dynamo.pool.success_threshold,
                balancing=self.balancing,
                tagged=config is not None,
                on_groups=self._record_groups if config is not None else None,
                noise_proxy=config.noise_scale if config is not None else None,
            )
        if config is not None:
            # The LR scheduler's steps: OpenRLHF's formula with the rollouts a pass actually spends
            # (fewer with over-sampling; the same without).
            a = self.args
            self.max_steps = max(1, config.scheduler_steps(len(self.prompts_dataloader.dataset), a.train.batch_size,
                                                           a.train.num_episodes, a.train.max_epochs))

    # -- sequence level ------------------------------------------------------------------------
    def train_step(self, rollout_samples, global_step: int):
        if self.allocator is not None:
            expected = self.allocator.last.budget if self.allocator.last is not None else None
            if expected is not None:  # less the groups --dynamo.nonfinite drop and dynamic filtering removed
                expected -= getattr(self.samples_generator, "last_nonfinite_dropped", 0)
                expected -= getattr(self.samples_generator, "last_filtered_rollouts", 0)
            if expected is not None and len(rollout_samples) != expected:
                raise RuntimeError(f"step has {len(rollout_samples)} samples, the allocation's budget is {expected}")
        status, global_step = super().train_step(rollout_samples, global_step)
        status[POOL_STALENESS_KEY] = 0.0  # each batch is drawn from the pool after every earlier step's update
        status.update(self._generated_since_last_step())
        status.update(self._fault_counts_since_last_step())
        if getattr(self.samples_generator, "filtering", False):  # dynamic filtering with an allocation
            status.update(self._filtered_since_last_step())
        L = getattr(self.experience_maker, "last_token_normalizer", None)
        if self.balancing is not None and self.balancing.token_level and L is not None:
            status["dynamo/token_normalizer"] = L  # the L of this step's weights
        if self.allocator is not None:
            t0 = time.time()
            status.update(self.allocator.metrics())
            status["timing/dynamo_pool"] = time.time() - t0  # the pool's metrics (its update: make_experience)
        if TRAINED_SAMPLES_KEY in status:  # the policy actor reported what it trained
            note = untrained_note(global_step, len(rollout_samples), status[TRAINED_SAMPLES_KEY],
                                  self.args.train.micro_batch_size)
            if note is not None:
                print(note, flush=True)
        return status, global_step

    def _generated_since_last_step(self) -> Dict[str, float]:
        """``dynamo/generated_rollouts`` / ``dynamo/generated_tokens``: training samples (response tokens) the
        engines returned since the previous step's log, discarded ones included (OpenRLHF's dynamic filtering
        re-samples; a generation call that yielded no batch is counted in the next step)."""
        gen = self.samples_generator
        done = getattr(self, "_generated_logged", (0, 0))
        now = (gen.generated_rollouts, gen.generated_tokens)
        self._generated_logged = now
        return {"dynamo/generated_rollouts": float(now[0] - done[0]),
                "dynamo/generated_tokens": float(now[1] - done[1])}

    def _filtered_since_last_step(self) -> Dict[str, float]:
        """``dynamo/filtered_groups`` / ``dynamo/filtered_rollouts``: groups (rollouts) that dynamic filtering
        dropped with an allocation since the previous step's log (their rollouts are in
        ``dynamo/generated_rollouts`` and in the pool, not in the update)."""
        gen = self.samples_generator
        now = (gen.filtered_groups, gen.filtered_rollouts)
        done = getattr(self, "_filtered_logged", (0, 0))
        self._filtered_logged = now
        return {"dynamo/filtered_groups": float(now[0] - done[0]), "dynamo/filtered_rollouts": float(now[1] - done[1])}

    def _fault_counts_since_last_step(self) -> Dict[str, float]:
        """``dynamo/nonfinite_dropped`` (samples removed by ``--dynamo.nonfinite drop``: the generator's for
        rewards, the experience maker's for old log-probs and advantages) and ``dynamo/prompts_truncated``
        (training prompts cut to the prompt budget) since the previous step's log."""
        gen, maker = self.samples_generator, getattr(self, "experience_maker", None)
        now = (getattr(gen, "nonfinite_dropped", 0) + getattr(maker, "nonfinite_dropped", 0),
               getattr(gen, "prompts_truncated", 0))
        done = getattr(self, "_faults_logged", (0, 0))
        self._faults_logged = now
        return {"dynamo/nonfinite_dropped": float(now[0] - done[0]), "dynamo/prompts_truncated": float(now[1] - done[1])}

    def _record_groups(self, groups: RolloutGroups) -> None:
        """The experience maker hands each step's groups here as soon as it has read them (inside
        OpenRLHF's ``train_step``): the pool learns the step's verified outcomes, and with
        ``--dynamo.allocation.noise_scale`` each group's per-class sums of the noise proxy (None when off). With
        dynamic filtering the groups it dropped since the previous update join them, in the same update (one
        forgetting step), their noise counted at the class means (:func:`merge_filtered_groups`)."""
        gen = getattr(self, "samples_generator", None)
        filtered = gen.take_filtered() if isinstance(gen, DynamoSamplesGenerator) else None
        ids, succ, trials, ns, nf = merge_filtered_groups(groups, filtered, self.allocator.pool.noise_means)
        self.allocator.record(ids, succ, trials, noise_success=ns, noise_failure=nf)

    # -- state kept in OpenRLHF checkpoints -----------------------------------------------------
    def _running_normalizer(self):
        """The experience maker's :class:`~dynamo_openrlhf.advantages.RunningTokenNormalizer` (None unless
        ``--dynamo.loss.token_normalizer auto`` with the balanced token-mean loss)."""
        return getattr(getattr(self, "experience_maker", None), "token_normalizer", None)

    def dynamo_state_dict(self) -> Dict[str, Any]:
        state = {"version": STATE_VERSION, "history": list(self.history)}
        if self.allocator is not None:
            state["allocator"] = self.allocator.state_dict()
        running = self._running_normalizer()
        if running is not None:
            state["token_normalizer"] = running.state_dict()
        return state

    def load_dynamo_state_dict(self, state: Dict[str, Any]) -> None:
        running = self._running_normalizer()
        if running is not None:
            if "token_normalizer" not in state:
                raise ValueError("the checkpoint has no running token normaliser (saved with a fixed "
                                 "--dynamo.loss.token_normalizer or by an older version), so --dynamo.loss."
                                 "token_normalizer auto cannot continue it exactly; resume with the L the run was "
                                 "started with: --dynamo.loss.token_normalizer max_new_tokens (the default before "
                                 "auto) or its number")
            running.load_state_dict(state["token_normalizer"])
        self.history = list(state.get("history", []))
        if self.allocator is not None:
            if "allocator" not in state:
                raise ValueError("the checkpoint has no DynaMO pass-rate pool (saved with --dynamo.allocation.rule "
                                 "off or by an older version); cannot resume the allocation exactly")
            try:
                alloc = dict(state["allocator"])
                data = alloc["pool"] = pool_from_checkpoint(alloc.get("pool"))
                self.allocator.load_state_dict(alloc)
            except ValueError as e:  # its length or a checksum does not hold: never resume from it
                raise ValueError(f"{self._checkpoint_file()}: the DynaMO pass-rate pool in this checkpoint is not "
                                 f"valid ({str(e).replace('<bytes> ', '')}); resume from an earlier checkpoint "
                                 "(write its tag into the 'latest' file next to it)") from None
            print(f"[dynamo] restored pass-rate pool: {len(self.allocator.pool)} prompts, "
                  f"{self.allocator.steps} updates, sha256 {restored_pool_digest(data, self.allocator.pool)}",
                  flush=True)
        if running is not None:
            print(f"[dynamo] restored token normaliser: L = {running.value!r} (running mean response length of "
                  f"{running.steps} steps)", flush=True)

    def _checkpoint_file(self) -> str:
        """The model-state file of the checkpoint ``--ckpt.load_enable`` resumes from (it holds client_states)."""
        ckpt = os.path.join(self.args.ckpt.path, "_actor")
        return os.path.join(ckpt, latest_tag(ckpt) or "<latest>", MODEL_STATES)

    def init_checkpoint_states(self):
        """OpenRLHF's checkpoint states (``{"episode": 0, "global_step": 0, ...}`` on a fresh run), the DynaMO
        state restored from them once. OpenRLHF's own version is not called: it logs the whole dict, which with
        a pool is the repr of the pool's bytes (4 characters per byte: ~1 GB of log line for a 10M-prompt pool),
        and fit() asks for the states twice. The first answer is kept without its ``"dynamo"`` entry (the pool's
        bytes are not held for the whole run) and handed out again, as a shallow copy. On a restore a
        ``{"type": "ckpt_load"}`` row goes to the metrics: ``timing/ckpt_states_fetch`` (s, the states from the
        actor, over Ray) and ``timing/dynamo_pool_load`` (s, :meth:`load_dynamo_state_dict`)."""
        cached = getattr(self, "_checkpoint_states", None)
        if cached is not None:
            return dict(cached)
        ckpt_path = os.path.join(self.args.ckpt.path, "_actor")
        t0 = time.perf_counter()
        if self.args.ckpt.load_enable and os.path.exists(ckpt_path):
            states = ray.get(self.actor_model_group.async_run_method(method_name="get_checkpoint_states"))[0]
            print(f"[dynamo] checkpoint states: { {k: v for k, v in states.items() if k != 'dynamo'} }", flush=True)
        else:
            states = {"episode": 0, "global_step": 0, "total_consumed_prompts": 0, "data_loader_state_dict": {}}
        fetch_s = time.perf_counter() - t0
        if "global_step" not in states:
            # --ckpt.load_enable, a checkpoint directory, but no complete checkpoint in it (a kill during the first
            # save): OpenRLHF's actor loaded nothing and hands back {}, which OpenRLHF's fit cannot read.
            print(f"[dynamo] no complete checkpoint in {os.path.join(self.args.ckpt.path, '_actor')}: "
                  "starting from step 0", flush=True)
            states = {"episode": 0, "global_step": 0, "total_consumed_prompts": 0, "data_loader_state_dict": {}}
        if states.get("dynamo") and not self._restored:
            t0 = time.perf_counter()
            self.load_dynamo_state_dict(states["dynamo"])
            self._restored = True
            self._record({"type": "ckpt_load", "step": states["global_step"], "time": time.time(),
                          "timing/ckpt_states_fetch": fetch_s, "timing/dynamo_pool_load": time.perf_counter() - t0})
        states = {k: v for k, v in states.items() if k != "dynamo"}
        self._checkpoint_states = states
        return dict(states)

    # -- metrics -------------------------------------------------------------------------------
    def _record(self, row: Dict[str, Any]) -> None:
        self.history.append(row)
        if self._metrics_path:
            os.makedirs(os.path.dirname(self._metrics_path) or ".", exist_ok=True)
            with open(self._metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        self._last_step = global_step
        row = {"type": "train", "step": global_step, "time": time.time(), **_scalars(logs_dict or {})}
        self._record(row)
        # The pool is O(pool) to serialise: only for steps that can write a checkpoint (regular or best).
        state_s = None
        if client_states is not None and (global_step % self.args.ckpt.save_steps == 0
                                          or global_step % self.args.eval.steps == 0):
            t0 = time.perf_counter()
            state = self.dynamo_state_dict()
            if "allocator" in state:  # the pool as a uint8 tensor: written as is by torch.save (pool_to_checkpoint)
                state["allocator"] = {**state["allocator"], "pool": pool_to_checkpoint(state["allocator"]["pool"])}
            client_states["dynamo"] = state
            state_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        if state_s is not None and global_step % self.args.ckpt.save_steps == 0:
            # A checkpoint was written (after the step's train row): timing/dynamo_pool_save (s, the DynaMO state,
            # i.e. the pool's to_bytes), timing/ckpt_save (s, OpenRLHF's save: client_states over Ray to the actor,
            # torch.save of model, optimizer and client_states), dynamo/pool_state_bytes (the pool's part).
            alloc = client_states["dynamo"].get("allocator")
            self._record({"type": "ckpt", "step": global_step, "time": time.time(), "timing/dynamo_pool_save": state_s,
                          "timing/ckpt_save": time.perf_counter() - t0,
                          "dynamo/pool_state_bytes": alloc["pool"].numel() if alloc else 0})
        return out

    def evaluate(self, global_step, **generate_kwargs):
        logs = super().evaluate(global_step, **generate_kwargs)
        samples = self.samples_generator.last_eval_samples
        n = generate_kwargs["n_samples_per_prompt"]
        extra, row = eval_extras_and_row(global_step, logs, samples, n, self.args)
        if extra:
            for lg in (self.wandb_logger, self.tensorboard_logger):
                if lg is not None:
                    lg.log_eval(global_step, extra)
            logs = {**(logs or {}), **extra}
        self._evaluated_steps.add(global_step)
        self._record(row)
        return logs

    def _dynamo_evaluate(self, global_step):
        kwargs = dict(self.generate_kwargs)
        kwargs["temperature"] = self.args.eval.temperature
        kwargs["n_samples_per_prompt"] = self.args.eval.n_samples_per_prompt
        self.evaluate(global_step, **kwargs)

    def fit(self, global_step: int = 0) -> None:
        dyn = self.args.dynamo
        # OpenRLHF closes its loggers at the end of fit(); keep them open for the final eval.
        closers = []
        for lg in (self.wandb_logger, self.tensorboard_logger):
            if lg is not None:
                closers.append(lg.close)
                lg.close = lambda: None
        try:
            fresh = self.init_checkpoint_states().get("global_step", 0) == 0
            if fresh and self._metrics_path and os.path.exists(self._metrics_path):
                os.remove(self._metrics_path)  # a new run; a resumed one appends
            if self.eval_dataloader is not None and dyn.eval_at_start and fresh:
                self._dynamo_evaluate(global_step)
            super().fit(global_step)
            if (self.eval_dataloader is not None and dyn.eval_at_end and self._last_step > 0
                    and self._last_step not in self._evaluated_steps):
                self._dynamo_evaluate(self._last_step)
            if self.allocator is not None and dyn.run_dir:
                path = os.path.join(dyn.run_dir, "pass_rate_pool.bin")
                self.allocator.pool.save(path)
                print(f"[dynamo] saved pass-rate pool: {len(self.allocator.pool)} prompts, sha256 "
                      f"{self.allocator.pool_digest()} -> {path}", flush=True)
        finally:
            for close in closers:
                close()

    def get_dynamo_history(self) -> List[Dict[str, Any]]:
        return list(self.history)


DynamoPPOTrainer = ray.remote(DynamoPPOTrainer)
