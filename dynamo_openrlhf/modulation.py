"""Token-level gradient-aware advantage modulation (DynaMO, arXiv 2602.19208; docs/reference_notes.md, token level).

Pure torch, no OpenRLHF import. For every response token t of sequence i, with advantage ``A``,
ratio ``r = exp(clamp(logπ − logπ_old, −20, 20))`` (the clamp is the one OpenRLHF's PPO loss
applies to the same ratio), current-policy token entropy ``H`` and clip bounds ``ε_low``/``ε_high``::

    compensation   β_comp = 1 + (μ_max − 1)·(H_max − H)/(H_max − H_min + 1e-8)   if A > 0, else 1
                   (H_max, H_min over the valid tokens of the whole micro-batch)
    stabilisation  I_clip = [A > 0 ∧ r ≤ 1 + ε_high] + [A < 0 ∧ r ≥ 1 − ε_low]
                   ξ      = I_clip · r · A
                   ΔH     = −ξ · (π·(logπ + H) − mean_seq[π·(logπ + H)])     (π = exp(logπ);
                            mean over the valid tokens of that sequence)
                   Ξ      = |ΔH| on valid tokens, 0 on padding
                   x      = Ξ / (max Ξ + 1e-8)
                   β_stab = λ_min + (1 − λ_min) / (1 + exp(γ·(x − τ)))
    result         A_final = A · β_comp · β_stab

All factors are computed under ``torch.no_grad`` from detached inputs: they are constants for
autograd, gradients flow only through the PPO ratio of the loss that consumes ``A_final``.

Conventions (documented contract):

* ``action_mask``: bool, integer or floating tensor; a token is *valid* iff its mask value is
  non-zero (``None`` means every token is valid). Padding never influences H_max, H_min, the
  per-sequence mean or max Ξ, and both factors are exactly 1 on padding, so ``A_final == A``
  there. Padded positions must hold finite numbers (as OpenRLHF's own loss requires: it multiplies
  the per-token loss by the mask); their values do not matter otherwise (the valid outputs and the
  statistics are bit-for-bit the same whatever they are).
* No NaN when all entropies are equal (β_comp = 1), when no advantage is positive, when a sequence
  has no valid token (its mean is taken as 0), or when the mask is all zero (A is returned with
  factors 1 and the statistics below report the neutral values 1 / 0).
* Arithmetic runs in ``promote_types(float32, dtypes of the four float inputs)``; the result has
  ``advantages.dtype``.
* Statistics are 0-d detached float32 tensors on the input's device (no host sync, so cheap on GPU;
  call ``float(v)`` to log them): ``beta_comp_mean/min/max``, ``beta_stab_mean/min/max`` over the
  valid tokens and ``beta_stab_damped_frac`` = fraction of valid tokens with β_stab < 0.9.

Numerics and implementation (see the comments in ``_modulate``): on CPU, PyTorch's boolean
kernels (``where``, ``masked_fill``, comparisons into bool) cost 5–20× a float kernel and every
fresh full-size buffer costs page faults, so masks are 0/1 float multipliers, every branch is
arithmetic, and three full-size work tensors exist (one becomes the result); all updates are in
place. ``π``, ``r`` and the sigmoid's exponential are evaluated as ``exp2(x·log2 e)`` (≈3× cheaper
than ``exp`` on CPU; ≤ 1e-6 relative error in float32, ~1e-15 in float64), so a token within
~1e-7 of a clip bound may be classified either way. Log-probs are clamped to ≤ 0 before ``π`` is
taken (true log-probs are ≤ 0; this only keeps garbage on padded positions from overflowing).
H_max/H_min, the sequence means, max Ξ and every masked statistic are exact masked reductions (no
sentinel values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "DAMPED_THRESHOLD",
    "PRESETS",
    "STAT_KEYS",
    "ModulationConfig",
    "modulate_advantages",
]

#: β_stab below this value counts as "damped" in the ``beta_stab_damped_frac`` statistic.
DAMPED_THRESHOLD = 0.9

#: Keys of the statistics dict returned by :func:`modulate_advantages`.
STAT_KEYS = (
    "beta_comp_mean",
    "beta_comp_min",
    "beta_comp_max",
    "beta_stab_mean",
    "beta_stab_min",
    "beta_stab_max",
    "beta_stab_damped_frac",
)

#: Reference presets (docs/reference_notes.md, token level). ``decay5`` is the α = 0.4 instance of
#: ``ModulationConfig.from_alpha``: μ_max = 1 + α, λ_min = 1 − α, γ = 50, τ = 0.9.
PRESETS: Mapping[str, Mapping[str, float]] = {
    "decay6": {"mu_max": 1.2, "lambda_min": 0.6, "gamma": 50.0, "tau": 0.99},
    "decay5": {"mu_max": 1.4, "lambda_min": 0.6, "gamma": 50.0, "tau": 0.9},
    # Identity: β_comp ≡ 1 (μ_max = 1) and β_stab ≡ 1 (λ_min = 1); nothing is computed.
    "off": {"mu_max": 1.0, "lambda_min": 1.0, "gamma": 50.0, "tau": 0.99},
}


def _check_number(owner: str, name: str, value, *, lo=None, hi=None, lo_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}{name} must be finite, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{owner}{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{owner}{name} must be <= {hi}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModulationConfig:
    """Hyper-parameters of the token-level modulation.

    ``mu_max`` ≥ 1 (1 disables compensation), ``0 ≤ lambda_min ≤ 1`` (1 disables stabilisation),
    ``gamma`` > 0 (steepness of the damping sigmoid), ``0 ≤ tau ≤ 1`` (its centre on the
    normalised scale x ∈ [0, 1]). ``name`` is a label for logs and does not take part in ``==``.
    """

    mu_max: float
    lambda_min: float
    gamma: float
    tau: float
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        o = "ModulationConfig."
        object.__setattr__(self, "mu_max", _check_number(o, "mu_max", self.mu_max, lo=1.0))
        object.__setattr__(self, "lambda_min", _check_number(o, "lambda_min", self.lambda_min, lo=0.0, hi=1.0))
        object.__setattr__(self, "gamma", _check_number(o, "gamma", self.gamma, lo=0.0, lo_open=True))
        object.__setattr__(self, "tau", _check_number(o, "tau", self.tau, lo=0.0, hi=1.0))
        if not isinstance(self.name, str):
            raise ValueError(f"ModulationConfig.name must be a str, got {self.name!r}")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModulationConfig":
        """One of :data:`PRESETS`: ``"decay6"``, ``"decay5"`` or ``"off"``."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown modulation preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name], name=name)

    @classmethod
    def from_alpha(cls, alpha: float, *, gamma: float = 50.0, tau: float = 0.9) -> "ModulationConfig":
        """The reference's one-knob family: μ_max = 1 + α, λ_min = 1 − α (``decay5`` is α = 0.4)."""
        alpha = _check_number("", "alpha", alpha, lo=0.0, hi=1.0)
        return cls(mu_max=1.0 + alpha, lambda_min=1.0 - alpha, gamma=gamma, tau=tau, name=f"alpha={alpha:g}")

    @classmethod
    def from_args(cls, args) -> "ModulationConfig":
        """The run's config from OpenRLHF's nested args: ``--dynamo.modulation.preset`` with any of
        ``--dynamo.modulation.mu_max/lambda_min/gamma/tau`` overriding it (then named
        ``"<preset>+custom"``). Raises ValueError for out-of-range values."""
        m = args.dynamo.modulation
        config = cls.preset(m.preset)
        over = {k: getattr(m, k) for k in ("mu_max", "lambda_min", "gamma", "tau") if getattr(m, k) is not None}
        if over:
            config = replace(config, name=f"{m.preset}+custom", **over)
        return config

    @classmethod
    def coerce(cls, value: Union["ModulationConfig", str, None], *, argument: str = "config") -> "ModulationConfig":
        """Accept a config, a preset name, or ``None`` (= ``"off"``)."""
        if value is None:
            return cls.preset("off")
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"{argument}: unknown modulation preset {value!r}; expected one of {sorted(PRESETS)}")
            return cls.preset(value)
        raise ValueError(f"{argument} must be a ModulationConfig or a preset name, got {type(value).__name__}")

    # -- properties ---------------------------------------------------------------------------
    @property
    def compensation_enabled(self) -> bool:
        return self.mu_max != 1.0

    @property
    def stabilisation_enabled(self) -> bool:
        return self.lambda_min != 1.0

    @property
    def is_identity(self) -> bool:
        """True when both factors are identically 1 (``"off"``)."""
        return not (self.compensation_enabled or self.stabilisation_enabled)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _validate(advantages, log_probs, old_log_probs, entropy, action_mask, clip_low, clip_high):
    named = (
        ("advantages", advantages),
        ("log_probs", log_probs),
        ("old_log_probs", old_log_probs),
        ("entropy", entropy),
    )
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be 2-D (batch, response_len), got shape {tuple(advantages.shape)}")
    shape, device = advantages.shape, advantages.device
    for name, t in named[1:]:
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of advantages {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, advantages on {device}")
    if action_mask is not None:
        if not isinstance(action_mask, torch.Tensor):
            raise ValueError(f"action_mask must be a torch.Tensor or None, got {type(action_mask).__name__}")
        if action_mask.is_complex():
            raise ValueError(f"action_mask must be bool, integer or floating, got {action_mask.dtype}")
        if action_mask.shape != shape:
            raise ValueError(
                f"action_mask must have the shape of advantages {tuple(shape)}, got {tuple(action_mask.shape)}"
            )
        if action_mask.device != device:
            raise ValueError(f"action_mask is on {action_mask.device}, advantages on {device}")
    clip_low = _check_number("", "clip_low", clip_low, lo=0.0)
    clip_high = _check_number("", "clip_high", clip_high, lo=0.0)
    return clip_low, clip_high


def _neutral_stats(device) -> Dict[str, torch.Tensor]:
    """The statistics of an identity modulation: factors 1, nothing damped."""
    vals = torch.ones(len(STAT_KEYS), dtype=torch.float32, device=device)
    vals[STAT_KEYS.index("beta_stab_damped_frac")] = 0.0
    return dict(zip(STAT_KEYS, vals.unbind(0)))


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def modulate_advantages(
    advantages: torch.Tensor,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    entropy: torch.Tensor,
    action_mask: Optional[torch.Tensor] = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    config: Union[ModulationConfig, str],
    with_stats: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Return ``(A · β_comp · β_stab, stats)`` for (batch, response_len) inputs.

    ``clip_low``/``clip_high`` are the PPO bounds ε_low/ε_high of the loss that will consume the
    result (pass the same values; clip-higher is ε_high > ε_low and is never implied).
    ``config`` is a :class:`ModulationConfig` or a preset name. With an identity config
    (``"off"``) ``advantages`` itself is returned, untouched. The factors are detached constants.
    ``with_stats=False`` skips the seven reductions behind the statistics (~15% of the work) and
    returns an empty dict. See the module docstring for the formulas, masking rules and statistics.
    """
    out, stats, _ = _modulate_checked(
        advantages, log_probs, old_log_probs, entropy, action_mask, clip_low, clip_high, config, with_stats, False
    )
    return out, stats


def _modulate_checked(
    advantages, log_probs, old_log_probs, entropy, action_mask, clip_low, clip_high, config, with_stats, keep_mask
):
    """modulate_advantages, plus (``keep_mask=True``) the 0/1 float mask it built, or None."""
    config = ModulationConfig.coerce(config, argument="config")
    clip_low, clip_high = _validate(advantages, log_probs, old_log_probs, entropy, action_mask, clip_low, clip_high)
    if config.is_identity:
        return advantages, (_neutral_stats(advantages.device) if with_stats else {}), None
    if advantages.numel() == 0:
        return advantages.detach().clone(), (_neutral_stats(advantages.device) if with_stats else {}), None
    with torch.no_grad():
        return _modulate(
            advantages,
            log_probs,
            old_log_probs,
            entropy,
            action_mask,
            clip_low,
            clip_high,
            config,
            bool(with_stats),
            bool(keep_mask),
        )


_LOG2E = 1.4426950408889634  # exp(x) = exp2(x·log2 e): exp2 is ~3× cheaper than exp on CPU


def _modulate(
    advantages, log_probs, old_log_probs, entropy, action_mask, clip_low, clip_high, cfg, with_stats, keep_mask
):
    # Memory plan: three full-size tensors of the compute dtype — the 0/1 mask m and two work
    # buffers g and b1, g ending up as the result — plus a ¼-size bool copy of an integer mask
    # (and a fourth full-size buffer for [A > 0] when the caller keeps m); everything is updated
    # in place. On CPU each fresh full-size buffer tends to cost page faults
    # worth several passes, and boolean kernels (where, masked_fill, comparisons into bool) cost
    # 5-20× a float pass, so the mask is a 0/1 float multiplier and every branch is arithmetic.
    cd = torch.promote_types(torch.float32, advantages.dtype)
    for t in (log_probs, old_log_probs, entropy):
        cd = torch.promote_types(cd, t.dtype)
    A = advantages.detach().to(cd)
    lp = log_probs.detach().to(cd)
    H = entropy.detach().to(cd)
    shape, device = A.shape, A.device

    # ---- validity as 0/1 floats (mixed-dtype kernels would copy a uint8/bool mask on every use) ----
    m = torch.empty(shape, dtype=cd, device=device)
    if action_mask is None:
        m.fill_(1.0)
    elif action_mask.dtype == torch.bool:
        torch.ne(action_mask.view(torch.uint8), 0, out=m)  # bool kernels are slow on CPU; u8 is not
    elif action_mask.is_floating_point():
        torch.ne(action_mask, 0, out=m)
    else:  # integer masks (OpenRLHF's are int64): .bool() (nonzero test) has a fast conversion kernel
        torch.ne(action_mask.to(torch.bool).view(torch.uint8), 0, out=m)
    cnt = m.sum(dim=-1, keepdim=True)  # valid tokens per sequence
    n_valid = cnt.sum()

    # Reductions behind the statistics (combined in _finish_stats with a handful of scalar ops).
    zero = torch.zeros((), dtype=cd, device=device)
    e_sum = e_max = sig_max = damped = zero
    q_max = torch.ones((), dtype=cd, device=device)
    q_sum = n_valid  # neutral: mean β_stab = 1
    out: Optional[torch.Tensor] = None
    b1: Optional[torch.Tensor] = None

    # ================================ stabilisation β_stab ===================================
    if cfg.stabilisation_enabled:
        old = old_log_probs.detach().to(cd)
        # π = exp(logπ) computed as exp2(logπ·log2 e) (3× cheaper on CPU, ≤ 1e-6 relative in
        # float32); log-probs are ≤ 0, the clamp only keeps garbage on padding from overflowing.
        g = torch.mul(lp, _LOG2E).clamp_(max=0.0).exp2_()
        b1 = torch.add(lp, H)
        g.mul_(b1).mul_(m)  # g = π·(logπ + H) on valid tokens, 0 on padding
        # centre by the per-sequence mean over valid tokens (no valid token: mean 0); padding stays 0
        mean = g.sum(dim=-1, keepdim=True).div_(cnt.clamp(min=1.0))
        g.addcmul_(m, mean, value=-1.0)
        # r = exp(clamp(logπ − logπ_old, −20, 20))   (the clamp of OpenRLHF's PPO ratio)
        r = torch.sub(lp, old, out=b1).clamp_(-20.0, 20.0).mul_(_LOG2E).exp2_()
        g.mul_(r).mul_(A)  # −ΔH before I_clip: r·A·(g − mean_seq g)
        # I_clip in place, without bool kernels: with c = 1 + (ε_high − ε_low)/2, h = (ε_low + ε_high)/2,
        # softshrink(r − c, h) = r − clamp(r, 1 − ε_low, 1 + ε_high), so the token is clipped
        # (A>0 ∧ r > 1+ε_high, or A<0 ∧ r < 1−ε_low) iff that times A is > 0. A = 0 gives ξ = 0 anyway.
        half = 0.5 * (clip_low + clip_high)
        f = torch.ops.aten.softshrink.out(r.sub_(1.0 + 0.5 * (clip_high - clip_low)), half, out=r)
        keep = torch.le(f.mul_(A), 0.0, out=f)  # I_clip where A ≠ 0
        big_xi = g.mul_(keep).abs_()  # Ξ = |ΔH| (its sign is irrelevant), 0 on padding
        del r, f, keep
        xi_max = big_xi.amax()
        # β_stab = λ + (1−λ)/(1+e^{γ(x−τ)}) = 1 − (1−λ)/E  with  E = 1 + e^{−γ(x−τ)} ∈ (1, ∞],
        # x = Ξ/(max Ξ + 1e-8); the exponential is an exp2 again (E = ∞ gives β_stab = 1 exactly).
        scale = cfg.gamma / (xi_max + 1e-8)
        E = big_xi.mul_(scale * -_LOG2E).add_(cfg.gamma * cfg.tau * _LOG2E).exp2_()
        # Padding has Ξ = 0, i.e. β_stab = 1 − (1−λ)σ(−γτ). It must be exactly 1 there: send E to ∞
        # on padding (e^{γτ}/0; e^{γτ} ≥ 1, so never 0/0), unless (1−λ)σ(−γτ) is below the float
        # resolution at 1 anyway (both presets: ~1e-22), which saves the pass.
        if (1.0 - cfg.lambda_min) / (1.0 + math.exp(min(cfg.gamma * cfg.tau, 700.0))) >= torch.finfo(cd).eps / 8:
            E.div_(m)
        E.add_(1.0)
        if with_stats:
            # β_stab decreases with Ξ: its min over valid tokens is at max Ξ (same ops on the scalar).
            sig_max = (xi_max * scale).sub_(cfg.gamma * cfg.tau).sigmoid_()
            # q = β_stab on valid tokens and 0 on padding (β_stab ≥ λ_min ≥ 0): its sum and max are
            # those of the valid tokens; q < 0.9 counts the damped valid tokens plus every padded one.
            q = torch.addcdiv(m, m, E, value=-(1.0 - cfg.lambda_min), out=b1)
            q_sum, q_max = q.sum(), q.amax()
            damped = torch.lt(q, DAMPED_THRESHOLD, out=q).sum().sub_(float(m.numel())).add_(n_valid)  # − padding
            del q
        # A·β_stab = A − (1−λ)·A/E  (exactly A on padding)
        out = torch.addcdiv(A, A, E, value=-(1.0 - cfg.lambda_min), out=E)
        del E, big_xi, g

    # ================================ compensation β_comp ====================================
    if cfg.compensation_enabled:
        # Entropies relative to one valid token's (the first valid token of the fullest sequence):
        # hs = (H − H_ref)·m is 0 on padding and 0 is also a valid value, so min/max of hs over
        # all tokens are its min/max over valid tokens — one pass, padding cannot interfere.
        row = torch.argmax(cnt.view(-1))
        h_ref = H[row, torch.argmax(m[row])]
        hs = torch.sub(H, h_ref, out=b1).mul_(m)  # b1 = None allocates
        hs_min, hs_max = torch.aminmax(hs)  # H_min − H_ref, H_max − H_ref
        c = (cfg.mu_max - 1.0) / (hs_max - hs_min + 1e-8)  # β_comp = 1 + c·(H_max − H) where A > 0
        hs.addcmul_(m, hs_max, value=-1.0)  # (H − H_max)·valid
        # [A > 0] as 0/1 floats, in m's storage unless the caller keeps m
        pos = torch.gt(A, 0.0, out=torch.empty_like(m) if keep_mask else m)
        # e = β_comp − 1 = −c·(H − H_max)·valid·[A > 0]  (≥ 0; exactly 0 on padding and where A ≤ 0)
        e = hs.mul_(pos).mul_(-c)
        del hs, pos
        # Max of β_comp = 1 + max e. Its min over valid tokens is exactly 1 (the valid token holding
        # H_max has e = 0 and every e ≥ 0): no reduction needed.
        if with_stats:
            e_max, e_sum = e.amax(), e.sum()
        if out is None:
            out = torch.addcmul(A, e, A, out=e)  # A·(1 + e)
        else:
            out.addcmul_(e, out)  # A·β_stab·(1 + e)
        del e
    del b1

    if out.dtype != advantages.dtype:
        out = out.to(advantages.dtype)
    kept = m if keep_mask else None
    if not with_stats:
        return out, {}, kept
    return out, _finish_stats(e_sum, e_max, q_sum, sig_max, q_max, damped, n_valid, 1.0 - cfg.lambda_min), kept


def _finish_stats(e_sum, e_max, q_sum, sig_max, q_max, damped, n_valid, one_minus_lambda):
    """The seven statistics (order of STAT_KEYS) from the raw reductions, with a few scalar ops
    (0-d tensors only: no host sync, no host-to-device copy):

    β_comp mean/min/max = 1 + Σe/n, 1, 1 + max e;  β_stab mean/min/max = Σq/n, 1 − (1−λ)·σ_max,
    max q;  damped fraction = #(β_stab < 0.9)/n. A disabled factor has neutral reductions (e = 0;
    Σq = n, q_max = 1, σ_max = 0), hence neutral statistics; n = 0 gives 1 (0 for the fraction).
    """
    inv_n = n_valid.clamp(min=1.0).reciprocal()
    vals = torch.stack(
        [
            e_sum * inv_n + 1.0,
            torch.ones_like(e_sum),
            e_max + 1.0,
            q_sum * inv_n,
            sig_max * -one_minus_lambda + 1.0,
            q_max,
        ]
    )
    vals = torch.cat([torch.where(n_valid > 0, vals, 1.0), (damped * inv_n).unsqueeze(0)])
    return dict(zip(STAT_KEYS, vals.to(torch.float32).unbind(0)))
