"""The MeZO step: hooks vs dense perturbation, exact restore, fused vs dense update, faithfulness to
the original formulas, unbiasedness and convergence."""

import copy
import warnings

import pytest
import torch
from torch import nn

from tests.helpers.original import OriginalStep
from tests.helpers.zo import (
    NORMAL_Z_IMPL_BOUND,
    Z_MAX,
    dense_z,
    least_squares,
    lm_batch,
    lm_loss,
    params,
    perturbed_loss_tolerance,
    tiny_lm,
)
from zo import MeZO, MeZOConfig


@pytest.mark.parametrize("sign", [1, -1])
def test_hooked_forward_equals_dense_perturbed_model(sign):
    model, ids = tiny_lm(), lm_batch()
    eps, seed = 1e-2, 4242
    mezo = MeZO(model, MeZOConfig(eps=eps))
    before = params(model)
    mezo.zo_random_seed = seed
    mezo.zo_perturb_parameters(scaling_factor=sign)
    hooked = mezo.zo_forward(model, lm_loss(ids))
    mezo.zo_perturb_parameters(scaling_factor=-sign)
    assert not mezo.perturbation.hooks.handles
    for n, p in model.named_parameters():  # the forward never wrote the stored weights
        assert torch.equal(p, before[n]), n

    dense = copy.deepcopy(model)  # keeps the tie: lm_head.weight is embed_tokens.weight
    for slot, p in zip(mezo.slots, (p for p in dense.parameters() if p.requires_grad)):
        p.data = p.data + sign * eps * dense_z(slot, seed)
    assert dense.lm_head.weight is dense.embed_tokens.weight
    expected = mezo.zo_forward(dense, lm_loss(ids))
    # derived in tests/helpers/zo.py
    tol = perturbed_loss_tolerance(copy.deepcopy(model), lm_loss(ids), eps)
    assert (hooked - expected).abs() <= tol

    # the oracle can tell a missed owner apart: perturbing the embedding but not the tied head
    # differs
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    for slot, p in zip(
        mezo.slots, (p for n, p in untied.named_parameters() if n != "lm_head.weight")
    ):
        p.data = p.data + sign * eps * dense_z(slot, seed)
    assert (hooked - mezo.zo_forward(untied, lm_loss(ids))).abs() > tol


