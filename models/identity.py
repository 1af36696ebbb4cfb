"""Which base weights a model holds. `fingerprint` goes into config.json (`base_fingerprint`: what
--resume and --replay check) and, per dtype, into adapter files (`base_fingerprints`: what
peft.apply_adapter checks, so an adapter is never applied to another base of the same shapes)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from . import ModelError

FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 8, 4096
ADAPTER_KEY = "base_fingerprint."  # + dtype name: an adapter file's metadata key
# float32 weights cast to these exactly as load_model would have loaded them from the checkpoint
FROM_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """A short hash of the weights: every parameter's name, shape and dtype, and the bytes of a few
    evenly spaced blocks of each (8 x 4 KiB per tensor: milliseconds even for a 13B model).
    dtype: of the weights cast to it; only the sampled elements are cast."""
    h = hashlib.sha256()
    block = FINGERPRINT_BLOCK_BYTES
    for name, p in model.named_parameters():
        as_dtype = dtype or p.dtype
        h.update(f"{name}:{tuple(p.shape)}:{as_dtype};".encode())
        flat, size = p.detach().reshape(-1), as_dtype.itemsize
        nbytes = flat.numel() * size
        starts = (
            {(nbytes - block) * i // (FINGERPRINT_BLOCKS - 1) for i in range(FINGERPRINT_BLOCKS)}
            if nbytes > block
            else {0}
        )
        for start in sorted(starts) if nbytes else ():
            first = start // size  # the elements that hold bytes [start, start + block)
            piece = flat[first : -(-(start + block) // size)].to(as_dtype).view(torch.uint8)
            h.update(piece[start - first * size :][:block].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype  # load_model gives every weight one dtype


def base_fingerprints(model: nn.Module) -> dict[str, str]:
    """An adapter file's record of the base model it is trained on (call it before PEFT): the
    fingerprint in the model's dtype and, from float32 weights, in bfloat16 and float16 too, so an
    evaluation in any of them can check its base."""
    own = _dtype(model)
    dtypes = FROM_FLOAT32 if own == torch.float32 else (own,)
    return {ADAPTER_KEY + _name(d): fingerprint(model, d) for d in dtypes}


def check_base(model: nn.Module, meta: dict, where) -> None:
    """Refuse a base model other than the one `meta` (an adapter's metadata) records. float32
    weights cast to any recorded dtype; other weights are compared in their own. An adapter written
    before the base was recorded is not checked."""
    recorded = {k[len(ADAPTER_KEY) :]: v for k, v in meta.items() if k.startswith(ADAPTER_KEY)}
    if not recorded:
        return
    own = _name(_dtype(model))
    if own not in recorded and own != "float32":
        raise ModelError(
            f"the adapter's base was fingerprinted in {', '.join(recorded)}, which {own} weights "
            f"cannot reproduce: evaluate in {next(iter(recorded))} or float32 ({where})"
        )
    dtype = own if own in recorded else next(iter(recorded))
    found = fingerprint(model, getattr(torch, dtype))
    if found != recorded[dtype]:
        raise ModelError(
            f"the adapter was trained on other base weights (fingerprint {recorded[dtype]}, this "
            f"model's {found}) ({where})"
        )
