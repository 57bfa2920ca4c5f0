"""Which processes a test started: a marker in the environment, inherited by everything the run starts.

A test that checks "no engine process is left" must not look at the whole machine: another run of the
project (a second CI job, a training study) may have a vLLM engine alive at the same time. Instead the test
puts ``DYNAMO_TEST_RUN_ID=<uuid>`` into the environment of the process it launches. That process starts a
local Ray (``RAY_ADDRESS=local``); Ray's GCS, raylet and agents inherit the driver's environment, the raylet
starts the worker processes (``ray::RolloutRayActor`` and the like) with its own, and vLLM's ``EngineCore``
and ``Worker`` processes are multiprocessing children of the engine actor. So every process of the run carries
the marker in ``/proc/<pid>/environ`` (the environment a process was started with; readable for processes of
the same user, and for all as root), and a leftover process of *this* test is one that carries it.

Except where a process overwrote that memory: Ray's ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` set
their title over their argument *and* environment area, and their ``/proc/<pid>/environ`` can then read as
blanks (seen in some runs with Ray as installed here, not in others). Those are children of the raylet, which does carry the marker: so a process
counts as the run's when it carries the marker or descends from one that does (at the moment of the scan).
"""

from __future__ import annotations

import os
import uuid
from typing import Iterable, List, Optional, Tuple

MARKER_ENV = "DYNAMO_TEST_RUN_ID"
#: the process titles of a run's engine and Ray worker processes (``ps -eo args``' first word)
RUN_PREFIXES = ("VLLM::", "ray::")


def new_marker() -> str:
    """A fresh marker value (``dynamo-test-<32 hex digits>``) for one test's processes."""
    return f"dynamo-test-{uuid.uuid4().hex}"


def marked_env(marker: str, env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's environment) with the marker set."""
    if not marker:
        raise ValueError("marked_env: the marker must be a non-empty string")
    out = dict(os.environ if env is None else env)
    out[MARKER_ENV] = marker
    return out


def _environ_has(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:  # exited meanwhile, or not ours to read
        return False


def carries_marker(pid: int, marker: str) -> bool:
    """Whether process ``pid``'s own environment (``/proc/<pid>/environ``) holds the marker."""
    return _environ_has(str(pid), f"{MARKER_ENV}={marker}".encode())


def _cmdline(pid: str) -> Optional[str]:
    """The process's title as ``ps -eo args`` shows it (vLLM and Ray rewrite it); None for a zombie or a
    process that has exited."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw:  # a zombie (or a kernel thread): nothing is running
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def _ppid(pid: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def marked_processes(marker: str, prefixes: Optional[Iterable[str]] = RUN_PREFIXES,
                     exclude: Iterable[int] = ()) -> List[Tuple[int, str]]:
    """Running processes whose environment holds ``DYNAMO_TEST_RUN_ID=<marker>``, or that descend from such a
    process (see the module docstring), as ``[(pid, title)]`` sorted by pid.

    prefixes: keep only titles starting with one of these (None: every such process); exclude: pids to
    leave out (the calling process is always left out, so a marked script can look for its own children; its
    descendants are still found through their own marker).
    Zombies are not listed (they run nothing and hold no memory; their parent collects them)."""
    if not marker:
        raise ValueError("marked_processes: the marker must be a non-empty string")
    needle = f"{MARKER_ENV}={marker}".encode()
    skip = {os.getpid(), *exclude}
    prefixes = tuple(prefixes) if prefixes is not None else None
    parent = {}
    marked = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ppid = _ppid(name)
        if ppid is None:  # exited meanwhile
            continue
        parent[int(name)] = ppid
        if _environ_has(name, needle):
            marked.add(int(name))
    # add the descendants of marked processes (a process whose environment was overwritten)
    for pid in parent:
        chain, p = [], pid
        while p in parent and p not in marked and p not in chain and p > 1:
            chain.append(p)
            p = parent[p]
        if p in marked:
            marked.update(chain)
    found = []
    for pid in sorted(marked - skip):
        title = _cmdline(str(pid))
        if title is None or (prefixes is not None and not title.startswith(prefixes)):
            continue
        found.append((pid, title[:160]))
    return found
