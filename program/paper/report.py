"""Paper-style tables from run folders: OPT (Table 1), RoBERTa (Table 18), memory (Table 22).

Every cell reads "ours (paper)"; run folders are read by program/paper/runs.py. Runs that fall into
one cell (a grid) are reduced as the original does:
- OPT: the run with the lowest dev loss (HF `load_best_model_at_end`'s default metric), test
  score of that run; a run's `select_by` ("loss" | "accuracy") overrides the rule.
- RoBERTa: per data seed the run with the highest dev accuracy, then mean (std) of the test
  accuracy over seeds (`medium_models/tools/gather_result.py`; numpy's population std).
Ties go to the first run in path order, as in gather_result.py.

    python eval.py report RUN_DIR... [--out DIR] [--plot]     (plots: program/paper/plots.py)

Also the table of `eval.py compare` (runs side by side, `make demo`); those of `make results`
(rows over seeds, RESULTS.md) are program/paper/tables.py's.
"""

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

from data import DataError
from data.files import atomic_path, atomic_write, check_writes
from program.paper import numbers as paper
from program.paper import seeds
from program.paper.runs import OPT_SIZES, SELECT_BY, files_read, load_runs, read_metrics
from zo import methods

_METHOD_ORDER = list(paper.METHOD_LABELS)


# --- selection ------------------------------------------------------------------------------
def _score(metrics):
    """The headline metric of a results block: F1 (SQuAD, DROP), else accuracy, else EM."""
    for key in ("f1", "accuracy", "em"):
        if metrics.get(key) is not None:
            return metrics[key]
    return None


def _dev_value(run, select_by):
    """None when missing or not finite (null in strict JSON, NaN in an older file)."""
    dev = run.results.get("dev") or {}
    value = dev.get("loss") if select_by == "loss" else _score(dev)
    return value if seeds.finite(value) else None


def select_best(runs, select_by, notes):
    """The run the original keeps: lowest dev loss or highest dev metric; ties -> first path."""
    runs = sorted(runs, key=lambda r: str(r.path))
    missing = [r for r in runs if _dev_value(r, select_by) is None]
    if len(runs) > 1 and missing:
        notes.append(
            f"{len(missing)} of {len(runs)} runs without a dev {select_by} ranked last: "
            + ", ".join(str(r.path) for r in missing)
        )

    def goodness(run):
        value = _dev_value(run, select_by)
        return -math.inf if value is None else (-value if select_by == "loss" else value)

    return max(runs, key=goodness)


def test_percent(run):
    value = _score(run.results.get("test") or {})
    if value is None:
        raise DataError(f"results.json without a test metric ({run.path / 'results.json'})")
    return 100.0 * value


def group_by(runs, key):
    groups = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return groups


def _select_by(runs):
    first = min(runs, key=lambda r: str(r.path))
    return first.config.get("select_by") or SELECT_BY[first.family]


# --- the three tables as records (one per cell; also the CSV rows) --------------------------
def opt_records(runs, notes):
    records = []
    for (model, task, method), cell in group_by(
        runs, lambda r: (r.model, r.task, r.method)
    ).items():
        select_by = _select_by(cell)
        best = select_best(cell, select_by, notes)
        records.append(
            dict(
                model=model,
                size=best.size,
                task=task,
                method=method,
                ours=test_percent(best),
                paper=paper.opt_test(best.size or "13b", method, task),
                select_by=select_by,
                dev=_dev_value(best, select_by),
                n_runs=len(cell),
                selected=str(best.path),
            )
        )
    return records


def roberta_records(runs, notes):
    records = []
    for (model, k, task, method), cell in group_by(
        runs, lambda r: (r.model, r.config.get("k"), r.task, r.method)
    ).items():
        select_by = _select_by(cell)
        per_seed = group_by(cell, lambda r: r.config.get("train_set_seed"))
        best = [select_best(per_seed[seed], select_by, notes) for seed in sorted(per_seed, key=str)]
        scores = [test_percent(run) for run in best]
        paper_mean, paper_std = paper.roberta_test(k, method, task)
        records.append(
            dict(
                model=model,
                size=cell[0].size,
                k=k,
                task=task,
                method=method,
                ours_mean=statistics.fmean(scores),
                ours_std=statistics.pstdev(scores),
                n_seeds=len(scores),
                paper_mean=paper_mean,
                paper_std=paper_std,
                n_runs=len(cell),
            )
        )
    return records


def memory_records(runs):
    records = []
    cells = group_by(
        [r for r in runs if r.results.get("peak_memory_bytes")], lambda r: (r.model, r.method)
    )
    for (model, method), cell in cells.items():
        gpus, gb = paper.memory(cell[0].size, method)
        records.append(
            dict(
                model=model,
                size=cell[0].size,
                method=method,
                ours_gb=max(r.results["peak_memory_bytes"] for r in cell) / 2**30,
                paper_gb=gb,
                paper_gpus=gpus,
                device=", ".join(sorted({str(r.results.get("device")) for r in cell})),
                n_runs=len(cell),
            )
        )
    return records


# --- Markdown -------------------------------------------------------------------------------
def _order(values, canonical):
    return sorted(
        set(values),
        key=lambda v: (canonical.index(v) if v in canonical else len(canonical), str(v)),
    )


def label(key):
    """The paper's spelling of a method or task key; an estimator suffix (names.method_id) spelled
    out."""
    found = paper.METHOD_LABELS.get(key) or paper.TASK_LABELS.get(key)
    if found is None and "-" in str(key):
        head, part = str(key).rsplit("-", 1)
        spelled = methods.label_of(part)
        if spelled is not None:
            return f"{label(head)}, {spelled}"
    return key if found is None else found


def _pct(value, std=None):
    if value is None:
        return None
    return f"{value:.1f}" if std is None else f"{value:.1f}±{std:.1f}"


def _cell(ours, theirs):
    """'ours (paper)'; a dash where we have no run, nothing where neither has a number."""
    return f"{ours or '–'} ({theirs})" if theirs else (ours or "")


def _grid_table(records, row_key, col_key, cell, row_order, col_order, col_label, corner="Method"):
    """A Markdown table over the rows/columns that have runs; cell(record or None, row, col)."""
    rows = _order([r[row_key] for r in records], row_order)
    cols = _order([r[col_key] for r in records], col_order)
    by_cell = {(r[row_key], r[col_key]): r for r in records}
    header = [corner] + [col_label(c) for c in cols]
    body = [
        [label(row)] + [cell(by_cell.get((row, col)), row, col) for col in cols] for row in rows
    ]
    return ["| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header)] + body]


_OPT_MODELS = [f"OPT-{size.upper()}" for size in OPT_SIZES]


def _opt_markdown(records):
    out = []
    for model in _order([r["model"] for r in records], _OPT_MODELS):
        recs = [r for r in records if r["model"] == model]
        # a model of no size the paper reports is shown beside the paper's headline model, OPT-13B
        size = recs[0]["size"] if recs[0]["size"] in ("13b", "30b", "66b") else "13b"
        source = {"13b": "Table 1", "30b": "Table 20", "66b": "Table 20"}[size]
        out += [
            f"## {model}: test accuracy / F1 (%), ours (paper OPT-{size.upper()}, {source})",
            "",
        ]

        def cell(r, method, task, size=size):
            return _cell(r and _pct(r["ours"]), _pct(paper.opt_test(size, method, task)))

        out += _grid_table(
            recs, "method", "task", cell, _METHOD_ORDER, list(paper.OPT_TASKS), label
        )
        rules = sorted({r["select_by"] for r in recs if r["n_runs"] > 1})
        if rules:
            out += [
                "",
                "Grid cells: the run with the "
                + " / ".join(
                    "lowest dev loss" if rule == "loss" else "highest dev accuracy (F1)"
                    for rule in rules
                )
                + ".",
            ]
        out.append("")
    return out


def _roberta_markdown(records):
    out = []
    for model, k in _order([(r["model"], r["k"]) for r in records], []):
        recs = [r for r in records if (r["model"], r["k"]) == (model, k)]

        def cell(r, method, task, k=k):
            seeds = "" if not r or r["n_seeds"] == 5 else f" n={r['n_seeds']}"
            ours = r and _pct(r["ours_mean"], r["ours_std"]) + seeds
            return _cell(ours, _pct(*paper.roberta_test(k, method, task)))

        out += [
            f"## {model}, k={k}: test accuracy (%), mean±std over data seeds, "
            "ours (paper RoBERTa-large, Table 18)",
            "",
        ]
        out += _grid_table(
            recs, "method", "task", cell, _METHOD_ORDER, list(paper.ROBERTA_TASKS), label
        )
        out += [
            "",
            "Per data seed the grid point with the best dev accuracy; std over seeds as numpy's "
            "(population); n=N: cells with other than the paper's 5 seeds.",
            "",
        ]
    return out


def _memory_markdown(records):
    sizes = {r["model"]: r["size"] for r in records}

    def cell(r, model, method):
        gpus, gb = paper.memory(sizes[model], method)
        theirs = gpus and ", ".join(
            ([f"{gb:g}"] if gb else []) + ([f"{gpus} GPUs"] if gpus > 1 else [])
        )
        return _cell(r and f"{r['ours_gb']:.1f}", theirs)

    out = ["## Peak memory (GB), ours (paper Table 22)", ""]
    out += _grid_table(
        records, "model", "method", cell, _OPT_MODELS, _METHOD_ORDER, label, corner="Model"
    )
    devices = ", ".join(sorted({r["device"] for r in records}))
    out += [
        "",
        f"GB = 2^30 bytes of `peak_memory_bytes` (device: {devices})."
        " The paper measured MultiRC (about 400 tokens, batch 1 per GPU)"
        " with nvidia-smi on A100-80GB.",
        "",
    ]
    return out


def _csv(records):
    if not records:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def build(runs):
    """-> (markdown, {csv file name: text}) for loaded runs."""
    notes = []
    finished = [r for r in runs if r.results is not None]
    opt = opt_records([r for r in finished if r.family == "opt"], notes)
    roberta = roberta_records([r for r in finished if r.family == "roberta"], notes)
    memory = memory_records(finished)
    md = [
        "# MeZO reproduction report",
        "",
        f"{len(runs)} runs, {len(finished)} finished. Each cell: ours (paper).",
        "",
    ]
    md += (
        _opt_markdown(opt)
        + _roberta_markdown(roberta)
        + (_memory_markdown(memory) if memory else [])
    )
    unfinished = [r for r in runs if r.results is None]
    if unfinished or notes:
        md += ["## Notes", ""] + [f"- unfinished (no results.json): {r.path}" for r in unfinished]
        md += [f"- {note}" for note in notes] + [""]
    files = {
        "report_opt.csv": _csv(opt),
        "report_roberta.csv": _csv(roberta),
        "report_memory.csv": _csv(memory),
    }
    return "\n".join(md), files


# --- runs side by side (`eval.py compare`, `make demo`) ------------------------------------------
def number_cell(value, spec, scale=1):
    return "–" if value is None else spec.format(value * scale)


def loss_cell(value):
    return f"{value:.4f}" if seeds.finite(value) else "non-finite"


def binomial_se(accuracy, n):
    """Standard error of an accuracy measured on n independent examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def compare_markdown(runs):
    """One row per run: dev loss at the first evaluation and of the selected model, dev and test
    accuracy, peak memory, time per step; then, from the first run to the last, the test gain in
    binomial standard errors (both runs' test sets the same size)."""
    lines = [
        "| run | method | dev loss, first eval | dev loss, selected (step) | dev accuracy | test | "
        "peak memory (MiB) | s/step |",
        "|---" * 8 + "|",
    ]
    for run in runs:
        res = run.results
        dev = [m for m in read_metrics(run) if "dev_loss" in m]
        # never evaluated, or no dev set: "–"; a non-finite loss (null in strict JSON): "non-finite"
        first = f"{loss_cell(dev[0]['dev_loss'])} (step {dev[0]['step']})" if dev else "–"
        selected = "–"  # no dev loss recorded; null: non-finite
        if "loss" in (res.get("dev") or {}):
            selected = f"{loss_cell(res['dev']['loss'])} (step {res.get('best_step')})"
        base = " (lr 0: the base model)" if run.config.get("learning_rate") == 0 else ""
        cells = [
            run.path.name,
            label(run.method) + base,
            first,
            selected,
            number_cell((res.get("dev") or {}).get("accuracy"), "{:.4f}"),
            ", ".join(
                f"{k} {loss_cell(v)}"  # a non-finite metric: null, with its `_nonfinite` beside it
                for k, v in res["test"].items()
                if not k.endswith("_nonfinite")
            ),
            number_cell(res.get("peak_memory_bytes"), "{:.0f}", 2**-20),
            number_cell(res.get("time_per_step_s"), "{:.2f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    before, after = runs[0].results, runs[-1].results
    sizes = {r.results.get("num_test") for r in (runs[0], runs[-1])}
    both = all(seeds.finite(r["test"].get("accuracy")) for r in (before, after))
    if len(runs) > 1 and None not in sizes and len(sizes) == 1 and both:
        n, (a, b) = sizes.pop(), (before["test"]["accuracy"], after["test"]["accuracy"])
        se = max(binomial_se(a, n), binomial_se(b, n))
        lines += [
            "",
            f"Test accuracy {a:.4f} -> {b:.4f} on {n} held-out rows: {b - a:+.4f}, "
            f"{(b - a) / se:+.1f} binomial standard errors "
            f"(sqrt(p(1-p)/n) = {se:.4f}, the larger of the two).",
        ]
    return "\n".join(lines)


def save(out_dir, texts, figures=None, *, reads, where):
    """Write {name: text} and {name: Figure} (as PNG) into out_dir, each atomically, after
    `check_writes` against `reads` (where: the flag that named the output, for its error)."""
    out = Path(out_dir)
    check_writes([out / name for name in {**texts, **(figures or {})}], reads, where)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in texts.items():
        atomic_write(out / name, content)
    for name, figure in (figures or {}).items():
        with atomic_path(out / name) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    return [out / name for name in {**texts, **(figures or {})}]


def render(run_dirs, out_dir=None):
    """Markdown report of the run folders; with out_dir also report.md and report_*.csv there."""
    runs = load_runs(run_dirs)
    markdown, files = build(runs)
    if out_dir is not None:
        save(
            out_dir,
            {"report.md": markdown, **files},
            reads=files_read(run.path for run in runs),
            where=f"report folder {out_dir}",
        )
    return markdown
