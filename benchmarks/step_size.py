#!/usr/bin/env python3
"""How large is a step of the prompt-balanced loss next to OpenRLHF's GRPO step, at the same learning rate?

    python benchmarks/step_size.py                  # tiny-cpu warm start (TinyConfig()), 1 + 16 batches, 1 thread
    python benchmarks/step_size.py --task carry     # the same on another tiny task's warm start
    python benchmarks/step_size.py --quick          # 1 + 2 batches of 4 prompts (smoke run)

Setting: the tiny task's warm-started policy (``dynamo_openrlhf.tiny``, ``TinyConfig(task=--task)``), batches of
``--prompts`` (16) random train prompts x ``--n`` (8) rollouts (uniform n, as ``grpo`` and ``grpo+loss`` of the
learning study), sampled at temperature 1 with ``--rollout.max_new_tokens`` = the task's ``max_new_tokens()``
and scored with the training reward. For each batch, on the SAME rollouts, the gradient of the trainer's policy
loss (``DynaMOPolicyLoss``, clip 0.2/0.2, modulation off, ratio 1: old = current log-probs, one optimizer step per
batch) under each variant:

    grpo                      group_norm advantages, OpenRLHF's token-mean (OpenRLHF's GRPO)
    rloo+tokens               RLOO advantages, token-mean
    grpo+loss                 RLOO advantages, prompt-balanced loss, L = --dynamo.loss.token_normalizer auto
    grpo+loss (L=max_new)     RLOO advantages, prompt-balanced loss, L = --rollout.max_new_tokens (the old default)

``auto``'s L is the trainer's own :class:`~dynamo_openrlhf.advantages.RunningTokenNormalizer`, fed each batch's
response lengths after its weights are made, as in training; batch 0 is a warm-up that only seeds it (the first
training step uses L = max_new_tokens, i.e. the ``L=max_new`` row), and every number below is over batches 1..K.

Reported, as ratios to ``grpo`` with a paired bootstrap CI over batches:
1. the mean update norm (global L2 norm of the step's gradient over all parameters), i.e. the step size of plain
   SGD at the same learning rate, split into the advantage scale (``rloo+tokens`` / ``grpo``: group_norm divides
   each group by its reward std, RLOO does not) times the normaliser (``grpo+loss`` / ``rloo+tokens``; with uniform
   n the balanced weights are 1/(S L) and token-mean's 1/(token count), so this factor is exactly (the batch's
   mean response length) / L per batch);
2. the mean norm of the AdamW update those gradients give, fed in batch order to the tiny preset's optimizer
   (global-norm clipping ``--max_norm`` 1.0, then AdamW lr 2e-4, betas (0.9, 0.95), eps 1e-8, no weight decay) at
   the fixed warm-start policy: Adam divides by the running RMS of the gradients, so a constant scale on every
   step's gradient does not change its updates; only scale changes between steps, the clipping and eps do.

Outputs: a markdown table (printed; written with the JSON of every number to ``--out``, default benchmarks/out).
Deterministic given --seed (torch is reseeded before every sampling call).
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

# name -> (advantage estimator, loss weighting, L of the balanced loss)
VARIANTS = {
    "grpo": ("group_norm", "tokens", None),
    "rloo+tokens": ("rloo", "tokens", None),
    "grpo+loss": ("rloo", "balanced", "auto"),
    "grpo+loss (L=max_new)": ("rloo", "balanced", "max_new_tokens"),
}
BASELINE = "grpo"
# The tiny-cpu preset's optimizer (dynamo_openrlhf/train.py, OpenRLHF's defaults otherwise).
ADAM = {"lr": 2e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
MAX_NORM = 1.0


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def ratio_of_means(num: Sequence[float], den: Sequence[float], resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> Dict[str, object]:
    """mean(num) / mean(den) over paired per-batch values (K,), with a paired percentile bootstrap CI over batches.

    Returns ``{"ratio": float, "ci": [lo, hi]}`` (the CI is [ratio, ratio] for a single batch)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"num and den must be non-empty 1-D arrays of the same length, got {a.shape} and {b.shape}")
    if not (b.mean() > 0):
        raise ValueError("den must have a positive mean")
    ratio = float(a.mean() / b.mean())
    if a.size == 1:
        return {"ratio": ratio, "ci": [ratio, ratio]}
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    den_boot = b[idx].mean(1)
    boot = a[idx].mean(1)[den_boot > 0] / den_boot[den_boot > 0]  # (a resample of all-zero batches has no ratio)
    q = (1 - level) / 2
    return {"ratio": ratio, "ci": [float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))]}


