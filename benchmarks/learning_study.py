"""Does DynaMO learn faster at the same rollout budget? A pre-registered, budget-matched study with a
positive control, through the real trainer (``python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu``).

Arms (all: the same 96 train prompts, 16 prompts per step, 24 optimizer steps, the same seeds; every arm
but ``control`` spends 128 rollouts per step):

* ``grpo``          OpenRLHF's GRPO exactly: group_norm advantages, token-mean loss, n = 8 each, DynaMO off
* ``grpo+loss``     n = 8 each through DynaMO's sampler, DynaMO's default loss (rloo, prompt-balanced)
* ``filter``        skip prompts whose posterior mean pass rate is <= 0.1 or >= 0.9, n even on the rest
* ``proportional``  the reference's n_i ∝ v_i (with its exploration/mastery options) on our pool
* ``dynamo-alloc``  the default allocation (exact Σ v/(n−1)), modulation off
* ``dynamo``        the full default (allocation + token modulation)
* ``control``       ``grpo`` with 1.5x the budget (n = 12, 192 rollouts per step): the positive control

``--n`` and ``--prompts-per-step`` resize every arm (the control gets round(1.5 n)); one optimizer step per
rollout step throughout.

Evaluation (each run): at steps 8, 16 and 24 on ``heldout`` = the preset's 80 eval-split prompts plus 320
fresh level-4/5 problems that neither the train split nor the warm start contains (400 prompts), and on
``train`` = the 96 train prompts (fresh samples), 8 samples per prompt at temperature 1. Step 0 (the same
warm-started model for every arm) is evaluated once per seed, in the ``grpo`` run, and shared.

Metrics (pre-registered in README before the full run):

* primary: normalised area under held-out pass@1 vs cumulative training rollouts (trapezoid over the eval
  points, divided by the run's total rollouts), as the paired difference arm − grpo per seed, mean with a
  95 % percentile bootstrap CI over seeds (10 000 resamples);
* secondary: the same on the train prompts; final pass@1 and pass@8 (held-out, train); rollouts to reach
  step-0 pass@1 + 0.03 (train prompts; first eval point at or above it); pass@1 area against training wall
  clock (evaluations excluded) up to the seed's shortest arm; phase timings (median per run of each
  ``timing/*``), paired per seed against ``grpo`` and ``grpo+loss``.

Runs go ``--workers`` at a time (default 2 on this 2-core machine: most of a run's wall time is start-up
and waiting, so two in parallel nearly double throughput); jobs are seed-major with the arm order rotated
per seed, so a pair of concurrent runs differs from seed to seed and contention hits every arm alike.

Usage::

    python benchmarks/learning_study.py                  # 7 arms x 8 seeds (83 min, 2 cores)
    python benchmarks/learning_study.py --arms grpo,control --n 4 --prompts-per-step 8 --eval-steps 16 \
        --out benchmarks/out/learning_study_probe --png docs/learning_study_probe.png   # the resize probe
    python benchmarks/learning_study.py --quick          # smoke run (tests): 2 arms, 2 seeds, 2 steps
    python benchmarks/learning_study.py --from-existing  # re-aggregate / re-plot the run dirs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning_curves import parse_run, read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GRPO = ["--algo.advantage.estimator", "group_norm", "--dynamo.allocation.rule", "off",
        "--dynamo.modulation.preset", "off"]
ARMS: Dict[str, List[str]] = {
    "grpo": GRPO,
    "grpo+loss": ["--dynamo.allocation.rule", "uniform", "--dynamo.modulation.preset", "off"],
    "filter": ["--dynamo.allocation.rule", "filter", "--dynamo.modulation.preset", "off"],
    "proportional": ["--dynamo.allocation.rule", "proportional", "--dynamo.modulation.preset", "off"],
    "dynamo-alloc": ["--dynamo.modulation.preset", "off"],
    "dynamo": [],
    # 1.5x the rollouts per step at the same prompts and optimizer steps (sizing_flags)
    "control": GRPO,
}
CONTROL_FACTOR = 1.5
BASELINE = "grpo"
COLORS = {"grpo": "tab:gray", "grpo+loss": "tab:brown", "filter": "tab:green", "proportional": "tab:purple",
          "dynamo-alloc": "tab:blue", "dynamo": "tab:red", "control": "black"}
SOURCES = ("heldout", "train")
TARGET_GAIN = 0.03  # secondary: rollouts to reach step-0 pass@1 + this, on the train prompts
BOOTSTRAP = 10_000
PHASES = ("generation", "make_experience", "dynamo_pool", "ppo_train", "broadcast", "step_total")

# No checkpoints (their wall time has nothing to do with the method); no best-model tracking. The
# transformers rollout engine: the one the README's results were measured with (float32 sampling), also where
# vLLM's CPU build is installed.
COMMON_FLAGS = ["--ckpt.save_steps", "1000000", "--ckpt.best_metric_key", "none", "--dynamo.eval_pass_k", "1,8",
                "--data.max_samples", "100000000", "--dynamo.cpu_engine", "transformers"]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def write_study_data(out: str, train_prompts: int, heldout_extra: Dict[int, int],
                     eval_train: bool = True) -> Dict[str, Any]:
    """``<out>/data/train.jsonl`` (the preset's first ``train_prompts`` train rows: its file keeps the level
    mix in every prefix) and ``<out>/data/eval.jsonl`` (held-out rows tagged ``datasource: heldout``: the
    eval split plus ``heldout_extra`` fresh problems per level; then the train rows tagged ``train``)."""
    from dynamo_openrlhf import tiny

    assets = tiny.prepare_tiny_assets(None)
    train = tiny.read_jsonl(assets.train_file)[:train_prompts]
    held = tiny.read_jsonl(assets.eval_file) + tiny.extra_heldout_problems(heldout_extra)
    rows = [dict(r, datasource="heldout") for r in held]
    if eval_train:
        rows += [dict(r, datasource="train") for r in train]
    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    paths = {"train": os.path.join(d, "train.jsonl"), "eval": os.path.join(d, "eval.jsonl")}
    tiny.write_jsonl(train, paths["train"])
    tiny.write_jsonl(rows, paths["eval"])
    return {**paths, "train_prompts": len(train), "heldout_prompts": len(held)}


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def run_dir_for(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{arm}-s{seed}")


def sizing_flags(arm: str, n: int = 8, prompts_per_step: int = 16) -> List[str]:
    """Rollouts per prompt and prompts per step of an arm (the control: round(1.5 n) per prompt), with one
    optimizer step per rollout step (``--train.batch_size`` = prompts x rollouts)."""
    n_arm = int(round(CONTROL_FACTOR * n)) if arm == "control" else int(n)
    return ["--rollout.n_samples_per_prompt", str(n_arm), "--rollout.batch_size", str(prompts_per_step),
            "--train.batch_size", str(prompts_per_step * n_arm)]


def train_command(arm: str, seed: int, run_dir: str, data: Dict[str, Any], episodes: int, eval_steps: int,
                  eval_at_start: bool, extra: Sequence[str] = (), n: int = 8, prompts_per_step: int = 16) -> List[str]:
    return [sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu", "--dynamo.run_dir", run_dir,
            "--train.seed", str(seed), "--train.num_episodes", str(episodes), "--eval.steps", str(eval_steps),
            "--data.prompt_dataset", data["train"], "--eval.dataset", data["eval"],
            "--dynamo.eval_at_start" if eval_at_start else "--no-dynamo.eval_at_start",
            *COMMON_FLAGS, *ARMS[arm], *sizing_flags(arm, n, prompts_per_step), *extra]


def job_order(arms: Sequence[str], seeds: Sequence[int]) -> List[tuple]:
    """Seed-major; within seed k the arm list is rotated by k (so concurrent pairs and positions vary)."""
    jobs = []
    for k, seed in enumerate(seeds):
        r = k % len(arms)
        jobs += [(a, seed) for a in list(arms[r:]) + list(arms[:r])]
    return jobs


def finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a completed run (its run_info.json says returncode 0, metrics.jsonl exists)."""
    info = os.path.join(run_dir, "run_info.json")
    if not (os.path.exists(info) and os.path.exists(os.path.join(run_dir, "metrics.jsonl"))):
        return False
    with open(info) as f:
        return json.load(f).get("returncode") == 0


