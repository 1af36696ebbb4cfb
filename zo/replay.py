"""Replay: a MeZO run's logged updates applied to its base weights (`train.py --replay`).

A MeZO run is determined by its base weights and, per update, (step, seed, projected_grad, lr): z
is a function of the seed, so applying the logged estimates with the run's own update rebuilds the
trained weights bitwise on the same device and kernel mode. The records are dicts with those four
keys, in step order (the program reads them from trajectory.jsonl). Not covered: `zo_variant` (its
control variates come from data) and `perturbation="reference"` (its rounding changes the weights
outside the updates): check_supported(replay=True) refuses them.
"""

from itertools import groupby

import torch
from torch import nn

from . import methods
from .mezo import MeZO, MeZOConfig
from .perturb import LocalView, whole


def replay(
    model: nn.Module, records: list[dict], config: MeZOConfig, local_view: LocalView = whole
) -> None:
    """Apply the logged updates, in order, to `model` holding the run's base weights (in place); the
    direction reads each step's weights first, as in the run (Sparse-MeZO's thresholds)."""
    methods.check_supported(config, replay=True, fsdp=local_view is not whole)
    mezo = MeZO(model, config, local_view=local_view)
    for step, group in groupby(records, key=lambda r: r["step"]):
        group = list(group)
        mezo.direction.prepare(step, [r["seed"] for r in group])
        estimates = [
            (r["seed"], torch.tensor(r["projected_grad"], dtype=torch.float32, device=mezo.device))
            for r in group
        ]
        mezo.apply_update(estimates, group[0]["lr"])
