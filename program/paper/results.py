"""`make results` (`python -m program.paper.results`): the paper's Table 1 on a real model and real
text.

SmolLM2-135M-Instruct on the Rotten Tomatoes snippets (`make rotten-tomatoes`; real review snippets
in SST-2's format, not SST-2) under the paper's protocol: train and dev drawn from train.tsv (1000 /
500), the test set from dev.tsv, selection on dev. Rows: zero-shot and ICL (eval.py), MeZO ft / LoRA
/ prefix (train.py) and backprop ft / LoRA (train.py --trainer fo), the trained rows over SEEDS.
Every run has its own folder under --out (named by its flags, so a changed setting is a new run); a
finished run (results.json) is skipped, an interrupted train.py run resumed. Then the table
(program/paper/tables.py `seeds_markdown`) is printed and, with --write FILE, put into FILE between
the markers below, with each row's command.

The settings of each row are in program/paper/rows.py, the one place to change them. `--grid`
(`make results-grid`) runs the grid on dev behind ROWS' learning rates (GRID, seed 0) and writes
that table; `--estimators` (`make results-estimators`) the estimators side by side (ESTIMATOR_ROWS);
`--directions` (`make results-directions`) 1 to 8 directions a step side by side (DIRECTION_ROWS);
`--gpu` (`make results-gpu`) ROWS at GPU_STEPS, the paper's step counts scaled to one GPU.
"""

import itertools
import json
import os
import shlex
import subprocess
import sys
import time

from data import DataError
from data.files import atomic_write, check_file_target, check_writes
from program.json_files import write_json
from program.paper import report, tables
from program.paper.grid import train_argv
from program.paper.names import run_name
from program.paper.rows import (
    DATA,
    DATA_FLAGS,
    DIRECTION_ROWS,
    ESTIMATOR_ROWS,
    GPU_STEPS,
    GRID,
    MODEL,
    ROWS,
    SEEDS,
    TRAIN_FLAGS,
)
from program.paper.runs import files_read, load_finished

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEGIN, END = "<!-- make results: begin -->", "<!-- make results: end -->"
ESTIMATORS_BEGIN, ESTIMATORS_END = (
    "<!-- make results estimators: begin -->",
    "<!-- make results estimators: end -->",
)
GRID_BEGIN, GRID_END = "<!-- make results grid: begin -->", "<!-- make results grid: end -->"
GPU_BEGIN, GPU_END = "<!-- make results gpu: begin -->", "<!-- make results gpu: end -->"
DIRECTIONS_BEGIN, DIRECTIONS_END = (
    "<!-- make results directions: begin -->",
    "<!-- make results directions: end -->",
)
# the tables of rows side by side against forward passes: (rows, table, markers, figure title)
SIDE_BY_SIDE = {
    "estimators": (
        ESTIMATOR_ROWS,
        tables.estimators_markdown,
        (ESTIMATORS_BEGIN, ESTIMATORS_END),
        "SmolLM2-135M-Instruct, LoRA, Rotten Tomatoes snippets: MeZO, FZOO, Sparse-MeZO",
    ),
    "directions": (
        DIRECTION_ROWS,
        tables.directions_markdown,
        (DIRECTIONS_BEGIN, DIRECTIONS_END),
        "SmolLM2-135M-Instruct, MeZO-LoRA, Rotten Tomatoes snippets: 1 to 8 directions a step",
    ),
}
EVAL_FLAGS = ("task", "num_train", "num_eval", "max_length", "batch_size")


def runs(
    rows=ROWS,
    seeds=SEEDS,
    model=MODEL,
    data_dir=DATA,
    data_flags=DATA_FLAGS,
    train_flags=TRAIN_FLAGS,
):
    """-> [(row, seed or None, script, flags)]: eval.py once per eval row, train.py per seed."""
    out = []
    for row, settings in rows.items():
        if settings.get("kind") == "eval":
            flags = {
                **data_flags,
                "max_length": 2048,
                "batch_size": 4,
                "model": model,
                "data_dir": data_dir,
                **{k: v for k, v in settings.items() if k != "kind"},
            }
            out.append(
                (row, None, "eval.py", {k: flags[k] for k in ("model", "data_dir", *EVAL_FLAGS)})
            )
        else:
            out += [
                (
                    row,
                    seed,
                    "train.py",
                    {
                        **data_flags,
                        **train_flags,
                        "model": model,
                        "data_dir": data_dir,
                        **settings,
                        "seed": seed,
                    },
                )
                for seed in seeds
            ]
    return out


def gpu_rows(rows=ROWS, steps=GPU_STEPS):
    """ROWS with each trainer's (max_steps, eval_steps) from `steps` (make results-gpu)."""
    return {
        row: settings
        if settings.get("kind") == "eval"
        else {**settings, **dict(zip(("max_steps", "eval_steps"), steps[settings["trainer"]]))}
        for row, settings in rows.items()
    }


