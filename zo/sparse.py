"""Sparse-MeZO (Liu et al., arXiv 2402.15751): perturb and update only the small-magnitude weights.

The mask of a parameter ("layer") is m = 1[|theta| <= h], with h the parameter's threshold: the
magnitude below which a fraction (1 - sparsity) of its elements lie, recomputed from the current
weights at the start of every step (`prepare`, on the fly as the paper's memory-efficient
implementation: only one 0-d threshold per parameter is kept). The masked fused kernels
(zo/kernels.py, masked=True) read |theta| in the same pass that draws z, so both the perturbed
forwards and the update use m * z and no dense mask is ever stored. A step's perturbations and its
first update read the same theta_t; n-SPSA and FZOO apply their updates one z after another, each
masked by the weights it updates.

Replay recomputes the thresholds before each logged step from the replayed weights (bitwise those of
the run), so the trajectory stays (step, seed, projected_grad, lr). Not supported: FSDP (a threshold
needs the whole parameter), CUDA graphs, torch optimizers (their p.grad = g * z would need the mask
of the weights), and the reference mode.
"""

import math

import torch

from .directions import Dense
from .kernels import Kernels, get_kernels
from .part import ALL, IN_UNIT_INTERVAL, Field


class SparseMagnitude(Dense):
    NAME = "sparse"
    FIELDS = (
        Field(
            "sparse_mezo",
            0.0,
            float,
            "Sparse-MeZO: fraction of each parameter's weights (the largest magnitudes) left "
            "unperturbed and not updated; 0: dense z (zo/sparse.py)",
            IN_UNIT_INTERVAL,
        ),
    )
    TAG = ("sparse", "sparse_mezo", "Sparse-MeZO {}")
    MASKED = True

    def __init__(self, slots, cfg, compiled: bool):
        self.distribution, self.compiled, self.normal_z = cfg.distribution, compiled, cfg.normal_z
        self.masked = get_kernels(cfg.distribution, compiled, masked=True, normal_z=cfg.normal_z)
        # k-th smallest |theta| of each parameter: a fraction (1 - sparsity) of it is perturbed
        self.ranks = {
            s: max(1, math.ceil((1.0 - cfg.sparse_mezo) * s.param.numel())) for s in slots
        }
        self.thresholds = {
            s: torch.zeros((), dtype=torch.float32, device=s.param.device) for s in slots
        }

    @staticmethod
    def selected(cfg) -> bool:
        return cfg.sparse_mezo > 0

    @staticmethod
    def supports(cfg) -> frozenset:
        return ALL - {"cuda_graphs", "fsdp", "reference", "dense_grad"}

    def kernels(self, slot) -> Kernels:
        return self.masked

    def args(self, slot) -> dict:
        return {"threshold": self.thresholds[slot]}

    def prepare(self, step: int, seeds: list[int]) -> None:
        """h = the k-th smallest |theta| per parameter, from the weights now (device work, no
        sync)."""
        with torch.no_grad():
            for s, h in self.thresholds.items():
                magnitudes = s.param.detach().reshape(-1).abs().float()
                h.copy_(torch.kthvalue(magnitudes, self.ranks[s]).values)
