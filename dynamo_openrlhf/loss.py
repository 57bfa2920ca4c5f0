"""DynaMO policy loss: OpenRLHF 0.11.2's ``PolicyLoss`` with token-level advantage modulation.

Named after ``openrlhf/models/loss.py``, which it extends. ``DynaMOPolicyLoss`` has the parent's
constructor (plus the keyword-only ``modulation``) and the parent's ``forward`` signature and five
return values ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` (plus the keyword-only
``entropy``). With modulation ``"off"``, or when ``entropy`` is not given, ``forward`` *is* the
parent's (it calls ``super().forward`` with the same arguments). Otherwise it replaces the
advantages by :func:`dynamo_openrlhf.modulation.modulate_advantages` (factors detached, clip bounds
= the loss's own ``clip_eps_low``/``clip_eps_high``) and calls ``super().forward`` with them, so dual
clip, token/sequence-level aggregation, the train/rollout IS correction etc. all keep working.

On machines without CUDA, ``openrlhf.models`` only imports after
``dynamo_openrlhf.cpu_backend.install_import_stand_ins()``; this module does not call it for you.

The import fails fast (``ImportError``) unless the installed openrlhf is exactly 0.11.2 and its
``PolicyLoss.__init__``/``forward`` have the signatures extended here.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Dict, Optional, Union

import torch

from dynamo_openrlhf.modulation import ModulationConfig, _modulate_checked
from dynamo_openrlhf.version_check import EXPECTED_OPENRLHF, installed_openrlhf_version

__all__ = ["DynaMOPolicyLoss", "EXPECTED_OPENRLHF_VERSION", "balanced_normalizers"]

# One place for the pinned version: the launcher's check (dynamo_openrlhf.version_check).
EXPECTED_OPENRLHF_VERSION = EXPECTED_OPENRLHF

_EMPTY = inspect.Parameter.empty
# (name, default) of the parent's parameters, as in openrlhf 0.11.2's models/loss.py.
_EXPECTED_INIT = (
    ("self", _EMPTY),
    ("clip_eps_low", 0.2),
    ("clip_eps_high", 0.2),
    ("dual_clip", None),
    ("token_level_loss", True),
    ("policy_loss_type", "ppo"),
    ("is_correction_level", "off"),
    ("is_correction_mode", "mask"),
    ("is_correction_gating", "ratio"),
    ("is_correction_threshold", (0.5, 5.0)),
)
_EXPECTED_FORWARD = (
    ("self", _EMPTY),
    ("log_probs", _EMPTY),
    ("old_log_probs", _EMPTY),
    ("advantages", _EMPTY),
    ("action_mask", None),
    ("rollout_log_probs", None),
    ("dp_size", 1),
    ("batch_num_tokens", None),
    ("global_batch_size", None),
)


def _load_parent():
    version = installed_openrlhf_version()
    if version is None:
        raise ImportError(
            f"dynamo_openrlhf.loss extends openrlhf {EXPECTED_OPENRLHF_VERSION}'s PolicyLoss, but openrlhf is not "
            f"installed (pip install --no-deps openrlhf=={EXPECTED_OPENRLHF_VERSION}, see the README)"
        )
    if version != EXPECTED_OPENRLHF_VERSION:
        raise ImportError(
            f"dynamo_openrlhf.loss extends openrlhf {EXPECTED_OPENRLHF_VERSION}'s PolicyLoss; "
            f"found openrlhf {version}"
        )
    try:
        import openrlhf.models.loss as parent_module
    except ImportError as exc:
        hint = ""
        if getattr(exc, "name", None) in ("flash_attn", "vllm") or "flash_attn" in str(exc):
            hint = (
                " — without CUDA, call dynamo_openrlhf.cpu_backend.install_import_stand_ins() "
                "before importing dynamo_openrlhf.loss"
            )
        raise ImportError(f"cannot import openrlhf.models.loss (openrlhf {version}): {exc}{hint}") from exc
    parent = getattr(parent_module, "PolicyLoss", None)
    if parent is None:
        raise ImportError(f"openrlhf {version}: openrlhf.models.loss.PolicyLoss is missing")
    for method, expected in (("__init__", _EXPECTED_INIT), ("forward", _EXPECTED_FORWARD)):
        params = tuple((p.name, p.default) for p in inspect.signature(getattr(parent, method)).parameters.values())
        if params != expected:
            raise ImportError(
                f"openrlhf.models.loss.PolicyLoss.{method} has signature {params}; dynamo_openrlhf.loss "
                f"extends the one of openrlhf {EXPECTED_OPENRLHF_VERSION}: {expected}"
            )
    return parent


PolicyLoss = _load_parent()


def _parent_dtype(*tensors) -> torch.dtype:
    """The floating dtype of PolicyLoss's per-token products with these inputs."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def balanced_normalizers(dp_size: int, gradient_accumulation: int) -> Dict[str, float]:
    """The parent ``forward``'s normaliser kwargs for the prompt-balanced loss.

    OpenRLHF's ``aggregate_loss`` returns ``masked_sum / batch_num_tokens * dp_size`` (token-mean) or
    ``sum of sequence token-means / global_batch_size * dp_size`` (seq-mean-token-mean); DeepSpeed then
    scales every backward by 1/gas and averages gradients over the dp_size data-parallel ranks. With
    ``batch_num_tokens = global_batch_size = 1/gas`` these cancel exactly: the gradient of one
    optimizer step is the plain sum, over its micro-batches and ranks, of the (weighted) per-token
    losses (token-mean) or per-sequence token means (seq-mean-token-mean) — no random token count.
    ``gradient_accumulation``: the gas DeepSpeed divides each backward by, which is 1 under OpenRLHF's
    ``--train.dynamic_batch_enable`` (a variable number of token-budget micro-batches per optimizer step,
    each backward unscaled), whatever the strategy's ``accumulated_gradient`` says."""
    gas = int(gradient_accumulation)
    if gas < 1 or int(dp_size) < 1:
        raise ValueError(f"need dp_size >= 1 and gradient accumulation >= 1, got {dp_size}, {gradient_accumulation}")
    return {"dp_size": int(dp_size), "batch_num_tokens": 1.0 / gas, "global_batch_size": 1.0 / gas}


