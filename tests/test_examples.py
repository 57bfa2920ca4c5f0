"""examples/*.sh: valid bash, and every flag they pass is accepted by ``python -m dynamo_openrlhf.train``.

Each script runs with stub ``ray`` and ``python`` commands first on PATH that record their argv (no
cluster, no training). The recorded ``dynamo_openrlhf.train`` arguments then go through
``dynamo_openrlhf.train.main`` in one helper process, stopped before anything starts:

* GPU scripts ("full"): OpenRLHF's parser + the --dynamo group, our preset/path/DynaMO checks, OpenRLHF's
  own argument validation, up to ``get_strategy`` (the first step of ``train()``; ``ray.is_initialized``
  says True so no Ray starts). ``--dynamo.backend gpu`` in the scripts keeps the CPU backend out.
* CPU scripts ("parse"): parsing only (the tiny preset's assets are not built), stopped at ``hierarchize``.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from subprocess import list2cmdline

import pytest

from dynamo_openrlhf import PassRatePool

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))
GPU_SCRIPTS = [
    "qwen2.5-math-1.5b_dynamo.sh",
    "qwen2.5-math-1.5b_dynamo_paper.sh",
    "qwen2.5-math-1.5b_grpo_baseline.sh",
    "qwen2.5-math-7b_dynamo.sh",
    "qwen2.5-math-7b_grpo_baseline.sh",
    "qwen2.5-math-7b_dynamo_multinode.sh",
]
CPU_SCRIPTS = ["tiny_cpu.sh", "tiny_cpu_dynamo.sh", "tiny_cpu_rloo.sh"]
# (DynaMO run, its baseline): the GRPO baselines are the paper recipe (RECIPE=paper) with DynaMO off
PAIRS = [
    ("qwen2.5-math-1.5b_dynamo_paper.sh", "qwen2.5-math-1.5b_grpo_baseline.sh"),
    ("7b+paper", "qwen2.5-math-7b_grpo_baseline.sh"),
    ("tiny_cpu_dynamo.sh", "tiny_cpu_rloo.sh"),
]
EXTRA = ["--train.seed", "7"]  # forwarded "$@"
DATA_LINES = 1024

STUB = """#!/usr/bin/env bash
# records how it was called: one JSON file per call
exec "{python}" -c 'import json, os, sys; json.dump({{"cmd": os.path.basename(sys.argv[1]), "argv": sys.argv[2:]}}, open(os.environ["STUB_OUT"], "w"))' "$0" "$@"
"""

HELPER = r"""
import contextlib, io, json, sys, traceback
cases = json.load(sys.stdin)
from dynamo_openrlhf import cpu_backend
cpu_backend.install_import_stand_ins()
import ray
import openrlhf.utils
import openrlhf.utils.config
from dynamo_openrlhf import train as T

class Stop(Exception):
    def __init__(self, args):
        super().__init__("stopped")
        self.captured = args

orig_hierarchize = openrlhf.utils.config.hierarchize

