"""Hyperparameter presets: the paper's grids (Tables 15 and 16) and the READMEs' example points.

A preset resolves, for one task (and for RoBERTa one k), to the train.py flags it fixes plus a grid
(flag -> list of values). `grid_points` expands the grid into one full flag dict per run,
program/paper/names.py `run_name` names a run's folder; program/paper/grid.py runs the points or
writes SLURM scripts for them:

    for point in grid_points("opt-mezo-ft", "sst2"):
        print(run_name(point), point)

Rules the grids share, from the original scripts:
- OPT (large_models/mezo.sh, finetune.sh): 1000 train / 500 dev / 1000 test examples drawn with
  seed 0; CB and Copa keep only 100 dev examples; Copa, ReCoRD, SQuAD and DROP train on the
  answer's language-model loss (`train_as_classification` False), the others on the
  classification loss; the best checkpoint is the one with the lowest dev loss (and the report
  picks among grid points by the same rule).
- RoBERTa (medium_models/mezo.sh, finetune.sh, run_fewshot.sh): k-shot data (k = 16 or 512 per
  class) for each of the five data seeds, which are also the training seeds (`--seed $SEED`);
  every grid point runs on every seed, and the best checkpoint has the highest dev accuracy.
  Table 18 reports, per seed, the grid point with the best dev accuracy, averaged over seeds.
"""

import itertools
import math
from dataclasses import dataclass, field

from data import DataError
from data.registry import get_task
from program.paper.names import canonical_task, fmt
from program.paper.numbers import GENERATION_TASKS

# Plain data: presets name RunConfig's fields (program/config.py); program/flags.py applies a preset
# and refuses any name that is not one of them.
ROBERTA_SEEDS = (13, 21, 42, 87, 100)  # LM-BFF k-shot splits (tools/generate_k_shot_data.py)
ROBERTA_K = (16, 512)

# Train splits smaller than num_train + num_dev: the original (large_models/run.py) keeps the last
# num_dev examples for dev and trains on the rest (CB 150, Copa 300, WSC only 54).
_OPT_SMALL_TRAIN_SPLITS = {"cb": 250, "copa": 400, "wsc": 554}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "opt" | "roberta"
    source: str  # where the numbers come from
    fixed: dict  # flags shared by every task
    grid: dict = field(default_factory=dict)  # flag -> values
    task_grid: dict = field(default_factory=dict)  # task -> {flag: values} replacing `grid`'s
    # k -> {flag: values}, first axes (FT batch sizes)
    k_grid: dict = field(default_factory=dict)
    tasks: tuple = ()  # the tasks it applies to; () = all of the family's


# --- base settings --------------------------------------------------------------------------
_PREFIX = dict(mode="prefix", num_prefix=5)  # --prefix_tuning --num_prefix 5 (real-act init)
_LORA = dict(mode="lora", lora_r=8, lora_alpha=16)

# large_models/mezo.sh + run.py defaults + Table 16: BS 16, WD 0, 20K steps, constant LR,
# best checkpoint checked every 4000 steps (1/5 of training). --load_float16: pure fp16 weights.
_OPT = dict(
    model="facebook/opt-13b",
    num_train=1000,
    num_eval=1000,
    train_set_seed=0,
    seed=42,
    max_length=2048,
    logging_steps=10,
    weight_decay=0.0,
    select_by="loss",
)
_OPT_MEZO = dict(
    _OPT,
    trainer="zo",
    mode="ft",
    dtype="fp16",
    batch_size=16,
    max_steps=20_000,
    eval_steps=4_000,
    save_steps=4_000,
    lr_scheduler_type="constant",
    optimizer="sgd",
)
# large_models/finetune.sh + Table 16: BS 8, 5 epochs, HF defaults (AdamW, linear decay, no
# warmup), evaluation per epoch. The original trains fp32 weights under fp16 autocast (--fp16).
_OPT_FT = dict(
    _OPT,
    trainer="fo",
    mode="ft",
    dtype="fp32",
    batch_size=8,
    num_train_epochs=5,
    lr_scheduler_type="linear",
    optimizer="adamw",
)
# README non-diff example: --evaluation_strategy no --save_strategy no, i.e. the last model
# (train.py keeps the last model of a --non_diff run without --select_by).
_NONDIFF = dict(non_diff=True, eval_steps=20_000, save_steps=20_000, select_by=None)

