"""docs/flags.md is the launcher's parser, rendered: it fails here as soon as a --dynamo.* flag, default or help
text changes without the file being regenerated (python scripts/flag_reference.py --out docs/flags.md)."""

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from dynamo_openrlhf.flag_reference import REGENERATE, flag_rows, main, parse_flag_table, render_flag_reference

REPO = Path(__file__).resolve().parents[1]
FLAGS_MD = REPO / "docs" / "flags.md"


def _script():
    """scripts/flag_reference.py as a module (loaded from its file: scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("_flag_reference_script", REPO / "scripts" / "flag_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dynamo_parser():
    return _script().dynamo_parser()


def test_committed_flag_reference_is_the_parsers(dynamo_parser):
    expected = render_flag_reference(dynamo_parser)
    committed = FLAGS_MD.read_text(encoding="utf-8") if FLAGS_MD.exists() else ""
    assert committed == expected, f"docs/flags.md is out of date with the --dynamo.* flags; regenerate it: {REGENERATE}"


def test_every_dynamo_flag_is_listed_with_its_help_verbatim(dynamo_parser):
    table = parse_flag_table(render_flag_reference(dynamo_parser))
    actions = [a for a in dynamo_parser._actions if a.option_strings and a.option_strings[0].startswith("--dynamo.")]
    assert len(table) == len(actions) >= 40
    for a in actions:
        name = a.option_strings[0]
        flag = "--[no-]" + name[2:] if isinstance(a, argparse.BooleanOptionalAction) else name
        assert table[flag]["help"] == " ".join(a.help.split()), flag
    # spot checks of the other columns against values the launcher declares
    assert table["--dynamo.allocation.rule"]["value"] == "{off,neyman,proportional,uniform,filter}"
    assert table["--dynamo.allocation.rule"]["default"] == "neyman"
    assert (table["--dynamo.pool.prior"]["value"], table["--dynamo.pool.prior"]["default"]) == (
        "ALPHA BETA (float)", "1.0 1.0")
    assert table["--[no-]dynamo.pool.calibrated"]["default"] == "on"
    assert table["--dynamo.allocation.lo"]["default"] == "–"


def _toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    p.add_argument("--other", type=int, default=3, help="not a DynaMO flag")
    g = p.add_argument_group("DynaMO", "The   group's\n description.")
    g.add_argument("--dynamo.mode", choices=["a", "b"], default="a", help="a | b, default %(default)s.")
    g.add_argument("--dynamo.pool.size", type=int, default=None, help="Size <n> & more\\less.")
    g.add_argument("--dynamo.pool.pair", type=float, nargs=2, default=(1.0, 2.0), metavar=("X", "Y"), help="Two.")
    g.add_argument("--dynamo.loss.on", action=argparse.BooleanOptionalAction, default=True, help="Switch.")
    g.add_argument("--dynamo.debug", action="store_true", help="Debug.")
    g.add_argument("--dynamo.loss.k", type=str, default="auto", metavar="{auto,K}", help="K.")
    return p


TOY = """# DynaMO flags

Generated from the launcher's parser (`add_dynamo_arguments` in `dynamo_openrlhf/train.py`) by `python scripts/flag_reference.py --out docs/flags.md`;
do not edit by hand (`tests/test_flag_reference.py` fails when this file differs from the parser).
6 flags. Default `–`: none is set on the parser, the help says what is used.

The group's description.

## general

| flag | takes | default | help |
|---|---|---|---|
| `--dynamo.mode` | {a,b} | a | a \\| b, default a. |
| `--dynamo.debug` | switch | off | Debug. |

## `--dynamo.pool.*`

| flag | takes | default | help |
|---|---|---|---|
| `--dynamo.pool.size` | int | – | Size &lt;n> &amp; more\\\\less. |
| `--dynamo.pool.pair` | X Y (float) | 1.0 2.0 | Two. |

## `--dynamo.loss.*`

| flag | takes | default | help |
|---|---|---|---|
| `--[no-]dynamo.loss.on` | on/off | on | Switch. |
| `--dynamo.loss.k` | {auto,K} | auto | K. |
"""


def test_render_of_a_toy_parser_exactly():
    assert render_flag_reference(_toy_parser()) == TOY


def test_table_cells_read_back_unescaped():
    table = parse_flag_table(TOY)
    assert list(table) == ["--dynamo.mode", "--dynamo.debug", "--dynamo.pool.size", "--dynamo.pool.pair",
                           "--[no-]dynamo.loss.on", "--dynamo.loss.k"]
    assert table["--dynamo.mode"] == {"value": "{a,b}", "default": "a", "help": "a | b, default a."}
    assert table["--dynamo.pool.size"]["help"] == "Size <n> & more\\less."


def test_rows_in_declaration_order_with_sections():
    rows = flag_rows(_toy_parser())
    assert [(r.flag, r.section) for r in rows] == [
        ("--dynamo.mode", "general"), ("--dynamo.pool.size", "pool"), ("--dynamo.pool.pair", "pool"),
        ("--[no-]dynamo.loss.on", "loss"), ("--dynamo.debug", "general"), ("--dynamo.loss.k", "loss")]


def test_parser_without_dynamo_flags_is_refused():
    p = argparse.ArgumentParser(prog="plain")
    p.add_argument("--x")
    with pytest.raises(ValueError, match=r"parser 'plain' has no --dynamo\.\* option: build it with add_dynamo_arguments"):
        flag_rows(p)


def test_cli_writes_then_checks(tmp_path, capsys):
    out = tmp_path / "flags.md"
    assert main(["--out", str(out)], _toy_parser()) == 0
    assert out.read_text(encoding="utf-8") == TOY
    assert main(["--out", str(out), "--check"], _toy_parser()) == 0
    out.write_text(TOY.replace("Two.", "Three."), encoding="utf-8")
    capsys.readouterr()
    assert main(["--out", str(out), "--check"], _toy_parser()) == 1
    assert capsys.readouterr().out == f"{out} differs from the parser's flags; regenerate with: {REGENERATE}\n"
    assert main([], _toy_parser()) == 0
    assert capsys.readouterr().out == TOY


def _flags_named(text: str):
    """Every --dynamo.* / --[no-]dynamo.* / --no-dynamo.* option spelled out in a markdown text, as the parser's
    option string."""
    return {"--" + m.group(1) for m in re.finditer(r"--(?:\[no-\]|no-)?(dynamo(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)}


def test_every_dynamo_flag_the_readme_names_exists(dynamo_parser):
    options = {o for a in dynamo_parser._actions for o in a.option_strings}
    named = _flags_named((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(named) >= 5
    assert sorted(named - options) == []


def test_flag_names_are_read_in_every_spelling():
    text = "`--dynamo.pool.load FILE`, `--[no-]dynamo.pool.calibrated`, --no-dynamo.eval_at_end; `--dynamo.allocation.lo`."
    assert _flags_named(text) == {"--dynamo.pool.load", "--dynamo.pool.calibrated", "--dynamo.eval_at_end",
                                  "--dynamo.allocation.lo"}
