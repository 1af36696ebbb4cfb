"""Issue 32: corrupted files of every kind the commands read, by a machine. A drawn file of a model,
a data folder or a finished run is truncated at a drawn offset or has drawn bytes flipped; the
command that reads it must run (a flip that changes nothing that matters, e.g. a weight's value)
or refuse with one `error: <what> (<where>)` line, no traceback, with nothing it reads changed and
nothing half-written. The number of examples: tests/conftest.py."""

import contextlib
import io
import json
import os
import shutil

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

import eval as eval_py
import models
import train
from data import SAMPLES_DIR
from tests.helpers.refusals import (
    READ,
    SHORT_RUN,
    exit_status,
    folder_hash,
    one_error_line,
    refused,
)

EVAL = "--num_eval 2 --batch_size 4 --device cpu".split()


def eval_run(tree):
    return eval_py.main(["--model", f"{tree}/model", "--output_dir", f"{tree}/out", *EVAL])


def eval_data(task):
    def command(tree):
        argv = ["--model", f"{tree}/model", "--data_dir", f"{tree}/data", "--task", task, *EVAL]
        return eval_py.main(argv + ["--output_dir", f"{tree}/out"])

    command.__name__ = f"eval_data_{task}"
    return command


def eval_adapter(tree):
    adapter = f"{tree}/run/model.adapter.safetensors"
    return eval_py.main(
        ["--model", f"{tree}/model", "--adapter", adapter, "--output_dir", f"{tree}/out", *EVAL]
    )


def resume(tree):
    return train.main(["--resume", "--output_dir", f"{tree}/run", "--max_steps", "3"])


def replay(tree):
    return train.main(["--replay", f"{tree}/run", "--output_dir", f"{tree}/out", "--device", "cpu"])


def compare(tree):
    return eval_py.main(["compare", f"{tree}/run", "--plot", f"{tree}/out/curves.png"])


def report(tree):
    return eval_py.main(["report", f"{tree}/run", "--out", f"{tree}/out"])


