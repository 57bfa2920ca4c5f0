#!/usr/bin/env python3
"""Does the rollout allocation lower the variance of the update the trainer actually takes?

    python benchmarks/gradient_variance.py            # full run: 24 train prompts, 64 repeats (~15 min, 2 cores)
    python benchmarks/gradient_variance.py --quick    # 6 prompts, 4 repeats (for the tests)
    python benchmarks/gradient_variance.py --from_json benchmarks/out/gradient_variance.json   # re-render only

Setting: the tiny-cpu preset's warm-started policy (``dynamo_openrlhf.tiny``), a fixed batch of ``--prompts``
random train prompts (``--splits``: ``train``; ``eval`` = random eval prompts), and the preset's rollout
budget B = 8 x prompts with bounds 2..16.

1. Pass rates. An *oracle* estimate p* from ``--oracle_samples`` (64) samples per prompt, and a *pool
   posterior* from a few earlier rollouts of the same policy: a ``PassRatePool`` (prior Beta(1,1)) updated
   with ``--pool_samples`` (8) samples per prompt, then ``fit_prior()``. Responses are sampled with
   ``dynamo_openrlhf.evaluate.sample_batch`` (temperature 1, the exact sampled token ids are kept) and scored
   with the training reward (math-verify; scores cached per (response, label)).
2. Allocations of B, for each allocator objective (``estimator`` = "rloo": sum v/(n-1); "group_norm": the
   pool's Beta-moment model; see docs/variance.md and docs/allocation_objectives.md): uniform (8 each);
   ``ours`` = ``pool.allocate(ids, B, 2, 16, estimator=e)`` on the pool posterior; ``oracle`` = the same on
   a pool that holds the oracle estimate as near-certain evidence (64,000 trials per prompt).
3. Loss variants = the estimator/weighting pairs the trainer supports (``VARIANTS``): advantages from
   ``dynamo_openrlhf.advantages`` on the variable groups; ``balanced`` = the trainer's prompt-balanced loss
   (per-sample weights ``prompt_balanced_weights``, token sums over a constant L = ``MAX_NEW_TOKENS``, applied
   after the token modulation, exactly as ``DynamoActorPPOTrainer`` does); ``tokens`` = OpenRLHF's token-mean.
   For each allocation and each of ``--repeats`` independent rollout sets, the gradient over all parameters of
   the loss at the sampling policy (old log-probs = current ones, ratio 1). Each variant is measured on the
   allocations of its own estimator.
4. Measured variance = trace of the covariance of the flattened gradient over repeats, as a ratio to
   uniform's, with a paired percentile bootstrap CI over repeats (common random numbers: each repeat draws
   one bank of max n_i rollouts per prompt and every allocation uses the first n_i). Next to it the ratio the
   allocator PREDICTS with the variant's own estimator model and v = p*(1-p*) of the oracle estimate; the
   noise/signal ratio (trace(cov) / ||E g||^2) and how far the MEAN gradient moves from uniform's
   (||E g - E g_uniform||^2 / ||E g_uniform||^2, unbiased): an allocation that changes the expected update
   is not a pure variance reduction.

Outputs: a markdown table (printed and written to OUT/gradient_variance.md), OUT/gradient_variance.json with
every number, and a PNG (docs/gradient_variance.png; with --quick OUT/gradient_variance.png).
Deterministic given --seed (torch is reseeded before every sampling call; one thread by default).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

UNIFORM_N = 8          # rollouts per prompt of the baseline (B = UNIFORM_N x prompts), as the tiny preset
BOUNDS = (2, 16)       # the tiny preset's per-prompt bounds
MAX_NEW_TOKENS = 16
TOKEN_NORMALIZER = MAX_NEW_TOKENS  # L of the balanced loss (the trainer's default: the generation limit)
ORACLE_TRIALS = 64_000  # evidence per prompt of the oracle pool: its posterior is the oracle estimate
# name -> (advantage estimator, loss weighting, token modulation)
VARIANTS = {
    "rloo_balanced": ("rloo", "balanced", "off"),
    "dynamo": ("rloo", "balanced", "decay6"),
    "rloo_tokens": ("rloo", "tokens", "off"),
    "grpo": ("group_norm", "tokens", "off"),
    "grpo_balanced": ("group_norm", "balanced", "off"),
}
VARIANT_DESC = {
    "rloo_balanced": "RLOO advantages, prompt-balanced loss (the trainer's default with allocation on), modulation off",
    "dynamo": "the DynaMO default as trained: RLOO, prompt-balanced loss, token modulation decay6",
    "rloo_tokens": "RLOO advantages, OpenRLHF's token-mean loss",
    "grpo": "OpenRLHF's GRPO as trained: group_norm advantages, token-mean loss",
    "grpo_balanced": "group_norm advantages, prompt-balanced loss",
}
VARIANT_SHORT = {"rloo_balanced": "RLOO, balanced", "dynamo": "DynaMO (RLOO, balanced, decay6)",
                 "rloo_tokens": "RLOO, token-mean", "grpo": "GRPO (group_norm, token-mean)",
                 "grpo_balanced": "group_norm, balanced"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Pure helpers (tested directly)
# ----------------------------------------------------------------------------------------------


def predicted_ratio(pool, ids, counts, estimator=None) -> float:
    """The allocator's predicted variance ratio J(n) / J(uniform) under ``estimator``'s own variance model
    (``dynamo_openrlhf.allocation.predicted_variance_ratio``) with the posteriors of ``pool`` (for the oracle:
    the oracle estimate held as near-certain evidence, so v = p(1-p))."""
    from dynamo_openrlhf.allocation import predicted_variance_ratio

    s, f = pool.evidence(ids)
    a0, b0 = pool.prior
    return predicted_variance_ratio(pool.expected_variance(ids), counts, estimator,
                                    alpha=np.asarray(s) + a0, beta=np.asarray(f) + b0)


def centered_gram(X) -> np.ndarray:
    """(R, R) float64 Gram matrix of the rows of X (R, D) after subtracting their mean (chunked)."""
    import torch

    X = torch.as_tensor(X)
    R, D = X.shape
    mean = X.double().mean(0) if D <= 1 << 20 else torch.cat(
        [X[:, i:i + (1 << 20)].double().mean(0) for i in range(0, D, 1 << 20)])
    G = torch.zeros((R, R), dtype=torch.float64)
    step = 1 << 18
    for i in range(0, D, step):
        xc = X[:, i:i + step].double() - mean[i:i + step]
        G += xc @ xc.T
    return G.numpy()


def trace_cov(G: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Trace of the covariance (divisor R - 1) of vectors with centred Gram matrix G.

    ``weights``: (S, R) resampling counts (each row sums to R) -> S bootstrap values; None -> the plain
    estimate. Shift-invariant, so the Gram of vectors centred at the full-sample mean is exact."""
    G = np.asarray(G, dtype=np.float64)
    R = G.shape[0]
    if weights is None:
        return np.float64(np.trace(G) / (R - 1))
    W = np.asarray(weights, dtype=np.float64)
    quad = np.einsum("sr,rq,sq->s", W, G, W)
    return (W @ np.diag(G) - quad / R) / (R - 1)


