"""Data-parallel MeZO (zo/distributed.py): 2 CPU processes under torchrun (gloo) against one
process.

Each launch runs tests/dist_worker.py (the tiny OPT with its tied vocabulary cut to 1499 rows, so
FSDP splits it 750/749; 5 MeZO steps on fixed global batches of 5 rows split 3/2, the last of 1 row,
which leaves rank 1 an empty slice); the worker writes JSON and weights that these tests assert on.

Tolerances, and why. One process and two ranks compute the same global token-mean loss, summed in a
different order (per-rank terms, then the all-reduce); nothing else differs: z is a function of
global element indices, so perturbations and updates are the same numbers on any world size.
- Sharded vs replicated, both 2 ranks: bitwise. Same rows per rank, FSDP's all-gathered fp32 weights
  equal the full tensors, the same all-reduce, and the update kernel is elementwise, so splitting a
  tensor into shards does not change any element's result.
- 2 ranks vs 1 process: step 0 sees identical weights, so its losses differ only by summation order,
  at most LOSS_EPS * fp32 eps * |loss| (a few ulp). SPSA amplifies that: |dg| <= (|dl+| + |dl-|) /
  (2 eps) (one loss ulp at 7.3 is 2.4e-4 in projected_grad with eps = 1e-3; measured: 0 to 2 of
  those). The weights then differ only through lr * sum_k dg_k * z with |z| <= 5.78 (Box-Muller on
  24-bit uniforms), plus one rounding per update (measured: under half that bound). Later losses
  move with those weight differences: LOSS_RTOL covers both (measured: 6.5e-7).
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import dist_worker as W
from zo import MeZO, MeZOConfig
from zo import distributed as zd

WORKER = Path(__file__).with_name("dist_worker.py")
LOSS_EPS, LOSS_RTOL, Z_MAX = 4, 2e-6, 5.78
F32 = torch.finfo(torch.float32).eps


def launch(mode, out, *args, nproc=2, timeout=120) -> subprocess.CompletedProcess:
    """Run the worker under torchrun (alone for nproc=0), one thread per process (2 shared
    cores)."""
    launcher = (
        []
        if nproc == 0
        else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *launcher, str(WORKER), mode, str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(out, mode, nproc):
    records = [json.loads((out / f"{mode}.rank{r}.json").read_text()) for r in range(nproc)]
    return records, torch.load(out / f"{mode}.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The oracle: the same steps in one process without torchrun (plain token mean, no
    weighting)."""
    out = tmp_path_factory.mktemp("single")
    proc = launch("single", out, nproc=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,), weights = results(out, "single", 1)
    assert record["world_size"] == 1 and record["comm"][0]["calls"] == {}  # no process group at all
    return record, weights


def assert_matches_single(records, weights, single):
    ref, ref_weights = single
    for r in records:  # every rank reports the reduced (global) values
        assert abs(r["loss"][0] - ref["loss"][0]) <= LOSS_EPS * F32 * abs(ref["loss"][0])
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=LOSS_RTOL, atol=0)
        g_tol = [2 * abs(loss) * LOSS_RTOL / (2 * W.EPS) for loss in ref["loss"]]
        assert all(
            abs(a - b) <= t for a, b, t in zip(r["projected_grad"], ref["projected_grad"], g_tol)
        )
    dg = sum(abs(a - b) for a, b in zip(records[0]["projected_grad"], ref["projected_grad"]))
    initial = W.tiny_opt().state_dict()
    assert ref_weights.keys() == weights.keys() == initial.keys()
    for name, w in ref_weights.items():
        assert not torch.equal(w, initial[name]), name  # the steps moved every parameter
        bound = W.LR * dg * Z_MAX + W.STEPS * F32 * w.abs()
        assert ((weights[name] - w).abs() <= bound).all(), name


def expected_all_gather_bytes(world_size=2):
    """Two forwards per step, each all-gathering every parameter once, dim 0 padded to a multiple of
    the world size (FSDP2's torch.chunk rule); counted from the model, not from the counter."""
    model = W.tiny_opt()
    padded = sum(
        math.ceil(p.shape[0] / world_size) * world_size * p[0].numel() for p in model.parameters()
    )
    units = sum(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList)) + 1
    return 2 * units, 2 * padded * 4


