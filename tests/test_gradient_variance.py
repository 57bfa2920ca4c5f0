"""Small, fast checks of benchmarks/gradient_variance.py: behaviour, not outcomes.

The predicted ratio under each estimator's model, the variance/bootstrap algebra against direct numpy, the
allocations' budget and bounds, real gradients of the tiny policy (finite, zero for constant-reward groups,
the balanced loss equal to its hand-computed weighted sum), deterministic sampling, and a --quick end-to-end
run that writes its table, JSON and PNG."""
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gradient_variance as gv  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------


def _oracle_pool(ids, p, trials=64_000):
    from dynamo_openrlhf import PassRatePool

    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update(ids, np.round(np.asarray(p) * trials).astype(np.int64), np.full(len(ids), trials))
    return pool


def test_predicted_ratio_uses_the_estimators_model():
    ids = np.arange(3, dtype=np.int64)
    pool = _oracle_pool(ids, [0.5, 0.1, 0.0])
    v = np.asarray(pool.expected_variance(ids))
    uniform = [8, 8, 8]
    # rloo: sum v/(n-1); the default model: sum v/n
    assert gv.predicted_ratio(pool, ids, [12, 10, 2], "rloo") == pytest.approx(
        (v[0] / 11 + v[1] / 9 + v[2] / 1) / (v.sum() / 7), rel=1e-12)
    assert gv.predicted_ratio(pool, ids, [12, 10, 2], None) == pytest.approx(
        (v[0] / 12 + v[1] / 10 + v[2] / 2) / (v.sum() / 8), rel=1e-12)
    assert gv.predicted_ratio(pool, ids, uniform, "rloo") == pytest.approx(1.0, rel=1e-12)
    assert gv.predicted_ratio(pool, ids, uniform, "group_norm") == pytest.approx(1.0, rel=1e-12)
    # group_norm: v (n-1) / (n^2 P(n)), P(n) = 1 - E[p^n] - E[(1-p)^n] under each Beta posterior. Note the
    # (near) never-solved prompt: v/P(n) -> 1/n as p -> 0, so its cost stays ~(n-1)/n^3, not 0.
    s_, f_ = pool.evidence(ids)

    def gn(i, n):
        a, b = 1.0 + s_[i], 1.0 + f_[i]
        ep = math.prod((a + k) / (a + b + k) for k in range(n))
        eq = math.prod((b + k) / (a + b + k) for k in range(n))
        return v[i] * (n - 1) / (n * n * (1 - ep - eq))

    want = (gn(0, 12) + gn(1, 10) + gn(2, 2)) / (gn(0, 8) + gn(1, 8) + gn(2, 8))
    assert gv.predicted_ratio(pool, ids, [12, 10, 2], "group_norm") == pytest.approx(want, rel=1e-6)
    assert gn(2, 2) == pytest.approx(1 / 8, rel=1e-3)


def test_trace_cov_and_bootstrap_algebra():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 300)).astype(np.float32) + 5.0  # a large common mean must not matter
    G = gv.centered_gram(X)
    direct = np.var(X.astype(np.float64), axis=0, ddof=1).sum()
    assert float(gv.trace_cov(G)) == pytest.approx(direct, rel=1e-9)
    W = gv._counts(rng, 7, 5)
    assert np.all(W.sum(1) == 7)
    boot = gv.trace_cov(G, W)
    for s in range(5):
        rows = np.repeat(X.astype(np.float64), W[s].astype(int), axis=0)
        assert boot[s] == pytest.approx(np.var(rows, axis=0, ddof=1).sum(), rel=1e-9)

    import torch

    st = gv.gradient_stats(torch.from_numpy(X), {"all": [0, 300]})
    assert st["block_trace"]["all"] == pytest.approx(direct, rel=1e-6)
    nsr = gv.noise_to_signal(st, W)
    for s in range(5):
        rows = np.repeat(X.astype(np.float64), W[s].astype(int), axis=0)
        tr = np.var(rows, axis=0, ddof=1).sum()
        sig = (rows.mean(0) ** 2).sum() - tr / 7
        assert nsr[s] == pytest.approx(tr / sig, rel=1e-6)


def test_response_lengths():
    import torch

    eos, pad = 2, 0
    gen = torch.tensor([[5, 6, eos, pad], [5, pad, 6, 7], [eos, pad, pad, pad]])
    # a pad sampled before EOS is a real token; no EOS -> the whole row
    assert gv.response_lengths(gen, eos) == [3, 4, 1]


# ---------------------------------------------------------------------------------------------------
# allocations
# ---------------------------------------------------------------------------------------------------


