"""train.py's command line: the parser, --preset as defaults, and the family-dependent defaults.

Imports no model code: train.py reads the model family (`model_type` of config.json) and passes it
to `resolve`. The defaults are the original's (large_models/mezo.sh, run.py, HF TrainingArguments).
"""

import argparse
import math
import os
import re
import sys

import torch

from data import DataError, get_task
from zo import FOConfig, MeZOConfig, check_supported, methods
from zo.optim import WD_EXEMPT

from .paper import presets

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def _bool(value: str) -> bool:
    """A boolean flag's value, as transformers' HfArgumentParser reads it; anything else is a user
    mistake."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


BOOL = dict(nargs="?", const=True, default=None, type=_bool)
# Flags that steer the command itself rather than a run (not written by the grid runner).
CONTROL_FLAGS = frozenset(
    {
        "help",
        "preset",
        "list_presets",
        "dry_run",
        "grid",
        "slurm",
        "nproc",
        "resume",
        "overwrite_output_dir",
        "replay",
    }
)


class Parser(argparse.ArgumentParser):
    # one line `error: <what> (<where>)`, exit 2, instead of usage + message
    def error(self, message):
        print(f"error: {message} (command line)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = Parser(description="MeZO fine-tuning (Malladi et al. 2023).")
    a = p.add_argument
    (
        a("--task", default="SST2"),
        a("--model", help="checkpoint dir or cached hub name (default: the embedded tiny OPT)"),
    )
    (
        a("--mode", choices=("ft", "prefix", "lora"), default="ft"),
        a("--trainer", choices=("zo", "fo"), default="zo"),
    )
    a("--data_dir"), a("--output_dir")
    a(
        "--preset",
        help="a configuration of the paper (see --list-presets); flags given here override it",
    )
    (
        a("--list-presets", dest="list_presets", action="store_true"),
        a("--dry-run", dest="dry_run", action="store_true"),
    )
    a(
        "--grid",
        action="store_true",
        help="run every grid point of --preset under --output_dir, skipping finished ones",
    )
    a(
        "--slurm",
        metavar="DIR",
        help="with --preset: write one sbatch script per grid point into DIR",
    )
    a("--nproc", type=int, default=1, help="GPUs per job in --slurm scripts")
    a("--resume", action="store_true"), a("--overwrite_output_dir", action="store_true")
    a(
        "--replay",
        metavar="RUN_DIR",
        help="rebuild RUN_DIR's selected model from its base model and trajectory",
    )
    a("--fsdp", action="store_true", help="shard parameters with FSDP2 (torchrun)")
    a(
        "--dist_timeout",
        type=float,
        default=600.0,
        help="seconds before a rank gives up on a lost peer",
    )
    # hyperparameters, with the original's defaults (mezo.sh, run.py, HF TrainingArguments)
    (
        a("--batch_size", type=int, default=16, help="global batch"),
        a("--learning_rate", type=float, default=1e-5),
    )
    a("--zo_eps", type=float, default=1e-3), a("--max_steps", type=int, default=20000)
    (
        a("--num_train_epochs", type=float),
        a("--eval_steps", type=int, default=4000),
        a("--save_steps", type=int),
    )
    a("--logging_steps", type=int, default=10), a("--seed", type=int, default=42)
    a("--train_set_seed", type=int, help="data seed (default 0 for OPT, 42 for RoBERTa)")
    a("--k", type=int, default=16), a("--num_train", type=int), a("--num_dev", type=int)
    a("--num_eval", type=int, default=1000), a("--dtype", choices=DTYPE_NAMES, default="fp32")
    (
        a("--weight_decay", type=float, default=0.0),
        a("--lr_scheduler_type", choices=("constant", "linear")),
    )
    a("--optimizer", choices=("sgd", "adam", "adamw")), a("--momentum", type=float, default=0.0)
    (
        a("--num_prefix", type=int, default=5),
        a("--lora_r", type=int, default=8),
        a("--lora_alpha", type=float, default=16),
    )
    a("--perturbation", choices=("exact", "reference", "eager"), default="exact")
    methods.add_flags(p, boolean=_bool)  # --estimator, --distribution, each method's own flags
    a("--seed_source", choices=("generator", "numpy_global"), default="generator")
    a("--zo_variant", choices=("param_norm", "grad_norm")), a("--change_grad_estimate", **BOOL)
    (
        a("--recompute_norms", **BOOL),
        a("--use_zo_grad_est", **BOOL),
        a("--gradient_accumulation_steps", type=int, default=1),
    )
    a(
        "--select_by",
        choices=("loss", "accuracy"),
        help="keep the best dev model by (default: loss for OPT, "
        "accuracy for RoBERTa; with --non_diff the last model, as the original)",
    )
    a(
        "--eval_final_step",
        **BOOL,
        help="also evaluate the last step when max_steps is not a multiple of eval_steps",
    )
    a(
        "--eval_on_start",
        **BOOL,
        help="also evaluate dev before the first step (logged at step 0, as transformers' "
        "eval_on_start; never selected)",
    )
    a(
        "--wd_exempt",
        choices=("bias_norm", "none"),
        help="names exempt from weight decay (default: bias_norm "
        "for OPT-side models, as large_models; none for RoBERTa, as medium_models)",
    )
    a("--non_diff", **BOOL), a("--train_as_classification", **BOOL)
    (
        a("--no_bos_override", **BOOL),
        a("--max_length", type=int, default=2048),
        a("--max_grad_norm", type=float, default=1.0),
    )
    a(
        "--max_nonfinite",
        type=int,
        default=20,
        help="stop after this many non-finite losses in a row",
    )
    (
        a("--eval_batch_size", type=int, default=8),
        a("--device", default="auto", help="auto: cuda:LOCAL_RANK when CUDA is there, else cpu"),
    )
    a(
        "--cuda_graphs",
        **BOOL,
        help="replay the MeZO step as CUDA graphs, one per batch shape (zo.CudaGraphStep)",
    )
    a(
        "--per_candidate",
        **BOOL,
        help="score classification as the original: one sequence per candidate "
        "(default: one shared prompt per example; --perturbation reference implies it)",
    )
    return p


# train.py's run flags, in the parser's order; a preset or a grid point sets nothing else.
TRAIN_FLAGS = tuple(a.dest for a in build_parser()._actions if a.dest not in CONTROL_FLAGS)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_presets:
        return args
    if args.preset:  # the preset becomes the defaults, so flags given on the command line still win
        fixed, grid = presets.resolve(
            args.preset, args.task, args.k if args.preset.startswith("roberta") else None
        )
        unknown = sorted(set(fixed) - set(TRAIN_FLAGS) | set(grid) - set(TRAIN_FLAGS))
        if unknown:
            raise DataError(
                f"preset {args.preset} sets flags train.py does not have: {', '.join(unknown)} "
                "(--preset)"
            )
        p.set_defaults(**fixed, **{k: values[0] for k, values in grid.items()})
        args = p.parse_args(argv)
        args.grid_axes = grid
    return args


def explicit_flags(argv):
    """The run flags given on the command line (for --grid: they override every point)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    control = CONTROL_FLAGS | {"output_dir", "task", "k"}
    return {k: v for k, v in vars(p.parse_args(argv)).items() if k not in control}


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
    if args.trainer == "zo":  # the parts of the step support each other (zo.methods: the one list)
        check_supported(
            mezo_config(args),
            cuda_graphs=bool(args.cuda_graphs),
            fsdp=args.fsdp,
            data_parallel=world > 1,
        )
    if args.output_dir is None:
        name = os.path.basename(os.path.normpath(str(args.model)))
        args.output_dir = os.path.join(
            "runs",
            f"{task.name}-{name}-{args.trainer}-{args.mode}-{args.learning_rate}-"
            f"{args.zo_eps}-{args.train_set_seed}",
        )
    return args


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
    optimizer = (
        "adam" if args.optimizer in ("adam", "adamw") else ("momentum" if args.momentum else "sgd")
    )
    return MeZOConfig(
        lr=args.learning_rate,
        eps=args.zo_eps,
        weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler_type,
        wd_exempt=wd_exempt(args),
        max_steps=args.max_steps,
        perturbation={"exact": "fused"}.get(args.perturbation, args.perturbation),
        seed=args.seed,
        seed_source=args.seed_source,
        optimizer=optimizer,
        momentum=args.momentum or 0.9,
        zo_variant=args.zo_variant,
        change_grad_estimate=bool(args.change_grad_estimate),
        recompute_norms=bool(args.recompute_norms),
        use_zo_grad_est=bool(args.use_zo_grad_est),
        **methods.config_kwargs(args),  # --estimator, --distribution, each method's own flags
    )


