"""Trajectory log and replay (DESIGN.md 3.5).

A MeZO run is determined by its base weights and, per update, (step, seed, projected_grad, lr):
z is a function of the seed, so the log is a few bytes per step instead of a checkpoint. Each
record is one JSON line `{"step", "seed", "projected_grad", "lr"}` (n-SPSA writes one line per z,
same step). projected_grad is written as the exact value of the fp32 tensor (JSON floats round-trip
doubles exactly), lr as the Python float the schedule produced, so `replay` rebuilds bit-identical
0-d tensors and calls the very update the run made: base weights + replay = trained weights, bitwise
on the same device and kernel mode.

The step stays sync-free: `append` keeps device tensors; `flush` (the training loop calls it every
N steps and before a checkpoint) moves them to the host in one transfer and appends complete lines.

Replay covers ZO-SGD with weight decay, n-SPSA and gradient accumulation, and also ZO-momentum and
ZO-Adam (their torch optimizer is rebuilt and stepped deterministically from the same gradients). It
does not cover `zo_variant` (the control variates come from data and are not logged) or
`perturbation="reference"` (its perturb/restore rounding changes the weights outside the updates).
"""
import json
import os
from itertools import groupby
from pathlib import Path

import torch
from torch import nn

from .mezo import MeZO, MeZOConfig
from .perturb import LocalView, whole


class Trajectory:
    """Append-only JSONL log. keep_before_step: on resume, first rewrite the file (atomically)
    keeping only steps < keep_before_step (0 starts a fresh log)."""

    def __init__(self, path, keep_before_step: int | None = None):
        self.path = Path(path)
        self._pending: list[tuple[int, int, torch.Tensor, float]] = []
        if keep_before_step is not None:
            old = read_trajectory(self.path) if self.path.exists() else []
            kept = [r for r in old if r["step"] < keep_before_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(_line(r) for r in kept))
            os.replace(tmp, self.path)

    def append(self, step: int, seed: int, projected_grad: torch.Tensor, lr: float) -> None:
        self._pending.append((step, seed, projected_grad, lr))

    def flush(self) -> None:
        if not self._pending:
            return
        grads = torch.stack([g.detach().float().reshape(()) for _, _, g, _ in self._pending]).cpu().tolist()
        lines = "".join(_line({"step": step, "seed": seed, "projected_grad": g, "lr": lr})
                        for (step, seed, _, lr), g in zip(self._pending, grads))
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self._pending.clear()


def _line(record: dict) -> str:
    return json.dumps({k: record[k] for k in ("step", "seed", "projected_grad", "lr")}) + "\n"


def read_trajectory(path) -> list[dict]:
    """Records in file order; a torn last line (a crash mid-write) is dropped."""
    text = Path(path).read_text()
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1] if line]  # the last piece is "" or torn


def replay(model: nn.Module, records: list[dict], config: MeZOConfig, local_view: LocalView = whole) -> None:
    """Apply the logged updates, in order, to `model` holding the run's base weights (in place)."""
    if config.zo_variant is not None or config.perturbation == "reference":
        raise ValueError(f"replay needs exact restore and no control variates (perturbation="
                         f"{config.perturbation!r}, zo_variant={config.zo_variant!r})")
    mezo = MeZO(model, config, local_view=local_view)
    for _, group in groupby(records, key=lambda r: r["step"]):
        group = list(group)
        estimates = [(r["seed"], torch.tensor(r["projected_grad"], dtype=torch.float32, device=mezo.device))
                     for r in group]
        mezo.apply_update(estimates, group[0]["lr"])