def test_allocations_hold_budget_and_bounds():
    from dynamo_openrlhf import PassRatePool

    N = 12
    ids = np.arange(100, 100 + N, dtype=np.int64)
    k = np.array([0, 8, 4, 1, 7, 3, 0, 8, 2, 5, 6, 4])
    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update(ids, k, np.full(N, 8))
    pool.fit_prior()
    p = np.array([0, 1, 0.5, 0.1, 0.9, 0.3, 0, 1, 0.2, 0.6, 0.7, 0.5])
    oracle = _oracle_pool(ids, p)
    B = gv.UNIFORM_N * N
    allocs = gv.make_allocations(pool, oracle, ids, B, ["rloo", "group_norm"])
    assert set(allocs) == {"uniform", "ours[rloo]", "oracle[rloo]", "ours[group_norm]", "oracle[group_norm]"}
    for name, n in allocs.items():
        assert n.dtype == np.int64 and n.shape == (N,)
        gv.check_allocation(name, n, B)  # sum == B and the bounds
    assert allocs["uniform"].tolist() == [gv.UNIFORM_N] * N
    for e in ("rloo", "group_norm"):  # the exact minimiser of its own objective is never worse than uniform
        assert gv.predicted_ratio(oracle, ids, allocs[f"oracle[{e}]"], e) <= 1.0 + 1e-12
    # the oracle gives prompts that are never / always solved the lower bound
    assert allocs["oracle[rloo]"][p * (1 - p) == 0].tolist() == [gv.BOUNDS[0]] * 4
    assert gv.allocation_estimator("ours[group_norm]") == "group_norm" and gv.allocation_estimator("uniform") is None
    assert gv.objectives(["grpo", "rloo_balanced", "dynamo"]) == ["group_norm", "rloo"]
    with pytest.raises(AssertionError):
        gv.check_allocation("ours[rloo]", np.array([1] + [gv.UNIFORM_N] * (N - 1)), B)


# ---------------------------------------------------------------------------------------------------
# --priced: priced skipping's realised MSE
# ---------------------------------------------------------------------------------------------------


def test_debiased_sq_mean_is_exactly_unbiased_by_enumeration():
    # x_r = mu + s_r d_r, s_r = ±1 independent: averaging the estimator over all 2^R sign patterns is its exact
    # expectation, which must be ‖mu‖² (the noise differs per repeat: the estimator needs only independence)
    import itertools

    rng = np.random.default_rng(3)
    R, D = 4, 5
    mu, d = rng.normal(size=D), rng.normal(size=(R, D)) * np.array([[0.5], [1.0], [2.0], [3.0]])
    vals = []
    for signs in itertools.product((-1.0, 1.0), repeat=R):
        X = mu + np.asarray(signs)[:, None] * d
        est = gv.debiased_sq_mean(X @ X.T)
        direct = (X.mean(0) ** 2).sum() - np.var(X, axis=0, ddof=1).sum() / R  # ‖mean‖² − trCov/R
        assert est == pytest.approx(direct, rel=1e-12, abs=1e-12)
        vals.append(est)
    assert np.mean(vals) == pytest.approx((mu ** 2).sum(), rel=1e-12)
    # identical repeats: no noise, the estimate is ‖x‖² itself
    X = np.tile(mu, (R, 1))
    assert gv.debiased_sq_mean(X @ X.T) == pytest.approx((mu ** 2).sum(), rel=1e-12)
    # bootstrap rows: the same estimator on the resampled repeats
    X = mu + rng.normal(size=(R, D))
    W = gv._counts(rng, R, 6)
    boot = gv.debiased_sq_mean(X @ X.T, W)
    assert boot.shape == (6,)
    for k in range(6):
        rows = np.repeat(X, W[k].astype(int), axis=0)
        want = (rows.mean(0) ** 2).sum() - np.var(rows, axis=0, ddof=1).sum() / R
        assert boot[k] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert gv.debiased_sq_mean(X @ X.T, np.ones((1, R)))[0] == pytest.approx(gv.debiased_sq_mean(X @ X.T), rel=1e-12)


def test_implied_kappa_and_signed_ci():
    assert gv.implied_kappa(6.0, 2.0, 0.75) == 4.0  # 6 = κ · 2 · 0.75
    assert math.isnan(gv.implied_kappa(1.0, 2.0, 0.0)) and math.isnan(gv.implied_kappa(1.0, float("nan"), 1.0))
    lo, hi = gv._ci_signed(np.linspace(-1.0, 1.0, 201))
    assert lo == pytest.approx(-0.95) and hi == pytest.approx(0.95)  # negatives kept (gv._ci drops them)


