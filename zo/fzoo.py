"""FZOO (arXiv 2506.09034, ICLR 2026; the authors' trainer.py `zo_step` / `zo_update`): N one-sided
perturbations and one clean forward per step, normalised by the spread of the N losses.

    for i = 1..N:  l_i = L(theta + eps z_i)        z_i Rademacher (--distribution rademacher) l_0 =
    L(theta) projected_grad_i = (l_i - l_0) / (N * std(l_1..l_N))    std over the N perturbed
    losses, population
                                                            (torch.std(loss1s, unbiased=False))
    theta <- theta - lr * sum_i projected_grad_i * z_i      (the fused ZO-SGD update, one z after
    another)

The std acts as an adaptive step size. Each step costs N + 1 forwards; data-parallel runs reduce the
N + 1 losses in one all-reduce. Perturbations are exact-restore (no +eps/-eps drift in the weights),
z is the counter-based z of zo/rng.py, so the trajectory holds N (seed, projected_grad) lines per
step and replays bitwise. The loss returned (and logged) is l_0, as the authors' zo_step returns.
"""

import torch

from .directions import ALL


class FZOO:
    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def describe(cfg) -> str:
        return f"estimator=fzoo with fzoo_n={cfg.fzoo_n}"

    @staticmethod
    def supports(cfg) -> frozenset:
        # N seeds per step (a CUDA graph replays one); the original's in-place reference transcribes
        # MeZO only
        return ALL - {"cuda_graphs", "reference"}

    def num_zs(self, step: int) -> int:
        return self.cfg.fzoo_n

    def forwards(self, num_zs: int) -> int:
        return num_zs + 1

    def estimate(self, mezo, model, loss_fn, seeds: list[int]):
        """-> (l_0, [(seed_i, projected_grad_i)])."""
        losses = []
        try:
            for seed in seeds:
                mezo.zo_perturb_parameters(seed, scaling_factor=1)
                losses.append(mezo.zo_forward(model, loss_fn))
                mezo.zo_perturb_parameters(scaling_factor=-1)  # back at theta
        finally:
            mezo.perturbation.reset()
        losses.append(mezo.zo_forward(model, loss_fn))
        losses = torch.stack(losses).float()
        if mezo.reduce_losses is not None:
            losses = mezo.reduce_losses(losses)
        perturbed, clean = losses[:-1], losses[-1]
        grads = (perturbed - clean) / (len(seeds) * perturbed.std(unbiased=False))
        return clean, list(zip(seeds, grads.unbind()))
