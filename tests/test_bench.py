"""Smoke test of the benchmark suite (`make bench`): `tests/bench/run.py --quick` runs every row at
tiny sizes and must produce all of them, so the bench cannot rot unnoticed. Its timings mean
nothing; what is checked is the shape of the result, plus the facts that do not depend on timing:
the communication counts (replicated: one 8-byte all-reduce per step; sharded: the all-gathers the
model implies), and our forward's logits equal to transformers' on the same weights.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).parent / "bench" / "run.py"
ROWS = {  # the rows of BENCHMARKS.md on a machine without CUDA
    "perturb.vs_original",
    "perturb.vs_randn",
    "perturb.extra_memory",
    "perturb.vs_add",
    "update_many.n2",
    "update_many.n4",
    "update_many.n8",
    "perturb.poly_cos",
    "perturb.poly_cos_error",
    "perturb.rademacher",
    "forward.vs_transformers",
    "step.fused",
    "step.reference",
    "memory.tiny.sst2",
    "comm.replicated",
    "comm.sharded",
    "comm.directions",
    "forward.llama.vs_transformers",
    "step.llama.fused",
    "step.llama.fused.last_position",
    "step.llama.rademacher.last_position",
    "scoring.lora_step",
    "scoring.ft_step",
    "scoring.zero_shot",
    "scoring.icl16",
    "scoring.Copa",
    "scoring.CB",
    "scoring.memory.step",
    "scoring.memory.eval",
    "estimators.fzoo",
    "estimators.sparse-mezo",
    "paired.llama.normal",
    "paired.llama.rademacher",
    "paired.opt.normal",
    "paired.lora",
    "memory.tiny.sst2.paired",
}


@pytest.mark.slow
def test_quick_bench_produces_every_row(tmp_path):
    out = tmp_path / "bench-results.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        capture_output=True,
        # a hang guard only: about 20 s idle, minutes on a busy machine
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["id"]: r for r in result["rows"] if r["device"] != "cuda"}
    assert set(rows) == ROWS
    for r in rows.values():
        assert math.isfinite(r["measured"]) and r["measured"] >= 0, r
        met = (
            r["op"]
            and {
                ">=": r["measured"] >= r["target"],
                "<=": r["measured"] <= r["target"],
                "==": r["measured"] == r["target"],
            }[r["op"]]
        )
        assert r["verdict"].split()[0] == (
            "info" if r["op"] is None else "meets" if met else "misses"
        ), r
        assert f"] {r['row']} |" in proc.stdout  # printed in the one table
    # not a timing: the polynomial cos's z is nearer float64 Box-Muller than the library's
    assert rows["perturb.poly_cos_error"]["measured"] < 1
    assert (
        rows["comm.replicated"]["measured"] == 8 and rows["comm.replicated"]["verdict"] == "meets"
    )
    assert rows["comm.sharded"]["verdict"] == "meets"
    # one z per rank: the losses of 2 directions gathered, 2 x 8 B, and no parameter
    directions = rows["comm.directions"]
    assert directions["measured"] == 16 and directions["verdict"] == "meets"
    # 2 blocks + root
    assert result["raw"]["comm"]["sharded"]["per_step"]["all_gather_single"]["calls"] == 2 * 3
    assert result["raw"]["forward"]["max_abs_logit_diff"] < 1e-4
    # the fused N-direction update leaves the weights of the N passes, bitwise
    assert all(m["bitwise"] for m in result["raw"]["update_many"].values())
    scoring = result["raw"]["scoring"]  # the layouts predict alike whatever the timing
    assert all(scoring[k]["same_predictions"] for k in ("zero_shot", "icl16", "Copa", "CB"))
    estimators = result["raw"]["estimators"]  # per forward: a step's time over the passes it makes
    assert estimators["forwards_per_step"] == {"MeZO": 2, "FZOO N=8": 9, "Sparse-MeZO 0.75": 2}
    memory = result["raw"]["memory"][0]["runs"]
    assert set(memory) == {"inference", "mezo", "backprop_adamw", "mezo_paired"}
    assert all(m["peak_MiB"] >= m["pre_step_MiB"] > 0 for m in memory.values())
    hardware = result["hardware"]
    assert (
        hardware["cpu_model"]
        and hardware["cores"] >= 1
        and hardware["torch"]
        and "cuda_device" in hardware
    )
    assert result["command"].endswith("--quick --out " + str(out)) and result["quick"] is True
