"""Benchmark: one perturbation pass over n fp32 elements (README, "Performance").

Rows, timed in the same run so that the ratios are side by side:
- fused in place: zo.kernels perturb_ (p += s*z, z from the hash, one compiled pass), normal z
  with the default cos (zo/rng.py NORMAL_Z: the polynomial);
- fused in place, library cos: the same with the backend's cos (normal_z="library_cos", the z of
  runs before issue 30); fused in place, Rademacher z: the hash alone;
- fused copy: a new buffer, copy_, then perturb_ (the transient copy the forward hooks build);
- original: `torch.manual_seed(s); z = torch.normal(...); p = p + scaling * z * eps` (trainer.py);
- randn + add_: `torch.manual_seed(s); torch.randn(n, out=buf); p.add_(buf, alpha=eps)`;
- add_: `p.add_(eps)`, the memory-bandwidth floor of an in-place pass.
Time is the median of several runs, the rows taking turns, after a warm-up. Extra memory is the
peak RSS (VmHWM, reset by writing 5 to /proc/self/clear_refs, which also resets ru_maxrss) above the
RSS before the call; on a GPU it is max_memory_allocated above the allocated memory before the
call. With CUDA the same rows run on the GPU, plus a device-to-device copy (`q.copy_(p)`): the
bandwidth target of the fused pass.

`z_errors` measures each normal z's largest distance from Box-Muller in float64 on the same u1, u2.

    python tests/bench/bench_perturb.py [n]      # prints a table; run(n) returns the rows
"""

import math
import statistics
import sys
import time

import bench_model  # puts the repository root on sys.path
import torch

from zo.kernels import get_kernels, get_update_many
from zo.rng import NORMAL_Z, uniforms

EPS = 1e-3


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _extra_mib_cpu(fn) -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _vm_kib("VmRSS")
    fn()
    return (_vm_kib("VmHWM") - before) / 1024


