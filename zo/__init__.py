"""Zeroth-order optimisation: MeZO (Malladi et al. 2023) in pure PyTorch.

zo/ sees nn.Modules, named parameters and loss closures; it knows nothing of OPT or RoBERTa, and
imports nothing of data/, models/ or the program (program/): files on disk are the program's.

    rng.py         z(seed, key(name), global index): counter-based hash + Box-Muller / Rademacher;
                   SeedStream, the seeds of a run's z
    kernels.py     fused compiled kernels: p += s*z, p -= lr*(g*z + wd*p), optionally z masked by
                   |p| <= h
    perturb.py     parameter slots (tied = one slot, owners, LocalView), the exact-restore hooks
                   and ExactRestore, the library's default perturbation; StepScalar (per-step
                   device values)
    paired.py      the paired step: +eps and -eps forwards as one over 2B rows, z once (Paired,
                   PairedLoss: the loss closure that scores both halves); train.py's default
    reference.py   InPlace: the original's torch.manual_seed + torch.normal operations ("reference")
    mezo.py        MeZOConfig, MeZO: zo_step / zo_perturb_parameters / zo_forward / zo_update, and
                   the step's host parts begin_step / finish_step
    methods.py     the registry of estimators, update rules, directions; check_supported
    spsa.py        estimator: MeZO's two-sided SPSA and n-SPSA (the default)
    fzoo.py        estimator: FZOO, N one-sided Rademacher perturbations + one clean forward
    directions.py  direction: dense normal / Rademacher z
    sparse.py      direction: Sparse-MeZO's per-parameter magnitude mask, inside the fused kernels
    updates.py     update rules: fused ZO-SGD, torch optimizers (each owns its state_dict)
    graphs.py      CudaGraphStep: the step captured as CUDA graphs, replayed per batch shape
    variants.py    control variates of the variance-modified variants (medium_models)
    optim.py       lr and n-SPSA schedules, the weight-decay rule (MeZO and FO), torch optimizers
    fo.py          FOConfig, FO: the backprop baseline with the same interface
    replay.py      replay: logged (step, seed, projected_grad, lr) updates applied to base weights
    shares.py      DirectionShare: a rank's share of the step's z, and the gather of the losses
    distributed.py torchrun setup, replicated (two-scalar all-reduce) and FSDP2 sharded MeZO, the
                   mesh of direction groups x data shards (--parallel directions)

Training loop (train.py; the trajectory log is program/trajectory.py's, any object with
`append(step, seed, projected_grad, lr)` will do); nothing returned syncs with the host:

    cfg = MeZOConfig(lr=1e-6, eps=1e-3, lr_scheduler="constant", max_steps=20000)
    mezo = MeZO(model, cfg, trajectory=trajectory)          # after freezing (LoRA / prefix)
    mezo.load_state_dict(state)                             # on resume: step, seed RNG, optimizer
    for batch in batches:
        loss_fn = lambda m: batch_loss(m, batch)            # data.batch_loss: the batch's task loss
        loss, projected_grad = mezo.zo_step(model, loss_fn)  # L(theta + eps z), (L+ - L-) / (2 eps)
        mezo.zo_update(model)                                # lr = schedule(global_step), step += 1
    state = mezo.state_dict()                                # next to the weights in a checkpoint

`trainer.step(model, loss_fn) -> loss` (zo_step + zo_update) is the interface MeZO and FO share,
with `global_step`, `learning_rate()`, `state_dict()` and `load_state_dict()`. Gradient
accumulation: pass a list of micro-batch closures as loss_fn (one z, losses averaged, one update).
Variants: c is initialised at the first step; with cfg.recompute_norms the loop calls
mezo.initialize_c(model, loss_fn) at each epoch start. Replay: replay(base_model, records, cfg)
rebuilds the trained weights bitwise (same device and perturbation mode).

CUDA graphs (one process, ZO-SGD): `graphed = CudaGraphStep(mezo, model, loss_of_batch)`, then
`loss = graphed(batch)` per step is zo_step + zo_update, replayed as one CUDA graph per batch shape.

Distributed wrappers plug in through MeZO(model, config, local_view=..., reduce_losses=...):
- reduce_losses(t) gets the stacked [loss1, loss2] once per z, where each rank's losses are its
  TERMS of the global batch's loss (already weighted by its share of the global normaliser), and
  returns their SUM over ranks (zo/distributed.py `Dist.reduce_losses`: one all_reduce(SUM)): the
  only communication of a replicated step. Not an average: the terms are divided once, by the global
  count.
- local_view(t) -> (local tensor, global flat offset of its first element) for a stored parameter or
  its gradient: with FSDP2, (t.to_local(), offset from compute_local_shape_and_global_offset), so
  the update writes the local shard with the z of its global indices. The forward hooks need
  nothing: they perturb the transient all-gathered tensor at offset 0 inside FSDP's unshard/reshard.

- share=DirectionShare(group, groups, gather) (zo/shares.py): the rank evaluates only its group's
  seeds of each step, and `gather` (`Dist.gather_losses`: one all-gather) hands every rank every
  group's losses; all ranks then apply the same N updates (`--parallel directions`).

Errors: bad configuration raises ValueError; a failing torch.compile raises RuntimeError naming
perturbation="eager" (the uncompiled debugging path).
"""

from .fo import FO, FOConfig
from .graphs import CudaGraphStep
from .kernels import get_kernels
from .methods import check_supported
from .mezo import MeZO, MeZOConfig
from .optim import learning_rate, num_samples
from .paired import PairedLoss
from .perturb import LocalView, ParamSlot, collect_slots, whole
from .replay import replay
from .rng import name_key
from .shares import DirectionShare

__all__ = [
    "CudaGraphStep",
    "DirectionShare",
    "FO",
    "check_supported",
    "FOConfig",
    "LocalView",
    "MeZO",
    "MeZOConfig",
    "PairedLoss",
    "ParamSlot",
    "collect_slots",
    "get_kernels",
    "learning_rate",
    "name_key",
    "num_samples",
    "replay",
    "whole",
]
