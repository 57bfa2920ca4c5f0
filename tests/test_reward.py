"""The math-verify reward: extraction rule, verdicts, bounded time, OpenRLHF's contract."""

import asyncio
import importlib.util
import json
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("math_verify")

from dynamo_openrlhf import reward as reward_mod  # noqa: E402
from dynamo_openrlhf.reward import MathReward, extract_answer  # noqa: E402

REWARD_FILE = Path(reward_mod.__file__)
PROMPT = "<|user|>What is 3+4?<|assistant|>"
# sympy would need astronomically long to evaluate this tower: only the budget stops it
SLOW = "\\boxed{9^{9^{9^{9^{9}}}}}"


@pytest.fixture(scope="module")
def scorer():
    m = MathReward(timeout_s=1.0, workers=1)
    yield m
    m.close()


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so \\boxed{7}", "7"),
        ("\\boxed{1} then \\boxed{\\frac{7}{2}}", "\\frac{7}{2}"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{12", None),  # cut off inside the box: no fallback
        ("The final answer is 42.", "42"),
        ("the answer is: -3\nbye", "-3"),
        ("we get 12 and then 13", "13"),
        ("7/2 is it", "7/2"),
        ("no digits here", None),
        ("\\boxed{}", None),
    ],
)
def test_extraction_rule(response, expected):
    assert extract_answer(response) == expected


def test_verdicts_and_counts(scorer):
    queries = [
        PROMPT + "\\boxed{7}</s>",  # correct
        PROMPT + "\\boxed{8}</s>",  # wrong
        PROMPT + "I do not know</s>",  # malformed (the prompt's digits do not count)
        PROMPT + SLOW,  # slow -> timeout
    ]
    t0 = time.time()
    out = scorer(queries, [PROMPT] * 4, ["7"] * 4)
    elapsed = time.time() - t0
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].dtype == torch.float32
    assert out["rewards"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out["scores"].tolist() == [1.0, 0.0, 0.0, 0.0]
    logs = out["extra_logs"]
    assert logs["math_correct"] == 1 and logs["math_wrong"] == 1
    assert logs["math_malformed"] == 1 and logs["math_timeout"] == 1 and logs["math_error"] == 0
    assert elapsed < 30, "the per-sample budget must bound the slow answer"
    # the pool replaced the killed helper: scoring still works
    assert scorer.score("\\boxed{7}", "7").status == "correct"


def test_equivalent_forms_and_too_long_answers(scorer):
    assert scorer.score("\\boxed{\\frac{7}{2}}", "3.5").reward == 1.0
    assert scorer.score("The final answer is 0.5", "\\frac{1}{2}").reward == 1.0
    s = scorer.score("\\boxed{" + "1+" * 200 + "1}", "201")
    assert s.status == "malformed" and s.reward == 0.0


def test_loaded_like_openrlhf_and_called_from_threads(monkeypatch, tmp_path):
    """OpenRLHF loads the file with spec_from_file_location and calls it via asyncio.to_thread."""
    dump = tmp_path / "dump.jsonl"
    monkeypatch.setenv("DYNAMO_REWARD_DUMP", str(dump))
    monkeypatch.setenv("DYNAMO_REWARD_TIMEOUT_S", "2")
    spec = importlib.util.spec_from_file_location("reward_func", str(REWARD_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    async def score_all():
        answers = ["7", "6", "7", "x"]
        tasks = [asyncio.to_thread(module.reward_func, [PROMPT + f"\\boxed{{{a}}}"], [PROMPT], ["7"]) for a in answers]
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(score_all())
    finally:
        module._default().close()
    assert [r["rewards"].tolist() for r in results] == [[1.0], [0.0], [1.0], [0.0]]
    # OpenRLHF turns each extra_logs value into a per-sample scalar
    assert all(set(r["extra_logs"]) >= {"math_correct", "math_wrong", "math_malformed", "math_timeout"} for r in results)
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 4
    assert {r["label"] for r in rows} == {"7"} and all(r["prompt"] == PROMPT for r in rows)
    assert sorted(r["reward"] for r in rows) == [0.0, 0.0, 1.0, 1.0]


def test_another_checker_file_serves_the_samples(tmp_path):
    """``helper_file``: the zygote loads that file and its helpers run its ``_serve`` (here a checker that calls
    every answer containing "x" correct, which math-verify would not); no ``_preload`` is needed. A file
    without ``_serve`` gives ``error`` samples naming the problem, and nothing is left running."""
    checker = tmp_path / "checker.py"
    checker.write_text(textwrap.dedent("""
        import json, os, sys

        def _serve():
            out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
            out.write('{"ready": true}\\n')
            for line in sys.stdin:
                req = json.loads(line)
                out.write(json.dumps({"status": "correct" if "x" in req["pred"] else "wrong",
                                      "detail": f"checker {os.getppid()}"}) + "\\n")
    """))
    m = MathReward(timeout_s=10, workers=1, helper_file=str(checker))
    try:
        assert [m.score(f"\\boxed{{{a}}}", "7").status for a in ("x+1", "7", "2x")] == ["correct", "wrong", "correct"]
        assert m.score("\\boxed{x}", "7").detail == f"checker {m.pids()['zygote']}"
    finally:
        m.close()
    broken = tmp_path / "broken.py"
    broken.write_text("X = 1\n")
    m = MathReward(timeout_s=10, workers=1, helper_file=str(broken), startup_timeout_s=60)
    try:
        s = m.score("\\boxed{7}", "7")
    finally:
        m.close()
    assert s.status == "error" and s.detail == (
        f"RuntimeError: math-verify helper zygote ({broken}) exited with code 1 before it was ready "
        "(is math-verify installed? does the file define _serve()? does it import without error?)")
    assert m.pids() == {"zygote": None, "helpers": []}
