"""Tests of dynamo_openrlhf.loss.DynaMOPolicyLoss against OpenRLHF 0.11.2's PolicyLoss."""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings

import pytest
import torch

from dynamo_openrlhf.cpu_backend import install_import_stand_ins

install_import_stand_ins()

import openrlhf.models.loss as openrlhf_loss  # noqa: E402
from openrlhf.models.loss import PolicyLoss  # noqa: E402

import dynamo_openrlhf.loss as dloss  # noqa: E402
from dynamo_openrlhf.loss import DynaMOPolicyLoss  # noqa: E402
from dynamo_openrlhf.modulation import ModulationConfig, modulate_advantages  # noqa: E402

# Parent options worth exercising: (constructor kwargs, forward kwargs builder)
PARENT_CONFIGS = {
    "default": dict(),
    "dual_clip": dict(dual_clip=3.0),
    "clip_higher": dict(clip_eps_low=0.2, clip_eps_high=0.28),
    "seq_mean": dict(token_level_loss=False),
    "is_token_mask": dict(is_correction_level="token", is_correction_mode="mask"),
    "is_token_clip": dict(is_correction_level="token", is_correction_mode="clip"),
    "is_seq": dict(is_correction_level="seq"),
    "is_tv": dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.3)),
}


def batch(B=6, T=12, seed=0, mask_dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + 0.25 * torch.randn(B, T, generator=g)
    rollout = old + 0.1 * torch.randn(B, T, generator=g)
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    A[1] = -A[1].abs()
    A[2] = A[2].abs()
    H = torch.rand(B, T, generator=g) * 2
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(mask_dtype)
    lp = lp * mask  # OpenRLHF's actor returns log-probs multiplied by the action mask
    return lp, old, rollout, A, H, mask


def forward_kwargs(name, mask, rollout):
    kw = dict(action_mask=mask)
    if name.startswith("is_"):
        kw["rollout_log_probs"] = rollout
    if name == "default":
        kw.update(dp_size=2, batch_num_tokens=float(mask.sum()) * 2)
    if name == "seq_mean":
        kw.update(global_batch_size=12.0)
    return kw


def run(loss_fn, lp, old, A, fkw, **extra):
    x = lp.detach().clone().requires_grad_()
    outs = loss_fn(x, old, A, **fkw, **extra)
    outs[0].backward()
    return outs, x.grad


def assert_outputs_equal(a, b):
    assert len(a) == len(b) == 5
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
        else:
            assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------
# Signatures and import-time checks
# ---------------------------------------------------------------------------------------------
def test_signatures_extend_the_parent():
    for method, extra in (("__init__", ["modulation", "modulation_stats"]), ("forward", ["entropy", "sample_weight"])):
        parent = list(inspect.signature(getattr(PolicyLoss, method)).parameters.values())
        ours = list(inspect.signature(getattr(DynaMOPolicyLoss, method)).parameters.values())
        n = len(parent)
        assert [(p.name, p.default, p.kind) for p in ours[:n]] == [(p.name, p.default, p.kind) for p in parent]
        assert [p.name for p in ours[n:]] == extra
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[n:])
    assert issubclass(DynaMOPolicyLoss, PolicyLoss)
    assert dloss.EXPECTED_OPENRLHF_VERSION == "0.11.2"


def test_import_fails_fast_on_other_version(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.3")
    with pytest.raises(ImportError, match=r"openrlhf 0\.11\.2's PolicyLoss; found openrlhf 0\.11\.3"):
        dloss._load_parent()


def test_import_fails_fast_on_changed_signature(monkeypatch):
    class Changed(torch.nn.Module):
        def __init__(self, clip_eps_low=0.2):
            super().__init__()

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None):
            pass

    monkeypatch.setattr(openrlhf_loss, "PolicyLoss", Changed)
    with pytest.raises(ImportError, match=r"PolicyLoss\.__init__ has signature .* openrlhf 0\.11\.2"):
        dloss._load_parent()
    monkeypatch.delattr(openrlhf_loss, "PolicyLoss")
    with pytest.raises(ImportError, match=r"openrlhf\.models\.loss\.PolicyLoss is missing"):
        dloss._load_parent()


# ---------------------------------------------------------------------------------------------
# "off" (or no entropy) is exactly the parent
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PARENT_CONFIGS))
def test_off_is_exactly_the_parent(name):
    lp, old, rollout, A, H, mask = batch(seed=1)
    fkw = forward_kwargs(name, mask, rollout)
    ref_out, ref_grad = run(PolicyLoss(**PARENT_CONFIGS[name]), lp, old, A, fkw)
    for mod in ("off", None, ModulationConfig.preset("off")):
        loss = DynaMOPolicyLoss(**PARENT_CONFIGS[name], modulation=mod)
        for extra in ({}, {"entropy": H}):
            out, grad = run(loss, lp, old, A, fkw, **extra)
            assert_outputs_equal(out, ref_out)
            assert torch.equal(grad, ref_grad)
            assert loss.last_modulation_stats is None


