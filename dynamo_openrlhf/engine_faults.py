"""A rollout engine that dies or stops answering mid-run (issue #21 §2): the run stops within a bounded time
with one message naming the engine and the last complete checkpoint, and no engine process outlives the run.

Runs in the driver (``python -m dynamo_openrlhf.train``): the driver creates the CPU rollout engines
(OpenRLHF's ``train_ppo_ray.train`` calls ``cpu_backend.create_cpu_rollout_engines``), which hands them to
:func:`watch_engines`, and then waits in ``ray.get(trainer.fit.remote())``.

How a fault ends the run:

* :class:`EngineWatch`, a daemon thread, asks every engine for its status (:func:`engine_status`, through the
  actor's ``__ray_call__``) every ``interval_s``. An engine is faulty when its actor is dead (Ray's
  ``RayActorError``: the process was killed or crashed), when its vLLM engine-core process died (vLLM's
  ``AsyncLLM.errored``; the actor itself lives on), or when it has not answered a status request for
  ``hang_timeout_s`` after having answered once (a hung process). An engine that dies or hangs before its
  first answer (its start-up) is left to Ray's own error, which says why it did not start.
* The first fault is recorded, the engine's actor is killed (``ray.kill``: a hung or engine-less actor then
  fails every call the trainer has pending on it, at once) and its recorded child processes (vLLM's
  ``EngineCore``, which a killed actor leaves behind, reparented) are killed. The trainer's pending or next
  engine call fails, ``fit`` fails and the driver's ``ray.get`` raises. If it has not raised ``grace_s``
  after the fault (the trainer may be training, or blocked in a weight broadcast to the dead engine), the
  watch interrupts the driver's main thread (``KeyboardInterrupt``).
* The driver's ``sys.excepthook`` (installed by :func:`watch_engines`) then prints one line instead of the
  traceback: :func:`engine_fault_message`, naming the engine (index, class, Ray actor id, process id), what
  happened and the last complete checkpoint (:func:`dynamo_openrlhf.checkpoint.describe_last_checkpoint`).
  When the trainer saw the death before the watch did, the hook checks the engines once itself. An exception
  with no faulty engine gets the usual traceback. ``DYNAMO_OPENRLHF_TRACEBACK=1`` prints the traceback after
  the message.
* At exit, ``cpu_backend.shutdown_cpu_rollout_engines`` stops the watch, shuts the live engines down, and
  kills any recorded child process of an engine still running (the exit code is 1, an uncaught exception's).

The bound: a dead engine ends the run within ``interval_s + grace_s`` (defaults 2 s + 10 s) of its death, a
hung one within ``hang_timeout_s + interval_s + grace_s`` (default 300 + 2 + 10 s), plus the time Ray takes to
shut down. Environment overrides (read when the engines are created): ``DYNAMO_OPENRLHF_ENGINE_WATCH_S``,
``DYNAMO_OPENRLHF_ENGINE_HANG_S``, ``DYNAMO_OPENRLHF_ENGINE_GRACE_S`` (seconds, > 0).

The checkpoint directory is the run's ``--ckpt.path``, recorded in the driver by :func:`note_run_args`
(``cpu_backend`` wraps OpenRLHF's ``get_strategy``, which the driver calls with the run's config).
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["EngineFault", "EngineWatch", "engine_fault_message", "engine_status", "watch_engines",
           "current_watch", "stop_watch", "note_run_args", "run_ckpt_path", "reap_processes",
           "WATCH_ENV", "HANG_ENV", "GRACE_ENV", "TRACEBACK_ENV"]

PROG = "python -m dynamo_openrlhf.train"
WATCH_ENV = "DYNAMO_OPENRLHF_ENGINE_WATCH_S"
HANG_ENV = "DYNAMO_OPENRLHF_ENGINE_HANG_S"
GRACE_ENV = "DYNAMO_OPENRLHF_ENGINE_GRACE_S"
TRACEBACK_ENV = "DYNAMO_OPENRLHF_TRACEBACK"
DEFAULT_WATCH_S, DEFAULT_HANG_S, DEFAULT_GRACE_S = 2.0, 300.0, 10.0

ENGINE_CLASSES = {
    "vllm": "RolloutRayActor, vLLM",
    "transformers": "CPURolloutActor, the transformers stand-in",
}

# (pid, create time in s since the epoch): a process, safe against pid reuse.
ProcessKey = Tuple[int, float]


@dataclass(frozen=True)
class EngineFault:
    """What went wrong with one rollout engine.

    index: the engine's position among the run's ``--vllm.num_engines`` engines (0-based);
    num_engines: how many the run has; engine: ``"vllm"`` or ``"transformers"``; actor_id: the Ray actor id
    (hex); pid: the actor's process id (None when it never answered); what: what happened, a phrase."""

    index: int
    num_engines: int
    engine: str
    actor_id: str
    pid: Optional[int]
    what: str


