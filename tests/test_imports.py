"""The package's imports flow one way: no import circle inside dynamo_openrlhf/ and no module imports
the launcher (dynamo_openrlhf.train). Read from the source with ast (every import statement counts,
also one inside a function), nothing is imported."""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = "dynamo_openrlhf"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAUNCHER = f"{PACKAGE}.train"
#: Ground-floor modules: they import no other module of the package (the trainer glue and the CLIs build on them).
GROUND_FLOOR = {f"{PACKAGE}.metrics": {"numpy", "typing"}}


def _module_name(path: Path, root: Path = ROOT) -> str:
    """``root/a/b.py`` -> ``dynamo_openrlhf.a.b``; a package's ``__init__.py`` names the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def package_imports(root: Path = ROOT) -> Dict[str, Set[str]]:
    """module -> the other package modules it imports, subpackages included (``from dynamo_openrlhf import x``
    names the submodule x when there is one, else the package itself; relative imports resolved against the
    importing module's package; the compiled ``_core`` is no file here, so importing it counts as importing
    the package)."""
    modules = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        edges: Set[str] = set()
        # the package a relative import starts from: the module itself for an __init__.py, else its parent
        own_package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = own_package.rsplit(".", node.level - 1)[0] if node.level > 1 else own_package
                    base = anchor + ("." + base if base else "")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules and "." in t:  # import a.b.c -> the module a.b
                    t = t.rsplit(".", 1)[0]
                if t in modules:
                    edges.add(t)
        edges.discard(name)  # e.g. the launcher's __main__ block re-imports its importable copy
        graph[name] = edges
    return graph


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_cycle_finder_finds_circles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert import_cycles(g) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_the_import_forms(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from dynamo_openrlhf._core import X\n")
    (pkg / "a.py").write_text("from . import b\nfrom .c import f\n")
    (pkg / "b.py").write_text("def g():\n    import dynamo_openrlhf.c as c\n    from dynamo_openrlhf import X\n")
    (pkg / "c.py").write_text("from dynamo_openrlhf.a import h\nimport numpy\n")
    g = package_imports(pkg)
    assert g == {PACKAGE: set(), f"{PACKAGE}.a": {f"{PACKAGE}.b", f"{PACKAGE}.c"},
                 f"{PACKAGE}.b": {f"{PACKAGE}.c", PACKAGE}, f"{PACKAGE}.c": {f"{PACKAGE}.a"}}
    assert import_cycles(g) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c"]]


def test_graph_reads_subpackages(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from dynamo_openrlhf.sub import y\n")
    (pkg / "sub" / "__init__.py").write_text("from .x import f\nfrom . import y\n")
    (pkg / "sub" / "x.py").write_text("from ..top import g\nfrom .y import h\n")
    (pkg / "sub" / "y.py").write_text("import dynamo_openrlhf.sub\n")
    g = package_imports(pkg)
    sub = f"{PACKAGE}.sub"
    assert g == {PACKAGE: set(), f"{PACKAGE}.top": {f"{sub}.y"}, sub: {f"{sub}.x", f"{sub}.y"},
                 f"{sub}.x": {f"{PACKAGE}.top", f"{sub}.y"}, f"{sub}.y": {sub}}
    assert import_cycles(g) == [[sub, f"{sub}.x", f"{sub}.y", f"{PACKAGE}.top"]]  # sub -> x -> top -> y -> sub
    del g[f"{sub}.y"]
    assert import_cycles(g) == []


def test_no_import_circle_in_the_package():
    graph = package_imports()
    assert len(graph) >= 15  # the package was read
    # the CPU backend's modules too (a subpackage, one module per concept)
    layers = [f"{PACKAGE}.cpu_backend.{m}" for m in ("settings", "import_stand_ins", "process_patches", "vllm_on_cpu",
                                                     "transformers_engine", "rollout_engines", "activation",
                                                     "ray_setup")]
    assert {m for m in graph if m.startswith(f"{PACKAGE}.cpu_backend.")} == set(layers)
    for i, module in enumerate(layers):  # each imports only the backend modules listed before it (docs/cpu_backend.md)
        assert graph[module] & set(layers) <= set(layers[:i]), module
    assert import_cycles(graph) == []


def test_no_module_imports_the_launcher():
    graph = package_imports()
    importers = sorted(m for m, edges in graph.items() if LAUNCHER in edges and m != LAUNCHER)
    assert importers == []


def top_level_imports(path: Path) -> Set[str]:
    """The top-level names of every module ``path`` imports (``import a.b`` and ``from a.b import c`` give a;
    relative imports give the package)."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(PACKAGE if node.level else (node.module or "").split(".")[0])
    return names


def test_ground_floor_modules_import_nothing_from_the_package():
    graph = package_imports()
    for module, allowed in GROUND_FLOOR.items():
        assert graph[module] == set(), (module, graph[module])
        path = ROOT / f"{module.rsplit('.', 1)[1]}.py"
        assert top_level_imports(path) == allowed, module  # NumPy and the standard library only
    # the success rule and pass@k have one home: the evaluation CLI and the trainer glue read them from it
    assert f"{PACKAGE}.metrics" in graph[f"{PACKAGE}.evaluate"]


def test_top_level_imports_reads_the_import_forms(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os.path\nfrom typing import List\nfrom . import x\ndef g():\n    import numpy as np\n")
    assert top_level_imports(f) == {"os", "typing", PACKAGE, "numpy"}
