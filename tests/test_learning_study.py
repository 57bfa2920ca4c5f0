"""benchmarks/learning_study.py: the pre-registered metrics on hand-written runs (every number known), the
job order, the arms' flags, the held-out set, and one --quick study through the real trainer."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("learning_study", os.path.join(ROOT, "benchmarks", "learning_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ls = _load()


def test_normalised_auc_is_the_mean_height_of_the_trapezoid():
    assert ls.normalised_auc([0, 1, 2], [0.2, 0.4, 0.4]) == pytest.approx((0.3 + 0.4) / 2, rel=1e-15)
    # uneven spacing: (0.1*1 + 0.2*3)/4 with heights (0.0+0.2)/2 and (0.2+0.2)/2
    assert ls.normalised_auc([0, 1, 4], [0.0, 0.2, 0.2]) == pytest.approx((0.1 * 1 + 0.2 * 3) / 4, rel=1e-15)
    with pytest.raises(ValueError, match="increasing x"):
        ls.normalised_auc([0, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=">= 2 points"):
        ls.normalised_auc([0], [0.1])


def test_auc_until_interpolates_the_end_point():
    # y = x on [0, 2], cut at 1.5: mean height 0.75
    assert ls.auc_until([0, 1, 2], [0, 1, 2], 1.5) == pytest.approx(0.75, rel=1e-15)
    assert ls.auc_until([0, 1, 2], [0, 1, 2], 2.0) == pytest.approx(1.0, rel=1e-15)
    with pytest.raises(ValueError, match="outside"):
        ls.auc_until([0, 1, 2], [0, 1, 2], 2.5)


def test_first_reaching_and_bootstrap():
    assert ls.first_reaching([10, 20, 30], [0.1, 0.3, 0.2], 0.25) == 20.0
    assert ls.first_reaching([10, 20], [0.1, 0.2], 0.25) is None
    ci = ls.bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0], resamples=20000, seed=1)
    assert ci["mean"] == 2.5 and ci["n"] == 4
    assert ci["sd"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1), rel=1e-15)
    # the bootstrap distribution of the mean of 4 draws from {1,2,3,4} lies within [1.0, 4.0] and is symmetric
    assert 1.0 <= ci["lo"] < 2.5 < ci["hi"] <= 4.0
    assert ci["lo"] + ci["hi"] == pytest.approx(5.0, abs=0.26)
    const = ls.bootstrap_mean_ci([0.5, 0.5, 0.5])
    assert (const["lo"], const["hi"]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="no values"):
        ls.bootstrap_mean_ci([])


def test_job_order_is_seed_major_with_rotated_arms():
    assert ls.job_order(["a", "b", "c"], [1, 2, 3, 4]) == [
        ("a", 1), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("a", 2), ("c", 3), ("a", 3), ("b", 3),
        ("a", 4), ("b", 4), ("c", 4)]


def test_arms_flags_match_the_study_design():
    a = ls.ARMS
    assert a["grpo"] == ["--algo.advantage.estimator", "group_norm", "--dynamo.allocation.rule", "off",
                         "--dynamo.modulation.preset", "off"]
    assert a["control"] == a["grpo"]
    assert ls.sizing_flags("control") == ["--rollout.n_samples_per_prompt", "12", "--rollout.batch_size", "16",
                                          "--train.batch_size", "192"]
    assert ls.sizing_flags("dynamo", 4, 8) == ["--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "8",
                                               "--train.batch_size", "32"]
    assert ls.sizing_flags("control", 4, 8)[1] == "6"
    assert a["dynamo"] == [] and a["dynamo-alloc"] == ["--dynamo.modulation.preset", "off"]
    assert a["filter"][:2] == ["--dynamo.allocation.rule", "filter"]
    cmd = ls.train_command("filter", 3, "/r", {"train": "/t.jsonl", "eval": "/e.jsonl"}, 4, 8, False)
    assert cmd[1:3] == ["-m", "dynamo_openrlhf.train"]
    for flag, value in (("--train.seed", "3"), ("--eval.dataset", "/e.jsonl"), ("--data.prompt_dataset", "/t.jsonl"),
                        ("--eval.steps", "8"), ("--train.num_episodes", "4")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-dynamo.eval_at_start" in cmd


def _write(path, evals, steps=4, step_time=2.0, samples=128.0, t0=1000.0, eval_dur=5.0, phases=None):
    """A run with train rows 1..steps every step_time s and eval rows {step: {src: (pass1, pass8)}}, each
    eval taking eval_dur s after its step's train row."""
    rows, t = [], t0
    if 0 in evals:
        rows.append({"type": "eval", "step": 0, "time": t0, **_eval_keys(evals[0])})
    for s in range(1, steps + 1):
        t += step_time
        rows.append({"type": "train", "step": s, "time": t, "rollout/num_samples": samples,
                     "timing/step_total": step_time, "timing/ppo_train": step_time / 4,
                     **{f"timing/{k}": v for k, v in (phases or {}).items()}})
        if s in evals:
            t += eval_dur
            rows.append({"type": "eval", "step": s, "time": t, **_eval_keys(evals[s])})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _eval_keys(by_src):
    out = {}
    for src, (p1, p8) in by_src.items():
        out[f"eval_{src}_pass1"], out[f"eval_{src}_pass8"] = p1, p8
    return out


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "study"
    runs = out / "runs"
    e = lambda h, t: {"heldout": (h, h + 0.2), "train": (t, t + 0.3)}  # noqa: E731
    for seed, start in ((1, (0.30, 0.50)), (2, (0.32, 0.52))):
        hs, ts = start
        # grpo: step 0 in this run; +0.01 held-out and +0.02 train per eval
        _write(runs / f"grpo-s{seed}", {0: e(hs, ts), 2: e(hs + 0.01, ts + 0.02), 4: e(hs + 0.02, ts + 0.04)})
        # dynamo: no step 0 (shared from grpo); +0.02 / +0.04 per eval; 10 % slower steps
        _write(runs / f"dynamo-s{seed}", {2: e(hs + 0.02, ts + 0.04), 4: e(hs + 0.04, ts + 0.08)}, step_time=2.2)
    return out


