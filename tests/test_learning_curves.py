"""benchmarks/learning_curves.py: parsing, aggregation, table and plot on synthetic metrics.jsonl files.

No training here: the runs are written by hand so that every aggregated number is known exactly.
"""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("learning_curves",
                                                  os.path.join(ROOT, "benchmarks", "learning_curves.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lc = _load()


def _write_run(path, *, step_time, pass1, passk, pool_sizes=None, pvr=None, eval_dur=1.0, t0=1000.0,
               num_samples=128.0, steps=4):
    """A run of `steps` train steps, evaluations at 0, 2 and 4 (pass1/passk: one value per evaluation).

    Wall clock: train row s is at t0 + s*step_time + (evals before s) * eval_dur; each eval row comes
    eval_dur after the train row of its step (t0 is the time of the evaluation at start).
    """
    rows = []
    ev = iter(zip(pass1, passk))
    p, k = next(ev)
    rows.append({"type": "eval", "step": 0, "time": t0, "eval_pass@1": p, "eval_pass@8": k,
                 "eval_pass@2": (p + k) / 2, "eval_default_pass1": p})
    n_evals = 0
    for s in range(1, steps + 1):
        t = t0 + s * step_time + n_evals * eval_dur
        row = {"type": "train", "step": s, "time": t, "rollout/num_samples": num_samples,
               "timing/step_total": step_time, "timing/generation": step_time / 2}
        if pool_sizes is not None:
            row["dynamo/pool_size"] = pool_sizes[s - 1]
            row["dynamo/pred_var_ratio"] = pvr[s - 1]
        rows.append(row)
        if s % 2 == 0:
            p, k = next(ev)
            rows.append({"type": "eval", "step": s, "time": t + eval_dur, "eval_pass@1": p, "eval_pass@8": k})
            n_evals += 1
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def runs_dir(tmp_path):
    out = tmp_path / "lc"
    # grpo: 10 s steps; dynamo: 11 s (seed 1) and 10.5 s (seed 2) -> overhead +10 % and +5 %
    _write_run(out / "grpo-s1", step_time=10.0, pass1=[0.30, 0.32, 0.34], passk=[0.70, 0.72, 0.74])
    _write_run(out / "grpo-s2", step_time=10.0, pass1=[0.30, 0.36, 0.32], passk=[0.70, 0.76, 0.72])
    pools = [32, 64, 64, 64]  # steps 3 and 4 revisit (pool size unchanged), step 2 adds prompts
    _write_run(out / "dynamo-s1", step_time=11.0, pass1=[0.30, 0.35, 0.40], passk=[0.70, 0.75, 0.80],
               pool_sizes=pools, pvr=[1.0, 1.0, 0.8, 0.6])
    _write_run(out / "dynamo-s2", step_time=10.5, pass1=[0.30, 0.33, 0.36], passk=[0.70, 0.73, 0.76],
               pool_sizes=pools, pvr=[1.0, 0.9, 0.9, 0.7])
    (out / "dynamo-sx").mkdir()  # not a seed dir: ignored
    return out


def test_parse_run_exact(runs_dir):
    r = lc.parse_run(lc.read_metrics(str(runs_dir / "dynamo-s1" / "metrics.jsonl")))
    assert r["steps"] == 4 and r["rollouts"] == 512.0
    assert [c["step"] for c in r["curve"]] == [0, 2, 4]
    assert [c["rollouts"] for c in r["curve"]] == [0.0, 256.0, 512.0]
    # evaluation time excluded: training wall clock is exactly steps x step time
    assert [c["wall_s"] for c in r["curve"]] == pytest.approx([0.0, 22.0, 44.0])
    assert r["train_wall_s"] == pytest.approx(44.0)
    assert r["start_pass1"] == 0.30 and r["final_pass1"] == 0.40 and r["best_pass1"] == 0.40
    assert r["late_pass1"] == 0.40  # evaluations after step 2 (half of 4): step 4 only
    assert r["k"] == 8 and r["final_pass_k"] == 0.80
    assert r["median_step_total_s"] == 11.0 and r["median_generation_s"] == 5.5
    # wall per step from consecutive train rows without an evaluation between: (1,2) and (3,4)
    assert r["median_wall_step_s"] == pytest.approx(11.0)
    assert r["revisit_steps"] == 2 and r["pred_var_ratio_revisit"] == pytest.approx(0.7)
    assert r["pred_var_ratio_all"] == pytest.approx(0.85)


def test_best_is_max_after_start(runs_dir):
    r = lc.parse_run(lc.read_metrics(str(runs_dir / "grpo-s2" / "metrics.jsonl")))
    assert r["final_pass1"] == 0.32 and r["best_pass1"] == 0.36
    assert r["pred_var_ratio_revisit"] is None and r["revisit_steps"] == 0


def test_aggregate_and_outputs(runs_dir, tmp_path):
    runs = lc.collect(str(runs_dir), ["grpo", "dynamo"])
    assert sorted(runs) == ["dynamo", "grpo"] and sorted(runs["dynamo"]) == [1, 2]
    png = tmp_path / "docs" / "lc.png"
    res = lc.write_outputs(runs, str(runs_dir), str(png), {"seeds": [1, 2]})
    agg = res["aggregate"]
    d, g = agg["dynamo"], agg["grpo"]
    assert d["final_pass1"]["mean"] == pytest.approx(0.38)
    assert d["final_pass1"]["sd"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert (d["final_pass1"]["min"], d["final_pass1"]["max"]) == (0.36, 0.40)
    assert g["final_pass1"]["mean"] == pytest.approx(0.33)
    assert g["best_pass1"]["mean"] == pytest.approx(0.35)
    assert d["gain_pass1"]["mean"] == pytest.approx(0.08)
    assert d["final_pass_k"]["mean"] == pytest.approx(0.78)
    # paired overhead per seed: +10 % and +5 %
    o = d["overhead_step_total_pct"]
    assert (o["min"], o["max"]) == (pytest.approx(5.0), pytest.approx(10.0))
    assert o["median"] == pytest.approx(7.5)
    assert d["overhead_wall_step_pct"]["median"] == pytest.approx(7.5)
    assert g["overhead_step_total_pct"]["median"] == pytest.approx(0.0)
    assert d["pred_var_ratio_revisit"]["mean"] == pytest.approx((0.7 + 0.8) / 2)
    # curves by eval step: means and bands
    c = d["curve"]
    assert [p["step"] for p in c] == [0, 2, 4]
    assert [p["rollouts"] for p in c] == [0.0, 256.0, 512.0]
    assert c[1]["wall_s"] == pytest.approx((22.0 + 21.0) / 2)
    assert c[1]["pass1"]["mean"] == pytest.approx(0.34)
    assert (c[2]["pass_k"]["min"], c[2]["pass_k"]["max"]) == (0.76, 0.80)

    # files: table (printed text too), JSON with every number, PNG
    md = (runs_dir / "learning_curves.md").read_text()
    assert md == res["table"]
    assert "| dynamo | 2 | 0.300 ± 0.000 | 0.380 ± 0.028 | +0.080 | 0.380 ± 0.028 | 0.380 ± 0.028 | 0.780 ± 0.028 |" in md
    assert "+7.5 [+5.0, +10.0]" in md
    assert "| grpo | 2 |" in md and "final pass@8" in md
    # every run starts at pass@1 0.30: no eval noise; phase table from timing/*
    assert "sd 0.000, range [0.300, 0.300]" in md
    assert "| dynamo | 5375.0 | 10750.0 |" in md  # generation = step/2, step_total: medians over seeds
    assert d["timing_medians_s"]["generation"]["median"] == pytest.approx(5.375)
    data = json.loads((runs_dir / "learning_curves.json").read_text())
    assert data["aggregate"]["dynamo"]["final_pass1"]["mean"] == pytest.approx(0.38)
    assert data["eval_noise_start_pass1"]["n"] == 4
    assert set(data["runs"]["grpo"]) == {"1", "2"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_from_existing_cli(runs_dir, tmp_path, capsys):
    png = tmp_path / "cli.png"
    rc = lc.main(["--from-existing", "--out", str(runs_dir), "--png", str(png), "--variants", "grpo,dynamo"])
    assert rc == 0 and png.exists()
    printed = capsys.readouterr().out
    assert "| dynamo | 2 |" in printed and "| grpo | 2 |" in printed


def test_train_command_flags():
    cmd = lc.train_command("grpo", 3, "d", 6, 4)
    s = " ".join(cmd)
    assert "--dynamo.allocation.rule off --dynamo.modulation.preset off" in s
    assert "--train.seed 3" in s and "--train.num_episodes 6" in s and "--eval.steps 4" in s
    assert "--dynamo.run_dir d" in s and "--dynamo.preset tiny-cpu" in s
    d = " ".join(lc.train_command("dynamo", 1, "d", None, 4))
    assert "allocation.rule" not in d and "modulation.preset" not in d and "num_episodes" not in d
    assert "--dynamo.modulation.preset off" in " ".join(lc.train_command("allocation", 1, "d", None, 4))
    assert "--dynamo.allocation.rule off" in " ".join(lc.train_command("modulation", 1, "d", None, 4))
