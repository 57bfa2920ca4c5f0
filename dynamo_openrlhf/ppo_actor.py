"""OpenRLHF 0.11.2's policy actor (``openrlhf/trainer/ray/ppo_actor.py``) with the DynaMO loss.

* ``DynamoActorPPOTrainer(ActorPPOTrainer)``: its ``actor_loss_fn`` is
  :class:`~dynamo_openrlhf.loss.DynaMOPolicyLoss` built from the same OpenRLHF flags as OpenRLHF's
  ``PolicyLoss`` plus ``--dynamo.modulation.*``. The modulation needs the current policy's token
  entropy, as a constant: a forward hook on the actor computes it during the training step's forward
  from the logits that forward produced, under ``torch.no_grad``, chunked over tokens, only at the
  response positions (:func:`dynamo_openrlhf.entropy.response_entropy`; padded and packed layouts,
  ring attention through OpenRLHF's own gather), so no (tokens, vocab) graph is kept. When the user
  asks for OpenRLHF's entropy (``--actor.entropy_coef`` set, e.g. a real entropy bonus > 0), the
  forward already carries ``output.entropy``; the hook reuses it (detached) instead. The mean token
  entropy over the micro-batch's valid tokens is logged as ``dynamo/token_entropy``. The modulation
  statistics go into the micro-batch's ``info`` as ``dynamo/<stat>``, so OpenRLHF's own metric
  reduction (token-weighted over micro-batches and data-parallel ranks) logs the means; the
  ``*_max`` / ``*_min`` statistics are kept out of it and reduced as a max / min over the step's
  micro-batches and the data-parallel ranks (:meth:`DynamoActorPPOTrainer.ppo_train`).
  Every step also logs ``dynamo/trained_samples`` (samples that reached the policy loss, per epoch, summed over
  the data-parallel ranks) and ``dynamo/untrained_samples`` (the step's other samples): OpenRLHF's actor reads
  its replay buffer with ``drop_last=True``, so each rank's remainder of ``--train.micro_batch_size`` is not
  trained, and a batch smaller than one micro-batch (e.g. dynamic filtering's or a short data set's last batch)
  trains nothing: no loss, no modulation statistics in its row.
  With the prompt-balanced loss (``--dynamo.loss.prompt_weighting``), each micro-batch carries the
  per-sample weights in ``info["dynamo_loss_weight"]`` (popped before OpenRLHF logs ``info``); they
  multiply the modulated advantages, and the policy term's normaliser only cancels DeepSpeed's 1/gas
  and the data-parallel averaging (:func:`dynamo_openrlhf.loss.balanced_normalizers`). The weights are
  per-sample ``info`` entries, so they travel with their samples through OpenRLHF's splitting, DP balancing
  and token-budget micro-batching (``--train.dynamic_batch_enable``, where DeepSpeed's gas is 1: the
  update is the same as with fixed micro-batches).
  Each micro-batch's loss is checked before OpenRLHF's ``strategy.backward``: a NaN/inf loss stops the run
  with the micro-batch's samples named (index in the step, prompt id) and their non-finite inputs
  (:func:`dynamo_openrlhf.nonfinite.loss_report`).
* ``DynamoPolicyModelActor(PolicyModelActor)``: upgrades the ``ActorPPOTrainer`` that OpenRLHF's
  ``init_model_from_pretrained`` builds to ``DynamoActorPPOTrainer`` and applies the CPU backend in
  its process when chosen.

Importing this module imports OpenRLHF (the import stand-ins are installed first when needed).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

from dynamo_openrlhf import checkpoint, cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402
import torch  # noqa: E402
from openrlhf.trainer.ray import ppo_actor as _openrlhf_ppo_actor  # noqa: E402

from dynamo_openrlhf.advantages import LOSS_WEIGHT_KEY  # noqa: E402
from dynamo_openrlhf.entropy import response_entropy  # noqa: E402
from dynamo_openrlhf.loss import DynaMOPolicyLoss, balanced_normalizers  # noqa: E402
from dynamo_openrlhf.modulation import STAT_KEYS  # noqa: E402
from dynamo_openrlhf.nonfinite import STEP_INDEX_KEY, NonfiniteError, loss_report  # noqa: E402
from dynamo_openrlhf.prompt_ids import prompt_ids  # noqa: E402
from dynamo_openrlhf.run_config import balancing_config, modulation_config  # noqa: E402

__all__ = ["DynamoActorPPOTrainer", "DynamoPolicyModelActor", "EXTREME_STATS", "STAT_PREFIX", "TOKEN_ENTROPY_KEY",
           "TRAINED_SAMPLES_KEY", "UNTRAINED_SAMPLES_KEY", "reduce_extremes"]

STAT_PREFIX = "dynamo/"
#: The mean token entropy (over the valid response tokens) that the modulation saw.
TOKEN_ENTROPY_KEY = STAT_PREFIX + "token_entropy"
#: Samples of the step that reached the policy loss (per epoch, all ranks) / that did not (drop_last remainders).
TRAINED_SAMPLES_KEY = STAT_PREFIX + "trained_samples"
UNTRAINED_SAMPLES_KEY = STAT_PREFIX + "untrained_samples"
#: Modulation statistics reduced as a max / min over the step (not OpenRLHF's token-weighted mean).
EXTREME_STATS = tuple(k for k in STAT_KEYS if k.endswith(("_max", "_min")))


def reduce_extremes(extremes: Dict[str, float],
                    all_reduce_max: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """``{dynamo/<stat>: value}`` for the :data:`EXTREME_STATS`: ``*_max`` the max, ``*_min`` the min of
    this rank's values (``extremes``, missing keys = nothing seen) and, with ``all_reduce_max`` (an
    element-wise MAX all-reduce over the data-parallel ranks, e.g. the strategy's
    ``all_reduce(t, op="max")``), of every rank's. Every rank must call it with the same key set
    (all of EXTREME_STATS), as it is a collective; the min is reduced as the max of the negation.
    A statistic no rank saw is left out."""
    signed = [extremes.get(k, -math.inf) if k.endswith("_max") else -extremes.get(k, math.inf) for k in EXTREME_STATS]
    vals = torch.tensor(signed, dtype=torch.float64)
    if all_reduce_max is not None:
        vals = torch.as_tensor(all_reduce_max(vals)).to("cpu", torch.float64)
    out = {}
    for k, v in zip(EXTREME_STATS, vals.tolist()):
        if v != -math.inf:
            out[STAT_PREFIX + k] = v if k.endswith("_max") else -v
    return out


class DynamoActorPPOTrainer(_openrlhf_ppo_actor.ActorPPOTrainer):
    """``ActorPPOTrainer`` whose policy loss is ``DynaMOPolicyLoss`` (see module docstring)."""

    def __init__(self, strategy, *args, **kwargs):
        super().__init__(strategy, *args, **kwargs)
        self._init_dynamo()

    @classmethod
    def upgrade(cls, trainer) -> "DynamoActorPPOTrainer":
        """Turn an ``ActorPPOTrainer`` built by OpenRLHF's ``PolicyModelActor`` into this subclass
        (its state is kept; only the loss is replaced). Ray ships OpenRLHF's actor methods by value,
        so swapping the class name in OpenRLHF's module would not reach them."""
        if not isinstance(trainer, _openrlhf_ppo_actor.ActorPPOTrainer):
            raise TypeError(f"expected an ActorPPOTrainer, got {type(trainer).__name__}")
        trainer.__class__ = cls
        trainer._init_dynamo()
        return trainer

    def _init_dynamo(self) -> None:
        a = self.args
        self.dynamo_loss = DynaMOPolicyLoss(
            clip_eps_low=a.actor.eps_clip_low_high[0],
            clip_eps_high=a.actor.eps_clip_low_high[1],
            dual_clip=a.actor.dual_clip,
            token_level_loss=a.actor.loss_agg_mode == "token-mean",
            policy_loss_type=a.actor.policy_loss_type,
            is_correction_level=a.algo.advantage.is_correction_level,
            is_correction_mode=a.algo.advantage.is_correction_mode,
            is_correction_gating=a.algo.advantage.is_correction_gating,
            is_correction_threshold=a.algo.advantage.is_correction_threshold,
            modulation=modulation_config(a),
        )
        self.actor_loss_fn = self._policy_loss
        self.balancing = balancing_config(a)
        self._entropy: Optional[torch.Tensor] = None
        self._info: Optional[Dict] = None
        self._sample_weight: Optional[torch.Tensor] = None
        self._extremes: Optional[Dict[str, float]] = None
        self._trained_samples = 0  # samples the step's training_step calls saw (all epochs)
        self._loss_inputs = None  # the micro-batch's (log_probs, old_log_probs, advantages, action_mask)
        if not self.dynamo_loss.modulation.is_identity:
            self.actor.register_forward_hook(self._keep_entropy, with_kwargs=True)

    def _keep_entropy(self, module, args, kwargs, output) -> None:
        """Forward hook: during a training step's forward (``return_output=True``), the response
        tokens' entropy — OpenRLHF's ``output.entropy`` (detached) when the forward computed it, else
        :func:`~dynamo_openrlhf.entropy.response_entropy` of the forward's logits (no graph)."""
        if self._info is None or not (isinstance(output, tuple) and len(output) == 2):
            return
        action_mask = args[1] if len(args) > 1 else kwargs.get("action_mask")
        if action_mask is None:
            return
        A = action_mask.shape[1]
        out = output[1]
        entropy = getattr(out, "entropy", None)
        if entropy is not None:
            self._entropy = entropy[:, -A:].detach()
            return
        actor = getattr(module, "module", module)  # a DeepSpeed engine wraps the Actor
        self._entropy = response_entropy(
            out["logits"],
            A,
            attention_mask=kwargs.get("attention_mask"),
            packed=bool(getattr(actor, "packing_samples", False)),
            ring_attn_group=kwargs.get("ring_attn_group"),
        )

    def _policy_loss(self, log_probs, old_log_probs, advantages, action_mask=None, **kwargs):
        self._loss_inputs = (log_probs.detach(), old_log_probs, advantages, action_mask)
        entropy = self._entropy
        if entropy is not None:
            entropy = entropy[:, -log_probs.shape[1]:].detach()
        weight = None
        if self.balancing is not None:
            weight = self._sample_weight
            if weight is None:
                raise RuntimeError(f"prompt-balanced loss: the micro-batch carries no info[{LOSS_WEIGHT_KEY!r}] (the "
                                   "experience maker attaches it every step)")
            # The policy term's normaliser only cancels DeepSpeed's 1/gas and the DP averaging; the
            # weights carry 1/(N n_i L). KL and entropy terms keep OpenRLHF's normalisation.
            kwargs.update(balanced_normalizers(kwargs.get("dp_size", 1), self._deepspeed_gas()))
        out = self.dynamo_loss(log_probs, old_log_probs, advantages, action_mask=action_mask, entropy=entropy,
                               sample_weight=weight, **kwargs)
        stats = self.dynamo_loss.last_modulation_stats
        if stats and self._info is not None:
            for k, v in stats.items():
                if k in EXTREME_STATS:
                    if self._extremes is not None:
                        x, old = float(v), self._extremes.get(k)
                        self._extremes[k] = x if old is None else (max(old, x) if k.endswith("_max") else min(old, x))
                    continue
                self._info[STAT_PREFIX + k] = v.detach().reshape(())
            self._info[TOKEN_ENTROPY_KEY] = _masked_mean(entropy, action_mask)
        return out

    def _deepspeed_gas(self) -> int:
        """The 1/gas DeepSpeed applies to each backward: the strategy's gradient accumulation, except with
        ``--train.dynamic_batch_enable``, where OpenRLHF configures DeepSpeed with gradient_accumulation_steps 1
        (token-budget micro-batches, a variable number per optimizer step, each backward unscaled) and steps the
        optimizer itself at each step's last micro-batch."""
        if getattr(self.args.train, "dynamic_batch_enable", False):
            return 1
        return self.strategy.accumulated_gradient

    def ppo_train(self, kl_ctl: float):
        """OpenRLHF's ``ppo_train``; the modulation's ``*_max`` / ``*_min`` statistics are added as the
        max / min over the step's micro-batches and (torch.distributed initialised) the ranks."""
        self._extremes = {}
        buffered = len(getattr(self, "replay_buffer", None) or ())
        self._trained_samples = 0
        try:
            status = super().ppo_train(kl_ctl)
            # Each epoch trains the same micro-batches; every rank joins the sum (a collective).
            counts = torch.tensor([self._trained_samples // max(1, int(getattr(self, "max_epochs", 1))), buffered],
                                  dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                counts = torch.as_tensor(self.strategy.all_reduce(counts, op="sum")).to("cpu", torch.float64)
            trained, buffered = (int(round(x)) for x in counts.tolist())
            status[TRAINED_SAMPLES_KEY] = float(trained)
            status[UNTRAINED_SAMPLES_KEY] = float(buffered - trained)
            if not self.dynamo_loss.modulation.is_identity:
                reduce = None
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    def reduce(t):
                        return self.strategy.all_reduce(t, op="max")
                status.update(reduce_extremes(self._extremes, reduce))
            return status
        finally:
            self._extremes = None

    def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        # The loss weight is popped before OpenRLHF merges info into the logged metrics.
        weight = experience.info.pop(LOSS_WEIGHT_KEY, None)
        if isinstance(weight, (list, tuple)):
            # OpenRLHF's replay buffer collates per-sample 0-d info tensors into a list
            weight = torch.stack([torch.as_tensor(w) for w in weight]) if weight else None
        self._sample_weight = weight
        mask = getattr(experience, "action_mask", None)
        if mask is not None:  # (B, A): B samples reach this micro-batch's loss
            self._trained_samples = getattr(self, "_trained_samples", 0) + int(mask.shape[0])
        step_index = _per_sample(experience.info.pop(STEP_INDEX_KEY, None))
        self._entropy, self._info = None, experience.info
        # OpenRLHF's training_step sums the micro-batch's loss and calls strategy.backward(loss, ...) at once:
        # the strategy's backward is wrapped for this call so that the finished loss is checked before it.
        strategy = self.strategy
        backward = getattr(strategy, "backward", None)
        shadowed = "backward" in vars(strategy)

        def checked_backward(loss, *args, **kwargs):
            # Before the gradient exists: a non-finite loss stops the run with the micro-batch's samples named.
            if not torch.isfinite(loss.detach()).all():
                self._raise_nonfinite_loss(loss, experience, step_index)
            return backward(loss, *args, **kwargs)

        if backward is not None:
            strategy.backward = checked_backward
        try:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        finally:
            if backward is not None:
                if shadowed:
                    strategy.backward = backward
                else:
                    del strategy.backward
            self._entropy, self._info, self._sample_weight, self._loss_inputs = None, None, None, None

    def _raise_nonfinite_loss(self, loss, experience, step_index) -> None:
        B = experience.action_mask.shape[0]
        positions = step_index if step_index is not None else torch.full((B,), -1, dtype=torch.int64)
        try:
            pids = prompt_ids(list(experience.prompts), list(experience.labels))
        except ValueError:
            pids = [0] * B
        log_probs, old, adv, mask = self._loss_inputs or (None, experience.action_log_probs,
                                                          experience.advantages, experience.action_mask)
        raise NonfiniteError(loss_report(loss, log_probs, old, adv, mask, positions, pids))


def _per_sample(value) -> Optional[torch.Tensor]:
    """(B,) int64 of a per-sample ``info`` entry (OpenRLHF's replay buffer may collate it into a list of 0-d
    tensors), or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return torch.stack([torch.as_tensor(v).reshape(()) for v in value]).to("cpu", torch.int64) if value else None
    return torch.as_tensor(value).reshape(-1).to("cpu", torch.int64)


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.detach().float()
    if mask is None:
        return x.mean().reshape(())
    m = mask.to(x.dtype)
    return ((x * m).sum() / m.sum().clamp(min=1.0)).reshape(())


class DynamoPolicyModelActor(_openrlhf_ppo_actor.PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's ``PolicyModelActor`` training with ``DynamoActorPPOTrainer``."""

    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        cpu_backend.apply_if_chosen(strategy.args)
        # this process saves the checkpoints: every file of a save atomic, `latest` last (docs/faults.md)
        checkpoint.install_atomic_checkpoints()
        out = super().init_model_from_pretrained(strategy, *args, **kwargs)
        DynamoActorPPOTrainer.upgrade(self.trainer)
        return out


DynamoPolicyModelActor = ray.remote(num_gpus=1)(DynamoPolicyModelActor)
