"""allocate_rollouts: exactness against brute force, each rule's documented behaviour, errors."""

import heapq
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_openrlhf import RULES, PassRatePool, allocate_rollouts


# ---------------------------------------------------------------- reference solvers (Python)


def gain(v, n):
    """Marginal gain v/n - v/(n+1), computed exactly as documented: v / (n * (n + 1))."""
    return 0.0 if v == 0 else v / (float(n) * float(n + 1))


def greedy(v, budget, lo, hi):
    """One rollout at a time to the largest gain; ties: fewer rollouts, then lower index."""
    n = len(v)
    positive = [i for i in range(n) if v[i] > 0]
    if lo == 0 and budget < len(positive):
        chosen = sorted(positive, key=lambda i: (-v[i], i))[:budget]
        return [1 if i in chosen else 0 for i in range(n)]
    counts = [max(lo, 1) if v[i] > 0 else lo for i in range(n)]
    heap = [(-gain(v[i], counts[i]), counts[i], i) for i in range(n) if counts[i] < hi]
    heapq.heapify(heap)
    for _ in range(budget - sum(counts)):
        _, level, i = heapq.heappop(heap)
        counts[i] = level + 1
        if counts[i] < hi:
            heapq.heappush(heap, (-gain(v[i], counts[i]), counts[i], i))
    return counts


def objective(v, counts):
    total = 0.0
    for x, k in zip(v, counts):
        if x > 0:
            total += math.inf if k == 0 else x / k
    return total


def dp_optimum(v, budget, lo, hi, cost=None):
    """Minimum of sum cost(v_i, n_i) over integer n in [lo, hi] with sum n = budget (dynamic programming);
    default cost v/n (0 for v = 0, inf for n = 0 with v > 0)."""
    if cost is None:
        def cost(x, k):
            return 0.0 if x == 0 else (math.inf if k == 0 else x / k)
    best = [0.0] + [math.inf] * budget
    for x in v:
        nxt = [math.inf] * (budget + 1)
        for used, total in enumerate(best):
            if total == math.inf:
                continue
            for k in range(lo, hi + 1):
                if used + k > budget:
                    break
                nxt[used + k] = min(nxt[used + k], total + cost(x, k))
        best = nxt
    return best[budget]


def certify_optimal(v, counts, budget, lo, hi):
    """O(N) certificate for large inputs: the worst taken unit ranks before the best free one
    (gain descending, then level ascending, then index ascending)."""
    v = np.asarray(v, dtype=np.float64)
    n = np.asarray(counts, dtype=np.int64)
    assert n.sum() == budget
    lower = np.where(v > 0, max(lo, 1), lo)
    assert np.all(n >= lower) and np.all(n <= hi)
    idx = np.arange(len(v))

    def gains(level):
        with np.errstate(divide="ignore", invalid="ignore"):
            g = v / (level.astype(np.float64) * (level + 1).astype(np.float64))
        return np.where(v == 0, 0.0, g)

    taken = n > lower
    free = n < hi
    if not (taken.any() and free.any()):
        return
    g_last, l_last, i_last = gains(n - 1)[taken], (n - 1)[taken], idx[taken]
    g_next, l_next, i_next = gains(n)[free], n[free], idx[free]
    # Worst taken: smallest gain, then largest level, then largest index.
    w = np.lexsort((-i_last, -l_last, g_last))[0]
    # Best free: largest gain, then smallest level, then smallest index.
    b = np.lexsort((i_next, l_next, -g_next))[0]
    worst = (-g_last[w], l_last[w], i_last[w])
    best = (-g_next[b], l_next[b], i_next[b])
    assert worst < best, (worst, best)


