"""PassRatePool: posteriors, forgetting, prior fitting, noise statistics, allocation switches, file format."""

import copy
import math
import os
import pickle
import struct
import zlib

import numpy as np
import pytest

from dynamo_openrlhf import FORMAT_VERSION, PassRatePool, allocate_rollouts

HEADER = 76  # bytes before the records (see PassRatePool.save)
RECORD = 24  # version-3 record: id, successes, failures, noise sums over successes and failures
CALIBRATION = 2728  # calibration block after the records' checksum (versions 2 and 3)
NOISE = 48  # version-3 noise block after the calibration block
FIXTURE_V2 = os.path.join(os.path.dirname(__file__), "data", "pool_v2.bin")


def beta_moments(a, b):
    return a / (a + b), a * b / ((a + b) * (a + b + 1))


def sample_pool(forget=0.9):
    """25 steps; noise sums (q ~ 0.5 per success, ~2 per failure) from step 5 on."""
    pool = PassRatePool(prior=(0.7, 1.3), forget=forget)
    rng = np.random.default_rng(4)
    for step in range(25):
        ids = rng.integers(-(2**62), 2**62, 300) if step == 0 else rng.integers(0, 5000, 300)
        trials = rng.integers(0, 17, 300)
        successes = rng.binomial(trials, 0.4)
        noise = {}
        if step >= 5:
            noise = {"noise_success": successes * rng.uniform(0.25, 0.75, 300),
                     "noise_failure": (trials - successes) * rng.uniform(1.0, 3.0, 300)}
        pool.update(ids, successes, trials, **noise)
    pool.update([np.iinfo(np.int64).min, np.iinfo(np.int64).max], [1, 2], [3, 2])
    return pool


# ---------------------------------------------------------------- posteriors


def test_unseen_ids_get_the_prior():
    pool = PassRatePool(prior=(2.0, 6.0))
    mean, var = beta_moments(2.0, 6.0)
    assert pool.mean([5, -7]).tolist() == [mean, mean]
    assert pool.expected_variance([5]).tolist() == [var]
    assert pool.evidence([5]) [0].tolist() == [0.0]
    assert len(pool) == 0 and 5 not in pool


def test_update_accumulates_and_repeated_ids_add_up():
    pool = PassRatePool()
    pool.update(np.array([3, 4, 3]), np.array([2, 0, 1]), np.array([4, 16, 1]))
    s, f = pool.evidence([3, 4, 9])
    assert s.tolist() == [3.0, 0.0, 0.0] and f.tolist() == [2.0, 16.0, 0.0]
    assert pool.mean([3]).tolist() == [4.0 / 7.0]
    assert pool.expected_variance([3, 4]).tolist() == [beta_moments(4.0, 3.0)[1],
                                                       beta_moments(1.0, 17.0)[1]]
    assert len(pool) == 2 and 3 in pool and np.int64(4) in pool and "3" not in pool
    assert sorted(pool.ids().tolist()) == [3, 4]


def test_boolean_and_narrow_integer_counts():
    pool = PassRatePool()
    rewards = np.array([True, False, True, True])
    pool.update(np.array([1, 1, 2, 2], dtype=np.int32), rewards, np.ones(4, dtype=np.uint8))
    assert pool.evidence([1, 2])[0].tolist() == [1.0, 2.0]
    assert pool.evidence([1, 2])[1].tolist() == [1.0, 0.0]


def test_zero_trials_create_no_entry():
    pool = PassRatePool()
    pool.update([7, 8], [0, 1], [0, 1])
    assert 7 not in pool and 8 in pool and len(pool) == 1


def test_extreme_ids():
    pool = PassRatePool()
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    pool.update(np.array([lo, hi, 0]), [1, 0, 1], [1, 1, 1])
    assert lo in pool and hi in pool and 0 in pool and len(pool) == 3
    assert pool.evidence([lo, hi])[0].tolist() == [1.0, 0.0]


def test_large_pool_stays_within_36_bytes_per_prompt():
    pool = PassRatePool()
    ids = np.arange(1_000_000, dtype=np.int64) * 7919
    worst = 0.0
    for chunk in np.array_split(ids, 50):  # growth between steps: the load stays in [0.67, 0.8]
        pool.update(chunk, np.ones_like(chunk), np.full_like(chunk, 2),
                    noise_success=np.full(len(chunk), 0.5), noise_failure=np.full(len(chunk), 2.0))
        stats = pool.stats()
        assert 0.67 <= stats["load_factor"] <= 0.8 or stats["prompts"] < 1000
        worst = max(worst, stats["bytes_per_prompt"])
    assert worst <= 36.0
    # Updating known ids in one large batch does not grow the table.
    slots = pool.stats()["slots"]
    pool.update(ids, np.zeros_like(ids), np.zeros_like(ids))
    stats = pool.stats()
    assert stats["slots"] == slots
    assert stats["prompts"] == 1_000_000
    assert stats["successes"] == 1_000_000 and stats["failures"] == 1_000_000
    assert pool.mean(ids[[0, -1]]).tolist() == [0.5, 0.5]
    presized = PassRatePool(capacity=1_000_000)
    slots = presized.stats()["slots"]
    presized.update(ids, np.ones_like(ids), np.ones_like(ids))
    assert presized.stats()["slots"] == slots  # no growth when pre-sized


# ---------------------------------------------------------------- forgetting


def test_forgetting_multiplies_old_evidence_each_step():
    pool = PassRatePool(forget=0.5)
    pool.update([1], [4], [8])  # nothing to forget yet: exact counts
    assert pool.evidence([1])[0].tolist() == [4.0]
    pool.update([2], [1], [1])
    pool.update([], [], [])  # a step without results still forgets
    s, f = pool.evidence([1, 2])
    assert s.tolist() == [1.0, 0.5] and f.tolist() == [1.0, 0.0]
    assert pool.stats()["updates"] == 3


def test_forget_one_is_plain_accumulation():
    pool = PassRatePool(forget=1.0)
    for _ in range(100):
        pool.update([5], [3], [4])
    assert pool.evidence([5])[0].tolist() == [300.0]
    assert pool.stats()["scale"] == 1.0


