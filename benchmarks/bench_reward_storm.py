"""What a reward storm costs (issue #21 §5): every sample of a step times out in math-verify.

The samples are scored the way OpenRLHF 0.11.2 calls a reward file: one ``reward_func`` call per sample,
from a thread pool of asyncio's default size (``min(32, cpus + 4)``). The reward file is
tests/data/storm_reward.py (dynamo_openrlhf.reward with a math-verify that sleeps an hour), so each sample
holds one of the ``workers`` helper processes for the timeout, then its helper is killed and the slot's next
sample gets a new helper forked by the warm zygote. The scorer is started before the step is timed
(``MathReward.start()``: the zygote and the ``workers`` helpers, as after a run's first step); the one-off
cost of that first start is measured separately (``cold start``), and so is one replacement (a fork from the
warm zygote answering one sample, then killed).

For each (workers W, timeout T) the storm is run ``--repeats`` times; the table gives the median and the
largest wall time of the step's scoring, the bound ``ceil(N/W)·T`` (the timeout × the parallelism), the
ratio median / bound and max / bound, the median overhead per round ``(wall − bound) / ceil(N/W)``, the
timeouts per step and the helpers forked during a step (``N − W``: each timeout kills its helper, and every
slot but the step's last samples' needs a new one; the scorer started with W).

    python benchmarks/bench_reward_storm.py [--samples 8] [--workers 1,2,4] [--timeouts 0.5,2] [--repeats 3]
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


def cold_start_s(repeats: int = 3) -> float:
    """Median seconds from a new scorer to its first answer (zygote start, math-verify import, one fork)."""
    from dynamo_openrlhf.reward import MathReward

    times = []
    for _ in range(repeats):
        scorer = MathReward(timeout_s=60, workers=1)
        t0 = time.perf_counter()
        assert scorer.score("\\boxed{4}", "4").status == "correct"
        times.append(time.perf_counter() - t0)
        scorer.close()
    return statistics.median(times)


def replacement_s(repeats: int = 20) -> float:
    """Median seconds to fork a helper from the warm zygote, have it answer one sample, and kill it."""
    from dynamo_openrlhf.reward import MathReward

    scorer = MathReward(timeout_s=60, workers=1).start()
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            helper = scorer._fork_helper()
            assert helper.ask("4", "4", 60)["status"] == "correct"
            helper.kill()
            times.append(time.perf_counter() - t0)
    finally:
        scorer.close()
    return statistics.median(times)


def storm_s(samples: int, workers: int, timeout_s: float) -> tuple[float, dict, int]:
    """Wall seconds to score ``samples`` storm samples as OpenRLHF does (scorer started beforehand), the
    summed extra_logs, and the helpers forked during the step."""
    from dynamo_openrlhf.reward import MathReward

    os.environ["DYNAMO_STORM_SLEEP_S"] = "3600"
    scorer = MathReward(timeout_s=timeout_s, workers=workers, helper_file=STORM).start()
    queries, prompts, labels = _samples(samples)
    logs: dict = {}
    try:
        forked0 = scorer.helper_starts
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            t0 = time.perf_counter()
            outs = list(pool.map(lambda i: scorer([queries[i]], [prompts[i]], [labels[i]]), range(samples)))
            wall = time.perf_counter() - t0
        forked = scorer.helper_starts - forked0
    finally:
        scorer.close()
    for out in outs:
        for k, v in out["extra_logs"].items():
            logs[k] = logs.get(k, 0.0) + v
    return wall, logs, forked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--timeouts", default="0.5,2")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import torch  # noqa: F401  (the trainer has it imported; reward_func builds its tensors with it)

    cold, repl = cold_start_s(), replacement_s()
    print(f"cold start (median of 3): {cold:.2f} s; replacement from the warm zygote (fork + one answer + kill, "
          f"median of 20): {1000 * repl:.1f} ms; {a.samples} samples, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| workers W | timeout T s | storm wall s, median (max) | bound ceil(N/W)·T s | wall / bound, median (max) "
          "| overhead per round ms | timeouts | helpers forked |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in (int(x) for x in a.workers.split(",")):
        for t in (float(x) for x in a.timeouts.split(",")):
            runs = [storm_s(a.samples, w, t) for _ in range(a.repeats)]
            walls = [r[0] for r in runs]
            timeouts = {r[1].get("math_timeout", 0) for r in runs}
            forked = {r[2] for r in runs}
            rounds = math.ceil(a.samples / w)
            bound = rounds * t
            med, worst = statistics.median(walls), max(walls)
            print(f"| {w} | {t:g} | {med:.3f} ({worst:.3f}) | {bound:.2f} | {med / bound:.3f} ({worst / bound:.3f}) | "
                  f"{1000 * (med - bound) / rounds:.1f} | {'/'.join(f'{x:g}' for x in sorted(timeouts))}/{a.samples} | "
                  f"{'/'.join(str(x) for x in sorted(forked))} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
