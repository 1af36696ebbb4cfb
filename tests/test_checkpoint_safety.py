"""Checkpoints hold tensors and JSON only, survive a crash at every point of a save, and a run
folder
is only ever replaced when it holds a run, and then only the run's own files."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import data.files as files
from program import checkpoint as ck
from program import json_files
from program import run_folder as rf
from program.loop import LoopState
from tests.helpers.zo import lm_batch, lm_loss, tiny_lm
from zo import FO, FOConfig, MeZO, MeZOConfig
from zo import distributed as zd


def trained(kind, steps=3):
    """A model and its trainer after a few steps; Adam state (int keys, tuple betas) and RNG
    states."""
    model, ids = tiny_lm(), lm_batch()
    trainer = (
        MeZO(
            model,
            MeZOConfig(
                lr=1e-3,
                eps=1e-2,
                optimizer="adam",
                seed_source="numpy_global",
                perturbation="eager",
            ),
        )
        if kind == "mezo"
        else FO(model, FOConfig(lr=1e-3, optimizer="adam", max_steps=10))
    )
    for _ in range(steps):
        trainer.step(model, lm_loss(ids))
    return model, trainer


def state_of(trainer, best=1.5):
    return {
        "trainer": trainer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "loop": {
            "best": best,
            "best_step": 2,
            "nonfinite": 0,
            "metrics_lines": 4,
            "window": [0.5, float("inf")],
        },
    }


def continue_from(kind, directory, steps=2):
    """A fresh model and trainer restored from `directory`, stepped: what a resumed run computes."""
    model, trainer = trained(kind, steps=0)
    loop = ck.restore(directory, model, trainer)
    for _ in range(steps):
        trainer.step(model, lm_loss(lm_batch()))
    return model, loop


@pytest.mark.parametrize("kind", ["mezo", "fo"])
def test_checkpoint_is_tensors_and_json_and_resumes_bitwise(tmp_path, kind):
    model, trainer = trained(kind)
    ck.save_checkpoint(tmp_path / "checkpoint", model, state_of(trainer))
    assert sorted(os.listdir(tmp_path / "checkpoint")) == sorted(ck.STATE_FILES)
    json.load(open(tmp_path / "checkpoint" / "state.json"))  # plain JSON
    for _ in range(2):  # the uninterrupted run (dropout draws from torch's RNG: restored too)
        trainer.step(model, lm_loss(lm_batch()))
    resumed, loop = continue_from(kind, tmp_path / "checkpoint")
    assert loop["window"] == [0.5, float("inf")] and loop["metrics_lines"] == 4
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no temporary left


def test_state_encoding_keeps_int_keys_tuples_and_refuses_objects():
    state = {"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.999), "__x": 1, "n": None}
    tensors = {}
    encoded = json.loads(json.dumps(ck.to_json(state, tensors)))
    assert ck.from_json(encoded, tensors) == {**state, "state": {0: {"step": tensors["0"]}}}
    with pytest.raises(TypeError):
        ck.to_json({"f": lambda: 0}, {})
    for bad in ({"__tensor__": "9"}, {"__eval__": "x"}, {"__items__": [[1]]}):
        with pytest.raises(ValueError):
            ck.from_json(bad, tensors)


class Payload:
    """Unpickling it would create `path`: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    "where", ["state.pt", "state.safetensors", "trainable.safetensors", "state.json"]
)
def test_a_pickle_payload_is_never_run(tmp_path, where):
    model, trainer = trained("mezo", steps=1)
    directory, marker = tmp_path / "checkpoint", tmp_path / "pwned"
    ck.save_checkpoint(directory, model, state_of(trainer))
    (directory / where).write_bytes(pickle.dumps({"trainer": Payload(marker)}))
    with pytest.raises(ValueError) as e:
        ck.find_checkpoint(directory)
        ck.restore(directory, *trained("mezo", steps=0))
    message = str(e.value)
    assert "\n" not in message and str(directory) in message
    assert ("holds a pickle" in message) == (where == "state.pt")
    assert not marker.exists()


