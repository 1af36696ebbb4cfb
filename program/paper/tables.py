"""The tables of `make results` (program/paper/results.py) in RESULTS.md: Table 1's rows over
seeds, the grid on dev behind them, and rows side by side against training forward passes
(the estimators, the directions per step), from run folders (program/paper/runs.py).
"""

import math
import statistics

from data import DataError
from program.paper import seeds
from program.paper.report import label, loss_cell, number_cell, select_best, test_percent
from program.paper.runs import read_metrics
from zo import methods


def _minutes(seconds):
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def _test_over_seeds(runs):
    """A row's test cell; a seed that diverged (seeds.diverged) is left out and marked."""
    return seeds.over_seeds([None if seeds.diverged(r.results) else test_percent(r) for r in runs])


def seeds_markdown(rows):
    """{row: [(run, wall seconds or None)]} -> one line per row (`make results`, RESULTS.md): test
    accuracy mean ± std over the row's runs (sample std, n - 1), steps (max and selected), forward
    passes of training, wall time per run and in all, peak memory (the largest of the row's
    runs)."""
    lines = [
        "| method | test accuracy (%) | runs | steps (selected) | training forward passes | "
        "wall time per run (all) | peak memory (GB) |",
        "|---" * 7 + "|",
    ]
    for row, cell in rows.items():
        runs = [run for run, _ in cell]
        config = runs[0].config
        name = label(runs[0].method) + (
            f", {config['num_train']} demonstrations" if runs[0].method == "icl" else ""
        )
        if config.get("kind") == "eval":
            steps = passes = "–"
        else:
            best = ", ".join(str(r.results.get("best_step")) for r in runs)
            steps = f"{config['max_steps']} ({best})"
            per_step = methods.forwards_per_step(config)
            passes = (
                f"{per_step * config['max_steps']} ({per_step} per step)"
                if config.get("trainer") == "zo"
                else f"{config['max_steps']} + as many backward"
            )
        walls = [wall for _, wall in cell]
        known = [w for w in walls if w is not None]
        wall = (
            "–"
            if not known
            else (
                f"{_minutes(statistics.fmean(known))} ({_minutes(sum(known))}"
                + ("" if len(known) == len(walls) else f", {len(known)} of {len(walls)} timed")
                + ")"
            )
        )
        memory = max((r.results.get("peak_memory_bytes") or 0 for r in runs), default=0)
        lines.append(
            f"| {name} | {_test_over_seeds(runs)} | {len(runs)} | {steps} | {passes} | "
            f"{wall} | {number_cell(memory or None, '{:.2f}', 2**-30)} |"
        )
    return seeds.with_note(lines)


def grid_markdown(rows):
    """{row: [run, one per grid point]} -> the grid on dev (`make results-grid`, RESULTS.md): per
    point its learning rate, eps, steps (selected), and the dev loss and accuracy of its selected
    model; per row the
    point kept, the lowest dev loss (select_best's OPT rule, the paper's)."""
    lines = [
        "| method | learning rate | eps | steps (selected) | dev loss | dev accuracy (%) | kept |",
        "|---" * 7 + "|",
    ]
    for row, runs in rows.items():
        best = select_best(runs, "loss", [])
        for run in runs:
            config, dev = run.config, run.results.get("dev") or {}
            eps = "–" if config.get("trainer") == "fo" else f"{config['zo_eps']:g}"
            lines.append(
                f"| {label(run.method)} | {config['learning_rate']:g} | {eps} | "
                f"{config['max_steps']} ({run.results.get('best_step')}) | "
                f"{loss_cell(dev.get('loss'))} | "
                f"{number_cell(dev.get('accuracy'), '{:.1f}', 100)} | "
                f"{'yes' if run is best else ''} |"
            )
    return "\n".join(lines)


