"""Run folders as the tables and figures read them (program/paper/report.py, plots.py).

A run folder (README "Usage") holds `config.json` (the resolved flags plus family/kind),
`results.json` (dev and test metrics, peak memory) once it has finished, and `metrics.jsonl`
(the training curve: one record per logging window, one per evaluation).
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from data import DataError
from program.paper.names import canonical_task, method_id

SELECT_BY = {"opt": "loss", "roberta": "accuracy"}
RUN_READS = ("config.json", "results.json", "metrics.jsonl")  # what tables and figures read
OPT_SIZES = {
    "125m": 125e6,
    "350m": 350e6,
    "1.3b": 1.3e9,
    "2.7b": 2.7e9,
    "6.7b": 6.7e9,
    "13b": 13e9,
    "30b": 30e9,
    "66b": 66e9,
}


@dataclass
class Run:
    path: Path
    config: dict
    results: dict | None  # None while the run is unfinished

    @property
    def family(self):
        return self.config["family"]

    @property
    def task(self):
        return canonical_task(self.config["task"])

    @property
    def method(self):
        return method_id(self.config)

    @property
    def size(self):
        """'13b' / 'large' when the model is one the paper used, else None."""
        name = str(self.config.get("model", "")).lower()
        found = re.search(r"opt-(\d+(?:\.\d+)?[mb])\b|roberta-(base|large)\b", name)
        if found:
            return found.group(1) or found.group(2)
        num_params = (self.results or {}).get("num_params")
        if self.family == "opt" and num_params:  # a local checkpoint folder: judge by its size
            size, nominal = min(OPT_SIZES.items(), key=lambda kv: abs(math.log(num_params / kv[1])))
            return size if abs(num_params / nominal - 1) < 0.1 else None
        return None

    @property
    def model(self):
        """The row/block label: 'OPT-13B', 'RoBERTa-large', or the checkpoint folder's name."""
        if self.size:
            return f"OPT-{self.size.upper()}" if self.family == "opt" else f"RoBERTa-{self.size}"
        return Path(str(self.config.get("model", "?"))).name


NUMBER = (int, float)
# the types of what the tables and figures read (None: absent); a run's file with another type is
# one error line, not a traceback in the middle of a table
CONFIG_TYPES = {"family": str, "task": str, "model": str, "data_dir": str, "kind": str}
CONFIG_TYPES |= {"select_by": str, "trainer": str, "k": int, "train_set_seed": int}
CONFIG_TYPES |= {"num_train": int, "max_steps": int, "learning_rate": NUMBER, "zo_eps": NUMBER}
RESULTS_TYPES = {"dev": dict, "test": dict, "best_step": int, "selection": str, "device": str}
RESULTS_TYPES |= {"num_params": int, "num_test": int, "peak_memory_bytes": NUMBER}


def _text(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 at byte {err.start} ({path})") from None


def _object(value, what, path) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{what} holds a {type(value).__name__}, expected an object ({path})")
    return value


def _check_types(record: dict, types: dict, path, prefix="") -> None:
    for key, expected in types.items():
        value = record.get(key)
        if value is not None and not isinstance(value, expected):
            raise DataError(f"'{prefix}{key}' is a {type(value).__name__} ({path})")


def _check_metrics(block: dict, key: str, path) -> None:
    """dev / test: numbers, or a string beside a non-finite one (`loss_nonfinite`: "nan")."""
    for name, value in block.items():
        ok = isinstance(value, str) if name.endswith("_nonfinite") else isinstance(value, NUMBER)
        if value is not None and not ok:
            raise DataError(f"'{key}.{name}' is a {type(value).__name__} ({path})")


def _read_json(path):
    try:
        return _object(json.loads(_text(path)), path.name, path)
    except json.JSONDecodeError as err:
        raise DataError(f"bad JSON: {err.msg} ({path}:{err.lineno})") from None


def _read_results(path):
    results = _read_json(path)
    if "test" not in results:  # every run's results.json holds its test metrics
        raise DataError(f"results.json without 'test' ({path})")
    _check_types(results, RESULTS_TYPES, path)
    for key in ("dev", "test"):
        _check_metrics(results.get(key) or {}, key, path)
    return results


def _run_folders(folder):
    """A folder with config.json is a run; otherwise look for runs below it (not inside runs)."""
    if (folder / "config.json").is_file():
        return [folder]
    return [
        run
        for sub in sorted(p for p in folder.iterdir() if p.is_dir())
        for run in _run_folders(sub)
    ]


def load_runs(run_dirs):
    """Run folders (or folders of run folders) -> [Run], sorted by path, each loaded once."""
    folders = []
    for folder in map(Path, run_dirs):
        if not folder.is_dir():
            raise DataError(f"no such run folder ({folder})")
        found = _run_folders(folder)
        if not found:
            raise DataError(f"missing config.json ({folder})")
        folders += found
    runs = []
    for folder in sorted(set(folders), key=str):
        config = _read_json(folder / "config.json")
        _check_types(config, CONFIG_TYPES, folder / "config.json")
        for key in ("family", "task"):
            if key not in config:
                raise DataError(f"config.json without '{key}' ({folder / 'config.json'})")
        if config["family"] not in SELECT_BY:
            raise DataError(
                f"unknown family {config['family']!r}, expected opt or roberta "
                f"({folder / 'config.json'})"
            )
        results = (
            _read_results(folder / "results.json") if (folder / "results.json").is_file() else None
        )
        runs.append(Run(folder, config, results))
    return runs


def read_metrics(run):
    """metrics.jsonl as a list of dicts; a last line still being written (no newline) is skipped."""
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(_text(path).splitlines(keepends=True), 1):
        try:
            rows.append(_object(json.loads(line), f"metrics.jsonl line {number}", path))
        except json.JSONDecodeError:
            if line.endswith("\n"):
                raise DataError(f"bad JSON line ({path}:{number})") from None
    return rows


def files_read(run_dirs):
    """(what, path) of each file the tables and figures read of these run folders, the inputs a
    report, a comparison or a figure never writes over (data/files.py `check_writes`)."""
    return [("run", Path(folder) / name) for folder in run_dirs for name in RUN_READS]


def load_finished(run_dirs):
    """Each folder a finished run (config.json + results.json), in the order given."""
    runs = []
    for folder in map(Path, run_dirs):
        if not (folder / "config.json").is_file() or not (folder / "results.json").is_file():
            raise DataError(
                f"not a finished training run: no config.json and results.json ({folder})"
            )
        runs += load_runs([folder])
    return runs
