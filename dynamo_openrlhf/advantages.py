"""Group-based advantage baselines for groups of *different* sizes (docs/reference_notes.md, grouping pitfalls).

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

import dataclasses
import math
import operator
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
    "GROUP_ESTIMATORS",
    "LOSS_WEIGHT_KEY",
    "PROMPT_WEIGHTINGS",
    "PromptBalancing",
    "RunningTokenNormalizer",
    "TOKEN_NORMALIZER_MODES",
    "balanced_mean_length",
    "estimator_spec",
    "parse_token_normalizer",
    "prompt_balanced_weights",
    "prompt_balancing",
    "register_estimator",
    "group_normalized_advantages",
    "group_offsets",
    "group_reward_std",
    "sample_group_ids",
]

# ----------------------------------------------------------------------------------------------
# Estimator registry: one entry per OpenRLHF 0.11.2 estimator name
# ----------------------------------------------------------------------------------------------
#
# The per-row expressions are OpenRLHF 0.11.2's (experience_maker.py, compute_advantages_and_returns),
# op for op, with n_samples_per_prompt replaced by the bucket's group size k; ``x`` is (G_k, k), one
# group per row.


def _rloo_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    baseline = (x.sum(-1, keepdim=True) - x) / (k - 1)
    return x - baseline


def _mean_baseline_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _group_norm_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-9)


def _one(n: int) -> float:
    return 1.0


def _rloo_equivalent(n: int) -> float:
    """n/(n−1): a mean-baseline advantage r − K/n is (n−1)/n × RLOO's, so this factor makes the
    prompt-balanced update equal RLOO's (1 for a group of one, whose advantage is 0 anyway)."""
    return n / (n - 1) if n >= 2 else 1.0


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """One advantage estimator, registered once in :data:`ESTIMATORS`.

    ``rows(x, k)``: the group baseline on a (groups, k) reward matrix, or None for estimators that are
    not group-based (OpenRLHF's own code handles them); ``balance_factor(n)``: c(n) of
    :func:`prompt_balanced_weights`; ``variance_model``: the ``estimator=`` name the rollout allocator's
    core gets for this estimator (None = the plain Σ v/n model)."""

    name: str
    rows: Optional[Callable[[torch.Tensor, int], torch.Tensor]]
    balance_factor: Callable[[int], float]
    variance_model: Optional[str]


#: name -> :class:`EstimatorSpec`, in OpenRLHF 0.11.2's spelling. ``reinforce`` and ``gae`` have no group
#: baseline; the allocator treats them with the plain Σ v/n model (documented in docs/allocation_objectives.md).
ESTIMATORS: Dict[str, EstimatorSpec] = {}


def register_estimator(spec: EstimatorSpec) -> EstimatorSpec:
    """Add ``spec`` to :data:`ESTIMATORS` (each name once)."""
    if spec.name in ESTIMATORS:
        raise ValueError(f"estimator {spec.name!r} is already registered")
    ESTIMATORS[spec.name] = spec
    return spec


register_estimator(EstimatorSpec("group_norm", _group_norm_rows, _one, "group_norm"))
register_estimator(EstimatorSpec("dr_grpo", _mean_baseline_rows, _rloo_equivalent, "dr_grpo"))
register_estimator(EstimatorSpec("reinforce_baseline", _mean_baseline_rows, _rloo_equivalent, "reinforce_baseline"))
register_estimator(EstimatorSpec("rloo", _rloo_rows, _one, "rloo"))
register_estimator(EstimatorSpec("reinforce", None, _one, None))
register_estimator(EstimatorSpec("gae", None, _one, None))


def estimator_spec(name: str) -> EstimatorSpec:
    """The registered :class:`EstimatorSpec` of ``name``; ValueError naming the known ones otherwise."""
    spec = ESTIMATORS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {list(ESTIMATORS)}")
    return spec


#: Estimator names accepted by :func:`group_normalized_advantages` (OpenRLHF 0.11.2's spelling).
GROUP_ESTIMATORS = tuple(name for name, spec in ESTIMATORS.items() if spec.rows is not None)

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
    spec = ESTIMATORS[estimator]
    r = _check_rewards(rewards)
    sizes = _check_sizes(group_sizes, r.numel())
    out = torch.zeros_like(r)
    for k, idx in _buckets(sizes, r.device):
        if k == 1:
            continue  # a lone sample has no baseline: advantage 0
        x = r[idx]  # (G_k, k): one group per row, gathered by explicit offsets
        y = spec.rows(x, k)
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


# ----------------------------------------------------------------------------------------------
# Prompt-balanced policy loss: per-sample weights
# ----------------------------------------------------------------------------------------------

#: ``Experience.info`` key of the per-sample loss weight (float, shape (B,)) the experience maker attaches
#: and the actor pops before OpenRLHF logs ``info`` as metrics.
LOSS_WEIGHT_KEY = "dynamo_loss_weight"

