"""Issue 32: bad input found by a machine. train.py's flags are drawn from the run configuration
itself (program/config.py RunConfig: each field's type, choices and declared check; the method
fields of every estimator, direction and update rule come from zo/methods.py), eval.py's from its
parser and RULES, a combination of them per example, each value valid or not; main(argv) must end
a run with a sensible folder or refuse with one line and write nothing. The number of examples:
tests/conftest.py."""

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

import eval as eval_py
import train
from data.registry import FAMILIES
from program import config
from tests.helpers.refusals import READ, exit_status, folder_hash, one_error_line
from zo.part import Check


@dataclasses.dataclass(frozen=True)
class Flag:
    """What a value is drawn from: the flag's type, choices and declared check."""

    name: str
    kind: type
    choices: tuple | None = None
    check: Check | None = None
    switch: bool = False  # store_true


def train_flag(field: dataclasses.Field) -> Flag:
    meta = field.metadata
    return Flag(
        field.name, config.scalar_type(field), meta["choices"], meta["check"], meta["switch"]
    )


def eval_flag(action) -> Flag:
    switch = action.nargs == 0
    kind = bool if switch else action.type or str
    choices = tuple(action.choices) if action.choices else None
    return Flag(action.dest, kind, choices, eval_py.RULES.get(action.dest), switch)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = {f.name: train_flag(f) for f in dataclasses.fields(config.RunConfig)}
EVAL = {a.dest: eval_flag(a) for a in eval_py.build_parser()._actions if a.dest != "help"}
# set by the test: the paths (a fresh output folder; the tiny OPT and the bundled samples) and the
# device (this machine's CPU)
FIXED = ("model", "adapter", "data_dir", "output_dir", "device")
# the fields that set a run's cost: valid values from ranges in which a drawn run ends in seconds
COST = {
    "max_steps": (1, 3),
    "num_train_epochs": (0.01, 1.0),
    "num_train": (1, 12),
    "num_dev": (0, 4),
    "num_eval": (1, 4),
    "k": (1, 4),
    "batch_size": (1, 4),
    "eval_batch_size": (1, 8),
    "gradient_accumulation_steps": (1, 3),
    "eval_steps": (1, 3),
    "save_steps": (1, 3),
    "logging_steps": (1, 3),
    "max_length": (2, 64),
    "max_new_tokens": (1, 4),
    "fzoo_n": (2, 4),
    "n_spsa": (1, 3),
    "num_prefix": (1, 4),
    "lora_r": (1, 4),
    "lozo_rank": (1, 3),
    "lozo_nu": (1, 4),
}
EVAL_COST = {**COST, "num_train": (0, 4)}  # eval.py's: demonstrations per example
# where a valid value may be huge only at the cost of a long run (the others: the data, the model
# or the memory bound them)
LONG = ("max_steps", "num_train_epochs", "fzoo_n", "n_spsa", "max_new_tokens")
# the cost of a run where the draw does not set it (drawn flags come later and win)
TRAIN_BASE = (
    "--device cpu --perturbation eager --max_steps 2 --eval_steps 2 --num_train 8 --num_dev 4"
    " --num_eval 4 --batch_size 4 --eval_batch_size 8 --logging_steps 1"
).split()
EVAL_BASE = "--device cpu --num_eval 4 --max_new_tokens 4".split()
# values a number field is drawn from besides a range: the edges of every declared check
EDGES = ["0", "-1", "1", "2", "0.5", "1e-30", "1e300", "nan", "inf", "-inf", "1e999", "1.5"]
EDGES += [str(n) for n in (2**31, 2**32 - 1, 2**32, 2**63, 10**30, -(2**63))]
TRUE, FALSE = ("true", "1", "yes", "t"), ("false", "0", "no", "f")
NOT_BOOLS = ("maybe", "2", "none", "-1", "")
TASKS = tuple(FAMILIES["opt"]) + ("SST-2", "bogus")  # a RoBERTa task: refused on the OPT model


def parsed(flag: Flag, text):
    """The value a flag's text stands for when it is valid, else None."""
    if flag.switch:
        return True if text is None else None
    if flag.kind is bool:
        low = "true" if text is None else text.lower()
        return True if low in TRUE else False if low in FALSE else None
    if flag.kind in (int, float):
        try:
            value = flag.kind(text)
        except ValueError:
            return None
        return value if flag.check is None or flag.check.ok(value) else None
    return text if flag.choices is None or text in flag.choices else None


