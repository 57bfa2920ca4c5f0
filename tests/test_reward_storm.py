"""Reward storms (issue #21 §5): every sample of a step times out in math-verify (tests/data/storm_reward.py,
a reward file whose math-verify sleeps past the timeout). Each sample is one timeout (reward 0, logged in
``math_timeout``), counted once by the pool as a failure, and the scorer goes on working after the storm.
The helpers are forked by one warm zygote process (a replacement costs a fork, not a math-verify import), and
neither the zygote nor a helper outlives ``close()`` or the trainer process. The time a storm costs is
measured by benchmarks/bench_reward_storm.py (docs/faults.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

STORM = os.path.join(os.path.dirname(__file__), "data", "storm_reward.py")
N = 6


def _step():
    """N samples of 2 prompts (3 each), every answer well formed and correct."""
    prompts = ["What is 2+2?", "What is 3*3?"]
    labels = ["4", "9"]
    rows = [(prompts[i % 2], labels[i % 2]) for i in range(N)]
    queries = [p + f" The answer is \\boxed{{{a}}}" for p, a in rows]
    return queries, [p for p, _ in rows], [a for _, a in rows]


def test_a_storm_gives_one_timeout_per_sample_and_the_scorer_recovers(tmp_path, monkeypatch):
    from dynamo_openrlhf.reward import MathReward

    dump = tmp_path / "dump.jsonl"
    monkeypatch.setenv("DYNAMO_REWARD_DUMP", str(dump))
    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "3600")
    scorer = MathReward(timeout_s=0.5, workers=2, helper_file=STORM)
    try:
        out = scorer(*_step())
        assert out["rewards"].tolist() == [0.0] * N and out["scores"].tolist() == [0.0] * N
        assert out["extra_logs"] == {"math_correct": 0.0, "math_wrong": 0.0, "math_malformed": 0.0,
                                     "math_timeout": float(N), "math_error": 0.0}
        rows = [json.loads(line) for line in dump.read_text().splitlines()]
        assert [r["status"] for r in rows] == ["timeout"] * N  # each sample scored once
        # The storm ends (helpers started from now on check at once): the killed helpers are replaced and the
        # same samples are scored correct.
        monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "0")
        scorer.timeout_s = 60.0  # a real check, on a possibly loaded machine
        after = scorer(*_step())
        assert after["rewards"].tolist() == [1.0] * N
        assert after["extra_logs"]["math_correct"] == float(N)
    finally:
        scorer.close()


def test_the_pool_counts_each_timed_out_sample_as_one_failure(monkeypatch):
    """The storm's scores through the trainer's success rule into the pool: each prompt gains as many
    failures as it had samples, and no success."""
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator
    from dynamo_openrlhf.metrics import is_success

    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "3600")
    spec = importlib.util.spec_from_file_location("storm_reward", STORM)
    storm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(storm)
    monkeypatch.setenv("DYNAMO_REWARD_TIMEOUT_S", "0.5")
    try:
        out = storm.reward_func(*_step())
    finally:
        storm._SCORER.close()
    ok = is_success(out["scores"].numpy(), 0.5)
    allocator = RolloutAllocator(AllocationConfig(forget=1.0))
    ids = np.array([11, 22])
    allocator.record(ids, [int(ok[0::2].sum()), int(ok[1::2].sum())], [N // 2, N // 2])
    successes, failures = allocator.pool.evidence(ids)
    assert successes.tolist() == [0.0, 0.0] and failures.tolist() == [N // 2, N // 2]


def _gone(pid: int) -> bool:
    """The process has ended (no such pid, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _marks(path, kinds) -> list:
    """The storm file's marks (``DYNAMO_STORM_MARKS``) of the given kinds, in order."""
    return [line for line in path.read_text().splitlines() if line.split()[0] in kinds] if path.exists() else []


def _wait_for_a_parse(path) -> int:
    """Pid of the first helper that started a (slow) parse."""
    while not _marks(path, ("parse",)):
        time.sleep(0.05)
    return int(_marks(path, ("parse",))[0].split()[1])


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_replacement_helpers_are_forked_by_one_warm_zygote(tmp_path, monkeypatch):
    """The storm's file is loaded (and math-verify imported) once, in the zygote; every helper, the ones
    replacing killed helpers included, is a fork of it running the storm file's ``_serve``."""
    from dynamo_openrlhf.reward import MathReward

    marks = tmp_path / "marks.txt"
    monkeypatch.setenv("DYNAMO_STORM_MARKS", str(marks))
    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "3600")
    scorer = MathReward(timeout_s=0.5, workers=2, helper_file=STORM)
    try:
        assert scorer.pids() == {"zygote": None, "helpers": []}  # lazy: nothing started yet
        out = scorer(*_step())
        assert out["extra_logs"]["math_timeout"] == float(N)
        zygote = scorer.pids()["zygote"]
        storm = _marks(marks, ("preload", "serve"))
        assert storm[0] == f"preload {zygote}" and len(storm) == 1 + N  # one helper per timed-out sample
        assert all(line.split()[0] == "serve" and int(line.split()[2]) == zygote for line in storm[1:])
        killed = [int(line.split()[1]) for line in storm[1:]]
        assert all(_gone(pid) for pid in killed)  # each timed-out helper was killed and reaped

        monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "0")
        scorer.timeout_s = 60.0  # a real check, on a possibly loaded machine
        assert scorer(*_step())["rewards"].tolist() == [1.0] * N
        lines = _marks(marks, ("preload", "serve"))
        assert len(lines) == 1 + N + 2 and lines[:1 + N] == storm  # the 2 slots' new helpers, no new zygote
        helpers = scorer.pids()["helpers"]
        assert sorted(helpers) == sorted(int(line.split()[1]) for line in lines[1 + N:])
        assert all(_parent(pid) == zygote for pid in helpers)
        with open(f"/proc/{zygote}/comm") as f:
            assert f.read() == "reward-zygote\n"  # what ps and top show for them
        for pid in helpers:
            with open(f"/proc/{pid}/comm") as f:
                assert f.read() == "reward-helper\n"
        assert (scorer.zygote_starts, scorer.helper_starts) == (1, N + 2)
    finally:
        scorer.close()


