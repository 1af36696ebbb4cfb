"""`make results` (program/paper/results.py) on the embedded tiny OPT and the bundled sample:
every row runs, finished runs are skipped, the table is built from the run folders, RESULTS.md
keeps its text."""

import json
import statistics

import pytest

import eval as evaluation
import models
import train
from data import DataError
from program.paper import report, results

ROWS = {
    "zero-shot": {"kind": "eval", "num_train": 0},
    "icl": {"kind": "eval", "num_train": 2},
    "mezo-lora": {
        "trainer": "zo",
        "mode": "lora",
        "batch_size": 4,
        "learning_rate": 1e-3,
        "zo_eps": 1e-3,
        "max_steps": 2,
        "eval_steps": 1,
    },
    "ft": {
        "trainer": "fo",
        "mode": "ft",
        "batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "eval_steps": 2,
    },
}
DATA = {"task": "SST2", "num_train": 16, "num_dev": 8, "num_eval": 8, "train_set_seed": 0}


def dev_points(plan, out, row):
    """A row's dev evaluations, one tuple per evaluation holding each seed's metrics line."""
    logs = [
        [
            json.loads(line)
            for line in open(results.folder_of(str(out), s, f) + "/metrics.jsonl")
            if "dev_loss" in line
        ]
        for r, _, s, f in plan
        if r == row
    ]
    return list(zip(*logs))


def in_process(calls):
    def launch(argv):
        calls.append(argv)
        return (train.main if argv[0] == "train.py" else evaluation.main)(argv[1:])

    return launch


def test_runner_runs_skips_and_writes_the_table(tmp_path):
    plan = results.runs(
        ROWS,
        seeds=(0, 1),
        model=models.TINY_OPT,
        data_dir=None,
        data_flags=DATA,
        train_flags={"max_length": 64, "eval_batch_size": 8, "logging_steps": 1},
    )
    assert [(row, seed, script) for row, seed, script, _ in plan] == [
        ("zero-shot", None, "eval.py"),
        ("icl", None, "eval.py"),
        ("mezo-lora", 0, "train.py"),
        ("mezo-lora", 1, "train.py"),
        ("ft", 0, "train.py"),
        ("ft", 1, "train.py"),
    ]
    calls = []
    walls = results.run_all(plan, str(tmp_path), in_process(calls))
    assert len(calls) == 6 and len(walls) == 6
    # all skipped
    assert results.run_all(plan, str(tmp_path), in_process(calls)) == walls and len(calls) == 6
    text = results.markdown(plan, str(tmp_path), walls)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:6]}
    assert list(rows) == ["Zero-shot", "ICL, 2 demonstrations", "MeZO (LoRA)", "FT"]

    def test_percent(row):
        return [
            100
            * json.load(open(results.folder_of(str(tmp_path), s, f) + "/results.json"))["test"][
                "accuracy"
            ]
            for r, _, s, f in plan
            if r == row
        ]

    for name, row in (("MeZO (LoRA)", "mezo-lora"), ("FT", "ft")):
        scores = test_percent(row)
        assert rows[name][1] == f"{statistics.fmean(scores):.1f} ± {statistics.stdev(scores):.1f}"
        assert rows[name][2] == "2"
    assert (
        rows["Zero-shot"][1] == f"{test_percent('zero-shot')[0]:.1f}"
        and rows["Zero-shot"][3] == "–"
    )
    assert rows["MeZO (LoRA)"][4] == "4 (2 per step)" and rows["FT"][4] == "2 + as many backward"
    assert "- MeZO (LoRA): `python train.py --task SST2" in text and "--seed 0" in text

    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Results\n\nprose\n\n{results.BEGIN}\nold\n{results.END}\n\nmore prose\n")
    results.write_between_markers(doc, text)
    results.write_between_markers(doc, text)
    assert (
        doc.read_text()
        == f"# Results\n\nprose\n\n{results.BEGIN}\n{text}\n{results.END}\n\nmore prose\n"
    )
    doc.write_text("no markers\n")
    with pytest.raises(DataError, match="expected one"):
        results.write_between_markers(doc, text)
    assert doc.read_text() == "no markers\n"


def test_a_failed_run_is_one_error_and_an_interrupted_evaluation_is_rerun(tmp_path):
    plan = results.runs(
        {"zero-shot": ROWS["zero-shot"]}, model=models.TINY_OPT, data_dir=None, data_flags=DATA
    )
    with pytest.raises(DataError, match=r"zero-shot run failed, rerun to resume it \("):
        results.run_all(plan, str(tmp_path), lambda argv: 2)
    (tmp_path / results.folder_of(str(tmp_path), *plan[0][2:])).mkdir(parents=True)
    launched = []  # an interrupted evaluation's folder is rerun over, not in the way
    results.run_all(plan, str(tmp_path), lambda argv: launched.append(argv) or 0)
    assert launched[0][0] == "eval.py" and launched[0][-1] == "--overwrite_output_dir"


