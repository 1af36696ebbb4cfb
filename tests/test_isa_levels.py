"""The numerics tests (z, the kernels, exact restore, the reference step) once more under every
other CPU dispatch level this machine offers, so that an assumption tied to one instruction set
CPU dispatch level this machine offers, so that an assumption tied to one instruction set fails here
and not on a user's machine. ATEN_CPU_CAPABILITY selects the level for ATen and Inductor alike; each
level gets its own Inductor cache (a kernel compiled for AVX-512 and reused under `default` fails to
build, which says nothing about this project). The level this process runs at is covered by the
suite itself."""

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# z (statistics, shards, eager vs compiled), the kernels against dense formulas, exact restore, and
# the reference step against the original's transcription. Left out: the estimator's unbiasedness
# and convergence, the warning and recompile tests (no rounding in them, and most of the time).
NUMERICS = [
    "tests/test_zo_rng.py",
    "tests/test_zo_step.py",
    "tests/test_zo_features.py::test_zo_sgd_variants_equal_their_dense_formula",
    "tests/test_zo_features.py::test_momentum_and_adam_equal_their_dense_formula",
    "-k",
    "not unbiased and not converges and not drifts and not warns and not many_shapes",
]


def offered_levels() -> list:
    """ATen's dispatch levels this CPU can run (aten/src/ATen/native/DispatchStub.cpp: AVX2 needs
    AVX2
    and FMA; AVX-512 needs AVX512F, BW, VL and DQ). Other architectures: `default` besides their
    own."""
    levels = ["default"]
    if platform.machine() in ("x86_64", "AMD64") and Path("/proc/cpuinfo").exists():
        flags = set(
            next(
                (
                    line.split(":", 1)[1].split()
                    for line in open("/proc/cpuinfo")
                    if line.startswith("flags")
                ),
                [],
            )
        )
        if {"avx2", "fma"} <= flags:
            levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
            levels.append("avx512")
    return levels


OTHER_LEVELS = [
    lv for lv in offered_levels() if lv.upper() != torch.backends.cpu.get_cpu_capability()
]


@pytest.mark.slow
@pytest.mark.parametrize("level", OTHER_LEVELS)
def test_numerics_tests_pass_at_dispatch_level(level):
    # kept between runs, never shared
    cache = Path(tempfile.gettempdir()) / f"mezo-tests-inductor-{level}"
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": level,
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    seen = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert seen == level.upper()  # the variable took effect
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NUMERICS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
