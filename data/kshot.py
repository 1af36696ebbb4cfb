"""LM-BFF k-shot splits (`medium_models/tools/generate_k_shot_data.py`, mode k-shot-1k-test).

For a seed: shuffle the original train rows as `np.random.seed(seed); np.random.shuffle(rows)`,
group them by label in first-seen order, train = the first k of each label, dev = the next k (fewer
when a class is small). Test = the original dev set (GLUE) or test set (CSV), cut to 1000 rows when
larger: GLUE by `np.random.seed(42); np.random.shuffle`, CSV by pandas `sample(n=1000,
random_state=42)`, which is `RandomState(42).choice(n, 1000, replace=False)`, i.e. the first 1000
of `RandomState(42).permutation(n)` (pandas `core/sample.py`; numpy's legacy `choice` without
replacement and weights takes `permutation(n)[:size]`). We use `RandomState(seed)`, which draws the
same numbers as the seeded global generator without touching global state.

Lookup for a RoBERTa task T (LM-BFF spelling), given `data_dir` D, k and seed (first hit wins):
  1. a ready k-shot folder, recognised by its test file: D/k-shot-1k-test/T/<k>-<seed>/,
     D/T/<k>-<seed>/, D/<k>-<seed>/, or D itself (run_fewshot.sh's --data_dir);
  2. otherwise the split is generated in memory from the originals in D/original/T/, D/T/ or D.
`write_folder` writes a k-shot folder byte for byte as the original script does; the bundled
`data/samples/k-shot-1k-test/*/16-42/` were written by it. Other seeds are generated on load.
"""

import csv
import os

import numpy as np

from . import DataError
from .files import atomic_path
from .readers import read_csv, read_lines


def csv_label(raw, where):
    """The integer label of a CSV row (pandas parses the column as int)."""
    try:
        return int(raw[0])
    except ValueError:
        raise DataError(f"label {raw[0]!r} is not an integer ({where})") from None


def _label_key(task, where, raw):
    # get_label(): GLUE-style tasks take the last field of line.strip().split('\t').
    return csv_label(raw, where) if task.csv else raw.strip().split("\t")[-1]


def _files(task):
    """Split name -> file name inside a k-shot folder."""
    ext = ".csv" if task.csv else ".tsv"
    dev = "dev" if task.csv else task.dev_name
    return {"train": "train" + ext, "dev": dev + ext, "test": dev.replace("dev", "test") + ext}


def _child(d, name):
    """d/name, matching name case-insensitively (LM-BFF mixes SST-2 and sst-5); None if absent."""
    if d and os.path.isdir(d):
        for entry in sorted(os.listdir(d)):
            if entry.lower() == name.lower() and os.path.isdir(os.path.join(d, entry)):
                return os.path.join(d, entry)
    return None


def _read(task, path):
    """Rows of one file as (where, raw): GLUE lines without the header, CSV field lists."""
    return read_csv(path) if task.csv else read_lines(path)[1:]


def load_records(task, data_dir, k, seed):
    """-> {"train", "dev", "test"}: [(where, raw row)], from a k-shot folder or generated."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found ({data_dir})")
    files = _files(task)
    setting = f"{k}-{seed}"
    task_dir = _child(data_dir, task.name)
    shot_task_dir = _child(_child(data_dir, "k-shot-1k-test"), task.name)
    folders = [
        _child(shot_task_dir, setting),
        _child(task_dir, setting),
        _child(data_dir, setting),
        data_dir,
    ]
    for folder in filter(None, folders):
        if os.path.isfile(os.path.join(folder, files["test"])):
            return {split: _read(task, os.path.join(folder, name)) for split, name in files.items()}
    for folder in filter(
        None, [_child(_child(data_dir, "original"), task.name), task_dir, data_dir]
    ):
        if os.path.isfile(os.path.join(folder, "train" + (".csv" if task.csv else ".tsv"))):
            splits = generate(task, folder, k, seed)
            return {
                "train": splits["train"],
                "dev": splits["dev"],
                "test": splits[files["test"][:-4]],
            }
    raise DataError(
        f"no {task.name} data: no k-shot folder {task.name}/{setting} with {files['test']} and no "
        f"original train file under k-shot-1k-test/, original/, {task.name}/ ({data_dir})"
    )


def read_original(task, folder):
    """-> ({file split: header lines}, train rows, {test split: rows}) of an original data folder.

    GLUE files keep their header: train.tsv and dev.tsv get the train header, test*.tsv the header
    of the dev file they come from (SNLI/MNLI dev files have more label columns than train).
    """
    if task.csv:
        return (
            {},
            read_csv(os.path.join(folder, "train.csv")),
            {"test": read_csv(os.path.join(folder, "test.csv"))},
        )
    train = read_lines(os.path.join(folder, "train.tsv"))
    headers, tests = {"train": train[:1], "dev": train[:1]}, {}
    for name in task.original_eval:
        lines = read_lines(os.path.join(folder, name + ".tsv"))
        test = name.replace("dev", "test")
        headers[test], tests[test] = lines[:1], lines[1:]
    return headers, train[1:], tests


def _cap_test(task, rows):
    if len(rows) <= 1000:
        return rows
    rs = np.random.RandomState(42)
    order = (
        rs.choice(len(rows), 1000, replace=False) if task.csv else rs.permutation(len(rows))[:1000]
    )
    return [rows[i] for i in order]


def _split(task, train, tests, k, seed):
    shuffled = [train[i] for i in np.random.RandomState(seed).permutation(len(train))]
    by_label = {}  # insertion order = first-seen order, as the original's dict
    for where, raw in shuffled:
        by_label.setdefault(_label_key(task, where, raw), []).append((where, raw))
    return {
        "train": [r for rows in by_label.values() for r in rows[:k]],
        "dev": [r for rows in by_label.values() for r in rows[k : 2 * k]],
        **{name: _cap_test(task, rows) for name, rows in tests.items()},
    }


def generate(task, original_folder, k, seed):
    """The k-shot split of one seed -> {"train", "dev", <test split(s)>}: [(where, raw)]."""
    _, train, tests = read_original(task, original_folder)
    return _split(task, train, tests, k, seed)


def write_folder(task, original_folder, out_dir, k, seed):
    """Write <out_dir>/<task>/<k>-<seed>/ as generate_k_shot_data.py --mode k-shot-1k-test does."""
    headers, train, tests = read_original(task, original_folder)
    splits = _split(task, train, tests, k, seed)
    folder = os.path.join(out_dir, task.name, f"{k}-{seed}")
    os.makedirs(folder, exist_ok=True)
    names = {
        **_files(task),
        **{s: s + (".csv" if task.csv else ".tsv") for s in splits if s.startswith("test")},
    }
    for split, rows in splits.items():
        path = os.path.join(folder, names[split])
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            if task.csv:  # pandas to_csv(header=False, index=False): minimal quoting, "\n" lines
                csv.writer(f, lineterminator="\n").writerows(raw for _, raw in rows)
            else:  # header, then the lines as read (a last line without "\n" gets one)
                f.writelines(
                    line if line.endswith("\n") else line + "\n"
                    for _, line in headers[split] + rows
                )
    return folder
