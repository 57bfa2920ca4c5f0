"""Type stub of the compiled module ``dynamo_openrlhf._core`` (Rust, PyO3).

Everything here is re-exported by ``dynamo_openrlhf``; import it from there.
Array arguments accept any 1-D array-like (lists, NumPy arrays of any stride). Float arrays
are used as float64 (float32 and integer input is converted; a contiguous float64 array is
used without a copy). Integer arrays (ids, counts) must have an integer dtype and are used as
int64. Large inputs are processed with the GIL released and on all cores.
"""

from os import PathLike
from typing import Literal, TypedDict, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ESTIMATORS",
    "FORMAT_VERSION",
    "PassRatePool",
    "PROBLEM_SUBJECTS",
    "RULES",
    "__version__",
    "allocate_rollouts",
    "allocation_problems",
    "filter_counts",
    "group_norm_costs",
]

__version__: str
#: The allocation rules, in the order of the ``rule`` argument's documentation.
RULES: tuple[str, str, str]
#: The accepted ``estimator`` names (OpenRLHF's ``--algo.advantage.estimator`` values whose
#: update variance the allocator can target); ``None`` is accepted too (the Σ v/n objective).
ESTIMATORS: tuple[str, str, str, str]
#: Version of the pool file format written by :meth:`PassRatePool.save`.
FORMAT_VERSION: int
#: What a problem of :func:`allocation_problems` is about, in the order problems are listed.
PROBLEM_SUBJECTS: tuple[str, str, str, str, str, str, str, str, str, str, str, str, str, str]

_Rule = Literal["neyman", "proportional", "uniform"]
_Estimator = Literal["rloo", "dr_grpo", "reinforce_baseline", "group_norm"]
_Subject = Literal[
    "bounds", "budget", "reference_options", "calibrated", "noise_scale", "filter_band", "skip_factor",
    "skip_budget", "min_rollouts", "estimator", "skip_price", "explore_seed", "prior", "forget",
]
_FloatArrayLike = npt.ArrayLike
_IntArrayLike = npt.ArrayLike

