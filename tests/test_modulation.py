"""Tests of dynamo_openrlhf.modulation (docs/reference_notes.md, token level). Pure torch, no OpenRLHF import."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_openrlhf.modulation import (
    PRESETS,
    STAT_KEYS,
    ModulationConfig,
    modulate_advantages,
)

DECAY6 = ModulationConfig.preset("decay6")
DECAY5 = ModulationConfig.preset("decay5")


# ---------------------------------------------------------------------------------------------
# An independent reference: plain Python floats, token by token, literally docs/reference_notes.md's token-level formulas.
# (No clamp of the log-ratio: the tests keep |logπ − logπ_old| far below 20.)
# ---------------------------------------------------------------------------------------------
def ref_factors(A, lp, old, H, mask, clip_low, clip_high, cfg):
    A, lp, old, H = (t.double().tolist() for t in (A, lp, old, H))
    valid = [[bool(v) for v in row] for row in (mask != 0).tolist()]
    B, T = len(A), len(A[0]) if A else 0
    hs = [H[i][t] for i in range(B) for t in range(T) if valid[i][t]]
    h_max, h_min = (max(hs), min(hs)) if hs else (0.0, 0.0)
    comp = [[1.0] * T for _ in range(B)]
    stab = [[1.0] * T for _ in range(B)]
    xi_big = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if valid[i][t] and A[i][t] > 0:
                comp[i][t] = 1 + (cfg.mu_max - 1) * (h_max - H[i][t]) / (h_max - h_min + 1e-8)
        g = [math.exp(lp[i][t]) * (lp[i][t] + H[i][t]) for t in range(T)]
        vals = [g[t] for t in range(T) if valid[i][t]]
        mean = sum(vals) / len(vals) if vals else 0.0
        for t in range(T):
            if not valid[i][t]:
                continue
            r = math.exp(lp[i][t] - old[i][t])
            a = A[i][t]
            clip_ind = (a > 0 and r <= 1 + clip_high) or (a < 0 and r >= 1 - clip_low)
            xi = (1.0 if clip_ind else 0.0) * r * a
            delta_h = -xi * (g[t] - mean)
            xi_big[i][t] = abs(delta_h)
    m = max([xi_big[i][t] for i in range(B) for t in range(T) if valid[i][t]], default=0.0)
    for i in range(B):
        for t in range(T):
            if valid[i][t]:
                x = xi_big[i][t] / (m + 1e-8)
                z = cfg.gamma * (x - cfg.tau)
                stab[i][t] = cfg.lambda_min + (1 - cfg.lambda_min) * (0.0 if z > 700 else 1 / (1 + math.exp(z)))
    if not cfg.compensation_enabled:
        comp = [[1.0] * T for _ in range(B)]
    if not cfg.stabilisation_enabled:
        stab = [[1.0] * T for _ in range(B)]
    return torch.tensor(comp, dtype=torch.float64), torch.tensor(stab, dtype=torch.float64)


def ref_stats(comp, stab, mask):
    v = mask != 0
    if not v.any():
        return {k: (0.0 if k == "beta_stab_damped_frac" else 1.0) for k in STAT_KEYS}
    c, s = comp[v], stab[v]
    return {
        "beta_comp_mean": c.mean().item(),
        "beta_comp_min": c.min().item(),
        "beta_comp_max": c.max().item(),
        "beta_stab_mean": s.mean().item(),
        "beta_stab_min": s.min().item(),
        "beta_stab_max": s.max().item(),
        "beta_stab_damped_frac": (s < 0.9).double().mean().item(),
    }


def random_batch(B=5, T=9, dtype=torch.float64, seed=0, p_valid=0.8, ratio_scale=0.15):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = lp + ratio_scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    A[0] += 0.3 * torch.randn(T, generator=g, dtype=torch.float64)  # token-level advantages too
    H = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, T, generator=g) < p_valid
    mask[:, 0] = True
    return [t.to(dtype) for t in (A, lp, old, H)] + [mask]


def away_from_clip_boundary(lp, old, lo, hi, eps=1e-4):
    r = torch.exp(lp.double() - old.double())
    return ((r - (1 + hi)).abs() > eps).all() and ((r - (1 - lo)).abs() > eps).all()


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def test_presets_values():
    assert (DECAY6.mu_max, DECAY6.lambda_min, DECAY6.gamma, DECAY6.tau) == (1.2, 0.6, 50.0, 0.99)
    assert (DECAY5.mu_max, DECAY5.lambda_min, DECAY5.gamma, DECAY5.tau) == (1.4, 0.6, 50.0, 0.9)
    off = ModulationConfig.preset("off")
    assert off.is_identity and not DECAY6.is_identity
    assert ModulationConfig.from_alpha(0.4) == DECAY5  # decay5 is the α = 0.4 member of the family
    assert ModulationConfig.coerce("decay6") == DECAY6
    assert ModulationConfig.coerce(None).is_identity
    assert ModulationConfig(mu_max=1.2, lambda_min=0.6, gamma=50, tau=0.99) == DECAY6  # name not compared
    assert set(PRESETS) == {"decay6", "decay5", "off"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mu_max=0.9, lambda_min=0.6, gamma=50, tau=0.9), "mu_max"),
        (dict(mu_max=float("nan"), lambda_min=0.6, gamma=50, tau=0.9), "mu_max"),
        (dict(mu_max=1.2, lambda_min=1.5, gamma=50, tau=0.9), "lambda_min"),
        (dict(mu_max=1.2, lambda_min=-0.1, gamma=50, tau=0.9), "lambda_min"),
        (dict(mu_max=1.2, lambda_min=0.6, gamma=0, tau=0.9), "gamma"),
        (dict(mu_max=1.2, lambda_min=0.6, gamma=float("inf"), tau=0.9), "gamma"),
        (dict(mu_max=1.2, lambda_min=0.6, gamma=50, tau=1.5), "tau"),
        (dict(mu_max=1.2, lambda_min=0.6, gamma=50, tau="0.9"), "tau"),
        (dict(mu_max=True, lambda_min=0.6, gamma=50, tau=0.9), "mu_max"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModulationConfig(**kwargs)


def test_unknown_preset_and_bad_config_type():
    with pytest.raises(ValueError, match="unknown modulation preset 'decay7'"):
        ModulationConfig.preset("decay7")
    A, lp, old, H, mask = random_batch()
    with pytest.raises(ValueError, match="config: unknown modulation preset"):
        modulate_advantages(A, lp, old, H, mask, config="decay7")
    with pytest.raises(ValueError, match="config must be a ModulationConfig"):
        modulate_advantages(A, lp, old, H, mask, config=0.4)
    with pytest.raises(ValueError, match="alpha"):
        ModulationConfig.from_alpha(1.5)


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------
def hand_batch():
    """Row 0: A = +1, r = (1.1, 0.9, 1.5) → the third token is clipped (r > 1 + 0.2).
    Row 1: A = −0.5, r = (0.7, 1.3, pad) → the first token is clipped (r < 1 − 0.2).
    The padded entry carries an entropy (9.0) larger than every valid one: it must not count."""
    pi = torch.tensor([[0.5, 0.25, 0.125], [0.6, 0.3, 0.9]], dtype=torch.float64)
    r = torch.tensor([[1.1, 0.9, 1.5], [0.7, 1.3, 1.0]], dtype=torch.float64)
    lp = pi.log()
    old = lp - r.log()
    A = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]], dtype=torch.float64)
    H = torch.tensor([[0.5, 1.0, 1.5], [2.0, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return A, lp, old, H, mask, pi, r


def hand_expected(cfg):
    """docs/reference_notes.md's token-level formulas evaluated step by step with the math module on the hand batch."""
    pi = [[0.5, 0.25, 0.125], [0.6, 0.3]]
    r = [[1.1, 0.9, 1.5], [0.7, 1.3]]
    A = [1.0, -0.5]
    H = [[0.5, 1.0, 1.5], [2.0, 0.5]]
    h_max, h_min = 2.0, 0.5  # valid tokens only (the padded 9.0 is ignored)
    comp = [[1 + (cfg.mu_max - 1) * (h_max - h) / (h_max - h_min + 1e-8) for h in H[0]], [1.0, 1.0]]
    clip_ind = [[1, 1, 0], [0, 1]]  # row 0: 1.5 > 1.2 clipped; row 1: 0.7 < 0.8 clipped
    big_xi = []
    for i in range(2):
        g = [p * (math.log(p) + h) for p, h in zip(pi[i], H[i])]
        mean = sum(g) / len(g)
        big_xi.append([abs(-c * rr * A[i] * (gg - mean)) for c, rr, gg in zip(clip_ind[i], r[i], g)])
    m = max(max(row) for row in big_xi)
    stab = [
        [cfg.lambda_min + (1 - cfg.lambda_min) / (1 + math.exp(cfg.gamma * (x / (m + 1e-8) - cfg.tau))) for x in row]
        for row in big_xi
    ]
    if not cfg.compensation_enabled:
        comp = [[1.0] * len(row) for row in comp]
    if not cfg.stabilisation_enabled:
        stab = [[1.0] * len(row) for row in stab]
    return comp, stab, big_xi


