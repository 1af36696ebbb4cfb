"""What CUDA graphs need from the step, checked on the CPU (zo/graphs.py; the captured step itself
runs in tests/test_cuda.py): the captured region turns no per-step Python value into a tensor, the
per-step tensors keep their storage, the graph's step functions are MeZO.step, and unsupported runs
are refused with a clear ValueError."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from program.trajectory import Trajectory
from tests.helpers.zo import least_squares, lm_batch, lm_loss, params, tiny_lm
from zo import MeZO, MeZOConfig, graphs

# a tensor from a host value
FACTORIES = ("aten.full", "aten.scalar_tensor", "aten.lift_fresh", "aten.tensor")


class OpTrace(TorchDispatchMode):
    """Every ATen op with its non-tensor arguments (what a CUDA graph bakes in) and output
    shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        constants = tuple(
            x
            for x in tree_leaves((args, kwargs))
            if not isinstance(x, (torch.Tensor, torch.UntypedStorage))
        )
        self.ops.append((str(func), constants))
        return out


def captured_region(mezo, model, loss_fn) -> list:
    """The ops of one graphed step's device part (what CudaGraphStep captures), eager kernels so
    that every op is visible."""
    seeds = mezo.begin_step(model)
    with OpTrace() as trace:
        _, g = graphs.step_on_device(mezo, model, loss_fn, seeds)
    mezo.finish_step([(seeds[0], g)])
    return trace.ops


def test_captured_region_bakes_in_no_per_step_value():
    model, ids = tiny_lm(), lm_batch()
    mezo = MeZO(
        model,
        MeZOConfig(
            perturbation="eager",
            lr=1e-2,
            lr_scheduler="linear",
            max_steps=9,
            weight_decay=0.1,
            eps=1e-2,
        ),
    )
    mezo.step(model, lm_loss(ids))  # warm-up: constants cached, hooks' pool sized
    first = captured_region(mezo, model, lm_loss(ids))
    seeds_lrs = [(mezo.zo_random_seed, mezo.lr.value)]
    second = captured_region(mezo, model, lm_loss(ids))
    seeds_lrs.append((mezo.zo_random_seed, mezo.lr.value))
    assert seeds_lrs[0][0] != seeds_lrs[1][0] and seeds_lrs[0][1] != seeds_lrs[1][1]
    # same ops, same constants: one graph replays both steps
    assert len(first) > 100 and first == second
    created = [op for op, _ in first if op.startswith(FACTORIES)]
    assert created == []  # and no tensor is made from a host value at all


def test_step_scalars_keep_their_storage_and_change_value():
    model, ids = tiny_lm(), lm_batch()
    mezo = MeZO(model, MeZOConfig(lr=1e-2, lr_scheduler="linear", max_steps=9, weight_decay=0.1))
    exact = mezo.perturbation
    persistent = lambda: [mezo.seed.tensor, mezo.lr.tensor, exact.finite, exact.lr_applied]  # noqa: E731
    mezo.step(model, lm_loss(ids))
    ptrs, values = [t.data_ptr() for t in persistent()], [t.clone() for t in persistent()]
    consts = {k: v.data_ptr() for k, v in exact.consts.items()}
    for _ in range(3):
        mezo.step(model, lm_loss(ids))
        assert [t.data_ptr() for t in persistent()] == ptrs
        # nothing new after warm-up
        assert {k: v.data_ptr() for k, v in exact.consts.items()} == consts
    assert int(mezo.seed.tensor) == mezo.zo_random_seed and not torch.equal(
        mezo.seed.tensor, values[0]
    )
    assert float(mezo.lr.tensor) == pytest.approx(mezo.lr.value) and not torch.equal(
        mezo.lr.tensor, values[1]
    )


@pytest.mark.parametrize("keep_pool", [False, True])
def test_hooks_keep_their_buffers_only_when_asked(keep_pool):
    model, ids = tiny_lm(), lm_batch()
    mezo = MeZO(model, MeZOConfig(lr=1e-3))
    hooks = mezo.perturbation.hooks
    hooks.keep_pool = keep_pool
    mezo.step(model, lm_loss(ids))
    pool = {k: [b.data_ptr() for b in v] for k, v in hooks.pool.items()}
    assert bool(pool) == keep_pool  # the default drops the buffers at the end of a step
    mezo.step(model, lm_loss(ids))
    if keep_pool:  # the same addresses at every step, as a replayed graph needs
        assert {k: sorted(v) for k, v in pool.items()} == {
            k: sorted(b.data_ptr() for b in v) for k, v in hooks.pool.items()
        }


