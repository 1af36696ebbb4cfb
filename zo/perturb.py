"""Trainable parameters as slots, and the exact-restore perturbation through forward hooks.

The original perturbs the stored weights in place (+eps z, -2 eps z, +eps z; `zo_perturb_parameters`
in large_models/trainer.py), which does not restore them bitwise: each step leaves a rounding
residue, a random walk behind the original's fp16 runs that diverge. Here the stored parameters are
never written by a perturbed forward (exact restore, `ExactRestore` below):

- a forward-pre-hook on every module that directly owns a trainable parameter swaps
  `module._parameters[name]` for a transient tensor `p + s*z` (one fused kernel), and
- a forward hook puts back exactly the object that was there.

So at most one module's perturbed weights exist at a time, and the forward's own code (which reads
`self.weight` at call time) sees theta + s*z. Under FSDP2 the hooks run inside the block's
unshard/reshard hooks (pre-hooks appended, post-hooks prepended), so they perturb the transient
all-gathered full tensor at global offset 0 and hand the unsharded parameter back before FSDP
reshards it.

The contract this needs from a model: a parameter is read only inside the forward of a module that
owns it, as `self.weight` at call time. One read elsewhere (nn.MultiheadAttention reads
`out_proj.weight` without calling out_proj) cannot be shown perturbed; MeZO warns at its first step.
Wrapping the whole model in torch.compile is not supported with these hooks (they are added and
removed at every perturbation, which would re-trace the model).
"""

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .optim import decays
from .rng import MAX_NUMEL, name_key

