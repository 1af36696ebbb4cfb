"""The MeZO step (Malladi et al. 2023, Algorithm 1), read side by side with large_models/trainer.py.

    zo_step:   seed <- numpy RNG;  perturb(+1) -> loss1;  perturb(-2) -> loss2;  perturb(+1)
               projected_grad = (loss1 - loss2) / (2 eps)
    zo_update: theta <- theta - lr * (projected_grad * z + wd * theta)   (z regenerated from the
    seed)

Same names, same order. A step is made of parts registered in zo/methods.py, each declaring what it
supports (one check, `methods.check_supported`, called here and by the command line):
- the estimator turns forwards into (seed, projected_grad) estimates: two-sided SPSA (MeZO, n-SPSA;
  zo/spsa.py, the default) or FZOO (N one-sided perturbations + one clean forward; zo/fzoo.py);
- the direction says what z is: normal or Rademacher (zo/directions.py), optionally with
  Sparse-MeZO's magnitude mask (zo/sparse.py), all drawn inside the fused kernels;
- the update rule turns estimates into a parameter change: fused ZO-SGD or a torch optimizer
  (zo/updates.py);
- the perturbation, one of two objects with one interface (`perturb`, `reset`, `projected_grad`,
  `skip_non_finite`, `update`, `accumulate_grad`, `unseen`):
- `zo.perturb.ExactRestore` (`perturbation="fused"`, the default; `"eager"` runs it uncompiled, for
  debugging): the perturbation is virtual. `perturb` moves a shift (0 -> +1 -> -1 -> 0) and forward
  hooks show each module theta + shift*eps*z; the only write is the update, one fused pass per
  parameter, so a step with lr=0 leaves every parameter bitwise unchanged, in any dtype. z comes
  from a counter-based hash (zo/rng.py): the same on every device and shard.
- `zo.reference.InPlace` (`perturbation="reference"`): the original's operations, in place.

Nothing in a step syncs with the host: seeds are drawn on the host, projected_grad stays a 0-d
device tensor, and what changes per step (seed, learning rate) enters the kernels through persistent
0-d device tensors written in place (`StepScalar`), so zo/graphs.py can capture a step as a CUDA
graph.

Extensions on the same step (each off by default): gradient accumulation (`loss_fn` a list of
micro-batch closures, one seed, losses averaged), n-SPSA (several seeds per step, each estimate
divided by their number, medium_models), ZO-momentum / ZO-Adam through torch optimizers (these
materialise p.grad = g*z: one extra copy of the trainable weights plus optimizer state, like
medium_models' `--zero_order_use_trainer_optim`), and the variance-modified variants
(zo/variants.py).
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import methods, variants
from .optim import SAMPLE_SCHEDULES, WD_EXEMPT, check_schedule, learning_rate, micro_batches
from .perturb import ExactRestore, LocalView, StepScalar, collect_slots, whole
from .reference import InPlace


@dataclass
class MeZOConfig:
    lr: float = 1e-5  # train.py --learning_rate (large_models/mezo.sh LR)
    eps: float = 1e-3  # zo_eps
    weight_decay: float = 0.0
    # names exempt from weight decay (zo.optim.decays); () decays all
    wd_exempt: tuple[str, ...] = WD_EXEMPT
    lr_scheduler: str = "constant"  # "constant" | "linear" (HF, lr at step t taken before stepping)
    warmup_steps: int = 0
    max_steps: int = 0  # needed by the linear schedules
    perturbation: str = "fused"  # "fused" | "eager" | "reference"
    # "normal" | "rademacher"; None: the estimator's (normal; FZOO rademacher)
    distribution: str | None = None
    seed: int = 42
    seed_source: str = "generator"  # "generator": np.random.default_rng(seed).integers(1e9);
    #                                 "numpy_global": np.random.seed(seed), np.random.randint(1e9)
    #                                 (original)
    estimator: str = "spsa"  # "spsa": MeZO's two-sided SPSA (n-SPSA with n_spsa > 1); "fzoo": FZOO
    n_spsa: int = 1  # z samples per step
    fzoo_n: int = 8  # FZOO: one-sided perturbations per step (the authors' fzoo.sh N)
    # Sparse-MeZO: fraction of each parameter left unperturbed (0: dense z)
    sparse_mezo: float = 0.0
    # "constant" | "linear": max(1, int(step / max_steps * n_spsa))
    n_spsa_schedule: str = "constant"
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
        choices = {
            "perturbation": ("fused", "eager", "reference"),
            "distribution": ("normal", "rademacher"),
            "seed_source": ("generator", "numpy_global"),
            "n_spsa_schedule": SAMPLE_SCHEDULES,
            "optimizer": ("sgd", "momentum", "adam"),
            "zo_variant": (None, "param_norm", "grad_norm"),
            "estimator": tuple(methods.ESTIMATORS),
        }
        if self.distribution is None:
            self.distribution = "rademacher" if self.estimator == "fzoo" else "normal"
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} ({name}={getattr(self, name)!r}; expected one of {allowed})"
                )
        check_schedule(self.lr_scheduler, self.max_steps, self.warmup_steps)
        if self.n_spsa_schedule == "linear" and self.max_steps <= 0:
            raise ValueError(
                f"n_spsa_schedule=linear needs max_steps > 0 (max_steps={self.max_steps})"
            )
        if self.eps <= 0 or self.n_spsa < 1:
            raise ValueError(
                f"eps must be > 0 and n_spsa >= 1 (eps={self.eps}, n_spsa={self.n_spsa})"
            )
        if self.fzoo_n < 2:  # the std of one loss is 0
            raise ValueError(f"fzoo_n must be >= 2 (fzoo_n={self.fzoo_n})")
        if not 0 <= self.sparse_mezo < 1:
            raise ValueError(f"sparse_mezo must be in [0, 1) (sparse_mezo={self.sparse_mezo})")
        if self.clip_grad_norm is not None and self.optimizer == "sgd":
            raise ValueError(
                "clip_grad_norm needs a materialised gradient (optimizer=momentum or adam)"
            )


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
    """MeZO trainer state. `model` fixes the trainable set (parameters with requires_grad now); a
    later change (e.g. LoRA applied after MeZO was built) raises at the next step.

    local_view: maps a stored parameter (or its grad) to (local tensor, global flat offset); a
        sharded wrapper passes DTensor local shards here (default: the whole tensor at offset 0).
    reduce_losses: applied once per estimate to the stacked losses of this rank's pre-weighted loss
    terms
        (two per z for SPSA, N + 1 for FZOO), e.g. an all-reduce SUM across data-parallel ranks
        (zo/distributed.py); must return a tensor of the same shape.
    trajectory: a zo.trajectory.Trajectory; each update appends (step, seed, projected_grad, lr).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MeZOConfig | None = None,
        *,
        local_view: LocalView = whole,
        reduce_losses=None,
        trajectory=None,
    ):
        self.cfg = cfg = config or MeZOConfig()
        methods.check_supported(
            cfg, fsdp=local_view is not whole, data_parallel=reduce_losses is not None
        )
        self.slots = collect_slots(model, cfg.wd_exempt)
        self.trainable_ids = [id(s.param) for s in self.slots]
        self.device = self.slots[0].param.device
        compiled = cfg.perturbation != "eager"
        direction_cls = methods.direction_class(cfg)
        self.direction = (
            direction_cls(self.slots, cfg.distribution, compiled, cfg.sparse_mezo)
            if cfg.sparse_mezo
            else direction_cls(self.slots, cfg.distribution, compiled)
        )
        if cfg.perturbation == "reference":
            self.perturbation = InPlace(self.slots)
        else:
            self.perturbation = ExactRestore(self.slots, self.direction, local_view)
        self.estimator = methods.ESTIMATORS[cfg.estimator](cfg)
        self.update_rule = methods.UPDATE_RULES[cfg.optimizer](self.slots, cfg)
        self.local_view, self.reduce_losses, self.trajectory = local_view, reduce_losses, trajectory
        self.seeds = SeedStream(cfg.seed, cfg.seed_source)
        self.seed = StepScalar(torch.int64, self.device)  # zo_random_seed, also as a device tensor
        self.lr = StepScalar(torch.float32, self.device)
        self.global_step = 0
        # cumulative forwards over a batch (the x-axis when comparing estimators)
        self.forward_passes = 0
        self.cs: dict[str, torch.Tensor] | None = None  # control variates (zo_variant)
        self.projected_grad: torch.Tensor | None = None
        self.estimates: list[tuple[int, torch.Tensor]] = []  # (seed, projected_grad) of this step
        self.step_lr: float | None = None
        self.unseen_checked = False  # once per MeZO object: at the first step, and after a resume

    @property
    def zo_random_seed(self) -> int | None:
        return self.seed.value

    @zo_random_seed.setter
    def zo_random_seed(self, seed: int) -> None:
        self.seed.set(seed)

    # ------------------------------------------------------------------ the original's four
    # functions
    def zo_perturb_parameters(
        self, random_seed: int | None = None, scaling_factor: float = 1, slots=None
    ):
        """theta <- theta + scaling_factor * eps * z (z / c with a variant), the perturbation's way:
        exact restore shows it to the forwards only; reference writes it into the weights."""
        if random_seed is not None:
            self.zo_random_seed = random_seed
        self.perturbation.perturb(
            self.seed,
            scaling_factor,
            self.cfg.eps,
            self.cs or {},
            self.slots if slots is None else slots,
        )

    def zo_forward(self, model: nn.Module, loss_fn) -> torch.Tensor:
        """Loss without gradient, dropout off (model.eval(), as the original). `loss_fn(model)` may
        return any scalar: a differentiable loss or e.g. -F1 of greedy generations; a list of
        closures is the micro-batches of one step, their losses averaged. no_grad rather than
        inference_mode:
        the kernels called from the hooks then meet one grad mode (no recompile)."""
        model.eval()
        losses = []
        with torch.no_grad():
            for fn in micro_batches(loss_fn):
                losses.append(torch.as_tensor(fn(model)).detach().reshape(()).to(self.device))
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def zo_step(self, model: nn.Module, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimate the gradient; returns (the estimator's loss, projected_grad) as 0-d device
        tensors: MeZO's L(theta + eps z) (of the last z when n_spsa > 1), FZOO's L(theta). All
        estimates of the
        step are in self.estimates."""
        if self.cfg.zo_variant is not None and self.cs is None:
            self.initialize_c(model, loss_fn)
        seeds = self.begin_step(model)  # np.random.randint(1000000000) per z
        loss, self.estimates = self.estimator.estimate(self, model, loss_fn, seeds)
        self.projected_grad = self.estimates[-1][1]
        self.check_unseen_once()
        return loss, self.projected_grad

    def zo_estimate(self, model: nn.Module, loss_fn, slots=None):
        """The original's zo_step after drawing the seed (two-sided SPSA, zo/spsa.py): device work
        only."""
        try:
            self.zo_perturb_parameters(scaling_factor=1, slots=slots)
            loss1 = self.zo_forward(model, loss_fn)
            self.zo_perturb_parameters(scaling_factor=-2, slots=slots)
            loss2 = self.zo_forward(model, loss_fn)
            self.zo_perturb_parameters(scaling_factor=1, slots=slots)
        finally:
            self.perturbation.reset()  # exact restore: hooks off, even when a forward raised
        if self.reduce_losses is not None:
            loss1, loss2 = self.reduce_losses(torch.stack([loss1, loss2])).unbind()
        return loss1, self.perturbation.projected_grad(loss1, loss2, self.cfg.eps)

    def zo_update(self, model: nn.Module | None = None) -> None:
        """theta <- theta - lr * (projected_grad * z + wd * theta) for each z of the step (the
        update
        rule), with the scheduled lr; log it and advance the schedule (lr_scheduler.step())."""
        self.apply_update(self.estimates, self.step_lr)
        self.finish_step(self.estimates)

    def step(self, model: nn.Module, loss_fn) -> torch.Tensor:
        """zo_step + zo_update; the interface shared with zo.fo.FO. Returns the loss tensor."""
        loss, _ = self.zo_step(model, loss_fn)
        self.zo_update(model)
        return loss

    def learning_rate(self) -> float:
        c = self.cfg
        return learning_rate(self.global_step, c.lr, c.lr_scheduler, c.max_steps, c.warmup_steps)

    # ------------------------------------------------------------------ a step's host parts
    # (zo/graphs.py too)
    def begin_step(self, model: nn.Module) -> list[int]:
        """Before the device work: check the trainable set, draw the step's seeds, write the
        scheduled
        lr to the device, and let the direction read this step's weights. -> the seeds."""
        self.check_trainable(model)
        seeds = [self.seeds.next() for _ in range(self.estimator.num_zs(self.global_step))]
        self.zo_random_seed = seeds[0]
        self.step_lr = self.learning_rate()
        self.lr.set(self.step_lr)
        self.direction.prepare()
        return seeds

    def finish_step(self, estimates: list[tuple[int, torch.Tensor]]) -> None:
        """After the update: the step's record (trajectory, forward count), then the step
        counter."""
        self.estimates, self.projected_grad = estimates, estimates[-1][1]
        self.check_unseen_once()
        if self.trajectory is not None:
            for seed, g in estimates:
                self.trajectory.append(self.global_step, seed, g, self.step_lr)
        self.forward_passes += self.estimator.forwards(len(estimates))
        self.global_step += 1

    def check_unseen_once(self) -> None:
        """At the first step of this object: a fresh run's step 0, or the first step after a
        resume."""
        if not self.unseen_checked:
            self.warn_unseen_parameters()
            self.unseen_checked = True

    def check_trainable(self, model: nn.Module) -> None:
        now = [id(p) for p in model.parameters() if p.requires_grad]
        if now != self.trainable_ids:
            raise ValueError(
                f"the trainable parameters changed since MeZO was built ({len(self.trainable_ids)} "
                f"then, {len(now)} now): build MeZO after freezing or adding adapters "
                "(LoRA, prefix)"
            )

    # ------------------------------------------------------------------ updates (also used by
    # replay)
    def apply_update(self, estimates: list[tuple[int, torch.Tensor]], lr: float) -> None:
        """The update rule (zo/updates.py): ZO-SGD theta <- theta - lr * (sum_k g_k z_k + wd *
        theta), or p.grad = sum_k g_k z_k and a torch optimizer's step. A non-finite estimate
        skips the update
        in the default mode, without a host sync (perturbation.skip_non_finite)."""
        self.lr.set(lr)
        gs = self.perturbation.skip_non_finite([g for _, g in estimates])
        self.update_rule.apply(self, [(seed, g) for (seed, _), g in zip(estimates, gs)], lr)

    def grad_scales(self, g: torch.Tensor) -> dict:
        """projected_grad per slot: g, or g * c of its group with a variance-modified variant."""
        return {s: self._grad_scale(s, g) for s in self.slots}

    # ------------------------------------------------------------------ variants (medium_models)
    def initialize_c(self, model: nn.Module, loss_fn) -> None:
        """Control variate c per group (trainer.py `initialize_c`): at the first step, and at each
        epoch start when cfg.recompute_norms (the training loop calls it)."""
        groups = variants.groups_of(self.slots)
        if self.cfg.zo_variant == "param_norm":
            cs = variants.param_norms(groups)
        elif not self.cfg.use_zo_grad_est:
            cs = variants.grad_norms(model, loss_fn, groups)
        else:  # |projected_grad| of a two-forward estimate that perturbs group g only
            self.cs, cs = None, {}
            for group, group_slots in groups.items():
                self.zo_random_seed = self.seeds.next()
                cs[group] = self.zo_estimate(model, loss_fn, slots=group_slots)[1].abs()
                self.forward_passes += 2
        self.cs = variants.nonzero(cs)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Tensors, numbers, strings, lists and dicts only (checkpoints are JSON + tensors)."""
        return {
            "global_step": self.global_step,
            "seeds": self.seeds.state(),
            "cs": self.cs,
            "optimizer": self.update_rule.state_dict(),
            "forward_passes": self.forward_passes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.seeds.set_state(state["seeds"])
        self.cs = (
            None if state["cs"] is None else {g: c.to(self.device) for g, c in state["cs"].items()}
        )
        self.update_rule.load_state_dict(state["optimizer"])
        # checkpoints written before the counter: 0
        self.forward_passes = state.get("forward_passes", 0)

    # ------------------------------------------------------------------ helpers
    def _grad_scale(self, slot, g):
        if self.cs and slot.group in self.cs and not self.cfg.change_grad_estimate:
            return g * self.cs[slot.group]
        return g

    def warn_unseen_parameters(self):
        """A trainable parameter no owning module's forward touched is either unused or read outside
        its module's forward (e.g. nn.MultiheadAttention reading out_proj.weight): the hooks cannot
        show it perturbed, so its update would be pure noise."""
        unseen = [s.name for s in self.perturbation.unseen()]
        if unseen:
            warnings.warn(
                f"trainable parameters never perturbed in a forward: unused, or read outside "
                f"the forward of the module that owns them ({', '.join(unseen[:5])}"
                f"{', ...' if len(unseen) > 5 else ''})",
                stacklevel=3,
            )
