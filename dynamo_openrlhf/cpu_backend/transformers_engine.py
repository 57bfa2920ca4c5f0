"""The transformers stand-in rollout engine (``--dynamo.cpu_engine transformers``, the fallback without vLLM's
CPU build) and its weight sync.

``CPURolloutActor`` — a Ray actor exposing the methods of OpenRLHF's vLLM ``RolloutRayActor``
(``generate``, ``generate_responses``, ``get_num_unfinished_requests``, sleep/wake/pause/resume,
``init_process_group``/``update_weight`` stubs, plus ``update_weights``). ``generate_responses``
is OpenRLHF's own method and its agent executors (so rewards are computed exactly as on GPU).
``generate(prompt_token_ids, sampling_params)`` honours ``sampling_params.n`` and returns a
vLLM-like ``RequestOutput`` with ``n`` completions; concurrent requests (all prompts of a step,
each with its own ``n``) are batched into one ``transformers`` ``generate`` call per compatible
sampling setting.

Weight sync: the stand-in has no vLLM worker to broadcast to, so ``ActorPPOTrainer`` skips the NCCL group
(``_skip_vllm_sync_group``) and ``_broadcast_to_engines_via_object_store`` gathers the parameters (ZeRO-3
aware, on every rank), puts one state dict into the Ray object store and calls ``update_weights`` on every
engine (wired in by ``rollout_engines``).

Importing this module imports neither torch, Ray nor transformers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional

from dynamo_openrlhf.cpu_backend.process_patches import apply_process_patches


class _Logprob:
    __slots__ = ("logprob", "rank", "decoded_token")

    def __init__(self, logprob: float):
        self.logprob = logprob
        self.rank = None
        self.decoded_token = None


class CompletionOutput:
    """The fields of ``vllm.outputs.CompletionOutput`` OpenRLHF reads."""

    def __init__(self, index, token_ids, text, finish_reason, logprobs=None):
        self.index = index
        self.token_ids = token_ids
        self.text = text
        self.finish_reason = finish_reason  # "stop" (EOS) or "length"
        self.logprobs = logprobs  # None or [{token_id: Logprob}] per generated token
        self.cumulative_logprob = None
        self.stop_reason = None

    def __repr__(self):
        return f"CompletionOutput(index={self.index}, finish_reason={self.finish_reason!r}, token_ids={self.token_ids})"


class RequestOutput:
    """The fields of ``vllm.outputs.RequestOutput`` OpenRLHF reads: one entry per sample (n)."""

    def __init__(self, request_id, prompt_token_ids, outputs):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = outputs
        self.finished = True

    def __repr__(self):
        return f"RequestOutput(request_id={self.request_id!r}, outputs={self.outputs})"


class _Request:
    __slots__ = ("prompt", "params", "future")

    def __init__(self, prompt, params, future):
        self.prompt = prompt
        self.params = params
        self.future = future


def _sampling_key(params) -> tuple:
    """Requests sharing this key are sampled in one batch (max_tokens may differ: each row is
    cut at its own limit, which is the same distribution)."""
    top_k = getattr(params, "top_k", -1)
    return (
        float(getattr(params, "temperature", 1.0) or 0.0),
        float(getattr(params, "top_p", 1.0) or 1.0),
        int(top_k if top_k is not None else -1),
        int(getattr(params, "min_tokens", 0) or 0),
        getattr(params, "logprobs", None) is not None,
        bool(getattr(params, "skip_special_tokens", True)),
    )


class CPURolloutActor:
    """A ``transformers`` stand-in for OpenRLHF's vLLM ``RolloutRayActor`` (see the module docstring).

    Created through ``create_cpu_rollout_engines`` as an async Ray actor.
    """

    # Window in which concurrently submitted requests are collected into one batch.
    BATCH_WINDOW_S = 0.02
    MAX_BATCH_ROWS = 256

    def __init__(self, *args, bundle_indices=None, agent_func_path: Optional[str] = None,
                 remote_rm_url=None, mm_pad_token_ids=None, **kwargs):
        apply_process_patches()  # the engine wiring is the driver's and the trainer's, not an engine's
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # update_weights receives read-only zero-copy tensors and copies them into the model
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

        from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        model = kwargs.get("model") or (args[0] if args else None)
        if model is None:
            raise ValueError("CPURolloutActor needs model=<path>")
        self.kwargs = kwargs
        self._seed = int(kwargs.get("seed", 0))
        torch.manual_seed(self._seed)
        # float32 on CPU: faster than bf16 matmuls here and closer to the actor's float32 logits.
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, trust_remote_code=True).eval()
        self.model.config.use_cache = True
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
        self.eos_token_id = self.model.generation_config.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if not isinstance(self.eos_token_id, list) else self.eos_token_id[0]
        self.max_model_len = kwargs.get("max_model_len")

        if agent_func_path:
            self.executor = _load_agent_executor(agent_func_path)
        else:
            self.executor = SingleTurnAgentExecutor(remote_rm_url)
        self._mm_pad_token_ids = mm_pad_token_ids

        self._queue: List[_Request] = []
        self._wake: Optional[asyncio.Event] = None
        self._resumed: Optional[asyncio.Event] = None
        self._lock: Optional[asyncio.Lock] = None
        self._loop_task = None
        self._in_flight = 0
        self.num_batches = 0
        self.num_weight_updates = 0

    # -- engine control (vLLM interface) ------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._resumed = asyncio.Event()
            self._resumed.set()
            self._lock = asyncio.Lock()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def init_process_group(self, *args, **kwargs):
        """No collective group on CPU (weights arrive through ``update_weights``)."""
        return None

    async def update_weight(self, name, dtype, shape, empty_cache=False):
        raise NotImplementedError("CPURolloutActor receives weights through update_weights(state_dict)")

    async def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles, empty_cache=False):
        raise NotImplementedError("CPURolloutActor receives weights through update_weights(state_dict)")

    async def update_weights(self, state_dict: Dict[str, Any]) -> int:
        """Load a (partial) state dict of the policy; returns how many tensors were loaded."""
        self._ensure_loop()
        async with self._lock:
            own = self.model.state_dict()
            unknown = [k for k in state_dict if k not in own]
            if unknown:
                raise KeyError(f"weights not in the rollout model: {unknown[:5]}")
            self.model.load_state_dict(state_dict, strict=False)
            self.num_weight_updates += 1
            checksum = float(sum(t.double().sum() for t in state_dict.values()))
        print(f"[CPURolloutActor] weights update {self.num_weight_updates}: {len(state_dict)} tensors, "
              f"checksum {checksum:.6f}", flush=True)
        return len(state_dict)

    async def reset_prefix_cache(self):
        return None

    async def pause_generation(self):
        self._ensure_loop()
        self._resumed.clear()

    async def resume_generation(self):
        self._ensure_loop()
        self._resumed.set()

    async def sleep(self, level=1):
        return None

    async def wake_up(self, tags=None):
        return None

    def get_num_unfinished_requests(self) -> int:
        return len(self._queue) + self._in_flight

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        """One request: ``sampling_params.n`` samples of one prompt -> a ``RequestOutput``."""
        if multi_modal_data:
            raise NotImplementedError("CPURolloutActor is text-only")
        self._ensure_loop()
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(list(prompt_token_ids), sampling_params, fut))
        self._wake.set()
        return await fut

    async def generate_responses(self, *args, **kwargs):
        """OpenRLHF's own ``RolloutRayActor.generate_responses`` (agent executor + reward)."""
        from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

        return await RolloutRayActor.__ray_actor_class__.generate_responses(self, *args, **kwargs)

    async def _batch_loop(self):
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._resumed.wait()
            # Collect the burst of requests OpenRLHF sends for one step.
            deadline = time.monotonic() + self.BATCH_WINDOW_S
            seen = -1
            while len(self._queue) != seen and time.monotonic() < deadline:
                seen = len(self._queue)
                await asyncio.sleep(self.BATCH_WINDOW_S / 4)
            batch, self._queue = self._queue, []
            groups: Dict[tuple, List[_Request]] = {}
            for req in batch:
                try:
                    groups.setdefault(_sampling_key(req.params), []).append(req)
                except Exception as e:  # a malformed request fails alone
                    req.future.set_exception(e)
            for reqs in groups.values():
                for chunk in self._chunks(reqs):
                    self._in_flight += len(chunk)
                    try:
                        async with self._lock:
                            results = await asyncio.to_thread(self._generate_batch, chunk)
                        for req, res in zip(chunk, results):
                            if not req.future.done():
                                req.future.set_result(res)
                    except Exception as e:  # deliver the error to every waiting request
                        for req in chunk:
                            if not req.future.done():
                                req.future.set_exception(e)
                    finally:
                        self._in_flight -= len(chunk)
                    self.num_batches += 1
            if self._queue:
                self._wake.set()

    def get_stats(self) -> Dict[str, int]:
        """Counters (for tests/debugging): generate batches run and weight updates received."""
        return {"batches": self.num_batches, "weight_updates": self.num_weight_updates}

    def _chunks(self, reqs: List[_Request]):
        chunk, rows = [], 0
        for req in reqs:
            n = max(1, int(getattr(req.params, "n", 1) or 1))
            if chunk and rows + n > self.MAX_BATCH_ROWS:
                yield chunk
                chunk, rows = [], 0
            chunk.append(req)
            rows += n
        if chunk:
            yield chunk

    def _generate_batch(self, reqs: List[_Request]) -> List[RequestOutput]:
        import torch

        params0 = reqs[0].params
        temperature, top_p, top_k, min_tokens, want_logprobs, skip_special = _sampling_key(params0)
        rows: List[List[int]] = []
        limits: List[int] = []
        owners: List[int] = []
        for i, req in enumerate(reqs):
            n = max(1, int(getattr(req.params, "n", 1) or 1))
            limit = getattr(req.params, "max_tokens", None)
            if limit is None:
                limit = max(1, (self.max_model_len or 2048) - len(req.prompt))
            for _ in range(n):
                rows.append(req.prompt)
                limits.append(int(limit))
                owners.append(i)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            if r:
                ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[j, width - len(r):] = 1
        gen_kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(limits),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=want_logprobs,
            use_cache=True,
        )
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0)
        else:
            gen_kwargs.update(do_sample=False)
        if min_tokens > 0:
            gen_kwargs["min_new_tokens"] = min_tokens
        with torch.no_grad():
            out = self.model.generate(**gen_kwargs)
        new_tokens = out.sequences[:, width:].tolist()
        step_logprobs = None
        if want_logprobs:
            # processed log-probs (after temperature / top-p), like vLLM's "processed_logprobs"
            step_logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)

        eos = set(self.eos_token_id) if isinstance(self.eos_token_id, list) else {self.eos_token_id}
        per_req: List[List[CompletionOutput]] = [[] for _ in reqs]
        for j, toks in enumerate(new_tokens):
            limit = limits[j]
            kept, reason = [], "length"
            for t in toks[:limit]:
                kept.append(t)
                if t in eos:
                    reason = "stop"
                    break
            lps = None
            if step_logprobs is not None:
                lps = [{t: _Logprob(float(step_logprobs[j, k, t]))} for k, t in enumerate(kept)]
            text = self.tokenizer.decode(kept, skip_special_tokens=skip_special)
            owner = owners[j]
            per_req[owner].append(CompletionOutput(len(per_req[owner]), kept, text, reason, lps))
        return [RequestOutput(uuid.uuid4().hex, req.prompt, per_req[i]) for i, req in enumerate(reqs)]


