"""Checkpoints: tensors and JSON only, written atomically (data/files.py).

A checkpoint holds what a run changes: the trainable tensors, plus the loop's state (step, seed
stream, optimizer state, RNG), which makes resuming bitwise-identical to not stopping. It is a
directory of three files, swapped in whole (`atomic_dir`):
    trainable.safetensors   the trainable parameters by name
    state.safetensors       every tensor of the loop's state (optimizer moments, torch RNG state)
    state.json              the rest of the state, with {"__tensor__": key} where a tensor was
Nothing in it is a pickle: reading it runs no code. The folder around it: program/run_folder.py.
"""

import json
import os

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from data.files import atomic_dir, atomic_path

from .json_files import read_json

STATE_FILES = ("trainable.safetensors", "state.safetensors", "state.json")


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


def load_tensors(path) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ValueError(f"corrupt checkpoint: missing file ({path})")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint: {e} ({path})") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def trainable_layout(model: nn.Module, path) -> dict[str, tuple[torch.dtype, int]]:
    """name -> (dtype, byte offset) of each tensor of a trainable-tensors file, after
    checking that it matches the model's trainable parameters; ValueError if not. Reads the header
    only: safetensors validates it (offsets, sizes), then its offsets are read here."""
    if not os.path.isfile(path):
        raise ValueError(f"corrupt checkpoint: missing file ({path})")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint: {e} ({path})") from None
    own = trainable(model)
    if shapes.keys() != own.keys() or any(shapes[n] != tuple(p.shape) for n, p in own.items()):
        raise ValueError(
            f"corrupt checkpoint: {os.path.basename(path)} does not match the model's trainable "
            f"parameters ({path})"
        )
    wrong = next((n for n in shapes if header[n]["dtype"] not in _DTYPES), None)
    if wrong is not None:  # refused before load_trainable writes any parameter
        raise ValueError(f"corrupt checkpoint: {wrong} has dtype {header[wrong]['dtype']} ({path})")
    start = 8 + size  # the data follow the header
    return {n: (_DTYPES[header[n]["dtype"]], start + header[n]["data_offsets"][0]) for n in shapes}


@torch.no_grad()
def load_trainable(model: nn.Module, path) -> None:
    """Copy saved trainable tensors back; a sharded parameter takes its own slice of the whole.

    Each tensor is read from the file straight into its parameter (a CPU parameter of the saved
    dtype) or through one temporary of its size, so loading adds at most the largest tensor to the
    process's memory. safetensors' own loader maps the file, and every page it copies from stays
    resident: for full-parameter training, a second copy of the model at the end of every run."""
    layout = trainable_layout(model, path)
    with open(path, "rb") as f:
        for name, p in trainable(model).items():
            dtype, offset = layout[name]
            direct = p.device.type == "cpu" and p.dtype == dtype and p.is_contiguous()
            direct = direct and not hasattr(p, "device_mesh")
            target = p.detach() if direct else torch.empty(p.shape, dtype=dtype)
            f.seek(offset)
            want = target.numel() * target.element_size()
            if f.readinto(target.reshape(-1).view(torch.uint8).numpy()) != want:
                raise ValueError(f"corrupt checkpoint: {name} is cut short ({path})")
            if direct:
                continue
            if hasattr(p, "device_mesh"):  # DTensor: distribute the full tensor the way p is placed
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(target.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(target)


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
    tensors = load_tensors(os.path.join(directory, "state.safetensors"))
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
