"""The step is bitwise what it was when these artefacts were recorded (issue 28: the step moved
into one block of zo/mezo.py and the methods into their own files; nothing a run computes may
change). tests/golden/step_as_recorded.json holds, per configuration, the trajectory lines and a
hash of the final weights of a few steps on the tiny LM, written by the code before the move
(`python -m tests.test_zo_as_recorded record`).

Bitwise results depend on the machine (the forward's matmuls, the CPU's log and cos: zo/rng.py), so
the file also holds a probe of the machine that wrote it; elsewhere the tests skip, saying why.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from program.trajectory import Trajectory, read_trajectory
from tests.helpers.zo import lm_batch, lm_loss, tiny_lm
from zo import MeZO, MeZOConfig, replay

GOLDEN = Path(__file__).parent / "golden" / "step_as_recorded.json"
STEPS = 3
# normal z as recorded: the library's cos (the polynomial cos came later, issue 30)
BASE = dict(lr=1e-2, eps=1e-2, weight_decay=0.01, seed=7, normal_z="library_cos")
CONFIGS = {
    "default": {},
    "fzoo": {"estimator": "fzoo", "fzoo_n": 3},
    "sparse": {"sparse_mezo": 0.5},
    "n_spsa": {"n_spsa": 2},
    "momentum": {"momentum": 0.9},
    "adam": {"optimizer": "adam"},
    "rademacher": {"distribution": "rademacher"},
    "param_norm": {"zo_variant": "param_norm"},
    "zo_grad_est": {"zo_variant": "grad_norm", "use_zo_grad_est": True},
    "reference": {"perturbation": "reference"},
}
REPLAYABLE = ("default", "fzoo", "sparse", "n_spsa", "momentum", "adam", "rademacher")


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def probe() -> str:
    """This machine's bits of what a run's bits depend on: a compiled normal z and a forward."""
    model = tiny_lm()
    mezo = MeZO(model, MeZOConfig(lr=1e-2, eps=1e-2, normal_z="library_cos"))
    mezo.step(model, lm_loss(lm_batch()))
    return weights_hash(model)


def run(name: str, tmp: Path) -> tuple[str, str]:
    """-> (trajectory text, hash of the final weights) of STEPS steps of configuration `name`."""
    model = tiny_lm()
    path = tmp / f"{name}.jsonl"
    trajectory = Trajectory(path, keep_before_step=0)
    mezo = MeZO(model, MeZOConfig(**BASE, **CONFIGS[name]), trajectory=trajectory)
    ids = lm_batch(n=6)
    for step in range(STEPS):
        mezo.step(model, [lm_loss(ids[: 2 + step]), lm_loss(ids[2 + step :])])
    trajectory.flush()
    return path.read_text(), weights_hash(model)


def recorded() -> dict:
    golden = json.loads(GOLDEN.read_text())
    if golden["probe"] != probe():
        pytest.skip("recorded on a machine whose kernels round differently (probe differs)")
    return golden


@pytest.mark.parametrize("name", CONFIGS)
def test_a_run_writes_the_recorded_trajectory_and_weights(tmp_path, name):
    golden = recorded()["runs"][name]
    trajectory, weights = run(name, tmp_path)
    assert trajectory == golden["trajectory"]
    assert weights == golden["weights"]


@pytest.mark.parametrize("name", REPLAYABLE)
def test_the_recorded_trajectory_replays_to_the_recorded_weights(tmp_path, name):
    golden = recorded()["runs"][name]
    path = tmp_path / "trajectory.jsonl"
    path.write_text(golden["trajectory"])
    model = tiny_lm()
    replay(model, read_trajectory(path), MeZOConfig(**BASE, **CONFIGS[name]))
    assert weights_hash(model) == golden["weights"]


def record(tmp: Path) -> None:
    runs = {}
    for name in CONFIGS:
        trajectory, weights = run(name, tmp)
        runs[name] = {"trajectory": trajectory, "weights": weights}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"probe": probe(), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record(Path(tmp))