def test_long_runs_renormalise_without_losing_evidence():
    rho = 0.7
    pool = PassRatePool(forget=rho)
    expected = 0.0
    for step in range(400):  # rho**400 ~ 1e-62: several renormalisations
        pool.update([-1, step], [1, 1], [3, 1])
        expected = expected * rho + 1.0
        assert pool.stats()["scale"] >= 1e-18
    s, f = pool.evidence([-1])
    assert s[0] == pytest.approx(expected, rel=1e-5)
    assert f[0] == pytest.approx(2 * expected, rel=1e-5)
    assert pool.evidence([0])[0][0] < 1e-30 and 0 in pool


def test_changing_forget_applies_from_the_next_step():
    pool = PassRatePool(forget=1.0)
    pool.update([1], [2], [2])
    pool.forget = 0.5
    pool.update([], [], [])
    assert pool.evidence([1])[0].tolist() == [1.0]
    with pytest.raises(ValueError, match=r"^forget must lie in \(0, 1\], got 0$"):
        pool.forget = 0.0


# ---------------------------------------------------------------- rejected updates


@pytest.mark.parametrize(
    "ids, successes, trials, message",
    [
        ([1, 5], [3, 0], [2, 1], r"^successes\[0\] = 3 exceeds trials\[0\] = 2$"),
        ([1], [0], [-1], r"^trials\[0\] is negative \(-1\)$"),
        ([1, 2], [0, -2], [1, 1], r"^successes\[1\] is negative \(-2\)$"),
        ([1], [0, 1], [1], r"^successes has length 2 but prompt_ids has length 1$"),
        ([1, 2], [0, 1], [1], r"^trials has length 1 but prompt_ids has length 2$"),
        ([1.5], [0], [1], r"^prompt_ids must be an integer array, got dtype float64$"),
        ([True], [0], [1], r"^prompt_ids must be an integer array, got dtype bool$"),
        ([1], [0.5], [1], r"^successes must be an integer array, got dtype float64$"),
        ([[1]], [0], [1], r"^prompt_ids must be 1-D, got an array of shape \(1, 1\)$"),
        (np.array([2**63], dtype=np.uint64), [0], [1], r"^prompt_ids holds 9223372036854775808"),
    ],
)
def test_rejected_update_leaves_the_pool_unchanged(ids, successes, trials, message):
    pool = sample_pool()
    before = pool.to_bytes()
    with pytest.raises(ValueError, match=message):
        pool.update(ids, successes, trials)
    assert pool.to_bytes() == before


def test_constructor_and_prior_validation():
    with pytest.raises(ValueError, match=r"^prior alpha0 must be a finite positive number, got 0$"):
        PassRatePool(prior=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"^prior beta0 must be a finite positive number, got inf$"):
        PassRatePool(prior=(1.0, float("inf")))
    with pytest.raises(ValueError, match=r"^forget must lie in \(0, 1\], got 1.5$"):
        PassRatePool(forget=1.5)
    pool = PassRatePool()
    pool.prior = (3.0, 1.0)
    assert pool.prior == (3.0, 1.0) and pool.mean([1]).tolist() == [0.75]
    with pytest.raises(ValueError, match="prior alpha0"):
        pool.prior = (-1.0, 1.0)
    assert pool.prior == (3.0, 1.0)


def test_prior_change_keeps_evidence():
    pool = PassRatePool(prior=(1.0, 1.0))
    pool.update([1], [3], [4])
    pool.prior = (2.0, 2.0)
    assert pool.mean([1]).tolist() == [5.0 / 8.0]


# ---------------------------------------------------------------- fit_prior


def test_fit_prior_matches_the_documented_formula():
    pool = PassRatePool()
    successes = np.array([0, 3, 5, 9, 2, 7])
    trials = np.array([10, 10, 8, 12, 4, 9])
    pool.update(np.arange(6), successes, trials)
    pool.update([100], [0], [0])  # no evidence: ignored
    rates = successes / trials
    mu, s2, c = rates.mean(), rates.var(ddof=1), (1 / trials).mean()
    phi = np.clip((s2 / (mu * (1 - mu)) - c) / (1 - c), 1e-6, 1 / 1.001)
    strength = 1 / phi - 1
    fitted = pool.fit_prior()
    assert fitted == pytest.approx((mu * strength, (1 - mu) * strength), rel=1e-12)
    assert pool.prior == fitted


def test_fit_prior_recovers_the_generating_beta():
    rng = np.random.default_rng(11)
    n = 200_000
    rates = rng.beta(2.0, 5.0, n)
    pool = PassRatePool()
    pool.update(np.arange(n), rng.binomial(20, rates), np.full(n, 20))
    a, b = pool.fit_prior()
    assert a == pytest.approx(2.0, rel=0.05) and b == pytest.approx(5.0, rel=0.05)


def test_fit_prior_refuses_degenerate_pools():
    with pytest.raises(ValueError, match=r"at least 2 prompts"):
        PassRatePool().fit_prior()
    pool = PassRatePool()
    pool.update([1, 2], [0, 0], [5, 5])
    with pytest.raises(ValueError, match=r"both successes and failures"):
        pool.fit_prior()
    pool = PassRatePool()
    pool.update([1, 2], [0, 1], [1, 1])
    with pytest.raises(ValueError, match=r"one trial per prompt"):
        pool.fit_prior()
    assert pool.prior == (1.0, 1.0)


# ---------------------------------------------------------------- allocation


def test_allocate_is_allocate_rollouts_on_posterior_variances():
    pool = sample_pool()
    batch = np.array([1, 2, 3, 10_000, 2, 4999])
    expected = allocate_rollouts(pool.expected_variance(batch), 96, 8, 24)
    assert np.array_equal(pool.allocate(batch, budget=96, lo=8, hi=24), expected)
    uniform = pool.allocate(batch, 100, 8, 24, rule="uniform")
    assert uniform.tolist() == [17, 17, 17, 17, 16, 16]


def test_unseen_ids_get_prior_variance_or_the_exploration_budget():
    pool = PassRatePool()
    pool.update([1, 2, 3], [8, 16, 0], [16, 16, 16])
    ids = [1, 2, 3, 4]
    neyman = pool.allocate(ids, 64, 8, 24)
    assert neyman.tolist() == allocate_rollouts(pool.expected_variance(ids), 64, 8, 24).tolist()
    assert neyman[3] > neyman[1] and neyman[3] > neyman[2]
    explored = pool.allocate(ids, 64, 2, 40, exploration=True, exploration_rollouts=6)
    assert explored[3] == 6
    seen_part = allocate_rollouts(pool.expected_variance([1, 2, 3]), 58, 2, 40)
    assert explored[:3].tolist() == seen_part.tolist()


