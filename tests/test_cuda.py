"""The GPU claims, on a CUDA device (skipped without one; `make gpu-check` runs them): z on CUDA
equals z on the CPU, exact restore in half precision, no host sync in a step, FSDP2 over NCCL
with bf16
compute against the unsharded step, and the step captured as CUDA graphs against the eager step."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from program.trajectory import Trajectory
from tests.helpers.zo import (
    NORMAL_Z_IMPL_BOUND,
    Z_MAX,
    lm_batch,
    lm_loss,
    normal_z_error,
    normal_z_exact_error,
    params,
    tiny_lm,
)
from zo import CudaGraphStep, MeZO, MeZOConfig, name_key
from zo.kernels import get_kernels
from zo.rng import NORMAL_Z, normal, rademacher

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def T(v, dtype=torch.int64, device="cuda"):
    return torch.full((), v, dtype=dtype, device=device)


def compiled_z(dist, seed, key, n, device, normal_z="poly_cos"):
    z = torch.zeros(n, device=device)
    get_kernels(dist, normal_z=normal_z).perturb_(
        z,
        seed=T(seed, device=device),
        key=T(key, device=device),
        offset=T(777, device=device),
        scale=T(1.0, torch.float32, device),
    )
    return z.cpu()


@pytest.mark.parametrize("normal_z", NORMAL_Z)
def test_z_on_cuda_equals_z_on_cpu(normal_z):
    """Rademacher: bitwise (a function of the integer hash). Normal: each side within its derived
    error (tests.helpers.zo: normal_z_error for the library's cos, CUDA's logf 1 ulp, cosf 2 ulp
    (CUDA C Programming Guide, mathematical functions); normal_z_exact_error for the polynomial,
    whose bound holds with fused multiply-adds, which only drop roundings; sqrt taken as 1 ulp in
    case Triton's is not correctly rounded), compiled and eager on CUDA; an off-by-one offset
    breaks the same bound."""
    n, key = 1 << 20, name_key("decoder.layers.3.fc2.weight")
    for seed in (0, 999_999_999):
        assert torch.equal(
            compiled_z("rademacher", seed, key, n, "cuda"),
            compiled_z("rademacher", seed, key, n, "cpu"),
        )
        assert torch.equal(
            rademacher(T(seed), T(key), T(777), n, "cuda").cpu(),
            rademacher(T(seed, device="cpu"), T(key, device="cpu"), T(777, device="cpu"), n, "cpu"),
        )
        cpu = compiled_z("normal", seed, key, n, "cpu", normal_z)
        bound = (  # the library's cos takes the same fp32 argument on both
            NORMAL_Z_IMPL_BOUND / 2 + normal_z_error(cos_ulp=2, sqrt_ulp=1)
            if normal_z == "library_cos"
            else normal_z_exact_error(normal_z) + normal_z_exact_error(normal_z, sqrt_ulp=1)
        )
        for cuda in (
            compiled_z("normal", seed, key, n, "cuda", normal_z),
            normal(T(seed), T(key), T(777), n, "cuda", normal_z).cpu(),
        ):
            assert (cuda - cpu).abs().max().item() <= bound
        # an off-by-one breaks it
        assert (cuda[:-1] - cpu[1:]).abs().max().item() > NORMAL_Z_IMPL_BOUND


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lr0_step_restores_bitwise_on_cuda(dtype):
    model, ids = tiny_lm(dtype).cuda(), lm_batch().cuda()
    before = params(model)
    mezo = MeZO(model, MeZOConfig(lr=0.0, eps=1e-2, weight_decay=0.1))
    for _ in range(3):
        loss = mezo.step(model, lm_loss(ids))
        assert torch.isfinite(loss) and mezo.projected_grad.abs() > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_no_host_sync_in_a_step():
    model, graph_model, ids = tiny_lm().cuda(), tiny_lm().cuda(), lm_batch().cuda()
    cfg = MeZOConfig(lr=1e-3, weight_decay=0.1, lr_scheduler="linear", max_steps=9)
    mezo = MeZO(model, cfg)
    graphed = CudaGraphStep(
        MeZO(graph_model, cfg), graph_model, lambda m, batch: lm_loss(batch["ids"])(m)
    )
    mezo.step(model, lm_loss(ids))  # compile outside the checked region
    graphed({"ids": ids})  # eager step + capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, g = mezo.zo_step(model, lm_loss(ids))
        mezo.zo_update(model)
        graphed_loss = graphed({"ids": ids})  # a replay
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.is_cuda and g.is_cuda and graphed_loss.is_cuda


def batches(steps=20):
    """Two padded lengths (two graphs), alternating irregularly."""
    return [{"ids": lm_batch(n=4, t=9 if i % 3 else 17, seed=i).cuda()} for i in range(steps)]


def run_graphed(model, mezo, data):
    graphed = CudaGraphStep(mezo, model, lambda m, batch: lm_loss(batch["ids"])(m))
    return [graphed(b) for b in data], graphed


def test_captured_steps_equal_eager_steps_bitwise_with_trajectory_and_resume(tmp_path):
    cfg = MeZOConfig(lr=1e-2, eps=1e-2, weight_decay=0.1, lr_scheduler="linear", max_steps=20)
    data = batches()
    runs = {}
    for how in ("eager", "graphed"):
        model = tiny_lm().cuda()
        trajectory = Trajectory(tmp_path / f"{how}.jsonl", keep_before_step=0)
        mezo = MeZO(model, cfg, trajectory=trajectory)
        if how == "eager":
            losses = [mezo.step(model, lm_loss(b["ids"])) for b in data]
        else:
            losses, graphed = run_graphed(model, mezo, data)
            assert len(graphed.graphs) == 2
        trajectory.flush()
        runs[how] = (params(model), torch.stack(losses).cpu(), trajectory.path.read_text())
    (w_eager, l_eager, t_eager), (w_graph, l_graph, t_graph) = runs["eager"], runs["graphed"]
    assert torch.equal(l_eager, l_graph) and t_eager == t_graph and len(t_graph.splitlines()) == 20
    assert all(torch.equal(w_eager[n], w_graph[n]) for n in w_eager)

    # resume at step 10: a fresh model, MeZO and set of graphs continue bitwise
    model = tiny_lm().cuda()
    mezo = MeZO(model, cfg)
    run_graphed(model, mezo, data[:10])
    state, weights = copy.deepcopy(mezo.state_dict()), copy.deepcopy(model.state_dict())
    resumed = tiny_lm().cuda()
    resumed.load_state_dict(weights)
    again = MeZO(resumed, cfg)
    again.load_state_dict(state)
    losses, _ = run_graphed(resumed, again, data[10:])
    assert torch.equal(torch.stack(losses).cpu(), l_eager[10:])
    assert all(torch.equal(p, w_eager[n]) for n, p in resumed.named_parameters())


def test_fsdp2_nccl_bf16_step_equals_the_unsharded_step(monkeypatch):
    """World size 1 over NCCL, fp32 master shards with bf16 compute. The unsharded oracle: the same
    step on a bf16 copy (FSDP's all-gathered bf16 parameters are those numbers) gives loss1 and g;
    the update goes to the fp32 weights. Losses agree to bf16 summation order; the weights then
    within
    lr * |dg| * max|z| plus one rounding."""
    from zo import distributed as zd

    for var, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }.items():
        monkeypatch.setenv(var, value)
    d = zd.setup(timeout_s=60, device="cuda")
    try:
        cfg = MeZOConfig(lr=1e-2, eps=1e-2, weight_decay=0.1, seed=3)
        ids = lm_batch().cuda()
        plain, initial = tiny_lm().cuda(), params(tiny_lm().cuda())
        sharded = zd.shard_model(copy.deepcopy(plain), d, mixed_precision=True)
        mezo = MeZO(sharded, cfg, local_view=zd.local_view, reduce_losses=d.reduce_losses)
        loss, g = mezo.zo_step(sharded, lm_loss(ids))
        mezo.zo_update(sharded)

        half = copy.deepcopy(plain).to(torch.bfloat16)
        oracle = MeZO(half, cfg)
        ref_loss, ref_g = oracle.zo_step(half, lm_loss(ids))
        MeZO(plain, cfg).apply_update([(oracle.zo_random_seed, ref_g)], cfg.lr)
        assert mezo.zo_random_seed == oracle.zo_random_seed
        # Both sides run bf16 forwards of the same bf16 weights (FSDP at world size 1 all-gathers
        # them unchanged); only reduction order may differ, each side within about one bf16 unit (u
        # = 2^-8) of the fp32 value.
        assert torch.allclose(loss, ref_loss.float(), rtol=2 * 2.0**-8, atol=0)
        full = zd.full_state_dict(sharded)
        bound = cfg.lr * (g - ref_g).abs().item() * Z_MAX
        for name, p in plain.named_parameters():
            assert not torch.equal(p, initial[name]), name  # the step moved it
            err = (full[name].cuda() - p).abs()
            assert (err <= bound + 2 * torch.finfo(torch.float32).eps * p.abs()).all(), name
    finally:
        d.shutdown()


def test_sharded_z_is_the_whole_z_on_cuda():
    key, n = name_key("w"), 100_003
    whole = compiled_z("normal", 5, key, n, "cuda")
    z = torch.zeros(n - 50_001, device="cuda")
    get_kernels("normal").perturb_(
        z, seed=T(5), key=T(key), offset=T(777 + 50_001), scale=T(1.0, torch.float32)
    )
    assert torch.equal(z.cpu(), whole[50_001:])


def test_graphed_step_over_a_real_loss_shape():
    """The captured step with padding: a masked token-mean loss over a left-padded batch (what
    train.py's collator produces), two shapes, equals the eager step."""

    def masked_loss(m, batch):
        logits = m(batch["ids"][:, :-1]).float()
        targets = batch["ids"][:, 1:].masked_fill(batch["mask"][:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    data = []
    for i in range(6):
        ids = lm_batch(n=3, t=8 if i % 2 else 16, seed=i).cuda()
        mask = torch.ones_like(ids)
        mask[0, : ids.shape[1] // 2] = 0
        data.append({"ids": ids, "mask": mask})
    cfg = MeZOConfig(lr=1e-2, eps=1e-2)
    eager_model, graph_model = tiny_lm().cuda(), tiny_lm().cuda()
    eager = MeZO(eager_model, cfg)
    graphed = CudaGraphStep(MeZO(graph_model, cfg), graph_model, masked_loss)
    for batch in data:
        assert torch.equal(eager.step(eager_model, lambda m: masked_loss(m, batch)), graphed(batch))
    assert all(
        torch.equal(p, q) for p, q in zip(eager_model.parameters(), graph_model.parameters())
    )


def test_graphs_refuse_a_loss_that_syncs():
    """Last in this file: the failed capture is the last CUDA work of the module."""
    model, ids = tiny_lm().cuda(), lm_batch().cuda()

    def neg_accuracy(m, batch):  # a non-differentiable objective: .item() is a host sync
        return torch.tensor(
            -(m(batch["ids"][:, :-1]).argmax(-1) == batch["ids"][:, 1:]).float().mean().item()
        )

    graphed = CudaGraphStep(MeZO(model, MeZOConfig(lr=1e-3)), model, neg_accuracy)
    with pytest.raises(ValueError, match="syncs with the host"):
        graphed({"ids": ids})
