"""End-to-end runs of train.py and eval.py on the embedded tiny models and the bundled samples."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import data.evaluate
import eval as evaluation
import models
import program.run
import train
from data.evaluate import DTYPES, chunks, dev_loss
from program import flags
from zo import distributed
from zo.optim import WD_EXEMPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = "--task SST2 --num_train 24 --num_dev 8 --num_eval 8 --batch_size 4".split()
ROBERTA = ["--task", "SST-2", "--model", models.TINY_ROBERTA, "--batch_size", "8"]
SHORT = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--eval_batch_size", "16"]
LR = {
    ("zo", "ft"): "1e-3",
    ("zo", "prefix"): "1e-2",
    ("zo", "lora"): "1e-3",
    ("fo", "ft"): "1e-3",
    ("fo", "prefix"): "1e-2",
    ("fo", "lora"): "1e-3",
}


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
    run(
        (OPT if family == "opt" else ROBERTA)
        + SHORT
        + [
            "--trainer",
            trainer,
            "--mode",
            mode,
            "--learning_rate",
            LR[trainer, mode],
            "--output_dir",
            out,
        ]
    )
    files = set(os.listdir(out))
    assert {"config.json", "metrics.jsonl", "results.json"} <= files
    assert ("trajectory.jsonl" in files) == (trainer == "zo")
    results = json.load(open(os.path.join(out, "results.json")))
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [2, 4]
    dev = {
        r["step"]: {k[len("dev_") :]: v for k, v in r.items() if k.startswith("dev_")}
        for r in log
        if "dev_loss" in r
    }
    assert list(dev) == [r["step"] for r in log if "dev_accuracy" in r] == [2, 4]
    # the selected model is the first with the lowest dev loss (OPT) or highest dev accuracy
    # (RoBERTa), and results.json repeats its logged dev metrics
    score = (lambda d: -d["loss"]) if family == "opt" else (lambda d: d["accuracy"])
    assert results["best_step"] == max(dev, key=lambda step: (score(dev[step]), -step))
    assert dev[results["best_step"]].items() <= results["dev"].items()
    if family == "opt":
        # k of --num_eval 8
        assert results["test"]["accuracy"] * 8 == round(results["test"]["accuracy"] * 8)
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
        assert (
            evaluation.main(
                task
                + [
                    "--model",
                    base,
                    "--adapter",
                    os.path.join(out, "model.adapter.safetensors"),
                    "--num_eval",
                    "8",
                ]
            )
            == 0
        )


@pytest.mark.smoke
def test_smoke_mezo_ft_runs_end_to_end_and_resumes_bitwise(tmp_path, monkeypatch):
    """The fast tier's one end-to-end run: train.py's main, MeZO ft, 4 steps, a real SIGINT at
    step 2, --resume, and the same trajectory and weights as the uninterrupted run."""
    argv = OPT + "--max_steps 4 --eval_steps 2 --save_steps 1 --learning_rate 1e-3".split()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(argv + ["--output_dir", str(whole)])
    batch = train.Run.batch

    def interrupted(self, step):
        if step == 2 and not self.args.resume:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(train.Run, "batch", interrupted)
    assert train.main(argv + ["--output_dir", str(parts)]) == 130
    assert not (parts / "results.json").exists()
    run(argv + ["--output_dir", str(parts), "--resume"])
    assert trajectory(parts) == trajectory(whole) and len(trajectory(whole).splitlines()) == 4
    a, b = (tensors(d / "model" / "model.safetensors") for d in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = tensors(os.path.join(models.TINY_OPT, "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base)  # the steps moved the weights


@pytest.mark.parametrize(
    "method",
    [
        [],
        ["--estimator", "fzoo", "--fzoo_n", "3"],
        ["--sparse_mezo", "0.5"],
        ["--perturbation", "paired"],
        ["--perturbation", "paired", "--sparse_mezo", "0.5", "--n_spsa", "2"],
    ],
)
def test_resume_after_interrupt_is_bitwise_identical(tmp_path, monkeypatch, method):
    argv = (
        OPT
        + ["--max_steps", "10", "--eval_steps", "5", "--save_steps", "3", "--learning_rate", "1e-3"]
        + method
    )
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
    assert (
        result.returncode == 2 and "other settings than the run's: learning_rate" in result.stderr
    )
    run(argv + ["--output_dir", parts, "--resume"])
    assert trajectory(parts) == trajectory(whole)
    a, b = (
        tensors(os.path.join(whole, "model", "model.safetensors")),
        tensors(os.path.join(parts, "model", "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(d):
        return [
            line for line in open(os.path.join(d, "metrics.jsonl")) if "steps_per_s" not in line
        ]

    assert metrics(parts) == metrics(whole)  # dev losses: same model at every eval step


@pytest.mark.parametrize(
    "mode, method",
    [
        ("ft", []),
        ("lora", []),
        ("ft", ["--estimator", "fzoo", "--fzoo_n", "3"]),
        ("lora", ["--sparse_mezo", "0.5"]),
    ],
)
def test_replay_rebuilds_the_selected_model_bitwise(tmp_path, mode, method):
    out, again = str(tmp_path / "run"), str(tmp_path / "replayed")
    run(
        OPT
        + [
            "--max_steps",
            "8",
            "--eval_steps",
            "4",
            "--mode",
            mode,
            "--learning_rate",
            "1e-3",
            "--output_dir",
            out,
        ]
        + method
    )
    run(["--replay", out, "--output_dir", again])
    name = (
        os.path.join("model", "model.safetensors") if mode == "ft" else "model.adapter.safetensors"
    )
    a, b = tensors(os.path.join(out, name)), tensors(os.path.join(again, name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = models.load_model(models.TINY_OPT)
    if mode == "ft":  # the run did change the weights
        assert not torch.equal(
            a["model.decoder.layers.0.fc1.weight"], base.decoder.layers[0].fc1.weight
        )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_learning_rate_leaves_the_model_bitwise_unchanged(tmp_path, dtype):
    out = str(tmp_path / "run")
    run(
        OPT
        + [
            "--max_steps",
            "3",
            "--eval_steps",
            "3",
            "--learning_rate",
            "0",
            "--dtype",
            dtype,
            "--output_dir",
            out,
        ]
    )
    saved = tensors(os.path.join(out, "model", "model.safetensors"))
    base = models.load_model(models.TINY_OPT, dtype=DTYPES[dtype])
    ours = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    assert len(saved) == len(ours)
    for k, v in ours.items():
        assert torch.equal(saved["model." + k], v), k


def test_squad_non_differentiable_run_trains_on_negative_f1(tmp_path, monkeypatch):
    seen, generated = [], []

    def spy(generate, record=None):
        def wrapped(model, tok, batch, max_new_tokens=50, max_length=2048):
            seen.append(max_length)
            texts = generate(model, tok, batch, max_new_tokens, max_length)
            if record is not None:
                record.append((texts, batch["gold"]))
            return texts

        return wrapped

    # the -F1 closures
    monkeypatch.setattr(program.run, "generate_text", spy(program.run.generate_text, generated))
    # evaluation
    monkeypatch.setattr(data.evaluate, "generate_text", spy(data.evaluate.generate_text))
    out, selected = str(tmp_path / "run"), str(tmp_path / "selected")
    argv = (
        "--task SQuAD --non_diff --num_train 8 --num_dev 4 --num_eval 4 --batch_size"
        " 4 --max_steps 2 --eval_steps 2 --logging_steps 1 --max_length 500"
    ).split()
    run(argv + ["--output_dir", out])
    losses = [
        json.loads(line)["loss"]
        for line in open(os.path.join(out, "metrics.jsonl"))
        if '"loss"' in line
    ]
    # loss1 and loss2 of two steps; the logged loss is loss1, -F1 of its answers
    assert len(generated) == 4
    neg_f1 = [
        -sum(data.f1(p, g) for p, g in zip(texts, golds)) / len(golds)
        for texts, golds in generated[0::2]
    ]
    assert losses == [float(torch.tensor(x, dtype=torch.float32)) for x in neg_f1]
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["test"]) == {"f1", "em"}
    assert len(seen) >= 4 and set(seen) == {500}  # --max_length reaches every generation
    # the original's non-diff runs do not evaluate during training: the last model, unless
    # --select_by
    assert dev_steps(out) == [] and results["selection"] == "last"
    run(argv + ["--select_by", "loss", "--output_dir", selected])
    assert dev_steps(selected) == [2] and results_of(selected)["selection"] == "dev"


@pytest.mark.parametrize("task", ["SST2", "SQuAD"])
@pytest.mark.parametrize("demos", ["0", "4"])
def test_eval_zero_shot_and_icl(tmp_path, task, demos, capsys, monkeypatch):
    scored = []  # (predictions, answers) that evaluate() scores

    def spy(metric):
        def wrapped(*args):
            scored.append(args[-2:])
            return metric(*args)

        return wrapped

    monkeypatch.setattr(data.evaluate, "accuracy", spy(data.evaluate.accuracy))
    monkeypatch.setattr(data.evaluate, "calculate_metric", spy(data.evaluate.calculate_metric))
    out = str(tmp_path / "eval")
    assert (
        evaluation.main(
            ["--task", task, "--num_train", demos, "--num_eval", "6", "--output_dir", out]
        )
        == 0
    )
    results = json.load(open(os.path.join(out, "results.json")))
    predicted, correct = scored[0]
    assert len(predicted) == len(correct) == 6  # --num_eval examples, scored once per metric
    if task == "SST2":
        # tests/test_data_metrics.py
        assert results["test"] == {"accuracy": data.accuracy(predicted, correct)}
    else:
        assert results["test"] == {
            m: data.calculate_metric(m, predicted, correct) for m in ("f1", "em")
        }
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["kind"] == "eval" and config["num_train"] == int(demos)


def test_eval_per_candidate_flag_scores_one_sequence_per_candidate(monkeypatch, capsys):
    rows, collate = [], data.evaluate.collate

    def spy(examples, kind, *args, **kwargs):
        batch = collate(examples, kind, *args, **kwargs)
        rows.append((len(examples), batch["input_ids"].shape[0]))
        return batch

    monkeypatch.setattr(data.evaluate, "collate", spy)
    printed = []
    for flag in ([], ["--per_candidate"]):
        rows.clear()
        assert evaluation.main(["--task", "SST2", "--num_eval", "6"] + flag) == 0
        printed.append(json.loads(capsys.readouterr().out)["test"])
        assert rows == [(6, 12 if flag else 6)]  # SST-2: two candidates
    assert printed[0] == printed[1]


def test_icl_prompts_hold_one_demonstration_set_per_example(monkeypatch):
    seen, encode_prompt = [], data.evaluate.encode_prompt

    def spy(task, demos, sample, *args, **kwargs):
        seen.append(tuple(d.data["sentence"] for d in demos))
        return encode_prompt(task, demos, sample, *args, **kwargs)

    monkeypatch.setattr(data.evaluate, "encode_prompt", spy)
    assert evaluation.main(["--task", "SST2", "--num_train", "3", "--num_eval", "2"]) == 0
    assert len(seen) == 2 and all(len(d) == 3 for d in seen) and seen[0] != seen[1]


def cli(*argv, cwd=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "argv, what",
    [
        (["--task", "NoSuchTask"], "unknown task"),
        (["--preset", "no-such-preset"], "unknown preset"),
        (["--mode", "adapter"], "invalid choice"),
        (["--zo_eps", "0"], "zo_eps must be > 0"),
        (["--model", "/no/such/model"], "missing model directory"),
        (
            ["--sparse_mezo", "0.5", "--fsdp"],
            "unsupported combination: sparse_mezo=0.5 does not support FSDP local views",
        ),
        (
            ["--estimator", "fzoo", "--perturbation", "reference"],
            "estimator=fzoo with fzoo_n=8 does not support perturbation=reference",
        ),
    ],
)
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
    assert result.returncode == 2 and result.stderr.startswith(
        "error: output folder belongs to another run"
    )
    assert (
        sorted(os.listdir(out)) == ["config.json"]
        and (out / "config.json").read_text() == '{"task": "other"}'
    )


def test_presets_dry_run_and_list(capsys):
    assert (
        train.main(
            ["--preset", "opt-mezo-ft", "--task", "SST2", "--model", models.TINY_OPT, "--dry-run"]
        )
        == 0
    )
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["learning_rate"], resolved["zo_eps"], resolved["batch_size"]) == (
        1e-6,
        1e-3,
        16,
    )
    assert resolved["max_steps"] == 20000 and resolved["eval_steps"] == 4000
    assert (
        train.main(
            ["--preset", "opt-mezo-ft", "--task", "SST2", "--learning_rate", "1e-7", "--dry-run"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["learning_rate"] == 1e-7  # the command line wins
    assert train.main(["--list-presets"]) == 0
    assert "opt-mezo-lora" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags",
    [
        ["--n_spsa", "2", "--n_spsa_schedule", "constant"],
        ["--optimizer", "adam", "--learning_rate", "1e-4"],
        ["--momentum", "0.9"],
        ["--zo_variant", "param_norm", "--recompute_norms"],
        ["--zo_variant", "grad_norm", "--use_zo_grad_est"],
        ["--gradient_accumulation_steps", "2"],
        ["--perturbation", "reference"],
        ["--distribution", "rademacher", "--lr_scheduler_type", "linear", "--weight_decay", "0.1"],
        ["--estimator", "fzoo", "--fzoo_n", "3"],
        ["--sparse_mezo", "0.5"],
    ],
)
def test_variants_of_the_step_run_end_to_end(tmp_path, flags):
    out = str(tmp_path / "run")
    run(
        OPT
        + ["--max_steps", "14", "--eval_steps", "7", "--learning_rate", "1e-3", "--output_dir", out]
        + flags
    )
    records = [json.loads(line) for line in trajectory(out).splitlines()]
    n = 2 if "--n_spsa" in flags else 3 if "--fzoo_n" in flags else 1
    assert [r["step"] for r in records] == [s for s in range(14) for _ in range(n)]
    assert len({r["seed"] for r in records}) == len(records)  # a fresh z for every estimate
    forwards = [
        json.loads(line)["forward_passes"] for line in open(os.path.join(out, "metrics.jsonl"))
    ]
    per_step = n + 1 if "--fzoo_n" in flags else 2 * n  # FZOO: N + 1; SPSA: 2 per z
    # c from a 2-forward estimate per group (embed, 2 layers)
    groups = 3 if "--use_zo_grad_est" in flags else 0
    assert forwards[-1] == 14 * per_step + 2 * groups and forwards == sorted(forwards)


def test_a_malformed_data_row_is_one_error_line_naming_file_and_line(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "RTE").mkdir(parents=True)
    good = '{"premise": "A cat sat.", "hypothesis": "A cat.", "label": "entailment", "idx": 0}\n'
    (data_dir / "RTE" / "train.jsonl").write_text(
        good * 3 + '{"premise": "no hypothesis", "label": "entailment"}\n'
    )
    (data_dir / "RTE" / "val.jsonl").write_text(good)
    out = tmp_path / "out"
    result = cli(
        "--task", "RTE", "--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps", "1"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.jsonl:4" in lines[0], (
        result.stderr
    )
    assert not out.exists()


def test_eval_cli_names_a_truncated_weight_file(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(models.TINY_OPT, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--model", str(model)],
        capture_output=True,
        text=True,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and str(weights) in lines[0], result.stderr


# --- the original, run for run: evaluation schedule, selection, objectives, weight decay
# -----------------
def results_of(out):
    return json.load(open(os.path.join(out, "results.json")))


def dev_steps(out):
    return [
        json.loads(line)["step"]
        for line in open(os.path.join(out, "metrics.jsonl"))
        if "dev_loss" in line
    ]


def make_run(argv):
    """A train.Run built as main() builds it (model, data, trainer config), without training."""
    args = flags.parse_args(argv)
    args = flags.replace(args, model=args.model or models.TINY_OPT)
    args = flags.resolve(args, train.model_type(args))
    return train.Run(args, distributed.setup(device="cpu"))


def test_dev_loss_weights_each_batch_by_its_rows_as_the_hf_evaluation_loop():
    run = make_run(OPT)
    model, tok, encoded = run.model, run.tok, run.encoded["train"][:20]
    # HF Trainer.evaluation_loop, transcribed: each batch's mean loss repeated
    # find_batch_size(inputs) times (the rows of input_ids: candidates for the classification loss),
    # then the mean. The dev accuracy comes from the same forwards.
    repeated, hits = [], 0
    for group in chunks(encoded, 8):  # 20 examples: batches of 8, 8, 4
        # the original's: one row per candidate
        batch = data.collate(group, run.kind, tok.pad_token_id)
        with torch.no_grad():
            logits = data.batch_logits(model, batch)
        repeated.append(data.task_loss(logits, batch).repeat(batch["input_ids"].shape[0]))
        hits += int((data.predictions(logits, batch) == batch["labels"]).sum())
    expected = torch.cat(repeated).mean().item()
    ours = dev_loss(model, encoded, run.kind, tok.pad_token_id, 8)
    # shared-prompt rows: the same numbers up to fp32 rounding (test_shared_prompt.py bounds it)
    assert ours["loss"] == pytest.approx(expected, rel=1e-5)
    assert ours["accuracy"] == hits / len(encoded)
    unweighted = torch.stack([r[0] for r in repeated]).mean().item()  # the mean over batches
    assert abs(unweighted - expected) > 1e-5  # the test tells the two apart


def test_evaluation_only_at_multiples_of_eval_steps_and_a_never_evaluated_run_keeps_its_last_model(
    tmp_path, capfd
):
    base = OPT + ["--learning_rate", "1e-3", "--logging_steps", "1"]
    every, final = str(tmp_path / "every"), str(tmp_path / "final")
    capfd.readouterr()
    run(base + ["--max_steps", "5", "--eval_steps", "2", "--output_dir", every])
    # not step 5 (HF)
    assert dev_steps(every) == [2, 4] and results_of(every)["best_step"] in (2, 4)
    dev = [
        json.loads(line)
        for line in open(os.path.join(every, "metrics.jsonl"))
        if "dev_loss" in line
    ]
    # the progress lines
    lines = [line for line in capfd.readouterr().err.splitlines() if "dev accuracy" in line]
    assert lines == [
        f"step {r['step']}/5 | dev loss {r['dev_loss']:.4f} | dev accuracy {r['dev_accuracy']:.4f}"
        for r in dev
    ]
    run(
        base + ["--max_steps", "5", "--eval_steps", "2", "--eval_final_step", "--output_dir", final]
    )
    assert dev_steps(final) == [2, 4, 5]
    # results.json's dev metrics are those logged when the selected model was evaluated: the saved
    # model, evaluated again, gives them bitwise (the last step's would differ)
    again = make_run(
        base + ["--max_steps", "5", "--eval_steps", "2", "--model", os.path.join(final, "model")]
    )
    dev = {
        r["step"]: r
        for r in map(json.loads, open(os.path.join(final, "metrics.jsonl")))
        if "dev_loss" in r
    }
    selected = results_of(final)
    assert (
        selected["best_step"] != 5 and dev[5]["dev_loss"] != dev[selected["best_step"]]["dev_loss"]
    )
    assert (
        again.evaluate_dev(with_metric=False)
        == selected["dev"]
        == {
            "loss": dev[selected["best_step"]]["dev_loss"],
            "accuracy": dev[selected["best_step"]]["dev_accuracy"],
        }
    )
    # --eval_on_start: the base model's dev point at step 0, never selected; at lr 0 it is the point
    # of every step
    start, still = str(tmp_path / "start"), str(tmp_path / "still")
    run(base + ["--max_steps", "2", "--eval_steps", "2", "--eval_on_start", "--output_dir", start])
    run(
        OPT
        + [
            "--learning_rate",
            "0",
            "--max_steps",
            "2",
            "--eval_steps",
            "2",
            "--eval_on_start",
            "--output_dir",
            still,
        ]
    )
    assert dev_steps(start) == [0, 2] and results_of(start)["best_step"] == 2
    logged = [
        json.loads(line)
        for line in open(os.path.join(still, "metrics.jsonl"))
        if "dev_loss" in line
    ]
    assert [(r["step"], r["forward_passes"]) for r in logged] == [(0, 0), (2, 4)]
    assert (
        logged[0]["dev_loss"] == logged[1]["dev_loss"]
        and logged[0]["dev_accuracy"] == logged[1]["dev_accuracy"]
    )
    assert json.loads(open(os.path.join(start, "metrics.jsonl")).readline()) == logged[0]
    last, evaluated = str(tmp_path / "last"), str(tmp_path / "evaluated")
    capfd.readouterr()
    run(base + ["--max_steps", "3", "--eval_steps", "4", "--output_dir", last])
    assert "keeping the last model: never evaluated during training" in capfd.readouterr().err
    assert (
        dev_steps(last) == []
        and results_of(last)["selection"] == "last"
        and results_of(last)["best_step"] == 3
    )
    run(
        base
        + ["--max_steps", "3", "--eval_steps", "4", "--eval_final_step", "--output_dir", evaluated]
    )
    assert results_of(evaluated)["selection"] == "dev" and results_of(evaluated)["best_step"] == 3
    a, b = (tensors(os.path.join(d, "model", "model.safetensors")) for d in (last, evaluated))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the last model is the step-3 model


def test_num_dev_0_selects_on_the_evaluation_set_as_run_py(tmp_path, capfd):
    out = str(tmp_path / "run")
    run(
        [
            "--task",
            "SST2",
            "--num_train",
            "24",
            "--num_dev",
            "0",
            "--num_eval",
            "8",
            "--batch_size",
            "4",
            "--max_steps",
            "2",
            "--eval_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--output_dir",
            out,
        ]
    )
    err = capfd.readouterr().err
    assert "model selection uses the evaluation set" in err and "Traceback" not in err
    results = results_of(out)
    assert results["selection"] == "eval" and results["dev"] == {} and dev_steps(out) == [2]


def test_non_differentiable_roberta_run_trains_on_minus_accuracy(tmp_path):
    out = str(tmp_path / "run")
    run(
        ROBERTA
        + [
            "--non_diff",
            "--max_steps",
            "2",
            "--eval_steps",
            "2",
            "--logging_steps",
            "1",
            "--learning_rate",
            "1e-3",
            "--output_dir",
            out,
        ]
    )
    losses = [
        json.loads(line)["loss"]
        for line in open(os.path.join(out, "metrics.jsonl"))
        if '"loss"' in line
    ]
    # -k/8
    assert len(losses) == 2 and all(-1.0 <= x <= 0.0 and (x * 8) == round(x * 8) for x in losses)
    # no --select_by: the last model
    assert dev_steps(out) == [] and results_of(out)["selection"] == "last"


@pytest.mark.parametrize(
    "family, flag, expected",
    [
        # large_models zo_update; medium_models decays everything
        ("opt", [], WD_EXEMPT),
        ("roberta", [], ()),
        ("opt", ["--wd_exempt", "none"], ()),
        ("roberta", ["--wd_exempt", "bias_norm"], WD_EXEMPT),
    ],
)
def test_weight_decay_exemptions_per_family_and_the_flag(family, flag, expected):
    argv = (OPT if family == "opt" else ROBERTA) + ["--weight_decay", "0.1"] + flag
    run_ = make_run(argv)
    assert flags.mezo_config(run_.args).wd_exempt == expected
    run_.args.trainer = "fo"
    assert run_.trainer().cfg.wd_exempt == expected


@pytest.mark.parametrize(
    "flag, check",
    [
        (
            ["--perturbation", "reference"],
            lambda r: flags.mezo_config(r.args).perturbation == "reference",
        ),
        (
            ["--seed_source", "numpy_global"],
            lambda r: flags.mezo_config(r.args).seed_source == "numpy_global",
        ),
        (
            ["--no_bos_override"],
            lambda r: r.encoded["train"][0].input_ids[0][0] == 2,
        ),  # OPT's own </s>
        ([], lambda r: r.encoded["train"][0].input_ids[0][0] == 0),  # the original's <s>
        (["--dtype", "fp16"], lambda r: next(r.model.parameters()).dtype == torch.float16),
        (["--select_by", "accuracy"], lambda r: r.args.select_by == "accuracy"),
        # SST-2 has two candidates: one row per example by default, one per candidate as the
        # original
        ([], lambda r: r.collate(r.encoded["train"][:3])["input_ids"].shape[0] == 3),
        (
            ["--per_candidate"],
            lambda r: r.collate(r.encoded["train"][:3])["input_ids"].shape[0] == 6,
        ),
        (
            ["--perturbation", "reference"],
            lambda r: r.collate(r.encoded["train"][:3])["input_ids"].shape[0] == 6,
        ),
    ],
)
def test_each_flag_of_the_differences_table_reaches_the_run(flag, check):
    assert check(make_run(OPT + flag))


def test_signal_handlers_are_restored_when_train_returns_or_raises(tmp_path, monkeypatch):
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    run(OPT + ["--max_steps", "1", "--eval_steps", "1", "--output_dir", str(tmp_path / "a")])
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before

    def fail(self, examples):
        raise RuntimeError("injected")

    monkeypatch.setattr(train.Run, "loss_fns", fail)
    with pytest.raises(RuntimeError, match="injected"):
        train.main(OPT + ["--max_steps", "1", "--output_dir", str(tmp_path / "b")])
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
