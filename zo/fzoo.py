"""FZOO (arXiv 2506.09034, ICLR 2026; the authors' trainer.py `zo_step` / `zo_update`): N one-sided
perturbations and one clean forward per step, normalised by the spread of the N losses.

    for i = 1..N:  l_i = L(theta + eps z_i)              z_i Rademacher (--distribution rademacher)
    l_0 = L(theta)
    projected_grad_i = (l_i - l_0) / (N * std(l_1..l_N))  std over the N perturbed losses,
                                                          population (torch.std(unbiased=False))
    theta <- theta - lr * sum_i projected_grad_i * z_i    (the fused ZO-SGD update: the N z in one
                                                          pass, rounded after each as N passes)

The std acts as an adaptive step size. Each step costs N + 1 forwards; data-parallel runs reduce the
N + 1 losses in one all-reduce; directions across ranks gather them in one all-gather.
Perturbations are exact-restore (no +eps/-eps drift in the weights), z is the counter-based z of
zo/rng.py, so the trajectory holds N (seed, projected_grad) lines per step and replays bitwise.
The loss returned (and logged) is l_0, as the authors' zo_step returns. N equal losses (eps too
small to move the loss) give std 0 and, as in the authors' formula, 0/0: the update is skipped and
the step counted non-finite (zo/mezo.py zo_step, --max_nonfinite).
"""

import torch

from .part import ALL, Field, Part, zs_per_step
from .shares import DirectionShare


class FZOO(Part):
    NAME = "fzoo"
    FIELDS = (
        Field(
            "fzoo_n",
            8,
            int,
            "FZOO: perturbations per step (the authors' fzoo.sh N)",
            zs_per_step(2),  # the std of one loss is 0
        ),
    )
    TAG = ("fzoo", "fzoo_n", "FZOO N={}")
    DISTRIBUTION = "rademacher"  # its z unless --distribution says otherwise
    PERTURBATION = "exact"  # one-sided forwards: no +-eps pair to run as one

    @staticmethod
    def supports(cfg) -> frozenset:
        # N seeds per step (a CUDA graph replays one); the original's in-place reference transcribes
        # MeZO only
        return ALL - {"cuda_graphs", "reference"}

    @staticmethod
    def check(cfg) -> None:
        if cfg.perturbation == "paired":  # one-sided forwards: no +-eps pair to run as one
            raise ValueError(
                "estimator=fzoo's forwards are one-sided: nothing to pair (perturbation=paired)"
            )

    @staticmethod
    def num_zs(cfg, step: int) -> int:
        return cfg.fzoo_n

    @staticmethod
    def forwards(cfg, num_zs: int) -> int:
        return num_zs + 1

    @staticmethod
    def estimate(perturb, forward, seeds: list[int], reduce_losses=None, share=DirectionShare()):
        """perturb(seed, scaling_factor) moves theta by scaling_factor * eps * z(seed); forward() is
        the loss there. share: this rank's seeds (zo/shares.py); the first direction group also
        runs the clean forward, the others send a 0 in its place. -> (l_0, [(seed_i,
        projected_grad_i)]) for every seed of the step."""
        losses = []
        for seed in share.mine(seeds):
            perturb(seed, 1)
            losses.append(forward())
            perturb(seed, -1)  # back at theta
        losses.append(forward() if share.group == 0 else torch.zeros_like(losses[-1]))
        losses = torch.stack(losses).float()
        if reduce_losses is not None:
            losses = reduce_losses(losses)
        every = share.everyone(losses)  # (groups, k + 1): each group's perturbed losses, clean
        perturbed, clean = every[:, :-1].reshape(-1), every[0, -1]
        grads = (perturbed - clean) / (len(seeds) * perturbed.std(unbiased=False))
        return clean, list(zip(seeds, grads.unbind()))