def test_collect_shares_step_zero_and_computes_the_pre_registered_metrics(study):
    runs = ls.collect(str(study), ["grpo", "dynamo"])
    g, d = runs["grpo"][1], runs["dynamo"][1]
    # rollouts 0, 256, 512: AUC = (y0/2 + y1 + y2/2)/2
    assert g["heldout_auc"] == pytest.approx((0.30 / 2 + 0.31 + 0.32 / 2) / 2, rel=1e-12)
    assert d["heldout_auc"] == pytest.approx((0.30 / 2 + 0.32 + 0.34 / 2) / 2, rel=1e-12)
    assert d["curves"]["heldout"][0] == {"step": 0, "rollouts": 0.0, "wall_s": 0.0, "pass1": 0.30, "pass8": 0.50}
    assert d["heldout_final_pass1"] == pytest.approx(0.34) and d["heldout_final_pass8"] == pytest.approx(0.54)
    # train target: start 0.50 + 0.03 -> dynamo reaches it at the first eval (256 rollouts), grpo at the second
    assert d["train_to_target"] == 256.0 and g["train_to_target"] == 512.0
    s = ls.summarise(runs, ["grpo", "dynamo"])
    # paired held-out AUC difference: (0.01 + 0.02/2)/2 = 0.01 for both seeds
    diff = s["dynamo"]["heldout_auc_vs_grpo"]
    assert diff["mean"] == pytest.approx(0.01, rel=1e-9) and diff["lo"] == pytest.approx(0.01, rel=1e-9)
    assert s["dynamo"]["train_auc_vs_grpo"]["mean"] == pytest.approx(0.02, rel=1e-9)
    assert s["dynamo"]["overhead_vs_grpo"]["step_total"]["mean"] == pytest.approx(0.1, rel=1e-12)
    assert s["dynamo"]["timing_ms"]["step_total"] == pytest.approx(2200.0)
    assert s["grpo"]["train_to_target"] == {"reached": 2, "of": 2, "median_rollouts": 512.0}
    # wall clock: grpo's evals at 4 s and 8 s of training, dynamo's at 4.4 s and 8.8 s; up to 8 s
    dyn_wall = ls.auc_until([0, 4.4, 8.8], [0.30, 0.32, 0.34], 8.0)
    assert s["dynamo"]["heldout_wall_auc_vs_grpo"]["mean"] == pytest.approx(
        np.mean([dyn_wall - (0.30 / 2 + 0.31 + 0.32 / 2) / 2,
                 ls.auc_until([0, 4.4, 8.8], [0.32, 0.34, 0.36], 8.0) - (0.32 / 2 + 0.33 + 0.34 / 2) / 2]), rel=1e-9)
    table = ls.markdown(s, {"seeds": [1, 2]})
    assert "| dynamo | 2 | 512 | +0.010 [+0.010, +0.010] |" in table


