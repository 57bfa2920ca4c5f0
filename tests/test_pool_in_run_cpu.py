"""The CPU-time helpers of benchmarks/bench_pool_in_run.py (per save/restore window CPU seconds of the actors)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_pool_in_run as b  # noqa: E402


def test_parse_stat_cpu_counts_fields_after_the_command_name():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime ...
    text = "4242 (ray::Dynamo PPO) (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 7000 7000 20 0"
    assert b.parse_stat_cpu(text, 100) == 3.0  # (250 + 50) ticks, children's 7000 + 7000 not counted
    assert b.parse_stat_cpu(open(f"/proc/{os.getpid()}/stat").read(), os.sysconf("SC_CLK_TCK")) > 0
    with pytest.raises(ValueError, match="unexpected /proc stat text"):
        b.parse_stat_cpu("4242 (x) S 1 2", 100)


def test_cpu_in_windows_and_restore_windows():
    rows = [{"type": "ckpt", "step": 1, "time": 13.0, "timing/ckpt_save": 2.0, "timing/dynamo_pool_save": 0.5},
            {"type": "ckpt_load", "step": 3, "time": 50.0, "timing/ckpt_states_fetch": 0.5,
             "timing/dynamo_pool_load": 1.5}]
    assert b.restore_windows(rows) == [(3, 48.0, 50.0)]
    cpu = [(10.0, 1.0), (10.5, 1.25), (12.0, 2.0), (13.0, 3.5), (13.2, 3.75), (47.0, 4.0), (50.1, 5.5)]
    # save window [10.5, 13.0]: 3.5 - 1.25; restore window [48, 50]: first sample after 50.1 minus the one at 47
    assert b.cpu_in_windows(cpu, b.save_windows(rows)) == [{"step": 1, "cpu_s": 2.25}]
    assert b.cpu_in_windows(cpu, b.restore_windows(rows)) == [{"step": 3, "cpu_s": 1.5}]
    assert b.cpu_in_windows(cpu[:3], b.save_windows(rows)) == []  # no sample after the window


def test_summarise_and_derived_with_cpu():
    def run(save_cpu, restore_cpu):
        rows = [{"type": "train", "step": 1, "time": 5.0, "timing/dynamo_pool": 0.001, "timing/step_total": 1.0},
                {"type": "ckpt", "step": 1, "time": 10.0, "timing/ckpt_save": 1.0, "timing/dynamo_pool_save": 1.0},
                {"type": "ckpt_load", "step": 1, "time": 20.0, "timing/ckpt_states_fetch": 1.0,
                 "timing/dynamo_pool_load": 1.0}]
        rss = {"trainer": [(7.0, 100), (9.0, 120)]}
        cpu = {"trainer": [(7.0, 1.0), (10.0, 1.0 + save_cpu), (17.0, 5.0), (20.0, 5.0 + restore_cpu)],
               "policy": [(7.0, 0.0), (10.0, 2 * save_cpu)]}
        return b.summarise_run(rows, rss, cpu)

    base, pool = run(0.25, 0.125), run(1.0, 1.5)
    assert pool["cpu"]["trainer"]["save_median_s"] == 1.0 and pool["cpu"]["policy"]["save_median_s"] == 2.0
    assert pool["cpu"]["trainer"]["restore_s"] == 1.5 and pool["cpu"]["policy"]["restore_s"] is None
    d = b.derived({"memory_bytes": 1}, {"base": base, "pool": pool, "base_resume": base, "pool_resume": pool})
    assert d["save_pool_part_cpu_s"] == (1.0 + 2.0) - (0.25 + 0.5)
    assert d["load_pool_part_cpu_s"] == 1.5 - 0.125
    text = b.table({"prompts": 1, "file_bytes": 1, "memory_bytes": 1, "build_s": 0.1}, {"base": base, "pool": pool})
    assert "| pool | 1.000 | 2.000 | 1.500 |" in text


def test_offline_measures_a_small_pool_file(tmp_path):
    path = str(tmp_path / "pool.bin")
    b.build_pool_file(path, 3000, seed=2)
    o = b.offline(path, steps=3, repeats=1, small=500)
    assert o["per_step"]["small"]["prompts"] == 500 and o["per_step"]["pool"]["prompts"] == 3000
    assert set(o["per_step"]["pool"]) == {"prompts"} | {f"{k}_ms_{m}" for k in ("allocate", "record", "metrics")
                                                         for m in ("median", "max")}
    (r,) = o["restore"]  # offline() raises if the two digests differ
    assert r["before_s"] == r["copy_s"] + r["from_bytes_s"] + r["digest_to_bytes_sha_s"]
    assert r["now_s"] == r["copy_s"] + r["from_bytes_s"] + r["restored_pool_digest_s"]
    assert len(o["save"]) == 1 and o["save"][0]["to_bytes_s"] >= 0
    text = b.offline_table(o)
    assert "| pool | 3,000 |" in text and "| small | 500 |" in text and text.count("\n| 1 |") == 2
