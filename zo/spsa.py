"""MeZO's estimator: two-sided SPSA (Malladi et al. 2023, Algorithm 1; large_models/trainer.py
zo_step), and n-SPSA (several z per step, each estimate divided by their number; medium_models
`zo_step`, `--zero_order_sample`, `--zero_order_sample_scheduler`).

    for each seed of the step:  loss1 = L(theta + eps z);  loss2 = L(theta - eps z)
                                projected_grad = (loss1 - loss2) / (2 eps)   [/ n]

The forwards themselves are MeZO's own step (zo/mezo.py `zo_step`, `zo_losses`): this file
declares the estimator's fields, flags and limits.
"""

from .optim import SAMPLE_SCHEDULES, num_samples
from .part import ALL, Field, Part, zs_per_step


class SPSA(Part):
    NAME = "spsa"
    FIELDS = (
        Field(
            "n_spsa",
            1,
            int,
            "z samples per step (n-SPSA; medium: --zero_order_sample)",
            zs_per_step(1),
        ),
        Field(
            "n_spsa_schedule",
            "constant",
            str,
            "linear: max(1, int(step / max_steps * n_spsa)) z at step t",
            choices=SAMPLE_SCHEDULES,
        ),
    )
    TAG = ("nspsa", "n_spsa", "n-SPSA N={}")
    DISTRIBUTION = "normal"  # z unless --distribution says otherwise
    # the +eps and -eps forwards of each z run as one (zo/paired.py): 0.91x-0.95x the step time of
    # two forwards on CPU, and less memory
    PERTURBATION = "paired"
    estimate = None  # MeZO's own two forwards per z (zo/mezo.py zo_losses)

    @staticmethod
    def check(cfg) -> None:
        if cfg.n_spsa_schedule == "linear" and cfg.max_steps <= 0:
            raise ValueError(
                f"n_spsa_schedule=linear needs max_steps > 0 (max_steps={cfg.max_steps})"
            )

    @staticmethod
    def supports(cfg) -> frozenset:
        # a CUDA graph replays one z per step (zo/graphs.py); a varying number of z per step
        # cannot be shared evenly among direction groups
        unsupported = ({"cuda_graphs"} if cfg.n_spsa > 1 else set()) | (
            {"directions"} if cfg.n_spsa_schedule == "linear" else set()
        )
        return ALL - unsupported

    @staticmethod
    def num_zs(cfg, step: int) -> int:
        return num_samples(step, cfg.n_spsa, cfg.n_spsa_schedule, cfg.max_steps)

    @staticmethod
    def forwards(cfg, num_zs: int) -> int:
        return 2 * num_zs
