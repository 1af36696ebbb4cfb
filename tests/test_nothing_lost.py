"""Second round of bad inputs (issue 21): every check before the first write, strict JSON, torch's
refusals in one line, the base model's fingerprint. Each case failed before its fix: a traceback,
or a folder changed, or exit 0 where the run should have refused.

A refused command must leave its folder exactly as it was: `refused` compares every path's bytes,
mode and mtime before and after."""
import hashlib
import json
import os
import pickle
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as evaluation
import models
import train
from zo import distributed
from test_bad_inputs import OPT, READ


def folder_hash(*roots) -> str:
    """Every path under roots: its relative name, mode, mtime and bytes."""
    h = hashlib.sha256()
    for root in roots:
        for folder, dirs, names in sorted(os.walk(root)):
            for name in sorted(dirs + names):
                path = os.path.join(folder, name)
                st = os.lstat(path)
                h.update(f"{path}:{st.st_mode}:{st.st_mtime_ns}".encode())
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def refused(capsys, main, argv, what, root):
    """main(argv) exits 2 with one `error:` line holding `what`; root and the read folders unchanged."""
    before = folder_hash(root, *READ)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and what in lines[-1], err
    assert sum("error:" in line for line in lines) == 1 and "Traceback" not in err, err
    assert folder_hash(root, *READ) == before, "the folder changed"
    return lines[-1]


