"""Every user mistake ends with one line `error: <what> (<where>)` and exit status 2, with nothing
written: train.py, eval.py and `python -m program.prompts`, over their flags and every file they
read, each checked before the first write. `refused` (tests/helpers/refusals.py) compares every
path's bytes, mode and mtime before and after.

Each case runs the command's main() in-process (a subprocess costs seconds of torch import); a few
run as real subprocesses to check the scripts' exit status and stderr as a user sees them."""

import bz2
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import eval as evaluation
import models
import train
from data import SAMPLES_DIR, get_task
from program import flags
from program import prompts as data_cli
from program import rotten_tomatoes as rt_cli
from program import run_folder as rf
from program.paper import results as paper_results
from tests.helpers.refusals import READ, SHORT_FO_RUN, SHORT_RUN, folder_hash, refused
from zo import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished MeZO run, a finished backprop run and a MeZO-LoRA run (its adapter), copied by
    the tests that damage them."""
    root = tmp_path_factory.mktemp("runs")
    for trainer, short in (("zo", SHORT_RUN), ("fo", SHORT_FO_RUN)):
        assert train.main(short + ["--trainer", trainer, "--output_dir", str(root / trainer)]) == 0
    assert train.main(SHORT_RUN + ["--mode", "lora", "--output_dir", str(root / "lora")]) == 0
    return root


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would appear here
    return tmp_path


def model_copy(work, name="model", change=None, **config):
    """A copy of the tiny OPT; `change(tensors)` edits its weights, `config` its config.json."""
    folder = work / name
    shutil.copytree(models.TINY_OPT, folder)
    if change:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config:
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, **config}))
    return str(folder)


def copy_run(runs, work):
    shutil.copytree(runs / "zo", work / "run")
    return work / "run"


# ---------------------------------------------------------------- train.py: flags

TRAIN_FLAGS = [
    (["--bogus"], "unrecognized arguments: --bogus (command line)"),
    (["--mode", "adapter"], "invalid choice"),
    (["--max_steps", "abc"], "invalid int value"),
    (["--learning_rate", "nan"], "--learning_rate nan"),
    (["--learning_rate", "inf"], "--learning_rate inf"),
    (["--learning_rate", "-1"], "--learning_rate -1"),
    (["--zo_eps", "nan"], "--zo_eps nan"),
    (["--zo_eps", "0"], "--zo_eps 0"),
    (["--max_steps", "0"], "--max_steps 0"),
    (["--max_steps", "-5"], "--max_steps -5"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--train_set_seed", "-2"], "--train_set_seed -2"),
    (["--n_spsa", "0"], "--n_spsa 0"),
    # a step holds each of its z in memory: more than fits would grow until MemoryError
    (["--n_spsa", "1000000000000"], "--n_spsa 1000000000000"),
    (["--estimator", "fzoo", "--fzoo_n", "1000000000000"], "--fzoo_n 1000000000000"),
    (["--mode", "lora", "--lora_r", "0"], "--lora_r 0"),
    (["--mode", "lora", "--lora_alpha", "nan"], "--lora_alpha nan"),
    (["--mode", "prefix", "--num_prefix", "0"], "--num_prefix 0"),
    (["--max_nonfinite", "0"], "--max_nonfinite 0"),
    (["--momentum", "1.5"], "--momentum 1.5"),
    (["--weight_decay", "nan"], "--weight_decay nan"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1"),
    (["--max_length", "1"], "--max_length 1"),
    (["--dist_timeout", "0"], "--dist_timeout 0"),
    (["--device", "foo"], "--device foo"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--num_eval", "0"], "--num_eval 0"),
    (["--task", "NoSuchTask"], "unknown task"),
    (["--model", "/no/such/model"], "missing model directory"),
    (["--eval_on_start", "maybe"], "argument --eval_on_start: expected true or false, got 'maybe'"),
    # directions across ranks (--parallel directions): what cannot share a step's z
    (["--direction_groups", "0"], "direction_groups must be >= 1"),
    (["--direction_groups", "2"], "--direction_groups needs --parallel directions"),
    (
        ["--parallel", "directions", "--direction_groups", "2"],
        "WORLD_SIZE=1 does not split into 2 direction groups",
    ),
    (["--parallel", "directions", "--trainer", "fo"], "not with --trainer fo"),
    (["--parallel", "directions", "--fsdp"], "not with --fsdp"),
    (
        ["--parallel", "directions", "--perturbation", "reference"],
        "perturbation=reference does not support directions shared across ranks",
    ),
    (
        ["--parallel", "directions", "--n_spsa", "2", "--n_spsa_schedule", "linear"],
        "n_spsa=2 does not support directions shared across ranks",
    ),
    (
        ["--parallel", "directions", "--zo_variant", "param_norm"],
        "zo_variant=param_norm does not support directions shared across ranks",
    ),
]


def flags_error(capsys, argv):
    """The one error line train.py prints for argv, from its flag checks alone (no main, no run)."""
    try:
        args = flags.parse_args(argv)
        flags.check_values(args)
        flags.resolve(args, None)
    except SystemExit as e:  # argparse's own errors: printed as one line by flags.Parser
        assert e.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err.strip()
    except ValueError as e:
        return f"error: {e}"
    raise AssertionError(f"accepted: {argv}")


# A representative set of bad values, checked where train.py checks them; the same flags through
# main(), with nothing written, are test_train_flags (slow).
FLAG_CHECKS = [f for f in TRAIN_FLAGS if f[0][0] not in ("--model", "--device")]


@pytest.mark.parametrize("bad, what", FLAG_CHECKS, ids=[" ".join(f) for f, _ in FLAG_CHECKS])
def test_bad_values_are_one_error_naming_the_flag(capsys, bad, what):
    line = flags_error(capsys, ["--output_dir", "unused"] + bad)
    assert line.startswith("error: ") and what in line and "\n" not in line


@pytest.mark.parametrize(
    "world, method",
    [("2", "--n_spsa 3"), ("4", "--estimator fzoo --fzoo_n 6")],
    ids=["nspsa", "fzoo"],
)
def test_directions_not_a_multiple_of_the_ranks_are_refused(capsys, monkeypatch, world, method):
    """N z per step must split evenly among the direction groups (WORLD_SIZE as torchrun sets)."""
    monkeypatch.setenv("WORLD_SIZE", world)
    line = flags_error(
        capsys, ["--output_dir", "unused", "--parallel", "directions", *method.split()]
    )
    assert (
        line.startswith("error: ") and f"do not split evenly among {world} direction groups" in line
    )


@pytest.mark.parametrize("bad, what", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_flags(capsys, work, bad, what):
    short = SHORT_FO_RUN if "fo" in bad else SHORT_RUN
    refused(capsys, train.main, short + ["--output_dir", str(work / "out")] + bad, what, work)


def test_train_records_the_sizes_it_used(work):
    """A split smaller than --num_train + --num_dev is used whole, as the original does (CB, Copa);
    config.json says how many examples the run had, not the number asked for."""
    out = work / "out"
    assert (
        train.main(
            SHORT_RUN + ["--num_train", "5000", "--max_steps", "1", "--output_dir", str(out)]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    rows = len(get_task("SST2").load(None)["train"])
    assert 16 < rows - 8 < 5000 and (config["num_train"], config["num_dev"]) == (rows - 8, 8)
    assert config["max_length"] == 512  # the tiny OPT's positions, not the default 2048
    assert config["output_dir"] == str(out) and os.path.isabs(config["model"])


@pytest.mark.parametrize("task, demos", [("SST2", "32"), ("SQuAD", "4")])
def test_prompts_longer_than_the_models_positions_are_cut_as_the_original_cuts(
    capsys, work, task, demos
):
    """The README's ICL line on the embedded model (512 positions): demonstrations cut on the left,
    BOS kept, room left for the 50 generated tokens; it used to end in an IndexError."""
    out = work / "out"
    assert (
        evaluation.main(
            ["--task", task, "--num_train", demos, "--num_eval", "2", "--output_dir", str(out)]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["max_length"] == 512


def test_presets_fit_the_bundled_samples(capsys):
    """`make grid` on the embedded model: the paper's 500 dev examples would leave no training
    rows."""
    assert (
        train.main(
            ["--preset", "opt-mezo-ft", "--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]
        )
        == 0
    )
    rows = len(data.get_task("SST2").load(None)["train"])
    assert json.loads(capsys.readouterr().out)["num_dev"] == rows // 3 < 500
    assert train.main(["--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["num_dev"] == 16
    assert (
        train.main(
            ["--preset", "opt-mezo-ft", "--task", "SST2", "--data_dir", "/data", "--dry-run"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["num_dev"] == 500


# --------------------------------------------------------- train.py: model, data and output folders

MODEL_CONFIGS = [
    ({"hidden_size": -16}, "hidden_size must be a positive integer, got -16"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"ffn_dim": "64"}, "ffn_dim must be a positive integer, got '64'"),
    ({"num_attention_heads": 5}, "does not divide hidden_size"),
    ({"max_position_embeddings": 1}, "max_position_embeddings"),
    ({"model_type": "gpt9"}, "unknown model_type"),
]


@pytest.mark.parametrize(
    "config, what",
    MODEL_CONFIGS,
    ids=[next(iter(c)) + "=" + str(next(iter(c.values()))) for c, _ in MODEL_CONFIGS],
)
def test_train_bad_model_config(capsys, work, config, what):
    model = model_copy(work, **config)
    line = refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", model, "--output_dir", str(work / "out")],
        what,
        work,
    )
    assert "config.json" in line


def test_train_corrupt_config_json(capsys, work):
    model = model_copy(work)
    (work / "model" / "config.json").write_text('{"model_type": "opt", ')
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", model, "--output_dir", str(work / "out")],
        "corrupt config file",
        work,
    )


def test_train_non_utf8_data_file_names_file_and_line(capsys, work):
    folder = work / "data" / "RTE"
    folder.mkdir(parents=True)
    good = (
        open(os.path.join(SAMPLES_DIR, "RTE", "train.jsonl"), "rb").read().splitlines(keepends=True)
    )
    (folder / "train.jsonl").write_bytes(
        b"".join(good[:2]) + b'{"premise": "caf\xe9"}\n' + b"".join(good[2:])
    )
    shutil.copy(os.path.join(SAMPLES_DIR, "RTE", "val.jsonl"), folder)
    refused(
        capsys,
        train.main,
        SHORT_RUN
        + ["--task", "RTE", "--data_dir", str(work / "data"), "--output_dir", str(work / "out")],
        f"{folder / 'train.jsonl'}:3",
        work,
    )


def test_train_output_folder_is_a_file(capsys, work):
    (work / "out").write_text("mine")
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / "out")],
        "output folder is a file",
        work,
    )


def test_train_output_folder_not_writable(capsys, work, monkeypatch):
    monkeypatch.setattr(rf.os, "access", lambda *a: False)  # root may write anywhere: simulate
    refused(
        capsys, train.main, SHORT_RUN + ["--output_dir", str(work / "out")], "not writable", work
    )


@pytest.mark.parametrize("where", ["the model", "inside the model", "holding the model"])
def test_train_output_folder_overlapping_the_model_is_refused(capsys, work, where):
    model = model_copy(work)
    out = {
        "the model": model,
        "inside the model": os.path.join(model, "run"),
        "holding the model": str(work),
    }[where]
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", model, "--output_dir", out, "--overwrite_output_dir"],
        "overlaps the model folder",
        work,
    )


def test_train_output_folder_inside_the_data_folder_is_refused(capsys, work):
    data_dir = work / "data"
    shutil.copytree(os.path.join(SAMPLES_DIR, "original", "SST-2"), data_dir / "SST-2")
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--data_dir", str(data_dir), "--output_dir", str(data_dir / "run")],
        "overlaps the data folder",
        work,
    )


def test_train_output_folder_with_a_foreign_config_json(capsys, work):
    (work / "out").mkdir()
    (work / "out" / "config.json").write_text('{"model_type": "opt"}')
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / "out"), "--overwrite_output_dir"],
        "config.json that no run wrote",
        work,
    )


def test_train_output_folder_of_another_run(capsys, work, runs):
    shutil.copytree(runs / "zo", work / "out")
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / "out")],
        "pass --resume or --overwrite_output_dir",
        work,
    )


# ---------------------------------------------------------------- train.py --resume


def test_resume_without_a_checkpoint(capsys, work, runs):
    shutil.copytree(runs / "zo", work / "out")
    shutil.rmtree(work / "out" / "checkpoint")
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / "out"), "--resume"],
        "nothing to resume",
        work,
    )


def test_resume_with_other_settings(capsys, work, runs):
    shutil.copytree(runs / "zo", work / "out")
    refused(
        capsys,
        train.main,
        SHORT_RUN[:-1] + ["1e-2", "--output_dir", str(work / "out"), "--resume"],
        "other settings than the run's: learning_rate",
        work,
    )


@pytest.mark.parametrize("damage", ["state.json", "state.safetensors", "trainable.safetensors"])
def test_resume_with_a_corrupt_checkpoint(capsys, work, runs, damage):
    shutil.copytree(runs / "zo", work / "out")
    target = work / "out" / "checkpoint" / damage
    target.write_bytes(target.read_bytes()[:30])
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / "out"), "--resume"],
        str(target.parent),
        work,
    )


def test_resume_refuses_a_pickle_payload_in_one_line(capsys, work, runs):
    import pickle

    shutil.copytree(runs / "zo", work / "out")
    marker = work / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (work / "out" / "checkpoint" / "state.pt").write_bytes(pickle.dumps(Payload()))
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / "out"), "--resume"],
        "holds a pickle",
        work,
    )
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_of_another_run(capsys, work, runs):
    """A checkpoint names the settings of the run that wrote it: one copied from a run with
    another --seed is not resumed under this run's config.json."""
    run = copy_run(runs, work)
    assert train.main(SHORT_RUN + ["--seed", "7", "--output_dir", str(work / "other")]) == 0
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(work / "other" / "checkpoint", run / "checkpoint")
    line = refused(
        capsys,
        train.main,
        ["--resume", "--output_dir", str(run), "--max_steps", "4"],
        "checkpoint belongs to another run",
        work,
    )
    assert "seed" in line and line.endswith(f"({run / 'checkpoint'})")


