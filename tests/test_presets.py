"""Presets against the paper's Tables 15/16 and the original scripts, transcribed here by hand.

Every expected value below is written from the paper's tables and the original shell scripts
(large_models/mezo.sh, finetune.sh; medium_models/mezo.sh, finetune.sh, run_fewshot.sh), not
computed from program/paper/presets.py, so a preset cannot drift silently.
"""

import itertools
import json
import math
import re
import shlex

import pytest

from data import DataError
from program.paper import grid, names, presets

# The flags a preset may set: the original's run.py arguments that train.py keeps.
CONTRACT_FLAGS = set(
    """task model mode trainer data_dir output_dir batch_size learning_rate zo_eps
max_steps num_train_epochs eval_steps save_steps logging_steps seed train_set_seed k num_train
num_dev num_eval dtype weight_decay lr_scheduler_type optimizer momentum num_prefix lora_r
lora_alpha perturbation n_spsa select_by non_diff max_length train_as_classification""".split()
)

OPT_TASKS = [
    "sst2",
    "rte",
    "cb",
    "boolq",
    "wsc",
    "wic",
    "multirc",
    "copa",
    "record",
    "squad",
    "drop",
]
ROBERTA_TASKS = ["sst2", "sst5", "snli", "mnli", "rte", "trec"]
SEEDS = [13, 21, 42, 87, 100]

# --- OPT: Table 16 + large_models/mezo.sh / finetune.sh ------------------------------
OPT_MEZO_COMMON = dict(
    trainer="zo",
    batch_size=16,
    weight_decay=0.0,
    max_steps=20000,
    eval_steps=4000,
    save_steps=4000,
    lr_scheduler_type="constant",
    logging_steps=10,
    num_train=1000,
    num_eval=1000,
    train_set_seed=0,
    select_by="loss",
    dtype="fp16",
)
# preset: (flags, LR grid, LR grid for SQuAD and DROP)
OPT_TABLE16 = {
    "opt-mezo-ft": (dict(mode="ft", zo_eps=1e-3), [1e-6, 1e-7], [1e-6, 5e-7, 1e-7]),
    "opt-mezo-prefix": (
        dict(mode="prefix", zo_eps=1e-1, num_prefix=5),
        [1e-2, 1e-3],
        [5e-2, 1e-2, 5e-3],
    ),
    "opt-mezo-lora": (
        dict(mode="lora", zo_eps=1e-2, lora_r=8, lora_alpha=16),
        [1e-4, 5e-5],
        [1e-4, 5e-5, 1e-5],
    ),
}
OPT_FT = dict(
    trainer="fo",
    mode="ft",
    batch_size=8,
    num_train_epochs=5,
    lr_scheduler_type="linear",
    weight_decay=0.0,
    select_by="loss",
    num_train=1000,
    num_eval=1000,
    train_set_seed=0,
)
OPT_FT_LRS = [1e-5, 5e-5, 8e-5]
# One epoch of finetune.sh = its eval/save period: 1000/8 = 125 steps; CB trains on 250-100 = 150
# examples, Copa on 400-100 = 300, WSC on 554-500 = 54 (large_models/run.py keeps the last
# num_dev examples of the train split for dev).
OPT_FT_STEPS_PER_EPOCH = {"sst2": 125, "squad": 125, "cb": 19, "copa": 38, "wsc": 7}
OPT_NUM_DEV = {"cb": 100, "copa": 100}  # others 500
OPT_LM_LOSS_TASKS = {"copa", "record", "squad", "drop"}  # train_as_classification False
# Appendix E.6 (SQuAD only): (flags, LR grid)
OPT_NONDIFF = {
    "opt-mezo-ft-nondiff": (dict(mode="ft", zo_eps=1e-3, batch_size=16), [1e-6, 5e-6, 1e-5]),
    "opt-mezo-prefix-nondiff": (
        dict(mode="prefix", zo_eps=1e-1, batch_size=16, num_prefix=5),
        [1e-1, 5e-2, 1e-2],
    ),
}
# large_models/README.md example commands: (mode, LR, EPS)
OPT_README = {
    "opt-mezo-ft-readme": ("ft", 1e-7, 1e-3),
    "opt-mezo-prefix-readme": ("prefix", 1e-3, 1e-1),
    "opt-mezo-lora-readme": ("lora", 5e-5, 1e-2),
    "opt-mezo-prefix-nondiff-readme": ("prefix", 1e-2, 1e-1),
}