def adam_updates(grads: Sequence, lr: float = ADAM["lr"], betas=ADAM["betas"], eps: float = ADAM["eps"],
                 weight_decay: float = ADAM["weight_decay"], max_norm: Optional[float] = MAX_NORM) -> List:
    """Each AdamW update (float32 (D,) tensor: parameters after the step minus before) when ``grads`` (flattened
    (D,) tensors, in step order) are fed to a fresh ``torch.optim.AdamW`` after global-norm clipping to
    ``max_norm`` (None: no clipping), at a fixed parameter vector (the policy the gradients were taken at)."""
    import torch

    if not grads:
        return []
    p = torch.zeros_like(grads[0], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False)
    out = []
    for g in grads:
        g = g.detach().to(torch.float32)
        norm = float(g.norm())
        if max_norm is not None and norm > max_norm:
            g = g * (max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(p.detach() - before)
        with torch.no_grad():
            p.copy_(before)  # the gradients were taken at one policy: keep it, keep Adam's state
    return out


# ----------------------------------------------------------------------------------------------
# Rollouts and gradients
# ----------------------------------------------------------------------------------------------


def sample_rollouts(policy, encoded, counts, seed: int, max_new_tokens: int):
    """``gradient_variance.Policy.sample`` with the task's generation limit (it reads its module's
    ``MAX_NEW_TOKENS`` at call time). Returns (texts, response token ids, owner prompt index), prompt-major."""
    import gradient_variance as gv

    saved = gv.MAX_NEW_TOKENS
    gv.MAX_NEW_TOKENS = int(max_new_tokens)
    try:
        return policy.sample(encoded, counts, seed)
    finally:
        gv.MAX_NEW_TOKENS = saved


def step_gradients(policy, loss_fn, encoded, resp, owner, terms: Dict[str, tuple]):
    """Flattened float32 gradient over all parameters of each term's policy loss on one batch, at ratio 1.

    ``terms``: name -> (advantages (M,), weights (M,) float64 or None). None: the loss as OpenRLHF aggregates it
    for one optimizer step (token-mean over all the batch's action tokens); weights: the prompt-balanced loss as
    the actor computes it (``sample_weight`` with ``balanced_normalizers``, one micro-batch, one rank)."""
    import torch

    from dynamo_openrlhf.loss import balanced_normalizers

    import gradient_variance as gv

    ids, attn, mask = gv.batch_tensors(policy.tok.pad_token_id, encoded, resp, owner)
    logits = policy.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask
    old = logp.detach()
    out = {}
    names = list(terms)
    for k, name in enumerate(names):
        adv, w = terms[name]
        A = adv.to(torch.float32).unsqueeze(1) * mask
        if w is None:
            loss = loss_fn(logp, old, A, mask)[0]
        else:
            loss = loss_fn(logp, old, A, mask, sample_weight=w, **balanced_normalizers(1, 1))[0]
        grads = torch.autograd.grad(loss, policy.params, retain_graph=k < len(names) - 1, allow_unused=True)
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, policy.params)])
    return out