def test_resume_refuses_an_edited_config_json(capsys, work, runs):
    run = copy_run(runs, work)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "learning_rate": 0.5}))
    refused(
        capsys,
        train.main,
        ["--resume", "--output_dir", str(run), "--max_steps", "4"],
        "its settings differ from config.json: learning_rate",
        work,
    )


def test_a_checkpoint_without_its_runs_settings_still_resumes_and_says_so(capsys, work, runs):
    """Checkpoints written before they named their run: resumed, unchecked, with a note."""
    run = copy_run(runs, work)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    state.pop("run", None)
    (run / "checkpoint" / "state.json").write_text(json.dumps(state))
    assert train.main(["--resume", "--output_dir", str(run), "--max_steps", "3"]) == 0
    assert "not checked against config.json" in capsys.readouterr().err


# ---------------------------------------------------------------- train.py --replay


@pytest.mark.parametrize(
    "damage, what",
    [
        ("empty", "trajectory ends before step 0"),
        ("truncated", "trajectory ends before step 1"),
        ("garbled", "garbled trajectory line"),
        ("missing", "missing trajectory"),
    ],
)
def test_replay_with_a_damaged_trajectory(capsys, work, runs, damage, what):
    shutil.copytree(runs / "zo", work / "src")
    path = work / "src" / "trajectory.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "missing":
        os.remove(path)
    else:
        path.write_text(
            {"empty": "", "truncated": lines[0], "garbled": "{oops\n" + "".join(lines[1:])}[damage]
        )
    refused(
        capsys,
        train.main,
        ["--replay", str(work / "src"), "--output_dir", str(work / "again")],
        what,
        work,
    )


