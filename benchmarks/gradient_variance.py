#!/usr/bin/env python3
"""Does the rollout allocation lower the variance of the update the trainer actually takes, and which per-prompt
noise model should the allocator use?

    python benchmarks/gradient_variance.py            # full run: 8 batches x 24 train prompts, 48 repeats (~30 min, 1 thread)
    python benchmarks/gradient_variance.py --quick    # 1 batch of 6 prompts, 4 repeats (for the tests)
    python benchmarks/gradient_variance.py --from_json benchmarks/out/gradient_variance.json   # re-render only

Setting: the tiny-cpu preset's warm-started policy (``dynamo_openrlhf.tiny``; ``--tiny_config`` picks another
TinyConfig), ``--batches`` independent batches of ``--prompts`` random train prompts (``--splits``), the preset's
budget B = 8 x prompts with bounds 2..16, RLOO advantages and the trainer's prompt-balanced loss (modulation off).
See docs/noise_model.md for the method and the results.

Per batch:
1. Pass rates: an *oracle* estimate from ``--oracle_samples`` (64) samples per prompt, and the *pool* posterior
   (``PassRatePool``, prior Beta(1,1), updated with ``--pool_samples`` (8) earlier rollouts, then
   ``fit_prior()``). Every sample's per-sample proxies q_j (``_noise_model.PROXIES``) come from one forward.
2. Allocations: uniform (8 each) and, per noise model (``MODELS``), ``oracle[m]`` (oracle p, class means of the
   oracle samples) and ``ours[m]`` (pool posterior, class means of the pool's rollouts shrunk toward the pool's
   class means): the exact minimiser of Σ ŝ_i v_i/(n_i − 1), ``allocate_rollouts(ŝ v, ..., estimator="rloo")``.
   ``ours[pq]`` (ŝ ≡ 1) is today's trainer allocation.
3. ``--repeats`` rollout banks (common random numbers: allocation a takes the first n_i of prompt i's bank).
   Per-sample score vectors s_j = ∇ Σ_t log π(y_t) (one batched forward + backward, ``PerSampleScores``) make
   every allocation's update an exact linear combination Σ_j c_j s_j (the same vector as the trainer's loss
   gradient; tested). Measured = trace of the update's covariance over repeats, ratio to uniform's, paired
   bootstrap CI over repeats; also with each repeat's update clipped at global norm ``--max_norm``.
4. Per-prompt decomposition: each prompt's exact RLOO variance curve V_i(n) (``_noise_model.rloo_prompt_variance``)
   from the class statistics of all its bank samples, the measured noise scale S_i = V_i(8)·7/(p_i(1−p_i)), and
   the curve ratio Σ_i V_i(n_i)/Σ_i V_i(8) per allocation.
Run level: mean over batches with a bootstrap CI over batches, predicted ratios (the model's own Σ ŝ v/(n−1)),
median |measured − predicted|, Spearman of ŝ_i against S_i, and the proxies' cost at vocabulary 151,936
(``bench_entropy_memory``'s setup).

``--priced`` (priced skipping, the ``--dynamo.allocation.oversample 2`` recipe): per batch of N candidates and
B = 4N, allocations uniform4 (4 each), priced (``PassRatePool.allocate(ids, B, 0, 32, "neyman", estimator="rloo",
min_rollouts=2, skip_price=κ)``, pool posterior, no exploration), priced[oracle] (the same on the oracle pass
rates) and noskip (rloo Neyman, lo = 2), on the same common-random-number banks. Realised MSE of each
prompt-balanced update (skipped prompts contribute 0) against the candidates' mean expected update: trCov plus the
squared bias, estimated without bias from uniform4's update restricted to the skipped prompts
(``debiased_sq_mean``); ratios to uniform4 with paired bootstrap CIs, the trainer's predicted ratio
(``priced_prediction``) and the κ that would have priced the measured bias (``implied_kappa``). Writes
OUT/gradient_variance_priced.{md,json} (the JSON after every batch).

Other loss variants (``--variants grpo,dynamo,...``) are measured the old way (``run_batch_legacy``: full
gradients, allocations uniform / ours[e] / oracle[e], one batch per split).

Outputs: a markdown table (printed and written to OUT/gradient_variance.md), OUT/gradient_variance.json with
every number, and a PNG (docs/gradient_variance.png; with --quick OUT/gradient_variance.png).
Deterministic given --seed (torch is reseeded before every sampling call; one thread by default).
"""
from __future__ import annotations

import argparse
import json
import math
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

import _noise_model as nm  # noqa: E402

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


def fitted_pool(ids, successes, trials: int):
    """The pool a batch allocates from: Beta(1,1) updated with ``successes`` of ``trials`` earlier rollouts per
    prompt, prior refitted (kept at Beta(1,1) when the fit is refused). Returns (pool, prior)."""
    from dynamo_openrlhf import PassRatePool

    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update(ids, successes, np.full(len(ids), trials))
    try:
        prior = pool.fit_prior()
    except ValueError as e:  # e.g. every prompt solved: keep Beta(1,1)
        prior = pool.prior
        log(f"[gv] fit_prior refused ({e}); keeping Beta(1,1)")
    return pool, prior


def oracle_pool_of(ids, successes, samples: int):
    """A pool whose posteriors are the oracle estimates: ``successes`` of ``samples`` scaled to ORACLE_TRIALS."""
    from dynamo_openrlhf import PassRatePool

    pool = PassRatePool(prior=(1.0, 1.0))
    scale = ORACLE_TRIALS // samples
    pool.update(ids, successes * scale, np.full(len(ids), samples * scale))
    return pool


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


def run_batch_legacy(policy, scorer, losses, split: str, args, batch_index: int) -> Dict:
    """The full-gradient measurement for the variants other than rloo_balanced (token modulation, token-mean,
    group_norm): one backward per repeat and allocation, allocations uniform / ours[e] / oracle[e]."""
    import torch

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
    pool, prior = fitted_pool(ids, k_pool, args.pool_samples)
    oracle_pool = oracle_pool_of(ids, k_or, args.oracle_samples)
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


# ----------------------------------------------------------------------------------------------
# The multi-batch measurement (RLOO, prompt-balanced loss): per-sample scores, noise models
# ----------------------------------------------------------------------------------------------

# noise model name -> (proxy q, per-prompt class means?); "pq": today's allocator (S ≡ 1)
# noise model name -> (proxy q, per-prompt class means?, shrinkage target: "flat" pool class mean or the "loglog"
# pool-level curve in the class's probability); "pq": today's allocator (S ≡ 1)
MODELS = {"pq": (None, False, "flat"), "nll": ("nll", True, "flat"), "pisq": ("pisq", True, "flat"),
          "ghost": ("ghost", True, "flat"), "ghost_diag": ("ghost_diag", True, "flat"),
          "length": ("length", True, "flat"), "curve": ("ghost_diag", False, "flat"),
          "score": ("score", True, "flat"), "ghost_diag_ll": ("ghost_diag", True, "loglog"),
          "pisq_ll": ("pisq", True, "loglog")}
DEFAULT_MODELS = ("pq", "nll", "pisq", "ghost", "ghost_diag", "length", "curve", "score")  # the recorded run
MODEL_DESC = {"pq": "plain p(1−p) (S ≡ 1; today's allocator)",
              "curve": "pool-level class means of the ghost_diag proxy only (no per-prompt term)",
              **{k: f"per-prompt class means of q = {nm.PROXY_DESC[v[0]]}"
                 + (", shrunk toward the pool's log-log class curve" if v[2] == "loglog" else "")
                 for k, v in MODELS.items() if v[1]}}