def _cos(a, b) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def run(args) -> Dict:
    import torch

    torch.set_num_threads(args.threads)
    import gradient_variance as gv

    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()  # DynaMOPolicyLoss imports OpenRLHF's loss
    from dynamo_openrlhf.advantages import (PromptBalancing, RunningTokenNormalizer, balanced_mean_length,
                                            group_normalized_advantages)
    from dynamo_openrlhf.loss import DynaMOPolicyLoss
    from dynamo_openrlhf.tiny import TinyConfig, prepare_tiny_assets, read_jsonl

    t_start = time.time()
    config = TinyConfig(task=args.task)
    max_new = config.max_new_tokens()
    assets = prepare_tiny_assets(args.cache_dir, config, log=log)
    policy = gv.Policy(str(assets.model_dir))
    scorer = gv.CachedScorer()
    loss_fn = DynaMOPolicyLoss(0.2, 0.2, modulation="off")
    rows = read_jsonl(assets.train_file)
    P, n = min(args.prompts, len(rows)), args.n
    sizes = [n] * P
    S = P * n
    balancing = PromptBalancing("rloo", float(max_new), True, train_batch_size=S, running=True)
    running = balancing.normalizer()
    batches, grads = [], {v: [] for v in VARIANTS}
    try:
        for b in range(args.batches + 1):
            t0 = time.time()
            rng = np.random.default_rng([args.seed, b])
            batch = [rows[i] for i in np.sort(rng.choice(len(rows), size=P, replace=False))]
            encoded = [policy.encode(r["prompt"]) for r in batch]
            labels = [str(r["answer"]) for r in batch]
            texts, resp, owner = sample_rollouts(policy, encoded, sizes, args.seed * 1_000_003 + b, max_new)
            rewards = torch.tensor(scorer(texts, [labels[o] for o in owner]), dtype=torch.float32)
            lengths = torch.tensor([len(r) for r in resp], dtype=torch.float64)
            adv = {e: group_normalized_advantages(rewards, sizes, e) for e in ("group_norm", "rloo")}
            L_auto = running.value  # this step's L: the earlier batches' running mean
            own = balanced_mean_length(lengths, sizes)
            Ls = {"auto": L_auto, "max_new_tokens": float(max_new)}
            terms = {v: (adv[est], None if weighting == "tokens" else balancing.sample_weights(sizes, Ls[src]))
                     for v, (est, weighting, src) in VARIANTS.items()}
            g = step_gradients(policy, loss_fn, encoded, resp, owner, terms)
            if own > 0:
                running.update(own)  # after the weights, as the experience maker does
            r2 = rewards.reshape(P, n)
            mixed = (r2.max(1).values != r2.min(1).values)
            row = {"batch": b, "warmup": b == 0, "L_auto": L_auto, "mean_length": own,
                   "reward_mean": float(rewards.mean()), "mixed_groups": int(mixed.sum()),
                   "norms": {v: float(x.double().norm()) for v, x in g.items()}, "seconds": time.time() - t0}
            if b > 0:
                for v in VARIANTS:
                    grads[v].append(g[v])
            batches.append(row)
            log(f"[step] batch {b}{' (warm-up)' if b == 0 else ''}: L_auto {L_auto:.3f}, mean length {own:.3f}, "
                f"reward {row['reward_mean']:.3f}, {row['mixed_groups']}/{P} groups with signal; norms "
                + ", ".join(f"{v} {x:.4g}" for v, x in row["norms"].items()) + f" ({row['seconds']:.1f}s)")
    finally:
        scorer.close()

    measured = [r for r in batches if not r["warmup"]]
    base = [r["norms"][BASELINE] for r in measured]
    updates = {v: adam_updates(grads[v]) for v in VARIANTS}
    adam = {v: [float(u.double().norm()) for u in updates[v]] for v in VARIANTS}
    out = {"grad_norm": {}, "adam_update_norm": {}, "clipped_share": {}, "grad_cos": {}, "adam_cos": {}}
    for k, v in enumerate(VARIANTS):
        vals = [r["norms"][v] for r in measured]
        out["grad_norm"][v] = {"mean": float(np.mean(vals)),
                               **ratio_of_means(vals, base, args.resamples, args.seed + k)}
        out["adam_update_norm"][v] = {"mean": float(np.mean(adam[v])),
                                      **ratio_of_means(adam[v], adam[BASELINE], args.resamples, args.seed + k)}
        out["clipped_share"][v] = float(np.mean([x > MAX_NORM for x in vals]))
        # direction: mean cosine to grpo's gradient / update of the same batch (batches with a gradient)
        out["grad_cos"][v] = float(np.mean([_cos(a, b) for a, b in zip(grads[v], grads[BASELINE])
                                            if a.norm() > 0 and b.norm() > 0]))
        out["adam_cos"][v] = float(np.mean([_cos(a, b) for a, b in zip(updates[v], updates[BASELINE])
                                            if a.norm() > 0 and b.norm() > 0]))
    # the two factors of grpo+loss / grpo; the normaliser factor is exactly mean_length / L_auto per batch
    normaliser_exact = [r["mean_length"] / r["L_auto"] for r in measured]
    signal = [r for r in measured if r["norms"]["rloo+tokens"] > 0]  # a batch without signal has no gradient
    got = [r["norms"]["grpo+loss"] / r["norms"]["rloo+tokens"] for r in signal]
    if not np.allclose(got, [r["mean_length"] / r["L_auto"] for r in signal], rtol=1e-4):
        raise AssertionError(f"balanced/token-mean norm ratio {got} != mean length / L {normaliser_exact}")
    return {
        "setup": {"task": args.task, "tiny_config_digest": config.digest(), "model": str(assets.model_dir),
                  "params": sum(p.numel() for p in policy.params), "prompts": P, "n": n, "batches": args.batches,
                  "max_new_tokens": max_new, "seed": args.seed, "threads": args.threads, "adam": ADAM,
                  "max_norm": MAX_NORM, "variants": {v: list(x) for v, x in VARIANTS.items()},
                  "loss": "DynaMOPolicyLoss(clip 0.2/0.2, modulation off), ratio 1, one optimizer step per batch"},
        "batches": batches,
        "summary": out,
        "factors": {
            "advantage_scale": ratio_of_means([r["norms"]["rloo+tokens"] for r in measured], base, args.resamples,
                                              args.seed + 11),
            "normaliser": ratio_of_means([r["norms"]["grpo+loss"] for r in measured],
                                         [r["norms"]["rloo+tokens"] for r in measured], args.resamples, args.seed + 12),
            "normaliser_per_batch": normaliser_exact,
        },
        "seconds": time.time() - t_start,
    }