def test_priced_allocations_budget_bounds_skips_and_prediction():
    from dynamo_openrlhf import PassRatePool
    from dynamo_openrlhf.allocation import predicted_variance_ratio

    N = 12
    ids = np.arange(200, 200 + N, dtype=np.int64)
    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update(ids, np.array([0, 8, 4, 1, 7, 3, 0, 8, 2, 5, 6, 4]), np.full(N, 8))
    pool.fit_prior()
    p = np.array([0, 1, 0.5, 0.1, 0.9, 0.3, 0, 1, 0.2, 0.6, 0.7, 0.5])
    oracle = _oracle_pool(ids, p)
    B = gv.PRICED_UNIFORM_N * N
    allocs = gv.priced_allocations(pool, oracle, ids, B, 4.0)
    assert list(allocs) == ["uniform4", "priced", "priced[oracle]", "noskip"]
    for name, n in allocs.items():
        assert n.dtype == np.int64 and n.shape == (N,)
        gv.check_priced_allocation(name, n, B)
    assert allocs["uniform4"].tolist() == [4] * N and allocs["noskip"].min() >= gv.PRICED_MIN
    # the oracle skips its settled prompts (p = 0 or 1: skip cost ~1e-9) and, at this budget, p = 0.1 / 0.9
    # (4 (p(1-p))² = 0.032 against serving's v/(n-1) = 0.09/(n-1) plus the rollouts' price); serves the rest
    assert (allocs["priced[oracle]"] == 0).tolist() == [bool(x * (1 - x) <= 0.09 + 1e-12) for x in p]
    assert np.array_equal(allocs["priced"], np.asarray(pool.allocate(ids, B, 0, 32, "neyman", estimator="rloo",
                                                                     min_rollouts=2, skip_price=4.0)))
    # prediction = the trainer's formula, = variance part + bias part (B/N integer), each over Σ v/3
    v = np.asarray(pool.expected_variance(ids))
    sc = np.asarray(pool.skip_costs(ids, 4.0))
    n = allocs["priced"]
    pr = gv.priced_prediction(pool, ids, n, 4.0)
    assert pr["ratio"] == pytest.approx(predicted_variance_ratio(v, n, "rloo", skip_costs=sc), rel=1e-12)
    assert pr["variance"] == pytest.approx(np.sum(v[n > 0] / (n[n > 0] - 1)) / (v.sum() / 3), rel=1e-12)
    assert pr["bias"] == pytest.approx(sc[n == 0].sum() / (v.sum() / 3), rel=1e-12)
    assert pr["ratio"] == pytest.approx(pr["variance"] + pr["bias"], rel=1e-12)
    # the exact DP minimises this objective: no worse than uniform4 or noskip on it
    assert gv.priced_prediction(pool, ids, allocs["uniform4"], 4.0) == {"ratio": 1.0, "variance": 1.0, "bias": 0.0}
    assert pr["ratio"] <= gv.priced_prediction(pool, ids, allocs["noskip"], 4.0)["ratio"] + 1e-12 and pr["ratio"] < 1.0
    with pytest.raises(AssertionError, match="outside"):
        gv.check_priced_allocation("x", np.array([1] + [4] * (N - 2) + [7]), B)
    with pytest.raises(AssertionError, match="budget"):
        gv.check_priced_allocation("x", np.array([4] * N), B + 1)
    with pytest.raises(ValueError, match="multiple"):
        gv.priced_allocations(pool, oracle, ids, B + 1, 4.0)


# ---------------------------------------------------------------------------------------------------
# real policy: gradients and sampling (tiny preset)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy():
    pytest.importorskip("transformers")
    import torch

    torch.set_num_threads(1)
    from dynamo_openrlhf.tiny import prepare_tiny_assets, read_jsonl

    assets = prepare_tiny_assets()
    pol = gv.Policy(str(assets.model_dir))
    pol.rows = read_jsonl(assets.train_file)[:3]
    return pol


