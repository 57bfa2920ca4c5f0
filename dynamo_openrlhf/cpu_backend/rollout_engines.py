"""The CPU run's rollout engines: start them, wire them into OpenRLHF, shut them down.

* ``create_cpu_rollout_engines`` replaces OpenRLHF's ``create_vllm_engines`` (same signature and
  placement): OpenRLHF's own ``RolloutRayActor`` on vLLM's CPU build (``vllm_on_cpu``) when the run's
  engine is ``vllm``, else ``CPURolloutActor`` (``transformers_engine``). Every engine is watched
  (``engine_faults``: a dying engine ends the run with one message).
* ``shutdown_cpu_rollout_engines`` stops them at the end of a run (and at exit): a vLLM engine's
  engine-core process is a child of the Ray actor and would outlive a plain kill.
* ``patch_openrlhf_rollout_engines`` makes OpenRLHF use them: ``create_vllm_engines`` and the trainer's
  weight sync (OpenRLHF's own over ``GlooWeightSyncGroup`` for vLLM, the Ray object store for the stand-in),
  decided per call by the run's engine (``settings.cpu_engine``).

Importing this module imports neither torch, Ray nor OpenRLHF.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

from dynamo_openrlhf.cpu_backend.settings import cpu_engine
from dynamo_openrlhf.cpu_backend.transformers_engine import (
    CPURolloutActor,
    _broadcast_to_engines_via_object_store,
    _skip_vllm_sync_group,
)
from dynamo_openrlhf.cpu_backend.vllm_on_cpu import GlooWeightSyncGroup, _shutdown_vllm, _vllm_engine_kwargs

logger = logging.getLogger("dynamo_openrlhf.cpu_backend")


# Engines this process created (create_cpu_rollout_engines), to shut them down at the end of a run.
_ENGINES: List[Any] = []


def shutdown_cpu_rollout_engines(timeout_s: float = 60.0) -> int:
    """Stop the CPU rollout engines this process started: the engine-fault watch first (these stops are on
    purpose), then each live vLLM engine's engine-core process (a child of the Ray actor: killing the actor
    alone can leave it running), then any child process an engine had that still runs (the engine core of
    an engine that died or was killed). Returns how many engines were shut down. An engine that is already
    dead is skipped, without an error."""
    import ray

    from dynamo_openrlhf import engine_faults

    watch = engine_faults.stop_watch()
    engines, _ENGINES[:] = list(_ENGINES), []
    done = 0
    if engines and ray.is_initialized():
        alive = [e for i, e in enumerate(engines) if watch is None or watch.fault is None or watch.fault.index != i]
        if cpu_engine() == "vllm":
            refs = [engine.__ray_call__.remote(_shutdown_vllm) for engine in alive]
            for engine, ref in zip(alive, refs):
                try:
                    ray.get(ref, timeout=timeout_s)
                    done += 1
                except Exception as e:  # a dead or stuck engine: killed below, its children reaped
                    logger.warning("rollout engine shutdown: %s", type(e).__name__)
        for engine in engines:
            try:
                ray.kill(engine)
            except Exception:
                pass
    if watch is not None:
        engine_faults.reap_processes(watch.leftover_children())
    return done


def create_cpu_rollout_engines(
    num_engines: int,
    tensor_parallel_size: int,
    pretrain: str,
    seed: int,
    full_determinism: bool,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_model_len: int,
    shared_pg=None,
    gpu_memory_utilization=None,
    vllm_enable_sleep=False,
    logprobs_mode=None,
    agent_func_path: Optional[str] = None,
    remote_rm_url: Optional[str] = None,
    max_images_per_prompt: int = 0,
):
    """Drop-in for ``openrlhf.trainer.ray.vllm_engine.create_vllm_engines`` (same signature and
    placement-group layout; fake GPU bundles). Starts OpenRLHF's own ``RolloutRayActor`` on vLLM's
    CPU build when this run's engine is ``vllm`` (``cpu_engine()``), else ``CPURolloutActor``s."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if tensor_parallel_size != 1:
        raise ValueError("the CPU rollout engine supports --vllm.tensor_parallel_size 1 only")
    if max_images_per_prompt > 0:
        raise ValueError("the CPU rollout engine is text-only (--data.max_images_per_prompt must be 0)")
    use_hybrid_engine = shared_pg is not None
    num_gpus = 0.2 if use_hybrid_engine else 1
    if not use_hybrid_engine:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(num_engines)]
        shared_pg = placement_group(bundles, strategy="PACK")
        ray.get(shared_pg.ready())
    use_vllm = cpu_engine() == "vllm"
    if use_vllm:
        from openrlhf.trainer.ray.vllm_engine import RolloutRayActor as remote_cls
    else:
        remote_cls = ray.remote(CPURolloutActor)
    engines = []
    for i in range(num_engines):
        common = dict(model=pretrain, seed=seed + i, max_model_len=max_model_len,
                      agent_func_path=agent_func_path, remote_rm_url=remote_rm_url)
        if use_vllm:
            kwargs = _vllm_engine_kwargs(common, num_gpus=num_gpus, full_determinism=full_determinism,
                                         enable_prefix_caching=enable_prefix_caching, logprobs_mode=logprobs_mode)
        else:
            kwargs = dict(common, logprobs_mode=logprobs_mode)
        engines.append(
            remote_cls.options(
                num_cpus=num_gpus,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=shared_pg,
                    placement_group_capture_child_tasks=True,
                    placement_group_bundle_index=i,
                ),
            ).remote(**kwargs)
        )
    if not _ENGINES:  # before Ray's own exit handler (atexit runs last-registered first)
        import atexit

        atexit.register(shutdown_cpu_rollout_engines)
    _ENGINES.extend(engines)
    # A dying engine ends the run with one message (engine_faults); its child processes are reaped.
    from dynamo_openrlhf.engine_faults import watch_engines

    watch_engines(list(_ENGINES), "vllm" if use_vllm else "transformers")
    return engines