def engine_fault_message(fault: EngineFault, ckpt_path: Optional[str]) -> str:
    """The one line a run ends with when a rollout engine failed. ``ckpt_path``: the run's ``--ckpt.path``."""
    from dynamo_openrlhf.checkpoint import describe_last_checkpoint

    cls = ENGINE_CLASSES.get(fault.engine, fault.engine)
    pid = f"pid {fault.pid}" if fault.pid is not None else "pid unknown"
    return (f"rollout engine {fault.index} of {fault.num_engines} ({cls}; Ray actor {fault.actor_id}, {pid}) "
            f"{fault.what}. The run stopped; no engine process is left running. Last complete checkpoint: "
            f"{describe_last_checkpoint(ckpt_path)}.")


# -- run config (the driver's) --------------------------------------------------------------------------

_RUN_ARGS: Dict[str, Any] = {}


def note_run_args(args) -> None:
    """Remember the run's ``--ckpt.path`` (``args`` is OpenRLHF's nested config) for the fault message."""
    path = getattr(getattr(args, "ckpt", None), "path", None)
    if path:
        _RUN_ARGS["ckpt_path"] = os.path.abspath(path)


def run_ckpt_path() -> Optional[str]:
    return _RUN_ARGS.get("ckpt_path")


# -- inside an engine actor --------------------------------------------------------------------------


def engine_status(actor) -> Dict[str, Any]:
    """Runs inside a rollout engine actor (``__ray_call__``): its pid, its child processes
    (``[(pid, create time)]``, vLLM's engine core among them) and its problem (None when healthy)."""
    import psutil

    me = psutil.Process()
    children = []
    for child in me.children(recursive=True):
        try:
            children.append((child.pid, child.create_time()))
        except psutil.Error:  # exited meanwhile
            pass
    problem = None
    llm = getattr(actor, "llm", None)  # OpenRLHF's RolloutRayActor: a vLLM AsyncLLM
    if llm is not None and getattr(llm, "errored", False):
        problem = "lost its vLLM engine-core process (vLLM reports the engine dead)"
    return {"pid": os.getpid(), "children": children, "problem": problem}


def reap_processes(processes: Sequence[ProcessKey]) -> List[int]:
    """SIGKILLs each ``(pid, create time)`` that is still that process (a reused pid is left alone);
    returns the pids killed."""
    import psutil

    killed = []
    for pid, created in processes:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 1e-3:
                continue
            proc.kill()
            killed.append(pid)
        except psutil.Error:
            pass
    for pid in killed:  # collect them if they are our children (else their new parent does)
        try:
            psutil.Process(pid).wait(timeout=5)
        except psutil.Error:
            pass
    return killed


# -- the watch (driver) ------------------------------------------------------------------------------


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{env}={raw!r}: expected a number of seconds > 0")
    return value