@pytest.mark.parametrize("cfg", [DECAY6, DECAY5], ids=["decay6", "decay5"])
def test_hand_computed_whole_modulation(cfg):
    A, lp, old, H, mask, _, _ = hand_batch()
    out, stats = modulate_advantages(A, lp, old, H, mask, clip_low=0.2, clip_high=0.2, config=cfg)
    comp, stab, _ = hand_expected(cfg)
    exp = torch.tensor(
        [[A[0, t].item() * comp[0][t] * stab[0][t] for t in range(3)],
         [A[1, t].item() * comp[1][t] * stab[1][t] for t in range(2)] + [A[1, 2].item()]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    # a few numbers worked out on paper
    assert comp[0][0] == pytest.approx(1 + (cfg.mu_max - 1) * 1.5 / 1.5, abs=1e-8)  # lowest entropy: μ_max
    assert comp[0][1] == pytest.approx(1 + (cfg.mu_max - 1) * 1.0 / 1.5, abs=1e-8)
    # the max-Ξ token has x = M/(M + 1e-8) ≈ 1: β_stab = λ + (1−λ)/(1 + e^{γ(1−τ)})
    expected_min = {DECAY6: 0.6 + 0.4 / (1 + math.exp(0.5)), DECAY5: 0.6 + 0.4 / (1 + math.exp(5.0))}[cfg]
    assert min(min(row) for row in stab) == pytest.approx(expected_min, abs=1e-6)
    assert {DECAY6: 0.751016, DECAY5: 0.602677}[cfg] == pytest.approx(expected_min, abs=1e-6)
    # clipped tokens have ξ = 0 → x = 0 → β_stab = λ + (1−λ)/(1+e^{−γτ}) = 1 to 1e-19
    assert stab[0][2] == pytest.approx(1.0, abs=1e-15) and stab[1][0] == pytest.approx(1.0, abs=1e-15)
    # statistics
    flat_c = comp[0] + comp[1]
    flat_s = stab[0] + stab[1]
    assert stats["beta_comp_max"].item() == pytest.approx(max(flat_c), rel=1e-6)
    assert stats["beta_comp_min"].item() == 1.0
    assert stats["beta_comp_mean"].item() == pytest.approx(sum(flat_c) / 5, rel=1e-6)
    assert stats["beta_stab_min"].item() == pytest.approx(min(flat_s), rel=1e-6)
    assert stats["beta_stab_max"].item() == pytest.approx(max(flat_s), rel=1e-6)
    assert stats["beta_stab_mean"].item() == pytest.approx(sum(flat_s) / 5, rel=1e-6)
    assert stats["beta_stab_damped_frac"].item() == pytest.approx(sum(s < 0.9 for s in flat_s) / 5)


@pytest.mark.parametrize("which", ["compensation", "stabilisation"])
def test_hand_computed_each_factor(which):
    """Each factor alone: μ_max = 1 switches compensation off, λ_min = 1 stabilisation."""
    if which == "compensation":
        cfg = ModulationConfig(mu_max=1.2, lambda_min=1.0, gamma=50, tau=0.99)
    else:
        cfg = ModulationConfig(mu_max=1.0, lambda_min=0.6, gamma=50, tau=0.99)
    A, lp, old, H, mask, _, _ = hand_batch()
    out, _ = modulate_advantages(A, lp, old, H, mask, config=cfg)
    comp, stab, _ = hand_expected(cfg)
    factor = comp if which == "compensation" else stab
    for i, n in ((0, 3), (1, 2)):
        for t in range(n):
            assert out[i, t].item() == pytest.approx(A[i, t].item() * factor[i][t], rel=1e-12, abs=1e-14)
    assert out[1, 2].item() == A[1, 2].item()  # padding untouched
    if which == "compensation":  # literal values: 1 + 0.2·(2 − H)/1.5 on row 0, 1 on row 1
        torch.testing.assert_close(out[0], torch.tensor([1.2, 1 + 0.2 / 1.5, 1 + 0.1 / 1.5], dtype=torch.float64),
                                   rtol=0, atol=1e-8)
        assert torch.equal(out[1], A[1])


def test_clip_higher_is_explicit():
    """ε_high = 0.28 un-clips the row-0 token with r = 1.25 (it is clipped at ε_high = 0.2)."""
    A, lp, old, H, mask, pi, _ = hand_batch()
    r = torch.tensor([[1.1, 0.9, 1.25], [0.7, 1.3, 1.0]], dtype=torch.float64)
    old = lp - r.log()
    cfg = ModulationConfig(mu_max=1.2, lambda_min=0.2, gamma=10.0, tau=0.0)  # β_stab sensitive to any x > 0
    sym, _ = modulate_advantages(A, lp, old, H, mask, clip_low=0.2, clip_high=0.2, config=cfg)
    hi, _ = modulate_advantages(A, lp, old, H, mask, clip_low=0.2, clip_high=0.28, config=cfg)
    c_sym, s_sym = ref_factors(A, lp, old, H, mask, 0.2, 0.2, cfg)
    c_hi, s_hi = ref_factors(A, lp, old, H, mask, 0.2, 0.28, cfg)
    torch.testing.assert_close(sym, A * c_sym * s_sym, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hi, A * c_hi * s_hi, rtol=1e-12, atol=1e-12)
    # clipped at ε_high = 0.2: ξ = 0 → x = 0 → β_stab = λ + (1−λ)/2 exactly (τ = 0)
    assert sym[0, 2].item() == pytest.approx(A[0, 2].item() * c_sym[0, 2].item() * (0.2 + 0.8 / 2), rel=1e-12)
    assert hi[0, 2].item() < sym[0, 2].item()  # un-clipped at 0.28: x > 0 → damped further


# ---------------------------------------------------------------------------------------------
# Against the reference on random batches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [DECAY6, DECAY5, ModulationConfig(1.3, 0.2, 10.0, 0.5), ModulationConfig(1.1, 0.0, 3000.0, 0.3),
     ModulationConfig(2.0, 0.5, 0.01, 0.0)],
    ids=["d6", "d5", "custom", "steep", "flat"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_float64(cfg, seed):
    A, lp, old, H, mask = random_batch(seed=seed)
    out, stats = modulate_advantages(A, lp, old, H, mask, clip_low=0.2, clip_high=0.28, config=cfg)
    comp, stab = ref_factors(A, lp, old, H, mask, 0.2, 0.28, cfg)
    torch.testing.assert_close(out, A * comp * stab, rtol=1e-10, atol=1e-12)
    ref = ref_stats(comp, stab, mask)
    for k in STAT_KEYS:
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0
        assert stats[k].item() == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("seed", [3, 4])
def test_matches_reference_float32(seed):
    A, lp, old, H, mask = random_batch(B=16, T=40, dtype=torch.float32, seed=seed)
    assert away_from_clip_boundary(lp, old, 0.2, 0.2)
    out, _ = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    comp, stab = ref_factors(A, lp, old, H, mask, 0.2, 0.2, DECAY6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), A.double() * comp * stab, rtol=2e-5, atol=2e-6)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    p_valid=st.floats(0.0, 1.0),
    preset=st.sampled_from(["decay6", "decay5"]),
)
def test_property_matches_reference(B, T, seed, p_valid, preset):
    cfg = ModulationConfig.preset(preset)
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    A[torch.rand(B, T, generator=g) < 0.2] = 0.0
    H = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) < p_valid
    out, stats = modulate_advantages(A, lp, old, H, mask, config=cfg)
    comp, stab = ref_factors(A, lp, old, H, mask, 0.2, 0.2, cfg)
    torch.testing.assert_close(out, A * comp * stab, rtol=1e-9, atol=1e-12)
    ref = ref_stats(comp, stab, mask)
    for k in STAT_KEYS:
        assert stats[k].item() == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_values_change_nothing(dtype):
    A, lp, old, H, mask = random_batch(B=6, T=11, dtype=dtype, seed=7, p_valid=0.6)
    out, stats = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    pad = ~mask
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 1e3):
        A2, lp2, old2, H2 = (t.clone() for t in (A, lp, old, H))
        for t in (A2, lp2, old2, H2):
            t[pad] = (scale * torch.randn(int(pad.sum()), generator=g, dtype=torch.float64)).to(dtype)
        H2[pad] = H2[pad].abs() * 10 + 50  # larger than every valid entropy (would move H_max)
        out2, stats2 = modulate_advantages(A2, lp2, old2, H2, mask, config=DECAY6)
        assert torch.equal(out2[mask], out[mask])
        assert torch.equal(out2[pad], A2[pad])  # both factors are exactly 1 on padding
        for k in STAT_KEYS:
            assert torch.equal(stats2[k], stats[k]), k