def test_proportional_uses_the_reference_defaults():
    pool = PassRatePool()
    pool.update([1, 2, 3], [8, 4, 15], [16, 16, 16])
    ids = np.array([1, 2, 3, 4])
    v, means = pool.expected_variance(ids), pool.mean(ids)
    unseen = np.array([False, False, False, True])
    expected = allocate_rollouts(v, 64, 8, 24, "proportional", unseen=unseen, pass_rates=means)
    assert np.array_equal(pool.allocate(ids, 64, 8, 24, rule="proportional"), expected)
    assert pool.allocate(ids, 64, 8, 24, rule="proportional")[3] == 8  # 4 clamped into [8, 24]
    off = pool.allocate(ids, 64, 8, 24, rule="proportional", exploration=False, mastery=False)
    assert np.array_equal(off, allocate_rollouts(v, 64, 8, 24, "proportional"))


def test_allocate_skip_factor_and_min_rollouts():
    pool = PassRatePool()
    # 1 and 2: in the middle; 3: 1000 failures (tiny posterior variance); 4: unseen (prior 1/6).
    pool.update([1, 2, 3], [8, 7, 0], [16, 16, 1000])
    ids = np.array([1, 2, 3, 4])
    v = pool.expected_variance(ids)
    for opts in ({"skip_factor": 4.0}, {"min_rollouts": 2}, {"skip_factor": 4.0, "min_rollouts": 2}):
        got = pool.allocate(ids, 48, 0, 24, **opts)
        assert np.array_equal(got, allocate_rollouts(v, 48, 0, 24, **opts))
    # Plain: [17, 16, 1, 14]; shadow price = min(v1/(16*17), v2/(15*16), v4/(13*14)) = v1/272,
    # and v3 = 0.000996 < 4 * v1/272 = 0.00348: prompt 3 is skipped, its rollout goes to prompt 2.
    assert pool.allocate(ids, 48, 0, 24).tolist() == [17, 16, 1, 14]
    assert pool.allocate(ids, 48, 0, 24, skip_factor=4.0).tolist() == [17, 17, 0, 14]
    assert pool.allocate(ids, 48, 0, 24, min_rollouts=2).tolist() == [16, 16, 2, 14]
    # Off values give today's allocation with any bounds.
    plain = pool.allocate(ids, 64, 8, 24).tolist()
    assert pool.allocate(ids, 64, 8, 24, skip_factor=0.0, min_rollouts=1).tolist() == plain
    with pytest.raises(ValueError, match=r"^skip_factor requires lo = 0"):
        pool.allocate(ids, 64, 8, 24, skip_factor=4.0)
    with pytest.raises(ValueError, match=r"^skip_factor and min_rollouts cannot be combined with unseen"):
        pool.allocate(ids, 48, 0, 24, skip_factor=4.0, exploration=True)
    with pytest.raises(ValueError, match=r"^min_rollouts applies to rule 'neyman' only"):
        pool.allocate(ids, 48, 0, 24, rule="proportional", min_rollouts=2)


def test_calibrated_variance_follows_the_documented_cells():
    pool = PassRatePool()  # Beta(1, 1): prior variance 1/6
    ids = np.array([1, 2, 99])
    assert np.array_equal(pool.calibrated_variance(ids), pool.expected_variance(ids))
    # Ids 1, 2 unseen (cell "no evidence"): predicted 16/6 each; observed 16 * 8*8/(16*15) and 0.
    pool.update([1, 2, 3], [8, 0, 1], [16, 16, 1])  # id 3: one trial, not recorded
    observed, predicted = 16 * 64 / 240, 2 * 16 / 6
    factor = (observed + 2.0) / (predicted + 2.0)
    assert pool.calibrated_variance([99])[0] == pytest.approx(factor / 6, rel=1e-12)
    # Ids 1 and 2 now sit in cells without data: factor 1.
    assert np.array_equal(pool.calibrated_variance([1, 2]), pool.expected_variance([1, 2]))
    # Each update decays the cells by 0.99 first.
    pool.update([7], [1], [1])
    f2 = (0.99 * observed + 2.0) / (0.99 * predicted + 2.0)
    assert pool.calibrated_variance([99])[0] == pytest.approx(f2 / 6, rel=1e-12)
    v = pool.calibrated_variance(ids)
    assert np.array_equal(pool.allocate(ids, 48, 8, 24, calibrated=True), allocate_rollouts(v, 48, 8, 24))
    assert np.array_equal(pool.allocate(ids, 48, 8, 24, calibrated=False), pool.allocate(ids, 48, 8, 24))
    with pytest.raises(ValueError, match=r"^calibrated does not apply to rule 'uniform'"):
        pool.allocate(ids, 48, 8, 24, rule="uniform", calibrated=True)


def test_calibrated_skipping_is_guarded_by_the_plain_posterior():
    # 100 prompts at p = 0.5, 100 at 0.02, 200 at 0: six steps of 16 rollouts each.
    pool = PassRatePool()
    rng = np.random.default_rng(0)
    ids = np.arange(400)
    p = np.where(ids < 100, 0.5, np.where(ids < 200, 0.02, 0.0))
    for _ in range(6):
        pool.update(ids, rng.binomial(16, p), np.full(400, 16))
    v, plain = pool.calibrated_variance(ids), pool.expected_variance(ids)
    for budget, calibration_alone, guarded in ((1000, 278, 243), (1600, 212, 0)):
        got = pool.allocate(ids, budget, 0, 64, calibrated=True, skip_factor=4.0)
        assert got.sum() == budget and got.max() <= 64
        # lambda of the unskipped calibrated allocation; skipped: max(calibrated, plain) < 4 lambda.
        n0 = allocate_rollouts(v, budget, 0, 64)
        m = n0 >= 2
        lam = np.min(v[m] / ((n0[m] - 1.0) * n0[m]))
        expected = np.maximum(v, plain) < 4 * lam
        assert np.array_equal(got == 0, expected) and expected.sum() == guarded
        # Without the guard, more go: those only the calibration calls negligible.
        assert (allocate_rollouts(v, budget, 0, 64, skip_factor=4.0) == 0).sum() == calibration_alone


