"""The registry of a MeZO run's parts, and the one check of what they support together.

A run is an estimator (forwards -> (seed, projected_grad) estimates), a direction (what z is), an
update rule (estimates -> parameter change), a perturbation (exact restore or the original's
in-place moves) and optionally the control variates of the variants. Each part declares what it
supports; `check_supported` is the one list of combinations: MeZO.__init__, CudaGraphStep, replay
and the command line (data/flags.py) all call it. A new method is one file plus one line here.
"""

from . import variants
from .directions import Dense
from .fzoo import FZOO
from .perturb import ExactRestore
from .reference import InPlace
from .sparse import SparseMagnitude
from .spsa import SPSA
from .updates import ZOSGD, TorchOptimizer

ESTIMATORS = {"spsa": SPSA, "fzoo": FZOO}
UPDATE_RULES = {"sgd": ZOSGD, "momentum": TorchOptimizer, "adam": TorchOptimizer}

FEATURES = {
    "cuda_graphs": "CUDA graphs",
    "fsdp": "FSDP local views",
    "data_parallel": "data-parallel ranks",
    "reference": "perturbation=reference",
    "replay": "trajectory replay",
    "dense_grad": "a materialised p.grad = g * z",
}


def direction_class(cfg):
    return SparseMagnitude if cfg.sparse_mezo else Dense


def perturbation_class(cfg):
    return InPlace if cfg.perturbation == "reference" else ExactRestore


def parts(cfg) -> list[tuple[str, frozenset, frozenset]]:
    """(what, supports, requires) of each part of a run configured by cfg (a MeZOConfig)."""
    none = frozenset()
    out = [
        (ESTIMATORS[cfg.estimator].describe(cfg), ESTIMATORS[cfg.estimator].supports(cfg), none),
        (direction_class(cfg).describe(cfg), direction_class(cfg).supports(cfg), none),
        (
            f"optimizer={cfg.optimizer}",
            UPDATE_RULES[cfg.optimizer].supports(cfg),
            UPDATE_RULES[cfg.optimizer].requires(cfg),
        ),
        (f"perturbation={cfg.perturbation}", perturbation_class(cfg).SUPPORTS, none),
    ]
    if cfg.zo_variant is not None:
        out.append((f"zo_variant={cfg.zo_variant}", variants.SUPPORTS, none))
    return out


def check_supported(
    cfg, *, cuda_graphs=False, fsdp=False, data_parallel=False, replay=False
) -> None:
    """ValueError naming every part that does not support what the run uses (one message)."""
    used = {
        name
        for name, on in (
            ("cuda_graphs", cuda_graphs),
            ("fsdp", fsdp),
            ("data_parallel", data_parallel),
            ("replay", replay),
            ("reference", cfg.perturbation == "reference"),
        )
        if on
    }
    run_parts = parts(cfg)
    for _, _, requires in run_parts:
        used |= requires
    problems = [
        f"{what} does not support {FEATURES[f]}"
        for what, supports, _ in run_parts
        for f in sorted(used - supports)
    ]
    if cuda_graphs and (fsdp or data_parallel):
        problems.append("CUDA graphs run in a single process (data-parallel or FSDP training)")
    if problems:
        raise ValueError(f"unsupported combination: {'; '.join(problems)}")