def test_gspo_off_is_exactly_the_parent():
    lp, old, rollout, A, H, mask = batch(seed=2)
    ref_out, ref_grad = run(PolicyLoss(policy_loss_type="gspo"), lp, old, A, dict(action_mask=mask))
    out, grad = run(DynaMOPolicyLoss(policy_loss_type="gspo"), lp, old, A, dict(action_mask=mask), entropy=H)
    assert_outputs_equal(out, ref_out)
    assert torch.equal(grad, ref_grad)


def test_modulation_without_entropy_is_the_parent_and_warns_once():
    lp, old, rollout, A, H, mask = batch(seed=3)
    ref_out, ref_grad = run(PolicyLoss(), lp, old, A, dict(action_mask=mask))
    loss = DynaMOPolicyLoss(modulation="decay6")
    with pytest.warns(RuntimeWarning, match="without entropy"):
        out, grad = run(loss, lp, old, A, dict(action_mask=mask))
    assert_outputs_equal(out, ref_out)
    assert torch.equal(grad, ref_grad)
    assert loss.last_modulation_stats is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(loss, lp, old, A, dict(action_mask=mask))  # second call: no warning


def test_positional_call_like_the_actor():
    """OpenRLHF's actor calls loss_fn(log_probs, old, advantages, action_mask=..., rollout_log_probs=...,
    **loss_batch_info); positional use of every parent argument works the same."""
    lp, old, rollout, A, H, mask = batch(seed=4)
    args = (lp, old, A, mask, None, 1, None, None)
    assert_outputs_equal(DynaMOPolicyLoss()(*args), PolicyLoss()(*args))


# ---------------------------------------------------------------------------------------------
# Modulation on: the parent with modulated advantages, for every parent option
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.int32, torch.float32])
@pytest.mark.parametrize("preset", ["decay6", "decay5"])
@pytest.mark.parametrize("name", sorted(PARENT_CONFIGS))
def test_modulated_equals_parent_with_modulated_advantages(preset, name, mask_dtype):
    """Bit for bit: DynaMO = the parent called with the modulated advantages and the caller's own
    mask (DynaMO hands the parent its 0/1 float copy of an integer/bool mask)."""
    lp, old, rollout, A, H, mask = batch(seed=5, mask_dtype=mask_dtype)
    cfg = PARENT_CONFIGS[name]
    fkw = forward_kwargs(name, mask, rollout)
    loss = DynaMOPolicyLoss(**cfg, modulation=preset)
    out, grad = run(loss, lp, old, A, fkw, entropy=H)
    A_mod, stats = modulate_advantages(
        A, lp, old, H, mask,
        clip_low=cfg.get("clip_eps_low", 0.2), clip_high=cfg.get("clip_eps_high", 0.2), config=preset,
    )
    ref_out, ref_grad = run(PolicyLoss(**cfg), lp, old, A_mod, fkw)
    assert_outputs_equal(out, ref_out)
    assert torch.equal(grad, ref_grad)
    assert set(loss.last_modulation_stats) == set(stats)
    assert all(torch.equal(loss.last_modulation_stats[k], stats[k]) for k in stats)
    assert not torch.equal(A_mod, A)  # modulation did something


def _reference_factors(A, lp, old, H, mask, lo, hi, cfg):
    """docs/reference_notes.md's token-level formulas in float64 with torch.where (independent of the implementation's tricks)."""
    A, lp, old, H = (t.double() for t in (A, lp, old, H))
    v = mask != 0
    h_max, h_min = H[v].max(), H[v].min()
    comp = torch.where(v & (A > 0), 1 + (cfg.mu_max - 1) * (h_max - H) / (h_max - h_min + 1e-8), 1.0)
    r = torch.exp(lp - old)
    clip_ind = ((A > 0) & (r <= 1 + hi)) | ((A < 0) & (r >= 1 - lo))
    xi = clip_ind.double() * r * A
    g = torch.exp(lp) * (lp + H)
    mean = torch.where(v, g, 0.0).sum(-1, keepdim=True) / v.sum(-1, keepdim=True).clamp(min=1)
    big_xi = torch.where(v, (-xi * (g - mean)).abs(), 0.0)
    x = big_xi / (big_xi.max() + 1e-8)
    stab = torch.where(v, cfg.lambda_min + (1 - cfg.lambda_min) / (1 + torch.exp(cfg.gamma * (x - cfg.tau))), 1.0)
    return comp, stab


