#!/usr/bin/env python3
"""How wide may the allocator's bounds be before it loses to uniform? Scored on a finished
``gradient_variance.py`` run, with no new sampling.

    python benchmarks/bounds_sensitivity.py benchmarks/out/gradient_variance.json

For each batch of that run: the pool posterior the trainer would have (the run's fitted prior plus each
prompt's 8 pool rollouts), today's allocation ``allocate_rollouts(E[p(1-p)], B, lo, hi, estimator="rloo")``
for several bounds around n = B/N, and its variance as a ratio to uniform's on the batch's measured
per-prompt variance curves (``_noise_model.rloo_prompt_variance``: exact in n given each prompt's measured
class statistics; the steadier of the run's two measurements, see docs/noise_model.md). Mean over batches
with a bootstrap CI over batches. The bounds are chosen on the same batches they are scored on: an
in-sample comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _noise_model import mean_ci, rloo_prompt_variance  # noqa: E402

from dynamo_openrlhf import allocate_rollouts  # noqa: E402


def curve_variance(rows: Sequence[Dict], counts: Sequence[int]) -> float:
    """Σ_i V_i(n_i) over a batch's prompts (the common 1/N² factor left out)."""
    return float(sum(rloo_prompt_variance(int(n), r["bank_p"], r["var_succ"], r["var_fail"], r["mean_gap2"])
                     for r, n in zip(rows, counts)))


def pool_variances(batch: Dict) -> np.ndarray:
    """Posterior E[p(1-p)] of each prompt: Beta(α0 + k, β0 + m - k) after k of m pool rollouts."""
    a0, b0 = batch["pool_prior_fitted"]
    m = int(batch["pool_samples"]) if "pool_samples" in batch else 8
    k = np.array([r["pool_successes"] for r in batch["prompt_rows"]], dtype=np.float64)
    a, b = a0 + k, b0 + m - k
    return a * b / ((a + b) * (a + b + 1.0))


def bounds_table(result: Dict, spreads: Sequence[Tuple[int, int]]) -> List[Dict]:
    rows_out = []
    for lo_off, hi_off in spreads:
        ratios = []
        for batch in result["batches"]:
            rows = batch["prompt_rows"]
            n_prompts, budget = len(rows), int(batch["budget"])
            n = budget // n_prompts
            lo, hi = max(2, n - lo_off), n + hi_off
            counts = allocate_rollouts(pool_variances(batch), budget, lo, hi, estimator="rloo")
            ratios.append(curve_variance(rows, counts) / curve_variance(rows, [n] * n_prompts))
        mean, ci = mean_ci(np.asarray(ratios))
        rows_out.append({"lo_offset": lo_off, "hi_offset": hi_off, "ratios": ratios, "mean": mean, "ci": list(ci)})
    return rows_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_json", help="gradient_variance.py's JSON output")
    a = p.parse_args(argv)
    with open(a.run_json, encoding="utf-8") as f:
        result = json.load(f)
    n = int(result["batches"][0]["budget"]) // len(result["batches"][0]["prompt_rows"])
    spreads = [(n - 2, n), (n - 3, n - 3), (n // 2, n // 2), (3 * n // 8, 3 * n // 8), (n // 4, n // 4), (1, 1)]
    print(f"| bounds (n = {n}) | curve ratio vs uniform, mean [95% CI over batches] | per batch |")
    print("|---|---|---|")
    for r in bounds_table(result, spreads):
        lo, hi = max(2, n - r["lo_offset"]), n + r["hi_offset"]
        print(f"| {lo}..{hi} | {r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
              + " ".join(f"{x:.2f}" for x in r["ratios"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
