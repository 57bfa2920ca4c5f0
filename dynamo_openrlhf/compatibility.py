"""Which of OpenRLHF 0.11.2's modes DynaMO works with: the compatibility matrix (README) and its notes
(docs/compatibility.md), declared once.

Rows (:data:`MODES`) are OpenRLHF modes, each with the OpenRLHF flags that turn it on; columns (:data:`COLUMNS`)
are DynaMO off and DynaMO's three parts (allocation, modulation, prompt-balanced loss), each with the ``--dynamo.*``
flags that turn on that part alone. A cell is one of

* refused: the launcher's own checks (its parse, preflight and DynaMO checks, and OpenRLHF's argument validation,
  run by :func:`launcher_refusal` up to the point where Ray would start) refuse the flags; the cell shows the exact
  message the launcher prints after ``python -m dynamo_openrlhf.train: error:``;
* tested: accepted, and an end-to-end run on the tiny task with that mode and that DynaMO setting is in the test
  suite (:data:`EXERCISED` names it: a test id -> the modes and columns its run turns on; the runs of
  :data:`E2E_RUNS` are built from this module's flags, the other tests' claims were checked by reading them);
* not run here: accepted by the launcher, but the CPU backend cannot run the mode (:attr:`Mode.needs`), so no test
  on this GPU-less machine exercises it: untested;
* untested: accepted, runnable here, but no e2e test runs it yet.

The checks run on the launcher's GPU backend (``--dynamo.backend gpu``: what a user with GPUs gets); the tests also
check that every tested cell is accepted on the CPU backend and every "not run here" cell is refused there.

``python scripts/compat_matrix.py`` prints the README section's table, then the notes of docs/compatibility.md
(it runs the launcher's checks for every cell in its process: the first one imports OpenRLHF, about a minute on a
loaded 2-core machine; a script, because no package module may import the launcher, tests/test_imports.py).
``tests/test_compat_matrix.py`` regenerates both and fails when README.md or docs/compatibility.md differs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["Mode", "Column", "MODES", "COLUMNS", "BASE_FLAGS", "E2E_RUNS", "EXERCISED", "run_flags", "cell_argv",
           "launcher_refusal", "Cell", "claims", "refusals", "matrix", "render"]

ERROR_PREFIX = "python -m dynamo_openrlhf.train: error: "

# flag -> value; True: a store_true flag given; False: not given (it conflicts with True when modes are combined)
Flags = Mapping[str, Union[str, bool]]


@dataclass(frozen=True)
class Mode:
    """One row: an OpenRLHF mode. ``flags``: what turns it on (added to :data:`BASE_FLAGS`). ``needs``: why the CPU
    backend cannot run it (None: it can), shown as "not run here: <needs>"."""
    key: str
    label: str
    flags: Flags
    needs: Optional[str] = None


@dataclass(frozen=True)
class Column:
    """One column: DynaMO off, or one of its parts alone (the others off). ``dynamo``: the ``--dynamo.*`` settings
    it changes from :data:`DYNAMO_OFF`."""
    key: str
    label: str
    dynamo: Flags = field(default_factory=dict)


# The tiny task as the suite's e2e tests run it: arith, 8 prompts x 4 rollouts per step (allocation bounds 2..6),
# one optimizer step per rollout step, no evaluation.
BASE_FLAGS: Tuple[str, ...] = (
    "--dynamo.preset", "tiny-cpu", "--dynamo.tiny_task", "arith",
    "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "4", "--train.batch_size", "32",
    "--dynamo.allocation.lo", "2", "--dynamo.allocation.hi", "6",
    "--no-dynamo.eval_at_start", "--no-dynamo.eval_at_end",
)

FLASH = "needs flash-attn (GPU)"
MODES: Tuple[Mode, ...] = (
    Mode("sync", "sync (OpenRLHF's default)", {"--train.async_enable": False}),
    Mode("async_q1", "async, queue size 1", {"--train.async_enable": True, "--train.async_queue_size": "1"}),
    Mode("async_q2", "async, queue size 2", {"--train.async_enable": True, "--train.async_queue_size": "2"}),
    Mode("partial_rollout", "partial rollouts", {"--train.async_enable": True, "--train.partial_rollout_enable": True}),
    Mode("dynamic_filtering", "dynamic filtering", {"--algo.dynamic_filtering_enable": True}),
    # OpenRLHF turns --ds.packing_samples on for it
    Mode("dynamic_batch", "dynamic batch", {"--train.dynamic_batch_enable": True}, needs=FLASH),
    Mode("colocated", "colocated models", {"--train.colocate_all": True}),
    Mode("packing", "packing", {"--ds.packing_samples": True}, needs=FLASH),
    # a ring group of 2 ranks (OpenRLHF turns packing on for it)
    Mode("ring_attention", "ring attention", {"--ds.ring_attn_size": "2", "--actor.num_gpus_per_node": "2"},
         needs=FLASH),
    Mode("zero3", "ZeRO-3", {"--ds.zero_stage": "3"}),
    # one actor rank and one rollout engine per node, as tests/test_two_nodes.py runs it
    Mode("two_nodes", "two nodes", {"--actor.num_nodes": "2", "--vllm.num_engines": "2"}),
)

DYNAMO_OFF: Dict[str, str] = {"--dynamo.allocation.rule": "off", "--dynamo.modulation.preset": "off",
                              "--dynamo.loss.prompt_weighting": "tokens"}
COLUMNS: Tuple[Column, ...] = (
    Column("off", "DynaMO off"),
    Column("allocation", "allocation", {"--dynamo.allocation.rule": "neyman"}),
    Column("modulation", "modulation", {"--dynamo.modulation.preset": "decay6"}),
    Column("balanced", "balanced loss", {"--dynamo.loss.prompt_weighting": "balanced"}),
)
DYNAMO_PARTS = ("allocation", "modulation", "balanced")

# The e2e runs tests/test_compat_matrix.py adds (one test each, ``test_e2e_compat_run[<name>]``), for cells no other
# test covers: name -> (modes, columns). Their flags come from this module (run_flags), so what they claim is what
# they run. Each is 2 steps of 8 prompts x 4 rollouts.
E2E_RUNS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "zero3-colocated-on": (("zero3", "colocated"), DYNAMO_PARTS),
    "sync-zero3-colocated-filtering-off": (("sync", "zero3", "colocated", "dynamic_filtering"), ("off",)),
    "async-q1-off": (("async_q1",), ("off",)),
    "async-q2-partial-filtering-on": (("async_q2", "partial_rollout", "dynamic_filtering"), DYNAMO_PARTS),
    "async-q2-partial-filtering-off": (("async_q2", "partial_rollout", "dynamic_filtering"), ("off",)),
}

# Every e2e test on the tiny task that exercises cells: test id -> (modes, columns) its run turns on.
EXERCISED: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    # defaults (neyman, decay6, balanced via auto), noise scale nll, 2 engines, ZeRO-2, sync
    "tests/test_train_cli.py::test_e2e_allocation_budget_metrics_and_pool": (("sync",), DYNAMO_PARTS),
    # async queue size 1, defaults (neyman, decay6, balanced via auto)
    "tests/test_async.py::test_e2e_async_trains_logs_metrics_and_the_summary_counts_the_steps":
        (("async_q1",), DYNAMO_PARTS),
    # async queue size 2 + partial rollouts + dynamic filtering, allocation off (so tokens loss), decay6
    "tests/test_async.py::"
    "test_e2e_async_allocation_off_with_dynamic_filtering_and_partial_rollouts_keeps_metrics_and_summary":
        (("async_q2", "partial_rollout", "dynamic_filtering"), ("modulation",)),
    # sync, dynamic filtering, defaults (neyman, decay6, balanced via auto)
    "tests/test_dynamic_filtering.py::test_e2e_tiny_allocation_with_dynamic_filtering":
        (("dynamic_filtering",), DYNAMO_PARTS),
    # 2 nodes, --actor.num_nodes 2, 2 engines, --train.colocate_all, defaults (neyman, decay6, balanced via auto)
    "tests/test_two_nodes.py::test_actor_ranks_and_engines_are_on_both_nodes": (("two_nodes", "colocated"),
                                                                                 DYNAMO_PARTS),
    # the same two nodes and flags, DynaMO off
    "tests/test_two_nodes.py::test_dynamo_off_on_two_nodes_trains_as_openrlhf": (("two_nodes", "colocated"), ("off",)),
    **{f"tests/test_compat_matrix.py::test_e2e_compat_run[{name}]": claim for name, claim in E2E_RUNS.items()},
}


def _mode(key: str) -> Mode:
    for m in MODES:
        if m.key == key:
            return m
    raise ValueError(f"unknown mode {key!r}; expected one of {[m.key for m in MODES]}")


def _column(key: str) -> Column:
    for c in COLUMNS:
        if c.key == key:
            return c
    raise ValueError(f"unknown column {key!r}; expected one of {[c.key for c in COLUMNS]}")


def _merge(parts: Iterable[Tuple[str, Flags]]) -> Dict[str, Union[str, bool]]:
    merged: Dict[str, Union[str, bool]] = {}
    source: Dict[str, str] = {}
    for name, flags in parts:
        for flag, value in flags.items():
            if flag in merged and merged[flag] != value:
                raise ValueError(f"{name} sets {flag} {value!r}, {source[flag]} sets {merged[flag]!r}: the two cannot "
                                 "be combined")
            merged[flag], source[flag] = value, name
    return merged


def _argv(flags: Mapping[str, Union[str, bool]]) -> List[str]:
    out: List[str] = []
    for flag, value in flags.items():
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def run_flags(modes: Sequence[str], columns: Sequence[str]) -> List[str]:
    """The flags (after :data:`BASE_FLAGS`) of a run with every mode of ``modes`` on and DynaMO set as ``columns``
    say: ``("off",)`` or any of allocation / modulation / balanced (the parts not named are off). Raises ValueError
    for unknown names, modes whose flags conflict (sync with async) or "off" together with a DynaMO part."""
    cols = [_column(c) for c in columns]
    if not cols or ("off" in columns and len(cols) > 1):
        raise ValueError(f"columns must be ('off',) or DynaMO parts, got {tuple(columns)}")
    flags = _merge([(f"mode {m}", _mode(m).flags) for m in modes])
    dynamo = dict(DYNAMO_OFF)
    for c in cols:
        dynamo.update(c.dynamo)
    return _argv(flags) + _argv(dynamo)


def cell_argv(mode: str, column: str, run_dir: str, backend: str = "gpu") -> List[str]:
    """The launcher's full argument list for one cell, on ``backend`` (gpu or cpu)."""
    return ["--dynamo.backend", backend, "--dynamo.run_dir", run_dir, *BASE_FLAGS, *run_flags([mode], [column])]


