"""Two Ray nodes on one machine (issue #25 §4): the tiny task with ``--actor.num_nodes 2`` and one rollout
engine on each node, DynaMO on, against a cluster of two raylets started here.

Placement is forced, not left to chance: each node offers one (fake) GPU, and the run colocates the actor ranks
with the engines (``--train.colocate_all``), so OpenRLHF's PACK placement group of two one-GPU bundles must take
one bundle on each node; actor rank i and engine i share bundle i. (Without colocation OpenRLHF packs the engines'
placement group onto one node and the actor ranks onto the other, whatever the GPU counts: see docs/two_nodes.md.)

The pool lives in exactly one process: every process of the cluster loads a probe (a ``sitecustomize`` on the
raylets' ``PYTHONPATH``, active only with ``DYNAMO_POOL_PROBE_DIR``) that, once the first step's metrics row
exists, counts the ``PassRatePool`` objects reachable in its heap and writes ``<pid>.json``; the trainer actor's
pid is read from Ray's actor table.

Only the cluster started here is torn down (``Cluster.shutdown()``: its own processes); its temp dir and address
file live under a private ``RAY_TMPDIR`` so no other Ray on the machine can connect to it, or it to them.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("openrlhf")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
PROG = [sys.executable, "-m", "dynamo_openrlhf.train"]
STEPS = 3
PROMPTS_PER_STEP = 8
N = 4
FORGET = 0.999

# Loaded by every Python process the two raylets start (and by the driver): counts PassRatePool objects once the
# trigger file exists. PyO3 objects are not tracked by the gc, so they are found as referents of tracked objects.
PROBE = r'''
import os

_DIR = os.environ.get("DYNAMO_POOL_PROBE_DIR")
if _DIR:
    import threading

    def _probe():
        import gc, json, sys, time
        while not os.path.exists(os.path.join(_DIR, "go")):
            time.sleep(0.5)
        core = sys.modules.get("dynamo_openrlhf._core")
        pools = set()
        if core is not None:
            cls = core.PassRatePool
            for obj in gc.get_objects():
                if type(obj) is cls:
                    pools.add(id(obj))
                for ref in gc.get_referents(obj):
                    if type(ref) is cls:
                        pools.add(id(ref))
        tmp = os.path.join(_DIR, f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "pools": len(pools), "core_loaded": core is not None,
                       "argv0": (sys.argv or [""])[0]}, f)
        os.replace(tmp, os.path.join(_DIR, f"{os.getpid()}.json"))

    threading.Thread(target=_probe, name="dynamo-pool-probe", daemon=True).start()
'''


# Ray's start-up and liveness limits are sized for an idle machine; this test shares 2 cores with other work, where
# agents and workers register slowly and a busy raylet can miss health checks. (One wait is fixed inside Ray: a
# raylet aborts if its agents have not written their ports within ~40 s, so the nodes cannot start while the
# machine is saturated.) No idle workers are pre-started (as the CPU backend's local cluster).
SYSTEM_CONFIG = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    "agent_register_timeout_ms": 600_000,
    "health_check_timeout_ms": 60_000,
    "health_check_failure_threshold": 20,
    "worker_register_timeout_seconds": 600,
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent_ports() -> dict:
    """Distinct free ports for a node's agents (both raylets share this machine's ports; Ray's fixed defaults,
    e.g. the dashboard agent's 52365, would collide)."""
    return dict(metrics_agent_port=_free_port(), metrics_export_port=_free_port(),
                dashboard_agent_listen_port=_free_port(), runtime_env_agent_port=_free_port())


