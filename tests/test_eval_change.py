"""The run summary's paired start -> end change of eval pass@1 (dynamo_openrlhf.train)."""

from types import SimpleNamespace as NS

import numpy as np
import pytest

from dynamo_openrlhf.train import format_summary, paired_pass1_difference


def test_paired_difference_mean_and_bootstrap_over_prompts():
    before = [0.0, 0.5, 1.0, 0.25]
    after = [0.25, 0.5, 1.0, 0.75]
    d = paired_pass1_difference(before, after, resamples=2000, seed=3)
    assert d["mean"] == pytest.approx(0.1875, abs=1e-12)
    # the same percentile bootstrap of the per-prompt differences, by hand
    diff = np.array([0.25, 0.0, 0.0, 0.5])
    idx = np.random.default_rng(3).integers(0, 4, size=(2000, 4))
    means = diff[idx].mean(axis=1)
    assert (d["ci_low"], d["ci_high"]) == (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    assert 0.0 <= d["ci_low"] < d["mean"] < d["ci_high"] <= 0.5


def test_pairing_removes_the_spread_between_prompts():
    """Prompts of very different difficulty that all gain 0.125: the paired interval is the point itself,
    while unpaired intervals of the two means would overlap widely."""
    rng = np.random.default_rng(0)
    before = rng.choice([0.0, 0.25, 0.5, 0.75], size=200)
    d = paired_pass1_difference(before, before + 0.125)
    assert d["mean"] == pytest.approx(0.125) and d["ci_low"] == pytest.approx(0.125) and d["ci_high"] == pytest.approx(0.125)


@pytest.mark.parametrize("before, after, message", [
    ([0.5], [0.5, 0.5], "same non-empty list of prompts twice, got 1 and 2 prompts"),
    ([], [], "same non-empty list of prompts twice, got 0 and 0 prompts"),
    ([0.5, 1.5], [0.5, 0.5], r"pass rates must be in \[0, 1\]"),
    ([0.5, 0.5], [-0.1, 0.5], r"pass rates must be in \[0, 1\]"),
])
def test_paired_difference_bad_input(before, after, message):
    with pytest.raises(ValueError, match=message):
        paired_pass1_difference(before, after)


def _args():
    return NS(dynamo=NS(allocation=NS(rule="off"), modulation=NS(preset="off"), run_dir=None, reward_dump=None,
                        loss=NS(prompt_weighting="auto", token_normalizer=None)),
              algo=NS(advantage=NS(estimator="group_norm")), actor=NS(loss_agg_mode="token-mean"),
              rollout=NS(max_new_tokens=16), train=NS(batch_size=128, dynamic_batch_enable=False, async_enable=False),
              eval=NS(dataset="e.jsonl", n_samples_per_prompt=8, temperature=1.0),
              ckpt=NS(path="/nonexistent/ckpt", output_dir="/nonexistent/final"), logger=NS(tensorboard_dir=None))


def test_summary_prints_the_paired_change():
    first = {"type": "eval", "step": 0, "eval_pass@1": 0.25, "eval_prompt_successes": [0, 2, 8, 4],
             "eval_prompt_samples": [8, 8, 8, 8], "eval_prompts_sha256": "abc"}
    last = {"type": "eval", "step": 24, "eval_pass@1": 0.4375, "eval_prompt_successes": [2, 2, 8, 10],
            "eval_prompt_samples": [8, 8, 8, 16], "eval_prompts_sha256": "abc"}
    text = format_summary([first, last], _args(), 1.0)
    d = paired_pass1_difference([0, 0.25, 1, 0.5], [0.25, 0.25, 1, 0.625])
    assert d["mean"] == pytest.approx(0.09375)
    assert (f"    eval_pass@1 change, step 0 -> 24: +0.094 [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
            "(95 % paired bootstrap over the 4 prompts)") in text
    # not the same prompts, or one evaluation only, or no per-prompt counts: no paired line
    assert "change" not in format_summary([first, {**last, "eval_prompts_sha256": "xyz"}], _args(), 1.0)
    assert "change" not in format_summary([first], _args(), 1.0)
    assert "change" not in format_summary([{k: v for k, v in first.items() if "prompt" not in k}, last], _args(), 1.0)
