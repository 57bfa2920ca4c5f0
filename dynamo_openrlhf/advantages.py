"""Group-based advantage baselines for groups of *different* sizes (DESIGN.md §5).

OpenRLHF 0.11.2 (``RemoteExperienceMaker.compute_advantages_and_returns`` in
``openrlhf/trainer/ppo_utils/experience_maker.py``) reshapes the flat reward vector with
``rewards.reshape(-1, n_samples_per_prompt)`` and then, per row::

    rloo                           rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    reinforce_baseline, dr_grpo    rewards - rewards.mean(-1, keepdim=True)
    group_norm                     (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)

(``std`` is torch's default, i.e. unbiased, ``correction=1``; rewards are first promoted to at least
float32.) Once groups have different sizes that reshape silently groups the wrong samples.

Group structure: one representation only — **contiguous groups described by their sizes**. The
samples of group ``j`` are ``rewards[offsets[j] : offsets[j] + group_sizes[j]]`` with
``offsets = cumsum(group_sizes) - group_sizes``; sizes are non-negative integers summing to
``len(rewards)`` (a size of 0 is a prompt that got no rollout). Callers that hold samples in another
order sort them by group first (and carry the permutation back).

How it is computed: groups are bucketed by size; each bucket of ``G_k`` groups of size ``k`` is
gathered with explicit offsets into a ``(G_k, k)`` matrix (row ``j`` = the samples of one group, by
index, never by a global ``reshape(-1, n)``), and OpenRLHF's own per-row expressions above are
applied to it, op for op. When every group has the same size there is a single bucket whose matrix
*is* OpenRLHF's reshaped matrix, so the results are bit-for-bit OpenRLHF's. A group's result
depends only on its own rewards and size, so permuting groups permutes the output exactly.

Deliberate deviations (both in cases where OpenRLHF's output is meaningless):

* a group of size 1 gets advantage 0 (OpenRLHF: NaN for group_norm — std of one sample — and
  rloo — division by n − 1 = 0; dr_grpo/reinforce_baseline already give 0);
* a group whose rewards are all identical gets exactly 0. OpenRLHF returns 0 there too whenever
  the float ``mean`` is exact (e.g. 0/1 rewards), but otherwise it is off by an ulp and group_norm
  divides that rounding error by ``std + 1e-9 = 1e-9``: a group of 16 rewards of 0.7 (partial
  credit) gives every sample +0.9528 in OpenRLHF 0.11.2, 0 here.

Estimators OpenRLHF 0.11.2 has that are not group-based (``gae``, ``reinforce``,
``flash_reinforce``) are not handled here. ``reinforce_baseline`` is followed in OpenRLHF by a
batch-wide whitening of the *token-level* advantages (mean/std over all action tokens of the
batch); that step does not depend on groups and stays OpenRLHF's job.
"""

from __future__ import annotations

import operator
from typing import Sequence, Tuple, Union

import torch

__all__ = [
    "GROUP_ESTIMATORS",
    "group_normalized_advantages",
    "group_offsets",
    "group_reward_std",
    "sample_group_ids",
]

#: Estimator names accepted by :func:`group_normalized_advantages` (OpenRLHF 0.11.2's spelling).
GROUP_ESTIMATORS = ("group_norm", "dr_grpo", "reinforce_baseline", "rloo")

SizesLike = Union[torch.Tensor, Sequence[int]]


def _check_rewards(rewards) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (total_samples,), got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise ValueError(f"rewards must be real, got {rewards.dtype}")
    # OpenRLHF: "Use at least FP32 for reward penalties and group statistics."
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def _as_sizes(group_sizes: SizesLike) -> torch.Tensor:
    """Validated (non-negative, integer, 1-D) sizes as a CPU int64 tensor."""
    if isinstance(group_sizes, torch.Tensor):
        if group_sizes.dim() != 1:
            raise ValueError(f"group_sizes must be 1-D (num_groups,), got shape {tuple(group_sizes.shape)}")
        if group_sizes.is_floating_point() or group_sizes.is_complex() or group_sizes.dtype == torch.bool:
            raise ValueError(f"group_sizes must have an integer dtype, got {group_sizes.dtype}")
        sizes = group_sizes.detach().to("cpu", torch.int64)
    else:
        if isinstance(group_sizes, (str, bytes)):
            raise ValueError(f"group_sizes must be a 1-D sequence of ints, got {group_sizes!r}")
        try:
            items = list(group_sizes)
        except TypeError:
            raise ValueError(f"group_sizes must be a 1-D sequence of ints, got {type(group_sizes).__name__}") from None
        values = []
        for s in items:
            try:
                if isinstance(s, bool):
                    raise TypeError
                values.append(operator.index(s))
            except TypeError:
                raise ValueError(f"group_sizes must contain integers, got {s!r}") from None
        sizes = torch.tensor(values, dtype=torch.int64)
    if sizes.numel() and int(sizes.min()) < 0:
        raise ValueError(f"group_sizes must be non-negative, got {int(sizes.min())}")
    return sizes


