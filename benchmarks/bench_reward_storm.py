"""What a reward storm costs (issue #21 §5): every sample of a step times out in math-verify.

The samples are scored the way OpenRLHF 0.11.2 calls a reward file: one ``reward_func`` call per sample,
from a thread pool of asyncio's default size (``min(32, cpus + 4)``). The reward file is
tests/data/storm_reward.py (dynamo_openrlhf.reward with a math-verify that sleeps an hour), so each sample
holds one of the ``workers`` helper processes for the timeout, then its helper is killed and restarted.
For each (workers, timeout) the table gives the wall time of the step's scoring, the bound
``ceil(samples / workers) x timeout`` (the timeout x the parallelism), their ratio, and the helper start
time measured in the same run (a fresh helper answering one sample), whose cost the bound leaves out:
``ceil(samples / workers) x (timeout + start)`` is the model.

    python benchmarks/bench_reward_storm.py [--samples 16] [--workers 1,2,4] [--timeouts 0.5,2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
STORM = os.path.join(HERE, "..", "tests", "data", "storm_reward.py")


def _samples(n):
    prompts = [f"What is {i}+{i}?" for i in range(n)]
    return [p + f" The answer is \\boxed{{{2 * i}}}" for i, p in enumerate(prompts)], prompts, \
        [str(2 * i) for i in range(n)]


def helper_start_s(repeats: int = 3) -> float:
    """Median seconds for a fresh math-verify helper to start and answer one sample."""
    from dynamo_openrlhf.reward import MathReward

    times = []
    for _ in range(repeats):
        scorer = MathReward(timeout_s=60, workers=1)
        t0 = time.perf_counter()
        assert scorer.score("\\boxed{4}", "4").status == "correct"
        times.append(time.perf_counter() - t0)
        scorer.close()
    return statistics.median(times)


def storm_s(samples: int, workers: int, timeout_s: float) -> tuple[float, dict]:
    """Wall seconds to score ``samples`` storm samples as OpenRLHF does, and the summed extra_logs."""
    from dynamo_openrlhf.reward import MathReward

    os.environ["DYNAMO_STORM_SLEEP_S"] = "3600"
    scorer = MathReward(timeout_s=timeout_s, workers=workers, helper_file=STORM)
    queries, prompts, labels = _samples(samples)
    logs: dict = {}
    try:
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            t0 = time.perf_counter()
            outs = list(pool.map(lambda i: scorer([queries[i]], [prompts[i]], [labels[i]]), range(samples)))
            wall = time.perf_counter() - t0
    finally:
        scorer.close()
    for out in outs:
        for k, v in out["extra_logs"].items():
            logs[k] = logs.get(k, 0.0) + v
    return wall, logs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--timeouts", default="0.5,2")
    a = ap.parse_args(argv)
    start = helper_start_s()
    print(f"helper start (median of 3): {start:.2f} s; {a.samples} samples, {os.cpu_count()} CPUs")
    print("| workers | timeout s | storm wall s | bound ceil(N/W)·T s | wall / bound | model ceil(N/W)·(T+start) s | timeouts |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w in (int(x) for x in a.workers.split(",")):
        for t in (float(x) for x in a.timeouts.split(",")):
            wall, logs = storm_s(a.samples, w, t)
            rounds = math.ceil(a.samples / w)
            print(f"| {w} | {t:g} | {wall:.2f} | {rounds * t:.2f} | {wall / (rounds * t):.2f} | "
                  f"{rounds * (t + start):.2f} | {logs.get('math_timeout', 0):g}/{a.samples} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
