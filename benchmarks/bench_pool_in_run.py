"""Benchmark (not a test): a 10M-prompt pass-rate pool inside a real trainer run (issue #21, section 4).

    nice -n 19 python benchmarks/bench_pool_in_run.py            # 10,000,000-prompt pool, 4 trainer runs
    nice -n 19 python benchmarks/bench_pool_in_run.py --quick    # 10,000-prompt pool: a smoke run
    nice -n 19 python benchmarks/bench_pool_in_run.py --offline  # no trainer: the pool's CPU seconds (offline())

1. ``build_pool_file`` writes a synthetic pool with ``PassRatePool.save``: ``--prompts`` distinct int64 ids
   (an odd-multiplier bijection of 0..P-1, so never a collision), pass rates p ~ Beta(0.7, 0.9) (mostly
   easy or mostly hard prompts, as RL prompt sets are), 8 x (1..4) trials per prompt (one to four visits of a
   group of 8), successes ~ Binomial(trials, p). 24 bytes per prompt on disk, ~30 in memory.
2. Four runs of the tiny task (``--dynamo.preset tiny-cpu --dynamo.tiny_task arith``, 48 prompts, one
   episode = 3 steps, a checkpoint every step, no evaluation at the start, one sample per eval prompt at the
   end), one after the other, ``RAY_ADDRESS=local``:
   ``base`` (no pool file), ``pool`` (``--dynamo.pool.load <file>``), and the same two again with
   ``--ckpt.load_enable`` (``base_resume``, ``pool_resume``: restore the last checkpoint, nothing left to train).
   Each run records the 1-minute load average at its start and end (``loadavg_1min``): the machine may be
   shared, and the step and save times scale with how busy it is.
3. While a run goes, a thread samples VmRSS / VmHWM / RssAnon of ``/proc/<pid>/status`` every 50 ms for the
   processes of THAT run's process tree whose command line names ``DynamoPPOTrainer`` (the Ray actor that holds
   the pool), ``PolicyModelActor`` (the actor that writes the checkpoint) and the launcher itself. When the
   first train row appears in metrics.jsonl the trainer actor's VmHWM is reset (``clear_refs`` 5), so its final
   VmHWM is the peak over steps and saves, not over the start (which unpickles the pool it is handed).
4. From ``<run_dir>/metrics.jsonl`` (rows written by dynamo_openrlhf.ppo_trainer): per step
   ``timing/dynamo_pool`` and ``timing/step_total``; per checkpoint (``type == "ckpt"``)
   ``timing/dynamo_pool_save`` (the pool's to_bytes) and ``timing/ckpt_save`` (OpenRLHF's save: client_states
   over Ray to the policy actor, torch.save); per restore (``type == "ckpt_load"``) ``timing/dynamo_pool_load``
   (from_bytes + digest) and ``timing/ckpt_states_fetch`` (the checkpoint states over Ray).

Definitions: save window = [ckpt row time - ckpt_save - dynamo_pool_save, ckpt row time]; steady RSS before a
save = the last sample before its window; peak during a save = the largest sample inside it; the pool part of
a save = pool run's ckpt_save + dynamo_pool_save minus the base run's (medians over checkpoints); RSS overhead =
median steady RSS (pool) - median steady RSS (base), against the pool's ``stats()["bytes"]``.

CPU: the sampler also reads utime + stime of ``/proc/<pid>/stat``; per save and restore window the CPU seconds of
the trainer and policy actors (``cpu_in_windows``), and pool - base of them: on a shared machine the wall times
above grow with the load, the CPU seconds hardly.

Writes ``<out>/bench_pool_in_run.json`` and ``.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Command-line markers of the processes sampled (Ray sets an actor's process title to ``ray::<Class>...``).
TRAINER_MARK = "DynamoPPOTrainer"
POLICY_MARK = "PolicyModelActor"
#: An odd 64-bit constant: multiplication by it is a bijection of the integers mod 2**64.
_ID_MULTIPLIER = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def synthetic_ids(n: int) -> np.ndarray:
    """``n`` distinct int64 prompt ids, shape (n,): ``i * 0x9E3779B97F4A7C15 mod 2**64`` (as int64) for
    i = 0..n-1 (a bijection, so distinct for any n <= 2**64; id 0 for i = 0)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (np.arange(n, dtype=np.uint64) * np.uint64(_ID_MULTIPLIER)).view(np.int64)