def _label_of(prompt: str) -> str:
    expr = re.search(r"What is ([0-9+\-*]+)\?", prompt).group(1)
    return str(eval(expr, {"__builtins__": {}}))


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node (separate raylets), 1 fake GPU each, started in this process; torn down by
    ``Cluster.shutdown()`` (only these processes)."""
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="dyn2n_", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    probe_dir = root / "probe"
    probe_dir.mkdir()
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "PYTHONPATH", "DYNAMO_POOL_PROBE_DIR")}
    # the address file (ray_current_cluster) and the session dir go under root, not /tmp/ray
    os.environ["RAY_TMPDIR"] = str(root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), saved["PYTHONPATH"]) if p)
    os.environ["DYNAMO_POOL_PROBE_DIR"] = str(probe_dir)
    cluster = None
    # Ray's Node waits a fixed 30 s for its raylet to register with the GCS; on a loaded machine that can take
    # longer: retry the lookup (up to 4 min) while the two nodes start
    import ray._private.services as services

    get_node = services.get_node

    def patient_get_node(*args, **kwargs):
        deadline = time.monotonic() + 240
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    services.get_node = patient_get_node
    try:
        node = dict(num_gpus=1, object_store_memory=200 << 20, include_dashboard=False)
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            node, **_agent_ports(), num_cpus=3, resources={"dynamo_head": 1},
            _system_config=SYSTEM_CONFIG))
        worker = cluster.add_node(**node, **_agent_ports(), num_cpus=2, resources={"dynamo_second": 1})
        services.get_node = get_node
        # the raylets captured PYTHONPATH / the probe dir; this process keeps its own
        for k in ("PYTHONPATH", "DYNAMO_POOL_PROBE_DIR"):
            if saved[k] is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = saved[k]
        yield dict(cluster=cluster, root=root, probe_dir=probe_dir, site=site,
                   head_id=cluster.head_node.node_id, worker_id=worker.node_id)
    finally:
        services.get_node = get_node
        if cluster is not None:
            cluster.shutdown()  # RAY_TMPDIR still set: removes root's address file, nobody else's
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def run(two_nodes, tmp_path_factory):
    """The tiny task on the two nodes: 3 steps x 8 prompts x 4 rollouts (allocation lo 2 / hi 6), 2 actor ranks,
    2 stand-in engines, one actor rank + one engine per node."""
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()  # cached
    base = tmp_path_factory.mktemp("two_nodes")
    run_dir = base / "run"
    args = ["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(run_dir),
            "--dynamo.reward_dump", str(base / "rewards.jsonl"), "--dynamo.cpu_engine", "transformers",
            "--actor.num_nodes", "2", "--actor.num_gpus_per_node", "1", "--vllm.num_engines", "2",
            "--train.colocate_all",
            "--rollout.batch_size", str(PROMPTS_PER_STEP), "--rollout.n_samples_per_prompt", str(N),
            "--dynamo.allocation.lo", "2", "--dynamo.allocation.hi", "6", "--train.batch_size", "32",
            "--data.max_samples", str(STEPS * PROMPTS_PER_STEP), "--train.num_episodes", "1",
            "--no-dynamo.eval_at_start", "--no-dynamo.eval_at_end", "--ckpt.save_steps", "100"]
    env = dict(os.environ)
    env.update(RAY_ADDRESS=two_nodes["cluster"].address, RAY_TMPDIR=str(two_nodes["root"]), COLUMNS="100",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0",
               DYNAMO_POOL_PROBE_DIR=str(two_nodes["probe_dir"]),
               PYTHONPATH=os.pathsep.join(p for p in (str(two_nodes["site"]), os.environ.get("PYTHONPATH")) if p))
    out_path, err_path = base / "stdout.txt", base / "stderr.txt"
    metrics = run_dir / "metrics.jsonl"
    start = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(PROG + args, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        try:
            triggered = False
            while proc.poll() is None:
                if time.monotonic() - start > 1800:
                    proc.kill()
                    proc.wait()
                    raise AssertionError("the two-node run took over 30 min")
                if not triggered and metrics.exists() and metrics.read_text().strip():
                    (two_nodes["probe_dir"] / "go").touch()  # the pool has had one update
                    triggered = True
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - start
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, (stdout[-3000:], stderr[-5000:])
    actors = [a for a in two_nodes["cluster"].global_state.actor_table(None).values()]
    role = {two_nodes["head_id"]: "head", two_nodes["worker_id"]: "second"}
    print(f"two-node run: {wall:.0f} s wall; placement: " + ", ".join(
        sorted(f"{a['ActorClassName']} pid {a['Pid']} on {role.get(a['Address']['NodeID'], '?')}" for a in actors)))
    return dict(base=base, run_dir=run_dir, stdout=stdout, stderr=stderr, actors=actors, wall=wall,
                triggered=triggered, **two_nodes)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_class(actors, name):
    return [a for a in actors if a["ActorClassName"] == name]


def test_actor_ranks_and_engines_are_on_both_nodes(run):
    nodes = {run["head_id"], run["worker_id"]}
    assert len(nodes) == 2
    ranks = _by_class(run["actors"], "DynamoPolicyModelActor")
    engines = _by_class(run["actors"], "CPURolloutActor")
    trainers = _by_class(run["actors"], "DynamoPPOTrainer")
    assert len(ranks) == 2 and len(engines) == 2 and len(trainers) == 1, \
        sorted(a["ActorClassName"] for a in run["actors"])
    assert {a["Address"]["NodeID"] for a in ranks} == nodes  # one actor rank per node
    assert {a["Address"]["NodeID"] for a in engines} == nodes  # one engine per node
    assert trainers[0]["Address"]["NodeID"] in nodes
    assert "rollout engine: transformers stand-in (dynamo_openrlhf.cpu_backend.CPURolloutActor)" in run["stdout"]


def test_both_engines_get_the_actors_weights_every_step(run):
    """Each engine (one per node) receives one update per step; the same weights; the last is the saved actor."""
    from safetensors.torch import load_file

    out = run["stdout"] + run["stderr"]
    per_engine = {}
    for pid, step, total in re.findall(r"Actor pid=(\d+)(?:, ip=[^)]*)?\).*?\[CPURolloutActor\] weights update (\d+): "
                                       r"\d+ tensors, checksum (\S+)", out):
        per_engine.setdefault(int(pid), []).append((int(step), float(total)))
    engine_pids = {a["Pid"] for a in _by_class(run["actors"], "CPURolloutActor")}
    assert set(per_engine) == engine_pids, (per_engine, engine_pids)
    (a, b) = per_engine.values()
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    assert [t for _, t in a] == [t for _, t in b]
    final = load_file(str(run["run_dir"] / "final" / "model.safetensors"))
    expected = float(sum(w.double().sum() for w in final.values()))
    assert abs(a[-1][1] - expected) < 1e-6 * max(1.0, abs(expected))


def test_rewards_are_scored_against_each_prompts_label_and_logged(run):
    rows = [json.loads(line) for line in (run["base"] / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS * PROMPTS_PER_STEP * N
    for r in rows:
        assert r["label"] == _label_of(r["prompt"])
    train = [m for m in _metrics(run["run_dir"]) if m["type"] == "train"]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    dumped = sum(r["reward"] for r in rows) / len(rows)
    logged = sum(m["rollout/reward_mean"] for m in train) / len(train)
    assert abs(dumped - logged) < 1e-6
    for m in train:  # the budget every step; every prompt unseen (one episode): n = 4 each
        assert m["rollout/num_samples"] == 32 and m["dynamo/alloc_budget"] == 32 and m["dynamo/step_trials"] == 32
        assert m["dynamo/alloc_min"] == m["dynamo/alloc_max"] == N and m["dynamo/alloc_skipped"] == 0
        assert m["dynamo/pool_size"] == PROMPTS_PER_STEP * m["step"]


def test_pool_holds_exactly_the_verified_outcomes(run):
    import numpy as np

    from dynamo_openrlhf import PassRatePool
    from dynamo_openrlhf.prompt_ids import prompt_id

    rows = [json.loads(line) for line in (run["base"] / "rewards.jsonl").read_text().splitlines()]
    pool = PassRatePool.from_bytes((run["run_dir"] / "pass_rate_pool.bin").read_bytes())
    assert len(pool) == STEPS * PROMPTS_PER_STEP
    per_step = PROMPTS_PER_STEP * N
    expect = {}
    for i, r in enumerate(rows):
        w = FORGET ** (STEPS - 1 - i // per_step)  # forgotten once per later step
        key = prompt_id(r["prompt"], r["label"])
        s, t = expect.get(key, (0.0, 0.0))
        expect[key] = (s + w * float(r["reward"] > 0.5), t + w)
    ids = np.array(sorted(expect), dtype=np.int64)
    s, f = pool.evidence(ids)
    assert np.allclose(s, [expect[k][0] for k in ids], rtol=1e-6, atol=0)
    assert np.allclose(s + f, [expect[k][1] for k in ids], rtol=1e-6, atol=0)


def test_the_pool_lives_in_exactly_one_process(run):
    """Every actor process of the run reported; only the trainer actor's holds a PassRatePool, exactly one."""
    assert run["triggered"]
    reports = {}
    for path in run["probe_dir"].glob("*.json"):
        r = json.loads(path.read_text())
        reports[r["pid"]] = r
    (trainer,) = _by_class(run["actors"], "DynamoPPOTrainer")
    actor_pids = {a["Pid"] for a in run["actors"]}
    missing = actor_pids - set(reports)
    assert not missing, f"no probe report from actor pids {sorted(missing)}"
    holders = {pid: r["pools"] for pid, r in reports.items() if r["pools"]}
    assert holders == {trainer["Pid"]: 1}, (holders, trainer["Pid"])
    # the pool's console lines come from that process
    saved = re.findall(r"\((\w+) pid=(\d+)(?:, ip=[^)]*)?\)(?:\x1b\[0m)? \[dynamo\] saved pass-rate pool",
                       run["stdout"])  # Ray's prefix, maybe coloured
    assert saved == [("DynamoPPOTrainer", str(trainer["Pid"]))]


