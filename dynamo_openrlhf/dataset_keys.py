"""The columns OpenRLHF will read from each prompt dataset, checked before Ray starts.

OpenRLHF 0.11.2's ``PromptDataset`` reads ``data[--data.input_key]`` and ``data[--data.label_key]`` of every
row of the training set (``--data.prompt_dataset``) and of the eval set (``--eval.dataset``, with the same
keys) inside the trainer actor; a missing column ends the run with a bare ``KeyError`` deep in Ray. The
launcher reads the column names of each local dataset file here instead (only the header / first record:
no full load) and names the file, the key and the columns that are there.

Checked: local ``.jsonl`` / ``.json`` (JSON lines, a JSON list of records or a dict of columns), ``.csv``
and ``.parquet`` files. Not checked (their columns are not known without loading them): Hugging Face hub
names, dataset directories, ``.arrow`` files and dataset scripts. A file that does not exist is reported
by the launcher's file check, not here.
"""

from __future__ import annotations

import csv
import json
import os
from typing import List, Optional, Sequence, Tuple

__all__ = ["dataset_columns", "dataset_key_problems"]


def _first_json_record(path: str) -> Optional[object]:
    with open(path, "r", encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head == "[":  # a JSON list of records (or a dict of columns below): needs the whole document
            f.seek(0)
            doc = json.load(f)
            return doc[0] if isinstance(doc, list) and doc else None
        if head == "{":
            f.seek(0)
            for line in f:  # JSON lines: the first non-empty line is a record
                if line.strip():
                    try:
                        return json.loads(line)
                    except json.JSONDecodeError:
                        break
            f.seek(0)
            return json.load(f)  # one JSON document: a dict of columns
    return None


def dataset_columns(path: str) -> Optional[List[str]]:
    """The column names of the local dataset file ``path`` (JSON lines / JSON: the first record's keys; a
    JSON dict of lists: its keys; CSV: the header; Parquet: the schema), or None when its format is not one
    of those (not checked). Raises ``OSError`` / ``ValueError`` for a file that cannot be read as its format."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".json", ".jsonl"):
        record = _first_json_record(path)
        return sorted(str(k) for k in record) if isinstance(record, dict) else []
    if ext == ".csv":
        with open(path, "r", encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return None


def _entries(spec: Optional[str]) -> List[str]:
    # OpenRLHF's blending_datasets: comma-separated, each "path" or "path@data_dir"
    return [e.split("@")[0].strip() for e in (spec or "").split(",") if e.split("@")[0].strip()]


def dataset_key_problems(datasets: Sequence[Tuple[str, Optional[str]]], input_key: Optional[str],
                         label_key: Optional[str]) -> List[str]:
    """One message per (dataset file, key) that is missing: ``datasets`` is ``[(flag, value)]`` with the
    flag's comma-separated dataset list as OpenRLHF takes it (e.g. ``("--eval.dataset", "a.jsonl,b.jsonl")``),
    ``input_key`` / ``label_key`` the ``--data.*`` keys (None = not read). Files that do not exist and formats
    whose columns are not known without loading them are skipped."""
    keys = [(flag, key) for flag, key in (("--data.input_key", input_key), ("--data.label_key", label_key)) if key]
    problems = []
    for flag, spec in datasets:
        for path in _entries(spec):
            local = os.path.expanduser(path)
            if not os.path.isfile(local):
                continue
            try:
                columns = dataset_columns(local)
            except (OSError, ValueError) as e:
                problems.append(f"{flag} {path}: cannot read its columns ({type(e).__name__}: {e})")
                continue
            if columns is None:
                continue
            for key_flag, key in keys:
                if key not in columns:
                    problems.append(f"{flag} {path}: no column {key!r} ({key_flag}); its columns are {columns}")
    return problems
