"""Kills during a checkpoint save (issue #21 §1): every file of a checkpoint is written atomically
(dynamo_openrlhf.checkpoint), so a SIGKILL at any moment of a save leaves the last complete checkpoint
loadable, and the pass-rate pool restored from it is bit for bit (sha256) the pool an uninterrupted run had
at that step; a damaged pool, pool file or checkpoint is refused with a message naming the file.

The kill sweep runs the code the trainer runs: a real DeepSpeed ZeRO-2 engine on CPU, OpenRLHF's
``DeepspeedStrategy.save_ckpt`` / ``load_ckpt`` and the trainer's ``dynamo_state_dict`` /
``load_dynamo_state_dict``, in one worker process (``python tests/test_checkpoint_faults.py <dir>``) that forks
one child per kill point (the child SIGKILLs itself at that point) and one per resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

STEPS = 3  # training steps of the sweep's run, each followed by a checkpoint save
FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest", "metric.json")
POINTS_PER_FILE = 5  # save points of dynamo_openrlhf.checkpoint.atomic_write
LATEST_RENAMED = "latest: renamed, directory not synced"
# (point of the first kill, in the last save; point of the second, in the resumed run's save of that step:
# model states, optimizer states, latest before its rename)
DOUBLE_KILLS = ((43, 2), (48, 7), (52, 12), (53, 13))


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("DYNAMO_OPENRLHF_SAVE_FAULT", None)
    env.pop("DYNAMO_OPENRLHF_SAVE_FAULT_LOG", None)
    return env


# ------------------------------------------------------------------------------------------------
# The worker (runs in its own process; forks the kill and resume children)
# ------------------------------------------------------------------------------------------------

def _worker(out_dir: str) -> None:  # pragma: no cover - runs in a subprocess
    import socket

    from dynamo_openrlhf import checkpoint, cpu_backend

    cpu_backend.install_import_stand_ins()
    cpu_backend.apply_cpu_patches()
    import deepspeed
    import torch
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator
    from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

    torch.set_num_threads(1)
    checkpoint.install_atomic_checkpoints()
    strategy = object.__new__(DeepspeedStrategy)  # save_ckpt/load_ckpt use no constructor state
    config = AllocationConfig(n_samples_per_prompt=8, prompts_per_step=16, lo=6, hi=10, forget=0.9)
    engine = None

    def start_engine():
        """A fresh ZeRO-2 engine at step 0 in this (forked) process: gloo does not survive a fork, so
        each child has its own process group and engine."""
        nonlocal engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2,
                                                                                             "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())

    def new_trainer():
        t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
        t.history, t.allocator, t.experience_maker = [], RolloutAllocator(config), None
        t.args = SimpleNamespace(ckpt=SimpleNamespace(path=os.path.dirname(ckdir)))
        return t

    def train_step(trainer, step):
        """One deterministic step: an optimizer step of the engine and a pool update of 16 prompts."""
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 16, generator=g)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        rng = np.random.default_rng(step)
        ids = rng.choice(40, size=16, replace=False)
        trials = rng.integers(6, 11, size=16)
        trainer.allocator.record(ids, rng.binomial(trials, 0.4), trials)
        trainer.history.append({"step": step})

    def params_digest():
        return hashlib.sha256(b"".join(p.detach().double().numpy().tobytes()
                                       for p in engine.module.parameters())).hexdigest()

    def save(trainer, step):
        states = {"episode": 0, "global_step": step, "total_consumed_prompts": 16 * step,
                  "data_loader_state_dict": {}, "dynamo": trainer.dynamo_state_dict()}
        strategy.save_ckpt(engine, ckdir, f"global_step{step}", 2, 1000, states, metric_value=None, metric_key=None)

    def run(trainer, first_step):
        for step in range(first_step, STEPS + 1):
            train_step(trainer, step)
            save(trainer, step)

    def in_child(fn, **env):
        """fn() in a forked child with a fresh engine (step 0); the child's wait status."""
        pid = os.fork()
        if pid == 0:
            os.environ.update(env)
            signal.alarm(120)  # a hung child dies (SIGALRM) instead of hanging the sweep
            code = 1
            try:
                start_engine()
                fn()
                code = 0
            except BaseException as e:
                print(f"child failed: {type(e).__name__}: {e}", flush=True)
            finally:
                os._exit(code)
        return os.waitpid(pid, 0)[1]

    result = {"reference": {}, "kills": []}
    ckdir = os.path.join(out_dir, "reference", "_actor")
    log = os.path.join(out_dir, "points.log")

    def reference():
        t = new_trainer()
        digests = {0: [t.allocator.pool_digest(), params_digest()]}
        for step in range(1, STEPS + 1):
            train_step(t, step)
            save(t, step)
            digests[step] = [t.allocator.pool_digest(), params_digest()]
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            json.dump(digests, f)

    assert in_child(reference, DYNAMO_OPENRLHF_SAVE_FAULT_LOG=log) == 0
    with open(os.path.join(out_dir, "reference.json")) as f:
        result["reference"] = {int(k): v for k, v in json.load(f).items()}
    with open(log) as f:
        result["points"] = [line.rstrip("\n").split("\t", 1)[1] for line in f]

    def killed(status):
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    def resume(out=None):
        """The resume path: OpenRLHF's load_ckpt ((None, {}) without a complete checkpoint), the trainer's
        load_dynamo_state_dict, then the run continued to its end, saving as before."""
        _, states = strategy.load_ckpt(engine, ckdir)
        t = new_trainer()
        step = states.get("global_step", 0)
        if step:
            t.load_dynamo_state_dict(states["dynamo"])
        at = [step, t.allocator.pool_digest(), params_digest()]
        run(t, step + 1)
        if out:
            with open(out, "w") as f:
                json.dump({"at": at, "end": [t.allocator.pool_digest(), params_digest()]}, f)

    def outcome(record, name):
        record.update(problem=checkpoint.resume_problem(ckdir), latest=checkpoint.latest_tag(ckdir))
        resumed = os.path.join(out_dir, f"{name}.json")
        record["resume_status"] = in_child(lambda: resume(resumed))
        with open(resumed) as f:
            record.update(json.load(f))
        shutil.rmtree(os.path.dirname(ckdir))
        return record

    for k in range(1, len(result["points"]) + 1):
        ckdir = os.path.join(out_dir, f"kill{k}", "_actor")
        status = in_child(lambda: run(new_trainer(), 1), DYNAMO_OPENRLHF_SAVE_FAULT=str(k))
        result["kills"].append(outcome({"k": k, "killed": killed(status)}, f"resumed{k}"))

    # Killed in the last save, then killed again while the resumed run saves that step again.
    result["double_kills"] = []
    for k1, k2 in DOUBLE_KILLS:
        ckdir = os.path.join(out_dir, f"double{k1}-{k2}", "_actor")
        first = in_child(lambda: run(new_trainer(), 1), DYNAMO_OPENRLHF_SAVE_FAULT=str(k1))
        second = in_child(resume, DYNAMO_OPENRLHF_SAVE_FAULT=str(k2))
        result["double_kills"].append(outcome({"k": [k1, k2], "killed": killed(first) and killed(second)},
                                              f"double{k1}-{k2}"))
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill_sweep")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=_env(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "result.json") as f:
        r = json.load(f)
    r["reference"] = {int(k): v for k, v in r["reference"].items()}
    return r


