"""LOZO (zo/lozo.py) against a dense transcription of the authors' lowrank_zo_step /
lowrank_zo_update: U, V and z = U V^T materialised with plain torch from the same hash, the
perturbed losses and the updated weights compared bitwise (eager kernels: the same float operations
on both sides); deliberate breaks of the transcription must fail the comparison. Replay and resume
rebuild a run bitwise; train.py runs it end to end."""

import json

import pytest
import torch

from program.trajectory import Trajectory, read_trajectory
from tests.helpers.zo import dense_z, lm_batch, lm_loss, tiny_lm
from zo import MeZO, MeZOConfig, replay
from zo.rng import name_key, normal

EPS, LR, WD = 1e-2, 1e-2, 0.1


def t(v):
    return torch.full((), v, dtype=torch.int64)


def low_rank_z(slot, u_seed, v_seed, rank):
    """z = U V^T of a matrix slot, U (m x r) from the step's seed, V (n x r) from V's seed."""
    m = slot.param.shape[0]
    n = slot.param.numel() // m
    u = normal(t(u_seed), slot.key_t, t(0), m * rank, "cpu").view(m, rank)
    v_key = t(name_key(f"{slot.name}#V"))
    v = normal(t(v_seed), v_key, t(0), n * rank, "cpu").view(n, rank)
    return (u @ v.T).view(slot.param.shape)


def transcription(slots, step_seed, v_seed, rank, *, scale=1.0):
    """The authors' z: low rank for ndim >= 2, elementwise normal otherwise. scale: a break."""
    return {
        s: scale * low_rank_z(s, step_seed, v_seed, rank)
        if s.param.dim() >= 2
        else dense_z(s, step_seed)
        for s in slots
    }


def loss_at(model, slots, loss_fn, shifts):
    model.eval()
    saved = {s: s.param.detach().clone() for s in slots}
    with torch.no_grad():
        for s in slots:
            s.param.add_(shifts[s])
        loss = loss_fn(model).detach()
        for s in slots:
            s.param.copy_(saved[s])
    return loss


def cfg(**kw):
    base = dict(lr=LR, eps=EPS, weight_decay=WD, lozo=True, perturbation="eager", seed=3)
    return MeZOConfig(**{**base, **kw})


@pytest.mark.parametrize("rank, nu", [(2, 2), (1, 3)])
def test_lozo_matches_the_dense_transcription_and_breaks_fail(rank, nu):
    model, ids = tiny_lm(), lm_batch()
    loss_fn = lm_loss(ids)
    mezo = MeZO(model, cfg(lozo_rank=rank, lozo_nu=nu))
    eps, lr, wd = (torch.tensor(x, dtype=torch.float32) for x in (EPS, LR, WD))
    v_seed = None
    for step in range(4):
        before = {s: s.param.detach().clone() for s in mezo.slots}
        loss1, g = mezo.zo_step(model, loss_fn)
        seed = mezo.estimates[0][0]
        v_seed = seed if step % nu == 0 else v_seed
        z = transcription(mezo.slots, seed, v_seed, rank)
        plus = loss_at(model, mezo.slots, loss_fn, {s: eps * z[s] for s in mezo.slots})
        minus = loss_at(model, mezo.slots, loss_fn, {s: -eps * z[s] for s in mezo.slots})
        assert torch.equal(loss1, plus)
        assert torch.equal(g, (plus - minus) / (2 * EPS))
        # the breaks: V redrawn at every step, a scaled z, MeZO's dense z for the matrices
        breaks = {
            "V every step": transcription(mezo.slots, seed, seed, rank),
            "z / 2 (a 1/r factor at r = 2)": transcription(
                mezo.slots, seed, v_seed, rank, scale=0.5
            ),
            "dense z": {s: dense_z(s, seed) for s in mezo.slots},
        }
        for name, wrong in breaks.items():
            if name == "V every step" and step % nu == 0:
                continue  # V is this step's: the break is the transcription
            shifted = loss_at(model, mezo.slots, loss_fn, {s: eps * wrong[s] for s in before})
            assert not torch.equal(shifted, plus), name
        mezo.zo_update(model)
        for s in mezo.slots:
            decay = wd if s.decay else torch.tensor(0.0)
            expected = before[s] - lr * (g * z[s] + decay * before[s])
            assert torch.equal(s.param.detach(), expected), (step, s.name)


