"""benchmarks/bench_async.py (issue #25 §6): the paired computation on fixed inputs, then the quick mode end to end
(one sync and one async run of the tiny task) with the output's structure checked. No timing asserts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_async as b  # noqa: E402


def _rows(times, tokens, gen, briers, trials=32.0):
    return [{"type": "train", "step": i + 1, "time": t, "dynamo/generated_tokens": tokens,
             "timing/generation": gen, "dynamo/pool_brier": br, "dynamo/step_trials": trials}
            for i, (t, br) in enumerate(zip(times, briers))]


def test_step_values_use_the_wall_time_between_rows():
    rows = _rows([100.0, 110.0, 125.0], 200.0, 4.0, [0.25, 0.2, 0.1])
    rows.append({"type": "eval", "step": 3, "time": 130.0})  # other rows are ignored
    v = b.step_values(rows)
    assert v == [{"step": 2, "wall_s": 10.0, "tokens_per_s": 20.0, "gen_tokens_per_s": 50.0},
                 {"step": 3, "wall_s": 15.0, "tokens_per_s": 200.0 / 15.0, "gen_tokens_per_s": 50.0}]
    with pytest.raises(ValueError, match=r"train rows must be steps 1..S once each, got \[1, 3\]"):
        b.step_values([rows[0], rows[2]])
    with pytest.raises(ValueError, match="step 2: wall time -10.0 s is not positive"):
        b.step_values(_rows([100.0, 90.0], 1.0, 1.0, [0.1, 0.1]))
    bad = _rows([0.0, 1.0], 1.0, 1.0, [0.1, 0.1])
    del bad[1]["timing/generation"]
    with pytest.raises(ValueError, match="step 2: the metrics row has no 'timing/generation'"):
        b.step_values(bad)


def test_pooled_brier_is_trial_weighted():
    rows = _rows([0.0, 1.0, 2.0], 1.0, 1.0, [0.3, 0.2, 0.1])
    rows[2]["dynamo/step_trials"] = 96.0
    assert b.pooled_brier(rows) == pytest.approx((0.3 * 32 + 0.2 * 32 + 0.1 * 96) / 160)
    assert b.pooled_brier(rows, after_step=1) == pytest.approx((0.2 * 32 + 0.1 * 96) / 128)
    assert b.pooled_brier(rows, after_step=3) is None


def test_paired_ratios_medians_and_seed_bootstrap():
    sync = {1: {2: 10.0, 3: 10.0}, 2: {2: 20.0, 3: 8.0}}
    asyn = {1: {2: 5.0, 3: 20.0}, 2: {2: 10.0, 3: 8.0, 4: 1.0}}  # step 4 has no sync partner
    p = b.paired(sync, asyn, n_boot=500)
    # ratios 0.5, 2.0 (seed 1) and 0.5, 1.0 (seed 2)
    assert p["n_pairs"] == 4 and p["n_seeds"] == 2
    assert p["ratio_median"] == 0.75 and p["sync_median"] == 10.0 and p["async_median"] == 9.0
    lo, hi = p["ratio_ci95"]
    # resampling seeds: the replicates are seed 1 twice (median 1.25), seed 2 twice (0.75) or both (0.75)
    assert lo == 0.75 and hi == 1.25
    one = b.paired({1: {2: 2.0}}, {1: {2: 3.0}})
    assert one["ratio_median"] == 1.5 and one["ratio_ci95"] is None
    with pytest.raises(ValueError, match="no \\(seed, step\\) is present in both modes"):
        b.paired({1: {2: 1.0}}, {2: {2: 1.0}})
    with pytest.raises(ValueError, match="seed 1 step 2: sync value 0.0 must be > 0"):
        b.paired({1: {2: 0.0}}, {1: {2: 1.0}})


def test_paired_difference_and_schedule():
    d = b.paired_difference({1: 0.20, 2: 0.25, 3: None}, {1: 0.22, 2: 0.24, 3: 0.1}, n_boot=500)
    assert d["n_seeds"] == 2 and d["diff_median"] == pytest.approx(0.005)
    assert d["sync_median"] == pytest.approx(0.225) and d["async_median"] == pytest.approx(0.23)
    lo, hi = d["diff_ci95"]
    assert lo == pytest.approx(-0.01) and hi == pytest.approx(0.02)
    assert b.paired_difference({1: None}, {1: 0.2})["diff_median"] is None
    assert b.run_order([7, 8, 9]) == [(7, "sync"), (7, "async"), (8, "async"), (8, "sync"), (9, "sync"),
                                      (9, "async")]
    assert b.trainer_args("d", 3, "async", 16, 4)[-3:] == ["--train.async_enable", "--train.async_queue_size", "1"]
    assert "--train.async_enable" not in b.trainer_args("d", 3, "sync", 16, 4)
    with pytest.raises(ValueError, match="mode must be sync or async, got 'q2'"):
        b.trainer_args("d", 3, "q2", 16, 4)


def test_summarise_and_table_on_fixed_runs():
    runs = [{"seed": 1, "mode": "sync", "rows": _rows([0.0, 10.0, 20.0], 100.0, 2.0, [0.25, 0.2, 0.2])},
            {"seed": 1, "mode": "async", "rows": _rows([0.0, 8.0, 16.0], 100.0, 4.0, [0.25, 0.22, 0.18])}]
    s = b.summarise(runs, steps_per_episode=1, n_boot=100)
    assert s["wall_s"]["ratio_median"] == 0.8 and s["tokens_per_s"]["ratio_median"] == 1.25
    assert s["gen_tokens_per_s"]["ratio_median"] == 0.5
    assert s["brier"]["diff_median"] == pytest.approx(0.0)
    assert s["brier_revisit"]["sync_median"] == pytest.approx(0.2)
    md = b.table(s)
    assert "| step wall time (s) | 10.00 | 8.00 | 0.800 (2 pairs, 1 seeds) | null |" in md
    assert "| steps after the first episode | 0.2000 | 0.2000 | 0.0000 (1 seeds) | null |" in md


def test_e2e_quick_mode_writes_the_paired_table(tmp_path):
    """One sync and one async (q = 1) run of the tiny task, 8 prompts x 3 episodes, 8 x 4 rollouts per step (3 steps
    each), side by side (the quick mode's --jobs 2)."""
    pytest.importorskip("openrlhf")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_async.py"), "--quick", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((out / "bench_async.json").read_text())
    assert res["config"]["seeds"] == [1] and res["config"]["prompts"] == 8 and res["config"]["episodes"] == 3
    assert res["config"]["batch"] == 8 and res["config"]["n"] == 4 and res["config"]["steps_per_episode"] == 1
    assert [(x["seed"], x["mode"]) for x in res["runs"]] == [(1, "sync"), (1, "async")]
    for x in res["runs"]:
        assert [v["step"] for v in x["steps"]] == [2, 3]
        assert all(v["wall_s"] > 0 and v["tokens_per_s"] > 0 for v in x["steps"])
        assert 0.0 <= x["brier"] <= 1.0 and 0.0 <= x["brier_revisit"] <= 1.0
        assert x["loadavg_1min_start"] >= 0 and x["loadavg_1min_end"] >= 0
    # q = 1: the first batch is drawn before any step, the later ones one step ahead (sync: 0 on every step)
    assert res["runs"][0]["staleness"] == [0.0, 0.0, 0.0] and res["runs"][1]["staleness"] == [0.0, 1.0, 1.0]
    assert res["machine"]["jobs"] == 2  # quick: both runs at the same time (a smoke run, not a measurement)
    s = res["summary"]
    for k in b.STEP_KEYS:
        assert s[k]["n_pairs"] == 2 and s[k]["n_seeds"] == 1 and s[k]["ratio_ci95"] is None
    assert s["brier"]["n_seeds"] == 1
    md = (out / "bench_async.md").read_text()
    assert md.startswith("| quantity (per step, steps 2..S) |") and "| async | 1 | 3 |" in md