def test_real_gradients_finite_and_zero_for_constant_groups(policy):
    import torch

    from dynamo_openrlhf.advantages import group_normalized_advantages, prompt_balanced_weights

    enc = [policy.encode(r["prompt"]) for r in policy.rows]
    n = np.array([2, 3, 1])
    texts, resp, owner = policy.sample(enc, n, seed=5)
    assert len(texts) == len(resp) == len(owner) == n.sum()
    assert owner == [0, 0, 1, 1, 1, 2]
    assert all(1 <= len(r) <= gv.MAX_NEW_TOKENS for r in resp)
    losses = gv.make_losses(["grpo", "rloo_balanced", "dynamo"])
    sizes = torch.tensor(n)
    w = prompt_balanced_weights(sizes, "rloo", gv.TOKEN_NORMALIZER)

    def terms(rewards):
        r = torch.tensor(rewards)
        return {"grpo": (losses["grpo"][0], group_normalized_advantages(r, sizes, "group_norm"), None),
                "rloo_balanced": (losses["rloo_balanced"][0], group_normalized_advantages(r, sizes, "rloo"), w),
                "dynamo": (losses["dynamo"][0], group_normalized_advantages(r, sizes, "rloo"), w)}

    # constant rewards within each group (and a group of one) -> advantage 0 -> gradient exactly 0
    g0 = policy.gradients(enc, resp, owner, terms([1.0, 1.0, 0.0, 0.0, 0.0, 1.0]))
    assert all(torch.count_nonzero(g) == 0 for g in g0.values())
    # mixed rewards -> a finite, non-zero gradient over all parameters
    g = policy.gradients(enc, resp, owner, terms([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]))
    for v in ("grpo", "rloo_balanced", "dynamo"):
        assert g[v].shape == (policy.dim,) and torch.isfinite(g[v]).all() and float(g[v].norm()) > 0
    # the balanced loss is sum_s w_s sum_t (-A_s logp_st) at ratio 1: scaling every weight by 3 scales the gradient by 3
    g3 = policy.gradients(enc, resp, owner, {"x": (losses["rloo_balanced"][0], terms([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])[
        "rloo_balanced"][1], 3 * w)})
    assert torch.allclose(g3["x"], 3 * g["rloo_balanced"], rtol=1e-5, atol=1e-9)


def test_sampling_is_deterministic_given_the_seed(policy):
    enc = [policy.encode(r["prompt"]) for r in policy.rows]
    a = policy.sample(enc, [3, 3, 3], seed=11)
    b = policy.sample(enc, [3, 3, 3], seed=11)
    assert a == b


# ---------------------------------------------------------------------------------------------------
# noise models (benchmarks/_noise_model.py)
# ---------------------------------------------------------------------------------------------------

import _noise_model as nm  # noqa: E402


