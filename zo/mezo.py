"""The MeZO step (Malladi et al. 2023, Algorithm 1), read side by side with large_models/trainer.py.

    zo_step:   seed <- numpy RNG;  perturb(+1) -> loss1;  perturb(-2) -> loss2;  perturb(+1)
               projected_grad = (loss1 - loss2) / (2 eps)
    zo_update: theta <- theta - lr * (projected_grad * z + wd * theta)   (z regenerated from the
               seed)

Same names, same order: `zo_step`, `zo_losses`, `zo_update` and `apply_update` below are one block
of about 40 lines, the whole step. zo/graphs.py captures the same `zo_step` and `apply_update` as a
CUDA graph (the host draws the seeds before and records the step after). The methods registered in
zo/methods.py plug in without seeing this object: an estimator other than MeZO's (FZOO) gets
`perturb(seed, scaling_factor)` and `forward()` and returns its estimates; a direction (what z is:
dense, Sparse-MeZO's mask) gives the perturbation its kernels; an update rule other than the fused
ZO-SGD (momentum, Adam) is a torch optimizer stepped on the p.grad accumulated here.

The perturbation is one of three objects with one interface (`perturb`, `reset`, `projected_grad`,
`skip_non_finite`, `update`, `accumulate_grad`, `unseen`):
- `zo.perturb.ExactRestore` (`perturbation="exact"`, the library's default, as any closure works
  with it; `"eager"` runs it uncompiled, for debugging): the perturbation is virtual. `perturb`
  moves a shift (0 -> +1 -> -1 -> 0) and forward hooks show each module theta + shift*eps*z; the
  only write is the update, one fused pass per parameter, so a step with lr=0 leaves every
  parameter bitwise unchanged, in any dtype. z comes from a counter-based hash (zo/rng.py): the
  same on every device and shard.
- `zo.paired.Paired` (`perturbation="paired"`, train.py's default where the step pairs): exact
  restore whose +eps and -eps forwards run as one forward over the batch stacked twice (the loss
  closure a `zo.PairedLoss`), each owning module computing theta + eps*z and theta - eps*z from one
  evaluation of z: z twice a step, no restore.
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

import torch
from torch import nn

from . import methods, variants
from .optim import WD_EXEMPT, check_schedule, learning_rate, micro_batches
from .paired import Paired, PairedLoss
from .perturb import ExactRestore, LocalView, StepScalar, collect_slots, whole
from .reference import InPlace
from .rng import DEFAULT_NORMAL_Z, SeedStream
from .shares import DirectionShare


@dataclass
class MeZOConfig:
    """A MeZO run's settings; each registered method's own fields (n_spsa, fzoo_n, sparse_mezo,
    momentum, ...) are added from zo/methods.py, with their defaults and checks."""

    lr: float = 1e-5  # train.py --learning_rate (large_models/mezo.sh LR)
    eps: float = 1e-3  # zo_eps
    weight_decay: float = 0.0
    # names exempt from weight decay (zo.optim.decays); () decays all
    wd_exempt: tuple[str, ...] = WD_EXEMPT
    lr_scheduler: str = "constant"  # "constant" | "linear" (HF, lr at step t taken before stepping)
    warmup_steps: int = 0
    max_steps: int = 0  # needed by the linear schedules
    perturbation: str = "exact"  # "exact" | "eager" | "reference" | "paired" (zo/paired.py)
    distribution: str | None = None  # "normal" | "rademacher"; None: the estimator's
    normal_z: str = DEFAULT_NORMAL_Z  # how normal z takes cos (zo/rng.py NORMAL_Z)
    seed: int = 42
    seed_source: str = "generator"  # "generator": np.random.default_rng(seed).integers(1e9);
    #                                 "numpy_global": np.random.seed(seed), np.random.randint(1e9)
    #                                 (original)
    estimator: str = next(iter(methods.ESTIMATORS))  # zo/methods.py ESTIMATORS
    optimizer: str = "sgd"  # zo/methods.py OPTIMIZERS; sgd with momentum > 0: ZO-momentum
    zo_variant: str | None = None  # None | "param_norm" | "grad_norm"
    use_zo_grad_est: bool = False  # grad_norm: c from per-group ZO estimates instead of a backward
    change_grad_estimate: bool = False  # gradient with plain z instead of z*c
    recompute_norms: bool = False  # the training loop calls initialize_c at each epoch start

    def __post_init__(self):
        choices = {
            "perturbation": ("exact", "eager", "reference", "paired"),
            "seed_source": ("generator", "numpy_global"),
            "zo_variant": (None, "param_norm", "grad_norm"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} ({name}={getattr(self, name)!r}; expected one of {allowed})"
                )
        if self.distribution is None and self.estimator in methods.ESTIMATORS:
            self.distribution = methods.ESTIMATORS[self.estimator].DISTRIBUTION
        unused = {
            "change_grad_estimate": self.zo_variant is None,
            "recompute_norms": self.zo_variant is None,
            "use_zo_grad_est": self.zo_variant != "grad_norm",
        }
        for name, does_nothing in unused.items():
            if does_nothing and getattr(self, name):
                raise ValueError(
                    f"{name} does nothing with zo_variant={self.zo_variant}: only "
                    f"{'zo_variant=grad_norm' if name == 'use_zo_grad_est' else 'a zo_variant'} "
                    f"reads it ({name}=True)"
                )
        check_schedule(self.lr_scheduler, self.max_steps, self.warmup_steps)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (eps={self.eps})")
        methods.check_config(self)


MeZOConfig = methods.with_method_fields(MeZOConfig)


class MeZO:
    """MeZO trainer state. `model` fixes the trainable set (parameters with requires_grad now); a
    later change (e.g. LoRA applied after MeZO was built) raises at the next step.

    local_view: maps a stored parameter (or its grad) to (local tensor, global flat offset); a
        sharded wrapper passes DTensor local shards here (default: the whole tensor at offset 0).
    reduce_losses: applied once per estimate to the stacked losses of this rank's pre-weighted loss
        terms (two per z for SPSA, N + 1 for FZOO), e.g. an all-reduce SUM across data-parallel
        ranks (zo/distributed.py); must return a tensor of the same shape.
    share: which of a step's seeds this rank evaluates, and the gather of every rank's losses
        (zo/shares.py; directions across ranks); the default evaluates them all.
    trajectory: a program.trajectory.Trajectory; each update appends (step, seed,
    projected_grad, lr).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MeZOConfig | None = None,
        *,
        local_view: LocalView = whole,
        reduce_losses=None,
        share: DirectionShare = DirectionShare(),
        trajectory=None,
    ):
        self.cfg = cfg = config or MeZOConfig()
        methods.check_supported(
            cfg,
            fsdp=local_view is not whole,
            data_parallel=reduce_losses is not None,
            direction_groups=share.groups if share.groups > 1 else None,
        )
        self.slots = collect_slots(model, cfg.wd_exempt)
        self.trainable_ids = [id(s.param) for s in self.slots]
        self.device = self.slots[0].param.device
        self.direction = methods.direction_class(cfg)(
            self.slots, cfg, compiled=cfg.perturbation != "eager"
        )
        if cfg.perturbation == "reference":
            self.perturbation = InPlace(self.slots)
        else:  # paired: ExactRestore whose two forwards of an estimate run as one
            perturbation = Paired if cfg.perturbation == "paired" else ExactRestore
            self.perturbation = perturbation(self.slots, self.direction, local_view)
        self.estimator = methods.ESTIMATORS[cfg.estimator]
        # a torch optimizer stepped on p.grad, or None: MeZO's fused ZO-SGD
        self.update_rule = methods.update_rule(cfg).build(self.slots, cfg)
        self.local_view, self.reduce_losses, self.trajectory = local_view, reduce_losses, trajectory
        self.share = share
        self.seeds = SeedStream(cfg.seed, cfg.seed_source)
        self.seed = StepScalar(torch.int64, self.device)  # zo_random_seed, also as a device tensor
        self.lr = StepScalar(torch.float32, self.device)
        self.global_step = 0
        # cumulative forwards over a batch (the x-axis when comparing estimators)
        self.forward_passes = 0
        self.cs: dict[str, torch.Tensor] | None = None  # control variates (zo_variant)
        self.estimates: list[tuple[int, torch.Tensor]] = []  # (seed, projected_grad) of this step
        self.projected_grad: torch.Tensor | None = None  # the step's last estimate
        self.step_lr: float | None = None
        self.unseen_checked = False  # once per MeZO object: at the first step, and after a resume

    @property
    def zo_random_seed(self) -> int | None:
        return self.seed.value

    @zo_random_seed.setter
    def zo_random_seed(self, seed: int) -> None:
        self.seed.set(seed)

    def step(self, model: nn.Module, loss_fn) -> torch.Tensor:
        """zo_step + zo_update; the interface shared with zo.fo.FO. Returns the loss tensor."""
        loss, _ = self.zo_step(model, loss_fn)
        self.zo_update(model)
        return loss

    # ----------------------------------------- the step, beside large_models/trainer.py's zo_step
    def zo_step(self, model: nn.Module, loss_fn, seeds: list[int] | None = None):
        """-> (loss, projected_grad), 0-d device tensors, loss NaN when an estimate is not; the
        step's (seed, projected_grad) are kept for zo_update. seeds: drawn already by begin_step
        (zo/graphs.py)."""
        if self.cfg.zo_variant is not None and self.cs is None:
            self.initialize_c(model, loss_fn)
        if seeds is None:
            seeds = self.begin_step(model)  # self.zo_random_seed = np.random.randint(1e9), per z
        mine = self.share.mine(seeds)  # all of them, unless directions are shared across ranks
        if self.estimator.estimate is None:  # MeZO: two forwards per z; n-SPSA: the mean
            losses = torch.stack([torch.stack(self.zo_losses(model, loss_fn, s)) for s in mine])
            every = self.share.everyone(losses).reshape(len(seeds), 2)  # seed order
            # (loss1 - loss2) / (2 eps) in fp32 (reference: in the losses' dtype first)
            self.estimates = [
                (seed, self.perturbation.projected_grad(loss1, loss2, self.cfg.eps) / len(seeds))
                for seed, (loss1, loss2) in zip(seeds, every)
            ]
            loss = every[-1, 0]
        else:  # another estimator's forwards (FZOO: N one-sided + one clean; its loss L(theta))
            forward = lambda: self.zo_forward(model, loss_fn)  # noqa: E731
            try:
                loss, self.estimates = self.estimator.estimate(
                    self.zo_perturb_parameters, forward, seeds, self.reduce_losses, self.share
                )
            finally:
                self.perturbation.reset()
        self.projected_grad = self.estimates[-1][1]
        # a non-finite estimate skips the update (apply_update); its step reports a NaN loss so the
        # loop counts it (--max_nonfinite): FZOO's N equal losses (std 0, 0/0), SPSA's loss2 NaN
        # (0 * g is 0, NaN for a non-finite g: no host value, so a CUDA graph replays it)
        skipped = (torch.stack([g for _, g in self.estimates]) * 0).sum()
        return loss + skipped.to(loss.dtype), self.projected_grad

    def zo_losses(self, model: nn.Module, loss_fn, seed: int, slots=None):
        """-> (loss1, loss2) = L(theta + eps z), L(theta - eps z) of the z of `seed` (of `slots`
        only, for the variants), summed over the data-parallel ranks."""
        self.zo_random_seed = seed
        try:
            if self.pairs(loss_fn):  # paired: one forward, rows [0, B) at +eps z, [B, 2B) at -eps z
                self.zo_perturb_parameters(scaling_factor=1, slots=slots, paired=True)
                loss1, loss2 = self.zo_forward(model, loss_fn, paired=True).unbind()
            else:
                self.zo_perturb_parameters(scaling_factor=1, slots=slots)
                loss1 = self.zo_forward(model, loss_fn)
                self.zo_perturb_parameters(scaling_factor=-2, slots=slots)
                loss2 = self.zo_forward(model, loss_fn)
                self.zo_perturb_parameters(scaling_factor=1, slots=slots)
        finally:
            self.perturbation.reset()  # exact restore: hooks off, even when a forward raised
        if self.reduce_losses is not None:  # data-parallel: sums of every rank's loss terms
            loss1, loss2 = self.reduce_losses(torch.stack([loss1, loss2])).unbind()
        return loss1, loss2

    def zo_update(self, model: nn.Module | None = None) -> None:
        """The step's update with the scheduled lr, then its record (lr_scheduler.step())."""
        self.apply_update(self.estimates, self.step_lr)
        self.finish_step(self.estimates)

    def apply_update(self, estimates: list[tuple[int, torch.Tensor]], lr: float) -> None:
        """theta <- theta - lr * (sum_k g_k z_k + wd * theta), z regenerated from each seed (also
        replay's). A non-finite g skips the update on the device (perturbation.skip_non_finite)."""
        self.lr.set(lr)
        gs = self.perturbation.skip_non_finite([g for _, g in estimates])
        if self.update_rule is None and len(gs) > 1 and isinstance(self.perturbation, ExactRestore):
            # ZO-SGD with several z: all of them in one fused pass per parameter, bitwise the loop
            seeds = torch.tensor([seed for seed, _ in estimates], device=self.device)
            grads = self.grad_scales(torch.stack(gs))
            self.perturbation.update_many(seeds, self.lr, grads, self.cfg.weight_decay)
            return
        for k, ((seed, _), g) in enumerate(zip(estimates, gs)):
            self.zo_random_seed = seed
            if self.update_rule is None:  # ZO-SGD: one fused pass per parameter; wd once per step
                wd = self.cfg.weight_decay if k == 0 else 0.0
                # theta <- theta - lr * (g * z + wd * theta)
                self.perturbation.update(self.seed, self.lr, self.grad_scales(g), wd)
            else:  # momentum, Adam: p.grad += g * z, then the torch optimizer's step
                self.perturbation.accumulate_grad(self.seed, self.grad_scales(g))
        if self.update_rule is not None:
            self.update_rule.step(lr)

    # ------------------------------------------------- the original's helpers, and the host parts
    def zo_perturb_parameters(
        self, random_seed: int | None = None, scaling_factor: float = 1, slots=None, paired=False
    ):
        """theta <- theta + scaling_factor * eps * z (z / c with a variant), the perturbation's way:
        exact restore shows it to the forwards only; reference writes it into the weights; paired
        shows +eps z and -eps z to the two halves of a paired forward's rows."""
        if random_seed is not None:
            self.zo_random_seed = random_seed
        slots = self.slots if slots is None else slots
        if paired:
            self.perturbation.perturb_pair(self.seed, self.cfg.eps, self.cs or {}, slots)
        else:
            self.perturbation.perturb(self.seed, scaling_factor, self.cfg.eps, self.cs or {}, slots)

    def zo_forward(self, model: nn.Module, loss_fn, paired: bool = False) -> torch.Tensor:
        """Loss without gradient, dropout off (model.eval(), as the original). `loss_fn(model)` may
        return any scalar: a differentiable loss or e.g. -F1 of greedy generations; a list of
        closures is the micro-batches of one step, their losses averaged. no_grad rather than
        inference_mode: the kernels called from the hooks then meet one grad mode (no
        recompile). paired: each closure's `paired` forward over 2B rows -> [loss1, loss2]."""
        model.eval()
        losses = []
        with torch.no_grad():
            for fn in micro_batches(loss_fn):
                if paired:
                    with self.perturbation.hooks.rows(2 * fn.rows):
                        loss = fn.paired(model).detach().reshape(2)
                else:
                    loss = torch.as_tensor(fn(model)).detach().reshape(())
                losses.append(loss.to(self.device))
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean(0)

    def pairs(self, loss_fn) -> bool:
        """--perturbation paired, and every micro-batch closure scores both signs in one forward
        (zo.paired.PairedLoss); otherwise the two forwards of exact restore (e.g. generations).
        Sharded ranks must agree on the number of forwards: there a batch that does not pair is an
        error."""
        if self.cfg.perturbation != "paired":
            return False
        fns = micro_batches(loss_fn)
        if all(isinstance(fn, PairedLoss) and fn.pairable() for fn in fns):
            return True
        if self.local_view is not whole:
            raise ValueError(
                "a sharded paired step needs loss closures that pair on every rank "
                "(zo.paired.PairedLoss; a batch dimension other than its rows equals 2B): use "
                "perturbation='exact'"
            )
        return False

    def learning_rate(self) -> float:
        c = self.cfg
        return learning_rate(self.global_step, c.lr, c.lr_scheduler, c.max_steps, c.warmup_steps)

    def begin_step(self, model: nn.Module) -> list[int]:
        """Before the device work: check the trainable set, draw the step's seeds, write the
        scheduled lr to the device, and let the direction read this step's weights. -> the
        seeds."""
        self.check_trainable(model)
        seeds = [
            self.seeds.next() for _ in range(self.estimator.num_zs(self.cfg, self.global_step))
        ]
        self.zo_random_seed = seeds[0]
        self.step_lr = self.learning_rate()
        self.lr.set(self.step_lr)
        self.direction.prepare(self.global_step, seeds)
        return seeds

    def finish_step(self, estimates: list[tuple[int, torch.Tensor]]) -> None:
        """After the update, the step's record: the trajectory, the forward count, then the step
        counter (lr_scheduler.step()); at this object's first step, unseen parameters."""
        if not self.unseen_checked:  # a fresh run's step 0, or the first step after a resume
            self.warn_unseen_parameters()
            self.unseen_checked = True
        if self.trajectory is not None:
            for seed, g in estimates:
                self.trajectory.append(self.global_step, seed, g, self.step_lr)
        self.forward_passes += self.estimator.forwards(self.cfg, len(estimates))
        self.global_step += 1

    def check_trainable(self, model: nn.Module) -> None:
        now = [id(p) for p in model.parameters() if p.requires_grad]
        if now != self.trainable_ids:
            raise ValueError(
                "the trainable parameters changed since MeZO was built "
                f"({len(self.trainable_ids)} then, {len(now)} now): build MeZO after freezing or "
                "adding adapters (LoRA, prefix)"
            )

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
                seed = self.seeds.next()
                losses = self.zo_losses(model, loss_fn, seed, slots=group_slots)
                cs[group] = self.perturbation.projected_grad(*losses, self.cfg.eps).abs()
                self.forward_passes += 2
        self.cs = variants.nonzero(cs)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Tensors, numbers, strings, lists and dicts only (checkpoints are JSON + tensors)."""
        return {
            "global_step": self.global_step,
            "seeds": self.seeds.state(),
            "cs": self.cs,
            "optimizer": None if self.update_rule is None else self.update_rule.state_dict(),
            "direction": self.direction.state_dict(),
            "forward_passes": self.forward_passes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.seeds.set_state(state["seeds"])
        self.cs = (
            None if state["cs"] is None else {g: c.to(self.device) for g, c in state["cs"].items()}
        )
        if self.update_rule is not None:
            self.update_rule.load_state_dict(state["optimizer"])
        # a checkpoint without a direction state: None; without the counter: 0
        self.direction.load_state_dict(state.get("direction"))
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