def batch_tensors(pad_id: int, encoded, resp, owner):
    """Right-padded (ids, attention mask) (M, L) and the (M, L−1) mask of positions predicting response tokens."""
    import torch

    seqs = [list(encoded[o]) + list(r) for o, r in zip(owner, resp)]
    L = max(len(x) for x in seqs)
    M = len(seqs)
    ids = torch.full((M, L), pad_id, dtype=torch.long)
    attn = torch.zeros((M, L), dtype=torch.long)
    amask = torch.zeros((M, L - 1), dtype=torch.float32)
    for j, (o, x) in enumerate(zip(owner, seqs)):
        ids[j, :len(x)] = torch.tensor(x)
        attn[j, :len(x)] = 1
        amask[j, len(encoded[o]) - 1:len(x) - 1] = 1.0
    return ids, attn, amask


def per_sample(policy, encoded, resp, owner, keep_scores: bool, chunk: int = 32, out=None):
    """Per-sample proxies (dict of (M,) float64 arrays, "score" = ‖s_j‖² included) and, if ``keep_scores``, the
    (M, D) float32 score vectors s_j = ∇ Σ_t log π(y_t) (else None), written into ``out`` if given."""
    import torch

    M = len(resp)
    ps = policy.per_sample_scores
    S = None
    if keep_scores:
        S = torch.empty((M, ps.dim), dtype=torch.float32) if out is None else out[:M]
    scratch = torch.empty((min(chunk, M), ps.dim), dtype=torch.float32) if not keep_scores else None
    prox: Dict[str, list] = {}
    for s in range(0, M, chunk):
        ids, attn, am = batch_tensors(policy.tok.pad_token_id, encoded, resp[s:s + chunk], owner[s:s + chunk])
        buf = S[s:s + len(ids)] if keep_scores else scratch[:len(ids)]
        Sc, logits, hidden = ps(ids, attn, am, out=buf)
        q = nm.sample_proxies(logits, hidden, ids[:, 1:], am)
        q["score"] = squared_norms(Sc)
        for k, v in q.items():
            prox.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in prox.items()}, S


def squared_norms(S, block: int = 1 << 16):
    """(M,) float64 ‖row‖² of an (M, D) float32 tensor, accumulated in float64 over column blocks (no (M, D)
    float64 temporary; float32 accumulation loses ~1e-3 over 666k terms, and class variances are differences)."""
    import torch

    acc = torch.zeros(S.shape[0], dtype=torch.float64)
    for c in range(0, S.shape[1], block):
        acc += S[:, c:c + block].double().pow(2).sum(1)
    return acc


def sample_scored(policy, scorer, encoded, labels, counts, seed: int):
    """``counts[i]`` scored rollouts of prompt i: (response ids, owner (M,) int64, rewards (M,) float64)."""
    texts, resp, owner = policy.sample(encoded, counts, seed)
    return resp, np.asarray(owner, dtype=np.int64), scorer(texts, [labels[o] for o in owner])


def model_scale(model: str, prox, success, owner, p_hat, kappa: float) -> np.ndarray:
    """ŝ per prompt for noise model ``model`` (MODELS) from scored samples with proxies ``prox``."""
    q, per_prompt, prior = MODELS[model]
    if q is None:
        return np.ones(len(p_hat))
    return nm.noise_scale(prox[q], success, owner, p_hat, kappa=kappa, per_prompt=per_prompt, prior=prior)


def rloo_coefficients(n: np.ndarray, starts: np.ndarray, rewards: np.ndarray, M: int, N: int) -> np.ndarray:
    """(M,) coefficients c_j of one repeat's balanced RLOO update g = Σ_j c_j s_j (gradient of the loss, ratio 1):
    prompt i uses the first n_i samples of its bank slot [starts_i, starts_i + n_i); c_j = −A_j / (N n_i L),
    A_j = (n_i r_j − K_i)/(n_i − 1); 0 for unused samples."""
    c = np.zeros(M)
    for i in range(N):
        ni = int(n[i])
        if ni < 2:
            continue
        r = rewards[starts[i]:starts[i] + ni]
        A = (ni * r - r.sum()) / (ni - 1)
        c[starts[i]:starts[i] + ni] = -A / (N * ni * TOKEN_NORMALIZER)
    return c


