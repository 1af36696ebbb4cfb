"""train.py's command line, derived from program/config.py: the parser, --preset as defaults,
--resume's saved flags, the value checks, the family-dependent defaults and the zo configs.

Imports no model code: train.py reads the model family (`model_type` of config.json) and passes it
to `resolve`.
"""

import argparse
import dataclasses
import os
import re
import sys

import torch

from data import DataError, get_task
from zo import FOConfig, MeZOConfig, check_supported
from zo.methods import ESTIMATORS
from zo.optim import WD_EXEMPT

from . import config
from .paper import presets


def _bool(value: str) -> bool:
    """A boolean flag's value, as transformers' HfArgumentParser reads it; anything else is a user
    mistake."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class Parser(argparse.ArgumentParser):
    # one line `error: <what> (<where>)`, exit 2, instead of usage + message
    def error(self, message):
        print(f"error: {message} (command line)", file=sys.stderr)
        sys.exit(2)


def _add(parser, field: dataclasses.Field) -> None:
    """One flag from a field of program/config.py: its name, type, default, help and choices."""
    meta = dict(field.metadata["arg"])
    spelling = meta.pop("flag", f"--{field.name}")
    common = dict(dest=field.name, default=field.default, help=field.metadata["help"], **meta)
    if field.metadata["switch"]:
        parser.add_argument(spelling, action="store_true", **common)
    elif config.scalar_type(field) is bool:  # --flag, --flag true, --flag false
        parser.add_argument(spelling, nargs="?", const=True, type=_bool, **common)
    else:
        kind = config.scalar_type(field)
        parser.add_argument(spelling, type=kind, choices=field.metadata["choices"], **common)


def build_parser():
    p = Parser(description="MeZO fine-tuning (Malladi et al. 2023).")
    for cls in (config.Command, config.RunConfig):
        for field in dataclasses.fields(cls):
            _add(p, field)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_presets:
        return args
    if args.preset:  # the preset becomes the defaults, so flags given on the command line still win
        fixed, grid = presets.resolve(
            args.preset, args.task, args.k if args.preset.startswith("roberta") else None
        )
        unknown = sorted(set(fixed) - set(config.RUN_FIELDS) | set(grid) - set(config.RUN_FIELDS))
        if unknown:
            raise DataError(
                f"preset {args.preset} sets flags train.py does not have: {', '.join(unknown)} "
                "(--preset)"
            )
        p.set_defaults(**fixed, **{k: values[0] for k, values in grid.items()})
        args = p.parse_args(argv)
        args.grid_axes = grid
    return args


def given_flags(argv) -> dict:
    """The flags given on the command line, by destination, with their values."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def explicit_flags(argv):
    """The run flags given on the command line (for --grid: they override every point)."""
    control = config.CONTROL_FLAGS | {"output_dir", "task", "k"}
    return {k: v for k, v in given_flags(argv).items() if k not in control}


def resumed_args(argv, saved: dict):
    """--resume: the run's config.json (`saved`) supplies every flag not given now."""
    parser = build_parser()
    dests = {action.dest for action in parser._actions} - {"resume", "output_dir"}
    parser.set_defaults(**{k: v for k, v in saved.items() if k in dests})
    return parser.parse_args(argv)


