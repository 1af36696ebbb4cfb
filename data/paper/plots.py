"""The report's plots: training-loss curves per family and task (dev loss as markers) and peak
memory beside the paper's Table 22. matplotlib is optional and imported only here, only when asked."""
from data import DataError
from data.paper.report import group_by, label, load_runs, memory_records, read_metrics, save


def figure_class():
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        raise DataError("plotting needs matplotlib: pip install .[plot] (report --plot)") from None
    return Figure


def figures(figure, runs):
    """{png name: Figure}: loss curves per family and task (dev loss as markers), memory bars."""
    curves = {run.path: read_metrics(run) for run in runs}  # every file checked before drawing
    out = {}
    for (family, task), cell in group_by(runs, lambda r: (r.family, r.task)).items():
        fig = figure(figsize=(8, 5))
        ax = fig.add_subplot()
        for run in cell:
            points = {kind: [(m["step"], m[kind]) for m in curves[run.path]
                             if None not in (m.get("step"), m.get(kind))] for kind in ("loss", "dev_loss")}
            if points["loss"] or points["dev_loss"]:
                name = run.path.name + ("" if run.results is not None else " (unfinished)")
                steps, losses = zip(*points["loss"]) if points["loss"] else ((), ())
                line, = ax.plot(steps, losses, label=name)
                if points["dev_loss"]:
                    ax.plot(*zip(*points["dev_loss"]), "o", color=line.get_color(), markersize=5)
        if ax.lines:
            ax.set(xlabel="step", ylabel="loss (markers: dev loss)", title=f"{family} {label(task)}")
            ax.legend(fontsize="small")
            out[f"loss_{family}_{task}.png"] = fig
    memory = memory_records([r for r in runs if r.results is not None])
    if memory:
        fig = figure(figsize=(8, 1 + 0.5 * len(memory)))
        ax = fig.add_subplot()
        rows = range(len(memory))
        ax.barh([i + 0.2 for i in rows], [r["ours_gb"] for r in memory], 0.4, label="ours")
        ax.barh([i - 0.2 for i in rows], [r["paper_gb"] or 0 for r in memory], 0.4, label="paper (Table 22)")
        ax.set_yticks(rows, [f"{r['model']} {label(r['method'])}" for r in memory])
        ax.set(xlabel="peak memory (GB)")
        ax.legend()
        fig.tight_layout()
        out["memory.png"] = fig
    return out


def plot(run_dirs, out_dir):
    """Write the PNG loss curves and memory bars into out_dir; returns the paths written."""
    return save(out_dir, {}, figures(figure_class(), load_runs(run_dirs)))
