"""The tier rule of tests/conftest.py, run on a small suite of its own (pytester, in-process).

Each case is a test that forgot its `slow` marker: the hook still keeps it out of the fast tier,
and the tripwire fails it if the reading missed it."""

import ast
import importlib
import os
from pathlib import Path

import pytest

import tests.conftest as tiers
from tests.helpers import real

pytest_plugins = ["pytester"]
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SUITE = """
import subprocess
import sys

import pytest

import eval as evaluation
import train
from tests.helpers.real import smollm2_dir


def run(argv):
    return train.main(argv)


@pytest.fixture
def finished_run(tmp_path):
    return evaluation.main(["--num_eval", "0", "--output_dir", str(tmp_path)])


def test_calls_train_main():
    assert train.main(["--max_steps", "0"]) == 2


def test_through_a_helper():
    assert run(["--max_steps", "0"]) == 2


def test_through_a_fixture(finished_run):
    assert finished_run == 2


@pytest.mark.parametrize("main", [train.main])
def test_through_a_parameter(main):
    assert main(["--max_steps", "0"]) == 2


def test_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_reads_the_real_model():
    assert smollm2_dir()


def test_object_level():
    run = [1, 1]  # a local variable named like the helper that calls main
    assert sum(run) == 2


@pytest.mark.smoke
def test_kept_on_purpose():
    assert train.main(["--max_steps", "0"]) == 2
"""

SUITE += """

def test_imports_main_itself():
    import train as t

    assert t.main(["--max_steps", "0"]) == 2
"""

HIDDEN = """
import importlib


def test_reaches_main_where_the_reading_cannot_see():
    importlib.import_module("train").main(["--max_steps", "0"])
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    """A pytester folder with a copy of the conftest, the tripwire of this test itself undone."""
    for name, main in tiers.originals().items():
        monkeypatch.setattr(importlib.import_module(name), "main", main)
    monkeypatch.setattr(real, "TRIPPED", None)
    monkeypatch.syspath_prepend(str(ROOT))
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_suite=SUITE, test_hidden=HIDDEN)
    return pytester


def names(reports):
    return sorted(r.nodeid.rpartition("::")[2] for r in reports)


def test_the_fast_tier_leaves_out_every_test_that_forgot_its_marker(suite):
    result = suite.inline_run("-m", "not slow", "test_suite.py", "-p", "no:cacheprovider")
    passed, skipped, failed = result.listoutcomes()
    assert names(passed) == ["test_kept_on_purpose", "test_object_level"]
    assert not failed and not skipped
    deselected = [i.nodeid.rpartition("::")[2] for i in result.getcall("pytest_deselected").items]
    assert sorted(deselected) == [
        "test_calls_train_main",
        "test_imports_main_itself",
        "test_reads_the_real_model",
        "test_starts_a_process",
        "test_through_a_fixture",
        "test_through_a_helper",
        "test_through_a_parameter[main]",
    ]


def test_the_reasons_are_named(suite):
    items, _ = suite.inline_genitems("test_suite.py", "-p", "no:cacheprovider")
    reasons = {
        i.name: (i.get_closest_marker("slow") or pytest.mark.slow()).kwargs.get("reason")
        for i in items
    }
    assert reasons["test_calls_train_main"] == "train.py's main"
    assert reasons["test_through_a_helper"] == "run: train.py's main"
    assert reasons["test_through_a_fixture"] == "finished_run: eval.py's main"
    assert reasons["test_starts_a_process"] == "starts a process"
    assert reasons["test_reads_the_real_model"] == "reads the real model"
    assert reasons["test_object_level"] is None and reasons["test_kept_on_purpose"] is None


def test_the_tripwire_fails_what_the_reading_missed(suite):
    result = suite.inline_run("-m", "not slow", "test_hidden.py", "-p", "no:cacheprovider")
    _, _, failed = result.listoutcomes()
    assert names(failed) == ["test_reaches_main_where_the_reading_cannot_see"]
    assert "mark it slow" in str(failed[0].longrepr)


def test_the_full_tier_runs_everything(suite):
    result = suite.inline_run(
        "test_suite.py", "-p", "no:cacheprovider", "-k", "not process and not real"
    )
    passed, _, failed = result.listoutcomes()
    assert len(passed) == 7 and not failed, failed


def test_durations_are_written(suite, tmp_path):
    out = tmp_path / "durations.tsv"
    for k in ("object_level", "kept_on_purpose"):  # make check's two runs: one file
        suite.inline_run("test_suite.py", "-k", k, f"--durations-file={out}")
    header, *rows = out.read_text().splitlines()
    assert header == "seconds\ttest"
    assert [r.rpartition("::")[2] for r in rows] == ["test_object_level", "test_kept_on_purpose"]
    assert all(float(r.split("\t")[0]) >= 0 for r in rows)


def private_names(path: Path):
    """Names with one leading underscore that a test takes from this project's modules."""
    ours = {"data", "models", "zo", "train", "eval", "tests"}
    tree = ast.parse(path.read_text())
    modules = set()  # local names bound to this project's modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {
                (a.asname or a.name).split(".")[0]
                for a in node.names
                if a.name.split(".")[0] in ours
            }
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ours:
            modules |= {a.asname or a.name for a in node.names}
            yield from (f"{node.module}.{a.name}" for a in node.names if private(a.name))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            yield f"{node.value.id}.{node.attr}"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_test_imports_a_private_name():
    found = {p.name: list(private_names(p)) for p in TESTS.glob("test_*.py")}
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_helpers_are_imported_one_way():
    """`from tests.helpers.<subject> import ...`, never the folder on sys.path."""
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                for module in modules:
                    top = module.split(".")[0]
                    assert not top.startswith(("helpers", "test_")), (os.fspath(path), module)
