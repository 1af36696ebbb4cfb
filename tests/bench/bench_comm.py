"""Benchmark: bytes communicated per MeZO step, counted from the collectives (README, "Multi-GPU and
multi-node").

Launches `python -m torch.distributed.run --standalone --nproc_per_node 2 comm_worker.py` (gloo on
CPU, one thread per rank), which runs a few MeZO steps on the tiny OPT in replicated and in sharded
(FSDP2) mode under CommCounter (comm_counter.py). Per mode, the result holds what every step of
every rank issued (calls and payload bytes per op; they must agree across steps and ranks) next to
what
the design predicts from the model alone:
- replicated: one all-reduce of the two fp32 losses, 8 bytes;
- sharded: in each of the two forwards one all-gather per FSDP unit of the whole (padded) model,
  plus the same 8-byte all-reduce; no reduce-scatter (no gradients);
- directions (one z per rank, N = world size): one all-gather of every rank's two fp32 losses,
  8 N bytes gathered, no parameter; with the median time of that all-gather.

    python tests/bench/bench_comm.py       # prints the summary as JSON
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("comm_worker.py")


def launch(out: Path, steps: int, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(WORKER),
        str(out),
        "--steps",
        str(steps),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"communication benchmark failed (torchrun exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )


def expected(mode: str, info: dict) -> dict:
    """{op: (calls, bytes)} per step that the design predicts."""
    if mode == "directions":
        return {"all_gather": (1, 8 * info["n_spsa"])}
    per_step = {"all_reduce": (1, 8)}
    if mode == "sharded":
        per_step["all_gather_single"] = (2 * info["fsdp_units"], 2 * info["padded_param_bytes"])
    return per_step


def summarise(records: list[dict], mode: str) -> dict:
    steps = [step for r in records for step in r[mode]["per_step"]]
    observed = [{op: (s["calls"][op], s["bytes"][op]) for op in s["calls"]} for s in steps]
    first, info = observed[0], records[0][mode]
    return {
        "per_step": {op: {"calls": c, "bytes": b} for op, (c, b) in first.items()},
        "bytes_per_step": sum(b for _, b in first.values()),
        "same_every_step_and_rank": all(o == first for o in observed),
        "expected": {op: {"calls": c, "bytes": b} for op, (c, b) in expected(mode, info).items()},
        "matches_expected": all(o == expected(mode, info) for o in observed),
        "param_bytes": info["param_bytes"],
        "padded_param_bytes": info["padded_param_bytes"],
        "fsdp_units": info["fsdp_units"],
        "n_spsa": info["n_spsa"],
    }


def run(steps: int = 3, nproc: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        launch(Path(tmp), steps, nproc)
        records = [json.loads((Path(tmp) / f"comm.rank{r}.json").read_text()) for r in range(nproc)]
    result = {
        "world_size": nproc,
        "steps": steps,
        "model": "models.TINY_OPT (fp32)",
        **{mode: summarise(records, mode) for mode in ("replicated", "sharded", "directions")},
    }
    # the slower rank's median all-gather of a directions step's losses
    result["directions"]["gather_us"] = max(r["directions"]["gather_us"] for r in records)
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
