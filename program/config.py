"""train.py's run configuration, declared once: `RunConfig` (what a run is) and `Command` (what the
command does with it).

Each field carries its type, default, help, choices and value check; from them come the parser
(program/flags.py), the value checks (`check_values`), `--dry-run`'s output (`values`), what
`--resume` may change (`RESUME_FREE`), the grid's and SLURM scripts' command lines and the fields a
preset may set (`RUN_FIELDS`). The method fields (--estimator's own, --lozo, ...) are declared by
their methods (zo/part.py Field) and appended here. The command line and zo.MeZOConfig share one
vocabulary: `perturbation` is exact | paired | eager | reference; `optimizer` is sgd | adam | adamw
with `momentum` (zo/methods.py `update_rule` picks the update rule). Defaults are the original's
(large_models/mezo.sh, run.py, HF TrainingArguments).
"""

import dataclasses
import math
import types
from dataclasses import dataclass

from zo import methods
from zo.methods import ESTIMATORS
from zo.part import IN_UNIT_INTERVAL, Check, Field, at_least
from zo.rng import DEFAULT_NORMAL_Z, NORMAL_Z

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def finite(low, inclusive=True) -> Check:
    return Check(
        lambda v: math.isfinite(v) and (v >= low if inclusive else v > low),
        f"{'>=' if inclusive else '>'} {low:g} and finite",
    )


FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
# the ZO step holds the learning rate in an fp32 scalar (zo/mezo.py): a larger one cannot be held
LEARNING_RATE = Check(lambda v: 0 <= v <= FP32_MAX, f"in [0, {FP32_MAX:g}]")


SEED = Check(lambda v: 0 <= v < 2**32, "in [0, 2**32)")  # numpy's legacy seeding takes no more
POSITIVE = at_least(1)


def setting(
    default=None,
    help=None,
    *,
    choices=None,
    check=None,
    free=False,
    switch=False,
    zo=False,
    unrecorded=None,
    **arg,
):
    """A field with what the command line needs: `free`: --resume may change it; `switch`: a
    store_true flag; `zo`: only the zeroth-order step reads it (--trainer fo refuses it set);
    `unrecorded`: the value a run recorded before the field existed ran with (its config.json lacks
    the field); `arg`: more argparse keywords (metavar, the flag's spelling as `flag`)."""
    meta = dict(help=help, choices=choices, check=check, free=free, switch=switch, zo=zo, arg=arg)
    meta["unrecorded"] = unrecorded
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Command:
    """Flags that steer the command itself rather than a run (the grid runner writes none)."""

    preset: str | None = setting(
        help="a configuration of the paper (see --list-presets); flags given here override it"
    )
    list_presets: bool = setting(False, switch=True, flag="--list-presets")
    dry_run: bool = setting(False, "print the run's configuration", switch=True, flag="--dry-run")
    grid: bool = setting(
        False,
        "run every grid point of --preset under --output_dir, skipping finished ones",
        switch=True,
    )
    slurm: str | None = setting(
        help="with --preset: write one sbatch script per grid point into DIR", metavar="DIR"
    )
    nproc: int = setting(1, "GPUs per job in --slurm scripts", check=POSITIVE)
    resume: bool = setting(False, switch=True, free=True)
    overwrite_output_dir: bool = setting(False, switch=True, free=True)
    replay: str | None = setting(
        help="rebuild RUN_DIR's selected model from its base model and trajectory",
        metavar="RUN_DIR",
    )