class _RayWouldStart(Exception):
    """Raised in place of ``ray.init``: the launcher accepted the arguments."""


def launcher_refusal(argv: Sequence[str], launcher_main: Callable[[List[str]], int]) -> Optional[str]:
    """Runs the launcher (``launcher_main`` = ``dynamo_openrlhf.train.main``, passed in: no package module imports
    the launcher) on ``argv`` until Ray would start: None when it gets there (the arguments are accepted), else the
    error it prints, without ``python -m dynamo_openrlhf.train: error: ``. Raises RuntimeError when the launcher
    fails in another way. Changes this process as the launcher does (OpenRLHF imported, the CPU backend's
    environment and patches for ``--dynamo.backend cpu``): run it in a process of its own."""
    import ray

    def refuse_to_start(*args, **kwargs):
        raise _RayWouldStart()

    out, err = io.StringIO(), io.StringIO()
    real_init = ray.init
    ray.init = refuse_to_start  # the launcher's hook wraps whatever ray.init is when it starts
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = launcher_main(list(argv))
    except _RayWouldStart:
        return None
    except SystemExit as e:  # argparse's error (the launcher's parser.error): exit code 2
        rc = e.code
    finally:
        ray.init = real_init
    lines = [line for line in err.getvalue().splitlines() if line.startswith(ERROR_PREFIX)]
    if rc == 0 or len(lines) != 1:
        raise RuntimeError(f"the launcher neither refused {list(argv)} nor started Ray (exit {rc}): "
                           f"{err.getvalue()[-2000:]}")
    return lines[0][len(ERROR_PREFIX):]