def test_warns_when_a_parameter_is_read_outside_its_module():
    """nn.MultiheadAttention reads out_proj.weight in its own forward, never calling out_proj: the
    hooks cannot show that parameter perturbed, and the first step says so."""
    mha, x = nn.MultiheadAttention(8, 2), torch.randn(3, 1, 8)
    with pytest.warns(UserWarning, match="out_proj.weight"):
        MeZO(mha).step(mha, lambda m: m(x, x, x)[0].sum())
    model, ids = tiny_lm(), lm_batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="trainable parameters never perturbed")
        MeZO(model).step(model, lm_loss(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr0_step_restores_bitwise(dtype):
    model, ids = tiny_lm(dtype), lm_batch()
    before = params(model)
    mezo = MeZO(model, MeZOConfig(lr=0.0, eps=1e-2, weight_decay=0.1))
    for _ in range(3):
        loss, g = mezo.step(model, lm_loss(ids)), mezo.projected_grad
        assert torch.isfinite(loss) and g.abs() > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_mode_drifts_in_half_precision(dtype):
    """Why exact restore matters: the original's +1, -2, +1 in-place sequence rounds three times in
    the weight dtype, so even with lr=0 the weights random-walk (behind the original's fp16
    divergences)."""
    model, ids = tiny_lm(dtype), lm_batch()
    before = params(model)
    mezo = MeZO(model, MeZOConfig(lr=0.0, eps=1e-2, perturbation="reference"))
    for _ in range(3):
        mezo.step(model, lm_loss(ids))
    changed = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert changed > 0


def test_fused_update_equals_dense_update():
    model = tiny_lm()
    lr, wd, seed = 1e-2, 0.1, 777
    mezo = MeZO(model, MeZOConfig(lr=lr, weight_decay=wd))
    before = params(model)
    g = torch.tensor(3.25)
    mezo.apply_update([(seed, g)], lr)
    for slot in mezo.slots:
        p0 = before[slot.name]
        expected = p0 - lr * (g * dense_z(slot, seed) + (wd if slot.decay else 0.0) * p0)
        # eager vs compiled z moves g z by |g| NORMAL_Z_IMPL_BOUND; each side rounds g z, the decay
        # term and the subtraction (3 roundings of at most u times the largest operand)
        bound = lr * g.abs() * NORMAL_Z_IMPL_BOUND + 3 * 2.0**-24 * (
            p0.abs().max() + lr * g.abs() * Z_MAX
        )
        assert (slot.param.detach() - expected).abs().max() <= bound, slot.name
        assert not torch.equal(slot.param.detach(), p0)
    assert [s.decay for s in mezo.slots] == [
        not any(x in s.name for x in ("bias", "layer_norm", "layernorm")) for s in mezo.slots
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_mode_equals_original_transcription(dtype):
    ids = lm_batch()
    lr, eps, wd, steps = 1e-2, 1e-2, 0.1, 4
    ours, theirs = tiny_lm(dtype), tiny_lm(dtype)
    mezo = MeZO(
        ours,
        MeZOConfig(
            lr=lr,
            eps=eps,
            weight_decay=wd,
            perturbation="reference",
            seed=42,
            seed_source="numpy_global",
        ),
    )
    our_losses = [mezo.step(ours, lm_loss(ids)) for _ in range(steps)]
    their_losses = list(OriginalStep(lr, eps, wd).run(theirs, [lm_loss(ids)] * steps, seed=42))
    assert torch.equal(torch.stack(our_losses), torch.stack(their_losses))
    assert theirs.lm_head.weight is theirs.embed_tokens.weight
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), n


class Quadratic(nn.Module):
    def __init__(self, a, b, theta):
        super().__init__()
        self.a, self.b = a, b
        self.theta = nn.Parameter(theta.clone())

    def forward(self):
        return 0.5 * self.theta @ self.a @ self.theta + self.b @ self.theta


def test_projected_grad_times_z_is_unbiased():
    """E[g z] = grad: measured on the update itself (lr=1: theta0 - theta1 = g z), so the
    perturbation
    and the update must draw the same z."""
    gen = torch.Generator().manual_seed(0)
    d, n = 6, 2000
    m = torch.randn(d, d, generator=gen)
    a, b, theta0 = (
        m @ m.T / d + torch.eye(d),
        torch.randn(d, generator=gen),
        torch.randn(d, generator=gen),
    )
    model = Quadratic(a, b, theta0)
    grad = a @ theta0 + b
    mezo = MeZO(model, MeZOConfig(lr=1.0, eps=1e-2, seed=1))
    samples = torch.empty(n, d)
    for i in range(n):
        mezo.step(model, lambda mod: mod())
        samples[i] = theta0 - model.theta.detach()
        with torch.no_grad():
            model.theta.copy_(theta0)
    mean = samples.double().mean(0)
    # Var(z_i z.grad) = |grad|^2 + grad_i^2 for Gaussian z (exact central difference on a quadratic)
    sd = torch.sqrt((grad.double().square().sum() + grad.double().square()) / n)
    assert ((mean - grad.double()).abs() < 4.5 * sd).all(), (mean, grad)
    assert (grad.abs() > 4.5 * sd.float()).any()  # the bound is tight enough to see the gradient


def test_zo_sgd_converges_on_least_squares():
    model, loss_fn = least_squares()
    start = loss_fn(model).item()
    mezo = MeZO(model, MeZOConfig(lr=0.02, eps=1e-3, seed=0))
    for _ in range(300):
        mezo.step(model, loss_fn)
    assert loss_fn(model).item() < start / 20
