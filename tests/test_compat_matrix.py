"""The compatibility matrix (README, and with its notes docs/compatibility.md; issue #25 §5) is kept current, and
every ✅ cell is run.

The matrix is declared in ``dynamo_openrlhf/compatibility.py`` (rows: OpenRLHF modes and their flags; columns: DynaMO
off and its three parts; ``EXERCISED``: which e2e test runs which cells). Here:

* the README's table, and docs/compatibility.md's table and notes (the numbered tests, the CPU refusals), are
  regenerated from it and the launcher's own checks (run for every cell, on the GPU and the CPU backend, in a process
  of their own, up to where Ray would start) and must be identical;
* every test a ✅ cell names is collected by its node id (it exists), every ✅ cell is accepted by the CPU
  launcher (it can run here), every "not run here" cell is refused by it;
* a refusal shown in the matrix is the very line the launcher prints (checked against the CLI);
* ``test_e2e_compat_run`` runs the cells no other e2e test covers: the tiny task, 2 steps of 8 prompts x 4 rollouts,
  with the run's modes and DynaMO parts built from the module's flags, and checks that each mode and each part
  (or DynaMO off) is what ran.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_openrlhf import compatibility as compat

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC = REPO / "docs" / "compatibility.md"
SECTION = "### Compatibility with OpenRLHF's modes"
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def launcher_refusals():
    """The launcher's verdict for every cell on each backend: {"gpu"|"cpu": {(mode, column): message or None}}."""
    r = subprocess.run([sys.executable, "scripts/compat_matrix.py", "--json"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return {backend: {(m, c): msg for m, c, msg in rows} for backend, rows in data.items()}


def _table_on(path: Path, after: str, length: int) -> str:
    """The text of ``path`` from the first table line after ``after`` on: ``length`` characters, and the next one."""
    text = path.read_text(encoding="utf-8")
    begin = text.index("| OpenRLHF mode |", text.index(after))
    return text[begin:begin + length + 1]


def test_readme_matrix_is_what_the_code_and_the_launcher_say(launcher_refusals):
    cells = compat.matrix(launcher_refusals["gpu"], launcher_refusals["cpu"])
    expected = compat.render_table(cells)
    found = _table_on(README, SECTION, len(expected))
    if found != expected + "\n":
        print(expected)  # what README.md's section should say (pytest shows it with the failure)
    assert found == expected + "\n"


def test_docs_matrix_and_notes_are_what_the_code_and_the_launcher_say(launcher_refusals):
    cells = compat.matrix(launcher_refusals["gpu"], launcher_refusals["cpu"])
    expected = compat.render(cells)  # the table, then the numbered tests and the CPU refusals
    assert expected.startswith(compat.render_table(cells) + "\n\nTests:")
    found = _table_on(DOC, "# ", len(expected))
    if found != expected + "\n":
        print(expected)  # what docs/compatibility.md should say from its table on
    assert found == expected + "\n"


def test_tested_cells_run_on_the_cpu_backend_and_not_run_here_cells_are_refused_there(launcher_refusals):
    cells = compat.matrix(launcher_refusals["gpu"], launcher_refusals["cpu"])
    statuses = {cell.status for cell in cells.values()}
    assert statuses <= {"refused", "tested", "not run here", "untested"}
    for key, cell in cells.items():
        if cell.status == "tested":
            assert cell.cpu_refusal is None, (key, cell.cpu_refusal)
        if cell.status == "not run here":
            assert cell.cpu_refusal is not None and cell.cpu_refusal.endswith("not available on the CPU backend"), key
    # what the matrix says today (a change in the launcher or the claims shows up here, in the README and the docs)
    assert {k for k, c in cells.items() if c.status == "not run here"} == {
        (m, c.key) for m in ("dynamic_batch", "packing", "ring_attention") for c in compat.COLUMNS}
    assert [k for k, c in cells.items() if c.status == "untested"] == []
    assert [k for k, c in cells.items() if c.status == "refused"] == []


def test_every_claimed_test_exists():
    ids = list(compat.EXERCISED)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    collected = {line.strip() for line in r.stdout.splitlines()}
    assert [t for t in ids if t not in collected] == []
    # every mode and column a claim names is declared, and every claimed cell is a cell of the matrix
    cells = compat.claims()
    assert set(cells) <= {(m.key, c.key) for m in compat.MODES for c in compat.COLUMNS}


def test_claims_must_name_declared_modes_and_columns():
    with pytest.raises(ValueError, match="unknown mode 'async_q3'"):
        compat.claims({"tests/x.py::t": (("async_q3",), ("off",))})
    with pytest.raises(ValueError, match="unknown column 'grpo'"):
        compat.claims({"tests/x.py::t": (("sync",), ("grpo",))})


def test_run_flags_combine_modes_and_dynamo_parts():
    assert compat.run_flags(["async_q2", "partial_rollout"], ["allocation", "balanced"]) == [
        "--train.async_enable", "--train.async_queue_size", "2", "--train.partial_rollout_enable",
        "--dynamo.allocation.rule", "neyman", "--dynamo.modulation.preset", "off",
        "--dynamo.loss.prompt_weighting", "balanced"]
    assert compat.run_flags(["sync"], ["off"]) == [
        "--dynamo.allocation.rule", "off", "--dynamo.modulation.preset", "off", "--dynamo.loss.prompt_weighting",
        "tokens"]
    with pytest.raises(ValueError, match=r"mode async_q1 sets --train.async_enable True, mode sync sets False"):
        compat.run_flags(["sync", "async_q1"], ["off"])
    with pytest.raises(ValueError, match=r"sets --train.async_queue_size '2', mode async_q1 sets '1'"):
        compat.run_flags(["async_q1", "async_q2"], ["off"])
    with pytest.raises(ValueError, match=r"columns must be \('off',\) or DynaMO parts"):
        compat.run_flags(["sync"], ["off", "allocation"])


def test_refusals_are_the_lines_the_launcher_prints(launcher_refusals, tmp_path):
    """Every refusal in the matrix (GPU launcher), and the CPU backend's refusal of ring attention (the last
    "not run here" mode; the others come from the same ``train.main`` call in-process), is the line
    ``python -m dynamo_openrlhf.train`` prints before Ray starts (exit code 2)."""
    gpu = [(k, "gpu", msg) for k, msg in launcher_refusals["gpu"].items() if msg is not None]
    cpu = [(("ring_attention", "balanced"), "cpu", launcher_refusals["cpu"][("ring_attention", "balanced")])]
    assert cpu[0][2] == ("--ds.ring_attn_size 2 turns on --ds.packing_samples (OpenRLHF), which needs flash-attn "
                         "kernels: not available on the CPU backend")
    for (mode, column), backend, msg in gpu + cpu:
        argv = compat.cell_argv(mode, column, str(tmp_path / "run"), backend)
        r = subprocess.run([sys.executable, "-m", "dynamo_openrlhf.train", *argv], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Started a local Ray instance" not in r.stdout + r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith(compat.ERROR_PREFIX)]
        assert lines == [compat.ERROR_PREFIX + msg], (mode, column, backend)


# ---------------------------------------------------------------------------------------------------------------
# e2e: the cells no other test runs
# ---------------------------------------------------------------------------------------------------------------

def _namespace_value(stdout: str, flag: str) -> str:
    """The value OpenRLHF's printed argument namespace shows for ``flag`` (``--train.async_enable`` ->
    ``async_enable=...`` inside ``train=namespace(...)``)."""
    group, name = flag[2:].split(".", 1)
    line = next(x for x in stdout.splitlines() if "namespace(" in x and f"{group}=namespace(" in x)
    inner = line[line.index(f"{group}=namespace(") + len(group) + 11:]
    m = re.search(rf"(?:^|, ){re.escape(name)}=([^,)]*)", inner)
    assert m is not None, (flag, line[:500])
    return m.group(1)


@pytest.mark.skipif(os.environ.get("DYNAMO_SKIP_E2E") == "1", reason="DYNAMO_SKIP_E2E=1")
@pytest.mark.parametrize("name", list(compat.E2E_RUNS))
def test_e2e_compat_run(name, tmp_path):
    """One run of the tiny task (arith, transformers stand-in engine): 18 prompts, 8 per step x 4 rollouts, the run's
    modes on and DynaMO as its columns say. It trains, OpenRLHF ran with each mode's flags, and each DynaMO part ran
    when on and did not when off. The last batch (2 prompts x 4 = 8 samples, without dynamic filtering) is smaller
    than one micro-batch (16): OpenRLHF's actor (drop_last) trains none of it, and every mode's row and console say
    so (dynamo/trained_samples, dynamo/untrained_samples, the trainer's note)."""
    from dynamo_openrlhf import tiny

    tiny.prepare_tiny_assets()  # cached
    modes, columns = compat.E2E_RUNS[name]
    run_dir = tmp_path / "run"
    argv = ["--dynamo.run_dir", str(run_dir), "--dynamo.cpu_engine", "transformers", *compat.BASE_FLAGS,
            "--data.max_samples", "18", "--train.num_episodes", "1", "--ckpt.save_steps", "1000",
            *compat.run_flags(modes, columns)]
    env = dict(ENV, RAY_ADDRESS="local", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
               RAY_worker_register_timeout_seconds="900")
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "dynamo_openrlhf.train", *argv], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1500)
        # Ray gives its local node 30 s to start (hard-coded); on an overloaded machine that is retried
        if r.returncode == 0 or "The current node timed out during startup" not in r.stderr:
            break
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x.get("type", "train") == "train"]
    # 18 prompts at 8 per step: 3 steps of 8, 8 and 2 prompts (dynamic filtering refills from the same 18: 1 to 3)
    assert [x["step"] for x in train] == list(range(1, len(train) + 1))
    if "dynamic_filtering" in modes:
        assert 1 <= len(train) <= 3
    else:
        assert [x["rollout/num_samples"] for x in train] == [32, 32, 8]
    assert f"dynamo_openrlhf run summary: {len(train)} steps" in r.stdout
    # OpenRLHF ran with every mode's flags (its printed argument namespace)
    for m in modes:
        for flag, value in compat._mode(m).flags.items():
            assert _namespace_value(r.stdout, flag) == str(value), (m, flag)
    on = set(columns) - {"off"}
    for x in train:
        # OpenRLHF's actor trains micro-batches of --train.micro_batch_size 16 with drop_last
        n = int(x["rollout/num_samples"])  # metrics.jsonl stores OpenRLHF's counts as floats
        assert (x["dynamo/trained_samples"], x["dynamo/untrained_samples"]) == (n - n % 16, n % 16), x
        trained = n >= 16
        assert ("policy_loss" in x) == trained
        note = f"[dynamo] step {x['step']}: the batch's {n} samples are fewer than one micro-batch"
        assert (note in r.stdout) == (not trained), note
        assert ("dynamo/alloc_budget" in x) == ("allocation" in on), x.keys()
        assert ("dynamo/token_entropy" in x and "dynamo/beta_comp_mean" in x) == ("modulation" in on and trained)
        assert ("dynamo/token_normalizer" in x) == ("balanced" in on)
        if "dynamic_filtering" in modes:
            assert "dynamic_filtering_pass_rate" in x
        if "async_q2" in modes:
            assert 0 <= x["dynamo/pool_staleness"] <= 2
        if "async_q1" in modes:
            assert 0 <= x["dynamo/pool_staleness"] <= 1
        if "sync" in modes or not any(m.startswith("async") or m == "partial_rollout" for m in modes):
            assert x["dynamo/pool_staleness"] == 0
    assert (run_dir / "pass_rate_pool.bin").exists() == ("allocation" in on)
    if "allocation" in on:
        # each step's budget: its prompts x 4 (8 x 4, and 2 x 4 for the last batch)
        assert all(x["dynamo/alloc_budget"] == x["rollout/num_samples"] == 4 * x["dynamo/alloc_candidates"]
                   for x in train if "dynamic_filtering" not in modes)