class DynaMOPolicyLoss(PolicyLoss):
    """OpenRLHF's ``PolicyLoss`` + DynaMO token-level advantage modulation (docs/reference_notes.md, token level).

    ``modulation``: a :class:`~dynamo_openrlhf.modulation.ModulationConfig` or a preset name
    (``"decay6"``, ``"decay5"``, ``"off"``). Clip-higher is the parent's own ``clip_eps_high``
    argument (e.g. 0.28 as in the reference runs); it is never changed implicitly. Modulation needs
    the token-level PPO ratio, so it is refused with ``policy_loss_type="gspo"``.

    ``action_mask`` must be 0/1 (bool, integer or float), as OpenRLHF's is. With an integer or bool
    mask and float32 inputs, the modulated call hands the parent the 0/1 float32 copy of the mask
    that the modulation builds anyway; that spares the parent a dtype conversion in each of its
    masked products (~15% of its CPU time) and gives bit-for-bit the same outputs and gradients.

    After each modulated ``forward``, ``last_modulation_stats`` holds the statistics dict of
    :func:`~dynamo_openrlhf.modulation.modulate_advantages` (0-d float32 tensors; empty with
    ``modulation_stats=False``, which skips their ~15% share of the modulation work); it is
    ``None`` after a call that did not modulate.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
        *,
        modulation: Union[ModulationConfig, str, None] = "off",
        modulation_stats: bool = True,
    ) -> None:
        super().__init__(
            clip_eps_low=clip_eps_low,
            clip_eps_high=clip_eps_high,
            dual_clip=dual_clip,
            token_level_loss=token_level_loss,
            policy_loss_type=policy_loss_type,
            is_correction_level=is_correction_level,
            is_correction_mode=is_correction_mode,
            is_correction_gating=is_correction_gating,
            is_correction_threshold=is_correction_threshold,
        )
        self.modulation = ModulationConfig.coerce(modulation, argument="modulation")
        if not self.modulation.is_identity and policy_loss_type != "ppo":
            raise ValueError(
                f"modulation {self.modulation.name!r} needs the token-level ratio of policy_loss_type='ppo', "
                f"got policy_loss_type={policy_loss_type!r} (use modulation='off')"
            )
        self.modulation_stats = bool(modulation_stats)
        self.last_modulation_stats: Optional[Dict[str, torch.Tensor]] = None
        self._warned_no_entropy = False

    def extra_repr(self) -> str:
        m = self.modulation
        return (
            f"modulation={m.name}(mu_max={m.mu_max:g}, lambda_min={m.lambda_min:g}, gamma={m.gamma:g}, "
            f"tau={m.tau:g}), clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high}"
        )

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
        *,
        entropy: Optional[torch.Tensor] = None,
        sample_weight: Optional[torch.Tensor] = None,
    ):
        """The parent's ``forward``; ``entropy`` (batch, response_len) is the current policy's token
        entropy, aligned with ``log_probs`` (in OpenRLHF's actor:
        ``output.entropy[:, -action_mask.shape[1]:]``). Returns the parent's five values.

        ``sample_weight`` (batch,), positive: the prompt-balanced loss's per-sample weight. It multiplies
        the advantages AFTER the modulation (whose factors are normalised by micro-batch maxima of
        unweighted quantities) and before the parent's PPO clipping, dual clip and aggregation, which
        are positively homogeneous in the advantages, so the per-token loss is exactly weight × the
        unweighted loss. Pair it with :func:`balanced_normalizers` for the parent's normaliser."""
        if not self.modulation.is_identity and entropy is not None:
            # Integer/bool masks: the modulation builds the same mask as 0/1 floats anyway; handing
            # that to the parent spares it a dtype conversion in each of its masked products (its
            # outputs and gradients are bit-for-bit those it computes from the original mask, as
            # masks are 0/1 and every use is a product or a sum — see the tests).
            keep = action_mask is not None and not action_mask.is_floating_point()
            advantages, stats, float_mask = _modulate_checked(
                advantages,
                log_probs,
                old_log_probs,
                entropy,
                action_mask,
                self.clip_eps_low,
                self.clip_eps_high,
                self.modulation,
                self.modulation_stats,
                keep,
            )
            # ... only when no product changes dtype: the parent multiplies the mask with float32
            # tensors (x.float()) and with its per-token loss (float32 or float64 here).
            if (
                float_mask is not None
                and float_mask.dtype == torch.float32
                and _parent_dtype(log_probs, old_log_probs, advantages, rollout_log_probs)
                in (torch.float32, torch.float64)
            ):
                action_mask = float_mask
            self.last_modulation_stats = stats
        else:
            if entropy is None and not self.modulation.is_identity and not self._warned_no_entropy:
                self._warned_no_entropy = True
                warnings.warn(
                    f"DynaMOPolicyLoss(modulation={self.modulation.name!r}) called without entropy=...: "
                    "advantages are NOT modulated (plain PolicyLoss); the actor must request token entropy "
                    "(return_entropy=True) and pass it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.last_modulation_stats = None
        if sample_weight is not None:
            if sample_weight.dim() != 1 or sample_weight.shape[0] != advantages.shape[0]:
                raise ValueError(f"sample_weight must have shape ({advantages.shape[0]},) (one weight per sample), "
                                 f"got {tuple(sample_weight.shape)}")
            w = sample_weight.to(device=advantages.device, dtype=advantages.dtype)
            advantages = advantages * w.reshape((-1,) + (1,) * (advantages.dim() - 1))
        return super().forward(
            log_probs,
            old_log_probs,
            advantages,
            action_mask=action_mask,
            rollout_log_probs=rollout_log_probs,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
        )
