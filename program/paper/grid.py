"""Running a preset's grid: `train.py --preset P --grid` (one run per point, finished ones skipped)
and `--slurm DIR` (one sbatch script per point), then the best point by the original's rule.

A point is a full dict of train.py flags (`presets.grid_points`); `train_argv` spells it as a
command line, `run_grid` runs the points one process after another, `slurm_script` wraps one in
`torchrun` for sbatch.
"""

import os
import shlex
import subprocess
import sys

from data import DataError
from data.files import atomic_write, check_writes
from program.config import RUN_FIELDS, SWITCHES
from program.paper import presets, report
from program.paper.names import run_name
from program.paper.runs import load_runs


def train_argv(point):
    """The point as train.py arguments, in RunConfig's order; booleans are spelled true/false and
    floats exactly (repr), e.g. ['--task', 'opt/SST2', ..., '--learning_rate', '1e-06']."""
    unknown = sorted(set(point) - set(RUN_FIELDS))
    if unknown:
        raise DataError(f"unknown train.py flag '{unknown[0]}' (point for {run_name(point)})")
    argv = []
    for flag in RUN_FIELDS:
        value = point.get(flag)
        if value is None or value is False and flag in SWITCHES:
            continue
        if flag in SWITCHES:
            argv.append(f"--{flag}")
        else:
            argv += [f"--{flag}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def slurm_script(
    point, nproc=1, *, time="24:00:00", runs_dir="runs", partition=None, cpus_per_gpu=8
):
    """An sbatch script that runs one point with `torchrun --nproc_per_node nproc train.py ...`.

    The run writes to `point['output_dir']`, or `runs_dir/run_name(point)`; Slurm's own log goes
    to `runs_dir/<name>.slurm-<jobid>.out` (sbatch needs `runs_dir` to exist at submission).
    """
    name = run_name(point)
    point = dict(point, output_dir=point.get("output_dir") or f"{runs_dir}/{name}")
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={nproc}",
        f"#SBATCH --cpus-per-task={cpus_per_gpu * nproc}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={runs_dir}/{name}.slurm-%j.out",
    ] + ([f"#SBATCH --partition={partition}"] if partition else [])
    argv = train_argv(point)
    flags = [f"    {shlex.join(argv[i : i + 2])}" for i in range(0, len(argv), 2)]
    command = [f"torchrun --standalone --nproc_per_node {nproc} train.py"] + flags
    return "\n".join(header + ["set -euo pipefail", " \\\n".join(command), ""])


def run_grid(points, root, train_cmd):
    """Run each point with `train_cmd + train_argv(point)` in `root/run_name(point)`, one process
    after another; a finished point (results.json) is skipped, an interrupted one resumed.
    -> the run folders, in point order."""
    dirs = []
    for point in points:
        out = os.path.join(root, run_name(point))
        dirs.append(out)
        if os.path.exists(os.path.join(out, "results.json")):
            print(f"skip (finished): {out}", file=sys.stderr)
            continue
        again = os.path.isdir(os.path.join(out, "checkpoint"))
        cmd = [
            *train_cmd,
            *train_argv({**point, "output_dir": out}),
            "--resume" if again else "--overwrite_output_dir",
        ]
        print(" ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise DataError(f"grid point failed, rerun to resume it ({out})")
    return dirs


def main(args, explicit, train_cmd):
    """`--preset P --grid`: every grid point of P (Tables 15/16) in its own folder under
    --output_dir, then the report and the best point by the original's rule; `--slurm DIR` writes
    one sbatch script per point instead. `explicit` (the flags given on the command line, e.g.
    --model, --max_steps) apply to every point; `train_cmd` runs train.py."""
    if not args.preset:
        raise DataError("--grid and --slurm need --preset (command line)")
    root = args.output_dir or os.path.join("runs", "grid")
    k = args.k if args.preset.startswith("roberta") else None
    points = [{**p, **explicit} for p in presets.grid_points(args.preset, args.task, k)]
    if args.slurm:
        scripts = {os.path.join(args.slurm, run_name(point) + ".sbatch"): point for point in points}
        check_writes(
            scripts, [("model", args.model), ("data", args.data_dir)], f"--slurm {args.slurm}"
        )
        os.makedirs(args.slurm, exist_ok=True)
        for path, point in scripts.items():
            point = {**point, "output_dir": os.path.join(root, run_name(point))}
            atomic_write(path, slurm_script(point, nproc=args.nproc, runs_dir=root))
        print(
            f"wrote {len(points)} sbatch scripts to {args.slurm}; "
            f"submit: for f in {args.slurm}/*.sbatch; do sbatch $f; done"
        )
        return 0
    dirs = run_grid(points, root, train_cmd)
    select_by = points[0].get("select_by") or "loss"
    best = report.select_best(load_runs(dirs), select_by, [])
    print(report.render(dirs))
    print(f"best grid point by the original's rule (dev {select_by}): {best.path}")
    return 0
