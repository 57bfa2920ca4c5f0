"""The ``--dynamo.*`` flag reference (``docs/flags.md``), rendered from an argparse parser.

The launcher's parser is the one source of every flag, type, default and help text; this module only
renders it. It imports nothing from the package (it must not import the launcher: tests/test_imports.py),
so the caller hands it a parser: ``scripts/flag_reference.py`` builds one with the launcher's
``add_dynamo_arguments`` and writes or checks ``docs/flags.md``; ``tests/test_flag_reference.py`` fails
when the committed file differs from :func:`render_flag_reference`'s text.

Table cells: ``|`` is written ``\\|``, a backslash ``\\\\``, ``&`` ``&amp;`` and ``<`` ``&lt;``, so that a markdown
renderer shows the help text as argparse prints it; :func:`parse_flag_table` undoes exactly that.
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = ["FlagRow", "flag_rows", "render_flag_reference", "parse_flag_table", "PREFIX", "REGENERATE"]

PREFIX = "--dynamo."
REGENERATE = "python scripts/flag_reference.py --out docs/flags.md"
GENERAL = "general"


class FlagRow(NamedTuple):
    """One ``--dynamo.*`` flag as the reference shows it (all fields are display text, unescaped).

    flag: the option, ``--[no-]dynamo.x`` for an on/off switch; section: the flag's second dotted name
    (``allocation`` for ``--dynamo.allocation.lo``) or ``general``; value: what the flag takes (its choices,
    metavar or type); default: the parser default as text (``–`` for none: the help says what is used);
    help: argparse's help text, ``%(...)s`` expanded as ``--help`` would print it."""

    flag: str
    section: str
    value: str
    default: str
    help: str


def _section(name: str) -> str:
    parts = name[len(PREFIX):].split(".")
    return parts[0] if len(parts) > 1 else GENERAL


def _type_name(action: argparse.Action) -> str:
    t = action.type
    if t is None:
        return "str"
    return getattr(t, "__name__", type(t).__name__)


def _value(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on/off"
    if action.nargs == 0:  # store_true / store_false / store_const
        return "switch"
    if action.choices is not None:
        one = "{" + ",".join(str(c) for c in action.choices) + "}"
    elif isinstance(action.metavar, str):
        one = action.metavar
    else:
        one = _type_name(action)
    if isinstance(action.nargs, int):
        names = action.metavar if isinstance(action.metavar, tuple) else (one,) * action.nargs
        return f"{' '.join(names)} ({_type_name(action)})" if isinstance(action.metavar, tuple) else " ".join(names)
    if action.nargs in ("*", "+", "?"):
        return f"{one} [{action.nargs}]"
    return one


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS:
        return "–"
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, (list, tuple)):
        return " ".join(str(x) for x in d)
    return str(d)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own expansion (HelpFormatter._expand_help), so the text is what --help says
        params = dict(vars(action), prog=parser.prog)
        for name in list(params):
            if params[name] is argparse.SUPPRESS:
                del params[name]
            elif hasattr(params[name], "__name__"):
                params[name] = params[name].__name__
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        text = text % params
    return " ".join(text.split())


def flag_rows(parser: argparse.ArgumentParser) -> List[FlagRow]:
    """Every ``--dynamo.*`` option of ``parser``, in declaration order.

    Raises ValueError when the parser has none (the wrong parser was handed in)."""
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        longs = [o for o in action.option_strings if o.startswith(PREFIX)]
        if not longs:
            continue
        name = longs[0]
        flag = "--[no-]" + name[2:] if isinstance(action, argparse.BooleanOptionalAction) else name
        rows.append(FlagRow(flag, _section(name), _value(action), _default(action), _help(parser, action)))
    if not rows:
        raise ValueError(f"parser {parser.prog!r} has no {PREFIX}* option: build it with add_dynamo_arguments")
    return rows


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("&", "&amp;").replace("<", "&lt;")


def _unescape(text: str) -> str:
    return re.sub(r"\\([\\|])|&(lt|amp);", lambda m: m.group(1) or {"lt": "<", "amp": "&"}[m.group(2)], text)


def render_flag_reference(parser: argparse.ArgumentParser, intro: Optional[str] = None) -> str:
    """The markdown text of ``docs/flags.md`` for ``parser``: a header naming the command that regenerates it,
    then one table per section (general first, then in order of first appearance) with the columns flag,
    takes, default, help. ``intro``: a paragraph after the header (default: the ``--dynamo.*`` group's own
    description). Ends with a newline; deterministic for a given parser."""
    rows = flag_rows(parser)
    if intro is None:
        intro = next((g.description for g in parser._action_groups
                      if any(a.option_strings and a.option_strings[0].startswith(PREFIX) for a in g._group_actions)),
                     None)
    sections: Dict[str, List[FlagRow]] = {GENERAL: []}
    for r in rows:
        sections.setdefault(r.section, []).append(r)
    out = [
        "# DynaMO flags",
        "",
        f"Generated from the launcher's parser (`add_dynamo_arguments` in `dynamo_openrlhf/train.py`) by `{REGENERATE}`;",
        "do not edit by hand (`tests/test_flag_reference.py` fails when this file differs from the parser).",
        f"{len(rows)} flags. Default `–`: none is set on the parser, the help says what is used.",
    ]
    if intro:
        out += ["", " ".join(intro.split())]
    for section, items in sections.items():
        if not items:
            continue
        title = "general" if section == GENERAL else f"`{PREFIX}{section}.*`"
        out += ["", f"## {title}", "", "| flag | takes | default | help |", "|---|---|---|---|"]
        for r in items:
            out.append(f"| `{r.flag}` | {_escape(r.value)} | {_escape(r.default)} | {_escape(r.help)} |")
    return "\n".join(out) + "\n"


_ROW = re.compile(r"^\| `(?P<flag>[^`]+)` \| (?P<value>(?:[^|\\]|\\.)*) \| (?P<default>(?:[^|\\]|\\.)*) \| "
                  r"(?P<help>(?:[^|\\]|\\.)*) \|$")


def parse_flag_table(text: str) -> Dict[str, Dict[str, str]]:
    """Read a rendered reference back: flag -> {"value", "default", "help"}, cells unescaped (the inverse of
    the rendering, used to check that help texts come through verbatim)."""
    rows: Dict[str, Dict[str, str]] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            rows[m["flag"]] = {k: _unescape(m[k]) for k in ("value", "default", "help")}
    return rows


def main(argv: Optional[Sequence[str]], parser: argparse.ArgumentParser) -> int:
    """CLI body: print the reference of ``parser``, or write it to ``--out PATH``; with ``--check`` compare
    ``--out`` with it instead and return 1 (saying how to regenerate) when they differ."""
    cli = argparse.ArgumentParser(description="Render the --dynamo.* flag reference (docs/flags.md).")
    cli.add_argument("--out", default=None, help="write here instead of printing (e.g. docs/flags.md)")
    cli.add_argument("--check", action="store_true", help="compare --out with the parser instead of writing it")
    ns = cli.parse_args(argv)
    text = render_flag_reference(parser)
    if ns.check:
        if ns.out is None:
            cli.error("--check needs --out")
        try:
            with open(ns.out, encoding="utf-8") as f:
                current = f.read()
        except OSError as e:
            print(f"{ns.out}: {e}; regenerate with: {REGENERATE}")
            return 1
        if current != text:
            print(f"{ns.out} differs from the parser's flags; regenerate with: {REGENERATE}")
            return 1
        return 0
    if ns.out is None:
        print(text, end="")
    else:
        with open(ns.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0