#: Values of ``--dynamo.loss.prompt_weighting``.
PROMPT_WEIGHTINGS = ("auto", "tokens", "balanced")


def prompt_balanced_weights(group_sizes: SizesLike, estimator: str, token_normalizer: float) -> torch.Tensor:
    """Per-sample weights (float64, CPU, shape (total,)) of the prompt-balanced policy loss.

    Every sample of group i (``group_sizes[i] = n_i`` contiguous samples, as in
    :func:`group_normalized_advantages`) gets ``w = c(n_i) / (N · n_i · L)``: N = number of groups with
    n_i > 0, L = ``token_normalizer`` (a constant, never the step's token count), c(n) = the estimator's
    ``balance_factor`` (n/(n−1) for dr_grpo and reinforce_baseline, whose advantages are (n−1)/n × RLOO's,
    so that their update equals RLOO's; 1 otherwise). Then Σ_s w_s Σ_tokens ℓ = (1/N) Σ_i (1/n_i)
    Σ_j c(n_i) (token sum of rollout j) / L: every prompt of the step has the same total weight, whatever
    its n_i. Empty input gives an empty tensor.
    """
    spec = estimator_spec(estimator)
    try:
        L = float(token_normalizer)
    except (TypeError, ValueError):
        raise ValueError(f"token_normalizer must be a number > 0, got {token_normalizer!r}") from None
    if not (math.isfinite(L) and L > 0):
        raise ValueError(f"token_normalizer must be a finite number > 0, got {token_normalizer!r}")
    sizes = _as_sizes(group_sizes)
    num_groups = int((sizes > 0).sum())
    if num_groups == 0:
        return torch.zeros(int(sizes.sum()), dtype=torch.float64)
    per_group = torch.tensor([spec.balance_factor(n) / (num_groups * n * L) if n > 0 else 0.0
                              for n in sizes.tolist()], dtype=torch.float64)
    return torch.repeat_interleave(per_group, sizes)


def balanced_mean_length(response_lengths, group_sizes: SizesLike) -> float:
    """The step's mean response length as the balanced loss weighs it: the mean over prompts (groups with
    n_i > 0) of each prompt's mean response length, in tokens.

    ``response_lengths``: (total,) action tokens per sample (what token-mean counts), contiguous groups as in
    :func:`group_normalized_advantages`; ``group_sizes``: (num_groups,) n_i. With L equal to this value the
    balanced weights of a step sum to 1 over its tokens (Σ_s w_s len_s = 1), as token-mean's 1/(token count)
    does; with equal n_i it is the plain mean over samples. 0.0 when no group has a sample."""
    lengths = torch.as_tensor(response_lengths).detach().to("cpu")
    if lengths.dim() != 1:
        raise ValueError(f"response_lengths must be 1-D (total_samples,), got shape {tuple(lengths.shape)}")
    if lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"response_lengths must be real numbers of tokens, got {lengths.dtype}")
    lengths = lengths.to(torch.float64)
    if lengths.numel() and not (bool(torch.isfinite(lengths).all()) and float(lengths.min()) >= 0):
        raise ValueError("response_lengths must be finite and >= 0 (tokens)")
    sizes = _check_sizes(group_sizes, lengths.numel())
    nonempty = sizes > 0
    if not bool(nonempty.any()):
        return 0.0
    sums = torch.zeros(sizes.numel(), dtype=torch.float64).index_add_(0, sample_group_ids(sizes), lengths)
    return float((sums[nonempty] / sizes[nonempty]).mean())


#: Values of ``--dynamo.loss.token_normalizer`` besides a number: ``auto`` (default) = the running mean
#: response length of the earlier steps (:class:`RunningTokenNormalizer`); ``max_new_tokens`` = the fixed
#: ``--rollout.max_new_tokens`` (the default before ``auto``).
TOKEN_NORMALIZER_MODES = ("auto", "max_new_tokens")