@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64]
)
def test_mask_dtypes_agree(mask_dtype):
    A, lp, old, H, mask = random_batch(seed=11)
    ref, ref_stats_ = modulate_advantages(A, lp, old, H, mask, config=DECAY5)
    out, stats = modulate_advantages(A, lp, old, H, mask.to(mask_dtype), config=DECAY5)
    assert torch.equal(out, ref)
    assert all(torch.equal(stats[k], ref_stats_[k]) for k in STAT_KEYS)


def test_mask_none_means_all_valid():
    A, lp, old, H, _ = random_batch(seed=12)
    ones = torch.ones(A.shape, dtype=torch.bool)
    assert torch.equal(
        modulate_advantages(A, lp, old, H, None, config=DECAY6)[0],
        modulate_advantages(A, lp, old, H, ones, config=DECAY6)[0],
    )


# ---------------------------------------------------------------------------------------------
# Degenerate inputs: defined values, no NaN
# ---------------------------------------------------------------------------------------------
def _finite(out, stats):
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("cfg", [DECAY6, DECAY5], ids=["decay6", "decay5"])
def test_all_entropies_equal(cfg):
    A, lp, old, H, mask = random_batch(seed=5)
    H = torch.full_like(H, 0.7)
    out, stats = modulate_advantages(A, lp, old, H, mask, config=cfg)
    _finite(out, stats)
    comp, stab = ref_factors(A, lp, old, H, mask, 0.2, 0.2, cfg)
    assert torch.equal(comp, torch.ones_like(comp))
    torch.testing.assert_close(out, A * stab, rtol=1e-10, atol=1e-12)
    assert stats["beta_comp_mean"] == 1 and stats["beta_comp_max"] == 1


