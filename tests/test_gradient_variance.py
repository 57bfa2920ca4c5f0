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
# end to end (--quick, smaller still)
# ---------------------------------------------------------------------------------------------------


def test_quick_run_writes_outputs(tmp_path, capsys, policy):
    out, png = tmp_path / "out", tmp_path / "gv.png"
    rc = gv.main(["--quick", "--prompts", "4", "--repeats", "3", "--oracle_samples", "8", "--pool_samples", "4",
                  "--bootstrap", "50", "--variants", "grpo,rloo_balanced", "--out", str(out), "--png", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[gv] train/uniform" in printed and "| batch | loss variant | allocation | predicted |" in printed
    assert (out / "gradient_variance.md").read_text().startswith("Policy-gradient variance")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "gradient_variance.json").read_text())
    assert d["setup"]["repeats"] == 3 and set(d["setup"]["variants"]) == {"grpo", "rloo_balanced"}
    (bt,) = d["batches"]
    B = 4 * gv.UNIFORM_N
    assert bt["prompts"] == 4 and bt["budget"] == B and len(bt["prompt_rows"]) == 4
    assert set(bt["allocations"]) == {"uniform", "ours[group_norm]", "oracle[group_norm]", "ours[rloo]", "oracle[rloo]"}
    for name, res in bt["allocations"].items():
        assert sum(res["n"]) == B
        assert all(math.isfinite(x) and x > 0 for x in res["predicted_ratio"].values())
        want = {"grpo", "rloo_balanced"} if name == "uniform" else (
            {"grpo"} if "group_norm" in name else {"rloo_balanced"})
        assert set(res["variants"]) == want
        for v in want:
            assert math.isfinite(res["trace"][v]) and res["trace"][v] >= 0
            assert all(math.isfinite(b) for b in res["block_trace"][v].values())
    assert bt["allocations"]["uniform"]["ratio"]["grpo"] == 1.0