def summary(a):
    from dynamo_openrlhf.allocation import AllocationConfig
    from dynamo_openrlhf.modulation import ModulationConfig

    alloc = AllocationConfig.from_args(a)
    mod = ModulationConfig.from_args(a)
    url = a.reward.remote_url
    return {
        "model": a.actor.model_name_or_path, "prompt_dataset": a.data.prompt_dataset,
        "input_key": a.data.input_key, "label_key": a.data.label_key,
        "rollout_batch_size": a.rollout.batch_size, "n_samples": a.rollout.n_samples_per_prompt,
        "temperature": a.rollout.temperature, "top_p": a.rollout.top_p,
        "lr": a.actor.adam.lr, "estimator": a.algo.advantage.estimator, "kl_init_coef": a.algo.kl.init_coef,
        "kl_use_loss": a.algo.kl.use_loss, "loss_agg_mode": a.actor.loss_agg_mode,
        "policy_loss_type": a.actor.policy_loss_type,
        "eps_clip_low_high": None if a.actor.eps_clip_low_high is None else list(a.actor.eps_clip_low_high),
        "eps_clip": a.actor.eps_clip, "dual_clip": a.actor.dual_clip, "entropy_coef": a.actor.entropy_coef,
        "zero_stage": a.ds.zero_stage, "actor_num_nodes": a.actor.num_nodes,
        "actor_gpus_per_node": a.actor.num_gpus_per_node, "vllm_num_engines": a.vllm.num_engines,
        "vllm_tp": a.vllm.tensor_parallel_size, "colocate_all": a.train.colocate_all,
        "reward_url": url if isinstance(url, (str, type(None))) else list(url),
        "train_batch_size": a.train.batch_size, "num_episodes": a.train.num_episodes,
        "preset": a.dynamo.preset, "backend": a.dynamo.backend, "run_dir": a.dynamo.run_dir,
        "eval_dataset": a.eval.dataset, "pool_load": a.dynamo.pool.load,
        "prompt_weighting": a.dynamo.loss.prompt_weighting,
        "allocation": None if alloc is None else {
            "rule": alloc.rule, "lo": alloc.lo, "hi": alloc.hi, "oversample": alloc.oversample,
            "skip_factor": alloc.skip_factor, "budget": alloc.budget, "candidates": alloc.candidates_per_step,
            "prior": list(alloc.prior), "forget": alloc.forget, "fit_prior_every": alloc.fit_prior_every,
            "success_threshold": alloc.success_threshold},
        "modulation": {"identity": mod.is_identity, "mu_max": mod.mu_max, "lambda_min": mod.lambda_min,
                       "gamma": mod.gamma, "tau": mod.tau},
    }

def stop_full(args):  # stands for openrlhf.utils.get_strategy: the first thing train() does
    raise Stop(args)

def stop_parse(flat):  # stands for hierarchize: right after parsing
    raise Stop(orig_hierarchize(flat))