# --- RoBERTa-large: Table 15 + medium_models scripts -------------------------------------
ROBERTA_MEZO_COMMON = dict(
    trainer="zo",
    max_steps=100000,
    eval_steps=10000,
    lr_scheduler_type="constant",
    select_by="accuracy",
    logging_steps=10,
)
ROBERTA_FT_COMMON = dict(
    trainer="fo",
    max_steps=1000,
    eval_steps=100,
    lr_scheduler_type="linear",
    select_by="accuracy",
    weight_decay=0.0,
)
# preset: (fixed flags, grid for k=16, grid for k=512); the five data seeds come on top.
ROBERTA_TABLE15 = {
    "roberta-mezo-ft": (
        dict(mode="ft", batch_size=64, zo_eps=1e-3, weight_decay=0.0),
        {"learning_rate": [1e-7, 1e-6, 1e-5]},
        None,
    ),
    "roberta-mezo-prefix": (
        dict(mode="prefix", batch_size=64, zo_eps=1e-1, weight_decay=0.0, num_prefix=5),
        {"learning_rate": [1e-2, 5e-3, 1e-3]},
        None,
    ),
    "roberta-mezo-lora": (
        dict(mode="lora", batch_size=64, zo_eps=1e-3, weight_decay=0.1, lora_r=8, lora_alpha=16),
        {"learning_rate": [1e-5, 5e-5, 1e-4]},
        None,
    ),
    "roberta-mezo-adam": (
        dict(mode="ft", batch_size=64, zo_eps=1e-3, optimizer="adamw"),
        {"learning_rate": [1e-6, 1e-5, 1e-4, 5e-4, 1e-3]},
        None,
    ),
    "roberta-mezo-ablation": (
        dict(mode="ft"),
        {
            "batch_size": [16, 64],
            "learning_rate": [1e-5, 1e-6, 1e-7],
            "zo_eps": [1e-3, 1e-5],
            "weight_decay": [0.0, 0.1],
        },
        None,
    ),
    "roberta-ft-adam": (
        dict(mode="ft", optimizer="adamw"),
        {"batch_size": [2, 4, 8], "learning_rate": [1e-5, 3e-5, 5e-5]},
        {"batch_size": [8, 16, 32], "learning_rate": [1e-5, 3e-5, 5e-5]},
    ),
    "roberta-ft-sgd": (
        dict(mode="ft", optimizer="sgd"),
        {"batch_size": [2, 4, 8], "learning_rate": [1e-4, 5e-4, 1e-3, 5e-3, 1e-2]},
        {"batch_size": [8, 16, 32], "learning_rate": [1e-4, 5e-4, 1e-3, 5e-3, 1e-2]},
    ),
    "roberta-ft-prefix": (
        dict(mode="prefix", num_prefix=5),
        {"batch_size": [8, 16, 32], "learning_rate": [1e-2, 3e-2, 5e-2]},
        None,
    ),
    "roberta-ft-lora": (
        dict(mode="lora", lora_r=8, lora_alpha=16),
        {"batch_size": [4, 8, 16], "learning_rate": [1e-4, 3e-4, 5e-4]},
        None,
    ),
}
# medium_models/README.md examples (K=16 SEED=42): (mode, BS, LR, EPS or None for finetune.sh)
ROBERTA_README = {
    "roberta-mezo-ft-readme": ("ft", 64, 1e-6, 1e-3),
    "roberta-mezo-prefix-readme": ("prefix", 64, 1e-2, 1e-1),
    "roberta-mezo-lora-readme": ("lora", 64, 1e-4, 1e-3),
    "roberta-ft-adam-readme": ("ft", 8, 1e-5, None),
    "roberta-ft-prefix-readme": ("prefix", 8, 1e-2, None),
    "roberta-ft-lora-readme": ("lora", 8, 1e-4, None),
}
ROBERTA_MAX_LENGTH = {"sst2": 128, "sst5": 128, "trec": 128, "mnli": 256, "snli": 256, "rte": 256}


