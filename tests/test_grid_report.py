"""`make grid` and `eval.py report` on folders that real runs wrote (tiny models, bundled
samples)."""

import csv
import json
import os
import subprocess

import pytest

import eval as evaluation
import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--num_train 24 --num_dev 8 --num_eval 8 --batch_size 4 --max_steps 4"
    " --eval_steps 2 --logging_steps 2 --dtype fp32"
).split()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-point grid (opt-mezo-ft on SST2), a zero-shot and an ICL eval, a RoBERTa MeZO run."""
    root = tmp_path_factory.mktemp("runs")
    assert (
        train.main(
            [
                "--preset",
                "opt-mezo-ft",
                "--task",
                "SST2",
                "--grid",
                "--model",
                models.TINY_OPT,
                "--output_dir",
                str(root / "grid"),
                *TINY,
            ]
        )
        == 0
    )
    for demos in ("0", "4"):
        assert (
            evaluation.main(
                [
                    "--task",
                    "SST2",
                    "--num_train",
                    demos,
                    "--num_eval",
                    "8",
                    "--output_dir",
                    str(root / f"eval{demos}"),
                ]
            )
            == 0
        )
    assert (
        train.main(
            [
                "--task",
                "SST-2",
                "--model",
                models.TINY_ROBERTA,
                "--batch_size",
                "8",
                "--max_steps",
                "2",
                "--eval_steps",
                "2",
                "--learning_rate",
                "1e-3",
                "--output_dir",
                str(root / "roberta"),
            ]
        )
        == 0
    )
    return root


def test_grid_runs_every_point_and_selects_by_lowest_dev_loss(runs, capsys):
    points = sorted(os.listdir(runs / "grid"))
    assert len(points) == 2  # learning rate {1e-6, 1e-7} (Table 16)
    lrs = sorted(
        json.load(open(runs / "grid" / p / "config.json"))["learning_rate"] for p in points
    )
    assert lrs == [1e-7, 1e-6]
    dev = {p: json.load(open(runs / "grid" / p / "results.json"))["dev"]["loss"] for p in points}
    # the original keeps the lowest dev loss (HF metric_for_best_model="loss")
    best = min(dev, key=dev.get)
    # a second call skips finished points and names the same best one
    assert (
        train.main(
            [
                "--preset",
                "opt-mezo-ft",
                "--task",
                "SST2",
                "--grid",
                "--model",
                models.TINY_OPT,
                "--output_dir",
                str(runs / "grid"),
                *TINY,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert err.count("skip (finished)") == 2
    assert out.strip().splitlines()[-1].endswith(best)


def test_make_grid_expands_to_the_train_py_grid_command():
    result = subprocess.run(
        ["make", "-n", "grid", "TASK=Copa", "MODE=lora", "MODEL=m", "OUT=o", "EXTRA=--max_steps 3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        "train.py --preset opt-mezo-lora --grid --task Copa --model m --output_dir o --max_steps 3"
        in result.stdout
    ), result.stdout + result.stderr


def test_report_renders_the_three_layouts_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    dirs = [str(runs / "grid"), str(runs / "eval0"), str(runs / "eval4"), str(runs / "roberta")]
    assert evaluation.main(["report", *dirs, "--plot", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for heading in ("Zero-shot", "ICL", "MeZO"):
        assert heading in text
    # each cell is our run's test accuracy beside the paper's OPT-13B SST-2 number; MeZO's is the
    # grid point with the lowest dev loss
    test_pct = lambda d: 100 * json.load(open(d / "results.json"))["test"]["accuracy"]  # noqa: E731
    grid = {
        p: json.load(open(p / "results.json"))["dev"]["loss"] for p in (runs / "grid").iterdir()
    }
    ours = {
        "zero-shot": test_pct(runs / "eval0"),
        "icl": test_pct(runs / "eval4"),
        "mezo": test_pct(min(grid, key=grid.get)),
    }
    with open(out / "report_opt.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["task"] == "sst2"}
    for method, paper in (("zero-shot", "58.8"), ("icl", "87.0"), ("mezo", "91.4")):
        assert (
            float(rows[method]["ours"]) == pytest.approx(ours[method])
            and rows[method]["paper"] == paper
        )
        assert f"{ours[method]:.1f} ({paper})" in text
    assert "roberta" in text.lower() and "memory" in text.lower()
    assert {p.name for p in out.iterdir() if p.suffix == ".csv"} >= {
        "report_opt.csv",
        "report_roberta.csv",
        "report_memory.csv",
    }
    pngs = [p for p in out.iterdir() if p.suffix == ".png"]
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_slurm_scripts_one_per_grid_point(tmp_path):
    assert (
        train.main(
            [
                "--preset",
                "opt-mezo-prefix",
                "--task",
                "SQuAD",
                "--slurm",
                str(tmp_path),
                "--nproc",
                "8",
            ]
        )
        == 0
    )
    scripts = sorted(tmp_path.glob("*.sbatch"))
    assert len(scripts) == 3  # SQuAD prefix: lr {5e-2, 1e-2, 5e-3}
    text = scripts[0].read_text()
    assert (
        "#SBATCH" in text
        and "torchrun" in text
        and "--nproc_per_node 8" in text
        and "--mode prefix" in text
    )
