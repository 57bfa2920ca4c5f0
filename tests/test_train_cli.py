"""``python -m dynamo_openrlhf.train``: OpenRLHF's CLI unchanged, clear errors, and an end-to-end
GRPO run on CPU (tiny preset) with checkpoint + resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("openrlhf")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
PROG = [sys.executable, "-m", "dynamo_openrlhf.train"]


def _env(**extra):
    env = dict(os.environ)
    env.update(
        RAY_ADDRESS="local",  # never join a cluster that happens to run on this machine
        COLUMNS="100",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_DEDUP_LOGS="0",
    )
    env.update(extra)
    return env


def _run(args, timeout=600, **env):
    return subprocess.run(PROG + args, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# CLI surface and errors
# ----------------------------------------------------------------------------------------------


def test_help_is_openrlhfs_plus_the_dynamo_group():
    """Every OpenRLHF flag with its default and help text, verbatim, then ours."""
    theirs = subprocess.run(
        [sys.executable, "-c",
         "from dynamo_openrlhf.cpu_backend import install_import_stand_ins as i; i();"
         "import runpy, sys; sys.argv = ['train_ppo_ray.py', '--help'];"
         "runpy.run_module('openrlhf.cli.train_ppo_ray', run_name='__main__')"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours = _run(["--help"], timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    options = theirs.stdout[theirs.stdout.index("options:"):].rstrip()
    assert options in ours.stdout
    assert "usage: python -m dynamo_openrlhf.train" in ours.stdout
    for flag in ("--dynamo.preset", "--dynamo.backend", "--dynamo.run_dir", "--dynamo.reward_timeout"):
        assert flag in ours.stdout


def test_unknown_flag_is_one_clear_error():
    r = _run(["--dynamo.preset", "tiny-cpu", "--no.such_flag", "3"], timeout=300)
    assert r.returncode == 2
    assert "unrecognized arguments: --no.such_flag 3" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dataset_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = _run(["--dynamo.preset", "tiny-cpu", "--dynamo.run_dir", str(tmp_path / "run"),
              "--data.prompt_dataset", str(missing)], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--data.prompt_dataset: dataset file not found: {missing}" in r.stderr
    assert "Traceback" not in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr  # failed before Ray


def test_wrong_openrlhf_version_is_one_clear_error():
    code = (
        "import importlib.metadata as m; real = m.version;"
        "m.version = lambda name: '0.10.0' if name == 'openrlhf' else real(name);"
        "from dynamo_openrlhf.train import main; raise SystemExit(main(['--dynamo.preset', 'tiny-cpu']))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1
    assert "extends openrlhf==0.11.2, but openrlhf==0.10.0 is installed" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_extended_symbol_is_named():
    from dynamo_openrlhf.version_check import OpenRLHFVersionError, check_openrlhf

    with pytest.raises(OpenRLHFVersionError, match=r"lacks openrlhf\.utils\.config\.no_such_symbol.*0\.11\.2"):
        check_openrlhf(symbols=[("openrlhf.utils.config", "no_such_symbol")])


def test_builtin_reward_name_resolves_to_its_file():
    from dynamo_openrlhf import reward
    from dynamo_openrlhf.train import _resolve_reward_modules

    assert _resolve_reward_modules("dynamo_openrlhf.reward") == reward.__file__
    assert _resolve_reward_modules("http://rm:5000/get_reward,x.py") == "http://rm:5000/get_reward,x.py"
    with pytest.raises(ValueError, match="no reward_func"):
        _resolve_reward_modules("dynamo_openrlhf.version_check")


# ----------------------------------------------------------------------------------------------
# The CPU rollout engine: one request per prompt, each with its own n
# ----------------------------------------------------------------------------------------------

ENGINE_SCRIPT = r"""
import asyncio, json, sys
from dynamo_openrlhf import cpu_backend, tiny
assert cpu_backend.apply_cpu_patches()
from vllm import SamplingParams
from transformers import AutoTokenizer
from dynamo_openrlhf import reward