def test_close_kills_the_zygote_and_every_helper_even_a_busy_one(tmp_path, monkeypatch):
    from dynamo_openrlhf.reward import MathReward

    marks = tmp_path / "marks.txt"
    monkeypatch.setenv("DYNAMO_STORM_MARKS", str(marks))
    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "3600")
    scorer = MathReward(timeout_s=600, workers=2, helper_file=STORM).start()
    pids = scorer.pids()
    procs = [pids["zygote"], *pids["helpers"]]
    assert len(procs) == 3 and not any(_gone(pid) for pid in procs)
    busy = []
    worker = threading.Thread(target=lambda: busy.append(scorer.score("\\boxed{4}", "4")))
    worker.start()
    assert _wait_for_a_parse(marks) in pids["helpers"]  # the thread's helper now sleeps in parse
    scorer.close()
    assert all(_gone(pid) for pid in procs)
    worker.join(60)
    assert not worker.is_alive() and busy[0].status == "timeout"  # its helper died under it
    assert scorer.score("\\boxed{4}", "4").detail == "RuntimeError: the scorer is closed"
    assert scorer.pids() == {"zygote": None, "helpers": []}


_TRAINER = textwrap.dedent("""
    import json, os, sys, threading, time
    from dynamo_openrlhf.reward import MathReward
    scorer = MathReward(timeout_s=600, workers=2, helper_file=sys.argv[1]).start()
    pids = scorer.pids()
    threading.Thread(target=scorer.score, args=("\\\\boxed{4}", "4"), daemon=True).start()
    while "parse" not in open(os.environ["DYNAMO_STORM_MARKS"]).read():  # a helper sleeps in parse
        time.sleep(0.05)
    fork = os.fork()  # e.g. a data-loader worker: it inherits the zygote's control socket and outlives us
    if fork == 0:
        time.sleep(3600)
        os._exit(0)
    print(json.dumps([fork, pids["zygote"], *pids["helpers"]]), flush=True)
    time.sleep(3600)
""")


def test_the_zygote_and_its_helpers_end_when_the_trainer_is_killed(tmp_path):
    """SIGKILL of the process holding the scorer (nothing of ours runs in it then): the zygote sees its
    parent change and kills its helpers, an idle one and one busy in the storm's parse. A forked child of the
    trainer still holds the zygote's control socket, so the zygote has no end of file to go by."""
    env = dict(os.environ, DYNAMO_STORM_SLEEP_S="3600", OMP_NUM_THREADS="1",
               DYNAMO_STORM_MARKS=str(tmp_path / "marks.txt"))
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, STORM], stdout=subprocess.PIPE, text=True,
                               env=env, cwd=tmp_path)
    fork = None
    try:
        fork, *procs = json.loads(trainer.stdout.readline())
        assert len(procs) == 3 and _parent(procs[0]) == trainer.pid
        assert all(_parent(pid) == procs[0] for pid in procs[1:])
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    try:
        deadline = time.monotonic() + 120  # a liveness bound, not a timing claim (the zygote polls every 0.25 s)
        while not all(_gone(pid) for pid in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in procs if not _gone(pid)] == []
        assert not _gone(fork)  # the control socket was still open in it
    finally:
        if fork is not None:
            os.kill(fork, signal.SIGKILL)


def test_a_killed_zygote_takes_its_helpers_and_a_new_one_takes_over(monkeypatch):
    """The helpers die with their zygote (PR_SET_PDEATHSIG), and the next sample starts a new zygote."""
    from dynamo_openrlhf.reward import MathReward

    monkeypatch.setenv("DYNAMO_STORM_SLEEP_S", "0")
    scorer = MathReward(timeout_s=60, workers=2, helper_file=STORM).start()
    try:
        old = scorer.pids()
        os.kill(old["zygote"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not all(_gone(pid) for pid in old["helpers"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in old["helpers"])
        assert [scorer.score("\\boxed{4}", "4").status for _ in range(3)] == ["correct"] * 3
        assert scorer.zygote_starts == 2 and scorer.pids()["zygote"] not in (None, old["zygote"])
    finally:
        scorer.close()


def test_bad_scorer_settings_are_refused():
    from dynamo_openrlhf.reward import MathReward

    with pytest.raises(ValueError, match="timeout_s must be > 0 seconds, got 0.0"):
        MathReward(timeout_s=0)
    with pytest.raises(ValueError, match="helper_file /nonexistent/checker.py does not exist"):
        MathReward(helper_file="/nonexistent/checker.py")
