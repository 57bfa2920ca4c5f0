"""Small, fast checks of benchmarks/gradient_variance.py (issue 8, part 2): behaviour, not outcomes.

The predicted ratio on hand-made cases, the variance/bootstrap algebra against direct numpy, the
allocation budget and bounds, real gradients of the tiny policy (finite, zero for constant-reward
groups), deterministic sampling, and a --quick end-to-end run that writes its table, JSON and PNG."""
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


def test_predicted_ratio_hand_case():
    v = [0.25, 0.09, 0.0]
    uniform = [4, 4, 4]
    # sum v/n = 0.25/6 + 0.09/2 + 0 = 0.0866...; uniform: (0.25 + 0.09)/4 = 0.085
    assert gv.predicted_ratio(v, [6, 2, 4], uniform) == pytest.approx((0.25 / 6 + 0.09 / 2) / 0.085, rel=1e-12)
    # a skipped prompt with v > 0 is charged v (c(0) = 1, like a useless group of one)
    assert gv.predicted_ratio(v, [8, 0, 4], uniform) == pytest.approx((0.25 / 8 + 0.09) / 0.085, rel=1e-12)
    # skipping a zero-variance prompt costs nothing
    assert gv.predicted_ratio(v, [6, 6, 0], uniform) == pytest.approx((0.25 / 6 + 0.09 / 6) / 0.085, rel=1e-12)
    assert gv.predicted_ratio(v, uniform, uniform) == 1.0
    assert math.isnan(gv.predicted_ratio([0.0, 0.0], [2, 6], [4, 4]))


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


def test_balance_weights_and_response_lengths():
    import torch

    assert gv.balance_weights(np.array([2, 4, 6, 0]), 12).tolist() == [1.5, 0.75, 0.5, 0.0]
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
    allocs, rule = gv.make_allocations(pool, ids, p * (1 - p), 4 * N)
    assert set(allocs) == {"uniform", "ours", "oracle", "ours, skipping", "oracle, skipping"}
    assert isinstance(rule, str) and rule
    for name, n in allocs.items():
        assert n.dtype == np.int64 and n.shape == (N,)
        gv.check_allocation(name, n, 4 * N)  # sum == B and the bounds
    assert allocs["uniform"].tolist() == [4] * N
    assert gv.predicted_ratio(p * (1 - p), allocs["oracle"], allocs["uniform"]) <= 1.0 + 1e-12
    with pytest.raises(AssertionError):
        gv.check_allocation("ours", np.array([1] + [4] * (N - 1)), 4 * N)


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

    enc = [policy.encode(r["prompt"]) for r in policy.rows]
    n = np.array([2, 3, 1])
    texts, resp, owner = policy.sample(enc, n, seed=5)
    assert len(texts) == len(resp) == len(owner) == n.sum()
    assert owner == [0, 0, 1, 1, 1, 2]
    assert all(1 <= len(r) <= gv.MAX_NEW_TOKENS for r in resp)
    losses = gv.make_losses(["grpo", "decay6"])
    from dynamo_openrlhf.advantages import group_normalized_advantages

    # constant rewards within each group (and a group of one) -> advantage 0 -> gradient exactly 0
    flat = group_normalized_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0]), torch.tensor(n))
    assert torch.count_nonzero(flat) == 0
    g0 = policy.gradients(enc, resp, owner, {"group_norm": flat}, losses)
    assert all(torch.count_nonzero(g) == 0 for g in g0.values())
    # mixed rewards -> a finite, non-zero gradient over all parameters
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]), torch.tensor(n))
    g = policy.gradients(enc, resp, owner, {"group_norm": adv}, losses)
    for v in ("grpo", "decay6"):
        assert g[v].shape == (policy.dim,) and torch.isfinite(g[v]).all() and float(g[v].norm()) > 0


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
                  "--bootstrap", "50", "--variants", "grpo,grpo_balanced", "--out", str(out), "--png", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[gv] train/uniform" in printed and "| batch | allocation | predicted |" in printed
    assert (out / "gradient_variance.md").read_text().startswith("Policy-gradient variance")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "gradient_variance.json").read_text())
    assert d["setup"]["repeats"] == 3 and set(d["setup"]["variants"]) == {"grpo", "grpo_balanced"}
    (bt,) = d["batches"]
    assert bt["prompts"] == 4 and bt["budget"] == 16 and len(bt["prompt_rows"]) == 4
    for name, res in bt["allocations"].items():
        assert sum(res["n"]) == 16
        assert math.isfinite(res["predicted_ratio"]) and res["predicted_ratio"] > 0
        for v in ("grpo", "grpo_balanced"):
            assert math.isfinite(res["trace"][v]) and res["trace"][v] > 0  # real gradients vary
            assert math.isfinite(res["ratio"][v]) and res["ratio"][v] > 0
            assert all(math.isfinite(b) and b > 0 for b in res["block_trace"][v].values())
    assert bt["allocations"]["uniform"]["ratio"]["grpo"] == 1.0
