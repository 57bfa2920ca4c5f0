"""benchmarks/step_size.py's pure helpers: the paired ratio of means and the AdamW update simulation."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_size.py"
_spec = importlib.util.spec_from_file_location("step_size_bench", _path)
ss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ss)


def test_ratio_of_means_hand_values_and_paired_ci():
    r = ss.ratio_of_means([1.0, 3.0], [2.0, 2.0], resamples=500, seed=0)
    assert r["ratio"] == 1.0
    # every resample is one of (1,1), (1,3), (3,1), (3,3) over a constant denominator: ratios 0.5, 1, 1.5
    assert 0.5 <= r["ci"][0] <= r["ci"][1] <= 1.5
    # exactly proportional pairs: the ratio and a zero-width CI
    r = ss.ratio_of_means([0.2, 0.4, 0.6], [0.4, 0.8, 1.2], resamples=200)
    assert r["ratio"] == 0.5 and np.allclose(r["ci"], [0.5, 0.5], rtol=1e-12)
    assert ss.ratio_of_means([3.0], [2.0]) == {"ratio": 1.5, "ci": [1.5, 1.5]}
    with pytest.raises(ValueError, match="same length"):
        ss.ratio_of_means([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive mean"):
        ss.ratio_of_means([1.0], [0.0])


def test_adam_updates_ignore_a_constant_gradient_scale_but_not_the_clipping():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, generator=g) * 0.01 * (1 + k) for k in range(5)]  # norms 0.07..0.35 < 1
    base = ss.adam_updates(grads)
    half = ss.adam_updates([0.5 * x for x in grads])
    for a, b in zip(base, half):  # Adam divides by the running RMS: the factor cancels (up to eps = 1e-8)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
    # the first update is -lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|)
    assert torch.allclose(base[0], -ss.ADAM["lr"] * torch.sign(grads[0]), rtol=1e-4, atol=0)
    # a scale that changes from step to step does change the updates
    ramp = ss.adam_updates([x * (k + 1) for k, x in enumerate(grads)])
    assert not torch.allclose(ramp[-1], base[-1], rtol=1e-2)
    # global-norm clipping: a gradient of norm 10 is scaled to norm 1 first; no clipping with max_norm None
    big = [torch.full((4,), 5.0), torch.tensor([1.0, -1.0, 1.0, -1.0])]
    clipped = ss.adam_updates(big)
    unclipped = ss.adam_updates(big, max_norm=None)
    assert not torch.allclose(clipped[1], unclipped[1], rtol=1e-3)
    assert ss.adam_updates([]) == []
