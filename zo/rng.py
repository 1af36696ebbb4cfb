"""Counter-based random numbers for the perturbation z.

MeZO needs the *same* z four times per step (perturb +, perturb -, restore, update). The original
(`large_models/trainer.py`, `zo_perturb_parameters`) gets it by `torch.manual_seed(seed)` and one
`torch.normal` per parameter in `named_parameters()` order, which ties z to the visiting order, the
device's generator and the whole-tensor shape. Here z is a pure function of

    (seed of the step, key of the parameter, global flat index of the element)

computed with integer ops that every torch backend runs identically, so the same value comes out
eagerly, under `torch.compile` on CPU or GPU, and on any shard of a tensor (a chunk at global
offset o gets exactly the slice o: of the whole). Nothing is ever materialised beyond one element.

Hash: an integer finaliser in the style of `lowbias32` (Wellons, hash-prospector), with the
constants [16 0x21f0aaad 15 0x735a2d97 15]. The per-step scalars are computed in int64 (32-bit
values, every multiplier < 2^31, so no product reaches 2^63). The per-element hash runs in int32
lanes: the multiply keeps the product modulo 2^32 (two's complement wrap-around, which C++ does not
promise for signed ints but the hardware's multiplies do), right shifts are masked to be logical,
and the index is narrowed from int64 after the offset is added, so no addition wraps. The bits are
those of the same hash in int64: tests/test_zo_rng.py checks them against Python integers, eagerly
and in the compiled kernel's vector body and scalar tail, and tests/test_cuda.py the GPU's against
the CPU's. The int32 lanes take about half the int64 hash's time on a CPU without 64-bit vector
multiplies (AVX2; BENCHMARKS.md, "Measurements behind design choices"). Per element i:

    a = mix(((i ^ k1) * m) mod 2^32)        k1 = f(seed), m = odd f(seed, key) < 2^31 (scalars)
    b = mix(a ^ C)                          (second uniform for Box-Muller)

The key enters through the odd multiplier m, a bijection of the 32-bit index space per parameter.
XOR-ing a key into the index instead would make two parameters' streams shifted copies of each
other (element i of A == element i^d of B for whole blocks of i); a multiplier scatters the
coincidences like random ones. Each element has 32 bits of state per step, so a model of more than
2^32 elements sees repeated z values, at random positions (harmless for an SPSA estimate), and a
single parameter may have at most 2^32 elements. A two-round version (mix(mix(i ^ k1) ^ k2)) was
slower at equal statistics (BENCHMARKS.md, "Measurements behind design choices").

Normal z: Box-Muller on two 24-bit uniforms, z = sqrt(-2 ln u1) cos(2 pi u2), u1 in (0, 1] from a
and u2 in [0, 1) from b, so |z| is at most sqrt(-2 ln 2^-24) ~= 5.77. `normal_z` picks the cos:
- "poly_cos" (the default): -sin(2 pi t) with t = 1/4 - |u2 - 1/2| (exact), sin's Taylor
  polynomial to x^11 in fp32, + and * only. Within 3.7e-7 of the exact cos over every u2 (6.1 fp32
  units, derived in tests/helpers/zo.py `poly_cos_error`; 2.9 measured over all 2^24), closer than
  the library's (6.4 units, its argument 2 pi u2 rounded); 0.95x the library's kernel time at
  the AVX-512 level, no faster at AVX2 on the same CPU (BENCHMARKS.md, issue 30).
  Inductor's C++ is built without contracting a * b + c into an FMA (cpp
  enable_floating_point_contract_flag, "off" by default), so the cos is bitwise the same eager and
  compiled at every CPU dispatch level, and the same as numpy's float32 (tests/test_zo_rng.py).
- "library_cos": the backend's cos of fl(2 pi u2): the z of every run recorded before the choice
  (issue 30); a config.json without normal_z means it (program/config.py `as_recorded`).
The hash, and so Rademacher z, is bitwise the same eager and compiled. Normal z is not: ATen's and
Inductor's log (and library cos) differ in the last bits, and where they differ depends on the CPU's
vector instructions (ATEN_CPU_CAPABILITY). Each is within a few units of fp32 rounding of the exact
Box-Muller value, so the two differ by at most 2.75e-6 (derived in tests/helpers/zo.py
`normal_z_error`; tests/test_zo_rng.py checks it at every dispatch level the machine offers).
Through 1/(2 eps) such a difference moves projected_grad, so a run, its resume and its replay must
use one kernel mode and one normal_z. The compiled kernel itself is bitwise invariant to chunking
(a shard's z is exactly the slice of the whole tensor's z).

The seeds themselves come from SeedStream, one per z, drawn on the host.
"""

import functools
import math
import struct

import numpy as np
import torch

M32 = 0xFFFFFFFF
MAX_NUMEL = 1 << 32  # global indices are 32-bit


