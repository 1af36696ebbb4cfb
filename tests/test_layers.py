"""The import rule between the project's packages, read from the source (every import statement,
those inside functions included), so a forbidden edge fails here instead of in review.

    program (train.py, eval.py, program/)  ->  zo, models, data
    models                                  ->  data (its atomic writes, data/files.py)
    zo, data                                ->  nothing of the project

zo/ sees modules, parameters and loss closures (no model, no task, no file of a run); models/
knows nothing of zeroth-order optimisation and data/ nothing of models; only the program reads and
writes run folders. data/ is the bottom layer because data/, models/ and the program all write
files with data/files.py. An edge the table does not list, or any cycle, fails.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("program", "zo", "models", "data")
SCRIPTS = {"train.py": "program", "eval.py": "program"}  # the program's entry points
ALLOWED = {
    "program": {"zo", "models", "data"},
    "models": {"data"},
    "zo": set(),
    "data": set(),
}


def sources():
    """(path relative to ROOT, layer) of every module of the project."""
    for script, layer in SCRIPTS.items():
        yield script, layer
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), ROOT), package


def imported(path: str, source: str) -> set[str]:
    """The top-level names a module imports, relative imports resolved against its package."""
    package = os.path.dirname(path).split(os.sep)
    names = set()
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module.split(".")[0])
            else:  # from . / from .. : the package it climbs to, inside the project
                names.add((package[: len(package) - node.level + 1] or [""])[0])
    return names


def edges() -> set[tuple[str, str, str]]:
    """(module, its layer, a project layer it imports) for every cross-layer import."""
    found = set()
    for path, layer in sources():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            source = f.read()
        for name in imported(path, source) & set(PACKAGES):
            if name != layer:
                found.add((path, layer, name))
    return found


def forbidden(found, allowed=ALLOWED) -> list[str]:
    """Each edge the table does not allow, as `module: layer -> layer`."""
    return sorted(f"{p}: {a} -> {b}" for p, a, b in found if b not in allowed.get(a, set()))


def cycle(found) -> list[str] | None:
    """A cycle among the layers (depth-first search), or None."""
    graph = {}
    for _, a, b in found:
        graph.setdefault(a, set()).add(b)
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                loop = visit(nxt, path + [nxt])
                if loop:
                    return loop
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            loop = visit(start, [start])
            if loop:
                return loop
    return None


def test_every_import_goes_down_the_layers():
    found = edges()
    assert {a for _, a, _ in found} >= {"program", "models"}  # the reading sees real edges
    assert forbidden(found) == []
    assert cycle(found) is None


def test_the_allowed_table_has_no_cycle():
    assert cycle({("table", a, b) for a, bs in ALLOWED.items() for b in bs}) is None


@pytest.mark.parametrize(
    "source, path, edge",
    [
        ("from data.files import atomic_write\n", "zo/x.py", "zo/x.py: zo -> data"),
        ("def f():\n    import program.flags\n", "data/x.py", "data/x.py: data -> program"),
        ("from ..program import flags\n", "models/sub/x.py", None),  # climbs to models/: no edge
        ("from zo import MeZO\n", "models/x.py", "models/x.py: models -> zo"),
        ("from .trajectory import Trajectory\n", "program/x.py", None),
    ],
)
def test_an_upward_edge_fails(source, path, edge):
    layer = path.split("/")[0]
    found = {(path, layer, n) for n in imported(path, source) & set(PACKAGES) if n != layer}
    assert forbidden(found) == ([edge] if edge else [])


def test_a_cycle_fails():
    found = {("data/x.py", "data", "models"), ("models/y.py", "models", "data")}
    assert forbidden(found) == ["data/x.py: data -> models"]
    assert cycle(found) in (["data", "models", "data"], ["models", "data", "models"])
