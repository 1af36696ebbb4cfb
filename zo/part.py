"""What a method of the step declares: an estimator, a direction or an update rule is one class
in its own file, subclassing `Part`, registered by one line in zo/methods.py.

A part declares its MeZOConfig fields (`FIELDS`: name, default, type, help and the one value
check; each field with a help text is also a train.py flag), what it supports and requires
(`supports(cfg)`, `requires(cfg)`: frozensets of the FEATURES names below), and how run folders and
tables name it (`TAG`). Estimators also say how many z a step draws and how many forwards they
cost; directions when they are selected.
"""

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

# what a run may use, and so what a part may support (zo.methods.check_supported)
FEATURES = {
    "cuda_graphs": "CUDA graphs",
    "fsdp": "FSDP local views",
    "data_parallel": "data-parallel ranks",
    "directions": "directions shared across ranks (--parallel directions)",
    "reference": "perturbation=reference",
    "replay": "trajectory replay",
    "dense_grad": "a materialised p.grad = g * z",
    "variants": "the variance-modified variants (zo_variant)",
}
ALL = frozenset(FEATURES)


@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    what: str  # "must be <what>"


def at_least(low: int) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


# A step keeps each of its z's seed, estimate and trajectory line until its update (about 850 bytes
# a z, measured): more z a step than this machine's memory holds would grow until MemoryError
# before the first forward
BYTES_PER_Z = 1024
MEMORY_BYTES = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # this machine's
MAX_ZS_PER_STEP = MEMORY_BYTES // BYTES_PER_Z


def zs_per_step(low: int) -> Check:
    """A count of z per step: at least low, at most what the memory holds."""
    return Check(
        lambda v: low <= v <= MAX_ZS_PER_STEP,
        f"in [{low}, {MAX_ZS_PER_STEP}] (a step holds each of its z in memory)",
    )


IN_UNIT_INTERVAL = Check(lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True)
class Field:
    """A MeZOConfig field a part owns; with `help`, also a train.py flag of the same name."""

    name: str
    default: Any
    type: type
    help: str | None = None
    check: Check | None = None
    choices: tuple | None = None


class Part:
    NAME = ""  # how the registry and the messages name it (estimator=NAME, optimizer=NAME)
    FIELDS: tuple[Field, ...] = ()
    # (run-name prefix, field, table label with {} for the field's value), e.g. ("fzoo", "fzoo_n",
    # "FZOO N={}"): a run's method id gets "fzoo8" when the part is selected and is not the default
    # or its field is not; None as label: the tables show the run name as it is
    TAG: tuple[str, str, str | None] | None = None

    @staticmethod
    def supports(cfg) -> frozenset:
        return ALL

    @staticmethod
    def requires(cfg) -> frozenset:
        return frozenset()

    @staticmethod
    def check(cfg) -> None:
        """ValueError for a configuration the part cannot run (beyond its fields' checks)."""