def test_binomial_moments_closed_forms():
    for n, p in [(2, 0.3), (8, 0.1), (16, 0.75), (5, 0.0), (5, 1.0)]:
        m = nm.binomial_moments(n, p)
        # E[K(n-K)^2] = n(n-1)p(1-p)[(n-2)(1-p)+1] (ordered triples: one success, two failures, the two may coincide)
        assert m["k_nk2"] == pytest.approx(n * (n - 1) * p * (1 - p) * ((n - 2) * (1 - p) + 1), rel=1e-12, abs=1e-12)
        assert m["k2_nk"] == pytest.approx(n * (n - 1) * p * (1 - p) * ((n - 2) * p + 1), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        nm.binomial_moments(4, 1.5)


def test_rloo_prompt_variance_is_exact_by_enumeration():
    """A discrete score model: given the class, s takes one of two 2-D values. Enumerate every draw of n = 3
    (class, value) samples and compare the exact variance of (1/n) Σ A_j s_j with the formula."""
    import itertools

    p = 0.3
    vals = {1: (np.array([2.0, -1.0]), np.array([0.5, 3.0]), 0.4), 0: (np.array([-1.0, 0.0]), np.array([1.0, 2.0]), 0.7)}
    outcomes = [(c, x, (p if c else 1 - p) * (w if k == 0 else 1 - w))
                for c, (a, b, w) in vals.items() for k, x in enumerate((a, b))]
    n = 3
    mean, second = np.zeros(2), 0.0
    for draw in itertools.product(outcomes, repeat=n):
        r = np.array([d[0] for d in draw], dtype=float)
        prob = np.prod([d[2] for d in draw])
        A = (n * r - r.sum()) / (n - 1)
        g = sum(A[j] * draw[j][1] for j in range(n)) / n
        mean += prob * g
        second += prob * float(g @ g)
    var = second - float(mean @ mean)
    mu = {c: w * a + (1 - w) * b for c, (a, b, w) in vals.items()}
    sig = {c: w * float((a - mu[c]) @ (a - mu[c])) + (1 - w) * float((b - mu[c]) @ (b - mu[c]))
           for c, (a, b, w) in vals.items()}
    gap2 = float((mu[1] - mu[0]) @ (mu[1] - mu[0]))
    assert nm.rloo_prompt_variance(n, p, sig[1], sig[0], gap2) == pytest.approx(var, rel=1e-12)
    # leading order: V(n) (n-1) / (p(1-p)) -> (1-p) σ1² + p σ0² + (1-2p)² ‖μ1 − μ0‖² (the minority class's noise
    # dominates; the last term is the fluctuation of K(n-K) around its mean, same order in 1/n)
    big = 4001
    lead = nm.rloo_prompt_variance(big, p, sig[1], sig[0], gap2) * (big - 1) / (p * (1 - p))
    assert lead == pytest.approx((1 - p) * sig[1] + p * sig[0] + (1 - 2 * p) ** 2 * gap2, rel=2e-3)
    with pytest.raises(ValueError, match="n must be >= 2"):
        nm.rloo_prompt_variance(1, p, 1.0, 1.0, 0.0)


def test_class_curve_params_from_sufficient_statistics():
    rng = np.random.default_rng(3)
    fail, succ = rng.normal(size=(5, 4)), rng.normal(size=(3, 4)) + 1.0
    prm = nm.class_curve_params([5, 3], [float((fail ** 2).sum()), float((succ ** 2).sum())],
                                float(((succ.mean(0) - fail.mean(0)) ** 2).sum()),
                                [float((fail.sum(0) ** 2).sum()), float((succ.sum(0) ** 2).sum())])
    vf = np.var(fail, axis=0, ddof=1).sum()
    vs = np.var(succ, axis=0, ddof=1).sum()
    assert prm["p"] == 3 / 8
    assert prm["var_fail"] == pytest.approx(vf, rel=1e-12) and prm["var_succ"] == pytest.approx(vs, rel=1e-12)
    # ‖μ1 − μ0‖² unbiased: the squared gap of the sample means less the means' variances
    want = float(((succ.mean(0) - fail.mean(0)) ** 2).sum()) - vf / 5 - vs / 3
    assert prm["mean_gap2"] == pytest.approx(max(want, 0.0), rel=1e-12, abs=1e-15)
    one = nm.class_curve_params([4, 0], [8.0, 0.0], None, [20.0, 0.0])  # never solved: p = 0, no gap
    assert one == {"p": 0.0, "var_fail": pytest.approx((8.0 - 20.0 / 4) / 3), "var_succ": 0.0, "mean_gap2": 0.0}
    assert nm.variance_curve(one, [2, 8]).tolist() == [0.0, 0.0]


def test_sample_proxies_match_direct_formulas():
    import torch

    g = torch.Generator().manual_seed(0)
    M, T, V, d = 3, 5, 7, 4
    logits = torch.randn(M, T, V, generator=g, dtype=torch.float64)
    hidden = torch.randn(M, T, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (M, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.float64)
    out = nm.sample_proxies(logits, hidden, y, mask, chunk_tokens=T)  # one sample per chunk
    P = torch.softmax(logits, -1)
    for j in range(M):
        ts = [t for t in range(T) if mask[j, t] > 0]
        pi = torch.stack([P[j, t, y[j, t]] for t in ts])
        Z = torch.stack([torch.nn.functional.one_hot(y[j, t], V).double() - P[j, t] for t in ts])
        H = hidden[j, ts]
        assert out["length"][j] == len(ts)
        assert float(out["nll"][j]) == pytest.approx(float(-pi.log().mean()), rel=1e-5)
        assert float(out["pisq"][j]) == pytest.approx(float(((1 - pi) ** 2).sum()), rel=1e-5)
        assert float(out["ghost"][j]) == pytest.approx(float(((Z.T @ H) ** 2).sum()), rel=1e-5)
        assert float(out["ghost_diag"][j]) == pytest.approx(float(((Z ** 2).sum(1) * (H ** 2).sum(1)).sum()), rel=1e-5)
    # the T > d branch (‖zᵀh‖² form) gives the same exact ghost norm as the T <= d branch (Gram form)
    wide = nm.sample_proxies(logits, torch.cat([hidden, hidden], -1), y, mask)
    assert torch.allclose(wide["ghost"], 2 * out["ghost"], rtol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        nm.sample_proxies(logits, hidden[:, :2], y, mask)


def test_noise_scale_class_means_and_shrinkage():
    q = np.array([1.0, 3.0, 10.0, 2.0, 2.0, 6.0])
    success = np.array([0, 0, 1, 0, 0, 0])
    owner = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0.25, 0.5, 1.0])
    Q0, Q1 = np.mean([1, 3, 2, 2, 6]), 10.0  # pool-level class means
    k = 2.0
    s = nm.noise_scale(q, success, owner, p, kappa=k)
    succ0, fail0 = (10 + k * Q1) / (1 + k), (4 + k * Q0) / (2 + k)
    succ1, fail1 = Q1, (4 + k * Q0) / (2 + k)  # prompt 1 never succeeded: its success mean is the pool's
    fail2 = (6 + k * Q0) / (1 + k)
    assert s.tolist() == pytest.approx([0.75 * succ0 + 0.25 * fail0, 0.5 * succ1 + 0.5 * fail1, fail2], rel=1e-12)
    curve = nm.noise_scale(q, success, owner, p, per_prompt=False)
    assert curve.tolist() == pytest.approx([0.75 * Q1 + 0.25 * Q0, 0.5 * Q1 + 0.5 * Q0, Q0], rel=1e-12)
    with pytest.raises(ValueError, match="owner outside"):
        nm.noise_scale(q, success, owner + 1, p)
    with pytest.raises(ValueError, match="success must be 0/1"):
        nm.noise_scale(q, success * 2, owner, p)
    with pytest.raises(ValueError, match="kappa"):
        nm.noise_scale(q, success, owner, p, kappa=0.0)


def test_class_prior_curve_fits_a_power_law_and_extrapolates():
    # success-class q = 1/p exactly on three prompts; a fourth never succeeded (p̂ = 1/16)
    p = np.array([0.5, 0.25, 0.125, 0.0625])
    q = np.array([2.0, 2.0, 4.0, 8.0, 8.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    success = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    owner = np.array([0, 0, 1, 2, 2, 0, 1, 2, 3, 3])
    curve = nm.class_prior_curve(q, success, owner, p)
    assert curve[1].tolist() == pytest.approx([2.0, 4.0, 8.0, 16.0], rel=1e-9)
    assert curve[0].tolist() == pytest.approx([3.0] * 4, rel=1e-12)  # a flat class stays flat (slope 0)
    # rarer outcomes are never cheaper: a positive fitted slope is clipped to 0 (the count-weighted geometric mean
    # of the prompts' class means: 0.5, 0.25, 0.125 with weights 2, 1, 2)
    up = nm.class_prior_curve(1.0 / q, success, owner, p)
    assert up[1].tolist() == pytest.approx([0.25] * 4, rel=1e-9)
    s = nm.noise_scale(q, success, owner, p, kappa=2.0, prior="loglog")
    assert s[3] == pytest.approx((1 - p[3]) * 16.0 + p[3] * 3.0, rel=1e-9)  # no successes: the curve's value
    with pytest.raises(ValueError, match="prior must be"):
        nm.noise_scale(q, success, owner, p, prior="cubic")


def test_scaled_allocation_is_todays_allocator_with_a_scale():
    from dynamo_openrlhf import PassRatePool, allocate_rollouts

    N = 10
    ids = np.arange(N, dtype=np.int64)
    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update(ids, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 4]), np.full(N, 8))
    v = np.asarray(pool.expected_variance(ids))
    B = 8 * N
    assert nm.scaled_allocation(np.ones(N), v, B, 2, 16).tolist() == np.asarray(
        pool.allocate(ids, B, 2, 16, "neyman", estimator="rloo")).tolist()
    scale = np.linspace(0.2, 5.0, N)
    n = nm.scaled_allocation(scale, v, B, 2, 16)
    assert n.tolist() == np.asarray(allocate_rollouts(scale * v, B, 2, 16, "neyman", estimator="rloo")).tolist()
    assert nm.model_predicted_ratio(scale, v, n, 8) == pytest.approx(
        float(np.sum(scale * v / (n - 1)) / np.sum(scale * v / 7)), rel=1e-12)
    assert nm.model_predicted_ratio(scale, v, n, 8) <= 1.0  # the exact minimiser never loses to uniform


def test_clipping_and_gram_helpers():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 40)) + 2.0
    norms = np.linalg.norm(X, axis=1)
    f = nm.clip_factors(norms, 6.0)
    assert f.tolist() == pytest.approx(np.minimum(1.0, 6.0 / (norms + 1e-6)).tolist(), rel=1e-12)
    assert nm.clip_factors(norms, 0.0).tolist() == [1.0] * 6
    Y = X * f[:, None]
    C = nm.centered_from_uncentered(X @ X.T, f)
    assert float(gv.trace_cov(C)) == pytest.approx(np.var(Y, axis=0, ddof=1).sum(), rel=1e-10)