def run_two_ranks(tmp_path_factory, mode):
    out = tmp_path_factory.mktemp(mode)
    proc = launch(mode, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(out, mode, 2)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    return run_two_ranks(tmp_path_factory, "replicated")


@pytest.mark.slow
def test_replicated_two_ranks_match_one_process(single, replicated):
    records, weights = replicated
    assert_matches_single(records, weights, single)
    for r in records:  # the only communication: one all-reduce of the two fp32 losses per step
        assert r["comm"] == [{"calls": {"all_reduce": 1}, "bytes": {"all_reduce": 8}}] * W.STEPS


@pytest.mark.slow
def test_directions_two_ranks_equal_one_process_with_two_z_bitwise(tmp_path_factory):
    """`--parallel directions` at the library level: each rank evaluates one of the step's two z
    on the whole batch and the ranks exchange the losses and nothing else; every rank's losses,
    estimates and weights are the one process's with n_spsa=2, bitwise."""
    out = tmp_path_factory.mktemp("directions")
    for mode, nproc in (("single", 0), ("directions", 2)):
        proc = launch(mode, out, "--n_spsa", "2", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (one,), one_weights = results(out, "single", 1)
    records, weights = results(out, "directions", 2)
    for r in records:
        assert (r["loss"], r["projected_grad"]) == (one["loss"], one["projected_grad"])
        # one all-gather a step of each rank's two fp32 losses: 2 ranks x 2 x 4 bytes
        assert r["comm"] == [{"calls": {"all_gather": 1}, "bytes": {"all_gather": 16}}] * W.STEPS
    assert weights.keys() == one_weights.keys()
    assert all(torch.equal(weights[n], one_weights[n]) for n in weights)


@pytest.mark.slow
def test_sharded_two_ranks_match_one_process_and_replicated(single, replicated, tmp_path_factory):
    records, weights = run_two_ranks(tmp_path_factory, "sharded")
    assert_matches_single(records, weights, single)
    # bitwise equal to the replicated run: same per-rank terms, same reduction, elementwise update
    (rep, _), rep_weights = replicated
    assert (records[0]["loss"], records[0]["projected_grad"]) == (
        rep["loss"],
        rep["projected_grad"],
    )
    assert all(torch.equal(weights[n], rep_weights[n]) for n in weights)

    calls, nbytes = expected_all_gather_bytes()
    for rank, r in enumerate(records):
        assert all(r["all_dtensor_after_step"])  # every unit resharded: updates land in the shards
        # z of each local shard == the matching slice of the whole tensor's z (incl. the 750/749
        # rows)
        uneven = (
            {"decoder.embed_tokens.weight": (750, 0), "decoder.embed_positions.weight": (257, 0)}
            if rank == 0
            else {
                "decoder.embed_tokens.weight": (749, 750 * 64),
                "decoder.embed_positions.weight": (256, 257 * 64),
            }
        )
        assert all(z["equal"] for z in r["z_slices"])
        assert {
            z["name"]: (z["local_rows"], z["offset"]) for z in r["z_slices"] if z["name"] in uneven
        } == uneven
        # zo's hooks see FSDP's all-gathered full tensors (tied head included), so z at offset 0
        assert (
            r["hook_probe"]
            == [
                ["decoder.embed_tokens", "Parameter", [W.VOCAB, 64]],
                ["decoder.layers.0.fc1", "Parameter", [256, 64]],
                ["lm_head", "Parameter", [W.VOCAB, 64]],
            ]
            * 2
        )
        # per step: one all-gather per FSDP unit in each forward, plus the 8-byte all-reduce
        assert (
            r["comm"]
            == [
                {
                    "calls": {"all_gather_single": calls, "all_reduce": 1},
                    "bytes": {"all_gather_single": nbytes, "all_reduce": 8},
                }
            ]
            * W.STEPS
        )
        # resume: full state gathered on rank 0 at step 3, loaded into a fresh sharded model,
        # continued
        assert r["resumed_loss"] == r["loss"][W.RESUME_AT :]
        assert r["resumed_projected_grad"] == r["projected_grad"][W.RESUME_AT :]
        assert r["resumed_weights_equal"]
    main = records[0]
    # save_model(full_model(m)) -> load_model
    assert main["hf_roundtrip_equal"] and main["plain_tied"]
    # the plain copy computes what FSDP computes
    assert main["forward_equal"] and main["generate_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["exit", "hang"])
def test_a_lost_rank_ends_the_job_within_the_timeout(tmp_path, failure):
    """Rank 1 dies (os._exit) or hangs at step 2; rank 0's collective fails at once (closed
    connection) or after the timeout, with one error line, and the launcher exits non-zero."""
    timeout = 8
    proc = launch(
        "replicated", tmp_path, "--fail-at", "2", "--failure", failure, "--timeout", str(timeout)
    )
    after_failure = time.time() - float((tmp_path / "failed_at").read_text())
    assert proc.returncode != 0
    if failure == "exit":
        assert after_failure < timeout  # noticed without waiting for the timeout
    else:
        assert timeout - 1 <= after_failure < timeout + 20  # (rank 0 starts waiting a moment later)
        assert "error: rank 0 lost contact with the group (collective timeout 8 s)" in proc.stderr
        assert "[rank0]: Traceback" not in proc.stderr  # the error line instead of a traceback


def test_split_is_contiguous_balanced_and_covers_the_batch():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [zd.split(n, r, world) for r in range(world)]
            expected = np.array_split(np.arange(n), world)
            assert [list(range(n))[s] for s in parts] == [e.tolist() for e in expected]


def test_setup_without_torchrun_is_a_plain_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = zd.setup(timeout_s=5, device="cpu")
    assert (d.rank, d.world_size, d.is_main, d.grouped, d.device.type) == (0, 1, True, False, "cpu")
    losses = torch.tensor([1.5, 2.5])
    assert torch.equal(d.reduce_losses(losses), losses)  # no group: nothing to reduce
    with pytest.raises(ValueError, match="sharded DTensor"):
        zd.local_view(torch.zeros(3))  # an unsharded parameter would silently lose its update


def test_sharded_on_one_process_equals_the_whole_model_bitwise():
    """The fast twin of the two-rank tests: FSDP2 over a group of one, in this process, against the
    whole model. One shard is the whole tensor and z reads global indices, so every loss, projected
    gradient and weight is the same number, bitwise."""
    batches, whole_d = W.global_batches(), zd.Dist()

    def steps(model, mezo, d):
        out = []
        for ids, mask in batches:
            loss, g = mezo.zo_step(model, W.loss_closure(ids, mask, d, single=False))
            mezo.zo_update(model)
            out.append((loss.item(), g.item()))
        return out

    config = MeZOConfig(lr=W.LR, eps=W.EPS, weight_decay=W.WD, seed=W.SEED)
    model = W.tiny_opt()
    expected = steps(model, MeZO(model, config), whole_d)
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        d = zd.Dist()
        sharded = zd.shard_model(W.tiny_opt(), d)
        mezo = MeZO(sharded, config, local_view=zd.local_view, reduce_losses=d.reduce_losses)
        assert steps(sharded, mezo, d) == expected
        weights = zd.full_state_dict(sharded)
    finally:
        torch.distributed.destroy_process_group()
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
