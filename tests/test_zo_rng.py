"""z(seed, key, index): statistics, independence, shard invariance, eager vs compiled,
recompiles."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from tests.helpers.zo import NORMAL_Z_IMPL_BOUND, normal_z_exact_error, poly_cos_error
from zo import MeZO, MeZOConfig, name_key
from zo.kernels import get_kernels
from zo.rng import MINUS_SIN_2PI, NORMAL_Z, cos_2pi_poly, hash32, normal, rademacher, uniforms

K = get_kernels("normal")  # compiled; shared by every zo test in the process
N = 1 << 20  # >= 1M samples for the statistics


def T(v, dtype=torch.int64):
    return torch.full((), v, dtype=dtype)


def z_compiled(seed, key, n=N, offset=0, kernels=K):
    """z exactly as the kernels add it: 0 + 1 * z."""
    z = torch.zeros(n)
    kernels.perturb_(z, seed=T(seed), key=T(key), offset=T(offset), scale=T(1.0, torch.float32))
    return z


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def ks_statistic(samples: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF and Phi."""
    xs = samples.double().sort().values.tolist()
    n = len(xs)
    return max(max((i + 1) / n - normal_cdf(x), normal_cdf(x) - i / n) for i, x in enumerate(xs))


def corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module", params=list(NORMAL_Z))
def z(request):
    kernels = get_kernels("normal", normal_z=request.param)
    return z_compiled(seed=123456789, key=name_key("decoder.layers.0.fc1.weight"), kernels=kernels)


def test_name_key_is_fnv1a_of_the_name():
    # Published FNV-1a 64 test vectors (offset basis for "", 0xaf63dc4c8601ec8c for "a"); top bit
    # dropped.
    assert name_key("") == 0xCBF29CE484222325 >> 1
    assert name_key("a") == 0xAF63DC4C8601EC8C >> 1


def test_moments_and_ks(z):
    n = z.numel()
    zd = z.double()
    mean, var = zd.mean().item(), zd.var().item()
    skew = (((zd - mean) ** 3).mean() / var**1.5).item()
    kurt = (((zd - mean) ** 4).mean() / var**2).item()
    # 5-sigma bounds: sd(mean)=1/sqrt(n), sd(var)=sqrt(2/n), sd(skew)=sqrt(6/n), sd(kurt)=sqrt(24/n)
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n)
    # KS critical value at alpha = 0.001 is 1.95 / sqrt(n)
    assert ks_statistic(z) < 1.95 / math.sqrt(n)
    # tails: P(|z| > 3) = 0.0026998
    p3 = (z.abs() > 3).double().mean().item()
    assert abs(p3 - 0.0026998) < 5 * math.sqrt(0.0027 / n)