def _check_sizes(group_sizes: SizesLike, total: int) -> torch.Tensor:
    sizes = _as_sizes(group_sizes)
    if int(sizes.sum()) != total:
        raise ValueError(f"group_sizes sum to {int(sizes.sum())} but rewards has {total} samples")
    return sizes


def group_offsets(group_sizes: SizesLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(starts, ends)`` (int64, CPU) of each contiguous group: group j is ``[starts[j], ends[j])``."""
    sizes = _as_sizes(group_sizes)
    ends = torch.cumsum(sizes, 0)
    return ends - sizes, ends


def sample_group_ids(group_sizes: SizesLike) -> torch.Tensor:
    """Group index of every sample (int64, CPU): ``[0]*sizes[0] + [1]*sizes[1] + ...``."""
    starts, ends = group_offsets(group_sizes)
    return torch.repeat_interleave(torch.arange(starts.numel()), ends - starts)


def _buckets(sizes: torch.Tensor, device):
    """Yield ``(k, idx)`` with ``idx`` the (G_k, k) sample indices of the groups of size k ≥ 1."""
    starts = torch.cumsum(sizes, 0) - sizes
    for k in torch.unique(sizes).tolist():
        if k == 0:
            continue
        sel = starts[sizes == k]
        idx = sel.unsqueeze(1) + torch.arange(k, dtype=torch.int64).unsqueeze(0)
        yield k, idx.to(device)


def group_normalized_advantages(
    rewards: torch.Tensor, group_sizes: SizesLike, estimator: str = "group_norm"
) -> torch.Tensor:
    """Per-sample shaped rewards with a per-group baseline, for contiguous variable-size groups.

    ``rewards``: (total,) tensor, groups contiguous; ``group_sizes``: (num_groups,) non-negative
    ints (tensor or sequence) summing to ``total``; ``estimator``: one of :data:`GROUP_ESTIMATORS`.
    Returns a (total,) tensor of dtype ``promote_types(rewards.dtype, float32)`` on the rewards'
    device — what OpenRLHF holds in ``rewards`` right after its baseline block (it then places the
    value on the last action token and accumulates returns). See the module docstring for the exact
    expressions, the bit-for-bit guarantee and the two deliberate deviations.
    """
    if not isinstance(estimator, str) or estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {GROUP_ESTIMATORS}")
    r = _check_rewards(rewards)
    sizes = _check_sizes(group_sizes, r.numel())
    out = torch.zeros_like(r)
    for k, idx in _buckets(sizes, r.device):
        if k == 1:
            continue  # a lone sample has no baseline: advantage 0
        x = r[idx]  # (G_k, k): one group per row, gathered by explicit offsets
        # The lines below are OpenRLHF 0.11.2's (experience_maker.py, compute_advantages_and_returns),
        # with n_samples_per_prompt replaced by this bucket's k.
        if estimator == "rloo":
            baseline = (x.sum(-1, keepdim=True) - x) / (k - 1)
            y = x - baseline
        elif estimator in ("reinforce_baseline", "dr_grpo"):
            y = x - x.mean(-1, keepdim=True)
        else:  # group_norm
            y = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-9)
        # Identical rewards → exactly 0 (see module docstring).
        y = y.masked_fill((x.amax(-1, keepdim=True) == x.amin(-1, keepdim=True)), 0.0)
        out[idx] = y
    return out


def group_reward_std(rewards: torch.Tensor, group_sizes: SizesLike) -> torch.Tensor:
    """Per-sample std (unbiased, as OpenRLHF's ``info["group_reward_std"]``) of the sample's group.

    Bit-for-bit OpenRLHF's value for groups of equal size ≥ 2; 0 for groups of size 1 (OpenRLHF only
    logs it when n_samples_per_prompt > 1).
    """
    r = _check_rewards(rewards)
    sizes = _check_sizes(group_sizes, r.numel())
    out = torch.zeros_like(r)
    for k, idx in _buckets(sizes, r.device):
        if k == 1:
            continue
        out[idx] = r[idx].std(-1, keepdim=True).expand(-1, k)
    return out
