"""A method is one file and one registry line (issue 28): no module but the method's own file and
zo/methods.py names an estimator or a direction, or one of their config fields. Tests and the
README may (they exercise and document the methods), and so may ALLOWED: the runs behind RESULTS.md
(its estimators and directions comparisons) select methods by their flags, as a user would.

Update rules are not held to it: their names and fields (sgd, momentum, adam, clip_grad_norm) are
also the backprop trainer's (--optimizer, --momentum, --max_grad_norm of program/flags.py;
zo/fo.py).
"""

import ast
import inspect
from pathlib import Path

import pytest

from zo import methods

ROOT = Path(__file__).resolve().parent.parent
# the default direction is selected by no value (its name, "dense", is also a RoBERTa layer's)
CHECKED = [*methods.ESTIMATORS.values(), *list(methods.DIRECTIONS.values())[1:]]
ALLOWED = {"program/paper/rows.py"}


def names_of(method) -> set[str]:
    return {method.NAME, *(f.name for f in method.FIELDS)}


def named_in(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) where the code names one of `names`: a string, --flag, variable, attribute or
    keyword (docstrings and comments are prose, not code, and are not read)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.removeprefix("--")
            hit = value if value in names else None
        elif isinstance(node, ast.Name):
            hit = node.id if node.id in names else None
        elif isinstance(node, ast.Attribute):
            hit = node.attr if node.attr in names else None
        elif isinstance(node, ast.keyword):
            hit = node.arg if node.arg in names else None
        else:
            hit = None
        if hit is not None:
            found.append((getattr(node, "lineno", 0), hit))
    return found


def modules() -> list[Path]:
    skip = {".venv", "tests", ".git"}
    return [
        p
        for p in ROOT.rglob("*.py")
        if not skip & set(p.relative_to(ROOT).parts) and str(p.relative_to(ROOT)) not in ALLOWED
    ]


def test_no_module_but_its_own_and_the_registry_names_a_method():
    own = {Path(inspect.getfile(m)).resolve(): names_of(m) for m in CHECKED}
    registry = Path(inspect.getfile(methods)).resolve()
    every = set().union(*own.values())
    offences = []
    for path in modules():
        if path.resolve() == registry:
            continue
        allowed = own.get(path.resolve(), set())
        for line, name in named_in(ast.parse(path.read_text()), every - allowed):
            offences.append(f"{path.relative_to(ROOT)}:{line} names {name}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize(
    "code, named",
    [
        ("cfg.fzoo_n", "fzoo_n"),
        ("f(fzoo_n=3)", "fzoo_n"),
        ("x = ['--sparse_mezo', '0.5']", "sparse_mezo"),
        ("if estimator == 'fzoo': pass", "fzoo"),
    ],
)
def test_the_check_sees_each_way_of_naming(code, named):
    every = set().union(*(names_of(m) for m in CHECKED))
    assert [name for _, name in named_in(ast.parse(code), every)] == [named]


def test_every_method_field_is_a_config_field_with_its_default_once():
    from dataclasses import fields

    from zo import MeZOConfig

    config = {f.name: f.default for f in fields(MeZOConfig)}
    for f in methods.fields():
        assert config[f.name] == f.default, f.name
    declared = [f.name for m in methods.METHODS for f in m.FIELDS]
    assert len(set(declared)) == len({id(f) for m in methods.METHODS for f in m.FIELDS})
