"""Per-rollout proxies q of the squared score norm ‖∇ Σ_t log π(y_t)‖², from the per-token log-probs alone.

The allocator's per-prompt noise scale (``--dynamo.allocation.noise_scale``, docs/allocation_objectives.md,
"Per-prompt noise scale") needs, per rollout, a cheap number that grows with its score's squared norm. The
ones computable from what OpenRLHF's experience maker already has (``Experience.action_log_probs`` of the
policy being trained, from the actor's forward in ``make_experience``, and ``Experience.action_mask``; no
extra forward) are:

* ``"nll"``: the mean response NLL, −(1/T) Σ_t log π_t(y_t) (nats per token; T = max(response tokens, 1));
* ``"pisq"``: Σ_t (1 − π_t(y_t))², π_t(y_t) = exp(log π_t(y_t)) (the part of ‖e_y − π‖² the sampled
  token's probability gives; unitless, grows with the length);
* ``"length"``: T, the number of response tokens (EOS included when the mask includes it).

These are the formulas of ``benchmarks/_noise_model.py`` (``PROXY_DESC``), where they are measured against
the true per-sample score norms. NumPy only (torch tensors are accepted and read as float64), so
:mod:`dynamo_openrlhf.allocation` stays torch-free.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["NOISE_PROXIES", "noise_proxy"]

#: The proxies the trainer computes (``--dynamo.allocation.noise_scale`` choices besides ``off``).
NOISE_PROXIES: Tuple[str, ...] = ("nll", "pisq", "length")


def _float64(x, what: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"noise_proxy: {what} is None")
    if hasattr(x, "detach"):  # a torch tensor (any dtype or device, bf16 included)
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def noise_proxy(name: str, action_log_probs, action_mask) -> np.ndarray:
    """Per-sample noise proxy ``name`` (one of :data:`NOISE_PROXIES`), float64 of shape (S,).

    ``action_log_probs``: (S, T) log π(y_t) of each sample's action tokens (nats); ``action_mask``: (S, T),
    nonzero on the response tokens (bool or 0/1). Positions outside the mask are ignored, whatever they hold.
    A log-prob above 0 (the forward's rounding) counts as 0, so every proxy is >= 0, as the pool requires.
    Raises ValueError for an unknown name, shapes that are not two equal (S, T), or a non-finite log-prob on a
    response token."""
    if name not in NOISE_PROXIES:
        raise ValueError(f"noise_proxy: unknown proxy {name!r}; expected one of {list(NOISE_PROXIES)}")
    logp = _float64(action_log_probs, "action_log_probs")
    mask = _float64(action_mask, "action_mask") != 0
    if logp.ndim != 2 or logp.shape != mask.shape:
        raise ValueError(f"noise_proxy: action_log_probs {logp.shape} and action_mask {mask.shape} must both be "
                         "(samples, action tokens)")
    on = np.where(mask, logp, 0.0)
    bad = ~np.isfinite(on)
    if bad.any():
        s, t = np.argwhere(bad)[0]
        raise ValueError(f"noise_proxy {name}: action_log_probs[{s}, {t}] is {logp[s, t]} on a response token")
    on = np.minimum(on, 0.0)
    tokens = mask.sum(axis=1).astype(np.float64)
    if name == "length":
        return tokens
    if name == "nll":
        return -on.sum(axis=1) / np.maximum(tokens, 1.0)
    return np.where(mask, (1.0 - np.exp(on)) ** 2, 0.0).sum(axis=1)  # pisq