def response_lengths(gen_ids, eos_id: int) -> List[int]:
    """Length of each generated row up to and including its first EOS (all of it without one).
    After EOS, HF ``generate`` pads with pad_token_id; a pad sampled before EOS is a real token."""
    out = []
    for row in gen_ids.tolist():
        try:
            out.append(row.index(eos_id) + 1)
        except ValueError:
            out.append(len(row))
    return out


# ----------------------------------------------------------------------------------------------
# Policy, sampling, scoring
# ----------------------------------------------------------------------------------------------


class _RecordingTokenizer:
    """Delegates to a tokenizer and keeps the token ids handed to ``batch_decode``, so that the one
    sampler (``evaluate.sample_batch``) can be used while the gradient sees the exact sampled tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.last_ids = None

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def batch_decode(self, ids, **kw):
        self.last_ids = ids
        return self._tok.batch_decode(ids, **kw)


class Policy:
    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.blocks = _parameter_blocks(self.model)
        self.dim = sum(p.numel() for p in self.params)
        self._rec = _RecordingTokenizer(self.tok)

    def encode(self, prompt: str) -> List[int]:
        from dynamo_openrlhf.tiny import _encode_chat

        return _encode_chat(self.tok, prompt)

    def sample(self, encoded: Sequence[Sequence[int]], counts: Sequence[int], seed: int, chunk: int = 512):
        """``counts[i]`` responses to prompt i, prompt-major. Returns (texts, response id lists, prompt index)."""
        from dynamo_openrlhf.sampling import sample_batch

        self.torch.manual_seed(seed)
        flat = [i for i, c in enumerate(counts) for _ in range(int(c))]
        texts, resp, owner = [], [], []
        for s in range(0, len(flat), chunk):
            part = flat[s:s + chunk]
            t = sample_batch(self.model, self._rec, [encoded[i] for i in part], 1, 1.0, 1.0, MAX_NEW_TOKENS)
            gen = self._rec.last_ids
            lens = response_lengths(gen, self.tok.eos_token_id)
            rows = gen.tolist()
            texts += t
            resp += [rows[j][:lens[j]] for j in range(len(part))]
            owner += part
        return texts, resp, owner

    def gradients(self, encoded, resp, owner, terms: Dict[str, tuple]):
        """Flattened gradient (float32 tensor) of each named loss term at the sampling policy (ratio = 1).

        ``terms``: name -> (loss_fn, advantages (M,) per sample, weights (M,) or None). ``weights`` None: the
        loss as OpenRLHF aggregates it (token-mean over the batch); else the prompt-balanced loss: the token
        modulation (if any) on the unweighted advantages, then each sample's tokens weighted by its weight and
        summed: ``DynaMOPolicyLoss(..., sample_weight=w)`` with ``balanced_normalizers`` (the actor's path, one
        micro-batch, one rank)."""
        from dynamo_openrlhf.loss import balanced_normalizers

        norm = balanced_normalizers(1, 1)

        torch = self.torch
        seqs = [list(encoded[o]) + r for o, r in zip(owner, resp)]
        L = max(len(s) for s in seqs)
        M = len(seqs)
        ids = torch.full((M, L), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((M, L), dtype=torch.long)
        amask = torch.zeros((M, L - 1), dtype=torch.float32)
        for j, (o, s) in enumerate(zip(owner, seqs)):
            ids[j, :len(s)] = torch.tensor(s)
            attn[j, :len(s)] = 1
            amask[j, len(encoded[o]) - 1:len(s) - 1] = 1.0  # positions predicting response tokens
        logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * amask
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1) * amask
        old = logp.detach()
        out: Dict[str, object] = {}
        names = list(terms)
        for k, name in enumerate(names):
            loss_fn, adv, weights = terms[name]
            A = adv.to(torch.float32).unsqueeze(1).expand(M, L - 1) * amask
            if weights is None:
                loss = loss_fn(logp, old, A, amask, entropy=entropy)[0]
            else:
                loss = loss_fn(logp, old, A, amask, entropy=entropy, sample_weight=weights.to(torch.float32), **norm)[0]
            grads = torch.autograd.grad(loss, self.params, retain_graph=k < len(names) - 1, allow_unused=True)
            out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, self.params)])
        return out


def per_prompt_grams(policy, loss_fn, encoded, banks, take_of, n: np.ndarray, N: int):
    """Per-prompt decomposition of the RLOO prompt-balanced update (modulation off): g = sum_i g_i with
    g_i = (1/N)(1/n_i) sum_j A_ij s_ij / L, and prompts' rollouts independent, so
    trace Var(g) = sum_i trace Var(g_i) exactly (the cross-prompt covariances are zero and only add noise to the
    whole-batch estimate). Returns (N, R, R) centred Gram matrices of each prompt's gradient over the repeats
    (zeros where a prompt's rewards are constant in a repeat: its RLOO advantages are exactly 0)."""
    import torch

    from dynamo_openrlhf.advantages import group_normalized_advantages
    from dynamo_openrlhf.loss import balanced_normalizers

    R = len(banks)
    norm = balanced_normalizers(1, 1)
    grams = np.zeros((N, R, R))
    for i in range(N):
        if n[i] < 2:
            continue
        X = torch.zeros((R, policy.dim), dtype=torch.float32)
        w = torch.full((int(n[i]),), 1.0 / (N * n[i] * TOKEN_NORMALIZER), dtype=torch.float32)
        for r, (bank_resp, bank_owner, bank_rew) in enumerate(banks):
            take = take_of[i]
            rew = torch.tensor(bank_rew[take], dtype=torch.float32)
            if float(rew.max()) == float(rew.min()):
                continue
            adv = group_normalized_advantages(rew, [int(n[i])], "rloo")
            g = policy.gradients(encoded, [bank_resp[j] for j in take], [bank_owner[j] for j in take],
                                 {"x": (loss_fn, adv, w)})
            X[r] = g["x"]
        grams[i] = centered_gram(X)
    return grams


def _parameter_blocks(model) -> Dict[str, List[int]]:
    """Parameter blocks for per-layer numbers: name -> [start, end) in the flattened gradient."""
    blocks: Dict[str, List[int]] = {}
    off = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed_tokens" in name:
            key = "embed"
        elif ".layers." in name:
            key = "layer" + name.split(".layers.")[1].split(".")[0]
        else:
            key = "head"  # final norm + lm_head
        b = blocks.setdefault(key, [off, off])
        b[1] = off + p.numel()
        off += p.numel()
    return blocks


class CachedScorer:
    """``MathReward`` with a cache per (response, label): math-verify is deterministic."""

    def __init__(self):
        from dynamo_openrlhf.reward import MathReward

        self.scorer = MathReward()
        self.cache: Dict = {}
        self.calls = 0

    def __call__(self, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        out = np.empty(len(texts))
        for j, (t, lab) in enumerate(zip(texts, labels)):
            key = (t, lab)
            if key not in self.cache:
                self.cache[key] = self.scorer.score(t, lab).reward
                self.calls += 1
            out[j] = self.cache[key]
        return out

    def close(self):
        self.scorer.close()


def count_successes(policy: Policy, scorer: CachedScorer, encoded, labels, k: int, seed: int) -> np.ndarray:
    texts, _, owner = policy.sample(encoded, [k] * len(encoded), seed)
    r = scorer(texts, [labels[o] for o in owner])
    return np.bincount(np.asarray(owner), weights=r, minlength=len(encoded)).round().astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Allocations
# ----------------------------------------------------------------------------------------------


def objectives(variants) -> List[str]:
    """The allocator objectives (estimator names) the variants need, in first-use order."""
    out: List[str] = []
    for v in variants:
        e = VARIANTS[v][0]
        if e not in out:
            out.append(e)
    return out


def make_allocations(pool, oracle_pool, ids, budget: int, estimators: Sequence[str], bounds=BOUNDS):
    """name -> int64 allocation of ``budget`` over the prompts: uniform, and "ours[e]" (pool posterior) and
    "oracle[e]" (the oracle estimate as near-certain evidence) for every allocator objective e."""
    from dynamo_openrlhf import allocate_rollouts

    N = len(ids)
    allocs = {"uniform": np.asarray(allocate_rollouts(np.zeros(N), budget, UNIFORM_N, UNIFORM_N, "uniform"))}
    for e in estimators:
        allocs[f"ours[{e}]"] = np.asarray(pool.allocate(ids, budget, bounds[0], bounds[1], "neyman", estimator=e))
        allocs[f"oracle[{e}]"] = np.asarray(oracle_pool.allocate(ids, budget, bounds[0], bounds[1], "neyman",
                                                                 estimator=e))
    return allocs


def allocation_estimator(name: str) -> Optional[str]:
    """"ours[rloo]" -> "rloo"; "uniform" -> None (every variant is measured on uniform)."""
    return name[name.index("[") + 1:-1] if "[" in name else None


def check_allocation(name: str, n: np.ndarray, budget: int) -> None:
    """The budget and the bounds hold (raises AssertionError)."""
    lo, hi = (UNIFORM_N, UNIFORM_N) if name == "uniform" else BOUNDS
    assert int(n.sum()) == budget, f"{name}: {int(n.sum())} rollouts, budget {budget}"
    assert n.min() >= lo and n.max() <= hi, f"{name}: allocation outside [{lo}, {hi}]: {n.tolist()}"


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def make_losses(variants):
    """name -> (loss function, estimator, weighting) for the requested variants."""
    from dynamo_openrlhf.cpu_backend import install_import_stand_ins

    install_import_stand_ins()  # a no-op for packages that import for real (GPU machines)
    from dynamo_openrlhf.loss import DynaMOPolicyLoss

    fns = {"off": DynaMOPolicyLoss(0.2, 0.2, modulation="off"),
           "decay6": DynaMOPolicyLoss(0.2, 0.2, modulation="decay6", modulation_stats=False)}
    return {v: (fns[VARIANTS[v][2]], VARIANTS[v][0], VARIANTS[v][1]) for v in variants}


def gradient_stats(X, blocks) -> Dict:
    """Centred Gram matrix, projections of the centred rows on the mean, squared mean norm, block traces."""
    R = X.shape[0]
    m = X.double().mean(0)
    h = np.zeros(R)
    for i in range(0, X.shape[1], 1 << 18):
        xc = X[:, i:i + (1 << 18)].double() - m[i:i + (1 << 18)]
        h += (xc @ m[i:i + (1 << 18)]).numpy()
    block_tr = {b: float(((X[:, s:e].double() - m[s:e]) ** 2).sum() / (R - 1)) for b, (s, e) in blocks.items()}
    return {"G": centered_gram(X), "h": h, "m2": float((m ** 2).sum()), "block_trace": block_tr}


def _counts(rng, R: int, S: int) -> np.ndarray:
    idx = rng.integers(0, R, size=(S, R))
    W = np.zeros((S, R))
    np.add.at(W, (np.repeat(np.arange(S), R), idx.ravel()), 1.0)
    return W


def noise_to_signal(st: Dict, W: Optional[np.ndarray] = None) -> np.ndarray:
    """trace(cov) / ||E g||^2 (the squared mean norm debiased by trace/R), plain or per bootstrap row."""
    G, h, m2 = st["G"], st["h"], st["m2"]
    R = G.shape[0]
    if W is None:
        W = np.ones((1, R))
    tr = trace_cov(G, W)
    mean2 = m2 + 2 * (W @ h) / R + np.einsum("sr,rq,sq->s", W, G, W) / R ** 2
    sig = mean2 - tr / R
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sig > 0, tr / sig, np.inf)


def run_batch(policy, scorer, losses, split: str, args, batch_index: int) -> Dict:
    import torch

    from dynamo_openrlhf import PassRatePool
    from dynamo_openrlhf.advantages import group_normalized_advantages, prompt_balanced_weights
    from dynamo_openrlhf.prompt_ids import prompt_ids
    from dynamo_openrlhf.tiny import read_jsonl

    t_start = time.time()
    rows = read_jsonl(policy.files["eval" if split == "eval" else "train"])
    seed0 = args.seed * 1_000_003 + 100_000 * batch_index
    rng = np.random.default_rng(seed0)
    n_prompts = min(args.prompts, len(rows))
    batch = [rows[i] for i in np.sort(rng.choice(len(rows), size=n_prompts, replace=False))]
    encoded = [policy.encode(r["prompt"]) for r in batch]
    labels = [str(r["answer"]) for r in batch]
    ids = prompt_ids([r["prompt"] for r in batch], labels)
    N, B = len(batch), UNIFORM_N * len(batch)

    # 1. pass rates: oracle (large sample) and the pool posterior from a few earlier rollouts
    k_or = count_successes(policy, scorer, encoded, labels, args.oracle_samples, seed0 + 1)
    p_or = k_or / args.oracle_samples
    v_or = p_or * (1 - p_or)
    k_pool = count_successes(policy, scorer, encoded, labels, args.pool_samples, seed0 + 2)
    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update(ids, k_pool, np.full(N, args.pool_samples))
    try:
        prior = pool.fit_prior()
    except ValueError as e:  # e.g. every prompt solved: keep Beta(1,1)
        prior = pool.prior
        log(f"[gv] fit_prior refused ({e}); keeping Beta(1,1)")
    oracle_pool = PassRatePool(prior=(1.0, 1.0))
    scale = ORACLE_TRIALS // args.oracle_samples
    oracle_pool.update(ids, k_or * scale, np.full(N, args.oracle_samples * scale))
    log(f"[gv] batch '{split}': {N} prompts, B={B}; oracle pass rates from {args.oracle_samples} samples/prompt "
        f"(mean {p_or.mean():.3f}; p=0: {int((k_or == 0).sum())}, p=1: {int((k_or == args.oracle_samples).sum())}); "
        f"pool from {args.pool_samples}/prompt, fitted prior Beta({prior[0]:.3g}, {prior[1]:.3g}) "
        f"({time.time() - t_start:.1f}s)")

    # 2. allocations, one pair (ours, oracle) per allocator objective
    estimators = objectives(losses)
    allocs = make_allocations(pool, oracle_pool, ids, B, estimators)
    for name, n in allocs.items():
        check_allocation(name, n, B)

    # 3. repeats, with common random numbers: repeat r draws one bank of max_a n_i rollouts per prompt
    # (i.i.d. from the policy) and every allocation takes the first n_i of prompt i's bank. Within an
    # allocation the repeats are independent; across allocations they are paired, which makes the ratios
    # to uniform far more precise (the bootstrap resamples repeats jointly).
    R = args.repeats
    t0 = time.time()
    m = np.max(np.stack(list(allocs.values())), axis=0)
    starts = np.cumsum(m) - m
    banks = []
    for r in range(R):
        texts, resp, owner = policy.sample(encoded, m, seed0 + 1000 + r)
        banks.append((resp, owner, scorer(texts, [labels[o] for o in owner])))
    log(f"[gv] {split}: {R} banks of {int(m.sum())} rollouts sampled and scored in {time.time() - t0:.1f}s")
    results: Dict[str, Dict] = {}
    stats: Dict[str, Dict[str, Dict]] = {}
    grams: Dict[str, np.ndarray] = {}
    X_uniform = None
    for name, n in allocs.items():
        t0 = time.time()
        objective_of = allocation_estimator(name)
        measured = [v for v in losses if objective_of is None or losses[v][1] == objective_of]
        if name != "uniform" and np.array_equal(n, allocs["uniform"]):
            # the same allocation as uniform on the same banks: identical gradients, identical numbers
            stats[name] = {v: stats["uniform"][v] for v in measured}
            if "uniform" in grams and "rloo_balanced" in measured:
                grams[name] = grams["uniform"]
            u = results["uniform"]
            results[name] = {
                "same_as": "uniform", "per_prompt": ({"trace": u["per_prompt"]["trace"], "seconds": 0.0}
                                                     if name in grams else None),
                "n": n.tolist(), "objective": objective_of, "variants": measured,
                "predicted_ratio": {e: predicted_ratio(oracle_pool, ids, n, e) for e in estimators
                                    if objective_of in (None, e)},
                "prompts_skipped": 0, "mean_reward": u["mean_reward"],
                "constant_reward_groups_mean": u["constant_reward_groups_mean"],
                "trace": {v: u["trace"][v] for v in measured}, "block_trace": {v: u["block_trace"][v] for v in measured},
                "repeat_sq_dev": {v: u["repeat_sq_dev"][v] for v in measured}, "seconds": 0.0,
            }
            log(f"[gv] {split}/{name:17s} = uniform (same allocation)")
            continue
        X = {v: torch.empty((R, policy.dim), dtype=torch.float32) for v in measured}
        sizes = torch.tensor(n, dtype=torch.long)
        weights = {e: prompt_balanced_weights(sizes, e, TOKEN_NORMALIZER) for e in {losses[v][1] for v in measured}}
        take = np.concatenate([np.arange(starts[i], starts[i] + n[i]) for i in range(N)]).astype(np.int64)
        rewards_mean, zero_groups = [], []
        for r in range(R):
            bank_resp, bank_owner, bank_rew = banks[r]
            resp = [bank_resp[j] for j in take]
            owner = [bank_owner[j] for j in take]
            rew = bank_rew[take]
            rt = torch.tensor(rew, dtype=torch.float32)
            adv = {e: group_normalized_advantages(rt, sizes, e) for e in weights}
            terms = {v: (losses[v][0], adv[losses[v][1]], weights[losses[v][1]] if losses[v][2] == "balanced" else None)
                     for v in measured}
            g = policy.gradients(encoded, resp, owner, terms)
            for v in measured:
                X[v][r] = g[v]
            rewards_mean.append(float(rew.mean()))
            k_i = np.bincount(np.asarray(owner, dtype=np.int64), weights=rew, minlength=N)
            zero_groups.append(int(((n >= 2) & ((k_i == 0) | (k_i == n))).sum()))
        stats[name] = {v: gradient_stats(X[v], policy.blocks) for v in measured}
        if name == "uniform":
            X_uniform = X
        else:  # paired: ||E g - E g_uniform||^2, unbiased from the per-repeat differences
            for v in measured:
                D = (X[v] - X_uniform[v]).double()
                dm = D.mean(0)
                stats[name][v]["shift2"] = float((dm ** 2).sum()) - float(((D - dm) ** 2).sum()) / (R - 1) / R
            del X
        per_prompt = None
        if "rloo_balanced" in measured and args.per_prompt:
            t1 = time.time()
            take_of = [np.arange(starts[i], starts[i] + n[i]).astype(np.int64) for i in range(N)]
            grams[name] = per_prompt_grams(policy, losses["rloo_balanced"][0], encoded, banks, take_of, n, N)
            per_prompt = {"trace": [float(trace_cov(G)) for G in grams[name]], "seconds": time.time() - t1}
        results[name] = {
            "per_prompt": per_prompt,
            "n": n.tolist(),
            "objective": objective_of,
            "variants": measured,
            "predicted_ratio": {e: predicted_ratio(oracle_pool, ids, n, e) for e in estimators
                                if objective_of in (None, e)},
            "prompts_skipped": int((n == 0).sum()),
            "mean_reward": float(np.mean(rewards_mean)),
            "constant_reward_groups_mean": float(np.mean(zero_groups)),
            "trace": {v: float(trace_cov(stats[name][v]["G"])) for v in measured},
            "block_trace": {v: stats[name][v]["block_trace"] for v in measured},
            # per repeat ||g_r - mean||^2 (heavy tails show here: a few repeats can dominate the trace)
            "repeat_sq_dev": {v: np.diag(stats[name][v]["G"]).round(9).tolist() for v in measured},
            "seconds": time.time() - t0,
        }
        log(f"[gv] {split}/{name:17s} {R} repeats in {time.time() - t0:5.1f}s: trace(cov) "
            + ", ".join(f"{v} {results[name]['trace'][v]:.3e}" for v in measured)
            + f"; predicted ratio {results[name]['predicted_ratio']}")

    # 4. ratios to uniform, bootstrap CIs, noise-to-signal, shift of the mean gradient
    su = stats["uniform"]
    for name in allocs:
        res, st = results[name], stats[name]
        res.update(ratio={}, ratio_ci={}, block_ratio={}, mean_shift_rel={}, nsr={}, nsr_ratio={}, nsr_ratio_ci={})
        for j, v in enumerate(res["variants"]):
            tu, ta = results["uniform"]["trace"][v], res["trace"][v]
            res["ratio"][v] = ta / tu
            res["block_ratio"][v] = {b: res["block_trace"][v][b] / results["uniform"]["block_trace"][v][b]
                                     for b in policy.blocks}
            res["nsr"][v] = float(noise_to_signal(st[v])[0])
            res["nsr_ratio"][v] = res["nsr"][v] / float(noise_to_signal(su[v])[0])
            sig = su[v]["m2"] - tu / R  # unbiased ||E g_u||^2, and ||E g_a - E g_u||^2 below
            same = st[v] is su[v]
            d2 = st[v].get("shift2", 0.0)
            res["mean_shift_rel"][v] = 0.0 if same else (d2 / sig if sig > 0 else float("nan"))
            if same:
                res["ratio_ci"][v] = res["nsr_ratio_ci"][v] = [1.0, 1.0]
                continue
            # paired bootstrap (common random numbers): the same resampled repeats for both
            W = _counts(np.random.default_rng([args.seed, batch_index, j]), R, args.bootstrap)
            with np.errstate(divide="ignore", invalid="ignore"):  # a resample of one repeat has trace 0
                res["ratio_ci"][v] = _ci(trace_cov(st[v]["G"], W) / trace_cov(su[v]["G"], W))
                res["nsr_ratio_ci"][v] = _ci(noise_to_signal(st[v], W) / noise_to_signal(su[v], W))
    # 5. per-prompt decomposition (RLOO, balanced): the measured total as the sum of per-prompt variances (lower
    # noise), and two predictions: the allocator's (common score noise S, v = p(1-p)) and the "n-law" one (each
    # prompt's variance measured under uniform, scaled by RLOO's (n_u - 1)/(n_i - 1)). The n-law is exact for RLOO
    # if the per-rollout noise of a prompt does not depend on n; what separates it from the allocator's
    # prediction is how far the per-prompt noise scale differs from S x p(1-p).
    if "uniform" in grams:
        Gu = grams["uniform"]
        vu = np.array([float(trace_cov(G)) for G in Gu])
        W = _counts(np.random.default_rng([args.seed, batch_index, 99]), R, args.bootstrap)
        tot_u = sum(trace_cov(G, W) for G in Gu)
        for name, Ga in grams.items():
            res = results[name]
            n = np.asarray(res["n"])
            va = np.array(res["per_prompt"]["trace"])
            nlaw = float(np.sum(vu * (UNIFORM_N - 1) / np.maximum(n - 1, 1))) / float(vu.sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                boot = sum(trace_cov(G, W) for G in Ga) / tot_u
            res["per_prompt"].update(ratio=float(va.sum() / vu.sum()), ratio_ci=_ci(boot), nlaw_predicted=nlaw)
        # per-prompt noise scale relative to the model: S_i = Var_i(uniform) (n_u - 1) / v_i, normalised to its mean
        pos = v_or > 0
        S = np.where(pos, vu * (UNIFORM_N - 1) / np.where(pos, v_or, 1.0), np.nan)
        noise_scale = {"p": p_or.tolist(), "var_uniform": vu.tolist(),
                       "S_rel": (S / np.nanmean(S)).tolist() if pos.any() else []}
    else:
        noise_scale = None
    return {
        "noise_scale": noise_scale,
        "split": split, "prompts": N, "budget": B,
        "pool_prior_fitted": [float(x) for x in prior],
        "oracle_pass_rate_mean": float(p_or.mean()),
        "oracle_share_zero": float(np.mean(k_or == 0)), "oracle_share_one": float(np.mean(k_or == args.oracle_samples)),
        "prompt_rows": [{"id": r.get("id"), "prompt": r["prompt"], "answer": r["answer"],
                         "difficulty": r.get("difficulty"), "prompt_id": int(i), "oracle_successes": int(ko),
                         "pool_successes": int(kp), "pool_mean": float(pm)}
                        for r, i, ko, kp, pm in zip(batch, ids, k_or, k_pool, pool.mean(ids))],
        "allocations": results,
        "seconds": time.time() - t_start,
    }


def _ci(samples: np.ndarray, level: float = 0.95):
    r = np.asarray(samples, dtype=np.float64)
    r = r[np.isfinite(r) & (r >= 0)]
    if r.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(r, a)), float(np.quantile(r, 1 - a))]