def check_values(args, checks=config.CHECKS) -> None:
    """Every value in range (finite, positive, ...) before anything runs, by the checks the fields
    declare (program/config.py); DataError naming the flag."""
    for name, check in checks.items():
        value = getattr(args, name, None)
        if value is not None and not check.ok(value):
            raise DataError(f"{name} must be {check.what} (--{name} {value})")
    check_device(args.device)


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where it is available."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is None:
        raise DataError(f"unknown device, expected auto, cpu, cuda or cuda:N (--device {device})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"CUDA is not available on this machine (--device {device})")


# what `resolve` fills in where the command line left it None: a run's config.json holds each
RESOLVED = (
    "train_set_seed",
    "wd_exempt",
    "lr_scheduler_type",
    "optimizer",
    "save_steps",
    "num_train",
)


def resolve(args, model_type) -> argparse.Namespace:
    """The run's flags with the defaults that depend on the model family and trainer filled in
    (a new Namespace; `args` is left as it was); values checked (ValueError). `model_type` is the
    model's config.json `model_type` (None: decided by the task)."""
    args = argparse.Namespace(**vars(args))
    task = get_task(args.task, family=model_type)
    roberta = task.family == "roberta"
    args.task, args.family = task.name, task.family
    args.train_set_seed = (
        (42 if roberta else 0) if args.train_set_seed is None else args.train_set_seed
    )
    if args.select_by is None and not args.non_diff:  # non-differentiable runs keep the last model
        args.select_by = "accuracy" if roberta else "loss"
    args.wd_exempt = args.wd_exempt or ("none" if roberta else "bias_norm")
    args.lr_scheduler_type = args.lr_scheduler_type or (
        "constant" if args.trainer == "zo" else "linear"
    )
    args.optimizer = args.optimizer or ("sgd" if args.trainer == "zo" else "adamw")
    args.save_steps = args.save_steps or args.eval_steps
    if args.num_train is None:  # the original's 1000 (mezo.sh); the bundled samples are small
        args.num_train = 1000 if args.data_dir else 64
    # bundled samples: 16 dev rows by default; a size given (or a
    if not args.data_dir and not roberta:
        # preset's 500) keeps at least two thirds of the sample's training rows for training
        args.num_dev = (
            16 if args.num_dev is None else min(args.num_dev, len(task.load(None)["train"]) // 3)
        )
    if args.non_diff and args.trainer != "zo":
        raise DataError("the non-differentiable objective needs --trainer zo (--non_diff)")
    if args.trainer == "fo":
        check_zo_only_unset(args)
    if args.trainer == "zo" and args.perturbation is None:  # greedy generations do not pair
        generations = args.non_diff and not roberta
        args.perturbation = "exact" if generations else ESTIMATORS[args.estimator].PERTURBATION
    if args.non_diff and not roberta and args.perturbation == "paired":
        raise DataError(
            "greedy generations (-F1) do not pair: each sign generates its own answers; use "
            "--perturbation exact (--perturbation paired)"
        )
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and (args.trainer == "fo" or args.zo_variant):
        raise DataError(
            "the backprop baseline and the variance-modified variants run on one process "
            f"(WORLD_SIZE={world})"
        )
    if args.fsdp and (args.non_diff or args.perturbation == "reference" or args.trainer == "fo"):
        raise DataError(
            "--fsdp runs MeZO with exact perturbations and a differentiable loss "
            "(greedy generations differ in length across ranks) (--fsdp)"
        )
    if args.cuda_graphs:
        check_cuda_graphs(args, world)
    groups = direction_groups(args, world)
    if args.trainer == "zo":  # the parts of the step support each other (zo.methods: the one list)
        cfg = mezo_config(args)
        try:
            check_supported(
                cfg,
                cuda_graphs=bool(args.cuda_graphs),
                fsdp=args.fsdp,
                data_parallel=world // groups > 1,
                direction_groups=groups if args.parallel == "directions" else None,
            )
        except ValueError as e:  # the parts it names were chosen by the flags
            raise DataError(f"{e} (command line)") from None
    if args.fsdp and "RANK" not in os.environ:  # torch's own error would name no flag
        raise DataError("FSDP shards the model across the processes torchrun starts (--fsdp)")
    if args.output_dir is None:
        name = os.path.basename(os.path.normpath(str(args.model)))
        args.output_dir = os.path.join(
            "runs",
            f"{task.name}-{name}-{args.trainer}-{args.mode}-{args.learning_rate}-"
            f"{args.zo_eps}-{args.train_set_seed}",
        )
    return args


def check_zo_only_unset(args) -> None:
    """--trainer fo with a flag only the zeroth-order step reads, set away from its default: it
    would do nothing (DataError)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config.RunConfig)}
    for name in sorted(config.ZO_ONLY):
        if getattr(args, name) not in (defaults[name], None, False):
            raise DataError(
                f"--{name} does nothing with --trainer fo: only the zeroth-order step reads it "
                f"(--{name} {getattr(args, name)})"
            )


def direction_groups(args, world: int) -> int:
    """The direction groups of --parallel directions on `world` ranks (1: data parallelism, every
    rank the same z); DataError for a mesh that cannot be built. One process with --parallel
    directions is the one-group case: the same step, checked the same way."""
    if args.parallel != "directions":
        if args.direction_groups is not None:
            raise DataError(
                f"--direction_groups needs --parallel directions "
                f"(--direction_groups {args.direction_groups})"
            )
        return 1
    if args.trainer != "zo" or args.fsdp:
        raise DataError(
            "directions are shared among replicas of a zeroth-order step, not with "
            f"{'--trainer fo' if args.trainer != 'zo' else '--fsdp'} (--parallel directions)"
        )
    groups = args.direction_groups or world
    if world % groups:
        raise DataError(
            f"WORLD_SIZE={world} does not split into {groups} direction groups "
            f"(--direction_groups {groups})"
        )
    return groups


def check_cuda_graphs(args, world):
    """--cuda_graphs needs CUDA and a loop that zo.CudaGraphStep can capture (DataError otherwise);
    what
    the step's parts support is zo.check_supported's (resolve)."""
    if not torch.cuda.is_available() or args.device.startswith("cpu"):
        raise DataError(
            f"CUDA graphs need a CUDA device (--cuda_graphs; torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}, --device {args.device})"
        )
    other = {
        "--trainer fo": args.trainer != "zo",
        "--non_diff": args.non_diff,
        "--gradient_accumulation_steps": args.gradient_accumulation_steps > 1,
    }
    if any(other.values()):
        raise DataError(
            "CUDA graphs capture one plain ZO-SGD step on one process, not with "
            f"{', '.join(k for k, v in other.items() if v)} (--cuda_graphs)"
        )


def wd_exempt(args) -> tuple[str, ...]:
    """large_models' zo_update exempts bias and LayerNorm names; medium_models decays every
    parameter."""
    return WD_EXEMPT if args.wd_exempt == "bias_norm" else ()


def mezo_config(args):
    """The zo.MeZOConfig of a resolved command line (train.py builds MeZO and replays with it)."""
    return MeZOConfig(
        lr=args.learning_rate,
        eps=args.zo_eps,
        weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler_type,
        wd_exempt=wd_exempt(args),
        max_steps=args.max_steps,
        perturbation=args.perturbation,
        seed=args.seed,
        seed_source=args.seed_source,
        optimizer=args.optimizer,
        momentum=args.momentum,
        zo_variant=args.zo_variant,
        change_grad_estimate=bool(args.change_grad_estimate),
        recompute_norms=bool(args.recompute_norms),
        use_zo_grad_est=bool(args.use_zo_grad_est),
        estimator=args.estimator,
        distribution=args.distribution,
        normal_z=args.normal_z,
        **{f.name: getattr(args, f.name) for f in config.METHOD_FIELDS},
    )


def fo_config(args):
    """The zo.FOConfig of a resolved command line (--trainer fo: the backprop rows)."""
    return FOConfig(
        lr=args.learning_rate,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        wd_exempt=wd_exempt(args),
        momentum=args.momentum,
        lr_scheduler=args.lr_scheduler_type,
        max_steps=args.max_steps,
        clip_grad_norm=args.max_grad_norm,
    )


def replace(args, **changes) -> argparse.Namespace:
    """A copy of `args` with `changes` (the builders return settings; nothing edits a Namespace)."""
    return argparse.Namespace(**{**vars(args), **changes})
