"""The MeZO step (Malladi et al. 2023, Algorithm 1), read side by side with large_models/trainer.py.

    zo_step:  seed <- numpy RNG;  perturb(+1) -> loss1;  perturb(-2) -> loss2;  perturb(+1)
              projected_grad = (loss1 - loss2) / (2 eps)
    zo_update: theta <- theta - lr * (projected_grad * z + wd * theta)   (z regenerated from the seed)

Same names, same order. What differs (DESIGN.md 3.3):
- `perturbation="fused"` (default) never writes the stored weights during the forwards: the
  perturbation is *virtual*. `zo_perturb_parameters` moves a shift (0 -> +1 -> -1 -> 0) and forward
  hooks show each module theta + shift*eps*z (zo/perturb.py). The only write is the update, one fused
  pass per parameter. A step with lr=0 leaves every parameter bitwise unchanged, in any dtype.
- z comes from a counter-based hash (zo/rng.py), so it is the same on every device and shard.
- Nothing in a step syncs with the host: seeds are drawn on the host, projected_grad stays a 0-d
  device tensor, and scalars enter the kernels as 0-d device tensors.
- `perturbation="reference"` runs the original operations instead (zo/reference.py);
  `perturbation="eager"` runs the fused path uncompiled (debugging).

Extensions on the same step (each off by default): gradient accumulation (`loss_fn` a list of
micro-batch closures, one seed, losses averaged), n-SPSA (several seeds per step, each estimate
divided by their number, medium_models), ZO-momentum / ZO-Adam through torch optimizers (these
materialise p.grad = g*z: one extra copy of the trainable weights plus optimizer state, like
medium_models' `--zero_order_use_trainer_optim`), and the variance-modified variants (zo/variants.py).
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import reference, variants
from .kernels import flat, get_kernels
from .optim import SAMPLE_SCHEDULES, build_optimizer, check_schedule, learning_rate, num_samples, set_lr
from .perturb import LocalView, PerturbHooks, collect_slots, whole


@dataclass
class MeZOConfig:
    lr: float = 1e-6
    eps: float = 1e-3  # zo_eps
    weight_decay: float = 0.0
    wd_exempt: tuple[str, ...] = ("bias", "layer_norm", "layernorm")  # () decays all (medium_models)
    lr_scheduler: str = "constant"  # "constant" | "linear" (HF, lr at step t taken before stepping)
    warmup_steps: int = 0
    max_steps: int = 0  # needed by the linear schedules
    perturbation: str = "fused"  # "fused" | "eager" | "reference"
    distribution: str = "normal"  # "normal" | "rademacher" (fused / eager only)
    seed: int = 42
    seed_source: str = "generator"  # "generator": np.random.default_rng(seed).integers(1e9);
    #                                 "numpy_global": np.random.seed(seed), np.random.randint(1e9) (original)
    n_spsa: int = 1  # z samples per step
    n_spsa_schedule: str = "constant"  # "constant" | "linear": max(1, int(step / max_steps * n_spsa))
    optimizer: str = "sgd"  # "sgd": fused ZO-SGD (MeZO); "momentum": torch SGD; "adam": torch AdamW
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_grad_norm: float | None = None  # "momentum"/"adam" only (--zero_order_clip_grad)
    zo_variant: str | None = None  # None | "param_norm" | "grad_norm"
    use_zo_grad_est: bool = False  # grad_norm: c from per-group ZO estimates instead of a backward
    change_grad_estimate: bool = False  # gradient with plain z instead of z*c
    recompute_norms: bool = False  # the training loop calls initialize_c at each epoch start

    def __post_init__(self):
        choices = {"perturbation": ("fused", "eager", "reference"), "distribution": ("normal", "rademacher"),
                   "seed_source": ("generator", "numpy_global"), "n_spsa_schedule": SAMPLE_SCHEDULES,
                   "optimizer": ("sgd", "momentum", "adam"), "zo_variant": (None, "param_norm", "grad_norm")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} ({name}={getattr(self, name)!r}; expected one of {allowed})")
        check_schedule(self.lr_scheduler, self.max_steps, self.warmup_steps)
        if self.n_spsa_schedule == "linear" and self.max_steps <= 0:
            raise ValueError(f"n_spsa_schedule=linear needs max_steps > 0 (max_steps={self.max_steps})")
        if self.eps <= 0 or self.n_spsa < 1:
            raise ValueError(f"eps must be > 0 and n_spsa >= 1 (eps={self.eps}, n_spsa={self.n_spsa})")
        if self.perturbation == "reference" and self.distribution != "normal":
            raise ValueError("perturbation=reference draws torch.normal (distribution=rademacher)")
        if self.clip_grad_norm is not None and self.optimizer == "sgd":
            raise ValueError("clip_grad_norm needs a materialised gradient (optimizer=momentum or adam)")


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


class MeZO:
    """MeZO trainer state. `model` fixes the trainable set (parameters with requires_grad now).

    local_view: maps a stored parameter (or its grad) to (local tensor, global flat offset); a
        sharded wrapper passes DTensor local shards here (default: the whole tensor at offset 0).
    reduce_losses: applied once per z to the stacked [loss1, loss2] (e.g. an all-reduce mean
        across data-parallel ranks); must return a tensor of the same shape.
    trajectory: a zo.trajectory.Trajectory; each update appends (step, seed, projected_grad, lr).
    """

    def __init__(self, model: nn.Module, config: MeZOConfig | None = None, *, local_view: LocalView = whole,
                 reduce_losses=None, trajectory=None):
        self.cfg = cfg = config or MeZOConfig()
        self.slots = collect_slots(model, cfg.wd_exempt)
        self.device = self.slots[0].param.device
        self.reference = cfg.perturbation == "reference"
        self.kernels = None if self.reference else get_kernels(cfg.distribution, cfg.perturbation == "fused")
        self.hooks = None if self.reference else PerturbHooks(self.slots, self.kernels)
        self.local_view, self.reduce_losses, self.trajectory = local_view, reduce_losses, trajectory
        self.optimizer = None
        if cfg.optimizer != "sgd":
            self.optimizer = build_optimizer("sgd" if cfg.optimizer == "momentum" else "adam",
                                             [(s.name, s.param) for s in self.slots], cfg.lr, cfg.weight_decay,
                                             cfg.wd_exempt, cfg.momentum, cfg.adam_betas, cfg.adam_eps)
        self.seeds = SeedStream(cfg.seed, cfg.seed_source)
        self.global_step = 0
        self.cs: dict[str, torch.Tensor] | None = None  # control variates (zo_variant)
        self.zo_random_seed: int | None = None
        self.projected_grad: torch.Tensor | None = None
        self.estimates: list[tuple[int, torch.Tensor]] = []  # (seed, projected_grad) of this step
        self._shift = 0  # fused: the virtual perturbation currently shown to the forwards
        self._consts: dict = {}

    # ------------------------------------------------------------------ the original's four functions
    def zo_perturb_parameters(self, random_seed: int | None = None, scaling_factor: float = 1, slots=None):
        """theta <- theta + scaling_factor * eps * z (z/c with a variant). Fused: virtual, seen only
        inside forwards, and exact when the shifts sum to 0. Reference: in place, as the original."""
        seed = self.zo_random_seed if random_seed is None else random_seed
        slots = self.slots if slots is None else slots
        cs = self.cs or {}
        if self.reference:
            reference.perturb(slots, seed, scaling_factor, self.cfg.eps, cs)
            return
        self._shift += scaling_factor
        if self._shift == 0:
            self.hooks.deactivate()
            return
        base = self._const(self._shift * self.cfg.eps)
        self.hooks.activate(self._tensor(seed, torch.int64),
                            {s: base / cs[s.group] if s.group in cs else base for s in slots})

    def zo_forward(self, model: nn.Module, loss_fn) -> torch.Tensor:
        """Loss without gradient, dropout off (model.eval(), as the original). `loss_fn(model)` may
        return any scalar: a differentiable loss or e.g. -F1 of greedy generations. no_grad rather
        than inference_mode: the kernels called from the hooks then meet one grad mode (no recompile)."""
        model.eval()
        with torch.no_grad():
            loss = loss_fn(model)
        return torch.as_tensor(loss).detach().reshape(()).to(self.device)

    def zo_step(self, model: nn.Module, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimate the gradient; returns (loss at theta + eps z, projected_grad) as 0-d device tensors
        (of the last z when n_spsa > 1; all estimates are in self.estimates). `loss_fn` is a closure
        `loss_fn(model) -> loss`, or a list of them: micro-batches sharing one z, losses averaged."""
        fns = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
        if self.cfg.zo_variant is not None and self.cs is None:
            self.initialize_c(model, fns[0])
        num_zs = num_samples(self.global_step, self.cfg.n_spsa, self.cfg.n_spsa_schedule, self.cfg.max_steps)
        self.estimates = []
        try:
            for _ in range(num_zs):
                self.zo_random_seed = self.seeds.next()
                self.zo_perturb_parameters(scaling_factor=1)
                loss1 = self._mean_loss(model, fns)
                self.zo_perturb_parameters(scaling_factor=-2)
                loss2 = self._mean_loss(model, fns)
                self.zo_perturb_parameters(scaling_factor=1)  # fused: hooks off; reference: back to ~theta
                if self.reduce_losses is not None:
                    loss1, loss2 = self.reduce_losses(torch.stack([loss1, loss2])).unbind()
                self.projected_grad = self._difference(loss1, loss2) / float(num_zs)
                self.estimates.append((self.zo_random_seed, self.projected_grad))
        finally:
            self._reset_virtual_shift()
        if self.global_step == 0 and self.hooks is not None:
            self._warn_unseen()
        return loss1, self.projected_grad

    def zo_update(self, model: nn.Module | None = None) -> None:
        """Apply this step's estimates with the scheduled lr, log them, advance the schedule."""
        lr = self.learning_rate()
        self.apply_update(self.estimates, lr)
        if self.trajectory is not None:
            for seed, g in self.estimates:
                self.trajectory.append(self.global_step, seed, g, lr)
        self.global_step += 1

    def step(self, model: nn.Module, loss_fn) -> torch.Tensor:
        """zo_step + zo_update; the interface shared with zo.fo.FO. Returns the loss tensor."""
        loss, _ = self.zo_step(model, loss_fn)
        self.zo_update(model)
        return loss

    def learning_rate(self) -> float:
        c = self.cfg
        return learning_rate(self.global_step, c.lr, c.lr_scheduler, c.max_steps, c.warmup_steps)

    # ------------------------------------------------------------------ updates (also used by replay)
    def apply_update(self, estimates: list[tuple[int, torch.Tensor]], lr: float) -> None:
        """theta <- theta - lr * (sum_k g_k z_k + wd theta) (ZO-SGD), or p.grad = sum_k g_k z_k followed
        by the torch optimizer's step (momentum, Adam).

        A non-finite estimate (a NaN/inf loss) skips the update without a host sync: its g becomes 0
        and the SGD pass runs with lr 0 (momentum/Adam still step on their state; the reference mode
        applies it, as the original)."""
        finite = None
        if not self.reference:
            finite = torch.stack([g.isfinite() for _, g in estimates]).all()
            estimates = [(seed, torch.where(finite, g, 0.0)) for seed, g in estimates]
        for k, (seed, g) in enumerate(estimates):
            grads = {s: self._grad_scale(s, g) for s in self.slots}
            if self.optimizer is None:
                self._sgd_pass(seed, lr, grads, self.cfg.weight_decay if k == 0 else 0.0, finite)  # decay once
            else:
                self._accumulate_grad(seed, grads)
        if self.optimizer is not None:
            params = [s.param for s in self.slots]
            if self.cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            for p in params:
                p.grad = None  # the dense g*z lives only inside the update

    def _sgd_pass(self, seed: int, lr: float, grads: dict, wd: float, finite=None) -> None:
        """One fused pass per parameter (its local shard, at its global offset)."""
        if self.reference:
            reference.update(self.slots, seed, lr, grads, wd)
            return
        seed_t, lr_t = self._tensor(seed, torch.int64), self._tensor(lr)
        if finite is not None:
            lr_t = lr_t * finite
        for s in self.slots:
            local, offset = self.local_view(s.param)
            if local.numel():
                self.kernels.update_(flat(local), seed_t, s.key_t, self._const(offset, torch.int64), lr_t,
                                     grads[s], self._const(wd if s.decay else 0.0))

    def _accumulate_grad(self, seed: int, grads: dict) -> None:
        """p.grad += g * z, materialised for the torch optimizer."""
        if self.reference:
            reference.accumulate_grad(self.slots, seed, grads)
            return
        seed_t = self._tensor(seed, torch.int64)
        for s in self.slots:
            if s.param.grad is None:
                s.param.grad = torch.zeros_like(s.param)
            local, offset = self.local_view(s.param.grad)
            if local.numel():
                self.kernels.perturb_(flat(local), seed_t, s.key_t, self._const(offset, torch.int64), grads[s])

    # ------------------------------------------------------------------ variants (medium_models)
    def initialize_c(self, model: nn.Module, loss_fn) -> None:
        """Control variate c per group (trainer.py `initialize_c`): at the first step, and at each
        epoch start when cfg.recompute_norms (the training loop calls it)."""
        groups = variants.groups_of(self.slots)
        if self.cfg.zo_variant == "param_norm":
            cs = variants.param_norms(groups)
        elif not self.cfg.use_zo_grad_est:
            cs = variants.grad_norms(model, loss_fn, groups)
        else:
            self.cs, cs = None, {}
            try:
                for group, group_slots in groups.items():
                    self.zo_random_seed = self.seeds.next()
                    self.zo_perturb_parameters(scaling_factor=1, slots=group_slots)
                    loss1 = self.zo_forward(model, loss_fn)
                    self.zo_perturb_parameters(scaling_factor=-2, slots=group_slots)
                    loss2 = self.zo_forward(model, loss_fn)
                    self.zo_perturb_parameters(scaling_factor=1, slots=group_slots)
                    cs[group] = self._difference(loss1, loss2).abs()
            finally:
                self._reset_virtual_shift()
        self.cs = variants.nonzero(cs)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "seeds": self.seeds.state(), "cs": self.cs,
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.seeds.set_state(state["seeds"])
        self.cs = None if state["cs"] is None else {g: c.to(self.device) for g, c in state["cs"].items()}
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------ helpers
    def _mean_loss(self, model, fns) -> torch.Tensor:
        losses = [self.zo_forward(model, f) for f in fns]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _difference(self, loss1, loss2) -> torch.Tensor:
        """(loss1 - loss2) / (2 eps) as fp32; the reference mode subtracts in the loss dtype first
        (fp16 losses quantise g in the original)."""
        if self.reference:
            return ((loss1 - loss2) / (2 * self.cfg.eps)).float()
        return (loss1.float() - loss2.float()) / (2 * self.cfg.eps)

    def _grad_scale(self, slot, g):
        if self.cs and slot.group in self.cs and not self.cfg.change_grad_estimate:
            return g * self.cs[slot.group]
        return g

    def _warn_unseen(self):
        """A trainable parameter no owning module's forward touched is either unused or read outside
        its module's forward (e.g. nn.MultiheadAttention reading out_proj.weight): the hooks cannot
        show it perturbed, so its update would be pure noise."""
        unseen = [s.name for s in self.slots if s not in self.hooks.seen]
        if unseen:
            warnings.warn(f"trainable parameters never perturbed in a forward: unused, or read outside "
                          f"the forward of the module that owns them ({', '.join(unseen[:5])}"
                          f"{', ...' if len(unseen) > 5 else ''})", stacklevel=3)

    def _reset_virtual_shift(self):
        if self.hooks is not None:
            self._shift = 0
            self.hooks.deactivate()

    def _tensor(self, value, dtype=torch.float32) -> torch.Tensor:
        """A 0-d device tensor written by a fill kernel: no host-to-device copy, no sync."""
        return torch.full((), value, dtype=dtype, device=self.device)

    def _const(self, value, dtype=torch.float32) -> torch.Tensor:
        if (value, dtype) not in self._consts:
            self._consts[(value, dtype)] = self._tensor(value, dtype)
        return self._consts[(value, dtype)]
