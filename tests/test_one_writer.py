"""With real processes: one writer per run folder (program/folder_lock.py), a lock that dies with
its holder, and run folders that are the same bytes when the same command runs twice."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import eval as evaluation
import train as train_script
from program.folder_lock import LOCK_NAME, FolderLock
from program.json_files import MEASUREMENTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = (
    "--num_train 16 --num_dev 8 --num_eval 4 --batch_size 4 --logging_steps 1 --learning_rate 1e-3"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*argv, wait=True):
    """A finished train.py (its returncode, stdout, stderr), or the running process with
    wait=False."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    if wait:
        return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(
        cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)


def test_a_second_writer_is_refused_and_the_first_run_replays_bitwise(tmp_path):
    out = tmp_path / "run"
    steps = ["--max_steps", "12", "--eval_steps", "4", "--save_steps", "2"]
    first = train(*ARGS, *steps, "--output_dir", str(out), wait=False)
    wait_for(out / "checkpoint", first)
    os.kill(first.pid, signal.SIGSTOP)  # the first run is still training while the others try
    try:
        line = (
            f"error: output folder is in use by another run: pid {first.pid} on host "
            f"{socket.gethostname()} holds its lock; wait for it to end or stop it "
            f"(--output_dir {out})"
        )
        for argv in (
            ["--resume", "--output_dir", str(out)],  # a SLURM requeue, a second terminal
            [*ARGS, *steps, "--output_dir", str(out), "--overwrite_output_dir"],
        ):
            second = train(*argv)
            stderr = second.stderr
            assert second.returncode == 2 and stderr.strip() == line, stderr[-3000:]
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert not (out / LOCK_NAME).exists()  # released with the run
    steps_logged = [json.loads(line)["step"] for line in open(out / "trajectory.jsonl")]
    assert steps_logged == list(range(12))
    replay = train("--replay", str(out), "--output_dir", str(tmp_path / "replayed"))
    assert replay.returncode == 0, replay.stderr[-3000:]
    best = json.loads((out / "results.json").read_text())["best_step"]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (out, tmp_path / "replayed"))
    assert best <= 12 and a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_lock_dies_with_its_holder_even_by_kill_9(tmp_path):
    out = tmp_path / "run"
    steps = ["--max_steps", "200", "--eval_steps", "100", "--save_steps", "2"]
    first = train(*ARGS, *steps, "--output_dir", str(out), wait=False)
    wait_for(out / "checkpoint", first)
    first.kill()  # SIGKILL: no handler runs, the lock file stays behind
    first.communicate()
    assert (out / LOCK_NAME).read_text().split()[0] == str(first.pid)
    resumed = train("--resume", "--output_dir", str(out), "--max_steps", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_a_refused_lock_names_its_holder_and_abandon_restores_the_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("1 elsewhere\n")  # left by a killed run: not held
    os.utime(folder / LOCK_NAME, ns=(10**9, 10**9))
    before = {
        p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in [folder, folder / LOCK_NAME]
    }
    held = FolderLock(str(folder)).acquire()  # flock: a second open file description conflicts
    with pytest.raises(
        ValueError, match=f"pid {os.getpid()} on host {socket.gethostname()} holds its lock"
    ):
        FolderLock(str(folder)).acquire()
    held.abandon()
    assert {
        p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in before
    } == before
    fresh = FolderLock(str(tmp_path / "new" / "run")).acquire()
    fresh.abandon()
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- the same command, the same bytes


def without_measurements(path):
    """A file's bytes; in JSON files, each MEASUREMENTS field's value (a number: times, memory)
    replaced by
    null in the text itself, so that key order and number formatting are compared byte for byte
    too."""
    data = path.read_bytes()
    if path.suffix not in (".json", ".jsonl"):
        return data
    keys = b"|".join(re.escape(k.encode()) for k in MEASUREMENTS)
    return re.sub(rb'"(' + keys + rb')": [-+0-9.eE]+', rb'"\1": null', data)


@pytest.mark.parametrize("mode", ["lora", "ft"])
def test_the_same_run_twice_writes_the_same_bytes(tmp_path, mode):
    out, folders = tmp_path / "run", []
    for i in range(2):  # the same command line, output folder included
        proc = train(
            *ARGS,
            "--mode",
            mode,
            "--max_steps",
            "3",
            "--eval_steps",
            "2",
            "--eval_final_step",
            "--output_dir",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        folders.append(out.rename(tmp_path / f"done{i}"))
    files = [sorted(p.relative_to(f) for p in f.rglob("*") if p.is_file()) for f in folders]
    assert files[0] == files[1] and any(p.name.endswith(".safetensors") for p in files[0])
    for name in files[0]:
        assert without_measurements(folders[0] / name) == without_measurements(folders[1] / name), (
            name
        )


@pytest.mark.parametrize("script", ["train", "eval"])
def test_a_crash_before_the_first_write_leaves_no_folder_and_its_traceback(
    tmp_path, monkeypatch, script
):
    # an unexpected error (a bug, an interrupt) after the folder is locked and before anything is
    # written: the traceback reaches the user and the new folder is not left behind with a .lock
    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    out = tmp_path / "new" / "run"
    if script == "train":
        monkeypatch.setattr(train_script, "Run", crash)
        main = train_script.main
    else:
        monkeypatch.setattr(evaluation, "load", crash)
        main = evaluation.main
    with pytest.raises(RuntimeError, match="a bug"):
        main(["--output_dir", str(out), "--num_eval", "4"])
    assert not (tmp_path / "new").exists()
