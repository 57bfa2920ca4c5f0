"""``python -m dynamo_openrlhf.train``: OpenRLHF 0.11.2's ``train_ppo_ray``, extended.

How it hooks OpenRLHF (its own code path runs; nothing of it is copied):

* ``openrlhf.cli.train_ppo_ray`` is executed with ``runpy.run_module(..., run_name="__main__")``,
  so its own parser (every flag, default and help text), validation and ``train()`` run.
* While it runs, ``argparse.ArgumentParser.parse_args`` is hooked for *that* parser only: the
  ``--dynamo.*`` group (``add_dynamo_arguments``) is added, a preset's values become parser
  defaults (so explicit flags win), argparse parses (an unknown flag is argparse's error, exit 2),
  and a built-in reward module name given to ``--reward.remote_url`` becomes its file path.
* ``openrlhf.utils.config.hierarchize`` is wrapped to keep the nested config, build a preset's
  assets and check that local input files exist (one clear error, exit 2) before Ray starts.
* ``ray.init`` is routed through ``cpu_backend.ray_init`` (same runtime env as OpenRLHF's, plus
  ours; connects to ``RAY_ADDRESS`` / a running cluster like ``ray.init()``; else a local
  cluster, with fake GPUs on the CPU backend).
* Class swaps read by the run's own imports: ``ppo_actor.PolicyModelActor`` ->
  ``DynamoPolicyModelActor`` and ``ppo_trainer.PPOTrainer`` -> ``DynamoPPOTrainer`` (Ray actor
  subclasses of OpenRLHF's). ``DynamoPPOTrainer`` records per-step metrics (``history``, also
  ``<run_dir>/metrics.jsonl``), can evaluate before the first and after the last step, and keeps
  its extra state in OpenRLHF's checkpoints (``client_states["dynamo"]``, restored on
  ``--ckpt.load_enable``).
* Without CUDA, ``cpu_backend`` adapts the loop to CPU (see its docstring).

Everything is undone when the run returns. After the run a short summary is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import runpy
import sys
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = ["main", "add_dynamo_arguments", "PRESETS", "DynamoPPOTrainer", "DynamoPolicyModelActor"]

OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
PROG = "python -m dynamo_openrlhf.train"
BUILTIN_REWARDS = ("dynamo_openrlhf.reward",)


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def add_dynamo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--dynamo.*`` flags, in OpenRLHF's dotted style (``args.dynamo.<name>`` after
    OpenRLHF's ``hierarchize``). The one place where DynaMO flags are defined."""
    g = parser.add_argument_group(
        "DynaMO (dynamo_openrlhf)",
        "Flags added by dynamo_openrlhf. Every other flag is OpenRLHF 0.11.2's train_ppo_ray, unchanged. "
        "A preset sets defaults; flags given explicitly override it.",
    )
    g.add_argument(
        "--dynamo.preset",
        type=str,
        default="none",
        choices=sorted(PRESETS),
        help="Preset of OpenRLHF flags. tiny-cpu: a locally built tiny Llama + char tokenizer, a generated "
        "arithmetic problem set and a short supervised warm start (cached), GRPO on CPU in a few minutes.",
    )
    g.add_argument(
        "--dynamo.backend",
        type=str,
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="cpu: run the loop on CPU (stand-ins for flash-attn/vLLM/NCCL, fake Ray GPUs, transformers rollout "
        "engine). auto: cpu iff this process sees no CUDA. Pass gpu when submitting from a CPU-only head node to a "
        "GPU cluster.",
    )
    g.add_argument(
        "--dynamo.run_dir",
        type=str,
        default=None,
        help="Run directory: metrics.jsonl is written there; a preset also puts its checkpoints, final model and "
        "TensorBoard logs there (default: ./runs/<preset> with a preset, else no metrics file).",
    )
    g.add_argument(
        "--dynamo.cache_dir",
        type=str,
        default=None,
        help="Where presets cache what they build (default: $DYNAMO_OPENRLHF_CACHE or ~/.cache/dynamo_openrlhf).",
    )
    g.add_argument(
        "--dynamo.eval_at_start",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Evaluate on --eval.dataset before the first step (OpenRLHF's evaluate(); not when resuming).",
    )
    g.add_argument(
        "--dynamo.eval_at_end",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Evaluate on --eval.dataset after the last step unless --eval.steps already did.",
    )
    g.add_argument(
        "--dynamo.reward_timeout",
        type=float,
        default=5.0,
        help="Per-sample wall-clock budget in seconds of the built-in math-verify reward (dynamo_openrlhf.reward).",
    )
    g.add_argument(
        "--dynamo.reward_dump",
        type=str,
        default=None,
        help="Debug: append one JSON line per scored sample (prompt, response, label, extracted answer, status, "
        "reward) to this file (built-in math reward only).",
    )
    return parser


def _tiny_cpu_preset(ns: argparse.Namespace) -> Dict[str, Any]:
    from dynamo_openrlhf import tiny

    run_dir = getattr(ns, "dynamo.run_dir") or os.path.join("runs", "tiny-cpu")
    root = tiny.asset_root(getattr(ns, "dynamo.cache_dir"))
    return {
        "dynamo.run_dir": run_dir,
        "dynamo.eval_at_start": True,
        "dynamo.eval_at_end": True,
        # model, data, reward
        "actor.model_name_or_path": str(root / "model"),
        "data.prompt_dataset": str(root / "data" / "train.jsonl"),
        "eval.dataset": str(root / "data" / "eval.jsonl"),
        "data.input_key": "prompt",
        "data.label_key": "answer",
        "data.apply_chat_template": True,
        "reward.remote_url": "dynamo_openrlhf.reward",
        # GRPO, no KL (no reference model)
        "algo.advantage.estimator": "group_norm",
        "algo.kl.init_coef": 0.0,
        "rollout.n_samples_per_prompt": 4,
        "rollout.batch_size": 32,
        "rollout.micro_batch_size": 16,
        "rollout.max_new_tokens": 12,
        "rollout.temperature": 1.0,
        "data.max_len": 48,
        "data.max_samples": 768,  # 768 prompts / 32 per step = 24 steps
        "train.batch_size": 128,  # one optimizer step per rollout step
        "train.micro_batch_size": 16,
        "actor.adam.lr": 2e-4,
        "actor.lr_warmup_ratio": 0.0,
        "actor.lr_scheduler": "constant",
        "eval.n_samples_per_prompt": 8,
        "eval.temperature": 1.0,
        # one actor rank, one rollout engine; DeepSpeed ZeRO-2, bf16 (OpenRLHF accepts bf16/fp16 only)
        "actor.num_nodes": 1,
        "actor.num_gpus_per_node": 1,
        "ref.num_gpus_per_node": 1,
        "reward.num_gpus_per_node": 1,
        "critic.num_gpus_per_node": 1,
        "vllm.num_engines": 1,
        "ds.zero_stage": 2,
        "ds.param_dtype": "bf16",
        "ds.attn_implementation": "sdpa",
        # outputs
        "ckpt.path": os.path.join(run_dir, "ckpt"),
        "ckpt.output_dir": os.path.join(run_dir, "final"),
        "ckpt.save_steps": 8,
        "ckpt.max_num": 2,
        "logger.tensorboard_dir": os.path.join(run_dir, "tensorboard"),
    }


def _build_tiny_cpu(args) -> None:
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets(args.dynamo.cache_dir)


# Defaults that differ on the CPU backend (explicit flags still win; --help shows OpenRLHF's).
CPU_DEFAULTS = {"ds.attn_implementation": "sdpa"}

# name -> (defaults(namespace) -> {dest: value}, build(nested args) -> None)
PRESETS: Dict[str, Optional[tuple]] = {
    "none": None,
    "tiny-cpu": (_tiny_cpu_preset, _build_tiny_cpu),
}


# ----------------------------------------------------------------------------------------------
# Argument post-processing and checks
# ----------------------------------------------------------------------------------------------


def _resolve_reward_modules(value: Optional[str]) -> Optional[str]:
    """``--reward.remote_url`` entries naming an importable module with ``reward_func`` (e.g.
    ``dynamo_openrlhf.reward``) become that module's file path, which OpenRLHF loads."""
    if not value:
        return value
    out = []
    for entry in value.split(","):
        e = entry.strip()
        if e and "://" not in e and not e.endswith(".py") and not os.path.exists(e):
            try:
                spec = importlib.util.find_spec(e)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                module = importlib.import_module(e)
                if not callable(getattr(module, "reward_func", None)):
                    raise ValueError(f"--reward.remote_url {e}: module has no reward_func(queries, prompts, labels)")
                e = spec.origin
        out.append(e)
    return ",".join(out)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.splitext(path)[1].lower() in (
        ".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")


def _preflight(args) -> List[str]:
    """Problems with local input paths, found before anything expensive starts."""
    problems = []
    for flag, value in (("--data.prompt_dataset", args.data.prompt_dataset), ("--eval.dataset", args.eval.dataset)):
        if not value:
            continue
        for entry in value.split(","):
            path = entry.split("@")[0].strip()
            if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
                problems.append(f"{flag}: dataset file not found: {path}")
    if not args.data.prompt_dataset:
        problems.append("--data.prompt_dataset is required (or use --dynamo.preset tiny-cpu)")
    model = args.actor.model_name_or_path
    if not model:
        problems.append("--actor.model_name_or_path is required (or use --dynamo.preset tiny-cpu)")
    elif _looks_local(model) and not os.path.exists(os.path.expanduser(model)):
        problems.append(f"--actor.model_name_or_path: model directory not found: {model}")
    for url in (args.reward.remote_url or "").split(","):
        if url.endswith(".py") and not os.path.exists(url):
            problems.append(f"--reward.remote_url: reward function file not found: {url}")
    if not args.vllm.num_engines:
        problems.append("--vllm.num_engines must be >= 1: OpenRLHF 0.11.2 generates rollouts with vLLM engines only "
                        "(on the CPU backend they are transformers engines)")
    if args.dynamo.backend == "cpu":
        if args.ds.packing_samples:
            problems.append("--ds.packing_samples needs flash-attn kernels: not available on the CPU backend")
        if "flash" in str(args.ds.attn_implementation):
            problems.append(f"--ds.attn_implementation {args.ds.attn_implementation} needs CUDA: use sdpa or eager "
                            "on the CPU backend")
        if args.vllm.tensor_parallel_size != 1:
            problems.append("--vllm.tensor_parallel_size must be 1 on the CPU backend")
    return problems


# ----------------------------------------------------------------------------------------------
# Ray actor subclasses (built on first access, after the version check; PEP 562)
# ----------------------------------------------------------------------------------------------


def _ensure_backend(args) -> None:
    if getattr(getattr(args, "dynamo", None), "backend", None) == "cpu":
        from dynamo_openrlhf import cpu_backend

        cpu_backend.apply_cpu_patches()


def _scalars(d: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def _build_actor_classes() -> None:
    import ray

    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor

    class DynamoPPOTrainer(ppo_trainer.PPOTrainer.__ray_actor_class__):
        """OpenRLHF's single-controller ``PPOTrainer`` plus: a per-step metrics history, optional
        evaluation before the first / after the last step, and DynaMO state in checkpoints.

        Extension points for DynaMO: ``dynamo_state_dict`` / ``load_dynamo_state_dict`` (saved in
        every OpenRLHF checkpoint's ``client_states["dynamo"]``); ``self.samples_generator`` and
        ``self.experience_maker`` are built by ``PPOTrainer.__init__``.
        """

        def __init__(self, pretrain, strategy, *args, **kwargs):
            _ensure_backend(strategy.args)
            self.history: List[Dict[str, Any]] = []
            self._evaluated_steps = set()
            self._last_step = 0
            run_dir = strategy.args.dynamo.run_dir
            self._metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
            super().__init__(pretrain, strategy, *args, **kwargs)

        # -- state kept in OpenRLHF checkpoints -------------------------------------------------
        def dynamo_state_dict(self) -> Dict[str, Any]:
            return {"version": 1, "history": list(self.history)}

        def load_dynamo_state_dict(self, state: Dict[str, Any]) -> None:
            self.history = list(state.get("history", []))

        def init_checkpoint_states(self):
            states = super().init_checkpoint_states()
            if states.get("dynamo"):
                self.load_dynamo_state_dict(states["dynamo"])
            return states

        # -- metrics ---------------------------------------------------------------------------
        def _record(self, row: Dict[str, Any]) -> None:
            self.history.append(row)
            if self._metrics_path:
                os.makedirs(os.path.dirname(self._metrics_path) or ".", exist_ok=True)
                with open(self._metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

        def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
            self._last_step = global_step
            row = {"type": "train", "step": global_step, "time": time.time(), **_scalars(logs_dict or {})}
            self._record(row)
            if client_states is not None:
                client_states["dynamo"] = self.dynamo_state_dict()
            return super().save_logs_and_checkpoints(global_step, logs_dict, client_states)

        def evaluate(self, global_step, **generate_kwargs):
            logs = super().evaluate(global_step, **generate_kwargs)
            self._evaluated_steps.add(global_step)
            self._record({"type": "eval", "step": global_step, "time": time.time(), **_scalars(logs or {})})
            return logs

        def _dynamo_evaluate(self, global_step):
            kwargs = dict(self.generate_kwargs)
            kwargs["temperature"] = self.args.eval.temperature
            kwargs["n_samples_per_prompt"] = self.args.eval.n_samples_per_prompt
            self.evaluate(global_step, **kwargs)

        def fit(self, global_step: int = 0) -> None:
            dyn = self.args.dynamo
            # OpenRLHF closes its loggers at the end of fit(); keep them open for the final eval.
            closers = []
            for lg in (self.wandb_logger, self.tensorboard_logger):
                if lg is not None:
                    closers.append(lg.close)
                    lg.close = lambda: None
            try:
                fresh = self.init_checkpoint_states().get("global_step", 0) == 0
                if fresh and self._metrics_path and os.path.exists(self._metrics_path):
                    os.remove(self._metrics_path)  # a new run; a resumed one appends
                if self.eval_dataloader is not None and dyn.eval_at_start and fresh:
                    self._dynamo_evaluate(global_step)
                super().fit(global_step)
                if (self.eval_dataloader is not None and dyn.eval_at_end and self._last_step > 0
                        and self._last_step not in self._evaluated_steps):
                    self._dynamo_evaluate(self._last_step)
            finally:
                for close in closers:
                    close()

        def get_dynamo_history(self) -> List[Dict[str, Any]]:
            return list(self.history)

    class DynamoPolicyModelActor(ppo_actor.PolicyModelActor.__ray_actor_class__):
        """OpenRLHF's ``PolicyModelActor``; applies the CPU backend in its process when chosen
        (also without the Ray setup hook, e.g. when Ray was initialised by the caller)."""

        def init_model_from_pretrained(self, strategy, *args, **kwargs):
            _ensure_backend(strategy.args)
            return super().init_model_from_pretrained(strategy, *args, **kwargs)

    for cls in (DynamoPPOTrainer, DynamoPolicyModelActor):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    globals()["DynamoPPOTrainer"] = ray.remote(DynamoPPOTrainer)
    globals()["DynamoPolicyModelActor"] = ray.remote(num_gpus=1)(DynamoPolicyModelActor)


def __getattr__(name: str):
    if name in ("DynamoPPOTrainer", "DynamoPolicyModelActor"):
        _build_actor_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Hooks around OpenRLHF's CLI
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """Stands for an ActorClass; remembers the handle ``.remote()`` returned."""

    def __init__(self, actor_class):
        self._cls = actor_class
        self.handle = None

    def remote(self, *args, **kwargs):
        self.handle = self._cls.remote(*args, **kwargs)
        return self.handle

    def options(self, *args, **kwargs):
        return self._cls.options(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cls, name)


class _Hooks:
    """Installs the hooks described in the module docstring; ``with`` undoes them."""

    def __init__(self, argv: List[str], backend: str):
        self.argv = argv
        self.backend = backend
        self.parser: Optional[argparse.ArgumentParser] = None
        self.args = None  # nested config (OpenRLHF's hierarchize output)
        self.training_started = False
        self.trainer = None
        self._undo: List[Callable[[], None]] = []

    def _patch(self, obj, name, value) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def __enter__(self):
        import ray

        import openrlhf.utils
        import openrlhf.utils.config
        from openrlhf.trainer import ppo_trainer
        from openrlhf.trainer.ray import ppo_actor

        hooks = self
        orig_parse_args = argparse.ArgumentParser.parse_args

        def parse_args(parser, args=None, namespace=None):
            if hooks.parser is None and "--actor.model_name_or_path" in parser._option_string_actions:
                hooks.parser = parser
                return hooks._parse(parser, orig_parse_args)
            return orig_parse_args(parser, args, namespace)

        self._patch(argparse.ArgumentParser, "parse_args", parse_args)

        orig_hierarchize = openrlhf.utils.config.hierarchize

        def hierarchize(flat):
            nested = orig_hierarchize(flat)
            if hooks.args is None and hasattr(nested, "dynamo"):
                hooks.args = nested
                hooks._prepare(nested)
            return nested

        self._patch(openrlhf.utils.config, "hierarchize", hierarchize)

        orig_get_strategy = openrlhf.utils.get_strategy

        def get_strategy(args):
            hooks.training_started = True
            return orig_get_strategy(args)

        self._patch(openrlhf.utils, "get_strategy", get_strategy)

        orig_ray_init = ray.init

        def ray_init(*args, runtime_env=None, **kwargs):
            from dynamo_openrlhf import cpu_backend

            hooks.training_started = True
            env = dict(runtime_env or {})
            env["env_vars"] = {**(env.get("env_vars") or {}), **hooks.env_vars()}
            num_gpus = cpu_backend.required_gpus(hooks.args) if hooks.args is not None else 1
            return cpu_backend.ray_init(
                env, cpu_backend=hooks.backend == "cpu", num_gpus=num_gpus, init=orig_ray_init, **kwargs
            )

        self._patch(ray, "init", ray_init)

        self.trainer = _Recorder(sys.modules[__name__].DynamoPPOTrainer)
        self._patch(ppo_trainer, "PPOTrainer", self.trainer)
        self._patch(ppo_actor, "PolicyModelActor", sys.modules[__name__].DynamoPolicyModelActor)
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False

    # -- parsing -----------------------------------------------------------------------------
    def _parse(self, parser, orig_parse_args):
        parser.prog = PROG
        add_dynamo_arguments(parser)
        first, _ = parser.parse_known_args(self.argv)
        if self.backend == "cpu":
            parser.set_defaults(**CPU_DEFAULTS)
        preset = PRESETS.get(getattr(first, "dynamo.preset"))
        if preset is not None:
            parser.set_defaults(**preset[0](first))
        ns = orig_parse_args(parser, self.argv)
        setattr(ns, "dynamo.backend", self.backend)
        try:
            setattr(ns, "reward.remote_url", _resolve_reward_modules(getattr(ns, "reward.remote_url")))
        except ValueError as e:
            parser.error(str(e))
        return ns

    def _prepare(self, args) -> None:
        preset = PRESETS.get(args.dynamo.preset)
        if preset is not None:
            preset[1](args)
        problems = _preflight(args)
        if problems:
            self.parser.error("; ".join(problems))
        if args.dynamo.run_dir:
            os.makedirs(args.dynamo.run_dir, exist_ok=True)
        os.environ.update(self.env_vars())

    def env_vars(self) -> Dict[str, str]:
        """Environment for every Ray worker of the run (the reward function reads it)."""
        env = {}
        if self.args is not None:
            env["DYNAMO_REWARD_TIMEOUT_S"] = str(self.args.dynamo.reward_timeout)
            if self.args.dynamo.reward_dump:
                env["DYNAMO_REWARD_DUMP"] = os.path.abspath(self.args.dynamo.reward_dump)
        return env


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def format_summary(history: List[Dict[str, Any]], args, wall_s: float) -> str:
    train = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval"]
    lines = ["", "=" * 78, f"dynamo_openrlhf run summary: {len(train)} steps, {wall_s:.0f}s wall"]
    rewards = [(r["step"], r.get("rollout/reward_mean")) for r in train]
    if rewards:
        lines.append("  rollout/reward_mean per step:")
        for i in range(0, len(rewards), 8):
            chunk = rewards[i:i + 8]
            lines.append(f"    {chunk[0][0]:>4}-{chunk[-1][0]:<4} " + " ".join(_fmt(v) for _, v in chunk))
        outcomes = ("correct", "wrong", "malformed", "timeout", "error")
        shares = {o: [r.get(f"math_{o}") for r in train if r.get(f"math_{o}") is not None] for o in outcomes}
        if all(shares.values()):
            lines.append("  math-verify outcomes (share of samples): "
                         + ", ".join(f"{o} {sum(v) / len(v):.3f}" for o, v in shares.items()))
    if evals:
        keys = sorted(k for k in evals[0] if k.startswith("eval_") and "_pass" in k)
        first, last = evals[0], evals[-1]
        desc = f"eval on {args.eval.dataset} ({args.eval.n_samples_per_prompt} samples/prompt, " \
               f"temperature {args.eval.temperature}):"
        lines.append("  " + desc)
        for k in keys:
            after = f" -> step {last['step']}: {_fmt(last.get(k))}" if last is not first else ""
            lines.append(f"    {k}: step {first['step']}: {_fmt(first.get(k))}{after}")
    ckpt_dir = os.path.join(args.ckpt.path, "_actor")
    latest = os.path.join(ckpt_dir, "latest")
    tag = open(latest).read().strip() if os.path.exists(latest) else None
    lines.append(f"  final model (HF): {os.path.abspath(args.ckpt.output_dir)}")
    lines.append(f"  checkpoints:      {os.path.abspath(ckpt_dir)}" + (f" (latest: {tag})" if tag else " (none saved)"))
    if args.logger.tensorboard_dir:
        lines.append(f"  tensorboard:      {os.path.abspath(args.logger.tensorboard_dir)}")
    if args.dynamo.run_dir:
        lines.append(f"  metrics:          {os.path.abspath(os.path.join(args.dynamo.run_dir, 'metrics.jsonl'))}")
    if args.dynamo.reward_dump:
        lines.append(f"  reward dump:      {os.path.abspath(args.dynamo.reward_dump)}")
    lines.append("=" * 78)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _early_backend(argv: List[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dynamo.backend", default="auto", choices=["auto", "cpu", "gpu"])
    known, _ = pre.parse_known_args(argv)
    backend = getattr(known, "dynamo.backend")
    if backend == "auto":
        import torch

        backend = "gpu" if torch.cuda.is_available() else "cpu"
    return backend


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from dynamo_openrlhf import cpu_backend, version_check

    # 1. the right OpenRLHF, before importing any of it
    try:
        version_check.check_openrlhf(symbols=())
    except version_check.OpenRLHFVersionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    backend = _early_backend(argv)
    if backend == "cpu":
        cpu_backend.set_cpu_env()
    cpu_backend.install_import_stand_ins()
    try:
        version_check.check_openrlhf()
    except version_check.OpenRLHFVersionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if backend == "cpu":
        cpu_backend.apply_cpu_patches()
    # the check imported the CLI module; runpy must execute a fresh copy as __main__
    sys.modules.pop(OPENRLHF_CLI, None)

    t0 = time.time()
    old_argv = sys.argv
    sys.argv = [PROG] + argv
    try:
        with _Hooks(argv, backend) as hooks:
            try:
                runpy.run_module(OPENRLHF_CLI, run_name="__main__", alter_sys=True)
            except AssertionError as e:
                if hooks.training_started:
                    raise
                print(f"{PROG}: error: invalid arguments: {e}", file=sys.stderr)
                return 2
    finally:
        sys.argv = old_argv
    import ray

    history = []
    if hooks.trainer is not None and hooks.trainer.handle is not None:
        history = ray.get(hooks.trainer.handle.get_dynamo_history.remote())
    print(format_summary(history, hooks.args, time.time() - t0), flush=True)
    if ray.is_initialized():
        ray.shutdown()
    return 0


if __name__ == "__main__":
    # Run the importable copy, so Ray pickles our actor classes by reference, not by value.
    from dynamo_openrlhf.train import main as _main

    raise SystemExit(_main())