# medium_models/mezo.sh + Table 15: BS 64, 100K steps, constant LR, dev check every 10K steps.
_ROBERTA = dict(
    model="roberta-large", dtype="fp32", logging_steps=10, weight_decay=0.0, select_by="accuracy"
)
_ROBERTA_MEZO = dict(
    _ROBERTA,
    trainer="zo",
    mode="ft",
    batch_size=64,
    max_steps=100_000,
    eval_steps=10_000,
    save_steps=10_000,
    lr_scheduler_type="constant",
    optimizer="sgd",
)
# medium_models/finetune.sh: 1K steps, dev check every 100, linear decay; its "adam" is
# transformers.AdamW.
_ROBERTA_FT = dict(
    _ROBERTA,
    trainer="fo",
    mode="ft",
    max_steps=1_000,
    eval_steps=100,
    save_steps=100,
    lr_scheduler_type="linear",
    optimizer="adamw",
)
_ROBERTA_README = dict(train_set_seed=42)  # the README examples use K=16 SEED=42


def _squad_drop(learning_rates):
    return {task: {"learning_rate": learning_rates} for task in GENERATION_TASKS}


def _lr(*values):
    return {"learning_rate": list(values)}


_PRESETS = {
    p.name: p
    for p in [
        # ---- OPT, paper Table 16 (grids; test score of the best dev loss) ----
        Preset(
            "opt-mezo-ft",
            "opt",
            "Table 16 MeZO; large_models/mezo.sh",
            dict(_OPT_MEZO, zo_eps=1e-3),
            _lr(1e-6, 1e-7),
            _squad_drop([1e-6, 5e-7, 1e-7]),
        ),
        Preset(
            "opt-mezo-prefix",
            "opt",
            "Table 16 MeZO (prefix); large_models/mezo.sh MODE=prefix",
            dict(_OPT_MEZO, **_PREFIX, zo_eps=1e-1),
            _lr(1e-2, 1e-3),
            _squad_drop([5e-2, 1e-2, 5e-3]),
        ),
        Preset(
            "opt-mezo-lora",
            "opt",
            "Table 16 MeZO (LoRA); large_models/mezo.sh MODE=lora",
            dict(_OPT_MEZO, **_LORA, zo_eps=1e-2),
            _lr(1e-4, 5e-5),
            _squad_drop([1e-4, 5e-5, 1e-5]),
        ),
        Preset(
            "opt-ft",
            "opt",
            "Table 16 FT; large_models/finetune.sh",
            dict(_OPT_FT),
            _lr(1e-5, 5e-5, 8e-5),
        ),
        # ---- OPT, non-differentiable objective (F1 of greedy generations), Appendix E.6 ----
        Preset(
            "opt-mezo-ft-nondiff",
            "opt",
            "Appendix E.6 (SQuAD, MeZO maximising F1)",
            dict(_OPT_MEZO, **_NONDIFF, zo_eps=1e-3),
            _lr(1e-6, 5e-6, 1e-5),
            tasks=("squad",),
        ),
        Preset(
            "opt-mezo-prefix-nondiff",
            "opt",
            "Appendix E.6 (SQuAD, MeZO (prefix) maximising F1)",
            dict(_OPT_MEZO, **_PREFIX, **_NONDIFF, zo_eps=1e-1),
            _lr(1e-1, 5e-2, 1e-2),
            tasks=("squad",),
        ),
        # ---- OPT, single points: large_models/README.md example commands (OPT-13B) ----
        Preset(
            "opt-mezo-ft-readme",
            "opt",
            "large_models/README.md: MODE=ft LR=1e-7 EPS=1e-3",
            dict(_OPT_MEZO, learning_rate=1e-7, zo_eps=1e-3),
        ),
        Preset(
            "opt-mezo-prefix-readme",
            "opt",
            "large_models/README.md: MODE=prefix LR=1e-3 EPS=1e-1",
            dict(_OPT_MEZO, **_PREFIX, learning_rate=1e-3, zo_eps=1e-1),
        ),
        Preset(
            "opt-mezo-lora-readme",
            "opt",
            "large_models/README.md: MODE=lora LR=5e-5 EPS=1e-2",
            dict(_OPT_MEZO, **_LORA, learning_rate=5e-5, zo_eps=1e-2),
        ),
        Preset(
            "opt-mezo-prefix-nondiff-readme",
            "opt",
            "large_models/README.md: TASK=SQuAD MODE=prefix LR=1e-2 EPS=1e-1 --non_diff",
            dict(_OPT_MEZO, **_PREFIX, **_NONDIFF, learning_rate=1e-2, zo_eps=1e-1),
            tasks=("squad",),
        ),
        # ---- RoBERTa-large, paper Table 15 (grids x the five data seeds) ----
        Preset(
            "roberta-mezo-ft",
            "roberta",
            "Table 15 MeZO; medium_models/mezo.sh",
            dict(_ROBERTA_MEZO, zo_eps=1e-3),
            _lr(1e-7, 1e-6, 1e-5),
        ),
        Preset(
            "roberta-mezo-prefix",
            "roberta",
            "Table 15 MeZO (prefix); medium_models/mezo.sh + prefix",
            dict(_ROBERTA_MEZO, **_PREFIX, zo_eps=1e-1),
            _lr(1e-2, 5e-3, 1e-3),
        ),
        Preset(
            "roberta-mezo-lora",
            "roberta",
            "Table 15 MeZO (LoRA), WD 0.1; medium_models/mezo.sh + LoRA",
            dict(_ROBERTA_MEZO, **_LORA, zo_eps=1e-3, weight_decay=0.1),
            _lr(1e-5, 5e-5, 1e-4),
        ),
        Preset(
            "roberta-mezo-adam",
            "roberta",
            "Table 7 / Table 15 MeZO-Adam (ZO gradient, Adam update)",
            dict(_ROBERTA_MEZO, zo_eps=1e-3, optimizer="adamw"),
            _lr(1e-6, 1e-5, 1e-4, 5e-4, 1e-3),
        ),
        Preset(
            "roberta-mezo-ablation",
            "roberta",
            "Table 4 MeZO hyperparameter ablation grid",
            dict(_ROBERTA_MEZO),
            {
                "batch_size": [16, 64],
                "learning_rate": [1e-5, 1e-6, 1e-7],
                "zo_eps": [1e-3, 1e-5],
                "weight_decay": [0.0, 0.1],
            },
        ),
        Preset(
            "roberta-ft-adam",
            "roberta",
            "Table 15 FT with Adam; medium_models/finetune.sh",
            dict(_ROBERTA_FT),
            _lr(1e-5, 3e-5, 5e-5),
            k_grid={16: {"batch_size": [2, 4, 8]}, 512: {"batch_size": [8, 16, 32]}},
        ),
        Preset(
            "roberta-ft-sgd",
            "roberta",
            "Table 15 FT with SGD (batch grid of FT with Adam)",
            dict(_ROBERTA_FT, optimizer="sgd"),
            _lr(1e-4, 5e-4, 1e-3, 5e-3, 1e-2),
            k_grid={16: {"batch_size": [2, 4, 8]}, 512: {"batch_size": [8, 16, 32]}},
        ),
        Preset(
            "roberta-ft-prefix",
            "roberta",
            "Table 15 FT (prefix); medium_models/finetune.sh + prefix",
            dict(_ROBERTA_FT, **_PREFIX),
            {"batch_size": [8, 16, 32], **_lr(1e-2, 3e-2, 5e-2)},
        ),
        Preset(
            "roberta-ft-lora",
            "roberta",
            "Table 15 FT (LoRA); medium_models/finetune.sh + LoRA",
            dict(_ROBERTA_FT, **_LORA),
            {"batch_size": [4, 8, 16], **_lr(1e-4, 3e-4, 5e-4)},
        ),
        # ---- RoBERTa, single points: medium_models/README.md example commands (K=16 SEED=42) ----
        Preset(
            "roberta-mezo-ft-readme",
            "roberta",
            "medium_models/README.md: BS=64 LR=1e-6 EPS=1e-3",
            dict(_ROBERTA_MEZO, **_ROBERTA_README, learning_rate=1e-6, zo_eps=1e-3),
        ),
        Preset(
            "roberta-mezo-prefix-readme",
            "roberta",
            "medium_models/README.md: BS=64 LR=1e-2 EPS=1e-1 + prefix",
            dict(_ROBERTA_MEZO, **_ROBERTA_README, **_PREFIX, learning_rate=1e-2, zo_eps=1e-1),
        ),
        Preset(
            "roberta-mezo-lora-readme",
            "roberta",
            "medium_models/README.md: BS=64 LR=1e-4 EPS=1e-3 + LoRA",
            dict(_ROBERTA_MEZO, **_ROBERTA_README, **_LORA, learning_rate=1e-4, zo_eps=1e-3),
        ),
        Preset(
            "roberta-ft-adam-readme",
            "roberta",
            "medium_models/README.md: finetune.sh BS=8 LR=1e-5",
            dict(_ROBERTA_FT, **_ROBERTA_README, batch_size=8, learning_rate=1e-5),
        ),
        Preset(
            "roberta-ft-prefix-readme",
            "roberta",
            "medium_models/README.md: finetune.sh BS=8 LR=1e-2 + prefix",
            dict(_ROBERTA_FT, **_ROBERTA_README, **_PREFIX, batch_size=8, learning_rate=1e-2),
        ),
        Preset(
            "roberta-ft-lora-readme",
            "roberta",
            "medium_models/README.md: finetune.sh BS=8 LR=1e-4 + LoRA",
            dict(_ROBERTA_FT, **_ROBERTA_README, **_LORA, batch_size=8, learning_rate=1e-4),
        ),
    ]
}