@pytest.mark.parametrize(
    "rule, options, message",
    [
        ("uniform", {"mastery": True}, r"^mastery does not apply to rule 'uniform'"),
        ("neyman", {"exploration_rollouts": 3}, r"^exploration_rollouts has no effect without exploration$"),
        ("neyman", {"mastery_threshold": 0.9}, r"^mastery_threshold has no effect without mastery$"),
        ("neyman", {"priority_floor": 0.1}, r"^priority_floor has no effect for rule 'neyman' without mastery$"),
        ("neyman", {}, r"^budget 1000 is infeasible"),
        ("bogus", {}, r"^rule must be one of"),
    ],
)
def test_allocate_errors(rule, options, message):
    pool = sample_pool()
    budget = 1000 if not options and rule == "neyman" else 40
    with pytest.raises(ValueError, match=message):
        pool.allocate([1, 2, 3], budget, 8, 24, rule=rule, **options)


# ---------------------------------------------------------------- save / load


def same_pool(a, b):
    assert a.prior == b.prior and a.forget == b.forget
    assert a.stats()["scale"] == b.stats()["scale"] and a.stats()["updates"] == b.stats()["updates"]
    ids = np.sort(a.ids())
    assert np.array_equal(ids, np.sort(b.ids()))
    for x, y in zip(a.evidence(ids) + a.noise_sums(ids), b.evidence(ids) + b.noise_sums(ids)):
        assert np.array_equal(x.view(np.uint64), y.view(np.uint64))
    assert a.noise_means == b.noise_means and a.noise_weight == b.noise_weight


def test_save_load_round_trip_is_bit_for_bit(tmp_path):
    pool = sample_pool()
    path = tmp_path / "pool.bin"
    pool.save(path)
    assert os.path.getsize(path) == 80 + RECORD * len(pool) + CALIBRATION + NOISE
    assert RECORD <= 36
    loaded = PassRatePool.load(str(path))
    same_pool(pool, loaded)
    ids = np.arange(-5, 5000)
    assert np.array_equal(loaded.calibrated_variance(ids), pool.calibrated_variance(ids))
    assert np.array_equal(loaded.noise_scale(ids), pool.noise_scale(ids))
    assert loaded.to_bytes() == path.read_bytes() == pool.to_bytes()
    pool.save(path)  # replacing an existing file
    assert os.listdir(tmp_path) == ["pool.bin"]  # no temporary file left behind
    empty = PassRatePool(prior=(0.5, 0.5), forget=0.25)
    empty.save(tmp_path / "empty.bin")
    same_pool(empty, PassRatePool.load(tmp_path / "empty.bin"))


def test_to_bytes_of_a_large_pool_is_the_saved_file(tmp_path):
    """to_bytes writes the format into the bytes object itself (GIL released from 16,384 prompts on, records in
    batches of 65,536); save() streams it through a file writer: the same bytes."""
    pool = PassRatePool(prior=(0.7, 1.3), forget=0.99)
    rng = np.random.default_rng(7)
    ids = rng.permutation(np.arange(200_000, dtype=np.int64) * 31 - 3_000_000)
    for chunk in np.array_split(ids, 4):
        trials = rng.integers(1, 9, len(chunk))
        successes = rng.binomial(trials, 0.3)
        pool.update(chunk, successes, trials, noise_success=successes * 0.5, noise_failure=(trials - successes) * 2.0)
    data = pool.to_bytes()
    assert type(data) is bytes and len(data) == 80 + RECORD * 200_000 + CALIBRATION + NOISE
    pool.save(tmp_path / "pool.bin")
    assert (tmp_path / "pool.bin").read_bytes() == data
    assert PassRatePool.from_bytes(data).to_bytes() == data
    assert pickle.loads(pickle.dumps(pool)).to_bytes() == data


def test_file_header_layout(tmp_path):
    pool = sample_pool()
    data = pool.to_bytes()
    magic, version, flags, a0, b0, rho, scale, updates, prompts, slots, crc = struct.unpack(
        "<8sIIddddQQQI", data[:HEADER]
    )
    assert magic == b"DYNMPOOL" and version == FORMAT_VERSION == 3 and flags == 0
    assert (a0, b0, rho) == (0.7, 1.3, 0.9) and prompts == len(pool) and updates == 26
    assert crc == zlib.crc32(data[:72])
    records_end = HEADER + RECORD * prompts
    assert struct.unpack("<I", data[records_end:records_end + 4])[0] == zlib.crc32(data[HEADER:records_end])
    # Records: id, then stored successes, failures, noise sums (actual / scale), all float32.
    first_id, s, f, qs, qf = struct.unpack("<qffff", data[HEADER:HEADER + RECORD])
    g = pool.stats()["scale"]
    assert pool.evidence([first_id])[0][0] == np.float64(np.float32(s)) * g
    assert pool.noise_sums([first_id])[1][0] == np.float64(np.float32(qf)) * g
    block = data[records_end + 4:records_end + 4 + CALIBRATION]
    cal_forget, weight, cells = struct.unpack("<ddI", block[:20])
    assert (cal_forget, weight, cells) == (0.99, 2.0, 169)
    assert struct.unpack("<I", block[-4:])[0] == zlib.crc32(block[:-4])
    noise = data[records_end + 4 + CALIBRATION:]
    assert len(noise) == NOISE
    w0, started, sum_s, sum_f, count_s, count_f, noise_crc = struct.unpack("<dIddddI", noise)
    assert (w0, started) == (1.0, 3) and noise_crc == zlib.crc32(noise[:-4])
    assert pool.noise_means == (sum_s / count_s, sum_f / count_f)


def as_version_2(data):
    """The same pool in format version 2 (the previous build's layout): 16-byte records without the
    noise sums, no noise block."""
    prompts = struct.unpack("<Q", data[56:64])[0]
    head = bytearray(data[:HEADER])
    head[8:12] = struct.pack("<I", 2)
    head[72:76] = struct.pack("<I", zlib.crc32(bytes(head[:72])))
    records = b"".join(data[HEADER + RECORD * i:HEADER + RECORD * i + 16] for i in range(prompts))
    calibration = data[HEADER + RECORD * prompts + 4:][:CALIBRATION]
    return bytes(head) + records + struct.pack("<I", zlib.crc32(records)) + calibration


def as_version_1(data):
    """The same pool in format version 1 (what earlier builds wrote): no calibration block either."""
    body = bytearray(as_version_2(data)[:-CALIBRATION])
    body[8:12] = struct.pack("<I", 1)
    body[72:76] = struct.pack("<I", zlib.crc32(bytes(body[:72])))
    return bytes(body)


