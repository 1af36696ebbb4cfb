"""Directions: what z is. `Dense`: normal or Rademacher z for every element, from the counter-based
hash (zo/rng.py), drawn inside the fused kernels (zo/kernels.py). Others: Sparse-MeZO's magnitude
mask (zo/sparse.py), LOZO's low-rank z (zo/lozo.py).

A direction gives the perturbation the kernels of a slot (`kernels(slot)`) and their extra arguments
(`args(slot)`), the kernel applying a step's n updates in one pass (`update_many(slot, n)`), and
`prepare(step, seeds)`, called at the start of each step and before each
replayed step, on the weights of that step. What it carries from step to step is its `state_dict`.
"""

from .kernels import Kernels, get_kernels, get_update_many
from .part import ALL, Part


class Dense(Part):
    """z ~ N(0, 1) (MeZO) or Rademacher (+-1, FZOO) for every element of every trainable
    parameter: the default direction."""

    NAME = "dense"
    MASKED = False  # z masked by |theta| <= the slot's threshold (zo/kernels.py)

    def __init__(self, slots, cfg, compiled: bool):
        self.distribution, self.compiled, self.normal_z = cfg.distribution, compiled, cfg.normal_z
        self.dense = get_kernels(cfg.distribution, compiled, normal_z=cfg.normal_z)

    @staticmethod
    def selected(cfg) -> bool:
        return True  # the default, when no other direction is

    @staticmethod
    def supports(cfg) -> frozenset:
        # the reference mode transcribes the original's torch.normal draws
        return ALL if cfg.distribution == "normal" else ALL - {"reference"}

    def kernels(self, slot) -> Kernels:
        return self.dense

    def args(self, slot) -> dict:
        return {}

    def update_many(self, slot, n: int):
        """The n updates of a step in one pass over the slot (zo/kernels.py get_update_many)."""
        return get_update_many(self.distribution, self.compiled, self.MASKED, n, self.normal_z)

    def prepare(self, step: int, seeds: list[int]) -> None:
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass
