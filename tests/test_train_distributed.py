"""`torchrun --nproc 2 train.py` (gloo, CPU) against one process, replicated and --fsdp, and
resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 23 examples in batches of 5: the last batch of an epoch has 3 rows, split 2/1 across the ranks
ARGS = (
    "--num_train 23 --num_dev 8 --num_eval 8 --batch_size 5 --logging_steps 1"
    " --learning_rate 1e-4 --eval_batch_size 16"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(out, *extra, nproc=None, wait=True):
    """train.py with ARGS and `extra` into out; a --replay takes only its own flags (the replayed
    run's config.json sets the rest)."""
    run_args = [] if "--replay" in extra else ARGS
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *run_args, "--output_dir", str(out)]
    cmd += extra
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(
        cmd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return proc


def losses(out):
    return [
        json.loads(line)["loss"]
        for line in open(os.path.join(out, "metrics.jsonl"))
        if '"loss"' in line
    ]


def weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


@pytest.mark.slow
def test_two_ranks_replicated_and_sharded_match_one_process(tmp_path):
    steps = ["--max_steps", "8", "--eval_steps", "4"]
    launch(tmp_path / "one", *steps)
    launch(tmp_path / "replicated", *steps, nproc=2)
    launch(tmp_path / "sharded", *steps, "--fsdp", nproc=2)
    one, rep, shard = (losses(tmp_path / d) for d in ("one", "replicated", "sharded"))
    assert len(one) == 8
    # Tolerance from the order of the loss reduction only: each rank sums its rows, then the two
    # terms are added, vs one sum over all rows: a few fp32 ulps of the loss (rtol 2e-6).
    assert one == pytest.approx(rep, rel=2e-6, abs=0)
    # Replicated and sharded compute the same per-rank terms and the same update: bitwise.
    assert rep == shard
    # one process replays a sharded run
    launch(tmp_path / "replayed", "--replay", str(tmp_path / "sharded"))
    w1, w2, w3 = (weights(tmp_path / d) for d in ("one", "replicated", "sharded"))
    w4 = weights(tmp_path / "replayed")
    assert all(torch.equal(w3[k], w4[k]) for k in w3)
    assert w2.keys() == w1.keys() == w3.keys()
    for k in w1:
        assert torch.equal(w2[k], w3[k]), k
        # A loss difference of d changes g by d/(2 eps); over 8 steps at lr 1e-4 with |z| <= 6 the
        # weights can move apart by at most 8 * lr * 6 * |dg|, with |dg| ~ 1e-3 here.
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-5), k


@pytest.mark.slow
def test_paired_steps_on_two_ranks_equal_exact_steps(tmp_path):
    """--perturbation paired (zo/paired.py) under FSDP2 (the pair built inside the units'
    unshard/reshard) and replicated: each rank's forward over 2 x its rows gives the losses and
    estimates of exact restore's two forwards, bitwise (the last batch of 3 rows is split 2/1)."""
    steps = ["--max_steps", "5", "--eval_steps", "5"]
    for name, extra in (("exact", []), ("paired", ["--perturbation", "paired"])):
        launch(tmp_path / f"{name}-sharded", *steps, "--fsdp", *extra, nproc=2)
    launch(tmp_path / "paired-replicated", *steps, "--perturbation", "paired", nproc=2)
    exact, sharded, replicated = (
        losses(tmp_path / d) for d in ("exact-sharded", "paired-sharded", "paired-replicated")
    )
    assert len(exact) == 5 and exact == sharded == replicated
    w1, w2 = weights(tmp_path / "exact-sharded"), weights(tmp_path / "paired-sharded")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_sharded_resume_after_sigint_continues_identically(tmp_path):
    steps = ["--max_steps", "30", "--eval_steps", "10", "--save_steps", "10", "--fsdp"]
    launch(tmp_path / "whole", *steps, nproc=2)
    proc = launch(tmp_path / "parts", *steps, nproc=2, wait=False)
    metrics = tmp_path / "parts" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count('"loss"') >= 3
    ):
        time.sleep(0.05)
    # what Ctrl-C does: every rank gets it, at slightly different steps
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert "checkpoint saved" in stderr, stderr[-3000:]
    stopped = len(losses(tmp_path / "parts"))
    assert 3 <= stopped < 30 and not (tmp_path / "parts" / "results.json").exists()
    launch(tmp_path / "parts", *steps, "--resume", nproc=2)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with (
        open(tmp_path / "whole" / "trajectory.jsonl") as f,
        open(tmp_path / "parts" / "trajectory.jsonl") as g,
    ):
        assert f.read() == g.read()


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer", [["--optimizer", "adam"], ["--momentum", "0.9"]], ids=["adam", "momentum"]
)
def test_sharded_optimizer_state_is_resharded_on_resume(tmp_path, optimizer):
    """The checkpoint holds the optimizer's moments whole; a sharded resume must give each rank its
    shard again. A run stopped at step 4 and resumed to step 8 equals the run of 8 steps,
    bitwise."""
    steps = ["--eval_steps", "2", "--save_steps", "2", "--fsdp", *optimizer]
    launch(tmp_path / "whole", "--max_steps", "8", *steps, nproc=2)
    launch(tmp_path / "parts", "--max_steps", "4", *steps, nproc=2)
    launch(tmp_path / "parts", "--max_steps", "8", "--resume", nproc=2)
    assert (
        losses(tmp_path / "parts") == losses(tmp_path / "whole")
        and len(losses(tmp_path / "whole")) == 8
    )
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved_tensors(out) -> dict:
    """Every tensor of every .safetensors file the run wrote (model or adapter, best, checkpoints),
    by file and name."""
    return {
        (str(path.relative_to(out)), name): t
        for path in sorted(out.rglob("*.safetensors"))
        for name, t in load_file(path).items()
    }