def synthetic_counts(n: int, seed: int = 0, group: int = 8, max_visits: int = 4,
                     a: float = 0.7, b: float = 0.9) -> tuple:
    """(successes, trials), int64 arrays of shape (n,): trials = group x visits, visits uniform in
    1..max_visits; successes ~ Binomial(trials, p), p ~ Beta(a, b); numpy Generator(PCG64(seed))."""
    if group < 1 or max_visits < 1:
        raise ValueError(f"group and max_visits must be >= 1, got {group}, {max_visits}")
    rng = np.random.default_rng(seed)
    trials = group * rng.integers(1, max_visits + 1, size=n, dtype=np.int64)
    p = rng.beta(a, b, size=n)
    successes = rng.binomial(trials, p).astype(np.int64)
    return successes, trials


def build_pool(n: int, seed: int = 0):
    """A ``PassRatePool`` (prior Beta(1, 1), forget 1) with ``n`` prompts of :func:`synthetic_ids` and
    :func:`synthetic_counts` ``(n, seed)``, recorded in one update (one step)."""
    from dynamo_openrlhf import PassRatePool

    ids = synthetic_ids(n)
    succ, trials = synthetic_counts(n, seed)
    pool = PassRatePool(capacity=max(n, 1))
    pool.update(ids, succ, trials)
    return pool


