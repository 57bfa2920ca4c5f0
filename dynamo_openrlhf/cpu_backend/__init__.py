"""CPU backend: the one place where stand-ins for GPU-only pieces live.

``python -m dynamo_openrlhf.train`` runs OpenRLHF 0.11.2's own Ray PPO/GRPO loop. Without CUDA
(``torch.cuda.is_available()`` is False) this package makes that loop run on CPU; with CUDA none of
it is applied. One module per concept (each says in its docstring what it adapts and why):

* ``settings`` — what the driver decides for every process of a CPU run (``DYNAMO_OPENRLHF_*`` environment
  variables: backend, rollout engine, KV-cache size, number format) and ``cpu_engine`` / ``cpu_dtype``,
  which read it.
* ``import_stand_ins`` — ``install_import_stand_ins``: pure-torch ``flash_attn`` padding helpers and the
  few ``vllm`` names OpenRLHF imports, only when the real package does not import.
* ``process_patches`` — ``torch.cuda`` no-ops, device mesh on CPU, DeepSpeed without its JIT ops and with
  ``torch.optim.AdamW``, replay buffer and EMA on CPU, float32 training (``--dynamo.cpu_dtype fp32``).
* ``vllm_on_cpu`` — the rollout engine choice (``resolve_cpu_engine``), OpenRLHF's ``RolloutRayActor`` on
  vLLM's CPU build: ``GlooWeightSyncGroup`` for OpenRLHF's own weight sync, ``CPUWorkerWrap`` as vLLM worker
  extension, the engine arguments and its shutdown.
* ``transformers_engine`` — ``CPURolloutActor``, the stand-in engine on ``transformers`` ``generate`` (the
  fallback), and its weight sync through the Ray object store.
* ``rollout_engines`` — ``create_cpu_rollout_engines`` (drop-in for OpenRLHF's ``create_vllm_engines``),
  ``shutdown_cpu_rollout_engines``, and the patch that makes OpenRLHF's trainer use them.
* ``activation`` — ``apply_cpu_patches`` (process patches + rollout engines; idempotent), ``apply_if_chosen``
  and ``setup_ray_worker`` (the Ray workers' ``worker_process_setup_hook``).
* ``ray_setup`` — ``ray_init`` (fake GPUs, no dashboard, no pre-started workers; a local start that fails
  Ray's fixed start-up limits is retried once) and ``required_gpus``.

The names below are the backend's public entry points (the launcher, the trainer glue and the tests import
them from here). Nothing here is imported by ``dynamo_openrlhf/__init__.py`` and importing this package
imports neither torch nor openrlhf: the standalone allocator never pulls them in.
"""

from __future__ import annotations

from dynamo_openrlhf.cpu_backend.activation import (
    apply_cpu_patches,
    apply_if_chosen,
    cpu_patches_applied,
    setup_ray_worker,
)
from dynamo_openrlhf.cpu_backend.import_stand_ins import install_import_stand_ins, stand_ins_installed
from dynamo_openrlhf.cpu_backend.process_patches import cuda_available, set_cpu_env
from dynamo_openrlhf.cpu_backend.ray_setup import ray_init, required_gpus
from dynamo_openrlhf.cpu_backend.rollout_engines import create_cpu_rollout_engines, shutdown_cpu_rollout_engines
from dynamo_openrlhf.cpu_backend.settings import (
    BACKEND_ENV,
    CPU_DTYPES,
    CPU_ENGINES,
    DEFAULT_CPU_DTYPE,
    DEFAULT_KV_CACHE_MB,
    DTYPE_ENV,
    ENGINE_ENV,
    KV_CACHE_ENV,
    THREADS_ENV,
    cpu_dtype,
    cpu_engine,
)
from dynamo_openrlhf.cpu_backend.transformers_engine import CPURolloutActor
from dynamo_openrlhf.cpu_backend.vllm_on_cpu import (
    CPUWorkerWrap,
    GlooWeightSyncGroup,
    resolve_cpu_engine,
    vllm_cpu_build,
)

__all__ = [
    "install_import_stand_ins",
    "stand_ins_installed",
    "cuda_available",
    "apply_cpu_patches",
    "apply_if_chosen",
    "cpu_patches_applied",
    "set_cpu_env",
    "setup_ray_worker",
    "BACKEND_ENV",
    "ENGINE_ENV",
    "KV_CACHE_ENV",
    "CPU_ENGINES",
    "vllm_cpu_build",
    "resolve_cpu_engine",
    "cpu_engine",
    "cpu_dtype",
    "CPU_DTYPES",
    "DTYPE_ENV",
    "GlooWeightSyncGroup",
    "CPUWorkerWrap",
    "create_cpu_rollout_engines",
    "shutdown_cpu_rollout_engines",
    "CPURolloutActor",
    "required_gpus",
    "ray_init",
]
