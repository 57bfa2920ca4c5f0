"""What is DynaMO worth in rollouts? The pre-registered learning study of issue #24 §4 (docs/learning_study.md):
each arm's **effective rollout multiplier M**, read off a calibration curve of OpenRLHF's GRPO run with 1x, 1.25x,
1.5x, 2x and 3x the rollouts per step, through the real trainer (``python -m dynamo_openrlhf.train --dynamo.preset
tiny-cpu --dynamo.tiny_task carry``).

Arms (``ARMS``; every run: the carry task's 128 train prompts, 16 prompts per step, 2 episodes, the same seeds):

* ``grpo``, ``grpo-1.25x``, ``grpo-1.5x``, ``grpo-2x``, ``grpo-3x``: OpenRLHF's GRPO exactly (group_norm advantages,
  token-mean loss, DynaMO allocation and modulation off) with n = 8, 10, 12, 16, 24 rollouts per prompt: the
  calibration (1.25x: amendment 3 of docs/learning_study.md, a secondary fifth point). Same prompts and optimizer steps (one optimizer step per rollout step: ``--train.batch_size``
  = prompts x n), 16 steps;
* ``grpo+loss``: uniform n = 8 through DynaMO's sampler with DynaMO's default loss (rloo, prompt-balanced);
* ``dynamo-wide``: the allocation with its full lever: 2x candidate prompts per step, bounds 0..4n, a prompt
  gets 0 or >= 2 rollouts, modulation off; ``dynamo-wide+mod``: the same with the default modulation;
* ``filter``, ``proportional``: those rules with the same 2x candidates and lo 0, modulation off;
* ``openrlhf-dynfilter``: GRPO with OpenRLHF's own ``--algo.dynamic_filtering_enable`` (groups whose mean
  reward is not strictly inside (0, 1), i.e. all wrong or all right, are discarded and replaced by the next
  prompt: it generates more rollouts per optimizer step).

All arms but the calibration ones generate 128 rollouts per optimizer step (``openrlhf-dynfilter``: 128
trained plus the discarded ones). Arms that draw 2x candidates per step pass over the train file in half the
steps, so they get 2x the episodes: 16 steps and the same 2,048 generated rollouts as ``grpo``.
``openrlhf-dynfilter`` runs ``grpo``'s episodes: the same prompts consumed and rollouts generated, fewer steps.

The x-axis of every metric is rollouts actually generated (``dynamo/generated_rollouts``, which counts the
groups dynamic filtering discards), the step-0 evaluation (the same warm-started model for every arm,
evaluated once per seed in the ``grpo`` run) at x = 0.

* primary: ``auc`` = area under held-out pass@1 vs cumulative generated rollouts, divided by the run's total
  generated rollouts (the trapezoid over the evaluation points; the rollout-weighted mean pass@1 of the run);
  paired difference arm - ``grpo`` per seed (mean, 95 % percentile bootstrap CI over seeds); and
  **M** = the budget multiple b at which the calibration curve (mean ``auc`` of the four calibration arms vs
  log b, piecewise linear) first reaches the arm's mean ``auc``; 95 % CI from a paired bootstrap over seeds
  (each resample recomputes the calibration means and the arm's mean on the same seeds). M outside [1, 3]
  is reported censored, "<1" / ">3" (the extrapolation along the end segment is kept in the json only).
* secondary: final held-out pass@1; the same area with generated response tokens on the x-axis; train-prompt
  pass@1 (the train prompts evaluated with fresh samples) area and final; per arm the mean of
  ``dynamo/pred_var_ratio`` and ``dynamo/alloc_skipped`` over steps, median ``actor_grad_norm``, steps, generated
  rollouts, run wall time.

Runs go ``--workers`` at a time (2 on this 2-core machine); jobs are seed-major, the calibration arms first
within a seed (``grpo`` leading: it evaluates the seed's step 0), the other arms' order rotated per seed. A failed run is recorded (returncode, log) and the
study goes on; the aggregation uses the runs that finished.

Usage::

    python benchmarks/learning_study.py                  # 10 arms x 8 seeds (docs/learning_study.md)
    python benchmarks/learning_study.py --quick          # smoke run (tests): grpo + dynamo-wide, 2 seeds, 2 steps
    python benchmarks/learning_study.py --from-existing  # re-aggregate / re-plot the run dirs under --out
    python benchmarks/learning_study.py --reuse          # run only the (arm, seed) pairs not finished yet
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plotting  # noqa: E402  (the plot plumbing shared with learning_curves.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASK = "carry"
MOD_OFF = ["--dynamo.modulation.preset", "off"]
GRPO = ["--algo.advantage.estimator", "group_norm", "--dynamo.allocation.rule", "off", *MOD_OFF]


def _wide(n: int) -> List[str]:
    return ["--dynamo.allocation.oversample", "2", "--dynamo.allocation.lo", "0", "--dynamo.allocation.hi",
            str(4 * n), "--dynamo.allocation.min_rollouts", "2"]


def _candidates2(rule: str) -> Callable[[int], List[str]]:
    return lambda n: ["--dynamo.allocation.rule", rule, "--dynamo.allocation.oversample", "2",
                      "--dynamo.allocation.lo", "0", *MOD_OFF]


@dataclasses.dataclass(frozen=True)
class Arm:
    """``flags(n)``: the arm's trainer flags for base rollouts per prompt n; ``budget``: rollouts per step as a
    multiple of n (the calibration arms); ``oversample``: candidate prompts per step as a multiple of the
    prompts per step (the arm runs that many times the episodes, so that it makes the same optimizer steps)."""

    flags: Callable[[int], List[str]]
    budget: float = 1.0
    oversample: int = 1


ARMS: Dict[str, Arm] = {
    "grpo": Arm(lambda n: GRPO),
    "grpo-1.25x": Arm(lambda n: GRPO, budget=1.25),  # amendment 3 (b): a fifth calibration point
    "grpo-1.5x": Arm(lambda n: GRPO, budget=1.5),
    "grpo-2x": Arm(lambda n: GRPO, budget=2.0),
    "grpo-3x": Arm(lambda n: GRPO, budget=3.0),
    "grpo+loss": Arm(lambda n: ["--dynamo.allocation.rule", "uniform", *MOD_OFF]),
    "dynamo-wide": Arm(lambda n: _wide(n) + MOD_OFF, oversample=2),
    "dynamo-wide+mod": Arm(_wide, oversample=2),
    "filter": Arm(_candidates2("filter"), oversample=2),
    "proportional": Arm(_candidates2("proportional"), oversample=2),
    # OpenRLHF 0.11.2 keeps a group iff min < mean score < max (strict); scores are 0/1 here
    "openrlhf-dynfilter": Arm(lambda n: GRPO + ["--algo.dynamic_filtering_enable",
                                                "--algo.dynamic_filtering_range", "0", "1"]),
}
BASELINE = "grpo"
DYNFILTER = "openrlhf-dynfilter"  # the peer an OpenRLHF user has: every arm's AUC is also compared with it
CALIBRATION = [a for a, arm in ARMS.items() if a.startswith("grpo") and a != "grpo+loss"]  # budgets 1, 1.5, 2, 3
COLORS = {"grpo": "black", "grpo-1.25x": "0.2", "grpo-1.5x": "0.35", "grpo-2x": "0.55", "grpo-3x": "0.75", "grpo+loss": "tab:brown",
          "dynamo-wide": "tab:red", "dynamo-wide+mod": "tab:orange", "filter": "tab:green",
          "proportional": "tab:purple", "openrlhf-dynfilter": "tab:blue"}
SOURCES = ("heldout", "train")
BOOTSTRAP = 10_000

# No checkpoints (their wall time has nothing to do with the method), no best-model tracking; nothing capped by
# --data.max_samples (the study's files are already the sets it means); the final evaluation at the last step; the
# transformers rollout engine (as the previous study: a run starts in about a third of the vLLM CPU engine's time);
# float32 training, named although it is the CPU default (the first attempt trained in bf16, ~10x slower here).
COMMON_FLAGS = ["--dynamo.tiny_task", TASK, "--ckpt.save_steps", "1000000", "--ckpt.best_metric_key", "none",
                "--data.max_samples", "100000000", "--dynamo.eval_at_end", "--dynamo.cpu_engine", "transformers",
                "--dynamo.cpu_dtype", "fp32"]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def write_study_data(out: str, heldout_prompts: Optional[int], train_eval_prompts: int,
                     cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """``<out>/data/train.jsonl``: the carry preset's train file, all of it. ``<out>/data/eval.jsonl``: its
    eval file (held out: never trained on, none in the warm start) tagged ``datasource: heldout`` (the first
    ``heldout_prompts`` of a fixed shuffle when given, which keeps the level mix; None: all), then the first
    ``train_eval_prompts`` train rows of the same kind of shuffle tagged ``train`` (fresh samples of prompts
    that are trained on). Builds the preset's assets first (once, cached), so concurrent runs find them."""
    from dynamo_openrlhf import tiny

    assets = tiny.prepare_tiny_assets(cache_dir, tiny.TinyConfig(task=TASK))
    train = tiny.read_jsonl(assets.train_file)
    held = tiny.read_jsonl(assets.eval_file)
    if heldout_prompts is not None:
        if not 1 <= heldout_prompts <= len(held):
            raise ValueError(f"heldout_prompts {heldout_prompts}: the eval file has {len(held)} prompts")
        held = [held[i] for i in np.random.default_rng(0).permutation(len(held))[:heldout_prompts]]
    if not 0 <= train_eval_prompts <= len(train):
        raise ValueError(f"train_eval_prompts {train_eval_prompts}: the train file has {len(train)} prompts")
    train_eval = [train[i] for i in np.random.default_rng(1).permutation(len(train))[:train_eval_prompts]]
    rows = [dict(r, datasource="heldout") for r in held] + [dict(r, datasource="train") for r in train_eval]
    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    paths = {"train": os.path.join(d, "train.jsonl"), "eval": os.path.join(d, "eval.jsonl")}
    tiny.write_jsonl(train, paths["train"])
    tiny.write_jsonl(rows, paths["eval"])
    return {**paths, "train_prompts": len(train), "heldout_prompts": len(held),
            "train_eval_prompts": len(train_eval), "assets": str(assets.root), "model": str(assets.model_dir)}


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def run_dir_for(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{arm}-s{seed}")


def sizing_flags(arm: str, n: int = 8, prompts_per_step: int = 16, episodes: int = 2) -> List[str]:
    """Rollouts per prompt (round(budget x n)), prompts per step, one optimizer step per rollout step
    (``--train.batch_size`` = prompts x rollouts per step) and episodes (x the arm's over-sampling)."""
    a = ARMS[arm]
    n_arm = int(round(a.budget * n))
    return ["--rollout.n_samples_per_prompt", str(n_arm), "--rollout.batch_size", str(prompts_per_step),
            "--train.batch_size", str(prompts_per_step * n_arm), "--train.num_episodes", str(episodes * a.oversample)]


def train_command(arm: str, seed: int, run_dir: str, data: Dict[str, Any], episodes: int, eval_steps: int,
                  eval_samples: int, eval_at_start: bool, extra: Sequence[str] = (), n: int = 8,
                  prompts_per_step: int = 16) -> List[str]:
    return [sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu", "--dynamo.run_dir", run_dir,
            "--train.seed", str(seed), "--eval.steps", str(eval_steps), "--eval.n_samples_per_prompt",
            str(eval_samples), "--data.prompt_dataset", data["train"], "--eval.dataset", data["eval"],
            "--dynamo.eval_at_start" if eval_at_start else "--no-dynamo.eval_at_start",
            # the warm start built before the first run, for every run (a recipe edit mid-study changes nothing)
            *(["--actor.model_name_or_path", data["model"]] if data.get("model") else []),
            *COMMON_FLAGS, *ARMS[arm].flags(n), *sizing_flags(arm, n, prompts_per_step, episodes), *extra]


def job_order(arms: Sequence[str], seeds: Sequence[int]) -> List[tuple]:
    """Seed-major. Within a seed the calibration arms first, ``grpo`` (which evaluates step 0 for the seed) leading,
    so that a seed cut short by ``--deadline`` still has its step 0 and calibration curve; then the other arms,
    their list rotated by the seed's index k (so concurrent pairs and positions vary)."""
    cal = [a for a in CALIBRATION if a in arms]
    rest = [a for a in arms if a not in cal]
    jobs = []
    for k, seed in enumerate(seeds):
        r = k % len(rest) if rest else 0
        jobs += [(a, seed) for a in cal + rest[r:] + rest[:r]]
    return jobs


def finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a completed run (its run_info.json says returncode 0, metrics.jsonl exists)."""
    info = os.path.join(run_dir, "run_info.json")
    if not (os.path.exists(info) and os.path.exists(os.path.join(run_dir, "metrics.jsonl"))):
        return False
    with open(info) as f:
        return json.load(f).get("returncode") == 0


def run_one(arm: str, seed: int, out: str, cmd: List[str], timeout: float = 3600,
            deadline: Optional[float] = None) -> Dict[str, Any]:
    """Runs one training command in ``run_dir_for(out, arm, seed)`` (its log: ``train.log``) and records
    ``run_info.json``; a failure (non-zero returncode, ``"timeout"`` after ``timeout`` s, ``"deadline"`` when
    stopped at the unix time ``deadline``, ``"not started"`` when that had passed) is recorded, not raised."""
    if deadline is not None and time.time() >= deadline:
        return {"arm": arm, "seed": seed, "command": " ".join(cmd[1:]), "returncode": "not started", "wall_s": 0.0,
                "start": time.time()}
    stop = "timeout"
    if deadline is not None and deadline - time.time() < timeout:
        timeout, stop = deadline - time.time(), "deadline"
    run_dir = run_dir_for(out, arm, seed)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    env = dict(os.environ, RAY_ADDRESS="local")  # every run its own local Ray instance
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        # its own session: on timeout the whole run (its Ray workers too) is ended, nothing else
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = stop
    info = {"arm": arm, "seed": seed, "command": " ".join(cmd[1:]), "returncode": rc,
            "wall_s": time.time() - t0, "start": t0}
    with open(os.path.join(run_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ----------------------------------------------------------------------------------------------
# the metrics (pure functions)
# ----------------------------------------------------------------------------------------------
def normalised_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid area under y(x) divided by the x span (the curve's mean height, in y's unit). x: (K,)
    increasing, K >= 2; y: (K,)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.shape != y.shape or np.any(np.diff(x) <= 0):
        raise ValueError(f"normalised_auc: need >= 2 points with increasing x, got x={x.tolist()}")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def effective_multiplier(budgets: Sequence[float], values: Sequence[float], target: float
                         ) -> Tuple[float, str]:
    """M: the first budget at which the calibration curve reaches ``target``.

    The curve is piecewise linear in log(budget) through (log budgets[k], values[k]); budgets (K,) increasing,
    K >= 2, > 0. Returns ``(M, where)``: ``where`` is ``"in"`` when budgets[0] <= M <= budgets[-1] (M =
    budgets[0] when target equals values[0]; equality up to 1e-12 relative), ``"below"`` when target < values[0] and
    ``"above"`` when the curve never reaches it; then M is the extrapolation along the first / last segment
    (nan when that segment does not rise)."""
    b = np.asarray(budgets, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if b.size < 2 or b.shape != v.shape or np.any(b <= 0) or np.any(np.diff(b) <= 0):
        raise ValueError(f"effective_multiplier: need >= 2 increasing positive budgets with one value each, got "
                         f"budgets={b.tolist()}, values={v.tolist()}")
    if not (np.all(np.isfinite(v)) and math.isfinite(target)):
        raise ValueError(f"effective_multiplier: values and target must be finite, got {v.tolist()}, {target}")
    lb = np.log(b)

    def along(k: int) -> float:  # extrapolate along segment k -> k+1
        slope = (v[k + 1] - v[k]) / (lb[k + 1] - lb[k])
        return float(math.exp(lb[k] + (target - v[k]) / slope)) if slope > 0 else float("nan")

    # a target equal to a calibration value up to rounding (a calibration arm's own mean) counts as reached
    tol = 1e-12 * max(1.0, abs(target))
    if target < v[0] - tol:
        return along(0), "below"
    if target <= v[0] + tol:
        return float(b[0]), "in"
    for k in range(b.size - 1):
        if v[k + 1] >= target - tol:  # first segment that reaches it (v[k] < target here)
            t = min(1.0, (target - v[k]) / (v[k + 1] - v[k]))
            m = math.exp(lb[k] + t * (lb[k + 1] - lb[k]))
            return float(min(max(m, b[k]), b[k + 1])), "in"  # exp(log b) may round past b
    return along(b.size - 2), "above"


def censored(m: float, where: str) -> float:
    """M as the CI uses it: 0 below the calibrated range, inf above it (quantiles commute with this)."""
    return 0.0 if where == "below" else math.inf if where == "above" else m


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


def multiplier_ci(calib: np.ndarray, budgets: Sequence[float], arm: np.ndarray, resamples: int = BOOTSTRAP,
                  seed: int = 0, level: float = 0.95) -> Dict[str, Any]:
    """M of an arm with its paired bootstrap CI over seeds.

    ``calib`` (S, K): the calibration arms' metric per seed (columns in ``budgets`` order); ``arm`` (S,): the
    arm's metric on the same seeds. The point estimate inverts the mean curve at the arm's mean; each
    resample draws S seeds with replacement and inverts that resample's mean curve at that resample's arm
    mean. CI: percentiles of the censored resampled M (``censored``; 0 / inf mean "<b_min" / ">b_max")."""
    calib = np.asarray(calib, dtype=np.float64)
    arm = np.asarray(arm, dtype=np.float64)
    if calib.ndim != 2 or arm.shape != (calib.shape[0],) or calib.shape[0] < 1:
        raise ValueError(f"multiplier_ci: calib (S, K) and arm (S,), got {calib.shape} and {arm.shape}")
    m, where = effective_multiplier(budgets, calib.mean(axis=0), float(arm.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arm.size, size=(resamples, arm.size))
    curves, targets = calib[idx].mean(axis=1), arm[idx].mean(axis=1)
    draws = np.array([censored(*effective_multiplier(budgets, c, float(t))) for c, t in zip(curves, targets)])
    a = (1.0 - level) / 2.0
    lo, hi = (float(np.quantile(draws, q, method="inverted_cdf")) for q in (a, 1 - a))
    return {"M": censored(m, where), "where": where, "extrapolated": m, "lo": lo, "hi": hi, "n": int(arm.size),
            "p_above_1": float(np.mean(draws > 1.0))}


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def read_metrics(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return statistics.fmean(xs) if xs else None


def parse_run(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One run's metrics.jsonl rows -> its evaluation curve and per-step summaries.

    Curve points (step order): ``step``, ``rollouts`` / ``tokens`` (cumulative generated rollouts / response
    tokens after that step: ``dynamo/generated_rollouts`` / ``_tokens``; runs logged before those metrics
    existed fall back to ``rollout/num_samples`` and its mean response length), and per source its pass@1."""
    train = sorted((r for r in rows if r.get("type") == "train"), key=lambda r: int(r["step"]))
    if not train:
        raise ValueError("no train rows")
    cum = {0: (0.0, 0.0)}
    roll = tok = 0.0
    for r in train:
        n = r.get("dynamo/generated_rollouts")
        if n is None:
            n = float(r.get("rollout/num_samples", 0.0))
            t = n * float(r.get("rollout/response_length_mean", 0.0))
        else:
            t = float(r.get("dynamo/generated_tokens", 0.0))
        roll, tok = roll + float(n), tok + t
        cum[int(r["step"])] = (roll, tok)
    curve = []
    for e in rows:
        if e.get("type") != "eval" or int(e["step"]) not in cum:
            continue
        x, t = cum[int(e["step"])]
        curve.append({"step": int(e["step"]), "rollouts": x, "tokens": t,
                      **{src: float(e[f"eval_{src}_pass1"]) for src in SOURCES if e.get(f"eval_{src}_pass1") is not None}})
    curve.sort(key=lambda p: p["step"])
    grad = [float(r["actor_grad_norm"]) for r in train if r.get("actor_grad_norm") is not None]
    return {"steps": len(train), "rollouts": roll, "tokens": tok, "curve": curve,
            "pred_var_ratio": _mean([r.get("dynamo/pred_var_ratio") for r in train]),
            "alloc_skipped": _mean([r.get("dynamo/alloc_skipped") for r in train]),
            "alloc_candidates": _mean([r.get("dynamo/alloc_candidates") for r in train]),
            "grad_norm": float(statistics.median(grad)) if grad else None,
            "train_reward": _mean([r.get("rollout/reward_mean") for r in train])}


def run_metrics(run: Dict[str, Any], start: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-run scalars: per source the normalised area vs generated rollouts (``<src>_auc``) and tokens
    (``<src>_auc_tokens``) and the final pass@1; the curve starts with the seed's shared step-0 point."""
    curve = run["curve"]
    if start is not None and not (curve and curve[0]["step"] == 0):
        curve = [dict(start, rollouts=0.0, tokens=0.0)] + curve
    out = {k: v for k, v in run.items() if k != "curve"}
    out["curve"] = curve
    for src in SOURCES:
        pts = [p for p in curve if src in p]
        if len(pts) < 2 or pts[0]["step"] != 0:
            continue
        y = [p[src] for p in pts]
        out[f"{src}_auc"] = normalised_auc([p["rollouts"] for p in pts], y)
        out[f"{src}_auc_tokens"] = normalised_auc([p["tokens"] for p in pts], y)
        out[f"{src}_start"] = y[0]
        out[f"{src}_final"] = y[-1]
    return out


def collect(out: str, arms: Sequence[str]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """runs[arm][seed] = run_metrics(...) for every finished ``<out>/runs/<arm>-s<seed>``; the seed's step-0
    point comes from its ``grpo`` run (or any run of the seed that evaluated at step 0)."""
    raw: Dict[str, Dict[int, Dict[str, Any]]] = {}
    d = os.path.join(out, "runs")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        arm, _, s = name.rpartition("-s")
        if arm in arms and s.isdigit() and finished(os.path.join(d, name)):
            run = parse_run(read_metrics(os.path.join(d, name, "metrics.jsonl")))
            with open(os.path.join(d, name, "run_info.json")) as f:
                run["wall_s"] = json.load(f).get("wall_s")
            raw.setdefault(arm, {})[int(s)] = run
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for arm, by_seed in raw.items():
        for seed, run in by_seed.items():
            start = None
            for other in [raw.get(BASELINE, {}).get(seed)] + [raw[a].get(seed) for a in raw]:
                if other and other["curve"] and other["curve"][0]["step"] == 0:
                    start = other["curve"][0]
                    break
            runs.setdefault(arm, {})[seed] = run_metrics(run, start)
    return runs


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def paired(runs, arm: str, ref: str, key: str) -> List[float]:
    """Per-seed differences arm - ref of a scalar (seeds where both have it)."""
    a, b = runs.get(arm, {}), runs.get(ref, {})
    return [a[s][key] - b[s][key] for s in sorted(a) if s in b and a[s].get(key) is not None
            and b[s].get(key) is not None]


def calibration_matrix(runs, key: str = "heldout_auc", arm: Optional[str] = None
                       ) -> Tuple[List[float], List[int], np.ndarray, Optional[np.ndarray]]:
    """(budgets, seeds, calib (S, K), arm values (S,)) over the seeds where every calibration arm present (and
    ``arm``) has ``key``; budgets of the calibration arms that ran."""
    cal = [a for a in CALIBRATION if a in runs]
    budgets = [ARMS[a].budget for a in cal]
    need = cal + ([arm] if arm else [])
    seeds = sorted(s for s in runs.get(BASELINE, {})
                   if all(runs.get(a, {}).get(s, {}).get(key) is not None for a in need))
    calib = np.array([[runs[a][s][key] for a in cal] for s in seeds], dtype=np.float64).reshape(len(seeds), len(cal))
    vals = np.array([runs[arm][s][key] for s in seeds], dtype=np.float64) if arm else None
    return budgets, seeds, calib, vals


def summarise(runs, arms: Sequence[str]) -> Dict[str, Any]:
    """Every number of the table, per arm."""
    summary: Dict[str, Any] = {}
    for arm in arms:
        if arm not in runs:
            continue
        by = runs[arm]
        row: Dict[str, Any] = {"seeds": sorted(by)}
        for key in ("heldout_auc", "heldout_auc_tokens", "heldout_final", "train_auc", "train_auc_tokens",
                    "train_final"):
            vals = [r.get(key) for r in by.values() if r.get(key) is not None]
            row[key] = bootstrap_mean_ci(vals) if vals else None
            d = paired(runs, arm, BASELINE, key) if arm != BASELINE else []
            row[f"{key}_vs_grpo"] = bootstrap_mean_ci(d) if d else None
        for key in ("steps", "rollouts", "tokens", "pred_var_ratio", "alloc_skipped", "alloc_candidates",
                    "grad_norm", "train_reward", "wall_s"):
            vals = [r.get(key) for r in by.values() if r.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
        if arm != DYNFILTER and DYNFILTER in runs:
            # M is monotone in the AUC on one calibration curve: this paired difference orders the two Ms
            d = paired(runs, arm, DYNFILTER, "heldout_auc")
            row["heldout_auc_vs_dynfilter"] = bootstrap_mean_ci(d) if d else None
        budgets, seeds, calib, vals = calibration_matrix(runs, "heldout_auc", arm)
        row["M"] = multiplier_ci(calib, budgets, vals) if len(budgets) >= 2 and seeds else None
        row["M_budgets"] = budgets
        summary[arm] = row
    return summary


def mean_curve(runs, arm: str, src: str = "heldout", xkey: str = "rollouts") -> List[Dict[str, float]]:
    """Mean over seeds of pass@1 at each evaluation step, with its 95 % bootstrap CI and the mean x (arms
    whose steps differ between seeds, ``openrlhf-dynfilter``, are averaged per step index of the curve)."""
    by_pos: Dict[int, List[Dict[str, float]]] = {}
    for r in runs[arm].values():
        for i, p in enumerate(q for q in r["curve"] if src in q):
            by_pos.setdefault(i, []).append(p)
    out = []
    for i in sorted(by_pos):
        pts = by_pos[i]
        ci = bootstrap_mean_ci([p[src] for p in pts], resamples=2000)
        out.append({"x": statistics.fmean(p[xkey] for p in pts), **ci})
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


def format_m(m: Optional[Dict[str, Any]], budgets: Sequence[float] = (1.0, 3.0)) -> str:
    """``1.62 [1.20, 2.41]``; values below / above the calibrated range as ``<1`` / ``>3``."""
    if not m:
        return "–"
    lo_b, hi_b = min(budgets), max(budgets)

    def one(v: float) -> str:
        return f"<{lo_b:g}" if v < lo_b else f">{hi_b:g}" if v > hi_b else f"{v:.2f}"

    return f"{one(m['M'])} [{one(m['lo'])}, {one(m['hi'])}]"


def _num(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = [
        "| arm | seeds | steps | generated rollouts / run | **M** [95 % CI] | **held-out AUC − grpo** (primary) | "
        "held-out AUC | AUC vs tokens − grpo | final held-out pass@1 | final − grpo | train-prompt AUC − grpo | "
        "final train pass@1 | pred. var. ratio | skipped / step | grad norm | run wall, s |",
        "|---|---:|---:|---:|---|---|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for arm, r in summary.items():
        lines.append("| " + " | ".join([
            arm, str(len(r["seeds"])), _num(r["steps"], "{:.1f}"), _num(r["rollouts"], "{:.0f}"),
            format_m(r.get("M"), r.get("M_budgets") or (1.0, 3.0)),
            "–" if arm == BASELINE else _ci(r.get("heldout_auc_vs_grpo")),
            _ci(r.get("heldout_auc"), signed=False),
            "–" if arm == BASELINE else _ci(r.get("heldout_auc_tokens_vs_grpo")),
            _ci(r.get("heldout_final"), signed=False),
            "–" if arm == BASELINE else _ci(r.get("heldout_final_vs_grpo")),
            "–" if arm == BASELINE else _ci(r.get("train_auc_vs_grpo")),
            _ci(r.get("train_final"), signed=False),
            _num(r.get("pred_var_ratio")), _num(r.get("alloc_skipped"), "{:.1f}"), _num(r.get("grad_norm")),
            _num(r.get("wall_s"), "{:.0f}"),
        ]) + " |")
    vs = [f"{arm}: {_ci(r['heldout_auc_vs_dynfilter'])}" for arm, r in summary.items()
          if r.get("heldout_auc_vs_dynfilter")]
    if vs:
        lines += ["", f"Held-out AUC − `{DYNFILTER}` (paired per seed; orders the Ms): " + "; ".join(vs) + "."]
    runs = meta.get("runs", [])
    failed = [f"{i['arm']} s{i['seed']} (rc {i['returncode']})" for i in runs
              if i["returncode"] not in (0, "not started")]
    waiting = sorted({i["seed"] for i in runs if i["returncode"] == "not started"})
    if waiting:
        failed.append(f"{sum(i['returncode'] == 'not started' for i in runs)} runs not started (deadline "
                      f"{meta.get('deadline')}; seeds {waiting})")
    lines += ["", f"Study: seeds {meta.get('seeds')}, {meta.get('episodes')} episodes of {meta.get('train_prompts')} "
              f"train prompts ({meta.get('prompts_per_step')} per step, n = {meta.get('n')}), evaluation every "
              f"{meta.get('eval_steps')} steps and at the end on {meta.get('heldout_prompts')} held-out + "
              f"{meta.get('train_eval_prompts')} train prompts x {meta.get('eval_samples')} samples; "
              f"{meta.get('workers')} runs at a time; wall {meta.get('benchmark_wall_s', 0) / 60:.1f} min.",
              f"Failed runs: {', '.join(failed) if failed else 'none'}."]
    return "\n".join(lines) + "\n"


def plot(runs, summary: Dict[str, Any], arms: Sequence[str], path: str, title: str = "") -> None:
    """Left: the calibration curve (mean held-out AUC vs budget multiple, log x, 95 % CI bars) with each arm's
    mean AUC and M marked (horizontal bar: M's CI, clipped to the calibrated range). Right: mean held-out
    pass@1 vs cumulative generated rollouts per arm."""
    fig, (ax, ax2) = _plotting.figure(1, 2, (14, 5.5))
    cal = [a for a in CALIBRATION if a in summary and summary[a].get("heldout_auc")]
    if cal:
        b = [ARMS[a].budget for a in cal]
        y = [summary[a]["heldout_auc"]["mean"] for a in cal]
        err = [[y_ - summary[a]["heldout_auc"]["lo"] for a, y_ in zip(cal, y)],
               [summary[a]["heldout_auc"]["hi"] - y_ for a, y_ in zip(cal, y)]]
        ax.errorbar(b, y, yerr=err, color="black", marker="s", lw=2, capsize=4, label="grpo at b x rollouts")
        lo_b, hi_b = min(b), max(b)
        for arm in arms:
            r = summary.get(arm)
            if arm in CALIBRATION or not r or not r.get("heldout_auc") or not r.get("M"):
                continue
            m, yv = r["M"], r["heldout_auc"]["mean"]
            x = min(max(m["M"], lo_b), hi_b)
            xl, xh = min(max(m["lo"], lo_b), hi_b), min(max(m["hi"], lo_b), hi_b)
            ax.axhline(yv, color=COLORS.get(arm), lw=0.8, ls=":")
            # censored M: a triangle at the edge of the calibrated range, pointing outwards
            marker = ">" if m["M"] > hi_b else "<" if m["M"] < lo_b else "o"
            ax.errorbar([x], [yv], xerr=[[x - xl], [xh - x]], color=COLORS.get(arm), marker=marker, ms=8, capsize=3,
                        label=f"{arm}: M = {format_m(m, b)}")
        ax.set_xscale("log")
        ax.set_xticks(b)
        ax.set_xticklabels([f"{v:g}x" for v in b])
        ax.minorticks_off()
    ax.set_xlabel("rollouts per step, multiple of n = 8 (log)")
    ax.set_ylabel("held-out pass@1 area / generated rollouts")
    ax.set_title("calibration curve and effective rollout multiplier M", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    for arm in arms:
        if arm not in runs:
            continue
        c = mean_curve(runs, arm)
        _plotting.mean_band(ax2, [p["x"] for p in c], [p["mean"] for p in c], [p["lo"] for p in c],
                            [p["hi"] for p in c], label=arm, color=COLORS.get(arm), alpha=0.08,
                            lw=2 if arm in ("grpo", "dynamo-wide") else 1.2)
    ax2.set_xlabel("cumulative generated rollouts")
    ax2.set_ylabel("held-out pass@1 (mean over seeds, 95 % CI)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    _plotting.save(fig, path, title, dpi=100)


def aggregate(out: str, meta: Dict[str, Any], png: str) -> Dict[str, Any]:
    """Reads the run dirs under ``out``, writes ``<out>/learning_study.json`` / ``.md`` and the PNG."""
    runs = collect(out, meta["arms"])
    arms = [a for a in meta["arms"] if a in runs]
    summary = summarise(runs, arms)
    table = markdown(summary, meta)
    with open(os.path.join(out, "learning_study.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "learning_study.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary,
                   "runs": {a: {str(s): r for s, r in by.items()} for a, by in runs.items()}}, f, indent=1)
    done = sorted({s for by in runs.values() for s in by})
    plot(runs, summary, arms, png, title=f"tiny-cpu carry learning study: {len(arms)} arms, seeds with finished runs "
                                         f"{done} (of {len(meta['seeds'])} planned), x-axis = rollouts generated; "
                                         "mean and 95 % bootstrap CI over seeds")
    print(table, flush=True)
    return summary


def next_utc(hhmm: str, now: float) -> float:
    """The first unix time at or after ``now`` whose UTC clock reads ``hhmm`` ("01:05")."""
    try:
        h, m = (int(v) for v in hhmm.split(":"))
        if not (0 <= h < 24 and 0 <= m < 60):
            raise ValueError
    except ValueError:
        raise ValueError(f"--deadline: expected HH:MM (UTC), got {hhmm!r}") from None
    day = now - now % 86400
    t = day + 3600 * h + 60 * m
    return t if t >= now else t + 86400


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4,5,6,7,8", help="comma-separated training seeds (--train.seed)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    p.add_argument("--episodes", type=int, default=2, help="--train.num_episodes of the 1x-candidate arms "
                                                           "(128 prompts / 16 per step = 8 steps each)")
    p.add_argument("--eval-steps", type=int, default=8, help="--eval.steps (and the last step)")
    p.add_argument("--eval-samples", type=int, default=8, help="--eval.n_samples_per_prompt")
    p.add_argument("--heldout-prompts", type=int, default=None, help="held-out prompts evaluated (default: all "
                                                                     "200 of the preset's eval file)")
    p.add_argument("--train-eval-prompts", type=int, default=32, help="train prompts also evaluated (train pass@1)")
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt at 1x")
    p.add_argument("--prompts-per-step", type=int, default=16, help="--rollout.batch_size")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it counts as failed")
    p.add_argument("--deadline", default=None, help="HH:MM (UTC, the next such time): runs still going then are "
                                                     "stopped, later ones not started; the finished ones are aggregated")
    p.add_argument("--cache-dir", default=None, help="--dynamo.cache_dir of every run (default: the preset's)")
    p.add_argument("--quick", action="store_true", help="smoke run: grpo + dynamo-wide, seeds 1,2, 2 steps of 8 "
                                                        "prompts x 4, 8 held-out + 8 train prompts x 2 samples")
    p.add_argument("--out", default=None, help="default benchmarks/out/learning_study (…_quick with --quick)")
    p.add_argument("--png", default=None, help="default docs/learning_study.png (<out>/learning_study.png with --quick)")
    p.add_argument("--from-existing", action="store_true", help="only re-aggregate the run dirs under --out")
    p.add_argument("--reuse", action="store_true", help="keep the finished runs under --out, run only the others")
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
    if args.quick:
        seeds, arms = seeds[:2], ["grpo", "dynamo-wide"]
        args.episodes, args.eval_steps, args.eval_samples = 1, 1, 2
        args.heldout_prompts, args.train_eval_prompts = 8, 8
        # 16 train prompts, 8 per step x n = 4: 2 steps of 32 rollouts (dynamo-wide: 16 candidates a step, 2 episodes);
        # --data.max_samples caps the eval file too (8 + 8 rows)
        args.n, args.prompts_per_step = 4, 8
        extra = ["--data.max_samples", "16"] + extra
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "out", "learning_study" + ("_quick" if args.quick else ""))
    png = args.png or (os.path.join(args.out, "learning_study.png") if args.quick
                       else os.path.join(ROOT, "docs", "learning_study.png"))
    if args.cache_dir:
        extra = ["--dynamo.cache_dir", args.cache_dir] + extra

    t_start = time.time()
    deadline = next_utc(args.deadline, t_start) if args.deadline else None
    meta_path = os.path.join(args.out, "learning_study.json")
    if args.from_existing:
        with open(meta_path) as f:
            meta = json.load(f)["meta"]
    else:
        os.makedirs(args.out, exist_ok=True)
        data = write_study_data(args.out, args.heldout_prompts, args.train_eval_prompts, args.cache_dir)
        if args.quick:
            data["train_prompts"] = 16
        meta = {"seeds": seeds, "arms": arms, "episodes": args.episodes, "eval_steps": args.eval_steps,
                "eval_samples": args.eval_samples, "train_prompts": data["train_prompts"],
                "heldout_prompts": data["heldout_prompts"], "train_eval_prompts": data["train_eval_prompts"],
                "assets": data["assets"], "workers": args.workers, "n": args.n,
                "prompts_per_step": args.prompts_per_step, "extra": extra, "common_flags": COMMON_FLAGS,
                "flags": {a: ARMS[a].flags(args.n) + sizing_flags(a, args.n, args.prompts_per_step, args.episodes)
                          for a in arms}}
        jobs = job_order(arms, seeds)
        old_infos: List[Dict[str, Any]] = []
        if args.reuse:
            jobs = [j for j in jobs if not finished(run_dir_for(args.out, *j))]
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    old = json.load(f)["meta"]
                old_infos = [i for i in old.get("runs", []) if (i["arm"], i["seed"]) not in set(jobs)]
                meta["benchmark_wall_s_earlier"] = old.get("benchmark_wall_s")

        def go(job):
            arm, seed = job
            cmd = train_command(arm, seed, run_dir_for(args.out, arm, seed), data, args.episodes, args.eval_steps,
                                args.eval_samples, eval_at_start=(arm == BASELINE), extra=extra, n=args.n,
                                prompts_per_step=args.prompts_per_step)
            print(f"[learning_study] start {arm} seed {seed}", flush=True)
            info = run_one(arm, seed, args.out, cmd, timeout=args.timeout, deadline=deadline)
            print(f"[learning_study] {'done ' if info['returncode'] == 0 else 'FAILED (rc %s)' % info['returncode']} "
                  f"{arm} seed {seed} in {info['wall_s']:.0f} s ({(time.time() - t_start) / 60:.1f} min)", flush=True)
            return info

        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as ex:
            infos = list(ex.map(go, jobs))
        meta["runs"] = old_infos + infos
        meta["benchmark_wall_s"] = time.time() - t_start
        meta["deadline"] = args.deadline
    aggregate(args.out, meta, png)
    print(f"[learning_study] {meta_path}; plot {png}; {time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
