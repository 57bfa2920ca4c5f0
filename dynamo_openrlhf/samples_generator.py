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
- With ``rollout_allocator = None`` (default), and always during evaluation, OpenRLHF's own
  methods run unchanged (and nothing is tagged). ``last_eval_samples`` keeps the last evaluation's
  samples (for pass@k).
- ``generated_rollouts`` / ``generated_tokens``: running totals of the training samples (and their
  response tokens) that came back from the engines, counted before OpenRLHF's dynamic filtering drops
  any group, so they include discarded ones; evaluation samples are not counted.

:class:`RolloutGroups` turns tagged samples back into groups (prompt id, size, successes) in
rollout order; the experience maker and the pool update use it, nothing else regroups samples.

Importing this module imports ``vllm`` like OpenRLHF does; without CUDA call
``dynamo_openrlhf.cpu_backend.install_import_stand_ins()`` first.
"""

from __future__ import annotations

import heapq
import inspect
import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch
from vllm import SamplingParams

from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator, _collect_prompt_batch
from openrlhf.trainer.ray.vllm_engine import batch_vllm_engine_call

from .evaluate import is_success
from .noise_proxy import noise_proxy as _noise_proxy
from .prompt_ids import prompt_ids

__all__ = ["DynamoSamplesGenerator", "RolloutGroups", "PROMPT_ID_KEY", "GROUP_KEY", "check_reward", "reward_source",
           "outcome_values", "is_success"]

PROMPT_ID_KEY = "dynamo_prompt_id"
GROUP_KEY = "dynamo_group"

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
    """

    def __init__(self, *args, rollout_allocator: Optional[Callable] = None, num_candidates: Optional[int] = None,
                 reward_source: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_allocator = rollout_allocator
        self.num_candidates = num_candidates
        self.reward_source = reward_source
        self._evaluating = False
        self._next_group = 0
        self.last_eval_samples: List[Experience] = []
        # Training rollouts generated so far (evaluation excluded), counted as each response comes back:
        # also the groups OpenRLHF's --algo.dynamic_filtering_enable discards and re-samples.
        self.generated_rollouts = 0
        self.generated_tokens = 0  # their response tokens (action_mask)

    def generate_eval_samples(self, **generate_kwargs) -> List[Experience]:
        # Evaluation keeps OpenRLHF's fixed n (the eval n_samples_per_prompt); no allocation.
        self._evaluating = True
        try:
            self.last_eval_samples = super().generate_eval_samples(**generate_kwargs)
            return self.last_eval_samples
        finally:
            self._evaluating = False

    # -- one training step -------------------------------------------------------------------------
    @torch.no_grad()
    def generate_samples(self, **generate_kwargs) -> Tuple[List[Experience], Optional[float], int, bool]:
        """One step: ``(samples, None, prompts_consumed, loader_exhausted)`` like OpenRLHF's. With an
        allocator, exactly ``sum(n_i)`` samples (the allocator's budget) from ``num_candidates`` prompts."""
        if self.rollout_allocator is None:
            return super().generate_samples(**generate_kwargs)
        if getattr(self, "_dataloader_iter", None) is None:
            self._dataloader_iter = iter(self.prompts_dataloader)
        num = self.num_candidates or self.args.rollout.batch_size
        prompts, labels, images, exhausted = _collect_prompt_batch(self._dataloader_iter, num)
        experiences: List[Experience] = []
        if prompts:
            if self.args.vllm.enable_sleep:
                batch_vllm_engine_call(self.vllm_engines, "wake_up")
            try:
                experiences = self._generate_allocated(prompts, labels, images, **generate_kwargs)
            finally:
                if self.args.vllm.enable_sleep:
                    batch_vllm_engine_call(self.vllm_engines, "sleep")
        if exhausted:
            self._dataloader_iter = None
        return experiences, None, len(prompts), exhausted

    def _generate_allocated(self, prompts, labels, images, **generate_kwargs) -> List[Experience]:
        refs, requests = self._dispatch_allocated(prompts, labels, images, **generate_kwargs)
        request_of = dict(zip(refs, requests))
        out: List[Experience] = []
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
            for ref in ready:
                group, prompt, label, n, pid = request_of[ref]
                responses = ray.get(ref)
                if len(responses) != n:
                    raise RuntimeError(f"rollout engine returned {len(responses)} samples for a request of n={n}")
                for response in responses:
                    if response["prompt"] != prompt or response["label"] != label:
                        raise RuntimeError("rollout engine returned a sample of another prompt/label for group "
                                           f"{group}; samples are never re-paired by position")
                    exp = self._process_response_into_experience(response, **generate_kwargs)
                    exp.info[PROMPT_ID_KEY] = torch.tensor([pid], dtype=torch.int64)
                    exp.info[GROUP_KEY] = torch.tensor([group], dtype=torch.int64)
                    out.append(exp)
        return out

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch_prompts_to_vllm(
        self, prompts: List[str], labels: List[str], *, images: List = None, **generate_kwargs
    ) -> List:
        if self.rollout_allocator is None or self._evaluating:
            return super()._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        return self._dispatch_allocated(prompts, labels, images, **generate_kwargs)[0]

    def _dispatch_allocated(self, prompts, labels, images, **generate_kwargs) -> Tuple[List, List[tuple]]:
        """Refs and their requests ``(group serial, prompt, label, n, prompt id)``; prompts with n = 0 are not
        sent. Each (prompt, label) is hashed here, once per step."""
        ids = prompt_ids(prompts, labels)
        counts = _validate_allocation(self.rollout_allocator(ids), len(prompts))
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