def run_folder(tmp_path, kind="train"):
    out = tmp_path / "run"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"kind": kind, "learning_rate": 1e-3}))
    return out


class Crash(Exception):
    pass


def crash_at(monkeypatch, name, k):
    """Make the k-th call (1-based) of files.<os.replace | shutil.rmtree> raise, as a kill would
    stop there."""
    module, attr = (files.os, "replace") if name == "replace" else (files.shutil, "rmtree")
    real, calls = getattr(module, attr), []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == k:
            raise Crash(f"{name} #{k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, fake)


# each point of the save sequence: (what to break, at which call, which checkpoint survives)
CRASH_POINTS = [
    ("partial tmp", 0, "old"),  # killed while writing checkpoint.tmp
    ("replace", 1, "old"),  # tmp complete, old not yet renamed
    ("replace", 2, "old"),  # old renamed to checkpoint.old, new not yet in place
    ("rmtree", 1, "new"),  # new renamed into place, checkpoint.old not yet removed
]


@pytest.mark.parametrize("what, k, survivor", CRASH_POINTS)
def test_every_crash_point_of_a_save_resumes(tmp_path, monkeypatch, what, k, survivor):
    out = run_folder(tmp_path)
    model, trainer = trained("mezo", steps=1)
    directory = out / "checkpoint"
    ck.save_checkpoint(directory, model, state_of(trainer, best=1.0))
    trainer.step(model, lm_loss(lm_batch()))
    (out / "best.safetensors.tmp4242").write_bytes(b"torn")  # a crash of another writer
    if what == "partial tmp":
        (out / "checkpoint.tmp").mkdir()
        (out / "checkpoint.tmp" / "trainable.safetensors").write_bytes(b"half")
    else:
        crash_at(monkeypatch, what, k)
        with pytest.raises(Crash):
            ck.save_checkpoint(directory, model, state_of(trainer, best=2.0))
        monkeypatch.undo()
    # resumable, and nothing changed
    assert rf.check_run_folder(out, resume=True, overwrite=False) == str(out)
    rf.prepare_run_folder(str(out), resume=True)
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json"]  # no temporary left behind
    loop = ck.restore(directory, *trained("mezo", steps=0))
    assert loop["best"] == (1.0 if survivor == "old" else 2.0)
    ck.save_checkpoint(directory, model, state_of(trainer, best=3.0))  # and the next save works
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json"]


def test_a_save_after_a_crash_needs_no_resume_first(tmp_path, monkeypatch):
    """The crash of issue 12: killed between the final rename and the removal of checkpoint.old;
    the next save used to fail with `Directory not empty`."""
    model, trainer = trained("mezo", steps=1)
    directory = tmp_path / "checkpoint"
    ck.save_checkpoint(directory, model, state_of(trainer))
    crash_at(monkeypatch, "rmtree", 1)
    with pytest.raises(Crash):
        ck.save_checkpoint(directory, model, state_of(trainer))
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.old").is_dir()
    ck.save_checkpoint(directory, model, state_of(trainer, best=7.0))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert ck.restore(directory, *trained("mezo", steps=0))["best"] == 7.0


@pytest.mark.parametrize(
    "damage",
    [
        "missing state.json",
        "torn state.json",
        "torn tensors",
        "torn trainable tensors",
        "wrong shapes",
        "missing trainer state",
    ],
)
def test_a_corrupt_checkpoint_is_one_value_error_naming_it(tmp_path, damage):
    model, trainer = trained("mezo", steps=1)
    directory = tmp_path / "checkpoint"
    state = state_of(trainer)
    if damage == "missing trainer state":
        del state["trainer"]
    ck.save_checkpoint(directory, model if damage != "wrong shapes" else tiny_lm(dim=8), state)
    if damage == "missing state.json":
        os.remove(directory / "state.json")
    elif damage == "torn state.json":
        (directory / "state.json").write_text((directory / "state.json").read_text()[:40])
    elif damage == "torn tensors":
        (directory / "state.safetensors").write_bytes(
            (directory / "state.safetensors").read_bytes()[:100]
        )
    elif damage == "torn trainable tensors":
        path = directory / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="checkpoint|JSON") as e:
        ck.restore(directory, *trained("mezo", steps=0))
    assert "\n" not in str(e.value) and str(directory) in str(e.value)


