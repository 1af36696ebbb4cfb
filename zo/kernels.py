"""Fused perturbation and update kernels: one compiled pass over a parameter, z never materialised.

z is generated inside the loop from (seed, key, global index) (zo/rng.py), so a perturbation costs
no memory beyond the tensor it writes. All arithmetic is done in fp32 (fp64 for fp64 parameters) and
rounded to the parameter's dtype once.

    perturb_(p, seed=, key=, offset=, scale=)           p += scale * z
    perturbed_(out, src=, seed=, key=, offset=, scale=) out = src + scale * z
                                                        (bitwise = copy_ + perturb_)
    update_(p, seed=, key=, offset=, lr=, grad=, wd=)   p -= lr * (grad * z + wd * p)
                                                        (the original's zo_update)
    update_many_(p, seeds=, grads=, wds=, ...)          the n updates of a step in one pass
                                                        (get_update_many; bitwise n update_)
    perturbed_pair_(out, src=, minus=, seed=, key=, offset=, scale=)
                                                        out = src + scale * z,
                                                        minus = src - scale * z from one z
                                                        (bitwise = perturbed_ with +scale and
                                                        -scale; the paired step, zo/paired.py)
    perturbed_at_(out, src=, index=, seed=, key=, scale=)
                                                        out = src + scale * z at the global
                                                        indices `index` (an embedding's
                                                        gathered rows, zo/paired.py)

Masked kernels (`masked=True`, Sparse-MeZO, zo/sparse.py) take one more 0-d tensor, `threshold`, and
use z * (|theta| <= threshold), the mask read from p (src for perturbed_) inside the same pass: no
mask is stored.

`p` / `out` is any contiguous tensor (a Parameter, a shard, a buffer), `src` a contiguous tensor of
its size and dtype; every other argument is a 0-d tensor on p's device, so a new seed, scale or
learning rate never recompiles and a step never syncs with the host.

What the compiler needs stays in this file. Dynamo guards on a view's base (its ndim, its 0/1-sized
dims), on nn.Parameter vs Tensor and on inference-mode tensors, so each call hands the compiled
function a plain 1-D alias of p's memory (`_flat`): with `dynamic=True` one graph then serves every
parameter shape (one more for 1-element tensors, one more for CPU tensors below `_SERIAL_BELOW`
elements) per dtype. Each dtype and size class adds a graph per kernel, so the first call of each
(dtype, device, size class) raises Dynamo's recompile limit above its default of 8, for that call
only (the process-wide setting is left alone). Kernels run under `torch.no_grad()` (global grad mode
is guarded too).

`compiled=False` runs the same Python functions eagerly: identical integer hashes, normal z within
the bound zo/rng.py states, much slower and with large int64 temporaries; it exists for debugging.
When torch.compile cannot build a kernel (e.g. no C++ compiler on a CPU machine) the call fails with
a RuntimeError that names this switch, rather than silently falling back to a much slower path.
"""

import contextlib
import functools
from typing import Callable, NamedTuple

import torch

from .rng import DEFAULT_NORMAL_Z, z_function