# --- resolution -----------------------------------------------------------------------------
def _get(name):
    if name not in _PRESETS:
        raise DataError(f"unknown preset '{name}' (known: {', '.join(_PRESETS)})")
    return _PRESETS[name]


def list_presets():
    return list(_PRESETS)


def _task_flags(preset, task, fixed):
    """Flags that depend on the task (the `case $TASK` blocks of the original scripts), which the
    task registry records: OPT's dev size and loss (mezo.sh), RoBERTa's --max_seq_len
    (run_fewshot.sh)."""
    if preset.family == "roberta":
        return {"max_length": task.max_seq_length}
    flags = {"train_as_classification": task.train_as_classification, "num_dev": task.num_dev}
    if "num_train_epochs" in fixed:  # finetune.sh evaluates and saves once per epoch
        split = _OPT_SMALL_TRAIN_SPLITS.get(canonical_task(task.name), math.inf)
        num_train = min(fixed["num_train"], split - flags["num_dev"])
        flags["eval_steps"] = flags["save_steps"] = math.ceil(num_train / fixed["batch_size"])
    return flags


def resolve(name, task, k=None):
    """-> (fixed, grid): the flags every run of `name` on `task` shares, and flag -> values.

    RoBERTa presets need k (16 or 512) and, unless they fix `train_set_seed`, add the five data
    seeds as the last grid axis; `grid_points` then sets `seed` equal to `train_set_seed`.
    """
    preset = _get(name)
    # one spelling per task: "opt/SST2", "roberta/SST-2"
    found = get_task(task, family=preset.family)
    key = canonical_task(found.name)
    if preset.tasks and key not in preset.tasks:
        raise DataError(
            f"unknown task '{task}' for preset '{name}' (tasks: {', '.join(preset.tasks)})"
        )
    if preset.family == "opt" and k is not None:
        raise DataError(f"k is for RoBERTa k-shot data only (preset '{name}', k={k})")
    if preset.family == "roberta" and k not in ROBERTA_K:
        raise DataError(f"preset '{name}' needs k = 16 or 512 (got k={k})")

    fixed = dict(preset.fixed, task=f"{preset.family}/{found.name}")
    fixed.update(_task_flags(preset, found, fixed))
    grid = {**preset.k_grid.get(k, {}), **preset.grid, **preset.task_grid.get(key, {})}
    if preset.family == "roberta":
        fixed["k"] = k
        if "train_set_seed" not in fixed:
            grid["train_set_seed"] = list(ROBERTA_SEEDS)
    fixed = {flag: value for flag, value in fixed.items() if flag not in grid}
    return fixed, {flag: list(values) for flag, values in grid.items()}