def dev_curve(rows):
    """{row: [runs, one per seed, one evaluation schedule]} -> {row: [(forward passes, mean dev
    accuracy, its sample std, mean dev loss, seeds diverged)]}: the rows' dev evaluations against
    training
    forward passes. A seed whose dev loss or accuracy is not finite there is left out (seeds.py)."""
    out = {}
    for row, runs in rows.items():
        per_run = [[m for m in read_metrics(run) if "dev_loss" in m] for run in runs]
        if (
            not per_run[0]
            or len({tuple(m.get("forward_passes") for m in dev) for dev in per_run}) != 1
        ):
            raise DataError(
                f"the {row} runs do not share one evaluation schedule in forward passes "
                f"({runs[0].path / 'metrics.jsonl'})"
            )
        out[row] = []
        for points in zip(*per_run):
            kept = [
                p
                for p in points
                if seeds.finite(p.get("dev_loss")) and seeds.finite(p.get("dev_accuracy"))
            ]
            accuracy, std, _, _ = seeds.stats([p["dev_accuracy"] for p in kept])
            loss, diverged = seeds.stats([p["dev_loss"] for p in kept])[0], len(points) - len(kept)
            out[row].append((points[0]["forward_passes"], accuracy, std, loss, diverged))
    return out


def estimators_markdown(rows, baseline):
    """The estimators side by side against forward passes (`make results-estimators`, RESULTS.md):
    per row its dev accuracy at each evaluation (mean ± std over seeds), the forward passes its
    mean first reaches the baseline row's best mean dev accuracy at (the peak of its curve, not
    its last point: a seed that diverges late would lower that), as a ratio to the baseline's
    own, and the test accuracy
    of the selected models (mean ± std), all within one forward-pass budget."""
    curves = dev_curve(rows)
    target = max((acc for _, acc, *_ in curves[baseline] if not math.isnan(acc)), default=math.nan)
    reached = {
        row: next((passes for passes, acc, *_ in curve if acc >= target), None)
        for row, curve in curves.items()
    }
    lines = [
        "| method | dev accuracy (%) at forward passes | forward passes to the "
        f"{label(rows[baseline][0].method)} best mean dev accuracy ({100 * target:.1f}%), ratio "
        "| test accuracy (%) | runs |",
        "|---" * 5 + "|",
    ]
    for row, runs in rows.items():
        curve = ", ".join(
            f"{passes}: {seeds.cell(100 * acc, 100 * std, diverged, True)}"
            for passes, acc, std, _, diverged in curves[row]
        )
        if reached[row] is None:
            to_target = f"not within {curves[row][-1][0]}"
        else:
            to_target = f"{reached[row]} ({reached[row] / reached[baseline]:.2f}x)"
        lines.append(
            f"| {label(runs[0].method)} | {curve} | {to_target} | "
            f"{_test_over_seeds(runs)} | {len(runs)} |"
        )
    return seeds.with_note(lines)


def directions_markdown(rows, baseline):
    """Directions per step side by side (`make results-directions`, RESULTS.md), every row at the
    same steps: per row its mean dev loss at each evaluation step, the steps and the forward passes
    at which its mean dev loss first reaches the baseline row's lowest mean dev loss (ratios to the
    baseline's own), and the test accuracy of the selected models (mean ± std)."""
    curves = dev_curve(rows)
    target = min(
        (loss for *_, loss, _ in curves[baseline] if not math.isnan(loss)), default=math.nan
    )
    lines = [
        "| method | dev loss at steps | steps to the "
        f"{label(rows[baseline][0].method)} lowest mean dev loss ({target:.4f}), ratio | "
        "forward passes to it, ratio | test accuracy (%) | runs |",
        "|---" * 6 + "|",
    ]
    points = {  # (step, forward passes, mean dev loss) of each evaluation
        row: [
            (passes // methods.forwards_per_step(runs[0].config), passes, loss)
            for passes, _, _, loss, _ in curves[row]
        ]
        for row, runs in rows.items()
    }
    reached = {
        row: next(((s, p) for s, p, loss in curve if loss <= target), None)
        for row, curve in points.items()
    }
    for row, runs in rows.items():
        if reached[row] is None:
            steps = passes = f"not within {points[row][-1][0]} steps"
        else:
            (s, p), (base_s, base_p) = reached[row], reached[baseline]
            steps, passes = f"{s} ({s / base_s:.2f}x)", f"{p} ({p / base_p:.2f}x)"
        curve = ", ".join(f"{s}: {loss_cell(loss)}" for s, _, loss in points[row])
        lines.append(
            f"| {label(runs[0].method)} | {curve} | {steps} | {passes} | "
            f"{_test_over_seeds(runs)} | {len(runs)} |"
        )
    return seeds.with_note(lines)