# (local tensor, global flat offset of its first element) for a stored parameter or its gradient.
# The default is the whole tensor at offset 0; a sharded wrapper passes e.g.
# `lambda t: (t.to_local(), global_offset_of(t))` so updates touch only the local shard.
LocalView = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def whole(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    return t.detach(), 0


_LAYER = re.compile(r"layers?\.\d+\.")


def cv_group(name: str) -> str | None:
    """Control-variate group of the variants (medium_models trainer.py `retrieve_c`): the first of
    'embed', 'lm_head', 'layer.{i}.' / 'layers.{i}.' found in the name; None means plain z."""
    for group in ("embed", "lm_head"):
        if group in name:
            return group
    m = _LAYER.search(name)
    return m.group(0) if m else None


@dataclass(eq=False)
class ParamSlot:
    """One trainable parameter: its canonical name, the Parameter object, and who owns it."""

    name: str  # first name in model.named_parameters() (tied copies are deduplicated there)
    param: nn.Parameter
    key: int  # name_key(name): selects the z stream
    decay: bool  # weight decay applies (name not exempt)
    group: str | None  # control-variate group
    # (module, attribute) holding it
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    key_t: torch.Tensor | None = None  # 0-d int64 copy of `key` on the parameter's device


def collect_slots(model: nn.Module, wd_exempt: tuple[str, ...]) -> list[ParamSlot]:
    """Trainable parameters in named_parameters() order, each with every module that owns it.

    Tied parameters are one slot (identity of the Parameter object now): one key, so every module
    that owns it sees the same z, and the update touches the one stored tensor once.
    """
    slots, by_id = [], {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if p.numel() > MAX_NUMEL:
                raise ValueError(f"a parameter has more than 2^32 elements ({name}: {p.numel()})")
            slot = ParamSlot(name, p, name_key(name), decays(name, wd_exempt), cv_group(name))
            slot.key_t = torch.full((), slot.key, dtype=torch.int64, device=p.device)
            slots.append(slot)
            by_id[id(p)] = slot
    if not slots:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id:
                by_id[id(p)].owners.append((module, attr))
    devices = {s.param.device for s in slots}
    if len(devices) > 1:
        raise ValueError(f"trainable parameters on several devices ({sorted(map(str, devices))})")
    return slots


class StepScalar:
    """A value that changes every step (the seed, the learning rate), kept twice: the Python number,
    for host code and the reference mode, and a persistent 0-d device tensor written in place.

    Kernels read the tensor, so a new value never recompiles them, and a CUDA graph that captured a
    step reads each replay's value from the same address. The tensor is written only when the value
    changes, and writing a new value while a CUDA graph is being captured is an error: it would bake
    that value into every replay.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.tensor = torch.zeros((), dtype=dtype, device=device)
        self.value = None

    def set(self, value) -> None:
        if value == self.value:
            return
        if self.tensor.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"a per-step value changed inside a CUDA graph capture ({self.value} -> {value})"
            )
        self.tensor.fill_(value)
        self.value = value


class PerturbHooks:
    """While active, each owning module sees theta + scale*z in its forward; storage is untouched.

    The transient copies are built in pooled buffers by one pass that reads the weight and writes
    the buffer (`perturbed_`): a fresh CPU allocation of a large tensor page-faults on first touch,
    Inductor's kernel returning a new tensor writes through a temporary, and a `copy_` before an
    in-place `perturb_` is a second pass over the memory (BENCHMARKS.md, "Measurements behind design
    choices", has the timings). A tied parameter's copy (OPT's embedding and LM head) is made once
    per perturbation and shared by its owners. The pool holds about one buffer per parameter size
    (the largest is the embedding's, alive at the LM head, the forward's peak, in any case).
    `deactivate` at the end of a step drops it, so nothing is held between steps, unless
    `keep_pool`: a captured CUDA graph keeps reading and writing those addresses at every replay, so
    they live as long as the graph.
    """

    def __init__(self, slots: list[ParamSlot], direction, keep_pool: bool = False):
        self.direction, self.keep_pool = direction, keep_pool
        self.owned: dict[nn.Module, list[tuple[str, ParamSlot]]] = {}
        for slot in slots:
            for module, attr in slot.owners:
                self.owned.setdefault(module, []).append((attr, slot))
        self.zero = torch.zeros((), dtype=torch.int64, device=slots[0].param.device)
        self.pool: dict[tuple, list[torch.Tensor]] = {}  # free buffers by (numel, dtype, device)
        self.shared: dict[ParamSlot, torch.Tensor] = {}  # copies of tied slots, this activation
        self.handles: list = []
        # slots some forward has perturbed (see MeZO.warn_unseen_parameters)
        self.seen: set[ParamSlot] = set()
        self.saved: dict[nn.Module, list] = {}
        self.seed, self.scales = None, {}

    def activate(self, seed: torch.Tensor, scales: dict[ParamSlot, torch.Tensor]) -> None:
        """Perturb slot s by scales[s] * z(seed); slots missing from `scales` stay as they are."""
        self._release_shared()
        self.seed, self.scales = seed, scales
        if not self.handles:
            for module in self.owned:
                self.handles.append(module.register_forward_pre_hook(self._swap_in))
                self.handles.append(
                    module.register_forward_hook(self._swap_out, prepend=True, always_call=True)
                )

    def deactivate(self, end_of_step: bool = True) -> None:
        """Hooks off; the pool is dropped at the end of a step only (FZOO returns to theta between
        its N perturbations and reuses the buffers)."""
        for h in self.handles:
            h.remove()
        self._release_shared()
        self.handles, self.saved, self.seed, self.scales = [], {}, None, {}
        if end_of_step and not self.keep_pool:
            self.pool = {}

    def _swap_in(self, module, args):
        saved = []  # registered first, so a failing kernel still leaves a consistent restore list
        self.saved.setdefault(module, []).append(saved)
        for attr, slot in self.owned[module]:
            scale = self.scales.get(slot)
            if scale is None:
                continue
            current = module._parameters[attr]  # the Parameter, or FSDP2's unsharded copy of it
            buf = self.shared.get(slot)
            if buf is None:
                buf = self._perturbed(slot, current, scale)
                if len(slot.owners) > 1:
                    self.shared[slot] = buf
            saved.append((attr, current, None if slot in self.shared else buf))
            self.seen.add(slot)
            module._parameters[attr] = buf.view(current.shape)

    def _swap_out(self, module, args, output):
        stack = self.saved.get(module)
        for attr, current, buf in stack.pop() if stack else ():
            module._parameters[attr] = current
            if buf is not None:
                self._free(buf)

    def _perturbed(self, slot: ParamSlot, current: torch.Tensor, scale, minus: bool = False):
        """A pooled copy of current + scale * z(seed), from one pass; with `minus`, the pair
        (current + scale * z, current - scale * z) from one evaluation of z (zo/paired.py)."""
        plus = self._buffer(current)
        pair = {"minus": self._buffer(current)} if minus else {}
        kernels = self.direction.kernels(slot)
        (kernels.perturbed_pair_ if minus else kernels.perturbed_)(
            plus,
            src=current.detach(),
            **pair,
            seed=self.seed,
            key=slot.key_t,
            offset=self.zero,
            scale=scale,
            **self.direction.args(slot),
        )
        return (plus, pair["minus"]) if minus else plus

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        free = self.pool.get((like.numel(), like.dtype, like.device))
        return (
            free.pop() if free else torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        )

    def _free(self, buf: torch.Tensor) -> None:
        self.pool.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)

    def _release_shared(self) -> None:
        for buf in self.shared.values():
            self._free(buf)
        self.shared = {}


class ExactRestore:
    """`perturbation="exact"` / `"eager"`: the perturbation is virtual, the update one fused pass.

    `perturb` moves a shift (0 -> +1 -> -1 -> 0 in a step) and, while it is not 0, the hooks show
    every owning module theta + shift * eps * z in its forward. The stored weights are written only
    by `update`, so a step with lr = 0 leaves them bitwise unchanged in any dtype. z comes from the
    persistent seed tensor (StepScalar), so a captured CUDA graph replays each step's own z. What z
    is (normal, Rademacher, a Sparse-MeZO mask) is the direction's (zo/directions.py).
    """

    @staticmethod
    def supports(cfg) -> frozenset:
        return frozenset(
            {
                "cuda_graphs",
                "fsdp",
                "data_parallel",
                "directions",
                "replay",
                "dense_grad",
                "variants",
            }
        )

    @staticmethod
    def requires(cfg) -> frozenset:
        return frozenset()

    def __init__(self, slots: list[ParamSlot], direction, local_view: LocalView):
        self.slots, self.direction, self.local_view = slots, direction, local_view
        self.hooks = PerturbHooks(slots, direction)
        self.shift = 0
        device = slots[0].param.device
        # all estimates of this step finite
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        # lr, or 0 to skip the update
        self.lr_applied = torch.zeros((), dtype=torch.float32, device=device)
        # 0-d device tensors of values fixed for the run (scales, offsets, wd)
        self.consts: dict = {}
        self._divided_for, self._divided = None, {}  # cs -> {(shift * eps, group): shift * eps / c}

    def perturb(
        self, seed: StepScalar, scaling_factor: float, eps: float, cs: dict, slots: list[ParamSlot]
    ):
        """Forwards now see theta + shift * eps * z (z / c with a variant); the weights are not
        written."""
        self.shift += scaling_factor
        if self.shift == 0:
            self.hooks.deactivate(end_of_step=False)  # reset() ends the step
            return
        self.hooks.activate(seed.tensor, self._scales(self.shift * eps, cs, slots))

    def reset(self) -> None:
        """Back at theta (also after a forward that raised): hooks off."""
        self.shift = 0
        self.hooks.deactivate()

    def unseen(self) -> list[ParamSlot]:
        """Slots that no forward has shown perturbed so far (MeZO.warn_unseen_parameters)."""
        return [s for s in self.slots if s not in self.hooks.seen]

    def projected_grad(self, loss1: torch.Tensor, loss2: torch.Tensor, eps: float) -> torch.Tensor:
        return (loss1.float() - loss2.float()) / (2 * eps)

    def skip_non_finite(self, gs: list[torch.Tensor]) -> list[torch.Tensor]:
        """A NaN/inf estimate (a NaN loss) skips the update, decided on the device (no host sync):
        every g becomes 0 and the SGD pass runs with lr 0 (momentum/Adam still step on their
        state)."""
        self.finite.copy_(torch.stack([g.isfinite() for g in gs]).all())
        return [torch.where(self.finite, g, self._const(0.0)) for g in gs]

    def update(self, seed: StepScalar, lr: StepScalar, grads: dict, wd: float) -> None:
        """theta <- theta - lr * (g * z + wd * theta), one fused pass over each local shard."""
        lr = torch.mul(lr.tensor, self.finite, out=self.lr_applied)
        for s in self.slots:
            local, offset = self.local_view(s.param)
            if local.numel():
                self.direction.kernels(s).update_(
                    local,
                    seed=seed.tensor,
                    key=s.key_t,
                    lr=lr,
                    grad=grads[s],
                    offset=self._const(offset, torch.int64),
                    wd=self._const(wd if s.decay else 0.0),
                    **self.direction.args(s),
                )

    def update_many(self, seeds: torch.Tensor, lr: StepScalar, grads: dict, wd: float) -> None:
        """The step's n updates theta <- theta - lr * (g_k * z_k + [k = 0] wd * theta) in one
        fused pass over each local shard (bitwise n `update` passes); seeds and grads[slot]: (n,)
        device tensors."""
        lr = torch.mul(lr.tensor, self.finite, out=self.lr_applied)
        n = len(seeds)
        for s in self.slots:
            local, offset = self.local_view(s.param)
            if local.numel():
                self.direction.update_many(s, n)(
                    local,
                    seeds=seeds,
                    key=s.key_t,
                    lr=lr,
                    grads=grads[s],
                    offset=self._const(offset, torch.int64),
                    wds=self._first(wd if s.decay else 0.0, n),
                    **self.direction.args(s),
                )

    def accumulate_grad(self, seed: StepScalar, grads: dict) -> None:
        """p.grad += g * z, materialised for a torch optimizer (not with a mask read from the
        weights: zo.methods.check_supported refuses the combination)."""
        for s in self.slots:
            if s.param.grad is None:
                s.param.grad = torch.zeros_like(s.param)
            local, offset = self.local_view(s.param.grad)
            if local.numel():
                self.direction.kernels(s).perturb_(
                    local,
                    seed=seed.tensor,
                    key=s.key_t,
                    scale=grads[s],
                    offset=self._const(offset, torch.int64),
                    **self.direction.args(s),
                )

    def _scales(
        self, base: float, cs: dict, slots: list[ParamSlot]
    ) -> dict[ParamSlot, torch.Tensor]:
        """shift * eps per slot, divided by its group's control variate c (variants), computed once
        per cs."""
        if not cs:
            return {s: self._const(base) for s in slots}
        if cs is not self._divided_for:
            self._divided_for, self._divided = cs, {}
        for group, c in cs.items():
            if (base, group) not in self._divided:
                self._divided[(base, group)] = self._const(base) / c
        return {s: self._divided.get((base, s.group), self._const(base)) for s in slots}

    def _first(self, value: float, n: int) -> torch.Tensor:
        """(n,) [value, 0, ..., 0]: weight decay applied once per step, with the first z."""
        if ("first", value, n) not in self.consts:
            first = torch.zeros(n, dtype=torch.float32, device=self.slots[0].param.device)
            first[0] = value
            self.consts[("first", value, n)] = first
        return self.consts[("first", value, n)]

    def _const(self, value, dtype=torch.float32) -> torch.Tensor:
        if (value, dtype) not in self.consts:
            self.consts[(value, dtype)] = torch.full(
                (), value, dtype=dtype, device=self.slots[0].param.device
            )
        return self.consts[(value, dtype)]
