"""End-to-end runs of train.py and eval.py on the embedded tiny models and the bundled samples."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = ["--task", "SST2", "--num_train", "24", "--num_dev", "8", "--num_eval", "8", "--batch_size", "4"]
ROBERTA = ["--task", "SST-2", "--model", models.TINY_ROBERTA, "--batch_size", "8"]
SHORT = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--eval_batch_size", "16"]
LR = {("zo", "ft"): "1e-3", ("zo", "prefix"): "1e-2", ("zo", "lora"): "1e-3", ("fo", "ft"): "1e-3",
      ("fo", "prefix"): "1e-2", ("fo", "lora"): "1e-3"}


def run(argv):
    assert train.main(argv) == 0


def tensors(path):
    return load_file(path)


def trajectory(out):
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        return f.read()


@pytest.mark.parametrize("family", ["opt", "roberta"])
@pytest.mark.parametrize("trainer", ["zo", "fo"])
@pytest.mark.parametrize("mode", ["ft", "prefix", "lora"])
def test_every_mode_and_trainer_runs_and_writes_the_output_folder(tmp_path, family, trainer, mode):
    out = str(tmp_path / "run")
    run((OPT if family == "opt" else ROBERTA) + SHORT + ["--trainer", trainer, "--mode", mode,
                                                         "--learning_rate", LR[trainer, mode], "--output_dir", out])
    files = set(os.listdir(out))
    assert {"config.json", "metrics.jsonl", "results.json"} <= files
    assert ("trajectory.jsonl" in files) == (trainer == "zo")
    results = json.load(open(os.path.join(out, "results.json")))
    assert 0.0 <= results["test"]["accuracy"] <= 1.0 and results["dev"]["loss"] > 0
    assert results["best_step"] in (2, 4)
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [2, 4]
    assert [r["step"] for r in log if "dev_loss" in r] == [2, 4]
    if trainer == "zo":
        assert [json.loads(line)["step"] for line in trajectory(out).splitlines()] == [0, 1, 2, 3]
    if mode == "ft":
        transformers = pytest.importorskip("transformers")
        cls = transformers.OPTForCausalLM if family == "opt" else transformers.RobertaForMaskedLM
        hf = cls.from_pretrained(os.path.join(out, "model")).eval()
        ours = models.load_model(os.path.join(out, "model"))
        ids = torch.tensor([[0, 31, 45, 67, 2]])
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    else:
        meta, state = models.read_adapter(os.path.join(out, "model.adapter.safetensors"))
        assert meta["mode"] == mode and state
        # eval.py rebuilds the adapted model and scores the same test set
        task = ["--task", "SST2"] if family == "opt" else ["--task", "SST-2"]
        base = models.TINY_OPT if family == "opt" else models.TINY_ROBERTA
        assert evaluation.main(task + ["--model", base, "--adapter", os.path.join(out, "model.adapter.safetensors"),
                                       "--num_eval", "8"]) == 0


def test_resume_after_interrupt_is_bitwise_identical(tmp_path, monkeypatch):
    argv = OPT + ["--max_steps", "10", "--eval_steps", "5", "--save_steps", "3", "--learning_rate", "1e-3"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run(argv + ["--output_dir", whole])

    batch = train.Run.batch

    def interrupted(self, step):  # a real SIGINT, delivered while step 6 runs
        if step == 6 and not self.args.resume:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(train.Run, "batch", interrupted)
    assert train.main(argv + ["--output_dir", parts]) == 130
    assert json.load(open(os.path.join(parts, "config.json")))["max_steps"] == 10
    assert not os.path.exists(os.path.join(parts, "results.json"))
    result = cli(*argv, "--output_dir", parts, "--resume", "--learning_rate", "1e-2")
    assert result.returncode == 2 and "other settings than the run's: learning_rate" in result.stderr
    run(argv + ["--output_dir", parts, "--resume"])
    assert trajectory(parts) == trajectory(whole)
    a, b = tensors(os.path.join(whole, "model", "model.safetensors")), tensors(os.path.join(parts, "model", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = lambda d: [line for line in open(os.path.join(d, "metrics.jsonl")) if "steps_per_s" not in line]
    assert metrics(parts) == metrics(whole)  # dev losses: same model at every eval step


@pytest.mark.parametrize("mode", ["ft", "lora"])
def test_replay_rebuilds_the_selected_model_bitwise(tmp_path, mode):
    out, again = str(tmp_path / "run"), str(tmp_path / "replayed")
    run(OPT + ["--max_steps", "8", "--eval_steps", "4", "--mode", mode, "--learning_rate", "1e-3", "--output_dir", out])
    run(["--replay", out, "--output_dir", again])
    name = os.path.join("model", "model.safetensors") if mode == "ft" else "model.adapter.safetensors"
    a, b = tensors(os.path.join(out, name)), tensors(os.path.join(again, name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = models.load_model(models.TINY_OPT)
    if mode == "ft":  # the run did change the weights
        assert not torch.equal(a["model.decoder.layers.0.fc1.weight"], base.decoder.layers[0].fc1.weight)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_learning_rate_leaves_the_model_bitwise_unchanged(tmp_path, dtype):
    out = str(tmp_path / "run")
    run(OPT + ["--max_steps", "3", "--eval_steps", "3", "--learning_rate", "0", "--dtype", dtype, "--output_dir", out])
    saved = tensors(os.path.join(out, "model", "model.safetensors"))
    base = models.load_model(models.TINY_OPT, dtype=evaluation.DTYPES[dtype])
    ours = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    assert len(saved) == len(ours)
    for k, v in ours.items():
        assert torch.equal(saved["model." + k], v), k


def test_squad_non_differentiable_run_trains_on_negative_f1(tmp_path):
    out = str(tmp_path / "run")
    run(["--task", "SQuAD", "--non_diff", "--num_train", "8", "--num_dev", "4", "--num_eval", "4", "--batch_size", "4",
         "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--output_dir", out])
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert len(losses) == 2 and all(-1.0 <= x <= 0.0 for x in losses)  # -F1 of greedy answers
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["test"]) == {"f1", "em"}


@pytest.mark.parametrize("task", ["SST2", "SQuAD"])
@pytest.mark.parametrize("demos", ["0", "4"])
def test_eval_zero_shot_and_icl(tmp_path, task, demos, capsys):
    out = str(tmp_path / "eval")
    assert evaluation.main(["--task", task, "--num_train", demos, "--num_eval", "6", "--output_dir", out]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    metric = "accuracy" if task == "SST2" else "f1"
    assert 0.0 <= results["test"][metric] <= 1.0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["kind"] == "eval" and config["num_train"] == int(demos)


def test_icl_prompts_hold_one_demonstration_set_per_example(monkeypatch):
    seen, encode_prompt = [], evaluation.data.encode_prompt

    def spy(task, demos, sample, *args, **kwargs):
        seen.append(tuple(d.data["sentence"] for d in demos))
        return encode_prompt(task, demos, sample, *args, **kwargs)

    monkeypatch.setattr(evaluation.data, "encode_prompt", spy)
    assert evaluation.main(["--task", "SST2", "--num_train", "3", "--num_eval", "2"]) == 0
    assert len(seen) == 2 and all(len(d) == 3 for d in seen) and seen[0] != seen[1]


def cli(*argv, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("argv, what", [
    (["--task", "NoSuchTask"], "unknown task"),
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--mode", "adapter"], "invalid choice"),
    (["--zo_eps", "0"], "zo_eps must be > 0"),
    (["--model", "/no/such/model"], "missing model directory"),
])
def test_bad_input_is_one_error_line_and_exit_2_with_nothing_written(tmp_path, argv, what):
    out = tmp_path / "out"
    result = cli(*argv, "--output_dir", str(out), "--max_steps", "1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], result.stderr
    assert not out.exists()


def test_output_folder_of_another_run_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"task": "other"}')
    result = cli("--output_dir", str(out), "--max_steps", "1")
    assert result.returncode == 2 and result.stderr.startswith("error: output folder belongs to another run")
    assert sorted(os.listdir(out)) == ["config.json"] and (out / "config.json").read_text() == '{"task": "other"}'


def test_presets_dry_run_and_list(capsys):
    assert train.main(["--preset", "opt-mezo-ft", "--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["learning_rate"], resolved["zo_eps"], resolved["batch_size"]) == (1e-6, 1e-3, 16)
    assert resolved["max_steps"] == 20000 and resolved["eval_steps"] == 4000
    assert train.main(["--preset", "opt-mezo-ft", "--task", "SST2", "--learning_rate", "1e-7", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["learning_rate"] == 1e-7  # the command line wins
    assert train.main(["--list-presets"]) == 0
    assert "opt-mezo-lora" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [
    ["--n_spsa", "2", "--n_spsa_schedule", "constant"],
    ["--optimizer", "adam", "--learning_rate", "1e-4"],
    ["--momentum", "0.9"],
    ["--zo_variant", "param_norm", "--recompute_norms"],
    ["--zo_variant", "grad_norm", "--use_zo_grad_est"],
    ["--gradient_accumulation_steps", "2"],
    ["--perturbation", "reference"],
    ["--distribution", "rademacher", "--lr_scheduler_type", "linear", "--weight_decay", "0.1"],
])
def test_variants_of_the_step_run_end_to_end(tmp_path, flags):
    out = str(tmp_path / "run")
    run(OPT + ["--max_steps", "14", "--eval_steps", "7", "--learning_rate", "1e-3", "--output_dir", out] + flags)
    records = [json.loads(line) for line in trajectory(out).splitlines()]
    n = 2 if "--n_spsa" in flags else 1
    assert [r["step"] for r in records] == [s for s in range(14) for _ in range(n)]
    assert len({r["seed"] for r in records}) == len(records)  # a fresh z for every estimate


def test_a_malformed_data_row_is_one_error_line_naming_file_and_line(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "RTE").mkdir(parents=True)
    good = '{"premise": "A cat sat.", "hypothesis": "A cat.", "label": "entailment", "idx": 0}\n'
    (data_dir / "RTE" / "train.jsonl").write_text(good * 3 + '{"premise": "no hypothesis", "label": "entailment"}\n')
    (data_dir / "RTE" / "val.jsonl").write_text(good)
    out = tmp_path / "out"
    result = cli("--task", "RTE", "--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.jsonl:4" in lines[0], result.stderr
    assert not out.exists()


def test_eval_cli_names_a_truncated_weight_file(tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(models.TINY_OPT, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", str(model)],
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and str(weights) in lines[0], result.stderr


def test_presets_know_every_run_flag_of_train_py():
    """data/presets.py writes train.py command lines (grid, SLURM): its flag list must not drift."""
    from data import presets
    control = {"help", "preset", "list_presets", "dry_run", "grid", "slurm", "nproc", "resume",
               "overwrite_output_dir", "replay"}
    dests = {a.dest for a in train.build_parser()._actions} - control
    assert dests == set(presets.TRAIN_FLAGS)
