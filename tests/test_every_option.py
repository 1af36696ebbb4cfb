"""Issue 32: the variance-modified variants on a step's micro-batches; the refusal of a crashed
run's folder."""
import json

import pytest
import torch

import train
from helpers_zo import lm_batch, lm_loss, tiny_lm
from zo import MeZO, MeZOConfig
from zo.checkpoint import check_run_folder

OPT = ["--task", "SST2", "--num_train", "24", "--num_dev", "8", "--num_eval", "8",
       "--batch_size", "4"]
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
def test_the_same_command_after_a_crash_is_one_line_then_runs_with_overwrite(tmp_path, monkeypatch,
                                                                              capsys):
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
