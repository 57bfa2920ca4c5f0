"""Ray for a dynamo_openrlhf run: ``ray_init`` (OpenRLHF's ``ray.init`` goes through it) and ``required_gpus``.

``ray_init`` connects to ``RAY_ADDRESS`` / a running cluster exactly like ``ray.init()``; otherwise it
starts a local one — on the CPU backend with as many *fake* GPUs as the run's actors request (Ray only
schedules them; nothing uses CUDA), no dashboard and no idle pre-started workers. Ray workers of a CPU run
apply the CPU patches through the runtime env's ``worker_process_setup_hook``
(``activation.setup_ray_worker``).

A local start that fails the way Ray's start-up fails on a loaded machine (``RAY_START_FAILURES``: its
raylet must register within a fixed 30 s) is retried once, after shutting down what the failed attempt
started; any other error propagates unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Set, Tuple

from dynamo_openrlhf.cpu_backend.activation import setup_ray_worker
from dynamo_openrlhf.cpu_backend.settings import BACKEND_ENV, ENGINE_ENV, KV_CACHE_ENV, cpu_engine

#: How ``ray.init`` (Ray 2.55) fails when the local cluster it starts does not come up, as
#: ``(exception type, text of its message)``; the type must match exactly (not a subclass). The raylet did
#: not register with the GCS within Ray's fixed 30 s — a bare ``Exception``, the failure seen on this 2-core
#: machine under load — or the GCS server did not answer (``RuntimeError``). Everything else (bad arguments,
#: a cluster address that does not answer) is the caller's error and is not retried.
RAY_START_FAILURES: Tuple[Tuple[type, str], ...] = (
    (Exception, "The current node timed out during startup"),
    (RuntimeError, "Failed to start GCS"),
)


def required_gpus(args) -> int:
    """How many (fake) GPUs the actors of a run request — ``args`` is OpenRLHF's nested config."""
    actor = args.actor.num_nodes * args.actor.num_gpus_per_node
    total = actor
    colocate_all = args.train.colocate_all
    if args.vllm.num_engines and not (colocate_all and not args.train.async_enable):
        total += args.vllm.num_engines * args.vllm.tensor_parallel_size
    if args.algo.kl.init_coef > 0 and not (args.train.colocate_actor_ref or colocate_all):
        total += args.ref.num_nodes * args.ref.num_gpus_per_node
    critic = args.critic.num_nodes * args.critic.num_gpus_per_node if args.critic.model_name_or_path else 0
    reward = args.reward.num_nodes * args.reward.num_gpus_per_node if not args.reward.remote_url else 0
    if colocate_all:
        pass  # everything shares the actor's bundles
    elif args.train.colocate_critic_reward and critic and reward:
        total += critic
    else:
        total += critic + reward
    return max(1, int(total))


def ray_init(runtime_env: Optional[dict] = None, *, cpu_backend: bool, num_gpus: int = 0, init=None, **kwargs):
    """``ray.init`` as OpenRLHF calls it, plus the CPU backend's needs.

    Connects to ``RAY_ADDRESS`` or a running local cluster exactly like ``ray.init()`` does
    (this is what ``ray job submit`` relies on); otherwise starts a local cluster — on the CPU
    backend with ``num_gpus`` fake GPUs, no dashboard and no idle pre-started workers — and retries
    that start once when it fails with one of ``RAY_START_FAILURES`` (``start_local_ray``).
    ``init`` is the function that really initialises Ray (default ``ray.init``).
    """
    import ray

    init = init or ray.init
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    if cpu_backend:
        env_vars[BACKEND_ENV] = "cpu"
        env_vars.setdefault("DS_ACCELERATOR", "cpu")
        env_vars[ENGINE_ENV] = cpu_engine()
        if KV_CACHE_ENV in os.environ:
            env_vars.setdefault(KV_CACHE_ENV, os.environ[KV_CACHE_ENV])
        if cpu_engine() == "vllm":
            # vLLM pins its OpenMP threads to cores by default: engines, trainer and reward workers
            # share the cores here, so leave the placement to the OS.
            env_vars.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
        runtime_env["worker_process_setup_hook"] = f"{setup_ray_worker.__module__}.{setup_ray_worker.__qualname__}"
    runtime_env["env_vars"] = env_vars

    try:
        from ray._private.services import canonicalize_bootstrap_address

        existing = canonicalize_bootstrap_address(None)
    except Exception:  # private API moved: let ray.init decide
        existing = "unknown"
    if existing is not None:
        ctx = init(runtime_env=runtime_env, **kwargs)
        if cpu_backend:
            have = ray.cluster_resources().get("GPU", 0)
            if have < num_gpus:
                ray.shutdown()
                raise SystemExit(
                    f"dynamo_openrlhf: the Ray cluster at {existing} offers {have:g} GPUs but this run's actors "
                    f"request {num_gpus}. On a machine without CUDA, start the cluster with fake GPUs, e.g. "
                    f"`ray start --head --num-gpus {num_gpus}`, or run without a cluster (RAY_ADDRESS=local)."
                )
        return ctx
    if cpu_backend:
        kwargs.setdefault("num_gpus", num_gpus)
        # Ray schedules actors by logical CPUs: one per actor/bundle plus the trainer.
        kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, num_gpus + 2))
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("_system_config", {"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    return start_local_ray(init, runtime_env=runtime_env, **kwargs)


def is_ray_start_failure(error: BaseException) -> bool:
    """Whether ``error`` is one of ``RAY_START_FAILURES`` (Ray's local start-up did not come up in time)."""
    return any(type(error) is kind and text in str(error) for kind, text in RAY_START_FAILURES)


def _child_processes() -> Set[Tuple[int, float]]:
    """This process's descendants as ``(pid, create time in s since the epoch)`` (a reused pid differs)."""
    import psutil

    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            found.add((proc.pid, proc.create_time()))
        except psutil.Error:  # ended meanwhile
            pass
    return found


def _stop_processes(processes: Set[Tuple[int, float]], grace_s: float = 5.0) -> int:
    """SIGTERM each ``(pid, create time)`` that is still that process, SIGKILL what is left after ``grace_s``
    seconds, and collect them; returns how many were stopped."""
    import psutil

    procs = []
    for pid, created in processes:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= 1e-3:
                procs.append(proc)
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def start_local_ray(init, **kwargs):
    """``init(**kwargs)`` (``ray.init`` starting a local cluster), retried once when it fails with one of
    ``RAY_START_FAILURES``: one line on stderr says so, ``ray.shutdown()`` runs and the processes the failed
    attempt started (this process's descendants that were not there before it) are stopped first. A second
    failure, and any other exception, propagates."""
    import ray

    before = _child_processes()
    try:
        return init(**kwargs)
    except Exception as error:
        if not is_ray_start_failure(error):
            raise
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    print(f"dynamo_openrlhf: Ray failed to start ({reason}); shutting down what it started and retrying once",
          file=sys.stderr, flush=True)
    ray.shutdown()
    _stop_processes(_child_processes() - before)
    return init(**kwargs)