@pytest.fixture(scope="module")
def zo_run(tmp_path_factory):
    """A finished MeZO run, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("runs") / "zo"
    assert train.main(OPT + ["--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
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


def copy_run(zo_run, work):
    shutil.copytree(zo_run, work / "run")
    return work / "run"


# ---------------------------------------------------------------- the model against the run

def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(capsys, work):
    def shrink(t):
        t["model.decoder.embed_tokens.weight"] = t["model.decoder.embed_tokens.weight"][:1000].clone()
    model = model_copy(work, change=shrink, vocab_size=1000)
    line = refused(capsys, train.main, OPT + ["--model", model, "--output_dir", str(work / "out")], "1500 ids", work)
    assert "1000 rows" in line
    refused(capsys, evaluation.main, ["--model", model, "--num_eval", "4", "--output_dir", str(work / "ev")],
            "1500 ids", work)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_weight_of_a_non_floating_dtype_is_refused(capsys, work, dtype):
    def to_int(t):
        t["model.decoder.layers.0.fc1.weight"] = t["model.decoder.layers.0.fc1.weight"].to(dtype)
    model = model_copy(work, change=to_int)
    refused(capsys, train.main, OPT + ["--model", model, "--output_dir", str(work / "out")],
            f"dtype {str(dtype).removeprefix('torch.')}, expected a floating-point dtype", work)


def test_more_prefix_tokens_than_positions_is_refused(capsys, work):
    refused(capsys, train.main, OPT + ["--mode", "prefix", "--num_prefix", "600", "--output_dir", str(work / "out")],
            "600 prefix tokens, the model has 512 positions (--num_prefix 600)", work)


def test_an_output_folder_name_over_255_bytes_is_refused(capsys, work):
    refused(capsys, train.main, OPT + ["--output_dir", str(work / ("x" * 300))], "a name of 300 bytes", work)


# ---------------------------------------------------------------- --resume reads everything first

def test_resume_without_best_safetensors_is_refused_before_training(capsys, work, zo_run):
    run = copy_run(zo_run, work)
    os.remove(run / "best.safetensors")
    refused(capsys, train.main, ["--resume", "--output_dir", str(run), "--max_steps", "4"],
            "corrupt checkpoint: missing file", work)


def test_resume_with_a_corrupt_best_safetensors_is_refused(capsys, work, zo_run):
    run = copy_run(zo_run, work)
    (run / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:100])
    refused(capsys, train.main, ["--resume", "--output_dir", str(run), "--max_steps", "4"], "best.safetensors", work)


@pytest.mark.parametrize("damage, what", [(b'{"step": 0, "seed": \n', "garbled trajectory line"),
                                          (b"\xff\xfe\n", "not UTF-8")])
def test_resume_with_a_garbled_trajectory_is_refused(capsys, work, zo_run, damage, what):
    run = copy_run(zo_run, work)
    with open(run / "trajectory.jsonl", "ab") as f:
        f.write(damage)
    refused(capsys, train.main, ["--resume", "--output_dir", str(run), "--max_steps", "4"], what, work)


def test_resume_with_a_non_utf8_metrics_file_is_refused(capsys, work, zo_run):
    run = copy_run(zo_run, work)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\n")
    refused(capsys, train.main, ["--resume", "--output_dir", str(run), "--max_steps", "4"], "not UTF-8", work)


def test_resume_onto_changed_base_weights_is_refused(capsys, work):
    model = model_copy(work)
    assert train.main(OPT + ["--model", model, "--output_dir", str(work / "run")]) == 0
    model_copy(work, name="other", change=lambda t: t["model.decoder.final_layer_norm.bias"].add_(1.0))
    shutil.rmtree(model)
    os.rename(work / "other", model)
    refused(capsys, train.main, ["--resume", "--output_dir", str(work / "run"), "--max_steps", "4"],
            "base_fingerprint", work)


# ---------------------------------------------------------------- the trajectory knows its base model

def test_replay_onto_another_base_model_is_refused(capsys, work, zo_run):
    run = copy_run(zo_run, work)
    other = model_copy(work, name="other", change=lambda t: t["model.decoder.final_layer_norm.bias"].add_(1.0))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": other}))
    refused(capsys, train.main, ["--replay", str(run), "--output_dir", str(work / "replayed")],
            "the trajectory was recorded on other base weights", work)


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
    model = model_copy(work, change=lambda t: t["model.decoder.final_layer_norm.weight"].fill_(float("nan")))
    assert train.main(OPT + ["--model", model, "--output_dir", str(work / "out"), "--max_nonfinite", "100"]) == 0
    err = capsys.readouterr().err
    assert "keeping the last model: no model selected: every dev loss was non-finite (NaN or inf)" in err
    results = strict((work / "out" / "results.json").read_text())
    assert results["dev"]["loss"] is None and results["dev"]["loss_nonfinite"] == "nan"
    assert results["selection"] == "last" and not (work / "out" / "best.safetensors").exists()
    for line in (work / "out" / "metrics.jsonl").read_text().splitlines():
        strict(line)
    for line in (work / "out" / "trajectory.jsonl").read_text().splitlines():
        assert strict(line)["projected_grad"] is None
    assert evaluation.main(["compare", str(work / "out")]) == 0  # the table reads the nulls
    assert "| non-finite (step 2) | non-finite (step 2) |" in capsys.readouterr().out


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
    loaded, reference = models.load_model(folder).state_dict(), models.load_model(models.TINY_OPT).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pytorch_model_bin_that_weights_only_refuses_is_one_line(capsys, work):
    folder, tensors = bin_model(work)
    torch.save({**tensors, "extra": Payload()}, folder / "pytorch_model.bin")
    line = refused(capsys, train.main, OPT + ["--model", str(folder), "--output_dir", str(work / "out")],
                   "weight file holds Python objects besides tensors, which are never unpickled", work)
    assert "pytorch_model.bin" in line and not (work / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch itself raises, in several lines
        torch.load(folder / "pytorch_model.bin", weights_only=True)


# ---------------------------------------------------------------- --device auto

def test_eval_accepts_device_auto(capsys, work):
    assert evaluation.main(["--device", "auto", "--num_eval", "4", "--output_dir", str(work / "ev")]) == 0
    config = json.loads((work / "ev" / "config.json").read_text())
    assert config["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_eval_overwrites_only_its_own_run_when_asked(capsys, work):
    out = work / "ev-again"
    assert evaluation.main(["--num_eval", "4", "--output_dir", str(out)]) == 0
    (out / "notes.txt").write_text("the user's")
    (out / "results.json").write_text("{}")  # to see it replaced
    refused(capsys, evaluation.main, ["--num_eval", "4", "--output_dir", str(out)], "belongs to another run", work)
    assert evaluation.main(["--num_eval", "3", "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert json.loads((out / "results.json").read_text())["num_test"] == 3
    assert (out / "notes.txt").read_text() == "the user's"


# ---------------------------------------------------------------- a lost rank 0

def test_when_the_store_died_with_rank_0_the_survivors_print_one_line(monkeypatch, capsys, tmp_path):
    def gone():  # rank 0 (or its agent) held the job's store
        raise RuntimeError("Connection closed by peer (TCPStore)")
    monkeypatch.setattr(distributed.dist.distributed_c10d, "_get_default_store", gone)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for rank in (2, 1, 3):
        with pytest.raises(SystemExit):
            with distributed.Dist(rank=rank, world_size=4).guard():
                raise RuntimeError("[pair.cc:1] Connection closed by peer (gloo)")
    assert capsys.readouterr().err.count("error:") == 1