def _extra_mib_cuda(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _ms(fn, device) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _median_ms(variants: dict, device, repeats) -> dict:
    """name -> median ms; the variants take turns at each repetition, after one warm-up (and
    compile) each, so that a slowdown of this shared machine falls on all of them."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_ms(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _variants(n: int, device: str) -> dict:
    kernels = get_kernels("normal")
    p = torch.zeros(n, device=device)
    q = torch.empty_like(p)
    state = {"p": p}

    def scalar(v, dtype=torch.int64):
        return torch.full((), v, dtype=dtype, device=device)

    seed, key, offset, scale = (
        scalar(123456789),
        scalar(987654321),
        scalar(0),
        scalar(EPS, torch.float32),
    )

    def original():  # large_models/trainer.py zo_perturb_parameters, scaling_factor=1
        torch.manual_seed(123456789)
        z = torch.normal(mean=0, std=1, size=state["p"].size(), device=device, dtype=torch.float32)
        state["p"] = state["p"] + 1 * z * EPS

    def randn_add():
        torch.manual_seed(123456789)
        buf = torch.empty_like(p)
        torch.randn(n, out=buf)
        p.add_(buf, alpha=EPS)

    def fused_copy():  # zo.perturb.PerturbHooks._swap_in, without the pool
        buf = torch.empty_like(p)
        buf.copy_(p)
        kernels.perturb_(buf, seed=seed, key=key, offset=offset, scale=scale)

    def fused(other: dict):
        return lambda: get_kernels(**other).perturb_(
            p, seed=seed, key=key, offset=offset, scale=scale
        )

    rows = {
        "fused in place": fused({}),
        "fused in place, library cos": fused({"normal_z": "library_cos"}),
        "fused in place, Rademacher z": fused({"dist": "rademacher"}),
        "fused copy": fused_copy,
        "original (manual_seed+normal+add)": original,
        "randn into buffer + add_": randn_add,
        "add_ (bandwidth floor)": lambda: p.add_(EPS),
    }
    if device == "cuda":
        rows["copy_ device to device"] = lambda: q.copy_(p)
    return rows


def z_errors(n: int = 1 << 22) -> dict:
    """normal_z -> largest |compiled z - sqrt(-2 ln u1) cos(2 pi u2) in float64| over n draws."""

    def t(v):
        return torch.full((), v, dtype=torch.int64)

    seed, key, offset = t(123456789), t(987654321), t(0)
    u1, u2 = uniforms(seed, key, offset, n, "cpu")
    exact = torch.sqrt(-2 * torch.log(u1.double())) * torch.cos(2 * math.pi * u2.double())
    out = {}
    for normal_z in NORMAL_Z:
        z = torch.zeros(n)
        scale = torch.ones(())
        get_kernels(normal_z=normal_z).perturb_(z, seed=seed, key=key, offset=offset, scale=scale)
        out[normal_z] = (z.double() - exact).abs().max().item()
    return out


def run(n: int = 50_000_000, repeats: int = 7) -> list[dict]:
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        variants = _variants(n, device)
        extra = _extra_mib_cuda if device == "cuda" else _extra_mib_cpu
        ms = _median_ms(variants, device, repeats)
        timed = {name: (ms[name], extra(fn)) for name, fn in variants.items()}
        fused_ms = timed["fused in place"][0]
        for name, (ms, mib) in timed.items():
            rows.append(
                {
                    "device": device if device == "cpu" else torch.cuda.get_device_name(),
                    "variant": name,
                    "n": n,
                    "ms": round(ms, 2),
                    "x_fused": round(ms / fused_ms, 2),
                    "GB_s": round(8 * n / ms / 1e6, 1),  # an in-place pass reads and writes 4 bytes
                    "extra_MiB": round(mib, 1),
                    "threads": torch.get_num_threads(),
                }
            )
    return rows


def update_many(
    n: int, ns=(2, 4, 8), repeats: int = 5, device: str = "cpu", dtype=torch.float32
) -> dict:
    """A step's N updates (n-SPSA, FZOO, directions across ranks) over n elements: one fused
    update_many_ pass against N update_ passes, timed interleaved (bench_model.interleaved), and
    whether the two leave bitwise the same weights. -> {N: {ms, ratio: fused / passes, bitwise}}."""
    update_ = get_kernels("normal").update_
    out = {}
    for count in ns:
        scalar = lambda v, dtype=torch.float32: torch.full((), v, dtype=dtype, device=device)  # noqa: E731
        seeds = torch.arange(1, count + 1, device=device) * 1_000_003
        grads = torch.linspace(-2.0, 2.0, count, device=device)
        wds = torch.zeros(count, device=device)
        wds[0] = 0.1
        common = dict(key=scalar(987654321, torch.int64), offset=scalar(0, torch.int64))
        lr = scalar(1e-6)
        fused = get_update_many("normal", n=count)
        p = torch.randn(n, device=device).to(dtype)
        q = p.clone()

        def passes(p=p, seeds=seeds, grads=grads, wds=wds, count=count):
            for k in range(count):
                update_(p, seed=seeds[k], lr=lr, grad=grads[k], wd=wds[k], **common)

        def one(q=q, seeds=seeds, grads=grads, wds=wds, fused=fused):
            fused(q, seeds=seeds, lr=lr, grads=grads, wds=wds, **common)

        passes(), one()  # compile, and the same updates from the same start
        bitwise = torch.equal(p, q)
        times = bench_model.interleaved({"passes": passes, "fused": one}, repeats, device, False)
        out[count] = {
            "ms": bench_model.medians_ms(times),
            "ratio": bench_model.ratio(times, "fused", "passes"),
            "bitwise": bitwise,
        }
        del p, q
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000_000
    rows = run(n)
    print(
        f"one perturbation pass over {n:,} fp32 elements ({n * 4 / 2**20:.0f} MiB), median ms; "
        "x_fused = time / fused in-place time"
    )
    print(f"{'device':<10} {'variant':<36} {'ms':>9} {'x_fused':>8} {'GB/s':>7} {'extra MiB':>10}")
    for r in rows:
        print(
            f"{r['device'][:10]:<10} {r['variant']:<36} {r['ms']:>9.2f} {r['x_fused']:>8.2f} "
            f"{r['GB_s']:>7.1f} {r['extra_MiB']:>10.1f}"
        )


if __name__ == "__main__":
    main()