def test_no_positive_advantage():
    A, lp, old, H, mask = random_batch(seed=6)
    A = -A.abs()
    out, stats = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    _finite(out, stats)
    assert stats["beta_comp_max"] == 1 and stats["beta_comp_mean"] == 1
    comp, stab = ref_factors(A, lp, old, H, mask, 0.2, 0.2, DECAY6)
    torch.testing.assert_close(out, A * stab, rtol=1e-10, atol=1e-12)


def test_all_advantages_zero():
    A, lp, old, H, mask = random_batch(seed=6)
    out, stats = modulate_advantages(torch.zeros_like(A), lp, old, H, mask, config=DECAY6)
    _finite(out, stats)
    assert torch.equal(out, torch.zeros_like(A))


def test_sequence_without_valid_token():
    A, lp, old, H, mask = random_batch(seed=8)
    mask[2] = False
    out, stats = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    _finite(out, stats)
    assert torch.equal(out[2], A[2])
    comp, stab = ref_factors(A, lp, old, H, mask, 0.2, 0.2, DECAY6)
    torch.testing.assert_close(out, A * comp * stab, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_all_zero_mask(dtype):
    A, lp, old, H, _ = random_batch(seed=9)
    mask = torch.zeros(A.shape, dtype=dtype)
    out, stats = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    assert torch.equal(out, A)
    assert {k: v.item() for k, v in stats.items()} == {
        k: (0.0 if k == "beta_stab_damped_frac" else 1.0) for k in STAT_KEYS
    }


def test_single_token_sequences():
    """One valid token per sequence: g − mean_seq = 0, so Ξ = 0 and β_stab = β_stab(x=0)."""
    A, lp, old, H, _ = random_batch(B=4, T=1, seed=10)
    out, stats = modulate_advantages(A, lp, old, H, None, config=DECAY6)
    _finite(out, stats)
    comp, stab = ref_factors(A, lp, old, H, torch.ones_like(A, dtype=torch.bool), 0.2, 0.2, DECAY6)
    torch.testing.assert_close(out, A * comp * stab, rtol=1e-10, atol=1e-12)


def test_empty_batch():
    z = torch.zeros(0, 5, dtype=torch.float32)
    out, stats = modulate_advantages(z, z, z, z, z.bool(), config=DECAY6)
    assert out.shape == (0, 5) and stats["beta_stab_damped_frac"] == 0


def test_large_log_ratio_is_clamped_like_openrlhf():
    """logπ − logπ_old = ±100 would overflow exp(): the ratio uses OpenRLHF's clamp to ±20."""
    A, lp, old, H, mask = random_batch(seed=13, dtype=torch.float32)
    old[0, 0] = lp[0, 0] - 100
    old[1, 1] = lp[1, 1] + 100
    out, stats = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    _finite(out, stats)


# ---------------------------------------------------------------------------------------------
# Identity, dtypes, autograd
# ---------------------------------------------------------------------------------------------
def test_off_returns_the_input():
    A, lp, old, H, mask = random_batch()
    out, stats = modulate_advantages(A, lp, old, H, mask, config="off")
    assert out is A
    assert stats["beta_comp_mean"] == 1 and stats["beta_stab_damped_frac"] == 0


def test_low_precision_inputs_computed_in_float32():
    A, lp, old, H, mask = random_batch(B=8, T=16, seed=14)
    out16, _ = modulate_advantages(*(t.bfloat16() for t in (A, lp, old, H)), mask, config=DECAY6)
    assert out16.dtype == torch.bfloat16
    ref, _ = modulate_advantages(*(t.bfloat16().float() for t in (A, lp, old, H)), mask, config=DECAY6)
    assert torch.equal(out16, ref.bfloat16())


def test_factors_are_detached():
    A, lp, old, H, mask = random_batch(dtype=torch.float32)
    lp = lp.clone().requires_grad_()
    H = H.clone().requires_grad_()
    A = A.clone().requires_grad_()
    out, stats = modulate_advantages(A, lp, old, H, mask, config=DECAY6)
    assert not out.requires_grad
    assert not any(v.requires_grad for v in stats.values())


def test_inputs_not_modified():
    A, lp, old, H, mask = random_batch(dtype=torch.float32)
    copies = [t.clone() for t in (A, lp, old, H, mask)]
    modulate_advantages(A, lp, old, H, mask, config=DECAY5)
    assert all(torch.equal(a, b) for a, b in zip((A, lp, old, H, mask), copies))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    A, lp, old, H, mask = random_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"entropy must have the shape of advantages"):
        modulate_advantages(A, lp, old, H[:, :-1], mask, config=DECAY6)
    with pytest.raises(ValueError, match=r"log_probs must have the shape"):
        modulate_advantages(A, lp[:-1], old, H, mask, config=DECAY6)
    with pytest.raises(ValueError, match=r"action_mask must have the shape"):
        modulate_advantages(A, lp, old, H, mask[:, :-1], config=DECAY6)
    with pytest.raises(ValueError, match=r"advantages must be 2-D"):
        modulate_advantages(A[0], lp[0], old[0], H[0], mask[0], config=DECAY6)
    with pytest.raises(ValueError, match=r"advantages must have a floating dtype"):
        modulate_advantages(A.long(), lp, old, H, mask, config=DECAY6)
    with pytest.raises(ValueError, match=r"old_log_probs must have a floating dtype"):
        modulate_advantages(A, lp, old.int(), H, mask, config=DECAY6)
    with pytest.raises(ValueError, match=r"entropy must be a torch.Tensor"):
        modulate_advantages(A, lp, old, None, mask, config=DECAY6)
    with pytest.raises(ValueError, match=r"action_mask must be bool, integer or floating"):
        modulate_advantages(A, lp, old, H, mask.to(torch.complex64), config=DECAY6)
    with pytest.raises(ValueError, match=r"clip_low must be >= 0"):
        modulate_advantages(A, lp, old, H, mask, clip_low=-0.1, config=DECAY6)
    with pytest.raises(ValueError, match=r"clip_high must be finite"):
        modulate_advantages(A, lp, old, H, mask, clip_high=float("nan"), config=DECAY6)