def grid_runs(grid=GRID, rows=ROWS, **kwargs):
    """-> runs() of every grid point: each row's settings with one combination of its grid's values,
    seed 0."""
    points = {}
    for row, axes in grid.items():
        for values in itertools.product(*axes.values()):
            points[(row, values)] = {**rows[row], **dict(zip(axes, values))}
    return [
        (row, seed, script, flags)
        for (row, _), settings in points.items()
        for _, seed, script, flags in runs({row: settings}, seeds=SEEDS[:1], **kwargs)
    ]


def command(script, flags, out_dir):
    if script == "train.py":
        return ["train.py", *train_argv({**flags, "output_dir": out_dir})]
    return [
        "eval.py",
        *[a for k, v in flags.items() if v is not None for a in (f"--{k}", str(v))],
        "--output_dir",
        out_dir,
    ]


def launch(argv):
    """One run in its own process (so that its peak memory is its own)."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT).returncode


def folder_of(out, script, flags):
    return os.path.join(
        out, run_name({"kind": "eval" if script == "eval.py" else "train", **flags})
    )


def run_all(plan, out, launcher=launch):
    """Run what is not finished; -> {folder: wall seconds} (OUT/wall_times.json, kept across
    calls)."""
    times_file = os.path.join(out, "wall_times.json")
    walls = json.load(open(times_file)) if os.path.isfile(times_file) else {}
    os.makedirs(out, exist_ok=True)
    for row, seed, script, flags in plan:
        folder = folder_of(out, script, flags)
        if os.path.isfile(os.path.join(folder, "results.json")):
            print(f"skip (finished): {folder}", file=sys.stderr)
            continue
        argv = command(script, flags, folder)
        if script == "train.py":
            argv.append(
                "--resume"
                if os.path.isdir(os.path.join(folder, "checkpoint"))
                else "--overwrite_output_dir"
            )
        # an interrupted evaluation: eval.py replaces its own files only
        elif os.path.exists(folder):
            argv.append("--overwrite_output_dir")
        print(shlex.join(argv), file=sys.stderr)
        start = time.time()
        if launcher(argv) != 0:
            raise DataError(f"{row} run failed, rerun to resume it ({folder})")
        walls[folder] = time.time() - start
        write_json(times_file, walls)
    return walls


def markdown(plan, out, walls):
    """The table, then the command of each row (its first seed)."""
    seeds = ", ".join(
        str(seed) for seed in sorted({seed for _, seed, *_ in plan if seed is not None})
    )
    cells, commands = (
        {},
        [
            "",
            f"Trained rows: seeds {seeds} (`--seed`); the data (train, dev and test rows) "
            "is the same for every row. Commands:",
            "",
        ],
    )
    for row, seed, script, flags in plan:
        folder = folder_of(out, script, flags)
        if row not in cells:
            commands.append(
                f"- {report.label(row)}: `python {shlex.join(command(script, flags, folder))}`"
            )
        cells.setdefault(row, []).append((load_finished([folder])[0], walls.get(folder)))
    return "\n".join([tables.seeds_markdown(cells), *commands])


def inputs(plan, out):
    """-> (what, path) of the model and data folders the runs read, and of the files the runner
    reads under out (its wall times, each run's files): --out may hold the latter only, and
    --write and --figure are none of them (data/files.py `check_writes`)."""
    sources = list(
        dict.fromkeys(
            (what, flags[key])
            for *_, flags in plan
            for what, key in (("model", "model"), ("data", "data_dir"))
        )
    )
    folders = [folder_of(out, script, flags) for _, _, script, flags in plan]
    return sources, [("wall-times", os.path.join(out, "wall_times.json")), *files_read(folders)]


def side_by_side_markdown(plan, out, kind="estimators", figure_path=None):
    """The table of SIDE_BY_SIDE[kind] (tables.estimators_markdown, tables.directions_markdown;
    the first row is the baseline) and each row's command; with figure_path, their dev curves
    against forward passes as a PNG (plots.forward_pass_curves)."""
    _, table, _, title = SIDE_BY_SIDE[kind]
    rows, commands = {}, ["", "Commands (seeds as above):", ""]
    for row, seed, script, flags in plan:
        folder = folder_of(out, script, flags)
        if row not in rows:
            commands.append(f"- {row}: `python {shlex.join(command(script, flags, folder))}`")
        rows.setdefault(row, []).append(load_finished([folder])[0])
    if figure_path:
        from program.paper import plots

        fig = plots.forward_pass_curves(plots.figure_class(), rows, title)
        folder, name = os.path.split(os.path.abspath(figure_path))
        report.save(
            folder,
            {},
            {name: fig},
            reads=sum(inputs(plan, out), []),
            where=f"--figure {figure_path}",
        )
    return "\n".join([table(rows, baseline=next(iter(rows))), *commands])


def grid_markdown(plan, out, rows=ROWS, grid=GRID):
    """The grid's table (tables.grid_markdown); a row whose settings in ROWS are not its kept point
    says so."""
    cells = {}
    for row, _, script, flags in plan:
        cells.setdefault(row, []).append(load_finished([folder_of(out, script, flags)])[0])
    notes = []
    for row, points in cells.items():
        kept = report.select_best(points, "loss", [])
        differ = {k: v for k, v in rows[row].items() if k in grid[row] and kept.config.get(k) != v}
        if differ:
            notes.append(
                f"- {report.label(row)}: ROWS has {differ}; the grid keeps "
                f"{ {k: kept.config.get(k) for k in differ} }."
            )
    return "\n".join([tables.grid_markdown(cells), *([""] + notes if notes else [])])


def marked_text(path, begin=BEGIN, end=END) -> str:
    """FILE's text, with one begin ... end block (a new file's when it is missing)."""
    if not os.path.isfile(path):
        return f"# Results\n\n{begin}\n{end}\n"
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 at byte {e.start} ({path})") from None
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise DataError(f"expected one {begin} ... {end} block ({path})")
    return old


def write_between_markers(path, text, begin=BEGIN, end=END):
    head, rest = marked_text(path, begin, end).split(begin)
    atomic_write(path, f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


# the tables besides Table 1, one flag each: (help, markers)
TABLES = {
    "grid": ("the grid on dev behind ROWS (GRID, seed 0)", (GRID_BEGIN, GRID_END)),
    "estimators": ("the estimators side by side (ESTIMATOR_ROWS)", SIDE_BY_SIDE["estimators"][2]),
    "directions": (
        "1 to 8 directions a step side by side (DIRECTION_ROWS)",
        SIDE_BY_SIDE["directions"][2],
    ),
    "gpu": ("ROWS at GPU_STEPS (the paper's, scaled to one GPU)", (GPU_BEGIN, GPU_END)),
}


def check_outputs(args, plan, table) -> None:
    """--out, --write and --figure, refused now rather than after the whole plan has run."""
    sources, own = inputs(plan, args.out)
    check_writes([args.out], sources, f"--out {args.out}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"not a folder (--out {args.out})")
    if args.figure and table not in SIDE_BY_SIDE:
        raise DataError(
            "--figure draws rows side by side against forward passes: pass --estimators or "
            f"--directions (--figure {args.figure})"
        )
    for flag, path in (("--write", args.write), ("--figure", args.figure)):
        if path:
            check_writes([path], sources + own, f"{flag} {path}")
            check_file_target(path, f"{flag} {path}", make_parents=flag == "--figure")
    if args.write:
        marked_text(args.write, *TABLES.get(table, (None, (BEGIN, END)))[1])
    if args.figure:
        from program.paper import plots

        plots.figure_class()  # matplotlib is there


def plan_of(table, **where):
    if table == "grid":
        return grid_runs(**where)
    if table in SIDE_BY_SIDE:
        return runs(SIDE_BY_SIDE[table][0], **where)
    return runs(gpu_rows() if table == "gpu" else ROWS, **where)


def main(argv=None):
    from program.flags import Parser

    p = Parser(prog="python -m program.paper.results", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/results", help="run folders (default runs/results)")
    p.add_argument(
        "--write",
        metavar="FILE",
        help="put the table into FILE (e.g. RESULTS.md) between its markers",
    )
    for name, (what, _) in TABLES.items():
        p.add_argument(f"--{name}", action="store_true", help=f"{what} instead of Table 1")
    p.add_argument(
        "--figure",
        metavar="PNG",
        help="--estimators, --directions: also draw their dev curves here",
    )
    p.add_argument("--model", default=MODEL), p.add_argument("--data_dir", default=DATA)
    args = p.parse_args(argv)
    try:
        chosen = [name for name in TABLES if getattr(args, name)]
        if len(chosen) > 1:
            raise DataError(
                f"{', '.join('--' + n for n in chosen)} are {len(chosen)} tables, run one at a "
                "time (python -m program.paper.results)"
            )
        table = chosen[0] if chosen else "table1"
        plan = plan_of(table, model=args.model, data_dir=args.data_dir)
        check_outputs(args, plan, table)  # every output checked before the first run
        walls = run_all(plan, args.out)
        if table == "grid":
            text = grid_markdown(plan, args.out)
        elif table in SIDE_BY_SIDE:
            text = side_by_side_markdown(plan, args.out, table, args.figure)
        else:
            text = markdown(plan, args.out, walls)
        if args.write:
            write_between_markers(args.write, text, *TABLES.get(table, (None, (BEGIN, END)))[1])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
