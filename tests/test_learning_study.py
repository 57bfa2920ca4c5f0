"""benchmarks/learning_study.py: the pre-registered metrics (area, effective rollout multiplier M and its
bootstrap) on hand-written runs where every number is known, the arms' flags, the job order, and one --quick
study through the real trainer."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("learning_study", os.path.join(ROOT, "benchmarks", "learning_study.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["learning_study"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


ls = _load()
B = [1.0, 1.5, 2.0, 3.0]
V = [0.30, 0.32, 0.34, 0.36]


# ---------------------------------------------------------------------------------------------- pure functions


def test_normalised_auc_is_the_mean_height_of_the_trapezoid():
    assert ls.normalised_auc([0, 1, 2], [0.2, 0.4, 0.4]) == pytest.approx((0.3 + 0.4) / 2, rel=1e-15)
    # uneven spacing (what dynamic filtering's steps give): (0.1*1 + 0.2*3)/4
    assert ls.normalised_auc([0, 1, 4], [0.0, 0.2, 0.2]) == pytest.approx((0.1 * 1 + 0.2 * 3) / 4, rel=1e-15)
    with pytest.raises(ValueError, match="increasing x"):
        ls.normalised_auc([0, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=">= 2 points"):
        ls.normalised_auc([0], [0.1])


def test_effective_multiplier_interpolates_in_log_budget():
    assert ls.effective_multiplier(B, V, 0.32) == (pytest.approx(1.5, rel=1e-15), "in")
    # halfway between 1.5 and 2 in log budget: the geometric mean sqrt(3)
    m, where = ls.effective_multiplier(B, V, 0.33)
    assert where == "in" and m == pytest.approx(math.sqrt(3.0), rel=1e-14)
    assert ls.effective_multiplier(B, V, 0.30) == (1.0, "in")
    assert ls.effective_multiplier(B, V, 0.36) == (pytest.approx(3.0, rel=1e-15), "in")
    # outside: extrapolated along the end segment, flagged
    m, where = ls.effective_multiplier(B, V, 0.29)  # first segment: 0.02 per log(1.5)
    assert where == "below" and m == pytest.approx(1.5 ** -0.5, rel=1e-14)
    m, where = ls.effective_multiplier(B, V, 0.37)  # last segment: 0.02 per log(1.5), from 2
    assert where == "above" and m == pytest.approx(2.0 * 1.5 ** 1.5, rel=1e-14)
    # not monotone: the first budget that reaches the target
    m, where = ls.effective_multiplier(B, [0.30, 0.35, 0.33, 0.36], 0.34)
    assert where == "in" and m == pytest.approx(1.5 ** 0.8, rel=1e-14)
    m, where = ls.effective_multiplier(B, [0.30, 0.35, 0.36, 0.36], 0.40)  # flat last segment
    assert where == "above" and math.isnan(m)
    assert ls.censored(2.0, "in") == 2.0 and ls.censored(0.5, "below") == 0.0 and ls.censored(9.0, "above") == math.inf


def test_effective_multiplier_bad_input():
    with pytest.raises(ValueError, match="increasing positive budgets"):
        ls.effective_multiplier([1.0, 1.0], [0.3, 0.4], 0.35)
    with pytest.raises(ValueError, match="increasing positive budgets"):
        ls.effective_multiplier([1.0, 2.0], [0.3], 0.35)
    with pytest.raises(ValueError, match="must be finite"):
        ls.effective_multiplier([1.0, 2.0], [0.3, float("nan")], 0.35)


def test_multiplier_ci_is_a_paired_bootstrap_over_seeds():
    calib = np.array([V, V])
    m = ls.multiplier_ci(calib, B, np.array([0.33, 0.33]))
    assert m["where"] == "in" and m["M"] == pytest.approx(math.sqrt(3), rel=1e-14)
    assert m["lo"] == pytest.approx(math.sqrt(3), rel=1e-14) and m["hi"] == pytest.approx(math.sqrt(3), rel=1e-14)
    # two seeds at 0.31 and 0.35: resampled means 0.31 / 0.33 / 0.35 with probability 1/4, 1/2, 1/4
    m = ls.multiplier_ci(calib, B, np.array([0.31, 0.35]))
    assert m["M"] == pytest.approx(math.sqrt(3), rel=1e-14) and m["n"] == 2
    assert m["lo"] == pytest.approx(1.5 ** 0.5, rel=1e-14) and m["hi"] == pytest.approx(2 * 1.5 ** 0.5, rel=1e-14)
    assert m["p_above_1"] == 1.0
    # above the calibrated range: censored to inf, the extrapolation kept
    m = ls.multiplier_ci(calib, B, np.array([0.37, 0.37]))
    assert m["where"] == "above" and m["M"] == math.inf and m["hi"] == math.inf
    assert m["extrapolated"] == pytest.approx(2.0 * 1.5 ** 1.5, rel=1e-14)
    # the calibration curve varies with the seeds too: seed curves shifted by -0.01 / +0.01, arm 0.33 on both
    m = ls.multiplier_ci(np.array([np.array(V) - 0.01, np.array(V) + 0.01]), B, np.array([0.33, 0.33]))
    assert m["M"] == pytest.approx(math.sqrt(3), rel=1e-14)
    assert m["lo"] == pytest.approx(1.5, rel=1e-14)  # both draws seed 2: its curve reaches 0.33 at 1.5
    assert m["hi"] == pytest.approx(2.0, rel=1e-14)  # both seed 1: at 2
    with pytest.raises(ValueError, match=r"calib \(S, K\) and arm \(S,\)"):
        ls.multiplier_ci(np.array(V), B, np.array([0.3]))
    assert ls.format_m({"M": 1.623, "lo": 0.0, "hi": math.inf}, B) == "1.62 [<1, >3]"
    assert ls.format_m({"M": 2.0, "lo": 1.25, "hi": 2.5}, B) == "2.00 [1.25, 2.50]"
    assert ls.format_m(None) == "–"


# ---------------------------------------------------------------------------------------------- the arms


def test_arms_flags_match_the_study_design():
    a = ls.ARMS
    grpo = ["--algo.advantage.estimator", "group_norm", "--dynamo.allocation.rule", "off",
            "--dynamo.modulation.preset", "off"]
    assert ls.CALIBRATION == ["grpo", "grpo-1.25x", "grpo-1.5x", "grpo-2x", "grpo-3x"]
    assert [a[c].budget for c in ls.CALIBRATION] == [1.0, 1.25, 1.5, 2.0, 3.0] and all(a[c].flags(8) == grpo for c in ls.CALIBRATION)
    assert ls.sizing_flags("grpo-3x") == ["--rollout.n_samples_per_prompt", "24", "--rollout.batch_size", "16",
                                          "--train.batch_size", "384", "--train.num_episodes", "2"]
    assert ls.sizing_flags("grpo-1.5x", 4, 8, 2) == ["--rollout.n_samples_per_prompt", "6", "--rollout.batch_size",
                                                     "8", "--train.batch_size", "48", "--train.num_episodes", "2"]
    wide = ["--dynamo.allocation.oversample", "2", "--dynamo.allocation.lo", "0", "--dynamo.allocation.hi", "32",
            "--dynamo.allocation.min_rollouts", "2"]
    assert a["dynamo-wide"].flags(8) == wide + ["--dynamo.modulation.preset", "off"]
    assert a["dynamo-wide+mod"].flags(8) == wide
    # 2x candidates per step: 2x the episodes for the same steps
    assert ls.sizing_flags("dynamo-wide")[-2:] == ["--train.num_episodes", "4"]
    assert ls.sizing_flags("filter", episodes=3)[-2:] == ["--train.num_episodes", "6"]
    assert a["proportional"].flags(8)[:2] == ["--dynamo.allocation.rule", "proportional"]
    assert a["grpo+loss"].flags(8) == ["--dynamo.allocation.rule", "uniform", "--dynamo.modulation.preset", "off"]
    assert a["openrlhf-dynfilter"].flags(8) == grpo + ["--algo.dynamic_filtering_enable",
                                                       "--algo.dynamic_filtering_range", "0", "1"]
    assert ls.sizing_flags("openrlhf-dynfilter")[-1] == "2"
    cmd = ls.train_command("filter", 3, "/r", {"train": "/t.jsonl", "eval": "/e.jsonl"}, 3, 8, 4, False)
    assert cmd[1:3] == ["-m", "dynamo_openrlhf.train"]
    for flag, value in (("--train.seed", "3"), ("--eval.dataset", "/e.jsonl"), ("--data.prompt_dataset", "/t.jsonl"),
                        ("--eval.steps", "8"), ("--eval.n_samples_per_prompt", "4"), ("--train.num_episodes", "6"),
                        ("--dynamo.tiny_task", "carry"), ("--dynamo.cpu_engine", "transformers")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-dynamo.eval_at_start" in cmd and "--actor.model_name_or_path" not in cmd
    cmd = ls.train_command("grpo", 3, "/r", {"train": "/t", "eval": "/e", "model": "/m"}, 3, 8, 4, True)
    assert cmd[cmd.index("--actor.model_name_or_path") + 1] == "/m" and "--dynamo.eval_at_start" in cmd


def test_job_order_is_seed_major_calibration_first_then_rotated_arms():
    assert ls.job_order(["a", "b", "c"], [1, 2, 3, 4]) == [
        ("a", 1), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("a", 2), ("c", 3), ("a", 3), ("b", 3),
        ("a", 4), ("b", 4), ("c", 4)]
    # grpo and the calibration arms lead every seed (a seed cut short keeps its step 0 and its curve)
    arms = ["filter", "grpo-3x", "dynamo-wide", "grpo", "grpo-1.5x"]
    assert ls.job_order(arms, [7, 8]) == [
        ("grpo", 7), ("grpo-1.5x", 7), ("grpo-3x", 7), ("filter", 7), ("dynamo-wide", 7),
        ("grpo", 8), ("grpo-1.5x", 8), ("grpo-3x", 8), ("dynamo-wide", 8), ("filter", 8)]


# ---------------------------------------------------------------------------------------------- parsing


def _write(path, generated, evals, tokens_per_rollout=10.0, rc=0):
    """A run: train rows 1..len(generated) with ``dynamo/generated_rollouts`` = generated[i] (and tokens
    ``tokens_per_rollout`` each), eval rows {step: {src: pass1}}; run_info.json with returncode rc."""
    rows = []
    if 0 in evals:
        rows.append({"type": "eval", "step": 0, **{f"eval_{k}_pass1": v for k, v in evals[0].items()}})
    for s, g in enumerate(generated, start=1):
        rows.append({"type": "train", "step": s, "rollout/num_samples": 128.0, "dynamo/generated_rollouts": g,
                     "dynamo/generated_tokens": g * tokens_per_rollout, "actor_grad_norm": float(s)})
        if s in evals:
            rows.append({"type": "eval", "step": s, **{f"eval_{k}_pass1": v for k, v in evals[s].items()}})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(path, "run_info.json"), "w") as f:
        json.dump({"returncode": rc, "wall_s": 60.0}, f)


CAL_FINAL = {"grpo": (0.32, 0.34), "grpo-1.5x": (0.34, 0.38), "grpo-2x": (0.36, 0.42), "grpo-3x": (0.40, 0.50)}


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "study"
    runs = out / "runs"
    for seed in (1, 2):
        for arm, (mid, end) in CAL_FINAL.items():
            g = 128.0 * ls.ARMS[arm].budget
            ev = {2: {"heldout": mid, "train": 0.5}, 4: {"heldout": end, "train": 0.6}}
            if arm == "grpo":
                ev[0] = {"heldout": 0.30, "train": 0.40}
            _write(runs / f"{arm}-s{seed}", [g] * 4, ev)
        # dynamic filtering: 3 steps generating 200, 100, 212 rollouts; evaluated at step 2 and at the end
        _write(runs / f"openrlhf-dynfilter-s{seed}", [200.0, 100.0, 212.0],
               {2: {"heldout": 0.38, "train": 0.55}, 3: {"heldout": 0.36, "train": 0.65}}, tokens_per_rollout=5.0)
    _write(runs / "grpo+loss-s1", [128.0] * 4, {2: {"heldout": 0.3}, 4: {"heldout": 0.3}}, rc=1)  # failed: unused
    return out


def test_parse_run_falls_back_to_trained_samples_for_older_logs():
    rows = [{"type": "eval", "step": 0, "eval_heldout_pass1": 0.3},
            {"type": "train", "step": 1, "rollout/num_samples": 100.0, "rollout/response_length_mean": 4.0},
            {"type": "train", "step": 2, "rollout/num_samples": 50.0, "rollout/response_length_mean": 2.0},
            {"type": "eval", "step": 2, "eval_heldout_pass1": 0.5}]
    run = ls.parse_run(rows)
    assert run["curve"] == [{"step": 0, "rollouts": 0.0, "tokens": 0.0, "heldout": 0.3},
                            {"step": 2, "rollouts": 150.0, "tokens": 500.0, "heldout": 0.5}]
    assert run["pred_var_ratio"] is None and run["grad_norm"] is None
    with pytest.raises(ValueError, match="no train rows"):
        ls.parse_run(rows[:1])


def test_collect_and_summarise_compute_the_pre_registered_metrics(study):
    runs = ls.collect(str(study), list(ls.ARMS))
    assert set(runs) == set(CAL_FINAL) | {"openrlhf-dynfilter"}  # the failed run is not read
    # calibration areas: step 0 shared, equal spacing -> (0.30/2 + mid + end/2) / 2
    for arm, (mid, end) in CAL_FINAL.items():
        assert runs[arm][1]["heldout_auc"] == pytest.approx((0.15 + mid + end / 2) / 2, rel=1e-12)
    cal = [0.32, 0.34, 0.36, 0.40]
    # the fixture has no grpo-1.25x: the calibration arms that ran are the ones used
    assert [runs[a][2]["heldout_auc"] for a in ls.CALIBRATION if a in runs] == pytest.approx(cal, rel=1e-12)
    d = runs["openrlhf-dynfilter"][1]
    assert [p["rollouts"] for p in d["curve"]] == [0.0, 300.0, 512.0]
    auc = (300 * (0.30 + 0.38) / 2 + 212 * (0.38 + 0.36) / 2) / 512
    assert d["heldout_auc"] == pytest.approx(auc, rel=1e-12)
    assert d["heldout_auc_tokens"] == pytest.approx((1500 * 0.34 + 1060 * 0.37) / 2560, rel=1e-12)
    assert d["train_auc"] == pytest.approx((300 * 0.475 + 212 * 0.60) / 512, rel=1e-12)
    assert d["heldout_final"] == 0.36 and d["steps"] == 3 and d["rollouts"] == 512.0 and d["grad_norm"] == 2.0

    s = ls.summarise(runs, list(ls.ARMS))
    diff = s["openrlhf-dynfilter"]["heldout_auc_vs_grpo"]
    assert diff["mean"] == pytest.approx(auc - 0.32, rel=1e-9) and diff["lo"] == pytest.approx(auc - 0.32, rel=1e-9)
    assert s["grpo-3x"]["heldout_auc_vs_grpo"]["mean"] == pytest.approx(0.08, rel=1e-9)
    # M on the calibration curve 0.32 / 0.34 / 0.36 / 0.40: in the 1.5 -> 2 segment
    t = (auc - 0.34) / 0.02
    m = s["openrlhf-dynfilter"]["M"]
    assert m["where"] == "in" and m["M"] == pytest.approx(1.5 * (4 / 3) ** t, rel=1e-12)
    assert (m["lo"], m["hi"]) == (pytest.approx(m["M"], rel=1e-12), pytest.approx(m["M"], rel=1e-12))
    assert s["grpo-2x"]["M"]["M"] == pytest.approx(2.0, rel=1e-12)
    assert s["grpo"]["M"]["M"] == 1.0 and s["grpo"]["heldout_auc_vs_grpo"] is None
    table = ls.markdown(s, {"seeds": [1, 2], "runs": [{"arm": "grpo+loss", "seed": 1, "returncode": 1}]})
    assert f"| openrlhf-dynfilter | 2 | 3.0 | 512 | {m['M']:.2f} [{m['M']:.2f}, {m['M']:.2f}] | " \
           f"{auc - 0.32:+.3f} [{auc - 0.32:+.3f}, {auc - 0.32:+.3f}] |" in table
    assert "Failed runs: grpo+loss s1 (rc 1)." in table
    table = ls.markdown(s, {"seeds": [1, 2], "deadline": "01:05", "runs": [
        {"arm": "grpo", "seed": 1, "returncode": 0}, {"arm": "filter", "seed": 2, "returncode": "deadline"},
        {"arm": "grpo", "seed": 3, "returncode": "not started"}, {"arm": "filter", "seed": 3, "returncode": "not started"}]})
    assert "Failed runs: filter s2 (rc deadline), 2 runs not started (deadline 01:05; seeds [3])." in table


def test_from_existing_writes_table_json_and_plot(study, tmp_path):
    with open(study / "learning_study.json", "w") as f:
        json.dump({"meta": {"seeds": [1, 2], "arms": list(ls.ARMS), "episodes": 3}}, f)
    png = tmp_path / "p.png"
    assert ls.main(["--from-existing", "--out", str(study), "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000
    data = json.loads((study / "learning_study.json").read_text())
    assert set(data["summary"]) == set(CAL_FINAL) | {"openrlhf-dynfilter"}
    assert (study / "learning_study.md").read_text().startswith("| arm | seeds |")


def test_finished_runs_are_recognised_for_reuse(tmp_path):
    d = tmp_path / "grpo-s1"
    assert not ls.finished(str(d))
    _write(d, [128.0], {1: {"heldout": 0.3}}, rc="timeout")
    assert not ls.finished(str(d))
    _write(d, [128.0], {1: {"heldout": 0.3}}, rc=0)
    assert ls.finished(str(d))
    os.remove(d / "metrics.jsonl")
    assert not ls.finished(str(d))


# ---------------------------------------------------------------------------------------------- the real trainer


def test_quick_study_runs_the_real_trainer(tmp_path):
    """grpo and dynamo-wide, one seed (the quick mode's seeds 1,2 would double CI's time for no new code path:
    the aggregation over seeds is tested on fixed inputs above), 2 steps each, through python -m
    dynamo_openrlhf.train (both at a time)."""
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learning_study.py"), "--quick",
                           "--seeds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "learning_study.json").read_text())
    assert data["meta"]["heldout_prompts"] == 8 and data["meta"]["train_eval_prompts"] == 8
    assert all(i["returncode"] == 0 for i in data["meta"]["runs"]), data["meta"]["runs"]
    assert data["meta"]["seeds"] == [1] and sorted(data["runs"]["grpo"]) == ["1"]
    for arm in ("grpo", "dynamo-wide"):
        for seed in ("1",):
            run = data["runs"][arm][seed]
            # 16 train prompts: 2 steps of 8 x 4 = 32 generated rollouts (dynamo-wide: 16 candidates a step, 2 episodes)
            assert run["steps"] == 2 and run["rollouts"] == 2 * 8 * 4
            assert [p["step"] for p in run["curve"]] == [0, 1, 2]
            assert [p["rollouts"] for p in run["curve"]] == [0.0, 32.0, 64.0]
            assert 0.0 <= run["heldout_auc"] <= 1.0 and 0.0 <= run["train_auc"] <= 1.0
    assert data["runs"]["dynamo-wide"]["1"]["alloc_candidates"] == 16.0
    assert data["meta"]["flags"]["dynamo-wide"][5] == "16"  # hi = 4n
    # step 0 is evaluated in the grpo run only and shared
    assert data["runs"]["dynamo-wide"]["1"]["curve"][0] == data["runs"]["grpo"]["1"]["curve"][0]
    assert (out / "learning_study.png").stat().st_size > 10_000


def test_deadline_parsing_and_a_run_past_its_deadline_is_not_started(tmp_path):
    now = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    assert ls.next_utc("08:30", now) == now + 1800
    assert ls.next_utc("08:00", now) == now
    assert ls.next_utc("01:05", now) == now + 86400 - 6 * 3600 - 55 * 60
    with pytest.raises(ValueError, match="expected HH:MM"):
        ls.next_utc("25:00", now)
    info = ls.run_one("grpo", 1, str(tmp_path), [sys.executable, "-c", "pass"], deadline=1.0)
    assert info["returncode"] == "not started" and not (tmp_path / "runs").exists()
    # a run stopped at the deadline: its whole session is ended and recorded as such
    info = ls.run_one("grpo", 2, str(tmp_path), [sys.executable, "-c", "import time; time.sleep(30)"],
                      deadline=__import__("time").time() + 1.0)
    assert info["returncode"] == "deadline" and info["wall_s"] < 20
    assert json.loads((tmp_path / "runs" / "grpo-s2" / "run_info.json").read_text())["returncode"] == "deadline"
    assert not ls.finished(str(tmp_path / "runs" / "grpo-s2"))


def test_a_calibration_arm_reaches_its_own_mean_despite_rounding():
    # the column mean and the arm's own mean are summed in different orders: equal only up to rounding
    col = np.array([0.1, 0.2, 0.3]) + 0.06
    calib = np.column_stack([col - 0.06, col - 0.04, col - 0.02, col])
    m = ls.multiplier_ci(calib, B, col.copy())  # the grpo-3x arm itself
    assert m["where"] == "in" and m["M"] == pytest.approx(3.0, rel=1e-9) and m["M"] <= 3.0
    assert ls.format_m(m, B) == "3.00 [3.00, 3.00]"
    assert ls.effective_multiplier(B, V, 0.36 + 1e-15) == (pytest.approx(3.0, rel=1e-12), "in")
    assert ls.effective_multiplier(B, V, 0.36 + 1e-9)[1] == "above"