def build_pool_file(path: str, n: int, seed: int = 0) -> Dict[str, Any]:
    """Write :func:`build_pool` ``(n, seed)`` to ``path`` with ``PassRatePool.save``; returns
    {"path", "prompts", "file_bytes", "memory_bytes" (the table's, ``stats()["bytes"]``), "sha256" (file),
    "mean_pass_rate" (evidence-weighted: successes / (successes + failures))}."""
    pool = build_pool(n, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pool.save(path)
    st = pool.stats()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    total = st["successes"] + st["failures"]
    return {"path": path, "prompts": len(pool), "file_bytes": os.path.getsize(path), "memory_bytes": st["bytes"],
            "sha256": h.hexdigest(), "mean_pass_rate": st["successes"] / total if total else float("nan")}


def parse_status(text: str) -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a ``/proc/<pid>/status`` text, in bytes (the file says
    kB = 1024 bytes); a field that is absent is left out."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            parts = rest.split()
            if len(parts) != 2 or parts[1] != "kB":
                raise ValueError(f"unexpected /proc status line {line!r}")
            out[key] = int(parts[0]) * 1024
    return out


def parse_stat_cpu(text: str, ticks_per_s: float) -> float:
    """CPU seconds (user + system, the process's own threads, not its waited-for children) of a
    ``/proc/<pid>/stat`` text: fields 14 and 15 (utime, stime, in clock ticks) / ``ticks_per_s``. The command
    name (field 2) may hold spaces and parentheses, so the fields are counted after its last ``)``."""
    rest = text.rsplit(")", 1)[-1].split()
    if ")" not in text or len(rest) < 13:
        raise ValueError(f"unexpected /proc stat text {text[:80]!r}")
    return (int(rest[11]) + int(rest[12])) / ticks_per_s


def restore_windows(rows: Iterable[Dict[str, Any]]) -> List[tuple]:
    """(step, start, end) of every restore row (``type == "ckpt_load"``), in seconds since the epoch: end = the
    row's ``time``, start = end - ``timing/ckpt_states_fetch`` - ``timing/dynamo_pool_load``."""
    out = []
    for r in rows:
        if r.get("type") == "ckpt_load":
            end = float(r["time"])
            out.append((int(r["step"]),
                        end - float(r["timing/ckpt_states_fetch"]) - float(r["timing/dynamo_pool_load"]), end))
    return out


def cpu_in_windows(samples: Sequence[tuple], windows: Sequence[tuple]) -> List[Dict[str, Any]]:
    """Per window (step, start, end): {"step", "cpu_s"}: the CPU seconds a process spent from its last sample
    at or before start to its first sample at or after end, from ``samples`` = (time, CPU seconds) sorted by
    time. Unlike wall time this hardly depends on how busy a shared machine is (it over-counts by at most the
    CPU of one sampling interval at each end). A window without a sample on both sides is skipped."""
    out = []
    for step, start, end in windows:
        before = [c for t, c in samples if t <= start]
        after = [c for t, c in samples if t >= end]
        if before and after:
            out.append({"step": step, "cpu_s": after[0] - before[-1]})
    return out


def descendants(root: int, parents: Dict[int, int]) -> List[int]:
    """The pids below ``root`` (children, grandchildren, ...; not root itself), sorted, from a
    {pid: parent pid} map."""
    kids: Dict[int, List[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out and c != root:
                out.append(c)
                todo.append(c)
    return sorted(out)


def save_windows(rows: Iterable[Dict[str, Any]]) -> List[tuple]:
    """(step, start, end) of every checkpoint row (``type == "ckpt"``), in seconds since the epoch:
    end = the row's ``time``, start = end - ``timing/ckpt_save`` - ``timing/dynamo_pool_save``."""
    out = []
    for r in rows:
        if r.get("type") == "ckpt":
            end = float(r["time"])
            out.append((int(r["step"]), end - float(r["timing/ckpt_save"]) - float(r["timing/dynamo_pool_save"]), end))
    return out


def rss_around_saves(samples: Sequence[tuple], windows: Sequence[tuple]) -> List[Dict[str, Any]]:
    """Per save window (step, start, end): {"step", "steady" (VmRSS of the last sample before start, bytes),
    "peak" (largest VmRSS sampled in [start, end]), "ratio" (peak / steady), "samples" (in the window)}, from
    ``samples`` = (time, VmRSS bytes) sorted by time. A window with no sample before it or none inside is
    skipped."""
    out = []
    for step, start, end in windows:
        before = [v for t, v in samples if t < start]
        inside = [v for t, v in samples if start <= t <= end]
        if not before or not inside:
            continue
        steady, peak = before[-1], max(inside)
        out.append({"step": step, "steady": steady, "peak": peak, "ratio": peak / steady, "samples": len(inside)})
    return out


def summarise_run(rows: Sequence[Dict[str, Any]], samples: Dict[str, List[tuple]],
                  cpu: Optional[Dict[str, List[tuple]]] = None) -> Dict[str, Any]:
    """One run's numbers from its metrics rows and RSS samples ({role: [(time, VmRSS bytes)]}):
    medians over steps of ``timing/dynamo_pool`` and ``timing/step_total`` (s), medians over checkpoints of
    ``timing/dynamo_pool_save`` and ``timing/ckpt_save`` (s), the restore's ``timing/dynamo_pool_load`` and
    ``timing/ckpt_states_fetch`` (s, None without one), and per role the save windows' steady/peak RSS."""
    train = [r for r in rows if r.get("type") == "train"]
    ckpt = [r for r in rows if r.get("type") == "ckpt"]
    load = [r for r in rows if r.get("type") == "ckpt_load"]

    def med(rs, key):
        vals = [float(r[key]) for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    windows = save_windows(rows)
    rss = {role: rss_around_saves(s, windows) for role, s in samples.items()}
    cpu_out = {}
    for role, s in (cpu or {}).items():
        saves, restores = cpu_in_windows(s, windows), cpu_in_windows(s, restore_windows(rows))
        cpu_out[role] = {"saves": saves, "restores": restores,
                         "save_median_s": statistics.median([x["cpu_s"] for x in saves]) if saves else None,
                         "restore_s": restores[-1]["cpu_s"] if restores else None}
    return {
        "cpu": cpu_out,
        "steps": len(train),
        "pool_s": med(train, "timing/dynamo_pool"),
        "step_s": med(train, "timing/step_total"),
        "checkpoints": len(ckpt),
        "pool_save_s": med(ckpt, "timing/dynamo_pool_save"),
        "ckpt_save_s": med(ckpt, "timing/ckpt_save"),
        "pool_state_bytes": max((int(r.get("dynamo/pool_state_bytes", 0)) for r in ckpt), default=0),
        "pool_load_s": float(load[-1]["timing/dynamo_pool_load"]) if load else None,
        "states_fetch_s": float(load[-1]["timing/ckpt_states_fetch"]) if load else None,
        "rss": {role: {"saves": w,
                       "steady": statistics.median([x["steady"] for x in w]) if w else None,
                       "max_ratio": max((x["ratio"] for x in w), default=None)}
                for role, w in rss.items()},
    }


# ----------------------------------------------------------------------------------------------
# running the trainer
# ----------------------------------------------------------------------------------------------
def _parents() -> Dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Samples VmRSS/VmHWM of the run's trainer actor, policy actor and launcher (``root``) every
    ``interval`` s, re-finding the actors in root's process tree every 2 s; resets the trainer actor's VmHWM
    once ``metrics_path`` holds a train row."""

    def __init__(self, root: int, metrics_path: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.metrics_path, self.interval = root, metrics_path, interval
        self.samples: Dict[str, List[tuple]] = {"trainer": [], "policy": [], "launcher": []}
        self.cpu: Dict[str, List[tuple]] = {"trainer": [], "policy": [], "launcher": []}  # (time, CPU s)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.last: Dict[str, Dict[str, int]] = {}
        self.pids: Dict[str, int] = {"launcher": root}
        self.hwm_reset_at: Optional[float] = None
        self.stop = threading.Event()

    def _find(self) -> None:
        for pid in descendants(self.root, _parents()):
            cmd = _cmdline(pid)
            if TRAINER_MARK in cmd:
                self.pids["trainer"] = pid
            elif POLICY_MARK in cmd:
                self.pids["policy"] = pid

    def _train_row_seen(self) -> bool:
        try:
            with open(self.metrics_path) as f:
                return any('"type": "train"' in line for line in f)
        except OSError:
            return False

    def run(self) -> None:
        next_find = 0.0
        while not self.stop.is_set():
            now = time.time()
            if now >= next_find:
                self._find()
                next_find = now + 2.0
                if self.hwm_reset_at is None and "trainer" in self.pids and self._train_row_seen():
                    try:
                        with open(f"/proc/{self.pids['trainer']}/clear_refs", "w") as f:
                            f.write("5")  # resets VmHWM to the current VmRSS
                        self.hwm_reset_at = now
                    except OSError:
                        self.hwm_reset_at = -1.0
            for role, pid in list(self.pids.items()):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        st = parse_status(f.read())
                except (OSError, ValueError):
                    continue
                if "VmRSS" in st:
                    self.samples[role].append((now, st["VmRSS"]))
                    self.last[role] = st
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        self.cpu[role].append((now, parse_stat_cpu(f.read(), self.ticks)))
                except (OSError, ValueError):
                    pass
            time.sleep(self.interval)


def train_command(run_dir: str, pool_file: Optional[str], resume: bool) -> List[str]:
    cmd = [sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith",
           "--dynamo.run_dir", run_dir, "--data.max_samples", "48", "--train.num_episodes", "1",
           "--ckpt.save_steps", "1", "--ckpt.max_num", "2", "--ckpt.best_metric_key", "none",
           "--no-dynamo.eval_at_start", "--eval.n_samples_per_prompt", "1"]
    if pool_file:
        cmd += ["--dynamo.pool.load", pool_file]
    if resume:
        cmd += ["--ckpt.load_enable"]
    return cmd


def run_one(name: str, run_dir: str, pool_file: Optional[str], resume: bool, timeout: float) -> Dict[str, Any]:
    if not resume and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    cmd = train_command(run_dir, pool_file, resume)
    env = dict(os.environ, RAY_ADDRESS="local")  # never join another Ray cluster
    metrics = os.path.join(run_dir, "metrics.jsonl")
    load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    t0 = time.time()
    with open(os.path.join(run_dir, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, metrics)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            sampler.stop.set()
            sampler.join()
    if rc != 0:
        raise RuntimeError(f"{name} failed (rc {rc}); see {run_dir}/{name}.log")
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if float(r.get("time", t0)) >= t0]  # a resumed run appends to the first run's file
    out = summarise_run(rows, sampler.samples, sampler.cpu)
    out.update({"name": name, "command": " ".join(cmd[1:]), "wall_s": time.time() - t0,
                "loadavg_1min": [load_start, os.getloadavg()[0]],
                "trainer_hwm_after_reset": sampler.last.get("trainer", {}).get("VmHWM"),
                "hwm_reset_at": sampler.hwm_reset_at,
                "peak_rss": {role: max((v for _, v in s), default=None) for role, s in sampler.samples.items()}})
    return out


# ----------------------------------------------------------------------------------------------
# offline: the pool's parts of a step, a save and a restore, in CPU seconds (no trainer)
# ----------------------------------------------------------------------------------------------
def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    raise ValueError(f"no {field} in /proc/self/status")


def offline(pool_file: str, steps: int = 25, repeats: int = 3, small: int = 10_000) -> Dict[str, Any]:
    """The pool's own work, in CPU seconds (``time.process_time``: all threads, rayon's included), on the pool
    file ``pool_file`` against a ``small``-prompt pool built like it:

    * per step (``steps`` steps, 16 random prompts of the pool each, 1 to 8 successes out of the allocation):
      ``RolloutAllocator.allocate``, ``record`` (the pool update; ``fit_prior`` every 10th), ``metrics``;
      forget 0.999 and the other ``AllocationConfig`` defaults; medians and maxima in ms;
    * a save's ``to_bytes`` (CPU s, and the process's VmHWM over VmRSS before it, MiB: the transient copies);
    * a restore as the trainer does it: the checkpoint tensor to bytes (``pool_from_checkpoint``'s copy),
      ``from_bytes``, the digest of its log line (``restored_pool_digest``: sha256 of the checkpoint bytes), and
      the digest it used to take (``pool_digest``: ``to_bytes`` + sha256; equal digests asserted).
    ``repeats`` repeats of the save and restore."""
    import torch

    from dynamo_openrlhf import PassRatePool, cpu_backend
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator

    cpu_backend.install_import_stand_ins()  # ppo_trainer imports openrlhf
    from dynamo_openrlhf.ppo_trainer import restored_pool_digest

    def clock(f):
        c = time.process_time()
        out = f()
        return out, time.process_time() - c

    out: Dict[str, Any] = {"pool_file": pool_file, "steps": steps, "per_step": {}, "save": [], "restore": []}
    rng = np.random.default_rng(0)
    big = PassRatePool.load(pool_file)
    for name, pool, ids_of in (("small", build_pool(small), synthetic_ids(small)), ("pool", big, None)):
        pool.forget = 0.999
        alloc = RolloutAllocator(AllocationConfig(forget=0.999), pool=pool)
        ids_all = ids_of if ids_of is not None else pool.ids()
        times: Dict[str, List[float]] = {"allocate": [], "record": [], "metrics": []}
        for _ in range(steps):
            ids = ids_all[rng.integers(0, len(ids_all), size=16)]
            counts, t_alloc = clock(lambda: alloc.allocate(ids))
            succ = rng.binomial(counts, 0.5)
            _, t_rec = clock(lambda: alloc.record(ids, succ, counts))
            _, t_met = clock(alloc.metrics)
            for k, v in (("allocate", t_alloc), ("record", t_rec), ("metrics", t_met)):
                times[k].append(v)
        out["per_step"][name] = {"prompts": len(pool), **{f"{k}_ms_median": 1e3 * statistics.median(v)
                                                           for k, v in times.items()},
                                 **{f"{k}_ms_max": 1e3 * max(v) for k, v in times.items()}}
        del ids_all
    del alloc, pool, big  # the stepped pool; the save and restore use a fresh load
    big = PassRatePool.load(pool_file)
    for _ in range(repeats):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pass
        before = _vm("VmRSS")
        data, t_save = clock(big.to_bytes)
        out["save"].append({"to_bytes_s": t_save, "transient_mib": _vm("VmHWM") - before})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))  # the checkpoint form
        raw, t_copy = clock(lambda: tensor.numpy().tobytes())
        restored, t_parse = clock(lambda: PassRatePool.from_bytes(raw))
        old, t_digest = clock(lambda: hashlib.sha256(restored.to_bytes()).hexdigest())
        new, t_sha = clock(lambda: restored_pool_digest(raw, restored))
        if old != new:
            raise RuntimeError("the checkpoint bytes and the restored pool's to_bytes differ")
        out["restore"].append({"copy_s": t_copy, "from_bytes_s": t_parse, "digest_to_bytes_sha_s": t_digest,
                               "restored_pool_digest_s": t_sha, "before_s": t_copy + t_parse + t_digest,
                               "now_s": t_copy + t_parse + t_sha})
        del data, tensor, raw, restored
    out["loadavg_1min"] = os.getloadavg()[0]
    return out


def offline_table(o: Dict[str, Any]) -> str:
    """Markdown tables of :func:`offline`'s numbers."""
    lines = ["| pool | prompts | allocate (ms, median / max) | record (ms, median / max) | metrics (ms, median / max) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in o["per_step"].items():
        lines.append(f"| {name} | {r['prompts']:,} | " + " | ".join(
            f"{r[k + '_ms_median']:.3f} / {r[k + '_ms_max']:.1f}" for k in ("allocate", "record", "metrics")) + " |")
    lines += ["", "| save | to_bytes CPU (s) | transient (MiB over RSS before) |", "|---|---:|---:|"]
    lines += [f"| {i + 1} | {r['to_bytes_s']:.3f} | {r['transient_mib']:.0f} |" for i, r in enumerate(o["save"])]
    lines += ["", "| restore | tensor -> bytes (s) | from_bytes (s) | digest now: restored_pool_digest (s) | digest "
              "before: to_bytes + sha256 (s) | total now (s) | total before (s) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {i + 1} | {r['copy_s']:.3f} | {r['from_bytes_s']:.3f} | {r['restored_pool_digest_s']:.3f} | "
              f"{r['digest_to_bytes_sha_s']:.3f} | {r['now_s']:.3f} | {r['before_s']:.3f} |"
              for i, r in enumerate(o["restore"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _mb(x):
    return "-" if x is None else f"{x / 2**20:,.0f}"


def _s(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def _loads(x):
    return "-" if not x else ", ".join(f"{v:.1f}" for v in x)


def table(pool: Dict[str, Any], runs: Dict[str, Dict[str, Any]]) -> str:
    lines = [f"Pool: {pool['prompts']:,} prompts, file {_mb(pool['file_bytes'])} MiB, in memory "
             f"{_mb(pool['memory_bytes'])} MiB, built in {pool['build_s']:.1f} s.", "",
             "| run | steps | timing/dynamo_pool (s, median) | step_total (s, median) | checkpoints | pool to_bytes (s) "
             "| ckpt save (s, median) | pool load (s) | states fetch (s) | trainer steady RSS (MiB) "
             "| trainer peak/steady in saves (max) | policy peak/steady in saves (max) | load avg 1 min (start, end) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        t, pol = r["rss"].get("trainer", {}), r["rss"].get("policy", {})
        lines.append(f"| {name} | {r['steps']} | {_s(r['pool_s'], 4)} | {_s(r['step_s'], 2)} | {r['checkpoints']} | "
                     f"{_s(r['pool_save_s'])} | {_s(r['ckpt_save_s'])} | {_s(r['pool_load_s'])} | "
                     f"{_s(r['states_fetch_s'])} | {_mb(t.get('steady'))} | {_s(t.get('max_ratio'), 2)} | "
                     f"{_s(pol.get('max_ratio'), 2)} | {_loads(r.get('loadavg_1min'))} |")
    if "base" not in runs or "pool" not in runs:
        return "\n".join(lines)
    d = derived(pool, runs)
    lines += ["", "CPU seconds (user + system) of the actors inside the windows, from /proc/<pid>/stat (a shared machine "
              "stretches wall time, hardly CPU time):", "",
              "| run | trainer CPU in a save (s, median) | policy CPU in a save (s, median) | trainer CPU in the restore (s) |",
              "|---|---:|---:|---:|"]
    for name, r in runs.items():
        c = r.get("cpu", {})
        lines.append(f"| {name} | {_s(c.get('trainer', {}).get('save_median_s'))} | "
                     f"{_s(c.get('policy', {}).get('save_median_s'))} | {_s(c.get('trainer', {}).get('restore_s'))} |")
    lines += ["", "| quantity | measured | target |", "|---|---:|---:|",
              f"| pool part of a checkpoint save (s) | {_s(d['save_pool_part_s'], 2)} | <= 2 |",
              f"| pool part of a restore (s): states fetch + pool load, pool - base | {_s(d['load_pool_part_s'], 2)} "
              "| <= 2 |",
              f"| trainer actor: peak RSS during a save / steady RSS before it (max over saves) | "
              f"{_s(d['save_peak_ratio'], 2)} | <= 1.2 |",
              f"| trainer actor: steady RSS, pool - base (MiB) / pool's own bytes (MiB) | "
              f"{_mb(d['rss_overhead_bytes'])} / {_mb(pool['memory_bytes'])} = {_s(d['rss_overhead_ratio'], 2)} | - |",
              f"| timing/dynamo_pool, pool / base (median step) | {_s(d['pool_time_ratio'], 2)} | ~1 |",
              f"| step_total, pool / base (median step) | {_s(d['step_ratio'], 2)} | ~1 |",
              f"| CPU s of a save (trainer + policy), pool - base | {_s(d.get('save_pool_part_cpu_s'), 2)} | - |",
              f"| CPU s of the restore (trainer), pool - base | {_s(d.get('load_pool_part_cpu_s'), 2)} | - |"]
    return "\n".join(lines)


def derived(pool: Dict[str, Any], runs: Dict[str, Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """The issue's quantities from the runs "base", "pool" (and "base_resume", "pool_resume" if present)."""
    b, p = runs["base"], runs["pool"]

    def diff(x, y):
        return None if x is None or y is None else x - y

    def ratio(x, y):
        return None if x is None or not y else x / y

    save_b = (b["ckpt_save_s"] or 0) + (b["pool_save_s"] or 0)
    save_p = (p["ckpt_save_s"] or 0) + (p["pool_save_s"] or 0)
    load = None
    if "pool_resume" in runs and "base_resume" in runs:
        rp, rb = runs["pool_resume"], runs["base_resume"]
        if rp["pool_load_s"] is not None and rb["pool_load_s"] is not None:
            load = (rp["pool_load_s"] + rp["states_fetch_s"]) - (rb["pool_load_s"] + rb["states_fetch_s"])
    def cpu(run, key):
        c = run.get("cpu", {})
        vals = [c.get(role, {}).get(key) for role in ("trainer", "policy")]
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None

    save_cpu = diff(cpu(p, "save_median_s"), cpu(b, "save_median_s"))
    load_cpu = None
    if "pool_resume" in runs and "base_resume" in runs:
        load_cpu = diff(runs["pool_resume"].get("cpu", {}).get("trainer", {}).get("restore_s"),
                        runs["base_resume"].get("cpu", {}).get("trainer", {}).get("restore_s"))
    st_b, st_p = b["rss"]["trainer"]["steady"], p["rss"]["trainer"]["steady"]
    over = diff(st_p, st_b)
    return {"save_pool_part_s": save_p - save_b, "load_pool_part_s": load,
            "save_peak_ratio": p["rss"]["trainer"]["max_ratio"],
            "rss_overhead_bytes": over, "rss_overhead_ratio": ratio(over, pool["memory_bytes"]),
            "pool_time_ratio": ratio(p["pool_s"], b["pool_s"]), "step_ratio": ratio(p["step_s"], b["step_s"]),
            "save_pool_part_cpu_s": save_cpu, "load_pool_part_cpu_s": load_cpu}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=10_000_000)
    ap.add_argument("--quick", action="store_true", help="a 10,000-prompt pool")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_pool_in_run"))
    ap.add_argument("--runs", default="base,pool,base_resume,pool_resume")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--offline", action="store_true",
                    help="no trainer runs: the pool's parts of a step, a save and a restore in CPU seconds (offline())")
    ap.add_argument("--pool_file", default=None, help="with --offline: an existing pool file instead of building one")
    ap.add_argument("--reuse", default=None,
                    help="a bench_pool_in_run.json whose runs fill in those not in --runs (e.g. an earlier base)")
    args = ap.parse_args(argv)
    n = 10_000 if args.quick else args.prompts
    os.makedirs(args.out, exist_ok=True)
    pool_file = os.path.join(args.out, f"pool_{n}.bin")
    if args.offline and args.pool_file:
        o = offline(args.pool_file, steps=25, repeats=3)
        with open(os.path.join(args.out, "bench_pool_offline.json"), "w") as f:
            json.dump(o, f, indent=1)
        text = offline_table(o)
        with open(os.path.join(args.out, "bench_pool_offline.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return 0
    t0 = time.time()
    pool = build_pool_file(pool_file, n)
    pool["build_s"] = time.time() - t0
    print(f"pool: {pool}", flush=True)
    if args.offline:
        o = offline(pool_file, steps=25, repeats=3, small=min(10_000, n))
        with open(os.path.join(args.out, "bench_pool_offline.json"), "w") as f:
            json.dump(o, f, indent=1)
        text = offline_table(o)
        with open(os.path.join(args.out, "bench_pool_offline.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return 0
    runs: Dict[str, Dict[str, Any]] = {}
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)["runs"]
        runs.update({k: dict(v, reused_from=args.reuse) for k, v in earlier.items() if k not in args.runs.split(",")})
    for name in args.runs.split(","):
        base = name.replace("_resume", "")
        r = run_one(name, os.path.join(args.out, base), pool_file if base == "pool" else None,
                    name.endswith("_resume"), args.timeout)
        runs[name] = r
        print(json.dumps({k: v for k, v in r.items() if k != "rss"}), flush=True)
        with open(os.path.join(args.out, "bench_pool_in_run.json"), "w") as f:
            json.dump({"pool": pool, "runs": runs}, f, indent=1)
    text = table(pool, runs)
    with open(os.path.join(args.out, "bench_pool_in_run.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
