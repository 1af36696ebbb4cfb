"""One rule for every path a command writes (issue 32): it never overwrites or deletes a file
that an input of the same command reads, never writes through a symlink, and refuses with one line
before its first write (data/files.py `check_writes`).

Before the rule: eval.py --overwrite_output_dir deleted the run whose adapter it read (class 1),
--resume truncated the file a symlinked RUN/.lock points to (class 7), and `eval.py compare --plot`
overwrote a compared run's results.json (class 8)."""

import os
import shutil
import subprocess

import pytest

import eval as evaluation
import models
import train
from data import SAMPLES_DIR, DataError, files
from program import rotten_tomatoes
from program.folder_lock import FolderLock
from program.paper import results
from tests.helpers.refusals import SHORT_RUN, refused

# A two-step MeZO-LoRA run on the tiny OPT: an adapter, a checkpoint, a best model and a trajectory.
LORA = ["--mode", "lora", *SHORT_RUN]


# ---------------------------------------------------------------- the rule itself


def test_a_written_file_that_is_read_is_refused(tmp_path):
    read = tmp_path / "results.json"
    read.write_text("{}")
    with pytest.raises(DataError, match=r"overlaps the run file .*results.json.* \(--plot "):
        files.check_writes([read], [("run", read)], f"--plot {read}")


@pytest.mark.parametrize("where", ["holding", "inside"])
def test_a_written_folder_overlapping_a_read_path_is_refused(tmp_path, where):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    written = tmp_path if where == "holding" else tmp_path / "model" / "run"
    with pytest.raises(DataError, match="overlaps the model folder"):
        files.check_writes([written], [("model", tmp_path / "model")], "--output_dir x")


def test_a_symlink_is_never_written_through(tmp_path):
    (tmp_path / "elsewhere").write_text("keep")
    (tmp_path / "out.png").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="out.png is a symlink"):
        files.check_writes([tmp_path / "out.png"], [], "--plot out.png")
    assert (tmp_path / "elsewhere").read_text() == "keep"


def test_separate_paths_and_missing_inputs_pass(tmp_path):
    (tmp_path / "model").mkdir()
    files.check_writes(
        [tmp_path / "run", tmp_path / "run.png"],
        [("model", tmp_path / "model"), ("data", None), ("adapter", tmp_path / "missing")],
        "--output_dir run",
    )


def test_the_lock_is_never_opened_through_a_symlink(tmp_path):
    """Class 7: a symlinked .lock used to be truncated through, outside the run folder."""
    (tmp_path / "victim").write_text("user data")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "victim")
    with pytest.raises(ValueError, match=r"lock file .* is a symlink"):
        FolderLock(str(tmp_path / "run")).acquire()
    assert (tmp_path / "victim").read_text() == "user data"
    assert os.path.islink(tmp_path / "run" / ".lock")


def test_a_lock_that_is_a_folder_is_one_error(tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"lock file .* is not a regular file"):
        FolderLock(str(tmp_path / "run")).acquire()


def test_an_unwritable_lock_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("")
    real_open = os.open

    def denied(path, flags, *args):  # root may write anywhere: simulate a read-only lock file
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=r"cannot open the lock file: Permission denied"):
        FolderLock(str(tmp_path / "run")).acquire()


# ---------------------------------------------------------------- every command


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert train.main(LORA + ["--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def work(tmp_path, monkeypatch, lora_run):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(lora_run, tmp_path / "run")
    shutil.copytree(models.TINY_OPT, tmp_path / "model")
    return tmp_path


@pytest.mark.slow
def test_eval_never_deletes_the_run_whose_adapter_it_reads(capsys, work):
    """Class 1: --overwrite_output_dir used to remove the adapter, checkpoint, best model and
    trajectory, and exit 0."""
    run = work / "run"
    argv = [
        "--adapter",
        str(run / "model.adapter.safetensors"),
        "--output_dir",
        str(run),
        "--overwrite_output_dir",
    ]
    line = refused(capsys, evaluation.main, argv, "", run)
    assert "overlaps the adapter file" in line


@pytest.mark.slow
def test_resume_never_truncates_what_a_symlinked_lock_points_to(capsys, work):
    """Class 7 from the command line: train.py --resume truncated the file outside the run."""
    (work / "victim").write_text("user data")
    (work / "run" / ".lock").symlink_to(work / "victim")
    line = refused(
        capsys,
        train.main,
        LORA + ["--output_dir", str(work / "run"), "--resume"],
        "",
        work / "run",
        work / "victim",
    )
    assert ".lock is a symlink" in line


@pytest.mark.slow
def test_compare_plot_never_overwrites_a_compared_runs_file(capsys, work):
    """Class 8: --plot RUN/results.json used to replace the run's results with a PNG."""
    run = work / "run"
    argv = ["compare", str(run), "--plot", str(run / "results.json")]
    line = refused(capsys, evaluation.main, argv, "", run)
    assert "overlaps the run file" in line


def _no_launch(*args, **kwargs):
    raise AssertionError("the results runner launched a run before refusing")


RESULTS = ["--model", "model", "--data_dir", SAMPLES_DIR]
# command id -> (main, argv, the inputs it must leave byte-identical), run inside `work`
COMMANDS = {
    "train": (
        train.main,
        [*LORA, "--model", "model", "--output_dir", "model", "--overwrite_output_dir"],
        ["model"],
    ),
    "train --replay": (
        train.main,
        ["--replay", "run", "--output_dir", "run", "--overwrite_output_dir"],
        ["run"],
    ),
    "train --slurm": (
        train.main,
        ["--preset", "opt-mezo-prefix", "--task", "SQuAD", "--model", "model", "--slurm", "model"],
        ["model"],
    ),
    "eval": (evaluation.main, ["--model", "model", "--output_dir", "model/run"], ["model"]),
    "eval compare --plot": (
        evaluation.main,
        ["compare", "run", "--plot", "run/config.json"],
        ["run"],
    ),
    "eval report --out": (evaluation.main, ["report", "run", "--out", "report"], ["run"]),
    "program.rotten_tomatoes": (
        rotten_tomatoes.main,
        ["run/results.json", "--source", "run/results.json"],
        ["run"],
    ),
    "results --out": (results.main, [*RESULTS, "--out", "model"], ["model"]),
    "results --write": (results.main, [*RESULTS, "--write", "model/config.json"], ["model"]),
    "results --figure": (
        results.main,
        [*RESULTS, "--estimators", "--figure", "model/config.json"],
        ["model"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_writes_over_its_own_input(capsys, work, monkeypatch, command):
    main, argv, inputs = COMMANDS[command]
    if command == "eval report --out":  # report.md would land on the run's results.json
        (work / "report").mkdir()
        (work / "report" / "report.md").symlink_to(work / "run" / "results.json")
    monkeypatch.setattr(subprocess, "run", _no_launch)
    line = refused(capsys, main, argv, "", *[work / path for path in inputs])
    assert "overlaps the" in line or "is a symlink" in line, line