def grid_points(name, task, k=None):
    """Every run of the grid, as full flag dicts, in a fixed order (last grid axis fastest)."""
    fixed, grid = resolve(name, task, k)
    points = [
        dict(fixed, **dict(zip(grid, values))) for values in itertools.product(*grid.values())
    ]
    if _get(name).family == "roberta":  # run_fewshot.sh: --seed $SEED is also the data seed
        for point in points:
            point["seed"] = point["train_set_seed"]
    return points


def _grid_text(grid):
    return "; ".join(f"{flag} {{{', '.join(map(fmt, values))}}}" for flag, values in grid.items())


def describe(name):
    """A few lines: source, the flags every task shares, the grid and its task/k variants."""
    p = _get(name)
    lines = [
        f"{p.name} ({p.family}): {p.source}",
        "  fixed: " + " ".join(f"{k}={fmt(v)}" for k, v in p.fixed.items()),
    ]
    if p.grid:
        lines.append(f"  grid: {_grid_text(p.grid)}")
    lines += [f"  grid for {task}: {_grid_text(g)}" for task, g in p.task_grid.items()]
    lines += [f"  grid for k={k}: {_grid_text(g)}" for k, g in p.k_grid.items()]
    if p.family == "roberta" and "train_set_seed" not in p.fixed:
        lines.append(
            f"  every point runs on the data seeds {list(ROBERTA_SEEDS)} (seed = train_set_seed)"
        )
    if p.tasks:
        lines.append(f"  tasks: {', '.join(p.tasks)}")
    return "\n".join(lines)
