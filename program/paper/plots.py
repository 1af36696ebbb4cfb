"""The plots of runs: training-loss curves per family and task (dev loss as markers), peak memory
beside the paper's Table 22 (`eval.py report --plot`), and one run's curves against a baseline
(`eval.py compare --plot`, `make demo`), estimators against forward passes (`make
results-estimators`). matplotlib is optional and imported only here, only when asked."""

import math
from pathlib import Path

from data import DataError
from program.paper.report import group_by, label, memory_records, save
from program.paper.runs import load_runs, read_metrics
from program.paper.tables import dev_curve


def figure_class():
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        raise DataError("plotting needs matplotlib: pip install .[plot] (--plot)") from None
    return Figure


def figures(figure, runs):
    """{png name: Figure}: loss curves per family and task (dev loss as markers), memory bars."""
    curves = {run.path: read_metrics(run) for run in runs}  # every file checked before drawing
    out = {}
    for (family, task), cell in group_by(runs, lambda r: (r.family, r.task)).items():
        fig = figure(figsize=(8, 5))
        ax = fig.add_subplot()
        for run in cell:
            points = {
                kind: [
                    (m["step"], m[kind])
                    for m in curves[run.path]
                    if None not in (m.get("step"), m.get(kind))
                ]
                for kind in ("loss", "dev_loss")
            }
            if points["loss"] or points["dev_loss"]:
                name = run.path.name + ("" if run.results is not None else " (unfinished)")
                steps, losses = zip(*points["loss"]) if points["loss"] else ((), ())
                (line,) = ax.plot(steps, losses, label=name)
                if points["dev_loss"]:
                    ax.plot(*zip(*points["dev_loss"]), "o", color=line.get_color(), markersize=5)
        if ax.lines:
            ax.set(
                xlabel="step", ylabel="loss (markers: dev loss)", title=f"{family} {label(task)}"
            )
            ax.legend(fontsize="small")
            out[f"loss_{family}_{task}.png"] = fig
    memory = memory_records([r for r in runs if r.results is not None])
    if memory:
        fig = figure(figsize=(8, 1 + 0.5 * len(memory)))
        ax = fig.add_subplot()
        rows = range(len(memory))
        ax.barh([i + 0.2 for i in rows], [r["ours_gb"] for r in memory], 0.4, label="ours")
        ax.barh(
            [i - 0.2 for i in rows],
            [r["paper_gb"] or 0 for r in memory],
            0.4,
            label="paper (Table 22)",
        )
        ax.set_yticks(rows, [f"{r['model']} {label(r['method'])}" for r in memory])
        ax.set(xlabel="peak memory (GB)")
        ax.legend()
        fig.tight_layout()
        out["memory.png"] = fig
    return out


def plot(run_dirs, out_dir):
    """Write the PNG loss curves and memory bars into out_dir; returns the paths written."""
    return save(out_dir, {}, figures(figure_class(), load_runs(run_dirs)))


def _points(metrics, key):
    return [
        (m["step"], m[key])
        for m in metrics
        if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]) and "step" in m
    ]


def title_of(run):
    """'<model>: <method> on <task> (<data folder>)', from the run's config."""
    data_dir = run.config.get("data_dir")
    where = f" ({Path(data_dir).name})" if data_dir else " (bundled sample)"
    model = Path(str(run.config.get("model", "?"))).name
    return f"{model}: {label(run.method)} on {label(run.task)}{where}"


def run_curves(figure, run, baseline=None, title=None):
    """One run against the step: training loss and dev loss (top), dev accuracy (bottom), the
    selected model's test accuracy; the baseline run's dev loss, dev and test accuracy as lines."""
    metrics = read_metrics(run)
    train, dev_loss, dev_accuracy = (
        _points(metrics, k) for k in ("loss", "dev_loss", "dev_accuracy")
    )
    if not train and not dev_loss:
        raise DataError(f"no losses logged ({run.path / 'metrics.jsonl'})")
    fig = figure(figsize=(8, 6.5))
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    if train:
        loss_ax.plot(*zip(*train), alpha=0.7, label="training loss (mean per logging window)")
    if dev_loss:
        loss_ax.plot(*zip(*dev_loss), "o-", label="dev loss")
    if dev_accuracy:
        acc_ax.plot(*zip(*dev_accuracy), "o-", color="C1", label="dev accuracy")
    test = (run.results or {}).get("test", {}).get("accuracy")
    if test is not None:
        acc_ax.plot(
            [run.results["best_step"]],
            [test],
            "*",
            color="C3",
            markersize=12,
            label=f"test accuracy of the selected model: {test:.3f}",
        )
    base = baseline.results if baseline is not None and baseline.results else {}
    name = baseline.path.name if baseline is not None else ""
    for ax, value, what, style in (
        (loss_ax, base.get("dev", {}).get("loss"), "dev loss", "--"),
        (acc_ax, base.get("dev", {}).get("accuracy"), "dev accuracy", "--"),
        (acc_ax, base.get("test", {}).get("accuracy"), "test accuracy", ":"),
    ):
        if value is not None:
            ax.axhline(value, color="gray", linestyle=style, label=f"{name} {what}: {value:.3f}")
    fig.suptitle(title or title_of(run), fontsize=11)
    loss_ax.set(ylabel="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def forward_pass_curves(figure, rows, title):
    """{row: [runs over seeds]} -> dev accuracy (mean, ± std band) and dev loss against training
    forward passes, a line per row (tables.dev_curve)."""
    fig = figure(figsize=(8, 6.5))
    acc_ax, loss_ax = fig.subplots(2, 1, sharex=True)
    for row, curve in dev_curve(rows).items():
        passes, acc, std, loss, _ = zip(*curve)  # NaN where every seed diverged: a gap
        name = f"{label(rows[row][0].method)} ({len(rows[row])} seeds)"
        (line,) = acc_ax.plot(passes, acc, "o-", label=name)
        acc_ax.fill_between(
            passes,
            [a - s for a, s in zip(acc, std)],
            [a + s for a, s in zip(acc, std)],
            color=line.get_color(),
            alpha=0.15,
        )
        loss_ax.plot(passes, loss, "o-", color=line.get_color(), label=name)
    acc_ax.set(ylabel="dev accuracy (mean ± std)")
    loss_ax.set(xlabel="training forward passes", ylabel="dev loss (mean)")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
