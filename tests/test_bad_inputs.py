"""Every user mistake ends with one line `error: <what> (<where>)` and exit status 2, with nothing
written: train.py, eval.py and `python -m data`, over their flags and every file they read.

Each case runs the command's main() in-process (a subprocess costs seconds of torch import); a few
run as real subprocesses to check the scripts' exit status and stderr as a user sees them."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import data
import data.__main__ as data_cli
import eval as evaluation
import models
import train
from data import SAMPLES_DIR, get_task
from zo import checkpoint as ck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = ["--perturbation", "eager", "--num_train", "16", "--num_dev", "8", "--num_eval", "4", "--batch_size", "4", "--max_steps", "2",
       "--eval_steps", "2", "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-3"]
# folders the commands read: they must never change either
READ = [os.path.dirname(models.TINY_OPT), SAMPLES_DIR]


def snapshot(*roots):
    """Every path under `roots` with its mtime and size."""
    seen = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            for name in dirs + names:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                seen[path] = (st.st_mtime_ns, st.st_size)
    return seen


def refused(capsys, main, argv, what, root):
    """main(argv) exits 2 with one `error:` line mentioning `what`, nothing under root/READ changed."""
    before = snapshot(root, *READ)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and what in lines[-1], err
    assert sum("error:" in line for line in lines) == 1 and "Traceback" not in err, err
    assert snapshot(root, *READ) == before, "something was written"
    return lines[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished MeZO run and a finished backprop run, copied by the tests that damage them."""
    root = tmp_path_factory.mktemp("runs")
    for trainer in ("zo", "fo"):
        assert train.main(OPT + ["--trainer", trainer, "--output_dir", str(root / trainer)]) == 0
    return root


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would appear here
    return tmp_path


def model_with(work, **config):
    """A copy of the tiny OPT with config.json fields replaced."""
    folder = work / "model"
    shutil.copytree(models.TINY_OPT, folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **config}))
    return str(folder)


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
]