def table(result: Dict) -> str:
    s, summ = result["setup"], result["summary"]
    lines = [
        f"Task {s['task']} (TinyConfig digest {s['tiny_config_digest']}), {s['params']:,} parameters; "
        f"{s['batches']} batches of {s['prompts']} prompts x {s['n']} rollouts after one warm-up batch; "
        f"max_new_tokens {s['max_new_tokens']}; {result['seconds']:.0f} s on {s['threads']} thread(s).",
        "",
        "| variant | mean grad norm | / grpo [95% CI] | share > max_norm | cos to grpo | mean AdamW update norm "
        "| / grpo [95% CI] | cos to grpo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        g, a = summ["grad_norm"][v], summ["adam_update_norm"][v]
        lines.append(f"| {v} | {g['mean']:.4g} | {g['ratio']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] | "
                     f"{summ['clipped_share'][v]:.2f} | {summ['grad_cos'][v]:.3f} | {a['mean']:.4g} | {a['ratio']:.3f} "
                     f"[{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {summ['adam_cos'][v]:.3f} |")
    f = result["factors"]
    m = [r for r in result["batches"] if not r["warmup"]]
    lines += [
        "",
        f"grpo+loss / grpo = advantage scale (rloo+tokens / grpo) {f['advantage_scale']['ratio']:.3f} "
        f"[{f['advantage_scale']['ci'][0]:.3f}, {f['advantage_scale']['ci'][1]:.3f}] x normaliser (grpo+loss / "
        f"rloo+tokens) {f['normaliser']['ratio']:.3f} [{f['normaliser']['ci'][0]:.3f}, {f['normaliser']['ci'][1]:.3f}] "
        f"(per batch exactly mean length / L: {min(f['normaliser_per_batch']):.3f}..{max(f['normaliser_per_batch']):.3f}).",
        f"Mean response length per batch {min(r['mean_length'] for r in m):.2f}..{max(r['mean_length'] for r in m):.2f} "
        f"tokens; auto's L {min(r['L_auto'] for r in m):.2f}..{max(r['L_auto'] for r in m):.2f}; mean reward "
        f"{np.mean([r['reward_mean'] for r in m]):.3f}; groups with signal {np.mean([r['mixed_groups'] for r in m]):.1f}"
        f"/{s['prompts']}.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="arith", help="tiny task (dynamo_openrlhf.tiny.TASKS); TinyConfig(task=...)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--batches", type=int, default=16, help="measured batches (after one warm-up batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--quick", action="store_true", help="2 batches of 4 prompts (smoke run)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.prompts, args.batches = 4, 2
    result = run(args)
    text = table(result)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "step_size" + ("" if args.task == "arith" else f"_{args.task}")
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
