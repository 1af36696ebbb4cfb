"""A setting that does nothing in its combination is refused with one line, never ignored.

Generated from the registry (zo/methods.py) and the typed configuration (program/config.py), so a
new method's fields and a new zeroth-order flag are covered without a new case here.
"""

import dataclasses
import shutil

import pytest

import train
from program import config, flags
from tests.helpers.refusals import SHORT_RUN, refused
from zo import MeZOConfig, methods


def other_value(f):
    """A valid value of field f other than its default."""
    if f.choices:
        return next(c for c in f.choices if c != f.default)
    if f.type is bool or isinstance(f.default, bool):
        return not f.default
    if isinstance(f.default, tuple):
        return tuple(v * 0.9 for v in f.default)
    value = 1.0 if f.default is None else f.default + 1 if f.type is int else f.default + 0.5
    assert f.check is None or f.check.ok(value), (f.name, value)
    return value


BASES = [{}, {"estimator": "fzoo"}, {"optimizer": "adam"}]
# (base config, field, value) of every method field whose part the base does not select, and which
# does not select its part by being set (sparse_mezo > 0 selects Sparse-MeZO, momentum > 0 the
# momentum update)
UNUSED = []
for base in BASES:
    for part in methods.METHODS:
        for f in part.FIELDS:
            view = methods.view({"optimizer": "sgd", **base, f.name: other_value(f)})
            selected = {
                methods.ESTIMATORS[view.estimator],
                methods.direction_class(view),
                methods.update_rule(view),
            }
            if not selected & {m for m in methods.METHODS if f in m.FIELDS}:
                UNUSED.append((base, f.name, other_value(f)))


@pytest.mark.parametrize("base, name, value", UNUSED, ids=[f"{b}-{n}" for b, n, _ in UNUSED])
def test_a_method_field_of_a_part_the_run_does_not_use_is_refused(base, name, value):
    with pytest.raises(ValueError, match=f"{name} does nothing with .*only .* reads it"):
        MeZOConfig(**base, **{name: value})


def test_the_cases_reach_every_kind_of_part():
    # the n-SPSA, FZOO, LOZO and torch-optimizer fields are each refused somewhere
    names = {name for _, name, _ in UNUSED}
    assert {"n_spsa", "fzoo_n", "lozo_rank", "clip_grad_norm", "momentum"} <= names, names


@pytest.mark.parametrize(
    "settings",
    [
        dict(estimator="fzoo", fzoo_n=3),
        dict(n_spsa=2),
        dict(momentum=0.9, clip_grad_norm=1.0),
        dict(optimizer="adam", clip_grad_norm=1.0),
        dict(lozo=True, lozo_rank=3),
        dict(zo_variant="grad_norm", use_zo_grad_est=True),
        dict(zo_variant="param_norm", recompute_norms=True, change_grad_estimate=True),
    ],
)
def test_the_same_fields_with_their_part_selected_are_accepted(settings):
    cfg = MeZOConfig(**settings)
    assert all(getattr(cfg, k) == v for k, v in settings.items())


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(use_zo_grad_est=True), "use_zo_grad_est"),
        (dict(zo_variant="param_norm", use_zo_grad_est=True), "use_zo_grad_est"),
        (dict(recompute_norms=True), "recompute_norms"),
        (dict(change_grad_estimate=True), "change_grad_estimate"),
    ],
)
def test_variant_switches_without_their_variant_are_refused(settings, name):
    with pytest.raises(ValueError, match=f"{name} does nothing with zo_variant="):
        MeZOConfig(**settings)


def flag_argv(f: dataclasses.Field) -> list[str]:
    """A command line setting RunConfig field f to a value other than its default."""
    if f.metadata["choices"]:
        return [f"--{f.name}", next(c for c in f.metadata["choices"] if c != f.default)]
    kind = config.scalar_type(f)
    if kind is bool:
        return [f"--{f.name}"] if f.metadata["switch"] else [f"--{f.name}", "true"]
    value = f.default + 1 if kind is int else (f.default or 0) + 0.5
    return [f"--{f.name}", str(value)]


ZO_ONLY = [f for f in dataclasses.fields(config.RunConfig) if f.metadata["zo"]]


def resolve_error(argv) -> str:
    try:
        args = flags.parse_args(argv)
        flags.check_values(args)
        flags.resolve(args, None)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"accepted: {argv}")


@pytest.mark.parametrize("f", ZO_ONLY, ids=[f.name for f in ZO_ONLY])
def test_a_zeroth_order_flag_with_the_backprop_trainer_is_refused(f):
    argv = ["--output_dir", "unused", "--trainer", "fo"] + flag_argv(f)
    assert f"--{f.name}" in resolve_error(argv)


def test_the_zeroth_order_flags_are_the_steps_own():
    # every method flag, and the step's core flags; nothing both trainers read
    names = {f.name for f in ZO_ONLY}
    assert {f.name for f in config.METHOD_FIELDS} | {"zo_eps", "estimator"} <= names
    assert not names & {"learning_rate", "weight_decay", "momentum", "seed", "batch_size"}


def test_the_backprop_trainer_with_its_own_flags_resolves():
    args = flags.resolve(flags.parse_args(["--output_dir", "unused", "--trainer", "fo"]), None)
    assert args.trainer == "fo"


def test_an_estimator_flag_of_another_estimator_is_one_line_through_main(capsys, tmp_path):
    tmp_path.joinpath("keep").write_text("")
    out = tmp_path / "out"
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(out), "--fzoo_n", "3"],
        "fzoo_n",
        tmp_path,
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def zo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replayed")
    assert train.main(SHORT_RUN + ["--output_dir", str(root / "run")]) == 0
    return root / "run"


@pytest.mark.parametrize(
    "extra", ["--n_spsa 2", "--learning_rate 1", "--dry-run", "--model unused", "--resume"]
)
def test_replay_refuses_a_flag_it_would_ignore(capsys, tmp_path, zo_run, extra):
    run = shutil.copytree(zo_run, tmp_path / "run")
    out = tmp_path / "replayed"
    argv = ["--replay", str(run), "--output_dir", str(out), *extra.split()]
    line = refused(capsys, train.main, argv, "does nothing with --replay", tmp_path)
    assert extra.split()[0] in line and not out.exists()


def test_replay_with_its_own_flags_still_runs(tmp_path, zo_run):
    out = tmp_path / "replayed"
    argv = ["--replay", str(zo_run), "--output_dir", str(out), "--device", "cpu"]
    assert train.main(argv) == 0 and (out / "config.json").exists()


def test_a_backprop_record_gets_no_zeroth_order_field_filled_in():
    # a record that predates a zeroth-order field (normal_z) is filled in with the value its run
    # used, but a backprop run used none: filling it in would make --resume refuse the run
    assert config.as_recorded({"trainer": "zo"})["normal_z"] == config.UNRECORDED["normal_z"]
    record = config.as_recorded({"trainer": "fo", "output_dir": "unused"})
    assert "normal_z" not in record
    args = flags.resumed_args(["--resume", "--output_dir", "unused"], record)
    assert flags.resolve(args, None).trainer == "fo"
