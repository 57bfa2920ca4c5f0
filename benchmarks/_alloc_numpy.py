"""The benchmarks' one module of NumPy allocation solvers (written for this project): the baselines of
benchmarks/bench_allocator.py and the numpy backend of benchmarks/_simulation.py.

- ``reference_numpy``: the DynaMO reference code's allocation procedure, from its description
  (priorities max(P, floor), n proportional to priority, iterative water-filling for the
  bounds, largest-remainder rounding), vectorised.
- ``neyman_numpy``: a plain NumPy exact solver of min sum v/n (sum n = B, lo <= n <= hi):
  bisection on the Lagrange multiplier (in t = 1/sqrt(lambda)), then an integer fix-up on the
  marginal gains v/(n(n+1)) with the same tie rule as the Rust solver.
"""

import numpy as np


def reference_numpy(priority, budget, lo, hi, floor=0.01):
    w = np.maximum(np.asarray(priority, dtype=np.float64), floor)
    if w.sum() <= 0:  # no priority anywhere: an even split
        w = np.ones_like(w)
    n = len(w)
    x = np.zeros(n)
    free = np.ones(n, dtype=bool)
    remaining = float(budget)
    while free.any():
        share = remaining * w[free] / w[free].sum()
        excess = np.maximum(share - hi, 0.0).sum()
        deficit = np.maximum(lo - share, 0.0).sum()
        if excess == 0.0 and deficit == 0.0:
            x[free] = share
            break
        # Pin the violators of the side that dominates (those sit at that bound in the final
        # split), share the rest again.
        idx = np.flatnonzero(free)
        pin = share > hi if excess >= deficit else share < lo
        x[idx[pin]] = hi if excess >= deficit else lo
        free[idx[pin]] = False
        remaining = budget - x[~free].sum()
    counts = np.clip(np.floor(x), lo, hi).astype(np.int64)
    missing = int(budget - counts.sum())
    frac = x - counts
    if missing > 0:  # largest remainders first, ties: lower index
        order = np.argsort(-frac, kind="stable")
        order = order[counts[order] < hi]
        counts[order[:missing]] += 1
    elif missing < 0:  # float noise: take back from the smallest remainders
        order = np.argsort(frac, kind="stable")
        order = order[counts[order] > lo]
        counts[order[:-missing]] -= 1
    return counts


def _gains(v, level):
    with np.errstate(divide="ignore", invalid="ignore"):
        g = v / (level.astype(np.float64) * (level + 1).astype(np.float64))
    return np.where(v == 0, 0.0, g)


def neyman_numpy(v, budget, lo, hi):
    v = np.asarray(v, dtype=np.float64)
    n = len(v)
    positive = v > 0
    if lo == 0 and budget < positive.sum():
        idx = np.flatnonzero(positive)
        order = np.lexsort((idx, -v[idx]))[:budget]
        out = np.zeros(n, dtype=np.int64)
        out[idx[order]] = 1
        return out
    lower = np.where(positive, max(lo, 1), lo).astype(np.int64)
    units = budget - int(lower.sum())
    pos = np.flatnonzero(positive)
    vp = v[pos]
    lp = lower[pos]
    capacity = int((hi - lp).sum())
    out = lower.copy()
    sigma = np.sqrt(vp)

    def count(t):  # units with gain above lambda = 1/t^2, per prompt
        x = sigma * t
        c = np.ceil(np.sqrt(x * x + 0.25) - 0.5)
        return np.clip(c, lp, hi) - lp

    # Bisection on t = 1/sqrt(lambda) for the largest count not above the budget.
    t_low, t_high = 0.0, (hi + 1.0) / sigma.min() if len(sigma) else 1.0
    for _ in range(100):
        mid = 0.5 * (t_low + t_high)
        if count(mid).sum() <= units:
            t_low = mid
        else:
            t_high = mid
        if t_high - t_low <= 1e-13 * t_high:
            break
    if units >= capacity:
        # Every positive-gain unit is taken; zero-gain units go level by level, low index first.
        out[pos] = hi
        zeros = np.flatnonzero(~positive)
        rest = units - capacity
        if len(zeros):
            out[zeros] += rest // len(zeros)
            out[zeros[: rest % len(zeros)]] += 1
        return out
    base = count(t_low).astype(np.int64)
    more = count(t_high).astype(np.int64)
    # Candidate units between the two thresholds, best first (gain desc, level asc, index asc).
    which = np.flatnonzero(more > base)
    reps = (more - base)[which]
    idx = np.repeat(which, reps)
    level = np.repeat(lp[which] + base[which], reps) + (
        np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    )
    g = _gains(vp[idx], level)
    missing = units - int(base.sum())
    take = np.lexsort((pos[idx], level, -g))[:missing]
    counts = lp + base
    np.add.at(counts, idx[take], 1)
    out[pos] = counts
    return out
