"""Run files and checkpoints, written atomically (DESIGN.md 3.5: a crash never leaves a half-written
file). A checkpoint holds what MeZO changes: the trainable tensors, plus the loop's state (step,
seed stream, optimizer state, RNG), which makes resuming bitwise-identical to not stopping.
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def write_json(path, obj) -> None:
    """Temp file + fsync + rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    if not os.path.isfile(path):
        raise ValueError(f"missing file ({path})")
    with open(path) as f:
        return json.load(f)


def write_lines(path, lines) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU; a sharded DTensor is gathered (a collective: every rank calls)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous().cpu()


def save_trainable(model: nn.Module, path, write: bool = True) -> None:
    """The trainable tensors as one safetensors file (gathered from shards; `write` on rank 0)."""
    tensors = {n: full(p) for n, p in trainable(model).items()}
    if write:
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp)
        os.replace(tmp, path)


@torch.no_grad()
def load_trainable(model: nn.Module, path) -> None:
    """Copy saved trainable tensors back; a sharded parameter takes its own slice of the whole."""
    saved, own = load_file(path), trainable(model)
    if saved.keys() != own.keys():
        raise ValueError(f"checkpoint does not match the model's trainable parameters ({path})")
    for name, p in own.items():
        if hasattr(p, "device_mesh"):  # DTensor: distribute the full tensor the way p is placed
            from torch.distributed.tensor import distribute_tensor
            p.copy_(distribute_tensor(saved[name].to(p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(saved[name])


def save_checkpoint(directory, model: nn.Module, state: dict, write: bool = True) -> None:
    """directory/{trainable.safetensors, state.pt}, swapped in whole: the old checkpoint stays
    valid until the new one is complete."""
    tmp = f"{directory}.tmp"
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    save_trainable(model, os.path.join(tmp, "trainable.safetensors"), write)
    if write:
        torch.save(state, os.path.join(tmp, "state.pt"))
        old = f"{directory}.old"
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory) -> str | None:
    """The checkpoint to resume from; `.old` is the previous one if a crash hit between the renames."""
    for d in (directory, f"{directory}.old"):
        if os.path.isfile(os.path.join(d, "state.pt")):
            return d
    return None


def load_checkpoint(directory, model: nn.Module) -> dict:
    directory = find_checkpoint(directory) or directory
    load_trainable(model, os.path.join(directory, "trainable.safetensors"))
    return torch.load(os.path.join(directory, "state.pt"), weights_only=False)
