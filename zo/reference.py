"""`perturbation="reference"`: the original algorithm, operation for operation.

`InPlace` transcribes large_models/trainer.py (`zo_perturb_parameters`, `zo_update`) and the
trainer-optimizer path of medium_models/src/trainer.py: `torch.manual_seed(seed)`, then one
`torch.normal` per trainable parameter in named_parameters() order, on the parameter's device and in
its dtype, and out-of-place `p.data = p.data + ...`. It exists to check faithfulness: it is not
sharding invariant (torch's generator) and does not restore exactly (the +1, -2, +1 sequence
rounds). It has the same interface as zo.perturb.ExactRestore, the default.

One difference: large_models turns projected_grad into a Python float (`.item()`, a host sync);
here it stays a 0-d fp32 tensor. A Python scalar multiplies an fp16/bf16 tensor in fp32 and rounds
once, whereas a 0-d tensor is first rounded to the tensor's dtype, so `update` computes g * z in
fp32 and rounds it once: bitwise the original's result (tested on CPU, fp32 and fp16), no sync.
medium_models keeps projected_grad a tensor, so `accumulate_grad` multiplies the tensors as it did.
"""

import torch

from .perturb import ParamSlot, StepScalar


def _normal_like(p: torch.Tensor) -> torch.Tensor:
    return torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)


class InPlace:
    @staticmethod
    def supports(cfg) -> frozenset:
        # host RNG, whole tensors, rounding drift
        return frozenset({"reference", "data_parallel", "dense_grad", "variants"})

    @staticmethod
    def requires(cfg) -> frozenset:
        return frozenset()

    def __init__(self, slots: list[ParamSlot]):
        self.slots = slots

    def perturb(
        self, seed: StepScalar, scaling_factor: float, eps: float, cs: dict, slots: list[ParamSlot]
    ):
        """theta <- theta + scaling_factor * z * eps, in place (z / c for the variants,
        medium_models)."""
        torch.manual_seed(seed.value)
        for slot in slots:
            z = _normal_like(slot.param)
            if slot.group in cs:
                z = z / cs[slot.group]
            slot.param.data = slot.param.data + scaling_factor * z * eps

    def reset(self) -> None:
        """Nothing to undo: the weights are where the in-place moves left them (as the original)."""

    def unseen(self) -> list[ParamSlot]:
        """The weights themselves are written: every forward sees every perturbed parameter."""
        return []

    def projected_grad(self, loss1: torch.Tensor, loss2: torch.Tensor, eps: float) -> torch.Tensor:
        """In the loss dtype first, then fp32: fp16 losses quantise g in the original too."""
        return ((loss1 - loss2) / (2 * eps)).float()

    def skip_non_finite(self, gs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Nothing is skipped: as the original, a NaN/inf estimate reaches the weights."""
        return gs

    def update(self, seed: StepScalar, lr: StepScalar, grads: dict, wd: float) -> None:
        """theta <- theta - lr * (g * z + wd * theta), wd only where slot.decay (`zo_update`); lr a
        Python float, as the original's `_get_learning_rate()`."""
        lr = lr.value
        torch.manual_seed(seed.value)
        for slot in self.slots:
            p, z = slot.param, _normal_like(slot.param)
            g = grads[slot]
            # = projected_grad.item() * z
            g_z = (g * z.to(torch.promote_types(z.dtype, g.dtype))).to(z.dtype)
            if slot.decay:
                p.data = p.data - lr * (g_z + wd * p.data)
            else:
                p.data = p.data - lr * g_z

    def accumulate_grad(self, seed: StepScalar, grads: dict) -> None:
        """p.grad += g * z (medium_models `--zero_order_use_trainer_optim` with efficient ZO)."""
        torch.manual_seed(seed.value)
        for slot in self.slots:
            p = slot.param
            z = _normal_like(p)
            if p.grad is None:
                p.grad = grads[slot] * z
            else:
                p.grad += grads[slot] * z
