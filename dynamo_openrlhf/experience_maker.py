"""OpenRLHF 0.11.2's ``RemoteExperienceMaker`` with group baselines over explicit, variable-size groups.

Named after ``openrlhf/trainer/ppo_utils/experience_maker.py``. OpenRLHF's
``compute_advantages_and_returns`` groups samples by ``rewards.reshape(-1, n_samples_per_prompt)``,
which pairs the wrong samples once prompts get different numbers of rollouts (docs/reference_notes.md, grouping pitfalls).
``DynamoExperienceMaker.compute_advantages_and_returns``:

1. reads the step's groups from the samples' tags (:class:`~dynamo_openrlhf.samples_generator.RolloutGroups`,
   raw scores, before any shaping) and hands them to ``on_groups`` (the trainer's pass-rate pool update);
2. applies OpenRLHF's length penalties, replaces OpenRLHF's baseline block by
   :func:`dynamo_openrlhf.advantages.group_normalized_advantages` on the explicit groups, and runs
   the rest of OpenRLHF's method (KL-shaped token rewards, returns, whitening) unchanged on those
   rewards: the estimator and the length-penalty settings are switched for the duration of that
   call so that OpenRLHF's method does everything except the penalties and the baseline, which are
   already applied. ``info["reward"]`` keeps the (penalised) reward, as in OpenRLHF. This path runs
   on every tagged step, also when all groups have ``n_samples_per_prompt`` samples: the results are
   then OpenRLHF's bit for bit, except that a group whose rewards are all equal gets exactly 0
   (OpenRLHF's group_norm divides the float mean's rounding error by std + 1e-9 there), so a group
   gets the same advantages whichever allocation its step had.

With the prompt-balanced loss (``balancing``), every experience also gets its samples' loss weights
(:meth:`~dynamo_openrlhf.advantages.PromptBalancing.sample_weights` of the step's groups) in
``info["dynamo_loss_weight"]``, on both paths; the actor pops them. With ``--dynamo.loss.token_normalizer
auto`` the step's L is the maker's :class:`~dynamo_openrlhf.advantages.RunningTokenNormalizer` value (one L for
every sample of the step, whichever micro-batch or rank it lands on), which then counts the step's responses
(action tokens, the count token-mean divides by). With ``--dynamo.allocation.noise_scale`` (``noise_proxy``)
the groups also carry, per group and outcome class, the sum of each sample's noise proxy, computed from the
experiences' ``action_log_probs`` (the actor's forward of ``make_experience``: the policy being trained, no
extra forward) and ``action_mask``, for the pool's per-prompt noise scale. ``tagged=False`` is for runs with
OpenRLHF's own sampler (allocation off): OpenRLHF's method runs unchanged and the groups are its
contiguous groups of n.

Non-finite values (``--dynamo.nonfinite``, :mod:`dynamo_openrlhf.nonfinite`): the old log-probs are checked
first, the advantages as soon as they exist, both before ``on_groups`` (the pool) sees the step; an error
stops the step there, ``drop`` removes the groups of such samples (the pool then learns the others).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, List, Optional

import numpy as np
import torch

from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties

from dynamo_openrlhf.advantages import (
    GROUP_ESTIMATORS,
    LOSS_WEIGHT_KEY,
    PromptBalancing,
    balanced_mean_length,
    group_normalized_advantages,
    group_reward_std,
)
from dynamo_openrlhf.noise_proxy import NOISE_PROXIES
from dynamo_openrlhf.nonfinite import (
    STEP_INDEX_KEY,
    NonfiniteError,
    find_nonfinite,
    keep_whole_groups,
    nonfinite_mode,
    renumber_positions,
    select_samples,
)
from dynamo_openrlhf.prompt_ids import prompt_ids
from dynamo_openrlhf.samples_generator import GROUP_KEY, PROMPT_ID_KEY, RolloutGroups

__all__ = ["DynamoExperienceMaker", "SUPPORTED_ESTIMATORS"]

# Estimators OpenRLHF runs after its baseline block with no further group statistics. "reinforce"
# whitens over the batch afterwards (as OpenRLHF does for reinforce_baseline); the private name
# does nothing there (group_norm, dr_grpo, rloo are not whitened by OpenRLHF either).
_AFTER_BASELINE = {"group_norm": "_dynamo_grouped", "dr_grpo": "_dynamo_grouped", "rloo": "_dynamo_grouped",
                   "reinforce_baseline": "reinforce", "reinforce": "reinforce", "gae": "gae"}
SUPPORTED_ESTIMATORS = tuple(_AFTER_BASELINE)


@contextlib.contextmanager
def _temporarily(obj, **values):
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


class DynamoExperienceMaker(RemoteExperienceMaker):
    """``RemoteExperienceMaker`` whose baselines use the tagged groups (see module docstring).

    ``success_threshold``: a sample counts as a success for the pool when its score (reward without
    a score) is above it. ``on_groups``: called with each tagged step's :class:`RolloutGroups` as soon
    as they are read (OpenRLHF's ``train_step`` makes the experiences and keeps them, so this is how
    the step's outcomes leave it). ``token_normalizer``: the running L of ``--dynamo.loss.token_normalizer
    auto`` (``balancing.normalizer()``, None with a fixed L); ``last_token_normalizer``: the L of the latest
    step's weights (None before the first). ``noise_proxy``: a name of
    :data:`~dynamo_openrlhf.noise_proxy.NOISE_PROXIES` (``--dynamo.allocation.noise_scale``) or None (off):
    the groups handed to ``on_groups`` then carry the per-class sums of that proxy.
    """

    def __init__(self, *args, success_threshold: float = 0.5, balancing: Optional[PromptBalancing] = None,
                 tagged: bool = True, on_groups: Optional[Callable[[RolloutGroups], None]] = None,
                 noise_proxy: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if noise_proxy is not None and noise_proxy not in NOISE_PROXIES:
            raise ValueError(f"--dynamo.allocation.noise_scale {noise_proxy}: unknown proxy; expected one of "
                             f"{list(NOISE_PROXIES)} or off")
        self.noise_proxy = noise_proxy
        self.success_threshold = float(success_threshold)
        self.balancing = balancing
        self.token_normalizer = balancing.normalizer() if balancing is not None else None
        self.last_token_normalizer: Optional[float] = None
        self.tagged = bool(tagged)
        self.on_groups = on_groups
        # --dynamo.nonfinite: samples dropped so far (old log-probs or advantages not finite), see nonfinite.py
        self.nonfinite = nonfinite_mode(self.args)
        self.nonfinite_dropped = 0
        estimator = self.args.algo.advantage.estimator
        if estimator not in SUPPORTED_ESTIMATORS:
            raise ValueError(f"--algo.advantage.estimator {estimator}: not supported with per-prompt rollout "
                             f"counts; use one of {list(SUPPORTED_ESTIMATORS)}")

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: List[Experience]) -> List[Experience]:
        args = self.strategy.args
        n = args.rollout.n_samples_per_prompt
        # Old log-probs exist from make_experience on: checked before anything reads them (advantages, the
        # noise proxy, the pool).
        experiences, _ = self._nonfinite_check(experiences, "old log-prob", lambda e: e.action_log_probs)
        if not self.tagged:
            # OpenRLHF's own sampler (allocation off): contiguous groups of n in rollout order.
            experiences = super().compute_advantages_and_returns(experiences)
            experiences, _ = self._nonfinite_check(experiences, "advantage", lambda e: e.advantages)
            positions = np.concatenate([np.asarray(e.index, dtype=np.int64) for e in experiences]) \
                if experiences else np.zeros(0, dtype=np.int64)
            if positions.size % n:
                raise ValueError(f"{positions.size} samples are not whole groups of --rollout.n_samples_per_prompt {n}")
            self._attach_weights(experiences, np.full(positions.size // n, n, dtype=np.int64), positions)
            return experiences
        # The tags stay until the advantages are checked (a drop regroups the remaining samples from them);
        # the pool learns the step only then.
        groups = RolloutGroups.from_experiences(experiences, self.success_threshold, noise_proxy=self.noise_proxy)
        experiences = self._tagged_advantages(experiences, groups)
        experiences, keep = self._nonfinite_check(experiences, "advantage", lambda e: e.advantages)
        if keep is not None:  # the rewards are shaped now: the kept groups keep their outcomes read above
            groups = _kept_groups(groups, keep, experiences)
        for exp in experiences:  # OpenRLHF would log the ids as metrics
            exp.info.pop(GROUP_KEY, None)
            exp.info.pop(PROMPT_ID_KEY, None)
        if self.on_groups is not None:
            self.on_groups(groups)
        self._attach_weights(experiences, groups.sizes, groups.positions)
        return experiences

    def _tagged_advantages(self, experiences: List[Experience], groups: RolloutGroups) -> List[Experience]:
        """Length penalties, the baseline on the explicit ``groups`` and the rest of OpenRLHF's method."""
        args = self.strategy.args
        # Always the explicit groups, also when the step's allocation happens to be uniform: OpenRLHF's
        # reshape path would give a constant non-0/1 group its rounding error / 1e-9 (about ±0.95) where
        # this path gives 0, so the same group would get different advantages on different steps.
        for exp in experiences:
            exp.rewards = exp.rewards.to(torch.promote_types(exp.rewards.dtype, torch.float32))
        apply_length_penalties(experiences, args)
        logged_rewards = [exp.info.get("reward") for exp in experiences]

        estimator = args.algo.advantage.estimator
        lengths = [len(exp.rewards) for exp in experiences]
        positions = torch.from_numpy(groups.positions)
        raw = torch.cat([exp.rewards for exp in experiences])
        flat = torch.empty_like(raw)
        flat[positions] = raw  # rollout order: groups contiguous
        sizes = torch.from_numpy(groups.sizes)
        shaped = group_normalized_advantages(flat, sizes, estimator) if estimator in GROUP_ESTIMATORS else flat
        stds = group_reward_std(flat, sizes)
        for exp, r, s in zip(experiences, shaped[positions].split(lengths), stds[positions].split(lengths)):
            exp.rewards = r
            exp.info["group_reward_std"] = s

        # OpenRLHF's method for everything after the baseline (its reshape then only permutes and
        # un-permutes; with n = 1 it also takes a step that --dynamo.nonfinite drop left with a sample count
        # that is not a multiple of n). It re-syncs info["reward"] with the (now shaped) rewards and logs a
        # reshape-based group_reward_std: both are put back below.
        with _temporarily(args.algo.advantage, estimator=_AFTER_BASELINE[estimator]), \
                _temporarily(args.rollout, n_samples_per_prompt=1), \
                _temporarily(args.reward, overlong_buffer_len=None, stop_properly_penalty_coef=None):
            experiences = super().compute_advantages_and_returns(experiences)
        for exp, s, logged in zip(experiences, stds[positions].split(lengths), logged_rewards):
            exp.info["group_reward_std"] = s
            if logged is not None:
                exp.info["reward"] = logged
        return experiences

    # -- non-finite values (--dynamo.nonfinite) ------------------------------------------------------
    def _nonfinite_check(self, experiences: List[Experience], what: str, get):
        """``(experiences, None)`` when ``get(exp)`` ((B, A) per token, checked on ``action_mask``) is finite for
        every sample (or None everywhere); else a :class:`~dynamo_openrlhf.nonfinite.NonfiniteError` (``error``)
        or (``drop``) ``(a new list without the groups of those samples, keep)``, each dropped sample logged,
        ``index`` renumbered; ``keep``: (S,) bool over the step's old rollout positions."""
        rows = []
        for exp in experiences:
            t = get(exp)
            if t is None:
                continue
            B = t.shape[0]
            info = exp.info if exp.info is not None else {}
            step_index = info.get(STEP_INDEX_KEY)
            pos = (torch.as_tensor(step_index).reshape(-1) if step_index is not None
                   else torch.as_tensor(np.asarray(exp.index, dtype=np.int64)))
            pid = info.get(PROMPT_ID_KEY)
            if pid is None:
                pid = prompt_ids(list(exp.prompts), list(exp.labels)) if len(exp.prompts) == B else np.zeros(B)
            rows.append(find_nonfinite(what, t, pid, pos, mask=exp.action_mask,
                                       prompts=list(exp.prompts) if len(exp.prompts) == B else None))
        bad = [r for r in rows if not r.ok]
        if not bad:
            return experiences, None
        report = _merge_reports(bad, sum(r.checked for r in rows))
        if self.nonfinite == "error":
            raise NonfiniteError(report.message())
        # Which rollout positions hold those samples, and the group of every position.
        index = np.concatenate([np.asarray(e.index, dtype=np.int64) for e in experiences])
        step = np.concatenate([_step_index(e) for e in experiences])
        group_of = np.empty(index.size, dtype=np.int64)
        if self.tagged:
            group_of[index] = np.concatenate([torch.as_tensor(e.info[GROUP_KEY]).reshape(-1).numpy()
                                              for e in experiences])
        else:
            group_of = np.arange(index.size, dtype=np.int64) // int(self.strategy.args.rollout.n_samples_per_prompt)
        bad_positions = index[np.isin(step, report.positions)]
        keep = keep_whole_groups(group_of, bad_positions)
        if not keep.any():
            raise NonfiniteError(f"--dynamo.nonfinite drop: every group of the step has a sample with a non-finite "
                                 f"{what}, nothing is left to train on; {report.message()}")
        for line in report.sample_lines():
            print(f"[dynamo] --dynamo.nonfinite drop: {line}: its group is dropped from the update and the pool",
                  flush=True)
        dropped_steps = sorted(step[~keep[index]].tolist())
        print(f"[dynamo] --dynamo.nonfinite drop: dropped {len(dropped_steps)} of the step's {index.size} samples "
              f"(indices {dropped_steps})", flush=True)
        self.nonfinite_dropped += len(dropped_steps)
        out = []
        for exp in experiences:
            idx = np.asarray(exp.index, dtype=np.int64)
            rows_kept = np.flatnonzero(keep[idx])
            if rows_kept.size == 0:
                continue
            sub = exp if rows_kept.size == idx.size else select_samples(exp, rows_kept)
            sub.index = renumber_positions(idx[rows_kept], keep).tolist()
            out.append(sub)
        return out, keep

    def _attach_weights(self, experiences: List[Experience], sizes, positions) -> None:
        """The prompt-balanced loss's per-sample weights (float64) as ``info[LOSS_WEIGHT_KEY]``, computed
        once for the whole step from its groups (nothing when the loss keeps OpenRLHF's weighting)."""
        if self.balancing is None or not experiences:
            return
        sizes = torch.as_tensor(np.asarray(sizes, dtype=np.int64))
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        running = self.token_normalizer
        L = running.value if running is not None else self.balancing.token_normalizer
        w = self.balancing.sample_weights(sizes, L)
        lengths = [len(exp.rewards) for exp in experiences]
        for exp, part in zip(experiences, w[positions].split(lengths)):
            exp.info[LOSS_WEIGHT_KEY] = part
        self.last_token_normalizer = L
        if running is not None:
            # After the weights: this step's lengths size the next steps only (L is never the step's own count).
            tokens = torch.cat([self._action_tokens(exp) for exp in experiences])
            flat = torch.empty_like(tokens)
            flat[positions] = tokens  # rollout order: groups contiguous
            m = balanced_mean_length(flat, sizes)
            if m > 0:  # a step without response tokens has no gradient to size
                running.update(m)

    @staticmethod
    def _action_tokens(exp: Experience) -> torch.Tensor:
        """(B,) float64 number of action tokens of each sample: what OpenRLHF's token-mean divides by."""
        if exp.action_mask is not None:
            return exp.action_mask.detach().to("cpu").sum(-1).to(torch.float64)
        if exp.response_length is not None:
            return torch.as_tensor(exp.response_length).detach().to("cpu", torch.float64).reshape(-1)
        raise ValueError("--dynamo.loss.token_normalizer auto: an experience has neither action_mask nor "
                         "response_length; cannot count its response tokens")


def _step_index(exp: Experience) -> np.ndarray:
    """(B,) int64 index in the step of each sample (``info[STEP_INDEX_KEY]``, else ``Experience.index``)."""
    tag = exp.info.get(STEP_INDEX_KEY) if exp.info is not None else None
    if tag is not None:
        return torch.as_tensor(tag).reshape(-1).numpy().astype(np.int64)
    return np.asarray(exp.index, dtype=np.int64)


def _kept_groups(groups: RolloutGroups, keep: np.ndarray, experiences: List[Experience]) -> RolloutGroups:
    """``groups`` without the groups whose samples a drop removed: ``keep`` (S,) bool over the old rollout
    positions (whole groups), ``experiences`` the kept ones with their renumbered ``index``."""
    starts = np.cumsum(groups.sizes) - groups.sizes
    g = keep[starts]
    pick = (lambda a: None if a is None else a[g])
    return dataclasses.replace(
        groups, prompt_ids=groups.prompt_ids[g], sizes=groups.sizes[g], successes=groups.successes[g],
        positions=np.concatenate([np.asarray(e.index, dtype=np.int64) for e in experiences]),
        noise_success=pick(groups.noise_success), noise_failure=pick(groups.noise_failure))


def _merge_reports(reports, checked: int):
    """One report of several micro-batches' reports (sorted by index in the step)."""
    from dynamo_openrlhf.nonfinite import NonfiniteReport

    pos = np.concatenate([r.positions for r in reports])
    order = np.argsort(pos, kind="stable")
    prompts = None
    if all(r.prompts is not None for r in reports):
        prompts = tuple(np.array([p for r in reports for p in r.prompts], dtype=object)[order].tolist())
    return NonfiniteReport(what=reports[0].what, positions=pos[order],
                           prompt_ids=np.concatenate([r.prompt_ids for r in reports])[order],
                           values=np.concatenate([r.values for r in reports])[order],
                           tokens=np.concatenate([r.tokens for r in reports])[order], prompts=prompts, checked=checked)