def test_replay_of_a_backprop_run(capsys, work, runs):
    refused(
        capsys,
        train.main,
        ["--replay", str(runs / "fo"), "--output_dir", str(work / "again")],
        "only ZO runs have a trajectory",
        work,
    )


def test_replay_of_a_folder_that_is_no_run(capsys, work):
    (work / "src").mkdir()
    refused(
        capsys,
        train.main,
        ["--replay", str(work / "src"), "--output_dir", str(work / "again")],
        "missing file",
        work,
    )


# ---------------------------------------------------------------- eval.py

EVAL_FLAGS = [
    (["--bogus"], "unrecognized arguments: --bogus (command line)"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--num_eval", "0"], "--num_eval 0"),
    (["--num_train", "-3"], "--num_train -3"),
    (["--max_new_tokens", "-1"], "--max_new_tokens -1"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "tpu"], "--device tpu"),
    (["--task", "NoSuchTask"], "unknown task"),
    (["--adapter", "/no/such.safetensors"], "missing adapter file"),
]


@pytest.mark.parametrize("bad, what", EVAL_FLAGS, ids=[" ".join(f) for f, _ in EVAL_FLAGS])
def test_eval_flags(capsys, work, bad, what):
    refused(
        capsys,
        evaluation.main,
        ["--num_eval", "4", "--output_dir", str(work / "out")] + bad,
        what,
        work,
    )


