#!/usr/bin/env python3
"""Sensitivity of the noise-model allocations to the shrinkage constant, on a finished gradient_variance run.

    python benchmarks/noise_model_sensitivity.py benchmarks/out/gradient_variance.json

Re-draws each batch's oracle and pool samples (deterministic: the same seeds as ``gradient_variance.run_batch``),
recomputes their proxies, and scores allocations for other ``kappa`` values / proxies with the per-prompt
decomposition only (the *curve* ratio Σ_i V_i(n_i) / Σ_i V_i(8), V_i from the run's per-prompt class statistics),
since the repeat-based measurement needs the banks. Prints a markdown table (mean over batches, 95% bootstrap CI).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _noise_model as nm  # noqa: E402
import gradient_variance as gv  # noqa: E402


def curve_ratio(rows, n) -> float:
    """Σ_i V_i(n_i) / Σ_i V_i(n_u) from the per-prompt curve parameters saved by the run."""
    num = den = 0.0
    for r, ni in zip(rows, n):
        prm = {"p": r["bank_p"], "var_succ": r["var_succ"], "var_fail": r["var_fail"], "mean_gap2": r["mean_gap2"]}
        num += nm.rloo_prompt_variance(int(ni), **prm)
        den += nm.rloo_prompt_variance(gv.UNIFORM_N, **prm)
    return num / den


def main(argv=None) -> int:
    import torch

    from dynamo_openrlhf import PassRatePool
    from dynamo_openrlhf.prompt_ids import prompt_ids
    from dynamo_openrlhf.tiny import prepare_tiny_assets, read_jsonl

    argv = sys.argv[1:] if argv is None else argv
    res = json.load(open(argv[0]))
    kappas = [float(x) for x in (argv[1] if len(argv) > 1 else "0.5,2,8,32").split(",")]
    proxies = (argv[2] if len(argv) > 2 else "ghost_diag,pisq,nll,score").split(",")
    s = res["setup"]
    torch.set_num_threads(1)
    assets = prepare_tiny_assets(config=gv.parse_tiny_config(s.get("tiny_config", "")), log=lambda m: None)
    policy = gv.Policy(str(assets.model_dir))
    policy.per_sample_scores = nm.PerSampleScores(policy.model)
    scorer = gv.CachedScorer()
    rows_all = read_jsonl(assets.train_file)
    out = {}
    try:
        for b, bt in enumerate(res["batches"]):
            seed0 = s["seed"] * 1_000_003 + 100_000 * b
            rng = np.random.default_rng(seed0)
            N = bt["prompts"]
            batch = [rows_all[i] for i in np.sort(rng.choice(len(rows_all), size=N, replace=False))]
            assert [r["prompt"] for r in batch] == [r["prompt"] for r in bt["prompt_rows"]], "batch draw differs"
            enc = [policy.encode(r["prompt"]) for r in batch]
            labels = [str(r["answer"]) for r in batch]
            ids = prompt_ids([r["prompt"] for r in batch], labels)
            B = gv.UNIFORM_N * N
            o_resp, o_own, o_rew = gv.sample_scored(policy, scorer, enc, labels, [s["oracle_samples"]] * N, seed0 + 1)
            o_prox, _ = gv.per_sample(policy, enc, o_resp, o_own, keep_scores=False)
            q_resp, q_own, q_rew = gv.sample_scored(policy, scorer, enc, labels, [s["pool_samples"]] * N, seed0 + 2)
            q_prox, _ = gv.per_sample(policy, enc, q_resp, q_own, keep_scores=False)
            k_or = np.bincount(o_own, weights=o_rew, minlength=N)
            assert k_or.round().astype(int).tolist() == [r["oracle_successes"] for r in bt["prompt_rows"]]
            p_or = k_or / s["oracle_samples"]
            pool = PassRatePool(prior=(1.0, 1.0))
            pool.update(ids, np.bincount(q_own, weights=q_rew, minlength=N).round().astype(np.int64),
                        np.full(N, s["pool_samples"]))
            try:
                pool.fit_prior()
            except ValueError:
                pass
            p_pool = np.asarray(pool.mean(ids), dtype=np.float64)
            v_pool = np.asarray(pool.expected_variance(ids), dtype=np.float64)
            rows = bt["prompt_rows"]
            for q in proxies:
                for prior in ("flat", "loglog"):
                    for k in kappas:
                        for which, prox, rew, own, p, v in (
                                ("oracle", o_prox, o_rew, o_own, p_or, p_or * (1 - p_or)),
                                ("ours", q_prox, q_rew, q_own, p_pool, v_pool)):
                            sc = nm.noise_scale(prox[q], rew, own, p, kappa=k, prior=prior)
                            n = nm.scaled_allocation(sc, v, B, *gv.BOUNDS)
                            out.setdefault(f"{which}[{q}], {prior} prior, kappa {k:g}", []).append(
                                curve_ratio(rows, n))
                    for which, prox, rew, own, p, v in (("oracle", o_prox, o_rew, o_own, p_or, p_or * (1 - p_or)),
                                                        ("ours", q_prox, q_rew, q_own, p_pool, v_pool)):
                        sc = nm.noise_scale(prox[q], rew, own, p, prior=prior, per_prompt=False)
                        n = nm.scaled_allocation(sc, v, B, *gv.BOUNDS)
                        out.setdefault(f"{which}[{q}], {prior} curve only", []).append(curve_ratio(rows, n))
            for which, p, v in (("oracle", p_or, p_or * (1 - p_or)), ("ours", p_pool, v_pool)):
                out.setdefault(f"{which}[pq]", []).append(curve_ratio(rows, nm.scaled_allocation(np.ones(N), v, B,
                                                                                                   *gv.BOUNDS)))
            print(f"batch {b} done", flush=True)
    finally:
        scorer.close()
    print("| allocation | curve ratio, mean [95% CI over batches] | per batch |\n|---|---|---|")
    for name, vals in out.items():
        m, ci = nm.mean_ci(vals)
        print(f"| {name} | {m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {' '.join(f'{x:.2f}' for x in vals)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