def test_rankdata_and_spearman():
    assert nm.rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert nm.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert nm.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    mean, ci = nm.mean_ci([1.0, 1.0, 1.0])
    assert mean == 1.0 and ci == [1.0, 1.0]


def test_parse_tiny_config():
    from dynamo_openrlhf.tiny import TinyConfig

    assert gv.parse_tiny_config("") == TinyConfig()
    assert gv.parse_tiny_config("sft_steps=10,hidden_size=64") == TinyConfig(sft_steps=10, hidden_size=64)
    with pytest.raises(ValueError, match="not field=value"):
        gv.parse_tiny_config("no_such_field=1")


def test_per_sample_scores_reproduce_the_trainers_update(policy):
    """Σ_j c_j s_j with the per-sample scores and the RLOO balanced coefficients is the gradient of the trainer's
    loss (``Policy.gradients``, rloo_balanced) on the same rollouts."""
    import torch

    from dynamo_openrlhf.advantages import group_normalized_advantages, prompt_balanced_weights

    enc = [policy.encode(r["prompt"]) for r in policy.rows]
    n = np.array([3, 2, 4])
    texts, resp, owner = policy.sample(enc, n, seed=9)
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    policy.per_sample_scores = nm.PerSampleScores(policy.model)
    prox, S = gv.per_sample(policy, enc, resp, np.asarray(owner), keep_scores=True, chunk=4)
    assert S.shape == (9, policy.dim)
    assert prox["score"] == pytest.approx((S.double() ** 2).sum(1).numpy(), rel=1e-6)
    starts = np.cumsum(n) - n
    c = gv.rloo_coefficients(n, starts, rewards, 9, 3)
    sizes = torch.tensor(n)
    losses = gv.make_losses(["rloo_balanced"])
    want = policy.gradients(enc, resp, owner, {"x": (
        losses["rloo_balanced"][0], group_normalized_advantages(torch.tensor(rewards), sizes, "rloo"),
        prompt_balanced_weights(sizes, "rloo", gv.TOKEN_NORMALIZER))})["x"]
    got = torch.from_numpy(c).float() @ S
    assert float(want.norm()) > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------------