assets = tiny.prepare_tiny_assets()
engine = cpu_backend.CPURolloutActor(model=str(assets.model_dir), seed=0, max_model_len=48,
                                     remote_rm_url=[reward.__file__])
tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a}+{b}?"}], tokenize=False,
                                   add_generation_prompt=True) for a, b in ((1, 2), (3, 4), (5, 6))]

async def main():
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sp = lambda n, **kw: SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12, min_tokens=1,
                                        skip_special_tokens=False, **kw)
    outs = await asyncio.gather(engine.generate(ids[0], sp(3)), engine.generate(ids[1], sp(5, logprobs=1)),
                                engine.generate(ids[2], sp(1)))
    batches_after_generate = engine.get_stats()["batches"]
    res = await engine.generate_responses(prompt=prompts[1], label="7", sampling_params=sp(1, logprobs=None),
                                          max_length=48, hf_tokenizer=tok, num_samples=4)
    return outs, batches_after_generate, res

outs, batches, res = asyncio.run(main())
print(json.dumps({
    "n": [len(o.outputs) for o in outs],
    "lens": [[len(c.token_ids) for c in o.outputs] for o in outs],
    "reasons": [[c.finish_reason for c in o.outputs] for o in outs],
    "ends_eos": [[c.token_ids[-1] == tok.eos_token_id for c in o.outputs] for o in outs],
    "logprobs": [[None if c.logprobs is None else len(c.logprobs) for c in o.outputs] for o in outs],
    "batches": batches,
    "responses": [{"reward": float(r["reward"]), "label": r["label"], "prompt": r["prompt"],
                   "extra": r["extra_logs"]} for r in res],
}))
"""


def test_cpu_engine_honours_per_request_n_and_batches_them():
    r = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == [3, 5, 1]
    # three concurrent requests, two sampling settings (with/without logprobs): two generate calls
    assert out["batches"] == 2
    for lens, reasons, eos in zip(out["lens"], out["reasons"], out["ends_eos"]):
        for n_tok, reason, ends in zip(lens, reasons, eos):
            assert 1 <= n_tok <= 12
            assert (reason == "stop") == ends and (reason == "length") == (n_tok == 12 and not ends)
    assert out["logprobs"][1] == out["lens"][1] and out["logprobs"][0] == [None] * 3
    # generate_responses is OpenRLHF's own: n samples, each scored by the math reward against its label
    assert len(out["responses"]) == 4
    for resp in out["responses"]:
        assert resp["label"] == "7" and "What is 3+4?" in resp["prompt"]
        assert resp["reward"] in (0.0, 1.0) and set(resp["extra"]) >= {"math_correct", "math_wrong"}


# ----------------------------------------------------------------------------------------------
# End to end: GRPO on CPU, checkpoint, resume
# ----------------------------------------------------------------------------------------------


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _load_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _label_of(prompt: str) -> str:
    expr = re.search(r"What is ([0-9+\-*]+)\?", prompt).group(1)
    return str(eval(expr, {"__builtins__": {}}))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Run 1: 2 GRPO steps with a checkpoint every step; run 2 resumes and does step 3."""
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()  # cached; built once per machine
    base = tmp_path_factory.mktemp("e2e")
    run_dir = base / "run"
    common = ["--dynamo.preset", "tiny-cpu", "--dynamo.run_dir", str(run_dir),
              "--dynamo.reward_dump", str(base / "rewards.jsonl"), "--ckpt.save_steps", "1",
              "--rollout.batch_size", "8", "--train.batch_size", "32", "--eval.n_samples_per_prompt", "4",
              "--no-dynamo.eval_at_start", "--dynamo.eval_at_end"]
    first = _run(common + ["--data.max_samples", "16"])
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-5000:])
    weights_run1 = _load_weights(run_dir / "final")
    rows_run1 = len((base / "rewards.jsonl").read_text().splitlines())
    second = _run(common + ["--data.max_samples", "24", "--ckpt.load_enable"])
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-5000:])
    return dict(base=base, run_dir=run_dir, first=first, second=second, weights_run1=weights_run1,
                rows_run1=rows_run1)


