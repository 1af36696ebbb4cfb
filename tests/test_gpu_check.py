"""`make gpu-check` (tests/bench/gpu_check.py) cannot rot on a machine without a GPU: it refuses
with
one error line, and its rows run at tiny sizes on the CPU, where the CUDA-graph rows fail loudly."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    out = tmp_path / "gpu-results.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: make gpu-check needs a CUDA device")
    assert not out.exists()


def test_rows_run_on_the_cpu_and_graph_rows_fail_loudly(tmp_path, capsys):
    out = tmp_path / "gpu-results.json"
    status = gpu_check.main(
        [
            "--cpu-smoke",
            "--only",
            "perturb",
            "update_many",
            "step.opt",
            "memory",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    rows = {r["id"]: r for r in result["rows"]}
    updates = {f"update_many.n{n}" for n in (2, 4, 8)}
    assert (
        set(rows)
        == {
            "perturb.bandwidth",
            "step.opt.eager",
            "step.opt.graphed",
            "memory.tiny",
        }
        | updates
    )
    # the fused N-direction update: measured, and bitwise the N passes
    assert all(
        rows[u]["measured"] > 0 and "bitwise equal: True" in rows[u]["notes"] for u in updates
    )
    for id in ("perturb.bandwidth", "step.opt.eager", "memory.tiny"):
        # the verdict follows from the measured value and the goal
        op, target = rows[id]["goal"].split()
        met = {
            ">=": rows[id]["measured"] >= float(target),
            "<=": rows[id]["measured"] <= float(target),
        }[op]
        assert rows[id]["measured"] > 0 and rows[id]["verdict"] == ("meets" if met else "misses"), (
            rows[id]
        )
    graphed = rows["step.opt.graphed"]
    assert (
        graphed["verdict"].startswith("FAILED: ValueError")
        and "no CUDA device" in graphed["verdict"]
    )
    assert status == 1  # a failed row fails the command
    table = capsys.readouterr().out
    assert "| MeZO step captured as CUDA graphs, OPT-tiny shape" in table and "FAILED" in table
    assert result["versions"]["torch"] == torch.__version__
