"""OpenRLHF 0.11.2's policy actor (``openrlhf/trainer/ray/ppo_actor.py``) with the DynaMO loss.

* ``DynamoActorPPOTrainer(ActorPPOTrainer)``: its ``actor_loss_fn`` is
  :class:`~dynamo_openrlhf.loss.DynaMOPolicyLoss` built from the same OpenRLHF flags as OpenRLHF's
  ``PolicyLoss`` plus ``--dynamo.modulation.*``. The modulation needs the current policy's token
  entropy: OpenRLHF computes it in the actor forward when ``--actor.entropy_coef`` is set (the
  launcher sets 0.0 = computed and logged, no entropy loss, when modulation is on and the flag is
  not given); a forward hook on the actor hands ``output.entropy[:, -A:]`` to the loss. The
  modulation statistics go into the micro-batch's ``info`` as ``dynamo/<stat>``, so OpenRLHF's own
  metric reduction (token-weighted over micro-batches and data-parallel ranks) logs them.
  With the prompt-balanced loss (``--dynamo.loss.prompt_weighting``), each micro-batch carries the
  per-sample weights in ``info["dynamo_loss_weight"]`` (popped before OpenRLHF logs ``info``); they
  multiply the modulated advantages, and the policy term's normaliser only cancels DeepSpeed's 1/gas
  and the data-parallel averaging (:func:`dynamo_openrlhf.loss.balanced_normalizers`).
* ``DynamoPolicyModelActor(PolicyModelActor)``: upgrades the ``ActorPPOTrainer`` that OpenRLHF's
  ``init_model_from_pretrained`` builds to ``DynamoActorPPOTrainer`` and applies the CPU backend in
  its process when chosen.

Importing this module imports OpenRLHF (the import stand-ins are installed first when needed).
"""

from __future__ import annotations

from typing import Dict, Optional

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402
import torch  # noqa: E402
from openrlhf.trainer.ray import ppo_actor as _openrlhf_ppo_actor  # noqa: E402

from dynamo_openrlhf.advantages import LOSS_WEIGHT_KEY, prompt_balancing  # noqa: E402
from dynamo_openrlhf.loss import DynaMOPolicyLoss, balanced_normalizers  # noqa: E402
from dynamo_openrlhf.modulation import ModulationConfig  # noqa: E402

__all__ = ["DynamoActorPPOTrainer", "DynamoPolicyModelActor", "STAT_PREFIX"]

STAT_PREFIX = "dynamo/"


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
            modulation=ModulationConfig.from_args(a),
        )
        self.actor_loss_fn = self._policy_loss
        self.balancing = prompt_balancing(a)
        self._entropy: Optional[torch.Tensor] = None
        self._info: Optional[Dict] = None
        self._sample_weight: Optional[torch.Tensor] = None
        if not self.dynamo_loss.modulation.is_identity:
            if a.actor.entropy_coef is None:
                raise ValueError("DynaMO modulation needs the token entropy: set --actor.entropy_coef (0 = compute "
                                 "and log it without an entropy loss)")
            self.actor.register_forward_hook(self._keep_entropy)

    def _keep_entropy(self, module, inputs, output) -> None:
        if isinstance(output, tuple) and len(output) == 2:
            self._entropy = getattr(output[1], "entropy", None)

    def _policy_loss(self, log_probs, old_log_probs, advantages, action_mask=None, **kwargs):
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
            kwargs.update(balanced_normalizers(kwargs.get("dp_size", 1), self.strategy.accumulated_gradient))
        out = self.dynamo_loss(log_probs, old_log_probs, advantages, action_mask=action_mask, entropy=entropy,
                               sample_weight=weight, **kwargs)
        stats = self.dynamo_loss.last_modulation_stats
        if stats and self._info is not None:
            for k, v in stats.items():
                self._info[STAT_PREFIX + k] = v.detach().reshape(())
        return out

    def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        # The loss weight is popped before OpenRLHF merges info into the logged metrics.
        weight = experience.info.pop(LOSS_WEIGHT_KEY, None)
        if isinstance(weight, (list, tuple)):
            # OpenRLHF's replay buffer collates per-sample 0-d info tensors into a list
            weight = torch.stack([torch.as_tensor(w) for w in weight]) if weight else None
        self._sample_weight = weight
        self._entropy, self._info = None, experience.info
        try:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        finally:
            self._entropy, self._info, self._sample_weight = None, None, None


class DynamoPolicyModelActor(_openrlhf_ppo_actor.PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's ``PolicyModelActor`` training with ``DynamoActorPPOTrainer``."""

    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        cpu_backend.apply_if_chosen(strategy.args)
        out = super().init_model_from_pretrained(strategy, *args, **kwargs)
        DynamoActorPPOTrainer.upgrade(self.trainer)
        return out


DynamoPolicyModelActor = ray.remote(num_gpus=1)(DynamoPolicyModelActor)
