"""The trajectory log of a run folder: writing it during training, reading it for `--replay`.

A MeZO run is determined by its base weights and, per update, (step, seed, projected_grad, lr):
z is a function of the seed, so the log is a few bytes per step instead of a checkpoint. Each
record is one JSON line `{"step", "seed", "projected_grad", "lr"}` (n-SPSA writes one line per z,
same step). projected_grad is written as the exact value of the fp32 tensor (JSON floats round-trip
doubles exactly), lr as the Python float the schedule produced, so `replay` rebuilds bit-identical
0-d tensors and calls the very update the run made: base weights + replay = trained weights, bitwise
on the same device and kernel mode (the updates are applied by zo/replay.py).

The step stays sync-free: `append` keeps device tensors; `flush` (the training loop calls it every
N steps and before a checkpoint) moves them to the host in one transfer and appends complete lines.

Replay covers ZO-SGD with weight decay, n-SPSA, FZOO, Sparse-MeZO and gradient accumulation, and
also ZO-momentum and ZO-Adam (their torch optimizer is rebuilt and stepped deterministically from
the same gradients). It does not cover `zo_variant` (the control variates come from data and are not
logged) or `perturbation="reference"` (its perturb/restore rounding changes the weights outside the
updates): zo.methods.check_supported(replay=True) refuses them.
"""

import json
import os
from itertools import groupby
from pathlib import Path

import torch

from data.files import atomic_write
from zo import MeZOConfig, methods

from .json_files import dumps


class Trajectory:
    """Append-only JSONL log. keep_before_step: on resume, first rewrite the file (atomically)
    keeping only steps < keep_before_step (0 starts a fresh log)."""

    def __init__(self, path, keep_before_step: int | None = None):
        self.path = Path(path)
        self._pending: list[tuple[int, int, torch.Tensor, float]] = []
        if keep_before_step is not None:
            old = read_trajectory(self.path) if self.path.exists() else []
            atomic_write(self.path, "".join(_line(r) for r in old if r["step"] < keep_before_step))

    def append(self, step: int, seed: int, projected_grad: torch.Tensor, lr: float) -> None:
        self._pending.append((step, seed, projected_grad, lr))

    def flush(self) -> None:
        if not self._pending:
            return
        grads = (
            torch.stack([g.detach().float().reshape(()) for _, _, g, _ in self._pending])
            .cpu()
            .tolist()
        )
        lines = "".join(
            _line({"step": step, "seed": seed, "projected_grad": g, "lr": lr})
            for (step, seed, _, lr), g in zip(self._pending, grads)
        )
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self._pending.clear()


FIELDS = {"step": int, "seed": int, "projected_grad": (float, int), "lr": (float, int)}


def _line(record: dict) -> str:
    """Strict JSON: a non-finite projected_grad (its update was skipped) is null +
    projected_grad_nonfinite."""
    return dumps({k: record[k] for k in FIELDS}) + "\n"


def read_trajectory(path) -> list[dict]:
    """Records in file order; a torn last line (a crash mid-write) is dropped. Anything else that is
    not a record is a ValueError naming the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"missing trajectory ({path})")
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"garbled trajectory: not UTF-8 at byte {e.start} ({path})") from None
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the last piece is "" or a torn line
        try:
            record = json.loads(line)
            if (
                isinstance(record, dict)
                and record.get("projected_grad") is None
                and isinstance(
                    # _line's strict-JSON spelling of NaN / inf
                    record.get("projected_grad_nonfinite"),
                    str,
                )
            ):
                record["projected_grad"] = float(record.pop("projected_grad_nonfinite"))
            if not (
                isinstance(record, dict)
                and record.keys() == set(FIELDS)
                and all(
                    isinstance(record[k], kind) and not isinstance(record[k], bool)
                    for k, kind in FIELDS.items()
                )
            ):
                raise ValueError(f"expected an object with {', '.join(FIELDS)}")
            if record["step"] < 0:
                raise ValueError("negative step")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"garbled trajectory line: {e} ({path}:{number})") from None
        records.append(record)
    return records


def records_up_to(path, steps: int, config: MeZOConfig) -> list[dict]:
    """The records of steps 0 .. steps-1, checked before anything is replayed: every step present,
    once, in order, with as many lines as the run's estimator draws z for it (n-SPSA schedule,
    FZOO's N)."""
    records = [r for r in read_trajectory(path) if r["step"] < steps]
    logged = [(step, len(list(group))) for step, group in groupby(r["step"] for r in records)]
    for expected, (step, count) in enumerate(logged):
        if step != expected:
            what = "repeats" if any(s == step for s, _ in logged[:expected]) else "skips to"
            raise ValueError(
                f"trajectory {what} step {step} where step {expected} belongs ({path})"
            )
        want = methods.ESTIMATORS[config.estimator].num_zs(config, step)
        if count != want:
            raise ValueError(
                f"trajectory has {count} lines for step {step}, expected {want} ({path})"
            )
    if len(logged) < steps:
        raise ValueError(
            f"trajectory ends before step {len(logged)}; the selected model is at step {steps} "
            f"({path})"
        )
    return records