def test_dynamo_off_on_two_nodes_trains_as_openrlhf(two_nodes, tmp_path):
    """DynaMO off (allocation rule off, modulation off, token-mean loss) on the same two nodes, 2 steps: the run
    trains with one actor rank and one engine per node, and no DynaMO part ran (the compatibility matrix's
    "two nodes / DynaMO off" cell, dynamo_openrlhf/compatibility.py)."""
    run_dir = tmp_path / "run"
    args = ["--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith", "--dynamo.run_dir", str(run_dir),
            "--dynamo.cpu_engine", "transformers",
            "--actor.num_nodes", "2", "--actor.num_gpus_per_node", "1", "--vllm.num_engines", "2",
            "--train.colocate_all",
            "--rollout.batch_size", str(PROMPTS_PER_STEP), "--rollout.n_samples_per_prompt", str(N),
            "--train.batch_size", "32", "--data.max_samples", str(2 * PROMPTS_PER_STEP), "--train.num_episodes", "1",
            "--no-dynamo.eval_at_start", "--no-dynamo.eval_at_end", "--ckpt.save_steps", "100",
            "--dynamo.allocation.rule", "off", "--dynamo.modulation.preset", "off",
            "--dynamo.loss.prompt_weighting", "tokens"]
    env = dict(os.environ)
    env.update(RAY_ADDRESS=two_nodes["cluster"].address, RAY_TMPDIR=str(two_nodes["root"]), COLUMNS="100",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0")
    state = two_nodes["cluster"].global_state
    before = set(state.actor_table(None))
    r = subprocess.run(PROG + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    new = [a for k, a in state.actor_table(None).items() if k not in before]
    nodes = {two_nodes["head_id"], two_nodes["worker_id"]}
    ranks = _by_class(new, "DynamoPolicyModelActor")
    engines = _by_class(new, "CPURolloutActor")
    assert {a["Address"]["NodeID"] for a in ranks} == nodes and len(ranks) == 2
    assert {a["Address"]["NodeID"] for a in engines} == nodes and len(engines) == 2
    rows = [x for x in _metrics(run_dir) if x["type"] == "train"]
    assert [x["step"] for x in rows] == [1, 2]
    for x in rows:
        assert x["rollout/num_samples"] == PROMPTS_PER_STEP * N
        assert not {"dynamo/alloc_budget", "dynamo/token_entropy", "dynamo/token_normalizer"} & set(x)
    assert not (run_dir / "pass_rate_pool.bin").exists()
