"""The success rule and pass@k: the package's ground-floor metrics (NumPy only, nothing from the package).

One definition used everywhere: the pass-rate pool's outcomes (``samples_generator``), the in-training
evaluation's ``eval_*`` logs (``ppo_trainer``, :func:`train_eval_logs`) and the evaluation CLI
(``python -m dynamo_openrlhf.evaluate``, which only generates, scores and prints).

* :func:`is_success`: a sample succeeds when its value (score, else reward) is > the threshold.
* :func:`pass_at_k`: with ``c`` correct out of ``n`` samples, the unbiased ``1 - C(n-c, k) / C(n, k)``;
  :func:`summarize` averages it over prompts with a seeded bootstrap CI over prompts
  (:func:`bootstrap_ci`), plus the fractions of prompts solved never, sometimes, always.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["is_success", "pass_at_k", "pass_at_k_array", "bootstrap_ci", "summarize", "train_eval_logs",
           "default_ks"]


def _check(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1 (got n={n})")
    if k < 1:
        raise ValueError(f"k must be >= 1 (got k={k})")
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples per prompt (got k={k} > n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n] (got c={c}, n={n})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one prompt: ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples were drawn, ``c`` of them correct; the result is the probability that a random
    subset of ``k`` of the ``n`` samples contains at least one correct one. Computed stably in
    product form, ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no large binomials). Raises ``ValueError``
    when ``k > n``, ``k < 1``, ``n < 1`` or ``c`` is outside ``[0, n]``.
    """
    n, c, k = int(n), int(c), int(k)
    _check(n, c, k)
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_array(n, c, k: int) -> np.ndarray:
    """Vectorised :func:`pass_at_k` over prompts: ``n`` (scalar or array) and ``c`` (array), one ``k``."""
    c = np.asarray(c, dtype=np.int64)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), c.shape)
    return np.array([pass_at_k(int(ni), int(ci), k) for ni, ci in zip(n.ravel(), c.ravel())],
                    dtype=np.float64).reshape(c.shape)


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean of ``values`` (resampling prompts, seeded)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or resamples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha)))


def summarize(successes: Sequence[int], n: int, ks: Sequence[int], tags: Optional[Sequence] = None,
              resamples: int = 1000, seed: int = 0) -> Dict:
    """pass@k (mean and bootstrap CI), pass-rate fractions and the per-tag breakdown."""
    c = np.asarray(successes, dtype=np.int64)
    for k in ks:
        if k > n:
            raise ValueError(f"pass@k needs k <= n samples per prompt (got k={k} > n={n})")
    per_k = {k: pass_at_k_array(n, c, k) for k in ks}
    out: Dict = {"pass_at_k": {}}
    for k in ks:
        lo, hi = bootstrap_ci(per_k[k], resamples, seed)
        out["pass_at_k"][str(k)] = {"mean": float(per_k[k].mean()), "ci_low": lo, "ci_high": hi}
    p = max(len(c), 1)
    out["pass_rate_fractions"] = {
        "zero": float(np.sum(c == 0) / p),
        "between": float(np.sum((c > 0) & (c < n)) / p),
        "one": float(np.sum(c == n) / p),
    }
    out["mean_pass_rate"] = float(c.sum() / (p * n))
    if tags is not None:
        groups: Dict[str, Dict] = {}
        keys = sorted({str(t) for t in tags}, key=lambda s: (0, float(s)) if _is_number(s) else (1, s))
        for g in keys:
            idx = np.array([str(t) == g for t in tags])
            cg = c[idx]
            groups[g] = {
                "num_prompts": int(idx.sum()),
                "mean_pass_rate": float(cg.sum() / (len(cg) * n)),
                "pass_at_k": {str(k): float(per_k[k][idx].mean()) for k in ks},
            }
        out["by_tag"] = groups
    return out


def is_success(values, threshold: float) -> np.ndarray:
    """The package's one success rule, for the pass-rate pool and for in-training pass@k: a sample
    succeeds when its value — its score (what the reward function returns as ``scores``; OpenRLHF
    uses the reward when there is none), else its reward (a reward model's) — is > ``threshold``
    (``--dynamo.pool.success_threshold``, default 0.5). Bool array of ``values``' shape."""
    return np.asarray(values, dtype=np.float64) > float(threshold)


def train_eval_logs(values: Sequence[float], n: int, ks: Sequence[int], threshold: float = 0.5) -> Dict:
    """Flat ``eval_*`` metrics for OpenRLHF's loggers from one in-training evaluation's samples.

    ``values``: (S,) each sample's score (its reward when it has no score), in OpenRLHF's evaluation
    order, where each prompt's ``n`` samples (``--eval.n_samples_per_prompt``) are contiguous: prompt j
    is ``values[j*n:(j+1)*n]``. Samples are grouped by position, as OpenRLHF's own eval metrics do, never
    by prompt text or label, so duplicate rows of the eval set stay separate prompts and labels of any
    type are fine. A sample is correct by :func:`is_success` (value > ``threshold``, the pool's rule);
    ``k`` values above n are left out. Returns ``eval_pass@k`` (unbiased estimator, mean over prompts)
    for each k, and ``eval_frac_unsolved`` / ``eval_frac_between`` / ``eval_frac_solved`` (prompts with
    c = 0, 0 < c < n, c = n)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"--eval.n_samples_per_prompt must be >= 1, got {n}")
    correct = [int(ok) for ok in is_success([float(v) for v in values], threshold)]
    if not correct:
        return {}
    if len(correct) % n:
        raise ValueError(f"evaluation returned {len(correct)} samples, not a multiple of --eval.n_samples_per_prompt {n}")
    counts = [sum(correct[j:j + n]) for j in range(0, len(correct), n)]
    summary = summarize(counts, n, [k for k in ks if k <= n], resamples=1000)
    logs = {f"eval_pass@{k}": v["mean"] for k, v in summary["pass_at_k"].items()}
    if "1" in summary["pass_at_k"]:  # 95 % bootstrap CI over prompts (seeded): how far apart two evals must be
        logs["eval_pass@1_ci_low"] = summary["pass_at_k"]["1"]["ci_low"]
        logs["eval_pass@1_ci_high"] = summary["pass_at_k"]["1"]["ci_high"]
    fr = summary["pass_rate_fractions"]
    logs.update({"eval_frac_unsolved": fr["zero"], "eval_frac_between": fr["between"], "eval_frac_solved": fr["one"]})
    return logs


def default_ks(n: int) -> List[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
