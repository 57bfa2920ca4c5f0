"""Benchmark of the sequence-level core (not a test).

    python benchmarks/bench_allocator.py           # the full table (N up to 10,485,760; ~2 GB RAM)
    python benchmarks/bench_allocator.py --quick   # smoke run (N up to 262,144, 1M-prompt pool)
    python benchmarks/bench_allocator.py --scale-only   # only the noise-scale table (N = 1,048,576)

Allocation rows, all on the same inputs: budget 16·N, bounds 8..24, variances from the reference
measurement's pool recipe (docs/reference_notes.md: 30% p=0, 20% p=1, the rest p ~ Beta(0.7, 0.7)); every method is given
the unbiased 16-rollout estimate P = k(16−k)/(16·15) (what a trainer sees), and the quality
columns score Σ v/n with the TRUE v = p(1−p), as a ratio to the uniform split.

  (a) ours: dynamo_openrlhf.allocate_rollouts (Rust, exact, rule "neyman")
  (b) the reference code's procedure (n ∝ max(P, 0.01), water-filling, largest remainder) in NumPy
  (c) a plain NumPy exact solver (bisection on the Lagrange multiplier, integer fix-up)
  mem: one memory pass over the input: v.sum() plus writing an int64 array of length N.

With bounds 8..24 this recipe saturates: about 55% of the estimates are 0, so every prompt
with P > 0 ends at hi and the exact problem reduces to a capacity check. A second table
(bounds 0..64, skipping allowed, same inputs) exercises the threshold search of (a) and (c).
There, exact solvers skip prompts whose estimate is 0, so Σ v/n with the TRUE v is infinite
(p in (0, 1) but 0 or 16 successes seen); that table scores the estimated objective instead.

Times are medians over repeats (wall clock). Pool rows use a pool of 10,485,760 prompts
(1,048,576 with --quick).

Estimator table (N = 1,048,576; 262,144 with --quick), in the same run: allocate_rollouts with
bounds 8..24 on the same estimates for estimator None (today's Σ v/n) and each Σ v/(n−1)
estimator (these saturate like the first table), the same with bounds 2..64, and
PassRatePool.allocate over N ids of an N-prompt pool (two steps of 8 trials of evidence each, so
every posterior variance is positive and nothing saturates) for None, "rloo" and
"group_norm" (plain and calibrated), plus the 512-prompt batch. The ratio column divides by
the estimator-None row of the same kind.

Noise-scale table (N = 1,048,576 in every mode), in the same run: allocate_rollouts with a
per-prompt scale s (log-uniform over 0.02..7, the measured spread) against the same call without
it, for each bounds/estimator pair above; the calls alternate (no scale, scale) so that both see
the same machine load, and the ratio is the median of the per-pair ratios. Then PassRatePool.allocate with
noise_scale=True (the pool's own noise_scale(ids), computed in the call) against the plain call,
over N ids of an N-prompt pool with noise statistics.
"""

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _alloc_numpy import neyman_numpy, reference_numpy  # noqa: E402

from dynamo_openrlhf import ESTIMATORS, PassRatePool, allocate_rollouts  # noqa: E402

LO, HI, PER_PROMPT = 8, 24, 16


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def pool_recipe(n, rng):
    u = rng.random(n)
    p = rng.beta(0.7, 0.7, n)
    p[u < 0.3] = 0.0
    p[(u >= 0.3) & (u < 0.5)] = 1.0
    k = rng.binomial(16, p)
    return k * (16 - k) / (16 * 15), p * (1 - p)


def quality(truth, counts):
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(truth > 0, truth / counts, 0.0).sum()
    return score / (truth / PER_PROMPT).sum()


def memory_pass(v):
    v.sum()
    out = np.empty(len(v), dtype=np.int64)
    out.fill(PER_PROMPT)
    return out


def repeats_for(n):
    return 51 if n <= 32_768 else 15 if n <= 262_144 else 7 if n <= 1_048_576 else 3