def test_a_file_written_by_the_previous_build_loads_with_empty_noise_statistics():
    """tests/data/pool_v2.bin was saved by the build before noise statistics (format version 2):
    PassRatePool(prior=(0.7, 1.3), forget=0.9), then update([11, 22, 33, -44], [3, 0, 8, 1],
    [8, 8, 8, 2]), update([11, 55, INT64_MIN], [5, 1, 2], [8, 4, 2]), update([22, 33], [1, 8], [8, 8]).
    The values below are what that build returned."""
    data = open(FIXTURE_V2, "rb").read()
    assert len(data) == 80 + 16 * 6 + CALIBRATION and struct.unpack("<I", data[8:12])[0] == 2
    pool = PassRatePool.from_bytes(data)
    ids = [11, 22, 33, -44, 55, np.iinfo(np.int64).min, 99]
    s, f = pool.evidence(ids)
    assert s.tolist() == [6.929999828338624, 0.9999999833106995, 14.479999866485597, 0.81,
                          0.9000000429153443, 1.8000000858306886, 0.0]
    assert f.tolist() == [6.749999742507935, 13.480000076293946, 0.0, 0.81, 2.699999935626984, 0.0, 0.0]
    assert pool.calibrated_variance(ids).tolist() == [
        0.2348433749741021, 0.08722173366815857, 0.06850408836534067, 0.19050608691492674,
        0.17316017624445457, 0.1781798234680669, 0.13607698133784701]
    assert pool.allocate(ids, 70, 2, 20, estimator="rloo").tolist() == [12, 8, 7, 11, 11, 11, 10]
    # Empty noise statistics: no class mean, every noise scale 1, allocation unchanged.
    assert pool.noise_means == (None, None) and pool.noise_weight == 1.0
    assert pool.noise_sums(ids)[0].tolist() == [0.0] * 7
    assert pool.noise_scale(ids).tolist() == [1.0] * 7
    assert pool.allocate(ids, 70, 2, 20, estimator="rloo", noise_scale=True).tolist() == [12, 8, 7, 11, 11, 11, 10]
    # Saved again it is a version-3 file holding the same pool.
    again = pool.to_bytes()
    assert struct.unpack("<I", again[8:12])[0] == FORMAT_VERSION
    same_pool(pool, PassRatePool.from_bytes(again))
    # Noise observed after loading: the earlier evidence counts at the first step's class means.
    pool.update([11], [1], [2], noise_success=[3.0], noise_failure=[0.5])
    assert pool.noise_means == pytest.approx((3.0, 0.5), rel=1e-6)  # float32 sums
    qs, qf = pool.noise_sums([55])
    assert qs[0] == pytest.approx(3.0 * 0.9000000429153443 * 0.9, rel=1e-6)
    assert qf[0] == pytest.approx(0.5 * 2.699999935626984 * 0.9, rel=1e-6)


def test_version_2_files_still_load(tmp_path):
    pool = sample_pool()
    path = tmp_path / "v2.bin"
    path.write_bytes(as_version_2(pool.to_bytes()))
    old = PassRatePool.load(path)
    ids = np.sort(pool.ids())
    for x, y in zip(pool.evidence(ids), old.evidence(ids)):
        assert np.array_equal(x, y)
    assert np.array_equal(old.calibrated_variance(ids), pool.calibrated_variance(ids))
    assert old.noise_means == (None, None) and np.all(old.noise_scale(ids) == 1.0)
    with pytest.raises(ValueError, match="1 unexpected bytes"):
        PassRatePool.from_bytes(as_version_2(pool.to_bytes()) + b"\0")


def test_version_1_files_still_load(tmp_path):
    pool = sample_pool()
    ids = np.arange(-5, 5000)
    assert not np.array_equal(pool.calibrated_variance(ids), pool.expected_variance(ids))
    path = tmp_path / "v1.bin"
    path.write_bytes(as_version_1(pool.to_bytes()))
    old = PassRatePool.load(path)
    ids = np.sort(pool.ids())
    for x, y in zip(pool.evidence(ids), old.evidence(ids)):
        assert np.array_equal(x, y)
    assert old.noise_means == (None, None)
    # No calibration stored: every factor is 1 until new updates teach it.
    assert np.array_equal(old.calibrated_variance(ids), old.expected_variance(ids))
    assert struct.unpack("<I", old.to_bytes()[8:12])[0] == 3  # saved again as version 3
    with pytest.raises(ValueError, match="1 unexpected bytes"):
        PassRatePool.from_bytes(as_version_1(pool.to_bytes()) + b"\0")


def test_pickle_and_deepcopy():
    pool = sample_pool()
    same_pool(pool, pickle.loads(pickle.dumps(pool)))
    clone = copy.deepcopy(pool)
    clone.update([123456], [1], [1])
    assert 123456 in clone and 123456 not in pool


def damaged(data, how):
    if how == "truncated-header":
        return data[:40]
    if how == "truncated-records":
        return data[: HEADER + 100]
    if how == "truncated-crc":
        return data[:-1]
    if how == "trailing":
        return data + b"\0"
    if how == "record-flip":
        return data[:HEADER + 40] + bytes([data[HEADER + 40] ^ 0x10]) + data[HEADER + 41:]
    if how == "header-flip":
        return data[:20] + bytes([data[20] ^ 1]) + data[21:]
    if how == "version":
        return data[:8] + struct.pack("<I", 4) + data[12:]
    if how == "calibration-flip":
        return data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
    if how == "noise-flip":
        return data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
    if how == "foreign":
        return b"\x89PNG\r\n\x1a\n" + data[8:]
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated-header", r"truncated: 40 bytes, shorter than the 76-byte header"),
        ("truncated-records", r"truncated: \d+ bytes, expected \d+ for \d+ prompts"),
        ("truncated-crc", r"truncated"),
        ("trailing", r"1 unexpected bytes after the data"),
        ("record-flip", r"data checksum mismatch"),
        ("header-flip", r"header checksum mismatch"),
        ("version", r"unsupported format version 4 \(this build reads versions 1 to 3\)"),
        ("calibration-flip", r"calibration checksum mismatch"),
        ("noise-flip", r"noise checksum mismatch"),
        ("foreign", r"bad magic bytes .*this is not a pool file"),
        ("empty", r"the file is empty"),
    ],
)
def test_damaged_files_are_refused(tmp_path, how, message):
    path = tmp_path / "pool.bin"
    path.write_bytes(damaged(sample_pool().to_bytes(), how))
    with pytest.raises(ValueError, match=r"is not a valid PassRatePool file: " + message):
        PassRatePool.load(path)
    with pytest.raises(ValueError, match=message):
        PassRatePool.from_bytes(path.read_bytes())


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        PassRatePool.load(tmp_path / "absent.bin")
    assert info.value.filename == str(tmp_path / "absent.bin")
    with pytest.raises(IsADirectoryError):
        PassRatePool.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        sample_pool().save(tmp_path / "no-such-dir" / "pool.bin")
    assert os.listdir(tmp_path) == []