def allocate_rollouts(
    variances: _FloatArrayLike,
    budget: int,
    lo: int,
    hi: int,
    rule: _Rule = "neyman",
    *,
    unseen: npt.ArrayLike | None = None,
    exploration_rollouts: int | None = None,
    pass_rates: _FloatArrayLike | None = None,
    mastery_threshold: float | None = None,
    priority_floor: float | None = None,
    skip_factor: float | None = None,
    min_rollouts: int | None = None,
    estimator: _Estimator | None = None,
    scale: _FloatArrayLike | None = None,
    skip_costs: _FloatArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """Split ``budget`` rollouts over N prompts, each getting between ``lo`` and ``hi``.

    Args:
        variances: shape (N,), the per-prompt reward variance v_i (e.g. p_i(1 - p_i) of a
            Bernoulli reward, or an estimate such as k(G-k)/(G(G-1)) from k successes in G
            rollouts). Finite and >= 0.
        budget: total number of rollouts B (e.g. prompts x mean rollouts: 512 * 16).
        lo, hi: per-prompt bounds, 0 <= lo <= hi. ``lo = 0`` lets a prompt be skipped.
        rule: how to split (below).

    Returns:
        int64 array of shape (N,) with ``lo <= n_i <= hi`` and ``n.sum() == budget`` exactly,
        for every rule and option.

    Rules:
        ``"neyman"`` (default): the exact integer minimiser of sum_i v_i / n_i subject to
        sum n_i = budget and lo <= n_i <= hi. It equals the greedy that hands out rollouts one
        at a time by largest marginal gain g_i(n) = v_i/n - v_i/(n+1) = v_i/(n(n+1))
        (computed in float64 exactly like that); the solver finds the same result in a few
        vectorised O(N) passes. Tie rule: among equal gains the prompt with fewer rollouts so
        far goes first, then the lower index. Consequences: with all v_i = 0 the result is the
        near-uniform spread (the first ``budget % N`` prompts get one more); zero-variance
        prompts sit at ``lo`` and receive only what the positive-variance prompts cannot
        absorb at ``hi``.

        With ``lo = 0``, a positive-variance prompt with 0 rollouts would make the objective
        infinite: if ``budget >= #(v > 0)`` every such prompt gets at least one rollout and the
        result is the exact finite optimum (zero-variance prompts get 0 unless the budget
        forces more); if ``budget < #(v > 0)`` the ``budget`` prompts with the largest v get
        one rollout each (ties: lower index).

        ``"proportional"``: the DynaMO reference code's rule, kept to reproduce the paper.
        Priorities w_i = max(v_i, priority_floor); continuous n_i = clamp(c * w_i, lo, hi) with
        c set so that the total is the budget (the fixed point of the reference's iterative
        water-filling: pin violators at lo/hi, share the rest in proportion, repeat); then
        largest-remainder rounding (ties: lower index). Unlike the reference code it always
        keeps the budget and the bounds. If every priority is 0 the prompts share evenly; if
        the positive-priority prompts cannot absorb the budget at ``hi``, the others share the
        rest evenly.

        ``"uniform"``: OpenRLHF's baseline: ``budget // N`` each, the remainder one each to
        the lowest indices. Takes no options.

    Reference options (rules "neyman" and "proportional"; any option with "uniform", and an
    option that would have no effect, raises ValueError):
        unseen: bool mask, shape (N,): prompts never seen before. Each gets
            ``exploration_rollouts`` (default 4) clamped into [lo, hi], and the seen prompts
            share the rest by the rule. If the seen prompts cannot absorb the rest within their
            bounds, they sit at lo (or hi) and the unseen prompts share what is left evenly.
            Variances of unseen prompts are ignored.
        pass_rates: shape (N,), cumulative pass rates in [0, 1] (entries of unseen prompts are
            ignored). A seen prompt with pass rate >= ``mastery_threshold`` (default 0.85) is
            mastered: its priority (proportional) or variance (neyman) becomes
            ``priority_floor``.
        priority_floor: default 0.01. Proportional: floor of every priority. Neyman: only the
            value given to mastered prompts (requires ``pass_rates``).

    Joint prompt selection (rule "neyman" with ``lo = 0`` only; any value with another rule
    raises ValueError, so does an active value with ``lo > 0`` or with ``unseen``/``pass_rates``):
        skip_factor: the skipping rule. ``None`` or 0: off (the result is exactly the plain
            one above, with any ``lo``). Otherwise a finite factor > 0 (4 is the benchmark's
            choice): let n0 be the exact ``lo = 0`` allocation and lambda its shadow price, the
            marginal gain at the cut: the smallest gain v_i/((n0_i - 1) n0_i) of a rollout it
            hands out, over prompts with v_i > 0 and n0_i >= 2 (a prompt's first rollout, of
            infinite gain, is left out; lambda = 0, so nothing is skipped, when no prompt has
            2 or more). Prompts with 0 < v_i < skip_factor * lambda (strictly) get 0 rollouts
            and the budget is solved again, exactly, over the other prompts. Why 4: charging a
            skipped prompt v (a one-rollout group carries no GRPO gradient either), m rollouts
            cost v/m + lambda*m >= 2 sqrt(v lambda), so skipping pays when v < 4 lambda.
            Fallback: at most #(v > 0) - ceil(budget/hi) prompts are skipped, so that the kept
            positive-variance prompts can absorb the budget at ``hi``; when more qualify, the
            smallest variances are skipped (ties: the higher index first); with no room nothing
            is skipped. Zero-variance prompts never take a skipped prompt's rollouts. One pass
            is a fixed point: re-solving only lowers lambda, so no kept prompt qualifies at the
            new allocation either. Deterministic (no randomness; ties as stated).
            Caution: with budget/N below ~2.56 rollouts per prompt, prompts of EQUAL variance
            (e.g. a batch of unseen prompts) all fall below 4 lambda and the cap decides by index;
            use the rule with >= 3 rollouts per candidate on average (the trainer enforces it:
            :func:`allocation_problems` with ``run_policies=True``, subject "skip_budget").
        min_rollouts: ``None``, 0 or 1: off. m >= 2: every prompt gets 0 or between m and ``hi``
            rollouts (a GRPO group of one has advantage 0: no gradient). After skipping, the
            not-skipped prompts are ranked by variance (descending; ties: lower index first) and
            the top c are served, c = max(ceil(budget/hi), min(#(v > 0 and not skipped),
            budget // m)): every positive-variance prompt when the budget gives each of them
            m, else the budget // m largest variances; zero-variance prompts only where the
            budget must be absorbed. The served prompts get the exact optimum of sum v_i/n_i
            with m <= n_i <= hi (same tie rule). Requires m <= hi and a budget that groups of
            m..hi can make up (some c with c*m <= budget <= c*hi), else ValueError.
        With either switch the result still sums to ``budget`` and stays within [0, hi].

        skip_costs: priced skipping. shape (N,), finite, >= 0, in the unit of ``variances`` (both
            multiplied by ``scale`` when given): what leaving prompt i out of the update costs,
            e.g. kappa * E[p^2 (1-p)^2] (the pool's ``skip_price``). Only with rule "neyman", an
            rloo-family ``estimator``, ``lo = 0`` and ``min_rollouts = m >= 2`` (else
            ValueError). The result is the exact minimiser of
            sum_{n_i > 0} v_i/(n_i - 1) + sum_{n_i = 0} skip_costs_i with n_i in {0} U [m, hi]
            and sum n_i = budget, by a dynamic programme over prompts and budget (work
            N * budget * (hi - m + 2), at most 2**34, memory N * (budget + 1) * 2 bytes, at most
            512 MiB: else ValueError). Deterministic; ties: the option tried first (skip, then
            m, m + 1, ...) is kept.

    Estimator (rule "neyman" only, not with ``unseen``/``pass_rates``; see
    docs/allocation_objectives.md):
        estimator: ``None`` (default): the objective sum v_i/n_i above, bit for bit as before.
            ``"rloo"``, ``"dr_grpo"``, ``"reinforce_baseline"``: the exact integer minimiser
            of sum_i v_i/(n_i - 1) (the variance of the prompt-balanced update with
            leave-one-out, or mean-baseline advantages rescaled by n/(n-1)). With
            m_i = n_i - 1 it is the sum v/m problem with budget ``budget - N`` and bounds
            ``lo - 1 .. hi - 1``, solved by the same exact solver: same tie rule (among equal
            gains the prompt with fewer rollouts first, then the lower index). Needs
            ``lo >= 2`` (a group of one rollout has no baseline), or ``lo = 0`` with
            ``min_rollouts >= 2``: the served prompts are chosen exactly as documented for
            ``min_rollouts`` and get the exact sum v_i/(n_i - 1) optimum within
            ``min_rollouts..hi``. ``skip_factor > 0`` is refused with an estimator (its
            rule is derived for sum v/n). ``"group_norm"`` needs the Beta posteriors: refused
            here (ValueError), use :meth:`PassRatePool.allocate`. Another name: ValueError
            listing :data:`ESTIMATORS`.

    Per-prompt noise scale (every rule; see docs/allocation_objectives.md, "Per-prompt noise
    scale"):
        scale: ``None`` (default): every s_i = 1, the result is bit for bit the one without it.
            Otherwise shape (N,), finite and > 0 (unitless or in any unit: only ratios matter):
            the prompt's gradient-noise scale S_i, so that its update variance is
            s_i * v_i / n_i (s_i * v_i / (n_i - 1) with a shifted estimator). Every rule then
            works on the weighted variances w_i = s_i * v_i, the float64 product (bit for bit
            ``allocate_rollouts(variances * scale, ...)`` with the same options):
            ``"neyman"`` gives the exact integer minimiser of sum s_i v_i / n_i (or of
            sum s_i v_i / (n_i - 1)), ties as above on the products' gains; ``skip_factor``
            and ``min_rollouts`` skip and rank on s * v; ``"proportional"`` gives
            n_i proportional to max(s_i v_i, priority_floor) (mastered prompts: the floor);
            ``"uniform"`` validates it and ignores it (the uniform split has no objective).
            Cost: one extra O(N) read; with rule "neyman" the products are stored only when
            the threshold search needs them. A scale of 1 everywhere gives today's result.

    Raises:
        ValueError: naming the argument and the problem: NaN/infinite/negative variances
            (``"variances[17] is NaN"``), wrong dimensions or dtypes, mismatched lengths,
            negative lo/hi/budget, lo > hi, a budget outside [N*lo, N*hi]
            (``"budget 100 is infeasible: must lie in [N*lo, N*hi] = [128, 384] for N=16,
            lo=8, hi=24"``), an unknown rule, or an option the rule does not take
            (``"skip_factor requires lo = 0 (a skipped prompt gets 0 rollouts), got lo = 8"``),
            a bad scale (``"scale has length 3 but variances has length 4"``,
            ``"scale[2] is zero (0.0); a scale must be > 0"``, ``"scale[5] is NaN"``,
            ``"scale[1] * variances[1] overflows float64 (...)"``; bad variances are reported
            first).
    """

class _PoolStats(TypedDict):
    prompts: int  #: prompts with evidence
    slots: int  #: hash-table slots (24 bytes each)
    load_factor: float  #: prompts / slots, kept in [0.67, 0.8] once the table has grown
    bytes: int  #: heap bytes held by the pool
    bytes_per_prompt: float
    updates: int  #: number of update() calls (training steps)
    scale: float  #: global evidence scale (internal; actual = stored * scale)
    prior: tuple[float, float]
    forget: float
    successes: float  #: total forgotten success evidence over the pool
    failures: float  #: total forgotten failure evidence over the pool
    noise_success_mean: float | None  #: pool-level mean noise proxy per successful rollout
    noise_failure_mean: float | None  #: pool-level mean noise proxy per failed rollout
    noise_weight: float  #: shrinkage weight w0 of :meth:`PassRatePool.noise_scale`

@final
def allocation_problems(
    prompts: int,
    budget: int,
    lo: int,
    hi: int,
    rule: _Rule | None = None,
    *,
    estimator: _Estimator | None = None,
    skip_factor: float | None = None,
    min_rollouts: int | None = None,
    exploration: bool | None = None,
    mastery: bool | None = None,
    exploration_rollouts: int | None = None,
    mastery_threshold: float | None = None,
    priority_floor: float | None = None,
    calibrated: bool | None = None,
    noise_scale: bool | None = None,
    filter_band: float | None = None,
    explore_seed: int | None = None,
    skip_price: float | None = None,
    prior: tuple[float, float] | None = None,
    forget: float | None = None,
    run_policies: bool = False,
) -> list[tuple[_Subject, str]]:
    """Every problem of one allocation call's settings, found at once, without data: ``budget``
    rollouts over ``prompts`` prompts within [``lo``, ``hi``] each, by ``rule`` (None: only the
    bounds, the budget and the pool settings are checked), with the switches as
    :func:`allocate_rollouts` / :meth:`PassRatePool.allocate` would get them (None = not given;
    ``exploration`` ... ``skip_price`` as :meth:`PassRatePool.allocate` takes them), and the
    pool's ``prior`` (alpha0, beta0) and ``forget``, and ``filter_band``, the band of the
    trainer's rule "filter" (:func:`filter_counts`). ``run_policies``: also the trainer's run
    policies, which no allocation call enforces ("skip_budget" below).

    Returns ``(subject, message)`` pairs, at most one per subject, in the order of
    :data:`PROBLEM_SUBJECTS` ("bounds": a negative bound or lo > hi; "budget": the budget outside
    [prompts*lo, prompts*hi] or negative; "reference_options": the reference's exploration and
    mastery switches and their numbers against the rule and each other; "calibrated" and
    "noise_scale": with rule "uniform"; "filter_band": outside [0, 0.5) (judged whenever given,
    whatever the rule); then "skip_factor"; "skip_budget" (only with
    ``run_policies``, after a valid ``skip_factor``): rule "neyman", lo = 0 and skip_factor > 0
    with fewer than 3 rollouts per prompt on average (budget < 3 * prompts), where prompts of
    equal variance fall below the skip cut, so the rule would skip at random; then
    "min_rollouts", "estimator" (also: not with exploration or mastery); "skip_price": finite >
    0, and priced skipping's preconditions (rule "neyman", an rloo-family estimator, lo = 0,
    min_rollouts >= 2, no skip_factor); "explore_seed": only with a skipping rule; "prior",
    "forget"); empty when an allocation call with these settings passes its argument checks for
    any valid data. Each message is exactly the ``ValueError`` message the allocation call raises
    for that setting (the same checks run), "skip_budget" aside. With a rule,
    "reference_options", "calibrated", "noise_scale" and "explore_seed" are always judged;
    "skip_factor", "skip_budget", "min_rollouts", "estimator" and "skip_price" only when the
    bounds and the budget hold. An
    unknown ``rule`` or ``estimator`` name raises ``ValueError`` (as in the allocation calls);
    ``prompts`` must be >= 0, ``explore_seed`` an integer >= 0."""
    ...

@final
def filter_counts(
    means: _FloatArrayLike,
    variances: _FloatArrayLike,
    budget: int,
    lo: int,
    hi: int,
    band: float,
) -> npt.NDArray[np.int64]:
    """The trainer's rule "filter" (DAPO/GRESO-style filtering without variable n): rollouts per
    prompt, int64 (N,), summing to ``budget``. ``means`` (N,): each prompt's posterior mean pass
    rate in [0, 1]; ``variances`` (N,): its expected variance (finite, >= 0), which only orders
    readmissions. A prompt with ``band < mean < 1 - band`` is kept; if none is, every prompt is.
    If the kept prompts cannot absorb the budget at ``hi`` each (fewer than ceil(budget / hi)),
    skipped prompts are readmitted, largest variance first (ties: lower index), until they can.
    The kept prompts share the budget by rule "uniform" within [``lo``, ``hi``] (``budget // K``
    each, the remainder one each to the first kept prompts); skipped prompts get 0.

    Raises ``ValueError`` for a ``band`` outside [0, 0.5) ("filter_band must lie in [0, 0.5), got
    0.6", the message :func:`allocation_problems` lists under "filter_band"), arrays that are not
    1-D or not of one length, a mean that is NaN or outside [0, 1], a NaN, infinite or negative
    variance, and the uniform rule's bounds and budget checks over the kept prompts."""
    ...

@final
def group_norm_costs(
    alpha: _FloatArrayLike,
    beta: _FloatArrayLike,
    weights: _FloatArrayLike,
    counts: _IntArrayLike,
) -> npt.NDArray[np.float64]:
    """group_norm's per-prompt cost at the given counts, the one the allocator minimises with
    ``estimator="group_norm"``: ``weights[i] * (n - 1) / (n**2 * P(n))`` with
    ``P(n) = 1 - E[p**n] - E[(1 - p)**n]`` under Beta(alpha[i], beta[i]) (exact moments; see
    docs/allocation_objectives.md); 0 where ``counts[i] < 2``. ``weights`` = the posterior E[p(1-p)]
    gives the plain cost, a calibrated variance the calibrated one. All (N,) 1-D; alpha, beta finite
    and > 0, weights finite and >= 0, lengths equal — else ValueError naming the argument."""
    ...


class PassRatePool:
    """Per-prompt Beta posteriors of the pass rate, keyed by int64 prompt id.

    Prompt p has posterior Beta(alpha0 + s_p, beta0 + f_p), where (s_p, f_p) is its evidence
    (successes, failures) above the prior. Evidence is stored, not alpha/beta, so the prior can
    be changed (``pool.prior = ...``) or fitted (:meth:`fit_prior`) at any time. Unseen ids get
    the prior. Ids are arbitrary int64 values (e.g. dataset row indices or a 64-bit hash of the
    prompt text and label); the whole int64 range is allowed.

    Forgetting: each :meth:`update` call is one training step. It first multiplies all evidence
    in the pool by ``forget`` (rho in (0, 1]; 1 = plain accumulation), then adds the step's
    counts. Cost O(batch), not O(pool): a global scale absorbs the multiplication and is folded
    into the entries (one O(pool) pass) only when it drops below 1e-18.

    Noise statistics (for a per-prompt gradient-noise scale, generic in a per-rollout proxy
    q >= 0 of the squared score norm, e.g. a token count or a measured ||grad log pi||^2): per
    prompt and outcome class (success, failure) a forgotten sum of q, forgotten like the
    evidence; the class's count is the class's evidence itself (every rollout recorded after the
    class's first noise observation carries a q, observed or imputed: see :meth:`update`). The
    pool-level class means M_succ, M_fail (:attr:`noise_means`) are kept incrementally.
    :meth:`noise_scale` mixes the shrunk class means by the posterior mean pass rate.

    Memory: open addressing over 24-byte slots (id int64, evidence 2 x float32, noise sums
    2 x float32), growing by 3/16 at a time so that the load factor stays in [0.67, 0.8]: 30 to
    36 bytes per prompt (``stats()["bytes_per_prompt"]``; small pools hold at least 16 slots).
    Evidence and noise sums are float32: integer counts are exact up to 2**24 per prompt (with
    ``forget = 1``).

    Pickling (e.g. to send a pool to a Ray actor) uses the same format as :meth:`save`.
    """

    def __new__(
        cls,
        prior: tuple[float, float] = (1.0, 1.0),
        forget: float = 1.0,
        capacity: int | None = None,
        *,
        noise_weight: float = 1.0,
    ) -> PassRatePool:
        """Empty pool with prior Beta(alpha0, beta0) (both finite, > 0) and forgetting factor
        ``forget`` in (0, 1]. ``capacity`` pre-sizes the table for that many prompts.
        ``noise_weight``: the shrinkage weight w0 of :meth:`noise_scale` (finite, >= 0)."""
    @property
    def prior(self) -> tuple[float, float]:
        """(alpha0, beta0). Settable; affects every posterior at once (evidence is kept)."""
    @prior.setter
    def prior(self, value: tuple[float, float]) -> None: ...
    @property
    def forget(self) -> float:
        """Forgetting factor rho in (0, 1]. Settable; applies from the next update on."""
    @forget.setter
    def forget(self, value: float) -> None: ...
    @property
    def noise_weight(self) -> float:
        """w0 >= 0, the pseudo-rollouts at the pool-level class mean in each prompt's class mean
        (:meth:`noise_scale`). Settable; takes effect at once. Saved with the pool."""
    @noise_weight.setter
    def noise_weight(self, value: float) -> None: ...
    @property
    def noise_means(self) -> tuple[float | None, float | None]:
        """(M_succ, M_fail): the pool-level mean noise proxy per successful / failed rollout
        (forgotten sum of q over the pool / forgotten class evidence of the pool, both kept
        incrementally); ``None`` for a class without any noise observation."""
    def update(
        self,
        prompt_ids: _IntArrayLike,
        successes: _IntArrayLike,
        trials: _IntArrayLike,
        *,
        noise_success: _FloatArrayLike | None = None,
        noise_failure: _FloatArrayLike | None = None,
    ) -> None:
        """Record one training step: shapes (M,) each, integer dtypes (booleans allowed for
        the counts). Repeated ids in one call add up; rows with ``trials == 0`` add nothing and
        create no entry. Raises ValueError for mismatched lengths, non-integer dtypes, negative
        counts or ``successes > trials``; then the pool is left unchanged.

        ``noise_success``, ``noise_failure`` (both or neither), shapes (M,), float: per row, the
        sum of the noise proxy q over that row's successful rollouts and over its failed ones
        (finite, >= 0, at most 1e30; 0 where the row has no rollout of that class; any unit,
        the same every step). They are forgotten with the evidence. The first step that brings a
        class's noise (with at least one rollout of that class) starts the class: the class
        evidence recorded before (e.g. a pool loaded from a version-1/2 file) has no q, so it is
        counted at that step's mean q of the class (one O(pool) pass, once per class). After
        that, a step without noise sums counts each rollout of a started class at the
        pool-level class mean of the moment (the means do not move), so that every prompt's
        class count stays its class evidence. ValueError (pool unchanged) for a missing partner
        array, mismatched lengths, NaN/infinite/negative/too large values
        (``"noise_failure[3] is NaN"``), or a non-zero sum for a class without rollouts
        (``"noise_success[2] = 0.5 but successes[2] = 0 (...)"``)."""
    def mean(self, prompt_ids: _IntArrayLike) -> npt.NDArray[np.float64]:
        """Posterior mean alpha / (alpha + beta), shape (M,); the prior mean for unseen ids."""
    def expected_variance(self, prompt_ids: _IntArrayLike) -> npt.NDArray[np.float64]:
        """Posterior expected Bernoulli variance E[p(1-p)] = alpha*beta / ((alpha+beta)
        (alpha+beta+1)), shape (M,); defined for unseen ids too (from the prior)."""
    def skip_costs(self, prompt_ids: _IntArrayLike, price: float, *, calibrated: bool = False,
                   explore_seed: int | None = None) -> npt.NDArray[np.float64]:
        """Priced-skip costs, shape (M,): ``price`` (kappa, finite > 0) times E[p^2 (1-p)^2]
        under each id's posterior Beta(a, b), exactly a b (a+1)(b+1) / ((a+b)(a+b+1)(a+b+2)
        (a+b+3)) (the model of the squared expected gradient the prompt carries: the logistic
        model's ||grad p||^2 = (p(1-p))^2 ||grad logit||^2), times the calibration factor with
        ``calibrated``; with ``explore_seed`` the moment is raised to (p~(1-p~))^2 of
        :meth:`allocate`'s exploration draw where larger. What :meth:`allocate` with
        ``skip_price`` uses."""
    def calibrated_variance(self, prompt_ids: _IntArrayLike) -> npt.NDArray[np.float64]:
        """Revisit-calibrated expected variance, shape (M,): :meth:`expected_variance` times
        the factor of the id's evidence cell. Cells: the (forgotten) evidence (s, f) is binned
        per axis at ``[0, 1e-6, 1, 2, 4, ..., 1024, inf)`` (13 bins; the first means "no
        evidence"), 169 cells. At every :meth:`update` each cell's sums decay by 0.99, then each
        row with n >= 2 trials and k successes adds, to the cell of its id's evidence before
        the step, ``observed += n * k(n-k)/(n(n-1))`` (the fresh unbiased variance) and
        ``predicted += n * v`` (v = the posterior's E[p(1-p)] before the step, with the prior
        of that moment); rows with one trial teach nothing, so pass one row per prompt group
        (its successes and trials), not one per rollout. Factor = ``(observed + 2) /
        (predicted + 2)``: 1 for a cell without data. It learns what revisits show and the Beta posterior cannot foresee when the
        policy moves (e.g. prompts whose evidence says "solved" becoming informative again);
        on a static pool the factors stay near 1. Changing or fitting the prior does not reset
        the cells (their decay washes out predictions made with an older prior)."""
    def evidence(
        self, prompt_ids: _IntArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(successes, failures) evidence above the prior after forgetting, shapes (M,);
        zeros for unseen ids."""
    def noise_sums(
        self, prompt_ids: _IntArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(sum of q over successes, sum of q over failures) after forgetting, shapes (M,), in
        the unit of the q given to :meth:`update`; zeros for unseen ids."""
    def noise_scale(self, prompt_ids: _IntArrayLike) -> npt.NDArray[np.float64]:
        """Per-prompt noise scale, shape (M,), in the unit of q:
        ``s_i = (1 - m_i) * Q_succ_i + m_i * Q_fail_i`` with m_i the posterior mean pass rate
        and ``Q_c_i = (sum_c_i + w0 * M_c) / (n_c_i + w0)`` the prompt's mean q of class c shrunk
        toward the pool-level class mean M_c (:attr:`noise_means`; n_c_i = the class evidence,
        sum_c_i = :meth:`noise_sums`, w0 = :attr:`noise_weight`); ``Q_c_i = M_c`` exactly where
        n_c_i = 0 (so unseen ids get the pool-level value at the prior mean). Why this mix:
        the gradient noise of a prompt with pass rate p is about p(1-p)/(n-1) * S with
        S ~ (1-p) C_succ + p C_fail, C_class the mean squared score norm of that outcome's
        rollouts (the minority outcome dominates). A class without any observation takes the
        other class's M; with no observation at all every s_i is 1 (so ``noise_scale=True``
        allocates exactly as without it)."""
    def allocate(
        self,
        prompt_ids: _IntArrayLike,
        budget: int,
        lo: int,
        hi: int,
        rule: _Rule = "neyman",
        *,
        exploration: bool | None = None,
        mastery: bool | None = None,
        exploration_rollouts: int | None = None,
        mastery_threshold: float | None = None,
        priority_floor: float | None = None,
        skip_factor: float | None = None,
        min_rollouts: int | None = None,
        calibrated: bool | None = None,
        estimator: _Estimator | None = None,
        explore_seed: int | None = None,
        scale: _FloatArrayLike | None = None,
        noise_scale: bool | None = None,
        skip_price: float | None = None,
    ) -> npt.NDArray[np.int64]:
        """Allocate ``budget`` rollouts over the batch ``prompt_ids`` (shape (M,), repeats
        allowed) from the posterior expected variances, with :func:`allocate_rollouts`'s rules
        and guarantees (int64, shape (M,), sum == budget, within [lo, hi]).

        ``skip_factor``, ``min_rollouts``: :func:`allocate_rollouts`'s joint prompt selection
        on the posterior expected variances (rule "neyman", ``lo = 0``, exploration and
        mastery off; ``None``/0 and ``None``/0/1 are off). The posterior variance is never 0,
        so without them every candidate gets at least one rollout.

        ``calibrated``: ``None``/False (default): allocate on :meth:`expected_variance`. True:
        on :meth:`calibrated_variance` (the revisit calibration; recommended, the benchmark's
        default: see README). With ``skip_factor`` a prompt is then skipped only if both its
        calibrated and its plain posterior variance are below ``skip_factor * lambda`` (lambda
        from the calibrated allocation; the cap and ties order by the larger of the two): a
        skipped prompt is not revisited, so a calibration factor that is too low could not
        correct itself. Not with rule "uniform".

        ``exploration``: ids not in the pool are "unseen" (fixed ``exploration_rollouts``).
        ``mastery``: the posterior mean is the pass rate tested against ``mastery_threshold``.
        Both default to on for rule "proportional" (the reference's behaviour) and off
        otherwise: for "neyman" the prior already gives unseen ids a sensible variance.
        Options that cannot apply (e.g. ``exploration_rollouts`` without exploration, any
        option with "uniform") raise ValueError.

        ``estimator``: ``None`` (default): sum v_i/n_i on the (calibrated) variances, as
        before. ``"rloo"``, ``"dr_grpo"``, ``"reinforce_baseline"``: exact sum v_i/(n_i - 1)
        on the same variances, as in :func:`allocate_rollouts` (``lo >= 2``, or ``lo = 0``
        with ``min_rollouts >= 2``). ``"group_norm"`` (needs ``lo >= 2``): per prompt with
        posterior Beta(a, b) and v = E[p(1-p)], the cost of a group of n >= 2 rollouts is
        ``c(n) = v (n-1) / (n^2 P(n))`` with ``P(n) = 1 - E[p^n] - E[(1-p)^n]`` (exact Beta
        moments; the probability that the group is not all-equal, since an all-equal group
        gives zero gradient under group_norm); large n gives ~v/n. With ``calibrated`` each
        prompt's cost is multiplied by its calibration factor. c is decreasing and convex in
        n (verified numerically over a wide (a, b) grid and n up to 512), so handing out
        rollouts by largest marginal gain c(n) - c(n+1) is exact; ties as above (fewer
        rollouts first, then the lower index). Memory O(N) (the gains are recomputed per
        pass); work N*(min(hi, lo + budget - N*lo) - lo) gain evaluations per pass, at most
        2**32 (else ValueError). All estimators: rule "neyman" only, and not with
        ``exploration``/``mastery``.

        ``skip_price``: ``None`` (default): off. A finite kappa > 0: priced skipping
        (:func:`allocate_rollouts`'s ``skip_costs``) with skip_cost_i = kappa * E[p^2 (1-p)^2]
        under prompt i's posterior (times its calibration factor with ``calibrated``; see
        :meth:`skip_costs`): the model of the squared expected gradient the prompt would have
        carried. Rule "neyman", estimator "rloo"/"dr_grpo"/"reinforce_baseline", ``lo = 0``,
        ``min_rollouts >= 2``. With ``explore_seed`` the moment is raised to (p~(1-p~))^2 of
        the exploration draw below where that is larger.

        ``explore_seed``: ``None`` (default): off, the skipping rule as documented. An int in
        [0, 2**64): skip decisions explore (requires ``skip_factor > 0``, else ValueError). Each
        prompt gets one exploration draw p~ ~ Beta(1 + c*s, 1 + c*f), (s, f) its evidence and
        c = min(1, 16/(s + f)) (a uniform prior and at most 16 trials' worth of evidence: the
        draw is never as sure as a long, possibly stale, record of failures), and it is skipped
        only if p~(1 - p~) is below ``skip_factor * lambda`` as well (with ``calibrated``: and
        its plain posterior variance). So a prompt that looks hopeless is still re-probed on
        most visits (a 0-of-16+ record is kept about 70% of the time at a cut of 0.02) and is
        never skipped for ever because its pass rate moved. The draw is a pure function of
        (explore_seed, prompt id, number of ``update`` calls so far): the same call on a pool
        restored with :meth:`load` gives the same result, and each training step draws
        afresh. The allocation among kept prompts is unchanged (the posterior variances).

        ``scale``: shape (M,), finite, > 0: :func:`allocate_rollouts`'s per-prompt noise scale.
        The (calibrated) variances are multiplied by it before the rule (so skipping, its
        plain-posterior and exploration guards, and the group floor all work on s * v); with
        ``"group_norm"`` each prompt's cost is multiplied by it (and by its calibration factor
        when ``calibrated``). Rule ``"uniform"``: validated and ignored. ``noise_scale``:
        ``None``/False (default): off. True: the scale is :meth:`noise_scale` of the ids (not
        with ``scale``, not with rule ``"uniform"``: ValueError); a pool without noise
        observations allocates exactly as without it. ValueError if the pool's noise scale of
        an id is 0 (possible only when every observed q of its classes is 0)."""
    def fit_prior(self) -> tuple[float, float]:
        """Empirical-Bayes fit of (alpha0, beta0) to the pool, by the method of moments with a
        binomial-noise correction, over prompts with at least one trial of (forgotten)
        evidence: with p_i = s_i/n_i, mu = mean p_i, S^2 = their sample variance and
        c = mean 1/n_i, a Beta prior with phi = 1/(alpha+beta+1) gives
        E[S^2] ~ mu(1-mu)(c + phi(1-c)); so phi = (S^2/(mu(1-mu)) - c)/(1 - c), clamped to
        [1e-6, 1/1.001] (alpha+beta between 1e-3 and ~1e6), alpha = mu(1/phi - 1),
        beta = (1-mu)(1/phi - 1). Sets the prior and returns it. Raises ValueError with fewer
        than 2 such prompts, when every pass rate is 0 (or every one is 1), or with only one
        trial per prompt."""
    def ids(self) -> npt.NDArray[np.int64]:
        """All ids in the pool, shape (len(pool),), in storage order (unspecified)."""
    def stats(self) -> _PoolStats:
        """Size, memory and evidence totals (O(pool))."""
    def save(self, path: str | PathLike[str]) -> None:
        """Write the pool atomically: a temporary file in the same directory, fsync, rename
        over ``path``, fsync of the directory. The round trip through :meth:`load` is bit for
        bit (ids, evidence, prior, forget, scale, update count, calibration). Raises OSError
        (e.g. FileNotFoundError for a missing directory).

        File format version 3, little-endian: magic ``b"DYNMPOOL"``, u32 version, u32 flags,
        f64 alpha0, f64 beta0, f64 forget, f64 scale, u64 updates, u64 prompts P, u64 table
        slots, u32 CRC-32 of the preceding 72 header bytes; then P records of (i64 id,
        f32 successes, f32 failures, f32 noise sum over successes, f32 noise sum over failures)
        as stored (actual / scale); then a u32 CRC-32 of the records; then the calibration
        block: f64 decay (0.99), f64 weight (2.0), u32 cells C = 169, C f64 observed sums,
        C f64 predicted sums, u32 CRC-32 of the block; then the noise block: f64 noise_weight,
        u32 started classes (bit 0 success, bit 1 failure), 2 f64 stored pool sums of q, 2 f64
        stored pool class counts, u32 CRC-32 of the block. Size: 80 + 24 P + 2728 + 48 bytes.
        Version 2 (the previous build: 16-byte records without noise sums, no noise block,
        80 + 16 P + 2728 bytes) and version 1 (no calibration block either, 80 + 16 P bytes)
        still load, with empty noise statistics (and, for version 1, an empty calibration)."""
    @staticmethod
    def load(path: str | PathLike[str]) -> PassRatePool:
        """Read a pool written by :meth:`save` (format version 1, 2 or 3). Raises
        FileNotFoundError/OSError when the file cannot be read, and ValueError naming the
        problem for an empty, foreign (bad magic), newer (unknown version), truncated,
        over-long or corrupt (checksum mismatch) file."""
    def to_bytes(self) -> bytes:
        """The file format of :meth:`save` as bytes."""
    @staticmethod
    def from_bytes(data: bytes) -> PassRatePool:
        """Inverse of :meth:`to_bytes`; the same checks and errors as :meth:`load`."""
    def __len__(self) -> int:
        """Number of prompts with an entry."""
    def __contains__(self, prompt_id: object, /) -> bool:
        """Whether an int64 id has an entry (False for anything that is not an integer)."""
    def __reduce__(self) -> tuple[object, tuple[bytes]]: ...