def run_one(arm: str, seed: int, out: str, cmd: List[str], timeout: float = 3600) -> Dict[str, Any]:
    run_dir = run_dir_for(out, arm, seed)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    env = dict(os.environ, RAY_ADDRESS="local")  # every run its own local Ray instance
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    info = {"arm": arm, "seed": seed, "command": " ".join(cmd[1:]), "returncode": proc.returncode,
            "wall_s": time.time() - t0, "start": t0}
    with open(os.path.join(run_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (rc {proc.returncode}); see {run_dir}/train.log")
    return info


# ----------------------------------------------------------------------------------------------
# the metrics (pure functions)
# ----------------------------------------------------------------------------------------------
def normalised_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid area under y(x) divided by the x span (the curve's mean height). x increasing, >= 2 points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.shape != y.shape or np.any(np.diff(x) <= 0):
        raise ValueError(f"normalised_auc: need >= 2 points with increasing x, got x={x.tolist()}")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def auc_until(x: Sequence[float], y: Sequence[float], x_end: float) -> float:
    """Normalised area of the piecewise-linear y(x) over [x[0], x_end] (x_end within the curve)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not x[0] < x_end <= x[-1]:
        raise ValueError(f"auc_until: x_end {x_end} outside ({x[0]}, {x[-1]}]")
    keep = x < x_end
    xs = np.append(x[keep], x_end)
    ys = np.append(y[keep], np.interp(x_end, x, y))
    return normalised_auc(xs, ys)


def first_reaching(x: Sequence[float], y: Sequence[float], target: float) -> Optional[float]:
    """The first x whose y >= target (None if never)."""
    for xi, yi in zip(x, y):
        if yi >= target:
            return float(xi)
    return None


def bootstrap_mean_ci(d: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0,
                      level: float = 0.95) -> Dict[str, float]:
    """Mean of ``d`` and its percentile bootstrap CI (resampling the entries with replacement)."""
    d = np.asarray([v for v in d if v is not None], dtype=np.float64)
    if d.size == 0:
        raise ValueError("bootstrap_mean_ci: no values")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return {"mean": float(d.mean()), "lo": float(np.quantile(means, a)), "hi": float(np.quantile(means, 1 - a)),
            "n": int(d.size), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0}


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def parse_study_run(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One run: per-source eval curves (step, cumulative rollouts, training wall s, pass@1, pass@8) and
    the median of each ``timing/*`` phase over its steps (s)."""
    base = parse_run(rows)
    by_step = {c["step"]: c for c in base["curve"]}
    curves: Dict[str, List[Dict[str, float]]] = {s: [] for s in SOURCES}
    for r in rows:
        if r.get("type") != "eval" or int(r["step"]) not in by_step:
            continue
        c = by_step[int(r["step"])]
        for src in SOURCES:
            if r.get(f"eval_{src}_pass1") is not None:
                curves[src].append({"step": c["step"], "rollouts": c["rollouts"], "wall_s": c["wall_s"],
                                    "pass1": float(r[f"eval_{src}_pass1"]),
                                    "pass8": float(r.get(f"eval_{src}_pass8", float("nan")))})
    for src in SOURCES:
        curves[src].sort(key=lambda c: c["step"])
    return {"steps": base["steps"], "rollouts": base["rollouts"], "curves": curves,
            "timing_s": base["timing_medians_s"], "train_wall_s": base["train_wall_s"]}


def with_start(curve: List[Dict[str, float]], start: Optional[Dict[str, float]]) -> List[Dict[str, float]]:
    """The run's curve with the seed's shared step-0 point in front (when the run has none)."""
    if curve and curve[0]["step"] == 0:
        return curve
    if start is None:
        return curve
    return [dict(start, rollouts=0.0, wall_s=0.0)] + curve


def run_metrics(run: Dict[str, Any], starts: Dict[str, Optional[Dict[str, float]]]) -> Dict[str, Any]:
    """Per-run scalars: for each source, the normalised AUC vs rollouts, final pass@1/pass@8, rollouts to
    reach start + TARGET_GAIN; the curve (with step 0) for the wall-clock area."""
    out: Dict[str, Any] = {"curves": {}}
    for src in SOURCES:
        c = with_start(run["curves"][src], starts.get(src))
        out["curves"][src] = c
        if len(c) < 2:
            continue
        x = [p["rollouts"] for p in c]
        y = [p["pass1"] for p in c]
        out[f"{src}_auc"] = normalised_auc(x, y)
        out[f"{src}_final_pass1"] = y[-1]
        out[f"{src}_final_pass8"] = c[-1]["pass8"]
        out[f"{src}_to_target"] = first_reaching(x[1:], y[1:], y[0] + TARGET_GAIN)
    out["timing_s"] = run["timing_s"]
    out["train_wall_s"] = run["train_wall_s"]
    out["rollouts"] = run["rollouts"]
    return out


def collect(out: str, arms: Sequence[str]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """runs[arm][seed] = run_metrics(...) for every ``<out>/runs/<arm>-s<seed>/metrics.jsonl`` found."""
    raw: Dict[str, Dict[int, Dict[str, Any]]] = {}
    d = os.path.join(out, "runs")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        arm, _, s = name.rpartition("-s")
        path = os.path.join(d, name, "metrics.jsonl")
        if arm in arms and s.isdigit() and os.path.exists(path):
            raw.setdefault(arm, {})[int(s)] = parse_study_run(read_metrics(path))
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for arm, by_seed in raw.items():
        for seed, run in by_seed.items():
            # the seed's step-0 evaluation (in the grpo run; any run that has one)
            starts = {}
            for src in SOURCES:
                for other in [raw.get(BASELINE, {}).get(seed)] + [raw[a].get(seed) for a in raw]:
                    if other and other["curves"][src] and other["curves"][src][0]["step"] == 0:
                        starts[src] = other["curves"][src][0]
                        break
            runs.setdefault(arm, {})[seed] = run_metrics(run, starts)
    return runs


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def paired(runs, arm: str, ref: str, key: str) -> List[float]:
    """Per-seed differences arm − ref of a scalar (seeds where both have it)."""
    a, b = runs.get(arm, {}), runs.get(ref, {})
    return [a[s][key] - b[s][key] for s in sorted(a) if s in b and a[s].get(key) is not None
            and b[s].get(key) is not None]


def wall_auc_pairs(runs, arm: str, ref: str, src: str) -> List[float]:
    """Per seed: pass@1 area vs training wall clock up to the shorter of the two runs, arm − ref."""
    out = []
    for s in sorted(runs.get(arm, {})):
        if s not in runs.get(ref, {}):
            continue
        ca, cb = runs[arm][s]["curves"][src], runs[ref][s]["curves"][src]
        if len(ca) < 2 or len(cb) < 2:
            continue
        end = min(ca[-1]["wall_s"], cb[-1]["wall_s"])
        area = [auc_until([p["wall_s"] for p in c], [p["pass1"] for p in c], end) for c in (ca, cb)]
        out.append(area[0] - area[1])
    return out


def phase_overhead_pairs(runs, arm: str, ref: str, phase: str) -> List[float]:
    """Per seed: arm's median phase time over ref's, minus 1 (fraction)."""
    out = []
    for s in sorted(runs.get(arm, {})):
        if s in runs.get(ref, {}):
            a = (runs[arm][s]["timing_s"].get(phase) or 0.0)
            b = (runs[ref][s]["timing_s"].get(phase) or 0.0)
            if b > 0:
                out.append(a / b - 1.0)
    return out


def summarise(runs, arms: Sequence[str]) -> Dict[str, Any]:
    """Every number of the README table, per arm."""
    summary: Dict[str, Any] = {}
    for arm in arms:
        if arm not in runs:
            continue
        by = runs[arm]
        row: Dict[str, Any] = {"seeds": sorted(by)}
        for src in SOURCES:
            for key in ("auc", "final_pass1", "final_pass8"):
                vals = [r.get(f"{src}_{key}") for r in by.values() if r.get(f"{src}_{key}") is not None]
                row[f"{src}_{key}"] = bootstrap_mean_ci(vals) if vals else None
                if arm != BASELINE and vals:
                    d = paired(runs, arm, BASELINE, f"{src}_{key}")
                    row[f"{src}_{key}_vs_grpo"] = bootstrap_mean_ci(d) if d else None
            reached = [r.get(f"{src}_to_target") for r in by.values()]
            hit = [x for x in reached if x is not None]
            row[f"{src}_to_target"] = {"reached": len(hit), "of": len(reached),
                                       "median_rollouts": float(statistics.median(hit)) if hit else None}
            if arm != BASELINE:
                d = wall_auc_pairs(runs, arm, BASELINE, src)
                row[f"{src}_wall_auc_vs_grpo"] = bootstrap_mean_ci(d) if d else None
        if arm not in (BASELINE, "grpo+loss") and "grpo+loss" in runs:
            d = paired(runs, arm, "grpo+loss", "heldout_auc")
            row["heldout_auc_vs_grpo+loss"] = bootstrap_mean_ci(d) if d else None
            d = paired(runs, arm, "grpo+loss", "train_auc")
            row["train_auc_vs_grpo+loss"] = bootstrap_mean_ci(d) if d else None
        row["timing_ms"] = {p: 1000 * statistics.median(r["timing_s"][p] for r in by.values())
                            for p in PHASES if all(r["timing_s"].get(p) is not None for r in by.values())}
        for ref in (BASELINE, "grpo+loss"):
            if arm != ref and ref in runs:
                row[f"overhead_vs_{ref}"] = {p: bootstrap_mean_ci(d) for p in ("step_total", "ppo_train",
                                                                                "make_experience", "generation")
                                             if (d := phase_overhead_pairs(runs, arm, ref, p))}
        row["rollouts"] = statistics.median(r["rollouts"] for r in by.values())
        summary[arm] = row
    return summary


def mean_curve(runs, arm: str, src: str) -> List[Dict[str, float]]:
    """Mean over seeds of pass@1 at each eval step, with a 95 % bootstrap CI band and mean x."""
    by_step: Dict[int, List[Dict[str, float]]] = {}
    for r in runs[arm].values():
        for p in r["curves"][src]:
            by_step.setdefault(p["step"], []).append(p)
    out = []
    for step in sorted(by_step):
        pts = by_step[step]
        ci = bootstrap_mean_ci([p["pass1"] for p in pts], resamples=2000)
        out.append({"step": step, "rollouts": statistics.fmean(p["rollouts"] for p in pts),
                    "wall_s": statistics.fmean(p["wall_s"] for p in pts), **ci})
    return out


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _ci(c: Optional[Dict[str, float]], digits: int = 3, signed: bool = True) -> str:
    if not c:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if c["n"] < 2:
        return f.format(c["mean"])
    return f"{f.format(c['mean'])} [{f.format(c['lo'])}, {f.format(c['hi'])}]"


def _pct(c: Optional[Dict[str, float]]) -> str:
    if not c:
        return "–"
    return f"{100 * c['mean']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def markdown(summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = [
        "| arm | seeds | rollouts/run | **held-out AUC − grpo** (primary) | held-out AUC | train-prompt AUC − grpo | "
        "final held-out pass@1 | final held-out pass@8 | final train pass@1 | train: reached start+%.2f (median rollouts) | "
        "held-out AUC vs wall − grpo |" % TARGET_GAIN,
        "|---|---:|---:|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in summary.items():
        t = r["train_to_target"]
        lines.append("| " + " | ".join([
            arm, str(len(r["seeds"])), f"{r['rollouts']:.0f}",
            "–" if arm == BASELINE else _ci(r.get("heldout_auc_vs_grpo")),
            _ci(r.get("heldout_auc"), signed=False),
            "–" if arm == BASELINE else _ci(r.get("train_auc_vs_grpo")),
            _ci(r.get("heldout_final_pass1"), signed=False), _ci(r.get("heldout_final_pass8"), signed=False),
            _ci(r.get("train_final_pass1"), signed=False),
            f"{t['reached']}/{t['of']} ({t['median_rollouts']:.0f})" if t["median_rollouts"] is not None
            else f"{t['reached']}/{t['of']}",
            "–" if arm == BASELINE else _ci(r.get("heldout_wall_auc_vs_grpo")),
        ]) + " |")
    lines += ["", "Against `grpo+loss` (same loss and estimator, uniform n: the allocation's own effect), paired AUC "
              "differences, held-out | train prompts:", ""]
    for arm, r in summary.items():
        if r.get("heldout_auc_vs_grpo+loss"):
            lines.append(f"* {arm}: {_ci(r['heldout_auc_vs_grpo+loss'])} | {_ci(r.get('train_auc_vs_grpo+loss'))}")
    lines += ["", "Median phase times per step, ms (median over seeds of each run's median), and paired overhead "
              "per seed, % (mean [95 % bootstrap CI]):", "",
              "| arm | " + " | ".join(PHASES) + " | step_total vs grpo | step_total vs grpo+loss | ppo_train vs grpo+loss |",
              "|---|" + "---:|" * len(PHASES) + "---|---|---|"]
    for arm, r in summary.items():
        tm = r["timing_ms"]
        ov, ol = r.get("overhead_vs_grpo", {}), r.get("overhead_vs_grpo+loss", {})
        lines.append("| " + arm + " | " + " | ".join(f"{tm[p]:.1f}" if p in tm else "–" for p in PHASES) + " | "
                     + " | ".join([_pct(ov.get("step_total")), _pct(ol.get("step_total")), _pct(ol.get("ppo_train"))])
                     + " |")
    lines += ["", f"Study: {meta.get('seeds')} seeds, {meta.get('episodes')} episodes of {meta.get('train_prompts')} "
              f"prompts, eval every {meta.get('eval_steps')} steps on {meta.get('heldout_prompts')} held-out + "
              f"{meta.get('train_prompts')} train prompts x 8 samples; {meta.get('workers')} runs at a time; "
              f"wall {meta.get('benchmark_wall_s', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(runs, arms: Sequence[str], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for i, src in enumerate(SOURCES):
        for j, (xkey, xlabel) in enumerate((("rollouts", "cumulative training rollouts"),
                                            ("wall_s", "training wall clock, s (evaluations excluded)"))):
            ax = axes[i][j]
            for arm in arms:
                if arm not in runs:
                    continue
                c = mean_curve(runs, arm, src)
                x = [p[xkey] for p in c]
                ax.plot(x, [p["mean"] for p in c], marker="o", ms=3, label=arm, color=COLORS.get(arm),
                        lw=2 if arm in ("dynamo", "control") else 1.2)
                ax.fill_between(x, [p["lo"] for p in c], [p["hi"] for p in c], alpha=0.12, color=COLORS.get(arm))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{src} pass@1")
            ax.grid(alpha=0.3)
    axes[0][0].legend(title="mean, 95 % CI over seeds", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4,5,6,7,8", help="comma-separated training seeds (--train.seed)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    p.add_argument("--episodes", type=int, default=4, help="--train.num_episodes (96 prompts / 16 per step = 6 "
                                                           "steps each)")
    p.add_argument("--eval-steps", type=int, default=8, help="--eval.steps")
    p.add_argument("--train-prompts", type=int, default=96)
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt of every arm but the control (1.5x)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="--rollout.batch_size")
    p.add_argument("--heldout-extra", default="4:160,5:160",
                   help="fresh held-out problems per level added to the 80 eval-split prompts (level:count,...)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--quick", action="store_true", help="smoke run: grpo + dynamo, seeds 1,2, 32 prompts, 2 steps, "
                                                        "32 extra held-out prompts")
    p.add_argument("--out", default=None, help="default benchmarks/out/learning_study (…_quick with --quick)")
    p.add_argument("--png", default=None, help="default docs/learning_study.png (<out>/learning_study.png with --quick)")
    p.add_argument("--from-existing", action="store_true")
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs under --out that finished (run_info.json with returncode 0) and run only the "
                        "missing (arm, seed) pairs, e.g. to add arms to a study")
    p.add_argument("--extra", default="", help="extra trainer flags for every run (one string)")
    args = p.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if BASELINE not in arms:
        p.error(f"the arms must include {BASELINE!r} (the reference of every paired difference and step 0)")
    extra = args.extra.split()
    heldout_extra = {int(k): int(v) for k, v in (kv.split(":") for kv in args.heldout_extra.split(",") if kv)}
    if args.quick:
        seeds, arms = seeds[:2], [a for a in ("grpo", "dynamo") if a in ARMS]
        args.episodes, args.eval_steps, args.train_prompts = 1, 1, 32
        heldout_extra = {4: 16, 5: 16}
        extra = ["--eval.n_samples_per_prompt", "2"] + extra
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "out", "learning_study" + ("_quick" if args.quick else ""))
    png = args.png or (os.path.join(args.out, "learning_study.png") if args.quick
                       else os.path.join(ROOT, "docs", "learning_study.png"))

    t_start = time.time()
    meta_path = os.path.join(args.out, "learning_study.json")
    infos: List[Dict[str, Any]] = []
    if args.from_existing:
        with open(meta_path) as f:
            meta = json.load(f)["meta"]
    else:
        os.makedirs(args.out, exist_ok=True)
        data = write_study_data(args.out, args.train_prompts, heldout_extra)
        meta = {"seeds": seeds, "arms": arms, "episodes": args.episodes, "eval_steps": args.eval_steps,
                "train_prompts": data["train_prompts"], "heldout_prompts": data["heldout_prompts"],
                "heldout_extra": heldout_extra, "workers": args.workers, "n": args.n,
                "prompts_per_step": args.prompts_per_step, "extra": extra, "flags": ARMS,
                "common_flags": COMMON_FLAGS}
        jobs = job_order(arms, seeds)
        if args.reuse:
            jobs = [j for j in jobs if not finished(run_dir_for(args.out, *j))]

        def go(job):
            arm, seed = job
            cmd = train_command(arm, seed, run_dir_for(args.out, arm, seed), data, args.episodes, args.eval_steps,
                                eval_at_start=(arm == BASELINE), extra=extra, n=args.n,
                                prompts_per_step=args.prompts_per_step)
            print(f"[learning_study] start {arm} seed {seed}", flush=True)
            info = run_one(arm, seed, args.out, cmd)
            print(f"[learning_study] done  {arm} seed {seed} in {info['wall_s']:.0f} s "
                  f"({(time.time() - t_start) / 60:.1f} min)", flush=True)
            return info

        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as ex:
            infos = list(ex.map(go, jobs))
        if args.reuse and os.path.exists(meta_path):  # keep the earlier runs' records
            with open(meta_path) as f:
                old = json.load(f)["meta"]
            done = {(i["arm"], i["seed"]) for i in infos}
            infos = [i for i in old.get("runs", []) if (i["arm"], i["seed"]) not in done] + infos
            meta["arms"] = list(dict.fromkeys(old.get("arms", []) + arms))
            meta["benchmark_wall_s_earlier"] = old.get("benchmark_wall_s")
        meta["runs"] = infos
        meta["benchmark_wall_s"] = time.time() - t_start
    runs = collect(args.out, meta["arms"])  # with --reuse: the earlier arms too
    arms = [a for a in meta["arms"] if a in runs]
    summary = summarise(runs, arms)
    table = markdown(summary, meta)
    with open(os.path.join(args.out, "learning_study.md"), "w") as f:
        f.write(table)
    with open(meta_path, "w") as f:
        json.dump({"meta": meta, "summary": summary,
                   "runs": {a: {str(s): r for s, r in by.items()} for a, by in runs.items()}}, f, indent=1)
    plot(runs, arms, png, title=f"tiny-cpu learning study: {len(meta['seeds'])} seeds x {len(arms)} arms, "
                                f"mean and 95 % bootstrap CI over seeds")
    print(table)
    print(f"[learning_study] {meta_path}; plot {png}; {time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
