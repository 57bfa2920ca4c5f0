"""The pure helpers of benchmarks/bench_pool_in_run.py (the trainer runs themselves are the benchmark's)."""

import hashlib
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_pool_in_run as b  # noqa: E402

from dynamo_openrlhf import PassRatePool  # noqa: E402


def test_synthetic_ids_are_the_odd_multiplier_bijection():
    ids = b.synthetic_ids(4)
    assert ids.dtype == np.int64
    m = 0x9E3779B97F4A7C15
    want = [((i * m) % 2**64) for i in range(4)]
    assert [int(x) % 2**64 for x in ids] == want
    assert int(ids[1]) == m - 2**64  # above 2**63: negative as int64
    assert len(np.unique(b.synthetic_ids(100_000))) == 100_000
    with pytest.raises(ValueError, match="n must be >= 0"):
        b.synthetic_ids(-1)


def test_synthetic_counts_are_seeded_groups_of_8():
    s, t = b.synthetic_counts(10_000, seed=3)
    s2, t2 = b.synthetic_counts(10_000, seed=3)
    assert np.array_equal(s, s2) and np.array_equal(t, t2)
    assert set(np.unique(t).tolist()) == {8, 16, 24, 32}
    assert (s >= 0).all() and (s <= t).all()
    with pytest.raises(ValueError, match="group and max_visits"):
        b.synthetic_counts(3, group=0)


def test_build_pool_file_10k(tmp_path):
    path = str(tmp_path / "pool.bin")
    info = b.build_pool_file(path, 10_000, seed=0)
    # format version 3: 80-byte header + 24 bytes a prompt + calibration block 2728 + noise block 48
    assert info["file_bytes"] == 80 + 24 * 10_000 + 2728 + 48
    assert info["prompts"] == 10_000
    loaded = PassRatePool.load(path)
    assert len(loaded) == 10_000
    assert info["sha256"] == hashlib.sha256(loaded.to_bytes()).hexdigest()
    assert info["memory_bytes"] == loaded.stats()["bytes"]
    ids = b.synthetic_ids(10_000)
    s, t = b.synthetic_counts(10_000, seed=0)
    # prior Beta(1, 1): posterior mean (1 + s) / (2 + t), exactly as the pool computes it in float64
    assert np.allclose(loaded.mean(ids), (1 + s) / (2 + t), rtol=0, atol=1e-12)
    assert info["mean_pass_rate"] == pytest.approx(s.sum() / t.sum(), rel=1e-6)


def test_parse_status():
    text = "Name:\tray::X\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nRssFile:\t 256 kB\nThreads: 3\n"
    assert b.parse_status(text) == {"VmHWM": 2048 * 1024, "VmRSS": 1024 * 1024, "RssAnon": 512 * 1024,
                                    "RssFile": 256 * 1024}
    with pytest.raises(ValueError, match="unexpected /proc status line"):
        b.parse_status("VmRSS:\t12 MB\n")


def test_descendants():
    parents = {2: 1, 3: 2, 4: 2, 5: 9, 6: 4, 1: 0}
    assert b.descendants(1, parents) == [2, 3, 4, 6]
    assert b.descendants(4, parents) == [6]
    assert b.descendants(5, parents) == []


def test_save_windows_and_rss_around_saves():
    rows = [{"type": "train", "step": 1, "time": 10.0},
            {"type": "ckpt", "step": 1, "time": 13.0, "timing/ckpt_save": 2.0, "timing/dynamo_pool_save": 0.5},
            {"type": "ckpt", "step": 2, "time": 30.0, "timing/ckpt_save": 1.0, "timing/dynamo_pool_save": 0.0}]
    assert b.save_windows(rows) == [(1, 10.5, 13.0), (2, 29.0, 30.0)]
    samples = [(10.0, 100), (10.4, 110), (11.0, 150), (12.9, 120), (13.5, 105), (29.5, 400)]
    out = b.rss_around_saves(samples, b.save_windows(rows))
    assert out == [{"step": 1, "steady": 110, "peak": 150, "ratio": 150 / 110, "samples": 2},
                   {"step": 2, "steady": 105, "peak": 400, "ratio": 400 / 105, "samples": 1}]
    assert b.rss_around_saves([(11.0, 1)], [(1, 10.5, 13.0)]) == []  # nothing before the window


