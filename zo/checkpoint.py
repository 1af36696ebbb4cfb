"""Run folders and checkpoints: tensors and JSON only, written atomically (data/files.py).

A checkpoint holds what a run changes: the trainable tensors, plus the loop's state (step, seed
stream, optimizer state, RNG), which makes resuming bitwise-identical to not stopping. It is a
directory of three files, swapped in whole (`atomic_dir`):
    trainable.safetensors   the trainable parameters by name
    state.safetensors       every tensor of the loop's state (optimizer moments, torch RNG state)
    state.json              the rest of the state, with {"__tensor__": key} where a tensor was
Nothing in it is a pickle: reading it runs no code. A folder holds one run: `check_run_folder`
refuses any other folder, and `prepare_run_folder` only ever removes a run's own files.
"""

import json
import os
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data.files import atomic_dir, atomic_path, check_writes, is_temp_of, recover_dir

from .folder_lock import LOCK_NAME
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
STATE_FILES = ("trainable.safetensors", "state.safetensors", "state.json")


def read_json(path):
    if not os.path.isfile(path):
        raise ValueError(f"missing file ({path})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON file: {e} ({path})") from None


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU; a sharded DTensor is gathered (a collective: every rank calls)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous().cpu()


def save_trainable(model: nn.Module, path, write: bool = True) -> None:
    """The trainable tensors as one safetensors file (gathered from shards; `write` on rank 0)."""
    tensors = {n: full(p) for n, p in trainable(model).items()}
    if write:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)


def _load_tensors(path) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ValueError(f"corrupt checkpoint: missing file ({path})")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint: {e} ({path})") from None


