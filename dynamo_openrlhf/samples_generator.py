"""OpenRLHF 0.11.2's ``SamplesGenerator`` with a per-prompt number of rollouts, and the one place
where the group structure of a batch is written (tags) and read back (:class:`RolloutGroups`).

``DynamoSamplesGenerator`` (``openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator``):

- With ``rollout_allocator`` set (a callable ``(prompt_ids) -> per-prompt n``), a training step
  (``generate_samples``) draws ``num_candidates`` prompts from the loader, hashes each (prompt, label)
  once into its stable int64 id (:mod:`dynamo_openrlhf.prompt_ids`), asks the allocator for their n_i
  and sends every prompt as ONE request with its own ``num_samples = n_i`` (n_i = 0: not
  sent; OpenRLHF's load-aware engine assignment with n_i as the load). Each returned sample is
  checked to carry its own request's prompt and label (never re-paired by position, unlike the
  reference code, docs/reference_notes.md), and tagged with ``info["dynamo_prompt_id"]`` (its
  request's id) and ``info["dynamo_group"]`` (a serial number per request, unique in the run). The
  samples of one request are contiguous.
- With an allocator and ``--algo.dynamic_filtering_enable`` (dynamic sampling, DAPO-style): a group whose
  rewards have no spread (:func:`zero_reward_spread`: max - min <= :data:`ZERO_SPREAD_TOL`, so a constant 0.5
  group is dropped too, which OpenRLHF's mean-range test lets through) is dropped from the step, as OpenRLHF
  drops it, but its outcomes are kept for the pass-rate pool (:meth:`DynamoSamplesGenerator.take_filtered`:
  the trainer adds them to the step's pool update, so every rollout updates the pool once). When a wave of
  requests is complete, the rollouts of the wave's dropped groups are refilled: one new prompt per dropped
  group (times the over-sampling ratio ``num_candidates / rollout.batch_size``), drawn from the loader and
  allocated by DynaMO with exactly those rollouts as budget (``refill_allocator(prompt_ids, budget)``),
  until no group is dropped or the loader is exhausted. Refilling per wave, not per group, keeps the step
  independent of completion order (the same prompts, the same allocations). The step trains on the
  allocation's budget, as OpenRLHF trains on ``rollout.batch_size x n``; the dropped rollouts are spent
  on top of it, counted in ``generated_rollouts`` and ``filtered_rollouts``.
- With ``rollout_allocator = None`` (default), and always during evaluation, OpenRLHF's own
  methods run unchanged (and nothing is tagged). ``last_eval_samples`` keeps the last evaluation's
  samples (for pass@k).
- ``generated_rollouts`` / ``generated_tokens``: running totals of the training samples (and their
  response tokens) that came back from the engines, counted before OpenRLHF's dynamic filtering drops
  any group, so they include discarded ones; evaluation samples are not counted.
- Every training step's samples are tagged with their index in the step (``info["dynamo_step_index"]``),
  their rewards and scores checked for NaN/inf before anything reads them (``--dynamo.nonfinite``, see
  :mod:`dynamo_openrlhf.nonfinite`; evaluation samples too), and the prompts the rollout engine cut to the
  prompt budget (``--data.max_len`` - ``--rollout.max_new_tokens``) counted (``prompts_truncated``, warned once).

:class:`RolloutGroups` turns tagged samples back into groups (prompt id, size, successes) in
rollout order; the experience maker and the pool update use it, nothing else regroups samples.

Importing this module imports ``vllm`` like OpenRLHF does; without CUDA call
``dynamo_openrlhf.cpu_backend.install_import_stand_ins()`` first.
"""

from __future__ import annotations

import heapq
import inspect
import math
import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch
from vllm import SamplingParams

from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator, _collect_prompt_batch
from openrlhf.trainer.ray.vllm_engine import batch_vllm_engine_call

from .metrics import is_success
from .noise_proxy import noise_proxy as _noise_proxy
from .nonfinite import STEP_INDEX_KEY, NonfiniteError, find_nonfinite, keep_whole_groups, nonfinite_mode
from .prompt_ids import prompt_ids

__all__ = ["DynamoSamplesGenerator", "RolloutGroups", "PROMPT_ID_KEY", "GROUP_KEY", "check_reward", "reward_source",
           "outcome_values", "is_success", "zero_reward_spread", "merge_filtered_groups", "ZERO_SPREAD_TOL"]

PROMPT_ID_KEY = "dynamo_prompt_id"
GROUP_KEY = "dynamo_group"
#: Dynamic filtering with an allocation: a group whose rewards' spread (max - min, in reward units) is at most
#: this has no signal (every baseline-subtracted advantage is 0 up to rounding) and is dropped.
ZERO_SPREAD_TOL = 1e-6


