"""The short "Faults" table (docs/faults.md, "In short") is kept current: every message in it is what the code
says today.

Each fault whose "what the user sees" cell is one message is triggered here, cheaply and in-process, through
the function the trainer or the launcher runs when it happens (the trainer's ``load_dynamo_state_dict`` for a
damaged pool in a checkpoint, the launcher's ``_preflight`` for an interrupted ``latest``, ``load_pool`` for
``--dynamo.pool.load``, the samples generator's and the experience maker's non-finite checks, the launcher's
``engine_fault_message`` for a dying rollout engine), and the test
checks that the table row's cell is exactly that message (paths are made stable with fixed names in a
temporary directory: ``ckpt`` is ``--ckpt.path``, ``FILE`` a pool file). A fault with no single message (a kill,
a reward storm) names in its row the tests that exercise it (``tests/<file>.py::<test>``); the test checks that
the row names them and that each is a test function in that file. The long version of the table, with what
each row rests on, follows it in docs/faults.md ("In full").
"""
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "faults.md"
HEADER = "| fault | what the user sees | what is kept |"
NAN = float("nan")

# Faults with no single message: the tests that exercise each one (the table row must name exactly these).
TESTED = {
    "kill during a checkpoint save": [
        "tests/test_checkpoint_faults.py::test_a_kill_at_any_save_point_resumes_the_last_complete_checkpoint_exactly",
        "tests/test_checkpoint_faults.py::"
        "test_a_second_kill_while_saving_the_same_step_again_still_resumes_the_last_complete_checkpoint",
    ],
    "kill during a pool-file save": [
        "tests/test_checkpoint_faults.py::test_kills_at_seeded_moments_of_the_pool_save_leave_an_old_or_new_complete_file",
    ],
    "reward storm (every sample of a step times out)": [
        "tests/test_reward_storm.py::test_a_storm_gives_one_timeout_per_sample_and_the_scorer_recovers",
        "tests/test_reward_storm.py::test_the_pool_counts_each_timed_out_sample_as_one_failure",
    ],
}

TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _message(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


def _pool():
    """A small pool with evidence for 4 prompts (its file: 2952 bytes)."""
    from dynamo_openrlhf import PassRatePool

    pool = PassRatePool(prior=(1.0, 1.0), forget=0.95)
    pool.update(np.arange(4), np.array([1, 2, 0, 3]), np.array([4, 4, 4, 4]))
    return pool


def _trainer(ckpt: Path):
    """The DynaMO trainer's state glue (no Ray actor, no model): what ``init_checkpoint_states`` calls."""
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator
    from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

    t = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    t.history, t.allocator, t.experience_maker = [], RolloutAllocator(AllocationConfig(forget=0.95)), None
    t.args = SimpleNamespace(ckpt=SimpleNamespace(path=str(ckpt)))
    return t


def _damaged_pool_in_checkpoint(tmp: Path):
    # A checkpoint whose pool bytes were cut in half (a disk or copy fault; this package's own saves are atomic).
    actor = tmp / "ckpt" / "_actor"
    actor.mkdir(parents=True)
    (actor / "latest").write_text("global_step7")
    saved = _trainer(tmp / "ckpt")
    saved.allocator.pool = _pool()
    state = saved.dynamo_state_dict()
    good = state["allocator"]["pool"]
    state["allocator"]["pool"] = good[: len(good) // 2]
    resumed = _trainer(tmp / "ckpt")
    try:
        resumed.load_dynamo_state_dict(state)
    except ValueError:
        assert len(resumed.allocator.pool) == 0  # "what is kept": nothing is loaded from it
        raise


def _interrupted_latest(tmp: Path):
    # The launcher's check before Ray starts, with --ckpt.load_enable (train._preflight).
    from dynamo_openrlhf.train import _preflight

    actor = tmp / "ckpt" / "_actor"
    (actor / "global_step4").mkdir(parents=True)
    (actor / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"PK")
    (actor / "latest").write_text("")  # DeepSpeed's own save, killed between open("w") and write
    args = SimpleNamespace(
        data=SimpleNamespace(prompt_dataset="org/prompts"), eval=SimpleNamespace(dataset=None),
        actor=SimpleNamespace(model_name_or_path="org/model"), reward=SimpleNamespace(remote_url=None),
        ckpt=SimpleNamespace(load_enable=True, path=str(tmp / "ckpt")), vllm=SimpleNamespace(num_engines=1),
        dynamo=SimpleNamespace(backend="gpu"))
    problems = _preflight(args)
    assert len(problems) == 1, problems  # the fault is the only problem with these arguments
    raise ValueError(problems[0])


def _truncated_pool_file(tmp: Path):
    # --dynamo.pool.load of a pool file missing its last byte (read by the launcher before Ray starts).
    from dynamo_openrlhf.allocation import load_pool

    data = _pool().to_bytes()
    (tmp / "FILE").write_bytes(data[:-1])
    load_pool(str(tmp / "FILE"), 0.95)


def _nan_reward():
    # The step's samples as the generator returns them (one reward each); the second sample's reward is NaN.
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf.samples_generator import DynamoSamplesGenerator

    gen = object.__new__(DynamoSamplesGenerator)
    gen.nonfinite, gen.reward_source = "error", "/data/my_reward.py"  # --dynamo.nonfinite error (the default)
    samples = [SimpleNamespace(prompts=["What is 5+1?"], labels=["6"], rewards=torch.tensor([r]),
                               scores=torch.tensor([r])) for r in (1.0, NAN, 0.0, 1.0)]
    gen._check_rewards(samples)


def _nan_old_log_prob():
    # One micro-batch of 2 samples x 3 response tokens; sample 1's old log-prob of token 2 is NaN.
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from openrlhf.trainer.ppo_utils.experience import Experience

    from dynamo_openrlhf.experience_maker import DynamoExperienceMaker

    maker = object.__new__(DynamoExperienceMaker)
    maker.nonfinite = "error"
    log_probs = -torch.ones(2, 3)
    log_probs[1, 2] = NAN
    exp = Experience(action_mask=torch.ones(2, 3, dtype=torch.bool), action_log_probs=log_probs, index=[0, 1],
                     prompts=["What is 5+1?"] * 2, labels=["6"] * 2, info={})
    maker._nonfinite_check([exp], "old log-prob", lambda e: e.action_log_probs)


def _engine_died(tmp: Path):
    # The driver's message when its engine watch (or the trainer's failing call) finds rollout engine 0 dead
    # after step 1's checkpoint (engine_faults; the actor id and pid here are fixed stand-ins).
    from dynamo_openrlhf.engine_faults import EngineFault, engine_fault_message

    tag = tmp / "ckpt" / "_actor" / "global_step1"
    tag.mkdir(parents=True, exist_ok=True)
    import zipfile

    with zipfile.ZipFile(tag / "mp_rank_00_model_states.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    (tag.parent / "latest").write_text("global_step1")
    fault = EngineFault(index=0, num_engines=2, engine="vllm", actor_id="ACTOR", pid=12345,
                        what="died (ActorDiedError: its actor process is gone)")
    raise RuntimeError(engine_fault_message(fault, str(tmp / "ckpt")))


def _cases(tmp: Path):
    return {
        "damaged pool in a checkpoint": lambda: _damaged_pool_in_checkpoint(tmp),
        "interrupted `latest`": lambda: _interrupted_latest(tmp),
        "truncated `--dynamo.pool.load` file": lambda: _truncated_pool_file(tmp),
        "NaN/±inf reward": _nan_reward,
        "NaN/±inf old log-prob or advantage (a non-finite loss stops the same way, before `backward`)":
            _nan_old_log_prob,
        "rollout engine dies mid-run": lambda: _engine_died(tmp),  # last: it rewrites ckpt/_actor/latest
    }


def _table_rows():
    """{fault: (what the user sees, what is kept)} of the short table in docs/faults.md (its lines from the header
    to the first non-row: the long table below it has other columns and is not read)."""
    text = TABLE.read_text(encoding="utf-8")
    start = text.index(HEADER)
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            break
        m = re.match(r"^\| (.+?) \| (.+?) \| (.+) \|$", line)
        if m and m.group(1) != "fault":  # not the header
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def _single_message(cell: str):
    """The message of a cell that is exactly one code span, else None."""
    m = re.fullmatch(r"`([^`]+)`", cell)
    return m.group(1) if m else None


def test_faults_table_matches_the_code(tmp_path):
    rows = _table_rows()
    cases = _cases(tmp_path)
    assert set(rows) == set(cases) | set(TESTED), (sorted(rows), sorted(set(cases) | set(TESTED)))
    for name, fn in cases.items():
        msg = _message(fn).replace(str(tmp_path) + os.sep, "")
        assert _single_message(rows[name][0]) == msg, (name, msg)


def test_rows_without_a_message_name_the_tests_that_exercise_them():
    rows = _table_rows()
    for name, tests in TESTED.items():
        seen, _kept = rows[name]
        assert _single_message(seen) is None, name
        named = ["::".join(m) for m in TEST_REF.findall(" ".join(rows[name]))]
        assert sorted(named) == sorted(tests), (name, named)


def test_every_test_the_table_names_exists():
    refs = [m for seen, kept in _table_rows().values() for m in TEST_REF.findall(seen + " " + kept)]
    assert refs
    for path, name in refs:
        file = ROOT / path
        assert file.is_file(), path
        assert re.search(rf"^def {name}\(", file.read_text(), re.M), f"{path} has no test function {name}"
