"""What the driver decides for every process of a CPU run, and how a process reads it.

The driver (``python -m dynamo_openrlhf.train``) puts these environment variables into the Ray runtime
env (``ray_setup.ray_init``); every Ray worker reads its backend, rollout engine, KV-cache size and
number format from them. Nothing here imports torch, Ray or OpenRLHF.
"""

from __future__ import annotations

import os

# Set (to "cpu") in the Ray runtime env by the driver: workers then apply the CPU patches.
BACKEND_ENV = "DYNAMO_OPENRLHF_BACKEND"
# Optional override of torch's intra-op threads in CPU workers (default: Ray's, i.e. 1).
THREADS_ENV = "DYNAMO_OPENRLHF_CPU_THREADS"
# The rollout engine of a CPU run ("vllm" or "transformers"), set by the driver for every Ray worker.
ENGINE_ENV = "DYNAMO_OPENRLHF_CPU_ENGINE"
# KV-cache size of each CPU vLLM engine, in MiB (vLLM's CPU build otherwise reserves GiBs per engine).
KV_CACHE_ENV = "DYNAMO_OPENRLHF_CPU_KV_CACHE_MB"
DEFAULT_KV_CACHE_MB = 256
CPU_ENGINES = ("auto", "vllm", "transformers")
# Number format the actor trains in and the vLLM CPU engine runs in ("fp32" or "bf16"), set by the driver
# for every Ray worker (--dynamo.cpu_dtype). Unset: --ds.param_dtype as OpenRLHF reads it.
DTYPE_ENV = "DYNAMO_OPENRLHF_CPU_DTYPE"
CPU_DTYPES = ("fp32", "bf16")
DEFAULT_CPU_DTYPE = "fp32"


def cpu_dtype() -> str:
    """The number format of this CPU run: ``"fp32"`` or ``"bf16"`` (``DYNAMO_OPENRLHF_CPU_DTYPE``;
    unset means OpenRLHF's own ``--ds.param_dtype``, reported as ``"bf16"``)."""
    value = os.environ.get(DTYPE_ENV, "bf16")
    if value not in CPU_DTYPES:
        raise ValueError(f"{DTYPE_ENV}={value!r}: expected one of {', '.join(CPU_DTYPES)}")
    return value


def cpu_engine() -> str:
    """The rollout engine of this CPU run (the driver chose it; workers read it from their env)."""
    return os.environ.get(ENGINE_ENV, "transformers")