def test_the_estimators_table_and_figure_follow_from_the_logged_dev_curves(tmp_path):
    pytest.importorskip("matplotlib")
    lora = {
        "trainer": "zo",
        "mode": "lora",
        "batch_size": 4,
        "learning_rate": 1e-2,
        "zo_eps": 1e-2,
        "max_steps": 3,
        "eval_steps": 1,
    }
    # 2 forward passes a step; FZOO with N = 2: 3, so dev points at 2, 4, 6 and 3, 6
    rows = {
        "mezo-lora": lora,
        "fzoo-lora": {**lora, "estimator": "fzoo", "fzoo_n": 2, "max_steps": 2},
    }
    plan = results.runs(
        rows,
        seeds=(0, 1),
        model=models.TINY_OPT,
        data_dir=None,
        data_flags=DATA,
        train_flags={"max_length": 64, "eval_batch_size": 8, "logging_steps": 1},
    )
    results.run_all(plan, str(tmp_path), in_process([]))
    figure = tmp_path / "fig" / "curves.png"
    text = results.side_by_side_markdown(plan, str(tmp_path), "estimators", str(figure))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def dev(row):  # [(forward passes, [dev accuracy per seed])]
        return [
            (points[0]["forward_passes"], [p["dev_accuracy"] for p in points])
            for points in dev_points(plan, tmp_path, row)
        ]

    assert [p for p, _ in dev("mezo-lora")] == [2, 4, 6] and [p for p, _ in dev("fzoo-lora")] == [
        3,
        6,
    ]
    target = max(statistics.fmean(a) for _, a in dev("mezo-lora"))  # the peak of MeZO's mean curve
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:4]}
    assert list(lines) == ["MeZO (LoRA)", "MeZO (LoRA), FZOO N=2"]
    assert report.label("mezo-lora-sparse0.75") == "MeZO (LoRA), Sparse-MeZO 0.75"
    reached = {}
    for row, key in zip(rows, lines):
        curve = dev(row)
        assert lines[key][1] == ", ".join(
            f"{p}: {100 * statistics.fmean(a):.1f} ± {100 * statistics.stdev(a):.1f}"
            for p, a in curve
        )
        reached[row] = next((p for p, a in curve if statistics.fmean(a) >= target), None)
        assert lines[key][-1] == "2 |"
    assert reached["mezo-lora"] is not None  # its own peak
    for row, key in zip(rows, lines):
        expected = (
            f"not within {dev(row)[-1][0]}"
            if reached[row] is None
            else f"{reached[row]} ({reached[row] / reached['mezo-lora']:.2f}x)"
        )
        assert lines[key][2] == expected
    assert "- fzoo-lora: `python train.py" in text and "--estimator fzoo" in text


def test_the_grid_runs_each_point_once_keeps_the_lowest_dev_loss_and_shares_the_tables_first_run(
    tmp_path,
):
    grid = {"mezo-lora": {"learning_rate": (1e-3, 3e-2)}, "ft": {"learning_rate": (1e-4, 1e-3)}}
    where = {
        "model": models.TINY_OPT,
        "data_dir": None,
        "data_flags": DATA,
        "train_flags": {"max_length": 64, "eval_batch_size": 8, "logging_steps": 1},
    }
    plan = results.grid_runs(grid, ROWS, **where)
    assert [(row, seed, f["learning_rate"]) for row, seed, _, f in plan] == [
        ("mezo-lora", 0, 1e-3),
        ("mezo-lora", 0, 3e-2),
        ("ft", 0, 1e-4),
        ("ft", 0, 1e-3),
    ]
    table_first = {
        results.folder_of(str(tmp_path), s, f)
        for row, seed, s, f in results.runs(ROWS, seeds=(0,), **where)
        if row in grid
    }
    grid_folders = [results.folder_of(str(tmp_path), s, f) for _, _, s, f in plan]
    assert table_first <= set(grid_folders)  # ROWS' own point is the row's seed-0 run: run once
    results.run_all(plan, str(tmp_path), in_process([]))
    text = results.grid_markdown(plan, str(tmp_path), ROWS, grid)
    lines = [line.split(" | ") for line in text.splitlines()[2:6]]
    dev = [json.load(open(f"{folder}/results.json"))["dev"] for folder in grid_folders]
    for cells, point, (_, _, _, flags) in zip(lines, dev, plan):
        assert cells[1] == f"{flags['learning_rate']:g}" and cells[4] == f"{point['loss']:.4f}"
        assert cells[5] == f"{100 * point['accuracy']:.1f}"
    for row, (a, b) in (("mezo-lora", (0, 1)), ("ft", (2, 3))):
        kept = a if dev[a]["loss"] <= dev[b]["loss"] else b
        assert [lines[i][-1] for i in (a, b)] == ["yes |" if i == kept else " |" for i in (a, b)]
        differs = plan[kept][3]["learning_rate"] != ROWS[row]["learning_rate"]
        assert (f"- {report.label(row)}: ROWS has" in text) == differs