def test_from_existing_writes_table_json_and_plot(study, tmp_path):
    with open(study / "learning_study.json", "w") as f:
        json.dump({"meta": {"seeds": [1, 2], "arms": ["grpo", "dynamo"], "episodes": 1}}, f)
    png = tmp_path / "p.png"
    assert ls.main(["--from-existing", "--out", str(study), "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000
    data = json.loads((study / "learning_study.json").read_text())
    assert set(data["summary"]) == {"grpo", "dynamo"} and data["meta"]["arms"] == ["grpo", "dynamo"]


def test_finished_runs_are_recognised_for_reuse(tmp_path):
    d = tmp_path / "grpo-s1"
    assert not ls.finished(str(d))
    _write(d, {2: {"heldout": (0.3, 0.5)}})
    assert not ls.finished(str(d))  # no run_info.json yet
    (d / "run_info.json").write_text(json.dumps({"returncode": 1}))
    assert not ls.finished(str(d))
    (d / "run_info.json").write_text(json.dumps({"returncode": 0}))
    assert ls.finished(str(d))


def test_extra_heldout_problems_are_fresh_and_deterministic():
    from dynamo_openrlhf import tiny

    rows = tiny.extra_heldout_problems({4: 50, 5: 30})
    assert rows == tiny.extra_heldout_problems({4: 50, 5: 30})
    assert sorted(r["difficulty"] for r in rows) == [4] * 50 + [5] * 30
    splits = tiny.generate_problems()
    used = {r["prompt"] for s in splits.values() for r in s} | {r["prompt"] for r in tiny.warm_start_problems()}
    assert not used & {r["prompt"] for r in rows}
    assert len({r["prompt"] for r in rows}) == 80
    for r in rows:  # the answer is the expression's value
        assert int(r["answer"]) == eval(r["prompt"][len("What is "):-1])  # noqa: S307 (digits and + * only)
    with pytest.raises(ValueError, match="level 1 has only 0 problems left"):
        tiny.extra_heldout_problems({1: 1})


def test_quick_study_runs_the_real_trainer(tmp_path):
    """Two arms x two seeds, 2 steps each, through python -m dynamo_openrlhf.train (two runs at a time)."""
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learning_study.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "learning_study.json").read_text())
    assert data["meta"]["heldout_prompts"] == 80 + 32 and data["meta"]["train_prompts"] == 32
    for arm in ("grpo", "dynamo"):
        for seed in ("1", "2"):
            run = data["runs"][arm][seed]
            assert run["rollouts"] == 2 * 16 * 8  # 32 prompts / 16 per step = 2 steps of 128 rollouts
            assert [p["step"] for p in run["curves"]["heldout"]] == [0, 1, 2]
            assert 0.0 <= run["heldout_auc"] <= 1.0 and 0.0 <= run["train_auc"] <= 1.0
    # step 0 is evaluated in the grpo run only and shared
    assert data["runs"]["dynamo"]["1"]["curves"]["heldout"][0] == data["runs"]["grpo"]["1"]["curves"]["heldout"][0]
    assert (out / "learning_study.png").stat().st_size > 10_000