def test_graph_step_functions_are_mezo_step(tmp_path):
    """MeZO.begin_step + step_on_device + MeZO.finish_step (what CudaGraphStep runs around a replay)
    == MeZO.step,
    bitwise, trajectory included."""
    batches = [lm_batch(seed=s) for s in range(4)]
    cfg = MeZOConfig(lr=1e-2, eps=1e-2, weight_decay=0.1, lr_scheduler="linear", max_steps=6)
    runs = {}
    for how in ("step", "graph_functions"):
        model = tiny_lm()
        trajectory = Trajectory(tmp_path / f"{how}.jsonl", keep_before_step=0)
        mezo = MeZO(model, cfg, trajectory=trajectory)
        losses = []
        for ids in batches:
            if how == "step":
                losses.append(mezo.step(model, lm_loss(ids)))
            else:
                seeds = mezo.begin_step(model)
                loss, g = graphs.step_on_device(mezo, model, lm_loss(ids), seeds)
                mezo.finish_step([(seeds[0], g)])
                losses.append(loss)
        trajectory.flush()
        runs[how] = (
            params(model),
            torch.stack(losses),
            trajectory.path.read_text(),
            mezo.global_step,
        )
    (w1, l1, t1, s1), (w2, l2, t2, s2) = runs.values()
    assert torch.equal(l1, l2) and t1 == t2 and s1 == s2 == 4 and len(t1.splitlines()) == 4
    assert all(torch.equal(w1[n], w2[n]) for n in w1)


@pytest.mark.parametrize(
    "cfg,why",
    [
        (
            dict(perturbation="reference"),
            "unsupported combination: perturbation=reference does not support CUDA graphs",
        ),
        (
            dict(optimizer="adam"),
            "unsupported combination: optimizer=adam does not support CUDA graphs",
        ),
        (
            dict(n_spsa=2),
            "unsupported combination: estimator=spsa with n_spsa=2 does not support CUDA graphs",
        ),
        (
            dict(estimator="fzoo"),
            "unsupported combination: estimator=fzoo with fzoo_n=8 does not support CUDA graphs",
        ),
        (
            dict(sparse_mezo=0.5),
            "unsupported combination: sparse_mezo=0.5 does not support CUDA graphs",
        ),
        (
            dict(zo_variant="param_norm"),
            "unsupported combination: zo_variant=param_norm does not support CUDA graphs",
        ),
        (dict(), "no CUDA device" if not torch.cuda.is_available() else None),
    ],
)
def test_cuda_graph_step_refuses_what_it_cannot_capture(cfg, why):
    model, loss_fn = least_squares()
    mezo = MeZO(model, MeZOConfig(**cfg))
    if why is None:  # with CUDA, a CPU model is the refused case
        why = "no CUDA device"
    with pytest.raises(ValueError, match=f"cannot be captured as a CUDA graph: {why}"):
        graphs.CudaGraphStep(mezo, model, lambda m, batch: loss_fn(m))
    replicated = MeZO(model, MeZOConfig(), reduce_losses=lambda t: t)
    with pytest.raises(ValueError, match="CUDA graphs run in a single process"):
        graphs.CudaGraphStep(replicated, model, lambda m, batch: loss_fn(m))


def test_one_graph_per_batch_shape_and_tensors_only():
    ids = lm_batch(n=4, t=16)
    key = graphs.batch_key({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert key == graphs.batch_key({"attention_mask": torch.zeros_like(ids), "input_ids": ids + 1})
    assert key != graphs.batch_key(
        {"input_ids": ids[:, :8], "attention_mask": torch.ones_like(ids[:, :8])}
    )
    with pytest.raises(ValueError, match="tensors only"):
        graphs.batch_key({"input_ids": ids, "gold": [["an answer"]] * 4})