# Run in a fresh process, so that its peak resident memory is this load's own.
_LOAD_PEAK = """
import sys, torch
from safetensors.torch import load_file
from program import checkpoint as ck

def status(field):  # in bytes
    line = next(line for line in open("/proc/self/status") if line.startswith(field))
    return int(line.split()[1]) * 1024

def peak_of(load):  # what `load` adds to the process's peak resident memory
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) := resident now
    before = status("VmRSS")
    load()
    return status("VmHWM") - before

def model():
    return torch.nn.ParameterList(torch.nn.Parameter(torch.ones(1 << 22)) for _ in range(8))

ck.save_trainable(model(), sys.argv[1])
target = model()
ours = peak_of(lambda: ck.load_trainable(target, sys.argv[1]))

@torch.no_grad()
def mapped():  # safetensors' loader, as load_trainable read before
    for (name, p), saved in zip(target.named_parameters(), load_file(sys.argv[1]).values()):
        p.copy_(saved)

print(ours, peak_of(mapped))
"""


def test_loading_trainable_tensors_adds_at_most_one_tensor_to_memory(tmp_path):
    """load_trainable reads each tensor into its parameter: the peak grows by at most one tensor
    (16 MiB here), where safetensors' mapped file kept every page it copied from resident (the
    whole 128 MiB file; the control, in the same process)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_PEAK, str(tmp_path / "t.safetensors")],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout.split()
    ours, mapped = int(out[0]), int(out[1])
    whole = 8 * (4 << 22)
    assert ours < whole / 2 < mapped, (ours, mapped)


def test_trainable_tensors_load_into_another_dtype(tmp_path):
    """A parameter of another dtype than the file's goes through one temporary: the saved values,
    converted."""
    saved = tiny_lm()
    ck.save_trainable(saved, tmp_path / "t.safetensors")
    target = tiny_lm().to(torch.bfloat16)
    ck.load_trainable(target, tmp_path / "t.safetensors")
    for (name, p), q in zip(saved.named_parameters(), target.parameters()):
        assert torch.equal(p.detach().to(torch.bfloat16), q.detach()), name


def test_a_trainable_file_of_another_kind_of_dtype_is_refused_before_any_write(tmp_path):
    """An integer tensor, the last, where the parameters are floating point: one corrupt-checkpoint
    error, and none of the float tensors before it was loaded (the dtypes are checked first)."""
    from safetensors.torch import save_file

    model = tiny_lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = tmp_path / "t.safetensors"
    last = list(before)[-1]
    saved = {
        n: torch.zeros(p.shape, dtype=torch.int32 if n == last else p.dtype)
        for n, p in before.items()
    }
    save_file(saved, path)
    with pytest.raises(ValueError, match="corrupt checkpoint: .* has dtype I32"):
        ck.load_trainable(model, path)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    out = run_folder(tmp_path)
    own = [
        "metrics.jsonl",
        "trajectory.jsonl",
        "results.json",
        "best.safetensors",
        "model.adapter.safetensors",
        "best.safetensors.tmp123",
        "config.json.tmp9",
        "trajectory.jsonl.tmp",
    ]
    for name in own:
        (out / name).write_text("x")
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "model", "model.tmp"):
        (out / name).mkdir()
        (out / name / "f").write_text("x")
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "config.json").write_text("{}")
    (out / "best.safetensors.bak").write_text("mine too")
    with pytest.raises(
        ValueError, match="belongs to another run; pass --resume or --overwrite_output_dir"
    ):
        rf.check_run_folder(out, resume=False, overwrite=False)
    rf.prepare_run_folder(rf.check_run_folder(out, resume=False, overwrite=True), resume=False)
    assert sorted(os.listdir(out)) == ["best.safetensors.bak", "notes.txt", "plots"]
    assert (out / "plots" / "config.json").read_text() == "{}"


def test_a_folder_that_holds_no_run_is_never_overwritten(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "models", "tiny", "opt"), model)
    before = sorted(os.listdir(model))
    for out in (model, model / "run", tmp_path):  # is, is inside, holds the model directory
        with pytest.raises(ValueError, match="overlaps the model folder"):
            rf.check_run_folder(
                out, resume=False, overwrite=True, protected=[("model", str(model))]
            )
    with pytest.raises(ValueError, match="config.json that no run wrote"):
        rf.check_run_folder(model, resume=False, overwrite=True)  # not even without the protection
    plain = tmp_path / "plain"
    (plain / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds model"):
        rf.check_run_folder(plain, resume=False, overwrite=True)
    assert sorted(os.listdir(model)) == before


def test_output_folder_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="output folder is a file"):
        rf.check_run_folder(tmp_path / "f", resume=False, overwrite=False)
    with pytest.raises(ValueError, match="not writable"):
        rf.check_run_folder(tmp_path / "f" / "sub", resume=False, overwrite=False)
    monkeypatch.setattr(rf.os, "access", lambda *a: False)  # (root writes anywhere: simulate)
    with pytest.raises(ValueError, match="not writable"):
        rf.check_run_folder(tmp_path / "new", resume=False, overwrite=False)


def test_resume_refusals(tmp_path):
    out = run_folder(tmp_path)
    with pytest.raises(ValueError, match="nothing to resume: the run saved no checkpoint"):
        rf.check_run_folder(out, resume=True, overwrite=False)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        rf.check_run_folder(out, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="not a training run"):
        rf.check_run_folder(run_folder(tmp_path / "e", kind="eval"), resume=True, overwrite=False)


def test_resume_recognises_its_folder_however_spelled(tmp_path, monkeypatch):
    out = run_folder(tmp_path)
    (out / "checkpoint").mkdir()
    monkeypatch.chdir(tmp_path)
    for spelling in ("run", "run/", str(out) + "/", "./run/../run"):
        assert rf.check_run_folder(spelling, resume=True, overwrite=False) == str(out)
    saved = {
        "output_dir": str(out),
        "model": str(tmp_path / "m"),
        "learning_rate": 1e-3,
        "device": "cpu",
    }
    moved = {**saved, "output_dir": "elsewhere/", "model": "./m/", "device": "cuda"}
    assert rf.resume_conflicts(saved, moved, free={"device"}) == []
    assert rf.resume_conflicts(saved, {**moved, "learning_rate": 1e-2}, free={"device"}) == [
        "learning_rate"
    ]


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    json_files.write_json(path, {"a": 1})
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~files.umask())
    crash_at(monkeypatch, "replace", 1)
    with pytest.raises(Crash):
        files.atomic_write(path, "new")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]
    with files.atomic_path(tmp_path / "b.bin") as tmp:
        open(tmp, "wb").write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert files.is_temp_of("best.safetensors.tmp123", "best.safetensors")
    assert not files.is_temp_of("best.safetensors.bak", "best.safetensors")


@pytest.mark.parametrize(
    "message, cause",
    [
        (
            "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:59574: "
            "Connection reset by peer. This is typically caused by a remote worker hanging",
            "connection dropped: that rank died or was killed",
        ),
        (
            "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6032",
            "connection dropped",
        ),
        (
            "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
            "for recv operation to complete",
            "collective timeout 8 s",
        ),
    ],
)
def test_a_lost_rank_is_named_with_the_cause_seen(message, cause):
    line = zd.lost_rank_line(0, 8, message)
    assert line.startswith("error: rank 0 lost contact with the group (") and cause in line
    assert line.endswith("(torch.distributed)") and "[../" not in line and "typically" not in line
    assert ("timeout" in line) == ("Timed out" in message)


def test_only_the_first_rank_to_notice_reports(monkeypatch, capsys):
    class Store:  # the job's TCPStore, shared by the ranks
        count = 0

        def set_timeout(self, t):
            pass

        def add(self, key, n):
            Store.count += n
            return Store.count

    monkeypatch.setattr(zd.dist.distributed_c10d, "_get_default_store", Store)
    for rank in (1, 0, 2):
        with pytest.raises(SystemExit):
            with zd.Dist(rank=rank, world_size=3).guard():
                raise RuntimeError("[pair.cc:1] Connection reset by peer (gloo)")
    assert capsys.readouterr().err.count("error:") == 1


# ---------------------------------------------------------------- backprop runs: seeded, resumed
# bitwise

FO_RUN = (
    "--trainer fo --num_train 16 --num_dev 8 --num_eval 4 --batch_size 4"
    " --max_steps 6 --eval_steps 6 --save_steps 2 --logging_steps 1"
    " --learning_rate 1e-3"
).split()


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model", "model.safetensors"))


def losses(out):
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r.get("loss"), r.get("dev_loss")) for r in records]


def test_backprop_runs_are_seeded_and_resume_bitwise(tmp_path, monkeypatch):
    """Dropout draws from torch's global RNG: seeded by --seed, saved in the checkpoint."""
    import signal

    import train

    a, b, parts = (str(tmp_path / name) for name in ("a", "b", "parts"))
    assert train.main(FO_RUN + ["--output_dir", a]) == 0
    torch.manual_seed(1234)  # whatever ran before in the process must not matter
    assert train.main(FO_RUN + ["--output_dir", b]) == 0
    assert losses(a) == losses(b)
    assert all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(b).values()))

    batch = train.Run.batch

    def interrupted(self, step):  # SIGINT while step 3 runs: a checkpoint at step 4, then stop
        if step == 3 and not self.args.resume:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(train.Run, "batch", interrupted)
    assert train.main(FO_RUN + ["--output_dir", parts]) == 130
    torch.manual_seed(99)
    assert train.main(["--output_dir", parts, "--resume"]) == 0  # the literal README line
    assert losses(parts) == losses(a)
    assert all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(parts).values()))