def test_e2e_grpo_updates_the_actor(e2e):
    import torch

    from dynamo_openrlhf import tiny

    start = _load_weights(tiny.asset_root() / "model")
    final = e2e["weights_run1"]
    assert set(final) <= set(start)
    changed = 0.0
    for name, w in final.items():
        ref = start[name].to(w.dtype)  # the actor trains in bf16: compare at its precision
        changed = max(changed, (w.float() != ref.float()).float().mean().item())
    assert changed > 0.05, "the GRPO steps did not change the actor's weights"
    assert all(torch.isfinite(w.float()).all() for w in final.values())


def test_e2e_rollout_engine_gets_the_actors_weights_every_step(e2e):
    """Weight sync through the Ray object store: one update per step; the last one is the final actor."""
    out = e2e["first"].stdout + e2e["first"].stderr
    sums = [float(x) for x in re.findall(r"\[CPURolloutActor\] weights update \d+: \d+ tensors, checksum (\S+)", out)]
    assert len(sums) == 2, out[-3000:]
    final = e2e["weights_run1"]
    expected = float(sum(w.double().sum() for w in final.values()))
    assert abs(sums[-1] - expected) < 1e-6 * max(1.0, abs(expected))
    assert sums[0] != sums[1]


def test_e2e_rewards_are_math_verify_against_each_prompts_label(e2e):
    from dynamo_openrlhf.reward import MathReward

    rows = [json.loads(line) for line in (e2e["base"] / "rewards.jsonl").read_text().splitlines()]
    train_rows = rows[: e2e["rows_run1"]]
    # 2 steps x 8 prompts x 4 samples, then the final eval (--data.max_samples caps it: 16 prompts x 4)
    assert len(train_rows) == 2 * 8 * 4 + 16 * 4
    assert {r["status"] for r in rows} <= {"correct", "wrong", "malformed", "timeout", "error"}
    for r in rows:
        assert r["label"] == _label_of(r["prompt"])  # scored against its own prompt's label
    scorer = MathReward(timeout_s=5)
    try:
        for r in rows[:40]:
            s = scorer.score(r["response"], r["label"])
            assert (s.status, s.reward) == (r["status"], r["reward"])
    finally:
        scorer.close()
    train = [m for m in _metrics(e2e["run_dir"]) if m["type"] == "train" and m["step"] <= 2]
    dumped_mean = sum(r["reward"] for r in train_rows[: 2 * 32]) / 64
    logged_mean = sum(m["rollout/reward_mean"] for m in train) / len(train)
    assert abs(dumped_mean - logged_mean) < 1e-6
    for m in train:
        total = m["math_correct"] + m["math_wrong"] + m["math_malformed"] + m["math_timeout"] + m["math_error"]
        assert abs(total - 1.0) < 1e-6 and abs(m["math_correct"] - m["rollout/reward_mean"]) < 1e-6


def test_e2e_checkpoint_written_and_resumed(e2e):
    actor_ckpt = e2e["run_dir"] / "ckpt" / "_actor"
    assert (actor_ckpt / "global_step2").is_dir()
    metrics = _metrics(e2e["run_dir"])
    steps_written_by_run1 = [m["step"] for m in metrics if m["type"] == "train"][:2]
    assert steps_written_by_run1 == [1, 2]
    later = [m["step"] for m in metrics if m["type"] == "train"][2:]
    assert later == [3], later  # run 2 continued the step counter instead of starting over
    assert (actor_ckpt / "latest").read_text().strip() == "global_step3"
    out = e2e["second"].stdout
    assert "dynamo_openrlhf run summary: 3 steps" in out  # history restored from the checkpoint
    evals = [m for m in metrics if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [2, 3] and all(0 <= m["eval_default_pass1"] <= 1 for m in evals)