def parse_token_normalizer(value) -> Union[str, float]:
    """``--dynamo.loss.token_normalizer`` as given (str from the command line, or a number / None from code):
    ``"auto"`` (also for None), ``"max_new_tokens"``, or a finite float > 0. ValueError naming the flag otherwise."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip()
        if text in TOKEN_NORMALIZER_MODES:
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--dynamo.loss.token_normalizer: expected auto, max_new_tokens or a number > 0 "
                             f"(tokens), got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--dynamo.loss.token_normalizer: expected auto, max_new_tokens or a number > 0 "
                         f"(tokens), got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--dynamo.loss.token_normalizer must be a finite number > 0, got {value!r}")
    return float(value)


#: Version of :meth:`RunningTokenNormalizer.state_dict`.
TOKEN_NORMALIZER_STATE_VERSION = 1


@dataclasses.dataclass
class RunningTokenNormalizer:
    """L of ``--dynamo.loss.token_normalizer auto``: the running mean response length (tokens) of the steps seen
    so far, so that the balanced loss's step matches OpenRLHF's token-mean step at the same learning rate.

    Step t uses :attr:`value` = (m_1 + ... + m_{t-1}) / (t - 1), m_s = :func:`balanced_mean_length` of step s's
    responses (each step counts once): a constant within the step, computed before its responses are seen,
    so the expected update stays independent of the step's n_i. The first step, with no earlier step, uses
    ``first`` = ``--rollout.max_new_tokens``: a constant too, and an upper bound on any mean length, so that
    step is never larger than token-mean's (at most one step at ≈ mean length / max_new_tokens of the size).
    :meth:`update` adds a step's m once its weights are made; :meth:`state_dict` / :meth:`load_state_dict`
    travel in the trainer's checkpoints, so a resumed run continues with the same L.

    ``first``: L of the first step (tokens, > 0); ``total``: Σ m_s of the steps seen (tokens); ``steps``: their
    number."""

    first: float
    total: float = 0.0
    steps: int = 0

    def __post_init__(self):
        if isinstance(self.first, bool) or not isinstance(self.first, (int, float)) \
                or not (math.isfinite(self.first) and self.first > 0):
            raise ValueError(f"RunningTokenNormalizer: first must be a finite number > 0 (tokens), got {self.first!r}")
        self.first = float(self.first)
        self._check(self.total, self.steps)

    @staticmethod
    def _check(total, steps) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"RunningTokenNormalizer: steps must be an int >= 0, got {steps!r}")
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total) \
                or total < 0 or (steps > 0) != (total > 0):
            raise ValueError(f"RunningTokenNormalizer: total must be a finite number of tokens, > 0 exactly when "
                             f"steps > 0, got total {total!r} with steps {steps!r}")

    @property
    def value(self) -> float:
        """L for the next step (tokens)."""
        return self.first if self.steps == 0 else self.total / self.steps

    def update(self, step_mean_length: float) -> None:
        """Count one more step whose :func:`balanced_mean_length` is ``step_mean_length`` (tokens, finite, > 0;
        a step without response tokens has no gradient to size: leave it out)."""
        m = step_mean_length
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
            raise ValueError(f"RunningTokenNormalizer.update: the step's mean response length must be a finite "
                             f"number > 0 (tokens), got {m!r}")
        self.total += float(m)
        self.steps += 1

    def state_dict(self) -> Dict[str, object]:
        """Plain Python values (exact floats): ``{"version", "total", "steps"}``. ``first`` is not saved: it
        is the run's flag and only matters before any step."""
        return {"version": TOKEN_NORMALIZER_STATE_VERSION, "total": self.total, "steps": self.steps}

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict`'s values; ValueError naming the problem for anything else."""
        if not isinstance(state, dict):
            raise ValueError(f"token normaliser state must be a dict, got {type(state).__name__}")
        if state.get("version") != TOKEN_NORMALIZER_STATE_VERSION:
            raise ValueError(f"token normaliser state version {state.get('version')!r} is not supported "
                             f"(expected {TOKEN_NORMALIZER_STATE_VERSION})")
        total, steps = state.get("total"), state.get("steps")
        self._check(total, steps)
        self.total, self.steps = float(total), int(steps)


@dataclasses.dataclass(frozen=True)
class PromptBalancing:
    """The run's prompt-balanced loss settings (:func:`prompt_balancing`).

    ``estimator``: the advantage estimator (its c(n)); ``token_normalizer``: L of the weights (1.0 with
    ``--actor.loss_agg_mode seq-mean-token-mean``, where each sequence's loss already is its token mean; with
    ``running`` the first step's L); ``token_level``: True for token-mean; ``train_batch_size``: samples per
    optimizer step (``--train.batch_size``); each sample's weight is multiplied by (samples in the step) /
    ``train_batch_size``, the number of optimizer steps per rollout step, so that every optimizer step is
    an unbiased estimate of the same balanced update (exactly it when there is one); ``running``: True for
    ``--dynamo.loss.token_normalizer auto`` (L of each step from a :class:`RunningTokenNormalizer`, see
    :meth:`normalizer`)."""

    estimator: str
    token_normalizer: float
    token_level: bool
    train_batch_size: int
    running: bool = False

    def sample_weights(self, group_sizes: SizesLike, token_normalizer: Optional[float] = None) -> torch.Tensor:
        """What the experience maker attaches per sample (float64, (total,)): the balanced weights with L =
        ``token_normalizer`` (the step's L; default the fixed :attr:`token_normalizer`) times (samples in the
        step) / (samples per optimizer step)."""
        L = self.token_normalizer if token_normalizer is None else token_normalizer
        w = prompt_balanced_weights(group_sizes, self.estimator, L)
        return w * (w.numel() / self.train_batch_size)

    def normalizer(self) -> Optional[RunningTokenNormalizer]:
        """A fresh :class:`RunningTokenNormalizer` (first step's L = :attr:`token_normalizer`) with ``running``;
        None with a fixed L."""
        return RunningTokenNormalizer(self.token_normalizer) if self.running else None

    def describe(self) -> str:
        """What each rollout contributes, for the console: e.g. ``token sum / 16``, ``token sum / L, L = running
        mean response length of the earlier steps (first step: 16)`` or ``token mean``."""
        if not self.token_level:
            return "token mean"
        if self.running:
            return (f"token sum / L, L = running mean response length of the earlier steps (first step: "
                    f"{self.token_normalizer:g} = --rollout.max_new_tokens)")
        return f"token sum / {self.token_normalizer:g}"


def _get(obj, path: str, default=None):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def prompt_balancing(args) -> Optional[PromptBalancing]:
    """The run's :class:`PromptBalancing`, or None when the policy loss keeps OpenRLHF's token weighting.

    ``--dynamo.loss.prompt_weighting``: ``tokens`` = OpenRLHF's loss (with allocation off the run is
    OpenRLHF's GRPO exactly); ``balanced`` = the prompt-balanced loss; ``auto`` (default) = balanced when
    ``--dynamo.allocation.rule`` is not off, else tokens. ``--dynamo.loss.token_normalizer``: ``auto``
    (default; None means the same) = running mean response length, ``max_new_tokens``, or a number (see
    :func:`parse_token_normalizer`). Raises ValueError naming the flags when the settings cannot give the
    balanced loss exactly."""
    requested = _get(args, "dynamo.loss.prompt_weighting", "auto")
    if requested not in PROMPT_WEIGHTINGS:
        raise ValueError(f"--dynamo.loss.prompt_weighting: unknown value {requested!r}; expected one of "
                         f"{list(PROMPT_WEIGHTINGS)}")
    normalizer = parse_token_normalizer(_get(args, "dynamo.loss.token_normalizer"))
    allocation_on = _get(args, "dynamo.allocation.rule", "off") != "off"
    mode = ("balanced" if allocation_on else "tokens") if requested == "auto" else requested
    if mode == "tokens":
        if normalizer != "auto":
            raise ValueError("--dynamo.loss.token_normalizer applies to the balanced loss only; the run uses "
                             f"--dynamo.loss.prompt_weighting tokens{' (auto, allocation off)' if requested == 'auto' else ''}")
        return None
    problems = []
    estimator = _get(args, "algo.advantage.estimator")
    if estimator not in ESTIMATORS:
        problems.append(f"--algo.advantage.estimator {estimator}: the prompt-balanced loss supports "
                        f"{list(ESTIMATORS)} (or use --dynamo.loss.prompt_weighting tokens)")
    agg = _get(args, "actor.loss_agg_mode", "token-mean")
    token_level = agg == "token-mean"
    running = False
    if token_level:
        if isinstance(normalizer, float):
            L = normalizer
        else:
            running = normalizer == "auto"
            L = _get(args, "rollout.max_new_tokens")
            if L is None:
                problems.append(f"--dynamo.loss.token_normalizer {normalizer} needs --rollout.max_new_tokens "
                                f"({'the first step' if running else 'every step'}'s L); set it or --dynamo.loss.token_normalizer L")
            elif isinstance(L, bool) or not (isinstance(L, (int, float)) and math.isfinite(L) and L > 0):
                problems.append(f"--rollout.max_new_tokens must be a finite number > 0 for the balanced loss's "
                                f"token normaliser, got {L!r}")
    else:
        # seq-mean-token-mean: each sequence's loss is already its token mean; balanced keeps that and
        # weights sequences so that every prompt has the same total weight.
        if normalizer != "auto":
            problems.append("--dynamo.loss.token_normalizer does not apply with --actor.loss_agg_mode "
                            f"{agg} (each sequence's loss is its token mean; the balanced loss keeps it)")
        L = 1.0
    # --train.dynamic_batch_enable: the weights travel with their samples through the token-budget micro-batches,
    # and the actor's normaliser follows DeepSpeed's gas of 1 there (ppo_actor.DynamoActorPPOTrainer._deepspeed_gas).
    # --train.async_enable: the async trainer actor's experience maker computes the weights from the batch's own
    # groups (dynamo_openrlhf.ppo_trainer_async), so they belong to the batch whatever waits in the queue.
    tbs = _get(args, "train.batch_size")
    if not (isinstance(tbs, int) and tbs >= 1):
        problems.append(f"--train.batch_size must be >= 1, got {tbs!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return PromptBalancing(estimator=estimator, token_normalizer=float(L), token_level=token_level,
                           train_batch_size=int(tbs), running=running)
