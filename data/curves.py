"""Loss curves and a before/after table of runs: `python -m data.curves RUN_DIR [--before DIR ...]`.

Reads RUN_DIR/metrics.jsonl (train.py: one record per logging window with "loss", one per evaluation
with "dev_loss") and writes RUN_DIR/loss_curves.png (training and dev loss against the step). Prints
one table row per folder (the --before folders first, RUN_DIR last) from their results.json: dev loss,
dev accuracy and test accuracy where the folder has them (eval.py writes test metrics only).
matplotlib is optional (`pip install matplotlib`); without it the command ends with one error line.
"""
import argparse
import json
import math
import os
import sys

from . import DataError

COLUMNS = (("dev", "loss", "dev loss"), ("dev", "accuracy", "dev accuracy"), ("test", "accuracy", "test accuracy"))


def read_metrics(run_dir):
    """-> (training points, dev points), each a list of (step, loss), from metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"missing metrics file, not a train.py run folder ({path})")
    train, dev = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"malformed line {n} ({path})") from None
            if "loss" in record and math.isfinite(record["loss"]):
                train.append((record["step"], record["loss"]))
            if "dev_loss" in record:
                dev.append((record["step"], record["dev_loss"]))
    if not train and not dev:
        raise DataError(f"no losses logged ({path})")
    return train, dev


def read_results(folder):
    path = os.path.join(folder, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"not a finished run: {e} ({path})") from None


def table(folders) -> str:
    """A markdown table: one row per folder, the COLUMNS of its results.json ("" where absent)."""
    lines = ["| run | " + " | ".join(c[2] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for folder in folders:
        results = read_results(folder)
        cells = [results.get(split, {}).get(key) for split, key, _ in COLUMNS]
        lines.append(f"| {os.path.basename(os.path.normpath(folder))} | "
                     + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


def plot(train, dev, out_file, title):
    try:
        import matplotlib
    except ImportError:
        raise DataError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]') "
                        "(data.curves)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="training loss L(θ+εz), per logging window", alpha=0.7)
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_file + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_file)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.curves", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--before", nargs="*", default=[], help="folders shown above the run (e.g. zero-shot)")
    p.add_argument("--after", nargs="*", default=[], help="folders shown below the run (e.g. eval.py --adapter)")
    p.add_argument("--out", help="PNG file (default RUN_DIR/loss_curves.png)")
    args = p.parse_args(argv)
    try:
        train, dev = read_metrics(args.run_dir)
        text = table([*args.before, args.run_dir, *args.after])
        out = args.out or os.path.join(args.run_dir, "loss_curves.png")
        plot(train, dev, out, os.path.basename(os.path.normpath(args.run_dir)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"loss curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
