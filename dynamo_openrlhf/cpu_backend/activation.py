"""Turning the CPU backend on in a process: ``apply_cpu_patches`` = the process patches
(``process_patches``) + the rollout engines wired into OpenRLHF (``rollout_engines``).

The driver calls it when the run chose ``--dynamo.backend cpu``; every Ray worker of such a run calls it
through the runtime env's ``worker_process_setup_hook`` (``setup_ray_worker``, named by its path
``dynamo_openrlhf.cpu_backend.setup_ray_worker`` in ``ray_setup.ray_init``), and the trainer actors once more
(``apply_if_chosen``) in case Ray was started without that hook.
"""

from __future__ import annotations

import os
import threading

from dynamo_openrlhf.cpu_backend.process_patches import apply_process_patches
from dynamo_openrlhf.cpu_backend.rollout_engines import patch_openrlhf_rollout_engines
from dynamo_openrlhf.cpu_backend.settings import BACKEND_ENV

_PATCH_LOCK = threading.Lock()
_PATCHED = False


def cpu_patches_applied() -> bool:
    """Whether ``apply_cpu_patches`` has run in this process (and CUDA was absent)."""
    return _PATCHED


def apply_cpu_patches() -> bool:
    """Apply every CPU adapter in this process (idempotent). Returns False (and does nothing)
    when CUDA is available."""
    global _PATCHED
    with _PATCH_LOCK:
        if _PATCHED:
            return True
        if not apply_process_patches():  # CUDA is available
            return False
        patch_openrlhf_rollout_engines()
        _PATCHED = True
        return True


def apply_if_chosen(args) -> None:
    """Apply the CPU patches in this process when the run's nested config chose the CPU backend
    (``args.dynamo.backend == "cpu"``); also works when Ray was started without our setup hook."""
    if getattr(getattr(args, "dynamo", None), "backend", None) == "cpu":
        apply_cpu_patches()


def setup_ray_worker() -> None:
    """Ray ``worker_process_setup_hook``: apply the CPU patches when the driver chose the CPU
    backend (it sets ``DYNAMO_OPENRLHF_BACKEND=cpu`` in the runtime env)."""
    if os.environ.get(BACKEND_ENV) == "cpu":
        apply_cpu_patches()
