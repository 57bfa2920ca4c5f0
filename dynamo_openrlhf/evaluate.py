"""pass@k evaluation of a policy on a JSONL prompt/label file, scored with the training reward.

``python -m dynamo_openrlhf.evaluate --model DIR --data.path eval.jsonl --n 16 --k 1,4,16 --output out.json``
(or ``--preset tiny-cpu`` for the tiny preset's warm-started model and eval split).

For every prompt, ``n`` responses are sampled (vLLM when it is importable and CUDA is available,
else Hugging Face ``model.generate`` in-process) and scored with the same math-verify reward as
training (:class:`dynamo_openrlhf.reward.MathReward`, bounded time per sample). With ``c`` correct
out of ``n``, pass@k uses the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` per prompt, averaged
over prompts, with a seeded bootstrap confidence interval over prompts (the estimator and the success
rule live in :mod:`dynamo_openrlhf.metrics`; this module is only the CLI). Also reported: a breakdown
by a tag field (``difficulty`` when present), and the fraction of prompts whose pass rate is 0, 1,
or in between. Writes a JSON file and prints a short markdown table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

from dynamo_openrlhf.metrics import is_success, summarize
from dynamo_openrlhf.sampling import sample_batch

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _vllm_usable() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def _prompt_text(tokenizer, prompt: str, chat: bool) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def generate_hf(model_dir: str, prompts: Sequence[str], n: int, chat: bool, temperature: float, top_p: float,
                max_new_tokens: int, seed: int, batch_size: int = 256) -> List[List[str]]:
    """``n`` sampled responses per prompt with transformers ``generate`` (left padding, in-process)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.environ.get("DYNAMO_OPENRLHF_CPU_THREADS"):
        torch.set_num_threads(int(os.environ["DYNAMO_OPENRLHF_CPU_THREADS"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if device == "cpu" else "auto")
    model = model.to(device).eval()
    torch.manual_seed(seed)
    per_batch = max(1, batch_size // n)
    out: List[List[str]] = []
    with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            enc = [tokenizer(_prompt_text(tokenizer, p, chat), add_special_tokens=not chat)["input_ids"] for p in chunk]
            texts = sample_batch(model, tokenizer, enc, n, temperature, top_p, max_new_tokens, device)
            for i in range(len(chunk)):
                out.append(texts[i * n : (i + 1) * n])
            bar.update(len(chunk))
    return out


def generate_vllm(model_dir: str, prompts: Sequence[str], n: int, chat: bool, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int) -> List[List[str]]:  # pragma: no cover - needs a GPU
    """``n`` sampled responses per prompt with vLLM (GPU)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=seed)
    tokenizer = llm.get_tokenizer()
    texts = [_prompt_text(tokenizer, p, chat) for p in prompts]
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    results = llm.generate(texts, params, use_tqdm=True)
    return [[o.text for o in r.outputs] for r in results]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynamo_openrlhf.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny-cpu"], default=None,
                   help="tiny-cpu: the tiny preset's warm-started model and eval split (built and cached once)")
    p.add_argument("--tiny_task", choices=["arith", "carry"], default="carry",
                   help="problem set of --preset tiny-cpu, as the trainer's --dynamo.tiny_task (default carry)")
    p.add_argument("--cache_dir", default=None, help="preset cache root (default: $DYNAMO_OPENRLHF_CACHE or ~/.cache/dynamo_openrlhf)")
    p.add_argument("--model", default=None, help="Hugging Face model directory, or a training run directory "
                   "(--dynamo.run_dir; its final/ HF model is used)")
    p.add_argument("--data.path", dest="data.path", default=None, help="JSONL file of prompts and labels")
    p.add_argument("--data.input_key", dest="data.input_key", default="input", help="prompt field (default: input)")
    p.add_argument("--data.label_key", dest="data.label_key", default="label", help="gold answer field (default: label)")
    p.add_argument("--data.apply_chat_template", dest="data.apply_chat_template", action=argparse.BooleanOptionalAction,
                   default=True, help="wrap prompts in the tokenizer's chat template (default: on)")
    p.add_argument("--data.tag_key", dest="data.tag_key", default=None,
                   help="field for the per-tag breakdown (default: 'difficulty' if the data has it; '' disables)")
    p.add_argument("--n", type=int, default=16, help="samples per prompt (default: 16)")
    p.add_argument("--k", default="1,4,16", help="comma-separated k values, each <= n (default: 1,4,16)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: 1024 (16 with --preset tiny-cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_prompts", type=int, default=None, help="evaluate only the first N prompts")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over prompts (default: 1000)")
    p.add_argument("--batch_size", type=int, default=256, help="sequences per HF generate call (default: 256)")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto",
                   help="auto: vLLM if importable and CUDA is available, else HF generate")
    p.add_argument("--output", default=None, help="JSON output path (default: print only)")
    return p


def _parse_ks(parser, text: str, n: int) -> List[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--k must be comma-separated integers (got {text!r})")
    if not ks or ks[0] < 1:
        parser.error(f"--k values must be >= 1 (got {text!r})")
    if ks[-1] > n:
        parser.error(f"--k {ks[-1]} > --n {n}: pass@k needs k <= n samples per prompt")
    return ks


def _load_rows(parser, path: str, input_key: str, label_key: str) -> List[dict]:
    p = Path(path)
    if not p.is_file():
        parser.error(f"--data.path: data file not found: {path}")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                parser.error(f"--data.path: {path}:{lineno} is not valid JSON ({e.msg})")
            if not isinstance(row, dict):
                parser.error(f"--data.path: {path}:{lineno} is not a JSON object")
            for flag, key in (("--data.input_key", input_key), ("--data.label_key", label_key)):
                if key not in row:
                    parser.error(f"{flag}: key {key!r} missing in {path}:{lineno} (keys there: {sorted(row)})")
            rows.append(row)
    if not rows:
        parser.error(f"--data.path: {path} has no rows")
    return rows


def _table(result: Dict) -> str:
    ks = list(result["pass_at_k"])
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    for k in ks:
        v = result["pass_at_k"][k]
        lines.append(f"| pass@{k} | {v['mean']:.4f} | [{v['ci_low']:.4f}, {v['ci_high']:.4f}] |")
    fr = result["pass_rate_fractions"]
    lines.append(f"| prompts with pass rate 0 / between / 1 | {fr['zero']:.3f} / {fr['between']:.3f} / {fr['one']:.3f} | |")
    if result.get("by_tag"):
        lines += ["", f"| {result['tag_key']} | prompts | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for g, v in result["by_tag"].items():
            lines.append(f"| {g} | {v['num_prompts']} | " + " | ".join(f"{v['pass_at_k'][k]:.4f}" for k in ks) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    opt = lambda name: getattr(args, name)  # noqa: E731 - dotted dests

    if args.preset == "tiny-cpu":
        from dynamo_openrlhf.tiny import TinyConfig, prepare_tiny_assets

        assets = prepare_tiny_assets(args.cache_dir, TinyConfig(task=args.tiny_task),
                                     log=lambda m: print(m, file=sys.stderr))
        explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        if args.model is None:
            args.model = str(assets.model_dir)
        if opt("data.path") is None:
            setattr(args, "data.path", str(assets.eval_file))
        if "--data.input_key" not in explicit:
            setattr(args, "data.input_key", "prompt")
        if "--data.label_key" not in explicit:
            setattr(args, "data.label_key", "answer")
        if args.max_new_tokens is None:
            args.max_new_tokens = 16
    if args.max_new_tokens is None:
        args.max_new_tokens = 1024

    if args.model is None:
        parser.error("--model is required (or use --preset tiny-cpu)")
    if opt("data.path") is None:
        parser.error("--data.path is required (or use --preset tiny-cpu)")
    if args.n < 1:
        parser.error(f"--n must be >= 1 (got {args.n})")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top_p must be in (0, 1] (got {args.top_p})")
    ks = _parse_ks(parser, args.k, args.n)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        parser.error(f"--model: model directory not found: {args.model}")
    if not (model_dir / "config.json").is_file() and (model_dir / "final" / "config.json").is_file():
        model_dir = model_dir / "final"  # a run directory of `python -m dynamo_openrlhf.train` (its final HF model)
        args.model = str(model_dir)
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model: {args.model} has no config.json (not a Hugging Face model directory, nor a run "
                     "directory with final/; DeepSpeed checkpoints under ckpt/ must be converted first)")
    input_key, label_key = opt("data.input_key"), opt("data.label_key")
    rows = _load_rows(parser, opt("data.path"), input_key, label_key)
    if args.max_prompts is not None:
        rows = rows[: max(0, args.max_prompts)]
        if not rows:
            parser.error("--max_prompts must be >= 1")
    tag_key = opt("data.tag_key")
    if tag_key is None:
        tag_key = "difficulty" if all("difficulty" in r for r in rows) else ""
    elif tag_key and not all(tag_key in r for r in rows):
        parser.error(f"--data.tag_key: key {tag_key!r} missing in some rows of {opt('data.path')}")

    engine = args.engine
    if engine == "auto":
        engine = "vllm" if _vllm_usable() else "hf"
    elif engine == "vllm" and not _vllm_usable():
        parser.error("--engine vllm needs vllm installed and a CUDA device (use --engine hf)")

    t0 = time.time()
    prompts = [str(r[input_key]) for r in rows]
    chat = bool(opt("data.apply_chat_template"))
    gen_args = (str(model_dir), prompts, args.n, chat, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    if engine == "vllm":  # pragma: no cover - needs a GPU
        responses = generate_vllm(*gen_args)
    else:
        responses = generate_hf(*gen_args, batch_size=args.batch_size)
    t_gen = time.time() - t0

    from tqdm import tqdm

    from dynamo_openrlhf.reward import STATUSES, MathReward

    scorer = MathReward()
    statuses = {s: 0 for s in STATUSES}
    successes: List[int] = []
    try:
        for row, resp in tqdm(list(zip(rows, responses)), desc="score", unit="prompt", file=sys.stderr):
            c = 0
            for text in resp:
                s = scorer.score(text, row[label_key])
                statuses[s.status] += 1
                c += int(is_success(s.reward, 0.5))  # the rule of the pool and in-training pass@k
            successes.append(c)
    finally:
        scorer.close()

    tags = [r[tag_key] for r in rows] if tag_key else None
    summary = summarize(successes, args.n, ks, tags, resamples=args.bootstrap, seed=args.seed)
    result = {
        "model": str(model_dir),
        "data": str(opt("data.path")),
        "preset": args.preset,
        "engine": engine,
        "n": args.n,
        "k": ks,
        "num_prompts": len(rows),
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "apply_chat_template": chat,
        "bootstrap": args.bootstrap,
        "tag_key": tag_key or None,
        **summary,
        "statuses": statuses,
        "per_prompt": [{"index": i, "id": r.get("id"), "correct": c, **({"tag": r[tag_key]} if tag_key else {})}
                       for i, (r, c) in enumerate(zip(rows, successes))],
        "seconds": {"generate": t_gen, "total": time.time() - t0},
    }
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    print(f"engine={engine} n={args.n} prompts={len(rows)} model={model_dir}")
    print(_table(result))
    if args.output:
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