def test_repr_and_stats_keys():
    pool = sample_pool()
    assert repr(pool) == f"PassRatePool(prompts={len(pool)}, prior=(0.7, 1.3), forget=0.9)"
    assert set(pool.stats()) == {
        "prompts", "slots", "load_factor", "bytes", "bytes_per_prompt", "updates", "scale",
        "prior", "forget", "successes", "failures", "noise_success_mean", "noise_failure_mean",
        "noise_weight",
    }


# ---------------------------------------------------------------- estimators


def group_norm_cost(a, b, n):
    """v (n-1) / (n^2 P(n)), P(n) = 1 - E[p^n] - E[(1-p)^n], moments by the product formula."""
    ep = eq = 1.0
    for k in range(n):
        ep *= (a + k) / (a + b + k)
        eq *= (b + k) / (a + b + k)
    v = a * b / ((a + b) * (a + b + 1))
    return v * (n - 1) / (n * n * (1.0 - ep - eq))


def brute_force(costs, budget, lo, hi):
    """Every allocation in [lo, hi]^N with the budget: the minimum total cost."""
    import itertools

    best = math.inf
    for counts in itertools.product(range(lo, hi + 1), repeat=len(costs)):
        if sum(counts) == budget:
            best = min(best, sum(c(k) for c, k in zip(costs, counts)))
    return best


def posteriors(pool, ids):
    s, f = pool.evidence(ids)
    a0, b0 = pool.prior
    return a0 + s, b0 + f


@pytest.mark.parametrize("seed", range(12))
def test_group_norm_is_the_brute_force_optimum_over_posterior_moments(seed):
    rng = np.random.default_rng(seed)
    pool = PassRatePool(prior=(0.5, 1.5))
    ids = np.arange(4)
    trials = rng.integers(0, 12, 4)
    pool.update(ids, rng.binomial(trials, rng.random(4)), trials)
    a, b = posteriors(pool, ids)
    lo, hi = 2, 2 + int(rng.integers(1, 6))
    costs = [lambda k, a=a[i], b=b[i]: group_norm_cost(a, b, k) for i in range(4)]
    for budget in range(4 * lo, 4 * hi + 1):
        got = pool.allocate(ids, budget, lo, hi, estimator="group_norm")
        assert got.sum() == budget and got.min() >= lo and got.max() <= hi
        cost = sum(c(int(k)) for c, k in zip(costs, got))
        assert cost == pytest.approx(brute_force(costs, budget, lo, hi), rel=1e-12)


def test_group_norm_cost_of_two_is_one_eighth_and_ties_are_deterministic():
    # P(2) = 2 E[p(1-p)], so c(2) = 1/8 for every posterior; identical posteriors tie and the
    # extra rollouts go to the prompts with fewer so far, then the lower index.
    assert group_norm_cost(0.3, 9.0, 2) == pytest.approx(0.125, rel=1e-14)
    pool = PassRatePool()
    assert pool.allocate([5, 6, 7], 8, 2, 6, estimator="group_norm").tolist() == [3, 3, 2]


def test_group_norm_calibrated_scales_each_cost_by_its_factor():
    pool = PassRatePool()
    rng = np.random.default_rng(1)
    ids = np.arange(6)
    for _ in range(3):
        pool.update(ids, rng.integers(0, 9, 6), np.full(6, 8))
    factors = pool.calibrated_variance(ids) / pool.expected_variance(ids)
    assert np.ptp(factors) > 0.01
    a, b = posteriors(pool, ids[:4])
    costs = [lambda k, a=a[i], b=b[i], f=factors[i]: f * group_norm_cost(a, b, k) for i in range(4)]
    for budget in range(8, 4 * 7 + 1, 3):
        got = pool.allocate(ids[:4], budget, 2, 7, estimator="group_norm", calibrated=True)
        cost = sum(c(int(k)) for c, k in zip(costs, got))
        assert cost == pytest.approx(brute_force(costs, budget, 2, 7), rel=1e-12)


def test_pool_shifted_estimators_are_allocate_rollouts_on_posterior_variances():
    pool = sample_pool()
    ids = np.arange(0, 600, 3)
    v = pool.expected_variance(ids)
    for estimator in ("rloo", "dr_grpo", "reinforce_baseline"):
        got = pool.allocate(ids, 16 * len(ids), 2, 32, estimator=estimator)
        assert np.array_equal(got, allocate_rollouts(v, 16 * len(ids), 2, 32, estimator=estimator))
    assert np.array_equal(pool.allocate(ids, 16 * len(ids), 8, 24, estimator=None),
                          allocate_rollouts(v, 16 * len(ids), 8, 24))


@pytest.mark.parametrize(
    "lo, rule, options, message",
    [
        (0, "neyman", {"estimator": "group_norm", "min_rollouts": 2},
         r"^estimator 'group_norm' needs lo >= 2 \(a group of one rollout has zero advantage"),
        (1, "neyman", {"estimator": "rloo"}, r"^estimator 'rloo' needs lo >= 2"),
        (2, "proportional", {"estimator": "rloo"}, r"^estimator applies to rule 'neyman' only"),
        (2, "neyman", {"estimator": "group_norm", "mastery": True},
         r"^estimator 'group_norm' cannot be combined with mastery"),
        (2, "neyman", {"estimator": "GRPO"}, r"^estimator must be None or one of 'rloo'"),
    ],
)
def test_allocate_estimator_errors(lo, rule, options, message):
    with pytest.raises(ValueError, match=message):
        sample_pool().allocate([1, 2, 3], 12, lo, 8, rule=rule, **options)


# ---------------------------------------------------------------- exploring skip decisions


def skip_trap_pool():
    """Ids 1..8 informative; 100 (59 failures) and 200 (999 failures) are skipped by the plain rule."""
    pool = PassRatePool()
    ids = np.array(list(range(1, 9)) + [100, 200])
    pool.update(ids, [8] * 8 + [0, 0], [16] * 8 + [59, 999])
    return pool, ids