# end to end (--quick, smaller still)
# ---------------------------------------------------------------------------------------------------


def test_quick_run_writes_outputs(tmp_path, capsys, policy):
    out, png = tmp_path / "out", tmp_path / "gv.png"
    rc = gv.main(["--quick", "--batches", "2", "--prompts", "4", "--repeats", "3", "--oracle_samples", "8",
                  "--pool_samples", "4", "--bootstrap", "50", "--models", "pq,ghost_diag_ll,score",
                  "--variants", "grpo,rloo_balanced", "--cost_vocab", "256", "--cost_response", "8",
                  "--out", str(out), "--png", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[gv] batch 1 (train)" in printed and "| allocation | measured, mean [CI] | predicted, mean |" in printed
    assert "[gv] train/uniform" in printed  # the legacy full-gradient path ran for grpo
    assert (out / "gradient_variance.md").read_text().startswith("Gradient variance of the RLOO")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "gradient_variance.json").read_text())
    assert d["setup"]["repeats"] == 3 and d["setup"]["models"] == ["pq", "ghost_diag_ll", "score"]
    assert len(d["batches"]) == 2
    names = {"uniform"} | {f"{w}[{m}]" for w in ("oracle", "ours") for m in ("pq", "ghost_diag_ll", "score")}
    B = 4 * gv.UNIFORM_N
    for bt in d["batches"]:
        assert bt["prompts"] == 4 and bt["budget"] == B and len(bt["prompt_rows"]) == 4
        assert set(bt["allocations"]) == names
        for name, res in bt["allocations"].items():
            assert sum(res["n"]) == B and min(res["n"]) >= gv.BOUNDS[0] and max(res["n"]) <= gv.BOUNDS[1]
            assert math.isfinite(res["ratio_plain"]) and res["ratio_plain"] > 0
            assert math.isfinite(res["curve_ratio"]) and res["curve_ratio"] > 0
        assert bt["allocations"]["uniform"]["ratio_plain"] == 1.0 == bt["allocations"]["uniform"]["curve_ratio"]
        assert bt["curve_best_ratio"] <= min(r["curve_ratio"] for r in bt["allocations"].values()) + 1e-12
        for row in bt["prompt_rows"]:
            assert row["bank_samples"] >= 3 * gv.UNIFORM_N and row["scale_oracle"]["pq"] == 1.0
    s = d["summary"]["allocations"]["oracle[pq]"]
    assert s["ratio_plain"]["per_batch"] == [bt["allocations"]["oracle[pq]"]["ratio_plain"] for bt in d["batches"]]
    assert s["ratio_plain"]["mean"] == pytest.approx(np.mean(s["ratio_plain"]["per_batch"]), rel=1e-12)
    assert set(d["summary"]["spearman"]) == {"ghost_diag_ll", "score"}
    assert set(d["proxy_cost"]["relative"]) == {"train step (forward + loss + backward)", "ghost_diag", "ghost (exact)",
                                                "nll + pisq + length (from the action log-probs)",
                                                "entropy pass the DynaMO trainer runs (response_entropy)",
                                                "entropy pass + ghost_diag fused (one softmax per chunk)"}
    assert d["proxy_cost"]["relative"]["train step (forward + loss + backward)"] == 1.0
    (lb,) = d["legacy"]["batches"]
    assert set(lb["allocations"]) == {"uniform", "ours[group_norm]", "oracle[group_norm]"}
    assert lb["allocations"]["uniform"]["ratio"]["grpo"] == 1.0


