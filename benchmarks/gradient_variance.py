#!/usr/bin/env python3
"""Does the rollout allocation lower the REAL policy-gradient variance? (issue 8, part 2)

    python benchmarks/gradient_variance.py            # full run: 2 batches x 24 prompts, 64 repeats (~10 min, 2 cores)
    python benchmarks/gradient_variance.py --quick    # 6 prompts, 4 repeats, one batch (for the tests)
    python benchmarks/gradient_variance.py --from_json benchmarks/out/gradient_variance.json   # re-render only

Setting: the tiny-cpu preset's warm-started policy (``dynamo_openrlhf.tiny``), fixed batches of
``--prompts`` prompts, and the rollout budget B = 4 x prompts. Batches (``--splits``): ``train`` = random
train prompts; ``mixed`` = train prompts picked by a separate 16-sample screening pass over 240 of them
for DESIGN.md section 6's spread (30% never / 20% always solved; the tiny policy has few such prompts, so
it gets what exists); ``eval`` = random eval prompts.

1. Pass rates. An *oracle* estimate p* from ``--oracle_samples`` (64) samples per prompt, and a *pool
   posterior* from a few earlier rollouts of the same policy: a ``PassRatePool`` (prior Beta(1,1))
   updated with ``--pool_samples`` (8) samples per prompt, then ``fit_prior()``. Prompt ids are the
   stable ``dynamo_openrlhf.prompt_ids`` hashes. Responses are sampled with
   ``dynamo_openrlhf.evaluate.sample_batch`` (temperature 1, 16 new tokens; the exact sampled token ids
   are kept) and scored with the training reward (``dynamo_openrlhf.reward.MathReward``, math-verify;
   scores cached per (response, label) since scoring is deterministic).
2. Allocations of B: uniform (4 each); ours = ``pool.allocate(ids, B, 2, 6, "neyman")``; oracle =
   ``allocate_rollouts(p*(1-p*), B, 2, 6)``; and both with skipping (lo = 0, hi = 16, with the
   allocator's ``skip_factor=4.0, min_rollouts=2`` when the installed extension has them, else plain lo = 0).
3. For each allocation, ``--repeats`` independent rollout sets: n_i responses per prompt, scored, GRPO
   group-normalised advantages with the variable group sizes
   (``dynamo_openrlhf.advantages.group_normalized_advantages``), and the actual gradient over all
   parameters of ``dynamo_openrlhf.loss.DynaMOPolicyLoss`` (OpenRLHF's PolicyLoss; token-mean loss,
   clip 0.2/0.2) at the sampling policy (old log-probs = current log-probs, so ratio = 1). Loss
   variants from the same rollouts (``--variants``): ``grpo`` (modulation "off") and ``decay6``
   (DynaMO's token modulation, with the policy's token entropy) -- the losses as trained; and two
   diagnostics with advantages scaled by (B/N)/n_i so that every prompt keeps uniform's weight in the
   loss (the per-prompt-mean estimator the sum v/n model describes): ``grpo_balanced`` and
   ``dr_grpo_balanced`` (mean baseline, no std normalisation: reward noise enters as p(1-p)).
4. Measured variance of an allocation = trace of the covariance of the flattened gradient over repeats
   (mean squared deviation from the mean, divisor R - 1), also per parameter block. Reported as a ratio
   to uniform's with a percentile bootstrap CI over repeats, next to the ratio the allocator PREDICTED:
   sum_i v_i c(n_i) / sum_i v_i c(4) with v_i = p*(1-p*) from the oracle estimate, c(n) = 1/n,
   c(0) = 1 (the convention of benchmarks/_simulation.py: a skipped prompt with v > 0 loses its
   signal). Also reported: noise/signal = trace(cov) / ||E g||^2 (debiased) as a ratio to uniform's,
   and how far each allocation's MEAN gradient moves from uniform's (unbiased squared distance relative
   to ||E g_uniform||^2): reweighting prompts, skipping and group normalisation with other group sizes
   change the expected update, not only its noise.

Common random numbers: each repeat draws one bank of max_a n_i rollouts per prompt and every allocation
uses the first n_i of them, so the allocations' repeats are paired (within one allocation they are
independent) and the ratio CIs come from a paired bootstrap over repeats.

Outputs: a markdown table (printed and written to OUT/gradient_variance.md), OUT/gradient_variance.json
with every number, and a PNG (docs/gradient_variance.png; with --quick OUT/gradient_variance.png).
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

from _simulation import objective  # noqa: E402  (c(n) = 1/n, c(0) = 1)

UNIFORM_N = 4          # rollouts per prompt of the baseline (B = UNIFORM_N x prompts)
BOUNDS = (2, 6)        # n/2 .. 3n/2
SKIP_BOUNDS = (0, 16)  # skipping variants
SKIP_FACTOR = 4.0
MAX_NEW_TOKENS = 16
VARIANTS = ("grpo", "decay6", "grpo_balanced", "dr_grpo_balanced")
VARIANT_DESC = {
    "grpo": "the GRPO loss as trained: group_norm advantages, modulation off",
    "decay6": "the DynaMO loss as trained: group_norm advantages, token modulation decay6",
    "grpo_balanced": "group_norm advantages x (B/N)/n_i: every prompt keeps uniform's weight (diagnostic)",
    "dr_grpo_balanced": "mean-baseline (Dr. GRPO) advantages x (B/N)/n_i: the estimator the sum v/n model describes (diagnostic)",
}
VARIANT_SHORT = {"grpo": "GRPO", "decay6": "DynaMO decay6", "grpo_balanced": "GRPO, balanced",
                 "dr_grpo_balanced": "Dr.GRPO, balanced"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Pure helpers (tested directly)
# ----------------------------------------------------------------------------------------------


def predicted_ratio(v: Sequence[float], n: Sequence[int], n_uniform: Sequence[int]) -> float:
    """The allocator's predicted variance ratio sum v c(n) / sum v c(n_uniform) (c(n) = 1/n, c(0) = 1).
    NaN when every v is 0 (no prompt carries signal)."""
    base = objective(np.asarray(v, float), np.asarray(n_uniform, float))
    if base <= 0:
        return float("nan")
    return objective(np.asarray(v, float), np.asarray(n, float)) / base


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
        from dynamo_openrlhf.evaluate import sample_batch

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

    def gradients(self, encoded, resp, owner, advantages: Dict[str, "object"], losses: Dict[str, "object"]):
        """Flattened gradient (float32 tensor) of each named loss, at the sampling policy (ratio = 1)."""
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
        out, done = {}, []
        todo = []
        for name, (loss_fn, adv_key) in losses.items():
            a = advantages[adv_key]
            prev = next((o for o, f, b in done if f is loss_fn and torch.equal(b, a)), None)
            done.append((name, loss_fn, a))
            (todo.append(name) if prev is None else out.setdefault(name, prev))
        for k, name in enumerate(todo):
            loss_fn, adv_key = losses[name]
            A = advantages[adv_key].to(torch.float32).unsqueeze(1).expand(M, L - 1) * amask
            loss = loss_fn(logp, old, A, amask, entropy=entropy)[0]
            grads = torch.autograd.grad(loss, self.params, retain_graph=k < len(todo) - 1, allow_unused=True)
            out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, self.params)])
        return {name: out[out[name]] if isinstance(out[name], str) else out[name] for name in losses}


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


def skip_options() -> Dict:
    """The joint-selection options the installed allocator has: skip_factor (and min_rollouts = 2, so no
    group of one, which carries no GRPO gradient) when available, else {} (plain lo = 0)."""
    from dynamo_openrlhf import allocate_rollouts

    for kw in ({"skip_factor": SKIP_FACTOR, "min_rollouts": 2}, {"skip_factor": SKIP_FACTOR}):
        try:
            allocate_rollouts([0.1, 0.2, 0.15], 4, 0, 4, **kw)
            return kw
        except TypeError:
            continue
    return {}


def make_allocations(pool, ids, v_oracle: np.ndarray, budget: int, bounds=BOUNDS, skip_bounds=SKIP_BOUNDS):
    """name -> int64 allocation of ``budget`` over the prompts, and a description of the skip rule used."""
    from dynamo_openrlhf import allocate_rollouts

    N = len(ids)
    kw = skip_options()
    allocs = {
        "uniform": np.asarray(allocate_rollouts(np.zeros(N), budget, UNIFORM_N, UNIFORM_N, "uniform")),
        "ours": np.asarray(pool.allocate(ids, budget, bounds[0], bounds[1], "neyman")),
        "oracle": np.asarray(allocate_rollouts(v_oracle, budget, bounds[0], bounds[1], "neyman")),
        "ours, skipping": np.asarray(pool.allocate(ids, budget, skip_bounds[0], skip_bounds[1], "neyman", **kw)),
        "oracle, skipping": np.asarray(allocate_rollouts(v_oracle, budget, skip_bounds[0], skip_bounds[1],
                                                         "neyman", **kw)),
    }
    rule = (", ".join(f"{k}={v:g}" for k, v in kw.items()) if kw
            else "plain lo=0 (the allocator has no skip_factor option)")
    return allocs, rule


def check_allocation(name: str, n: np.ndarray, budget: int) -> None:
    """The budget and the bounds hold (raises AssertionError)."""
    lo, hi = (UNIFORM_N, UNIFORM_N) if name == "uniform" else (SKIP_BOUNDS if "skipping" in name else BOUNDS)
    assert int(n.sum()) == budget, f"{name}: {int(n.sum())} rollouts, budget {budget}"
    assert n.min() >= lo and n.max() <= hi, f"{name}: allocation outside [{lo}, {hi}]: {n.tolist()}"


def balance_weights(n: np.ndarray, budget: int) -> np.ndarray:
    """Per-prompt advantage scale (B/N)/n_i: every prompt gets uniform's total weight in the loss (0 for n_i = 0)."""
    n = np.asarray(n, dtype=np.float64)
    return np.where(n > 0, (budget / len(n)) / np.maximum(n, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def make_losses(variants):
    from dynamo_openrlhf.cpu_backend import install_import_stand_ins

    install_import_stand_ins()  # a no-op for packages that import for real (GPU machines)
    from dynamo_openrlhf.loss import DynaMOPolicyLoss

    off = DynaMOPolicyLoss(0.2, 0.2, modulation="off")
    table = {
        "grpo": (off, "group_norm"),
        "grpo_balanced": (off, "group_norm_balanced"),
        "decay6": (DynaMOPolicyLoss(0.2, 0.2, modulation="decay6", modulation_stats=False), "group_norm"),
        "dr_grpo_balanced": (off, "dr_grpo_balanced"),
    }
    return {v: table[v] for v in variants}


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


def select_mixed(policy, scorer, rows, n_prompts: int, rng, seed: int, candidates: int = 240, k: int = 16,
                 shares=(0.3, 0.2)):
    """A batch of train prompts with the pass-rate spread of a real RL batch (DESIGN.md section 6's pool:
    30% never solved, 20% always solved, the rest in between), picked by a separate screening pass of
    ``k`` samples on ``candidates`` random train prompts. The oracle is estimated afterwards from fresh samples."""
    cand = [rows[i] for i in np.sort(rng.choice(len(rows), size=min(candidates, len(rows)), replace=False))]
    enc = [policy.encode(r["prompt"]) for r in cand]
    kk = count_successes(policy, scorer, enc, [str(r["answer"]) for r in cand], k, seed)
    zero, one = np.flatnonzero(kk == 0), np.flatnonzero(kk == k)
    mid = np.flatnonzero((kk > 0) & (kk < k))
    n0 = min(len(zero), int(round(shares[0] * n_prompts)))
    n1 = min(len(one), int(round(shares[1] * n_prompts)))
    pick = np.concatenate([rng.permutation(zero)[:n0], rng.permutation(one)[:n1],
                           rng.permutation(mid)[:n_prompts - n0 - n1]])
    if len(pick) < n_prompts:  # not enough in between: fill from the rest
        rest = np.setdiff1d(np.arange(len(cand)), pick)
        pick = np.concatenate([pick, rng.permutation(rest)[:n_prompts - len(pick)]])
    pick = np.sort(pick)
    info = {"candidates": len(cand), "samples": k, "share_zero": float(np.mean(kk == 0)),
            "share_one": float(np.mean(kk == k)), "picked_zero": int(n0), "picked_one": int(n1)}
    return [cand[i] for i in pick], info


def run_batch(policy, scorer, losses, split: str, args, batch_index: int) -> Dict:
    import torch

    from dynamo_openrlhf import PassRatePool
    from dynamo_openrlhf.advantages import group_normalized_advantages
    from dynamo_openrlhf.prompt_ids import prompt_ids
    from dynamo_openrlhf.tiny import read_jsonl

    t_start = time.time()
    rows = read_jsonl(policy.files["eval" if split == "eval" else "train"])
    seed0 = args.seed * 1_000_003 + 100_000 * batch_index
    rng = np.random.default_rng(seed0)
    n_prompts = min(args.prompts, len(rows))
    screening = None
    if split == "mixed":
        batch, screening = select_mixed(policy, scorer, rows, n_prompts, rng, seed0 + 3)
    else:
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
    log(f"[gv] batch '{split}': {N} prompts, B={B}; oracle pass rates from {args.oracle_samples} samples/prompt "
        f"(mean {p_or.mean():.3f}; p=0: {int((k_or == 0).sum())}, p=1: {int((k_or == args.oracle_samples).sum())}); "
        f"pool from {args.pool_samples}/prompt, fitted prior Beta({prior[0]:.3g}, {prior[1]:.3g}) "
        f"({time.time() - t_start:.1f}s)")

    # 2. allocations
    allocs, skip_rule = make_allocations(pool, ids, v_or, B)
    for name, n in allocs.items():
        check_allocation(name, n, B)
    n_unif = allocs["uniform"]
    v_pool = np.asarray(pool.expected_variance(ids))
    estimators = {e for _, e in losses.values()}

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
    for a_idx, (name, n) in enumerate(allocs.items()):
        t0 = time.time()
        same = next((o for o in results if np.array_equal(allocs[o], n)), None)
        if same is not None:  # the same allocation on the same banks: identical numbers
            results[name] = dict(results[same], same_as=same, seconds=0.0)
            stats[name] = stats[same]
            log(f"[gv] {split}/{name:17s} = {same} (same allocation)")
            continue
        X = {v: torch.empty((R, policy.dim), dtype=torch.float32) for v in losses}
        sizes = torch.tensor(n, dtype=torch.long)
        scale = torch.tensor(np.repeat(balance_weights(n, B), n), dtype=torch.float32)
        take = np.concatenate([np.arange(starts[i], starts[i] + n[i]) for i in range(N)]).astype(np.int64)
        rewards_mean, zero_groups = [], []
        for r in range(R):
            bank_resp, bank_owner, bank_rew = banks[r]
            resp = [bank_resp[j] for j in take]
            owner = [bank_owner[j] for j in take]
            rew = bank_rew[take]
            rt = torch.tensor(rew, dtype=torch.float32)
            adv = {}
            for est in estimators:
                base = est.replace("_balanced", "")
                a = group_normalized_advantages(rt, sizes, base)
                adv[est] = a * scale if est.endswith("_balanced") else a
            g = policy.gradients(encoded, resp, owner, adv, losses)
            for v in losses:
                X[v][r] = g[v]
            rewards_mean.append(float(rew.mean()))
            k_i = np.bincount(np.asarray(owner, dtype=np.int64), weights=rew, minlength=N)
            zero_groups.append(int(((n >= 2) & ((k_i == 0) | (k_i == n))).sum()))
        stats[name] = {v: gradient_stats(X[v], policy.blocks) for v in losses}
        if name == "uniform":
            X_uniform = X
        else:  # paired: ||E g - E g_uniform||^2, unbiased from the per-repeat differences
            for v in losses:
                D = (X[v] - X_uniform[v]).double()
                dm = D.mean(0)
                stats[name][v]["shift2"] = float((dm ** 2).sum()) - float(((D - dm) ** 2).sum()) / (R - 1) / R
            del X, D
        results[name] = {
            "n": n.tolist(),
            "predicted_ratio": predicted_ratio(v_or, n, n_unif),
            "predicted_ratio_pool_v": predicted_ratio(v_pool, n, n_unif),
            "prompts_skipped": int((n == 0).sum()),
            "groups_of_one": int((n == 1).sum()),
            "mean_reward": float(np.mean(rewards_mean)),
            "constant_reward_groups_mean": float(np.mean(zero_groups)),
            "trace": {v: float(trace_cov(stats[name][v]["G"])) for v in losses},
            "block_trace": {v: stats[name][v]["block_trace"] for v in losses},
            # per repeat ||g_r - mean||^2 (heavy tails show here: a few repeats can dominate the trace)
            "repeat_sq_dev": {v: np.diag(stats[name][v]["G"]).round(6).tolist() for v in losses},
            "seconds": time.time() - t0,
        }
        log(f"[gv] {split}/{name:17s} {R} repeats in {time.time() - t0:5.1f}s: trace(cov) "
            + ", ".join(f"{v} {results[name]['trace'][v]:.3e}" for v in losses)
            + f"; predicted ratio {results[name]['predicted_ratio']:.3f}")

    # 4. ratios to uniform, bootstrap CIs, noise-to-signal, shift of the mean gradient
    su = stats["uniform"]
    for name in allocs:
        res, st = results[name], stats[name]
        res.update(ratio={}, ratio_ci={}, block_ratio={}, mean_shift_rel={}, nsr={}, nsr_ratio={}, nsr_ratio_ci={})
        for j, v in enumerate(losses):
            tu, ta = results["uniform"]["trace"][v], res["trace"][v]
            res["ratio"][v] = ta / tu
            res["block_ratio"][v] = {b: res["block_trace"][v][b] / results["uniform"]["block_trace"][v][b]
                                     for b in policy.blocks}
            res["nsr"][v] = float(noise_to_signal(st[v])[0])
            res["nsr_ratio"][v] = res["nsr"][v] / float(noise_to_signal(su[v])[0])
            sig = su[v]["m2"] - tu / R  # unbiased ||E g_u||^2, and ||E g_a - E g_u||^2 below
            d2 = st[v].get("shift2", 0.0)
            res["mean_shift_rel"][v] = 0.0 if st is su else (d2 / sig if sig > 0 else float("nan"))
            if st is su:
                res["ratio_ci"][v] = res["nsr_ratio_ci"][v] = [1.0, 1.0]
                continue
            # paired bootstrap (common random numbers): the same resampled repeats for both
            Wa = Wu = _counts(np.random.default_rng([args.seed, batch_index, j]), R, args.bootstrap)
            with np.errstate(divide="ignore", invalid="ignore"):  # a resample of one repeat has trace 0
                res["ratio_ci"][v] = _ci(trace_cov(st[v]["G"], Wa) / trace_cov(su[v]["G"], Wu))
                res["nsr_ratio_ci"][v] = _ci(noise_to_signal(st[v], Wa) / noise_to_signal(su[v], Wu))
    return {
        "split": split, "screening": screening, "prompts": N, "budget": B, "skip_rule": skip_rule,
        "pool_prior_fitted": [float(x) for x in prior],
        "oracle_pass_rate_mean": float(p_or.mean()),
        "oracle_share_zero": float(np.mean(k_or == 0)), "oracle_share_one": float(np.mean(k_or == args.oracle_samples)),
        "prompt_rows": [{"id": r.get("id"), "prompt": r["prompt"], "answer": r["answer"],
                         "difficulty": r.get("difficulty"), "prompt_id": int(i), "oracle_successes": int(ko),
                         "pool_successes": int(kp), "pool_mean": float(m), "pool_expected_variance": float(ev)}
                        for r, i, ko, kp, m, ev in zip(batch, ids, k_or, k_pool, pool.mean(ids), v_pool)],
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
            "bounds": list(BOUNDS), "skip_bounds": list(SKIP_BOUNDS), "repeats": args.repeats,
            "oracle_samples": args.oracle_samples, "pool_samples": args.pool_samples, "seed": args.seed,
            "threads": args.threads, "bootstrap": args.bootstrap, "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0, "params": policy.dim,
            "blocks": {b: e - s for b, (s, e) in policy.blocks.items()},
            "variants": {v: VARIANT_DESC[v] for v in losses},
            "loss": "DynaMOPolicyLoss(clip 0.2/0.2, token-mean), ratio = 1 (old = current log-probs)",
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
    vs = list(s["variants"])
    head = (["batch", "allocation", "predicted"] + [f"{VARIANT_SHORT[v]}" for v in vs]
            + ["noise/signal, GRPO", "mean shift, GRPO", "skipped / groups of 1"])
    skip_rules = sorted({b["skip_rule"] for b in result["batches"]})
    lines = [f"Policy-gradient variance on the tiny-cpu warm start: trace of the gradient covariance over "
             f"{s['repeats']} independent rollout sets per allocation ({s['params']:,} parameters), as a ratio to "
             f"uniform's (4 rollouts per prompt, same budget B = 4 x prompts), 95% paired bootstrap CI over repeats (common random numbers). "
             f"Bounds {s['bounds'][0]}..{s['bounds'][1]}; skipping {s['skip_bounds'][0]}..{s['skip_bounds'][1]} "
             f"with {'; '.join(skip_rules)}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bt in result["batches"]:
        label = (f"{bt['split']} ({bt['prompts']} prompts, p=0: {bt['oracle_share_zero']:.0%}, "
                 f"mean p {bt['oracle_pass_rate_mean']:.2f})")
        for name, res in bt["allocations"].items():
            cells = [label, name + (f" (= {res['same_as']})" if res.get("same_as") else ""),
                     f"{res['predicted_ratio']:.3f}"]
            uni = name == "uniform"
            for v in vs:
                cells.append("1" if uni else _fmt_ci(res["ratio"][v], res["ratio_ci"][v]))
            g = "grpo" if "grpo" in vs else vs[0]
            cells.append("1" if uni else _fmt_ci(res["nsr_ratio"][g], res["nsr_ratio_ci"][g]))
            cells.append("–" if uni else f"{res['mean_shift_rel'][g]:+.2f}")
            cells.append(f"{res['prompts_skipped']} / {res['groups_of_one']}")
            lines.append("| " + " | ".join(cells) + " |")
            label = ""
    lines += ["",
              f"predicted = Σ v·c(n) / Σ v·c(4) with v = p(1−p) from the oracle estimate ({s['oracle_samples']} samples/prompt), c(n) = 1/n, "
              f"c(0) = 1. GRPO / DynaMO decay6: the losses as trained (DynaMOPolicyLoss, token-mean). \"balanced\": "
              "advantages × (B/N)/n_i so every prompt keeps uniform's weight in the loss (the estimator the Σ v/n model "
              "describes); Dr.GRPO: mean baseline, no std normalisation. noise/signal = trace(cov) / ‖E g‖² relative "
              "to uniform's. mean shift = ‖E g − E g_uniform‖² / ‖E g_uniform‖² (unbiased)."]
    return "\n".join(lines)


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = list(result["setup"]["variants"])
    g = "grpo" if "grpo" in vs else vs[0]
    series = ([("predicted (Σ v/n)", None)] + [(f"measured: {VARIANT_SHORT[v]}", v) for v in vs]
              + [(f"noise/signal: {VARIANT_SHORT[g]}", "nsr:" + g)])
    colors = ["#999999", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728"]
    nb = len(result["batches"])
    fig, axes = plt.subplots(1, nb, figsize=(6.5 * nb, 4.2), squeeze=False)
    w = 0.8 / len(series)
    for ax, bt in zip(axes[0], result["batches"]):
        names = [n for n in bt["allocations"] if n != "uniform"]
        al = [bt["allocations"][n] for n in names]
        x = np.arange(len(names))
        for k, (label, v) in enumerate(series):
            pos = x + (k - (len(series) - 1) / 2) * w
            if v is None:
                ax.bar(pos, [a["predicted_ratio"] for a in al], w, label=label, color=colors[0])
            else:
                key, ckey, vv = ("nsr_ratio", "nsr_ratio_ci", v[4:]) if v.startswith("nsr:") else ("ratio", "ratio_ci", v)
                y = np.array([a[key][vv] for a in al])
                ci = np.array([a[ckey][vv] for a in al])
                ax.bar(pos, y, w, label=label, color=colors[k % len(colors)], hatch="//" if key == "nsr_ratio" else None,
                       yerr=[np.maximum(y - ci[:, 0], 0), np.maximum(ci[:, 1] - y, 0)], capsize=2)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        tops = [a["ratio_ci"][v][1] for a in al for v in vs if np.isfinite(a["ratio_ci"][v][1])] + [1.2]
        ax.set_ylim(0, min(3.0, 1.05 * max(tops)))  # a wider CI is cut at 3 (the JSON has it)
        ax.set_xticks(x)
        ax.set_xticklabels([n.replace(", ", ",\n") for n in names], fontsize=8)
        ax.set_ylabel("ratio to uniform's")
        ax.set_title(f"{bt['split']} prompts (N={bt['prompts']}, B={bt['budget']}, "
                     f"{result['setup']['repeats']} repeats; 95% CI)", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="prompts per batch (default 24; --quick 6)")
    p.add_argument("--splits", default=None,
                   help="batches: train (random train prompts), eval (random eval prompts), mixed (train prompts picked "
                        "by a screening pass for DESIGN.md 6's spread: 30%% never / 20%% always solved) "
                        "(default train,mixed; --quick train)")
    p.add_argument("--repeats", type=int, default=None, help="rollout sets per allocation (default 64; --quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a handful of repeats on a few prompts (tests)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/out; --quick benchmarks/out/quick)")
    p.add_argument("--png", default=None, help="plot path (default docs/gradient_variance.png; --quick OUT/gradient_variance.png)")
    p.add_argument("--oracle_samples", type=int, default=None, help="samples per prompt for the oracle (default 64; --quick 16)")
    p.add_argument("--pool_samples", type=int, default=8, help="earlier rollouts per prompt fed to the pool (default 8)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"loss variants (default {','.join(VARIANTS)})")
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
    args.splits = [x.strip() for x in (args.splits or ("train" if q else "train,mixed")).split(",") if x.strip()]
    if not args.splits or any(x not in ("train", "eval", "mixed") for x in args.splits):
        parser.error(f"--splits: choose from train, eval, mixed (got {args.splits})")
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