# what a command that ran wrote last
WRITTEN = {resume: "run/results.json", replay: "out/config.json", compare: "out/curves.png"}
WRITTEN |= {report: "out/report.md"}
MODEL_FILES = [f"model/{name}" for name in sorted(os.listdir(models.TINY_OPT))]
RUN_JSONS = ["run/config.json", "run/results.json", "run/metrics.jsonl"]
# (a file of the tree, the command that reads it); `run` writes into its own folder (--resume)
TARGETS = (
    [(path, eval_run) for path in MODEL_FILES]
    + [(f"data/original/SST-2/{n}", eval_data("SST2")) for n in ("train.tsv", "dev.tsv")]
    + [(f"data/RTE/{n}", eval_data("RTE")) for n in ("train.jsonl", "val.jsonl")]
    + [(f"data/SQuAD/{n}", eval_data("SQuAD")) for n in ("train-v1.1.json", "dev-v1.1.json")]
    + [("run/model.adapter.safetensors", eval_adapter)]
    + [
        (f"run/checkpoint/{n}", resume)
        for n in ("state.json", "state.safetensors", "trainable.safetensors")
    ]
    + [(path, resume) for path in ("run/config.json", "run/metrics.jsonl", "run/trajectory.jsonl")]
    + [(path, replay) for path in ("run/trajectory.jsonl", "run/config.json", "run/results.json")]
    + [(path, command) for path in RUN_JSONS for command in (compare, report)]
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tree every example copies: the tiny OPT, the bundled samples and a finished MeZO-LoRA
    run on them with a checkpoint, a trajectory and an adapter."""
    tree = tmp_path_factory.mktemp("source")
    shutil.copytree(models.TINY_OPT, tree / "model")
    shutil.copytree(SAMPLES_DIR, tree / "data")
    argv = SHORT_RUN + ["--mode", "lora", "--model", str(tree / "model"), "--device", "cpu"]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert train.main(argv + ["--output_dir", str(tree / "run")]) == 0
    return tree


def damaged(data: bytes, cut, flips) -> bytes:
    """data truncated at cut (None: whole), then each (position, mask) flips bits there."""
    data = bytearray(data if cut is None else data[: cut % max(len(data), 1)])
    for position, mask in flips:
        if data:
            data[position % len(data)] ^= mask
    return bytes(data)


# a truncation, or one to three flips: positions modulo the file's length, masks of 1 to 8 bits
DAMAGE = st.one_of(
    st.tuples(st.integers(0, 2**20), st.just(())),
    st.tuples(
        st.none(),
        st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=3),
    ),
)


@given(target=st.sampled_from(TARGETS), damage=DAMAGE)
@example(target=("data/RTE/val.jsonl", eval_data("RTE")), damage=(0, ()))  # no rows: 0/0
def test_a_corrupted_input_runs_or_is_refused_with_one_line(
    source, tmp_path_factory, target, damage
):
    path, command = target
    tree = tmp_path_factory.mktemp("tree")
    for part in ("model", "data", "run"):
        shutil.copytree(source / part, tree / part, symlinks=True)
    file = tree / path
    file.write_bytes(damaged(file.read_bytes(), *damage))
    inputs = [tree / "model", tree / "data"] + ([] if command is resume else [tree / "run"])
    before, run_before = folder_hash(*inputs, *READ), folder_hash(tree / "run")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = exit_status(command, str(tree))
    err = err.getvalue()
    event(f"{path} {command.__name__}: exit {code}")
    assert folder_hash(*inputs, *READ) == before, f"an input changed: {err}"
    if code == 0:
        assert (tree / WRITTEN.get(command, "out/results.json")).is_file(), err
    else:
        line = one_error_line(code, err)
        assert not (tree / "out").exists(), f"refused ({line}), and wrote"
        assert folder_hash(tree / "run") == run_before, f"refused ({line}), and changed the run"
    shutil.rmtree(tree)


# found: a flipped byte in a key of results.json ("loss", "test") made compare a KeyError
@pytest.mark.parametrize(
    "results, code",
    [
        ({"dev": {"lose": 0.5}, "test": {"accuracy": 0.5}}, 0),  # no dev loss: "–"
        ({"dev": {}, "tesu": {"accuracy": 0.5}}, 2),  # no test metrics: refused
        ({"dev": {}, "test": {"accuracy": None, "accuracy_nonfinite": "nan"}}, 0),
        ({"dev": {}, "test": {"accuracz": 0.5}, "num_test": 4}, 0),  # no gain without accuracy
    ],
)
def test_compare_reads_a_results_json_with_a_key_changed(source, tmp_path, capsys, results, code):
    shutil.copytree(source / "run", tmp_path / "run")
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    before = folder_hash(tmp_path)
    assert eval_py.main(["compare", str(source / "run"), str(tmp_path / "run")]) == code
    out, err = capsys.readouterr()
    if code:
        one_error_line(code, err, "results.json without 'test'")
    else:
        assert "| run " in out and "Traceback" not in err
    assert folder_hash(tmp_path) == before


# found: a flipped byte in a key of config.json made --replay a TypeError (num_train None)
@pytest.mark.parametrize(
    "command, edit, what",
    [
        (replay, {"num_train": None}, "config.json without num_train"),
        (replay, {"max_length": "64"}, "config.json holds max_length='64'"),
        (resume, {"max_length": "64"}, "config.json holds max_length='64'"),
        (resume, {"mode": "lorb"}, "config.json holds mode='lorb'"),
    ],
)
def test_a_run_config_with_a_field_changed_is_refused(
    source, tmp_path, capsys, command, edit, what
):
    for part in ("model", "data", "run"):
        shutil.copytree(source / part, tmp_path / part)
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    config.update(edit)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    refused(capsys, command, str(tmp_path), what, tmp_path)