def test_eval_adapter_without_metadata(capsys, work):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(work / "a.safetensors"))
    refused(
        capsys,
        evaluation.main,
        ["--adapter", str(work / "a.safetensors"), "--num_eval", "4"],
        "adapter file without valid metadata",
        work,
    )


def adapter_file(work, mode="lora", change=None, **meta):
    """An adapter of the tiny OPT as an older train.py wrote it (no base fingerprint): `meta`
    overrides its metadata, `change(tensors)` edits its tensors."""
    model = models.load_model(models.TINY_OPT)
    models.apply_lora(model) if mode == "lora" else models.apply_prefix(model, num_prefix=5)
    tensors = models.adapter_state_dict(model)
    if change:
        change(tensors)
    meta = {"mode": mode, "lora_r": "8", "lora_alpha": "16.0", "num_prefix": "5", **meta}
    save_file(tensors, str(work / "a.safetensors"), metadata=meta)
    return str(work / "a.safetensors")


def to_int64(tensors):
    for name in tensors:
        tensors[name] = tensors[name].to(torch.int64)


BAD_ADAPTERS = [
    ({"lora_alpha": "nan"}, "lora_alpha nan"),
    ({"lora_alpha": "inf"}, "lora_alpha inf"),
    ({"change": to_int64}, "has dtype int64, expected a floating-point dtype"),
    ({"lora_r": str(10**12)}, f"lora_r {10**12}"),
    ({"mode": "prefix", "num_prefix": str(10**12)}, f"num_prefix {10**12}"),
]