@dataclass(frozen=True)
class Cell:
    """A cell's verdict. ``refusal``: the launcher's message on the GPU backend (None: accepted); ``cpu_refusal``:
    on the CPU backend; ``tests``: the e2e tests that exercise it; ``needs``: why the mode is not run here."""
    refusal: Optional[str]
    cpu_refusal: Optional[str]
    tests: Tuple[str, ...]
    needs: Optional[str]

    @property
    def status(self) -> str:
        """refused, tested, not run here or untested (see the module docstring)."""
        if self.refusal is not None:
            return "refused"
        if self.tests:
            return "tested"
        return "not run here" if self.needs else "untested"


def claims(exercised: Mapping[str, Tuple[Sequence[str], Sequence[str]]] = EXERCISED
           ) -> Dict[Tuple[str, str], Tuple[str, ...]]:
    """(mode, column) -> the test ids whose run covers the cell, in :data:`EXERCISED`'s order. Raises ValueError
    for a mode or column name that is not declared."""
    out: Dict[Tuple[str, str], List[str]] = {}
    for test, (modes, columns) in exercised.items():
        for m in modes:
            _mode(m)
            for c in columns:
                _column(c)
                out.setdefault((m, c), []).append(test)
    return {k: tuple(v) for k, v in out.items()}


Refusals = Mapping[Tuple[str, str], Optional[str]]


def refusals(backend: str, launcher_main: Callable[[List[str]], int]) -> Dict[Tuple[str, str], Optional[str]]:
    """(mode, column) -> the launcher's refusal on ``backend`` (gpu or cpu; None: accepted), for every cell. Runs
    :func:`launcher_refusal`, so it changes this process as the launcher does."""
    with tempfile.TemporaryDirectory(prefix="dynamo_compat_") as tmp:
        return {(m.key, c.key): launcher_refusal(cell_argv(m.key, c.key, f"{tmp}/run", backend), launcher_main)
                for m in MODES for c in COLUMNS}


