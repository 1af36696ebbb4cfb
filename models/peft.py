"""Parameter-efficient fine-tuning used with MeZO (paper section 3; the original's
large_models/lora.py and prefix.py): LoRA and prefix tuning.

Both work on every family here (OPT, RoBERTa, the LLaMA family) through two class attributes of
their attention modules: `lora_targets` (q/v projection names) and `kv_projections` (k/v projection
names). Both freeze every other parameter, so zo/ perturbs only the adapter (it walks the parameters
with requires_grad).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ModelError
from .identity import check_base

ADAPTER_KINDS = {"lora": ("lora_A", "lora_B"), "prefix": ("prefix_keys", "prefix_values")}
ADAPTER_NAMES = ADAPTER_KINDS["lora"] + ADAPTER_KINDS["prefix"]


class LoRALinear(nn.Module):
    """y = x W^T + b + (x A^T B^T) * alpha/r (Hu et al. 2021), never merged: MeZO's `LoRALinear`
    with merge_weights=False. (loralib's default merge_weights=True, used by medium_models, folds B
    A into W at model.eval(), after which perturbing A and B no longer changes the forward: training
    stalls.)

    Owns W, b, A and B directly, so a perturbation hook on this module sees all four. They are
    registered in that order, as in the original's LoRALinear (an nn.Linear that adds lora_A,
    lora_B), and apply_lora puts it in the replaced projection's slot: named_parameters() order is
    the original's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator=None):
        super().__init__()
        self.weight = base.weight  # the same Parameter objects: no copy
        self.bias = base.bias
        self.scaling = alpha / r
        out_features, in_features = base.weight.shape
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **like))
        # U(-1/sqrt(in), 1/sqrt(in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, x):
        return (
            F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        )

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r) B A, for saving a plain checkpoint."""
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    attns = [m for m in model.modules() if hasattr(m, "lora_targets")]
    if not attns:
        raise ModelError(f"no attention modules to adapt ({type(model).__name__})")
    return attns


def _is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def _freeze_all_but_adapters(model: nn.Module) -> None:
    # The original freezes by name ("lora" / "prefix" not in name: large_models/lora.py, prefix.py).
    # Unlike its RoBERTa path (medium_models/run.py freezes only `roberta.*`, so lm_head stays
    # trainable in LoRA mode) nothing else stays trainable.
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter(name))


def lora_bytes(model: nn.Module, r: int) -> int:
    """The bytes apply_lora(model, r) adds: lora_A [r, in] and lora_B [out, r] per projection."""
    projections = [getattr(a, name) for a in _attention_modules(model) for name in a.lora_targets]
    return sum(r * sum(p.weight.shape) * p.weight.element_size() for p in projections)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, generator=None) -> nn.Module:
    """Replace the q and v projections of every attention by LoRALinear (in place) and freeze the
    rest."""
    for attn in _attention_modules(model):
        for name in attn.lora_targets:
            base = getattr(attn, name)
            if not isinstance(base, LoRALinear):
                setattr(attn, name, LoRALinear(base, r, alpha, generator))
    _freeze_all_but_adapters(model)
    return model


@torch.no_grad()
def apply_prefix(
    model: nn.Module, num_prefix: int = 5, init_by_real_act: bool = True, generator=None
) -> nn.Module:
    """Give every attention `prefix_keys` / `prefix_values` [num_prefix, hidden] and freeze the
    rest.

    init_by_real_act (the paper's setting): run the model once on num_prefix random tokens (no BOS,
    as `prefix.py` does) and take each layer's raw key / value projections of them. Otherwise N(0,
    1). No MLP reparameterisation (`--no_reparam`).
    """
    attns = _attention_modules(model)
    if init_by_real_act:
        device = next(model.parameters()).device
        tokens = torch.randint(0, model.config.vocab_size, (1, num_prefix), generator=generator).to(
            device
        )
        captured = {}

        def keep(key):
            def hook(module, args, out):
                captured[key] = out[0].clone()  # [num_prefix, hidden] of the single sequence

            return hook

        hooks = [
            getattr(attn, proj).register_forward_hook(keep((i, j)))
            for i, attn in enumerate(attns)
            for j, proj in enumerate(attn.kv_projections)
        ]
        was_training = model.training
        try:
            model.eval()
            model(tokens)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
    for i, attn in enumerate(attns):
        weight = getattr(attn, attn.kv_projections[0]).weight
        for j, name in enumerate(("prefix_keys", "prefix_values")):
            init = (
                captured[i, j]
                if init_by_real_act
                else torch.randn(num_prefix, weight.shape[0], generator=generator).to(weight.device)
            )
            setattr(attn, name, nn.Parameter(init.to(weight.dtype)))
    _freeze_all_but_adapters(model)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA / prefix tensors by parameter name (detached copies), for saving an adapter."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if _is_adapter(name)}


@torch.no_grad()
def load_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy adapter tensors into a model already prepared with the same apply_lora /
    apply_prefix."""
    own = {name: p for name, p in model.named_parameters() if _is_adapter(name)}
    missing, unknown = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unknown:
        raise ModelError(
            f"adapter does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unknown)[:3]} (adapter state)"
        )
    for name, p in own.items():
        if p.shape != state[name].shape:
            raise ModelError(
                f"adapter tensor {name} has shape {tuple(state[name].shape)}, "
                f"expected {tuple(p.shape)} (adapter state)"
            )
        p.copy_(state[name])
    return model


