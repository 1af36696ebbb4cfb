"""The registry of a MeZO step's methods: one line per method, and what follows from the lines.

A run is an estimator (forwards -> (seed, projected_grad) estimates), a direction (what z is), an
update rule (estimates -> parameter change), a perturbation (exact restore or the original's
in-place moves) and optionally the control variates of the variants. Each method is one class in
its own file (zo/part.py says what it declares); from the lines below come MeZOConfig's method
fields and their checks (train.py's too: program/config.py RunConfig), the one check of what the
parts support together (`check_supported`: MeZO.__init__, CudaGraphStep, replay and the command
line call it), run names and table labels. A new method is one file plus one line here.
"""

import dataclasses
import re
from types import SimpleNamespace

from . import variants
from .directions import Dense
from .fzoo import FZOO
from .lozo import LOZO
from .paired import Paired
from .part import FEATURES, Field, Part
from .perturb import ExactRestore
from .reference import InPlace
from .rng import NORMAL_Z
from .sparse import SparseMagnitude
from .spsa import SPSA
from .updates import ZOSGD, Adam, Momentum


def _by_name(*parts: type[Part]) -> dict[str, type[Part]]:
    return {part.NAME: part for part in parts}


# the first of each kind is the default
ESTIMATORS = _by_name(
    SPSA,  # MeZO's two-sided SPSA; n-SPSA (zo/spsa.py)
    FZOO,  # N one-sided perturbations + one clean forward (zo/fzoo.py)
)
DIRECTIONS = _by_name(
    Dense,  # normal or Rademacher z (zo/directions.py)
    SparseMagnitude,  # Sparse-MeZO's magnitude mask (zo/sparse.py)
    LOZO,  # low-rank z = U V^T per weight matrix (zo/lozo.py)
)
UPDATE_RULES = _by_name(
    ZOSGD,  # MeZO's fused update (zo/updates.py)
    Momentum,  # torch SGD with momentum on p.grad = g z
    Adam,  # torch AdamW on p.grad = g z
)
METHODS = (*ESTIMATORS.values(), *DIRECTIONS.values(), *UPDATE_RULES.values())
DISTRIBUTIONS = ("normal", "rademacher")
# the command line's vocabulary: sgd with momentum > 0 is ZO-momentum; adam and adamw are both AdamW
OPTIMIZERS = ("sgd", "adam", "adamw")


def fields() -> list[Field]:
    """Every method's config fields, each once (the torch optimizers share clip_grad_norm)."""
    out: dict[str, Field] = {}
    for method in METHODS:
        for f in method.FIELDS:
            if out.setdefault(f.name, f) is not f:
                raise TypeError(f"two methods declare the config field {f.name}")
    return list(out.values())


def with_method_fields(core: type) -> type:
    """The dataclass `core` plus every method's fields, with their defaults."""
    specs = [(f.name, f.type, dataclasses.field(default=f.default)) for f in fields()]
    cls = dataclasses.make_dataclass(core.__name__, specs, bases=(core,))
    cls.__module__, cls.__doc__ = core.__module__, core.__doc__
    return cls


def check_config(cfg) -> None:
    """ValueError for a method field out of range, or a selected method refusing the config."""
    choices = {
        "estimator": tuple(ESTIMATORS),
        "optimizer": OPTIMIZERS,
        "distribution": DISTRIBUTIONS,
        "normal_z": tuple(NORMAL_Z),
    }
    for f in fields():
        if f.choices is not None:
            choices[f.name] = f.choices
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(
                f"unknown {name} ({name}={getattr(cfg, name)!r}; expected one of {allowed})"
            )
    for f in fields():
        value = getattr(cfg, f.name)
        if f.check is not None and value is not None and not f.check.ok(value):
            raise ValueError(f"{f.name} must be {f.check.what} ({f.name}={value})")
    selected = (ESTIMATORS[cfg.estimator], direction_class(cfg), update_rule(cfg))
    for part in selected:
        part.check(cfg)
    check_used(cfg, selected)


def check_used(cfg, selected) -> None:
    """ValueError for a method field set away from its default while no selected part reads it
    (fzoo_n with estimator=spsa, n_spsa with fzoo, clip_grad_norm with the fused ZO-SGD): a setting
    that does nothing is a mistake, not a preference."""
    read = {f.name for part in selected for f in part.FIELDS}
    for kind in (ESTIMATORS, DIRECTIONS, UPDATE_RULES):
        for method in kind.values():
            for f in method.FIELDS:
                value = getattr(cfg, f.name)
                if f.name in read or value == f.default:
                    continue
                owners = [_named(m) for m in kind.values() if f in m.FIELDS]
                used = _named(next(p for p in selected if p in kind.values()))
                raise ValueError(
                    f"{f.name} does nothing with {used}: only {' or '.join(owners)} reads it "
                    f"({f.name}={value!r})"
                )


def _named(part: type[Part]) -> str:
    """A part as the messages name it: estimator=fzoo, the lozo direction, the adam update."""
    if part in ESTIMATORS.values():
        return f"estimator={part.NAME}"
    return f"the {part.NAME} {'direction' if part in DIRECTIONS.values() else 'update'}"