def test_quick_priced_run(tmp_path, capsys, policy):
    out = tmp_path / "out"
    rc = gv.main(["--priced", "--quick", "--batches", "2", "--prompts", "5", "--repeats", "3", "--oracle_samples", "8",
                  "--pool_samples", "4", "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| allocation | skipped (mean) | MSE ratio [CI] |" in printed
    assert (out / "gradient_variance_priced.md").read_text().startswith("Priced skipping on the tiny-cpu")
    d = json.loads((out / "gradient_variance_priced.json").read_text())
    assert d["setup"]["mode"] == "priced" and d["setup"]["skip_price"] == 4.0 and "partial" not in d
    assert len(d["batches"]) == 2
    for bt in d["batches"]:
        assert bt["prompts"] == 5 and bt["budget"] == 20
        assert list(bt["allocations"]) == ["uniform4", "priced", "priced[oracle]", "noskip"]
        u = bt["allocations"]["uniform4"]
        assert u["n"] == [4] * 5 and u["mse_ratio"] == 1.0 and u["bias2"] == 0.0 and u["predicted"] == 1.0
        assert u["trace"] == pytest.approx(bt["uniform_trace"], rel=1e-12) and bt["uniform_trace"] > 0
        for name, r in bt["allocations"].items():
            gv.check_priced_allocation(name, np.array(r["n"]), 20)
            assert r["skipped"] == r["n"].count(0)
            assert r["mse"] == pytest.approx(r["trace"] + r["bias2"], rel=1e-12)
            assert r["mse_ratio"] == pytest.approx(r["var_ratio"] + r["bias_ratio"], rel=1e-12)
            assert r["predicted"] == pytest.approx(r["predicted_variance"] + r["predicted_bias"], rel=1e-9)
            if r["skipped"] == 0:  # nothing skipped: unbiased, and no bias part predicted
                assert r["bias2"] == 0.0 and r["predicted_bias"] == 0.0 and math.isnan(r["kappa_implied"])
        assert bt["allocations"]["noskip"]["skipped"] == 0
    s = d["summary"]["priced"]
    assert s["mse_ratio"]["per_batch"] == [bt["allocations"]["priced"]["mse_ratio"] for bt in d["batches"]]
    assert s["pooled_mse_ratio"] == pytest.approx(
        sum(bt["allocations"]["priced"]["mse"] for bt in d["batches"]) / sum(bt["uniform_trace"] for bt in d["batches"]),
        rel=1e-12)
    # re-rendering from the JSON gives the same table
    rc = gv.main(["--from_json", str(out / "gradient_variance_priced.json"), "--out", str(tmp_path / "again")])
    assert rc == 0
    assert (tmp_path / "again" / "gradient_variance_priced.md").read_text() == \
        (out / "gradient_variance_priced.md").read_text()
    with pytest.raises(SystemExit):
        gv.main(["--priced", "--skip_price", "0"])


def test_fused_entropy_and_ghost_diag_match_the_separate_computations():
    import torch

    from dynamo_openrlhf.cpu_backend import install_import_stand_ins

    install_import_stand_ins()  # entropy imports openrlhf (flash_attn stand-in on CPU)
    from dynamo_openrlhf.entropy import response_entropy

    g = torch.Generator().manual_seed(4)
    M, T, V, d = 2, 6, 11, 3
    logits = torch.randn(M, T, V, generator=g)
    hidden = torch.randn(M, T, d, generator=g)
    y = torch.randint(0, V, (M, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    ent, gd = nm.entropy_and_ghost_diag(logits, hidden, y, mask, chunk_tokens=5)
    want = nm.sample_proxies(logits, hidden, y, mask, ghost=False)["ghost_diag"]
    assert torch.allclose(gd, want, rtol=1e-5)
    # the entropy is the trainer's: response_entropy on logits laid out as (batch, positions + 1, vocab)
    full = torch.cat([logits, torch.zeros(M, 1, V)], 1)
    assert torch.allclose(ent, response_entropy(full, T), rtol=1e-5, atol=1e-6)