def test_the_gpu_table_is_table_1_at_the_gpu_step_counts(tmp_path):
    # make results-gpu's plan: ROWS with each trainer's steps replaced, nothing else changed
    gpu = results.gpu_rows()
    for row, settings in results.ROWS.items():
        if settings.get("kind") == "eval":
            assert gpu[row] == settings
        else:
            steps = results.GPU_STEPS[settings["trainer"]]
            assert (gpu[row]["max_steps"], gpu[row]["eval_steps"]) == steps
            assert {k: v for k, v in gpu[row].items() if not k.endswith("_steps")} == {
                k: v for k, v in settings.items() if not k.endswith("_steps")
            }
    # the same path at a tiny size on CPU: the runs take the steps, the table goes in its block
    plan = results.runs(
        results.gpu_rows(ROWS, steps={"zo": (3, 1), "fo": (2, 2)}),
        seeds=(0,),
        model=models.TINY_OPT,
        data_dir=None,
        data_flags=DATA,
        train_flags={"max_length": 64, "eval_batch_size": 8, "logging_steps": 1},
    )
    walls = results.run_all(plan, str(tmp_path), in_process([]))
    for row, _, script, flags in plan:
        if script == "train.py":
            config = json.load(
                open(results.folder_of(str(tmp_path), script, flags) + "/config.json")
            )
            assert config["max_steps"] == (3 if row == "mezo-lora" else 2)
    text = results.markdown(plan, str(tmp_path), walls)
    doc = tmp_path / "RESULTS.md"
    doc.write_text(
        f"{results.BEGIN}\nTable 1\n{results.END}\n{results.GPU_BEGIN}\n{results.GPU_END}\n"
    )
    results.write_between_markers(doc, text, results.GPU_BEGIN, results.GPU_END)
    assert doc.read_text() == (
        f"{results.BEGIN}\nTable 1\n{results.END}\n{results.GPU_BEGIN}\n{text}\n{results.GPU_END}\n"
    )
    assert "| MeZO (LoRA) |" in text and "--max_steps 3" in text


def test_the_tables_are_run_one_at_a_time(capsys):
    assert results.main(["--gpu", "--grid", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grid, --gpu are 2 tables, run one at a time") and (
        err.count("\n") == 1
    )


def test_results_md_has_one_block_per_table():
    for begin, end in [
        (results.BEGIN, results.END),
        (results.GRID_BEGIN, results.GRID_END),
        (results.ESTIMATORS_BEGIN, results.ESTIMATORS_END),
        (results.GPU_BEGIN, results.GPU_END),
        (results.DIRECTIONS_BEGIN, results.DIRECTIONS_END),
    ]:
        results.marked_text(results.ROOT + "/RESULTS.md", begin, end)  # raises otherwise


def test_the_directions_table_reads_rows_at_equal_steps_and_forward_passes(tmp_path):
    pytest.importorskip("matplotlib")
    lora = {
        "trainer": "zo",
        "mode": "lora",
        "batch_size": 4,
        "learning_rate": 1e-2,
        "zo_eps": 1e-2,
        "max_steps": 3,
        "eval_steps": 1,
    }
    rows = {"mezo-lora": lora, "mezo-lora-nspsa2": {**lora, "n_spsa": 2}}
    plan = results.runs(
        rows,
        seeds=(0, 1),
        model=models.TINY_OPT,
        data_dir=None,
        data_flags=DATA,
        train_flags={"max_length": 64, "eval_batch_size": 8, "logging_steps": 1},
    )
    results.run_all(plan, str(tmp_path), in_process([]))
    figure = tmp_path / "directions.png"
    text = results.side_by_side_markdown(plan, str(tmp_path), "directions", str(figure))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def dev_losses(row):  # [(step, forward passes, mean dev loss over seeds)]
        return [
            (p[0]["step"], p[0]["forward_passes"], statistics.fmean(x["dev_loss"] for x in p))
            for p in dev_points(plan, tmp_path, row)
        ]

    one, two = dev_losses("mezo-lora"), dev_losses("mezo-lora-nspsa2")
    assert [p for _, p, _ in one] == [2, 4, 6] and [p for _, p, _ in two] == [4, 8, 12]
    target = min(loss for *_, loss in one)
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:4]}
    assert list(lines) == ["MeZO (LoRA)", "MeZO (LoRA), n-SPSA N=2"]
    assert f"lowest mean dev loss ({target:.4f})" in text
    first = {}
    for key, curve in zip(lines, (one, two)):
        assert lines[key][1] == ", ".join(f"{s}: {loss:.4f}" for s, _, loss in curve)
        first[key] = next(((s, p) for s, p, loss in curve if loss <= target), None)
    assert first["MeZO (LoRA)"] is not None  # its own lowest point
    base_s, base_p = first["MeZO (LoRA)"]
    for key in lines:
        if first[key] is None:
            assert lines[key][2] == lines[key][3] == "not within 3 steps"
        else:
            s, p = first[key]
            assert lines[key][2] == f"{s} ({s / base_s:.2f}x)"
            assert lines[key][3] == f"{p} ({p / base_p:.2f}x)"
        assert lines[key][-1] == "2 |"
    assert "--n_spsa 2" in text