def assert_same_run(a, b):
    """Two run folders with bitwise the same losses, trajectory and saved weights."""
    assert losses(a) == losses(b)
    assert (a / "trajectory.jsonl").read_text() == (b / "trajectory.jsonl").read_text()
    wa, wb = saved_tensors(a), saved_tensors(b)
    assert wa and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [
        k for k in wa if not torch.equal(wa[k], wb[k])
    ]


DIRECTIONS = {
    "ft-nspsa": "--n_spsa 2",
    "lora-nspsa": "--mode lora --n_spsa 2",
    "ft-fzoo": "--estimator fzoo --fzoo_n 2",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", DIRECTIONS.values(), ids=DIRECTIONS)
def test_directions_across_two_ranks_equal_one_process_bitwise(tmp_path, method):
    """`torchrun --nproc 2 train.py --parallel directions`: each rank evaluates one of the step's
    two z on the whole batch; the gathered losses give every rank the same two updates, so the run
    is the one-process run with the same N, bitwise."""
    steps = ["--max_steps", "4", "--eval_steps", "2", *method.split()]
    launch(tmp_path / "one", *steps)
    launch(tmp_path / "two", *steps, "--parallel", "directions", nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    trajectory = (tmp_path / "two" / "trajectory.jsonl").read_text().splitlines()
    assert len(losses(tmp_path / "two")) == 4 and len(trajectory) == 4 * 2  # every (seed, g)


@pytest.mark.slow
def test_directions_run_resumes_on_one_process_and_replays_bitwise(tmp_path):
    """A two-rank directions run stopped at step 2 and resumed by one process (where it runs is
    --resume's to change) equals the whole two-rank run; one process replays it bitwise."""
    steps = "--eval_steps 2 --save_steps 2 --n_spsa 2 --parallel directions".split()
    launch(tmp_path / "whole", "--max_steps", "4", *steps, nproc=2)
    launch(tmp_path / "parts", "--max_steps", "2", *steps, nproc=2)
    launch(tmp_path / "parts", "--max_steps", "4", "--resume")
    assert len(losses(tmp_path / "whole")) == 4
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    launch(tmp_path / "replayed", "--replay", str(tmp_path / "whole"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "replayed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_mesh_of_two_direction_groups_by_two_data_shards(tmp_path):
    """4 ranks = 2 direction groups x 2 data shards: each group's two ranks sum their halves of
    the batch (as 2-rank data parallelism does), the groups gather. Bitwise the 2-rank data-parallel
    run with the same N; the one-process run up to the data-parallel tolerance (the order of the
    loss sum, test_two_ranks_replicated_and_sharded_match_one_process)."""
    steps = "--max_steps 4 --eval_steps 2 --n_spsa 2".split()
    launch(tmp_path / "one", *steps)
    launch(tmp_path / "data", *steps, nproc=2)
    launch(
        tmp_path / "mesh", *steps, "--parallel", "directions", "--direction_groups", "2", nproc=4
    )
    assert_same_run(tmp_path / "data", tmp_path / "mesh")
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "mesh"), rel=2e-6, abs=0)
    w1, w4 = weights(tmp_path / "one"), weights(tmp_path / "mesh")
    assert all(torch.allclose(w1[k], w4[k], rtol=0, atol=1e-5) for k in w1)