def pool_recipe(n, seed, estimate=True):
    """docs/reference_notes.md (measured table): 30% p=0, 20% p=1, the rest Beta(0.7, 0.7); v from 16 rollouts."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    p = rng.beta(0.7, 0.7, n)
    p[u < 0.3] = 0.0
    p[(u >= 0.3) & (u < 0.5)] = 1.0
    if not estimate:
        return p * (1 - p)
    k = rng.binomial(16, p)
    return k * (16 - k) / (16 * 15)


# ---------------------------------------------------------------- exactness (hypothesis)

PALETTE = [0.0, 0.0, 0.25, 0.25, 0.5, 1.0, 2.0, 3.0, 0.1875, 1e-3]


@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 8))
    lo = draw(st.integers(0, 3))
    hi = draw(st.integers(lo, lo + 6))
    budget = draw(st.integers(n * lo, min(n * hi, max(n * lo, 40))))
    values = st.one_of(
        st.sampled_from(PALETTE),
        st.floats(0.0, 4.0, allow_nan=False, allow_infinity=False),
    )
    v = draw(st.lists(values, min_size=n, max_size=n))
    return v, budget, lo, hi


@settings(max_examples=600, deadline=None)
@given(small_problems())
def test_neyman_is_the_greedy_and_the_dp_optimum(problem):
    v, budget, lo, hi = problem
    got = allocate_rollouts(v, budget, lo, hi)
    assert got.dtype == np.int64
    assert got.tolist() == greedy(v, budget, lo, hi)
    positive = sum(x > 0 for x in v)
    if lo == 0 and budget < positive:
        return  # every allocation has an infinite objective; the documented rule decides
    best = dp_optimum(v, budget, lo, hi)
    assert objective(v, got) == pytest.approx(best, rel=1e-12, abs=1e-300)


@settings(max_examples=300, deadline=None)
@given(small_problems(), st.sampled_from(RULES))
def test_every_rule_keeps_budget_and_bounds(problem, rule):
    v, budget, lo, hi = problem
    got = allocate_rollouts(v, budget, lo, hi, rule=rule)
    assert got.dtype == np.int64 and got.shape == (len(v),)
    assert got.sum() == budget
    assert got.min() >= lo and got.max() <= hi


@settings(max_examples=200, deadline=None)
@given(
    small_problems(),
    st.sampled_from(["neyman", "proportional"]),
    st.data(),
)
def test_reference_options_keep_budget_and_bounds(problem, rule, data):
    v, budget, lo, hi = problem
    n = len(v)
    unseen = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rates = data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    explore = data.draw(st.integers(0, 10))
    got = allocate_rollouts(
        v, budget, lo, hi, rule,
        unseen=np.array(unseen), exploration_rollouts=explore, pass_rates=rates,
    )
    assert got.sum() == budget and got.min() >= lo and got.max() <= hi


# ---------------------------------------------------------------- large inputs

@pytest.mark.parametrize("estimate", [True, False])
@pytest.mark.parametrize("bounds", [(8, 24, 16), (0, 64, 16), (0, 64, 1), (4, 40, 20)])
def test_large_inputs_are_exactly_optimal(estimate, bounds):
    lo, hi, per_prompt = bounds
    n = 200_000  # above the parallel threshold
    v = pool_recipe(n, seed=3, estimate=estimate)
    got = allocate_rollouts(v, per_prompt * n, lo, hi)
    certify_optimal(v, got, per_prompt * n, lo, hi)


def test_medium_input_matches_the_greedy_exactly():
    v = pool_recipe(3000, seed=5)
    for lo, hi, budget in [(8, 24, 48_000), (0, 64, 30_000), (0, 30, 900)]:
        assert allocate_rollouts(v, budget, lo, hi).tolist() == greedy(v.tolist(), budget, lo, hi)


def test_reproduces_the_design_oracle_figures():
    """docs/reference_notes.md (measured table): knowing the true p, the exact optimum scores 0.667 of uniform with
    bounds 8..24 and 0.437 with skipping (0..64). On the 16-rollout estimate, Neyman beats the
    reference rule on the objective it is given (the estimated one)."""
    n = 100_000
    rng = np.random.default_rng(0)
    u = rng.random(n)
    p = rng.beta(0.7, 0.7, n)
    p[u < 0.3] = 0.0
    p[(u >= 0.3) & (u < 0.5)] = 1.0
    k = rng.binomial(16, p)
    estimate, truth = k * (16 - k) / 240, p * (1 - p)
    budget = 16 * n

    def ratio(scored, counts):
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(scored > 0, scored / counts, 0.0).sum()
        return score / (scored / 16).sum()

    assert ratio(truth, allocate_rollouts(truth, budget, 8, 24)) == pytest.approx(0.667, abs=0.002)
    assert ratio(truth, allocate_rollouts(truth, budget, 0, 64)) == pytest.approx(0.437, abs=0.002)
    for lo, hi in [(8, 24), (0, 64), (4, 40)]:
        ours = ratio(estimate, allocate_rollouts(estimate, budget, lo, hi))
        reference = ratio(estimate, allocate_rollouts(estimate, budget, lo, hi, "proportional"))
        assert ours <= reference * (1 + 1e-12)


# ---------------------------------------------------------------- documented behaviour


def test_ties_go_to_fewer_rollouts_then_lower_index():
    # Gains tie at 1/2: prompt 0 (v=1) at n=1 and prompt 1 (v=3) at n=2: fewer rollouts wins.
    assert allocate_rollouts([1.0, 3.0], 4, 1, 10).tolist() == [2, 2]
    assert allocate_rollouts([0.5, 0.5, 0.5], 7, 1, 10).tolist() == [3, 2, 2]


def test_all_zero_variances_give_the_near_uniform_spread():
    assert allocate_rollouts([0.0] * 4, 10, 0, 5).tolist() == [3, 3, 2, 2]
    assert allocate_rollouts(np.zeros(5), 43, 8, 24).tolist() == [9, 9, 9, 8, 8]


def test_zero_variance_prompts_only_get_what_others_cannot_absorb():
    assert allocate_rollouts([0.0, 1.0, 0.0], 8, 2, 5).tolist() == [2, 4, 2]
    assert allocate_rollouts([0.0, 1.0, 0.0], 11, 2, 5).tolist() == [3, 5, 3]


def test_lo_zero_skips_solved_prompts():
    assert allocate_rollouts([0.0, 0.2, 0.0, 0.1], 5, 0, 8).tolist() == [0, 3, 0, 2]


def test_lo_zero_budget_below_positive_count_takes_largest_variances():
    assert allocate_rollouts([0.1, 0.3, 0.2, 0.0], 2, 0, 8).tolist() == [0, 1, 1, 0]
    assert allocate_rollouts([0.2, 0.3, 0.2], 2, 0, 8).tolist() == [1, 1, 0]
    assert allocate_rollouts([0.2, 0.3], 0, 0, 8).tolist() == [0, 0]


def test_budget_at_the_bounds():
    assert allocate_rollouts([0.1, 0.0, 0.3], 24, 8, 24).tolist() == [8, 8, 8]
    assert allocate_rollouts([0.1, 0.0, 0.3], 72, 8, 24).tolist() == [24, 24, 24]


def test_empty_input():
    for rule in RULES:
        got = allocate_rollouts([], 0, 8, 24, rule)
        assert got.dtype == np.int64 and got.shape == (0,)


def test_uniform_rule():
    assert allocate_rollouts([0.3] * 5, 13, 0, 10, "uniform").tolist() == [3, 3, 3, 2, 2]
    assert allocate_rollouts([0.9, 0.0, 0.1], 24, 8, 8, "uniform").tolist() == [8, 8, 8]


def test_proportional_rule():
    v = [0.1, 0.2, 0.3, 0.4]
    assert allocate_rollouts(v, 10, 0, 10, "proportional").tolist() == [1, 2, 3, 4]
    # Water-filling: 0.1, 0.2 pinned at lo = 2; 0.3, 0.4 pinned at hi = 3.
    assert allocate_rollouts(v, 10, 2, 3, "proportional").tolist() == [2, 2, 3, 3]
    # hi pins the large one, the others share the rest 1 : 3.
    assert allocate_rollouts([1.0, 0.01, 0.03], 12, 0, 8, "proportional").tolist() == [8, 1, 3]
    # The floor (0.01) lifts zero variances: 0.1, 0.1, 9.8 -> largest remainder to 9.8.
    assert allocate_rollouts([0.0, 0.0, 0.98], 10, 0, 10, "proportional").tolist() == [0, 0, 10]
    assert allocate_rollouts([0.0, 0.0, 0.98], 10, 0, 10, "proportional",
                             priority_floor=0.49).tolist() == [3, 2, 5]
    # Equal remainders: lower index first.
    assert allocate_rollouts([0.5] * 3, 7, 0, 10, "proportional").tolist() == [3, 2, 2]


def test_proportional_keeps_bounds_where_the_reference_code_broke_them():
    # The reference broke its bounds for lo < 4 and changed the budget for n outside [lo, hi].
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 50))
        lo = int(rng.integers(0, 4))
        hi = lo + int(rng.integers(0, 30))
        budget = int(rng.integers(n * lo, n * hi + 1))
        v = rng.random(n) * (rng.random(n) < 0.7)
        got = allocate_rollouts(v, budget, lo, hi, "proportional",
                                unseen=rng.random(n) < 0.4, exploration_rollouts=4)
        assert got.sum() == budget and got.min() >= lo and got.max() <= hi


def test_exploration_budget_for_unseen_prompts():
    v = [0.2, 0.0, 0.1, 0.05]
    unseen = np.array([False, True, False, True])
    # Unseen get 4; the seen share 16 in proportion 2 : 1 (10.67, 5.33 -> 11, 5).
    assert allocate_rollouts(v, 24, 2, 12, "proportional", unseen=unseen).tolist() == [11, 4, 5, 4]
    # exploration clamped into [lo, hi] = [6, 12].
    assert allocate_rollouts(v, 24, 6, 12, "proportional", unseen=unseen).tolist() == [6, 6, 6, 6]
    # Seen prompts full at hi: unseen ones share the rest evenly.
    assert allocate_rollouts(v, 40, 2, 12, "proportional", unseen=unseen).tolist() == [12, 8, 12, 8]
    # Neyman on the seen prompts: exact optimum of 0.2/a + 0.1/b with a + b = 16.
    assert allocate_rollouts(v, 24, 2, 12, "neyman", unseen=unseen).tolist() == [9, 4, 7, 4]
    assert allocate_rollouts(v, 14, 2, 12, unseen=np.ones(4, bool),
                             exploration_rollouts=3).tolist() == [4, 4, 3, 3]


def test_mastered_prompts_get_the_floor():
    v = [0.2, 0.2, 0.2]
    rates = [0.9, 0.5, 0.85]
    assert allocate_rollouts(v, 21, 0, 30, "proportional", pass_rates=rates).tolist() == [1, 19, 1]
    assert allocate_rollouts(v, 21, 1, 30, "neyman", pass_rates=rates,
                             priority_floor=0.0).tolist() == [1, 19, 1]
    # Threshold moved above 0.9: nobody is mastered.
    assert allocate_rollouts(v, 21, 0, 30, "proportional", pass_rates=rates,
                             mastery_threshold=0.95).tolist() == [7, 7, 7]


# ---------------------------------------------------------------- input conversion


def test_float32_integer_list_and_strided_inputs_agree():
    v64 = pool_recipe(1000, seed=9)
    v32 = v64.astype(np.float32)
    expected = allocate_rollouts(v32.astype(np.float64), 16_000, 8, 24)
    assert np.array_equal(allocate_rollouts(v32, 16_000, 8, 24), expected)
    assert np.array_equal(allocate_rollouts(v32.tolist(), 16_000, 8, 24), expected)
    wide = np.zeros((1000, 3))
    wide[:, 1] = v64
    strided = wide[:, 1]
    assert not strided.flags.c_contiguous
    assert np.array_equal(allocate_rollouts(strided, 16_000, 8, 24),
                          allocate_rollouts(v64.copy(), 16_000, 8, 24))
    reversed_view = v64[::-1]
    assert np.array_equal(allocate_rollouts(reversed_view, 16_000, 8, 24),
                          allocate_rollouts(reversed_view.copy(), 16_000, 8, 24))
    assert allocate_rollouts(np.array([1, 0, 3]), 9, 1, 5).tolist() == greedy([1, 0, 3], 9, 1, 5)
    assert allocate_rollouts(np.int64(7) * np.ones(2), 4, 2, 2).tolist() == [2, 2]


def test_input_array_is_not_modified():
    v = pool_recipe(500, seed=2)
    before = v.copy()
    allocate_rollouts(v, 8000, 8, 24)
    assert np.array_equal(v, before)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "variances, budget, lo, hi, message",
    [
        ([0.1, float("nan")], 4, 1, 3, r"^variances\[1\] is NaN$"),
        ([float("inf"), 0.1], 4, 1, 3, r"^variances\[0\] is infinite \(inf\)$"),
        ([0.1, 0.2, -0.5], 6, 1, 3, r"^variances\[2\] is negative \(-0\.5\)$"),
        ([[0.1, 0.2]], 4, 1, 3, r"^variances must be 1-D, got an array of shape \(1, 2\)$"),
        (0.5, 4, 1, 3, r"^variances must be 1-D, got an array of shape \(\)$"),
        (["a", "b"], 4, 1, 3, r"^variances must hold real numbers, got dtype <U1$"),
        ([0.1] * 16, 100, 8, 24,
         r"^budget 100 is infeasible: must lie in \[N\*lo, N\*hi\] = \[128, 384\] "
         r"for N=16, lo=8, hi=24$"),
        ([0.1] * 16, 400, 8, 24, r"^budget 400 is infeasible"),
        ([], 5, 8, 24, r"^budget 5 is infeasible: must lie in \[N\*lo, N\*hi\] = \[0, 0\] for N=0"),
        ([0.1, 0.2], 4, 3, 1, r"^lo \(3\) must not exceed hi \(1\)$"),
        ([0.1, 0.2], 4, -1, 3, r"^lo must be non-negative, got -1$"),
        ([0.1, 0.2], 4, 1, -3, r"^hi must be non-negative, got -3$"),
        ([0.1, 0.2], -4, 1, 3, r"^budget must be non-negative, got -4$"),
    ],
)
def test_bad_arguments_raise_value_error(variances, budget, lo, hi, message):
    with pytest.raises(ValueError, match=message):
        allocate_rollouts(variances, budget, lo, hi)


def test_every_rule_validates_variances():
    for rule in RULES:
        with pytest.raises(ValueError, match=r"variances\[0\] is NaN"):
            allocate_rollouts([float("nan")], 1, 1, 1, rule)


def test_large_input_reports_the_first_bad_index():
    v = np.full(300_000, 0.1)
    v[250_001] = -1.0
    v[299_999] = np.nan
    with pytest.raises(ValueError, match=r"^variances\[250001\] is negative \(-1\.0\)$"):
        allocate_rollouts(v, 16 * 300_000, 8, 24)


def test_unknown_rule():
    with pytest.raises(ValueError, match=r"^rule must be one of 'neyman', 'proportional', "
                                         r"'uniform', got \"greedy\"$"):
        allocate_rollouts([0.1], 1, 1, 1, rule="greedy")


@pytest.mark.parametrize(
    "rule, options, message",
    [
        ("uniform", {"unseen": [True, False]},
         r"^unseen does not apply to rule 'uniform' \(it takes no options\)$"),
        ("uniform", {"priority_floor": 0.1}, r"^priority_floor does not apply to rule 'uniform'"),
        ("proportional", {"exploration_rollouts": 2},
         r"^exploration_rollouts has no effect without unseen$"),
        ("neyman", {"mastery_threshold": 0.9}, r"^mastery_threshold has no effect without pass_rates$"),
        ("neyman", {"priority_floor": 0.1}, r"^priority_floor .* has no effect without pass_rates$"),
        ("neyman", {"unseen": [True]}, r"^unseen has length 1 but variances has length 2$"),
        ("neyman", {"unseen": [1, 0]}, r"^unseen must be a boolean mask, got dtype int64$"),
        ("proportional", {"unseen": [True, False], "exploration_rollouts": -1},
         r"^exploration_rollouts must be non-negative, got -1$"),
        ("proportional", {"pass_rates": [0.5]}, r"^pass_rates has length 1 but variances has length 2$"),
        ("proportional", {"pass_rates": [0.5, 1.5]}, r"^pass_rates\[1\] = 1\.5 is outside \[0, 1\]$"),
        ("proportional", {"pass_rates": [float("nan"), 0.5]}, r"^pass_rates\[0\] is NaN$"),
        ("proportional", {"pass_rates": [0.5, 0.5], "mastery_threshold": float("nan")},
         r"^mastery_threshold must be finite, got NaN$"),
        ("proportional", {"priority_floor": -0.1},
         r"^priority_floor must be a finite non-negative number, got -0\.1$"),
    ],
)
def test_option_errors(rule, options, message):
    with pytest.raises(ValueError, match=message):
        allocate_rollouts([0.1, 0.2], 4, 1, 3, rule, **options)


def test_pass_rates_of_unseen_prompts_are_ignored():
    got = allocate_rollouts([0.1, 0.2], 6, 1, 5, "proportional",
                            unseen=[True, False], pass_rates=[float("nan"), 0.5])
    assert got.tolist() == [4, 2]


# ---------------------------------------------------------------- packaging


def test_import_needs_only_numpy():
    code = (
        "import sys, dynamo_openrlhf\n"
        "from dynamo_openrlhf import allocate_rollouts, PassRatePool\n"
        "heavy = [m for m in ('torch', 'ray', 'openrlhf', 'deepspeed', 'transformers') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(allocate_rollouts([0.25, 0.0], 4, 1, 3).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[3, 1]"


# ---------------------------------------------------------------- joint selection (lo = 0)


def selection_rule(v, budget, hi, skip_factor=None, min_rollouts=None):
    """The documented skip_factor / min_rollouts rule, written out on top of `greedy`."""
    n = len(v)
    n0 = greedy(v, budget, 0, hi)
    fewest = -(-budget // hi) if hi else 0
    skipped = set()
    if skip_factor:
        lam = min((gain(v[i], n0[i] - 1) for i in range(n) if v[i] > 0 and n0[i] >= 2), default=0.0)
        cand = [i for i in range(n) if 0 < v[i] < skip_factor * lam]
        most = max(sum(x > 0 for x in v) - fewest, 0)
        skipped = set(sorted(cand, key=lambda i: (v[i], -i))[:most])
    rest = [i for i in range(n) if i not in skipped]
    if min_rollouts and min_rollouts >= 2:
        c = max(fewest, min(sum(v[i] > 0 for i in rest), budget // min_rollouts))
        served, lo = sorted(sorted(rest, key=lambda i: (-v[i], i))[:c]), min_rollouts
    elif skipped:
        served, lo = rest, 0
    else:
        return n0
    out = [0] * n
    for i, c in zip(served, greedy([v[i] for i in served], budget, lo, hi)):
        out[i] = c
    return out


@settings(max_examples=600, deadline=None)
@given(small_problems(), st.sampled_from([None, 0.0, 1.0, 4.0, 30.0]), st.sampled_from([None, 0, 1, 2, 3]))
def test_skip_factor_and_min_rollouts_follow_the_documented_rule(problem, factor, m):
    v, budget, _, hi = problem
    budget = min(budget, len(v) * hi)
    if m is not None and m >= 2 and (m > hi or -(-budget // hi) > budget // m):
        with pytest.raises(ValueError, match="min_rollouts"):
            allocate_rollouts(v, budget, 0, hi, skip_factor=factor, min_rollouts=m)
        return
    got = allocate_rollouts(v, budget, 0, hi, skip_factor=factor, min_rollouts=m)
    assert got.tolist() == selection_rule(v, budget, hi, factor, m)
    assert got.sum() == budget and got.max(initial=0) <= hi
    floor = m if m is not None and m >= 2 else 1
    assert all(c == 0 or c >= floor for c in got.tolist())


def test_skip_factor_skips_below_the_shadow_price():
    v = [0.25, 0.25, 0.01, 0.01]
    # Plain: [3, 3, 1, 1]; shadow price = gain of the last rollout given = 0.25/(2*3).
    assert allocate_rollouts(v, 8, 0, 8).tolist() == [3, 3, 1, 1]
    # 0.01 < 4 * 0.25/6: both small prompts skipped, the budget re-solved over the others.
    assert allocate_rollouts(v, 8, 0, 8, skip_factor=4.0).tolist() == [4, 4, 0, 0]
    assert allocate_rollouts(v, 8, 0, 8, skip_factor=0.2).tolist() == [3, 3, 1, 1]
    # None and 0 are today's behaviour exactly, with any lo.
    for lo in (0, 1, 2):
        plain = allocate_rollouts(v, 8, lo, 8).tolist()
        assert allocate_rollouts(v, 8, lo, 8, skip_factor=0.0).tolist() == plain
        assert allocate_rollouts(v, 8, lo, 8, skip_factor=None, min_rollouts=1).tolist() == plain


def test_skip_factor_falls_back_so_the_rest_can_absorb_the_budget():
    # hi = 3, budget 8: ceil(8/3) = 3 positive prompts must stay, so only one small one goes
    # (the smaller variance; on a tie the higher index).
    assert allocate_rollouts([0.25, 0.25, 0.01, 0.02], 8, 0, 3, skip_factor=4.0).tolist() == [3, 3, 0, 2]
    assert allocate_rollouts([0.25, 0.25, 0.01, 0.01], 8, 0, 3, skip_factor=4.0).tolist() == [3, 3, 2, 0]
    # No room at all: nothing skipped.
    assert allocate_rollouts([0.25, 0.01], 8, 0, 4, skip_factor=4.0).tolist() == [4, 4]
    # Zero-variance prompts never absorb the budget in a skipped prompt's place.
    assert allocate_rollouts([0.25, 0.0, 0.01, 0.25], 8, 0, 4, skip_factor=100.0).tolist() == [4, 0, 0, 4]


def test_min_rollouts_gives_zero_or_at_least_m():
    v = [0.25, 0.25, 0.01, 0.01]
    assert allocate_rollouts(v, 8, 0, 8, min_rollouts=2).tolist() == [2, 2, 2, 2]
    # Budget 7: only floor(7/2) = 3 prompts can be served; the largest variances (tie: lower index).
    assert allocate_rollouts(v, 7, 0, 8, min_rollouts=2).tolist() == [3, 2, 2, 0]
    assert allocate_rollouts(v, 14, 0, 8, min_rollouts=3).tolist() == [4, 4, 3, 3]
    assert allocate_rollouts(v, 8, 0, 8, skip_factor=4.0, min_rollouts=2).tolist() == [4, 4, 0, 0]
    # Zero-variance prompts are served only to absorb the budget, each with >= m.
    assert allocate_rollouts([0.25, 0.0, 0.0, 0.0], 9, 0, 4, min_rollouts=2).tolist() == [4, 3, 2, 0]


def test_skipping_on_a_large_posterior_like_batch():
    rng = np.random.default_rng(3)
    v = rng.beta(0.4, 0.4, 1024)
    v = v * (1 - v)
    n = allocate_rollouts(v, 8192, 0, 64, skip_factor=4.0, min_rollouts=2)
    assert n.sum() == 8192 and n.max() <= 64 and not np.any(n == 1)
    skipped = n == 0
    assert skipped.any() and v[skipped].max() < v[~skipped].min()


@pytest.mark.parametrize(
    "rule, lo, options, message",
    [
        ("neyman", 1, {"skip_factor": 4.0},
         r"^skip_factor requires lo = 0 \(a skipped prompt gets 0 rollouts\), got lo = 1$"),
        ("proportional", 0, {"skip_factor": 4.0},
         r"^skip_factor applies to rule 'neyman' only, got rule 'proportional'$"),
        ("uniform", 0, {"min_rollouts": 2}, r"^min_rollouts applies to rule 'neyman' only, got rule 'uniform'$"),
        ("neyman", 0, {"skip_factor": float("nan")}, r"^skip_factor must be a finite non-negative number, got NaN$"),
        ("neyman", 0, {"skip_factor": -1.0}, r"^skip_factor must be a finite non-negative number, got -1$"),
        ("neyman", 1, {"min_rollouts": 2}, r"^min_rollouts requires lo = 0 .*, got lo = 1$"),
        ("neyman", 0, {"min_rollouts": 5}, r"^min_rollouts \(5\) must not exceed hi \(4\)$"),
        ("neyman", 0, {"min_rollouts": -1}, r"^min_rollouts must be non-negative, got -1$"),
        ("neyman", 0, {"skip_factor": 4.0, "unseen": [True, False]},
         r"^skip_factor and min_rollouts cannot be combined with unseen"),
    ],
)
def test_selection_errors(rule, lo, options, message):
    with pytest.raises(ValueError, match=message):
        allocate_rollouts([0.1, 0.2], 6, lo, 4, rule, **options)


def test_min_rollouts_refuses_a_budget_groups_cannot_make_up():
    with pytest.raises(ValueError, match=r"^budget 5 cannot be split into groups of min_rollouts..hi = 3..4"):
        allocate_rollouts([0.1, 0.2], 5, 0, 4, min_rollouts=3)


# ---------------------------------------------------------------- estimators


SHIFTED = ["rloo", "dr_grpo", "reinforce_baseline"]


def test_estimator_names():
    from dynamo_openrlhf import ESTIMATORS

    assert ESTIMATORS == ("rloo", "dr_grpo", "reinforce_baseline", "group_norm")


def dp_optimum_shifted(v, budget, lo, hi):
    """Minimum of sum v/(n-1) over integer n in [lo, hi] (lo >= 2) with sum n = budget."""
    return dp_optimum(v, budget, lo, hi, cost=lambda x, k: x / (k - 1))


@settings(max_examples=300, deadline=None)
@given(small_problems(), st.sampled_from(SHIFTED), st.integers(0, 2))
def test_shifted_estimators_are_the_shifted_problem_and_the_dp_optimum(problem, estimator, lift):
    v, _, lo, hi = problem
    n = len(v)
    lo, hi = lo + 2, hi + 2 + lift
    for budget in {n * lo, n * hi, (n * lo + n * hi) // 2}:
        got = allocate_rollouts(v, budget, lo, hi, estimator=estimator)
        # m = n - 1: today's problem with budget B - N and bounds lo-1..hi-1 (same tie rule).
        assert got.tolist() == [m + 1 for m in greedy(v, budget - n, lo - 1, hi - 1)]
        shifted = allocate_rollouts(v, budget - n, lo - 1, hi - 1) + 1
        assert np.array_equal(got, shifted)
        cost = sum(x / (k - 1) for x, k in zip(v, got.tolist()))
        assert cost == pytest.approx(dp_optimum_shifted(v, budget, lo, hi), rel=1e-12, abs=1e-300)


@settings(max_examples=200, deadline=None)
@given(small_problems())
def test_default_estimator_is_todays_objective_bit_for_bit(problem):
    v, budget, lo, hi = problem
    got = allocate_rollouts(v, budget, lo, hi, estimator=None)
    assert got.tolist() == greedy(v, budget, lo, hi)
    assert np.array_equal(got, allocate_rollouts(v, budget, lo, hi))


def test_shifted_differs_from_the_plain_objective_where_it_should():
    # Budget 7 over v = (0.25, 0.0625), lo = 2. Plain: 0.25/5 + 0.0625/2 = 0.08125 beats
    # 0.25/4 + 0.0625/3 = 0.0833. Shifted: 0.25/4 + 0.0625/1 = 0.125 loses to
    # 0.25/3 + 0.0625/2 = 0.1146: the second group of two has no spare rollout for its baseline.
    v = [0.25, 0.0625]
    assert allocate_rollouts(v, 7, 2, 16).tolist() == [5, 2]
    for estimator in SHIFTED:
        assert allocate_rollouts(v, 7, 2, 16, estimator=estimator).tolist() == [4, 3]


def test_shifted_with_lo_zero_needs_the_group_floor():
    v = np.array([0.25, 0.2, 0.01, 0.0, 0.15])
    got = allocate_rollouts(v, 16, 0, 8, estimator="rloo", min_rollouts=3)
    plain = allocate_rollouts(v, 16, 0, 8, min_rollouts=3)
    served = got > 0
    assert np.array_equal(served, plain > 0) and got.sum() == 16
    assert got[served].min() >= 3
    sub = v[served]
    assert np.array_equal(got[served], allocate_rollouts(sub, 16 - len(sub), 2, 7) + 1)


@pytest.mark.parametrize(
    "lo, rule, options, message",
    [
        (1, "neyman", {"estimator": "rloo"},
         r"^estimator 'rloo' needs lo >= 2 \(a group of one rollout has no baseline\), got lo = 1; "
         r"to let prompts be skipped use lo = 0 with min_rollouts >= 2$"),
        (0, "neyman", {"estimator": "dr_grpo"}, r"^estimator 'dr_grpo' needs lo >= 2"),
        (0, "neyman", {"estimator": "reinforce_baseline", "min_rollouts": 2, "skip_factor": 4.0},
         r"^skip_factor is not supported with estimator 'reinforce_baseline'"),
        (2, "uniform", {"estimator": "rloo"},
         r"^estimator applies to rule 'neyman' only, got rule 'uniform' with estimator 'rloo'$"),
        (2, "proportional", {"estimator": "group_norm"}, r"^estimator applies to rule 'neyman' only"),
        (2, "neyman", {"estimator": "group_norm"},
         r"^estimator 'group_norm' needs the Beta posteriors .*use PassRatePool.allocate$"),
        (2, "neyman", {"estimator": "rloo", "unseen": [True, False, False]},
         r"^estimator 'rloo' cannot be combined with unseen"),
        (2, "neyman", {"estimator": "grpo"},
         r"^estimator must be None or one of 'rloo', 'dr_grpo', 'reinforce_baseline', "
         r"'group_norm', got \"grpo\"$"),
    ],
)
def test_estimator_errors(lo, rule, options, message):
    with pytest.raises(ValueError, match=message):
        allocate_rollouts([0.1, 0.2, 0.0], 12, lo, 8, rule, **options)


# ---------------------------------------------------------------- per-prompt noise scale

SCALES = st.one_of(
    st.sampled_from([1.0, 0.02, 7.0, 0.5, 2.0]),
    st.floats(0.02, 7.0, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=400, deadline=None)
@given(small_problems(), st.data())
def test_scale_gives_the_dp_optimum_of_the_weighted_objective(problem, data):
    v, budget, lo, hi = problem
    s = data.draw(st.lists(SCALES, min_size=len(v), max_size=len(v)))
    w = [x * y for x, y in zip(v, s)]
    got = allocate_rollouts(v, budget, lo, hi, scale=s)
    # The greedy on the products (same tie rule), hence the exact minimiser of sum s v / n.
    assert got.tolist() == greedy(w, budget, lo, hi)
    if lo == 0 and budget < sum(x > 0 for x in w):
        return
    best = dp_optimum(v, budget, lo, hi, cost=None) if s == [1.0] * len(v) else None
    # zero tests on the products: a subnormal v times a small scale underflows to 0 (v = 5e-324, s = 0.02)
    weighted = dp_optimum(list(range(len(v))), budget, lo, hi, cost=lambda i, k: (
        0.0 if w[i] == 0 else (math.inf if k == 0 else w[i] / k)))
    cost = sum(0.0 if x == 0 else x / k for x, k in zip(w, got.tolist()))
    assert cost == pytest.approx(weighted, rel=1e-12, abs=1e-300)
    if best is not None:
        assert weighted == best


@settings(max_examples=300, deadline=None)
@given(small_problems(), st.sampled_from(SHIFTED), st.data())
def test_scale_with_shifted_estimators_gives_the_dp_optimum(problem, estimator, data):
    v, _, lo, hi = problem
    n = len(v)
    lo, hi = lo + 2, hi + 2
    s = data.draw(st.lists(SCALES, min_size=n, max_size=n))
    for budget in {n * lo, n * hi, (n * lo + n * hi) // 2}:
        got = allocate_rollouts(v, budget, lo, hi, estimator=estimator, scale=s)
        best = dp_optimum(list(range(n)), budget, lo, hi, cost=lambda i, k: s[i] * v[i] / (k - 1))
        cost = sum(y * x / (k - 1) for x, y, k in zip(v, s, got.tolist()))
        assert cost == pytest.approx(best, rel=1e-12, abs=1e-300)
        w = np.asarray(v) * np.asarray(s)
        assert np.array_equal(got, allocate_rollouts(w, budget, lo, hi, estimator=estimator))


@settings(max_examples=200, deadline=None)
@given(small_problems(), st.sampled_from(RULES))
def test_unit_scale_and_no_scale_are_todays_result_bit_for_bit(problem, rule):
    v, budget, lo, hi = problem
    today = allocate_rollouts(v, budget, lo, hi, rule)
    assert np.array_equal(allocate_rollouts(v, budget, lo, hi, rule, scale=None), today)
    assert np.array_equal(allocate_rollouts(v, budget, lo, hi, rule, scale=np.ones(len(v))), today)


@pytest.mark.parametrize("bounds, estimator", [((8, 24), None), ((0, 64), None), ((2, 64), "rloo"),
                                               ((4, 40), "dr_grpo")])
def test_large_scaled_inputs_equal_the_solver_on_the_products(bounds, estimator):
    lo, hi = bounds
    n = 200_000  # above the parallel threshold
    v = pool_recipe(n, seed=8)
    rng = np.random.default_rng(8)
    s = 0.02 * 350.0 ** rng.random(n)
    got = allocate_rollouts(v, 16 * n, lo, hi, estimator=estimator, scale=s)
    assert np.array_equal(got, allocate_rollouts(v * s, 16 * n, lo, hi, estimator=estimator))
    if estimator is None:
        certify_optimal(v * s, got, 16 * n, lo, hi)
    ones = allocate_rollouts(v, 16 * n, lo, hi, estimator=estimator, scale=np.ones(n))
    assert np.array_equal(ones, allocate_rollouts(v, 16 * n, lo, hi, estimator=estimator))


def test_scale_with_proportional_uniform_and_the_switches():
    v = np.array([0.1, 0.2, 0.0, 0.3, 0.05])
    s = np.array([4.0, 0.5, 2.0, 1.0, 8.0])
    # proportional: n proportional to max(s v, floor) = 0.4, 0.1, 0.01, 0.3, 0.4 (sum 1.21):
    # 13.22, 3.31, 0.33, 9.92, 13.22; the two largest remainders (0.92, 0.33) get the last two.
    got = allocate_rollouts(v, 40, 0, 40, "proportional", scale=s)
    assert np.array_equal(got, allocate_rollouts(v * s, 40, 0, 40, "proportional"))
    assert got.tolist() == [13, 3, 1, 10, 13]
    # uniform: validated, then ignored.
    assert allocate_rollouts(v, 13, 0, 40, "uniform", scale=s).tolist() == [3, 3, 3, 2, 2]
    for options in ({"skip_factor": 4.0}, {"min_rollouts": 3}, {"unseen": np.array([0, 1, 0, 0, 0], bool)}):
        assert np.array_equal(allocate_rollouts(v, 20, 0, 10, scale=s, **options),
                              allocate_rollouts(v * s, 20, 0, 10, **options))


@pytest.mark.parametrize(
    "variances, scale, rule, message",
    [
        ([0.1, 0.2], [1.0], "neyman", r"^scale has length 1 but variances has length 2$"),
        ([0.1, 0.2], [1.0, float("nan")], "neyman", r"^scale\[1\] is NaN$"),
        ([0.1, 0.2], [float("inf"), 1.0], "proportional", r"^scale\[0\] is infinite \(inf\)$"),
        ([0.1, 0.2], [1.0, 0.0], "uniform", r"^scale\[1\] is zero \(0.0\); a scale must be > 0$"),
        ([0.1, 0.2], [-3.0, 1.0], "neyman", r"^scale\[0\] is negative \(-3.0\); a scale must be > 0$"),
        ([0.1, float("nan")], [0.0, 1.0], "neyman", r"^variances\[1\] is NaN$"),
        ([0.1, 1e300], [1.0, 1e10], "neyman",
         r"^scale\[1\] \* variances\[1\] overflows float64 \(10000000000.0 \* 1e300\)$"),
        ([0.1, 0.2], [[1.0, 1.0]], "neyman", r"^scale must be 1-D, got an array of shape \(1, 2\)$"),
        ([0.1, 0.2], ["a", "b"], "neyman", r"^scale must hold real numbers, got dtype <U1$"),
    ],
)
def test_bad_scales_are_named_by_index_and_value(variances, scale, rule, message):
    with pytest.raises(ValueError, match=message):
        allocate_rollouts(variances, 4, 1, 3, rule, scale=scale)


def test_large_scale_reports_the_first_bad_index():
    s = np.ones(300_000)
    s[250_001] = 0.0
    s[299_999] = np.nan
    with pytest.raises(ValueError, match=r"^scale\[250001\] is zero"):
        allocate_rollouts(np.full(300_000, 0.1), 16 * 300_000, 8, 24, scale=s)


def test_allocation_problems_are_the_allocation_calls_messages():
    from dynamo_openrlhf import PROBLEM_SUBJECTS, allocation_problems
    from dynamo_openrlhf._core import filter_counts

    assert PROBLEM_SUBJECTS == ("bounds", "budget", "reference_options", "calibrated", "noise_scale", "filter_band",
                                "skip_factor", "skip_budget", "min_rollouts", "estimator", "skip_price",
                                "explore_seed", "prior", "forget")
    assert allocation_problems(16, 64, 2, 6, "neyman", estimator="rloo", prior=(1.0, 1.0), forget=0.9) == []
    cases = [  # settings, the call that raises for them
        (dict(prompts=2, budget=4, lo=3, hi=1), lambda: allocate_rollouts([0.1, 0.2], 4, 3, 1)),
        (dict(prompts=2, budget=40, lo=2, hi=6), lambda: allocate_rollouts([0.1, 0.2], 40, 2, 6)),
        (dict(prompts=4, budget=8, lo=0, hi=4, rule="neyman", min_rollouts=5),
         lambda: allocate_rollouts([0.1] * 4, 8, 0, 4, min_rollouts=5)),
        (dict(prompts=2, budget=8, lo=1, hi=6, rule="neyman", estimator="rloo"),
         lambda: allocate_rollouts([0.1, 0.2], 8, 1, 6, estimator="rloo")),
        (dict(prompts=4, budget=8, lo=0, hi=4, rule="uniform", skip_factor=4.0),
         lambda: allocate_rollouts([0.1] * 4, 8, 0, 4, rule="uniform", skip_factor=4.0)),
        (dict(prompts=0, budget=0, lo=0, hi=0, forget=0.0), lambda: PassRatePool(forget=0.0)),
        (dict(prompts=0, budget=0, lo=0, hi=0, prior=(1.0, float("nan"))),
         lambda: PassRatePool(prior=(1.0, float("nan")))),
        # the pool's switches: PassRatePool.allocate's own checks
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="uniform", exploration=True),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, "uniform", exploration=True)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="proportional", mastery=False, mastery_threshold=0.9),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, "proportional", mastery=False,
                                         mastery_threshold=0.9)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="neyman", priority_floor=0.1),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, priority_floor=0.1)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="uniform", calibrated=True),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, "uniform", calibrated=True)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="neyman", estimator="dr_grpo", exploration=True),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, estimator="dr_grpo", exploration=True)),
        (dict(prompts=4, budget=8, lo=0, hi=4, rule="neyman", estimator="rloo", min_rollouts=2, skip_price=-1.0),
         lambda: PassRatePool().allocate(np.arange(4), 8, 0, 4, estimator="rloo", min_rollouts=2, skip_price=-1.0)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="neyman", estimator="rloo", skip_price=4.0),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, estimator="rloo", skip_price=4.0)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="neyman", estimator="group_norm", skip_price=4.0),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, estimator="group_norm", skip_price=4.0)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="neyman", explore_seed=3),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, explore_seed=3)),
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="uniform", noise_scale=True),
         lambda: PassRatePool().allocate(np.arange(4), 8, 2, 4, "uniform", noise_scale=True)),
        # the trainer's rule "filter" (the core's filter_counts in front of rule uniform)
        (dict(prompts=4, budget=8, lo=2, hi=4, rule="uniform", filter_band=float("nan")),
         lambda: filter_counts(np.full(4, 0.5), np.full(4, 0.25), 8, 2, 4, float("nan"))),
    ]
    for kw, call in cases:
        with pytest.raises(ValueError) as info:
            call()
        (problem,) = allocation_problems(**kw)
        assert problem[1] == str(info.value), kw
    # two problems, the pool raises the skip price's first (then it would refuse skip_factor with rloo)
    with pytest.raises(ValueError) as info:
        PassRatePool().allocate(np.arange(4), 8, 0, 4, estimator="rloo", min_rollouts=2, skip_price=4.0, skip_factor=4.0)
    found = allocation_problems(4, 8, 0, 4, "neyman", estimator="rloo", min_rollouts=2, skip_price=4.0, skip_factor=4.0)
    assert [s for s, _ in found] == ["estimator", "skip_price"]
    assert found[1][1] == str(info.value) == "skip_price cannot be combined with skip_factor (two skipping rules)"
    # every problem at once, in the subjects' order; unknown names raise as in the allocation calls
    found = allocation_problems(8, 32, 0, 8, "neyman", skip_factor=-1.0, min_rollouts=9, forget=2.0)
    assert [s for s, _ in found] == ["skip_factor", "min_rollouts", "forget"]
    # the run policy (skip_budget) only on request: the allocation call takes the skip rule at 2 rollouts each
    assert allocate_rollouts(np.full(16, 0.25), 32, 0, 8, skip_factor=4.0).sum() == 32
    assert allocation_problems(16, 32, 0, 8, "neyman", skip_factor=4.0) == []
    assert allocation_problems(16, 32, 0, 8, "neyman", skip_factor=4.0, run_policies=True) == [(
        "skip_budget", "skip_factor 4 needs >= 3 rollouts per prompt on average, got 2 (budget 32 over 16 prompts): "
                       "with fewer, prompts of equal variance fall below the skip cut and are skipped at random")]
    assert allocation_problems(16, 48, 0, 8, "neyman", skip_factor=4.0, run_policies=True) == []
    assert allocation_problems(16, 32, 0, 8, "neyman", skip_factor=0.0, run_policies=True) == []
    with pytest.raises(ValueError, match="^rule must be one of 'neyman', 'proportional', 'uniform', got \"filter\"$"):
        allocation_problems(8, 32, 0, 8, "filter")
    with pytest.raises(ValueError, match="^estimator must be None or one of"):
        allocation_problems(8, 32, 0, 8, "neyman", estimator="gae")
