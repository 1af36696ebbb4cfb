"""Issue 32: every documented option of train.py runs end to end, its cases read from the code's own
choices and registries (program/flags.py, zo/methods.py, MeZOConfig), so a new option without a run
fails here; the variance-modified variants on a step's micro-batches; the refusal of a crashed
run's folder; a diverged seed in the results tables."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

import train
from program import config, flags
from program.checkpoint import trainable
from program.paper import seeds, tables
from program.paper.runs import Run
from program.run_folder import check_run_folder
from tests.helpers.zo import lm_batch, lm_loss, tiny_lm
from zo import MeZO, MeZOConfig, methods

OPT = "--task SST2 --num_train 24 --num_dev 8 --num_eval 8 --batch_size 4".split()
SHORT = ["--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--eval_batch_size", "16"]


# --- the variants' control variates from the step's micro-batches ---------------------------------
def test_grad_norm_c_is_the_gradient_norm_of_the_steps_micro_batches():
    """train.py passes a step's micro-batch closures as a list (one per accumulation step); c_g is
    ||grad_g|| of their mean loss, the loss zo_forward estimates."""
    ids = lm_batch(n=6)
    parts = [lm_loss(ids[:3]), lm_loss(ids[3:])]
    model = tiny_lm()
    mean = sum(fn(model.eval()) for fn in parts) / len(parts)
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(mean, list(model.parameters()))))
    mezo = MeZO(model, MeZOConfig(zo_variant="grad_norm", perturbation="eager"))  # nothing compiled
    mezo.initialize_c(model, parts)  # as zo_step's first call and train.py's epoch start
    for group, c in mezo.cs.items():
        norms = [grads[s.name] for s in mezo.slots if s.group == group]
        expected = torch.sqrt(sum((g**2).sum() for g in norms))
        n = sum(g.numel() for g in norms)  # fp32 sums of n squares in another order: (n + 1) u each
        assert (c - expected).abs() <= 2 * (n + 1) * 2.0**-24 * expected, group
    assert all(p.grad is None for p in model.parameters())


# --- a crashed run's folder -----------------------------------------------------------------------
def test_a_folder_that_saved_no_checkpoint_is_refused_naming_only_the_flag_that_works(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"kind": "train"}))
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError) as refused:
        check_run_folder(str(out), resume=False, overwrite=False)
    message = str(refused.value)
    assert "--overwrite_output_dir" in message and "no checkpoint" in message
    assert "--resume or" not in message and message.endswith(f"(--output_dir {out})")
    (out / "checkpoint").mkdir()  # now --resume would work, and the message offers it
    with pytest.raises(ValueError, match="pass --resume or --overwrite_output_dir"):
        check_run_folder(str(out), resume=False, overwrite=False)
    (out / "config.json").write_text("{}")  # no run wrote it: neither flag works, none is offered
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="no run wrote; never overwritten") as refused:
            check_run_folder(str(out), resume=False, overwrite=overwrite)
        assert "pass --" not in str(refused.value)


@pytest.mark.slow
def test_the_same_command_after_a_crash_is_one_line_then_runs_with_overwrite(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = OPT + SHORT + ["--learning_rate", "1e-3", "--output_dir", str(out)]

    def crash(*args):
        raise RuntimeError("a bug at step 1")

    with monkeypatch.context() as patch:
        patch.setattr(train, "train", crash)
        with pytest.raises(RuntimeError):
            train.main(argv)
    (out / "notes.txt").write_text("the user's")
    capsys.readouterr()
    assert train.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--overwrite_output_dir" in lines[0] and "--resume or" not in lines[0]
    assert train.main(argv + ["--overwrite_output_dir"]) == 0
    assert (out / "results.json").is_file() and (out / "notes.txt").read_text() == "the user's"


# --- a diverged seed in the results tables --------------------------------------------------------
def finished_run(path, seed, dev, test=0.5, selected_loss=0.7, nan=False):
    """A finished MeZO-LoRA run; dev = [(forward passes, dev loss, dev accuracy)] in metrics.jsonl.
    nan: an older file, written with NaN; else strict JSON's null (program/json_files.py dumps)."""
    path.mkdir(parents=True)
    config = {
        "family": "opt",
        "task": "SST2",
        "trainer": "zo",
        "mode": "lora",
        "seed": seed,
        "max_steps": 4,
    }
    records = [
        {"step": i + 1, "dev_loss": loss, "dev_accuracy": acc, "forward_passes": passes}
        for i, (passes, loss, acc) in enumerate(dev)
    ]
    lines = "".join(json.dumps(r, allow_nan=nan) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(lines)
    results = {
        "dev": {"loss": selected_loss, "accuracy": 0.5},
        "test": {"accuracy": test},
        "best_step": 4,
    }
    (path / "results.json").write_text(json.dumps(results, allow_nan=nan))
    return Run(path, config, json.loads((path / "results.json").read_text()))


def seeds_cell(percents, diverged):
    mark = f" ({seeds.DIVERGED}{diverged})" if diverged else ""
    return f"{statistics.fmean(percents):.1f} ± {statistics.stdev(percents):.1f}{mark}"


@pytest.mark.parametrize("nan", [False, True])
def test_a_diverged_seed_is_a_marked_cell_of_the_estimators_table(tmp_path, nan):
    bad = math.nan if nan else None
    runs = [
        finished_run(tmp_path / "s0", 0, [(2, 0.7, 0.5), (4, 0.6, 0.75)], test=0.5),
        finished_run(tmp_path / "s1", 1, [(2, 0.8, 0.25), (4, 0.5, 0.5)], test=0.75),
        finished_run(
            tmp_path / "s2",
            2,
            [(2, 0.9, 0.5), (4, bad, 0.5)],
            test=0.25,
            selected_loss=bad,
            nan=nan,
        ),
    ]
    text = tables.estimators_markdown({"mezo-lora": runs}, baseline="mezo-lora")
    cells = text.splitlines()[2].split(" | ")
    first, second = [50, 25, 50], [75, 50]  # every seed finite at 2 forward passes; seed 2 not at 4
    assert cells[1] == f"2: {seeds_cell(first, 0)}, 4: {seeds_cell(second, 1)}"
    # seed 2 kept a model whose dev loss is not finite: its test accuracy is left out too
    assert cells[3] == seeds_cell([50, 75], 1)
    assert f"({statistics.fmean(second):.1f}%)" in text  # the target: the finite seeds' peak
    assert text.count(f"({seeds.DIVERGED}k)") == 1 and "seeds diverged" in text  # one footnote


@pytest.mark.parametrize("nan", [False, True])
def test_a_diverged_seed_is_a_marked_cell_of_the_seeds_table(tmp_path, nan):
    bad = math.nan if nan else None
    runs = [
        finished_run(tmp_path / "s0", 0, [], test=0.5),
        finished_run(tmp_path / "s1", 1, [], test=0.75),
        finished_run(tmp_path / "s2", 2, [], test=bad, selected_loss=bad, nan=nan),
    ]
    text = tables.seeds_markdown({"mezo-lora": [(run, None) for run in runs]})
    cells = text.splitlines()[2].split(" | ")
    assert cells[1] == seeds_cell([50, 75], 1) and cells[2] == "3"
    assert text.count(f"({seeds.DIVERGED}k)") == 1 and "seeds diverged" in text


def test_a_row_whose_every_seed_diverged_says_so():
    assert seeds.over_seeds([None, math.nan]) == f"diverged ({seeds.DIVERGED}2)"
    assert seeds.over_seeds([50.0]) == "50.0"
    assert seeds.over_seeds([50.0], always_std=True) == "50.0 ± 0.0"


# --- every documented option, end to end ----------------------------------------------------------
ACTIONS = {a.dest: a for a in flags.build_parser()._actions if a.dest not in config.CONTROL_FLAGS}
# the switches of the variance-modified variants: run under each --zo_variant, not alone
VARIANT_SWITCHES = [
    f.name
    for f in dataclasses.fields(MeZOConfig)
    if f.type is bool and f.name in ACTIONS and f.name not in {m.name for m in methods.fields()}
]
# c is recomputed at each epoch's start: one batch an epoch (16 training rows), so at step 1
SWITCH_ARGS = {"recompute_norms": ["--batch_size", "16"]}
# the variants that read a switch (under another it is refused: test_unused_flags.py); default all
READ_BY = {"use_zo_grad_est": ("grad_norm",)}
BY_TRAINER = ("mode", "optimizer")  # flags whose values run under each --trainer
# numbers that select a part of the step (zo/methods.py): Sparse-MeZO's direction, the momentum
# update rule, n-SPSA, micro-batches (test_registered_parts_each_have_a_case: every part is reached)
NUMBERS = [
    ["--sparse_mezo", "0.5"],
    ["--momentum", "0.9"],
    ["--n_spsa", "2"],
    ["--gradient_accumulation_steps", "2"],
]


def flag(dest):
    return ACTIONS[dest].option_strings[0]


def cases():
    """Every value of every run flag with choices and every boolean switch, each under its trainer
    or variant."""
    out = []
    for dest, action in ACTIONS.items():
        if dest in ("trainer", "zo_variant", *BY_TRAINER, *VARIANT_SWITCHES):
            continue
        if action.choices:
            out += [[flag(dest), value] for value in action.choices]
        elif action.const is True:  # a boolean switch (a boolean field or a switch)
            out.append([flag(dest)])
    for trainer in ACTIONS["trainer"].choices:
        out += [
            ["--trainer", trainer, flag(dest), value]
            for dest in BY_TRAINER
            for value in ACTIONS[dest].choices
        ]
        out.append(["--trainer", trainer, "--learning_rate", "0"])
    for variant in ACTIONS["zo_variant"].choices:
        out += [
            ["--zo_variant", variant, *switch]
            for switch in [[]]
            + [
                [flag(s), *SWITCH_ARGS.get(s, [])]
                for s in VARIANT_SWITCHES
                if variant in READ_BY.get(s, ACTIONS["zo_variant"].choices)
            ]
        ]
    return out + NUMBERS + [["--non_diff", "--task", "SQuAD"]]  # -F1 needs a generation task


# refused by design, each with its one line: FSDP needs torchrun's ranks, -F1 generated text, CUDA
# graphs a CUDA device
REFUSED = {
    ("--fsdp",): "across the processes torchrun starts",
    ("--non_diff",): "needs a generation task",
}
if not torch.cuda.is_available():
    REFUSED[("--cuda_graphs",)] = "CUDA graphs need a CUDA device"


def resolved(case):
    return flags.resolve(flags.parse_args(OPT + SHORT + case), "opt")


def test_registered_parts_each_have_a_case():
    """Every estimator, direction, update rule and perturbation zo/methods.py registers, every z
    distribution and every variant is reached by a case that runs (not refused)."""
    runs = [resolved(case) for case in cases() if tuple(case) not in REFUSED]
    configs = [flags.mezo_config(args) for args in runs if args.trainer == "zo"]
    used = {
        cls
        for cfg in configs
        for cls in (
            methods.ESTIMATORS[cfg.estimator],
            methods.direction_class(cfg),
            methods.update_rule(cfg),
            methods.perturbation_class(cfg),
        )
    }
    assert used == {*methods.METHODS, methods.ExactRestore, methods.InPlace, methods.Paired}
    assert {cfg.estimator for cfg in configs} == set(methods.ESTIMATORS)
    assert {methods.update_rule(cfg) for cfg in configs} == set(methods.UPDATE_RULES.values())
    assert {cfg.distribution for cfg in configs} == set(ACTIONS["distribution"].choices)
    assert {cfg.zo_variant for cfg in configs} == {None, *ACTIONS["zo_variant"].choices}
    for switch in VARIANT_SWITCHES:
        variants = {cfg.zo_variant for cfg in configs if getattr(cfg, switch)}
        assert variants == set(READ_BY.get(switch, ACTIONS["zo_variant"].choices)), switch
    assert {(a.trainer, a.mode) for a in runs} == {
        (t, m) for t in ACTIONS["trainer"].choices for m in ACTIONS["mode"].choices
    }


class Recording(train.Run):
    """train.Run, keeping each run's model and its trainable tensors before the first step."""

    made = []

    def __init__(self, args, dist):
        super().__init__(args, dist)
        self.before = {n: p.detach().clone() for n, p in trainable(self.model).items()}
        Recording.made.append(self)


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(), ids=" ".join)
def test_every_option_runs_end_to_end(tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "Run", Recording)
    monkeypatch.setattr(Recording, "made", [])
    code = train.main(OPT + SHORT + ["--learning_rate", "1e-3", "--output_dir", str(out)] + case)
    err = capsys.readouterr().err
    if tuple(case) in REFUSED:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert REFUSED[tuple(case)] in lines[0] and not out.exists()
        return
    assert code == 0, err
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r[k] for r in records for k in ("loss", "dev_loss") if k in r]
    assert len([r for r in records if "loss" in r]) == 2, records  # --max_steps 2, logged each step
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses), records
    [run] = Recording.made
    after = trainable(run.model)
    moved = [n for n, p in run.before.items() if not torch.equal(p, after[n].detach())]
    if "--learning_rate" in case:  # lr 0: every parameter bitwise as it was
        assert moved == []
    else:
        assert moved, "no trainable parameter changed"