@pytest.mark.parametrize("bad, what", BAD_ADAPTERS, ids=[what for _, what in BAD_ADAPTERS])
def test_eval_refuses_an_adapter_it_cannot_apply_faithfully(capsys, work, bad, what):
    """Class 4 and 5: a NaN lora_alpha reported an accuracy, int64 tensors were cast silently, a
    huge lora_r or num_prefix ended in a traceback of the allocation."""
    refused(
        capsys,
        evaluation.main,
        [
            "--adapter",
            adapter_file(work, **bad),
            "--num_eval",
            "4",
            "--output_dir",
            str(work / "o"),
        ],
        what,
        work,
    )


def test_eval_refuses_an_adapter_trained_on_another_base(capsys, work, runs):
    """Item 5: the adapter names its base; one of the same shapes but other weights is refused.
    Evaluating in another dtype than training's still matches."""
    adapter = str(runs / "lora" / "model.adapter.safetensors")
    meta, _ = models.read_adapter(adapter)
    base = models.fingerprint(models.load_model(models.TINY_OPT))
    assert (
        meta["base_fingerprint.float32"]
        == base
        == json.loads((runs / "lora" / "config.json").read_text())["base_fingerprint"]
    )
    other = model_copy(
        work, name="other", change=lambda t: t["model.decoder.final_layer_norm.bias"].add_(1.0)
    )
    line = refused(
        capsys,
        evaluation.main,
        ["--model", other, "--adapter", adapter, "--num_eval", "4"],
        "the adapter was trained on other base weights",
        work,
    )
    assert line.endswith(f"({adapter})")
    for dtype in ("fp32", "bf16", "fp16"):
        assert evaluation.main(["--adapter", adapter, "--num_eval", "4", "--dtype", dtype]) == 0


def test_eval_bad_model_config(capsys, work):
    refused(
        capsys,
        evaluation.main,
        ["--model", model_copy(work, num_attention_heads=3), "--num_eval", "4"],
        "does not divide hidden_size",
        work,
    )


def test_eval_output_folder_is_a_file(capsys, work):
    (work / "out").write_text("mine")
    refused(
        capsys,
        evaluation.main,
        ["--num_eval", "4", "--output_dir", str(work / "out")],
        "output folder is a file",
        work,
    )


def test_eval_compare_on_a_folder_that_is_not_a_training_run(capsys, work, runs):
    (work / "plain").mkdir()
    refused(
        capsys,
        evaluation.main,
        ["compare", str(runs / "zo"), str(work / "plain")],
        "not a finished training run",
        work,
    )


RUN_FILES_UNREADABLE = [
    ("config.json", b'{"family": "opt", "task": "\xff"}', "not UTF-8 at byte 27"),
    ("config.json", b'{"family": ["opt"], "task": "SST2"}', "'family' is a list"),
    ("results.json", b"\xff\xfe", "not UTF-8 at byte 0"),
    ("results.json", b"[1]", "results.json holds a list, expected an object"),
    ("results.json", b'{"dev": "x", "test": 3}', "'dev' is a str"),
    ("results.json", b'{"test": {"accuracy": "high"}}', "'test.accuracy' is a str"),
    ("metrics.jsonl", b"\xff\n", "not UTF-8 at byte 0"),
    ("metrics.jsonl", b"[1]\n", "metrics.jsonl line 1 holds a list, expected an object"),
]