def assert_subset(expected, actual):
    for flag, value in expected.items():
        assert actual.get(flag) == value, (flag, actual.get(flag), value)


def test_every_preset_is_listed_and_uses_only_train_flags():
    names = (
        set(OPT_TABLE16)
        | {"opt-ft"}
        | set(OPT_NONDIFF)
        | set(OPT_README)
        | set(ROBERTA_TABLE15)
        | set(ROBERTA_README)
    )
    assert set(presets.list_presets()) == names
    for name in names:
        task, k = ("squad", None) if name.startswith("opt") else ("sst2", 16)
        for point in presets.grid_points(name, task, k):
            assert set(point) <= CONTRACT_FLAGS, name


@pytest.mark.parametrize("task", OPT_TASKS)
@pytest.mark.parametrize("name", list(OPT_TABLE16))
def test_opt_mezo_table16(name, task):
    flags, lrs, generation_lrs = OPT_TABLE16[name]
    fixed, grid = presets.resolve(name, task)
    assert_subset({**OPT_MEZO_COMMON, **flags}, fixed)
    assert fixed["num_dev"] == OPT_NUM_DEV.get(task, 500)
    assert fixed["train_as_classification"] == (task not in OPT_LM_LOSS_TASKS)
    assert grid == {"learning_rate": generation_lrs if task in ("squad", "drop") else lrs}
    assert [p["learning_rate"] for p in presets.grid_points(name, task)] == grid["learning_rate"]


@pytest.mark.parametrize("task", OPT_TASKS)
def test_opt_ft_table16(task):
    fixed, grid = presets.resolve("opt-ft", task)
    assert_subset(OPT_FT, fixed)
    assert grid == {"learning_rate": OPT_FT_LRS}
    assert fixed["num_dev"] == OPT_NUM_DEV.get(task, 500)
    assert fixed["train_as_classification"] == (task not in OPT_LM_LOSS_TASKS)
    assert fixed["eval_steps"] == fixed["save_steps"] == OPT_FT_STEPS_PER_EPOCH.get(task, 125)


@pytest.mark.parametrize("name", list(OPT_NONDIFF))
def test_opt_nondiff_squad_only(name):
    flags, lrs = OPT_NONDIFF[name]
    fixed, grid = presets.resolve(name, "SQuAD")
    assert_subset(
        {**flags, "non_diff": True, "train_as_classification": False, "max_steps": 20000}, fixed
    )
    assert grid == {"learning_rate": lrs}
    # README: --evaluation_strategy no --save_strategy no, so the last model is kept
    assert fixed["eval_steps"] == fixed["max_steps"] and fixed["select_by"] is None
    with pytest.raises(ValueError, match="unknown task 'sst2'"):
        presets.resolve(name, "sst2")


@pytest.mark.parametrize("name", list(OPT_README))
def test_opt_readme_points(name):
    mode, lr, eps = OPT_README[name]
    task = "squad" if "nondiff" in name else "rte"
    [point] = presets.grid_points(name, task)
    # --non_diff --evaluation_strategy no --save_strategy no: keep the last model
    if "nondiff" in name:
        assert (
            point["non_diff"] is True
            and point["eval_steps"] == point["save_steps"] == point["max_steps"]
        )
        point = {**point, "eval_steps": 4000, "save_steps": 4000, "select_by": "loss"}
    assert_subset({**OPT_MEZO_COMMON, "mode": mode, "learning_rate": lr, "zo_eps": eps}, point)


