"""Benchmark (not a test): one actor training micro-batch at the paper's vocabulary size, CPU.

    python benchmarks/bench_entropy_memory.py            # vocab 151,936, 2 x (64 + 1,280) tokens, hidden 64
    python benchmarks/bench_entropy_memory.py --quick    # vocab 4,096, 2 x 128 tokens: a smoke run

Three variants of the same training micro-batch, same run, same model weights, same inputs:

* ``grpo``: OpenRLHF 0.11.2's ``Actor.forward`` (``return_entropy=False``) + its ``PolicyLoss`` +
  backward: what ``ActorPPOTrainer.training_step`` does for GRPO.
* ``dynamo_old``: the previous DynaMO path: ``--actor.entropy_coef 0``, so the forward runs
  OpenRLHF's ``compute_entropy`` with autograd on over every token (``return_entropy=True``); the
  step keeps ``entropy_loss`` (``aggregate_loss`` of it, as OpenRLHF's training_step does) until
  after the backward; ``DynaMOPolicyLoss`` gets ``output.entropy[:, -A:]`` detached.
* ``dynamo_old_eager``: the same with ``compute_entropy``'s body run eagerly (what the old path
  costs when ``torch.compile`` is off or falls back: autograd saves the (tokens, vocab) softmax).
* ``dynamo_new``: the forward as for GRPO; ``dynamo_openrlhf.entropy.response_entropy`` of the
  forward's logits (what the trainer's hook calls: ``torch.no_grad``, response positions only,
  chunked) feeds ``DynaMOPolicyLoss``.

The actor is OpenRLHF's ``Actor`` around a one-layer Llama (``--hidden``, ``--vocab``), float32 (the
actor casts its logits to float32 anyway), temperature 1.0; ``--batch`` sequences of ``--prompt``
prompt + ``--response`` response tokens, padded layout; one GRPO advantage per sequence.

Peak memory: the c10 CPU allocator reports every allocation and free to ``torch.profiler``
(``profile_memory=True``); the running sum of those ``[memory]`` events during the micro-batch is
exact at allocation granularity; its maximum is the step's peak above what was allocated before it
(model, optimizer-free gradients zeroed to None, inputs). Time: ``--repeats`` unprofiled rounds,
each running every variant once in rotating order; medians of wall-clock and of process CPU time.
The first call of each variant is a warm-up (it also compiles OpenRLHF's ``@torch.compile``
``compute_entropy``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.models.actor import Actor  # noqa: E402
from openrlhf.models.loss import PolicyLoss  # noqa: E402
from openrlhf.models.utils import masked_mean  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dynamo_openrlhf.entropy import DEFAULT_CHUNK_BYTES, response_entropy  # noqa: E402
from dynamo_openrlhf.loss import DynaMOPolicyLoss  # noqa: E402

VARIANTS = ("grpo", "dynamo_old", "dynamo_old_eager", "dynamo_new")


def eager_compute_entropy(logits):
    """``compute_entropy``'s body without its ``@torch.compile``: the old path where compilation is
    off or falls back (autograd then saves the (tokens, vocab) softmax for the backward)."""
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def build(vocab, hidden, batch, prompt, response, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, initializer_range=0.5,
                      max_position_embeddings=prompt + response)
    actor = Actor(LlamaForCausalLM(cfg), temperature=1.0)
    actor.packing_samples = False  # Actor(nn.Module) leaves it unset
    actor.train()
    g = torch.Generator().manual_seed(seed + 1)
    S = prompt + response
    seq = torch.randint(0, vocab, (batch, S), generator=g)
    att = torch.ones(batch, S, dtype=torch.long)
    am = torch.ones(batch, response, dtype=torch.bool)
    for b in range(1, batch):  # shorter responses after the first: right padding
        n = response - response * b // (2 * batch)
        att[b, prompt + n:] = 0
        am[b, n:] = False
    with torch.no_grad():
        old = actor(seq, am, attention_mask=att) + 0.02 * torch.randn(batch, response, generator=g)
    adv = torch.randn(batch, 1, generator=g).expand(batch, response).contiguous()
    return actor, dict(seq=seq, att=att, am=am, old=old * am, adv=adv)


def make_steps(actor, x, chunk_bytes):
    grpo_loss = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=10.0)
    dyn_loss = DynaMOPolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=10.0, modulation="decay6")
    A = x["am"].shape[1]
    n_tokens = float(x["am"].sum())

    def forward(return_entropy):
        return actor(x["seq"], x["am"], attention_mask=x["att"], return_output=True, return_entropy=return_entropy)

    def grpo():
        lp, out = forward(False)
        loss = grpo_loss(lp, x["old"], x["adv"], action_mask=x["am"], batch_num_tokens=n_tokens)[0]
        loss.backward()
        return loss.detach()

    def dynamo_old():
        lp, out = forward(True)
        entropy_loss = masked_mean(out.entropy[:, -A:], x["am"])  # kept (with its graph) past the backward
        loss = dyn_loss(lp, x["old"], x["adv"], action_mask=x["am"], batch_num_tokens=n_tokens,
                        entropy=out.entropy[:, -A:].detach())[0]
        loss.backward()
        del entropy_loss
        return loss.detach()

    def dynamo_old_eager():
        lp, out = forward(False)
        entropy = eager_compute_entropy(out["logits"])[:, :-1]  # what return_entropy=True does, uncompiled
        entropy_loss = masked_mean(entropy[:, -A:], x["am"])
        loss = dyn_loss(lp, x["old"], x["adv"], action_mask=x["am"], batch_num_tokens=n_tokens,
                        entropy=entropy[:, -A:].detach())[0]
        loss.backward()
        del entropy_loss
        return loss.detach()

    def dynamo_new():
        lp, out = forward(False)
        ent = response_entropy(out["logits"], A, attention_mask=x["att"], chunk_bytes=chunk_bytes)
        loss = dyn_loss(lp, x["old"], x["adv"], action_mask=x["am"], batch_num_tokens=n_tokens, entropy=ent)[0]
        loss.backward()
        return loss.detach()

    return {"grpo": grpo, "dynamo_old": dynamo_old, "dynamo_old_eager": dynamo_old_eager, "dynamo_new": dynamo_new}


def _reset(actor):
    actor.zero_grad(set_to_none=True)
    gc.collect()


def peak_bytes(actor, step):
    """Peak of the c10 CPU allocator's running allocation during one call, above its start (bytes)."""
    _reset(actor)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation (+bytes) and free (-bytes) the allocator reported, in time order
    events = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, _, b in events:
        cur += b
        peak = max(peak, cur)
    return peak


