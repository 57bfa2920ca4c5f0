"""DynaMO vs GRPO learning curves on the tiny task, through the real trainer.

Runs ``python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu`` once per (variant, seed), one after the
other (subprocesses, ``RAY_ADDRESS=local``), all with the same rollout budget (steps x batch x n), and
reads each run's ``<run_dir>/metrics.jsonl``:

* ``grpo``        ``--dynamo.allocation.rule off --dynamo.modulation.preset off`` (OpenRLHF's GRPO exactly)
* ``allocation``  ``--dynamo.modulation.preset off`` (neyman allocation from the pass-rate pool)
* ``modulation``  ``--dynamo.allocation.rule off`` (decay6 token-level modulation)
* ``dynamo``      defaults (both)

Every run also gets ``--ckpt.save_steps 1000000 --ckpt.best_metric_key none`` (no checkpoints: their
wall time has nothing to do with the method), ``--train.seed S``, ``--eval.steps K`` and, by default,
``--train.num_episodes 6`` (the tiny-cpu preset's 96 prompts / 16 per step = 6 steps per episode, 36 steps of
16 prompts x 8 rollouts; every prompt is seen 6 times).

Writes ``<out>/learning_curves.md`` (table, also printed), ``<out>/learning_curves.json`` (every number,
per run and aggregated) and a PNG (eval pass@1 / pass@k vs rollouts consumed and vs training wall clock,
mean and min/max band over seeds, one line per variant).

Definitions (all computed from metrics.jsonl):

* rollouts consumed at an evaluation after step s: sum of ``rollout/num_samples`` over train steps <= s;
* training wall clock at step s: ``time`` of train row s minus ``time`` of the evaluation at start (or of
  the first train row minus its ``timing/step_total`` when there is none), minus the duration of every
  evaluation done before step s (an evaluation's duration = its row's ``time`` minus the ``time`` of the
  train row of the same step), i.e. wall time spent training, evaluations excluded;
* step time: ``timing/step_total`` (OpenRLHF's per-step sum of phase timings, incl. DynaMO's pool update);
  wall time per step: difference of consecutive train rows' ``time`` with no evaluation in between;
  both summarised per run by the median over steps; overhead of a variant = its per-run median over the
  grpo run's per-run median with the same seed, minus 1 (median over seeds, and min/max);
* ``dynamo/pred_var_ratio`` on revisit steps: steps whose ``dynamo/pool_size`` equals the previous step's
  (every prompt of the step was already in the pass-rate pool).

Usage::

    python benchmarks/learning_curves.py                  # 4 variants x 4 seeds x 36 steps (2 cores)
    python benchmarks/learning_curves.py --quick          # smoke run: 1 seed, grpo + dynamo, few steps
    python benchmarks/learning_curves.py --from-existing  # re-aggregate / re-plot existing run dirs
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
from typing import Any, Dict, Iterable, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plotting  # noqa: E402  (the plot plumbing shared with learning_study.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS: Dict[str, List[str]] = {
    "grpo": ["--dynamo.allocation.rule", "off", "--dynamo.modulation.preset", "off"],
    "allocation": ["--dynamo.modulation.preset", "off"],
    "modulation": ["--dynamo.allocation.rule", "off"],
    "dynamo": [],
}
BASELINE = "grpo"
COLORS = {"grpo": "tab:gray", "allocation": "tab:blue", "modulation": "tab:orange", "dynamo": "tab:red"}

# Same for every variant: no periodic/best checkpoints (they cost wall time unrelated to the method); the
# transformers rollout engine the results in docs/learning_curves.md were measured with, also where vLLM's CPU build is installed.
COMMON_FLAGS = ["--ckpt.save_steps", "1000000", "--ckpt.best_metric_key", "none", "--dynamo.cpu_engine", "transformers"]


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def run_dir_for(out: str, variant: str, seed: int) -> str:
    return os.path.join(out, f"{variant}-s{seed}")


def train_command(variant: str, seed: int, run_dir: str, episodes: Optional[int], eval_steps: int,
                  extra: Sequence[str] = ()) -> List[str]:
    cmd = [sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu",
           "--dynamo.run_dir", run_dir, "--train.seed", str(seed), "--eval.steps", str(eval_steps),
           *COMMON_FLAGS, *VARIANTS[variant]]
    if episodes is not None:
        cmd += ["--train.num_episodes", str(episodes)]
    return cmd + list(extra)


def run_one(variant: str, seed: int, out: str, episodes: Optional[int], eval_steps: int,
            extra: Sequence[str] = (), timeout: float = 3600) -> Dict[str, Any]:
    run_dir = run_dir_for(out, variant, seed)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    cmd = train_command(variant, seed, run_dir, episodes, eval_steps, extra)
    env = dict(os.environ, RAY_ADDRESS="local")  # never join another Ray cluster
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    info = {"variant": variant, "seed": seed, "command": " ".join(cmd[1:]), "returncode": proc.returncode,
            "wall_s": time.time() - t0}
    with open(os.path.join(run_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (rc {proc.returncode}); see {run_dir}/train.log")
    return info


# ----------------------------------------------------------------------------------------------
# parsing one run
# ----------------------------------------------------------------------------------------------
def read_metrics(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _pass1(row: Dict[str, Any]) -> Optional[float]:
    for key in ("eval_pass@1", "eval_default_pass1"):
        if row.get(key) is not None:
            return float(row[key])
    return None


def _pass_ks(row: Dict[str, Any]) -> Dict[int, float]:
    out = {}
    for key, v in row.items():
        if key.startswith("eval_pass@") and v is not None:
            try:
                out[int(key[len("eval_pass@"):])] = float(v)
            except ValueError:
                pass
    return out


def _median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def parse_run(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One run's curve and timing summary from its metrics.jsonl rows (in file order)."""
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train:
        raise ValueError("no train rows")
    train_by_step = {int(r["step"]): r for r in train}

    # rollouts consumed after each step
    cum, consumed = 0.0, {0: 0.0}
    for r in sorted(train, key=lambda r: r["step"]):
        cum += float(r.get("rollout/num_samples", 0.0))
        consumed[int(r["step"])] = cum

    # training wall clock (evaluations excluded)
    eval_dur = {}
    for e in evals:
        s = int(e["step"])
        if s in train_by_step:
            eval_dur[s] = float(e["time"]) - float(train_by_step[s]["time"])
    start_evals = [e for e in evals if int(e["step"]) == 0]
    first = min(train, key=lambda r: r["step"])
    t0 = (float(start_evals[0]["time"]) if start_evals
          else float(first["time"]) - float(first.get("timing/step_total", 0.0)))

    def wall_at(step: int) -> float:
        if step == 0:
            return 0.0
        t = float(train_by_step[step]["time"]) - t0
        return t - sum(d for s, d in eval_dur.items() if s < step)

    curve = []
    for e in evals:
        s = int(e["step"])
        if s != 0 and s not in train_by_step:
            continue
        curve.append({"step": s, "rollouts": consumed.get(s, cum), "wall_s": wall_at(s), "pass1": _pass1(e),
                      "pass_k": _pass_ks(e)})
    curve.sort(key=lambda c: c["step"])

    # step times
    step_total = [float(r["timing/step_total"]) for r in train if r.get("timing/step_total") is not None]
    generation = [float(r["timing/generation"]) for r in train if r.get("timing/generation") is not None]
    ordered = sorted(train, key=lambda r: r["step"])
    wall_steps = []
    for a, b in zip(ordered, ordered[1:]):
        if int(b["step"]) == int(a["step"]) + 1 and int(a["step"]) not in eval_dur:
            wall_steps.append(float(b["time"]) - float(a["time"]))

    # predicted variance ratio on revisit steps
    pvr_revisit, prev_pool = [], None
    for r in ordered:
        pool = r.get("dynamo/pool_size")
        if prev_pool is not None and pool is not None and pool == prev_pool and r.get("dynamo/pred_var_ratio") is not None:
            pvr_revisit.append(float(r["dynamo/pred_var_ratio"]))
        prev_pool = pool
    pvr_all = [float(r["dynamo/pred_var_ratio"]) for r in ordered if r.get("dynamo/pred_var_ratio") is not None]
    phases = sorted({k for r in train for k in r if k.startswith("timing/")})
    timing = {k[len("timing/"):]: _median([float(r[k]) for r in train if r.get(k) is not None]) for k in phases}

    p1 = [c for c in curve if c["pass1"] is not None]
    after = [c for c in p1 if c["step"] > 0]
    final = p1[-1] if p1 else None
    kmax = max(final["pass_k"]) if final and final["pass_k"] else None
    return {
        "steps": len(train),
        "rollouts": cum,
        "curve": curve,
        "start_pass1": p1[0]["pass1"] if p1 and p1[0]["step"] == 0 else None,
        "final_pass1": final["pass1"] if final else None,
        "best_pass1": max(c["pass1"] for c in after) if after else None,
        # less noisy than one evaluation: the mean over the evaluations in the second half of training
        "late_pass1": (statistics.fmean(c["pass1"] for c in after if 2 * c["step"] > after[-1]["step"])
                       if after else None),
        "k": kmax,
        "final_pass_k": final["pass_k"][kmax] if kmax is not None else None,
        "median_step_total_s": _median(step_total),
        "median_generation_s": _median(generation),
        "median_wall_step_s": _median(wall_steps),
        "timing_medians_s": timing,
        "train_wall_s": wall_at(ordered[-1]["step"]),
        "pred_var_ratio_revisit": statistics.fmean(pvr_revisit) if pvr_revisit else None,
        "revisit_steps": len(pvr_revisit),
        "pred_var_ratio_all": statistics.fmean(pvr_all) if pvr_all else None,
    }