def test_summarise_run_and_derived():
    def run(pool_s, step_s, save, to_bytes, steady, peak, load=None, fetch=None):
        rows = [{"type": "train", "step": i, "time": 100.0 * i, "timing/dynamo_pool": pool_s * i,
                 "timing/step_total": step_s} for i in (1, 2, 3)]
        rows += [{"type": "ckpt", "step": i, "time": 100.0 * i + 50, "timing/ckpt_save": save,
                  "timing/dynamo_pool_save": to_bytes, "dynamo/pool_state_bytes": 1000} for i in (1, 2, 3)]
        if load is not None:
            rows.append({"type": "ckpt_load", "step": 3, "time": 1.0, "timing/dynamo_pool_load": load,
                         "timing/ckpt_states_fetch": fetch})
        samples = {"trainer": [(100.0 * i + 45 - save - to_bytes, steady) for i in (1, 2, 3)]
                   + [(100.0 * i + 49, peak) for i in (1, 2, 3)]}
        samples["trainer"].sort()
        return b.summarise_run(rows, samples)

    base = run(0.001, 3.0, 1.0, 0.0, 1000, 1100, load=0.001, fetch=0.01)
    assert base["steps"] == 3 and base["checkpoints"] == 3 and base["pool_s"] == 0.002
    assert base["rss"]["trainer"]["steady"] == 1000 and base["rss"]["trainer"]["max_ratio"] == 1.1
    pool = run(0.002, 3.3, 2.0, 1.5, 1500, 2400, load=1.201, fetch=0.51)
    runs = {"base": base, "pool": pool, "base_resume": base, "pool_resume": pool}
    d = b.derived({"memory_bytes": 400}, runs)
    assert d["save_pool_part_s"] == pytest.approx(2.5)
    assert d["load_pool_part_s"] == pytest.approx(1.7)
    assert d["save_peak_ratio"] == 1.6
    assert d["rss_overhead_bytes"] == 500 and d["rss_overhead_ratio"] == 1.25
    assert d["pool_time_ratio"] == 2.0 and d["step_ratio"] == pytest.approx(1.1)
    assert "| <= 2 |" in b.table({"prompts": 10, "file_bytes": 1, "memory_bytes": 400, "build_s": 0.1}, runs)


def _trainer_module():
    from dynamo_openrlhf import cpu_backend

    cpu_backend.install_import_stand_ins()
    from dynamo_openrlhf import ppo_trainer

    return ppo_trainer


def test_pool_checkpoint_form_round_trips_through_torch_save(tmp_path):
    import io
    from types import SimpleNamespace

    import torch

    pt = _trainer_module()
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator

    data = b.build_pool(10_000, seed=1).to_bytes()
    t = pt.pool_to_checkpoint(data)
    assert t.dtype == torch.uint8 and t.shape == (len(data),)
    assert t.numpy().tobytes() == data
    buf = io.BytesIO()
    torch.save({"dynamo": {"allocator": {"pool": t}}}, buf)
    # the tensor's storage is written as is: the file is the pool plus a small zip/pickle overhead
    assert len(data) < len(buf.getvalue()) < len(data) + 4096
    buf.seek(0)
    back = torch.load(buf, weights_only=False)["dynamo"]["allocator"]["pool"]
    assert pt.pool_from_checkpoint(back) == data
    assert pt.pool_from_checkpoint(data) is data  # checkpoints written before the tensor form
    with pytest.raises(ValueError, match="neither bytes nor a 1-D uint8 tensor: Tensor torch.float32"):
        pt.pool_from_checkpoint(torch.zeros(3))
    with pytest.raises(ValueError, match="expected bytes, got bytearray"):
        pt.pool_to_checkpoint(bytearray(data))
    # the trainer restores the tensor form (a bare trainer, as in tests/test_checkpoint_faults.py)
    trainer = object.__new__(pt.DynamoPPOTrainer.__ray_actor_class__)
    trainer.history, trainer.experience_maker = [], None
    trainer.allocator = RolloutAllocator(AllocationConfig(forget=1.0))
    trainer.args = SimpleNamespace(ckpt=SimpleNamespace(path=str(tmp_path)))
    from dynamo_openrlhf.allocation import STATE_VERSION as ALLOC_VERSION

    trainer.load_dynamo_state_dict({"version": pt.STATE_VERSION, "history": [],
                                    "allocator": {"version": ALLOC_VERSION, "pool": back, "steps": 1}})
    assert trainer.allocator.pool_digest() == hashlib.sha256(data).hexdigest()