def _skip_vllm_sync_group(self, backend: str) -> None:
    """No NCCL group on CPU: weights travel through the Ray object store."""
    self._model_update_group = None


def _broadcast_to_engines_via_object_store(self) -> None:
    """CPU replacement of ``ActorPPOTrainer.broadcast_to_vllm``: every rank takes part in the
    (ZeRO-3 / TP) gathers, rank 0 ships one state dict to all engines through the object store."""
    import deepspeed
    import ray
    import torch

    from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

    args = self.strategy.args
    model = self.actor.model.module
    rank0 = torch.distributed.get_rank() == 0
    is_vlm = getattr(self.actor, "is_vlm", False)

    def gathered(param):
        if args.ds.tensor_parallel_size > 1:
            return deepspeed.module_inject.layers.GatherReplacedLayerParams([param], model, enabled=True)
        return deepspeed.zero.GatheredParameters([param], enabled=args.ds.zero_stage == 3)

    state: Dict[str, Any] = {}
    for name, param in model.named_parameters():
        if not (param.requires_grad or not is_vlm):
            continue
        with gathered(param):
            if rank0:
                state[name] = param.data.detach().to("cpu", copy=True)
    if rank0:
        with warnings.catch_warnings():  # the tensors are private copies: zero-copy is safe
            warnings.simplefilter("ignore")
            ref = ray.put(state)
        ray.get([engine.update_weights.remote(ref) for engine in self.vllm_engines])
    torch_dist_barrier_and_cuda_sync()