def test_matrices_get_low_rank_z_and_vectors_normal_z():
    model = tiny_lm()
    mezo = MeZO(model, cfg(lozo_rank=2))
    mezo.begin_step(model)
    seed = mezo.zo_random_seed
    for s in mezo.slots:
        z = transcription([s], seed, seed, 2)[s]
        if s.param.dim() >= 2:
            assert torch.linalg.matrix_rank(z) == 2, s.name
        else:
            assert torch.equal(z, dense_z(s, seed)), s.name


def run(tmp_path, steps, config, name="t.jsonl", state=None, model=None):
    model = model or tiny_lm()
    trajectory = Trajectory(tmp_path / name, keep_before_step=0 if state is None else state[0])
    mezo = MeZO(model, config, trajectory=trajectory)
    if state is not None:
        mezo.load_state_dict(state[1])
    ids = lm_batch(n=6)
    while mezo.global_step < steps:
        mezo.step(model, lm_loss(ids[mezo.global_step % 3 :]))
    trajectory.flush()
    return model, mezo


@pytest.mark.parametrize("perturbation", ["exact", "eager"])
def test_lozo_replays_bitwise(tmp_path, perturbation):
    config = cfg(lozo_nu=2, perturbation=perturbation)
    model, _ = run(tmp_path, 5, config)
    base = tiny_lm()
    replay(base, read_trajectory(tmp_path / "t.jsonl"), config)
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(base.embed_tokens.weight, tiny_lm().embed_tokens.weight)


def test_lozo_resumes_bitwise_mid_interval(tmp_path):
    """Resumed at step 3 with nu = 4: V is step 0's, known only from the checkpointed state."""
    config = cfg(lozo_nu=4, perturbation="exact")
    whole, _ = run(tmp_path, 5, config, "whole.jsonl")
    model, first = run(tmp_path, 3, config, "resumed.jsonl")
    state = first.state_dict()
    resumed, _ = run(tmp_path, 5, config, "resumed.jsonl", state=(3, state), model=model)
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert (tmp_path / "whole.jsonl").read_text() == (tmp_path / "resumed.jsonl").read_text()
    # without V's seed the resumed run differs: the state is what made it bitwise
    model, first = run(tmp_path, 3, config, "lost.jsonl")
    state = {**first.state_dict(), "direction": None}
    lost, _ = run(tmp_path, 5, config, "lost.jsonl", state=(3, state), model=model)
    assert not torch.equal(lost.embed_tokens.weight, whole.embed_tokens.weight)


@pytest.mark.parametrize(
    "features, what",
    [({"fsdp": True}, "FSDP"), ({"cuda_graphs": True}, "CUDA graphs")],
)
def test_lozo_refuses_what_it_does_not_support(features, what):
    from zo import check_supported

    with pytest.raises(ValueError, match=f"lozo_rank=2 does not support {what}"):
        check_supported(cfg(), **features)
    with pytest.raises(ValueError, match="one direction at a time"):
        cfg(sparse_mezo=0.5)


@pytest.mark.slow
def test_train_runs_lozo_end_to_end(tmp_path):
    import train

    out = tmp_path / "run"
    argv = ["--task", "SST2", "--num_train", "24", "--num_dev", "8", "--num_eval", "8"]
    argv += ["--batch_size", "4", "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1"]
    argv += ["--lozo", "--lozo_nu", "1", "--learning_rate", "1e-3", "--output_dir", str(out)]
    assert train.main(argv) == 0
    lines = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    assert json.loads((out / "config.json").read_text())["lozo"] is True
