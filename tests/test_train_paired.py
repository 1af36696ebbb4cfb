"""train.py --perturbation paired (zo/paired.py) against exact restore: the same trajectory and
weights, bitwise, on every batch layout and mode the program builds (the bound derived in
tests/test_zo_paired.py: zero wherever a non-owned op computes each row by the same arithmetic
at 2B rows as at B rows; these runs show it holds for the tiny OPT and RoBERTa layers here,
including the frozen Linears of LoRA and prefix runs, which see 2B rows). The generation loss
(--non_diff on SQuAD) does not pair, and FZOO's forwards are one-sided: both are refused."""

import pytest
import torch

import train
from program import config, flags
from tests.helpers.refusals import refused
from tests.test_train import OPT, ROBERTA, SHORT, run, tensors, trajectory
from zo.paired import PairedHooks

CASES = {
    "ft": OPT,
    "lora": OPT + ["--mode", "lora"],
    "prefix": OPT + ["--mode", "prefix", "--learning_rate", "1e-2"],
    "packed prompts": "--task Copa --train_as_classification true --num_train 16 --num_dev 4 "
    "--num_eval 4 --batch_size 4".split(),
    "roberta": ROBERTA,
    "roberta -accuracy": ROBERTA + ["--non_diff"],
    "accumulation, n-SPSA, Adam": OPT
    + "--gradient_accumulation_steps 2 --n_spsa 2 --optimizer adam".split(),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_paired_runs_equal_exact_runs_bitwise(tmp_path, monkeypatch, case):
    paired_forwards = []
    rows = PairedHooks.rows
    monkeypatch.setattr(
        PairedHooks, "rows", lambda self, n: (paired_forwards.append(n), rows(self, n))[1]
    )
    outs = {}
    for perturbation in ("exact", "paired"):
        out = outs[perturbation] = str(tmp_path / perturbation)
        argv = ["--learning_rate", "1e-3", *CASES[case], *SHORT, "--perturbation", perturbation]
        run(argv + ["--output_dir", out])
    assert paired_forwards  # the paired forward ran
    assert trajectory(outs["exact"]) == trajectory(outs["paired"])
    assert len(trajectory(outs["exact"]).splitlines()) >= 4
    weights = [
        tensors(f"{d}/model/model.safetensors")
        if "--mode" not in CASES[case]
        else tensors(f"{d}/model.adapter.safetensors")
        for d in outs.values()
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize(
    "extra, what",
    [
        (["--task", "SQuAD", "--non_diff"], "greedy generations (-F1) do not pair"),
        (
            ["--estimator", "fzoo"],
            "estimator=fzoo's forwards are one-sided",
        ),
    ],
)
def test_what_does_not_pair_is_refused_in_one_line(capsys, tmp_path, extra, what):
    out = tmp_path / "out"
    argv = [*OPT, *SHORT, "--perturbation", "paired", *extra, "--output_dir", str(out)]
    refused(capsys, train.main, argv, what, tmp_path)
    assert not out.exists()


DEFAULTS = {
    "mezo": ([], "paired"),
    "n-SPSA lora": (["--mode", "lora", "--n_spsa", "2"], "paired"),
    "fzoo": (["--estimator", "fzoo"], "exact"),
    "greedy generations": (["--task", "SQuAD", "--non_diff"], "exact"),
    "roberta -accuracy": (ROBERTA[2:] + ["--non_diff"], "paired"),
    "asked for": (["--perturbation", "exact"], "exact"),
    "backprop": (["--trainer", "fo"], None),
}


@pytest.mark.parametrize("extra, expected", DEFAULTS.values(), ids=list(DEFAULTS))
def test_the_default_perturbation_pairs_where_the_step_pairs(extra, expected):
    """Paired is the default wherever both signs of a z can run as one forward (SPSA with a
    differentiable loss, or RoBERTa's -accuracy); FZOO's one-sided forwards and greedy generations
    take exact restore. The resolved value is what config.json records."""
    args = flags.parse_args([*OPT, *SHORT, *extra])
    family = "roberta" if "--model" in extra else "opt"
    assert flags.resolve(args, family).perturbation == expected


def test_a_record_without_perturbation_ran_exact():
    """A record that predates the field ran exact restore (the default before paired)."""
    assert config.as_recorded({"trainer": "zo"})["perturbation"] == "exact"
    assert "perturbation" not in config.as_recorded({"trainer": "fo"})