def run_batch(policy, scorer, split: str, args, batch_index: int) -> Dict:
    import torch

    from dynamo_openrlhf.prompt_ids import prompt_ids
    from dynamo_openrlhf.tiny import read_jsonl

    t_start = time.time()
    rows = read_jsonl(policy.files["eval" if split == "eval" else "train"])
    seed0 = args.seed * 1_000_003 + 100_000 * batch_index
    rng = np.random.default_rng(seed0)
    N = min(args.prompts, len(rows))
    batch = [rows[i] for i in np.sort(rng.choice(len(rows), size=N, replace=False))]
    encoded = [policy.encode(r["prompt"]) for r in batch]
    labels = [str(r["answer"]) for r in batch]
    ids = prompt_ids([r["prompt"] for r in batch], labels)
    B = UNIFORM_N * N
    lo, hi = BOUNDS

    # 1. oracle and pool samples, with their proxies (one forward each; "score" needs the per-sample backward)
    o_resp, o_owner, o_rew = sample_scored(policy, scorer, encoded, labels, [args.oracle_samples] * N, seed0 + 1)
    o_prox, _ = per_sample(policy, encoded, o_resp, o_owner, keep_scores=False)
    k_or = np.bincount(o_owner, weights=o_rew, minlength=N).round().astype(np.int64)
    p_or = k_or / args.oracle_samples
    v_or = p_or * (1 - p_or)
    q_resp, q_owner, q_rew = sample_scored(policy, scorer, encoded, labels, [args.pool_samples] * N, seed0 + 2)
    q_prox, _ = per_sample(policy, encoded, q_resp, q_owner, keep_scores=False)
    k_pool = np.bincount(q_owner, weights=q_rew, minlength=N).round().astype(np.int64)
    pool, prior = fitted_pool(ids, k_pool, args.pool_samples)
    p_pool = np.asarray(pool.mean(ids), dtype=np.float64)
    v_pool = np.asarray(pool.expected_variance(ids), dtype=np.float64)
    log(f"[gv] batch {batch_index} ({split}): {N} prompts, B={B}; oracle {args.oracle_samples}/prompt (mean p "
        f"{p_or.mean():.3f}; p=0: {int((k_or == 0).sum())}, p=1: {int((k_or == args.oracle_samples).sum())}); pool "
        f"{args.pool_samples}/prompt, prior Beta({prior[0]:.3g}, {prior[1]:.3g}) ({time.time() - t_start:.1f}s)")

    # 2. allocations: uniform, and per noise model the oracle-p version (class means of the oracle samples) and
    # the pool version (the pool posterior; class means of the pool's rollouts, shrunk to the pool level)
    scales, vs = {}, {}
    allocs = {"uniform": np.full(N, UNIFORM_N, dtype=np.int64)}
    for m in args.models:
        scales[f"oracle[{m}]"] = model_scale(m, o_prox, o_rew, o_owner, p_or, args.kappa)
        scales[f"ours[{m}]"] = model_scale(m, q_prox, q_rew, q_owner, p_pool, args.kappa)
        vs[f"oracle[{m}]"], vs[f"ours[{m}]"] = v_or, v_pool
        for name in (f"oracle[{m}]", f"ours[{m}]"):
            allocs[name] = nm.scaled_allocation(scales[name], vs[name], B, lo, hi)
    if "pq" in args.models:  # today's trainer path gives the same allocation
        assert np.array_equal(allocs["ours[pq]"], np.asarray(pool.allocate(ids, B, lo, hi, "neyman", estimator="rloo")))
    for name, n in allocs.items():
        check_allocation(name, n, B)

    # 3. repeats with common random numbers: repeat r draws a bank of max_a n_i rollouts per prompt; allocation a
    # takes the first n_i. Per-sample scores make every allocation's update a linear combination of the bank's.
    R = args.repeats
    names = list(allocs)
    nmat = np.stack([allocs[a] for a in names])
    m = nmat.max(0)
    starts = np.cumsum(m) - m
    X = torch.empty((len(names), R, policy.dim), dtype=torch.float32)
    cls_n = np.zeros((N, 2))
    cls_sq = np.zeros((N, 2))
    cls_sum = torch.zeros((N, 2, policy.dim), dtype=torch.float64)
    t_s = t_g = 0.0
    S_buf = torch.empty((int(m.sum()), policy.dim), dtype=torch.float32)  # reused by every repeat
    for r in range(R):
        t0 = time.time()
        resp, owner, rew = sample_scored(policy, scorer, encoded, labels, m, seed0 + 1000 + r)
        t1 = time.time()
        prox, S = per_sample(policy, encoded, resp, owner, keep_scores=True, out=S_buf)
        C = np.stack([rloo_coefficients(n, starts, rew, len(resp), N) for n in nmat])
        X[:, r] = torch.from_numpy(C).float() @ S
        cls = rew.round().astype(np.int64)
        np.add.at(cls_n, (owner, cls), 1.0)
        np.add.at(cls_sq, (owner, cls), prox["score"])
        ind = torch.zeros((2 * N, len(resp)), dtype=torch.float32)
        ind[torch.from_numpy(2 * owner + cls), torch.arange(len(resp))] = 1.0
        cls_sum += (ind @ S).double().reshape(N, 2, -1)
        t_s += t1 - t0
        t_g += time.time() - t1
        if (r + 1) % 8 == 0:
            log(f"[gv] batch {batch_index}: repeat {r + 1}/{R} ({time.time() - t_start:.0f}s)")
    log(f"[gv] batch {batch_index}: {R} banks of {int(m.sum())} rollouts: sampling+scoring {t_s:.0f}s, "
        f"per-sample scores {t_g:.0f}s")

    # 4. per-allocation Gram matrices over repeats: unclipped and with the trainer's global-norm clipping
    W = _counts(np.random.default_rng([args.seed, batch_index, 7]), R, args.bootstrap)
    res: Dict[str, Dict] = {}
    grams = {}
    for a, name in enumerate(names):
        Xa = X[a].double()
        U = (Xa @ Xa.T).numpy()
        norms = np.sqrt(np.maximum(np.diag(U), 0.0))
        f = nm.clip_factors(norms, args.max_norm)
        grams[name] = {"plain": nm.centered_from_uncentered(U), "clipped": nm.centered_from_uncentered(U, f)}
        mean_norm2 = float((Xa.mean(0) ** 2).sum())
        res[name] = {"n": allocs[name].tolist(), "update_norm_median": float(np.median(norms)),
                     "clipped_share": float(np.mean(f < 1.0)), "mean_norm2": mean_norm2}
    del X, S_buf
    for name in names:
        for kind in ("plain", "clipped"):
            G, Gu = grams[name][kind], grams["uniform"][kind]
            res[name][f"trace_{kind}"] = float(trace_cov(G))
            res[name][f"ratio_{kind}"] = float(trace_cov(G) / trace_cov(Gu))
            with np.errstate(divide="ignore", invalid="ignore"):
                res[name][f"ratio_{kind}_ci"] = _ci(trace_cov(G, W) / trace_cov(Gu, W))

    # 5. per-prompt decomposition: each prompt's exact RLOO variance curve from its bank's class statistics
    # (all R x m_i samples), S_i = V_i(n_u) (n_u − 1) / (p_i (1 − p_i)), and the curve-based ratio per allocation
    ns = np.arange(2, hi + 1)
    curves, params = np.zeros((N, len(ns))), []
    for i in range(N):
        d2 = None
        if cls_n[i].min() >= 1:
            mu = cls_sum[i] / torch.from_numpy(cls_n[i]).unsqueeze(1)
            d2 = float(((mu[1] - mu[0]) ** 2).sum())
        ss = (cls_sum[i] ** 2).sum(1).numpy()
        prm = nm.class_curve_params(cls_n[i], cls_sq[i], d2, ss)
        params.append(prm)
        curves[i] = nm.variance_curve(prm, ns)
    del cls_sum
    p_bank = np.array([q["p"] for q in params])
    v_bank = p_bank * (1 - p_bank)
    Vu = curves[:, UNIFORM_N - 2]
    S_meas = np.where(v_bank > 0, Vu * (UNIFORM_N - 1) / np.where(v_bank > 0, v_bank, 1.0), np.nan)
    for name in names:
        n = allocs[name]
        res[name]["curve_ratio"] = float(curves[np.arange(N), n - 2].sum() / Vu.sum())
        res[name]["predicted"] = (1.0 if name == "uniform" else
                                  nm.model_predicted_ratio(scales[name], vs[name], n, UNIFORM_N))
    # the best any allocation can do on these curves (greedy on the exact convex curves)
    best = np.full(N, lo)
    for _ in range(B - lo * N):
        gain = np.where(best < hi, curves[np.arange(N), best - 2] - curves[np.arange(N), np.minimum(best, hi - 1) - 1],
                        -np.inf)
        best[int(np.argmax(gain))] += 1
    log(f"[gv] batch {batch_index}: " + ", ".join(f"{k} {v['ratio_plain']:.2f}" for k, v in res.items()
                                                   if k != "uniform") + f" ({time.time() - t_start:.0f}s)")
    return {
        "split": split, "prompts": N, "budget": B, "pool_prior_fitted": [float(x) for x in prior],
        "oracle_pass_rate_mean": float(p_or.mean()), "oracle_share_zero": float(np.mean(k_or == 0)),
        "oracle_share_one": float(np.mean(k_or == args.oracle_samples)),
        "allocations": res,
        "curve_best_ratio": float(curves[np.arange(N), best - 2].sum() / Vu.sum()),
        "prompt_rows": [{"prompt": r["prompt"], "answer": r["answer"], "difficulty": r.get("difficulty"),
                         "oracle_successes": int(ko), "pool_successes": int(kp), "pool_mean": float(pm),
                         "bank_samples": int(cls_n[i].sum()), "bank_p": float(p_bank[i]),
                         "var_succ": params[i]["var_succ"], "var_fail": params[i]["var_fail"],
                         "mean_gap2": params[i]["mean_gap2"], "S_measured": float(S_meas[i]),
                         "scale_oracle": {mm: float(scales[f"oracle[{mm}]"][i]) for mm in args.models},
                         "scale_ours": {mm: float(scales[f"ours[{mm}]"][i]) for mm in args.models}}
                        for i, (r, ko, kp, pm) in enumerate(zip(batch, k_or, k_pool, p_pool))],
        "sample_spearman_vs_score": {k: nm.spearman(o_prox[k], o_prox["score"]) for k in o_prox if k != "score"},
        "seconds": time.time() - t_start,
    }


# ----------------------------------------------------------------------------------------------
# Priced skipping (--priced): realised mean squared error against the trainer's prediction
# ----------------------------------------------------------------------------------------------

PRICED_UNIFORM_N = 4    # the oversample-2 recipe: B = 8 x prompts spread over 2 x prompts candidates
PRICED_HI = 32          # hi = 4 x n_samples_per_prompt (8) of the recipe
PRICED_MIN = 2          # min_rollouts of the recipe (RLOO needs 2)


