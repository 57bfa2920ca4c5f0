#!/usr/bin/env python3
"""Allocation quality on simulated training (issue 7).

    python benchmarks/allocation_quality.py            # full run, 3 seeds (a few minutes on 1 core)
    python benchmarks/allocation_quality.py --quick    # smaller pools, fewer steps (~30 s)

Simulated RLVR training with known pass rates: every step draws a batch from OpenRLHF-style epochs over
a shuffled pool, each method allocates the budget 16 x 512 (bounds 8..24; skipping variant 0..64 over
2 x 512 candidates), rollouts are simulated (Binomial(n_i, p_i), common random numbers across methods),
and each allocation is scored exactly as sum_i p_i(1-p_i)/n_i relative to uniform's with the same budget
over the same prompts (lower is better; see benchmarks/_simulation.py for the definition, including
skipped prompts).  "ours" uses the real ``dynamo_openrlhf`` allocator and ``PassRatePool``.

Writes benchmarks/out/allocation_quality.{md,json}, benchmarks/out/drifting_per_step.csv and the plot
docs/allocation_quality_drift.png (ratio per training step, drifting scenario); --quick writes
everything to benchmarks/out/quick/.  --ablations: one change at a time from the chosen defaults
(benchmarks/out/allocation_ablations.md), how the defaults were chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _simulation as sim  # noqa: E402

# table columns (method names as produced by sim.benchmark_methods) and short headers
COLUMNS = [
    ("uniform", "uniform"),
    ("reference", "reference"),
    ("reference, per-step refresh", "reference, per-step"),
    ("ours", "**ours**"),
    ("ours, skipping", "**ours, skipping**"),
    ("oracle", "oracle"),
    ("oracle, skipping", "oracle, skipping"),
    ("ours, no calibration", "ours, no calibration"),
    ("ours, no calibration, skipping", "ours, no calibration, skipping"),
    ("ours, skipping, min_rollouts 2", "ours, skipping, min_rollouts 2"),
    ("ours, skipping, no exploration", "ours, skipping, no exploration"),
]
# starvation table: the skipping methods (the 8..24 ones never give 0 rollouts)
STARVE_COLUMNS = ["ours, skipping", "ours, skipping, no exploration", "ours, no calibration, skipping",
                  "ours, skipping, min_rollouts 2", "oracle, skipping"]
DIAG = [("true-prior posterior", "true-prior posterior"),
        ("true-prior posterior, skipping", "true-prior posterior, skipping")]


def fmt(vals):
    vals = np.asarray(vals, dtype=float)
    if vals.size == 0:
        return "–"
    if vals.size == 1:
        return f"{vals[0]:.3f}"
    return f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f}"


def smooth(x, w):
    if w <= 1:
        return x
    k = np.ones(w) / w
    pad = np.concatenate([np.full(w // 2, x[0]), x, np.full(w - 1 - w // 2, x[-1])])
    return np.convolve(pad, k, mode="valid")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller pools and fewer steps (smoke run)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    ap.add_argument("--backend", choices=["native", "numpy"], default="native",
                    help="allocator + pool for 'ours' (default: the real dynamo_openrlhf extension)")
    ap.add_argument("--scenarios", default="all", help="comma-separated subset of scenarios")
    ap.add_argument("--no-proposals", action="store_true",
                    help="skip the comparison rows (no calibration, min_rollouts 2)")
    ap.add_argument("--ablations", action="store_true",
                    help="instead of the main table: one change at a time from the defaults (how they were chosen)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out, --quick: benchmarks/out/quick)")
    ap.add_argument("--plot", default=None,
                    help="plot path (default docs/allocation_quality_drift.png; --quick: inside --out)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(HERE, "out", "quick") if args.quick else os.path.join(HERE, "out")
    if args.plot is None:
        args.plot = os.path.join(args.out, "allocation_quality_drift.png") if args.quick else \
            os.path.join(ROOT, "docs", "allocation_quality_drift.png")

    backend = sim.get_backend(args.backend)
    scen = sim.scenarios(quick=args.quick)
    names = list(scen) if args.scenarios == "all" else args.scenarios.split(",")
    seeds = list(range(args.seeds))
    os.makedirs(args.out, exist_ok=True)
    if args.ablations:
        return ablations(args, backend, scen, names, seeds)

    results = {}  # scenario -> method -> [per-seed mean]
    maxstep = {}  # scenario -> method -> [per-seed worst smoothed step]
    first_epoch = {}  # cold start: ratio over the first epoch
    lost = {}
    starved = {}  # scenario -> method -> [per-seed share of prompts starved]
    curves = {}  # drifting: method -> [per-seed per-step array]
    t_all = time.time()
    for name in names:
        S = scen[name]
        results[name], maxstep[name], lost[name], starved[name] = {}, {}, {}, {}
        t0 = time.time()
        for seed in seeds:
            methods = sim.benchmark_methods(backend, S, proposals=not args.no_proposals)
            L, st = {}, {}
            r = sim.run_scenario(S, methods, seed, lost=L, starved=st)
            for m, share in st.items():
                starved[name].setdefault(m, []).append(share)
            for m, arr in r.items():
                scored = arr[S.score_from:]
                results[name].setdefault(m, []).append(float(scored.mean()))
                maxstep[name].setdefault(m, []).append(float(smooth(scored, 10).max()))
                lost[name].setdefault(m, []).append(float(L[m][S.score_from:].mean()))
                if name == "drifting":
                    curves.setdefault(m, []).append(arr)
                if name == "cold_start":
                    e1 = S.pool_size // sim.BATCH  # batches entirely inside epoch 1
                    first_epoch.setdefault(m, []).append(float(arr[:e1].mean()))
        print(f"{name:12s} pool {S.pool_size:>7,d}  steps {S.steps:>5d} (scored from {S.score_from:>4d})  "
              f"{time.time() - t0:6.1f} s", flush=True)
    elapsed = time.time() - t_all

    # ---- table ---------------------------------------------------------------------------------
    present = [(k, h) for k, h in COLUMNS if any(k in results[n] for n in names)]
    lines = []
    lines.append("| scenario | " + " | ".join(h for _, h in present) + " | reference − ours |")
    lines.append("|---|" + "---|" * len(present) + "---|")
    for n in names:
        row = [fmt(results[n].get(k, [])) for k, _ in present]
        ours, ref = np.array(results[n]["ours"]), np.array(results[n]["reference"])
        d = ref - ours
        row.append(f"{d.mean():+.3f} (worst seed {d.min():+.3f})")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    table = "\n".join(lines)

    # ---- starvation (skipping methods) -----------------------------------------------------------
    s_present = [m for m in STARVE_COLUMNS if any(m in starved[n] for n in names)]
    s_lines = ["| scenario | " + " | ".join(s_present) + " |", "|---|" + "---|" * len(s_present)]
    for n in names:
        s_lines.append(f"| {n} | " + " | ".join(
            f"{np.mean(starved[n][m]):.4f} (max {np.max(starved[n][m]):.4f})" if m in starved[n] else "–"
            for m in s_present) + " |")
    starve_table = "\n".join(s_lines)

    diag_lines = []
    for n in names:
        if any(k in results[n] for k, _ in DIAG):
            diag_lines.append(f"- {n}: " + ", ".join(
                f"{h} {fmt(results[n][k])}" for k, h in DIAG if k in results[n]))

    # ---- target checks -------------------------------------------------------------------------
    def mean(n, m):
        return float(np.mean(results[n][m])) if m in results[n] else float("nan")

    checks = []
    for n in names:
        for m in ("ours", "ours, skipping"):
            v = mean(n, m)
            checks.append((f"{n}: {m} ≤ 1.0 (never worse than uniform)", v <= 1.0, f"{v:.3f}"))
    if "mixed" in names:
        checks.append(("mixed: ours (8..24) ≤ 0.70", mean("mixed", "ours") <= 0.70, f"{mean('mixed', 'ours'):.3f}"))
        v = mean("mixed", "ours, skipping")
        checks.append(("mixed: ours, skipping (0..64) ≤ 0.50", v <= 0.50, f"{v:.3f}"))
    for n in names:
        if n == "cold_start":
            continue
        o, r = np.array(results[n]["ours"]), np.array(results[n]["reference"])
        checks.append((f"{n}: ours < reference (every seed)", bool(np.all(o < r)),
                       f"{o.mean():.4f} vs {r.mean():.4f}, margin {np.mean(r - o):.4f}"))
    if "cold_start" in names:
        o, r = np.array(results["cold_start"]["ours"]), np.array(results["cold_start"]["reference"])
        checks.append(("cold_start: ours < reference over the first two epochs (every seed)",
                       bool(np.all(o < r)), f"{o.mean():.4f} vs {r.mean():.4f}"))
        fe = np.array(first_epoch["ours"])
        checks.append(("cold_start: ours = uniform in epoch 1 (nothing known)",
                       bool(np.all(np.abs(fe - 1.0) < 2e-3)), f"{fe.mean():.4f}"))
    for n in names:
        if "ours, skipping" in starved[n]:
            worst = float(np.max(starved[n]["ours, skipping"]))
            checks.append((f"{n}: ours, skipping starves no prompt with 0.1 < p < 0.9 "
                           f"(> {sim.STARVE_VISITS} consecutive visits without a rollout), every seed",
                           worst == 0.0, f"{worst:.4f}"))
        if "ours, skipping, no exploration" in results[n]:
            cost = mean(n, "ours, skipping") - mean(n, "ours, skipping, no exploration")
            checks.append((f"{n}: exploration costs ≤ 0.02 in the skipping ratio", cost <= 0.02, f"{cost:+.4f}"))
    margins = sorted(((np.mean(np.array(results[n]["reference"]) - np.array(results[n]["ours"])), n)
                      for n in names), reverse=True)

    cfg = dict(quick=args.quick, seeds=seeds, backend=backend.name, defaults=sim.DEFAULTS,
               budget=sim.BATCH * sim.ROLLOUTS, batch=sim.BATCH,
               scenarios={n: dict(pool=scen[n].pool_size, steps=scen[n].steps, score_from=scen[n].score_from,
                                  description=scen[n].description) for n in names},
               elapsed_s=round(elapsed, 1))
    cmd = "python benchmarks/allocation_quality.py" + (" --quick" if args.quick else "") + \
        (f" --seeds {args.seeds}" if args.seeds != 3 else "") + \
        (f" --backend {args.backend}" if args.backend != "native" else "")
    md = [f"<!-- generated by `{cmd}` in {elapsed:.0f} s -->",
          f"Mean ratio to uniform (Σ p(1−p)/n, lower is better) over the scored steps; mean ± sd over "
          f"{len(seeds)} seeds; backend `{backend.name}`.", "", table, ""]
    md += [f"Starvation: share of the prompts visited with true 0.1 < p < 0.9 that got no rollout on more than "
           f"{sim.STARVE_VISITS} consecutive visits (one visit per epoch; mean over seeds, max in brackets; the 8..24 "
           f"methods never give 0 rollouts):", "", starve_table, ""]
    if diag_lines:
        md += ["Information limit (posterior under the true generating prior, not deployable):"] + diag_lines + [""]
    md += ["Targets:"] + [f"- [{'x' if ok else ' '}] {what}: {val}" for what, ok, val in checks] + [""]
    md += ["Margin of ours over the reference, largest first: " +
           ", ".join(f"{n} {m:.3f}" for m, n in margins), ""]
    md += ["Scenarios:"] + [f"- {n}: {scen[n].pool_size:,} prompts, {scen[n].steps} steps, scored from step "
                            f"{scen[n].score_from}: {scen[n].description}" for n in names]
    md_text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, "allocation_quality.md"), "w") as fh:
        fh.write(md_text)
    with open(os.path.join(args.out, "allocation_quality.json"), "w") as fh:
        json.dump(dict(config=cfg, mean_ratio=results, worst_smoothed_step=maxstep, lost_signal=lost,
                       starved=starved, starve_visits=sim.STARVE_VISITS,
                       cold_start_first_epoch=first_epoch,
                       checks=[dict(target=w, met=bool(o), value=v) for w, o, v in checks]), fh, indent=1)
    print()
    print(md_text)

    # ---- plot + csv for the drifting scenario ----------------------------------------------------
    if curves:
        order = [k for k, _ in COLUMNS if k in curves]
        mean_curves = {k: np.mean(curves[k], axis=0) for k in order}
        steps = len(next(iter(mean_curves.values())))
        with open(os.path.join(args.out, "drifting_per_step.csv"), "w") as fh:
            fh.write("step," + ",".join(f'"{k}"' for k in order) + "\n")
            for t in range(steps):
                fh.write(f"{t}," + ",".join(f"{mean_curves[k][t]:.5f}" for k in order) + "\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
            return 0
        style = {
            "uniform": ("0.5", "-", 1.0), "reference": ("tab:red", "-", 1.6),
            "reference, per-step refresh": ("tab:orange", ":", 1.6), "ours": ("tab:blue", "-", 2.0),
            "ours, skipping": ("tab:blue", "--", 2.0), "oracle": ("k", "-", 1.0),
            "oracle, skipping": ("k", "--", 1.0), "ours, no calibration": ("tab:green", "-", 1.2),
            "ours, no calibration, skipping": ("tab:green", "--", 1.2),
            "ours, skipping, min_rollouts 2": ("tab:purple", ":", 1.2),
        }
        fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
        S = scen["drifting"]
        x = np.arange(steps)
        for k in order:
            c, ls, lw = style.get(k, ("0.3", "-", 1.0))
            ax.plot(x, smooth(mean_curves[k], 9), color=c, ls=ls, lw=lw, label=k)
        ep = -(-S.pool_size // sim.BATCH)
        for e in range(ep, steps, ep):
            ax.axvline(e, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel(f"training step (512 prompts, 16·512 rollouts; epoch = {ep} steps, grey lines)")
        ax.set_ylabel("Σ p(1−p)/n relative to uniform (lower is better)")
        ax.set_title(f"Drifting pass rates, {S.pool_size:,}-prompt pool: ratio per step "
                     f"(mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, 9-step moving average)")
        ax.set_ylim(0.5, 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=3, loc="upper right")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot)
        fig.savefig(os.path.join(args.out, "allocation_quality_drift.png"))
        print(f"plot: {os.path.relpath(args.plot, ROOT)}")
    return 0


def ablations(args, backend, scen, names, seeds):
    res = {}
    t_all = time.time()
    for name in names:
        S = scen[name]
        t0 = time.time()
        for seed in seeds:
            r = sim.run_scenario(S, sim.ablation_methods(backend), seed)
            for m, arr in r.items():
                res.setdefault(m, {}).setdefault(name, []).append(float(arr[S.score_from:].mean()))
        print(f"{name:12s} {time.time() - t0:6.1f} s", flush=True)
    cmd = "python benchmarks/allocation_quality.py --ablations" + (" --quick" if args.quick else "") + \
        (f" --seeds {args.seeds}" if args.seeds != 3 else "")
    lines = [f"<!-- generated by `{cmd}` in {time.time() - t_all:.0f} s; backend {backend.name} -->",
             f"Mean ratio to uniform over the scored steps (mean over {len(seeds)} seed(s)); one change at a "
             "time from the defaults.", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m, row in res.items():
        lines.append(f"| {m} | " + " | ".join(f"{np.mean(row[n]):.4f}" for n in names) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "allocation_ablations.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "allocation_ablations.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
