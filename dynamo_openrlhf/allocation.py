"""Per-step rollout allocation for the trainer: pool posterior -> per-prompt n_i, and the pool update.

Torch-, Ray- and OpenRLHF-free (NumPy + ``dynamo_openrlhf._core``), so it is tested directly.
The trainer glue (``dynamo_openrlhf.ppo_trainer``) calls, every training step:

1. ``counts = allocator.allocate(prompt_ids)`` for the step's candidate prompts (the budget is
   ``n_samples_per_prompt x min(#candidates, prompts_per_step)``, so a full step always spends
   exactly ``rollout.batch_size x rollout.n_samples_per_prompt`` rollouts), minimising the variance
   model of the run's advantage estimator (``AllocationConfig.estimator``, :func:`prompt_costs`);
2. ``allocator.record(prompt_ids, successes, trials)`` with the step's verified outcomes per group
   (first scored against the pool's posterior means: :func:`calibration_scores`, then learnt);
3. ``allocator.metrics()`` for the step's log line (``dynamo/*`` keys).

With ``noise_scale`` (``--dynamo.allocation.noise_scale nll|pisq|length``) step 2 also passes, per group, the
sums of a per-rollout noise proxy over its successful and failed rollouts, and step 1 allocates on
ŝ_i·v_i (ŝ = :meth:`PassRatePool.noise_scale`, the prompt's learnt gradient-noise scale).

Its whole state (the pass-rate pool, bit for bit, and the step counter) is ``state_dict()``, saved in
every OpenRLHF checkpoint by the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from dynamo_openrlhf._core import ESTIMATORS as CORE_ESTIMATORS
from dynamo_openrlhf._core import RULES, PassRatePool, allocation_problems, group_norm_costs
from dynamo_openrlhf._core import filter_counts as core_filter_counts
from dynamo_openrlhf.noise_proxy import NOISE_PROXIES

__all__ = ["AllocationConfig", "RolloutAllocator", "AllocationStep", "predicted_variance_ratio", "prompt_costs",
           "default_bounds", "calibration_scores", "load_pool", "filter_counts", "STATE_VERSION", "VARIANCE_MODELS",
           "ALLOCATION_RULES", "DEFAULT_FILTER_BAND", "DEFAULT_SKIP_PRICE", "NOISE_SCALE_RULES", "noise_scale_metrics"]

STATE_VERSION = 1

#: The trainer's rules: the core's (:data:`RULES`) and "filter", a selection composed from the core's uniform rule.
ALLOCATION_RULES = tuple(RULES) + ("filter",)
#: Priced skipping's default κ (``--dynamo.allocation.skip_price``): a skipped prompt's squared expected
#: gradient is priced as 4·E[p²(1−p)²] score-noise units, which at p = 1/2 equals one rollout's noise
#: p(1−p): the largest signal a prompt's rollouts can carry (Cauchy–Schwarz), so skipping is priced
#: conservatively (docs/allocation_objectives.md, "Priced skipping").
DEFAULT_SKIP_PRICE = 4.0

#: Rule "filter": a prompt whose posterior mean pass rate is <= band or >= 1 - band is skipped.
DEFAULT_FILTER_BAND = 0.1
#: The rules that weigh prompts by their variance, hence take a per-prompt noise scale (``noise_scale``).
NOISE_SCALE_RULES = ("neyman", "proportional")


def filter_counts(means, variances, budget: int, lo: int, hi: int, band: float) -> np.ndarray:
    """The "filter" rule (what DAPO/GRESO-style filtering does without variable n), computed by the core
    (:func:`~dynamo_openrlhf._core.filter_counts`): prompts whose posterior mean pass rate ``means`` (N,) lies
    outside (``band``, 1 − ``band``) get 0 rollouts, the others share ``budget`` evenly within [``lo``, ``hi``]
    (the core's uniform rule: ``budget // K`` each, the remainder one each to the first kept prompts). If the
    kept prompts cannot absorb the budget at ``hi`` each, skipped prompts are readmitted, largest expected
    variance ``variances`` first (ties: lower index), until they can; if none are kept, every prompt is. int64
    (N,), sums to ``budget``. ValueError (the core's message) for a band outside [0, 0.5), arrays that are not
    1-D of one length, a mean outside [0, 1], a NaN/infinite/negative variance or an infeasible budget."""
    return core_filter_counts(means, variances, int(budget), int(lo), int(hi), float(band))


def default_bounds(n_samples_per_prompt: int, oversample: float) -> Tuple[int, int]:
    """(lo, hi) when not given: n - floor(n/4) .. n + floor(n/4) (12..20 for n = 16, 6..10 for n = 8); with
    over-sampling (``oversample > 1``) 0..4n, so that prompts can be skipped (0..64 for n = 16).

    Narrower than the reference's n/2..3n/2 because of a measurement (docs/noise_model.md): on our model
    p(1-p) mis-ranks the prompts whose rare outcomes carry most of the update's variance, and the wide
    bounds let the allocation starve them (1.09x uniform's variance over 8 batches at 2..16, 1.07x at
    n/2..3n/2, 0.99x at n +- n/4)."""
    n = int(n_samples_per_prompt)
    if oversample > 1.0:
        return 0, 4 * n
    return n - n // 4, n + n // 4


#: Variance models of the allocator (the core's ``estimator=`` names); None = Σ v/n.
SHIFTED_ESTIMATORS = ("rloo", "dr_grpo", "reinforce_baseline")
VARIANCE_MODELS = (None,) + tuple(CORE_ESTIMATORS)


def prompt_costs(variances, counts, estimator: Optional[str] = None, alpha=None, beta=None,
                 skip_costs=None) -> np.ndarray:
    """Each prompt's predicted variance (up to the common score-noise factor) of its contribution to the
    update, at its count, under the allocator's model of ``estimator`` (float64, (N,)).

    None (and "reinforce"/"gae", which have no group baseline): v/n; "rloo", "dr_grpo",
    "reinforce_baseline": v/(n−1) (the prompt-balanced update's variance; the mean-baseline estimators
    rescaled by n/(n−1) are RLOO); "group_norm": the core's v·(n−1)/(n²·P(n)) from the Beta posterior
    (``alpha``, ``beta`` needed). A skipped prompt (n = 0), or a group of one for the baseline
    estimators, costs v: it loses its signal; with ``skip_costs`` (N,) (priced skipping, in the unit of v)
    a skipped prompt costs its skip cost instead."""
    v = np.asarray(variances, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if skip_costs is not None:
        sc = np.asarray(skip_costs, dtype=np.float64)
        if sc.shape != v.shape:
            raise ValueError(f"prompt_costs: skip_costs has shape {sc.shape}, variances {v.shape}")
        return np.where(n == 0, sc, prompt_costs(v, counts, estimator, alpha, beta))
    if estimator is None:
        return v * np.where(n > 0, 1.0 / np.maximum(n, 1.0), 1.0)
    if estimator in SHIFTED_ESTIMATORS:
        return v * np.where(n >= 2, 1.0 / np.maximum(n - 1.0, 1.0), 1.0)
    if estimator == "group_norm":
        if alpha is None or beta is None:
            raise ValueError("the group_norm variance model needs the Beta posteriors (alpha, beta)")
        # the core's own cost (the one the allocator minimises), weighted by v (calibrated when allocating on it)
        costs = group_norm_costs(np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64), v,
                                 np.maximum(n, 0).astype(np.int64))
        return np.where(n >= 2, costs, v)
    raise ValueError(f"unknown variance model {estimator!r}; expected one of {list(VARIANCE_MODELS)}")


def predicted_variance_ratio(variances: np.ndarray, counts: np.ndarray, estimator: Optional[str] = None,
                             alpha=None, beta=None, scale=None, skip_costs=None) -> float:
    """J(n) / J(uniform) for one step, J(n) = Σ_i cost_i(n_i) (:func:`prompt_costs` under ``estimator``'s
    model); uniform spreads the same budget B evenly over the same N prompts. Without an estimator
    J(uniform) = Σ v × N / B (today's formula, fractional B/N allowed); with one, when B/N is not an
    integer, each prompt's uniform cost interpolates linearly between its costs at ⌊B/N⌋ and ⌈B/N⌉
    (the mean over which prompts get the extra rollout). ``scale`` (N,) > 0 or None: each prompt's noise
    scale ŝ_i; every cost model is linear in v, so J uses ŝ_i·v_i (e.g. Σ ŝ v/(n−1) over uniform's). 1.0
    when J(uniform) is 0. ``skip_costs`` (N,) or None: priced skipping's cost of each skipped prompt (also
    times ŝ); J(n) is then the predicted mean squared error (variance plus the skipped prompts' squared bias)
    and uniform, which skips nothing, its variance."""
    v = np.asarray(variances, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    sc = None if skip_costs is None else np.asarray(skip_costs, dtype=np.float64)
    if scale is not None:
        s = np.asarray(scale, dtype=np.float64)
        if s.shape != v.shape:
            raise ValueError(f"predicted_variance_ratio: scale has shape {s.shape}, variances {v.shape}")
        v = v * s
        sc = None if sc is None else sc * s
    budget = float(n.sum())
    if budget <= 0 or v.size == 0:
        return 1.0
    if estimator is None:
        base = float(v.sum()) * len(v) / budget
    else:
        n0 = budget / len(v)
        lo_n = math.floor(n0)
        frac = n0 - lo_n
        base = float(np.sum(prompt_costs(v, np.full(v.shape, lo_n), estimator, alpha, beta)))
        if frac > 0:
            hi_cost = float(np.sum(prompt_costs(v, np.full(v.shape, lo_n + 1), estimator, alpha, beta)))
            base = (1.0 - frac) * base + frac * hi_cost
    if base <= 0.0:
        return 1.0
    return float(np.sum(prompt_costs(v, n, estimator, alpha, beta, sc))) / base


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
    """The ``--dynamo.allocation.*`` / ``--dynamo.pool.*`` settings (units: rollouts, prompts, steps).

    ``rule``: "neyman" (exact variance minimiser), "proportional" (the reference's n ∝ v), "uniform"
    (OpenRLHF's n each) or "filter" (skip prompts whose posterior mean pass rate is within ``filter_band``
    of 0 or 1, uniform n on the rest: :func:`filter_counts`). ``n_samples_per_prompt`` x ``prompts_per_step`` is the per-step budget;
    ``oversample`` >= 1 draws ``round(oversample x prompts_per_step)`` candidate prompts per step
    (needs ``lo = 0`` room: ``lo x candidates <= budget``). ``lo``/``hi``: per-prompt bounds.
    ``skip_factor``: with lo = 0 and rule neyman, skip prompts whose expected variance is below
    ``skip_factor`` x the allocation's shadow price (None: no skip rule); ``min_rollouts``: with lo = 0,
    a prompt gets 0 or at least this many. ``explore_seed``: with the skip rule, a prompt is skipped only if a
    seeded draw from its (capped) posterior also falls below the cut, so skipped prompts keep being
    re-probed (None: no exploration). ``calibrated``: allocate on the pool's revisit-calibrated
    variance (:meth:`PassRatePool.calibrated_variance`). ``exploration``/``mastery``
    and their numbers are the reference's options (None = the rule's default). Pool: prior
    Beta(``prior``), per-step forgetting ``forget``, empirical-Bayes prior refit every
    ``fit_prior_every`` steps (0 = never). A sample is a success when its score (its reward if the
    reward function gives no score) is > ``success_threshold``. ``estimator``: the variance model the
    allocation minimises and ``dynamo/pred_var_ratio`` predicts with (:data:`VARIANCE_MODELS`: None = Σ v/n,
    "rloo"/"dr_grpo"/"reinforce_baseline" = Σ v/(n−1), "group_norm" = the core's Beta-moment model); the
    trainer sets it from ``--algo.advantage.estimator`` ("reinforce"/"gae" → None). Rule neyman only
    passes it to the core (uniform and proportional do not optimise a variance). ``noise_scale``: None (off)
    or the per-rollout proxy (:data:`~dynamo_openrlhf.noise_proxy.NOISE_PROXIES`) the pool learns each
    prompt's noise scale ŝ_i from; rules neyman and proportional then allocate on ŝ_i·v_i
    (``PassRatePool.allocate(noise_scale=True)``) and ``dynamo/pred_var_ratio`` predicts with it.
    ``skip_price``: κ > 0 of priced skipping (rule neyman, an rloo-family estimator, lo 0, ``min_rollouts``
    >= 2): the exact minimiser of Σ_served v/(n−1) + κ Σ_skipped E[p²(1−p)²] (``PassRatePool.allocate
    (skip_price=)``, docs/allocation_objectives.md); ``explore_seed`` then raises each skip cost to a capped
    posterior draw's where larger, so settled-looking prompts are re-probed. None: off.
    """

    rule: str = "neyman"
    n_samples_per_prompt: int = 16
    prompts_per_step: int = 512
    lo: int = 8
    hi: int = 24
    oversample: float = 1.0
    skip_factor: Optional[float] = None
    min_rollouts: Optional[int] = None
    calibrated: bool = False
    exploration: Optional[bool] = None
    exploration_rollouts: Optional[int] = None
    mastery: Optional[bool] = None
    mastery_threshold: Optional[float] = None
    priority_floor: Optional[float] = None
    prior: Tuple[float, float] = (1.0, 1.0)
    forget: float = 0.999
    fit_prior_every: int = 10
    success_threshold: float = 0.5
    estimator: Optional[str] = None
    explore_seed: Optional[int] = None
    filter_band: Optional[float] = None
    noise_scale: Optional[str] = None
    skip_price: Optional[float] = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_args(cls, args) -> Optional["AllocationConfig"]:
        """The run's config from OpenRLHF's nested args (``--dynamo.allocation.*``, ``--dynamo.pool.*``,
        ``--rollout.*`` and ``--algo.advantage.estimator``); None with rule ``off``. Fills the defaults
        that depend on the run (bounds, skip rule, ``min_rollouts``, the estimator's variance model).
        Raises ValueError naming the flags when the settings are invalid or the budget infeasible."""
        from dynamo_openrlhf.advantages import ESTIMATORS

        al, pool = args.dynamo.allocation, args.dynamo.pool
        noise = getattr(al, "noise_scale", None)
        noise = None if noise in (None, "off") else noise
        if al.rule == "off":
            if noise is not None:
                raise ValueError(f"--dynamo.allocation.noise_scale {noise} needs the pass-rate pool of an allocation "
                                 f"rule ({' or '.join(NOISE_SCALE_RULES)}), not --dynamo.allocation.rule off")
            return None
        n, bs = args.rollout.n_samples_per_prompt, args.rollout.batch_size
        # The allocator's variance model: the run's advantage estimator ("reinforce"/"gae": none, sum v/n).
        name = args.algo.advantage.estimator
        estimator = ESTIMATORS[name].variance_model if name in ESTIMATORS else None
        lo_default, hi_default = default_bounds(n, al.oversample)
        if estimator is not None and lo_default == 1:
            lo_default = 2  # a baseline needs a group of two (n = 2: everybody gets 2)
        lo = lo_default if al.lo is None else al.lo
        hi = hi_default if al.hi is None else al.hi
        skip, min_rollouts = al.skip_factor, al.min_rollouts
        if skip is None:
            # The skip rule is derived for sum v/n; with a baseline estimator, lo 0 selects by min_rollouts.
            skip = 4.0 if lo == 0 and al.rule == "neyman" and estimator is None else None
        if min_rollouts is None:
            min_rollouts = 2 if lo == 0 and al.rule == "neyman" and hi >= 2 else None
        price = getattr(al, "skip_price", None)
        if price is None:
            # With lo 0 the rloo family's objective prices what a skipped prompt's signal is worth.
            priced = lo == 0 and al.rule == "neyman" and estimator in SHIFTED_ESTIMATORS and (min_rollouts or 0) >= 2
            price = DEFAULT_SKIP_PRICE if priced else None
        # Skip decisions explore (seeded draws from a capped posterior) unless --dynamo.allocation.explore_seed -1.
        explore_seed = getattr(al, "explore_seed", None)
        if explore_seed is None:
            explore_seed = int(getattr(args.train, "seed", 0) or 0)
        explore_seed = explore_seed if ((skip or price) and explore_seed >= 0) else None
        band = getattr(al, "filter_band", None)
        if band is None and al.rule == "filter":
            band = DEFAULT_FILTER_BAND
        return cls(
            rule=al.rule, n_samples_per_prompt=n, prompts_per_step=bs, lo=lo, hi=hi, oversample=al.oversample,
            skip_factor=skip or None, min_rollouts=min_rollouts or None,
            calibrated=bool(pool.calibrated) and al.rule not in ("uniform", "filter"), exploration=al.exploration,
            exploration_rollouts=al.exploration_rollouts, mastery=al.mastery, mastery_threshold=al.mastery_threshold,
            priority_floor=al.priority_floor, prior=tuple(pool.prior), forget=pool.forget,
            fit_prior_every=pool.fit_prior_every, success_threshold=pool.success_threshold, estimator=estimator,
            explore_seed=explore_seed, filter_band=band, noise_scale=noise, skip_price=price or None,
        )

    @property
    def candidates_per_step(self) -> int:
        return max(1, int(round(self.oversample * self.prompts_per_step)))

    @property
    def budget(self) -> int:
        """Rollouts per full step: prompts_per_step x n_samples_per_prompt."""
        return self.prompts_per_step * self.n_samples_per_prompt

    def budget_for(self, num_candidates: int) -> int:
        """Budget of a step with ``num_candidates`` prompts (fewer than a full step only at the end of
        the data): what OpenRLHF would spend on min(num_candidates, prompts_per_step) prompts."""
        return self.n_samples_per_prompt * min(int(num_candidates), self.prompts_per_step)

    def samples_per_pass(self, num_prompts: int) -> int:
        """Rollouts of one pass over ``num_prompts`` prompts: full steps of ``candidates_per_step``
        prompts, each spending :attr:`budget`, then the remainder's :meth:`budget_for` (the loop of
        :class:`~dynamo_openrlhf.samples_generator.DynamoSamplesGenerator`)."""
        m = self.candidates_per_step
        full, rest = divmod(int(num_prompts), m)
        return full * self.budget + (self.budget_for(rest) if rest else 0)

    def scheduler_steps(self, num_prompts: int, train_batch_size: int, num_episodes: int, max_epochs: int) -> int:
        """Optimizer steps of the run for the LR scheduler: OpenRLHF 0.11.2's own formula
        (``prepare_datasets``: prompts x n_samples_per_prompt // train_batch_size x episodes x max_epochs)
        with the rollouts actually generated per pass (:meth:`samples_per_pass`) in place of prompts x
        n. Without over-sampling they are equal; with it, a pass spends fewer rollouts."""
        return self.samples_per_pass(num_prompts) // int(train_batch_size) * int(num_episodes) * int(max_epochs)

    def problems(self) -> list:
        """Everything wrong with the settings, as flag-named messages (empty when valid)."""
        p = []
        if self.rule not in ALLOCATION_RULES:
            p.append(f"--dynamo.allocation.rule: unknown rule {self.rule!r}; expected one of {list(ALLOCATION_RULES)}")
        # "filter" is the trainer's rule name (the core's filter_counts in front of its rule uniform): which
        # rule takes a band is said here; the band's value is judged by the core (_core_problems)
        if self.filter_band is not None and self.rule != "filter":
            p.append(f"--dynamo.allocation.filter_band {self.filter_band}: needs --dynamo.allocation.rule filter, "
                     f"got rule {self.rule} (it has no band)")
        if self.rule == "filter" and self.filter_band is None:
            p.append("rule filter needs filter_band")
        if self.noise_scale is not None and self.noise_scale not in NOISE_PROXIES:
            # the proxies are computed here (noise_proxy.py); the core only takes the switch (_core_problems)
            p.append(f"--dynamo.allocation.noise_scale: unknown proxy {self.noise_scale!r}; expected one of "
                     f"{list(NOISE_PROXIES)} or off")
        if self.n_samples_per_prompt < 1 or self.prompts_per_step < 1:
            p.append("--rollout.n_samples_per_prompt and --rollout.batch_size must be >= 1")
            return p
        if not (math.isfinite(self.oversample) and self.oversample >= 1.0):
            p.append(f"--dynamo.allocation.oversample must be a finite number >= 1, got {self.oversample}")
            return p
        seed = self.explore_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            # the flag's -1 (no exploration) is None here; the core takes a seed as an unsigned integer
            p.append(f"--dynamo.allocation.explore_seed must be an integer >= 0 here (None: no exploration), got {seed!r}")
            return p
        p.extend(self._core_problems().values())
        p.extend(self._estimator_problems())
        if self.fit_prior_every < 0:
            p.append(f"--dynamo.pool.fit_prior_every must be >= 0, got {self.fit_prior_every}")
        return p

    def _core_problems(self) -> Dict[str, str]:
        """The core's own checks (:func:`~dynamo_openrlhf._core.allocation_problems`) of the allocations this
        config makes, each message prefixed with the flags it is about: a full step (``budget`` over
        ``candidates_per_step`` prompts) with the switches as :meth:`RolloutAllocator._options` passes them
        (``explore_seed`` even without a skip rule, where the allocator would drop it: the core refuses that) and
        the run policies (``run_policies=True``: the skip rule's rollouts per candidate), the pool's prior and
        forgetting, and a step of one prompt (``n_samples_per_prompt`` rollouts: a step at the end of the data has
        fewer prompts than ``prompts_per_step``, each spending n). Keyed by the core's subject
        (:data:`~dynamo_openrlhf._core.PROBLEM_SUBJECTS`), in its order."""
        n, m, b = self.n_samples_per_prompt, self.candidates_per_step, self.budget
        rule = self.rule if self.rule in RULES else "uniform" if self.rule == "filter" else None
        neyman = self.rule == "neyman"
        reference = {k: getattr(self, k) for k in ("exploration", "mastery", "exploration_rollouts",
                                                    "mastery_threshold", "priority_floor")}
        step = allocation_problems(
            m, b, self.lo, self.hi, rule,
            estimator=self.estimator if neyman and self.estimator in CORE_ESTIMATORS else None,
            skip_factor=self.skip_factor or None,
            min_rollouts=self.min_rollouts if self.min_rollouts is not None and self.min_rollouts > 1 else None,
            calibrated=True if self.calibrated else None, explore_seed=self.explore_seed,
            noise_scale=True if self.noise_scale in NOISE_PROXIES else None,
            filter_band=None if self.rule != "filter" or self.filter_band is None else float(self.filter_band),
            skip_price=None if self.skip_price is None else float(self.skip_price),
            prior=(float(self.prior[0]), float(self.prior[1])), forget=float(self.forget), run_policies=True,
            **reference)
        last = dict(allocation_problems(1, n, self.lo, self.hi)).get("budget")
        if last is not None:  # n outside [lo, hi]: the cause of any full step's infeasibility too
            last = (f"--dynamo.allocation.lo/hi must admit --rollout.n_samples_per_prompt {n} (a step at the end of "
                    f"the data has fewer prompts, {n} rollouts each): {last}")
        rule_note = " (rule filter allocates with the core's rule uniform)" if self.rule == "filter" else ""
        flags = {"bounds": "--dynamo.allocation.lo/hi", "prior": "--dynamo.pool.prior", "forget": "--dynamo.pool.forget",
                 "estimator": f"--algo.advantage.estimator {self.estimator} with --dynamo.allocation.rule neyman",
                 "reference_options": f"--dynamo.allocation.exploration/mastery options{rule_note}",
                 "calibrated": f"--dynamo.pool.calibrated{rule_note}",
                 "skip_price": (f"--dynamo.allocation.skip_price {self.skip_price} (0 = off) with "
                                f"--dynamo.allocation.rule/lo/min_rollouts and --algo.advantage.estimator{rule_note}"),
                 "explore_seed": f"--dynamo.allocation.explore_seed {self.explore_seed} (-1 = off)",
                 "filter_band": "--dynamo.allocation.filter_band",
                 "noise_scale": f"--dynamo.allocation.noise_scale {self.noise_scale} with --dynamo.allocation.rule "
                                f"{self.rule}{rule_note}"}
        p = {"budget": last} if last is not None else {}
        for subject, message in step:
            if subject == "budget":
                p["budget"] = last or (
                    f"infeasible rollout budget: --rollout.batch_size {self.prompts_per_step} x "
                    f"--rollout.n_samples_per_prompt {n} = {b} rollouts over {m} candidate prompts: {message}; "
                    "change --dynamo.allocation.lo/hi or lower --dynamo.allocation.oversample")
            elif subject == "noise_scale":
                p[subject] = f"{flags[subject]}: {message}; use --dynamo.allocation.noise_scale off"
            elif subject == "skip_budget":
                # a run policy the core keeps with its rules (rules.rs check_skip_budget): a standalone call skips
                p[subject] = (f"--dynamo.allocation.skip_factor with --dynamo.allocation.oversample {self.oversample:g} "
                              f"and --rollout.n_samples_per_prompt {n}: {message}; lower --dynamo.allocation.oversample "
                              "or set --dynamo.allocation.skip_factor 0")
            else:
                p[subject] = f"{flags.get(subject, f'--dynamo.allocation.{subject}{rule_note}')}: {message}"
        return p

    def _estimator_problems(self) -> list:
        """What the core's checks cannot see: an estimator name without a variance model (the core would raise
        on the name instead of listing a problem)."""
        e = self.estimator
        if e is not None and e not in CORE_ESTIMATORS:
            return [f"--algo.advantage.estimator {e}: no allocation variance model; expected one of "
                    f"{list(CORE_ESTIMATORS)} (or none)"]
        return []


def calibration_scores(predicted, successes, trials) -> Dict[str, float]:
    """How well pass-rate predictions ``predicted`` (per group, e.g. the pool's posterior means before the
    step's update) matched the step's outcomes (``successes`` of ``trials`` per group), over the step's
    rollouts: ``dynamo/pool_brier`` = mean over rollouts of (p̂ − y)² (y = 1 for a success),
    ``dynamo/pool_pred_mean`` = trial-weighted mean of p̂, ``dynamo/pool_real_mean`` = successes / trials.
    Empty dict when there are no trials."""
    p = np.asarray(predicted, dtype=np.float64)
    s = np.asarray(successes, dtype=np.float64)
    t = np.asarray(trials, dtype=np.float64)
    total = float(t.sum())
    if total <= 0:
        return {}
    brier = float(np.sum(s * (1.0 - p) ** 2 + (t - s) * p ** 2)) / total
    return {
        "dynamo/pool_brier": brier,
        "dynamo/pool_pred_mean": float(np.sum(t * p)) / total,
        "dynamo/pool_real_mean": float(s.sum()) / total,
    }


def noise_scale_metrics(scale) -> Dict[str, float]:
    """The log line's view of one step's noise scales ``scale`` (N,) (ŝ of the step's candidate prompts,
    in the proxy's unit): ``dynamo/noise_scale_mean`` = their mean; ``dynamo/noise_scale_spread`` = the
    ratio of their 90th to their 10th percentile (NumPy's linear interpolation; 1 = every prompt alike;
    robust to one outlier, unlike max/min). Empty dict for no prompts."""
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0:
        return {}
    p10, p90 = np.quantile(s, [0.1, 0.9])
    return {"dynamo/noise_scale_mean": float(s.mean()),
            "dynamo/noise_scale_spread": float(p90 / p10) if p10 > 0 else float("inf")}


@dataclasses.dataclass(frozen=True)
class AllocationStep:
    """One step's allocation: ``counts`` (N,) int64 per candidate prompt, the posterior expected
    variances ``variances`` (N,) it was made from, and the ``budget`` (rollouts allocated; with dynamic
    filtering's refills, :meth:`RolloutAllocator.allocate_refill`, the refill prompts are appended and
    ``budget`` counts their rollouts too, dropped groups' included). ``scale`` (N,): the pool's noise
    scale ŝ of each prompt when the allocation weighed the variances by it (None: off)."""

    counts: np.ndarray
    variances: np.ndarray
    budget: int
    estimator: Optional[str] = None
    alpha: Optional[np.ndarray] = None
    beta: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None
    skip_costs: Optional[np.ndarray] = None
    refills: int = 0  # refill allocations appended (dynamic filtering: RolloutAllocator.allocate_refill)

    def metrics(self) -> Dict[str, float]:
        c = self.counts
        used = c[c > 0]
        noise = noise_scale_metrics(self.scale) if self.scale is not None else {}
        return {
            "dynamo/alloc_min": float(used.min()) if used.size else 0.0,
            "dynamo/alloc_mean": float(used.mean()) if used.size else 0.0,
            "dynamo/alloc_max": float(c.max()) if c.size else 0.0,
            "dynamo/alloc_skipped": float((c == 0).sum()),
            "dynamo/alloc_prompts": float(used.size),
            "dynamo/alloc_candidates": float(c.size),
            "dynamo/alloc_budget": float(self.budget),
            "dynamo/pred_var_ratio": predicted_variance_ratio(self.variances, c, self.estimator, self.alpha,
                                                              self.beta, self.scale, self.skip_costs),
            **noise,
        }


def load_pool(path: str, forget: float) -> PassRatePool:
    """The pass-rate pool file ``path`` (``--dynamo.pool.load``) for a run whose forgetting factor is
    ``forget`` (``--dynamo.pool.forget``): the file's evidence, prior and calibration, with the run's
    ``forget`` (the flag wins over the file's value, as when resuming from a checkpoint). Raises
    ValueError naming the flag and the file when it is missing or not a pool file, or when ``forget``
    is outside (0, 1]."""
    try:
        pool = PassRatePool.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--dynamo.pool.load {path}: {e}") from None
    try:
        pool.forget = forget
    except ValueError as e:
        raise ValueError(f"--dynamo.pool.forget: {e}") from None
    return pool


class RolloutAllocator:
    """Allocates each step's rollouts from a :class:`PassRatePool` and keeps the pool up to date."""

    def __init__(self, config: AllocationConfig, pool: Optional[PassRatePool] = None) -> None:
        self.config = config
        self.pool = pool if pool is not None else PassRatePool(prior=tuple(config.prior), forget=config.forget)
        self.steps = 0  # record() calls
        self.last: Optional[AllocationStep] = None
        self._last_record: Dict[str, float] = {}

    # -- allocation --------------------------------------------------------------------------
    def _options(self) -> Dict[str, Any]:
        c = self.config
        opts = {k: getattr(c, k) for k in ("exploration", "exploration_rollouts", "mastery", "mastery_threshold",
                                           "priority_floor") if getattr(c, k) is not None}
        if c.skip_factor:
            opts["skip_factor"] = c.skip_factor
            if c.explore_seed is not None:
                opts["explore_seed"] = c.explore_seed
        if c.min_rollouts is not None and c.min_rollouts > 1:
            opts["min_rollouts"] = c.min_rollouts
        if c.skip_price is not None:
            opts["skip_price"] = c.skip_price
            if c.explore_seed is not None:
                opts["explore_seed"] = c.explore_seed
        if c.calibrated:
            opts["calibrated"] = True
        if c.estimator is not None and c.rule == "neyman":
            opts["estimator"] = c.estimator
        if c.noise_scale is not None:
            opts["noise_scale"] = True  # the pool's own ŝ, read in the same lookup as the variances
        return opts

    def allocate(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """int64 counts (N,) for the step's N candidate prompts; ``counts.sum() == budget_for(N)``. With
        ``noise_scale`` on, the pool allocates on ŝ·v (ŝ = ``pool.noise_scale(ids)``, kept for the metrics)."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        c = self.config
        budget = c.budget_for(ids.size)
        v = self._variances(ids)
        counts = self._rule_counts(ids, v, budget)
        if int(counts.sum()) != budget:  # the core guarantees it; a broken build must not go unnoticed
            raise RuntimeError(f"allocation spent {int(counts.sum())} rollouts, budget {budget}")
        self.last = AllocationStep(counts=counts, variances=v, budget=budget, estimator=c.estimator,
                                   **self._step_details(ids))
        return counts

    def _variances(self, ids: np.ndarray) -> np.ndarray:
        c = self.config
        return self.pool.calibrated_variance(ids) if c.calibrated else self.pool.expected_variance(ids)

    def _rule_counts(self, ids: np.ndarray, v: np.ndarray, budget: int) -> np.ndarray:
        """int64 counts (N,) of the run's rule spending ``budget`` on ``ids`` (variances ``v``)."""
        c = self.config
        if c.rule == "filter":
            counts = filter_counts(self.pool.mean(ids), v, budget, c.lo, c.hi, c.filter_band)
        else:
            counts = self.pool.allocate(ids, budget, c.lo, c.hi, c.rule, **self._options())
        return np.asarray(counts, dtype=np.int64)

    def _step_details(self, ids: np.ndarray) -> Dict[str, Optional[np.ndarray]]:
        """The per-prompt inputs of the step's metrics beside the variances: group_norm's posterior (alpha, beta),
        the noise scale, the skip costs the allocation priced (same pool state: same draws); None when unused."""
        c = self.config
        alpha = beta = None
        if c.estimator == "group_norm":
            a0, b0 = self.pool.prior
            succ, fail = self.pool.evidence(ids)
            alpha, beta = a0 + succ, b0 + fail
        scale = self.pool.noise_scale(ids) if c.noise_scale is not None else None
        skip_costs = None
        if c.skip_price is not None:
            skip_costs = self.pool.skip_costs(ids, c.skip_price, calibrated=c.calibrated, explore_seed=c.explore_seed)
        return {"alpha": alpha, "beta": beta, "scale": scale, "skip_costs": skip_costs}

    def allocate_refill(self, prompt_ids: Sequence[int], budget: int) -> np.ndarray:
        """int64 counts (N,) that spend up to ``budget`` rollouts (those of the groups dynamic filtering dropped
        this step) on N refill prompts, by the run's rule from the pool as it stands (the dropped groups are
        not learnt yet: the pool learns the whole step once, after it). Spends
        min(``budget``, hi·N); with lo > 0 and lo·N > ``budget`` only the first ``budget // lo`` prompts are
        allocated (the others get 0). The step's :attr:`last` is extended (its counts, variances, ... get
        the refill prompts appended, its budget the rollouts spent), so that ``last`` describes every
        rollout the step allocated. ValueError for a negative budget or before the step's :meth:`allocate`."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"allocate_refill: budget must be an integer >= 0 (rollouts), got {budget!r}")
        if self.last is None:
            raise ValueError("allocate_refill: no allocation this step yet (call allocate first)")
        c = self.config
        spend = min(int(budget), c.hi * ids.size)
        served = ids.size if c.lo == 0 else min(ids.size, spend // c.lo)
        counts = np.zeros(ids.size, dtype=np.int64)
        if served and spend:
            sub = ids[:served]
            counts[:served] = self._rule_counts(sub, self._variances(sub), spend)
        if int(counts.sum()) != (spend if served else 0):
            raise RuntimeError(f"refill allocation spent {int(counts.sum())} rollouts, budget {spend}")
        step = self.last
        details = self._step_details(ids)
        cat = (lambda old, new: None if old is None else np.concatenate([old, np.asarray(new)]))
        self.last = dataclasses.replace(
            step, counts=np.concatenate([step.counts, counts]),
            variances=np.concatenate([step.variances, self._variances(ids)]),
            budget=step.budget + int(counts.sum()), refills=step.refills + 1,
            **{k: cat(getattr(step, k), v) for k, v in details.items()})
        return counts

    # -- pool update ---------------------------------------------------------------------------
    def record(self, prompt_ids: Sequence[int], successes: Sequence[int], trials: Sequence[int], *,
               noise_success=None, noise_failure=None) -> None:
        """One training step's verified outcomes, one row per group (repeated ids add up).
        ``noise_success``/``noise_failure`` (both or neither, float (M,)): per row, the sum of the
        noise proxy q over its successful / failed rollouts, passed on to :meth:`PassRatePool.update`."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        s = np.asarray(successes, dtype=np.int64)
        t = np.asarray(trials, dtype=np.int64)
        # Score the pool's predictions on this step's prompts BEFORE it learns from them.
        scores = calibration_scores(self.pool.mean(ids), s, t) if ids.size else {}
        self.pool.update(ids, s, t, noise_success=noise_success, noise_failure=noise_failure)
        self.steps += 1
        refit = self.config.fit_prior_every > 0 and self.steps % self.config.fit_prior_every == 0
        fitted = 0.0
        if refit:
            try:
                self.pool.fit_prior()
                fitted = 1.0
            except ValueError:
                pass  # too little or degenerate evidence yet (e.g. every pass rate 0): keep the prior
        posterior = self.pool.mean(ids)
        self._last_record = {
            "dynamo/step_groups": float(ids.size),
            "dynamo/step_trials": float(t.sum()),
            "dynamo/step_successes": float(s.sum()),
            "dynamo/batch_posterior_mean": float(posterior.mean()) if posterior.size else 0.0,
            "dynamo/prior_refit": fitted,
            **scores,
        }

    # -- logging -------------------------------------------------------------------------------
    def metrics(self) -> Dict[str, float]:
        """The last allocation's and pool update's numbers, plus pool totals (O(pool))."""
        out = dict(self.last.metrics()) if self.last is not None else {}
        out.update(self._last_record)
        st = self.pool.stats()
        evidence = st["successes"] + st["failures"]
        a, b = self.pool.prior
        out.update({
            "dynamo/pool_size": float(st["prompts"]),
            "dynamo/pool_mean_pass_rate": float(st["successes"] / evidence) if evidence > 0 else a / (a + b),
            "dynamo/pool_prior_alpha": float(a),
            "dynamo/pool_prior_beta": float(b),
        })
        return out

    # -- checkpoint state ----------------------------------------------------------------------
    def pool_digest(self) -> str:
        """sha256 (hex) of the pool's file format (:meth:`PassRatePool.to_bytes`): equal digests mean
        bit-identical pools."""
        return hashlib.sha256(self.pool.to_bytes()).hexdigest()

    def state_dict(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "pool": self.pool.to_bytes(), "steps": self.steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"allocator state version {version!r} is not supported (expected {STATE_VERSION})")
        self.pool = PassRatePool.from_bytes(state["pool"])
        self.steps = int(state["steps"])
        if self.pool.forget != self.config.forget:
            self.pool.forget = self.config.forget  # the flag of this run wins from the next update on
