"""program/config.py is the one declaration of a run: the parser, the value checks, --dry-run,
--resume's free fields, the grid's command lines and the fields a preset may set follow from it."""

import dataclasses
import json

import pytest

import models
import train
from data import DataError
from program import config, flags
from program.paper import grid, presets
from program.run_folder import resume_conflicts
from zo import MeZOConfig, methods


def test_the_parser_s_flags_are_exactly_the_fields():
    actions = {a.dest: a for a in flags.build_parser()._actions if a.dest != "help"}
    fields = {
        f.name: f for cls in (config.Command, config.RunConfig) for f in dataclasses.fields(cls)
    }
    assert list(actions) == list(fields)
    run_flags = [name for name in actions if name not in config.CONTROL_FLAGS]
    assert tuple(run_flags) == config.RUN_FIELDS
    for name, field in fields.items():
        action = actions[name]
        assert action.default == field.default, name
        assert action.help == field.metadata["help"], name
        choices = None if field.metadata["switch"] else field.metadata["choices"]
        assert action.choices == choices, name
    assert {f.name for f in config.METHOD_FIELDS} <= set(config.RUN_FIELDS)


def test_every_declared_check_refuses_a_bad_value_naming_the_flag():
    args = flags.build_parser().parse_args([])
    flags.check_values(args)  # the defaults pass their own checks
    for name in config.CHECKS:
        with pytest.raises(DataError, match=rf"^{name} must be .* \(--{name} -1\)$"):
            flags.check_values(flags.replace(args, **{name: -1}))


def test_a_preset_naming_a_field_run_config_lacks_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(presets, "resolve", lambda name, task, k: ({"lr": 1e-6}, {}))
    assert train.main(["--preset", "opt-mezo-ft", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "error: preset opt-mezo-ft sets flags train.py does not have: lr (--preset)\n"
    )
    with pytest.raises(DataError, match="unknown train.py flag 'lr'"):
        grid.train_argv({"lr": 1e-6})


def test_dry_run_prints_the_run_config_fields(capsys):
    assert train.main(["--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert tuple(printed) == config.RUN_FIELDS
    assert printed["optimizer"] == "sgd" and printed["lr_scheduler_type"] == "constant"


def test_resume_may_change_the_fields_declared_free_and_no_other():
    free = {
        f.name
        for cls in (config.Command, config.RunConfig)
        for f in dataclasses.fields(cls)
        if f.metadata["free"]
    }
    assert config.RESUME_FREE == free
    assert {"max_steps", "device", "resume"} <= free and "learning_rate" not in free
    saved = {name: getattr(config.RunConfig(), name) for name in config.RUN_FIELDS}
    changed = {"max_steps": 5, "device": "cpu", "learning_rate": 1.0, "estimator": "fzoo"}
    now = {**saved, **changed}
    assert resume_conflicts(saved, now, config.RESUME_FREE) == ["estimator", "learning_rate"]


@pytest.mark.parametrize(
    "argv, rule",
    [([], "sgd"), (["--momentum", "0.9"], "momentum"), (["--optimizer", "adamw"], "adam")],
)
def test_the_library_speaks_the_command_line_s_vocabulary(argv, rule):
    """--perturbation and --optimizer/--momentum reach zo.MeZOConfig as they are spelled."""
    args = flags.resolve(flags.parse_args(["--perturbation", "eager", *argv]), "opt")
    cfg = flags.mezo_config(args)
    assert (cfg.perturbation, cfg.optimizer, cfg.momentum) == (
        "eager",
        args.optimizer,
        args.momentum,
    )
    assert methods.update_rule(cfg).NAME == rule
    assert flags.fo_config(flags.replace(args, trainer="fo")).optimizer == args.optimizer
    for old in (dict(perturbation="fused"), dict(optimizer="momentum")):
        with pytest.raises(ValueError, match="unknown"):
            MeZOConfig(**old)