@pytest.mark.parametrize("k", [16, 512])
@pytest.mark.parametrize("name", list(ROBERTA_TABLE15))
def test_roberta_table15(name, k):
    flags, grid16, grid512 = ROBERTA_TABLE15[name]
    expected_grid = grid512 if (k == 512 and grid512) else grid16
    common = ROBERTA_FT_COMMON if "-ft-" in name else ROBERTA_MEZO_COMMON
    for task in ROBERTA_TASKS:
        fixed, grid = presets.resolve(name, task, k)
        assert_subset({**common, **flags, "k": k, "max_length": ROBERTA_MAX_LENGTH[task]}, fixed)
        assert grid == {**expected_grid, "train_set_seed": SEEDS}
    points = presets.grid_points(name, "sst2", k)
    assert len(points) == math.prod(len(v) for v in expected_grid.values()) * len(SEEDS)
    axes = list(expected_grid) + ["train_set_seed"]
    assert [tuple(p[a] for a in axes) for p in points] == list(
        itertools.product(*expected_grid.values(), SEEDS)
    )
    assert all(p["seed"] == p["train_set_seed"] for p in points)  # run_fewshot.sh --seed $SEED


@pytest.mark.parametrize("name", list(ROBERTA_README))
def test_roberta_readme_points(name):
    mode, bs, lr, eps = ROBERTA_README[name]
    [point] = presets.grid_points(name, "SST-2", 16)
    common = ROBERTA_MEZO_COMMON if eps else ROBERTA_FT_COMMON
    assert_subset(
        {
            **common,
            "mode": mode,
            "batch_size": bs,
            "learning_rate": lr,
            "zo_eps": eps,
            "train_set_seed": 42,
            "seed": 42,
            "k": 16,
            "task": "roberta/SST-2",
        },
        point,
    )


def test_grid_sizes():
    assert len(presets.grid_points("opt-mezo-ft", "sst2")) == 2
    assert len(presets.grid_points("opt-mezo-lora", "drop")) == 3
    assert len(presets.grid_points("opt-ft", "copa")) == 3
    assert len(presets.grid_points("roberta-mezo-ft", "trec", 512)) == 15
    assert len(presets.grid_points("roberta-ft-adam", "mnli", 16)) == 45
    assert len(presets.grid_points("roberta-mezo-ablation", "snli", 16)) == 2 * 3 * 2 * 2 * 5


def test_errors():
    with pytest.raises(ValueError, match=r"^unknown preset 'nope' \(known: opt-mezo-ft, "):
        presets.resolve("nope", "sst2")
    with pytest.raises(
        ValueError, match=r"unknown preset 'nope' \(known: .*roberta-ft-lora-readme\)"
    ):
        presets.describe("nope")
    with pytest.raises(ValueError, match="unknown task 'trec'"):
        presets.resolve("opt-mezo-ft", "trec")
    with pytest.raises(ValueError, match="needs k = 16 or 512"):
        presets.resolve("roberta-mezo-ft", "sst2")
    with pytest.raises(ValueError, match="k is for RoBERTa"):
        presets.resolve("opt-mezo-ft", "sst2", k=16)


def test_errors_are_the_package_error():
    for call in (
        lambda: presets.resolve("nope", "sst2"),
        lambda: presets.resolve("opt-ft", "nope"),
        lambda: presets.resolve("opt-mezo-ft-nondiff", "drop"),
        lambda: grid.train_argv({"lr": 1}),
    ):
        with pytest.raises(DataError):
            call()


def test_task_spelling_is_canonical():
    # one configuration, one spelling, hence one run folder
    assert presets.grid_points("opt-mezo-ft", "sst-2") == presets.grid_points("opt-mezo-ft", "SST2")
    assert presets.resolve("opt-mezo-ft", "sst2")[0]["task"] == "opt/SST2"
    assert presets.resolve("roberta-mezo-ft", "sst2", 16)[0]["task"] == "roberta/SST-2"
    assert presets.resolve("roberta-mezo-ft", "sst5", 16)[0]["task"] == "roberta/sst-5"


def test_describe_names_its_source():
    assert "Table 16" in presets.describe("opt-mezo-prefix")
    assert "Table 15" in presets.describe("roberta-ft-adam")
    assert "README" in presets.describe("opt-mezo-lora-readme")
    assert "{1e-06, 1e-07}" in presets.describe("opt-mezo-ft")