def direction_class(cfg) -> type[Part]:
    """The direction the config selects: one of the others, else the default (dense z)."""
    default, *others = DIRECTIONS.values()
    chosen = [d for d in others if d.selected(cfg)]
    if len(chosen) > 1:
        raise ValueError(f"one direction at a time ({', '.join(d.NAME for d in chosen)})")
    return chosen[0] if chosen else default


def update_rule(cfg) -> type[Part]:
    """The update rule of cfg's optimizer and momentum (OPTIMIZERS)."""
    if cfg.optimizer in ("adam", "adamw"):
        return UPDATE_RULES["adam"]
    return UPDATE_RULES["momentum" if cfg.momentum else "sgd"]


def perturbation_class(cfg):
    return {"reference": InPlace, "paired": Paired}.get(cfg.perturbation, ExactRestore)


def parts(cfg) -> list[tuple[str, frozenset, frozenset]]:
    """(what, supports, requires) of each part of a run configured by cfg (a MeZOConfig)."""
    tagged = {part: f"{part.TAG[1]}={getattr(cfg, part.TAG[1])}" for part, _ in _tagged(cfg)}
    estimator, direction = ESTIMATORS[cfg.estimator], direction_class(cfg)
    out = [
        (
            f"estimator={cfg.estimator}"
            + (f" with {tagged[estimator]}" if estimator in tagged else ""),
            estimator,
        ),
        (tagged.get(direction, f"distribution={cfg.distribution}"), direction),
        (f"optimizer={update_rule(cfg).NAME}", update_rule(cfg)),
        (f"perturbation={cfg.perturbation}", perturbation_class(cfg)),
    ]
    if cfg.zo_variant is not None:
        out.append((f"zo_variant={cfg.zo_variant}", variants))
    return [(what, part.supports(cfg), part.requires(cfg)) for what, part in out]


def check_supported(
    cfg, *, cuda_graphs=False, fsdp=False, data_parallel=False, replay=False, direction_groups=None
) -> None:
    """ValueError naming every part that does not support what the run uses (one message).
    direction_groups: the step's z are shared among that many groups of ranks (zo/shares.py)."""
    used = {
        name
        for name, on in (
            ("cuda_graphs", cuda_graphs),
            ("fsdp", fsdp),
            ("data_parallel", data_parallel),
            ("directions", direction_groups is not None),
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
    if cuda_graphs and (fsdp or data_parallel or direction_groups is not None):
        problems.append(
            "CUDA graphs run in a single process (data-parallel, directions or FSDP training)"
        )
    if fsdp and direction_groups is not None:
        problems.append("FSDP shards over every rank; shared directions need whole replicas")
    if direction_groups is not None:
        estimator = ESTIMATORS[cfg.estimator]
        zs = estimator.num_zs(cfg, cfg.max_steps)
        if zs % direction_groups:
            field = estimator.TAG[1] if estimator.TAG else "z per step"
            problems.append(
                f"{zs} z per step ({field}) do not split evenly among {direction_groups} "
                "direction groups"
            )
    if problems:
        raise ValueError(f"unsupported combination: {'; '.join(problems)}")


# ------------------------------------------------------------------ run names and table labels
def view(config: dict) -> SimpleNamespace:
    """A run's config (config.json, a grid point's flags) with every method field, its default
    where absent or None."""
    values = {f.name: f.default for f in fields()}
    values.update({k: v for k, v in config.items() if v is not None})
    values.setdefault("estimator", next(iter(ESTIMATORS)))
    return SimpleNamespace(**values)


def _tagged(cfg) -> list[tuple[type[Part], object]]:
    """The selected methods a run's name shows, with cfg (a MeZOConfig or a `view`)."""
    selected = [(ESTIMATORS[cfg.estimator], ESTIMATORS), (direction_class(cfg), DIRECTIONS)]
    out = []
    for part, kind in selected:
        if part.TAG is None:
            continue
        _, field_name, _ = part.TAG
        default = next(f.default for f in part.FIELDS if f.name == field_name)
        if part is not next(iter(kind.values())) or getattr(cfg, field_name) != default:
            out.append((part, cfg))
    return out


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name_parts(config: dict) -> list[str]:
    """The method id's parts of the selected methods, e.g. ['fzoo8'] (program/paper/names.py)."""
    return [f"{p.TAG[0]}{_fmt(getattr(cfg, p.TAG[1]))}" for p, cfg in _tagged(view(config))]


def label_of(part: str) -> str | None:
    """A results table's spelling of a run-name part ('fzoo8' -> 'FZOO N=8'), or None."""
    for method in METHODS:
        if method.TAG is not None and method.TAG[2] is not None:
            found = re.fullmatch(re.escape(method.TAG[0]) + r"([\d.e+-]+)", part)
            if found:
                return method.TAG[2].format(found.group(1))
    return None


def forwards_per_step(config: dict) -> int:
    """Forward passes per step of a run's config (the most z its estimator draws a step)."""
    cfg = view(config)
    estimator = ESTIMATORS[cfg.estimator]
    return estimator.forwards(cfg, estimator.num_zs(cfg, getattr(cfg, "max_steps", 1)))
