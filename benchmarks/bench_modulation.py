"""Benchmark (not a test): forward+backward of DynaMOPolicyLoss vs OpenRLHF 0.11.2's PolicyLoss.

    python benchmarks/bench_modulation.py                        # (256, 2048) float32, CPU, int64 mask
    python benchmarks/bench_modulation.py --threads 1 --no-trim  # the configuration of the docs/bench_modulation.md table
    python benchmarks/bench_modulation.py --quick                # (64, 512), 10 rounds: a smoke run

All variants get the same tensors: log-probs (requires_grad, multiplied by the mask as OpenRLHF's
actor returns them), old log-probs, one GRPO advantage per sequence, token entropies, and an action
mask with response lengths uniform in [length/8, length]. DynaMO uses the ``--preset`` modulation
(default decay6) and is given ``entropy=``, once with its statistics (the default) and once with
``modulation_stats=False``; the parent is called exactly as OpenRLHF's actor calls it.

Time: every round runs each variant once, in alternating order, so that all see the same machine
load; the table gives the medians of wall-clock and of process CPU time (``time.process_time``,
which does not count time spent waiting for a core on a shared machine), the ratio of the medians
and the median of the per-round ratios (the most load-robust number), and minor page faults per
call. ``--no-trim`` makes glibc keep freed memory (no heap trimming, no mmap for large blocks), as
PyTorch's CUDA caching allocator does; with glibc's defaults the fresh 2 MiB buffers of both losses
page-fault unpredictably (hundreds of faults per call, at ~1-3 µs each on this VM).

Extra peak memory: torch's CPU allocator keeps no peak counter, so each variant runs once under
``torch.profiler`` with ``profile_memory=True``; every allocation/free the c10 CPU allocator reports
is replayed in time order (an op's net positive allocation at its start, a net release at its end:
an upper bound at op granularity) and the peak of the running sum, relative to the start of the
forward, is taken. Cross-check: glibc's ``mallinfo2()`` (bytes in use, heap + mmap) sampled before
and after every aten op through a ``TorchDispatchMode`` (also sees autograd's backward ops). Both are
reported in units of one (batch, length) float32 tensor. The inputs (including the entropy tensor,
which the actor's forward produces anyway when asked) exist before the measured region.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dynamo_openrlhf.cpu_backend import install_import_stand_ins

install_import_stand_ins()

from openrlhf.models.loss import PolicyLoss  # noqa: E402

from dynamo_openrlhf.loss import DynaMOPolicyLoss  # noqa: E402
from dynamo_openrlhf.modulation import modulate_advantages  # noqa: E402


def make_inputs(batch, length, mask_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, length // 8), length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lens[:, None]
    lp = -torch.rand(batch, length, generator=g) * 3 * mask
    old = lp + 0.1 * torch.randn(batch, length, generator=g)
    adv = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    ent = torch.rand(batch, length, generator=g) * 2
    mask = {"long": mask.long(), "bool": mask, "float": mask.float()}[mask_dtype]
    return [t.to(device) for t in (lp, old, adv, ent, mask)]


def make_step(loss_fn, inputs, with_entropy):
    lp, old, adv, ent, mask = inputs
    extra = {"entropy": ent} if with_entropy else {}

    def prepare():
        return lp.detach().clone().requires_grad_()

    def step(x):
        out = loss_fn(x, old, adv, action_mask=mask, **extra)
        out[0].backward()
        return out

    return prepare, step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pairs(variants, repeats, device):
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    names = list(variants)
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            prepare, step = variants[name]
            x = prepare()
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time()
            t0 = time.perf_counter()
            step(x)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del x
    return times, cpu, faults


def profiler_peak(prepare, step):
    """Peak of the replayed c10 CPU-allocator timeline during one forward+backward (bytes)."""
    x = prepare()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x)
    events = []
    for e in prof.events():
        if e.name == "[memory]":
            if e.cpu_memory_usage:
                events.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage:
            s = e.self_cpu_memory_usage
            events.append((e.time_range.start if s > 0 else e.time_range.end, s))
    events.sort()
    cur = peak = 0
    for _, s in events:
        cur += s
        peak = max(peak, cur)
    return peak


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _mallinfo_used():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def used():
        m = fn()
        return m.uordblks + m.hblkhd

    return used


class _PeakMode(TorchDispatchMode):
    def __init__(self, used):
        super().__init__()
        self.used = used
        self.base = used()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.peak = max(self.peak, self.used() - self.base)
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.used() - self.base)
        return out


def mallinfo_peak(prepare, step):
    used = _mallinfo_used()
    if used is None:
        return None
    x = prepare()
    gc.collect()
    with _PeakMode(used) as mode:
        step(x)
    return mode.peak


def cuda_peak(prepare, step):
    x = prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--preset", default="decay6")
    ap.add_argument("--repeats", type=int, default=40, help="timed pairs")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--mask-dtype", choices=["long", "bool", "float"], default="long",
                    help="OpenRLHF's samples carry an int64 action mask")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="(64, 512), 10 rounds, 1 thread: a smoke run")
    ap.add_argument("--no-trim", action="store_true",
                    help="glibc mallopt: never trim the heap nor mmap large blocks (freed memory is kept and "
                         "reused, as PyTorch's CUDA caching allocator does), so page faults do not blur the timing")
    args = ap.parse_args(argv)
    if args.no_trim:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**30) and libc.mallopt(M_MMAP_THRESHOLD, 2**30)
        if not ok:
            raise SystemExit("mallopt failed")
    if args.quick:
        args.batch, args.length, args.repeats, args.warmup = 64, 512, 10, 2
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)

    inputs = make_inputs(args.batch, args.length, args.mask_dtype, args.device)
    parent = PolicyLoss()
    dynamo = DynaMOPolicyLoss(modulation=args.preset)
    dynamo_nostats = DynaMOPolicyLoss(modulation=args.preset, modulation_stats=False)
    p_name = "OpenRLHF PolicyLoss"
    d_name = f"DynaMOPolicyLoss ({args.preset})"
    lp, old, adv, ent, mask = inputs
    float_mask_inputs = [lp, old, adv, ent, (mask != 0).to(lp.dtype)]

    def modulation_only():
        def prepare():
            return None

        def step(_):
            return modulate_advantages(adv, lp, old, ent, mask, config=args.preset)

        return prepare, step

    variants = {
        p_name: make_step(parent, inputs, with_entropy=False),
        d_name: make_step(dynamo, inputs, with_entropy=True),
        f"DynaMOPolicyLoss ({args.preset}, modulation_stats=False)": make_step(
            dynamo_nostats, inputs, with_entropy=True
        ),
        # breakdown: the modulation alone (forward only, no loss), and the parent given the 0/1
        # float mask that DynaMOPolicyLoss hands it (see dynamo_openrlhf/loss.py)
        f"  breakdown: modulate_advantages ({args.preset}) alone": modulation_only(),
        "  breakdown: OpenRLHF PolicyLoss given a float32 mask": make_step(parent, float_mask_inputs, with_entropy=False),
    }

    # sanity: "off" is the parent, the preset changes the loss
    ref = parent(lp, old, adv, action_mask=mask)
    off = DynaMOPolicyLoss(modulation="off")(lp, old, adv, action_mask=mask, entropy=ent)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(ref, off))
    on = dynamo(lp, old, adv, action_mask=mask, entropy=ent)
    stats = {k: round(float(v), 4) for k, v in dynamo.last_modulation_stats.items()}

    time_pairs(variants, args.warmup, args.device)
    times, cpu, faults = time_pairs(variants, args.repeats, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}

    tensor_bytes = args.batch * args.length * 4
    if args.device.startswith("cuda"):
        mem = {k: (cuda_peak(*v), None) for k, v in variants.items()}
    else:
        mem = {k: (profiler_peak(*v), mallinfo_peak(*v)) for k, v in variants.items()}

    def units(b):
        return "n/a" if b is None else f"{b / tensor_bytes:.2f}"

    print(f"# DynaMOPolicyLoss vs PolicyLoss, forward+backward, ({args.batch}, {args.length}) float32, "
          f"{args.mask_dtype} mask, device={args.device}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cpu(s), "
          f"load avg {os.getloadavg()[0]:.2f}; {args.repeats} rounds (variants in alternating order) after "
          f"{args.warmup} warm-up rounds; allocator: "
          f"{'glibc, no trim/mmap (--no-trim)' if args.no_trim else 'glibc defaults'}")
    print(f"loss: parent {float(ref[0]):.6f}, DynaMO {float(on[0]):.6f}; modulation stats: {stats}")
    print()
    print("| variant | wall ms (median) | wall ratio (medians / per-round) | CPU ms (median) | CPU ratio (per-round) "
          "| minor faults/call | peak (tensors) | extra peak, profiler (tensors) | extra peak, mallinfo2 (tensors) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in variants:
        prof_b, mall_b = mem[k]
        pair = statistics.median(d / p for d, p in zip(times[k], times[p_name]))
        cpu_pair = statistics.median(d / p for d, p in zip(cpu[k], cpu[p_name]))
        if k.strip().startswith("breakdown"):
            extra = "— | —"
        else:
            extra_mall = None if mall_b is None else mall_b - mem[p_name][1]
            extra = f"{units(prof_b - mem[p_name][0])} | {units(extra_mall)}"
        print(f"| {k.strip()} | {med[k] * 1e3:.2f} | {med[k] / med[p_name]:.3f} / {pair:.3f} | {cpu_med[k] * 1e3:.2f} | "
              f"{cpu_pair:.3f} | {statistics.median(faults[k]):.0f} | {units(prof_b)} | {extra} |")
    print()
    print("targets: time ratio <= 1.3x, extra peak <= 3 tensors of the input shape "
          f"({tensor_bytes / 2**20:.1f} MiB each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