def run(args) -> Dict:
    import torch

    torch.set_num_threads(args.threads)
    from dynamo_openrlhf.tiny import prepare_tiny_assets

    t_start = time.time()
    assets = prepare_tiny_assets(args.cache_dir, log=lambda m: log(m))
    losses = make_losses(args.variants)
    policy = Policy(str(assets.model_dir))
    policy.files = {"train": assets.train_file, "eval": assets.eval_file}
    scorer = CachedScorer()
    try:
        batches = [run_batch(policy, scorer, losses, split, args, i) for i, split in enumerate(args.splits)]
    finally:
        scorer.close()
    return {
        "setup": {
            "model": str(assets.model_dir), "prompts": args.prompts, "uniform_n": UNIFORM_N,
            "bounds": list(BOUNDS), "repeats": args.repeats, "token_normalizer": TOKEN_NORMALIZER,
            "oracle_samples": args.oracle_samples, "pool_samples": args.pool_samples, "seed": args.seed,
            "threads": args.threads, "bootstrap": args.bootstrap, "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0, "params": policy.dim,
            "blocks": {b: e - s for b, (s, e) in policy.blocks.items()},
            "variants": {v: VARIANT_DESC[v] for v in losses},
            "loss": "DynaMOPolicyLoss(clip 0.2/0.2), token-mean or prompt-balanced, ratio = 1 (old = current log-probs)",
        },
        "batches": batches,
        "score_calls": scorer.calls,
        "seconds": time.time() - t_start,
    }


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _fmt_ci(x: float, ci) -> str:
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table(result: Dict) -> str:
    s = result["setup"]
    head = ["batch", "loss variant", "allocation", "predicted", "measured trace ratio", "measured − predicted",
            "noise/signal", "mean shift"]
    lines = [f"Policy-gradient variance on the tiny-cpu warm start: trace of the gradient covariance over "
             f"{s['repeats']} independent rollout sets per allocation ({s['params']:,} parameters), as a ratio to "
             f"uniform's ({s['uniform_n']} rollouts per prompt, same budget B = {s['uniform_n']} x prompts, bounds "
             f"{s['bounds'][0]}..{s['bounds'][1]}), 95% paired bootstrap CI over repeats (common random numbers).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bt in result["batches"]:
        label = (f"{bt['split']} ({bt['prompts']} prompts; p=0: {bt['oracle_share_zero']:.0%}, "
                 f"p=1: {bt['oracle_share_one']:.0%}, mean p {bt['oracle_pass_rate_mean']:.2f})")
        for v in s["variants"]:
            e = VARIANTS[v][0]
            for name in (f"ours[{e}]", f"oracle[{e}]"):
                res = bt["allocations"].get(name)
                if res is None or v not in res["ratio"]:
                    continue
                pred = res["predicted_ratio"][e]
                shown = name.replace("[", " (").replace("]", ")") + (" = uniform" if res.get("same_as") else "")
                cells = [label, VARIANT_SHORT[v], shown, f"{pred:.3f}",
                         _fmt_ci(res["ratio"][v], res["ratio_ci"][v]), f"{res['ratio'][v] - pred:+.2f}",
                         _fmt_ci(res["nsr_ratio"][v], res["nsr_ratio_ci"][v]), f"{res['mean_shift_rel'][v]:+.2f}"]
                lines.append("| " + " | ".join(cells) + " |")
                label = ""
    for bt in result["batches"]:
        pp = [(name, res) for name, res in bt["allocations"].items() if res.get("per_prompt") and name != "uniform"]
        if not pp:
            continue
        lines += ["", f"Per-prompt decomposition, RLOO with the prompt-balanced loss ({bt['split']} batch): the measured "
                  "variance as the sum of the prompts' own variances (exact for independent prompts, less noisy), next to "
                  "the allocator's prediction (one noise scale S for all prompts, v = p(1−p)) and the n-law prediction "
                  "(each prompt's variance measured under uniform, scaled by (n_u − 1)/(n_i − 1)).", "",
                  "| allocation | allocator predicted | n-law predicted | measured (sum over prompts) | measured − allocator | measured − n-law |",
                  "|---|---|---|---|---|---|"]
        for name, res in pp:
            d, pred = res["per_prompt"], res["predicted_ratio"]["rloo"]
            lines.append(f"| {name} | {pred:.3f} | {d['nlaw_predicted']:.3f} | {_fmt_ci(d['ratio'], d['ratio_ci'])} | "
                         f"{d['ratio'] - pred:+.2f} | {d['ratio'] - d['nlaw_predicted']:+.2f} |")
        ns = bt.get("noise_scale")
        if ns and ns["S_rel"]:
            srel = np.array(ns["S_rel"], dtype=float)
            p_ = np.array(ns["p"])
            ok = np.isfinite(srel)
            q = np.quantile(srel[ok], [0.0, 0.25, 0.5, 0.75, 1.0])
            corr = float(np.corrcoef(p_[ok], srel[ok])[0, 1]) if ok.sum() > 2 else float("nan")
            lines += ["", f"Per-prompt noise scale S_i = Var_i(uniform)·(n_u − 1)/(p_i(1−p_i)) relative to its mean over the "
                      f"{int(ok.sum())} prompts with 0 < p < 1 (the allocator assumes 1 for all): min {q[0]:.2f}, quartiles "
                      f"{q[1]:.2f} / {q[2]:.2f} / {q[3]:.2f}, max {q[4]:.2f}; correlation with p: {corr:+.2f}."]
    lines += ["",
              "predicted = the allocator's own objective for the variant's estimator (rloo: Σ v/(n−1); group_norm: the "
              f"Beta-moment model), with v = p(1−p) of the oracle estimate ({s['oracle_samples']} samples/prompt), as a "
              "ratio to uniform's. balanced = the trainer's prompt-balanced loss (token sums / "
              f"{s['token_normalizer']}); token-mean = OpenRLHF's. noise/signal = trace(cov) / ‖E g‖², relative to "
              "uniform's. mean shift = ‖E g − E g_uniform‖² / ‖E g_uniform‖² (unbiased; 0 = the allocation changed only the "
              "noise)."]
    return "\n".join(lines)


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = list(result["setup"]["variants"])
    nb = len(result["batches"])
    fig, axes = plt.subplots(1, nb, figsize=(max(7.0, 1.6 * len(vs)) * nb, 4.4), squeeze=False)
    w = 0.2
    for ax, bt in zip(axes[0], result["batches"]):
        x = np.arange(len(vs))
        series = [("ours", "predicted", "#aec7e8"), ("ours", "measured", "#1f77b4"),
                  ("oracle", "predicted", "#ffbb78"), ("oracle", "measured", "#ff7f0e")]
        for k, (which, kind, color) in enumerate(series):
            ys, lo_err, hi_err = [], [], []
            for v in vs:
                res = bt["allocations"][f"{which}[{VARIANTS[v][0]}]"]
                if kind == "predicted":
                    ys.append(res["predicted_ratio"][VARIANTS[v][0]]); lo_err.append(0.0); hi_err.append(0.0)
                else:
                    y, ci = res["ratio"][v], res["ratio_ci"][v]
                    ys.append(y); lo_err.append(max(y - ci[0], 0.0)); hi_err.append(max(ci[1] - y, 0.0))
            ax.bar(x + (k - 1.5) * w, ys, w, color=color, label=f"{which}: {kind}",
                   yerr=None if kind == "predicted" else [lo_err, hi_err], capsize=2)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x)
        ax.set_xticklabels([VARIANT_SHORT[v].replace(" (", "\n(").replace(", ", ",\n", 1) for v in vs], fontsize=7)
        ax.set_ylabel("gradient-variance trace / uniform's")
        ax.set_title(f"{bt['split']} prompts (N={bt['prompts']}, B={bt['budget']}, "
                     f"{result['setup']['repeats']} repeats; 95% CI)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="prompts per batch (default 24; --quick 6)")
    p.add_argument("--splits", default="train",
                   help="batches: train (random train prompts), eval (random eval prompts); default train")
    p.add_argument("--repeats", type=int, default=None, help="rollout sets per allocation (default 64; --quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a handful of repeats on a few prompts (tests)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/out; --quick benchmarks/out/quick)")
    p.add_argument("--png", default=None, help="plot path (default docs/gradient_variance.png; --quick OUT/gradient_variance.png)")
    p.add_argument("--oracle_samples", type=int, default=None, help="samples per prompt for the oracle (default 64; --quick 16)")
    p.add_argument("--pool_samples", type=int, default=8, help="earlier rollouts per prompt fed to the pool (default 8)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="loss variants (estimator/weighting pairs, default all): " + "; ".join(
                       f"{k} = {d}" for k, d in VARIANT_DESC.items()))
    p.add_argument("--no_per_prompt", dest="per_prompt", action="store_false",
                   help="skip the per-prompt decomposition of the RLOO balanced variant (N small backward passes per "
                        "repeat and allocation)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 2000; --quick 200)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("DYNAMO_OPENRLHF_CPU_THREADS", "1")),
                   help="torch threads (default $DYNAMO_OPENRLHF_CPU_THREADS or 1)")
    p.add_argument("--from_json", default=None, help="re-render the table and plot from an earlier run's JSON (no sampling)")
    p.add_argument("--cache_dir", default=None, help="tiny preset cache (default $DYNAMO_OPENRLHF_CACHE or ~/.cache/dynamo_openrlhf)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    q = args.quick
    args.prompts = args.prompts or (6 if q else 24)
    args.splits = [x.strip() for x in args.splits.split(",") if x.strip()]
    if not args.splits or any(x not in ("train", "eval") for x in args.splits):
        parser.error(f"--splits: choose from train, eval (got {args.splits})")
    args.repeats = args.repeats or (4 if q else 64)
    args.oracle_samples = args.oracle_samples or (16 if q else 64)
    args.bootstrap = args.bootstrap or (200 if q else 2000)
    args.out = args.out or os.path.join(HERE, "out", "quick" if q else "")
    args.png = args.png or (os.path.join(args.out, "gradient_variance.png") if q
                            else os.path.join(ROOT, "docs", "gradient_variance.png"))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        parser.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    if args.prompts < 1:
        parser.error("--prompts must be >= 1")
    if args.from_json:  # re-render the table and the plot of an earlier run
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = run(args)
    os.makedirs(args.out, exist_ok=True)
    md = table(result)
    with open(os.path.join(args.out, "gradient_variance.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "gradient_variance.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.png)
    print(md)
    print(f"wrote {os.path.join(args.out, 'gradient_variance.md')}, gradient_variance.json, {args.png} "
          f"({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
