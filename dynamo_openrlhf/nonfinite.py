"""Non-finite values in a training step: checks (pure functions), reports and the one error they raise.

A reward function that returns NaN or ±inf, a NaN in the actor's log-probs of the rollouts ("old"
log-probs), or a non-finite advantage or loss would otherwise flow silently into the update, into the
pass-rate pool (where NaN compares as a failure) and into every checkpoint after it. The glue checks each
value at the earliest place it exists:

============================  ====================================================================
value                         where (before anything reads it)
============================  ====================================================================
reward / score                ``DynamoSamplesGenerator.generate_samples`` (the step's samples, before
                              the experience maker and the pool); evaluation samples too
old log-probs                 ``DynamoExperienceMaker.compute_advantages_and_returns``, first thing
advantages                    the same method, after they are computed and before the pool records
                              the step (``on_groups``)
loss                          ``DynamoActorPPOTrainer``: the micro-batch's loss before ``backward``
============================  ====================================================================

``--dynamo.nonfinite error`` (default): the first check that finds a non-finite value raises
:class:`NonfiniteError`, one message naming every such sample (its index in the step and prompt id) and
its value; the step has not reached the pool, and the run stops before that step's checkpoint.
``--dynamo.nonfinite drop``: the groups (all samples of the prompt in that step) of such samples are
removed from the update and from the pool update; every one is logged, and the trainer logs the step's
count as ``dynamo/nonfinite_dropped``. A non-finite loss is always an error: its inputs were finite
(dropped groups never reach the loss), so no sample can be dropped to fix it.

"Index in the step" is a sample's position among the step's samples as the generator returned them
(``info[STEP_INDEX_KEY]``, 0-based), which stays the same when groups are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["NONFINITE_MODES", "STEP_INDEX_KEY", "NonfiniteError", "NonfiniteReport", "find_nonfinite",
           "keep_whole_groups", "renumber_positions", "select_samples", "loss_report", "nonfinite_mode"]

NONFINITE_MODES = ("error", "drop")
#: ``info`` key of each training sample's index in the step (int64, one per sample), written by the samples
#: generator and popped by the actor before OpenRLHF logs ``info`` as metrics.
STEP_INDEX_KEY = "dynamo_step_index"

_SHOWN = 8  # samples named one by one in a message; the rest are counted

_HINTS = {
    "reward": "A reward function must return a finite reward for every sample",
    "score": "A reward function must return a finite score for every sample",
    "old log-prob": "The actor's forward (make_experience) gave a non-finite log-probability to a response token: "
                    "a numerical overflow in the model (e.g. fp16) or a diverged run",
    "advantage": "A reward function's rewards and the old log-probs were checked before it, so a reward "
                 "model's reward, the KL to the reference model (--algo.kl.*), the critic's values or the "
                 "advantage estimator gave it",
}


class NonfiniteError(ValueError):
    """A reward, score, log-prob, advantage or loss of the step is NaN or ±inf (``--dynamo.nonfinite error``)."""


def nonfinite_mode(args) -> str:
    """``--dynamo.nonfinite`` of an OpenRLHF args namespace (``error`` when the namespace has no such flag,
    e.g. a test's stand-in); ValueError for an unknown value."""
    mode = getattr(getattr(args, "dynamo", None), "nonfinite", None) or "error"
    if mode not in NONFINITE_MODES:
        raise ValueError(f"--dynamo.nonfinite {mode!r}: expected one of {list(NONFINITE_MODES)}")
    return mode


def _short(text, limit: int = 80) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + "..."


@dataclasses.dataclass(frozen=True)
class NonfiniteReport:
    """The samples of one check whose value is not finite.

    ``what``: the value's name (``reward``, ``score``, ``old log-prob``, ``advantage``). ``positions`` (K,)
    int64: each such sample's index in the step (-1: not known yet); ``prompt_ids`` (K,) int64; ``values`` (K,) float64: its
    first non-finite value (NaN, inf or -inf; per token values: the first in token order); ``tokens`` (K,)
    int64: that value's token position (-1 for a per-sample value); ``prompts``: the prompt texts (K) or
    None; ``checked``: how many samples were checked. Sorted by position.
    """

    what: str
    positions: np.ndarray
    prompt_ids: np.ndarray
    values: np.ndarray
    tokens: np.ndarray
    prompts: Optional[tuple]
    checked: int

    @property
    def ok(self) -> bool:
        return self.positions.size == 0

    def sample_lines(self) -> List[str]:
        """One line per non-finite sample: ``sample 3 (prompt id 123, prompt 'What...') has reward nan``."""
        out = []
        for k in range(self.positions.size):
            where = f" at response token {int(self.tokens[k])}" if self.tokens[k] >= 0 else ""
            prompt = f", prompt {_short(self.prompts[k])}" if self.prompts is not None else ""
            sample = f"sample {int(self.positions[k])}" if self.positions[k] >= 0 else "a sample"
            out.append(f"{sample} (prompt id {int(self.prompt_ids[k])}{prompt}) has "
                       f"{self.what} {float(self.values[k])!r}{where}")
        return out

    def message(self, source: Optional[str] = None) -> str:
        """The one error message of ``--dynamo.nonfinite error`` (``source``: the reward function, when known)."""
        lines = self.sample_lines()
        shown = "; ".join(lines[:_SHOWN])
        if len(lines) > _SHOWN:
            shown += f"; and {len(lines) - _SHOWN} more"
        hint = _HINTS.get(self.what, "")
        if source and self.what in ("reward", "score"):
            hint = f"{hint} (reward function {source})"
        return (f"non-finite {self.what} in {len(lines)} of {self.checked} samples checked: {shown}. {hint}. "
                "The run stopped at this step: the pass-rate pool was not updated from it and nothing is "
                "checkpointed after it. --dynamo.nonfinite drop drops such samples' groups instead (each one "
                "logged, counted as dynamo/nonfinite_dropped).")


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.to(torch.float64) if dtype == np.float64 else x
        return x.numpy().astype(dtype, copy=False)
    return np.asarray(x, dtype=dtype)


def find_nonfinite(what: str, values, prompt_ids, positions, mask=None,
                   prompts: Optional[Sequence[str]] = None) -> NonfiniteReport:
    """The samples whose ``values`` are not all finite.

    ``values``: (S,) one value per sample, or (S, T) per token, a tensor or array of any float dtype;
    ``mask``: (S, T) bool/0-1, only the tokens where it is set are checked (the response tokens; padding
    may hold anything), None = all; ``prompt_ids``: (S,) int64; ``positions``: (S,) int64 index in the
    step of each row; ``prompts``: (S,) texts to name in messages, or None. Returns the report (sorted by
    position); ValueError for inconsistent shapes.
    """
    v = _as_numpy(values, np.float64)
    pid = _as_numpy(prompt_ids, np.int64).reshape(-1)
    pos = _as_numpy(positions, np.int64).reshape(-1)
    S = v.shape[0] if v.ndim else 1
    if v.ndim not in (1, 2):
        raise ValueError(f"find_nonfinite({what!r}): values must be (S,) or (S, T), got shape {v.shape}")
    if pid.shape != (S,) or pos.shape != (S,):
        raise ValueError(f"find_nonfinite({what!r}): {S} rows of values but {pid.size} prompt ids and "
                         f"{pos.size} positions")
    if prompts is not None and len(prompts) != S:
        raise ValueError(f"find_nonfinite({what!r}): {S} rows of values but {len(prompts)} prompts")
    bad = ~np.isfinite(v)
    if mask is not None:
        m = _as_numpy(mask, np.float64) != 0
        if m.shape != v.shape:
            raise ValueError(f"find_nonfinite({what!r}): mask shape {m.shape} != values shape {v.shape}")
        bad &= m
    if v.ndim == 2:
        rows = np.flatnonzero(bad.any(axis=1))
        tokens = bad[rows].argmax(axis=1).astype(np.int64)  # first non-finite token of each row
        firsts = v[rows, tokens]
    else:
        rows = np.flatnonzero(bad)
        tokens = np.full(rows.size, -1, dtype=np.int64)
        firsts = v[rows]
    order = np.argsort(pos[rows], kind="stable")
    rows, tokens, firsts = rows[order], tokens[order], firsts[order]
    return NonfiniteReport(
        what=what, positions=pos[rows], prompt_ids=pid[rows], values=firsts.astype(np.float64), tokens=tokens,
        prompts=tuple(prompts[r] for r in rows) if prompts is not None else None, checked=S)


def keep_whole_groups(group_of, bad_positions) -> np.ndarray:
    """(S,) bool: False for every sample whose group holds a sample at one of ``bad_positions``.

    ``group_of``: (S,) int64 group label of each step position (any labels; equal = same group);
    ``bad_positions``: (K,) int64 positions in 0..S-1."""
    g = np.asarray(group_of, dtype=np.int64).reshape(-1)
    bad = np.asarray(bad_positions, dtype=np.int64).reshape(-1)
    if bad.size and (bad.min() < 0 or bad.max() >= g.size):
        raise ValueError(f"keep_whole_groups: positions must be in [0, {g.size}), got {bad.tolist()[:5]}")
    return ~np.isin(g, g[bad])


def renumber_positions(positions, keep) -> np.ndarray:
    """New positions of the kept samples after the others are removed.

    ``keep``: (S,) bool indexed by old position; ``positions``: (M,) int64 old positions of kept samples
    (any order). Returns (M,) int64: each one's rank among the kept positions (so the kept samples'
    positions are again a permutation of 0..S'-1 in the same relative order)."""
    k = np.asarray(keep, dtype=bool).reshape(-1)
    p = np.asarray(positions, dtype=np.int64).reshape(-1)
    if p.size and not k[p].all():
        raise ValueError("renumber_positions: a position to renumber is not kept")
    rank = np.cumsum(k) - 1
    return rank[p].astype(np.int64)


def select_samples(exp, rows) -> object:
    """A copy of the batched experience ``exp`` (an OpenRLHF ``Experience``) with only ``rows`` (int64
    indices into its batch dimension B): every tensor field, every per-sample list and every ``info``
    entry of length B are indexed; other values are kept as they are."""
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    B = None
    for name in ("action_mask", "sequences", "rewards"):
        t = getattr(exp, name, None)
        if isinstance(t, torch.Tensor):
            B = t.shape[0]
            break
    if B is None:
        raise ValueError("select_samples: the experience has no action_mask, sequences or rewards")

    def pick(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B:
            return v[rows_t.to(v.device)]
        if isinstance(v, list) and len(v) == B:
            return [v[int(r)] for r in rows_t]
        return v

    kwargs = {}
    for f in dataclasses.fields(exp):
        v = getattr(exp, f.name)
        kwargs[f.name] = {k: pick(x) for k, x in v.items()} if isinstance(v, dict) else pick(v)
    return type(exp)(**kwargs)


def loss_report(loss, log_probs, old_log_probs, advantages, action_mask, positions, prompt_ids) -> Optional[str]:
    """None when ``loss`` (a 0-d tensor) is finite, else the error message for it.

    The other inputs are the micro-batch's (B, A) tensors (``log_probs`` of this forward, the rollouts'
    ``old_log_probs``, ``advantages``, ``action_mask``; any may be None) and its samples' (B,) ``positions``
    (index in the step) and ``prompt_ids``: the message names the samples with a non-finite input on a
    response token, or says that every input was finite."""
    value = float(torch.as_tensor(loss).detach().float().reshape(-1)[0])
    if np.isfinite(value):
        return None
    pos = _as_numpy(positions, np.int64).reshape(-1)
    pid = _as_numpy(prompt_ids, np.int64).reshape(-1)
    lines = []
    for what, t in (("log-prob (this forward)", log_probs), ("old log-prob", old_log_probs),
                    ("advantage", advantages)):
        if t is None:
            continue
        mask = action_mask[:, -t.shape[1]:] if action_mask is not None else None
        lines += find_nonfinite(what, t, pid, pos, mask).sample_lines()
    where = ("; ".join(lines[:_SHOWN]) + (f"; and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else "")
             if lines else "every log-prob and advantage of its response tokens is finite, so the loss itself "
             "overflowed (e.g. exp of a large log-prob difference in the ratio)")
    return (f"non-finite loss {value!r} in the micro-batch of samples {pos.tolist()} (prompt ids {pid.tolist()}) "
            f"of this step: {where}. The run stopped before this micro-batch's backward and before the step's "
            "checkpoint: no checkpoint or pool file holds this step (--dynamo.nonfinite drop cannot drop a "
            "non-finite loss).")