# Inductor re-evaluates an unrealized pointwise expression at every use while lowering; the hash
# uses each intermediate twice per round, so the compile work grows like 8^rounds. Realizing
# intermediates of more than 8 ops keeps it linear; they still fuse into one loop as local
# temporaries (same speed, no extra memory: tests/bench/bench_perturb.py; compile times in
# BENCHMARKS.md, "Measurements behind design choices").
# Contracting a * b + c into one FMA (off by default, set here against the environment variable)
# would round the polynomial cos of zo/rng.py differently from eager and from level to level.
_INDUCTOR_OPTIONS = {
    "realize_opcount_threshold": 8,
    "cpp.enable_floating_point_contract_flag": "off",
}
_RECOMPILE_LIMIT = 32  # per kernel: a graph per dtype, and per dtype one for 1-element tensors
# ATen's at::internal::GRAIN_SIZE: its own CPU loops stay on one thread below this many elements.
# The compiled kernel opens an OpenMP region at every call whatever the size, and its barrier waits
# for the slowest thread (on a shared CPU, for a descheduled one), so smaller CPU tensors (norm
# weights, biases) get a single-threaded build of the same kernel: the same code per element,
# bitwise the same result.
_SERIAL_BELOW = 32768


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A plain 1-D tensor over t's memory (not a view, not a Parameter): what Dynamo guards least
    on."""
    if not t.is_contiguous():
        raise ValueError(
            f"ZO kernels need contiguous tensors (shape {tuple(t.shape)}, stride {t.stride()})"
        )
    out = torch.empty((0,), dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _build(z_of: Callable, masked: bool):

    def direction(pf, seed, key, offset, threshold):
        z = z_of(seed, key, offset, pf.numel(), pf.device)
        return torch.where(pf.abs() <= threshold, z, 0.0) if masked else z

    def perturb_(p, seed, key, offset, scale, threshold=None):
        pf = p.to(_compute_dtype(p.dtype))
        p.copy_((pf + scale * direction(pf, seed, key, offset, threshold)).to(p.dtype))

    # one pass: read src, write out
    def perturbed_(out, src, seed, key, offset, scale, threshold=None):
        sf = src.to(_compute_dtype(src.dtype))
        out.copy_((sf + scale * direction(sf, seed, key, offset, threshold)).to(src.dtype))

    def update_(p, seed, key, offset, lr, grad, wd, threshold=None):
        pf = p.to(_compute_dtype(p.dtype))
        p.copy_(
            (pf - lr * (grad * direction(pf, seed, key, offset, threshold) + wd * pf)).to(p.dtype)
        )

    # the paired step's two transient weights from one z: read src once, write out and minus
    def perturbed_pair_(out, src, minus, seed, key, offset, scale, threshold=None):
        sf = src.to(_compute_dtype(src.dtype))
        step = scale * direction(sf, seed, key, offset, threshold)
        out.copy_((sf + step).to(src.dtype))
        minus.copy_((sf - step).to(src.dtype))

    # the paired step's embedding rows (zo/paired.py): out = src + scale * z at global `index`
    def perturbed_at_(out, src, index, seed, key, scale, threshold=None):
        sf = src.to(_compute_dtype(src.dtype))
        shift = index - torch.arange(sf.numel(), device=sf.device)  # z_of counts from offset
        out.copy_((sf + scale * direction(sf, seed, key, shift, threshold)).to(src.dtype))

    return perturb_, perturbed_, update_, perturbed_pair_, perturbed_at_


def _build_update_many(z_of: Callable, masked: bool, n: int):

    # n update_ passes in one: each direction's term is rounded to p's dtype before the next, as
    # the n passes round (bitwise the same), but p is read and written once
    def update_many_(p, seeds, key, offset, lr, grads, wds, threshold=None):
        compute = _compute_dtype(p.dtype)
        pf = p.to(compute)
        for k in range(n):
            z = z_of(seeds[k], key, offset, pf.numel(), pf.device)
            z = torch.where(pf.abs() <= threshold, z, 0.0) if masked else z
            pf = (pf - lr * (grads[k] * z + wds[k] * pf)).to(p.dtype).to(compute)
        p.copy_(pf.to(p.dtype))

    return update_many_


class Kernels(NamedTuple):
    perturb_: Callable
    perturbed_: Callable
    update_: Callable
    perturbed_pair_: Callable
    perturbed_at_: Callable | None = None  # None: z is not a function of the element index


def _wrap(fn: Callable, compiled: bool, rounding: dict | None = None) -> Callable:
    def build(options):
        options = _INDUCTOR_OPTIONS | (rounding or {}) | options
        return torch.compile(fn, dynamic=True, fullgraph=True, options=options) if compiled else fn

    run, run_serial = build({}), build({"cpp.threads": 1})
    seen_kinds = set()  # (dtype, device, 1 element, serial): a new kind may compile a new graph

    @functools.wraps(fn)
    def call(p: torch.Tensor, **scalars: torch.Tensor) -> None:
        serial = p.device.type == "cpu" and p.numel() < _SERIAL_BELOW
        kind = (p.dtype, p.device, p.numel() == 1, serial)
        for name in ("src", "minus"):  # tensors of p's size: plain 1-D aliases too
            t = scalars.get(name)
            if t is not None:
                if (t.numel(), t.dtype, t.device) != (p.numel(), p.dtype, p.device):
                    raise ValueError(
                        f"{name} must match out ({t.numel()} {t.dtype} {t.device} vs "
                        f"{p.numel()} {p.dtype} {p.device})"
                    )
                scalars[name] = _flat(t)
        if "index" in scalars:  # int64 global indices, one per element of p
            if scalars["index"].numel() != p.numel():
                raise ValueError(
                    f"index must match out ({scalars['index'].numel()} vs {p.numel()})"
                )
            scalars["index"] = _flat(scalars["index"])
        with (
            torch.no_grad(),
            (
                contextlib.nullcontext()
                if kind in seen_kinds
                else torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)
            ),
        ):
            try:
                (run_serial if serial else run)(_flat(p), **scalars)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                inner = getattr(e, "inner_exception", None) or e
                why = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
                raise RuntimeError(
                    "torch.compile failed to build a fused ZO kernel; "
                    "install a C++ compiler (CPU) or Triton "
                    f"(GPU), or use perturbation='eager', much slower ({fn.__name__}: {why})"
                ) from e
        seen_kinds.add(kind)

    return call


@functools.cache
def get_kernels(
    dist: str = "normal",
    compiled: bool = True,
    masked: bool = False,
    normal_z: str = DEFAULT_NORMAL_Z,
) -> Kernels:
    """The kernels for z ~ `dist` ("normal" or "rademacher"; normal z's cos by `normal_z`,
    zo/rng.py NORMAL_Z), masked by |theta| <= threshold or not; built once per process."""
    return Kernels(*(_wrap(fn, compiled) for fn in _build(z_function(dist, normal_z), masked)))


@functools.cache
def get_update_many(
    dist: str = "normal",
    compiled: bool = True,
    masked: bool = False,
    n: int = 2,
    normal_z: str = DEFAULT_NORMAL_Z,
) -> Callable:
    """update_many_(p, seeds=, key=, offset=, lr=, grads=, wds=): the n updates p -= lr * (grads[k]
    * z(seeds[k]) + wds[k] * p), k = 0 .. n-1 in order, in one pass over p; bitwise the n update_
    calls. seeds, grads, wds: (n,) tensors on p's device. One compiled kernel per n (unrolled)."""
    z_of = z_function(dist, normal_z)
    # Inductor skips the rounding of an intermediate to a narrower dtype unless told to emulate it
    return _wrap(_build_update_many(z_of, masked, n), compiled, {"emulate_precision_casts": True})