def run(args):
    torch.set_num_threads(args.threads) if args.threads else None
    actor, x = build(args.vocab, args.hidden, args.batch, args.prompt, args.response, args.seed)
    steps = make_steps(actor, x, args.chunk_bytes)
    losses, grads = {}, {}
    for name in VARIANTS:  # warm-up (compiles compute_entropy), and the losses / gradients to compare
        _reset(actor)
        losses[name] = float(steps[name]())
        grads[name] = [p.grad.clone() for p in actor.parameters()]
    dyn_grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                        for a, b in zip(grads["dynamo_new"], grads["dynamo_old"]))
    del grads
    peaks = {name: peak_bytes(actor, steps[name]) for name in VARIANTS}
    wall = {n: [] for n in VARIANTS}
    cpu = {n: [] for n in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for name in order:
            _reset(actor)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    logits_bytes = args.batch * (args.prompt + args.response) * args.vocab * 4
    res = {
        "config": {k: getattr(args, k) for k in ("vocab", "hidden", "batch", "prompt", "response", "repeats",
                                                 "chunk_bytes", "threads", "seed")},
        "response_tokens": int(x["am"].sum()),
        "logits_bytes": logits_bytes,
        "peak_bytes": peaks,
        "wall_s": {n: statistics.median(v) for n, v in wall.items()},
        "cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
        "loss": losses,
        "dynamo_new_vs_old_max_rel_grad_diff": dyn_grad_diff,
    }
    g = peaks["grpo"]
    res["peak_vs_grpo"] = {n: peaks[n] / g for n in VARIANTS}
    res["wall_vs_grpo"] = {n: res["wall_s"][n] / res["wall_s"]["grpo"] for n in VARIANTS}
    res["cpu_vs_grpo"] = {n: res["cpu_s"][n] / res["cpu_s"]["grpo"] for n in VARIANTS}
    return res


def table(res) -> str:
    c = res["config"]
    lines = [f"vocab {c['vocab']:,}, hidden {c['hidden']}, {c['batch']} x ({c['prompt']} prompt + {c['response']} "
             f"response) tokens ({res['response_tokens']:,} valid response tokens); one float32 logits tensor = "
             f"{res['logits_bytes'] / 2**30:.2f} GiB; median of {c['repeats']} rounds",
             "",
             "| variant | peak (MiB) | peak / GRPO | wall (s) | wall / GRPO | CPU (s) | CPU / GRPO |",
             "|---|---|---|---|---|---|---|"]
    names = {"grpo": "OpenRLHF GRPO loss",
             "dynamo_old": "DynaMO before: OpenRLHF's entropy (autograd, entropy_coef 0, compiled)",
             "dynamo_old_eager": "DynaMO before, compute_entropy uncompiled (eager autograd)",
             "dynamo_new": "DynaMO now: no-graph chunked entropy"}
    for n in VARIANTS:
        lines.append(f"| {names[n]} | {res['peak_bytes'][n] / 2**20:.1f} | {res['peak_vs_grpo'][n]:.3f} | "
                     f"{res['wall_s'][n]:.2f} | {res['wall_vs_grpo'][n]:.2f} | {res['cpu_s'][n]:.2f} | "
                     f"{res['cpu_vs_grpo'][n]:.2f} |")
    lines += ["", f"DynaMO new vs old: loss {res['loss']['dynamo_new']:.9g} vs {res['loss']['dynamo_old']:.9g}, "
              f"largest gradient difference {res['dynamo_new_vs_old_max_rel_grad_diff']:.2e} of the entry's max"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=1280)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-bytes", dest="chunk_bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="vocab 4096, 2 x (16 + 128) tokens, 1 round: a smoke run")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.prompt, args.response, args.repeats = 4096, 32, 16, 128, 1
    for k in ("vocab", "hidden", "batch", "prompt", "response", "repeats", "chunk_bytes"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    res = run(args)
    print(table(res))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