# report reads metrics.jsonl for its plots only
@pytest.mark.parametrize(
    "command, name, content, what",
    [
        (command, *case)
        for case in RUN_FILES_UNREADABLE
        for command in ("compare", "report")
        if not (command == "report" and case[0] == "metrics.jsonl")
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_compare_and_report_refuse_run_files_they_cannot_read(
    capsys, work, runs, command, name, content, what
):
    run = copy_run(runs, work)
    (run / name).write_bytes(content)
    refused(capsys, evaluation.main, [command, str(run)], what, work)


# ---------------------------------------------------------------- python -m program.rotten_tomatoes


def snippets_archive(work):
    rows = "category,text,movie_name,has_plot_and_reviews\n" + "".join(
        f"{c},A {c} film {i}.,m,True\n" for i in range(5) for c in ("fresh", "rotten")
    )
    (work / "rt.csv.bz2").write_bytes(bz2.compress(rows.encode()))
    return str(work / "rt.csv.bz2")


@pytest.mark.parametrize(
    "out, flags, what",
    [
        ("out", ["--seed", "-1"], "seed -1 must be in [0, 2**32) (--seed)"),
        ("", [], "output folder name is empty (OUT_DIR)"),  # it left .tmp/ in the working folder
    ],
)
def test_rotten_tomatoes_bad_seed_or_empty_out_is_one_line(
    capsys, work, monkeypatch, out, flags, what
):
    argv = [out, "--source", snippets_archive(work), "--dev_size", "3", *flags]
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")  # where "" is, away from the source
    refused(capsys, rt_cli.main, argv, what, work)


# ---------------------------------------------------------------- python -m program.paper.results


@pytest.mark.parametrize(
    "argv, what",
    [
        (["--out", "a_file"], "not a folder (--out a_file)"),
        (["--write", "no/such/R.md"], "no folder"),
        (["--write", "a_folder"], "is a folder, not a file (--write a_folder)"),
        (["--write", "a_file"], "expected one <!-- make results: begin -->"),
        (["--write", "latin1.md"], "not UTF-8 at byte 0"),
        (["--figure", "f.png"], "--figure draws rows side by side against forward passes"),
        (["--estimators", "--figure", "a_folder"], "is a folder, not a file (--figure a_folder)"),
    ],
)
def test_results_refuses_its_outputs_before_the_plan_runs(capsys, work, monkeypatch, argv, what):
    """Each of these failed only once every run of the plan had finished."""
    (work / "a_file").write_text("no markers\n")
    (work / "latin1.md").write_bytes(b"\xe9t\xe9\n")
    (work / "a_folder").mkdir()
    monkeypatch.setattr(paper_results, "run_all", lambda *a: pytest.fail("the plan ran"))
    refused(capsys, paper_results.main, argv, what, work)


# ---------------------------------------------------------------- python -m program.prompts


def test_data_cli_bad_flags(capsys, work):
    refused(capsys, data_cli.main, ["SST2", "--bogus"], "unrecognized arguments", work)
    refused(capsys, data_cli.main, ["SST2", "--show", "0"], "--show 0", work)
    refused(capsys, data_cli.main, ["NoSuchTask"], "unknown task", work)


def test_data_cli_non_utf8_byte(capsys, work):
    folder = work / "d" / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_bytes(b'{"premise": "ok"}\n{"premise": "\xff"}\n')
    shutil.copy(os.path.join(SAMPLES_DIR, "RTE", "val.jsonl"), folder)
    refused(
        capsys,
        data_cli.main,
        ["RTE", "--family", "opt", "--data_dir", str(work / "d")],
        f"byte 0xff at column 14 ({folder / 'train.jsonl'}:2)",
        work,
    )


# ---------------------------------------------------------------- as a user runs them


@pytest.mark.parametrize(
    "command, what",
    [
        ([os.path.join(ROOT, "train.py"), "--learning_rate", "nan"], "--learning_rate nan"),
        ([os.path.join(ROOT, "eval.py"), "--num_eval", "0", "--bogus"], "unrecognized arguments"),
        (["-m", "program.prompts", "SST2", "--show", "-1"], "--show -1"),
    ],
)
def test_scripts_exit_2_with_one_line(tmp_path, command, what):
    before = folder_hash(tmp_path, *READ)
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 2
    assert (
        result.stderr.count("\n") == 1
        and result.stderr.startswith("error: ")
        and what in result.stderr
    )
    assert folder_hash(tmp_path, *READ) == before


# ---------------------------------------------------------------- the model against the run


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(capsys, work):
    def shrink(t):
        t["model.decoder.embed_tokens.weight"] = t["model.decoder.embed_tokens.weight"][
            :1000
        ].clone()

    model = model_copy(work, change=shrink, vocab_size=1000)
    line = refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", model, "--output_dir", str(work / "out")],
        "1500 ids",
        work,
    )
    assert "1000 rows" in line
    refused(
        capsys,
        evaluation.main,
        ["--model", model, "--num_eval", "4", "--output_dir", str(work / "ev")],
        "1500 ids",
        work,
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_weight_of_a_non_floating_dtype_is_refused(capsys, work, dtype):
    def to_int(t):
        t["model.decoder.layers.0.fc1.weight"] = t["model.decoder.layers.0.fc1.weight"].to(dtype)

    model = model_copy(work, change=to_int)
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", model, "--output_dir", str(work / "out")],
        f"dtype {str(dtype).removeprefix('torch.')}, expected a floating-point dtype",
        work,
    )


def test_more_prefix_tokens_than_positions_is_refused(capsys, work):
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--mode", "prefix", "--num_prefix", "600", "--output_dir", str(work / "out")],
        "600 prefix tokens, the model has 512 positions (--num_prefix 600)",
        work,
    )