# ----------------------------------------------------------------------------------------------
# aggregation over seeds
# ----------------------------------------------------------------------------------------------
def _stats(xs: Iterable[Optional[float]]) -> Optional[Dict[str, float]]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "median": float(statistics.median(xs)), "n": len(xs)}


def aggregate(runs: Dict[str, Dict[int, Dict[str, Any]]], baseline: str = BASELINE) -> Dict[str, Any]:
    """runs[variant][seed] = parse_run(...) -> per-variant summary (+ curves averaged by eval step)."""
    out: Dict[str, Any] = {}
    base = runs.get(baseline, {})
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        rs = [by_seed[s] for s in seeds]
        summary: Dict[str, Any] = {"seeds": seeds}
        for key in ("start_pass1", "final_pass1", "best_pass1", "late_pass1", "final_pass_k", "median_step_total_s",
                    "median_wall_step_s", "median_generation_s", "train_wall_s", "pred_var_ratio_revisit",
                    "rollouts", "steps"):
            summary[key] = _stats(r[key] for r in rs)
        summary["k"] = rs[0]["k"] if rs else None
        phases = sorted({k for r in rs for k in r.get("timing_medians_s", {})})
        summary["timing_medians_s"] = {k: _stats(r.get("timing_medians_s", {}).get(k) for r in rs) for k in phases}
        summary["gain_pass1"] = _stats(r["final_pass1"] - r["start_pass1"] for r in rs
                                       if r["final_pass1"] is not None and r["start_pass1"] is not None)
        for key, name in (("median_step_total_s", "overhead_step_total_pct"),
                          ("median_wall_step_s", "overhead_wall_step_pct")):
            paired = [100.0 * (by_seed[s][key] / base[s][key] - 1.0) for s in seeds
                      if s in base and by_seed[s][key] and base[s][key]]
            summary[name] = _stats(paired)
            # pooled: median over all the variant's steps' per-run medians vs the baseline's
            mv = _stats(r[key] for r in rs)
            mb = _stats(base[s][key] for s in base)
            summary[name + "_of_medians"] = (100.0 * (mv["median"] / mb["median"] - 1.0)
                                             if mv and mb and mb["median"] else None)
        # curves by eval step
        steps = sorted({c["step"] for r in rs for c in r["curve"]})
        curve = []
        for st in steps:
            pts = [c for r in rs for c in r["curve"] if c["step"] == st]
            k = summary["k"]
            curve.append({
                "step": st,
                "n": len(pts),
                "rollouts": statistics.fmean(c["rollouts"] for c in pts),
                "wall_s": statistics.fmean(c["wall_s"] for c in pts),
                "pass1": _stats(c["pass1"] for c in pts),
                "pass_k": _stats(c["pass_k"].get(k) for c in pts) if k is not None else None,
            })
        summary["curve"] = curve
        out[variant] = summary
    return out


