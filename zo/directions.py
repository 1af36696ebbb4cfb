"""Directions: what z is. Dense normal or Rademacher z from the counter-based hash (zo/rng.py),
drawn inside the fused kernels (zo/kernels.py). Sparse-MeZO's magnitude mask on either is
zo/sparse.py.

A direction gives the perturbation its `kernels`, the extra kernel arguments of a slot (`args`), and
`prepare()`, called at the start of each step and before each replayed step, on the weights of that
step.
"""

from .kernels import get_kernels

# what a part of a run may support (zo/methods.py FEATURES); "dense_grad": z can be materialised as
# p.grad
ALL = frozenset({"cuda_graphs", "fsdp", "data_parallel", "reference", "replay", "dense_grad"})


class Dense:
    """z ~ N(0, 1) (MeZO) or Rademacher (+-1, FZOO) for every element of every trainable
    parameter."""

    def __init__(self, slots, distribution: str, compiled: bool):
        self.kernels = get_kernels(distribution, compiled)

    @staticmethod
    def describe(cfg) -> str:
        return f"distribution={cfg.distribution}"

    @staticmethod
    def supports(cfg) -> frozenset:
        # the reference mode transcribes the original's torch.normal draws
        return ALL if cfg.distribution == "normal" else ALL - {"reference"}

    def prepare(self) -> None:
        pass

    def args(self, slot) -> dict:
        return {}