def allocation_table(sizes, rng, lo, hi, with_reference=True, score_estimate=False):
    rows = []
    for n, (estimate, truth) in zip(sizes, inputs_for(sizes, rng)):
        budget = PER_PROMPT * n
        reps = repeats_for(n)
        slow_reps = max(1, reps // 3) if n > 1_048_576 else reps
        ours = allocate_rollouts(estimate, budget, lo, hi)
        exact = neyman_numpy(estimate, budget, lo, hi)
        ref = reference_numpy(estimate, budget, lo, hi) if with_reference else None
        for name, counts in [("ours", ours), ("reference", ref), ("numpy exact", exact)]:
            if counts is not None:
                assert counts.sum() == budget and counts.min() >= lo and counts.max() <= hi, name
        # (a) and (c) are both exact: the same objective on the estimate they were given.
        est_a, est_c = objective(estimate, ours), objective(estimate, exact)
        assert abs(est_a - est_c) <= 1e-9 * est_c, (est_a, est_c)
        if with_reference:  # the reference rule is not better on the objective it is given
            assert objective(estimate, ref) >= est_a * (1 - 1e-12)
        t_a = median_time(lambda: allocate_rollouts(estimate, budget, lo, hi), reps)
        t_b = (median_time(lambda: reference_numpy(estimate, budget, lo, hi), slow_reps)
               if with_reference else float("nan"))
        t_c = median_time(lambda: neyman_numpy(estimate, budget, lo, hi), slow_reps)
        t_m = median_time(lambda: memory_pass(estimate), reps)
        scored = estimate if score_estimate else truth
        rows.append((n, t_a, t_b, t_c, t_m, quality(scored, ours),
                     quality(scored, ref) if with_reference else float("nan"),
                     quality(scored, exact)))
        print(f"  bounds {lo}..{hi}, N={n:>10,}: done", file=sys.stderr, flush=True)
    return rows


_INPUTS = {}


def inputs_for(sizes, rng):
    """The same inputs for every table of one run."""
    for n in sizes:
        if n not in _INPUTS:
            _INPUTS[n] = pool_recipe(n, rng)
        yield _INPUTS[n]


def objective(v, counts):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, v / counts, 0.0).sum()


def print_table(rows, with_reference=True, scored="true v"):
    ref_head = "(b) reference, numpy ms | " if with_reference else ""
    ref_q = " (b) |" if with_reference else ""
    print(f"| N | (a) ours ms | {ref_head}(c) exact, numpy ms | mem pass ms "
          f"| (c)/(a) | (a)/mem | Σv/n ÷ uniform, {scored} (a) |{ref_q} (c) |")
    print("|---:" * (10 if with_reference else 8) + "|")
    for n, t_a, t_b, t_c, t_m, q_a, q_b, q_c in rows:
        ref_t = f" {t_b * 1e3:.2f} |" if with_reference else ""
        ref_v = f" {q_b:.4f} |" if with_reference else ""
        print(f"| {n:,} | {t_a * 1e3:.3f} |{ref_t} {t_c * 1e3:.2f} | {t_m * 1e3:.3f} "
              f"| {t_c / t_a:.1f}× | {t_a / t_m:.1f}× | {q_a:.4f} |{ref_v} {q_c:.4f} |")


def pool_table(pool_size, rng):
    pool = PassRatePool(prior=(1.0, 1.0), forget=0.99, capacity=pool_size)
    ids_all = np.arange(pool_size, dtype=np.int64)
    start = time.perf_counter()
    for chunk in np.array_split(ids_all, max(1, pool_size // 1_048_576)):
        trials = np.full(len(chunk), 16)
        pool.update(chunk, rng.binomial(16, rng.random(len(chunk))), trials)
    build = time.perf_counter() - start

    batches = [rng.choice(pool_size, 512, replace=False) for _ in range(64)]
    per_result = [(np.repeat(b, 16), rng.integers(0, 2, 8192), np.ones(8192, np.int64))
                  for b in batches]
    per_prompt = [(b, rng.integers(0, 17, 512), np.full(512, 16)) for b in batches]

    def cycle(items):
        state = {"i": 0}

        def step():
            args = items[state["i"] % len(items)]
            state["i"] += 1
            pool.update(*args)
        return step

    def alloc_cycle():
        state = {"i": 0}

        def step():
            pool.allocate(batches[state["i"] % len(batches)], 8192, LO, HI)
            state["i"] += 1
        return step

    t_rows = median_time(cycle(per_result), 201)
    t_agg = median_time(cycle(per_prompt), 201)
    t_alloc = median_time(alloc_cycle(), 201)
    stats = pool.stats()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pool.bin")
        t_save = median_time(lambda: pool.save(path), 3)
        t_load = median_time(lambda: PassRatePool.load(path), 3)
        size = os.path.getsize(path)
    return {
        "pool_size": pool_size,
        "build": build,
        "update_rows": t_rows,
        "update_agg": t_agg,
        "allocate": t_alloc,
        "save": t_save,
        "load": t_load,
        "file_mb": size / 2**20,
        "bytes_per_prompt": stats["bytes_per_prompt"],
    }


def paired_medians(fa, fb, repeats):
    """fa and fb timed alternately (a, b, a, b, ...), so both see the same machine load: their
    medians and the median of the per-pair ratios b/a (robust to load that drifts)."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratio = float(np.median(np.array(tb) / np.array(ta)))
    return float(np.median(ta)), float(np.median(tb)), ratio


def scale_table(n, rng, repeats):
    """allocate_rollouts with scale= vs without, and PassRatePool.allocate(noise_scale=True) vs
    plain, at N prompts; (label, median without, median with, median of paired ratios) rows."""
    estimate, _ = next(inputs_for([n], rng))
    s = 0.02 * 350.0 ** rng.random(n)
    budget = PER_PROMPT * n
    rows = []
    for lo, hi, e in [(LO, HI, None), (LO, HI, "rloo"), (2, 64, None), (2, 64, "rloo"), (0, 64, None)]:
        got = allocate_rollouts(estimate, budget, lo, hi, estimator=e, scale=s)
        assert np.array_equal(got, allocate_rollouts(estimate * s, budget, lo, hi, estimator=e))
        times = paired_medians(
            lambda: allocate_rollouts(estimate, budget, lo, hi, estimator=e),
            lambda: allocate_rollouts(estimate, budget, lo, hi, estimator=e, scale=s), repeats)
        rows.append((f"allocate_rollouts, bounds {lo}..{hi}, estimator {e}", *times))
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0, capacity=n)
    ids = np.arange(n, dtype=np.int64)
    p = rng.beta(0.7, 0.7, n)
    for _ in range(2):
        k = rng.binomial(8, p)
        pool.update(ids, k, np.full(n, 8), noise_success=k * rng.uniform(0.2, 1.0, n),
                    noise_failure=(8 - k) * rng.uniform(1.0, 5.0, n))
    for e in (None, "rloo"):
        times = paired_medians(
            lambda: pool.allocate(ids, budget, LO, HI, estimator=e),
            lambda: pool.allocate(ids, budget, LO, HI, estimator=e, noise_scale=True), repeats)
        rows.append((f"pool.allocate, {n:,} ids, bounds {LO}..{HI}, estimator {e}, noise_scale=True",
                     *times))
    return rows


def print_scale_table(n, rows):
    print(f"\nNoise scale, N = {n:,}, budget 16·N (same run; calls alternate):\n")
    print("| call | no scale, median ms | with scale, median ms | with ÷ without (median of pairs) |")
    print("|---|---:|---:|---:|")
    for label, t_plain, t_scaled, ratio in rows:
        print(f"| {label} | {t_plain * 1e3:.2f} | {t_scaled * 1e3:.2f} | {ratio:.2f}× |")


def estimator_table(n, rng):
    """Times per estimator at N prompts; ratios against estimator None of the same kind."""
    estimate, _ = next(inputs_for([n], rng))
    budget = PER_PROMPT * n
    reps = repeats_for(n)
    rows = []
    base = median_time(lambda: allocate_rollouts(estimate, budget, LO, HI), reps)
    rows.append(("allocate_rollouts", "None", base, base))
    for e in ESTIMATORS:
        if e == "group_norm":  # needs posteriors: refused by allocate_rollouts
            continue
        got = allocate_rollouts(estimate, budget, LO, HI, estimator=e)
        assert got.sum() == budget and got.min() >= LO and got.max() <= HI
        t = median_time(lambda: allocate_rollouts(estimate, budget, LO, HI, estimator=e), reps)
        rows.append(("allocate_rollouts", e, t, base))
    # Bounds 8..24 saturate on this recipe (a capacity check); 2..64 exercises the search.
    base = median_time(lambda: allocate_rollouts(estimate, budget, 2, 64), reps)
    rows.append(("allocate_rollouts, bounds 2..64", "None", base, base))
    for e in ("rloo",):
        t = median_time(lambda: allocate_rollouts(estimate, budget, 2, 64, estimator=e), reps)
        rows.append(("allocate_rollouts, bounds 2..64", e, t, base))
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0, capacity=n)
    ids = np.arange(n, dtype=np.int64)
    p = rng.beta(0.7, 0.7, n)
    for _ in range(2):  # two steps, so the revisit calibration has data
        pool.update(ids, rng.binomial(8, p), np.full(n, 8))
    batch = rng.choice(n, 512, replace=False)
    for label, prompts, b in [(f"pool.allocate, {n:,} ids", ids, budget),
                              ("pool.allocate, 512-id batch", batch, 8192)]:
        r = reps if len(prompts) == n else 201
        cases = [("None", {}), ("rloo", {"estimator": "rloo"}),
                 ("group_norm", {"estimator": "group_norm"}),
                 ("None, calibrated", {"calibrated": True}),
                 ("group_norm, calibrated", {"estimator": "group_norm", "calibrated": True})]
        base = None
        for name, options in cases:
            got = pool.allocate(prompts, b, LO, HI, **options)
            assert got.sum() == b and got.min() >= LO and got.max() <= HI
            t = median_time(lambda: pool.allocate(prompts, b, LO, HI, **options), r)
            base = t if base is None else base
            rows.append((label, name, t, base))
    return rows


def priced_table(rng, quick=False):
    """Priced skipping (the exact DP of ``skip_price``) at trainer batch sizes: 2x candidates, budget n x prompts,
    bounds 0..4n, min_rollouts 2; ratio against the same call without skip prices (the ranking rule) on the same
    batch. The DP's work is candidates x budget x (hi - 1)."""
    cases = [(256, 8), (1024, 8)] if quick else [(256, 8), (1024, 8), (1024, 16), (4096, 8)]
    rows = []
    for candidates, n in cases:
        pool = PassRatePool(prior=(1.0, 1.0), forget=1.0, capacity=candidates)
        ids = np.arange(candidates, dtype=np.int64)
        p = rng.beta(0.5, 0.5, candidates)
        pool.update(ids, rng.binomial(2 * n, p), np.full(candidates, 2 * n))
        budget, hi = n * candidates // 2, 4 * n
        got = pool.allocate(ids, budget, 0, hi, estimator="rloo", min_rollouts=2, skip_price=4.0)
        assert got.sum() == budget and got.max() <= hi and not np.any(got == 1)
        reps = 5 if candidates * budget * hi > 1e8 else 21
        base = median_time(lambda: pool.allocate(ids, budget, 0, hi, estimator="rloo", min_rollouts=2), reps)
        t = median_time(lambda: pool.allocate(ids, budget, 0, hi, estimator="rloo", min_rollouts=2,
                                              skip_price=4.0), reps)
        rows.append((candidates, budget, hi, int((got == 0).sum()), t, base))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    parser.add_argument("--scale-only", action="store_true", help="only the noise-scale table")
    parser.add_argument("--priced-only", action="store_true", help="only the priced-skipping table")
    args = parser.parse_args()
    sizes = [512, 4_096, 32_768, 262_144]
    if not args.quick:
        sizes += [1_048_576, 10_485_760]
    pool_size = 1_048_576 if args.quick else 10_485_760
    rng = np.random.default_rng(2026)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} at start; numpy {np.__version__}; "
          f"python {platform.python_version()}\n")

    priced = priced_table(rng, args.quick)
    print("Priced skipping (skip_price=4, exact DP) vs the same call without prices, 2x candidates, budget n x "
          "prompts, bounds 0..4n, min_rollouts 2 (same run):\n")
    print("| candidates | budget | hi | skipped | median ms | ÷ without prices |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c, b, hi, skipped, t, base in priced:
        print(f"| {c:,} | {b:,} | {hi} | {skipped} | {t * 1e3:.2f} | {t / base:.1f}× |")
    print()
    if args.priced_only:
        return

    n_scale = 1_048_576
    if args.scale_only:
        print_scale_table(n_scale, scale_table(n_scale, rng, 31))
        return

    rows = allocation_table(sizes, rng, LO, HI)
    print(f"Allocation, budget 16·N, bounds {LO}..{HI} (the issue's table):\n")
    print_table(rows)
    skipping = allocation_table(sizes, rng, 0, 64, score_estimate=True)
    print("\nSame inputs, bounds 0..64 (skipping allowed; exercises the threshold search):\n")
    print_table(skipping, scored="estimated v")

    n_est = 262_144 if args.quick else 1_048_576
    est_rows = estimator_table(n_est, rng)
    print(f"\nEstimators, N = {n_est:,}, budget 16·N, bounds {LO}..{HI} (same run):\n")
    print("| call | estimator | median ms | ÷ estimator None |")
    print("|---|---|---:|---:|")
    for call, name, t, base in est_rows:
        print(f"| {call} | {name} | {t * 1e3:.3f} | {t / base:.2f}× |")

    print_scale_table(n_scale, scale_table(n_scale, rng, 11 if args.quick else 31))

    p = pool_table(pool_size, rng)
    print(f"\nPassRatePool with {p['pool_size']:,} prompts (built in {p['build']:.2f} s by "
          f"{max(1, p['pool_size'] // 1_048_576)} updates):\n")
    print("| operation | median |")
    print("|---|---:|")
    print(f"| pool.update, 8,192 results (512 ids × 16 rollouts, one row per result) "
          f"| {p['update_rows'] * 1e3:.3f} ms |")
    print(f"| pool.update, 512 rows of 16 trials | {p['update_agg'] * 1e3:.3f} ms |")
    print(f"| pool.allocate, 512-prompt batch, budget 8,192, 8..24 | {p['allocate'] * 1e3:.3f} ms |")
    print(f"| one training step: update (8,192 results) + allocate "
          f"| {(p['update_rows'] + p['allocate']) * 1e3:.3f} ms |")
    print(f"| pool.save ({p['file_mb']:.0f} MiB, atomic, fsync) | {p['save'] * 1e3:.0f} ms |")
    print(f"| PassRatePool.load | {p['load'] * 1e3:.0f} ms |")
    print(f"| memory | {p['bytes_per_prompt']:.1f} bytes/prompt |")


if __name__ == "__main__":
    main()