def matrix(gpu: Refusals, cpu: Refusals,
           exercised: Mapping[str, Tuple[Sequence[str], Sequence[str]]] = EXERCISED) -> Dict[Tuple[str, str], Cell]:
    """Every cell's verdict from the launcher's refusals on each backend (:func:`refusals`) and the claims of
    ``exercised``."""
    tested = claims(exercised)
    return {(m.key, c.key): Cell(gpu[(m.key, c.key)], cpu[(m.key, c.key)], tested.get((m.key, c.key), ()), m.needs)
            for m in MODES for c in COLUMNS}


def _flag_text(flags: Flags) -> str:
    return " ".join(_argv(flags))


def _test_numbers(cells: Mapping[Tuple[str, str], Cell]) -> Dict[str, int]:
    """test id -> its number in the matrix (1, 2, ... in :data:`EXERCISED`'s order, for the tests that run a cell)."""
    numbers: Dict[str, int] = {}
    for test in EXERCISED:
        if any(test in cell.tests for cell in cells.values()):
            numbers[test] = len(numbers) + 1
    return numbers


def _cpu_notes(cells: Mapping[Tuple[str, str], Cell]) -> Dict[str, str]:
    """mode label -> the CPU launcher's refusal, for the modes with a "not run here" cell (first refusal each)."""
    notes: Dict[str, str] = {}
    for m in MODES:
        for c in COLUMNS:
            cell = cells[(m.key, c.key)]
            if cell.status == "not run here" and cell.cpu_refusal is not None:
                notes.setdefault(m.label, cell.cpu_refusal)
    return notes


def render_table(cells: Mapping[Tuple[str, str], Cell]) -> str:
    """The README's table (markdown): ✅ with the numbers of the tests that run the cell (listed by
    :func:`render_notes`), ``refused: `<message>` `` (the GPU launcher's), "not run here: <why>" (the CPU launcher's
    refusal is in the notes) or "untested (accepted)"."""
    numbers = _test_numbers(cells)
    lines = ["| OpenRLHF mode | " + " | ".join(c.label for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for m in MODES:
        flags = _flag_text(m.flags)
        row = [m.label + (f" (`{flags}`)" if flags else "")]
        for c in COLUMNS:
            cell = cells[(m.key, c.key)]
            if cell.status == "refused":
                row.append(f"refused: `{cell.refusal}`")
            elif cell.status == "tested":
                row.append("✅ " + ", ".join(str(n) for n in sorted(numbers[t] for t in cell.tests)))
            elif cell.status == "not run here":
                row.append(f"not run here: {cell.needs}")
            else:
                row.append("untested (accepted)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_notes(cells: Mapping[Tuple[str, str], Cell]) -> str:
    """docs/compatibility.md's notes to the table (markdown): the numbered tests, then the CPU launcher's refusal
    for each mode with a "not run here" cell."""
    lines = ["Tests:", ""] + [f"{n}. `{t}`" for t, n in _test_numbers(cells).items()]
    cpu_notes = _cpu_notes(cells)
    if cpu_notes:
        lines += ["", "Refused by the CPU backend, so never run here (untested):", ""]
        lines += [f"- {label}: `{msg}`" for label, msg in cpu_notes.items()]
    return "\n".join(lines)


def render(cells: Mapping[Tuple[str, str], Cell]) -> str:
    """What ``scripts/compat_matrix.py`` prints: :func:`render_table`, a blank line, :func:`render_notes`."""
    return render_table(cells) + "\n\n" + render_notes(cells)


def main(argv: Optional[Sequence[str]], launcher_main: Callable[[List[str]], int]) -> int:
    """``scripts/compat_matrix.py``: print the README's matrix and docs/compatibility.md's notes, or with ``--json``
    the refusals behind them."""
    parser = argparse.ArgumentParser(prog="python scripts/compat_matrix.py",
                                     description="Print the README's compatibility matrix and its notes "
                                                 "(docs/compatibility.md): runs the launcher's checks for every "
                                                 "cell on both backends (no Ray).")
    parser.add_argument("--json", action="store_true",
                        help="print the refusals instead: {backend: [[mode, column, message or null], ...]}")
    ns = parser.parse_args(argv)
    gpu = refusals("gpu", launcher_main)
    cpu = refusals("cpu", launcher_main)  # after the GPU ones: the CPU backend patches this process
    if ns.json:
        print(json.dumps({name: [[m, c, msg] for (m, c), msg in r.items()] for name, r in (("gpu", gpu),
                                                                                           ("cpu", cpu))}))
    else:
        print(render(matrix(gpu, cpu)))
    return 0