@pytest.mark.parametrize("cfg", [DECAY6, ModulationConfig(1.3, 1.0, 50, 0.9), ModulationConfig(1.0, 0.5, 5, 0.2)],
                         ids=["both", "comp-only", "stab-only"])
def test_without_stats_same_result(cfg):
    A, lp, old, H, mask = random_batch(seed=15, dtype=torch.float32)
    with_s, stats = modulate_advantages(A, lp, old, H, mask, config=cfg)
    without, none = modulate_advantages(A, lp, old, H, mask, config=cfg, with_stats=False)
    assert torch.equal(with_s, without) and none == {} and len(stats) == 7


def test_non_contiguous_inputs():
    """The actor passes ``output.entropy[:, -T:]`` (a strided slice); advantages may be an expanded view."""
    A, lp, old, H, mask = random_batch(B=4, T=10, seed=16, dtype=torch.float32)
    wide = torch.cat([torch.rand(4, 5), H], dim=1)
    H_view = wide[:, -10:]
    A_view = A[:, :1].expand(4, 10)
    assert not H_view.is_contiguous() and A_view.stride(1) == 0
    ref, ref_stats = modulate_advantages(A_view.contiguous(), lp, old, H, mask, config=DECAY6)
    out, stats = modulate_advantages(A_view, lp, old, H_view, mask, config=DECAY6)
    assert torch.equal(out, ref)
    assert all(torch.equal(stats[k], ref_stats[k]) for k in STAT_KEYS)
