"""--dynamo.allocation.noise_scale: the per-rollout noise proxies, their per-group per-class sums, the pool
update and the allocation on s * v, the flag's parsing and validation, and the summary line."""

import argparse
import os
import re
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dynamo_openrlhf import PassRatePool, allocate_rollouts
from dynamo_openrlhf.allocation import (
    AllocationConfig,
    RolloutAllocator,
    noise_scale_metrics,
    predicted_variance_ratio,
)
from dynamo_openrlhf.noise_proxy import NOISE_PROXIES, noise_proxy

LN = np.log

# ---------------------------------------------------------------------------------------------- proxies


def _hand_batch():
    """Three samples, T = 3: a padded one (garbage after its mask), a full one, an empty one."""
    logp = np.array([[LN(0.5), LN(0.25), -3.0],
                     [0.0, LN(0.1), LN(0.5)],
                     [np.nan, -1.0, -2.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    return logp, mask


def test_proxies_on_hand_made_log_probs():
    logp, mask = _hand_batch()
    assert noise_proxy("length", logp, mask).tolist() == [2.0, 3.0, 0.0]
    nll = noise_proxy("nll", logp, mask)
    assert nll.dtype == np.float64 and nll.shape == (3,)
    assert nll[0] == pytest.approx(1.5 * LN(2.0), rel=1e-15)  # (ln 2 + ln 4) / 2
    assert nll[1] == pytest.approx(LN(20.0) / 3, rel=1e-15)  # (0 + ln 10 + ln 2) / 3
    assert nll[2] == 0.0  # no response token: 0 / max(T, 1); the NaN outside the mask is ignored
    pisq = noise_proxy("pisq", logp, mask)
    assert pisq[0] == pytest.approx(0.5 ** 2 + 0.75 ** 2, rel=1e-15)
    assert pisq[1] == pytest.approx(0.0 + 0.9 ** 2 + 0.5 ** 2, rel=1e-15)
    assert pisq[2] == 0.0


def test_proxies_take_torch_tensors_and_clip_rounding_above_zero():
    import torch

    logp, mask = _hand_batch()
    for name in NOISE_PROXIES:
        got = noise_proxy(name, torch.from_numpy(logp).float(), torch.from_numpy(mask))
        assert np.allclose(got, noise_proxy(name, logp.astype(np.float32), mask), rtol=0, atol=0)
    # bf16 log-probs (a bf16 actor) are read too
    assert noise_proxy("length", torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(2, 4)).tolist() == [4.0, 4.0]
    # a log-prob of +1e-7 (the forward's rounding) counts as 0: every proxy >= 0
    up = np.array([[1e-7, LN(0.5)]])
    assert noise_proxy("nll", up, np.ones((1, 2))).tolist() == [LN(2.0) / 2]
    assert noise_proxy("pisq", up, np.ones((1, 2))).tolist() == [0.25]


def test_proxies_equal_the_benchmarks_formulas_on_random_input():
    """benchmarks/_noise_model.py's sample_proxies from logits; ours from the log-probs of the same tokens."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import _noise_model as nm

    g = torch.Generator().manual_seed(3)
    M, T, V = 6, 9, 11
    logits = torch.randn(M, T, V, generator=g) * 3
    targets = torch.randint(0, V, (M, T), generator=g)
    lengths = torch.tensor([9, 1, 4, 0, 7, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    ref = nm.sample_proxies(logits, torch.randn(M, T, 5, generator=g), targets, mask, ghost=False, diag=False)
    # the log-probs OpenRLHF's actor returns: log_softmax gathered at the sampled tokens
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    for name in NOISE_PROXIES:
        got = noise_proxy(name, logp, mask)
        want = ref[name].numpy()
        # float32 log-probs either way; the benchmark sums in float32, we in float64
        assert np.allclose(got, want, rtol=2e-6, atol=1e-7), (name, got, want)
    assert ref["length"].tolist() == lengths.double().tolist()


@pytest.mark.parametrize("args, message", [
    (("ghost", np.zeros((1, 2)), np.ones((1, 2))), "unknown proxy 'ghost'; expected one of ['nll', 'pisq', 'length']"),
    (("nll", np.zeros((2, 3)), np.ones((2, 2))), "action_log_probs (2, 3) and action_mask (2, 2) must both be"),
    (("nll", np.zeros(3), np.ones(3)), "must both be (samples, action tokens)"),
    (("pisq", np.array([[0.0, np.nan]]), np.ones((1, 2))), "noise_proxy pisq: action_log_probs[0, 1] is nan on a "
                                                          "response token"),
    (("nll", np.array([[-np.inf]]), np.ones((1, 1))), "action_log_probs[0, 0] is -inf"),
    (("nll", None, np.ones((1, 1))), "action_log_probs is None"),
])
def test_proxy_errors(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        noise_proxy(*args)


# ---------------------------------------------------------------------------------------------- groups


def _experiences(sizes, seed=0, micro=3, with_log_probs=True):
    """One step's samples as shuffled micro-batch Experiences, tagged like DynamoSamplesGenerator; per
    sample (rollout order): group, 0/1 score, log-probs and mask."""
    import torch

    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from openrlhf.trainer.ppo_utils.experience import Experience

    from dynamo_openrlhf.samples_generator import GROUP_KEY, PROMPT_ID_KEY

    rng = np.random.default_rng(seed)
    A = 6
    total = int(sum(sizes))
    group = np.repeat(np.arange(len(sizes)), sizes)
    pid = 500 + 3 * group
    score = rng.integers(0, 2, total).astype(np.float32)
    lengths = rng.integers(0, A + 1, total)
    logp = np.log(rng.uniform(0.05, 1.0, (total, A))).astype(np.float32)
    mask = np.arange(A)[None, :] < lengths[:, None]
    order = rng.permutation(total)  # dynamic batching scatters rollout positions over micro-batches
    exps = []
    for start in range(0, total, micro):
        pos = order[start:start + micro]
        exps.append(Experience(
            action_log_probs=torch.from_numpy(logp[pos].copy()) if with_log_probs else None,
            action_mask=torch.from_numpy(mask[pos].copy()),
            response_length=torch.from_numpy(lengths[pos].astype(np.float32)),
            kl=torch.zeros(len(pos), A),
            rewards=torch.from_numpy(score[pos].copy()),
            scores=torch.from_numpy(score[pos].copy()),
            index=[int(p) for p in pos],
            info={"reward": torch.from_numpy(score[pos].copy()),
                  GROUP_KEY: torch.from_numpy(group[pos].astype(np.int64)),
                  PROMPT_ID_KEY: torch.from_numpy(pid[pos].astype(np.int64))},
        ))
    return exps, dict(group=group, score=score, logp=logp, mask=mask, lengths=lengths)


def _expected_sums(truth, name, n_groups):
    q = noise_proxy(name, truth["logp"], truth["mask"])  # rollout order
    succ, fail = np.zeros(n_groups), np.zeros(n_groups)
    for j in range(q.size):  # one sample at a time, by its own group and outcome
        if truth["score"][j] > 0.5:
            succ[truth["group"][j]] += q[j]
        else:
            fail[truth["group"][j]] += q[j]
    return succ, fail


@pytest.mark.parametrize("name", NOISE_PROXIES)
def test_groups_sum_each_samples_proxy_by_group_and_class(name):
    from dynamo_openrlhf.samples_generator import RolloutGroups

    sizes = [3, 1, 6, 2, 4, 5, 3]
    exps, truth = _experiences(sizes, seed=5)
    g = RolloutGroups.from_experiences(exps, 0.5, noise_proxy=name)
    assert g.sizes.tolist() == sizes
    succ, fail = _expected_sums(truth, name, len(sizes))
    assert g.noise_success.dtype == np.float64 and g.noise_success.shape == (len(sizes),)
    assert np.allclose(g.noise_success, succ, rtol=1e-14, atol=0)
    assert np.allclose(g.noise_failure, fail, rtol=1e-14, atol=0)
    # a class the group has no sample of sums to exactly 0 (the pool refuses anything else)
    assert (g.noise_success[g.successes == 0] == 0).all() and (g.noise_failure[g.successes == g.sizes] == 0).all()
    if name == "length":  # integers: exact
        assert (g.noise_success + g.noise_failure).tolist() == [
            float(truth["lengths"][truth["group"] == i].sum()) for i in range(len(sizes))]
    off = RolloutGroups.from_experiences(exps, 0.5)
    assert off.noise_success is None and off.noise_failure is None
    assert np.array_equal(off.positions, g.positions) and np.array_equal(off.successes, g.successes)


def test_groups_without_log_probs_are_refused_when_the_proxy_is_on():
    from dynamo_openrlhf.samples_generator import RolloutGroups

    exps, _ = _experiences([2, 2], with_log_probs=False)
    RolloutGroups.from_experiences(exps, 0.5)  # off: not needed
    with pytest.raises(ValueError, match=re.escape("experience 0 has no action_log_probs/action_mask: "
                                                   "--dynamo.allocation.noise_scale nll reads the actor's log-probs")):
        RolloutGroups.from_experiences(exps, 0.5, noise_proxy="nll")
    empty = RolloutGroups.from_experiences([], 0.5, noise_proxy="nll")
    assert empty.noise_success.shape == (0,) and empty.noise_failure.dtype == np.float64


def test_experience_maker_hands_the_noise_sums_to_the_pool_update():
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from dynamo_openrlhf.experience_maker import DynamoExperienceMaker

    args = NS(algo=NS(advantage=NS(estimator="rloo", gamma=1.0, lambd=1.0, no_std_norm=False)),
              rollout=NS(n_samples_per_prompt=4, max_new_tokens=6),
              reward=NS(clip_range=(-10.0, 10.0), overlong_buffer_len=None, overlong_penalty_factor=1.0,
                        stop_properly_penalty_coef=None),
              data=NS(max_len=64))
    sizes = [2, 6, 4, 4, 5, 3]
    exps, truth = _experiences(sizes, seed=8, micro=4)
    seen = []
    maker = DynamoExperienceMaker(None, None, None, None, FixedKLController(0.0), NS(args=args), None,
                                  on_groups=seen.append, noise_proxy="pisq")
    maker.compute_advantages_and_returns(exps)
    (g,) = seen
    succ, fail = _expected_sums(truth, "pisq", len(sizes))
    assert np.allclose(g.noise_success, succ, rtol=1e-14, atol=0)
    assert np.allclose(g.noise_failure, fail, rtol=1e-14, atol=0)
    # and through the trainer's hook into the pool (forget 1: the pool holds the sums, as float32)
    from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

    trainer = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    trainer.allocator = RolloutAllocator(_cfg(forget=1.0, noise_scale="pisq"))
    trainer._record_groups(g)
    qs, qf = trainer.allocator.pool.noise_sums(g.prompt_ids)
    assert np.allclose(qs, succ, rtol=1e-6, atol=0) and np.allclose(qf, fail, rtol=1e-6, atol=0)
    s, f = trainer.allocator.pool.evidence(g.prompt_ids)
    assert s.tolist() == g.successes.tolist() and (s + f).tolist() == sizes
    # without the flag the groups carry no sums and the pool learns none
    seen.clear()
    exps, _ = _experiences(sizes, seed=8, micro=4)
    DynamoExperienceMaker(None, None, None, None, FixedKLController(0.0), NS(args=args), None,
                          on_groups=seen.append).compute_advantages_and_returns(exps)
    assert seen[0].noise_success is None
    trainer.allocator = RolloutAllocator(_cfg(forget=1.0))
    trainer._record_groups(seen[0])
    assert trainer.allocator.pool.noise_means == (None, None)
    with pytest.raises(ValueError, match=re.escape("--dynamo.allocation.noise_scale ghost: unknown proxy")):
        DynamoExperienceMaker(None, None, None, None, FixedKLController(0.0), NS(args=args), None,
                              noise_proxy="ghost")


# ---------------------------------------------------------------------------------------------- allocation


def _cfg(**kw):
    base = dict(rule="neyman", n_samples_per_prompt=4, prompts_per_step=8, lo=2, hi=8, fit_prior_every=0)
    base.update(kw)
    return AllocationConfig(**base)


IDS = np.arange(100, 108, dtype=np.int64)


def _noisy_pool():
    """Pass rates 1/8..7/8-ish and per-class proxy sums that differ by prompt (so s is not constant)."""
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0)
    succ = np.array([1, 2, 4, 6, 7, 4, 3, 5])
    trials = np.full(8, 8)
    qs = succ * np.array([0.5, 1.0, 2.0, 0.3, 4.0, 1.5, 0.2, 3.0])
    qf = (trials - succ) * np.array([2.0, 0.1, 1.0, 5.0, 0.4, 1.5, 3.0, 0.7])
    pool.update(IDS, succ, trials, noise_success=qs, noise_failure=qf)
    return pool


@pytest.mark.parametrize("estimator", [None, "rloo", "group_norm"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_allocator_allocates_on_the_pools_noise_scale(estimator, calibrated):
    pool = _noisy_pool()
    s = pool.noise_scale(IDS)
    assert np.ptp(s) > 0.5  # the scales differ: the test can see them
    alloc = RolloutAllocator(_cfg(forget=1.0, estimator=estimator, calibrated=calibrated, noise_scale="nll"),
                             pool=PassRatePool.from_bytes(pool.to_bytes()))
    counts = alloc.allocate(IDS)
    v = pool.calibrated_variance(IDS) if calibrated else pool.expected_variance(IDS)
    if estimator == "group_norm":
        want = pool.allocate(IDS, 32, 2, 8, estimator="group_norm", calibrated=calibrated, scale=s)
    else:
        want = allocate_rollouts(v * s, 32, 2, 8, estimator=estimator)
    assert counts.tolist() == np.asarray(want).tolist() and int(counts.sum()) == 32
    plain = RolloutAllocator(_cfg(forget=1.0, estimator=estimator, calibrated=calibrated),
                             pool=PassRatePool.from_bytes(pool.to_bytes())).allocate(IDS)
    assert counts.tolist() != plain.tolist()  # the scale moved rollouts
    m = alloc.metrics()
    a = b = None
    if estimator == "group_norm":
        es, ef = pool.evidence(IDS)
        a, b = 1.0 + es, 1.0 + ef
    assert m["dynamo/pred_var_ratio"] == predicted_variance_ratio(v, counts, estimator, a, b, scale=s)
    assert m["dynamo/pred_var_ratio"] != predicted_variance_ratio(v, counts, estimator, a, b)
    assert m["dynamo/noise_scale_mean"] == pytest.approx(s.mean(), rel=1e-15)
    p10, p90 = np.quantile(s, [0.1, 0.9])
    assert m["dynamo/noise_scale_spread"] == pytest.approx(p90 / p10, rel=1e-15)


def test_proportional_rule_takes_the_scale_and_off_logs_nothing():
    pool = _noisy_pool()
    s = pool.noise_scale(IDS)
    got = RolloutAllocator(_cfg(forget=1.0, rule="proportional", noise_scale="length"), pool=pool).allocate(IDS)
    assert got.tolist() == np.asarray(pool.allocate(IDS, 32, 2, 8, "proportional", scale=s)).tolist()
    off = RolloutAllocator(_cfg(forget=1.0), pool=pool)
    off.allocate(IDS)
    assert not any(k.startswith("dynamo/noise_scale") for k in off.metrics())


def test_a_pool_without_noise_data_allocates_as_without_the_flag():
    pool = PassRatePool(prior=(1.0, 1.0), forget=1.0)
    pool.update(IDS, [0, 1, 2, 3, 4, 4, 2, 1], [4] * 8)
    on = RolloutAllocator(_cfg(forget=1.0, estimator="rloo", noise_scale="nll"), pool=pool)
    counts = on.allocate(IDS)
    assert counts.tolist() == RolloutAllocator(_cfg(forget=1.0, estimator="rloo"), pool=pool).allocate(IDS).tolist()
    m = on.metrics()
    assert m["dynamo/noise_scale_mean"] == 1.0 and m["dynamo/noise_scale_spread"] == 1.0
    assert m["dynamo/pred_var_ratio"] == predicted_variance_ratio(pool.expected_variance(IDS), counts, "rloo")


def test_record_passes_the_sums_and_the_state_round_trip_keeps_them():
    alloc = RolloutAllocator(_cfg(forget=0.5, noise_scale="nll"))
    alloc.record([1, 2], [3, 0], [4, 4], noise_success=[1.5, 0.0], noise_failure=[0.25, 2.0])
    alloc.record([2, 3], [1, 1], [2, 2], noise_success=[0.75, 4.0], noise_failure=[0.5, 1.0])
    qs, qf = alloc.pool.noise_sums([1, 2, 3])
    assert qs.tolist() == [0.75, 0.75, 4.0] and qf.tolist() == [0.125, 1.5, 1.0]  # forgotten by 0.5 per step
    restored = RolloutAllocator(_cfg(forget=0.5, noise_scale="nll"))
    restored.load_state_dict(alloc.state_dict())
    assert restored.pool_digest() == alloc.pool_digest()
    ids = np.arange(1, 9)
    assert restored.pool.noise_scale(ids).tolist() == alloc.pool.noise_scale(ids).tolist()
    assert restored.allocate(ids).tolist() == alloc.allocate(ids).tolist()


def test_predicted_ratio_and_metrics_with_a_scale_hand_values():
    # rloo, uniform 4 each: J = (2 x 0.25 + 0.09) / 3; n = (5, 3): 0.5/4 + 0.09/2
    assert predicted_variance_ratio([0.25, 0.09], [5, 3], "rloo", scale=[2.0, 1.0]) == pytest.approx(
        (0.5 / 4 + 0.09 / 2) / (0.59 / 3), rel=1e-15)
    # None: sum s v / n over sum s v x N / B
    assert predicted_variance_ratio([0.25, 0.09], [5, 3], scale=[1.0, 3.0]) == pytest.approx(
        (0.25 / 5 + 0.27 / 3) / (0.52 * 2 / 8), rel=1e-15)
    assert predicted_variance_ratio([0.25, 0.09], [5, 3], "rloo", scale=[1.0, 1.0]) == \
        predicted_variance_ratio([0.25, 0.09], [5, 3], "rloo")
    with pytest.raises(ValueError, match=re.escape("scale has shape (3,), variances (2,)")):
        predicted_variance_ratio([0.25, 0.09], [5, 3], scale=[1.0, 1.0, 1.0])
    # 10th / 90th percentiles of 1..11 are 2 and 10
    assert noise_scale_metrics(np.arange(1.0, 12.0)) == {"dynamo/noise_scale_mean": 6.0,
                                                         "dynamo/noise_scale_spread": 5.0}
    assert noise_scale_metrics([]) == {}


# ---------------------------------------------------------------------------------------------- flag


def _args(rule="neyman", noise="off", estimator="rloo"):
    return NS(
        rollout=NS(n_samples_per_prompt=4, batch_size=8, vllm_generate_batch_size=None, max_new_tokens=12),
        algo=NS(dynamic_filtering_enable=False, advantage=NS(estimator=estimator)),
        train=NS(async_enable=False, batch_size=32, dynamic_batch_enable=False, seed=0),
        actor=NS(policy_loss_type="ppo", loss_agg_mode="token-mean"),
        dynamo=NS(eval_pass_k=None, loss=NS(prompt_weighting="auto", token_normalizer=None),
                  allocation=NS(rule=rule, lo=None, hi=None, oversample=1.0, skip_factor=None, exploration=None,
                                exploration_rollouts=None, mastery=None, mastery_threshold=None,
                                priority_floor=None, min_rollouts=None, noise_scale=noise),
                  pool=NS(prior=(1.0, 1.0), forget=0.999, fit_prior_every=10, success_threshold=0.5, load=None,
                          calibrated=True),
                  modulation=NS(preset="off", mu_max=None, lambda_min=None, gamma=None, tau=None)),
    )


def test_flag_parses_with_its_choices_and_default():
    from dynamo_openrlhf.train import add_dynamo_arguments

    parser = add_dynamo_arguments(argparse.ArgumentParser())
    assert getattr(parser.parse_args([]), "dynamo.allocation.noise_scale") == "off"
    for name in NOISE_PROXIES:
        ns = parser.parse_args(["--dynamo.allocation.noise_scale", name])
        assert getattr(ns, "dynamo.allocation.noise_scale") == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--dynamo.allocation.noise_scale", "ghost"])
    text = parser.format_help()
    assert "--dynamo.allocation.noise_scale {off,nll,pisq,length}" in text


def test_flag_resolves_and_is_refused_where_no_rule_uses_it():
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf.train import _dynamo_problems

    assert AllocationConfig.from_args(_args()).noise_scale is None  # off
    assert AllocationConfig.from_args(_args(noise="pisq")).noise_scale == "pisq"
    assert AllocationConfig.from_args(_args(rule="proportional", noise="nll", estimator="gae")).noise_scale == "nll"
    assert AllocationConfig.from_args(_args(estimator="group_norm", noise="length")).noise_scale == "length"
    assert _dynamo_problems(_args(noise="nll")) == [] and _dynamo_problems(_args(rule="off")) == []
    # judged by the core (the pool's own message), rule filter as the core's uniform
    with pytest.raises(ValueError) as pool_error:
        PassRatePool().allocate(np.arange(4), 8, 2, 2, "uniform", noise_scale=True)
    assert str(pool_error.value) == ("noise_scale does not apply to rule 'uniform' (it weighs each prompt's variance "
                                     "by its noise scale: only rules 'neyman' and 'proportional' weigh prompts by "
                                     "variance)")
    for rule, note in (("uniform", ""), ("filter", " (rule filter allocates with the core's rule uniform)")):
        (p,) = _dynamo_problems(_args(rule=rule, noise="nll"))
        assert p == (f"--dynamo.allocation.noise_scale nll with --dynamo.allocation.rule {rule}{note}: "
                     f"{pool_error.value}; use --dynamo.allocation.noise_scale off")
    (p,) = _dynamo_problems(_args(rule="off", noise="pisq"))
    assert p == ("--dynamo.allocation.noise_scale pisq needs the pass-rate pool of an allocation rule (neyman or "
                 "proportional), not --dynamo.allocation.rule off")
    with pytest.raises(ValueError, match=re.escape("--dynamo.allocation.noise_scale: unknown proxy 'ghost'")):
        _cfg(noise_scale="ghost")


def test_summary_line_names_the_proxy_and_the_scales():
    from dynamo_openrlhf.train import format_summary

    args = NS(dynamo=NS(allocation=NS(rule="neyman", noise_scale="nll"), modulation=NS(preset="off"), run_dir=None,
                        reward_dump=None, loss=NS(prompt_weighting="tokens", token_normalizer=None)),
              algo=NS(advantage=NS(estimator="rloo")), actor=NS(loss_agg_mode="token-mean"),
              rollout=NS(max_new_tokens=16), train=NS(batch_size=128, dynamic_batch_enable=False, async_enable=False),
              eval=NS(dataset=None), ckpt=NS(path="/nonexistent/ckpt", output_dir="/nonexistent/final"),
              logger=NS(tensorboard_dir=None))
    row = {"type": "train", "dynamo/alloc_budget": 32.0, "dynamo/alloc_min": 2.0, "dynamo/alloc_max": 6.0,
           "dynamo/alloc_skipped": 0.0, "dynamo/pred_var_ratio": 0.9, "dynamo/pool_size": 8.0,
           "dynamo/pool_mean_pass_rate": 0.5}
    history = [{**row, "step": 1, "dynamo/noise_scale_mean": 1.0, "dynamo/noise_scale_spread": 1.0},
               {**row, "step": 2, "dynamo/noise_scale_mean": 0.8125, "dynamo/noise_scale_spread": 2.5}]
    text = format_summary(history, args, 1.0)
    assert ("  noise scale (nll, learnt per prompt): mean s of the candidates 1 at the first step, 0.8125 at the "
            "last; spread (90th/10th percentile) mean 1.750, max 2.500") in text
    assert "noise scale" not in format_summary([{k: v for k, v in r.items() if "noise" not in k} for r in history],
                                               args, 1.0)