def test_every_save_point_is_reached_once_per_file_and_save(sweep):
    names = sweep["points"]
    assert len(names) == STEPS * len(FILES) * POINTS_PER_FILE == 60
    per_save = names[:len(FILES) * POINTS_PER_FILE]
    assert names == per_save * STEPS
    # latest is written after every other file of the tag
    assert [n.split(":")[0] for n in per_save[::POINTS_PER_FILE]] == ["before " + f for f in FILES]
    assert per_save.index("before latest") > max(i for i, n in enumerate(per_save) if n.startswith(FILES[1]))


def test_a_kill_at_any_save_point_resumes_the_last_complete_checkpoint_exactly(sweep):
    ref = sweep["reference"]
    assert len(set(map(tuple, ref.values()))) == STEPS + 1  # every step changes the pool and the model
    assert len(sweep["kills"]) == 60
    for kill in sweep["kills"]:
        k = kill["k"]
        assert kill["killed"], f"point {k} ({sweep['points'][k - 1]}): the child was not SIGKILLed"
        # the checkpoint is complete once `latest` names it (its rename), not before
        complete = sum(n == LATEST_RENAMED for n in sweep["points"][:k])
        assert kill["problem"] is None, (k, kill["problem"])
        assert kill["latest"] == (f"global_step{complete}" if complete else None), k
        assert kill["resume_status"] == 0, k
        step, pool, params = kill["at"]
        assert step == complete, k
        assert [pool, params] == ref[step], f"point {k}: resumed state differs from the uninterrupted run's"
        assert kill["end"] == ref[STEPS], f"point {k}: the resumed run did not end where the uninterrupted run did"


