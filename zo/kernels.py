"""Fused perturbation and update kernels (DESIGN.md 3.2, 5; torch_facts.md section 5).

Each kernel is one pass over a flat parameter: z is generated inside the loop from (seed, key,
global index) and never materialised, so a perturbation costs no memory beyond its output. All
arithmetic is done in fp32 (fp64 for fp64 parameters) and rounded to the parameter dtype once.

    perturbed(p, seed, key, offset, scale)        -> p + scale*z            (new tensor)
    perturb_(p, seed, key, offset, scale)         :  p += scale*z           (in place)
    update_(p, seed, key, offset, lr, grad, wd)   :  p -= lr*(grad*z + wd*p)  (in place; MeZO's
                                                     `zo_update` formula, large_models/trainer.py)

Every argument but `p` is a 0-d tensor on p's device, so a new seed, scale or learning rate never
recompiles, and a step never syncs with the host. Calls take `flat(t)`: a plain 1-D tensor that
aliases t's memory without being a view, because Dynamo guards on a view's base (its ndim, its
0/1-sized dims), on nn.Parameter vs Tensor and on inference-mode tensors; with `dynamic=True` and
flat aliases one graph serves every parameter shape (one more for 1-element tensors) per dtype.
Kernels always run under `torch.no_grad()` (global grad mode is guarded too).

`compiled=False` runs the same Python functions eagerly: identical integer hashes, z within ~1 ulp,
but about 100x slower and with large int64 temporaries. It exists for debugging. When
`torch.compile` cannot build a kernel (e.g. no C++ compiler on a CPU machine) the call fails with
a RuntimeError that names this switch, rather than silently falling back to a 100x slower path.
"""
import functools
from typing import Callable, NamedTuple

import torch

from .rng import DISTRIBUTIONS


def flat(t: torch.Tensor) -> torch.Tensor:
    """A plain 1-D tensor over t's memory (not a view, not a Parameter): what the kernels take."""
    if not t.is_contiguous():
        raise ValueError(f"ZO kernels need contiguous tensors (shape {tuple(t.shape)}, stride {t.stride()})")
    out = torch.empty((0,), dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _build(dist: str):
    z_of = DISTRIBUTIONS[dist]

    def perturbed(p, seed, key, offset, scale):
        z = z_of(seed, key, offset, p.numel(), p.device)
        return (p.to(_compute_dtype(p.dtype)) + scale * z).to(p.dtype)

    def perturb_(p, seed, key, offset, scale):
        p.copy_(perturbed(p, seed, key, offset, scale))

    def update_(p, seed, key, offset, lr, grad, wd):
        z = z_of(seed, key, offset, p.numel(), p.device)
        pf = p.to(_compute_dtype(p.dtype))
        p.copy_((pf - lr * (grad * z + wd * pf)).to(p.dtype))

    return perturbed, perturb_, update_


class Kernels(NamedTuple):
    perturbed: Callable
    perturb_: Callable
    update_: Callable


# Inductor re-evaluates an unrealized pointwise expression at every use while lowering; the hash
# uses each intermediate twice per round, so the work grows like 8^rounds and one kernel took ~10 s
# to compile. Realizing intermediates of more than 8 ops keeps it to ~1 s; they still fuse into
# one loop as local temporaries (same speed, no extra memory: tests/bench/bench_perturb.py).
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 8}


def _wrap(fn: Callable, compiled: bool) -> Callable:
    run = torch.compile(fn, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS) if compiled else fn

    @functools.wraps(fn)
    def call(p, *args):
        with torch.no_grad():
            try:
                return run(p, *args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                inner = getattr(e, "inner_exception", None) or e
                why = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
                raise RuntimeError(
                    "torch.compile failed to build a fused ZO kernel; install a C++ compiler (CPU) or Triton "
                    f"(GPU), or use perturbation='eager', about 100x slower ({fn.__name__}: {why})"
                ) from e

    return call


@functools.cache
def get_kernels(dist: str = "normal", compiled: bool = True) -> Kernels:
    """The three kernels for z ~ `dist` ("normal" or "rademacher"); built once per process."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown perturbation distribution (distribution={dist!r})")
    if compiled:
        # Each dtype and the 1-element case add a graph per kernel; stay clear of the default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return Kernels(*(_wrap(fn, compiled) for fn in _build(dist)))
