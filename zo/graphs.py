"""The MeZO step captured as CUDA graphs (`--cuda_graphs`).

A step of MeZO on a small model is mostly Python: at RoBERTa-large size about 200 modules x 2 hooks x
2 forwards, plus the loss and the update loop, launch kernels that each run for microseconds. A CUDA
graph records those launches once and replays them with one call. Per batch shape, one graph holds
the two perturbed forwards, the projected gradient and the update pass:

    graphed = CudaGraphStep(mezo, model, loss_of_batch)     # loss_of_batch(model, batch) -> 0-d loss
    for batch in batches:                                   # dict of CUDA tensors (or CPU: copied)
        loss = graphed(batch)                               # = mezo.step(model, lambda m: loss_of_batch(m, batch))

A replay reads everything that changes between steps from persistent device memory written before
it: the seed and the learning rate (MeZO's StepScalar tensors), and the batch (input buffers of the
graph, one set per shape). Nothing inside the captured region turns a Python value that changes per
step into a tensor (that would bake the capture's value into every replay; StepScalar refuses it).
The forward hooks' transient buffers are kept for the graphs' lifetime (PerturbHooks.keep_pool).

The first batch of a shape runs as an ordinary eager step (it also compiles the kernels and warms
the allocator), then the graph is captured; later batches of that shape replay it. The collator
pads to a multiple of 8 tokens, so a run meets only a handful of shapes; all graphs share one
memory pool. The trajectory log, the step counter and resume are those of the MeZO object: a
replay is the eager step, bitwise (tests/test_cuda.py).

Supported: ZO-SGD with exact restore (fused or eager kernels) and weight decay, one z and one batch
per step (no n-SPSA, no gradient accumulation), in a single process. Anything else raises ValueError
at construction; a loss that syncs with the host (a non-differentiable objective) at its first capture.
"""
from typing import Callable

import torch
from torch import nn

from .mezo import MeZO
from .perturb import whole

LossOfBatch = Callable[[nn.Module, dict], torch.Tensor]


def unsupported(mezo: MeZO, model: nn.Module) -> str | None:
    """Why this MeZO run cannot be captured, or None."""
    cfg = mezo.cfg
    if cfg.perturbation == "reference":
        return "perturbation=reference draws torch.normal after torch.manual_seed on the host"
    if cfg.optimizer != "sgd":
        return f"optimizer={cfg.optimizer} steps a torch optimizer from host code"
    if cfg.n_spsa != 1:
        return f"n_spsa={cfg.n_spsa} (one z per step only)"
    if cfg.zo_variant is not None:
        return f"zo_variant={cfg.zo_variant} (its control variates come from a backward pass)"
    if mezo.reduce_losses is not None or mezo.local_view is not whole or \
            any(hasattr(p, "device_mesh") for p in model.parameters()):
        return "data-parallel or FSDP training (single process only)"
    if mezo.device.type != "cuda" or not torch.cuda.is_available():
        return f"no CUDA device (the model is on {mezo.device})"
    return None


def batch_key(batch: dict[str, torch.Tensor]) -> tuple:
    """The graph a batch replays: one per set of (name, shape, dtype). Values must be tensors:
    anything else would be baked into the graph at its capture."""
    if not all(isinstance(t, torch.Tensor) for t in batch.values()):
        raise ValueError(f"a graphed step's batch holds tensors only ({sorted(batch)})")
    return tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in batch.items()))


def begin_step(mezo: MeZO) -> tuple[int, float]:
    """Host part before the device work: draw the seed, schedule the lr, write both to the device."""
    mezo.zo_random_seed = mezo.seeds.next()
    lr = mezo.learning_rate()
    mezo.lr.set(lr)
    return mezo.zo_random_seed, lr


def step_on_device(mezo: MeZO, model: nn.Module, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """What a graph captures: MeZO.zo_step's estimate and zo_update's update, with the seed and lr
    already written (so nothing here writes a per-step value)."""
    loss1, projected_grad = mezo.zo_estimate(model, loss_fn)
    mezo.apply_update([(mezo.zo_random_seed, projected_grad)], mezo.lr.value)
    return loss1, projected_grad


def end_step(mezo: MeZO, seed: int, lr: float, projected_grad: torch.Tensor) -> None:
    """Host part after the device work: the state MeZO.zo_step and zo_update leave behind."""
    mezo.projected_grad = projected_grad
    mezo.estimates = [(seed, projected_grad)]
    if mezo.trajectory is not None:
        mezo.trajectory.append(mezo.global_step, seed, projected_grad, lr)
    mezo.global_step += 1


class CudaGraphStep:
    def __init__(self, mezo: MeZO, model: nn.Module, loss_of_batch: LossOfBatch):
        why = unsupported(mezo, model)
        if why is not None:
            raise ValueError(f"the MeZO step cannot be captured as a CUDA graph: {why}")
        self.mezo, self.model, self.loss_of_batch = mezo, model, loss_of_batch
        mezo.perturbation.hooks.keep_pool = True
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, tuple]] = {}

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One MeZO step (zo_step + zo_update) on `batch`; returns loss1, a 0-d device tensor."""
        key = batch_key(batch)
        seed, lr = begin_step(self.mezo)
        if key in self.graphs:
            graph, inputs, outputs = self.graphs[key]
            for name, t in batch.items():
                inputs[name].copy_(t, non_blocking=True)
            graph.replay()
            loss1, projected_grad = (t.clone() for t in outputs)  # the next replay overwrites outputs
        else:
            loss1, projected_grad = self._eager_then_capture(key, batch)
        if self.mezo.global_step == 0:
            self.mezo.warn_unseen_parameters()
        end_step(self.mezo, seed, lr, projected_grad)
        return loss1

    def _eager_then_capture(self, key: tuple, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.mezo.device
        inputs = {name: t.to(device, copy=True) for name, t in batch.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # this step's real work, eagerly (warm-up before a capture)
            loss1, projected_grad = step_on_device(self.mezo, self.model, self._loss_fn(inputs))
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = step_on_device(self.mezo, self.model, self._loss_fn(inputs))
        except RuntimeError as e:
            raise ValueError("the MeZO step cannot be captured as a CUDA graph: the loss or the model syncs "
                             f"with the host (e.g. a non-differentiable objective) ({e})") from e
        self.graphs[key] = (graph, inputs, outputs)
        return loss1.clone(), projected_grad.clone()

    def _loss_fn(self, inputs: dict):
        return lambda model: self.loss_of_batch(model, inputs)
