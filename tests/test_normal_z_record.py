"""A run records the normal z it drew (`normal_z`, zo/rng.py NORMAL_Z) in its config.json and its
checkpoints; a run recorded before the field existed (issue 30) drew the library's cos, and resumes
and replays with it, bitwise."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from zo.rng import DEFAULT_NORMAL_Z

ARGV = (
    "--task SST2 --num_train 24 --num_dev 8 --num_eval 8 --batch_size 4 --max_steps 6 "
    "--eval_steps 3 --save_steps 2 --learning_rate 1e-3"
).split()
OLD = ["--normal_z", "library_cos"]  # what a run before the field drew
MODEL = os.path.join("model", "model.safetensors")


def run(argv):
    assert train.main(argv) == 0


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def records(out: Path) -> list[dict]:
    """config.json and every checkpoint's run record."""
    states = sorted(out.glob("checkpoint*/**/state.json"))
    assert states
    return [json.loads((out / "config.json").read_text())] + [
        json.loads(s.read_text())["run"] for s in states
    ]


def make_old(out: Path) -> None:
    """Rewrite a run folder as a run before the field wrote it: no normal_z anywhere."""
    for path in [out / "config.json", *out.glob("checkpoint*/**/state.json")]:
        saved = json.loads(path.read_text())
        if path.name == "config.json":
            del saved["normal_z"]
        else:
            del saved["run"]["normal_z"]
        path.write_text(json.dumps(saved))


@pytest.mark.parametrize("argv, recorded", [([], DEFAULT_NORMAL_Z), (OLD, "library_cos")])
def test_a_run_records_its_normal_z(tmp_path, argv, recorded):
    out = tmp_path / "run"
    run(ARGV + argv + ["--output_dir", str(out)])
    assert [r["normal_z"] for r in records(out)] == [recorded] * len(records(out))


def test_a_run_recorded_before_normal_z_resumes_with_the_library_cos_bitwise(tmp_path, monkeypatch):
    """Interrupted at step 4, its record stripped of normal_z, resumed without the flag: the same
    trajectory and weights as the uninterrupted run with the library cos (the default cos, the
    other z, would give others: checked), and the resumed folder now records library_cos."""
    whole, parts, new = tmp_path / "whole", tmp_path / "parts", tmp_path / "new"
    run(ARGV + OLD + ["--output_dir", str(whole)])
    run(ARGV + ["--output_dir", str(new)])
    assert (new / "trajectory.jsonl").read_text() != (whole / "trajectory.jsonl").read_text()
    batch = train.Run.batch

    def interrupted(self, step):  # a real SIGINT, delivered while step 4 runs
        if step == 4 and not self.args.resume:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(train.Run, "batch", interrupted)
    assert train.main(ARGV + OLD + ["--output_dir", str(parts)]) == 130
    make_old(parts)
    run(ARGV + ["--output_dir", str(parts), "--resume"])
    assert (parts / "trajectory.jsonl").read_text() == (whole / "trajectory.jsonl").read_text()
    assert same_tensors(whole / MODEL, parts / MODEL)
    assert [r["normal_z"] for r in records(parts)] == ["library_cos"] * len(records(parts))


def test_a_run_recorded_before_normal_z_replays_with_the_library_cos_bitwise(tmp_path):
    out, again = tmp_path / "run", tmp_path / "replayed"
    run(ARGV + OLD + ["--output_dir", str(out)])
    make_old(out)
    run(["--replay", str(out), "--output_dir", str(again)])
    assert same_tensors(out / MODEL, again / MODEL)
    assert json.loads((again / "config.json").read_text())["normal_z"] == "library_cos"