class _CountingPool:
    """A PassRatePool that counts its ``to_bytes`` calls (the Rust class's methods cannot be patched)."""

    def __init__(self, pool):
        self.pool, self.to_bytes_calls = pool, 0
        self.forget = pool.forget

    def stats(self):
        return self.pool.stats()

    def to_bytes(self):
        self.to_bytes_calls += 1
        return self.pool.to_bytes()


def test_restored_pool_digest_is_the_checkpoint_digest_only_when_the_bytes_are_the_same():
    pt = _trainer_module()
    fixture_v2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pool_v2.bin")

    def case(data, forget=None):
        pool = PassRatePool.from_bytes(data)
        if forget is not None:
            pool.forget = forget  # what load_state_dict does when this run's --dynamo.pool.forget differs
        counting = _CountingPool(pool)
        digest = pt.restored_pool_digest(data, counting)
        assert digest == hashlib.sha256(pool.to_bytes()).hexdigest()  # always the restored pool's digest
        return digest == hashlib.sha256(data).hexdigest(), counting.to_bytes_calls

    grown = PassRatePool(forget=0.9)
    for k in range(5):  # grown by updates, not pre-sized
        grown.update(b.synthetic_ids(3000)[k::5], np.ones(600, dtype=np.int64), np.full(600, 3))
    assert case(grown.to_bytes()) == (True, 0)
    assert case(b.build_pool(20_000, seed=2).to_bytes()) == (True, 0)  # pre-sized, as the benchmark's
    assert case(grown.to_bytes(), forget=0.5) == (False, 1)  # the header's forget changes
    assert case(grown.to_bytes(), forget=0.9) == (True, 0)
    roomy = PassRatePool(capacity=100_000)  # a table far larger than 100 prompts need: a load shrinks it
    roomy.update(b.synthetic_ids(100), np.zeros(100, dtype=np.int64), np.ones(100, dtype=np.int64))
    assert case(roomy.to_bytes()) == (False, 1)
    with open(fixture_v2, "rb") as f:  # an older format version: saved again as the current one
        assert case(f.read()) == (False, 1)


def test_the_restore_log_line_digest_is_the_restored_pools(tmp_path, capsys):
    import re
    from types import SimpleNamespace

    pt = _trainer_module()
    from dynamo_openrlhf.allocation import STATE_VERSION as ALLOC_VERSION
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator

    data = b.build_pool(30_000, seed=4).to_bytes()
    for forget in (1.0, 0.75):  # the file's forget, and another one (the flag of this run wins)
        trainer = object.__new__(pt.DynamoPPOTrainer.__ray_actor_class__)
        trainer.history, trainer.experience_maker = [], None
        trainer.allocator = RolloutAllocator(AllocationConfig(forget=forget))
        trainer.args = SimpleNamespace(ckpt=SimpleNamespace(path=str(tmp_path)))
        trainer.load_dynamo_state_dict({"version": pt.STATE_VERSION, "history": [],
                                        "allocator": {"version": ALLOC_VERSION, "steps": 1,
                                                      "pool": pt.pool_to_checkpoint(data)}})
        line = re.findall(r"\[dynamo\] restored pass-rate pool: 30000 prompts, 1 updates, sha256 ([0-9a-f]{64})",
                          capsys.readouterr().out)
        assert line == [trainer.allocator.pool_digest()]
        assert (line[0] == hashlib.sha256(data).hexdigest()) == (forget == 1.0)