@dataclass
class RunConfig:
    """One run: what it trains, on what, how, and where it writes (config.json records it)."""

    # the model, the task and the folders
    task: str = setting("SST2")
    model: str | None = setting(
        help="checkpoint dir or cached hub name (default: the embedded tiny OPT)"
    )
    mode: str = setting("ft", choices=("ft", "prefix", "lora"))
    trainer: str = setting("zo", choices=("zo", "fo"))
    data_dir: str | None = setting()
    output_dir: str | None = setting()
    dtype: str = setting("fp32", choices=DTYPE_NAMES)
    num_prefix: int = setting(5, check=POSITIVE)
    lora_r: int = setting(8, check=POSITIVE)
    lora_alpha: float = setting(16, check=finite(0, False))
    # the data
    train_set_seed: int | None = setting(
        help="data seed (default 0 for OPT, 42 for RoBERTa)", check=SEED
    )
    k: int = setting(16, check=POSITIVE)
    num_train: int | None = setting(check=POSITIVE)
    num_dev: int | None = setting(check=at_least(0))
    num_eval: int = setting(1000, check=POSITIVE)
    max_length: int = setting(2048, check=at_least(2))
    train_as_classification: bool | None = setting()
    no_bos_override: bool | None = setting()
    per_candidate: bool | None = setting(
        help="score classification as the original: one sequence per candidate "
        "(default: one shared prompt per example; --perturbation reference implies it)"
    )
    # the schedule
    batch_size: int = setting(16, "global batch", check=POSITIVE)
    gradient_accumulation_steps: int = setting(1, check=POSITIVE)
    max_steps: int = setting(20000, check=POSITIVE, free=True)
    num_train_epochs: float | None = setting(check=finite(0, False))
    eval_steps: int = setting(4000, check=POSITIVE)
    save_steps: int | None = setting(check=POSITIVE)
    logging_steps: int = setting(10, check=POSITIVE)
    eval_batch_size: int = setting(8, check=POSITIVE, free=True)
    select_by: str | None = setting(
        help="keep the best dev model by (default: loss for OPT, "
        "accuracy for RoBERTa; with --non_diff the last model, as the original)",
        choices=("loss", "accuracy"),
    )
    eval_final_step: bool | None = setting(
        help="also evaluate the last step when max_steps is not a multiple of eval_steps"
    )
    eval_on_start: bool | None = setting(
        help="also evaluate dev before the first step (logged at step 0, as transformers' "
        "eval_on_start; never selected)"
    )
    max_nonfinite: int = setting(
        20, "stop after this many non-finite losses in a row", check=POSITIVE
    )
    # the optimizer (both trainers)
    learning_rate: float = setting(1e-5, check=LEARNING_RATE)
    weight_decay: float = setting(0.0, check=finite(0))
    wd_exempt: str | None = setting(
        help="names exempt from weight decay (default: bias_norm "
        "for OPT-side models, as large_models; none for RoBERTa, as medium_models)",
        choices=("bias_norm", "none"),
    )
    lr_scheduler_type: str | None = setting(choices=("constant", "linear"))
    optimizer: str | None = setting(choices=("sgd", "adam", "adamw"))
    momentum: float = setting(0.0, check=IN_UNIT_INTERVAL)
    max_grad_norm: float = setting(1.0, check=finite(0, False))
    # the zeroth-order step (zo.MeZOConfig; each method's own fields follow)
    zo_eps: float = setting(1e-3, check=finite(0, False), zo=True)
    seed: int = setting(42, check=SEED)
    seed_source: str = setting("generator", choices=("generator", "numpy_global"), zo=True)
    perturbation: str | None = setting(
        help="exact: virtual theta +- eps z in each forward; paired: both forwards as one over 2B "
        "rows (zo/paired.py); eager: exact, uncompiled; reference: the original's in-place moves "
        "(default: the estimator's: "
        + ", ".join(f"{name} {cls.PERTURBATION}" for name, cls in ESTIMATORS.items())
        + "; exact for greedy generations, which do not pair)",
        choices=("exact", "paired", "reference", "eager"),
        zo=True,
        unrecorded="exact",
    )
    estimator: str = setting(
        next(iter(methods.ESTIMATORS)),
        "; ".join(f"{n}: zo/{c.__module__.split('.')[-1]}.py" for n, c in ESTIMATORS.items()),
        choices=tuple(ESTIMATORS),
        zo=True,
    )
    distribution: str | None = setting(
        help="z (default: the estimator's: "
        + ", ".join(f"{name} {cls.DISTRIBUTION}" for name, cls in ESTIMATORS.items())
        + ")",
        choices=methods.DISTRIBUTIONS,
        zo=True,
    )
    normal_z: str = setting(
        DEFAULT_NORMAL_Z,
        "how normal z takes cos(2 pi u2) in Box-Muller: poly_cos, a polynomial (+ and * only, "
        "bitwise the same on every CPU); library_cos, the backend's cos (zo/rng.py)",
        choices=tuple(NORMAL_Z),
        zo=True,
        unrecorded="library_cos",  # the z of every run before the choice (issue 30)
    )
    zo_variant: str | None = setting(choices=("param_norm", "grad_norm"), zo=True)
    change_grad_estimate: bool | None = setting(zo=True)
    recompute_norms: bool | None = setting(zo=True)
    use_zo_grad_est: bool | None = setting(zo=True)
    non_diff: bool | None = setting(zo=True)
    # where and how it runs
    device: str = setting("auto", "auto: cuda:LOCAL_RANK when CUDA is there, else cpu", free=True)
    fsdp: bool = setting(False, "shard parameters with FSDP2 (torchrun)", switch=True)
    parallel: str = setting(
        "data",
        "what torchrun's ranks share: data: the batch, every rank the same z; directions: the "
        "step's z (--n_spsa or --fzoo_n), each rank its own on the whole batch",
        choices=("data", "directions"),
        free=True,
    )
    direction_groups: int | None = setting(
        help="--parallel directions: groups of ranks sharing the step's z, the ranks of a group "
        "splitting the batch (default: one group per rank)",
        check=POSITIVE,
        free=True,
    )
    dist_timeout: float = setting(
        600.0, "seconds before a rank gives up on a lost peer", check=finite(0, False), free=True
    )
    cuda_graphs: bool | None = setting(
        help="replay the MeZO step as CUDA graphs, one per batch shape (zo.CudaGraphStep)"
    )