def name_key(name: str) -> int:
    """Stable key of a parameter's canonical name: 64-bit FNV-1a of its UTF-8 bytes, top bit
    cleared.

    Keys come from names, not from the order in which parameters are visited, so adding, freezing or
    re-ordering parameters never changes another parameter's z. 63 bits make a permanent collision
    of two names (two parameters sharing one stream at every step) practically impossible.
    """
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """One bijective mixing round on 32-bit values held in int64 (see module docstring)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _mix32_lanes(x: torch.Tensor) -> torch.Tensor:
    """_mix32 on 32-bit values held in int32 (two's complement bit patterns): the same bits."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    return x ^ ((x >> 15) & 0x1FFFF)


def _to_lanes(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 with the same 32 bits (no out-of-range conversion)."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def hash32(
    seed: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, n: int, device
) -> torch.Tensor:
    """32-bit hashes (as int32 bit patterns) of global indices offset .. offset+n-1 (< 2^32);
    seed, key, offset: 0-d int64."""
    k1 = _mix32(_mix32((seed & M32) ^ 0x9E3779B9) ^ ((seed >> 32) & M32))  # per step
    # per step and parameter
    m = (_mix32(_mix32(k1 ^ (key & M32) ^ 0x85EBCA6B) ^ (key >> 32)) >> 1) | 1
    i = _to_lanes(torch.arange(n, dtype=torch.int64, device=device) + offset)
    return _mix32_lanes((i ^ _to_lanes(k1)) * m.to(torch.int32))


def _top24(x: torch.Tensor) -> torch.Tensor:
    return ((x >> 8) & 0xFFFFFF).to(torch.float32)


def _fp32(x: float) -> float:
    """x rounded to the nearest float32: the constant eager and compiled code both multiply by."""
    return struct.unpack("f", struct.pack("f", x))[0]


# -sin(2 pi t) = t * sum_j MINUS_SIN_2PI[j] * t^(2j): sin's Taylor series at x = 2 pi t to x^11,
# negated, each coefficient rounded to fp32 once here
MINUS_SIN_2PI = tuple(
    _fp32((-1) ** (j + 1) * (2 * math.pi) ** (2 * j + 1) / math.factorial(2 * j + 1))
    for j in range(6)
)


def cos_2pi_poly(u2: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u2) for 24-bit fractions u2 in [0, 1) from + and * alone: -sin(2 pi t) with
    t = 1/4 - |u2 - 1/2| in [-1/4, 1/4] (exact: u2 is a multiple of 2^-24), so |2 pi t| <= pi/2,
    then sin's Taylor polynomial in t^2 by Horner's rule."""
    t = 0.25 - (u2 - 0.5).abs()
    s = t * t
    p = s * MINUS_SIN_2PI[-1] + MINUS_SIN_2PI[-2]
    for c in reversed(MINUS_SIN_2PI[:-2]):
        p = p * s + c
    return t * p


def cos_2pi_library(u2: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u2) by the backend's cos (ATen's or Inductor's: Sleef or the C library)."""
    return torch.cos((2.0 * math.pi) * u2)


# how normal z computes cos(2 pi u2); the first is the default. library_cos is the z of every run
# recorded before the choice existed (issue 30): its config.json has no normal_z.
NORMAL_Z = {"poly_cos": cos_2pi_poly, "library_cos": cos_2pi_library}
DEFAULT_NORMAL_Z = next(iter(NORMAL_Z))


def uniforms(seed, key, offset, n, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller's float32 u1 in (0, 1] and u2 in [0, 1), 24-bit fractions, for global indices
    offset .. offset+n-1."""
    a = hash32(seed, key, offset, n, device)
    b = _mix32_lanes(a ^ 0x68E31DA4)
    return (_top24(a) + 1.0) * 2.0**-24, _top24(b) * 2.0**-24  # u1 > 0: log(u1) is finite


def normal(seed, key, offset, n, device, normal_z: str = DEFAULT_NORMAL_Z) -> torch.Tensor:
    """float32 z ~ N(0, 1) for global indices offset .. offset+n-1 (Box-Muller, its cos by
    NORMAL_Z[normal_z])."""
    u1, u2 = uniforms(seed, key, offset, n, device)
    return torch.sqrt(-2.0 * torch.log(u1)) * NORMAL_Z[normal_z](u2)


def rademacher(seed, key, offset, n, device) -> torch.Tensor:
    """float32 z in {-1, +1} with equal probability (top bit of the first hash)."""
    return (((hash32(seed, key, offset, n, device) >> 31) & 1) * 2 - 1).to(torch.float32)


def z_function(distribution: str, normal_z: str = DEFAULT_NORMAL_Z):
    """z(seed, key, offset, n, device) of a distribution ("normal" | "rademacher") and, for normal
    z, its cos (NORMAL_Z)."""
    if distribution == "rademacher":
        return rademacher
    if distribution != "normal" or normal_z not in NORMAL_Z:
        raise ValueError(
            f"unknown z (distribution={distribution!r}, normal_z={normal_z!r}; expected "
            f"normal | rademacher and one of {tuple(NORMAL_Z)})"
        )
    return functools.partial(normal, normal_z=normal_z)


class SeedStream:
    """One seed per z, from a seeded numpy RNG (large_models: `np.random.randint(1000000000)` on the
    numpy global RNG, which HF `set_seed(42)` seeded in Trainer.__init__)."""

    def __init__(self, seed: int, source: str):
        self.rng = np.random.default_rng(seed) if source == "generator" else None
        if self.rng is None:
            np.random.seed(seed)

    def next(self) -> int:
        if self.rng is not None:
            return int(self.rng.integers(1_000_000_000))
        return int(np.random.randint(1000000000))

    def state(self) -> dict:
        if self.rng is not None:
            return self.rng.bit_generator.state
        state = np.random.get_state(legacy=False)
        return {**state, "state": {**state["state"], "key": state["state"]["key"].tolist()}}

    def set_state(self, state: dict) -> None:
        if self.rng is not None:
            self.rng.bit_generator.state = state
        else:
            key = np.array(state["state"]["key"], dtype=np.uint32)
            np.random.set_state({**state, "state": {**state["state"], "key": key}})
