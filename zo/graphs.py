"""The MeZO step captured as CUDA graphs (`--cuda_graphs`).

A step of MeZO on a small model is mostly Python: at RoBERTa-large size about 200 modules x 2 hooks
x 2 forwards, plus the loss and the update loop, launch kernels that each run for microseconds. A
CUDA graph records those launches once and replays them with one call. Per batch shape, one graph
holds the two perturbed forwards, the projected gradient and the update pass:

    graphed = CudaGraphStep(mezo, model, loss_of_batch)     # loss_of_batch(model, batch) -> 0-d
    loss for batch in batches:                                   # dict of CUDA tensors (or CPU:
    copied)
        loss = graphed(batch)                               # = mezo.step(model, lambda m:
        loss_of_batch(m, batch))

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

Supported: what zo.methods.check_supported allows with cuda_graphs=True (today ZO-SGD with exact
restore, dense z, one z per step), one batch per step (no gradient accumulation), in a single
process. Anything else raises ValueError at construction; a loss that syncs with the host (a
non-differentiable objective) at its first capture.
"""

from typing import Callable

import torch
from torch import nn

from . import methods
from .mezo import MeZO
from .perturb import whole

LossOfBatch = Callable[[nn.Module, dict], torch.Tensor]


def unsupported(mezo: MeZO, model: nn.Module) -> str | None:
    """Why this MeZO run cannot be captured, or None (the parts' limits:
    zo.methods.check_supported)."""
    sharded = mezo.local_view is not whole or any(
        hasattr(p, "device_mesh") for p in model.parameters()
    )
    try:
        methods.check_supported(
            mezo.cfg, cuda_graphs=True, fsdp=sharded, data_parallel=mezo.reduce_losses is not None
        )
    except ValueError as e:
        return str(e)
    if mezo.device.type != "cuda" or not torch.cuda.is_available():
        return f"no CUDA device (the model is on {mezo.device})"
    return None


def batch_key(batch: dict[str, torch.Tensor]) -> tuple:
    """The graph a batch replays: one per set of (name, shape, dtype). Values must be tensors:
    anything else would be baked into the graph at its capture."""
    if not all(isinstance(t, torch.Tensor) for t in batch.values()):
        raise ValueError(f"a graphed step's batch holds tensors only ({sorted(batch)})")
    return tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in batch.items()))


def step_on_device(
    mezo: MeZO, model: nn.Module, loss_fn, seeds: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a graph captures: MeZO's own zo_step and apply_update, between MeZO.begin_step (seed
    and lr already written, so nothing here writes a per-step value) and MeZO.finish_step."""
    loss, projected_grad = mezo.zo_step(model, loss_fn, seeds)
    mezo.apply_update(mezo.estimates, mezo.step_lr)
    return loss, projected_grad


class CudaGraphStep:
    """closure_of_batch(batch) -> the step's loss closure on the graph's input buffers; default
    `model -> loss_of_batch(model, batch)`. A zo.PairedLoss there captures the paired step
    (perturbation="paired": one forward over 2B rows per replay)."""

    def __init__(
        self,
        mezo: MeZO,
        model: nn.Module,
        loss_of_batch: LossOfBatch,
        closure_of_batch: Callable[[dict], Callable] | None = None,
    ):
        why = unsupported(mezo, model)
        if why is not None:
            raise ValueError(f"the MeZO step cannot be captured as a CUDA graph: {why}")
        self.mezo, self.model, self.loss_of_batch = mezo, model, loss_of_batch
        self.closure_of_batch = closure_of_batch
        mezo.perturbation.hooks.keep_pool = True
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, tuple]] = {}

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One MeZO step (zo_step + zo_update) on `batch`; returns loss1, a 0-d device tensor."""
        key = batch_key(batch)
        seeds = self.mezo.begin_step(self.model)
        if key in self.graphs:
            graph, inputs, outputs = self.graphs[key]
            for name, t in batch.items():
                inputs[name].copy_(t, non_blocking=True)
            graph.replay()
            # the next replay overwrites outputs
            loss1, projected_grad = (t.clone() for t in outputs)
        else:
            loss1, projected_grad = self._eager_then_capture(key, batch, seeds)
        self.mezo.finish_step([(seeds[0], projected_grad)])
        return loss1

    def _eager_then_capture(
        self, key: tuple, batch: dict, seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.mezo.device
        inputs = {name: t.to(device, copy=True) for name, t in batch.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # this step's real work, eagerly (warm-up before a capture)
            loss1, projected_grad = step_on_device(
                self.mezo, self.model, self._loss_fn(inputs), seeds
            )
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = step_on_device(self.mezo, self.model, self._loss_fn(inputs), seeds)
        except RuntimeError as e:
            raise ValueError(
                "the MeZO step cannot be captured as a CUDA graph: the loss or the model syncs "
                f"with the host (e.g. a non-differentiable objective) ({e})"
            ) from e
        for captured, value in zip(outputs, (loss1, projected_grad)):
            captured.copy_(value)  # MeZO's projected_grad is the graph's output: this step's value
        self.graphs[key] = (graph, inputs, outputs)
        return loss1.clone(), projected_grad.clone()

    def _loss_fn(self, inputs: dict):
        if self.closure_of_batch is not None:
            return self.closure_of_batch(inputs)
        return lambda model: self.loss_of_batch(model, inputs)