def fo_config(args):
    """The zo.FOConfig of a resolved command line (--trainer fo: the backprop rows)."""
    return FOConfig(
        lr=args.learning_rate,
        optimizer="sgd" if args.optimizer == "sgd" else "adam",
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


def resumed_args(argv, saved: dict):
    """--resume: the run's config.json (`saved`) supplies every flag not given now."""
    parser = build_parser()
    dests = {action.dest for action in parser._actions} - {"resume", "output_dir"}
    parser.set_defaults(**{k: v for k, v in saved.items() if k in dests})
    return parser.parse_args(argv)


def finite(low, inclusive=True):
    return (
        lambda v: math.isfinite(v) and (v >= low if inclusive else v > low),
        f"{'>=' if inclusive else '>'} {low:g} and finite",
    )


def at_least(low):
    return (lambda v: v >= low, f">= {low}")


SEED = (lambda v: 0 <= v < 2**32, "in [0, 2**32)")  # numpy's legacy seeding takes no more
RULES = {
    "learning_rate": finite(0),
    "weight_decay": finite(0),
    "zo_eps": finite(0, False),
    "max_grad_norm": finite(0, False),
    "dist_timeout": finite(0, False),
    "lora_alpha": finite(0, False),
    "num_train_epochs": finite(0, False),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": SEED,
    "train_set_seed": SEED,
    "max_length": at_least(2),
    "num_train": at_least(1),
    "num_dev": at_least(0),
    "max_new_tokens": at_least(1),
    **{
        name: at_least(1)
        for name in (
            "max_steps",
            "eval_steps",
            "save_steps",
            "logging_steps",
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "num_prefix",
            "max_nonfinite",
            "k",
            "nproc",
            "num_eval",
        )
    },
}


def check_values(args, rules=RULES) -> None:
    """Every value in range (finite, positive, ...) before anything runs; DataError naming the
    flag. The method flags' checks are their methods' (zo.methods.flag_checks)."""
    for name, (ok, what) in {**rules, **methods.flag_checks()}.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise DataError(f"{name} must be {what} (--{name} {value})")
    check_device(args.device)


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where it is available."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is None:
        raise DataError(f"unknown device, expected auto, cpu, cuda or cuda:N (--device {device})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"CUDA is not available on this machine (--device {device})")
