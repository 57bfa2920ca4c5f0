"""pass@k evaluation: the estimator (dynamo_openrlhf.metrics), the CLI end-to-end on the tiny preset, bad inputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynamo_openrlhf.metrics import bootstrap_ci, pass_at_k, pass_at_k_array, summarize

ROOT = Path(__file__).resolve().parents[1]


def _exact(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ----------------------------------------------------------------------------------------------
# Estimator
# ----------------------------------------------------------------------------------------------


def test_estimator_hand_values():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 5, 3) == 1.0
    # k = n: any correct sample -> 1
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    # k = 1 is the plain pass rate c / n
    for n in (1, 3, 8, 64):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # n=10, c=3, k=4: 1 - C(7,4)/C(10,4) = 1 - 35/210
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210, abs=1e-12)


def test_estimator_matches_binomials_and_is_monotone():
    for n in (1, 2, 7, 16, 50):
        for c in range(n + 1):
            prev = -1.0
            for k in range(1, n + 1):
                v = pass_at_k(n, c, k)
                assert v == pytest.approx(_exact(n, c, k), abs=1e-10)
                assert 0.0 <= v <= 1.0 and v >= prev - 1e-12
                prev = v
    # stable where binomials are huge
    v = pass_at_k(2000, 1, 1000)
    assert v == pytest.approx(0.5, abs=1e-9)


def test_estimator_errors():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 2, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_array(4, [0, 1], 8)
    with pytest.raises(ValueError, match="k <= n"):
        summarize([0, 1], 4, [1, 8])


def test_vectorised_and_summary():
    c = np.array([0, 1, 2, 4, 4])
    got = pass_at_k_array(4, c, 2)
    assert got.tolist() == pytest.approx([_exact(4, int(x), 2) for x in c])
    s = summarize(c, 4, [1, 2, 4], tags=[1, 1, 2, 2, 2], resamples=200, seed=3)
    assert s["pass_at_k"]["1"]["mean"] == pytest.approx(c.mean() / 4)
    assert s["pass_at_k"]["4"]["mean"] == pytest.approx(4 / 5)
    for v in s["pass_at_k"].values():
        assert v["ci_low"] <= v["mean"] <= v["ci_high"]
    assert s["pass_rate_fractions"] == pytest.approx({"zero": 0.2, "between": 0.4, "one": 0.4})
    assert s["by_tag"]["1"]["num_prompts"] == 2 and s["by_tag"]["2"]["num_prompts"] == 3
    assert s["by_tag"]["2"]["pass_at_k"]["1"] == pytest.approx((2 + 4 + 4) / 12)
    # the bootstrap is seeded
    assert bootstrap_ci([0, 1, 0.5, 0.2], 100, seed=1) == bootstrap_ci([0, 1, 0.5, 0.2], 100, seed=1)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "dynamo_openrlhf.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_tiny_preset_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("math_verify")
    out = tmp_path / "eval.json"
    from dynamo_openrlhf.evaluate import build_parser

    # the trainer's default task by default; the arith assets here (the ones the other tests build)
    assert build_parser().parse_args(["--preset", "tiny-cpu"]).tiny_task == "carry"
    p = _run("--preset", "tiny-cpu", "--tiny_task", "arith", "--n", "4", "--k", "1,2,4", "--max_prompts", "16",
             "--bootstrap", "200", "--output", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pass@1" in p.stdout and "| difficulty |" in p.stdout
    d = json.loads(out.read_text())
    for key in ("model", "data", "engine", "n", "k", "num_prompts", "pass_at_k", "pass_rate_fractions",
                "mean_pass_rate", "by_tag", "statuses", "per_prompt", "tag_key"):
        assert key in d, key
    assert d["engine"] == "hf" and d["n"] == 4 and d["k"] == [1, 2, 4] and d["num_prompts"] == 16
    means = [d["pass_at_k"][k]["mean"] for k in ("1", "2", "4")]
    assert means == sorted(means)
    for k in ("1", "2", "4"):
        v = d["pass_at_k"][k]
        assert 0.0 <= v["ci_low"] <= v["mean"] <= v["ci_high"] <= 1.0
    assert sum(d["pass_rate_fractions"].values()) == pytest.approx(1.0)
    assert d["tag_key"] == "difficulty"
    rows = [json.loads(line) for line in open(d["data"])][:16]
    assert set(d["by_tag"]) == {str(r["difficulty"]) for r in rows}
    assert sum(g["num_prompts"] for g in d["by_tag"].values()) == 16
    for g in d["by_tag"].values():
        assert all(0.0 <= g["pass_at_k"][k] <= 1.0 for k in ("1", "2", "4"))
    assert sum(d["statuses"].values()) == 16 * 4
    assert d["pass_at_k"]["1"]["mean"] == pytest.approx(sum(r["correct"] for r in d["per_prompt"]) / 64)


@pytest.fixture()
def data_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"What is 1+{i}?", "answer": str(1 + i)}) for i in range(3)) + "\n")
    return f


def _fake_model_dir(tmp_path):
    d = tmp_path / "model"  # validation only looks for an HF directory; nothing is loaded
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_cli_missing_data_file(tmp_path):
    p = _run("--model", str(_fake_model_dir(tmp_path)), "--data.path", str(tmp_path / "nope.jsonl"), "--n", "2", "--k", "1")
    assert p.returncode != 0
    assert "data file not found" in p.stderr and "nope.jsonl" in p.stderr


def test_cli_missing_label_key(tmp_path, data_file):
    model = _fake_model_dir(tmp_path)
    p = _run("--model", str(model), "--data.path", str(data_file), "--data.input_key", "prompt",
             "--data.label_key", "solution", "--n", "2", "--k", "1")
    assert p.returncode != 0
    assert "--data.label_key" in p.stderr and "'solution'" in p.stderr


def test_cli_missing_model_dir(tmp_path, data_file):
    p = _run("--model", str(tmp_path / "no_model"), "--data.path", str(data_file), "--data.input_key", "prompt",
             "--data.label_key", "answer", "--n", "2", "--k", "1")
    assert p.returncode != 0
    assert "model directory not found" in p.stderr


def test_cli_model_can_be_a_training_run_directory(tmp_path, data_file):
    from dynamo_openrlhf import tiny

    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(tiny.prepare_tiny_assets().model_dir, target_is_directory=True)
    out = tmp_path / "eval.json"
    p = _run("--model", str(run), "--data.path", str(data_file), "--data.input_key", "prompt", "--data.label_key",
             "answer", "--n", "2", "--k", "1,2", "--bootstrap", "10", "--output", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["model"] == str(run / "final") and d["num_prompts"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _run("--model", str(empty), "--data.path", str(data_file), "--data.input_key", "prompt", "--data.label_key",
             "answer", "--n", "2", "--k", "1")
    assert p.returncode != 0 and "nor a run directory with final/" in p.stderr


def test_cli_k_greater_than_n(tmp_path, data_file):
    p = _run("--model", str(tmp_path), "--data.path", str(data_file), "--n", "2", "--k", "1,4")
    assert p.returncode != 0
    assert "k <= n" in p.stderr


def test_train_eval_logs_from_in_training_samples():
    from dynamo_openrlhf.metrics import default_ks, train_eval_logs

    rewards = [1, 0, 0, 0] + [0] * 4 + [1] * 4
    logs = train_eval_logs(rewards, 4, [1, 2, 4, 8])
    # pass@1 = mean c/n; pass@2 for c=1 of 4: 1 - C(3,2)/C(4,2) = 1/2
    assert logs["eval_pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert logs["eval_pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert logs["eval_pass@4"] == pytest.approx(2 / 3) and "eval_pass@8" not in logs  # k > n left out
    assert (logs["eval_frac_unsolved"], logs["eval_frac_between"], logs["eval_frac_solved"]) == (1 / 3, 1 / 3, 1 / 3)
    assert logs["eval_pass@1_ci_low"] <= logs["eval_pass@1"] <= logs["eval_pass@1_ci_high"]
    assert logs["eval_pass@1_ci_low"] < logs["eval_pass@1_ci_high"]  # prompts differ: a real interval
    assert logs == train_eval_logs(rewards, 4, [1, 2, 4, 8])  # seeded bootstrap: the same numbers again
    assert train_eval_logs([], 4, [1]) == {}
    with pytest.raises(ValueError, match="3 samples, not a multiple of --eval.n_samples_per_prompt 2"):
        train_eval_logs([1, 0, 1], 2, [1])
    # a duplicated eval row is two prompts (grouped by position, as OpenRLHF does), not one with 2n samples
    dup = train_eval_logs([1, 0] + [1, 1], 2, [1, 2])
    assert dup["eval_pass@1"] == pytest.approx(0.75) and dup["eval_frac_solved"] == pytest.approx(0.5)
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


def test_the_glue_takes_the_metrics_from_metrics_not_from_the_cli():
    """evaluate.py is only the CLI: nothing else in the package imports from it."""
    pkg = ROOT / "dynamo_openrlhf"
    users = sorted(p.name for p in pkg.glob("*.py") if p.name != "evaluate.py"
                   and ("from .evaluate import" in p.read_text() or "dynamo_openrlhf.evaluate import" in p.read_text()))
    assert users == []
    from dynamo_openrlhf import metrics

    assert metrics.is_success([0.5, 0.51, -1.0, 1.0], 0.5).tolist() == [False, True, False, True]
