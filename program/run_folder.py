"""Run folders: which folder a command may write, what a resumed run finds there, and which files
are a run's own. A folder holds one run: `check_run_folder` refuses any other folder, and
`prepare_run_folder` only ever removes a run's own files (and the temporaries a crash left of them).
"""

import os
import shutil

from torch import nn

from data.files import check_writes, is_temp_of, recover_dir

from .checkpoint import find_checkpoint, trainable_layout
from .config import RESUME_FREE, as_recorded
from .folder_lock import LOCK_NAME
from .json_files import read_json
from .trajectory import read_trajectory

RUN_KINDS = ("train", "replay", "eval")  # config.json's "kind": the folder holds such a run
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "trajectory.jsonl",
    "results.json",
    "best.safetensors",
    "model.adapter.safetensors",
    "checkpoint",
    "model",
)


def run_kind(folder) -> str | None:
    """The kind of run a folder holds ("train", "replay", "eval"), or None if no run wrote it."""
    try:
        config = read_json(os.path.join(folder, "config.json"))
    except ValueError:
        return None
    kind = config.get("kind") if isinstance(config, dict) else None
    return kind if kind in RUN_KINDS else None


def _writable(path: str) -> bool:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _own_entries(folder: str) -> list[str]:
    """The run's own files in `folder` and the temporaries a crash left of them."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [n for n in names if n in RUN_FILES or any(is_temp_of(n, own) for own in RUN_FILES)]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _check_name_lengths(path: str, flag: str, folder: str) -> None:
    """The file system's limits on a name (255 bytes on most) and a whole path (4096), checked
    before anything is created instead of as an OSError from the first write."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    name_max, path_max = (os.pathconf(existing, f"PC_{what}_MAX") for what in ("NAME", "PATH"))
    longest = max(path.split(os.sep), key=lambda part: len(part.encode()))
    if len(longest.encode()) > name_max:
        raise ValueError(
            f"output folder has a name of {len(longest.encode())} bytes, the file system allows "
            f"{name_max} ({flag} {folder})"
        )
    if len(path.encode()) + 64 > path_max:  # room for the files a run writes inside it
        raise ValueError(
            f"output folder path has {len(path.encode())} bytes, the file system allows {path_max} "
            f"with the run's files inside ({flag} {folder})"
        )


def check_run_folder(
    folder, *, resume: bool, overwrite: bool, protected=(), flag="--output_dir"
) -> str:
    """Refuse an output folder a run may not use; -> its canonical absolute path. Writes nothing.

    protected: (what, path) the command reads (model, data, adapter, a replayed run): the folder
    may neither be, hold, nor lie inside one, and the files a run writes in it are no symlinks
    (data/files.py `check_writes`).
    Without resume or overwrite the folder must not hold a run, nor any file a run would replace.
    """
    canonical = os.path.realpath(folder)
    _check_name_lengths(canonical, flag, folder)
    if os.path.exists(canonical) and not os.path.isdir(canonical):
        raise ValueError(f"output folder is a file ({flag} {folder})")
    if not _writable(canonical):
        raise ValueError(f"output folder is not writable ({flag} {folder})")
    own = [os.path.join(canonical, name) for name in (*RUN_FILES, LOCK_NAME)]
    check_writes([canonical, *own], protected, f"{flag} {folder}")
    kind = run_kind(canonical)
    if resume:
        if kind != "train":
            raise ValueError(f"nothing to resume: not a training run's folder ({flag} {folder})")
        if find_checkpoint(os.path.join(canonical, "checkpoint")) is None:
            raise ValueError(
                f"nothing to resume: the run saved no checkpoint; start it again with "
                f"--overwrite_output_dir ({flag} {folder})"
            )
        return canonical
    foreign = os.path.exists(os.path.join(canonical, "config.json")) and kind is None
    if kind is not None and not overwrite:  # name only the flags that work (--resume: a checkpoint)
        resumable = kind == "train" and find_checkpoint(os.path.join(canonical, "checkpoint"))
        how = (
            "pass --resume or --overwrite_output_dir"
            if resumable
            else "it saved no checkpoint "
            "to --resume; pass --overwrite_output_dir to replace its files"
        )
        raise ValueError(f"output folder belongs to another run; {how} ({flag} {folder})")
    if foreign:  # neither flag works: not a run to resume, and not a run's own files to replace
        raise ValueError(
            f"output folder belongs to another run: it holds a config.json that no run "
            f"wrote; never overwritten ({flag} {folder})"
        )
    if kind is None:
        taken = [n for n in _own_entries(canonical) if n in RUN_FILES]
        if taken:
            raise ValueError(
                f"output folder already holds {taken[0]}, which a run would replace "
                f"({flag} {folder})"
            )
    return canonical


