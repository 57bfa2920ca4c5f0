"""OpenRLHF 0.11.2's ``SamplesGenerator`` with a per-prompt number of rollouts and prompt-id tags.

``DynamoSamplesGenerator`` changes two methods of
``openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator``:

- ``_dispatch_prompts_to_vllm``: when ``self.rollout_allocator`` is set (a callable
  ``(prompts, labels) -> per-prompt n``), every prompt is sent as ONE request with its own
  ``num_samples = n_i``; prompts with ``n_i = 0`` are not dispatched. OpenRLHF's load-aware engine
  assignment is kept, with each prompt's own ``n_i`` as its load. With ``rollout_allocator = None``
  (default), and always during evaluation, OpenRLHF's own method runs unchanged.
- ``_process_response_into_experience``: every Experience gets ``info["dynamo_prompt_id"]``
  (``torch.int64`` tensor ``[id]``, :func:`dynamo_openrlhf.prompt_ids.prompt_id` of its own prompt and
  label).

:func:`group_sizes_from_experiences` recovers the groups (consecutive samples of one prompt) from the tags.

Importing this module imports ``vllm`` like OpenRLHF does; without CUDA call
``dynamo_openrlhf.cpu_backend.install_import_stand_ins()`` first.
"""

from __future__ import annotations

import heapq
import inspect
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch
from vllm import SamplingParams

from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

from .prompt_ids import prompt_id

__all__ = ["DynamoSamplesGenerator", "group_sizes_from_experiences", "PROMPT_ID_KEY"]

PROMPT_ID_KEY = "dynamo_prompt_id"

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
    """``SamplesGenerator`` whose prompts each get their own number of rollouts (see module docstring)."""

    def __init__(self, *args, rollout_allocator: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_allocator = rollout_allocator
        self._evaluating = False
        self.last_allocation: Optional[List[int]] = None

    def generate_eval_samples(self, **generate_kwargs) -> List[Experience]:
        # Evaluation keeps OpenRLHF's fixed n (the eval n_samples_per_prompt); no allocation.
        self._evaluating = True
        try:
            return super().generate_eval_samples(**generate_kwargs)
        finally:
            self._evaluating = False

    def _dispatch_prompts_to_vllm(
        self, prompts: List[str], labels: List[str], *, images: List = None, **generate_kwargs
    ) -> List:
        if self.rollout_allocator is None or self._evaluating:
            return super()._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)

        counts = _validate_allocation(self.rollout_allocator(list(prompts), list(labels)), len(prompts))
        self.last_allocation = counts
        if images is None:
            images = [None] * len(prompts)
        todo = [(p, l, img, n) for p, l, img, n in zip(prompts, labels, images, counts) if n > 0]
        if not todo:
            return []

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
        for _, _, _, n in todo:
            load, idx = heapq.heappop(engine_heap)
            engine_indices.append(idx)
            heapq.heappush(engine_heap, (load + n, idx))

        refs = []
        for (prompt, label, img, n), idx in zip(todo, engine_indices):
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
        return refs

    def _process_response_into_experience(self, response, **generate_kwargs) -> Experience:
        experience = super()._process_response_into_experience(response, **generate_kwargs)
        experience.info[PROMPT_ID_KEY] = torch.tensor([prompt_id(response["prompt"], response["label"])],
                                                      dtype=torch.int64)
        return experience


def group_sizes_from_experiences(experiences: Sequence[Experience]) -> Tuple[np.ndarray, np.ndarray]:
    """Contiguous groups of the tagged experiences: ``(prompt_ids, sizes)``, both ``int64``, in order.

    Each experience may hold several samples (``info["dynamo_prompt_id"]`` of any length); their ids are
    read in order. A prompt whose samples are not contiguous raises ``ValueError`` (never regrouped); an
    untagged experience raises ``ValueError`` too. Note: identical (prompt, label) pairs share an id, so
    two such prompts in one batch read as one group when adjacent and raise when not.
    """
    chunks = []
    for i, exp in enumerate(experiences):
        tag = exp.info.get(PROMPT_ID_KEY) if exp.info is not None else None
        if tag is None:
            raise ValueError(f"experience {i} has no info[{PROMPT_ID_KEY!r}]; was it made by DynamoSamplesGenerator?")
        chunks.append(np.asarray(torch.as_tensor(tag).reshape(-1).cpu().numpy(), dtype=np.int64))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    group_ids = ids[starts]
    sizes = np.diff(np.r_[starts, ids.size]).astype(np.int64)
    uniq, counts = np.unique(group_ids, return_counts=True)
    if (counts > 1).any():
        bad = uniq[counts > 1]
        raise ValueError(
            f"samples of prompt id(s) {bad.tolist()[:5]} are not contiguous ({int(counts.max())} separate runs); "
            "groups must be contiguous"
        )
    return group_ids.astype(np.int64), sizes