def test_an_output_folder_name_over_255_bytes_is_refused(capsys, work):
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--output_dir", str(work / ("x" * 300))],
        "a name of 300 bytes",
        work,
    )


# ---------------------------------------------------------------- --resume reads everything first


def test_resume_without_best_safetensors_is_refused_before_training(capsys, work, runs):
    run = copy_run(runs, work)
    os.remove(run / "best.safetensors")
    refused(
        capsys,
        train.main,
        ["--resume", "--output_dir", str(run), "--max_steps", "4"],
        "corrupt checkpoint: missing file",
        work,
    )


def test_resume_with_a_corrupt_best_safetensors_is_refused(capsys, work, runs):
    run = copy_run(runs, work)
    (run / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:100])
    refused(
        capsys,
        train.main,
        ["--resume", "--output_dir", str(run), "--max_steps", "4"],
        "best.safetensors",
        work,
    )


@pytest.mark.parametrize(
    "damage, what",
    [(b'{"step": 0, "seed": \n', "garbled trajectory line"), (b"\xff\xfe\n", "not UTF-8")],
)
def test_resume_with_a_garbled_trajectory_is_refused(capsys, work, runs, damage, what):
    run = copy_run(runs, work)
    with open(run / "trajectory.jsonl", "ab") as f:
        f.write(damage)
    refused(
        capsys, train.main, ["--resume", "--output_dir", str(run), "--max_steps", "4"], what, work
    )


def test_resume_with_a_non_utf8_metrics_file_is_refused(capsys, work, runs):
    run = copy_run(runs, work)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\n")
    refused(
        capsys,
        train.main,
        ["--resume", "--output_dir", str(run), "--max_steps", "4"],
        "not UTF-8",
        work,
    )


def test_resume_onto_changed_base_weights_is_refused(capsys, work):
    model = model_copy(work)
    assert train.main(SHORT_RUN + ["--model", model, "--output_dir", str(work / "run")]) == 0
    model_copy(
        work, name="other", change=lambda t: t["model.decoder.final_layer_norm.bias"].add_(1.0)
    )
    shutil.rmtree(model)
    os.rename(work / "other", model)
    refused(
        capsys,
        train.main,
        ["--resume", "--output_dir", str(work / "run"), "--max_steps", "4"],
        "base_fingerprint",
        work,
    )


# -------------------------------------------------------------- the trajectory knows its base model


def test_replay_onto_another_base_model_is_refused(capsys, work, runs):
    run = copy_run(runs, work)
    other = model_copy(
        work, name="other", change=lambda t: t["model.decoder.final_layer_norm.bias"].add_(1.0)
    )
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": other}))
    refused(
        capsys,
        train.main,
        ["--replay", str(run), "--output_dir", str(work / "replayed")],
        "the trajectory was recorded on other base weights",
        work,
    )


def test_the_fingerprint_sees_names_shapes_dtypes_and_sampled_content():
    model = models.load_model(models.TINY_OPT)
    base = models.fingerprint(model)
    assert models.fingerprint(models.load_model(models.TINY_OPT)) == base
    assert models.fingerprint(models.load_model(models.TINY_OPT, dtype=torch.bfloat16)) != base
    with torch.no_grad():
        model.decoder.embed_tokens.weight[-1, -1] += 1  # the last block is sampled
    assert models.fingerprint(model) != base


# ---------------------------------------------------------------- strict JSON


def strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_nan_weights_give_strict_json_and_select_nothing(capsys, work):
    model = model_copy(
        work, change=lambda t: t["model.decoder.final_layer_norm.weight"].fill_(float("nan"))
    )
    assert (
        train.main(
            SHORT_RUN
            + ["--model", model, "--output_dir", str(work / "out"), "--max_nonfinite", "100"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert (
        "keeping the last model: no model selected: every dev loss was non-finite (NaN or inf)"
        in err
    )
    results = strict((work / "out" / "results.json").read_text())
    assert results["dev"]["loss"] is None and results["dev"]["loss_nonfinite"] == "nan"
    assert results["selection"] == "last" and not (work / "out" / "best.safetensors").exists()
    for line in (work / "out" / "metrics.jsonl").read_text().splitlines():
        strict(line)
    for line in (work / "out" / "trajectory.jsonl").read_text().splitlines():
        assert strict(line)["projected_grad"] is None
    assert evaluation.main(["compare", str(work / "out")]) == 0  # the table reads the nulls
    assert "| non-finite (step 2) | non-finite (step 2) |" in capsys.readouterr().out


def test_fzoo_with_equal_losses_counts_its_skipped_updates_and_stops(capsys, work):
    """--zo_eps 1e-30 leaves the N losses equal: each update is skipped (0/0), counted, and
    --max_nonfinite stops the run instead of a silent exit 0."""
    out = work / "out"
    argv = ["--estimator", "fzoo", "--fzoo_n", "3", "--zo_eps", "1e-30", "--max_nonfinite", "2"]
    assert train.main(SHORT_RUN + argv + ["--max_steps", "6", "--output_dir", str(out)]) == 1
    assert "error: 2 non-finite losses in a row at step 3" in capsys.readouterr().err


# ---------------------------------------------------------------- torch's refusals


def bin_model(work, **save_kwargs):
    folder = work / "binmodel"
    shutil.copytree(models.TINY_OPT, folder)
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model.bin", **save_kwargs)
    return folder, tensors


def test_an_old_format_pytorch_model_bin_loads(work):
    folder, _ = bin_model(work, _use_new_zipfile_serialization=False)  # torch < 1.6's format
    loaded, reference = (
        models.load_model(folder).state_dict(),
        models.load_model(models.TINY_OPT).state_dict(),
    )
    assert loaded.keys() == reference.keys() and all(
        torch.equal(loaded[k], reference[k]) for k in loaded
    )


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pytorch_model_bin_that_weights_only_refuses_is_one_line(capsys, work):
    folder, tensors = bin_model(work)
    torch.save({**tensors, "extra": Payload()}, folder / "pytorch_model.bin")
    line = refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", str(folder), "--output_dir", str(work / "out")],
        "weight file holds Python objects besides tensors, which are never unpickled",
        work,
    )
    assert "pytorch_model.bin" in line and not (work / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch itself raises, in several lines
        torch.load(folder / "pytorch_model.bin", weights_only=True)


def test_a_raw_pickle_pytorch_model_bin_is_one_line_without_torchs_warning(capsys, work):
    """Class 5: the refusal came after two lines of torch's warning about the pickle protocol."""
    folder, tensors = bin_model(work)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(tensors, protocol=4))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        refused(
            capsys,
            evaluation.main,
            ["--model", str(folder), "--num_eval", "4"],
            "weight file holds Python objects besides tensors",
            work,
        )
    assert not [str(w.message) for w in shown]


def test_a_corrupt_sentencepiece_model_is_one_line_and_leaves_no_lock(capsys, work):
    """Class 5: sentencepiece's own error was a traceback, and train.py left `.lock` behind."""
    model = model_copy(work)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        os.remove(os.path.join(model, name))
    (work / "model" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    refused(
        capsys,
        train.main,
        SHORT_RUN + ["--model", model, "--output_dir", str(work / "out")],
        "corrupt tokenizer file",
        work,
    )


# ---------------------------------------------------------------- --device auto


def test_eval_accepts_device_auto(capsys, work):
    assert (
        evaluation.main(["--device", "auto", "--num_eval", "4", "--output_dir", str(work / "ev")])
        == 0
    )
    config = json.loads((work / "ev" / "config.json").read_text())
    assert config["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_eval_overwrites_only_its_own_run_when_asked(capsys, work):
    out = work / "ev-again"
    assert evaluation.main(["--num_eval", "4", "--output_dir", str(out)]) == 0
    (out / "notes.txt").write_text("the user's")
    (out / "results.json").write_text("{}")  # to see it replaced
    refused(
        capsys,
        evaluation.main,
        ["--num_eval", "4", "--output_dir", str(out)],
        "belongs to another run",
        work,
    )
    assert (
        evaluation.main(["--num_eval", "3", "--output_dir", str(out), "--overwrite_output_dir"])
        == 0
    )
    assert json.loads((out / "results.json").read_text())["num_test"] == 3
    assert (out / "notes.txt").read_text() == "the user's"


# ---------------------------------------------------------------- a lost rank 0


def test_when_the_store_died_with_rank_0_the_survivors_print_one_line(
    monkeypatch, capsys, tmp_path
):
    def gone():  # rank 0 (or its agent) held the job's store
        raise RuntimeError("Connection closed by peer (TCPStore)")

    monkeypatch.setattr(distributed.dist.distributed_c10d, "_get_default_store", gone)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for rank in (2, 1, 3):
        with pytest.raises(SystemExit):
            with distributed.Dist(rank=rank, world_size=4).guard():
                raise RuntimeError("[pair.cc:1] Connection closed by peer (gloo)")
    assert capsys.readouterr().err.count("error:") == 1
