"""Simulated RLVR training with known pass rates, for scoring rollout allocations exactly.

Importable by the tests (``tests/test_allocation_quality.py``) and driven by
``benchmarks/allocation_quality.py``.  Everything here is plain numpy; the allocator and the
pass-rate pool are pluggable ("backends"):

* ``native`` -- ``dynamo_openrlhf.allocate_rollouts`` / ``dynamo_openrlhf.PassRatePool`` (the real
  Rust extension; what the benchmark reports for "ours");
* ``numpy``  -- :func:`neyman_exact` / :class:`NumpyPassRatePool`, pure-numpy stand-ins with the
  same semantics, used to cross-check the native code and when it is not built.

Scoring (see ``score_allocation``): for one step with true pass rates p_i and an allocation n_i of
the budget B over the step's M candidate prompts,

    J(n) = sum_i v_i * c(n_i),   v_i = p_i (1 - p_i),   c(n) = 1/n for n >= 1,   c(0) = 1,

and the reported number is J(n) / J(uniform) with J(uniform) = sum_i v_i * M / B (uniform spread of the
same budget over the same prompts; = 16 rollouts each for the 512-prompt batches).  A prompt with v_i = 0
contributes nothing whatever it gets.  A *skipped* prompt (n_i = 0) with v_i > 0 loses its signal and is
charged v_i -- the objective's value for a group of one rollout, which in GRPO carries no gradient
either (a group of size one has advantage 0).  For allocations that never skip a prompt with v_i > 0 the
convention is irrelevant and J is exactly the allocator's Σ v/n objective; the oracle with skipping
never skips such a prompt, which is how the reference measurement's 0.437 (docs/reference_notes.md) is reproduced.  Because uniform's
per-prompt-mean gradient variance is mean(v)/B whatever the number of prompts sharing the budget,
ratios over 1024-candidate batches (skipping variant) and 512-prompt batches are comparable.

Simulation: a pool of prompts with true pass rates p_i(t) (static, or drifting in logit at a per-prompt
speed); steps take consecutive batches from a concatenation of per-epoch shuffles of the pool (each prompt
once per epoch, OpenRLHF-style); the budget is 16 x 512 per step.  The 8..24 methods take 512 prompts per
step; the skipping methods take 1024 candidates per step (consumed like a batch) and allocate the same
budget over them with lo = 0, hi = 64.  Rollout outcomes use common random numbers (see run_scenario).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from _alloc_numpy import neyman_numpy, reference_numpy  # noqa: E402  (the one numpy solver module)

# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------


def bernoulli_var(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p * (1.0 - p)


def objective(v: np.ndarray, n: np.ndarray) -> float:
    """J(n) = sum v_i c(n_i) with c(n) = 1/n, c(0) = 1 (skipped prompt with v > 0 loses its signal)."""
    v = np.asarray(v, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    c = np.where(n > 0, 1.0 / np.maximum(n, 1.0), 1.0)
    return float(np.sum(v * c))


def score_allocation(p: np.ndarray, n: np.ndarray, budget: int) -> float:
    """J(n) / J(uniform over the same prompts and budget) with the true v = p(1-p): the trainer's
    ``predicted_variance_ratio`` (Σ v/n model, c(0) = 1) on the true pass rates. 1.0 when every v_i is 0.
    ``budget`` must be ``n.sum()`` (kept for the callers' readability)."""
    from dynamo_openrlhf.allocation import predicted_variance_ratio

    n = np.asarray(n)
    if int(n.sum()) != int(budget):
        raise ValueError(f"allocation spends {int(n.sum())} rollouts, budget {budget}")
    return predicted_variance_ratio(bernoulli_var(p), n)


def lost_signal(p: np.ndarray, n: np.ndarray) -> float:
    """Share of the step's total Bernoulli variance sitting on skipped prompts (diagnostic)."""
    v = bernoulli_var(p)
    tot = float(v.sum())
    return float(v[np.asarray(n) == 0].sum()) / tot if tot > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# numpy allocators (stand-ins / cross-checks for dynamo_openrlhf.allocate_rollouts)
# ----------------------------------------------------------------------------------------------


def _check_budget(N: int, budget: int, lo: int, hi: int) -> None:
    if lo > hi or not (N * lo <= budget <= N * hi):
        raise ValueError(f"infeasible budget {budget} for N={N}, lo={lo}, hi={hi}")


def neyman_exact(v: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    """Exact integer minimiser of sum v_i/n_i, sum n_i = budget, lo <= n_i <= hi: the one numpy solver
    (``_alloc_numpy.neyman_numpy``, the Rust solver's tie rule), with the budget checked."""
    v = np.asarray(v, dtype=np.float64)
    _check_budget(v.size, budget, lo, hi)
    return neyman_numpy(v, budget, lo, hi)


def water_fill_proportional(w: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    """n proportional to w, bounds by water-filling, largest-remainder rounding (the reference rule):
    ``_alloc_numpy.reference_numpy`` without a priority floor, with the budget checked."""
    w = np.asarray(w, dtype=np.float64)
    _check_budget(w.size, budget, lo, hi)
    if w.size == 0:
        return np.zeros(0, dtype=np.int64)
    return reference_numpy(w, budget, lo, hi, floor=0.0)


def neyman_select(v: np.ndarray, budget: int, hi: int, skip_factor=None, min_rollouts=None,
                  guard=None) -> np.ndarray:
    """numpy stand-in of ``allocate_rollouts(v, budget, 0, hi, skip_factor=..., min_rollouts=...)``
    (rust/skip.rs; same definitions, used to cross-check the native code).

    Skipping: lambda = the smallest marginal gain v/((n-1)n) over prompts with v > 0 and n >= 2 of the
    exact lo = 0 allocation n; prompts with 0 < v < skip_factor * lambda are skipped, at most
    #(v > 0) - ceil(budget/hi) of them (the smallest variances; ties: higher index first); the budget is
    re-solved exactly over the rest.  min_rollouts = m >= 2: the top c not-skipped prompts by variance
    (ties: lower index) are served with c = max(ceil(B/hi), min(#kept v > 0, B // m)) and solved with
    bounds m..hi; everyone else gets 0.  ``guard`` (PassRatePool.allocate with calibrated=True: the plain
    posterior variances): a prompt is skipped only if max(v, guard) is below the cut."""
    v = np.asarray(v, dtype=np.float64)
    N = v.size
    n0 = neyman_exact(v, budget, 0, hi)
    skip = np.zeros(N, dtype=bool)
    fewest = -(-budget // hi) if hi > 0 else 0
    if skip_factor:
        score = v if guard is None else np.maximum(v, np.asarray(guard, dtype=np.float64))
        cand = np.flatnonzero((v > 0) & (score < skip_factor * shadow_price(v, n0, hi)))
        most = max(int((v > 0).sum()) - fewest, 0)
        if cand.size > most:
            cand = cand[np.lexsort((-cand, score[cand]))][:most]
        skip[cand] = True
    m = int(min_rollouts or 0)
    if m >= 2:
        rest = np.flatnonzero(~skip)
        c = max(fewest, min(int((v[rest] > 0).sum()), budget // m))
        served = np.sort(rest[np.lexsort((rest, -v[rest]))][:c])
        lo = m
    elif skip.any():
        served, lo = np.flatnonzero(~skip), 0
    else:
        return n0
    n = np.zeros(N, dtype=np.int64)
    n[served] = neyman_exact(v[served], budget, lo, hi)
    return n


def uniform_alloc(N: int, budget: int, lo: int = 0, hi: int = 1 << 30) -> np.ndarray:
    _check_budget(N, budget, lo, hi)
    n = np.full(N, budget // N, dtype=np.int64)
    n[: budget - int(n.sum())] += 1
    return n


# ----------------------------------------------------------------------------------------------
# numpy pass-rate pool (stand-in / cross-check for dynamo_openrlhf.PassRatePool)
# ----------------------------------------------------------------------------------------------


def fit_beta_binomial_mom(k: np.ndarray, t: np.ndarray, fallback=(1.0, 1.0)) -> tuple:
    """Evidence-weighted method-of-moments Beta prior from per-prompt (successes, trials), trials may be
    fractional (forgotten): mu = sum k / sum t (pooled), S2 = mean (k/t - mu)^2, c = mean 1/max(t, 1),
    Var p = (S2 - mu(1-mu) c) / (1 - c), alpha + beta = mu(1-mu)/Var p - 1.  The proposal of
    :func:`fit_prior_weighted`; ``fallback`` when the pool cannot be fitted."""
    k = np.asarray(k, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    m = t > 0
    if m.sum() < 2:
        return fallback
    k, t = k[m], t[m]
    mean = k.sum() / t.sum()
    if mean <= 0 or mean >= 1:
        return fallback
    ph = k / t
    inv = np.mean(1.0 / np.maximum(t, 1.0))
    s2 = np.mean((ph - mean) ** 2)
    var_p = (s2 - mean * (1 - mean) * inv) / max(1.0 - inv, 1e-9)
    var_p = min(max(var_p, 1e-6), mean * (1 - mean) * 0.999)
    ab = mean * (1 - mean) / var_p - 1.0
    ab = min(max(ab, 1e-3), 1e6)
    return (mean * ab, (1 - mean) * ab)


def fit_beta_mom_plain(k: np.ndarray, t: np.ndarray) -> tuple:
    """PassRatePool.fit_prior's formula (rust/pool.rs), for the numpy stand-in: over prompts with at
    least one trial of forgotten evidence, mu = mean k/t, S2 = sample variance of k/t, c = mean 1/t,
    phi = (S2/(mu(1-mu)) - c)/(1 - c) clamped to [1e-6, 1/1.001], alpha + beta = 1/phi - 1.
    ValueError where the native pool refuses (fewer than 2 prompts, mu in {0, 1}, c ~ 1)."""
    k = np.asarray(k, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    m = t >= 1.0
    if m.sum() < 2:
        raise ValueError("fit_prior needs at least 2 prompts with one or more trials of evidence")
    ph, t = k[m] / t[m], t[m]
    mu, c = ph.mean(), np.mean(1.0 / t)
    if mu <= 0 or mu >= 1 or c >= 1 - 1e-12:
        raise ValueError("fit_prior: degenerate pool")
    s2 = np.sum((ph - mu) ** 2) / (ph.size - 1)
    phi = min(max((s2 / (mu * (1 - mu)) - c) / (1 - c), 1e-6), 1 / 1.001)
    strength = 1 / phi - 1
    return (mu * strength, (1 - mu) * strength)


class NumpyPassRatePool:
    """Beta posterior per id (dense ids 0..capacity-1); evidence above the prior decays by ``forget`` at
    every ``update`` call (one training step), globally -- the semantics asked of PassRatePool."""

    def __init__(self, prior=(1.0, 1.0), forget: float = 1.0, capacity: int = 0):
        self.a0, self.b0 = float(prior[0]), float(prior[1])
        self.forget = float(forget)
        self.k = np.zeros(capacity)
        self.f = np.zeros(capacity)
        self.last = np.zeros(capacity, dtype=np.int64)
        self.seen = np.zeros(capacity, dtype=bool)
        self.t = 0  # number of update() calls

    @property
    def prior(self):
        return (self.a0, self.b0)

    def _grow(self, n):
        if n > self.k.size:
            extra = n - self.k.size
            self.k = np.concatenate([self.k, np.zeros(extra)])
            self.f = np.concatenate([self.f, np.zeros(extra)])
            self.last = np.concatenate([self.last, np.zeros(extra, dtype=np.int64)])
            self.seen = np.concatenate([self.seen, np.zeros(extra, dtype=bool)])

    def _decay(self, ids):
        if self.forget == 1.0:
            return 1.0
        return self.forget ** (self.t - self.last[ids]).astype(np.float64)

    def evidence(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        self._grow(int(ids.max()) + 1 if ids.size else 0)
        d = self._decay(ids)
        return self.k[ids] * d, self.f[ids] * d

    def update(self, ids, successes, trials):
        ids = np.asarray(ids, dtype=np.int64)
        s = np.asarray(successes, dtype=np.float64)
        tr = np.asarray(trials, dtype=np.float64)
        self._grow(int(ids.max()) + 1 if ids.size else 0)
        self._calibrate(ids, s, tr)
        self.t += 1  # decay of everything by one step, then add the new evidence
        d = self._decay(ids)
        # duplicates in ids: accumulate
        k_new = self.k[ids] * d
        f_new = self.f[ids] * d
        self.k[ids] = k_new
        self.f[ids] = f_new
        self.last[ids] = self.t
        np.add.at(self.k, ids, s)
        np.add.at(self.f, ids, tr - s)
        self.seen[ids] = True

    def alpha_beta(self, ids):
        k, f = self.evidence(ids)
        return self.a0 + k, self.b0 + f

    def mean(self, ids):
        a, b = self.alpha_beta(ids)
        return a / (a + b)

    def expected_variance(self, ids):
        a, b = self.alpha_beta(ids)
        s = a + b
        return a * b / (s * (s + 1.0))

    # revisit calibration (rust/calibration.rs): 13 x 13 evidence cells, decay 0.99 per update, tau 2
    CAL_FORGET, CAL_WEIGHT = 0.99, 2.0

    def _cal_cells(self, k, f):
        nb = len(CAL_EDGES) - 1
        i = np.clip(np.searchsorted(CAL_EDGES, k, side="right") - 1, 0, nb - 1)
        j = np.clip(np.searchsorted(CAL_EDGES, f, side="right") - 1, 0, nb - 1)
        return i * nb + j

    def _calibrate(self, ids, s, tr):
        if not hasattr(self, "cal_obs"):
            self.cal_obs = np.zeros((len(CAL_EDGES) - 1) ** 2)
            self.cal_pred = np.zeros_like(self.cal_obs)
        self.cal_obs *= self.CAL_FORGET
        self.cal_pred *= self.CAL_FORGET
        m = tr >= 2
        ids, s, tr = ids[m], s[m], tr[m]
        k, f = self.evidence(ids)
        vb = self.expected_variance(ids)
        np.add.at(self.cal_obs, self._cal_cells(k, f), s * (tr - s) / (tr * (tr - 1.0)) * tr)
        np.add.at(self.cal_pred, self._cal_cells(k, f), vb * tr)

    def calibrated_variance(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        v = self.expected_variance(ids)
        if not hasattr(self, "cal_obs"):
            return v
        c = self._cal_cells(*self.evidence(ids))
        return v * (self.cal_obs[c] + self.CAL_WEIGHT) / (self.cal_pred[c] + self.CAL_WEIGHT)

    def fit_prior(self):
        k, f = self.evidence(np.flatnonzero(self.seen))
        self.a0, self.b0 = fit_beta_mom_plain(k, k + f)
        return self.prior

    def ids(self):
        return np.flatnonzero(self.seen)

    def allocate(self, ids, budget, lo, hi, rule="neyman", calibrated=None, skip_factor=None,
                 min_rollouts=None, exploration=None, mastery=None, explore_seed=None):
        if exploration or mastery:
            raise NotImplementedError("the numpy stand-in has no exploration/mastery switches")
        if explore_seed is not None and not skip_factor:
            raise ValueError("explore_seed applies to the skipping rule only (skip_factor > 0)")
        v = self.calibrated_variance(ids) if calibrated else self.expected_variance(ids)
        if skip_factor or (min_rollouts or 0) >= 2:
            guard = self.expected_variance(ids) if calibrated and skip_factor else None
            if explore_seed is not None:
                # same semantics as rust/explore.rs (other random numbers): p~ ~ Beta(1 + c s, 1 + c f),
                # evidence capped at 16 trials (c = min(1, 16/(s+f))), seeded by (seed, update count);
                # skipped only if p~(1 - p~) is below the cut too
                k, f = self.evidence(ids)
                c = np.minimum(1.0, 16.0 / np.maximum(k + f, 1e-300))
                draw = np.random.default_rng([int(explore_seed), self.t]).beta(1.0 + c * k, 1.0 + c * f)
                dv = draw * (1.0 - draw)
                guard = dv if guard is None else np.maximum(guard, dv)
            return neyman_select(v, budget, hi, skip_factor, min_rollouts, guard)
        if rule == "neyman":
            return neyman_exact(v, budget, lo, hi)
        if rule == "proportional":
            return water_fill_proportional(v, budget, lo, hi)
        return uniform_alloc(len(v), budget, lo, hi)

    def __len__(self):
        return int(self.seen.sum())


class PerVisitForgettingPool(NumpyPassRatePool):
    """Ablation: a prompt's evidence decays by ``visit_forget`` each time the prompt itself is updated
    (per visit), instead of by rho at every training step for every prompt (per step, global)."""

    def __init__(self, prior=(1.0, 1.0), visit_forget=0.5, capacity=0):
        super().__init__(prior=prior, forget=1.0, capacity=capacity)
        self.visit_forget = float(visit_forget)

    def update(self, ids, successes, trials):
        ids = np.asarray(ids, dtype=np.int64)
        self._grow(int(ids.max()) + 1 if ids.size else 0)
        self.k[ids] *= self.visit_forget
        self.f[ids] *= self.visit_forget
        super().update(ids, successes, trials)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backend:
    name: str
    allocate: Callable  # (v, budget, lo, hi, rule="neyman", skip_factor=None, min_rollouts=None) -> int64
    make_pool: Callable  # (prior, forget, capacity) -> pool


def _numpy_allocate(v, budget, lo, hi, rule="neyman", skip_factor=None, min_rollouts=None):
    if skip_factor or (min_rollouts or 0) >= 2:
        if rule != "neyman" or lo != 0:
            raise ValueError("skip_factor/min_rollouts: rule 'neyman' with lo = 0 only")
        return neyman_select(v, budget, hi, skip_factor, min_rollouts)
    if rule == "neyman":
        return neyman_exact(v, budget, lo, hi)
    if rule == "proportional":
        return water_fill_proportional(v, budget, lo, hi)
    return uniform_alloc(len(v), budget, lo, hi)


def numpy_backend() -> Backend:
    return Backend(
        "numpy",
        _numpy_allocate,
        lambda prior, forget, capacity: NumpyPassRatePool(prior=prior, forget=forget, capacity=capacity),
    )


def native_backend() -> Backend:
    import dynamo_openrlhf as d  # noqa: F401  (raises ImportError if not built)

    def alloc(v, budget, lo, hi, rule="neyman", skip_factor=None, min_rollouts=None):
        return np.asarray(d.allocate_rollouts(np.asarray(v, dtype=np.float64), budget, lo, hi, rule=rule,
                                              skip_factor=skip_factor, min_rollouts=min_rollouts))

    def make_pool(prior, forget, capacity):
        return d.PassRatePool(prior=tuple(map(float, prior)), forget=float(forget), capacity=int(capacity))

    return Backend("native", alloc, make_pool)


def get_backend(name: str = "auto") -> Backend:
    if name == "numpy":
        return numpy_backend()
    if name == "native":
        return native_backend()
    try:
        return native_backend()
    except (ImportError, AttributeError):
        return numpy_backend()


# ----------------------------------------------------------------------------------------------
# scenarios: true pass-rate trajectories
# ----------------------------------------------------------------------------------------------


def _logit(p):
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def mixed_pool(rng, size, p_zero=0.3, p_one=0.2, a=0.7, b=0.7):
    """The reference measurement's pool recipe (docs/reference_notes.md): 30% impossible, 20% solved, the rest Beta(0.7, 0.7)."""
    u = rng.random(size)
    mid = rng.beta(a, b, size)
    return np.where(u < p_zero, 0.0, np.where(u < p_zero + p_one, 1.0, mid))


@dataclasses.dataclass
class Scenario:
    """True pass rates p_i(t) = sigmoid(logit p_i(0) + s_i * t / 1000); p = 0 / 1 stay fixed."""

    name: str
    pool_size: int
    steps: int  # 512-prompt steps simulated
    score_from: int  # first scored step (512-prompt steps; the skipping stream is scored on the same steps)
    init: Callable  # (rng, size) -> p0
    speed: Optional[Callable] = None  # (rng, size) -> logit change per 1000 steps; None = static
    description: str = ""
    speed_scale: float = 1.0  # --quick: shorter epochs, faster drift (same change per epoch)

    def make(self, rng):
        p0 = self.init(rng, self.pool_size)
        s = None if self.speed is None else self.speed(rng, self.pool_size) * self.speed_scale
        return Truth(p0, s)


class Truth:
    def __init__(self, p0, speed):
        self.p0 = np.asarray(p0, dtype=np.float64)
        self.logit0 = _logit(self.p0)
        self.speed = speed

    def p(self, ids, t):
        if self.speed is None:
            return self.p0[ids]
        z = self.logit0[ids] + self.speed[ids] * (t / 1000.0)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))


def drift_init(rng, size):
    """Drifting pool at step 0: 20% impossible for good (p = 0), 5% solved for good, the rest mostly hard."""
    u = rng.random(size)
    mid = np.clip(rng.beta(0.6, 1.6, size), 1e-4, 1 - 1e-4)
    return np.where(u < 0.20, 0.0, np.where(u < 0.25, 1.0, mid))


def drift_speed(rng, size):
    """Logit change per 1000 steps: 75% of prompts rise (0.5..6), 25% fall (-4..-0.5)."""
    u = rng.random(size)
    up = rng.uniform(0.5, 6.0, size)
    down = rng.uniform(-4.0, -0.5, size)
    return np.where(u < 0.75, up, down)


def rising_init(rng, size):
    """Half the prompts look impossible at first (p = 0.002) and will rise; the rest p ~ Beta(2, 2), static."""
    return np.where(np.arange(size) % 2 == 0, 0.002, rng.beta(2.0, 2.0, size))


def rising_speed(steps):
    """The rising half crosses p = 0.5 (logit 0, from logit(0.002) = -6.2) at a uniform time within the
    first 20%..80% of the run, and keeps rising; the rest does not move."""
    def speed(rng, size):
        cross = rng.uniform(0.2, 0.8, size) * steps
        return np.where(np.arange(size) % 2 == 0, 6.2 * 1000.0 / cross, 0.0)
    return speed


def scenarios(quick: bool = False) -> Dict[str, Scenario]:
    """The benchmark's scenarios.  ``quick`` shrinks pools and epochs (same shapes; drift sped up so that
    p moves as much per epoch as in the full run)."""
    big, small, large, f = 100_000, 4_096, 400_000, 1.0
    if quick:
        big, small, large, f = 20_000, 2_048, 80_000, 196 / 40
    E = -(-big // BATCH)  # steps per epoch of the main pool (196 for 100k)
    EL = -(-large // BATCH)
    return {
        "mixed": Scenario(
            "mixed", big, 4 * E, E, mixed_pool, None,
            "30% p=0, 20% p=1, 50% Beta(0.7,0.7); static; scored on epochs 2-4"),
        "no_extremes": Scenario(
            "no_extremes", big, 3 * E, E, lambda r, n: r.beta(2.0, 2.0, n), None,
            "p ~ Beta(2,2): no solved/impossible prompts; static; scored on epochs 2-3"),
        "cold_start": Scenario(
            "cold_start", big, 2 * E, 0, mixed_pool, None,
            "mixed pool, nothing seen at step 0; scored over the first two epochs"),
        "drifting": Scenario(
            "drifting", big, 4 * E, E, drift_init, drift_speed,
            "p rises (75%) or falls (25%) at its own speed; scored on epochs 2-4", f),
        "small_pool": Scenario(
            "small_pool", small, 2 * E, 2 * (small // BATCH), drift_init, drift_speed,
            f"{small // 1024}k prompts revisited every {small // BATCH} steps; same drift; scored from the 3rd epoch",
            f),
        "large_pool": Scenario(
            "large_pool", large, 2 * EL, EL, drift_init, drift_speed,
            f"{large // 1000}k prompts revisited every ~{EL} steps; same drift; scored on epoch 2", f),
        "rising": Scenario(
            "rising", small, 2 * E, 2 * (small // BATCH), rising_init, rising_speed(2 * E),
            f"{small // 1024}k prompts: half look impossible (p = 0.002) and rise through p = 0.5 at a random "
            "time in 20-80% of the run, half Beta(2,2); the trap for skipping without exploration"),
    }


# ----------------------------------------------------------------------------------------------
# batch stream: OpenRLHF-style epochs over a shuffled pool
# ----------------------------------------------------------------------------------------------


class Stream:
    """Consecutive batches from a concatenation of per-epoch permutations of the pool."""

    def __init__(self, pool_size, batch, rng):
        self.N, self.M, self.rng = pool_size, batch, rng
        self.perms: List[np.ndarray] = []

    def _perm(self, e):
        while len(self.perms) <= e:
            self.perms.append(self.rng.permutation(self.N))
        return self.perms[e]

    def batch(self, t):
        start, stop = t * self.M, (t + 1) * self.M
        out = []
        pos = start
        while pos < stop:
            e, off = divmod(pos, self.N)
            take = min(stop - pos, self.N - off)
            out.append(self._perm(e)[off: off + take])
            pos += take
        return np.concatenate(out)

    def epoch(self, t):
        """Epoch of the first prompt of batch t."""
        return (t * self.M) // self.N


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------

BATCH = 512
ROLLOUTS = 16


class Method:
    """One allocation method.  ``candidates`` = prompts drawn per step as a multiple of 512."""

    name = "method"
    candidates = 1
    lo, hi = 8, 24
    needs_truth = False

    def reset(self, pool_size: int, rng: np.random.Generator) -> None:
        self.rng = rng

    def allocate(self, ids, t, epoch, p_true, budget) -> np.ndarray:
        raise NotImplementedError

    def observe(self, ids, n, k, t) -> None:
        pass


class Uniform(Method):
    name = "uniform"

    def allocate(self, ids, t, epoch, p_true, budget):
        return uniform_alloc(len(ids), budget, self.lo, self.hi)


class Oracle(Method):
    """Exact optimum on the true p (the floor)."""

    needs_truth = True

    def __init__(self, lo=8, hi=24, candidates=1, allocate=neyman_exact, name=None):
        self.lo, self.hi, self.candidates, self._alloc = lo, hi, candidates, allocate
        self.name = name or ("oracle" if lo > 0 else "oracle, skipping")

    def allocate(self, ids, t, epoch, p_true, budget):
        return np.asarray(self._alloc(bernoulli_var(p_true), budget, self.lo, self.hi))


class Reference(Method):
    """The reference allocator (docs/reference_notes.md), reproduced from its description:

    cumulative per-prompt (successes, rollouts); priority = unbiased proxy k(G-k)/(G(G-1)); cumulative
    accuracy >= 0.85 -> priority 0.01 ("mastery"); floor 0.01; prompts never seen get the exploration
    budget (4 rollouts) clamped into [lo, hi] (-> n_low); the rest of the budget goes to the seen prompts
    n ~ priority (water-filling bounds, largest-remainder rounding).  A batch with no seen prompt is
    uniform.  Statistics are refreshed at the end of each epoch (``refresh="epoch"``) or every step.
    Where the reference would change the budget (seen prompts all at n_high and budget left over) the
    surplus is spread evenly over the unseen prompts, so that every method spends exactly B.
    """

    def __init__(self, refresh="epoch", lo=8, hi=24, exploration=4, mastery=0.85, floor=0.01):
        self.refresh, self.lo, self.hi = refresh, lo, hi
        self.exploration, self.mastery, self.floor = exploration, mastery, floor
        self.name = "reference" if refresh == "epoch" else "reference, per-step refresh"

    def reset(self, pool_size, rng):
        self.rng = rng
        self.k = np.zeros(pool_size)
        self.g = np.zeros(pool_size)
        self.pending: List[tuple] = []
        self.cur_epoch = 0

    def _grow(self, size):
        if size > self.k.size:
            self.k = np.concatenate([self.k, np.zeros(size - self.k.size)])
            self.g = np.concatenate([self.g, np.zeros(size - self.g.size)])

    def _commit(self):
        for ids, n, k in self.pending:
            np.add.at(self.k, ids, k)
            np.add.at(self.g, ids, n)
        self.pending = []

    def priority(self, ids):
        k, g = self.k[ids], self.g[ids]
        with np.errstate(divide="ignore", invalid="ignore"):
            P = np.where(g >= 2, k * (g - k) / (g * (g - 1.0)), 0.0)
            acc = np.where(g > 0, k / np.maximum(g, 1), 0.0)
        P = np.where(acc >= self.mastery, 0.01, P)
        return np.maximum(P, self.floor)

    def allocate(self, ids, t, epoch, p_true, budget):
        self._grow(int(ids.max()) + 1)
        if self.refresh == "epoch" and epoch > self.cur_epoch:
            self._commit()
            self.cur_epoch = epoch
        seen = self.g[ids] > 0
        N = len(ids)
        if not seen.any():
            return uniform_alloc(N, budget, self.lo, self.hi)
        n = np.zeros(N, dtype=np.int64)
        n_unseen = int(min(max(self.exploration, self.lo), self.hi))
        U = int((~seen).sum())
        S = N - U
        rest = budget - U * n_unseen
        if rest > S * self.hi:  # the reference would overspend/underspend here; keep Sigma n = B
            n[seen] = self.hi
            n[~seen] = uniform_alloc(U, budget - S * self.hi, self.lo, self.hi)
            return n
        n[~seen] = n_unseen
        n[seen] = water_fill_proportional(self.priority(ids[seen]), rest, self.lo, self.hi)
        return n

    def observe(self, ids, n, k, t):
        m = n > 0
        if self.refresh == "epoch":
            self.pending.append((ids[m], n[m], k[m]))
        else:
            np.add.at(self.k, ids[m], k[m])
            np.add.at(self.g, ids[m], n[m])


class Ours(Method):
    """Beta posterior per prompt (``PassRatePool``), updated every step with the rollouts' outcomes,
    prior refitted from the pool every ``refit_every`` steps (``prior="fit"``: ``pool.fit_prior()``;
    ``"fit_weighted"``: :func:`fit_prior_weighted`; a tuple: fixed), global forgetting ``forget`` per
    step, ``rule`` ("neyman") on the posterior expected variance E[p(1-p)] -- which is defined for
    unseen prompts too (the prior's), so no exploration budget is needed (``exploration=True`` switches
    the reference's rule on through ``pool.allocate``).

    With ``lo == 0`` (skipping): prompts whose posterior expected variance is below ``skip_factor`` times
    the allocation's shadow price lambda are skipped, then the budget is re-solved over the rest -- the
    allocator's own ``skip_factor`` option (rust/skip.rs), called through the backend, so the benchmark
    measures the shipped code.  ``calibrated=True`` (the default of :data:`DEFAULTS`): the allocation is the
    pool's own ``pool.allocate(ids, budget, lo, hi, calibrated=True, skip_factor=..., min_rollouts=...)``
    -- revisit-calibrated variances (rust/calibration.rs), skipping guarded by the plain posterior.
    Scored as c(0) = 1 (see the module doc), skipping a prompt costs v while
    giving it m rollouts costs v/m + lambda*m >= 2 sqrt(v lambda); skipping pays when v < 4 lambda, hence
    the default factor 4.  ``min_rollouts`` (lo == 0 only): the allocator's "0 or at least m" option.
    """

    def __init__(self, backend: Backend, forget=0.999, prior="fit", init_prior=(1.0, 1.0),
                 refit_every=1, lo=8, hi=24, candidates=1, skip_factor=4.0, name=None,
                 rule="neyman", exploration=False, make_pool=None, min_rollouts=None, calibrated=False,
                 explore_seed=None):
        self.explore_seed = explore_seed
        self.backend, self.forget, self.prior_mode = backend, forget, prior
        self.rule, self.exploration, self._make_pool = rule, exploration, make_pool
        self.init_prior = init_prior if isinstance(prior, str) else prior
        self.refit_every, self.lo, self.hi, self.candidates = refit_every, lo, hi, candidates
        self.skip_factor, self.min_rollouts, self.calibrated = skip_factor, min_rollouts, calibrated
        self.name = name or ("ours" if lo > 0 else "ours, skipping")

    def reset(self, pool_size, rng):
        self.rng = rng
        make = self._make_pool or self.backend.make_pool
        self.pool = make(self.init_prior, self.forget, pool_size)
        self.updates = 0

    def variances(self, ids):
        if self.calibrated:  # PassRatePool.calibrated_variance: the revisit calibration (rust/calibration.rs)
            return np.asarray(self.pool.calibrated_variance(ids), dtype=np.float64)
        return np.asarray(self.pool.expected_variance(ids), dtype=np.float64)

    def allocate(self, ids, t, epoch, p_true, budget):
        if self.exploration:  # the reference's exploration switch: unseen ids get 4 -> clamped to lo
            return np.asarray(self.pool.allocate(ids, budget, self.lo, self.hi, rule=self.rule, exploration=True,
                                                 calibrated=self.calibrated or None))
        if self.calibrated:  # the trainer's call: PassRatePool.allocate(..., calibrated=True)
            kw = dict(calibrated=True, exploration=False, mastery=False)
            if self.lo == 0:
                kw.update(skip_factor=self.skip_factor or None, min_rollouts=self.min_rollouts)
                if self.skip_factor and self.explore_seed is not None:
                    kw.update(explore_seed=self.explore_seed)
            return np.asarray(self.pool.allocate(ids, budget, self.lo, self.hi, rule=self.rule, **kw))
        if self.lo == 0 and self.skip_factor and self.explore_seed is not None:
            # exploring skip decisions need the posteriors: the pool's own allocate
            return np.asarray(self.pool.allocate(ids, budget, 0, self.hi, rule=self.rule,
                                                 skip_factor=self.skip_factor, min_rollouts=self.min_rollouts,
                                                 explore_seed=self.explore_seed))
        v = self.variances(ids)
        if self.lo == 0 and (self.skip_factor or (self.min_rollouts or 0) >= 2):
            return self._select(v, budget)
        return np.asarray(self.backend.allocate(v, budget, self.lo, self.hi, self.rule))

    def _select(self, v, budget):
        """lo = 0: the allocator's skipping rule / group-size floor (rust/skip.rs)."""
        return np.asarray(self.backend.allocate(v, budget, 0, self.hi, self.rule,
                                                skip_factor=self.skip_factor or None,
                                                min_rollouts=self.min_rollouts))

    def observe(self, ids, n, k, t):
        m = n > 0
        self.pool.update(ids[m], k[m], n[m])
        self.updates += 1
        if self.prior_mode == "fit" and self.updates % self.refit_every == 0:
            try:
                self.pool.fit_prior()
            except ValueError:  # too little evidence yet (native pool refuses); keep the prior
                pass
        elif self.prior_mode == "fit_weighted" and self.updates % self.refit_every == 0:
            fit_prior_weighted(self.pool)


def pool_evidence(pool, ids):
    """(successes, failures) of evidence above the prior, after forgetting, for each id."""
    if hasattr(pool, "evidence"):
        k, f = pool.evidence(ids)
        return np.asarray(k, dtype=np.float64), np.asarray(f, dtype=np.float64)
    m = np.asarray(pool.mean(ids), dtype=np.float64)
    v = np.asarray(pool.expected_variance(ids), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(v / (m * (1.0 - m)), 0.0, 1.0 - 1e-12)
    s = r / (1.0 - r)
    a0, b0 = pool_prior(pool)
    k = np.maximum(m * s - a0, 0.0)
    f = np.maximum((1.0 - m) * s - b0, 0.0)
    k[k < 1e-6] = 0.0
    f[f < 1e-6] = 0.0
    return k, f


def pool_prior(pool):
    pr = pool.prior
    return (float(pr[0]), float(pr[1])) if not callable(pr) else tuple(map(float, pr()))


CAL_EDGES = np.array([0.0, 1e-6, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, np.inf])


class Calibrated(Ours):
    """PROPOSAL (not the pool's API): ours, with the posterior expected variance rescaled per evidence
    cell by what revisits actually showed.

    Prompts are binned by their (forgotten) evidence above the prior -- successes x failures, log-spaced
    bins, a bin for exactly zero.  Whenever a prompt gets n >= 2 rollouts, its fresh unbiased variance
    k(n-k)/(n(n-1)) and the posterior's prediction for it are added to its cell (weight n, cell sums
    decayed by ``cal_forget`` per step).  The allocation uses v_i * (S_c + tau) / (P_c + tau): a cell
    whose prompts turned out noisier than the Beta posterior said gets more rollouts, and vice versa.
    Static pools: ratio -> ~1 (nothing changes).  Drifting pools: it learns, e.g., that prompts that looked
    mastered an epoch ago are now solved and that hard ones have become informative -- the drift the
    Beta posterior alone cannot predict.  Empirical Bayes on revisits.
    """

    def __init__(self, backend, cal_forget=0.99, tau=2.0, edges=CAL_EDGES, clip=(0.0, np.inf),
                 skip_on_posterior=True, **kw):
        kw.setdefault("name", "ours + revisit calibration" if kw.get("lo", 8) > 0
                      else "ours + revisit calibration, skipping")
        kw["calibrated"] = False  # its own (Python) calibration on the plain posterior
        kw["explore_seed"] = None  # its own skip rule (_select)
        super().__init__(backend, **kw)
        self.cal_forget, self.tau, self.edges = cal_forget, tau, np.asarray(edges)
        self.clip, self.skip_on_posterior = clip, skip_on_posterior

    def reset(self, pool_size, rng):
        super().reset(pool_size, rng)
        nb = len(self.edges) - 1
        self.S = np.zeros(nb * nb)
        self.P = np.zeros(nb * nb)

    def _cells(self, ids):
        k, f = pool_evidence(self.pool, ids)
        nb = len(self.edges) - 1
        i = np.clip(np.searchsorted(self.edges, k, side="right") - 1, 0, nb - 1)
        j = np.clip(np.searchsorted(self.edges, f, side="right") - 1, 0, nb - 1)
        return i * nb + j

    def variances(self, ids):
        v = super().variances(ids)
        c = self._cells(ids)
        self._v_post = v
        return v * np.clip((self.S[c] + self.tau) / (self.P[c] + self.tau), *self.clip)

    def _select(self, v, budget):
        if not self.skip_on_posterior or (self.min_rollouts or 0) >= 2:
            return super()._select(v, budget)
        # skip only prompts that both the calibrated and the plain posterior call negligible
        n = np.asarray(self.backend.allocate(v, budget, 0, self.hi, self.rule))
        lam = shadow_price(v, n, self.hi)
        skip = (np.maximum(v, self._v_post) < self.skip_factor * lam) & (v > 0)
        if not skip.any() or int((~skip).sum()) * self.hi < budget:
            return n
        return np.asarray(self.backend.allocate(np.where(skip, 0.0, v), budget, 0, self.hi))

    def observe(self, ids, n, k, t):
        m = n >= 2
        c = self._cells(ids[m])
        vb = Ours.variances(self, ids[m])
        nn = n[m].astype(np.float64)
        kk = k[m].astype(np.float64)
        u = kk * (nn - kk) / (nn * (nn - 1.0))
        self.S *= self.cal_forget
        self.P *= self.cal_forget
        np.add.at(self.S, c, u * nn)
        np.add.at(self.P, c, vb * nn)
        super().observe(ids, n, k, t)


def fit_prior_weighted(pool):
    """PROPOSAL for PassRatePool.fit_prior: the same method of moments, but with the pooled mean
    mu = sum s_i / sum n_i (each prompt weighted by its forgotten evidence n_i) instead of the plain mean
    of s_i/n_i, and every prompt with evidence counted (1/n_i clamped at 1).  With forget < 1 recent
    evidence weighs more, so the prior -- what a forgotten or unseen prompt reverts to -- follows the
    current population instead of an average over the pool's whole (stale) history."""
    ids = np.asarray(pool.ids(), dtype=np.int64)
    if ids.size < 2:
        return pool.prior
    k, f = pool_evidence(pool, ids)
    a, b = fit_beta_binomial_mom(k, k + f, fallback=pool_prior(pool))
    if hasattr(pool, "a0"):
        pool.a0, pool.b0 = a, b
    else:
        pool.prior = (a, b)
    return (a, b)


def shadow_price(v, n, hi):
    """Lagrange multiplier of a sum v/n allocation: the smallest gain of a rollout that was given
    (v/(n(n-1)) over prompts with 2 <= n), i.e. the price of one rollout at the margin."""
    m = (n >= 2) & (v > 0)
    if not m.any():
        return 0.0
    return float(np.min(v[m] / (n[m] * (n[m] - 1.0))))


class TruePriorPosterior(Ours):
    """Diagnostic (not a method one could deploy): the exact posterior E[p(1-p) | k, n] under the
    *true* spike-and-slab generating prior of the mixed pool (30% p=0, 20% p=1, 50% Beta(0.7, 0.7)),
    from cumulative counts.  It bounds what any estimator can reach from the same rollouts, and so
    shows how much of the gap to the oracle is missing information rather than a poor method."""

    def __init__(self, backend, p_zero=0.3, p_one=0.2, a=0.7, b=0.7, **kw):
        kw.setdefault("name", "true-prior posterior" if kw.get("lo", 8) > 0 else "true-prior posterior, skipping")
        kw["calibrated"] = False  # its own exact posterior, not the pool
        kw["explore_seed"] = None  # no pool posteriors to draw from
        super().__init__(backend, **kw)
        self.w0, self.w1, self.a, self.b = p_zero, p_one, a, b

    def reset(self, pool_size, rng):
        self.rng = rng
        self.k = np.zeros(pool_size)
        self.g = np.zeros(pool_size)

    def variances(self, ids):
        k, g = self.k[ids], self.g[ids]
        f = g - k
        lg = np.frompyfunc(math.lgamma, 1, 1)

        def lbeta(x, y):
            return (lg(x) + lg(y) - lg(x + y)).astype(np.float64)

        A, Bb = self.a + k, self.b + f
        l_slab = (math.log(1 - self.w0 - self.w1) + lbeta(A, Bb)
                  - lbeta(np.full_like(A, self.a), np.full_like(Bb, self.b)))
        l_zero = np.where(k == 0, math.log(self.w0), -np.inf)
        l_one = np.where(f == 0, math.log(self.w1), -np.inf)
        mx = np.maximum(l_slab, np.maximum(l_zero, l_one))
        w = np.exp(l_slab - mx) / (np.exp(l_slab - mx) + np.exp(l_zero - mx) + np.exp(l_one - mx))
        S = A + Bb
        return w * A * Bb / (S * (S + 1.0))

    def observe(self, ids, n, k, t):
        np.add.at(self.k, ids, k)
        np.add.at(self.g, ids, n)


# ----------------------------------------------------------------------------------------------
# the benchmark's method set and the chosen defaults
# ----------------------------------------------------------------------------------------------

#: The defaults chosen from ``benchmarks/allocation_quality.py`` (one setting for every scenario).
DEFAULTS = dict(
    prior="fit",  # PassRatePool.fit_prior() (empirical Bayes, method of moments) ...
    refit_every=10,  # ... every 10 training steps; Beta(1, 1) until the pool has evidence
    init_prior=(1.0, 1.0),
    forget=0.999,  # per training step, global: evidence half-life ~693 steps
    rule="neyman",
    exploration=False,  # unseen prompts: the (fitted) prior's E[p(1-p)]; no exploration budget
    mastery=False,
    calibrated=True,  # PassRatePool.allocate(..., calibrated=True): revisit calibration (rust/calibration.rs)
    min_rollouts=None,  # skipping variant: no group-size floor (2 measured: see --ablations)
    lo=8, hi=24,  # the reference's bounds; skipping variant: lo=0, hi=64 over 2x candidates
    skip_lo=0, skip_hi=64, skip_candidates=2, skip_factor=4.0,
    # skipping variant: skip decisions explore (PassRatePool.allocate(explore_seed=0)): a prompt is skipped
    # only if an exploration draw p~ ~ Beta(1 + c s, 1 + c f) (evidence capped at 16 trials) also has
    # p~(1-p~) below the cut, so no prompt with signal stays skipped (see the starvation table)
    explore_seed=0,
)


def ours_kwargs(skipping: bool = False, **over):
    d = dict(forget=DEFAULTS["forget"], prior=DEFAULTS["prior"], init_prior=DEFAULTS["init_prior"],
             refit_every=DEFAULTS["refit_every"], calibrated=DEFAULTS["calibrated"])
    if skipping:
        d.update(lo=DEFAULTS["skip_lo"], hi=DEFAULTS["skip_hi"], candidates=DEFAULTS["skip_candidates"],
                 skip_factor=DEFAULTS["skip_factor"], min_rollouts=DEFAULTS["min_rollouts"],
                 explore_seed=DEFAULTS["explore_seed"])
    else:
        d.update(lo=DEFAULTS["lo"], hi=DEFAULTS["hi"])
    d.update(over)
    return d


def benchmark_methods(backend: Backend, scenario: Optional[Scenario] = None, proposals: bool = True,
                      diagnostics: bool = True) -> List[Method]:
    """uniform, reference (per-epoch / per-step refresh), ours, ours skipping, [comparison rows: ours
    without the revisit calibration (the previous defaults), ours skipping with min_rollouts=2],
    oracle, oracle skipping [, true-prior posterior rows on the mixed-pool recipe]."""
    ms: List[Method] = [Uniform(), Reference("epoch"), Reference("step"),
                        Ours(backend, **ours_kwargs()), Ours(backend, **ours_kwargs(True))]
    if proposals:
        ms += [Ours(backend, **ours_kwargs(calibrated=False), name="ours, no calibration"),
               Ours(backend, **ours_kwargs(True, calibrated=False), name="ours, no calibration, skipping"),
               Ours(backend, **ours_kwargs(True, min_rollouts=2), name="ours, skipping, min_rollouts 2"),
               Ours(backend, **ours_kwargs(True, explore_seed=None), name="ours, skipping, no exploration")]
    ms += [Oracle(8, 24, 1, allocate=backend.allocate),
           Oracle(0, 64, DEFAULTS["skip_candidates"], allocate=backend.allocate)]
    if diagnostics and scenario is not None and scenario.init is mixed_pool:
        ms += [TruePriorPosterior(backend, **ours_kwargs()), TruePriorPosterior(backend, **ours_kwargs(True))]
    return ms


def ablation_methods(backend: Backend) -> List[Method]:
    """One change at a time from the defaults (``allocation_quality.py --ablations``)."""
    def numpy_pool(prior, forget, cap):
        return NumpyPassRatePool(prior=prior, forget=forget, capacity=cap)

    def per_visit(r):
        return lambda prior, forget, cap: PerVisitForgettingPool(prior=prior, visit_forget=r, capacity=cap)

    ms: List[Method] = [Ours(backend, **ours_kwargs(), name="defaults (rho 0.999, fitted prior, neyman, calibrated)")]
    ms += [Ours(backend, **ours_kwargs(calibrated=False), name="no revisit calibration (previous default)")]
    ms += [Ours(backend, **ours_kwargs(forget=f), name=f"forget rho = {f}") for f in (1.0, 0.9995, 0.998, 0.995)]
    ms += [Ours(backend, **ours_kwargs(prior=pr), name=f"fixed prior Beta{pr}") for pr in ((1.0, 1.0), (0.5, 0.5))]
    ms += [Ours(backend, **ours_kwargs(prior="fit_weighted"), name="proposal: evidence-weighted prior fit")]
    ms += [Ours(backend, **ours_kwargs(prior="fit_weighted"), make_pool=numpy_pool,
                name="numpy pool (weighted fit), per-step rho 0.999 (control)")]
    ms += [Ours(backend, **ours_kwargs(forget=1.0, prior="fit_weighted"), make_pool=per_visit(r),
                name=f"numpy pool (weighted fit), per-visit forgetting {r}")
           for r in (0.5, 0.8)]
    ms += [Ours(backend, **ours_kwargs(rule="proportional"), name="rule proportional on the posterior")]
    if backend.name == "native":
        ms += [Ours(backend, **ours_kwargs(exploration=True), name="+ exploration switch (unseen -> n_low)")]
    ms += [Ours(backend, **ours_kwargs(True, skip_factor=0.0), name="skipping: no skip rule (skip_factor 0)"),
           Ours(backend, **ours_kwargs(True), name="skipping: defaults (skip_factor 4)"),
           Ours(backend, **ours_kwargs(True, skip_factor=8.0), name="skipping: skip_factor 8"),
           Ours(backend, **ours_kwargs(True, min_rollouts=2), name="skipping: min_rollouts 2"),
           Calibrated(backend, **ours_kwargs(calibrated=False), name="python proposal: calibration (control)"),
           Calibrated(backend, **ours_kwargs(prior="fit_weighted", calibrated=False),
                      name="proposal: weighted prior fit + calibration"),
           Reference()]
    return ms


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------


#: Starvation: a prompt with signal (true 0.1 < p < 0.9 at the visit) that gets no rollout on more than
#: this many consecutive visits.  Visits come once per epoch; 3 means three epochs without any evidence
#: on a prompt whose variance is at least 0.09 -- by then a posterior that wrongly called it negligible
#: would have had three chances to be corrected, and a prompt that drifts does so over a few epochs.
STARVE_VISITS = 3


class StarvationTracker:
    """Per method: consecutive visits with true 0.1 < p < 0.9 and n = 0, per prompt."""

    def __init__(self, pool_size: int, k: int = STARVE_VISITS):
        self.k = k
        self.run = np.zeros(pool_size, dtype=np.int64)
        self.starved = np.zeros(pool_size, dtype=bool)
        self.eligible = np.zeros(pool_size, dtype=bool)

    def visit(self, ids, p, n):
        mid = (p > 0.1) & (p < 0.9)
        self.eligible[ids[mid]] = True
        zero = mid & (n == 0)
        self.run[ids[~zero]] = 0
        self.run[ids[zero]] += 1
        self.starved[ids[zero & (self.run[ids] > self.k)]] = True

    def share(self) -> float:
        """Starved prompts / prompts visited at least once with 0.1 < p < 0.9."""
        return float(self.starved.sum() / max(1, self.eligible.sum()))


def run_scenario(scenario: Scenario, methods: Sequence[Method], seed: int,
                 steps: Optional[int] = None, lost: Optional[dict] = None,
                 starved: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """Simulate ``steps`` training steps; returns {method name: per-step ratio to uniform}.
    ``starved`` (a dict) receives {method name: share of prompts starved} (:class:`StarvationTracker`).

    All methods with the same ``candidates`` see the same batches and true pass rates, and share common
    random numbers for the rollouts: rollout j of prompt i in a step succeeds iff U_ij < p_i with the
    same uniforms U for every method, so a method's k_i ~ Binomial(n_i, p_i) and two methods that
    allocate alike observe alike (differences between methods are not sampling noise).
    """
    steps = scenario.steps if steps is None else steps
    ss = np.random.SeedSequence(seed)
    truth_seed, stream_seed, outcome_seed, method_seed = ss.spawn(4)
    truth = scenario.make(np.random.default_rng(truth_seed))
    mults = sorted({m.candidates for m in methods})
    streams = {c: Stream(scenario.pool_size, BATCH * c, np.random.default_rng(s))
               for c, s in zip(mults, stream_seed.spawn(len(mults)))}
    outcome_rngs = {c: np.random.default_rng(s) for c, s in zip(mults, outcome_seed.spawn(len(mults)))}
    max_hi = max(m.hi for m in methods)
    for m, s in zip(methods, method_seed.spawn(len(methods))):
        m.reset(scenario.pool_size, np.random.default_rng(s))
    out = {m.name: np.empty(steps) for m in methods}
    if lost is not None:
        lost.update({m.name: np.zeros(steps) for m in methods})
    trackers = {m.name: StarvationTracker(scenario.pool_size) for m in methods}
    budget = BATCH * ROLLOUTS
    for t in range(steps):
        for c in mults:
            ids = streams[c].batch(t)
            ep = streams[c].epoch(t)
            p = truth.p(ids, t)
            wins = np.cumsum(outcome_rngs[c].random((len(ids), max_hi)) < p[:, None], axis=1)
            wins = np.concatenate([np.zeros((len(ids), 1), dtype=wins.dtype), wins], axis=1)
            rows = np.arange(len(ids))
            for m in methods:
                if m.candidates != c:
                    continue
                n = np.asarray(m.allocate(ids, t, ep, p if m.needs_truth else None, budget), dtype=np.int64)
                assert n.sum() == budget and n.min() >= m.lo and n.max() <= m.hi, m.name
                out[m.name][t] = score_allocation(p, n, budget)
                if lost is not None:
                    lost[m.name][t] = lost_signal(p, n)
                trackers[m.name].visit(ids, p, n)
                k = wins[rows, n].astype(np.int64)
                m.observe(ids, n, k, t)
    if starved is not None:
        starved.update({name: tr.share() for name, tr in trackers.items()})
    return out