def values(flag: Flag, cost: dict):
    """(name, text, value) of one flag: None as text is the bare flag, None as value invalid."""
    kind = flag.kind
    if flag.switch:
        texts = st.sampled_from([None, "true"])
    elif kind is bool:
        texts = st.sampled_from((None, *TRUE, *FALSE, *NOT_BOOLS))
    elif flag.name in cost:
        low, high = cost[flag.name]
        inside = st.integers(low, high) if kind is int else st.floats(low, high)
        texts = st.one_of(inside.map(str), st.sampled_from(EDGES))
        if flag.name in LONG:  # a valid edge outside the range is no value of theirs: it runs long
            texts = texts.filter(lambda t: parsed(flag, t) is None or low <= kind(t) <= high)
    elif kind in (int, float):
        texts = st.one_of(st.integers(0, 64).map(str), st.sampled_from(EDGES))
        if kind is float:
            texts |= st.floats(0, 10).map(repr)
    elif flag.name == "task":
        texts = st.sampled_from(TASKS)
    else:  # a choice
        texts = st.sampled_from((*flag.choices, "bogus", flag.choices[0].upper()))
    return texts.map(lambda t: (flag.name, t, parsed(flag, t)))


def combinations(flags: dict, cost: dict):
    """Up to six of the flags, each with a drawn value."""
    names = sorted(set(flags) - set(FIXED))
    return st.lists(st.sampled_from(names), max_size=6, unique=True).flatmap(
        lambda chosen: st.tuples(*(values(flags[name], cost) for name in chosen))
    )


def argv_of(flags):
    out = []
    for name, text, _ in flags:
        out += [f"--{name}"] + ([] if text is None else [text])
    return out


def finite_or_marked(obj, where="results.json"):
    """Every number of a results file finite; a non-finite one written as null with its
    `<key>_nonfinite` beside it (program/json_files.py)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if value is None and f"{key}_nonfinite" in obj:
                continue
            finite_or_marked(value, f"{where}:{key}")
    elif isinstance(obj, list):
        for value in obj:
            finite_or_marked(value, where)
    elif isinstance(obj, float):
        assert math.isfinite(obj), where


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{constant} in {path}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


# the fields whose recorded value the data decides (at most what was asked; program/run.py)
DATA_DECIDES = ("num_train", "num_dev", "num_eval", "max_length")


def check_run(out, flags, err):
    """A finished run: config.json records the drawn values, results.json's numbers are finite
    or marked non-finite."""
    recorded = strict_json(os.path.join(out, "config.json"))
    for name, text, value in flags:
        if name in DATA_DECIDES:
            assert recorded[name] <= value, (name, recorded[name], err)
        elif not (name == "max_steps" and recorded.get("num_train_epochs")):
            assert recorded[name] == value, (name, recorded[name], value, err)
    finite_or_marked(strict_json(os.path.join(out, "results.json")))


def run(main, base, flags):
    """main on base + the drawn flags into a fresh folder -> (exit status, stderr, whether the
    folder exists); a finished run checked (check_run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        err = io.StringIO()
        before = folder_hash(*READ)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = exit_status(main, base + argv_of(flags) + ["--output_dir", out])
        assert folder_hash(*READ) == before, "the model or the samples changed"
        err = err.getvalue()
        if code == 0:
            check_run(out, flags, err)
        return code, err, os.path.exists(out)


def check_outcome(code, err, written, flags):
    """Run, or refused with one `error: <what> (<where>)` line and nothing written; a drawn value
    outside its flag's type, choices or check is always refused."""
    event(f"exit {code}")
    if code == 2 or any(value is None for _, _, value in flags):
        line = one_error_line(code, err)
        assert not written, f"refused ({line}) and wrote the output folder"
    else:  # a diverged run ends with its own line (train.py)
        assert code == 0 or (code == 1 and "non-finite losses in a row" in err), err


def test_hypothesis_writes_nothing_into_the_checkout():
    """The profile of tests/conftest.py: no example database, no .hypothesis folder here."""

    @given(st.integers(0, 9))
    def holds(n):
        assert 0 <= n <= 9

    holds()
    assert settings.default.database is None
    assert not os.path.exists(os.path.join(ROOT, ".hypothesis"))


def drawn(argv: str):
    """An example as `combinations` draws it, from a train.py command line of --name value."""
    words = argv.split()
    return tuple((w[2:], v, parsed(TRAIN[w[2:]], v)) for w, v in zip(words[::2], words[1::2]))


@given(combinations(TRAIN, COST))
# found: allocation failures (a traceback and a half-written folder) and torch's line naming no flag
@example(drawn(f"--mode lora --lora_r {2**31}"))
@example(drawn(f"--lozo true --lozo_rank {2**31}"))
@example((("fsdp", None, True),))  # the bare switch
@example((("lozo", None, True), ("fsdp", None, True)))  # zo's line, where added by flags.py
@example(drawn("--learning_rate 1e300"))  # more than the step's fp32 scalar holds: a traceback
def test_drawn_train_flags_run_or_are_refused_with_one_line(flags):
    check_outcome(*run(train.main, TRAIN_BASE, flags), flags)


@given(combinations(EVAL, EVAL_COST))
@example((("task", "SQuAD", "SQuAD"), ("icl_sfc", None, True)))  # refused only after the model ran
def test_drawn_eval_flags_run_or_are_refused_with_one_line(flags):
    check_outcome(*run(eval_py.main, EVAL_BASE, flags), flags)