def test_a_second_kill_while_saving_the_same_step_again_still_resumes_the_last_complete_checkpoint(sweep):
    """OpenRLHF's rotation (--ckpt.max_num 2) counted the first kill's partial directory as a checkpoint and
    deleted the one the run resumed from: a second kill then left none. The partial directory is removed first."""
    ref = sweep["reference"]
    assert [d["k"] for d in sweep["double_kills"]] == [list(k) for k in DOUBLE_KILLS]
    for d in sweep["double_kills"]:
        assert d["killed"] and d["problem"] is None and d["resume_status"] == 0, d
        assert d["latest"] == f"global_step{STEPS - 1}", d
        assert d["at"] == [STEPS - 1, *ref[STEPS - 1]] and d["end"] == ref[STEPS], d


# ------------------------------------------------------------------------------------------------
# Damaged files are refused with a message naming them
# ------------------------------------------------------------------------------------------------

def _pool(n=2000, seed=0):
    from dynamo_openrlhf import PassRatePool

    rng = np.random.default_rng(seed)
    pool = PassRatePool(prior=(1.0, 1.0), forget=0.95)
    for _ in range(3):
        ids = rng.choice(10 * n, size=n, replace=False)
        trials = rng.integers(1, 9, size=n)
        pool.update(ids, rng.binomial(trials, 0.3), trials)
    return pool


def test_a_truncated_or_half_renamed_pool_file_is_refused_naming_it(tmp_path):
    from dynamo_openrlhf import PassRatePool

    pool = _pool()
    path = tmp_path / "pass_rate_pool.bin"
    pool.save(str(path))
    data = path.read_bytes()
    for cut in (0, 40, 76, len(data) // 2, len(data) - 1):
        bad = tmp_path / f".pass_rate_pool.bin.tmp-1234-{cut}"  # what a kill mid-save leaves behind
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{bad} is not a valid PassRatePool file: "
                                             rf"({'the file is empty' if cut == 0 else 'truncated'})"):
            PassRatePool.load(str(bad))
    assert PassRatePool.load(str(path)).to_bytes() == data