class EngineWatch:
    """Watches a run's rollout engines from the driver (see the module docstring).

    engines: the Ray actor handles, in engine order; engine: ``"vllm"`` or ``"transformers"``;
    interval_s: seconds between status requests; hang_timeout_s: seconds without an answer after which a
    started engine is hung; grace_s: seconds after a fault before the driver's main thread is interrupted;
    interrupt: what interrupts it (tests replace it)."""

    def __init__(self, engines: Sequence[Any], engine: str, *, interval_s: float = DEFAULT_WATCH_S,
                 hang_timeout_s: float = DEFAULT_HANG_S, grace_s: float = DEFAULT_GRACE_S,
                 interrupt: Callable[[], None] = _thread.interrupt_main):
        for name, value in (("interval_s", interval_s), ("hang_timeout_s", hang_timeout_s), ("grace_s", grace_s)):
            if not value > 0:
                raise ValueError(f"EngineWatch: {name} must be > 0 seconds, got {value!r}")
        self.engines = list(engines)
        self.engine = engine
        self.interval_s, self.hang_timeout_s, self.grace_s = float(interval_s), float(hang_timeout_s), float(grace_s)
        self._interrupt = interrupt
        self.pids: List[Optional[int]] = [None] * len(self.engines)
        self.children: List[List[ProcessKey]] = [[] for _ in self.engines]
        self.fault: Optional[EngineFault] = None
        self.fault_time: Optional[float] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pending: Dict[int, Tuple[Any, float]] = {}

    # -- one status round ----------------------------------------------------------------------------
    def _actor_id(self, i: int) -> str:
        try:
            return self.engines[i]._actor_id.hex()
        except AttributeError:
            return "?"

    def _fault(self, i: int, what: str) -> EngineFault:
        return EngineFault(i, len(self.engines), self.engine, self._actor_id(i), self.pids[i], what)

    def _absorb(self, i: int, ref) -> Optional[EngineFault]:
        """The answer of engine i's status request ``ref`` (ready): record it; its fault or None."""
        import ray

        try:
            status = ray.get(ref)
        except ray.exceptions.ActorDiedError as e:
            if self.pids[i] is None:
                return None  # it never started: Ray's own error (its start-up failure) reports that
            return self._fault(i, f"died ({type(e).__name__}: its actor process is gone)")
        self.pids[i] = status["pid"]
        known = {pid for pid, _ in self.children[i]}
        self.children[i] += [c for c in status["children"] if c[0] not in known]
        return self._fault(i, status["problem"]) if status["problem"] else None

    def poll(self, wait_s: float) -> Optional[EngineFault]:
        """Sends a status request to every engine without one pending, waits up to ``wait_s`` for the
        answers, and returns the first fault found (None when all are healthy or still answering in time).
        An engine that cannot be reached for a moment (Ray's ``ActorUnavailableError``) is asked again; the
        time since its first unanswered request still counts towards a hang."""
        import ray

        now = time.monotonic()
        for i, engine in enumerate(self.engines):
            if i not in self._pending:
                self._pending[i] = (engine.__ray_call__.remote(engine_status), now)
        refs = [ref for ref, _ in self._pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        ready = set(ready)
        found = None
        for i in sorted(self._pending):
            ref, sent = self._pending[i]
            fault = None
            if ref in ready:
                del self._pending[i]
                try:
                    fault = self._absorb(i, ref)
                except ray.exceptions.RayActorError:  # unavailable, not dead: no answer yet
                    self._pending[i] = (self.engines[i].__ray_call__.remote(engine_status), sent)
            if i in self._pending and self.pids[i] is not None and time.monotonic() - sent >= self.hang_timeout_s:
                fault = self._fault(i, f"did not answer for {self.hang_timeout_s:g} s (hung)")
            if fault is not None and found is None:
                found = fault
        return found

    def record(self, fault: EngineFault) -> EngineFault:
        """Keeps the first fault; kills that engine's actor and its recorded child processes."""
        import ray

        with self._lock:
            if self.fault is not None:
                return self.fault
            self.fault, self.fault_time = fault, time.monotonic()
        try:
            ray.kill(self.engines[fault.index], no_restart=True)
        except Exception:  # already gone
            pass
        reap_processes(self.children[fault.index])
        return fault

    def check_now(self, wait_s: float = 10.0) -> Optional[EngineFault]:
        """The recorded fault, or one found by a status round now (the driver's exception hook)."""
        if self.fault is None:
            with self._lock:
                fault = self.poll(wait_s) if self.fault is None else None
            if fault is not None:
                self.record(fault)
        return self.fault

    # -- the thread ----------------------------------------------------------------------------------
    def start(self) -> "EngineWatch":
        self._thread = threading.Thread(target=self._run, name="dynamo-engine-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    fault = self.poll(self.interval_s) if self.fault is None else None
            except Exception:  # Ray shutting down under us: nothing left to watch
                return
            if fault is not None:
                self.record(fault)
            if self.fault is not None:
                if not self._stop.wait(self.grace_s):
                    self._interrupt()
                return
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Ends the watch (before the engines are shut down on purpose)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)

    def leftover_children(self) -> List[ProcessKey]:
        return [c for cs in self.children for c in cs]


_WATCH: Optional[EngineWatch] = None
_PREVIOUS_HOOK = None


def current_watch() -> Optional[EngineWatch]:
    return _WATCH


def stop_watch() -> Optional[EngineWatch]:
    """Stops the driver's watch (if any) and returns it; its recorded fault stays for the exception hook."""
    if _WATCH is not None:
        _WATCH.stop()
    return _WATCH


def _excepthook(exc_type, exc, tb) -> None:
    watch = _WATCH
    fault = None
    if watch is not None and not issubclass(exc_type, SystemExit):
        try:
            fault = watch.check_now()
        except Exception:  # Ray already down: no engine to ask
            fault = watch.fault
    previous = _PREVIOUS_HOOK or sys.__excepthook__
    if fault is None:
        return previous(exc_type, exc, tb)
    print(f"{PROG}: error: {engine_fault_message(fault, run_ckpt_path())}", file=sys.stderr, flush=True)
    if os.environ.get(TRACEBACK_ENV) == "1":
        previous(exc_type, exc, tb)


def watch_engines(engines: Sequence[Any], engine: str) -> EngineWatch:
    """Starts watching this driver's rollout engines and installs the exception hook (once per process;
    a second call replaces the watched engines)."""
    global _WATCH, _PREVIOUS_HOOK
    if _WATCH is not None:
        _WATCH.stop()
    _WATCH = EngineWatch(engines, engine, interval_s=_seconds(WATCH_ENV, DEFAULT_WATCH_S),
                         hang_timeout_s=_seconds(HANG_ENV, DEFAULT_HANG_S),
                         grace_s=_seconds(GRACE_ENV, DEFAULT_GRACE_S)).start()
    if sys.excepthook is not _excepthook:
        _PREVIOUS_HOOK = sys.excepthook
        sys.excepthook = _excepthook
    return _WATCH