def priced_allocations(pool, oracle_pool, ids, budget: int, skip_price: float) -> Dict[str, np.ndarray]:
    """name -> int64 allocation of ``budget`` over the N candidates (the trainer's oversample-2 recipe):
    "uniform4" (budget/N each), "priced" (``PassRatePool.allocate(ids, budget, 0, 32, "neyman", estimator="rloo",
    min_rollouts=2, skip_price=κ)`` on the pool posterior, no exploration), "priced[oracle]" (the same call on
    the oracle pool) and "noskip" (the rloo Neyman allocation with lo = 2: the same budget, nothing skipped)."""
    N = len(ids)
    if budget % N:
        raise ValueError(f"priced_allocations: budget {budget} is not a multiple of the {N} candidates")
    kw = dict(estimator="rloo", min_rollouts=PRICED_MIN, skip_price=float(skip_price))
    return {"uniform4": np.full(N, budget // N, dtype=np.int64),
            "priced": np.asarray(pool.allocate(ids, budget, 0, PRICED_HI, "neyman", **kw), dtype=np.int64),
            "priced[oracle]": np.asarray(oracle_pool.allocate(ids, budget, 0, PRICED_HI, "neyman", **kw),
                                         dtype=np.int64),
            "noskip": np.asarray(pool.allocate(ids, budget, PRICED_MIN, PRICED_HI, "neyman", estimator="rloo"),
                                 dtype=np.int64)}


def check_priced_allocation(name: str, n: np.ndarray, budget: int) -> None:
    """Budget spent exactly, every count in {0} ∪ [PRICED_MIN, PRICED_HI] (raises AssertionError)."""
    n = np.asarray(n)
    assert int(n.sum()) == budget, f"{name}: {int(n.sum())} rollouts, budget {budget}"
    bad = n[(n != 0) & ((n < PRICED_MIN) | (n > PRICED_HI))]
    assert bad.size == 0, f"{name}: counts outside {{0}} ∪ [{PRICED_MIN}, {PRICED_HI}]: {n.tolist()}"


def priced_prediction(pool, ids, n: np.ndarray, skip_price: float) -> Dict[str, float]:
    """The trainer's ``dynamo/pred_var_ratio`` for counts ``n`` (``predicted_variance_ratio(v, n, "rloo",
    skip_costs=pool.skip_costs(ids, κ))``, uniform over the same candidates as the base) and its two parts:
    variance Σ_served v/(n−1) and priced bias Σ_skipped κ E[p²(1−p)²], each over uniform's Σ v/(B/N − 1)."""
    from dynamo_openrlhf.allocation import predicted_variance_ratio

    v = np.asarray(pool.expected_variance(ids), dtype=np.float64)
    sc = np.asarray(pool.skip_costs(ids, float(skip_price)), dtype=np.float64)
    n = np.asarray(n)
    base = float(v.sum()) / (n.sum() / len(n) - 1.0)
    served = n > 0
    var = float(np.sum(v[served] / (n[served] - 1.0))) / base if base > 0 else 1.0
    bias = float(np.sum(sc[~served])) / base if base > 0 else 0.0
    return {"ratio": predicted_variance_ratio(v, n, "rloo", skip_costs=sc), "variance": var, "bias": bias}


def debiased_sq_mean(U: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Unbiased ‖E x‖² from R i.i.d. vectors x_r with UNcentred Gram matrix U (R, R): ‖mean‖² − tr Cov/R.

    ``weights``: (S, R) bootstrap counts (rows sum to R) -> S values; None -> the plain estimate. Can be < 0
    (it is unbiased, not truncated)."""
    U = np.asarray(U, dtype=np.float64)
    R = U.shape[0]
    W = np.ones((1, R)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean2 = np.einsum("sr,rq,sq->s", W, U, W) / R ** 2
    G = nm.centered_from_uncentered(U)
    out = mean2 - trace_cov(G, W) / R
    return out[0] if weights is None else out


def implied_kappa(bias2: float, noise_scale: float, moment_sum: float) -> float:
    """The κ that would price the skipped prompts' measured squared bias exactly:
    N²‖bias‖² = κ·S·Σ_skipped E[p²(1−p)²] ⇒ κ = ``bias2`` / (``noise_scale`` · ``moment_sum``), with ``bias2`` =
    N²‖E[G_skipped]‖² and ``noise_scale`` S = N²·trCov(G_uniform)·(n_u − 1)/Σ_i p_i(1−p_i) in the same units
    (per-rollout score noise). nan when nothing is skipped or the moment sum is 0."""
    if not (noise_scale > 0) or not (moment_sum > 0):
        return float("nan")
    return float(bias2 / (noise_scale * moment_sum))


def _ci_signed(samples, level: float = 0.95):
    """Percentile interval of finite samples, negative values kept (for unbiased estimates that can be < 0)."""
    r = np.asarray(samples, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(r, a)), float(np.quantile(r, 1 - a))]


def run_batch_priced(policy, scorer, split: str, args, batch_index: int) -> Dict:
    """One batch of the --priced measurement (see docs/noise_model.md, "Priced skipping: predicted vs realised
    MSE"). N = ``args.prompts`` candidates, B = 4N. Each repeat draws a bank of max_a n_i rollouts per prompt
    (common random numbers); per allocation a the update G_a = Σ_j c_j s_j (skipped prompts contribute 0,
    every prompt weighted 1/N) and, for each allocation that skips, uniform4's update restricted to its skipped
    prompts, U_a, whose mean is −bias_a exactly (RLOO's expected update of a prompt does not depend on n).
    MSE_a = trCov(G_a) + ‖E U_a‖² (debiased), ratio to uniform4's trCov."""
    import torch

    from dynamo_openrlhf.prompt_ids import prompt_ids
    from dynamo_openrlhf.tiny import read_jsonl

    t_start = time.time()
    rows = read_jsonl(policy.files["eval" if split == "eval" else "train"])
    seed0 = args.seed * 1_000_003 + 100_000 * batch_index
    rng = np.random.default_rng(seed0)
    N = min(args.prompts, len(rows))
    batch = [rows[i] for i in np.sort(rng.choice(len(rows), size=N, replace=False))]
    encoded = [policy.encode(r["prompt"]) for r in batch]
    labels = [str(r["answer"]) for r in batch]
    ids = prompt_ids([r["prompt"] for r in batch], labels)
    nu = PRICED_UNIFORM_N
    B = nu * N
    kappa = args.skip_price

    # 1. pass rates: oracle (large sample, held as near-certain evidence) and the pool posterior (as run_batch)
    _, o_owner, o_rew = sample_scored(policy, scorer, encoded, labels, [args.oracle_samples] * N, seed0 + 1)
    k_or = np.bincount(o_owner, weights=o_rew, minlength=N).round().astype(np.int64)
    _, q_owner, q_rew = sample_scored(policy, scorer, encoded, labels, [args.pool_samples] * N, seed0 + 2)
    k_pool = np.bincount(q_owner, weights=q_rew, minlength=N).round().astype(np.int64)
    pool, prior = fitted_pool(ids, k_pool, args.pool_samples)
    oracle_pool = oracle_pool_of(ids, k_or, args.oracle_samples)
    pools = {"uniform4": pool, "priced": pool, "priced[oracle]": oracle_pool, "noskip": pool}

    # 2. allocations and the trainer's predictions
    allocs = priced_allocations(pool, oracle_pool, ids, B, kappa)
    for name, n in allocs.items():
        check_priced_allocation(name, n, B)
    names = list(allocs)
    skippers = [a for a in names if (allocs[a] == 0).any()]
    log(f"[gv] batch {batch_index} ({split}): {N} candidates, B={B}; oracle mean p {k_or.mean() / args.oracle_samples:.3f} "
        f"(p=0: {int((k_or == 0).sum())}, p=1: {int((k_or == args.oracle_samples).sum())}); prior "
        f"Beta({prior[0]:.3g}, {prior[1]:.3g}); skipped: "
        + ", ".join(f"{a} {int((allocs[a] == 0).sum())}" for a in names) + f" ({time.time() - t_start:.1f}s)")

    # 3. repeats: rows of C are the allocations' updates, then uniform4 restricted to each skipper's skipped set
    R = args.repeats
    nmat = np.stack([allocs[a] for a in names]
                    + [np.where(allocs[a] == 0, nu, 0) for a in skippers]).astype(np.int64)
    m = nmat.max(0)
    starts = np.cumsum(m) - m
    X = torch.empty((len(nmat), R, policy.dim), dtype=torch.float32)
    S_buf = torch.empty((int(m.sum()), policy.dim), dtype=torch.float32)
    k_bank = np.zeros(N)
    for r in range(R):
        resp, owner, rew = sample_scored(policy, scorer, encoded, labels, m, seed0 + 1000 + r)
        _, S = per_sample(policy, encoded, resp, owner, keep_scores=True, out=S_buf)
        C = np.stack([rloo_coefficients(n, starts, rew, len(resp), N) for n in nmat])
        X[:, r] = torch.from_numpy(C).float() @ S
        k_bank += np.bincount(owner, weights=rew, minlength=N)
        if (r + 1) % 8 == 0:
            log(f"[gv] batch {batch_index}: repeat {r + 1}/{R} ({time.time() - t_start:.0f}s)")
    del S_buf

    # 4. Gram matrices over repeats; MSE = trCov + debiased squared bias; paired bootstrap over repeats
    U = [(X[k].double() @ X[k].double().T).numpy() for k in range(len(nmat))]
    Ud = {a: None for a in names}
    for a in names:  # paired cross-check of the bias: ‖E G_a − E G_uniform4‖² from the per-repeat differences
        if a in skippers:
            D = (X[names.index(a)] - X[0]).double()
            Ud[a] = (D @ D.T).numpy()
    del X
    W = _counts(np.random.default_rng([args.seed, batch_index, 11]), R, args.bootstrap)
    Gu = nm.centered_from_uncentered(U[0])
    tr_u, tr_u_w = float(trace_cov(Gu)), trace_cov(Gu, W)
    g2 = float(debiased_sq_mean(U[0]))  # ‖g‖²: uniform4 is unbiased for the target
    # per-rollout noise scale S in N²-units: trCov(uniform4) = S Σ v_i / (N² (n_u − 1)), v from oracle + bank p
    p_all = (k_or + k_bank) / (args.oracle_samples + R * m)
    v_all = p_all * (1 - p_all)
    S_noise = tr_u * N ** 2 * (nu - 1) / float(v_all.sum()) if v_all.sum() > 0 else float("nan")
    res: Dict[str, Dict] = {}
    for k, a in enumerate(names):
        n = allocs[a]
        G = nm.centered_from_uncentered(U[k])
        tr, tr_w = float(trace_cov(G)), trace_cov(G, W)
        skipped = n == 0
        if a in skippers:
            Ub = U[len(names) + skippers.index(a)]
            b2, b2_w = float(debiased_sq_mean(Ub)), debiased_sq_mean(Ub, W)
            b2_paired = float(debiased_sq_mean(Ud[a]))
        else:
            b2, b2_w, b2_paired = 0.0, np.zeros(len(W)), 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            mse_w = (tr_w + b2_w) / tr_u_w
            var_w = tr_w / tr_u_w
            bias_w = b2_w / tr_u_w
        pred = priced_prediction(pools[a], ids, n, kappa)
        moment = np.asarray(pool.skip_costs(ids, 1.0), dtype=np.float64)  # the pool's E[p²(1−p)²]
        p_or = k_or / args.oracle_samples
        res[a] = {
            "n": n.tolist(), "skipped": int(skipped.sum()), "served_max": int(n.max()),
            "trace": tr, "bias2": b2, "bias2_paired": b2_paired, "mse": tr + b2,
            "mse_ratio": (tr + b2) / tr_u, "mse_ratio_ci": _ci(mse_w),
            "var_ratio": tr / tr_u, "var_ratio_ci": _ci(var_w),
            "bias_ratio": b2 / tr_u, "bias_ratio_ci": _ci_signed(bias_w),
            "predicted": pred["ratio"], "predicted_variance": pred["variance"], "predicted_bias": pred["bias"],
            "moment_pool_skipped": float(moment[skipped].sum()),
            "moment_oracle_skipped": float(np.sum((p_or * (1 - p_or))[skipped] ** 2)),
            "skipped_oracle_p": p_or[skipped].tolist(),
        }
        res[a]["kappa_implied"] = implied_kappa(N ** 2 * b2, S_noise, res[a]["moment_pool_skipped"])
        res[a]["kappa_implied_oracle_p"] = implied_kappa(N ** 2 * b2, S_noise, res[a]["moment_oracle_skipped"])
    log(f"[gv] batch {batch_index}: " + ", ".join(
        f"{a} MSE {r['mse_ratio']:.2f} (var {r['var_ratio']:.2f} + bias {r['bias_ratio']:.3f}; predicted "
        f"{r['predicted']:.2f}; skipped {r['skipped']})" for a, r in res.items() if a != "uniform4")
        + f" ({time.time() - t_start:.0f}s)")
    return {
        "split": split, "prompts": N, "budget": B, "pool_prior_fitted": [float(x) for x in prior],
        "oracle_pass_rate_mean": float(k_or.mean() / args.oracle_samples),
        "oracle_share_zero": float(np.mean(k_or == 0)), "oracle_share_one": float(np.mean(k_or == args.oracle_samples)),
        "uniform_trace": tr_u, "target_norm2": g2, "noise_scale": S_noise,
        "allocations": res,
        "prompt_rows": [{"prompt": r["prompt"], "answer": r["answer"], "difficulty": r.get("difficulty"),
                         "oracle_successes": int(ko), "pool_successes": int(kp), "bank_p": float(pb)}
                        for r, ko, kp, pb in zip(batch, k_or, k_pool, k_bank / (R * m))],
        "seconds": time.time() - t_start,
    }


def aggregate_priced(batches: List[Dict], resamples: int, seed: int) -> Dict:
    """Per allocation: per-batch values, mean over batches with a bootstrap CI over batches, and pooled ratios
    (Σ_b MSE_a / Σ_b trCov_uniform4, and κ pooled as Σ N²‖bias‖² / Σ S·Σ E[p²(1−p)²])."""
    out: Dict[str, Dict] = {}
    tu = sum(b["uniform_trace"] for b in batches)
    for a in batches[0]["allocations"]:
        rows = [b["allocations"][a] for b in batches]
        d: Dict[str, object] = {}
        for key in ("mse_ratio", "var_ratio", "bias_ratio", "predicted", "predicted_variance", "predicted_bias",
                    "skipped"):
            vals = [float(r[key]) for r in rows]
            mean, ci = nm.mean_ci(vals, resamples, seed)
            d[key] = {"per_batch": vals, "mean": mean, "ci": ci}
        d["pooled_mse_ratio"] = sum(r["mse"] for r in rows) / tu
        d["pooled_var_ratio"] = sum(r["trace"] for r in rows) / tu
        d["pooled_bias_ratio"] = sum(r["bias2"] for r in rows) / tu
        num = sum(b["prompts"] ** 2 * b["allocations"][a]["bias2"] for b in batches)
        for src in ("pool", "oracle"):
            den = sum(b["noise_scale"] * b["allocations"][a][f"moment_{src}_skipped"] for b in batches
                      if np.isfinite(b["noise_scale"]))
            d[f"kappa_pooled_{src}"] = float(num / den) if den > 0 else float("nan")
        out[a] = d
    return out


def table_priced(result: Dict) -> str:
    s = result["setup"]
    sm = result["summary"]
    K = len(result["batches"])
    lines = [f"Priced skipping on the {s['tiny_config'] or 'tiny-cpu'} warm start ({s['params']:,} parameters): {K} "
             f"batches of N = {s['prompts']} candidates, B = {PRICED_UNIFORM_N}N, {s['repeats']} paired repeats each. "
             f"MSE = trCov(G) + ‖E G − g‖² of the prompt-balanced RLOO update G (mean over all N candidates, skipped "
             f"ones 0) against g = the candidates' mean expected update, over uniform4's (its variance; it is "
             f"unbiased). priced = PassRatePool.allocate(ids, B, 0, {PRICED_HI}, 'neyman', estimator='rloo', "
             f"min_rollouts={PRICED_MIN}, skip_price={s['skip_price']}) on the pool posterior "
             f"({s['pool_samples']} earlier rollouts/prompt, fitted prior), no exploration; priced (oracle) the same on "
             f"the oracle pass rates ({s['oracle_samples']} samples/prompt); noskip = rloo Neyman with lo = "
             f"{PRICED_MIN}. predicted = the trainer's dynamo/pred_var_ratio. Mean over batches [95% bootstrap CI "
             f"over batches]; pooled = Σ over batches / Σ uniform4.", "",
             "| allocation | skipped (mean) | MSE ratio [CI] | variance part | bias part | predicted (var + bias) "
             "| pooled MSE ratio | implied κ (pool E[p²(1−p)²]) | implied κ (oracle p) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, d in sm.items():
        if a == "uniform4":
            continue
        lines.append(
            f"| {_alloc_label(a)} | {d['skipped']['mean']:.1f} | {_fmt_ci(d['mse_ratio']['mean'], d['mse_ratio']['ci'])} "
            f"| {d['var_ratio']['mean']:.2f} | {d['bias_ratio']['mean']:.3f} | {d['predicted']['mean']:.2f} "
            f"({d['predicted_variance']['mean']:.2f} + {d['predicted_bias']['mean']:.3f}) | {d['pooled_mse_ratio']:.2f} "
            f"| {d['kappa_pooled_pool']:.2g} | {d['kappa_pooled_oracle']:.2g} |")
    lines += ["", "Per batch (MSE ratio [95% paired bootstrap CI over repeats] = variance + bias [CI]; predicted; "
              "skipped):", "",
              "| batch | p=0 / p=1 share | ‖g‖² / trCov(uniform4) | " + " | ".join(
                  _alloc_label(a) for a in sm if a != "uniform4") + " |", "|---|---|---|" + "---|" * (len(sm) - 1)]
    for b, bt in enumerate(result["batches"]):
        cells = [f"{_fmt_ci(r['mse_ratio'], r['mse_ratio_ci'])} = {r['var_ratio']:.2f} + {r['bias_ratio']:.3f} "
                 f"[{r['bias_ratio_ci'][0]:.3f}, {r['bias_ratio_ci'][1]:.3f}]; {r['predicted']:.2f}; {r['skipped']}"
                 for a, r in bt["allocations"].items() if a != "uniform4"]
        lines.append(f"| {b} | {bt['oracle_share_zero']:.0%} / {bt['oracle_share_one']:.0%} | "
                     f"{bt['target_norm2'] / bt['uniform_trace']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_priced(args) -> Dict:
    """The --priced measurement over ``args.batches`` batches; writes OUT/gradient_variance_priced.json after each
    batch (partial results survive an interrupted run)."""
    import torch

    torch.set_num_threads(args.threads)
    from dynamo_openrlhf.tiny import prepare_tiny_assets

    t_start = time.time()
    assets = prepare_tiny_assets(args.cache_dir, config=args.tiny_config, log=lambda m: log(m))
    policy = Policy(str(assets.model_dir))
    policy.files = {"train": assets.train_file, "eval": assets.eval_file}
    policy.per_sample_scores = nm.PerSampleScores(policy.model)
    scorer = CachedScorer()
    setup = {"mode": "priced", "model": str(assets.model_dir), "tiny_config": args.tiny_config_text,
             "prompts": args.prompts, "batches": args.batches, "uniform_n": PRICED_UNIFORM_N, "hi": PRICED_HI,
             "min_rollouts": PRICED_MIN, "skip_price": args.skip_price, "repeats": args.repeats,
             "token_normalizer": TOKEN_NORMALIZER, "oracle_samples": args.oracle_samples,
             "pool_samples": args.pool_samples, "seed": args.seed, "threads": args.threads,
             "bootstrap": args.bootstrap, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0,
             "params": policy.dim, "splits": args.splits}
    batches: List[Dict] = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gradient_variance_priced.json")
    try:
        for b in range(args.batches):
            batches.append(run_batch_priced(policy, scorer, args.splits[b % len(args.splits)], args, b))
            partial = {"setup": setup, "batches": batches,
                       "summary": aggregate_priced(batches, args.bootstrap, args.seed),
                       "score_calls": scorer.calls, "seconds": time.time() - t_start, "partial": True}
            with open(path, "w") as f:
                json.dump(partial, f, indent=1)
    finally:
        scorer.close()
    return {"setup": setup, "batches": batches, "summary": aggregate_priced(batches, args.bootstrap, args.seed),
            "score_calls": scorer.calls, "seconds": time.time() - t_start}


def aggregate(batches: List[Dict], models: Sequence[str], oracle_samples: int, resamples: int, seed: int) -> Dict:
    """Run-level numbers: per allocation the per-batch ratios, their mean with a bootstrap CI over batches, the
    median |measured − predicted|; per noise model the Spearman correlation of ŝ_i (oracle version) with the
    measured S_i over prompts with 0 < p < 1 (pooled over batches), with a bootstrap CI over prompts."""
    out: Dict[str, Dict] = {"allocations": {}, "spearman": {}}
    for name in batches[0]["allocations"]:
        rows = [b["allocations"][name] for b in batches]
        d = {}
        for key in ("ratio_plain", "ratio_clipped", "curve_ratio", "predicted"):
            vals = [r[key] for r in rows]
            mean, ci = nm.mean_ci(vals, resamples, seed)
            d[key] = {"per_batch": vals, "mean": mean, "ci": ci}
        d["median_abs_error"] = float(np.median([abs(r["ratio_plain"] - r["predicted"]) for r in rows]))
        d["median_abs_error_curve"] = float(np.median([abs(r["curve_ratio"] - r["predicted"]) for r in rows]))
        d["clipped_share"] = float(np.mean([r["clipped_share"] for r in rows]))
        out["allocations"][name] = d
    prompts = [p for b in batches for p in b["prompt_rows"]]
    ok = [p for p in prompts if 0 < p["oracle_successes"] < oracle_samples and 0 < p["bank_p"] < 1]
    S = np.array([p["S_measured"] for p in ok])
    for mm in models:
        if mm == "pq":
            continue
        s_hat = np.array([p["scale_oracle"][mm] for p in ok])
        out["spearman"][mm] = {"rho": nm.spearman(s_hat, S), "ci": nm.spearman_ci(s_hat, S, resamples, seed),
                               "prompts": len(ok)}
    best = [b["curve_best_ratio"] for b in batches]
    out["curve_best"] = dict(zip(("mean", "ci"), nm.mean_ci(best, resamples, seed)))
    return out


def proxy_cost(vocab: int, hidden: int, response: int, prompt: int, batch: int, repeats: int) -> Dict:
    """Seconds of each proxy computed from a training forward's outputs vs the actor's training forward +
    backward (OpenRLHF Actor + PolicyLoss + backward) on ``bench_entropy_memory``'s real-vocabulary setup."""
    import statistics

    import torch

    import bench_entropy_memory as bem

    actor, x = bem.build(vocab, hidden, batch, prompt, response)
    steps = bem.make_steps(actor, x, bem.DEFAULT_CHUNK_BYTES)
    captured = {}
    head = actor.model.get_output_embeddings()
    h = head.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", inp[0].detach()))
    A = x["am"].shape[1]
    with torch.no_grad():
        lp, out = actor(x["seq"], x["am"], attention_mask=x["att"], return_output=True)
    h.remove()
    logits = out["logits"][:, -A - 1:-1]
    hid = captured["h"][:, -A - 1:-1]
    tgt = x["seq"][:, -A:]
    am = x["am"].float()

    def logprob_based():  # nll, pisq, length: from the action log-probs the training forward returns anyway
        pi = lp.exp()
        tok = am.sum(1)
        return (-(lp * am).sum(1) / tok, ((1 - pi) ** 2 * am).sum(1), tok)

    from dynamo_openrlhf.entropy import chunk_tokens_for, response_entropy

    ct = chunk_tokens_for(vocab)
    fns = {"train step (forward + loss + backward)": lambda: (actor.zero_grad(set_to_none=True), steps["grpo"]()),
           "entropy pass the DynaMO trainer runs (response_entropy)": lambda: response_entropy(
               out["logits"], A, attention_mask=x["att"]),
           "entropy pass + ghost_diag fused (one softmax per chunk)": lambda: nm.entropy_and_ghost_diag(
               logits, hid, tgt, am, chunk_tokens=ct),
           "nll + pisq + length (from the action log-probs)": logprob_based,
           "ghost_diag": lambda: nm.sample_proxies(logits, hid, tgt, am, ghost=False),
           "ghost (exact)": lambda: nm.sample_proxies(logits, hid, tgt, am, ghost=True, diag=False)}
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["train step (forward + loss + backward)"]
    # the log-prob proxies, the subtraction only: nll etc. minus nothing; ghost_diag includes the same cheap terms
    return {"config": {"vocab": vocab, "hidden": hidden, "batch": batch, "prompt": prompt, "response": response,
                       "repeats": repeats, "response_tokens": int(x["am"].sum())},
            "seconds": med, "relative": {k: v / base for k, v in med.items()}}


def run(args) -> Dict:
    import torch

    torch.set_num_threads(args.threads)
    from dynamo_openrlhf.tiny import prepare_tiny_assets

    t_start = time.time()
    assets = prepare_tiny_assets(args.cache_dir, config=args.tiny_config, log=lambda m: log(m))
    policy = Policy(str(assets.model_dir))
    policy.files = {"train": assets.train_file, "eval": assets.eval_file}
    policy.per_sample_scores = nm.PerSampleScores(policy.model)
    scorer = CachedScorer()
    legacy = [v for v in args.variants if v != "rloo_balanced"]
    try:
        batches = [run_batch(policy, scorer, args.splits[b % len(args.splits)], args, b) for b in range(args.batches)]
        legacy_batches = []
        if legacy:
            losses = make_losses(legacy)
            legacy_batches = [run_batch_legacy(policy, scorer, losses, split, args, i)
                              for i, split in enumerate(args.splits)]
    finally:
        scorer.close()
    setup = {
        "model": str(assets.model_dir), "tiny_config": args.tiny_config_text, "prompts": args.prompts,
        "batches": args.batches, "uniform_n": UNIFORM_N, "bounds": list(BOUNDS), "repeats": args.repeats,
        "token_normalizer": TOKEN_NORMALIZER, "oracle_samples": args.oracle_samples,
        "pool_samples": args.pool_samples, "seed": args.seed, "threads": args.threads, "bootstrap": args.bootstrap,
        "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "params": policy.dim, "models": list(args.models),
        "kappa": args.kappa, "max_norm": args.max_norm, "splits": args.splits,
        "loss": "RLOO advantages, prompt-balanced loss (DynaMOPolicyLoss at ratio 1 = Σ_j c_j s_j), modulation off",
    }
    result = {"setup": setup, "batches": batches,
              "summary": aggregate(batches, args.models, args.oracle_samples, args.bootstrap, args.seed)}
    if args.cost_vocab:
        t0 = time.time()
        result["proxy_cost"] = proxy_cost(args.cost_vocab, 64, args.cost_response, 64, 2, 3)
        log(f"[gv] proxy cost at vocab {args.cost_vocab:,} in {time.time() - t0:.0f}s")
    if legacy_batches:
        result["legacy"] = {"setup": {**setup, "variants": {v: VARIANT_DESC[v] for v in legacy},
                                      "blocks": {b: e - s for b, (s, e) in policy.blocks.items()},
                                      "loss": "DynaMOPolicyLoss(clip 0.2/0.2), ratio = 1"},
                            "batches": legacy_batches}
    result["score_calls"] = scorer.calls
    result["seconds"] = time.time() - t_start
    return result


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _fmt_ci(x: float, ci) -> str:
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def legacy_table(result: Dict) -> str:
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


def legacy_plot(result: Dict, path: str) -> None:
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


def _alloc_label(name: str) -> str:
    return name.replace("[", " (").replace("]", ")")


def table(result: Dict) -> str:
    s, sm = result["setup"], result["summary"]
    K = len(result["batches"])
    lines = [f"Gradient variance of the RLOO prompt-balanced update on the tiny-cpu warm start ({s['params']:,} "
             f"parameters): {K} independent batches of {s['prompts']} {'/'.join(s['splits'])} prompts, budget "
             f"B = {s['uniform_n']} x prompts, bounds {s['bounds'][0]}..{s['bounds'][1]}; per batch the trace of the "
             f"update's covariance over {s['repeats']} paired rollout sets, as a ratio to uniform's. Mean over batches "
             f"with a 95% bootstrap CI over batches. predicted = the allocator's own model (Σ ŝ v/(n−1)); "
             f"clipped = each repeat's update clipped at global norm {s['max_norm']} first; curve = Σ_i V_i(n_i) / "
             f"Σ_i V_i({s['uniform_n']}) from each prompt's exact variance curve (all its bank samples).", "",
             "| allocation | measured, mean [CI] | predicted, mean | median abs(measured − predicted) | clipped, mean [CI] "
             "| curve, mean [CI] | measured per batch |", "|---|---|---|---|---|---|---|"]
    for name, d in sm["allocations"].items():
        if name == "uniform":
            continue
        per = " ".join(f"{x:.2f}" for x in d["ratio_plain"]["per_batch"])
        lines.append(f"| {_alloc_label(name)} | {_fmt_ci(d['ratio_plain']['mean'], d['ratio_plain']['ci'])} | "
                     f"{d['predicted']['mean']:.2f} | {d['median_abs_error']:.2f} | "
                     f"{_fmt_ci(d['ratio_clipped']['mean'], d['ratio_clipped']['ci'])} | "
                     f"{_fmt_ci(d['curve_ratio']['mean'], d['curve_ratio']['ci'])} | {per} |")
    cb = sm["curve_best"]
    clip = sm["allocations"]["uniform"]["clipped_share"]
    lines += ["", f"Best possible allocation on the measured curves (greedy on V_i(n)): curve ratio "
              f"{_fmt_ci(cb['mean'], cb['ci'])}. Share of uniform's repeats whose update norm exceeds max_norm "
              f"{s['max_norm']}: {clip:.0%}; median update norm (uniform) "
              f"{np.median([b['allocations']['uniform']['update_norm_median'] for b in result['batches']]):.3g}.",
              "", "Per batch (measured ratio [95% paired bootstrap CI over repeats], predicted):", "",
              "| batch | p=0 / p=1 share | " + " | ".join(_alloc_label(n) for n in sm["allocations"] if n != "uniform")
              + " |", "|---|---|" + "---|" * (len(sm["allocations"]) - 1)]
    for b, bt in enumerate(result["batches"]):
        cells = [f"{_fmt_ci(r['ratio_plain'], r['ratio_plain_ci'])}, {r['predicted']:.2f}"
                 for n, r in bt["allocations"].items() if n != "uniform"]
        lines.append(f"| {b} | {bt['oracle_share_zero']:.0%} / {bt['oracle_share_one']:.0%} | " + " | ".join(cells)
                     + " |")
    if sm["spearman"]:
        n_ok = next(iter(sm["spearman"].values()))["prompts"]
        lines += ["", f"Noise models: Spearman correlation of ŝ_i (oracle pass rate, class means of the oracle samples) "
                  f"with the measured S_i = V_i({s['uniform_n']}) ({s['uniform_n']} − 1)/(p_i(1 − p_i)), over the {n_ok} "
                  "prompts with 0 < p < 1 pooled over batches (95% bootstrap CI over prompts); per-sample Spearman "
                  "of the proxy with the true ‖s_j‖² (oracle samples, median over batches).", "",
                  "| model | ŝ_i vs S_i | per-sample q_j vs ‖s_j‖² |", "|---|---|---|"]
        for mm, d in sm["spearman"].items():
            q = MODELS[mm][0]
            ps = [bt["sample_spearman_vs_score"].get(q, float("nan")) for bt in result["batches"]] if q != "score" else [1.0]
            lines.append(f"| {mm}: {MODEL_DESC[mm]} | {d['rho']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] | "
                         f"{np.nanmedian(ps):+.2f} |")
    if "proxy_cost" in result:
        pc = result["proxy_cost"]
        c = pc["config"]
        lines += ["", f"Proxy cost at vocab {c['vocab']:,} (bench_entropy_memory's setup: hidden {c['hidden']}, one "
                  f"layer, {c['batch']} x ({c['prompt']} + {c['response']}) tokens; median of {c['repeats']}):", "",
                  "| computation | seconds | / training forward+backward |", "|---|---|---|"]
        for k, v in pc["seconds"].items():
            lines.append(f"| {k} | {v:.3f} | {pc['relative'][k]:.3f} |")
    if "legacy" in result:
        lines += ["", legacy_table(result["legacy"])]
    return "\n".join(lines)


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm = result["summary"]["allocations"]
    names = [n for n in sm if n != "uniform"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(names)), 4.6))
    x = np.arange(len(names))
    for k, (key, color, label) in enumerate([("predicted", "#aec7e8", "predicted"),
                                             ("ratio_plain", "#1f77b4", "measured"),
                                             ("ratio_clipped", "#ff7f0e", "measured, clipped updates")]):
        ys = np.array([sm[n][key]["mean"] for n in names])
        cis = np.array([sm[n][key]["ci"] for n in names])
        err = None if key == "predicted" else [np.maximum(ys - cis[:, 0], 0), np.maximum(cis[:, 1] - ys, 0)]
        ax.bar(x + (k - 1) * 0.27, ys, 0.27, color=color, label=label, yerr=err, capsize=2)
        if key == "ratio_plain":
            for i, n in enumerate(names):
                pts = sm[n]["ratio_plain"]["per_batch"]
                ax.plot(np.full(len(pts), x[i]), pts, ".", color="k", ms=3, alpha=0.5)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace("[", "\n") .replace("]", "") for n in names], fontsize=7)
    ax.set_ylabel("update-variance trace / uniform's")
    s = result["setup"]
    ax.set_title(f"RLOO, balanced loss: mean over {len(result['batches'])} batches of {s['prompts']} prompts "
                 f"(95% CI over batches; dots: batches)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_tiny_config(text: str):
    """"field=value,field=value" -> TinyConfig(**fields) (values as Python literals); "" -> TinyConfig()."""
    import ast
    import dataclasses

    from dynamo_openrlhf.tiny import TinyConfig

    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    kw = {}
    for part in filter(None, (x.strip() for x in text.split(";" if ";" in text else ","))):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--tiny_config: {part!r} is not field=value with a TinyConfig field ({sorted(fields)})")
        try:
            kw[key] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            kw[key] = val.strip()
    return TinyConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=None, help="independent prompt batches (default 8; --quick 1)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per batch (default 24; --quick 6)")
    p.add_argument("--splits", default="train",
                   help="prompt source, cycled over batches: train, eval (comma-separated); default train")
    p.add_argument("--repeats", type=int, default=None, help="rollout sets per batch (default 48; --quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one small batch, a handful of repeats (tests)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/out; --quick benchmarks/out/quick)")
    p.add_argument("--png", default=None, help="plot path (default docs/gradient_variance.png; --quick OUT/gradient_variance.png)")
    p.add_argument("--oracle_samples", type=int, default=None, help="samples per prompt for the oracle (default 64; --quick 16)")
    p.add_argument("--pool_samples", type=int, default=8, help="earlier rollouts per prompt fed to the pool (default 8)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"noise models (default {','.join(DEFAULT_MODELS)}): " + "; ".join(f"{k} = {d}" for k, d in MODEL_DESC.items()))
    p.add_argument("--kappa", type=float, default=nm.KAPPA,
                   help=f"shrinkage pseudo-count toward the pool-level class mean (default {nm.KAPPA})")
    p.add_argument("--max_norm", type=float, default=1.0,
                   help="global gradient-norm clip of the 'clipped' numbers (OpenRLHF's --actor.max_norm default 1.0; "
                        "the tiny-cpu preset keeps it)")
    p.add_argument("--variants", default="rloo_balanced",
                   help="loss variants (default rloo_balanced, measured on every batch with the noise models); others "
                        "are measured the old way (full gradients, uniform / ours / oracle, one batch per split): "
                        + "; ".join(f"{k} = {d}" for k, d in VARIANT_DESC.items()))
    p.add_argument("--no_per_prompt", dest="per_prompt", action="store_false",
                   help="legacy variants: skip their per-prompt decomposition")
    p.add_argument("--tiny_config", default="",
                   help="TinyConfig fields for the task / warm start, 'field=value,...' (default: TinyConfig())")
    p.add_argument("--cost_vocab", type=int, default=None,
                   help="vocabulary of the proxy-cost benchmark (default 151936; --quick 512; 0: skip)")
    p.add_argument("--cost_response", type=int, default=None, help="response tokens of the cost benchmark (default 1280; --quick 32)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 2000; --quick 200)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("DYNAMO_OPENRLHF_CPU_THREADS", "1")),
                   help="torch threads (default $DYNAMO_OPENRLHF_CPU_THREADS or 1)")
    p.add_argument("--priced", action="store_true",
                   help="priced skipping: realised MSE of uniform4 / priced / priced[oracle] / noskip on B = 4 x prompts "
                        "candidates (the oversample-2 recipe) against the trainer's prediction; writes "
                        "OUT/gradient_variance_priced.{md,json}, no plot")
    p.add_argument("--skip_price", type=float, default=4.0, help="κ of --priced (the trainer's default 4)")
    p.add_argument("--from_json", default=None, help="re-render the table and plot from an earlier run's JSON (no sampling)")
    p.add_argument("--cache_dir", default=None, help="tiny preset cache (default $DYNAMO_OPENRLHF_CACHE or ~/.cache/dynamo_openrlhf)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    q = args.quick
    args.batches = args.batches or (1 if q else 8)
    args.prompts = args.prompts or (6 if q else 24)
    args.splits = [x.strip() for x in args.splits.split(",") if x.strip()]
    if not args.splits or any(x not in ("train", "eval") for x in args.splits):
        parser.error(f"--splits: choose from train, eval (got {args.splits})")
    args.repeats = args.repeats or (4 if q else 48)
    args.oracle_samples = args.oracle_samples or (16 if q else 64)
    args.bootstrap = args.bootstrap or (200 if q else 2000)
    if args.cost_vocab is None:
        args.cost_vocab = 512 if q else 151_936
    args.cost_response = args.cost_response or (32 if q else 1280)
    args.out = args.out or os.path.join(HERE, "out", "quick" if q else "")
    args.png = args.png or (os.path.join(args.out, "gradient_variance.png") if q
                            else os.path.join(ROOT, "docs", "gradient_variance.png"))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        parser.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        parser.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    if args.prompts < 1 or args.batches < 1:
        parser.error("--prompts and --batches must be >= 1")
    if args.kappa <= 0:
        parser.error("--kappa must be > 0")
    args.tiny_config_text = args.tiny_config
    try:
        args.tiny_config = parse_tiny_config(args.tiny_config)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if not (math.isfinite(args.skip_price) and args.skip_price > 0):
        parser.error(f"--skip_price must be a finite number > 0, got {args.skip_price}")
    if args.from_json:  # re-render the table and the plot of an earlier run
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = run_priced(args) if args.priced else run(args)
    os.makedirs(args.out, exist_ok=True)
    if result["setup"].get("mode") == "priced":
        md = table_priced(result)
        with open(os.path.join(args.out, "gradient_variance_priced.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(args.out, "gradient_variance_priced.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(md)
        print(f"wrote {os.path.join(args.out, 'gradient_variance_priced.md')}, gradient_variance_priced.json "
              f"({result['seconds']:.0f}s)")
        return 0
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