def test_a_damaged_pool_in_a_checkpoint_is_refused_naming_the_checkpoint_file(tmp_path, capsys):
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator
    from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

    def trainer():
        t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
        t.history, t.allocator, t.experience_maker = [], RolloutAllocator(AllocationConfig(forget=0.95)), None
        t.args = SimpleNamespace(ckpt=SimpleNamespace(path=str(tmp_path)))
        return t

    (tmp_path / "_actor").mkdir()
    (tmp_path / "_actor" / "latest").write_text("global_step7")
    run = trainer()
    run.allocator.pool = _pool()
    state = run.dynamo_state_dict()
    good = state["allocator"]["pool"]
    file = tmp_path / "_actor" / "global_step7" / "mp_rank_00_model_states.pt"
    for damaged, why in ((good[:len(good) // 2], "truncated"), (good[:-1], "truncated"),
                         (good[:100] + bytes([good[100] ^ 1]) + good[101:], "data checksum mismatch")):
        state["allocator"]["pool"] = damaged
        with pytest.raises(ValueError, match=rf"^{file}: the DynaMO pass-rate pool in this checkpoint is not valid "
                                             rf"\(is not a valid PassRatePool file: {why}"):
            trainer().load_dynamo_state_dict(state)
    state["allocator"]["pool"] = good
    resumed = trainer()
    resumed.load_dynamo_state_dict(state)
    assert resumed.allocator.pool_digest() == hashlib.sha256(good).hexdigest()


def test_resume_problem_names_the_file(tmp_path):
    from dynamo_openrlhf.checkpoint import resume_problem

    ck = tmp_path / "_actor"
    assert resume_problem(str(ck)) is None  # nothing saved yet: OpenRLHF starts fresh
    (ck / "global_step2").mkdir(parents=True)
    assert resume_problem(str(ck)) is None  # the first save was interrupted: nothing complete, start fresh
    (ck / "latest").write_text("")  # what DeepSpeed's own save leaves when killed between open("w") and write
    assert resume_problem(str(ck)).startswith(f"{ck / 'latest'} is empty (a save was interrupted while writing it)")
    (ck / "latest").write_text("global_step3")
    assert resume_problem(str(ck)) == (f"{ck / 'latest'} names checkpoint 'global_step3', but "
                                       f"{ck / 'global_step3' / 'mp_rank_00_model_states.pt'} does not exist")
    import torch

    states = ck / "global_step3" / "mp_rank_00_model_states.pt"
    states.parent.mkdir()
    torch.save({"module": {"w": torch.zeros(1000)}}, str(states))
    assert resume_problem(str(ck)) is None
    data = states.read_bytes()
    states.write_bytes(data[: len(data) - 100])
    assert resume_problem(str(ck)).startswith(f"{states} is not a complete checkpoint file (")


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    from dynamo_openrlhf.checkpoint import atomic_write, atomic_write_bytes

    path = tmp_path / "latest"
    atomic_write_bytes(str(path), b"global_step1")

    def half_then_fail(f):
        f.write(b"global_st")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), half_then_fail)
    assert path.read_bytes() == b"global_step1"
    assert os.listdir(tmp_path) == ["latest"]  # the temporary file is removed


# ------------------------------------------------------------------------------------------------
# The Rust pool save (the run's final pass_rate_pool.bin) under kills at seeded moments
# ------------------------------------------------------------------------------------------------

_SAVER = """
import sys
from dynamo_openrlhf import PassRatePool
a, b = PassRatePool.load(sys.argv[1]), PassRatePool.load(sys.argv[2])
print("ready", flush=True)
while True:
    a.save(sys.argv[3])
    b.save(sys.argv[3])
"""


def test_kills_at_seeded_moments_of_the_pool_save_leave_an_old_or_new_complete_file(tmp_path):
    """A process saving two pools (about 34 MB each) alternately over one path is SIGKILLed at 24 seeded
    moments; each time the path holds one of the two pools, complete (never a partial file)."""
    from dynamo_openrlhf import PassRatePool

    a, b = _pool(500_000, seed=1), _pool(500_000, seed=2)
    a.save(str(tmp_path / "a.bin"))
    b.save(str(tmp_path / "b.bin"))
    digests = {hashlib.sha256(a.to_bytes()).hexdigest(): "a", hashlib.sha256(b.to_bytes()).hexdigest(): "b"}
    target = tmp_path / "out" / "pass_rate_pool.bin"
    target.parent.mkdir()
    rng = np.random.default_rng(21)
    seen, partial = [], []
    for delay in rng.uniform(0.05, 0.6, size=24):
        p = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path / "a.bin"), str(tmp_path / "b.bin"),
                              str(target)], stdout=subprocess.PIPE, env=_env(), text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        if target.exists():
            seen.append(digests[hashlib.sha256(PassRatePool.load(str(target)).to_bytes()).hexdigest()])
        # The temporary file a kill leaves (the run never reads it): a partial one is refused naming it, a complete
        # one (killed between its fsync and the rename) is one of the two pools.
        for leftover in target.parent.glob(".pass_rate_pool.bin.tmp-*"):
            try:
                partial.append(digests[hashlib.sha256(PassRatePool.load(str(leftover)).to_bytes()).hexdigest()])
            except ValueError as e:
                # killed before its first byte ("the file is empty") or mid-write ("truncated")
                assert str(e).startswith((f"{leftover} is not a valid PassRatePool file: truncated",
                                          f"{leftover} is not a valid PassRatePool file: the file is empty")), e
                partial.append("refused")
            leftover.unlink()
    assert len(seen) >= 20
    assert "refused" in partial  # some kills did land mid-write


if __name__ == "__main__":
    _worker(sys.argv[1])