def test_run_name_stable_and_unique():
    point = presets.grid_points("opt-mezo-ft", "sst2")[0]
    name = names.run_name(point)
    # key order does not matter
    assert name == names.run_name(dict(reversed(list(point.items()))))
    assert name == names.run_name({**point, "output_dir": "/elsewhere", "data_dir": "/data"})
    assert name != names.run_name({**point, "model": "facebook/opt-1.3b"})
    assert name.startswith("sst2-mezo-bs16-lr1e-06-eps0.001-wd0-seed0-")
    # the data seed (train_set_seed, the paper's "seed") and the run's own --seed are both in the
    # name
    assert names.run_name({**point, "seed": 2}).startswith(
        "sst2-mezo-bs16-lr1e-06-eps0.001-wd0-seed0-runseed2-"
    )
    points = [
        p
        for name in presets.list_presets()
        if name.startswith("opt")
        for task in ("squad", "cb")
        if "nondiff" not in name or task == "squad"
        for p in presets.grid_points(name, task)
    ]
    points += [
        p
        for name in presets.list_presets()
        if name.startswith("roberta")
        for k in (16, 512)
        for p in presets.grid_points(name, "rte", k)
    ]
    # one folder per distinct configuration (a README point that is also a grid point shares it)
    configs = {}
    for p in points:
        configs.setdefault(names.run_name(p), set()).add(json.dumps(p, sort_keys=True))
    assert all(len(c) == 1 for c in configs.values())
    assert len(configs) == len({json.dumps(p, sort_keys=True) for p in points}) > 700
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in configs)


def test_slurm_script_runs_torchrun_with_every_flag():
    point = presets.grid_points("roberta-mezo-lora", "mnli", 512)[5]  # LR 5e-5, seed 13
    script = grid.slurm_script(point, 4, time="12:00:00", runs_dir="out")
    name = names.run_name(point)
    for line in (
        f"#SBATCH --job-name={name}",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=12:00:00",
        f"#SBATCH --output=out/{name}.slurm-%j.out",
    ):
        assert line in script.splitlines()
    command = shlex.split(script.split("set -euo pipefail\n", 1)[1].replace("\\\n", " "))
    assert command[:5] == ["torchrun", "--standalone", "--nproc_per_node", "4", "train.py"]
    args = dict(zip(command[5::2], command[6::2]))
    expected = {
        f"--{k}": str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in {**point, "output_dir": f"out/{name}"}.items()
    }
    assert args == expected
    assert (
        args["--learning_rate"] == "5e-05"
        and args["--weight_decay"] == "0.1"
        and args["--k"] == "512"
    )
    # exact, not rounded
    assert grid.train_argv({"learning_rate": 1.2345678e-5})[1] == "1.2345678e-05"
    assert grid.train_argv({"non_diff": True}) == ["--non_diff", "true"]


def test_train_argv_round_trips_through_train_py_parser():
    """A point spelled by train_argv (RunConfig's fields) parses back to itself with
    program.flags.build_parser()."""
    from program.flags import build_parser

    point = {
        "task": "opt/SST2",
        "fsdp": True,
        "wd_exempt": "none",
        "eval_final_step": True,
        "learning_rate": 1e-6,
        "non_diff": False,
        "select_by": None,
    }
    argv = grid.train_argv(point)
    assert argv[:2] == ["--task", "opt/SST2"] and "--fsdp" in argv and "--select_by" not in argv
    parsed = vars(build_parser().parse_args(argv))
    assert all(parsed[k] == v for k, v in point.items())
    from program.config import RUN_FIELDS

    assert {"resume", "grid", "preset"}.isdisjoint(RUN_FIELDS) and "eval_final_step" in RUN_FIELDS


def test_a_preset_setting_a_flag_train_py_lacks_is_refused(monkeypatch):
    """Presets are plain data: they may set RunConfig's fields only (program/config.py)."""
    from data import DataError
    from program import flags

    monkeypatch.setattr(
        presets, "resolve", lambda name, task, k: ({"learning_rate": 1e-6, "no_such_flag": 1}, {})
    )
    with pytest.raises(
        DataError, match="preset opt-mezo-ft sets flags train.py does not have: no_such_flag"
    ):
        flags.parse_args(["--preset", "opt-mezo-ft"])
    monkeypatch.setattr(presets, "resolve", lambda name, task, k: ({"learning_rate": 1e-6}, {}))
    assert flags.parse_args(["--preset", "opt-mezo-ft"]).learning_rate == 1e-6