def save_adapter(model: nn.Module, path, meta: dict[str, str]) -> None:
    """One safetensors file: the adapter tensors plus `meta` (mode, lora_r, lora_alpha, num_prefix,
    base model and identity.base_fingerprints) as string metadata, so `apply_adapter` can rebuild
    the same PEFT model on the same base. Atomic, and the same bytes for the same adapter
    (`_sorted_metadata`)."""
    from safetensors.torch import save

    from data.files import atomic_write

    data = save(
        {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()},
        metadata={k: str(v) for k, v in meta.items()},
    )
    atomic_write(path, _sorted_metadata(data))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors writes `__metadata__` in hash-map order, which differs between processes: rewrite
    the header with its keys sorted, space-padded to 8 bytes as safetensors pads it (data offsets
    count from the end of the header, so they stay valid)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text = text.ljust(-(-len(text) // 8) * 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (metadata, tensors) of a file written by save_adapter; the sizes in the metadata as
    numbers, checked against the tensors (apply_lora and apply_prefix allocate by them)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ModelError(f"missing adapter file ({path})")
    try:
        with safe_open(path, framework="pt") as f:
            meta, state = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ModelError(f"unreadable adapter file: {e} ({path})") from None
    meta.update(_numbers(meta, path))
    _check_tensors(meta, state, path)
    return meta, state


def _numbers(meta: dict, path) -> dict:
    """lora_r and lora_alpha, or num_prefix, as numbers: positive, finite."""

    def refuse(what):
        raise ModelError(
            f"adapter file without valid metadata: {what}; train.py writes mode, lora_r, "
            f"lora_alpha and num_prefix ({path})"
        )

    def number(name, kind):
        if name not in meta:
            refuse(f"no {name}")
        try:
            value = kind(meta[name])
        except ValueError:
            value = None
        # NaN fails `> 0`; an int is always finite
        if value is None or not value > 0 or (kind is float and math.isinf(value)):
            expected = "a finite number" if kind is float else "an integer"
            refuse(f"{name} {meta[name]}, expected {expected} > 0")
        return value

    if meta.get("mode") == "lora":
        return {"lora_r": number("lora_r", int), "lora_alpha": number("lora_alpha", float)}
    if meta.get("mode") == "prefix":
        return {"num_prefix": number("num_prefix", int)}
    refuse(f"mode {meta.get('mode')!r}")


def _check_tensors(meta: dict, state: dict[str, torch.Tensor], path) -> None:
    """Every tensor one of the mode's, floating point (load_adapter would cast it silently), and of
    the size the metadata gives."""
    mode = meta["mode"]
    size_name = "lora_r" if mode == "lora" else "num_prefix"
    if not state:
        raise ModelError(f"adapter file without tensors ({path})")
    for name, t in state.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in ADAPTER_KINDS[mode]:
            raise ModelError(f"adapter tensor {name} is not a {mode} tensor ({path})")
        if not t.is_floating_point():
            raise ModelError(
                f"adapter tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected "
                f"a floating-point dtype ({path})"
            )
        if t.ndim != 2:
            raise ModelError(
                f"adapter tensor {name} has shape {tuple(t.shape)}, expected 2 dimensions ({path})"
            )
        # lora_A [r, in], lora_B [out, r], prefix_* [num_prefix, hidden]
        size = t.shape[1] if kind == "lora_B" else t.shape[0]
        if size != meta[size_name]:
            held = f"tensors' rank is {size}" if mode == "lora" else f"tensors hold {size} tokens"
            raise ModelError(f"adapter metadata {size_name} {meta[size_name]}, the {held} ({path})")


def apply_adapter(model: nn.Module, path) -> nn.Module:
    """The adapter file at `path` (save_adapter's) applied to `model`, in place, after checking that
    `model` is the base it was trained on (where the file records it: identity.check_base)."""
    meta, state = read_adapter(path)
    check_base(model, meta, path)  # before PEFT: the fingerprint is of the base weights
    if meta["mode"] == "lora":
        apply_lora(model, r=meta["lora_r"], alpha=meta["lora_alpha"])
    else:
        apply_prefix(model, num_prefix=meta["num_prefix"], init_by_real_act=False)
    return load_adapter(model, state)
