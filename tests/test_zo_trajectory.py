"""Trajectory log: base weights + replay = trained weights, bitwise; the file format and resume."""

import json

import pytest
import torch

from program.trajectory import Trajectory, read_trajectory, records_up_to
from tests.helpers.zo import lm_batch, lm_loss, tiny_lm
from zo import MeZO, MeZOConfig, learning_rate, replay

CONFIGS = {
    "sgd": MeZOConfig(
        lr=1e-2, eps=1e-2, weight_decay=0.1, n_spsa=2, lr_scheduler="linear", max_steps=6
    ),
    "adam": MeZOConfig(
        lr=1e-3, eps=1e-2, weight_decay=0.01, optimizer="adam", warmup_steps=2, max_steps=6
    ),
}


def train(config, path, steps=5):
    model, ids = tiny_lm(), lm_batch()
    trajectory = Trajectory(path, keep_before_step=0)
    mezo = MeZO(model, config, trajectory=trajectory)
    for step in range(steps):
        # gradient accumulation: no data in replay
        mezo.step(model, [lm_loss(ids[:2]), lm_loss(ids[2:])])
        if step % 2 == 1:
            trajectory.flush()
    trajectory.flush()
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_replay_reproduces_trained_weights_bitwise(tmp_path, name):
    config, path = CONFIGS[name], tmp_path / "trajectory.jsonl"
    trained = train(config, path)
    base = tiny_lm()
    assert not torch.equal(base.embed_tokens.weight, trained.embed_tokens.weight)
    replay(base, read_trajectory(path), config)
    for (n, p), q in zip(trained.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n


def test_records_hold_step_seed_grad_and_the_lr_before_stepping(tmp_path):
    config, path = CONFIGS["sgd"], tmp_path / "t.jsonl"
    train(config, path, steps=3)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(set(r) == {"step", "seed", "projected_grad", "lr"} for r in records)
    assert [r["step"] for r in records] == [0, 0, 1, 1, 2, 2]  # n_spsa=2: one line per z
    assert [r["lr"] for r in records[::2]] == [
        learning_rate(t, 1e-2, "linear", 6) for t in range(3)
    ]
    assert records[0]["lr"] == 1e-2 and records[4]["lr"] < records[2]["lr"]
    assert all(isinstance(r["seed"], int) and 0 <= r["seed"] < 10**9 for r in records)
    for r in records:  # exactly representable as fp32
        assert torch.tensor(r["projected_grad"], dtype=torch.float32).item() == r["projected_grad"]


def test_resume_truncates_and_torn_lines_are_dropped(tmp_path):
    path = tmp_path / "t.jsonl"
    train(CONFIGS["sgd"], path, steps=3)
    with open(path, "a") as f:
        f.write('{"step": 3, "se')  # a crash mid-write
    assert [r["step"] for r in read_trajectory(path)] == [0, 0, 1, 1, 2, 2]
    Trajectory(path, keep_before_step=2)
    assert [r["step"] for r in read_trajectory(path)] == [0, 0, 1, 1]


def test_replay_refuses_what_it_cannot_reproduce(tmp_path):
    for config in (MeZOConfig(perturbation="reference"), MeZOConfig(zo_variant="param_norm")):
        with pytest.raises(ValueError):
            replay(tiny_lm(), [], config)


def test_a_garbled_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    train(CONFIGS["sgd"], path, steps=3)
    lines = path.read_text().splitlines(keepends=True)
    for bad in (
        '{"step": 1, "se\n',
        '{"step": 1, "seed": 5, "projected_grad": 0.1}\n',
        "[1, 2]\n",
        '{"step": -1, "seed": 5, "projected_grad": 0.1, "lr": 0.1}\n',
        b"\xff\n",
    ):
        if isinstance(bad, bytes):
            path.write_bytes("".join(lines[:2]).encode() + bad + "".join(lines[3:]).encode())
        else:
            path.write_text("".join(lines[:2]) + bad + "".join(lines[3:]))
        with pytest.raises(ValueError, match="garbled trajectory") as e:
            read_trajectory(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        assert isinstance(bad, bytes) or f"{path}:3)" in str(e.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty", "ends before step 0"),
        ("truncated", "ends before step 2"),
        ("torn last step", "1 lines for step 2, expected 2"),
        ("duplicated step", "4 lines for step 1, expected 2"),
        ("step logged twice", "repeats step 1 where step 3 belongs"),
        ("missing step", "skips to step 2 where step 1 belongs"),
    ],
)
def test_replay_records_cover_every_step_once(tmp_path, damage, message):
    config, path = CONFIGS["sgd"], tmp_path / "t.jsonl"
    train(config, path, steps=4)  # n_spsa=2: two lines per step
    lines = path.read_text().splitlines(keepends=True)
    assert [r["step"] for r in records_up_to(path, 3, config)] == [0, 0, 1, 1, 2, 2]
    damaged = {
        "empty": [],
        "truncated": lines[:4],
        "torn last step": lines[:5],
        "duplicated step": lines[:4] + lines[2:4] + lines[4:],
        "step logged twice": lines[:6] + lines[2:4],
        "missing step": lines[:2] + lines[4:],
    }[damage]
    path.write_text("".join(damaged))
    with pytest.raises(ValueError, match=message) as e:
        records_up_to(path, 3, config)
    assert str(path) in str(e.value)
