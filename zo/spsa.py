"""MeZO's estimator: two-sided SPSA (Malladi et al. 2023, Algorithm 1; large_models/trainer.py
zo_step), and n-SPSA (several z per step, each estimate divided by their number; medium_models
`zo_step`).

    for each seed of the step:  loss1 = L(theta + eps z);  loss2 = L(theta - eps z)
                                projected_grad = (loss1 - loss2) / (2 eps)   [/ n]
"""

from .directions import ALL
from .optim import num_samples


class SPSA:
    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def describe(cfg) -> str:
        return "estimator=spsa" if cfg.n_spsa == 1 else f"estimator=spsa with n_spsa={cfg.n_spsa}"

    @staticmethod
    def supports(cfg) -> frozenset:
        # a CUDA graph replays one z per step (zo/graphs.py)
        return ALL if cfg.n_spsa == 1 else ALL - {"cuda_graphs"}

    def num_zs(self, step: int) -> int:
        c = self.cfg
        return num_samples(step, c.n_spsa, c.n_spsa_schedule, c.max_steps)

    def forwards(self, num_zs: int) -> int:
        return 2 * num_zs

    def estimate(self, mezo, model, loss_fn, seeds: list[int]):
        """-> (loss at theta + eps z of the last z, [(seed, projected_grad)])."""
        estimates = []
        for seed in seeds:
            mezo.zo_random_seed = seed
            loss1, projected_grad = mezo.zo_estimate(model, loss_fn)
            estimates.append(
                (seed, projected_grad if len(seeds) == 1 else projected_grad / float(len(seeds)))
            )
        return loss1, estimates