def eval_noise(runs: Dict[str, Dict[int, Dict[str, Any]]]) -> Optional[Dict[str, float]]:
    """Spread of eval pass@1 at step 0 over all runs: the same warm-started model evaluated each time, so
    this is the evaluation's own sampling noise (the size a difference between variants must exceed)."""
    return _stats(r["start_pass1"] for by in runs.values() for r in by.values())


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _fmt(s: Optional[Dict[str, float]], digits: int = 3, spread: str = "sd") -> str:
    if s is None:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:+.{digits}f}" if spread == "range" else f"{s['mean']:.{digits}f}"
    if spread == "range":
        return f"{s['median']:+.{digits}f} [{s['min']:+.{digits}f}, {s['max']:+.{digits}f}]"
    return f"{s['mean']:.{digits}f} ± {s[spread]:.{digits}f}"


def markdown_table(agg: Dict[str, Any], baseline: str = BASELINE,
                   noise: Optional[Dict[str, float]] = None) -> str:
    k = next((a["k"] for a in agg.values() if a.get("k") is not None), None)
    head = ("| variant | seeds | start pass@1 | final pass@1 | gain | best pass@1 | 2nd-half pass@1 | final pass@%s | "
            "step time s (median) | overhead vs %s, step_total %% | overhead, wall/step %% | "
            "pred. var. ratio (revisit steps) |" % (k if k is not None else "k", baseline))
    lines = [head, "|" + "---|" * 12]
    for variant, a in agg.items():
        over = "–"
        over_w = "–"
        if variant != baseline:
            over = _fmt(a["overhead_step_total_pct"], 1, "range")
            over_w = _fmt(a["overhead_wall_step_pct"], 1, "range")
        pvr = a["pred_var_ratio_revisit"]
        st = a["median_step_total_s"]
        lines.append("| " + " | ".join([
            variant, str(len(a["seeds"])), _fmt(a["start_pass1"]), _fmt(a["final_pass1"]),
            (f"{a['gain_pass1']['mean']:+.3f}" if a["gain_pass1"] else "–"),
            _fmt(a["best_pass1"]), _fmt(a.get("late_pass1")), _fmt(a["final_pass_k"]),
            (f"{st['median']:.2f} [{st['min']:.2f}, {st['max']:.2f}]" if st else "–"),
            over, over_w, (_fmt(pvr) if pvr else "–"),
        ]) + " |")
    notes = [
        "",
        "pass@1/pass@k: mean ± sd over seeds (unbiased estimators over the eval split, "
        "n samples per prompt); best = max over the in-training evaluations after step 0; 2nd-half = mean over "
        "the evaluations in the second half of training (less eval noise than one evaluation). "
        "Step time: median over seeds of each run's median `timing/step_total` [min, max]. "
        "Overhead: per seed, the variant's median step time over the %s run's with the same seed, minus 1: "
        "median [min, max] over seeds. Pred. var. ratio: mean `dynamo/pred_var_ratio` (Σv/n of the allocation "
        "over uniform's, from the pool posterior) over the steps whose prompts were all already in the pool." % baseline,
    ]
    if noise is not None and noise["n"] > 1:
        notes.append("")
        notes.append(f"Eval noise: pass@1 of the same warm-started model at step 0 over all {noise['n']} runs: "
                     f"sd {noise['sd']:.3f}, range [{noise['min']:.3f}, {noise['max']:.3f}].")
    phases = [p for p in ("generation", "make_experience", "ppo_train", "broadcast", "dynamo_pool", "step_total")
              if any(p in a.get("timing_medians_s", {}) for a in agg.values())]
    if phases:
        notes += ["", "Median phase times (`timing/*`), ms (median over seeds of each run's median over steps):", "",
                  "| variant | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
        for variant, a in agg.items():
            t = a.get("timing_medians_s", {})
            notes.append("| " + variant + " | " + " | ".join(
                f"{1000 * t[p]['median']:.1f}" if t.get(p) else "–" for p in phases) + " |")
    return "\n".join(lines + notes) + "\n"


def plot(agg: Dict[str, Any], path: str, title: str = "") -> None:
    k = next((a["k"] for a in agg.values() if a.get("k") is not None), None)
    rows = [("pass1", "eval pass@1")] + ([("pass_k", f"eval pass@{k}")] if k is not None else [])
    fig, axes = _plotting.figure(len(rows), 2, (11, 3.6 * len(rows)), squeeze=False)
    for i, (key, label) in enumerate(rows):
        for j, (xkey, xlabel) in enumerate((("rollouts", "rollouts consumed"),
                                            ("wall_s", "training wall clock, s (evaluations excluded)"))):
            ax = axes[i][j]
            for variant, a in agg.items():
                pts = [c for c in a["curve"] if c.get(key)]
                if not pts:
                    continue
                _plotting.mean_band(ax, [c[xkey] for c in pts], [c[key]["mean"] for c in pts],
                                    [c[key]["min"] for c in pts], [c[key]["max"] for c in pts],
                                    label=variant, color=COLORS.get(variant), alpha=0.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(title="mean, min–max over seeds", fontsize=8)
    _plotting.save(fig, path, title, dpi=110)


def collect(out: str, variants: Sequence[str], seeds: Optional[Sequence[int]] = None) -> Dict[str, Dict[int, Any]]:
    """Parse existing run dirs ``<out>/<variant>-s<seed>/metrics.jsonl`` (all seeds found when seeds is None)."""
    runs: Dict[str, Dict[int, Any]] = {}
    for variant in variants:
        found = {}
        if seeds is None:
            prefix = f"{variant}-s"
            if os.path.isdir(out):
                for name in os.listdir(out):
                    if name.startswith(prefix) and name[len(prefix):].isdigit():
                        found[int(name[len(prefix):])] = os.path.join(out, name)
        else:
            found = {s: run_dir_for(out, variant, s) for s in seeds}
        for seed, d in sorted(found.items()):
            path = os.path.join(d, "metrics.jsonl")
            if os.path.exists(path):
                r = parse_run(read_metrics(path))
                info = os.path.join(d, "run_info.json")
                if os.path.exists(info):  # the subprocess's wall time (start-up included)
                    with open(info) as f:
                        r["process_wall_s"] = json.load(f).get("wall_s")
                runs.setdefault(variant, {})[seed] = r
    return runs


def write_outputs(runs: Dict[str, Dict[int, Any]], out: str, png: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    agg = aggregate(runs)
    noise = eval_noise(runs)
    table = markdown_table(agg, noise=noise)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "learning_curves.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "learning_curves.json"), "w") as f:
        json.dump({"meta": meta, "aggregate": agg, "eval_noise_start_pass1": noise,
                   "runs": {v: {str(s): r for s, r in by.items()} for v, by in runs.items()}}, f, indent=1)
    steps = next((a["steps"]["mean"] for a in agg.values() if a.get("steps")), None)
    plot(agg, png, title=f"tiny-cpu preset: {', '.join(agg)}; "
                         f"{int(steps) if steps else '?'} steps, seeds {meta.get('seeds', '')}")
    return {"aggregate": agg, "table": table}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4", help="comma-separated training seeds (--train.seed)")
    p.add_argument("--episodes", type=int, default=6,
                   help="--train.num_episodes (the preset's 96 prompts / 16 per step = 6 steps each; the preset's is 4); "
                        "0: the preset's")
    p.add_argument("--eval-steps", type=int, default=8, help="--eval.steps (in-training evaluation interval)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first seed, grpo + dynamo, 1 episode of 64 prompts (2 steps), eval every step "
                        "with 2 samples per prompt")
    p.add_argument("--out", default=None, help="run dirs, table and JSON go here (default: "
                                                "benchmarks/out/learning_curves, ..._quick with --quick)")
    p.add_argument("--png", default=None, help="default: docs/learning_curves.png (<out>/learning_curves.png "
                                                "with --quick)")
    p.add_argument("--from-existing", action="store_true", help="re-aggregate/re-plot the run dirs under --out")
    p.add_argument("--extra", default="", help="extra trainer flags for every run (one string)")
    args = p.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    extra = args.extra.split()
    episodes, eval_steps = (args.episodes or None), args.eval_steps
    if args.quick:
        seeds, variants = seeds[:1], ["grpo", "dynamo"]
        episodes, eval_steps = 1, 1
        extra = ["--data.max_samples", "64", "--eval.n_samples_per_prompt", "2", "--no-dynamo.eval_at_start"] + extra
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "out", "learning_curves" + ("_quick" if args.quick else ""))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    png = args.png or (os.path.join(args.out, "learning_curves.png") if args.quick
                       else os.path.join(ROOT, "docs", "learning_curves.png"))

    t_start = time.time()
    infos = []
    if not args.from_existing:
        # Interleave seeds (seed-major) so that slow phases of a shared machine hit every variant alike.
        for seed in seeds:
            for variant in variants:
                print(f"[learning_curves] {variant} seed {seed} ...", flush=True)
                info = run_one(variant, seed, args.out, episodes, eval_steps, extra)
                infos.append(info)
                print(f"[learning_curves]   done in {info['wall_s']:.0f} s", flush=True)
    runs = collect(args.out, variants, None if args.from_existing else seeds)
    if not runs:
        print(f"no metrics.jsonl under {args.out}", file=sys.stderr)
        return 1
    meta = {"seeds": sorted({s for by in runs.values() for s in by}), "variants": list(runs),
            "episodes": episodes, "eval_steps": eval_steps, "extra": extra, "flags": VARIANTS,
            "common_flags": COMMON_FLAGS, "runs_wall_s": infos, "benchmark_wall_s": time.time() - t_start}
    old = os.path.join(args.out, "learning_curves.json")
    if args.from_existing and os.path.exists(old):  # keep how the runs were made
        with open(old) as f:
            prev = json.load(f).get("meta", {})
        meta.update({k: prev[k] for k in ("episodes", "eval_steps", "extra", "runs_wall_s", "benchmark_wall_s")
                     if k in prev})
        meta["from_existing"] = True
    res = write_outputs(runs, args.out, png, meta)
    print(res["table"])
    print(f"[learning_curves] table: {os.path.join(args.out, 'learning_curves.md')}; "
          f"json: {os.path.join(args.out, 'learning_curves.json')}; plot: {png}; "
          f"{time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