results = []
for case in cases:
    res = {"name": case["name"]}
    err, out = io.StringIO(), io.StringIO()
    saved = [(ray, "is_initialized", ray.is_initialized), (openrlhf.utils, "get_strategy", openrlhf.utils.get_strategy),
             (openrlhf.utils.config, "hierarchize", openrlhf.utils.config.hierarchize)]
    if case["mode"] == "full":
        ray.is_initialized = lambda: True
        openrlhf.utils.get_strategy = stop_full
    else:
        openrlhf.utils.config.hierarchize = stop_parse
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = T.main(case["argv"])
        res["error"] = f"main returned {rc} before the stop point: {err.getvalue()[-3000:]}"
    except Stop as s:
        res["values"] = summary(s.captured)
    except SystemExit as e:
        res["error"] = f"exit {e.code}: {err.getvalue()[-3000:]}"
    except BaseException:
        res["error"] = traceback.format_exc()[-3000:] + err.getvalue()[-2000:]
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    results.append(res)
print("RESULTS " + json.dumps(results))
"""


def test_every_script_is_valid_bash():
    assert SCRIPTS, "no examples/*.sh"
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (script.name, r.stderr)
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script.name
        assert "set -euo pipefail" in text, script.name
        assert '"$@"' in text, f"{script.name} does not forward its arguments"


def test_the_expected_scripts_exist():
    assert {s.name for s in SCRIPTS} >= set(GPU_SCRIPTS + CPU_SCRIPTS)


def _record(script: str, tmp: Path, extra_env=None) -> dict:
    """Runs the script with the stubs; returns {"cmd": "ray"|"python", "argv": [...]}."""
    bin_dir = tmp / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name in ("ray", "python", "python3"):
            stub = bin_dir / name
            stub.write_text(STUB.format(python=sys.executable))
            stub.chmod(0o755)
    out = tmp / f"{script}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EVAL_DATA", "POOL_LOAD", "WANDB_API_KEY",
                                                            "NUM_EPISODES", "STEPS", "MODEL", "RUN_NAME")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_OUT=str(out), DATA=str(tmp / "train.jsonl"),
               OUTPUT_ROOT=str(tmp / "runs"), RUN_NAME="run", RAY_ADDRESS="http://head:8265")
    env.update(extra_env or {})
    r = subprocess.run(["bash", str(EXAMPLES / script), *EXTRA], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, (script, r.stdout, r.stderr)
    return json.loads(out.read_text())


def _train_args(rec: dict) -> list:
    argv = rec["argv"]
    if rec["cmd"] == "ray":
        assert argv[:2] == ["job", "submit"], argv[:4]
        assert any(a.startswith("--address=") for a in argv[: argv.index("--")])
        entry = argv[argv.index("--") + 1:]
        # ray job submit joins the entrypoint with subprocess.list2cmdline and runs it through a shell
        assert shlex.split(list2cmdline(entry)) == entry, "an entrypoint token would not survive Ray's quoting"
    else:
        entry = ["python", *argv]
    assert entry[:3] == ["python", "-m", "dynamo_openrlhf.train"], entry[:3]
    return entry[3:]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    (tmp / "train.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n"
                                             for i in range(DATA_LINES)))
    (tmp / "eval.jsonl").write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    PassRatePool().save(tmp / "pool.bin")  # a real (empty) pool: the launcher loads it to check it
    runs = {s: _train_args(_record(s, tmp)) for s in GPU_SCRIPTS + CPU_SCRIPTS}
    runs["7b+paper"] = _train_args(_record("qwen2.5-math-7b_dynamo.sh", tmp, dict(RECIPE="paper")))
    runs["1.5b+eval+pool"] = _train_args(_record(
        "qwen2.5-math-1.5b_dynamo.sh", tmp,
        dict(EVAL_DATA=str(tmp / "eval.jsonl"), POOL_LOAD=str(tmp / "pool.bin"), WANDB_API_KEY="x")))
    return runs


@pytest.fixture(scope="module")
def parsed(recorded):
    for module in ("torch", "ray", "openrlhf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    cases = [{"name": name, "argv": argv, "mode": "parse" if name in CPU_SCRIPTS else "full"}
             for name, argv in recorded.items()]
    cases.sort(key=lambda c: c["mode"] == "parse")  # the CPU backend's patches stay: CPU scripts last
    env = dict(os.environ, RAY_ADDRESS="local", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", HELPER], input=json.dumps(cases), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    return {res["name"]: res for res in json.loads(line[len("RESULTS "):])}


def test_scripts_forward_extra_arguments_last(recorded):
    for name, argv in recorded.items():
        assert argv[-len(EXTRA):] == EXTRA, name


@pytest.mark.parametrize("name", GPU_SCRIPTS + CPU_SCRIPTS + ["1.5b+eval+pool", "7b+paper"])
def test_the_train_cli_accepts_every_flag(parsed, name):
    res = parsed[name]
    assert "error" not in res, res.get("error")


def _dynamo_stripped(argv):
    out, skipping = [], False
    for tok in argv:
        if tok.startswith(("--dynamo.", "--no-dynamo.")):
            skipping = True
            continue
        if skipping and not tok.startswith("--"):
            continue
        skipping = False
        out.append(tok)
    return out


@pytest.mark.parametrize("dynamo,baseline", PAIRS)
def test_baseline_differs_only_in_dynamo_flags(recorded, parsed, dynamo, baseline):
    assert _dynamo_stripped(recorded[dynamo]) == _dynamo_stripped(recorded[baseline])
    assert recorded[dynamo] != recorded[baseline]
    base = parsed[baseline]["values"]
    assert base["allocation"] is None and base["modulation"]["identity"]  # = OpenRLHF's GRPO exactly
    dyn = parsed[dynamo]["values"]
    assert dyn["allocation"]["rule"] in ("neyman", "proportional") and not dyn["modulation"]["identity"]
    assert base["estimator"] == dyn["estimator"]
    if baseline.startswith("qwen"):  # the paper's runs: OpenRLHF's GRPO exactly (group_norm, token-mean loss)
        assert dyn["estimator"] == "group_norm"
        assert base["prompt_weighting"] in ("auto", "tokens") and dyn["prompt_weighting"] == "tokens"


def _assert_paper_setup(v, model, recipe):
    assert v["model"] == model
    assert (v["rollout_batch_size"], v["n_samples"]) == (512, 16)
    assert v["lr"] == 1e-6
    # the paper's recipe: GRPO advantages; DynaMO's default recipe: RLOO with the prompt-balanced loss
    assert v["estimator"] == ("group_norm" if recipe == "paper" else "rloo")
    assert v["prompt_weighting"] == ("tokens" if recipe == "paper" else "balanced")
    assert v["kl_init_coef"] == 0 and not v["kl_use_loss"]
    assert v["loss_agg_mode"] == "token-mean" and v["policy_loss_type"] == "ppo"
    assert v["temperature"] == 1.0 and v["top_p"] == 1.0
    assert v["eps_clip_low_high"] == [0.2, 0.2] and v["dual_clip"] == 10
    assert v["zero_stage"] == 3 and v["vllm_num_engines"] >= 1
    assert v["reward_url"] and v["reward_url"][0].endswith(os.path.join("dynamo_openrlhf", "reward.py"))
    assert v["label_key"] == "answer"
    assert v["backend"] == "gpu"
    # ~2000 steps: episodes x data lines / 512 prompts per step
    assert v["num_episodes"] * DATA_LINES // 512 == 2000


@pytest.mark.parametrize("name,model,recipe", [
    ("qwen2.5-math-1.5b_dynamo.sh", "Qwen/Qwen2.5-Math-1.5B", "variance"),
    ("qwen2.5-math-1.5b_dynamo_paper.sh", "Qwen/Qwen2.5-Math-1.5B", "paper"),
    ("qwen2.5-math-1.5b_grpo_baseline.sh", "Qwen/Qwen2.5-Math-1.5B", "paper"),
    ("qwen2.5-math-7b_dynamo.sh", "Qwen/Qwen2.5-Math-7B", "variance"),
    ("7b+paper", "Qwen/Qwen2.5-Math-7B", "paper"),
    ("qwen2.5-math-7b_grpo_baseline.sh", "Qwen/Qwen2.5-Math-7B", "paper"),
    ("qwen2.5-math-7b_dynamo_multinode.sh", "Qwen/Qwen2.5-Math-7B", "variance"),
])
def test_gpu_scripts_are_the_paper_setup(parsed, name, model, recipe):
    v = parsed[name]["values"]
    _assert_paper_setup(v, model, recipe)
    gpus = v["actor_num_nodes"] * v["actor_gpus_per_node"]
    if v["colocate_all"]:
        assert v["vllm_num_engines"] * v["vllm_tp"] == gpus
    if "multinode" in name:
        assert v["actor_num_nodes"] > 1
    else:
        assert v["actor_num_nodes"] == 1 and gpus == 8


@pytest.mark.parametrize("name", [n for n in GPU_SCRIPTS if "baseline" not in n] + ["7b+paper"])
def test_dynamo_scripts_use_the_paper_defaults(parsed, name):
    v = parsed[name]["values"]
    a = v["allocation"]
    rule = "proportional" if "paper" in name else "neyman"
    assert (a["rule"], a["lo"], a["hi"], a["oversample"], a["skip_factor"]) == (rule, 8, 24, 1.0, None)
    assert (a["budget"], a["candidates"]) == (8192, 512)
    assert (a["prior"], a["forget"], a["fit_prior_every"], a["success_threshold"]) == ([1.0, 1.0], 0.999, 10, 0.5)
    assert v["modulation"] == {"identity": False, "mu_max": 1.2, "lambda_min": 0.6, "gamma": 50.0, "tau": 0.99}
    assert v["entropy_coef"] is None  # the modulation computes its own token entropy; no entropy loss


def test_optional_eval_and_pool_flags(parsed):
    v = parsed["1.5b+eval+pool"]["values"]
    assert v["eval_dataset"].endswith("eval.jsonl") and v["pool_load"].endswith("pool.bin")
    assert parsed["qwen2.5-math-1.5b_dynamo.sh"]["values"]["eval_dataset"] is None


def test_tiny_cpu_scripts(parsed):
    for name in CPU_SCRIPTS:
        assert parsed[name]["values"]["preset"] == "tiny-cpu", name
    dyn = parsed["tiny_cpu_dynamo.sh"]["values"]
    assert dyn["allocation"]["rule"] == "neyman" and dyn["modulation"]["mu_max"] == 1.2
    default = parsed["tiny_cpu.sh"]["values"]  # the preset with DynaMO's defaults
    assert default["allocation"]["rule"] == "neyman" and not default["modulation"]["identity"]
    off = parsed["tiny_cpu_rloo.sh"]["values"]  # DynaMO off with the preset's estimator, RLOO (as its name says)
    assert off["allocation"] is None and off["modulation"]["identity"] and off["estimator"] == "rloo"
    assert dyn["run_dir"] != off["run_dir"] and off["run_dir"].endswith("tiny-cpu-rloo")