# the method fields with a help text are flags too; the others stay MeZOConfig's own
METHOD_FIELDS = tuple(f for f in methods.fields() if f.help)


def _method_field(f: Field):
    return (f.name, f.type, setting(f.default, f.help, choices=f.choices, check=f.check, zo=True))


RunConfig = dataclasses.make_dataclass(
    "RunConfig", [_method_field(f) for f in METHOD_FIELDS], bases=(RunConfig,)
)
RunConfig.__module__ = __name__

RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
CONTROL_FLAGS = frozenset(f.name for f in dataclasses.fields(Command)) | {"help"}
SWITCHES = frozenset(
    f.name for cls in (Command, RunConfig) for f in dataclasses.fields(cls) if f.metadata["switch"]
)
# what --resume may change: where and how fast it runs, and how long (the checkpoint has the rest)
RESUME_FREE = frozenset(
    f.name for cls in (Command, RunConfig) for f in dataclasses.fields(cls) if f.metadata["free"]
)
# what only the zeroth-order step reads: --trainer fo refuses them set (flags.resolve)
ZO_ONLY = frozenset(f.name for f in dataclasses.fields(RunConfig) if f.metadata["zo"])
# what a run recorded before a field existed ran with (`unrecorded`)
UNRECORDED = {
    f.name: f.metadata["unrecorded"]
    for f in dataclasses.fields(RunConfig)
    if f.metadata["unrecorded"] is not None
}
CHECKS = {
    f.name: f.metadata["check"]
    for cls in (Command, RunConfig)
    for f in dataclasses.fields(cls)
    if f.metadata["check"] is not None
}


def scalar_type(field: dataclasses.Field) -> type:
    """The type a flag's value parses to: `int | None` -> int."""
    if isinstance(field.type, types.UnionType):
        return next(t for t in field.type.__args__ if t is not type(None))
    return field.type


def check_saved(saved: dict, where: str) -> None:
    """A run's config.json (--resume, --replay): each RunConfig field it holds of the field's type
    (None where the field may be None), among its choices and within its check; ValueError
    `<what> (<where>)` otherwise. A field it lacks (an older run's) takes its default."""
    if not isinstance(saved, dict):
        raise ValueError(f"config.json holds a {type(saved).__name__}, not an object ({where})")
    for field in dataclasses.fields(RunConfig):
        if field.name not in saved:
            continue
        value, kind, meta = saved[field.name], scalar_type(field), field.metadata
        if value is None:
            ok = isinstance(field.type, types.UnionType)
        else:  # JSON writes a float that is whole as a float, an int never as a bool
            kinds = (int, float) if kind is float else (kind,)
            ok = isinstance(value, kinds) and (kind is bool or not isinstance(value, bool))
            ok = ok and (meta["choices"] is None or value in meta["choices"])
            ok = ok and (meta["check"] is None or meta["check"].ok(value))
        if not ok:
            raise ValueError(
                f"config.json holds {field.name}={value!r}, not a value of it ({where})"
            )


def values(args) -> dict:
    """The RunConfig fields of a parsed (or resolved) command line, in declaration order."""
    return {name: getattr(args, name) for name in RUN_FIELDS}


def as_recorded(saved: dict) -> dict:
    """A run's record (its config.json, a checkpoint's run settings) with each field it predates
    set to the value the run used (UNRECORDED), so --resume and --replay run it as it ran; a
    backprop run used no zeroth-order field (ZO_ONLY), so none is filled in for it."""
    backprop = saved.get("trainer") == "fo"
    return {
        **{k: v for k, v in UNRECORDED.items() if not (backprop and k in ZO_ONLY)},
        **saved,
    }