def prepare_run_folder(folder: str, *, resume: bool) -> None:
    """After check_run_folder (rank 0 only): resume: finish an interrupted checkpoint save and drop
    stale temporaries; otherwise remove the previous run's own files. Nothing else is touched."""
    if resume:
        recover_dir(os.path.join(folder, "checkpoint"))
        recover_dir(os.path.join(folder, "model"))
        stale = [n for n in _own_entries(folder) if n not in RUN_FILES]
    else:
        stale = _own_entries(folder)
    for name in stale:
        _remove(os.path.join(folder, name))


def check_resumable(folder: str, model: nn.Module, loop, trajectory: bool) -> None:
    """On --resume, before anything is written: the files the resumed run reads or extends are
    readable and agree with the checkpoint (its LoopState `loop`); ValueError naming the file."""
    # finish() loads it; refuse now, not after the remaining steps
    if loop.best_step is not None:
        trainable_layout(model, os.path.join(folder, "best.safetensors"))
    if trajectory:
        read_trajectory(os.path.join(folder, "trajectory.jsonl"))
    path = os.path.join(folder, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = len(f.readlines())
    except FileNotFoundError:
        lines = 0
    except UnicodeDecodeError as e:
        raise ValueError(f"garbled metrics file: not UTF-8 at byte {e.start} ({path})") from None
    if lines < loop.metrics_lines:
        raise ValueError(
            f"metrics file has {lines} lines, the checkpoint counts {loop.metrics_lines} ({path})"
        )


def resume_conflicts(saved: dict, now: dict, free) -> list[str]:
    """The settings a resumed run would change, ignoring `free` ones; folders compared by real
    path."""

    def same(key):
        a, b = saved[key], now.get(key, saved[key])
        if key in ("model", "data_dir") and isinstance(a, str) and isinstance(b, str):
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b

    return sorted(k for k in saved if k not in free and k != "output_dir" and not same(k))


def run_settings(config: dict) -> dict:
    """What names a run in each of its checkpoints (state.json "run"): its config.json less what a
    resume may change, so a checkpoint fits the config.json of its own run only; a field the record
    predates counts as the value the run used (config.as_recorded)."""
    return {
        k: v for k, v in as_recorded(config).items() if k not in RESUME_FREE and k != "output_dir"
    }


def check_belongs(directory: str, folder: str) -> bool:
    """On --resume, before the checkpoint is loaded: its run's settings are those of the folder's
    config.json (a checkpoint copied from another run, or an edited config.json, is refused).
    -> False for a checkpoint from before the record, which resumes unchecked."""
    try:
        meta = read_json(os.path.join(directory, "state.json"))
    except ValueError as e:
        raise ValueError(f"corrupt checkpoint: {e}") from None
    record = meta.get("run") if isinstance(meta, dict) else None
    if record is None:
        return False
    if not isinstance(record, dict):
        raise ValueError(f"corrupt checkpoint: bad run record ({directory}/state.json)")
    now = run_settings(read_json(os.path.join(folder, "config.json")))
    record = run_settings(record)
    differ = sorted(set(resume_conflicts(record, now, ())) | (set(now) ^ set(record)))
    if differ:
        raise ValueError(
            f"checkpoint belongs to another run: its settings differ from config.json: "
            f"{', '.join(differ)} ({directory})"
        )
    return True
