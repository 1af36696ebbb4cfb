"""`perturbation="reference"`: the original algorithm, operation for operation (DESIGN.md 3.3).

These functions transcribe large_models/trainer.py (`zo_perturb_parameters`, `zo_update`) and the
trainer-optimizer path of medium_models/src/trainer.py: `torch.manual_seed(seed)`, then one
`torch.normal` per trainable parameter in named_parameters() order, on the parameter's device and in
its dtype, and out-of-place `p.data = p.data + ...`. They exist to check faithfulness; they are not
sharding invariant (torch's generator) and do not restore exactly (the +1, -2, +1 sequence rounds).

One difference: large_models turns projected_grad into a Python float (`.item()`, a host sync);
here it stays a 0-d fp32 tensor. A Python scalar multiplies an fp16/bf16 tensor in fp32 and rounds
once, whereas a 0-d tensor is first rounded to the tensor's dtype, so `update` computes g * z in
fp32 and rounds it once: bitwise the original's result (tested on CPU, fp32 and fp16), no sync.
medium_models keeps projected_grad a tensor, so `accumulate_grad` multiplies the tensors as it did.
"""
import torch

from .perturb import ParamSlot


def _normal_like(p: torch.Tensor) -> torch.Tensor:
    return torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)


def perturb(slots: list[ParamSlot], seed: int, scaling_factor: float, eps: float, cs: dict) -> None:
    """theta <- theta + scaling_factor * z * eps, in place (z / c for the variants, medium_models)."""
    torch.manual_seed(seed)
    for slot in slots:
        z = _normal_like(slot.param)
        if slot.group in cs:
            z = z / cs[slot.group]
        slot.param.data = slot.param.data + scaling_factor * z * eps


def update(slots: list[ParamSlot], seed: int, lr: float, grads: dict, wd: float) -> None:
    """theta <- theta - lr * (g * z + wd * theta), wd only where slot.decay (`zo_update`)."""
    torch.manual_seed(seed)
    for slot in slots:
        p, z = slot.param, _normal_like(slot.param)
        g = grads[slot]
        g_z = (g * z.to(torch.promote_types(z.dtype, g.dtype))).to(z.dtype)  # = projected_grad.item() * z
        if slot.decay:
            p.data = p.data - lr * (g_z + wd * p.data)
        else:
            p.data = p.data - lr * g_z


def accumulate_grad(slots: list[ParamSlot], seed: int, grads: dict) -> None:
    """p.grad += g * z (medium_models `--zero_order_use_trainer_optim` with efficient ZO)."""
    torch.manual_seed(seed)
    for slot in slots:
        p = slot.param
        z = _normal_like(p)
        if p.grad is None:
            p.grad = grads[slot] * z
        else:
            p.grad += grads[slot] * z