@pytest.mark.parametrize("flags, what", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_flags(capsys, work, flags, what):
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out")] + flags, what, work)


def test_train_records_the_sizes_it_used(work):
    """A split smaller than --num_train + --num_dev is used whole, as the original does (CB, Copa);
    config.json says how many examples the run had, not the number asked for."""
    out = work / "out"
    assert train.main(OPT + ["--num_train", "5000", "--max_steps", "1", "--output_dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    rows = len(get_task("SST2").load(None)["train"])
    assert 16 < rows - 8 < 5000 and (config["num_train"], config["num_dev"]) == (rows - 8, 8)
    assert config["max_length"] == 512  # the tiny OPT's positions, not the default 2048
    assert config["output_dir"] == str(out) and os.path.isabs(config["model"])


@pytest.mark.parametrize("task, demos", [("SST2", "32"), ("SQuAD", "4")])
def test_prompts_longer_than_the_models_positions_are_cut_as_the_original_cuts(capsys, work, task, demos):
    """The README's ICL line on the embedded model (512 positions): demonstrations cut on the left,
    BOS kept, room left for the 50 generated tokens; it used to end in an IndexError."""
    out = work / "out"
    assert evaluation.main(["--task", task, "--num_train", demos, "--num_eval", "2", "--output_dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["max_length"] == 512


def test_presets_fit_the_bundled_samples(capsys):
    """`make grid` on the embedded model: the paper's 500 dev examples would leave no training rows."""
    assert train.main(["--preset", "opt-mezo-ft", "--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]) == 0
    rows = len(data.get_task("SST2").load(None)["train"])
    assert json.loads(capsys.readouterr().out)["num_dev"] == rows // 3 < 500
    assert train.main(["--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["num_dev"] == 16
    assert train.main(["--preset", "opt-mezo-ft", "--task", "SST2", "--data_dir", "/data", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["num_dev"] == 500


# ---------------------------------------------------------------- train.py: model, data and output folders

MODEL_CONFIGS = [
    ({"hidden_size": -16}, "hidden_size must be a positive integer, got -16"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"ffn_dim": "64"}, "ffn_dim must be a positive integer, got '64'"),
    ({"num_attention_heads": 5}, "does not divide hidden_size"),
    ({"max_position_embeddings": 1}, "max_position_embeddings"),
    ({"model_type": "gpt9"}, "unknown model_type"),
]


@pytest.mark.parametrize("config, what", MODEL_CONFIGS, ids=[next(iter(c)) + "=" + str(next(iter(c.values())))
                                                            for c, _ in MODEL_CONFIGS])
def test_train_bad_model_config(capsys, work, config, what):
    model = model_with(work, **config)
    line = refused(capsys, train.main, OPT + ["--model", model, "--output_dir", str(work / "out")], what, work)
    assert "config.json" in line


def test_train_corrupt_config_json(capsys, work):
    model = model_with(work)
    (work / "model" / "config.json").write_text('{"model_type": "opt", ')
    refused(capsys, train.main, OPT + ["--model", model, "--output_dir", str(work / "out")], "corrupt config file", work)


def test_train_non_utf8_data_file_names_file_and_line(capsys, work):
    folder = work / "data" / "RTE"
    folder.mkdir(parents=True)
    good = open(os.path.join(SAMPLES_DIR, "RTE", "train.jsonl"), "rb").read().splitlines(keepends=True)
    (folder / "train.jsonl").write_bytes(b"".join(good[:2]) + b'{"premise": "caf\xe9"}\n' + b"".join(good[2:]))
    shutil.copy(os.path.join(SAMPLES_DIR, "RTE", "val.jsonl"), folder)
    refused(capsys, train.main, OPT + ["--task", "RTE", "--data_dir", str(work / "data"),
                                       "--output_dir", str(work / "out")], f"{folder / 'train.jsonl'}:3", work)


def test_train_output_folder_is_a_file(capsys, work):
    (work / "out").write_text("mine")
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out")], "output folder is a file", work)


def test_train_output_folder_not_writable(capsys, work, monkeypatch):
    monkeypatch.setattr(ck.os, "access", lambda *a: False)  # root may write anywhere: simulate
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out")], "not writable", work)


@pytest.mark.parametrize("where", ["the model", "inside the model", "holding the model"])
def test_train_output_folder_overlapping_the_model_is_refused(capsys, work, where):
    model = model_with(work)
    out = {"the model": model, "inside the model": os.path.join(model, "run"), "holding the model": str(work)}[where]
    refused(capsys, train.main, OPT + ["--model", model, "--output_dir", out, "--overwrite_output_dir"],
            "overlaps the model folder", work)


def test_train_output_folder_inside_the_data_folder_is_refused(capsys, work):
    data_dir = work / "data"
    shutil.copytree(os.path.join(SAMPLES_DIR, "original", "SST-2"), data_dir / "SST-2")
    refused(capsys, train.main, OPT + ["--data_dir", str(data_dir), "--output_dir", str(data_dir / "run")],
            "overlaps the data folder", work)


def test_train_output_folder_with_a_foreign_config_json(capsys, work):
    (work / "out").mkdir()
    (work / "out" / "config.json").write_text('{"model_type": "opt"}')
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out"), "--overwrite_output_dir"],
            "config.json that no run wrote", work)


def test_train_output_folder_of_another_run(capsys, work, runs):
    shutil.copytree(runs / "zo", work / "out")
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out")], "pass --resume or --overwrite_output_dir",
            work)


# ---------------------------------------------------------------- train.py --resume

def test_resume_without_a_checkpoint(capsys, work, runs):
    shutil.copytree(runs / "zo", work / "out")
    shutil.rmtree(work / "out" / "checkpoint")
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out"), "--resume"], "nothing to resume", work)


def test_resume_with_other_settings(capsys, work, runs):
    shutil.copytree(runs / "zo", work / "out")
    refused(capsys, train.main, OPT[:-1] + ["1e-2", "--output_dir", str(work / "out"), "--resume"],
            "other settings than the run's: learning_rate", work)


@pytest.mark.parametrize("damage", ["state.json", "state.safetensors", "trainable.safetensors"])
def test_resume_with_a_corrupt_checkpoint(capsys, work, runs, damage):
    shutil.copytree(runs / "zo", work / "out")
    target = work / "out" / "checkpoint" / damage
    target.write_bytes(target.read_bytes()[:30])
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out"), "--resume"], str(target.parent), work)


def test_resume_refuses_a_pickle_payload_in_one_line(capsys, work, runs):
    import pickle
    shutil.copytree(runs / "zo", work / "out")
    marker = work / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (work / "out" / "checkpoint" / "state.pt").write_bytes(pickle.dumps(Payload()))
    refused(capsys, train.main, OPT + ["--output_dir", str(work / "out"), "--resume"], "holds a pickle", work)
    assert not marker.exists()


# ---------------------------------------------------------------- train.py --replay

@pytest.mark.parametrize("damage, what", [
    ("empty", "trajectory ends before step 0"),
    ("truncated", "trajectory ends before step 1"),
    ("garbled", "garbled trajectory line"),
    ("missing", "missing trajectory"),
])
def test_replay_with_a_damaged_trajectory(capsys, work, runs, damage, what):
    shutil.copytree(runs / "zo", work / "src")
    path = work / "src" / "trajectory.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "missing":
        os.remove(path)
    else:
        path.write_text({"empty": "", "truncated": lines[0], "garbled": "{oops\n" + "".join(lines[1:])}[damage])
    refused(capsys, train.main, ["--replay", str(work / "src"), "--output_dir", str(work / "again")], what, work)


def test_replay_of_a_backprop_run(capsys, work, runs):
    refused(capsys, train.main, ["--replay", str(runs / "fo"), "--output_dir", str(work / "again")],
            "only ZO runs have a trajectory", work)


def test_replay_of_a_folder_that_is_no_run(capsys, work):
    (work / "src").mkdir()
    refused(capsys, train.main, ["--replay", str(work / "src"), "--output_dir", str(work / "again")],
            "missing file", work)


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


@pytest.mark.parametrize("flags, what", EVAL_FLAGS, ids=[" ".join(f) for f, _ in EVAL_FLAGS])
def test_eval_flags(capsys, work, flags, what):
    refused(capsys, evaluation.main, ["--num_eval", "4", "--output_dir", str(work / "out")] + flags, what, work)


def test_eval_adapter_without_metadata(capsys, work):
    import torch
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(work / "a.safetensors"))
    refused(capsys, evaluation.main, ["--adapter", str(work / "a.safetensors"), "--num_eval", "4"],
            "adapter file without valid metadata", work)


def test_eval_bad_model_config(capsys, work):
    refused(capsys, evaluation.main, ["--model", model_with(work, num_attention_heads=3), "--num_eval", "4"],
            "does not divide hidden_size", work)


def test_eval_output_folder_is_a_file(capsys, work):
    (work / "out").write_text("mine")
    refused(capsys, evaluation.main, ["--num_eval", "4", "--output_dir", str(work / "out")],
            "output folder is a file", work)


def test_eval_compare_on_a_folder_that_is_not_a_training_run(capsys, work, runs):
    (work / "plain").mkdir()
    refused(capsys, evaluation.main, ["compare", str(runs / "zo"), str(work / "plain")], "not a finished training run",
            work)


# ---------------------------------------------------------------- python -m data

def test_data_cli_bad_flags(capsys, work):
    refused(capsys, data_cli.main, ["SST2", "--bogus"], "unrecognized arguments", work)
    refused(capsys, data_cli.main, ["SST2", "--show", "0"], "--show 0", work)
    refused(capsys, data_cli.main, ["NoSuchTask"], "unknown task", work)


def test_data_cli_non_utf8_byte(capsys, work):
    folder = work / "d" / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_bytes(b'{"premise": "ok"}\n{"premise": "\xff"}\n')
    shutil.copy(os.path.join(SAMPLES_DIR, "RTE", "val.jsonl"), folder)
    refused(capsys, data_cli.main, ["RTE", "--family", "opt", "--data_dir", str(work / "d")],
            f"byte 0xff at column 14 ({folder / 'train.jsonl'}:2)", work)


# ---------------------------------------------------------------- as a user runs them

@pytest.mark.parametrize("command, what", [
    ([os.path.join(ROOT, "train.py"), "--learning_rate", "nan"], "--learning_rate nan"),
    ([os.path.join(ROOT, "eval.py"), "--num_eval", "0", "--bogus"], "unrecognized arguments"),
    (["-m", "data", "SST2", "--show", "-1"], "--show -1"),
])
def test_scripts_exit_2_with_one_line(tmp_path, command, what):
    before = snapshot(tmp_path, *READ)
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and what in result.stderr
    assert snapshot(tmp_path, *READ) == before
