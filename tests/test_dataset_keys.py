"""Bad inputs found on the way (issue 21 §6): the dataset columns checked before Ray starts, and the import
message when a copy of the package without the compiled extension shadows the installed one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_openrlhf.dataset_keys import dataset_columns, dataset_key_problems
from dynamo_openrlhf.install_check import installed_package_dirs, shadowed_package_message

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- dataset columns


def test_dataset_columns_of_each_format(tmp_path):
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?", "answer": "4"}]
    assert dataset_columns(str(_jsonl(tmp_path / "a.jsonl", rows))) == ["answer", "prompt"]
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))  # a JSON list of records
    assert dataset_columns(str(tmp_path / "b.json")) == ["answer", "prompt"]
    (tmp_path / "c.json").write_text(json.dumps({"question": ["q"], "label": ["l"]}, indent=1))  # dict of columns
    assert dataset_columns(str(tmp_path / "c.json")) == ["label", "question"]
    (tmp_path / "d.json").write_text("\n" + json.dumps(rows[0]) + "\n")  # JSON lines under a .json name
    assert dataset_columns(str(tmp_path / "d.json")) == ["answer", "prompt"]
    (tmp_path / "e.csv").write_text("input,label\nWhat is 1+1?,2\n")
    assert dataset_columns(str(tmp_path / "e.csv")) == ["input", "label"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["q"], "gt": ["a"]}), tmp_path / "f.parquet")
    assert dataset_columns(str(tmp_path / "f.parquet")) == ["query", "gt"]
    assert dataset_columns(str(tmp_path / "g.arrow")) is None  # not checked


def test_missing_keys_name_the_file_the_key_and_the_columns(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer": "a"}])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"input": "p", "answer": "a"}])
    specs = [("--data.prompt_dataset", str(train)), ("--eval.dataset", f"{evals}@sub, {tmp_path / 'absent.jsonl'}")]
    assert dataset_key_problems(specs, "prompt", "answer") == [
        f"--eval.dataset {evals}: no column 'prompt' (--data.input_key); its columns are ['answer', 'input']"]
    assert dataset_key_problems(specs, "input", "label") == [
        f"--data.prompt_dataset {train}: no column 'input' (--data.input_key); its columns are ['answer', 'prompt']",
        f"--data.prompt_dataset {train}: no column 'label' (--data.label_key); its columns are ['answer', 'prompt']",
        f"--eval.dataset {evals}: no column 'label' (--data.label_key); its columns are ['answer', 'input']"]
    # no label key: only the input is read; hub names and missing files are not this check's business
    assert dataset_key_problems([("--data.prompt_dataset", "OpenRLHF/some-hub-set"), ("--eval.dataset", None)],
                                "input", None) == []
    (tmp_path / "bad.jsonl").write_text("[not json")
    (msg,) = dataset_key_problems([("--eval.dataset", str(tmp_path / "bad.jsonl"))], "input", None)
    assert msg.startswith(f"--eval.dataset {tmp_path / 'bad.jsonl'}: cannot read its columns (JSONDecodeError: ")


def test_the_launcher_refuses_a_missing_key_before_ray(tmp_path):
    """The issue's case: the tiny preset's data with ``--data.input_key input`` (its column is ``prompt``)."""
    env = dict(os.environ, RAY_ADDRESS="local", COLUMNS="100", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "dynamo_openrlhf.train", "--dynamo.preset", "tiny-cpu",
                        "--dynamo.tiny_task", "arith",  # its assets: cached by other tests
                        "--dynamo.run_dir", str(tmp_path / "run"), "--data.input_key", "input"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Started a local Ray instance" not in r.stdout + r.stderr
    err = " ".join(r.stderr.split())  # argparse wraps nothing here, but be safe with line breaks
    assert "train.jsonl: no column 'input' (--data.input_key); its columns are" in err
    assert "eval.jsonl: no column 'input' (--data.input_key); its columns are" in err


# ---------------------------------------------------------------------------------------------- shadowed package


def test_shadowed_package_message_only_for_another_directory(tmp_path):
    installed = str(tmp_path / "site" / "dynamo_openrlhf")
    assert shadowed_package_message(installed, [installed]) is None
    assert shadowed_package_message(installed, []) is None  # not installed at all: the original error stands
    msg = shadowed_package_message(str(tmp_path / "upload" / "dynamo_openrlhf"), [installed])
    assert msg.startswith(f"dynamo_openrlhf is being imported from {os.path.realpath(tmp_path / 'upload')}"
                          f"{os.sep}dynamo_openrlhf, which has no compiled extension dynamo_openrlhf._core, instead "
                          f"of the installed package ({os.path.realpath(installed)}).")
    assert "Submit without --working-dir" in msg and '"excludes": ["dynamo_openrlhf/"]' in msg


def test_importing_a_copy_without_the_extension_says_why(tmp_path):
    """What a Ray ``--working-dir`` upload of the checkout does: the package without its git-ignored ``_core``
    first on sys.path. Imported in a subprocess from such a copy, the package names both directories."""
    installed = installed_package_dirs()
    if not installed:
        pytest.skip("dynamo_openrlhf is not installed (pip install -e .): nothing to be shadowed")
    copy = tmp_path / "upload" / "dynamo_openrlhf"
    shutil.copytree(REPO / "dynamo_openrlhf", copy,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import dynamo_openrlhf"], cwd=copy.parent, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(copy.parent)))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == "ImportError: " + shadowed_package_message(str(copy), installed)
    assert "ModuleNotFoundError" not in r.stderr  # one message, not the bare error it replaces
    # the installed package itself still imports
    r = subprocess.run([sys.executable, "-c", "import dynamo_openrlhf, os; print(os.path.dirname(dynamo_openrlhf.__file__))"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and os.path.realpath(r.stdout.strip()) in installed
