"""The report on fake run folders in the format train.py and eval.py write (README "Usage").

Expected cells are worked out by hand from the fake results and the paper's tables
(Tables 1, 18, 22 of the paper); RoBERTa mean/std use numpy, as tools/gather_result.py does.
"""

import csv
import json

import numpy as np
import pytest

import eval as evaluation
from data import DataError
from program.paper import report
from program.paper.runs import Run, load_finished, read_metrics

GB = 2**30


def make_run(root, name, config, dev=None, test=None, memory=None, metrics=(), finished=True):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if finished:
        results = {
            "dev": dev or {},
            "test": test or {},
            "peak_memory_bytes": memory,
            "time_per_step_s": 0.5,
            "device": "cuda:0",
            "num_params": 12_850_000_000,
            "trainable_params": 1,
        }
        (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def opt(task, **flags):
    return {
        "family": "opt",
        "kind": "train",
        "task": task,
        "model": "facebook/opt-13b",
        "trainer": "zo",
        "mode": "ft",
        "optimizer": "sgd",
        "train_set_seed": 0,
        "select_by": None,
        **flags,
    }


def roberta(task, k, seed, lr, **flags):
    return {
        "family": "roberta",
        "kind": "train",
        "task": task,
        "model": "roberta-large",
        "trainer": "zo",
        "mode": "ft",
        "k": k,
        "train_set_seed": seed,
        "seed": seed,
        "learning_rate": lr,
        "select_by": "accuracy",
        **flags,
    }


CURVE = [
    {"step": 10, "loss": 0.9, "lr": 1e-6, "steps_per_s": 2.0, "peak_memory_bytes": 1},
    {"step": 20, "loss": 0.7, "lr": 1e-6, "steps_per_s": 2.0, "peak_memory_bytes": 1},
    {"step": 20, "dev_loss": 0.75, "dev_accuracy": 0.6},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # OPT-13B, SST-2 MeZO grid: the lower dev loss wins although its test accuracy is lower.
    make_run(
        root,
        "sst2-mezo-lr1e-6",
        opt("SST2", learning_rate=1e-6),
        dev={"loss": 0.30, "accuracy": 0.93},
        test={"accuracy": 0.905},
        memory=26 * GB,
        metrics=CURVE,
    )
    make_run(
        root,
        "sst2-mezo-lr1e-7",
        opt("SST2", learning_rate=1e-7),
        dev={"loss": 0.25, "accuracy": 0.90},
        test={"accuracy": 0.880},
        memory=25 * GB,
        metrics=CURVE,
    )
    make_run(
        root,
        "sst2-zero-shot",
        opt("SST2", kind="eval", num_train=0, trainer=None, mode=None),
        test={"accuracy": 0.571},
        memory=24 * GB,
    )
    make_run(
        root,
        "sst2-icl",
        opt("SST2", kind="eval", num_train=32, trainer=None, mode=None),
        test={"accuracy": 0.850},
        memory=28 * GB,
    )
    make_run(
        root, "rte-prefix", opt("RTE", mode="prefix"), dev={"loss": 0.5}, test={"accuracy": 0.70}
    )
    make_run(
        root,
        "squad-lora",
        opt("SQuAD", mode="lora"),
        dev={"loss": 1.0},
        test={"f1": 0.80, "em": 0.70},
    )
    make_run(
        root,
        "copa-ft",
        opt("Copa", trainer="fo", optimizer="adamw"),
        dev={"loss": 0.4},
        test={"accuracy": 0.78},
        memory=300 * GB,
    )
    # select_by in the config overrides the OPT rule: the higher dev accuracy wins here.
    make_run(
        root,
        "wic-a",
        opt("WIC", select_by="accuracy", learning_rate=1e-6),
        dev={"loss": 0.2, "accuracy": 0.60},
        test={"accuracy": 0.55},
    )
    make_run(
        root,
        "wic-b",
        opt("WIC", select_by="accuracy", learning_rate=1e-7),
        dev={"loss": 0.3, "accuracy": 0.70},
        test={"accuracy": 0.62},
    )
    make_run(root, "boolq-running", opt("BoolQ"), finished=False, metrics=CURVE[:1])
    # A saved model inside a run folder has its own config.json; it is not a run.
    (root / "rte-prefix" / "checkpoint").mkdir()
    (root / "rte-prefix" / "checkpoint" / "config.json").write_text('{"model_type": "opt"}')
    # RoBERTa-large k=16 SST-2 MeZO: 2 seeds x 2 learning rates; best dev accuracy per seed.
    for seed, lr, dev_acc, test_acc in [
        (13, 1e-6, 0.80, 0.90),
        (13, 1e-7, 0.85, 0.88),
        (21, 1e-6, 0.90, 0.91),
        (21, 1e-7, 0.70, 0.95),
    ]:
        make_run(
            root,
            f"rb-sst2-{seed}-{lr:g}",
            roberta("SST-2", 16, seed, lr),
            dev={"loss": 0.1, "accuracy": dev_acc},
            test={"accuracy": test_acc},
            memory=3 * GB,
        )
    make_run(
        root,
        "rb-trec-512",
        roberta("trec", 512, 13, 1e-5, trainer="fo", optimizer="adamw"),
        dev={"accuracy": 0.9},
        test={"accuracy": 0.97},
        memory=8 * GB,
    )
    return root


def md_tables(markdown):
    """{section title: {row label: {column: cell}}} for every Markdown table."""
    tables, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):  # the header's underline
                continue
            if header is None:
                header = cells
            else:
                tables.setdefault(title, {})[cells[0]] = dict(zip(header[1:], cells[1:]))
    return tables


def section(tables, prefix):
    [key] = [t for t in tables if t.startswith(prefix)]
    return tables[key]


def test_opt_table_keeps_the_lowest_dev_loss(runs, tmp_path):
    markdown = report.render([runs], tmp_path)
    table = section(md_tables(markdown), "OPT-13B")
    assert table["MeZO"]["SST-2"] == "88.0 (91.4)"  # dev loss 0.25 beats 0.30 (test 90.5)
    assert table["Zero-shot"]["SST-2"] == "57.1 (58.8)"
    assert table["ICL"]["SST-2"] == "85.0 (87.0)"
    assert table["MeZO (prefix)"]["RTE"] == "70.0 (70.8)"
    assert table["MeZO (LoRA)"]["SQuAD"] == "80.0 (83.8)"  # F1 for SQuAD
    assert table["FT"]["COPA"] == "78.0 (79.0)"
    assert table["MeZO"]["WIC"] == "62.0 (61.1)"  # select_by accuracy from the config
    assert table["MeZO"]["RTE"] == "– (66.1)"
    # paper order
    assert list(table) == ["Zero-shot", "ICL", "MeZO", "MeZO (LoRA)", "MeZO (prefix)", "FT"]
    # the paper's column order
    assert list(table["MeZO"]) == ["SST-2", "RTE", "WIC", "COPA", "SQuAD"]

    with open(tmp_path / "report_opt.csv") as f:
        rows = {(r["task"], r["method"]): r for r in csv.DictReader(f)}
    assert rows[("sst2", "mezo")]["selected"].endswith("sst2-mezo-lr1e-7")
    assert rows[("sst2", "mezo")]["n_runs"] == "2"
    assert float(rows[("sst2", "mezo")]["ours"]) == pytest.approx(88.0)
    assert float(rows[("sst2", "mezo")]["paper"]) == 91.4
    assert (tmp_path / "report.md").read_text() == markdown


def test_roberta_mean_std_over_seeds(runs, tmp_path):
    markdown = report.render([runs], tmp_path)
    best = [88.0, 91.0]  # seed 13: dev 0.85 -> test 88; seed 21: dev 0.90 -> test 91
    mean, std = np.mean(best), np.std(best)
    table = section(md_tables(markdown), "RoBERTa-large, k=16")
    assert table["MeZO"]["SST-2"] == f"{mean:.1f}±{std:.1f} n=2 (90.5±1.2)"
    assert (
        section(md_tables(markdown), "RoBERTa-large, k=512")["FT"]["TREC"]
        == "97.0±0.0 n=1 (97.3±0.2)"
    )
    with open(tmp_path / "report_roberta.csv") as f:
        [row] = [r for r in csv.DictReader(f) if r["task"] == "sst2"]
    assert float(row["ours_mean"]) == pytest.approx(mean)
    assert float(row["ours_std"]) == pytest.approx(std)
    assert (row["n_seeds"], row["n_runs"], row["paper_mean"], row["paper_std"]) == (
        "2",
        "4",
        "90.5",
        "1.2",
    )


def test_memory_table(runs):
    table = section(md_tables(report.render([runs])), "Peak memory")
    assert table["OPT-13B"]["Zero-shot"] == "24.0 (26)"
    assert table["OPT-13B"]["MeZO"] == "26.0 (26)"  # the larger of the grid's peaks
    assert table["OPT-13B"]["ICL"] == "28.0 (29)"
    assert table["OPT-13B"]["FT"] == "300.0 (316, 4 GPUs)"
    assert table["RoBERTa-large"]["MeZO"] == "3.0"  # no paper figure for RoBERTa


def test_unfinished_and_nested_folders(runs):
    markdown = report.render([runs])
    assert f"- unfinished (no results.json): {runs / 'boolq-running'}" in markdown
    assert "checkpoint" not in markdown
    assert "15 runs, 14 finished" in markdown


def test_report_main_and_plots(runs, tmp_path, capsys):
    assert evaluation.report_main([str(runs), "--out", str(tmp_path), "--plot"]) == 0
    assert "| MeZO |" in capsys.readouterr().out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["loss_opt_boolq.png", "loss_opt_sst2.png", "memory.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in tmp_path.glob("report*")} == {
        "report.md",
        "report_opt.csv",
        "report_roberta.csv",
        "report_memory.csv",
    }


def test_bad_input_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert evaluation.report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: missing config.json ({tmp_path / 'empty'})\n"
    make_run(tmp_path, "broken", {"family": "opt"}, finished=False)
    assert evaluation.report_main([str(tmp_path / "broken")]) == 2
    assert capsys.readouterr().err.startswith("error: config.json without 'task' (")


def test_plot_without_matplotlib_says_how_to_install(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import fails
    out = tmp_path / "out"
    assert evaluation.report_main([str(runs), "--out", str(out), "--plot"]) == 2
    assert "pip install .[plot]" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


def test_runs_without_dev_result_are_ranked_last_and_noted(tmp_path):
    make_run(tmp_path, "cb-a", opt("CB"), dev={}, test={"accuracy": 0.90})
    make_run(tmp_path, "cb-b", opt("CB"), dev={"loss": 0.9}, test={"accuracy": 0.60})
    markdown = report.render([tmp_path])
    assert section(md_tables(markdown), "OPT-13B")["MeZO"]["CB"] == "60.0 (67.9)"
    assert f"1 of 2 runs without a dev loss ranked last: {tmp_path / 'cb-a'}" in markdown


def test_metrics_lines(tmp_path):
    run = Run(make_run(tmp_path, "r", opt("CB"), finished=False), {}, None)
    # being written
    (run.path / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "lo')
    assert read_metrics(run) == [{"step": 10, "loss": 1.0}]
    (run.path / "metrics.jsonl").write_text('{"step": 10, "lo\n{"step": 20, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"bad JSON line \(.*metrics.jsonl:1\)"):
        read_metrics(run)


def _demo_runs(root):
    """A zero-shot run and a MeZO-LoRA run as `make demo` writes them (train.py folders)."""
    small = {
        "model": ".cache/smollm2-135m-instruct",
        "data_dir": ".cache/rotten-tomatoes",
        "mode": "lora",
    }
    zero = make_run(
        root,
        "zero-shot",
        opt("SST2", **small, learning_rate=0),
        memory=300 * 2**20,
        metrics=[{"step": 1, "dev_loss": 0.98}],
    )
    mezo = make_run(root, "mezo", opt("SST2", **small), memory=301 * 2**20, metrics=CURVE)
    for folder, dev, test, best in (
        (zero, {"loss": 0.98, "accuracy": 0.52}, 0.5, 1),
        (mezo, {"loss": 0.75, "accuracy": 0.6}, 0.6, 20),
    ):
        results = json.loads((folder / "results.json").read_text())
        results.update(dev=dev, test={"accuracy": test}, num_test=500, best_step=best)
        (folder / "results.json").write_text(json.dumps(results))
    return zero, mezo


def test_compare_table_gain_in_standard_errors_and_curves(tmp_path, capsys):
    zero, mezo = _demo_runs(tmp_path)
    png = tmp_path / "figs" / "curves.png"
    assert evaluation.main(["compare", str(zero), str(mezo), "--plot", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == (
        "| zero-shot | MeZO (LoRA) (lr 0: the base model) | 0.9800 (step 1) | 0.9800 (step 1) "
        "| 0.5200 | accuracy 0.5000 | 300 | 0.50 |"
    )
    assert out[3] == (
        "| mezo | MeZO (LoRA) | 0.7500 (step 20) | 0.7500 (step 20) "
        "| 0.6000 | accuracy 0.6000 | 301 | 0.50 |"
    )
    # 0.1 gain; the larger SE is at p = 0.5: sqrt(0.25 / 500) = 0.02236, 0.1 / 0.02236 = 4.47
    assert out[5] == (
        "Test accuracy 0.5000 -> 0.6000 on 500 held-out rows: +0.1000, "
        "+4.5 binomial standard errors (sqrt(p(1-p)/n) = 0.0224, the larger of the two)."
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out[-1] == f"curves: {png}"
    from program.paper import plots

    fig = plots.run_curves(plots.figure_class(), *load_finished([mezo, zero]))
    loss_ax, acc_ax = fig.axes
    assert (
        fig._suptitle.get_text() == "smollm2-135m-instruct: MeZO (LoRA) on SST-2 (rotten-tomatoes)"
    )
    assert [line.get_label() for line in loss_ax.lines] == [
        "training loss (mean per logging window)",
        "dev loss",
        "zero-shot dev loss: 0.980",
    ]
    assert [line.get_label() for line in acc_ax.lines] == [
        "dev accuracy",
        "test accuracy of the selected model: 0.600",
        "zero-shot dev accuracy: 0.520",
        "zero-shot test accuracy: 0.500",
    ]
    assert list(acc_ax.lines[0].get_xydata()[0]) == [20, 0.6]


def test_compare_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch):
    zero, mezo = _demo_runs(tmp_path)
    (tmp_path / "plain").mkdir()
    assert evaluation.main(["compare", str(zero), str(tmp_path / "plain")]) == 2
    assert capsys.readouterr().err == (
        "error: not a finished training run: no config.json and results.json "
        f"({tmp_path / 'plain'})\n"
    )
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    assert (
        evaluation.main(["compare", str(zero), str(mezo), "--plot", str(tmp_path / "c.png")]) == 2
    )
    assert "pip install .[plot]" in capsys.readouterr().err and not (tmp_path / "c.png").exists()
