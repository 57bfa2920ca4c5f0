"""tests/_procs.py: a test's leftover check sees the processes carrying its marker, and only those."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _procs import MARKER_ENV, marked_env, marked_processes, new_marker

SLEEP = "import time; time.sleep(120)"


def _start(title: str, env: dict) -> subprocess.Popen:
    """A sleeping Python process whose title (argv[0], what ``ps -eo args`` shows) is ``title``."""
    return subprocess.Popen([title, "-c", SLEEP], executable=sys.executable, env=env)


def _wait_listed(marker, pid, **kw):
    deadline = time.monotonic() + 10
    while pid not in [p for p, _ in marked_processes(marker, **kw)]:
        assert time.monotonic() < deadline, f"pid {pid} never listed"
        time.sleep(0.05)


def test_a_leaked_engine_process_is_listed_and_others_runs_are_not():
    mine, theirs = new_marker(), new_marker()
    assert mine != theirs and mine.startswith("dynamo-test-") and len(mine) == len("dynamo-test-") + 32
    leak = _start("VLLM::EngineCore", marked_env(mine))
    worker = _start("ray::RolloutRayActor", marked_env(mine))
    plain = _start("python-helper", marked_env(mine))  # marked, but not an engine or Ray worker title
    other = _start("VLLM::EngineCore", marked_env(theirs))  # another run's engine on the same machine
    unmarked = _start("VLLM::EngineCore", {k: v for k, v in os.environ.items() if k != MARKER_ENV})
    procs = [leak, worker, plain, other, unmarked]
    try:
        _wait_listed(mine, plain.pid, prefixes=None)
        assert marked_processes(mine) == [(leak.pid, f"VLLM::EngineCore -c {SLEEP}"),
                                          (worker.pid, f"ray::RolloutRayActor -c {SLEEP}")]
        assert [p for p, _ in marked_processes(mine, prefixes=None)] == [leak.pid, worker.pid, plain.pid]
        assert [p for p, _ in marked_processes(mine, prefixes=("VLLM::",))] == [leak.pid]
        assert [p for p, _ in marked_processes(mine, exclude=[leak.pid])] == [worker.pid]
        assert [p for p, _ in marked_processes(theirs)] == [other.pid]
        leak.kill()
        assert leak.wait(10) == -signal.SIGKILL
        assert [p for p, _ in marked_processes(mine)] == [worker.pid]  # the leak is gone once killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert marked_processes(mine, prefixes=None) == [] and marked_processes(theirs, prefixes=None) == []


def test_a_reparented_grandchild_still_carries_the_marker():
    """A process whose parent exited (reparented to init, in a session of its own: what a killed engine
    actor leaves of its EngineCore) is found by its marker, where a walk of the test's children would miss it."""
    marker = new_marker()
    spawn = ("import subprocess, sys; p = subprocess.Popen(['VLLM::Worker', '-c', %r], executable=sys.executable, "
             "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)" % SLEEP)
    r = subprocess.run([sys.executable, "-c", spawn], env=marked_env(marker), capture_output=True, text=True,
                       timeout=60)
    orphan = int(r.stdout.strip())
    try:
        _wait_listed(marker, orphan)
        assert marked_processes(marker) == [(orphan, f"VLLM::Worker -c {SLEEP}")]
        assert os.getppid() != orphan and orphan not in [c for c in _children(os.getpid())]
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while marked_processes(marker):  # init collects it
        assert time.monotonic() < deadline, marked_processes(marker)
        time.sleep(0.05)


def test_a_child_without_the_marker_counts_through_its_marked_parent():
    """Ray's agents overwrite their environment with their title: they are found through the raylet."""
    marker = new_marker()
    spawn = ("import os, subprocess, sys, time; env = {k: v for k, v in os.environ.items() if k != %r}; "
             "p = subprocess.Popen(['ray::DashboardAgent', '-c', %r], executable=%r, env=env, "
             "stdout=subprocess.DEVNULL); print(p.pid, flush=True); time.sleep(120)" % (MARKER_ENV, SLEEP, sys.executable))
    parent = subprocess.Popen(["raylet", "-c", spawn], executable=sys.executable, env=marked_env(marker),
                              stdout=subprocess.PIPE, text=True)
    try:
        agent = int(parent.stdout.readline())
        _wait_listed(marker, agent)
        assert marked_processes(marker) == [(agent, f"ray::DashboardAgent -c {SLEEP}")]
        assert [p for p, _ in marked_processes(marker, prefixes=None)] == [parent.pid, agent]
        assert [p for p, _ in marked_processes(new_marker())] == []
        os.kill(agent, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while marked_processes(marker):  # its parent collects it
            assert time.monotonic() < deadline, marked_processes(marker)
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait(10)


def _children(pid: int):
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_an_empty_marker_is_refused():
    with pytest.raises(ValueError, match="marked_processes: the marker must be a non-empty string"):
        marked_processes("")
    with pytest.raises(ValueError, match="marked_env: the marker must be a non-empty string"):
        marked_env("")
