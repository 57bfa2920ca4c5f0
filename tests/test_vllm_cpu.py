"""Real vLLM on CPU (vLLM's ``vllm-cpu`` build): OpenRLHF's own ``RolloutRayActor`` started by the CPU
backend, per-request n, OpenRLHF's weight-sync protocol over gloo, and engine shutdown.

The end-to-end training tests (tests/test_train_cli.py) run on this engine too whenever it imports.

On a CUDA machine scripts/install.sh installs no CPU build (vLLM's GPU build, if any, is the user's): there
the install test checks that the CPU backend does not pick vLLM, and the engine tests are not collected (they
would only skip, and a skip fails ``DYNAMO_NO_SKIPS=1`` runs).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import marked_env, marked_processes, new_marker

from dynamo_openrlhf import cpu_backend
from dynamo_openrlhf.cpu_backend import vllm_on_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # the allocator-only install: no trainer, no engine
        return False
    return torch.cuda.is_available()


#: scripts/install.sh's choice: vLLM's CPU build only where CUDA is absent.
CUDA = _cuda()


def test_requirements_helper_drops_the_torch_family_and_foreign_markers(monkeypatch):
    import vllm_cpu_requirements as helper

    reqs = [
        'torch==2.13.0+cpu; platform_machine == "x86_64"',
        "torchvision; platform_machine != \"s390x\"",
        "numba==0.65.0; platform_machine != \"s390x\"",
        'six>=1.16.0; python_version > "99"',
        "fastapi[standard]<0.137.0,>=0.133.0",
        'pytest; extra == "test"',
    ]
    monkeypatch.setattr(helper.metadata, "requires", lambda dist: reqs)
    assert helper.requirements("vllm-cpu") == ["numba==0.65.0", "fastapi[standard]<0.137.0,>=0.133.0"]


def test_the_train_extra_pins_setuptools_as_vllms_cpu_build_does():
    """vLLM's CPU build pins setuptools; the ``train`` extra pins the same, so that scripts/install.sh's vLLM step
    (after the extra) changes no setuptools under the trainer stack (docs/install.md)."""
    import importlib.metadata as metadata
    import re

    from packaging.requirements import Requirement

    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.findall(r"^\s*[\"'](setuptools[^\"']*)[\"']", pyproject, re.M) == ["setuptools==77.0.3"]
    try:
        theirs = [Requirement(r) for r in metadata.requires("vllm-cpu") or []]
    except metadata.PackageNotFoundError:
        return  # no CPU build here (a CUDA machine, or the allocator-only install): the pin above is the contract
    env = {"extra": ""}  # this interpreter's Python and platform
    theirs = [r for r in theirs if r.name == "setuptools" and (r.marker is None or r.marker.evaluate(env))]
    assert "==77.0.3" in {str(r.specifier) for r in theirs}  # vLLM allows exactly our pin: nothing to change
    assert all(r.specifier.contains("77.0.3") for r in theirs)


def test_engine_choice(monkeypatch):
    monkeypatch.setattr(vllm_on_cpu, "vllm_cpu_build", lambda: None)  # where resolve_cpu_engine looks it up
    assert cpu_backend.resolve_cpu_engine("auto") == "transformers"
    assert cpu_backend.resolve_cpu_engine("transformers") == "transformers"
    with pytest.raises(ValueError, match=r"--dynamo.cpu_engine vllm: no vLLM CPU build imports here"):
        cpu_backend.resolve_cpu_engine("vllm")
    with pytest.raises(ValueError, match=r"--dynamo.cpu_engine must be one of auto, vllm, transformers, got 'tpu'"):
        cpu_backend.resolve_cpu_engine("tpu")
    monkeypatch.setattr(vllm_on_cpu, "vllm_cpu_build", lambda: "0.29.0")
    assert cpu_backend.resolve_cpu_engine("auto") == "vllm"
    assert cpu_backend.resolve_cpu_engine("transformers") == "transformers"


def test_vllm_cpu_build_is_installed_where_the_trainer_is():
    """scripts/install.sh installs vLLM's CPU build next to the trainer stack on x86-64 without CUDA; on a CUDA
    machine none (the CPU backend's auto engine is then the transformers stand-in)."""
    pytest.importorskip("openrlhf")
    if CUDA:
        cpu_backend.install_import_stand_ins()
        assert cpu_backend.vllm_cpu_build() is None  # no vLLM, or a GPU build: never run as the CPU engine
        assert cpu_backend.resolve_cpu_engine("auto") == "transformers"
        return
    pytest.importorskip("vllm")
    cpu_backend.install_import_stand_ins()
    assert cpu_backend.vllm_cpu_build() == "0.29.0"  # OpenRLHF 0.11.2's vLLM pin
    assert "vllm" not in cpu_backend.stand_ins_installed()


def test_gloo_group_broadcasts_bf16_in_place_between_processes(tmp_path):
    script = r"""
import multiprocessing as mp, socket, sys
import torch
from dynamo_openrlhf.cpu_backend import GlooWeightSyncGroup

def receive(port, rank, q):
    g = GlooWeightSyncGroup.create("127.0.0.1", port, rank, 3)
    t = torch.empty(4, 3, dtype=torch.bfloat16)
    g.broadcast(t, src=0, stream=None)
    q.put((rank, t.float().tolist()))

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("", 0)); port = s.getsockname()[1]
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    procs = [ctx.Process(target=receive, args=(port, r, q)) for r in (1, 2)]
    [p.start() for p in procs]
    g = GlooWeightSyncGroup.create("127.0.0.1", port, 0, 3)
    sent = (torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7).to(torch.bfloat16)
    g.broadcast(sent, src=0)
    got = sorted(q.get(timeout=60) for _ in procs)
    [p.join(60) for p in procs]
    assert [r for r, _ in got] == [1, 2]
    assert all(t == sent.float().tolist() for _, t in got)
    try:
        g.broadcast(torch.zeros(2, device="meta"))
    except ValueError as e:
        print("error:", e)
    print("ok")
"""
    pytest.importorskip("torch")
    path = tmp_path / "gloo_script.py"  # a file, not -c: spawned children re-import the main module
    path.write_text(script)
    r = subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "error: the gloo weight-sync group broadcasts CPU tensors, got one on meta" in r.stdout
    assert r.stdout.strip().endswith("ok")


ENGINE_SCRIPT = r"""
import asyncio, json, os, socket, subprocess, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))  # run from the checkout: tests/_procs.py
from _procs import MARKER_ENV, marked_processes
os.environ["DYNAMO_OPENRLHF_CPU_ENGINE"] = "vllm"
os.environ["DYNAMO_OPENRLHF_CPU_KV_CACHE_MB"] = "64"
from dynamo_openrlhf import cpu_backend, reward, tiny
assert cpu_backend.apply_cpu_patches()
import ray, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams


def vllm_processes():
    # this run's VLLM:: processes only (the test's marker is in their environment): another run's engine
    # elsewhere on the machine is none of this test's business
    return sorted(title for _, title in marked_processes(os.environ[MARKER_ENV], prefixes=("VLLM::",)))


if __name__ == "__main__":  # the engine spawns its core process: keep the module import-safe
    assets = tiny.prepare_tiny_assets()
    cpu_backend.ray_init(cpu_backend=True, num_gpus=1)
    engine, = cpu_backend.create_cpu_rollout_engines(1, 1, str(assets.model_dir), 0, False, True, True, 48,
                                                     remote_rm_url=[reward.__file__])
    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    qs = [(1, 2), (3, 4), (5, 6), (12, 7), (9, 9), (23, 4)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a}+{b}?"}], tokenize=False,
                                       add_generation_prompt=True) for a, b in qs]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sp = lambda n, **kw: SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12, min_tokens=1,
                                        skip_special_tokens=False, **kw)
    # single samples, as OpenRLHF's executor requests them (n = 1 each), all at once
    outs = ray.get([engine.generate.remote(ids[k % 3], sp(1, logprobs=1 if k % 2 else None)) for k in range(8)])
    # DynaMO's dispatch: one generate_responses call per prompt with its own number of samples
    res = ray.get([engine.generate_responses.remote(prompt=prompts[k], label=str(sum(qs[k])), sampling_params=sp(1),
                                                    max_length=48, hf_tokenizer=tok, num_samples=n)
                   for k, n in enumerate((3, 5, 1))])
    # DynaMO off: DynamoSamplesGenerator's rollouts are OpenRLHF's SamplesGenerator's, on this engine
    # (greedy, so that both see the same samples; experiences compared field by field, in prompt order)
    from types import SimpleNamespace
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from dynamo_openrlhf.samples_generator import DynamoSamplesGenerator
    gen_args = SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off"), dynamic_filtering_enable=False),
        rollout=SimpleNamespace(n_samples_per_prompt=3, batch_size=4), vllm=SimpleNamespace(enable_sleep=False))
    labels = [str(a + b) for a, b in qs]

    def rollouts(cls):
        gen = cls(SimpleNamespace(args=gen_args), [(None, prompts[:4], labels[:4], [None] * 4)], None, tok, [engine])
        exps, _, consumed, _ = gen.generate_samples(temperature=0.0, top_p=1.0, max_new_tokens=12, max_len=48)
        # DynaMO's step-index tag (its bookkeeping, popped by the actor before training) is checked apart
        tags.append([int(e.info.pop("dynamo_step_index")[0]) if "dynamo_step_index" in e.info else None
                     for e in exps])
        rows = [(e.prompts[0], e.labels[0], e.sequences[0].tolist(), e.attention_mask[0].tolist(),
                 e.action_mask[0].tolist(), e.rewards.tolist(), e.scores.tolist(), e.response_length.tolist(),
                 e.truncated.tolist(), e.total_length.tolist(), sorted((k, v.tolist()) for k, v in e.info.items()))
                for e in exps]
        return consumed, sorted(rows, key=lambda r: (prompts.index(r[0]), r[2]))

    tags = []
    theirs, ours = rollouts(SamplesGenerator), rollouts(DynamoSamplesGenerator)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=12)
    engine_greedy = lambda: [list(o.outputs[0].token_ids) for o in ray.get([engine.generate.remote(i, greedy) for i in ids])]

    def hf_greedy(model):
        return [model.generate(torch.tensor([i]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, len(i):].tolist() for i in ids]

    hf = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.bfloat16).eval()
    before, hf_before = engine_greedy(), hf_greedy(hf)
    # new weights through OpenRLHF's protocol: the engine joins the group first, rank 0 then serves it;
    # one update_weight call per tensor, each answered by a broadcast; the last one says empty_cache
    g = torch.Generator().manual_seed(0)
    new = {k: v + 0.02 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in hf.state_dict().items()}
    hf.load_state_dict(new)
    with socket.socket() as s:
        s.bind(("", 0)); port = s.getsockname()[1]
    joined = engine.init_process_group.remote("127.0.0.1", port, 1, 2, "openrlhf", backend="gloo", use_ray=False)
    group = cpu_backend.GlooWeightSyncGroup.create("127.0.0.1", port, 0, 2, torch.cuda.current_device())
    ray.get(joined)
    items = list(new.items())
    for k, (name, t) in enumerate(items):
        ref = engine.update_weight.remote(name, dtype=t.dtype, shape=t.shape, empty_cache=k == len(items) - 1)
        group.broadcast(t.contiguous(), src=0, stream=torch.cuda.current_stream())
        ray.get(ref)
    ray.get(engine.reset_prefix_cache.remote())  # as broadcast_to_vllm does with prefix caching on
    after, hf_after = engine_greedy(), hf_greedy(hf)
    running = vllm_processes()
    shut = cpu_backend.shutdown_cpu_rollout_engines()
    ray.shutdown()
    import time
    deadline = time.monotonic() + 15  # processes already told to exit get a moment to do so
    while vllm_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    print(json.dumps({
        "n": [len(o.outputs) for o in outs],
        "lens": [[len(c.token_ids) for c in o.outputs] for o in outs],
        "reasons": [[c.finish_reason for c in o.outputs] for o in outs],
        "ends_eos": [[c.token_ids[-1] == tok.eos_token_id for c in o.outputs] for o in outs],
        "logprobs": [[None if c.logprobs is None else len(c.logprobs) for c in o.outputs] for o in outs],
        "responses": [[{"reward": float(r["reward"]), "label": r["label"], "prompt": r["prompt"],
                        "extra": sorted(r["extra_logs"])} for r in req] for req in res],
        "before": before, "hf_before": hf_before, "after": after, "hf_after": hf_after,
        "checksum": float(sum(t.double().sum() for t in new.values())), "num_tensors": len(items),
        "running": running, "shut": shut, "left": vllm_processes(),
        "openrlhf_rollouts": theirs, "dynamo_rollouts": ours, "step_index_tags": tags,
    }))
"""


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    pytest.importorskip("openrlhf")
    pytest.importorskip("vllm")
    cpu_backend.install_import_stand_ins()
    if cpu_backend.vllm_cpu_build() is None:
        pytest.skip("no vLLM CPU build here")
    script = tmp_path_factory.mktemp("engine") / "engine_script.py"
    script.write_text(ENGINE_SCRIPT)
    marker = new_marker()
    env = marked_env(marker, dict(os.environ, RAY_ADDRESS="local", TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0"))
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["left_after_exit"] = marked_processes(marker)  # VLLM:: or ray:: of this run, once the script is gone
    return out, r.stdout + r.stderr


def test_vllm_engine_samples_and_per_prompt_sample_counts(engine_run):
    out, _ = engine_run
    assert out["n"] == [1] * 8
    for lens, reasons, eos in zip(out["lens"], out["reasons"], out["ends_eos"]):
        for n_tok, reason, ends in zip(lens, reasons, eos):
            assert 1 <= n_tok <= 12
            assert (reason == "stop") == ends and (reason == "length") == (n_tok == 12 and not ends)
    assert [lp[0] is None for lp in out["logprobs"]] == [True, False] * 4
    assert all(lp == lens for lp, lens in zip(out["logprobs"], out["lens"]) if lp[0] is not None)
    # OpenRLHF's own generate_responses, as DynaMO's dispatch calls it: each prompt gets its own number of
    # samples, each scored by the math reward against that prompt's label
    assert [len(req) for req in out["responses"]] == [3, 5, 1]
    for req, (q, label) in zip(out["responses"], (("1+2", "3"), ("3+4", "7"), ("5+6", "11"))):
        for resp in req:
            assert resp["label"] == label and f"What is {q}?" in resp["prompt"]
            assert resp["reward"] in (0.0, 1.0) and {"math_correct", "math_wrong"} <= set(resp["extra"])


def test_vllm_engine_greedy_is_transformers_greedy_before_and_after_a_weight_sync(engine_run):
    out, log = engine_run
    assert out["before"] == out["hf_before"]
    assert out["after"] == out["hf_after"]  # the engine generates from the synced weights
    assert out["after"] != out["before"]
    sums = [float(x) for x in
            __import__("re").findall(r"\[rollout engine vllm\] weights update 1: (\d+) tensors, checksum (\S+)", log)[0]]
    assert sums[0] == out["num_tensors"] and abs(sums[1] - out["checksum"]) < 1e-6 * abs(out["checksum"])


def test_vllm_engine_processes_are_stopped(engine_run):
    out, _ = engine_run
    assert out["shut"] == 1
    # what the check would catch: the engine's core and worker carry the test's marker (inherited through
    # Ray's raylet, the engine actor and vLLM's multiprocessing)
    assert sum(p.startswith("VLLM::EngineCore") for p in out["running"]) == 1, out["running"]
    assert sum(p.startswith("VLLM::Worker") for p in out["running"]) == 1, out["running"]
    assert out["left"] == []
    assert out["left_after_exit"] == []


def test_dynamo_off_rollouts_are_openrlhfs_on_the_real_engine(engine_run):
    out, _ = engine_run
    consumed, theirs = out["openrlhf_rollouts"]
    assert consumed == 4 and len(theirs) == 4 * 3
    # each prompt's 3 rollouts carry its own label (1+2, 3+4, 5+6, 12+7)
    expected = {"What is 1+2?": "3", "What is 3+4?": "7", "What is 5+6?": "11", "What is 12+7?": "19"}
    for prompt, label, *_ in theirs:
        assert [label] == [v for k, v in expected.items() if k in prompt]
    assert sorted(r[1] for r in theirs) == sorted(list(expected.values()) * 3)
    assert out["dynamo_rollouts"] == out["openrlhf_rollouts"]
    # ours tags each sample with its index in the step; OpenRLHF's generator tags nothing
    assert out["step_index_tags"] == [[None] * 12, list(range(12))]


if CUDA:  # no CPU build on a CUDA machine (see the module docstring): nothing to run these on
    del (test_vllm_engine_samples_and_per_prompt_sample_counts,
         test_vllm_engine_greedy_is_transformers_greedy_before_and_after_a_weight_sync,
         test_vllm_engine_processes_are_stopped, test_dynamo_off_rollouts_are_openrlhfs_on_the_real_engine)