def test_explore_seed_re_probes_what_skipping_drops():
    pool, ids = skip_trap_pool()
    plain = pool.allocate(ids, 64, 0, 16, skip_factor=4.0)
    assert plain[8:].tolist() == [0, 0]
    kept = np.zeros(2, dtype=int)
    for seed in range(300):
        got = pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=seed)
        assert got.sum() == 64 and got.min() >= 0 and got.max() <= 16
        kept += got[8:] > 0
    # Exploration draw Beta(1, 17) for both (evidence capped at 16 trials, all failures): kept
    # when p~(1 - p~) reaches the cut (~0.017), probability (1 - 0.0173)**17 ~ 0.74.
    assert np.all((kept >= 180) & (kept <= 260)), kept


def test_explore_seed_is_deterministic_and_resumes_exactly(tmp_path):
    pool, ids = skip_trap_pool()
    a = pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=7)
    assert np.array_equal(a, pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=7))
    path = tmp_path / "pool.bin"
    pool.save(path)
    restored = PassRatePool.load(path)
    assert np.array_equal(a, restored.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=7))
    assert np.array_equal(a, pickle.loads(pickle.dumps(pool)).allocate(
        ids, 64, 0, 16, skip_factor=4.0, explore_seed=7))
    # A new training step (update) draws afresh: over seeds the decisions differ between steps.
    before = [pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=s)[8:] > 0 for s in range(40)]
    pool.update([1], [8], [16])
    after = [pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=s)[8:] > 0 for s in range(40)]
    assert any(not np.array_equal(x, y) for x, y in zip(before, after))


def test_explore_seed_needs_the_skipping_rule():
    pool, ids = skip_trap_pool()
    for options in ({}, {"skip_factor": 0.0}, {"min_rollouts": 2}):
        with pytest.raises(ValueError, match=r"^explore_seed applies to the skipping rules only \(skip_factor > 0 or skip_price\)"):
            pool.allocate(ids, 64, 0, 16, explore_seed=1, **options)
    with pytest.raises((OverflowError, TypeError)):
        pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=-1)
    # Without skipping candidates nothing changes: the informative prompts are kept either way.
    got = pool.allocate(ids, 64, 0, 16, skip_factor=4.0, explore_seed=3, calibrated=True)
    assert got.sum() == 64 and np.all(got[:8] > 0)


# ---------------------------------------------------------------- noise statistics


def reference_noise_scale(pool, ids):
    """The documented formula from the pool's public numbers: s = (1 - m) Q_succ + m Q_fail with
    Q_c = (sum_c + w0 M_c) / (n_c + w0), Q_c = M_c where n_c = 0, a missing M from the other class."""
    ms, mf = pool.noise_means
    ms, mf = (ms if ms is not None else mf), (mf if mf is not None else ms)
    s, f = pool.evidence(ids)
    qs, qf = pool.noise_sums(ids)
    w0 = pool.noise_weight
    with np.errstate(invalid="ignore", divide="ignore"):
        q_succ = np.where(s > 0, (qs + w0 * ms) / (s + w0), ms)
        q_fail = np.where(f > 0, (qf + w0 * mf) / (f + w0), mf)
    a0, b0 = pool.prior
    m = (a0 + s) / (a0 + b0 + s + f)
    return (1 - m) * q_succ + m * q_fail


def test_noise_scale_follows_the_documented_formula():
    pool = sample_pool()
    ids = np.concatenate([pool.ids(), [-1, 123_456_789]])
    assert pool.noise_means[0] == pytest.approx(0.5, rel=0.05)
    assert pool.noise_means[1] == pytest.approx(2.0, rel=0.05)
    got = pool.noise_scale(ids)
    assert got.dtype == np.float64 and got.shape == ids.shape
    np.testing.assert_allclose(got, reference_noise_scale(pool, ids), rtol=1e-14)
    # Unseen ids: exactly the pool-level value at the prior mean.
    (ms, mf), (a0, b0) = pool.noise_means, pool.prior
    m0 = a0 / (a0 + b0)
    assert got[-1] == got[-2] == (1 - m0) * ms + m0 * mf
    pool.noise_weight = 50.0
    np.testing.assert_allclose(pool.noise_scale(ids), reference_noise_scale(pool, ids), rtol=1e-14)
    with pytest.raises(ValueError, match=r"^noise_weight must be a finite number >= 0, got -1$"):
        pool.noise_weight = -1.0
    with pytest.raises(ValueError, match=r"^noise_weight must be a finite number >= 0, got NaN$"):
        PassRatePool(noise_weight=float("nan"))
    assert PassRatePool(noise_weight=0.0).noise_weight == 0.0


def test_noise_sums_are_per_class_and_forgotten():
    pool = PassRatePool(forget=0.5)
    assert pool.noise_means == (None, None) and pool.noise_scale([1]).tolist() == [1.0]
    pool.update([1, 2, 1], [2, 0, 1], [3, 4, 1], noise_success=[1.5, 0.0, 0.5],
                noise_failure=[4.0, 8.0, 0.0])
    assert pool.noise_sums([1, 2, 3]) [0].tolist() == [2.0, 0.0, 0.0]
    assert pool.noise_sums([1, 2, 3])[1].tolist() == [4.0, 8.0, 0.0]
    assert pool.noise_means == (2.0 / 3.0, 12.0 / 5.0)
    pool.update([], [], [])
    assert pool.noise_sums([1])[1].tolist() == [2.0] and pool.noise_means == (2.0 / 3.0, 12.0 / 5.0)
    stats = pool.stats()
    assert (stats["noise_success_mean"], stats["noise_failure_mean"]) == pool.noise_means


def test_steps_without_noise_are_imputed_at_the_pool_means():
    pool = PassRatePool()
    pool.update([1], [1], [2])  # before any noise observation
    pool.update([2], [1], [3], noise_success=[6.0], noise_failure=[1.0])
    # Id 1's earlier rollouts count at the first means (6 per success, 0.5 per failure).
    assert [x.tolist() for x in pool.noise_sums([1, 2])] == [[6.0, 6.0], [0.5, 1.0]]
    pool.update([2], [2], [2])  # no observation: imputed, the means stay
    assert pool.noise_sums([2])[0].tolist() == [18.0] and pool.noise_means == (6.0, 0.5)


