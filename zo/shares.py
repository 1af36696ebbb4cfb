"""Directions across ranks (`train.py --parallel directions`): the N seeds of a step shared among
G direction groups of ranks, k = N / G each, in order (group g evaluates seeds g k .. g k + k - 1
on the whole batch). After its forwards a rank hands its losses to `everyone`, one all-gather
(zo/distributed.py `Dist.gather_losses`), and then holds every group's losses in seed order: each
rank computes every estimate from the same numbers in the same order and applies the same N
updates, so the replicas stay bitwise identical and the step equals one process's with the same N.
"""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class DirectionShare:
    """This rank's share of a step's directions. The default is one process: every seed, no
    gather."""

    group: int = 0  # this rank's direction group
    groups: int = 1
    # (m,) losses -> (groups, m): every group's, in group order (an all-gather)
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def mine(self, seeds: list[int]) -> list[int]:
        """The seeds this rank evaluates (zo.methods.check_supported: N a multiple of groups)."""
        k = len(seeds) // self.groups
        return seeds[self.group * k : (self.group + 1) * k]

    def everyone(self, losses: torch.Tensor) -> torch.Tensor:
        """This rank's losses -> every group's, stacked: (groups, *losses.shape)."""
        if self.gather is None:
            return losses[None]
        return self.gather(losses.reshape(-1)).reshape(self.groups, *losses.shape)
