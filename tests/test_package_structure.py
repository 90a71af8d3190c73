"""The package's shape: no import cycles, no module past 600 lines, every module imports.

The import graph is read from the source with ``ast``, so a cycle is found
whichever module a process happens to import first. What counts as an edge:

* every ``import`` and ``from ... import`` statement in a module, at any depth:
  an import inside a function is deferred, not absent, and a cycle hidden in a
  function is still two modules that cannot be understood apart;
* resolved to the most specific module of the package: ``from peftjax.data
  import loader`` is an edge to ``peftjax.data.loader`` (a module), ``from
  peftjax.data import load_data`` one to ``peftjax.data``; relative imports are
  resolved against the importing module;
* not counted: the parent packages Python initialises on the way to a module
  (every module would otherwise depend on ``peftjax/__init__.py``, which
  re-exports the public API), imports outside the package, and imports made by
  ``importlib`` at run time (``peftjax.methods.import_all``).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil
import textwrap

import peftjax

ROOT = pathlib.Path(peftjax.__file__).resolve().parent
MAX_LINES = 600


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` (see the module docstring)."""
    modules = module_files(package_dir)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported_names(node, name, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # `from pkg import x`: x if it is a module, else pkg
                submodules = [n for n in names[:-1] if n in modules]
                names = submodules if len(submodules) == len(names) - 1 else submodules + names[-1:]
            for target in names:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path of modules) per strongly connected component with one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                connect(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_closed_path(graph, component) for component in components]


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path inside ``component`` from its first module back to itself (breadth first)."""
    start = min(component)
    parents = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]  # back from node to start
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a cycle")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()] - seen:
            seen.add(child)
            todo.append(child)
    return seen


def test_no_import_cycles_in_peftjax():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and "peftjax.train.state" in graph["peftjax.train.runner"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_relative_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import value\n",
        "a.py": "from pkg.sub import b\nvalue = 1\n",
        "sub/__init__.py": "",
        "sub/b.py": "def late():\n    from .. import c\n    return c\n",
        "c.py": "import pkg.a\n",
        "d.py": "from pkg import a, value\n",  # imports a cycle member without being in a cycle
    }
    for name, text in files.items():
        (package / name).write_text(textwrap.dedent(text))
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a", "pkg"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (package / "c.py").write_text("")
    assert find_cycles(import_graph(package)) == []


def test_the_experiment_config_does_not_reach_the_data_package():
    graph = import_graph(ROOT)
    assert "peftjax.config" in graph["peftjax.data.sources"]
    assert not {m for m in reachable(graph, "peftjax.config") if m.startswith("peftjax.data")}


def test_no_module_is_longer_than_600_lines():
    lengths = {name: len(path.read_text().splitlines()) for name, path in module_files(ROOT).items()}
    assert len(lengths) > 50
    too_long = {name: count for name, count in lengths.items() if count > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_every_module_imports():
    names = [info.name for info in pkgutil.walk_packages(peftjax.__path__, "peftjax.")]
    assert set(names) | {"peftjax"} == set(module_files(ROOT))
    for name in names:
        importlib.import_module(name)