@torch.no_grad()
def load_trainable(model: nn.Module, path) -> None:
    """Copy saved trainable tensors back; a sharded parameter takes its own slice of the whole."""
    saved, own = _load_tensors(path), trainable(model)
    if saved.keys() != own.keys() or any(saved[n].shape != p.shape for n, p in own.items()):
        raise ValueError(f"checkpoint does not match the model's trainable parameters ({path})")
    for name, p in own.items():
        if hasattr(p, "device_mesh"):  # DTensor: distribute the full tensor the way p is placed
            from torch.distributed.tensor import distribute_tensor

            p.copy_(distribute_tensor(saved[name].to(p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(saved[name])


# ---------------------------------------------------------------- state as JSON + tensors


def to_json(obj, tensors: dict):
    """Nested dicts / lists / tuples of scalars and tensors -> JSON, tensors moved into `tensors`.
    Tags keep what JSON cannot say: non-string keys (a torch optimizer's state is keyed by int) and
    tuples (its betas)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = full(obj).clone()  # clone: safetensors refuses tensors sharing storage
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_json(v, tensors) for k, v in obj.items()}
        return {"__items__": [[to_json(k, tensors), to_json(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v, tensors) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint holds tensors and JSON values, not {type(obj).__name__}")


def from_json(obj, tensors: dict):
    """The inverse of to_json; anything it did not write is a ValueError."""
    if isinstance(obj, list):
        return [from_json(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.keys() == {"__tensor__"}:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"no tensor {obj['__tensor__']!r}")
        return tensors[obj["__tensor__"]]
    if obj.keys() == {"__tuple__"} and isinstance(obj["__tuple__"], list):
        return tuple(from_json(v, tensors) for v in obj["__tuple__"])
    if obj.keys() == {"__items__"} and isinstance(obj["__items__"], list):
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in obj["__items__"]):
            raise ValueError("malformed __items__")
        return {from_json(k, tensors): from_json(v, tensors) for k, v in obj["__items__"]}
    if any(k.startswith("__") for k in obj):
        raise ValueError(f"unknown tag {next(k for k in obj if k.startswith('__'))!r}")
    return {k: from_json(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(directory, model: nn.Module, state: dict, write: bool = True) -> None:
    """directory/{trainable.safetensors, state.safetensors, state.json}, swapped in whole: the old
    checkpoint stays valid until the new one is complete. Every rank calls (shards are gathered)."""
    tensors = {}
    meta = to_json(state, tensors)
    trained = {n: full(p) for n, p in trainable(model).items()}
    if not write:
        return
    with atomic_dir(directory) as tmp:
        save_file(trained, os.path.join(tmp, "trainable.safetensors"))
        save_file(tensors, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(meta, f)


def find_checkpoint(directory) -> str | None:
    """The checkpoint to resume from: `directory`, or `directory.old` when a crash hit between the
    two renames of a save (prepare_run_folder then puts it back). Reads only."""
    for candidate in (directory, f"{directory}.old"):
        if os.path.isfile(os.path.join(candidate, "state.pt")):
            raise ValueError(
                f"checkpoint holds a pickle (state.pt) from an older version, which is never "
                f"loaded; start the run again with --overwrite_output_dir ({candidate})"
            )
        if os.path.isdir(candidate):
            return candidate
    return None


def load_checkpoint(directory, model: nn.Module) -> dict:
    """The saved state (after loading the trainable tensors into `model`); ValueError if corrupt."""
    load_trainable(model, os.path.join(directory, "trainable.safetensors"))
    tensors = _load_tensors(os.path.join(directory, "state.safetensors"))
    meta = read_json(os.path.join(directory, "state.json"))
    try:
        return from_json(meta, tensors)
    except ValueError as e:
        raise ValueError(f"corrupt checkpoint: {e} ({directory}/state.json)") from None


def _shard_like_params(optimizer) -> None:
    """A checkpoint holds whole tensors (gathered on save): give each sharded parameter's optimizer
    state (Adam's moments, the momentum buffer) the parameter's own placement again. Every rank
    holds
    the whole tensor, so each takes its slice without communication (src_data_rank=None)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            from torch.distributed.tensor import distribute_tensor

            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and not hasattr(value, "device_mesh")
                    and value.shape == p.shape
                ):
                    state[key] = distribute_tensor(
                        value.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None
                    )


def restore(directory, model: nn.Module, trainer) -> dict:
    """Load a checkpoint into the model, the trainer and torch's RNG; -> the loop's state.
    A checkpoint whose contents do not fit is a ValueError naming it, not a traceback."""
    saved = load_checkpoint(directory, model)
    try:
        trainer.load_state_dict(saved["trainer"])
        # the torch optimizer: FO's own, or MeZO's update rule's (fused ZO-SGD has none)
        update_rule = getattr(trainer, "update_rule", None)
        _shard_like_params(
            getattr(trainer, "optimizer", None) or getattr(update_rule, "optimizer", None)
        )
        torch.set_rng_state(saved["torch_rng"])
        loop = saved["loop"]
        if not isinstance(loop, dict) or not isinstance(loop.get("metrics_lines"), int):
            raise ValueError("bad loop state")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(f"corrupt checkpoint: {type(e).__name__}: {e} ({directory})") from None
    return loop


# ---------------------------------------------------------------- run folders


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
                f"output folder already holds {taken[0]}, "
                f"which a run would replace ({flag} {folder})"
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


def check_resumable(folder: str, model: nn.Module, loop: dict, trajectory: bool) -> None:
    """On --resume, before anything is written: the files the resumed run reads or extends are
    readable and agree with the checkpoint (its loop state `loop`); ValueError naming the file."""
    # finish() loads it; refuse now, not after the remaining steps
    if loop.get("best_step") is not None:
        path = os.path.join(folder, "best.safetensors")
        saved, own = _load_tensors(path), trainable(model)
        if saved.keys() != own.keys() or any(saved[n].shape != p.shape for n, p in own.items()):
            raise ValueError(
                f"corrupt checkpoint: best.safetensors does not match the model's trainable "
                f"parameters ({path})"
            )
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
    if lines < loop["metrics_lines"]:
        raise ValueError(
            f"metrics file has {lines} lines, "
            f"the checkpoint counts {loop['metrics_lines']} ({path})"
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
