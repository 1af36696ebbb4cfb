"""Issue 32: bad input found by a machine. train.py's flags are drawn from the run configuration
itself (program/config.py RunConfig: each field's type, choices and declared check; the method
fields of every estimator, direction and update rule come from zo/methods.py), a combination of
them per example, each value valid or not; main(argv) must end a run with a sensible folder or
refuse with one line and write nothing. The number of examples: tests/conftest.py."""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import tempfile

from hypothesis import event, example, given
from hypothesis import strategies as st

import train
from data.registry import FAMILIES
from program import config
from tests.helpers.refusals import READ, exit_status, folder_hash, one_error_line

FIELDS = {f.name: f for f in dataclasses.fields(config.RunConfig)}
# set by the test: the paths (a fresh output folder; the tiny OPT and the bundled samples) and the
# device (this machine's CPU)
FIXED = ("model", "data_dir", "output_dir", "device")
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
    "fzoo_n": (2, 4),
    "n_spsa": (1, 3),
    "num_prefix": (1, 4),
    "lora_r": (1, 4),
    "lozo_rank": (1, 3),
    "lozo_nu": (1, 4),
}
# where a valid value may be huge only at the cost of a long run (the others: the data, the model
# or the memory bound them)
LONG = ("max_steps", "num_train_epochs", "fzoo_n", "n_spsa")
# the cost of a run where the draw does not set it (drawn flags come later and win)
BASE = (
    "--device cpu --perturbation eager --max_steps 2 --eval_steps 2 --num_train 8 --num_dev 4"
    " --num_eval 4 --batch_size 4 --eval_batch_size 8 --logging_steps 1"
).split()
# values a number field is drawn from besides a range: the edges of every declared check
EDGES = ["0", "-1", "1", "2", "0.5", "1e-30", "1e300", "nan", "inf", "-inf", "1e999", "1.5"]
EDGES += [str(n) for n in (2**31, 2**32 - 1, 2**32, 2**63, 10**30, -(2**63))]
TRUE, FALSE = ("true", "1", "yes", "t"), ("false", "0", "no", "f")
NOT_BOOLS = ("maybe", "2", "none", "-1", "")
TASKS = tuple(FAMILIES["opt"]) + ("SST-2", "bogus")  # a RoBERTa task: refused on the OPT model


def parsed(field, text):
    """The value a flag's text stands for when it is valid, else None."""
    kind = config.scalar_type(field)
    if field.metadata["switch"]:
        return True if text is None else None
    if kind is bool:
        low = "true" if text is None else text.lower()
        return True if low in TRUE else False if low in FALSE else None
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            return None
        check = field.metadata["check"]
        return value if check is None or check.ok(value) else None
    choices = field.metadata["choices"]
    return text if choices is None or text in choices else None


def values(name):
    """(text, valid) of one flag: None as text is the bare flag."""
    field = FIELDS[name]
    kind = config.scalar_type(field)
    if field.metadata["switch"]:
        texts = st.sampled_from([None, "true"])
    elif kind is bool:
        texts = st.sampled_from((None, *TRUE, *FALSE, *NOT_BOOLS))
    elif name in COST:
        low, high = COST[name]
        inside = st.integers(low, high) if kind is int else st.floats(low, high)
        texts = st.one_of(inside.map(str), st.sampled_from(EDGES))
        if name in LONG:  # a valid edge outside the range is no value of theirs: it runs long
            texts = texts.filter(lambda t: parsed(field, t) is None or low <= kind(t) <= high)
    elif kind in (int, float):
        texts = st.one_of(st.integers(0, 64).map(str), st.sampled_from(EDGES))
        if kind is float:
            texts |= st.floats(0, 10).map(repr)
    elif name == "task":
        texts = st.sampled_from(TASKS)
    else:  # a choice
        choices = field.metadata["choices"]
        texts = st.sampled_from((*choices, "bogus", choices[0].upper()))
    return texts.map(lambda t: (name, t, parsed(field, t)))


DRAWN = sorted(set(FIELDS) - set(FIXED))
FLAGS = st.lists(st.sampled_from(DRAWN), max_size=6, unique=True).flatmap(
    lambda names: st.tuples(*map(values, names))
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


def run_train(flags):
    """train.py's main on BASE + the drawn flags into a fresh folder -> (exit status, stderr,
    whether the folder exists)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        argv = BASE + argv_of(flags) + ["--output_dir", out]
        err = io.StringIO()
        before = folder_hash(*READ)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = exit_status(train.main, argv)
        assert folder_hash(*READ) == before, "the model or the samples changed"
        err = err.getvalue()
        if code == 0:
            check_run(out, flags, err)
        return code, err, os.path.exists(out)


def drawn(argv: str):
    """An example as FLAGS draws it, from a command line of --name value pairs."""
    words = argv.split()
    return tuple((w[2:], v, parsed(FIELDS[w[2:]], v)) for w, v in zip(words[::2], words[1::2]))


@given(FLAGS)
# found: allocation failures (a traceback and a half-written folder) and torch's line naming no flag
@example(drawn(f"--mode lora --lora_r {2**31}"))
@example(drawn(f"--lozo true --lozo_rank {2**31}"))
@example((("fsdp", None, True),))  # the bare switch
def test_drawn_flags_run_or_are_refused_with_one_line(flags):
    code, err, written = run_train(flags)
    event(f"exit {code}")
    invalid = [(name, text) for name, text, value in flags if value is None]
    if invalid or code == 2:
        line = one_error_line(code, err)
        assert re.search(r" \(.+\)$", line), f"no (where) in {line!r}"
        assert not written, f"refused ({line}) and wrote the output folder"
    else:
        assert code == 0 or (code == 1 and "non-finite losses in a row" in err), err