def test_no_correlation_across_seeds_keys_and_neighbours(z):
    bound = 5 / math.sqrt(N)
    key = name_key("decoder.layers.0.fc1.weight")
    assert abs(corr(z, z_compiled(123456790, key))) < bound  # next seed
    assert abs(corr(z, z_compiled(123456789, key ^ 1))) < bound  # key one bit apart
    assert abs(corr(z, z_compiled(123456789, name_key("decoder.layers.0.fc2.weight")))) < bound
    assert abs(corr(z[:-1], z[1:])) < bound  # neighbouring indices
    assert abs(corr(z[:-64], z[64:])) < bound
    assert abs(corr(z[: N // 2], z[N // 2 :])) < bound


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def hash32_int(seed: int, key: int, i: int) -> int:
    """zo/rng.py's hash of global index i, spelled in Python integers (unbounded, so no lane can
    wrap)."""
    k1 = _mix32_int(_mix32_int((seed & 0xFFFFFFFF) ^ 0x9E3779B9) ^ (seed >> 32))
    m = (_mix32_int(_mix32_int(k1 ^ (key & 0xFFFFFFFF) ^ 0x85EBCA6B) ^ (key >> 32)) >> 1) | 1
    return _mix32_int(((i ^ k1) * m) & 0xFFFFFFFF)


@pytest.mark.parametrize("offset", [0, (1 << 31) - 20, (1 << 32) - 45])
def test_the_int32_lane_hash_is_the_32_bit_hash_of_python_integers(offset):
    """The hash runs in int32 lanes (products modulo 2^32, masked logical shifts): every bit must be
    the 32-bit hash's, across the index's sign bit (2^31) up to the last index (2^32 - 1),
    32-bit hash's, across the index's sign bit (2^31) up to the last index (2^32 - 1), eagerly, and
    compiled in the vector body and its scalar tail (45 elements; compiled, the top bit shows as
    Rademacher z)."""
    seed, key, n = 0x0123456789ABCDEF >> 1, name_key("model.layers.3.mlp.up_proj.weight"), 45
    want = torch.tensor(
        [float(2 * (hash32_int(seed, key, offset + i) >> 31) - 1) for i in range(n)]
    )
    assert 0 < (want > 0).sum() < n
    assert torch.equal(rademacher(T(seed), T(key), T(offset), n, "cpu"), want)
    assert torch.equal(z_compiled(seed, key, n, offset, kernels=get_kernels("rademacher")), want)
    bits = hash32(T(seed), T(key), T(offset), n, "cpu")
    assert [v & 0xFFFFFFFF for v in bits.tolist()] == [
        hash32_int(seed, key, offset + i) for i in range(n)
    ]


def test_shard_equals_slice_of_whole_bitwise():
    n, seed, key = 100_003, 99, name_key("w")
    whole = z_compiled(seed, key, n)
    # torch.chunk-style uneven splits (FSDP2), odd boundaries that hit the vector tails, a 2-D row
    # shard
    for bounds in ([0, 33_335, 66_670, n], [0, 7, 17, 50_001, n]):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            assert torch.equal(z_compiled(seed, key, hi - lo, offset=lo), whole[lo:hi])
    rows = whole.view(-1, 1)[: 13 * 7_000].view(13, 7_000)
    assert torch.equal(z_compiled(seed, key, 6 * 7_000, offset=7 * 7_000).view(6, 7_000), rows[7:])


@pytest.mark.parametrize("normal_z", NORMAL_Z)
def test_eager_and_compiled_normal_agree_within_the_derived_bound(normal_z):
    """ATen's and Inductor's log/cos differ in the last bits (which ones depends on the CPU's vector
    instructions), so eager and compiled z may differ, but never by more than NORMAL_Z_IMPL_BOUND
    (derived in tests/helpers/zo.py). Negative controls: an off-by-one offset, another key and a
    bf16 round
    trip (a precision regression) each break that same bound."""
    key, kernels = name_key("decoder.layers.0.fc1.weight"), get_kernels(normal_z=normal_z)
    for seed in (0, 999_999_999):
        eager = normal(T(seed), T(key), T(12345), N // 2, "cpu", normal_z)
        compiled = z_compiled(seed, key, N // 2, 12345, kernels)
        assert (eager - compiled).abs().max().item() <= NORMAL_Z_IMPL_BOUND
        for wrong in (
            z_compiled(seed, key, N // 2, 12346, kernels),
            z_compiled(seed, key ^ 1, N // 2, 12345, kernels),
            compiled.bfloat16().float(),
        ):
            assert (eager - wrong).abs().max().item() > NORMAL_Z_IMPL_BOUND


# every 24-bit u2 Box-Muller can draw
EVERY_U2 = torch.arange(1 << 24, dtype=torch.float32) * 2.0**-24


def cos_2pi_in_numpy(u2: np.ndarray, coefs=MINUS_SIN_2PI, fma=False) -> np.ndarray:
    """zo/rng.py cos_2pi_poly's steps in numpy float32 (each + and * rounded once); fma: each
    q * s + c rounded once instead (exact in float64, then to float32), as a contracting
    compiler would."""
    c = [np.float32(v) for v in coefs]
    t = np.float32(0.25) - np.abs(u2 - np.float32(0.5))
    s = t * t
    p = c[-1]
    for ck in reversed(c[:-1]):
        p = (p.astype(np.float64) * s + ck).astype(np.float32) if fma else p * s + ck
    return t * p


def test_poly_cos_is_bitwise_the_same_eager_compiled_and_in_numpy():
    """Over every u2: + and * alone, no FMA contraction (Inductor's default, which zo/kernels.py
    sets explicitly), so eager (ATen), compiled (Inductor) and numpy's float32 round alike. numpy
    is untouched by ATEN_CPU_CAPABILITY, so equal bits at each level (tests/test_isa_levels.py
    reruns this file) are equal bits across levels. Negative control: the same steps with fused
    multiply-adds differ."""
    eager = cos_2pi_poly(EVERY_U2)
    compiled = torch.compile(cos_2pi_poly, dynamic=True)(EVERY_U2)
    in_numpy = torch.from_numpy(cos_2pi_in_numpy(EVERY_U2.numpy()))
    assert torch.equal(eager, compiled) and torch.equal(eager, in_numpy)
    assert not torch.equal(eager, torch.from_numpy(cos_2pi_in_numpy(EVERY_U2.numpy(), fma=True)))


def test_poly_cos_is_within_its_derived_error_over_every_u2():
    """tests/helpers/zo.py poly_cos_error (Taylor remainder, fp32 coefficients, every rounding)
    bounds |cos_2pi_poly - cos(2 pi u2)| over all 2^24 u2; the same derivation bounds the
    polynomial one term shorter, whose error breaks the shipped bound (the check can fail)."""
    exact = torch.cos(2 * math.pi * EVERY_U2.double())
    assert (cos_2pi_poly(EVERY_U2).double() - exact).abs().max().item() <= poly_cos_error()
    shorter = torch.from_numpy(cos_2pi_in_numpy(EVERY_U2.numpy(), MINUS_SIN_2PI[:-1])).double()
    error = (shorter - exact).abs().max().item()
    assert error <= poly_cos_error(MINUS_SIN_2PI[:-1]) and error > poly_cos_error()


@pytest.mark.parametrize("normal_z", NORMAL_Z)
def test_normal_z_is_within_its_derived_error_of_float64_box_muller(normal_z):
    """Eager and compiled z against sqrt(-2 ln u1) cos(2 pi u2) in float64 on the same u1, u2,
    4M draws: within tests/helpers/zo.py normal_z_exact_error. Negative control: z rounded to
    bf16 breaks it."""
    seed, key, n = 31337, name_key("model.layers.0.mlp.down_proj.weight"), 1 << 22
    u1, u2 = uniforms(T(seed), T(key), T(0), n, "cpu")
    exact = torch.sqrt(-2 * torch.log(u1.double())) * torch.cos(2 * math.pi * u2.double())
    bound = normal_z_exact_error(normal_z)
    eager = normal(T(seed), T(key), T(0), n, "cpu", normal_z)
    compiled = z_compiled(seed, key, n, kernels=get_kernels(normal_z=normal_z))
    for z in (eager, compiled):
        assert (z.double() - exact).abs().max().item() <= bound
    assert (compiled.bfloat16().double() - exact).abs().max().item() > bound


def test_unknown_normal_z_is_refused():
    with pytest.raises(ValueError, match="normal_z='cos'"):
        get_kernels(normal_z="cos")
    with pytest.raises(ValueError, match="unknown normal_z"):
        MeZOConfig(normal_z="cos")


def test_rademacher_values_and_balance():
    n = 200_000
    z = rademacher(T(3), T(name_key("x")), T(0), n, "cpu")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(corr(z[:-1], z[1:])) < 5 / math.sqrt(n)
    compiled = z_compiled(3, name_key("x"), 1000, kernels=get_kernels("rademacher"))
    # the integer hash is bitwise the same eager and compiled
    assert torch.equal(compiled, z[:1000])


def test_new_seed_scale_offset_lr_never_recompile():
    p = torch.randn(1000)
    K.perturb_(p, seed=T(1), key=T(2), offset=T(0), scale=T(0.1, torch.float32))
    K.update_(
        p,
        seed=T(1),
        key=T(2),
        offset=T(0),
        lr=T(0.1, torch.float32),
        grad=T(1.0, torch.float32),
        wd=T(0.0, torch.float32),
    )
    before = dict(counters["stats"])
    for i in range(5):
        q = torch.randn(1000 + 17 * i)
        K.perturb_(
            q,
            seed=T(10**9 - i),
            key=T(name_key(f"p{i}")),
            offset=T(i * 12345),
            scale=T(1e-3 * (i + 1), torch.float32),
        )
        lr, g, wd = (T(v, torch.float32) for v in (1e-4 * i, -3.0 * i, 0.1 * i))
        K.update_(q, seed=T(i), key=T(i), offset=T(i), lr=lr, grad=g, wd=wd)
    assert dict(counters["stats"]) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 1000])
def test_perturbed_equals_copy_then_perturb(dtype, n):
    """The one-pass out-of-place kernel the forward hooks use writes bitwise what copy_ + perturb_
    wrote (same fp32 arithmetic, one rounding), and leaves its source untouched."""
    src = torch.randn(n).to(dtype)
    before = src.clone()
    args = dict(seed=T(77), key=T(name_key("w")), offset=T(4321), scale=T(-0.25, torch.float32))
    out, expected = torch.empty_like(src), src.clone()
    K.perturbed_(out, src=src, **args)
    K.perturb_(expected, **args)
    assert torch.equal(out, expected) and not torch.equal(out, src)
    assert torch.equal(src, before)
    with pytest.raises(ValueError, match="src must match out"):
        K.perturbed_(out, src=src[: n // 2], **args)


class ManyShapes(nn.Module):
    """Ten parameter shapes: with dynamic=False this would hit the recompile limit (8)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4 + i, 5 + i) for i in range(10))

    def forward(self, x):
        return sum(layer(x[:, : 4 + i]).sum() for i, layer in enumerate(self.layers))


def test_many_shapes_one_graph():
    model, x = ManyShapes(), torch.randn(3, 20)
    mezo = MeZO(model, MeZOConfig(lr=1e-3, lr_scheduler="linear", max_steps=10))
    graphs = counters["stats"]["unique_graphs"]
    mezo.step(model, lambda m: m(x))  # 20 tensors, 20 shapes
    # fp32 perturbed + update_, if not built yet
    assert counters["stats"]["unique_graphs"] - graphs <= 2
    before = dict(counters["stats"])
    for _ in range(3):  # new seeds and learning rates
        mezo.step(model, lambda m: m(x))
    assert dict(counters["stats"]) == before