def test_loop_state_round_trips_and_reads_older_checkpoints(tmp_path):
    """program.loop.LoopState is the checkpoint's "loop" entry: it round-trips through a save, an
    older entry (no nonfinite_run, best_dev or window) reads with their defaults, and anything
    else is a ValueError."""
    state = LoopState(best=-0.5, best_step=4, best_dev={"loss": 0.5}, nonfinite=1, metrics_lines=3)
    state.window = [torch.tensor(0.25), torch.tensor(float("inf"))]
    model, trainer = trained("mezo", steps=1)
    saved = {**state_of(trainer), "loop": state.to_dict()}
    ck.save_checkpoint(tmp_path / "checkpoint", model, saved)
    back = LoopState.from_dict(ck.restore(tmp_path / "checkpoint", *trained("mezo", steps=0)))
    assert {**vars(back), "window": None} == {**vars(state), "window": None}
    assert [float(x) for x in back.window] == [0.25, float("inf")]
    older = LoopState.from_dict(
        {"best": None, "best_step": None, "nonfinite": 0, "metrics_lines": 2}
    )
    assert older == LoopState(metrics_lines=2)
    for bad in ([], {"metrics_lines": "2"}, {"best_step": 1.5}, {"window": ["x"]}, {"other": 1}):
        with pytest.raises(ValueError, match="bad loop state"):
            LoopState.from_dict(bad)