def zero_reward_spread(rewards, tol: float = ZERO_SPREAD_TOL) -> bool:
    """Whether one group's rewards ``rewards`` (G,) have no spread: all finite and max - min <= ``tol``
    (reward units). A group with a NaN/inf reward has no defined spread: False (kept, so that the
    ``--dynamo.nonfinite`` check sees it). An empty group: False. Unlike OpenRLHF's test (the mean outside
    ``--algo.dynamic_filtering_range``), a constant group of partial credit (e.g. all 0.5) has no spread."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.isfinite(r).all():
        return False
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"zero_reward_spread: tol must be a finite number >= 0, got {tol!r}")
    return bool(r.max() - r.min() <= tol)

_REQUIRED = {
    "_dispatch_prompts_to_vllm": ("self", "prompts", "labels", "images", "generate_kwargs"),
    "_process_response_into_experience": ("self", "response", "generate_kwargs"),
}


def _check_openrlhf_api() -> None:
    for name, params in _REQUIRED.items():
        symbol = f"openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator.{name}"
        fn = getattr(SamplesGenerator, name, None)
        if fn is None:
            raise ImportError(f"dynamo_openrlhf.samples_generator needs {symbol} (openrlhf 0.11.2); it is missing")
        have = tuple(inspect.signature(fn).parameters)
        if have != params:
            raise ImportError(
                f"dynamo_openrlhf.samples_generator needs {symbol} with parameters {params} (openrlhf 0.11.2); "
                f"the installed openrlhf has {have}"
            )


_check_openrlhf_api()


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def check_reward(response: dict, source: str) -> None:
    """Raise one clear error when a rollout engine's ``response`` has no reward although the run has a
    reward function ``source``. OpenRLHF 0.11.2's ``SingleTurnAgentExecutor`` catches any exception of
    the reward function (or of the HTTP call), logs it at info level in the rollout engine's log and
    leaves the reward None, which otherwise fails much later inside batch concatenation."""
    if response.get("reward") is None:
        raise RuntimeError(
            f"reward function {source} gave no reward for a sample of prompt {_short(response.get('prompt'))} "
            f"with label {_short(response.get('label'))}: it raised an exception or returned no 'rewards' "
            "(OpenRLHF logs the exception at info level in the rollout engine's log as '[SingleTurnExecutor] "
            "Failed to fetch reward'). A reward function must return a reward for every sample; the built-in "
            "dynamo_openrlhf.reward never raises (a sample it cannot score gets 0, counted as math_error)")


def reward_source(args) -> Optional[str]:
    """What gives the run's rewards at rollout time (``--train.agent_func_path`` or
    ``--reward.remote_url``, a file, module path or URL; OpenRLHF may have split it into a list), or None
    when rewards come from a reward model."""
    agent = getattr(args.train, "agent_func_path", None)
    if agent:
        return str(agent)
    url = args.reward.remote_url
    if not url:
        return None
    return ",".join(url) if isinstance(url, (list, tuple)) else str(url)


def _validate_allocation(allocation, num_prompts: int) -> List[int]:
    counts = list(allocation)
    if len(counts) != num_prompts:
        raise ValueError(f"rollout_allocator returned {len(counts)} counts for {num_prompts} prompts")
    out = []
    for i, n in enumerate(counts):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"rollout_allocator: count {i} is {n!r}; counts must be non-negative integers")
        out.append(int(n))
    return out


class DynamoSamplesGenerator(SamplesGenerator):
    """``SamplesGenerator`` whose prompts each get their own number of rollouts (see module docstring).

    ``num_candidates``: prompts drawn per training step when allocating (default
    ``rollout.batch_size``; more for over-sampling with skipping). ``reward_source``: the run's reward
    function file or URL (``--reward.remote_url``) or agent file; when set, every sample must come back
    with a reward, else one error names the sample and the source (:func:`check_reward`).
    ``refill_allocator``: ``(prompt_ids, budget) -> per-prompt n`` spending at most ``budget`` rollouts
    (:meth:`~dynamo_openrlhf.allocation.RolloutAllocator.allocate_refill`), needed with an allocator and
    ``--algo.dynamic_filtering_enable``; ``success_threshold``: the pool's success rule for the dropped
    groups' outcomes (``--dynamo.pool.success_threshold``).
    """

    def __init__(self, *args, rollout_allocator: Optional[Callable] = None, num_candidates: Optional[int] = None,
                 reward_source: Optional[str] = None, refill_allocator: Optional[Callable] = None,
                 success_threshold: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_allocator = rollout_allocator
        self.num_candidates = num_candidates
        self.reward_source = reward_source
        self.refill_allocator = refill_allocator
        self.success_threshold = float(success_threshold)
        self.filtering = rollout_allocator is not None and bool(self.args.algo.dynamic_filtering_enable)
        if self.filtering and refill_allocator is None:
            raise ValueError("--algo.dynamic_filtering_enable with an allocation needs a refill_allocator (the "
                             "dropped groups' rollouts are re-allocated over new prompts)")
        # Dynamic filtering with an allocation: dropped groups (and their rollouts) so far and in the latest
        # step; their outcomes wait in _filtered until the trainer's pool update takes them (take_filtered).
        self.filtered_groups = 0
        self.filtered_rollouts = 0
        self.last_filtered_rollouts = 0
        self._filtered: List[RolloutGroups] = []
        self._evaluating = False
        self._next_group = 0
        self.last_eval_samples: List[Experience] = []
        # Training rollouts generated so far (evaluation excluded), counted as each response comes back:
        # also the groups OpenRLHF's --algo.dynamic_filtering_enable discards and re-samples.
        self.generated_rollouts = 0
        self.generated_tokens = 0  # their response tokens (action_mask)
        # --dynamo.nonfinite: training samples dropped so far (whole groups of a sample whose reward or score is
        # not finite), and in the latest step; prompts longer than the prompt budget so far (training steps).
        self.nonfinite = nonfinite_mode(self.args)
        self.nonfinite_dropped = 0
        self.last_nonfinite_dropped = 0
        self.prompts_truncated = 0
        self._truncation_warned = False

    def generate_eval_samples(self, **generate_kwargs) -> List[Experience]:
        # Evaluation keeps OpenRLHF's fixed n (the eval n_samples_per_prompt); no allocation.
        self._evaluating = True
        try:
            samples = super().generate_eval_samples(**generate_kwargs)
        finally:
            self._evaluating = False
        # Evaluation drops nothing (pass@k needs every sample): a non-finite reward is an error with
        # --dynamo.nonfinite error; with drop it is logged and counts as a failure (NaN is above no threshold).
        self._check_rewards(samples, evaluation=True)
        self._count_truncated(samples, evaluation=True)
        self.last_eval_samples = samples
        return samples

    # -- one training step -------------------------------------------------------------------------
    @torch.no_grad()
    def generate_samples(self, **generate_kwargs) -> Tuple[List[Experience], Optional[float], int, bool]:
        """One step: ``(samples, filter_pass_rate, prompts_consumed, loader_exhausted)`` like OpenRLHF's. With an
        allocator, exactly ``sum(n_i)`` samples (the allocator's budget) from ``num_candidates`` prompts; with
        dynamic filtering, the budget less the dropped groups' rollouts plus the refills' (the budget again unless
        the loader ran out), ``prompts_consumed`` counting the refill prompts, and ``filter_pass_rate`` the
        percentage of the step's groups that were kept (None without filtering)."""
        if self.rollout_allocator is None:
            samples, rate, consumed, exhausted = super().generate_samples(**generate_kwargs)
            return self._finish_step(samples), rate, consumed, exhausted
        if getattr(self, "_dataloader_iter", None) is None:
            self._dataloader_iter = iter(self.prompts_dataloader)
        num = self.num_candidates or self.args.rollout.batch_size
        prompts, labels, images, exhausted = _collect_prompt_batch(self._dataloader_iter, num)
        experiences: List[Experience] = []
        consumed, rate = len(prompts), None
        self.last_filtered_rollouts = 0
        if prompts:
            if self.args.vllm.enable_sleep:
                batch_vllm_engine_call(self.vllm_engines, "wake_up")
            try:
                experiences, consumed, exhausted, rate = self._generate_allocated(
                    prompts, labels, images, exhausted, **generate_kwargs)
            finally:
                if self.args.vllm.enable_sleep:
                    batch_vllm_engine_call(self.vllm_engines, "sleep")
        if exhausted:
            self._dataloader_iter = None
        return self._finish_step(experiences), rate, consumed, exhausted

    def take_filtered(self) -> Optional[RolloutGroups]:
        """The outcomes of the groups dynamic filtering dropped since the last call (prompt ids, sizes,
        successes; rollout order of their steps), and forget them: the trainer's pool update calls it once per
        step, so each dropped rollout reaches the pool once. None when there are none."""
        if not self._filtered:
            return None
        parts, self._filtered = self._filtered, []
        cat = (lambda name: np.concatenate([getattr(g, name) for g in parts]).astype(np.int64))
        return RolloutGroups(prompt_ids=cat("prompt_ids"), sizes=cat("sizes"), successes=cat("successes"),
                             positions=np.zeros(0, dtype=np.int64))

    # -- checks on a step's samples ----------------------------------------------------------------
    def _finish_step(self, samples: List[Experience]) -> List[Experience]:
        """Tag each training sample with its index in the step (``info[STEP_INDEX_KEY]``), count the prompts
        longer than the prompt budget, and check the rewards (:meth:`_check_rewards`): the samples to train on."""
        for i, exp in enumerate(samples):
            exp.info[STEP_INDEX_KEY] = torch.tensor([i], dtype=torch.int64)
        self._count_truncated(samples)
        return self._check_rewards(samples)

    def _check_rewards(self, samples: List[Experience], evaluation: bool = False) -> List[Experience]:
        """Every sample's reward and score must be finite. ``--dynamo.nonfinite error``:
        :class:`~dynamo_openrlhf.nonfinite.NonfiniteError` naming the samples (the reward first, then the
        score); ``drop``: the samples of every group (request) holding such a sample are removed, each logged,
        and counted in ``nonfinite_dropped`` (evaluation: logged, nothing removed)."""
        self.last_nonfinite_dropped = 0
        if not samples:
            return samples
        prompts = [e.prompts[0] if e.prompts else "" for e in samples]
        labels = [e.labels[0] if e.labels else "" for e in samples]
        positions = np.arange(len(samples), dtype=np.int64)
        reports = []
        for what in ("reward", "score"):
            vals = [getattr(e, what + "s") for e in samples]
            if all(v is None for v in vals):
                continue
            flat = np.array([float(v.reshape(-1)[0]) if v is not None else 0.0 for v in vals], dtype=np.float64)
            if np.isfinite(flat).all():
                continue
            reports.append(find_nonfinite(what, flat, prompt_ids(prompts, labels), positions, prompts=prompts))
        if not reports:
            return samples
        if self.nonfinite == "error":
            stage = "evaluation: " if evaluation else ""
            raise NonfiniteError(stage + reports[0].message(self.reward_source))
        if evaluation:
            for r in reports:
                for line in r.sample_lines():
                    print(f"[dynamo] --dynamo.nonfinite drop: evaluation {line}: counted as a failure", flush=True)
            return samples
        bad = np.unique(np.concatenate([r.positions for r in reports]))
        keep = keep_whole_groups(self._group_labels(samples), bad)
        for r in reports:
            for line in r.sample_lines():
                print(f"[dynamo] --dynamo.nonfinite drop: {line}: its group is dropped from the update and the pool",
                      flush=True)
        dropped = np.flatnonzero(~keep)
        print(f"[dynamo] --dynamo.nonfinite drop: dropped {dropped.size} of the step's {len(samples)} samples "
              f"(indices {dropped.tolist()})", flush=True)
        self.last_nonfinite_dropped = int(dropped.size)
        self.nonfinite_dropped += int(dropped.size)
        return [e for e, k in zip(samples, keep) if k]

    def _nonfinite_filtered_score(self, response: dict) -> None:
        """A non-finite score under --algo.dynamic_filtering_enable: OpenRLHF's filter would discard its group
        without a word (a NaN or infinite mean score is outside any range) before the step's checks see it, so it
        is handled as it arrives (its index in the step does not exist yet): an error, or (drop) logged and
        counted as one dropped sample (the filter discards the rest of its group)."""
        report = find_nonfinite("score", np.array([float(response["scores"])]),
                                prompt_ids([response["prompt"]], [response["label"]]), np.array([-1]),
                                prompts=[response["prompt"]])
        if self.nonfinite == "error":
            raise NonfiniteError(report.message(self.reward_source))
        print(f"[dynamo] --dynamo.nonfinite drop: {report.sample_lines()[0]}: its group is discarded by "
              "--algo.dynamic_filtering_enable", flush=True)
        self.nonfinite_dropped += 1

    def _group_labels(self, samples: List[Experience]) -> np.ndarray:
        """(S,) int64 group of each sample: its request's serial (tagged), else OpenRLHF's contiguous groups of
        --rollout.n_samples_per_prompt in step order."""
        if all(e.info.get(GROUP_KEY) is not None for e in samples):
            return np.array([int(e.info[GROUP_KEY].reshape(-1)[0]) for e in samples], dtype=np.int64)
        return np.arange(len(samples), dtype=np.int64) // int(self.args.rollout.n_samples_per_prompt)

    def _count_truncated(self, samples: List[Experience], evaluation: bool = False) -> int:
        """Distinct prompts of ``samples`` that the rollout engine cut to the prompt budget (OpenRLHF's agent
        executor keeps a too-long prompt's last ``max_len - max_new_tokens`` tokens without a word to the
        trainer): a prompt whose tokens (the run's tokenizer, no special tokens, as the engine tokenizes it)
        outnumber the prompt tokens of its sample. Training steps add to ``prompts_truncated``; the first time
        any prompt is cut, one warning with the numbers is printed."""
        if not samples or not callable(self.tokenizer):
            return 0
        seen, cut, longest, budget = set(), 0, 0, None
        for e in samples:
            prompt = e.prompts[0] if e.prompts else None
            if not isinstance(prompt, str) or prompt in seen or e.action_mask is None or not e.action_mask.any():
                continue
            seen.add(prompt)  # each distinct prompt of the step is tokenized once
            full = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            # action_mask covers tokens 1.. of the sequence: the first action token's index + 1 is the prompt length
            kept = int(torch.as_tensor(e.action_mask).reshape(-1).to(torch.int64).argmax()) + 1
            if full > kept:
                cut += 1
                longest = max(longest, full)
                budget = kept if budget is None else max(budget, kept)
        if not evaluation:
            self.prompts_truncated += cut
        if cut and not self._truncation_warned:
            self._truncation_warned = True
            where = "evaluation prompts" if evaluation else "prompts of this training step"
            print(f"[dynamo] WARNING: {cut} of the {len(seen)} {where} are longer than the prompt budget of "
                  f"{budget} tokens (longest {longest} tokens): the rollout engine kept only their last {budget} "
                  "tokens, so the policy and the reward function saw truncated prompts. The budget is --data.max_len "
                  "minus --rollout.max_new_tokens; raise --data.max_len. Counted per step as dynamo/prompts_truncated; "
                  "this warning is printed once.", flush=True)
        return cut

    def _generate_allocated(self, prompts, labels, images, exhausted: bool, **generate_kwargs):
        """``(kept samples, prompts consumed, loader exhausted, filter pass rate or None)`` of one step: one wave of
        requests, then (dynamic filtering) a refill wave per wave that dropped groups (module docstring)."""
        refs, requests = self._dispatch_allocated(prompts, labels, images, **generate_kwargs)
        out: List[Experience] = []
        consumed, groups_seen, groups_kept = len(prompts), 0, 0
        while refs:
            freed, dropped = 0, []
            for exps in self._collect_groups(refs, requests, **generate_kwargs):
                groups_seen += 1
                if self.filtering and self._no_signal(exps):
                    dropped.append(exps)
                    freed += len(exps)
                else:
                    groups_kept += 1
                    out.extend(exps)
            refs = []
            if dropped:
                self._drop(dropped)
            if freed and not exhausted:
                ratio = (self.num_candidates or self.args.rollout.batch_size) / self.args.rollout.batch_size
                k = max(len(dropped), int(round(len(dropped) * ratio)))
                prompts, labels, images, exhausted = _collect_prompt_batch(self._dataloader_iter, k)
                consumed += len(prompts)
                if prompts:
                    refs, requests = self._dispatch_allocated(prompts, labels, images, refill_budget=freed,
                                                              **generate_kwargs)
        rate = 100.0 * groups_kept / groups_seen if self.filtering and groups_seen else None
        return out, consumed, exhausted, rate

    def _collect_groups(self, refs, requests, **generate_kwargs):
        """Yield each request's samples (tagged, one group) as its engine call completes."""
        request_of = dict(zip(refs, requests))
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
            for ref in ready:
                group, prompt, label, n, pid = request_of[ref]
                responses = ray.get(ref)
                if len(responses) != n:
                    raise RuntimeError(f"rollout engine returned {len(responses)} samples for a request of n={n}")
                exps = []
                for response in responses:
                    if response["prompt"] != prompt or response["label"] != label:
                        raise RuntimeError("rollout engine returned a sample of another prompt/label for group "
                                           f"{group}; samples are never re-paired by position")
                    exp = self._process_response_into_experience(response, **generate_kwargs)
                    exp.info[PROMPT_ID_KEY] = torch.tensor([pid], dtype=torch.int64)
                    exp.info[GROUP_KEY] = torch.tensor([group], dtype=torch.int64)
                    exps.append(exp)
                yield exps

    @staticmethod
    def _no_signal(exps: List[Experience]) -> bool:
        """Dynamic filtering's test for one group: its rewards have no spread (:func:`zero_reward_spread`). A
        group without rewards at rollout time (a reward model scores later) is kept, as OpenRLHF keeps it; one
        with a non-finite reward or score is kept for the ``--dynamo.nonfinite`` check."""
        if any(e.rewards is None for e in exps):
            return False
        for what in ("rewards", "scores"):
            vals = [getattr(e, what) for e in exps]
            if all(v is not None for v in vals):
                flat = torch.cat([v.reshape(-1) for v in vals]).double().numpy()
                if not np.isfinite(flat).all():
                    return False
        return zero_reward_spread(torch.cat([e.rewards.reshape(-1) for e in exps]).double().numpy())

    def _drop(self, dropped: List[List[Experience]]) -> None:
        """Keep the outcomes of the dropped groups for the pool (in the order they came back) and count them."""
        flat = [e for exps in dropped for e in exps]
        self._filtered.append(RolloutGroups.from_experiences(flat, self.success_threshold))
        self.filtered_groups += len(dropped)
        self.filtered_rollouts += len(flat)
        self.last_filtered_rollouts += len(flat)

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch_prompts_to_vllm(
        self, prompts: List[str], labels: List[str], *, images: List = None, **generate_kwargs
    ) -> List:
        if self.rollout_allocator is None or self._evaluating:
            return super()._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        return self._dispatch_allocated(prompts, labels, images, **generate_kwargs)[0]

    def _dispatch_allocated(self, prompts, labels, images, refill_budget: Optional[int] = None,
                            **generate_kwargs) -> Tuple[List, List[tuple]]:
        """Refs and their requests ``(group serial, prompt, label, n, prompt id)``; prompts with n = 0 are not
        sent. Each (prompt, label) is hashed here, once per step. ``refill_budget``: these are refill prompts
        for that many dropped rollouts (``refill_allocator``), else the step's candidates (``rollout_allocator``)."""
        ids = prompt_ids(prompts, labels)
        if refill_budget is None:
            counts = _validate_allocation(self.rollout_allocator(ids), len(prompts))
        else:
            counts = _validate_allocation(self.refill_allocator(ids, int(refill_budget)), len(prompts))
            if sum(counts) > refill_budget:
                raise ValueError(f"refill_allocator spent {sum(counts)} rollouts, more than the {refill_budget} of "
                                 "the dropped groups")
        if images is None:
            images = [None] * len(prompts)
        todo = [(p, l, img, n, int(pid)) for p, l, img, n, pid in zip(prompts, labels, images, counts, ids) if n > 0]
        if not todo:
            return [], []

        # Same SamplingParams as OpenRLHF's method builds.
        sampling_params = SamplingParams(
            temperature=generate_kwargs.get("temperature", 1.0),
            top_p=generate_kwargs.get("top_p", 1.0),
            top_k=generate_kwargs.get("top_k", -1),
            max_tokens=generate_kwargs.get("max_new_tokens"),
            min_tokens=generate_kwargs.get("min_new_tokens", 1),
            skip_special_tokens=generate_kwargs.get("skip_special_tokens", False),
            logprobs=1 if self.args.algo.advantage.is_correction_level != "off" else None,
        )
        truncate_length = generate_kwargs.get("max_len", 2048)

        # OpenRLHF's load-aware assignment, with each prompt's own n as its load.
        pending_counts = ray.get([engine.get_num_unfinished_requests.remote() for engine in self.vllm_engines])
        engine_heap = [(count, idx) for idx, count in enumerate(pending_counts)]
        heapq.heapify(engine_heap)
        engine_indices = []
        for _, _, _, n, _ in todo:
            load, idx = heapq.heappop(engine_heap)
            engine_indices.append(idx)
            heapq.heappush(engine_heap, (load + n, idx))

        refs, requests = [], []
        for (prompt, label, img, n, pid), idx in zip(todo, engine_indices):
            refs.append(
                self.vllm_engines[idx].generate_responses.remote(
                    prompt=prompt,
                    label=label,
                    sampling_params=sampling_params,
                    max_length=truncate_length,
                    hf_tokenizer=self.tokenizer,
                    num_samples=n,
                    images=img,
                )
            )
            requests.append((self._next_group, prompt, label, n, pid))
            self._next_group += 1
        return refs, requests

    def _process_response_into_experience(self, response, **generate_kwargs) -> Experience:
        # Every sample of a run with a reward function passes here: training with or without an
        # allocator (OpenRLHF's own _generate_vllm calls this method too) and evaluation.
        if self.reward_source is not None:
            check_reward(response, self.reward_source)
        if (self.args.algo.dynamic_filtering_enable and not self._evaluating and self.rollout_allocator is None
                and response.get("scores") is not None and not np.isfinite(float(response["scores"]))):
            self._nonfinite_filtered_score(response)
        exp = super()._process_response_into_experience(response, **generate_kwargs)
        if not self._evaluating:
            self.generated_rollouts += 1
            self.generated_tokens += int(exp.action_mask.sum())
        return exp


# ----------------------------------------------------------------------------------------------
# Reading the groups back
# ----------------------------------------------------------------------------------------------


def _flat_tag(exp: Experience, key: str, i: int) -> np.ndarray:
    tag = exp.info.get(key) if exp.info is not None else None
    if tag is None:
        raise ValueError(f"experience {i} has no info[{key!r}]; was it made by DynamoSamplesGenerator?")
    return np.asarray(torch.as_tensor(tag).reshape(-1).cpu().numpy(), dtype=np.int64)


def outcome_values(exp: Experience, i: int = 0) -> np.ndarray:
    """The values a sample's success is judged on, float64 (one per sample of ``exp``): its score (what
    the reward function returns as ``scores``; OpenRLHF sets it to the reward when the function returns
    none), else its reward (rewards from a reward model, which have no score)."""
    value = exp.scores if exp.scores is not None else exp.rewards
    if value is None:
        raise ValueError(f"experience {i} has neither scores nor rewards")
    return np.asarray(torch.as_tensor(value).reshape(-1).float().cpu().numpy(), dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class RolloutGroups:
    """The groups of one step's samples, in rollout order (the order of ``Experience.index``).

    ``prompt_ids`` (G,) int64, ``sizes`` (G,) int64 (samples per group, sum = S), ``successes`` (G,)
    int64 (samples that succeed by :func:`is_success`), and
    ``positions`` (S,) int64: the rollout-order position of each sample of the experiences, read in
    list order (so ``flat[positions] = torch.cat(values)`` puts per-sample values in group order).
    ``noise_success``, ``noise_failure`` (G,) float64 or None: per group, the sum of the noise proxy q
    (:func:`~dynamo_openrlhf.noise_proxy.noise_proxy`) over its successful / failed samples (exactly 0 for a
    class the group has no sample of); None unless read with ``noise_proxy``.
    """

    prompt_ids: np.ndarray
    sizes: np.ndarray
    successes: np.ndarray
    positions: np.ndarray
    noise_success: Optional[np.ndarray] = None
    noise_failure: Optional[np.ndarray] = None

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())

    def uniform_size(self) -> Optional[int]:
        """The common group size when all groups have it, else None."""
        if self.sizes.size and (self.sizes == self.sizes[0]).all():
            return int(self.sizes[0])
        return None

    @classmethod
    def from_experiences(cls, experiences: Sequence[Experience], success_threshold: float = 0.5,
                         pop_tags: bool = False, noise_proxy: Optional[str] = None) -> "RolloutGroups":
        """Read the tags written by :class:`DynamoSamplesGenerator`.

        Each experience may hold several samples; ``Experience.index`` (set by OpenRLHF's experience
        maker) gives their positions in rollout order (without it, list order is used). Raises
        ``ValueError`` for an untagged sample, positions that are not a permutation of 0..S-1, or a
        group whose samples are not contiguous in rollout order (never regrouped). ``pop_tags``
        removes the tags from ``info`` (so OpenRLHF does not log ids as metrics). ``noise_proxy`` (a name of
        :data:`~dynamo_openrlhf.noise_proxy.NOISE_PROXIES`): also sum each sample's proxy, from its
        ``action_log_probs`` and ``action_mask`` (the actor's forward in OpenRLHF's ``make_experience``), per
        group and outcome class (``noise_success``/``noise_failure``); ValueError for an experience without them.
        """
        groups, pids, pos, vals, qs = [], [], [], [], []
        start = 0
        for i, exp in enumerate(experiences):
            g = _flat_tag(exp, GROUP_KEY, i)
            p = _flat_tag(exp, PROMPT_ID_KEY, i)
            if g.size != p.size:
                raise ValueError(f"experience {i}: {g.size} group tags but {p.size} prompt-id tags")
            idx = np.arange(start, start + g.size) if exp.index is None else np.asarray(exp.index, dtype=np.int64)
            if idx.size != g.size:
                raise ValueError(f"experience {i}: {idx.size} index entries for {g.size} samples")
            v = outcome_values(exp, i)
            if v.size != g.size:
                raise ValueError(f"experience {i}: {v.size} scores for {g.size} samples")
            groups.append(g), pids.append(p), pos.append(idx), vals.append(v)
            if noise_proxy is not None:
                if exp.action_log_probs is None or exp.action_mask is None:
                    raise ValueError(f"experience {i} has no action_log_probs/action_mask: --dynamo.allocation."
                                     f"noise_scale {noise_proxy} reads the actor's log-probs of OpenRLHF's "
                                     "make_experience")
                q = _noise_proxy(noise_proxy, exp.action_log_probs, exp.action_mask)
                if q.size != g.size:
                    raise ValueError(f"experience {i}: {q.size} rows of action_log_probs for {g.size} samples")
                qs.append(q)
            start += g.size
            if pop_tags:
                exp.info.pop(GROUP_KEY, None)
                exp.info.pop(PROMPT_ID_KEY, None)
        if not groups:
            empty = np.zeros(0, dtype=np.int64)
            none = np.zeros(0, dtype=np.float64) if noise_proxy is not None else None
            return cls(empty, empty, empty, empty, none, none)
        positions = np.concatenate(pos)
        total = positions.size
        if not np.array_equal(np.sort(positions), np.arange(total)):
            raise ValueError("Experience.index is not a permutation of the step's sample positions")
        order = np.empty(total, dtype=np.int64)
        order[positions] = np.arange(total)  # rollout position -> sample in list order
        g_sorted = np.concatenate(groups)[order]
        p_sorted = np.concatenate(pids)[order]
        ok = is_success(np.concatenate(vals)[order], success_threshold).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
        uniq, runs = np.unique(g_sorted[starts], return_counts=True)
        if (runs > 1).any():
            raise ValueError(f"samples of group(s) {uniq[runs > 1].tolist()[:5]} are not contiguous in rollout "
                             "order; groups are never regrouped")
        ends = np.r_[starts[1:], total]
        if (np.maximum.reduceat(p_sorted, starts) != np.minimum.reduceat(p_sorted, starts)).any():
            raise ValueError("a group holds samples of different prompts")
        noise_success = noise_failure = None
        if noise_proxy is not None:
            q = np.concatenate(qs)[order]  # rollout order, like ok
            # where(), not q * ok: a class without samples sums to exactly 0, as the pool requires
            noise_success = np.add.reduceat(np.where(ok == 1, q, 0.0), starts)
            noise_failure = np.add.reduceat(np.where(ok == 1, 0.0, q), starts)
        return cls(
            prompt_ids=p_sorted[starts].astype(np.int64),
            sizes=(ends - starts).astype(np.int64),
            successes=np.add.reduceat(ok, starts).astype(np.int64),
            positions=positions.astype(np.int64),
            noise_success=noise_success,
            noise_failure=noise_failure,
        )


def merge_filtered_groups(groups: RolloutGroups, filtered: Optional[RolloutGroups],
                          class_means: Tuple[Optional[float], Optional[float]] = (None, None)):
    """One step's pool update rows: the trained ``groups`` followed by the ``filtered`` ones (dynamic filtering's
    dropped groups, :meth:`DynamoSamplesGenerator.take_filtered`), as ``(prompt_ids, successes, trials,
    noise_success, noise_failure)`` (int64 (M,) x 3, then float64 (M,) or None).

    Noise sums (``groups`` read with a noise proxy): the dropped groups never reach the actor's forward, so
    their rollouts have no proxy; each is counted at its class's mean q (``class_means`` = the pool's
    :attr:`~dynamo_openrlhf._core.PassRatePool.noise_means` before the update, else the trained groups' mean
    of the class in this step), which is what the pool itself does for a rollout without noise, so the class
    means do not move. When a dropped rollout's class has neither mean, the step passes no noise at all
    (both None; the pool then counts every rollout of a started class at its mean)."""
    rows = (groups.prompt_ids, groups.successes, groups.sizes)
    ns, nf = groups.noise_success, groups.noise_failure
    if filtered is None or filtered.sizes.size == 0:
        return (*rows, ns, nf)
    ids = np.concatenate([groups.prompt_ids, filtered.prompt_ids]).astype(np.int64)
    succ = np.concatenate([groups.successes, filtered.successes]).astype(np.int64)
    trials = np.concatenate([groups.sizes, filtered.sizes]).astype(np.int64)
    if ns is None or nf is None:
        return ids, succ, trials, None, None
    fs = filtered.successes.astype(np.float64)
    ff = (filtered.sizes - filtered.successes).astype(np.float64)
    out = []
    for count, kept_sum, kept_count, pool_mean in ((fs, ns, groups.successes, class_means[0]),
                                                   (ff, nf, groups.sizes - groups.successes, class_means[1])):
        mean = pool_mean
        if mean is None and kept_count.sum() > 0:
            mean = float(np.sum(kept_sum)) / float(kept_count.sum())
        if mean is None:
            if count.sum() > 0:
                return ids, succ, trials, None, None
            mean = 0.0
        out.append(np.concatenate([np.asarray(kept_sum, dtype=np.float64), count * float(mean)]))
    return ids, succ, trials, out[0], out[1]