def patch_openrlhf_rollout_engines() -> None:
    """Make OpenRLHF's trainer create, and sync weights to, the CPU rollout engines (in the driver and in
    every Ray worker of a CPU run; ``activation.apply_cpu_patches`` calls it once per process)."""
    from openrlhf.trainer.ray import ppo_actor, vllm_engine
    import openrlhf.trainer.ray as trainer_ray

    # Weight sync. vLLM engines: OpenRLHF's own _init_vllm_sync_group / broadcast_to_vllm over a gloo
    # group (NCCL's group cannot exist without CUDA). The transformers stand-in has no vLLM worker to
    # broadcast to: one state dict through the Ray object store. Decided per call: the engine is
    # known once the run's flags are parsed.
    ppo_actor.stateless_init_process_group = GlooWeightSyncGroup.create
    trainer_cls = ppo_actor.ActorPPOTrainer
    orig_init_sync, orig_broadcast = trainer_cls._init_vllm_sync_group, trainer_cls.broadcast_to_vllm

    def init_vllm_sync_group(self, backend):
        if cpu_engine() == "vllm":
            return orig_init_sync(self, backend)
        return _skip_vllm_sync_group(self, backend)

    def broadcast_to_vllm(self):
        if cpu_engine() == "vllm":
            return orig_broadcast(self)
        return _broadcast_to_engines_via_object_store(self)

    trainer_cls._init_vllm_sync_group = init_vllm_sync_group
    trainer_cls.broadcast_to_vllm = broadcast_to_vllm

    # Rollout engines: vLLM's CPU build or the transformers stand-in, same placement as OpenRLHF's.
    trainer_ray.create_vllm_engines = create_cpu_rollout_engines
    vllm_engine.create_vllm_engines = create_cpu_rollout_engines