@pytest.mark.parametrize(
    "noise, message",
    [
        ({"noise_success": [1.0, 0.0]}, r"^noise_success needs noise_failure too"),
        ({"noise_failure": [1.0, 0.0]}, r"^noise_failure needs noise_success too"),
        ({"noise_success": [1.0], "noise_failure": [1.0, 1.0]},
         r"^noise_success has length 1 but prompt_ids has length 2$"),
        ({"noise_success": [1.0, 0.0], "noise_failure": [float("nan"), 1.0]}, r"^noise_failure\[0\] is NaN$"),
        ({"noise_success": [-1.0, 0.0], "noise_failure": [1.0, 1.0]}, r"^noise_success\[0\] is negative \(-1.0\)$"),
        ({"noise_success": [1.0, 0.5], "noise_failure": [1.0, 1.0]},
         r"^noise_success\[1\] = 0.5 but successes\[1\] = 0 \(a class without rollouts has no noise sum\)$"),
        ({"noise_success": [1.0, 0.0], "noise_failure": [[1.0, 1.0]]},
         r"^noise_failure must be 1-D, got an array of shape \(1, 2\)$"),
        ({"noise_success": ["a", "b"], "noise_failure": [1.0, 1.0]}, r"^noise_success must hold real numbers"),
    ],
)
def test_rejected_noise_leaves_the_pool_unchanged(noise, message):
    pool = sample_pool()
    before = pool.to_bytes()
    with pytest.raises(ValueError, match=message):
        pool.update([1, 2], [1, 0], [2, 3], **noise)
    assert pool.to_bytes() == before


def test_allocate_with_a_scale_or_the_pools_own_noise_scale():
    pool = sample_pool()
    ids = np.arange(0, 600, 7)
    v, s = pool.expected_variance(ids), pool.noise_scale(ids)
    assert np.ptp(s) > 0.5
    budget = 16 * len(ids)
    for options in ({}, {"estimator": "rloo"}, {"calibrated": True}):
        w = pool.calibrated_variance(ids) if options.get("calibrated") else v
        opts = {k: x for k, x in options.items() if k != "calibrated"}
        want = allocate_rollouts(w, budget, 2, 40, scale=s, **opts)
        assert np.array_equal(pool.allocate(ids, budget, 2, 40, noise_scale=True, **options), want)
        assert np.array_equal(pool.allocate(ids, budget, 2, 40, scale=s, **options), want)
        assert not np.array_equal(want, allocate_rollouts(w, budget, 2, 40, **opts))
    # Skipping on s * v, with the exploration guard in the same units.
    got = pool.allocate(ids, 6 * len(ids), 0, 40, noise_scale=True, skip_factor=4.0)
    assert np.array_equal(got, allocate_rollouts(v, 6 * len(ids), 0, 40, scale=s, skip_factor=4.0))
    with pytest.raises(ValueError, match=r"^scale and noise_scale cannot be combined"):
        pool.allocate(ids, budget, 2, 40, scale=s, noise_scale=True)
    with pytest.raises(ValueError, match=r"^scale has length 3 but prompt_ids has length"):
        pool.allocate(ids, budget, 2, 40, scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"^noise_scale does not apply to rule 'uniform'"):
        pool.allocate(ids, budget, 2, 40, rule="uniform", noise_scale=True)
    # An explicit scale with rule "uniform" is only validated (as in allocate_rollouts).
    assert np.array_equal(pool.allocate(ids, budget, 2, 40, rule="uniform", scale=s),
                          pool.allocate(ids, budget, 2, 40, rule="uniform"))
    with pytest.raises(ValueError, match=r"^scale\[0\] is zero \(0.0\); a scale must be > 0$"):
        pool.allocate(ids, budget, 2, 40, rule="uniform", scale=np.zeros(len(ids)))


def test_noise_scale_on_a_noise_free_pool_allocates_exactly_as_today():
    pool = PassRatePool(forget=0.9)
    rng = np.random.default_rng(3)
    ids = np.arange(300)
    for _ in range(4):
        pool.update(ids, rng.integers(0, 9, 300), np.full(300, 8))
    for options in ({}, {"estimator": "rloo"}, {"estimator": "group_norm"}, {"calibrated": True},
                    {"skip_factor": 4.0, "lo": 0}):
        lo = options.pop("lo", 2)
        plain = pool.allocate(ids, 3000, lo, 32, **options)
        assert np.array_equal(pool.allocate(ids, 3000, lo, 32, noise_scale=True, **options), plain)
        assert np.array_equal(pool.allocate(ids, 3000, lo, 32, scale=np.ones(300), **options), plain)


@pytest.mark.parametrize("seed", range(8))
def test_group_norm_with_a_scale_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    pool = PassRatePool(prior=(0.5, 1.5))
    ids = np.arange(4)
    trials = rng.integers(1, 12, 4)
    k = rng.binomial(trials, rng.random(4))
    pool.update(ids, k, trials, noise_success=k * rng.uniform(0.1, 5.0, 4),
                noise_failure=(trials - k) * rng.uniform(0.1, 5.0, 4))
    s = pool.noise_scale(ids)
    a, b = posteriors(pool, ids)
    lo, hi = 2, 2 + int(rng.integers(1, 6))
    costs = [lambda n, a=a[i], b=b[i], x=s[i]: x * group_norm_cost(a, b, n) for i in range(4)]
    for budget in range(4 * lo, 4 * hi + 1):
        got = pool.allocate(ids, budget, lo, hi, estimator="group_norm", noise_scale=True)
        assert got.sum() == budget and got.min() >= lo and got.max() <= hi
        cost = sum(c(int(n)) for c, n in zip(costs, got))
        assert cost == pytest.approx(brute_force(costs, budget, lo, hi), rel=1e-12)


def test_rollout_allocator_record_passes_the_noise_sums_on():
    from dynamo_openrlhf.allocation import AllocationConfig, RolloutAllocator

    alloc = RolloutAllocator(AllocationConfig(rule="neyman", n_samples_per_prompt=4, prompts_per_step=2,
                                              lo=2, hi=6, fit_prior_every=0))
    alloc.record([1, 2], [1, 4], [4, 4], noise_success=[0.5, 2.0], noise_failure=[3.0, 0.0])
    assert [x.tolist() for x in alloc.pool.noise_sums([1, 2])] == [[0.5, 2.0], [3.0, 0.0]]
    alloc.record([1], [2], [4])  # no noise sums: imputed at the pool means
    assert alloc.pool.noise_means == (0.5, 1.0)