@pytest.mark.parametrize("preset", ["decay6", "decay5"])
@pytest.mark.parametrize("name", ["default", "dual_clip", "clip_higher", "seq_mean"])
def test_gradient_is_parent_gradient_with_constant_factors(preset, name):
    """d loss / d log_probs of the modulated loss = the parent's gradient with A pre-multiplied by
    β_comp·β_stab computed independently (float64) and held constant; entropy gets no gradient."""
    lp, old, rollout, A, H, mask = batch(B=8, T=16, seed=6)
    cfg = PARENT_CONFIGS[name]
    lo, hi = cfg.get("clip_eps_low", 0.2), cfg.get("clip_eps_high", 0.2)
    fkw = forward_kwargs(name, mask, rollout)
    comp, stab = _reference_factors(A, lp, old, H, mask, lo, hi, ModulationConfig.preset(preset))
    A_ref = (A.double() * comp * stab).float()
    ref_out, ref_grad = run(PolicyLoss(**cfg), lp, old, A_ref, fkw)

    x = lp.detach().clone().requires_grad_()
    ent = H.clone().requires_grad_()
    out = DynaMOPolicyLoss(**cfg, modulation=preset)(x, old, A, **fkw, entropy=ent)
    out[0].backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[0], ref_out[0], rtol=1e-5, atol=1e-7)
    assert ent.grad is None  # the factors are constants for autograd
    # The analytic gradient of the plain PPO objective, token by token: −A'·r·[not clipped]/N
    if name == "default":
        v = mask != 0
        r = torch.exp((lp - old).double())
        active = ((A_ref > 0) & (r <= 1 + hi)) | ((A_ref < 0) & (r >= 1 - lo))
        n_tok = float(mask.sum()) * 2  # batch_num_tokens; dp_size = 2
        analytic = torch.where(v & active, -A_ref.double() * r, 0.0) / n_tok * 2
        torch.testing.assert_close(x.grad.double(), analytic, rtol=1e-5, atol=1e-8)


def test_constructor_validation():
    with pytest.raises(ValueError, match="modulation: unknown modulation preset 'decay9'"):
        DynaMOPolicyLoss(modulation="decay9")
    with pytest.raises(ValueError, match="policy_loss_type='ppo'"):
        DynaMOPolicyLoss(policy_loss_type="gspo", modulation="decay6")
    loss = DynaMOPolicyLoss(modulation=ModulationConfig(mu_max=1.3, lambda_min=0.5, gamma=20, tau=0.8))
    assert "mu_max=1.3" in repr(loss)


def test_bad_entropy_is_a_clear_error():
    lp, old, rollout, A, H, mask = batch(seed=7)
    loss = DynaMOPolicyLoss(modulation="decay6")
    with pytest.raises(ValueError, match="entropy must have the shape of advantages"):
        loss(lp, old, A, action_mask=mask, entropy=torch.rand(6, 13))


def test_stats_can_be_switched_off():
    lp, old, rollout, A, H, mask = batch(seed=8)
    on = DynaMOPolicyLoss(modulation="decay6")
    off = DynaMOPolicyLoss(modulation="decay6", modulation_stats=False)
    out_on, grad_on = run(on, lp, old, A, dict(action_mask=mask), entropy=H)
    out_off, grad_off = run(off, lp, old, A, dict(action_mask=mask), entropy=H)
    assert_outputs_equal(out_on, out_off)
    assert torch.equal(grad_on, grad_off)
    assert off.last_modulation_stats == {} and len(on.last_modulation_stats) == 7


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_mixed_dtypes_still_equal_parent(dtypes):
    """The float copy of the mask is only handed over when its dtype is the parent's own."""
    lp_dtype, ent_dtype = dtypes
    lp, old, rollout, A, H, mask = batch(seed=9)
    lp, old, A = lp.to(lp_dtype), old.to(lp_dtype), A.to(lp_dtype)
    H = H.to(ent_dtype)
    loss = DynaMOPolicyLoss(modulation="decay6", dual_clip=3.0)
    out, grad = run(loss, lp, old, A, dict(action_mask=mask), entropy=H)
    A_mod, _ = modulate_advantages(A, lp, old, H, mask, config="decay6")
    ref_out, ref_grad = run(PolicyLoss(dual_clip=3.0), lp, old, A_mod, dict(action_mask=mask))
    assert_outputs_equal(out, ref_out)
    assert torch.equal(grad, ref_grad)
