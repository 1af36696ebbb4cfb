"""Everything on the same step: gradient accumulation, n-SPSA, schedules, momentum/Adam, the
variance-modified variants, non-differentiable objectives, the FO baseline, sync-freedom, resume."""

import copy

import pytest
import torch
from torch import nn

from tests.helpers.original import two_sided_estimate
from tests.helpers.zo import (
    dense_z,
    least_squares,
    lm_batch,
    lm_loss,
    params,
    perturbed_loss_tolerance,
    tiny_lm,
)
from zo import FO, FOConfig, MeZO, MeZOConfig, learning_rate, num_samples


def estimate(mezo, model, loss_fn, seed):
    """One two-sided estimate at a given seed, through the public step functions, in the original's
    order."""
    mezo.zo_random_seed = seed
    return two_sided_estimate(mezo, model, loss_fn, mezo.cfg.eps)[1]


def test_gradient_accumulation_equals_one_batch():
    model, ids = tiny_lm(), lm_batch(n=4)
    one, acc = MeZO(model, MeZOConfig(eps=1e-2, seed=3)), MeZO(model, MeZOConfig(eps=1e-2, seed=3))
    loss, g = one.zo_step(model, lm_loss(ids))
    # equal-size micro-batches
    loss_acc, g_acc = acc.zo_step(model, [lm_loss(ids[:2]), lm_loss(ids[2:])])
    assert one.zo_random_seed == acc.zo_random_seed
    # Same per-token losses, summed in another order: each fp32 mean of n = 32 positive terms is
    # within (n + 1) u of the exact one (Higham, Accuracy and Stability, 4.2), so they differ by 2
    # (n + 1) u |L|; g = (L+ - L-) / (2 eps) takes both losses' differences.
    tol = 2 * (ids[:, 1:].numel() + 1) * 2.0**-24 * loss.abs()
    assert (loss_acc - loss).abs() <= tol
    assert (g_acc - g).abs() <= 2 * tol / (2 * one.cfg.eps)


def test_n_spsa_averages_estimates_and_decays_once():
    model, ids = tiny_lm(), lm_batch()
    lr, wd = 1e-2, 0.1
    mezo = MeZO(model, MeZOConfig(lr=lr, eps=1e-2, weight_decay=wd, n_spsa=3, seed=5))
    before = params(model)
    mezo.zo_step(model, lm_loss(ids))
    seeds = [s for s, _ in mezo.estimates]
    assert len(set(seeds)) == 3
    single = MeZO(model, MeZOConfig(eps=1e-2))
    for seed, g in mezo.estimates:
        assert torch.allclose(3 * g, estimate(single, model, lm_loss(ids), seed), rtol=1e-6)
    mezo.zo_update(model)
    for slot in mezo.slots:
        p0 = before[slot.name]
        step = (
            sum(g * dense_z(slot, seed) for seed, g in mezo.estimates)
            + (wd if slot.decay else 0.0) * p0
        )
        assert (slot.param.detach() - (p0 - lr * step)).abs().max() <= 1e-6 * p0.abs().max(), (
            slot.name
        )


def test_linear_sample_schedule():
    # medium_models trainer.py get_num_samples: max(1, int(global_step / max_steps *
    # zero_order_sample))
    assert [num_samples(s, 4, "linear", 10) for s in range(10)] == [
        max(1, int(s / 10 * 4)) for s in range(10)
    ]
    assert num_samples(7, 4, "constant", 10) == 4
    model, ids = tiny_lm(), lm_batch()
    mezo = MeZO(model, MeZOConfig(n_spsa=4, n_spsa_schedule="linear", max_steps=10))
    counts = []
    for _ in range(6):
        mezo.step(model, lm_loss(ids))
        counts.append(len(mezo.estimates))
    assert counts == [1, 1, 1, 1, 1, 2]


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_lr_schedules_match_hugging_face(schedule):
    transformers = pytest.importorskip("transformers")
    make = {
        "constant": lambda o, w, t: transformers.get_constant_schedule_with_warmup(o, w),
        "linear": transformers.get_linear_schedule_with_warmup,
    }[schedule]
    for warmup in (0, 3):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = make(opt, warmup, 12)
        for step in range(14):
            assert learning_rate(step, 3e-4, schedule, 12, warmup) == sched.get_last_lr()[0]
            opt.step()
            sched.step()


@pytest.mark.parametrize("optimizer,momentum,lr", [("sgd", 0.9, 2e-3), ("adam", 0.0, 2e-2)])
def test_momentum_and_adam_reduce_loss(optimizer, momentum, lr):
    model, loss_fn = least_squares()
    start = loss_fn(model).item()
    cfg = dict(optimizer=optimizer, momentum=momentum, lr=lr, eps=1e-3, weight_decay=1e-4)
    mezo = MeZO(model, MeZOConfig(**cfg, seed=0))
    for _ in range(200):
        mezo.step(model, loss_fn)
    assert mezo.update_rule.optimizer.state  # the torch optimizer really ran
    # the dense g*z is freed after the update
    assert all(p.grad is None for p in model.parameters())
    assert loss_fn(model).item() < start / 5


def test_param_norm_variant_scales_perturbation_and_update():
    model, ids = tiny_lm(), lm_batch()
    eps, seed, lr = 1e-2, 99, 1e-2
    mezo = MeZO(model, MeZOConfig(eps=eps, lr=lr, zo_variant="param_norm"))
    mezo.initialize_c(model, lm_loss(ids))
    layer0 = [p for n, p in model.named_parameters() if n.startswith("layers.0.")]
    assert torch.allclose(
        mezo.cs["layers.0."], torch.sqrt(sum((p.detach() ** 2).sum() for p in layer0))
    )
    # final_layer_norm: no group, plain z
    assert set(mezo.cs) == {"embed", "layers.0.", "layers.1."}

    def c_of(slot):
        return mezo.cs[slot.group].item() if slot.group else 1.0

    # the perturbed forward sees theta + eps * z / c
    mezo.zo_random_seed = seed
    mezo.zo_perturb_parameters(scaling_factor=1)
    hooked = mezo.zo_forward(model, lm_loss(ids))
    mezo.zo_perturb_parameters(scaling_factor=-1)
    dense = copy.deepcopy(model)
    for slot, p in zip(mezo.slots, (p for p in dense.parameters() if p.requires_grad)):
        p.data = p.data + eps * dense_z(slot, seed) / c_of(slot)
    assert torch.allclose(hooked, mezo.zo_forward(dense, lm_loss(ids)), rtol=1e-6, atol=1e-6)

    # the update uses z * c (variance-modified), or plain z with change_grad_estimate
    g = torch.tensor(2.0)
    for change, factor in ((False, c_of), (True, lambda slot: 1.0)):
        mezo.cfg.change_grad_estimate = change
        before = params(model)
        mezo.apply_update([(seed, g)], lr)
        for slot in mezo.slots:
            expected = before[slot.name] - lr * g * factor(slot) * dense_z(slot, seed)
            assert torch.allclose(slot.param.detach(), expected, rtol=1e-5, atol=1e-6), slot.name


def test_grad_norm_variants():
    model, ids = tiny_lm(), lm_batch()
    loss = lm_loss(ids)(model.eval())  # the original computes c in eval mode (dropout off)
    names, tensors = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, tensors)))
    mezo = MeZO(model, MeZOConfig(zo_variant="grad_norm", lr=1e-3, eps=1e-2))
    mezo.step(model, lm_loss(ids))  # initialises c by backprop at the first step
    expected = torch.sqrt(sum((g**2).sum() for n, g in grads.items() if n.startswith("layers.1.")))
    assert torch.allclose(mezo.cs["layers.1."], expected, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())

    zo_est = MeZO(
        model, MeZOConfig(zo_variant="grad_norm", use_zo_grad_est=True, lr=1e-3, eps=1e-2)
    )
    for _ in range(2):
        assert torch.isfinite(zo_est.step(model, lm_loss(ids)))
    assert set(zo_est.cs) == {"embed", "layers.0.", "layers.1."}
    assert all(c > 0 and torch.isfinite(c) for c in zo_est.cs.values())


@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_differentiable_objective(as_tensor):
    """Any scalar objective works, e.g. minus the accuracy of argmax predictions
    (`--optimize_acc`)."""
    model, ids = tiny_lm(), lm_batch()

    hits = []  # correct next tokens per evaluation: loss1, loss2 of each step

    def neg_accuracy(m):
        correct = m(ids[:, :-1]).argmax(-1) == ids[:, 1:]
        hits.append(int(correct.sum()))
        acc = correct.float().mean().item()
        return torch.tensor(-acc) if as_tensor else -acc

    # 32 tokens, a power of two: k/32 and (k1 - k2)/32 are exact in fp32
    eps, tokens = 0.5, ids[:, 1:].numel()
    mezo = MeZO(model, MeZOConfig(lr=1e-3, eps=eps))
    losses = [mezo.zo_step(model, neg_accuracy)[0] for _ in range(3)]
    assert all(loss.dim() == 0 and loss.device == mezo.device for loss in losses)
    # loss1 = -accuracy at theta + eps z
    assert [-loss.item() * tokens for loss in losses] == hits[0::2]
    assert mezo.projected_grad.dtype == torch.float32
    assert mezo.projected_grad.item() == (hits[-1] - hits[-2]) / tokens / (2 * eps)


@pytest.mark.parametrize("optimizer,lr", [("adam", 5e-2), ("sgd", 5e-2)])
def test_fo_baseline_reduces_loss(optimizer, lr):
    model, loss_fn = least_squares()
    start = loss_fn(model).item()
    fo = FO(model, FOConfig(optimizer=optimizer, lr=lr, lr_scheduler="constant"))
    for _ in range(100):
        fo.step(model, loss_fn)
    assert model.training and fo.global_step == 100
    assert loss_fn(model).item() < start / 10


def test_fo_gradient_accumulation_equals_one_batch():
    ids = lm_batch(n=4)
    a, b = tiny_lm(), tiny_lm()
    for m in (a, b):
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    cfg = FOConfig(lr=1e-2, max_steps=5, clip_grad_norm=None)
    FO(a, cfg).step(a, lm_loss(ids))
    FO(b, cfg).step(b, [lm_loss(ids[:2]), lm_loss(ids[2:])])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), n


def test_step_returns_device_tensors_without_host_sync(monkeypatch):
    model, ids = tiny_lm(), lm_batch()
    mezo = MeZO(
        model, MeZOConfig(lr=1e-3, weight_decay=0.1, n_spsa=2, lr_scheduler="linear", max_steps=9)
    )
    mezo.step(model, lm_loss(ids))  # warm: kernels built

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync inside a step")

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    loss, g = mezo.zo_step(model, [lm_loss(ids[:2]), lm_loss(ids[2:])])
    mezo.zo_update(model)
    monkeypatch.undo()
    for t in (loss, g):
        assert isinstance(t, torch.Tensor) and t.dim() == 0 and t.device == mezo.device


@pytest.mark.parametrize(
    "cfg", [dict(optimizer="adam", lr=1e-3), dict(seed_source="numpy_global", lr=1e-2)]
)
def test_resume_continues_bitwise(cfg):
    ids = lm_batch()
    model = tiny_lm()
    mezo = MeZO(model, MeZOConfig(weight_decay=0.1, **cfg))
    for _ in range(2):
        mezo.step(model, lm_loss(ids))
    state, weights = copy.deepcopy(mezo.state_dict()), copy.deepcopy(model.state_dict())
    for _ in range(2):
        mezo.step(model, lm_loss(ids))
    resumed = tiny_lm()
    resumed.load_state_dict(weights)
    again = MeZO(resumed, MeZOConfig(weight_decay=0.1, **cfg))
    again.load_state_dict(state)
    for _ in range(2):
        again.step(resumed, lm_loss(ids))
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_bad_configuration_raises_value_error():
    for bad in (
        dict(optimizer="lion"),
        dict(lr_scheduler="linear"),
        dict(perturbation="dense"),
        dict(n_spsa=0),
        dict(zo_variant="norm"),
        dict(clip_grad_norm=1.0),
    ):
        with pytest.raises(ValueError):
            MeZOConfig(**bad)
    with pytest.raises(ValueError):
        FOConfig(optimizer="lion")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MeZO(frozen)


def test_a_non_finite_loss_skips_the_update_without_touching_the_weights():
    model, ids = tiny_lm(), lm_batch()
    before = params(model)
    mezo = MeZO(model, MeZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.1))
    loss, g = mezo.zo_step(model, lambda m: lm_loss(ids)(m) * float("nan"))
    mezo.zo_update(model)
    assert torch.isnan(g) and mezo.global_step == 1
    assert all(torch.equal(p, before[n]) for n, p in params(model).items())
    mezo.zo_step(model, lm_loss(ids))  # finite again: the update happens
    mezo.zo_update(model)
    assert not all(torch.equal(p, before[n]) for n, p in params(model).items())


# ------------------------------------------------------ each variant against its formula, densely
# The oracle materialises z with the eager formula (tests.helpers.zo.dense_z), perturbs a
# copy of the model with plain torch ops, and applies the variant's update as written in the MeZO
# paper (Appendix B) and medium_models/src/trainer.py; only the seeds are taken from the run.
# Tolerances: the hooked and the dense forwards differ by float rounding (~1e-6 of the loss), which
# 1/(2 eps) amplifies in g; the update is then checked with MeZO's own g, to 1e-5 of the step it
# made.


def dense_projected_grad(model, slots, loss_fn, seed, eps, c_of=lambda slot: 1.0):
    losses = []
    for sign in (1, -1):
        shifted = copy.deepcopy(model)
        for slot, p in zip(slots, (p for p in shifted.parameters() if p.requires_grad)):
            p.data = p.data + sign * eps * dense_z(slot, seed) / c_of(slot)
        with torch.no_grad():
            losses.append(loss_fn(shifted.eval()))
    return (losses[0] - losses[1]) / (2 * eps)


def assert_step_matches(mezo, before, expected):
    for slot in mezo.slots:
        moved, want = (
            slot.param.detach() - before[slot.name],
            expected[slot.name] - before[slot.name],
        )
        assert want.abs().max() > 0, slot.name
        assert (moved - want).abs().max() <= 1e-5 * want.abs().max(), slot.name


def run_variant(cfg, steps=1):
    """MeZO steps on the tiny LM; returns the run, the weights before, and per step [(seed, g),
    ...]."""
    model, ids = tiny_lm(), lm_batch()
    mezo, before, log = MeZO(model, cfg), params(model), []
    for _ in range(steps):
        mezo.step(model, lm_loss(ids))
        log.append(list(mezo.estimates))
    return model, ids, mezo, before, log


@pytest.mark.parametrize("variant", ["n_spsa", "param_norm", "grad_norm", "change_grad_estimate"])
def test_zo_sgd_variants_equal_their_dense_formula(variant):
    lr, eps, wd = 1e-2, 1e-2, 0.1
    cfg = MeZOConfig(
        lr=lr,
        eps=eps,
        weight_decay=wd,
        seed=11,
        n_spsa=3 if variant == "n_spsa" else 1,
        zo_variant={"n_spsa": None, "grad_norm": "grad_norm"}.get(variant, "param_norm"),
        change_grad_estimate=variant == "change_grad_estimate",
    )
    model, ids, mezo, before, [estimates] = run_variant(cfg)
    start = tiny_lm()
    if cfg.zo_variant == "param_norm":  # c_g = ||theta_g|| (trainer.py initialize_c)
        cs = {
            g: torch.sqrt(sum((before[s.name] ** 2).sum() for s in mezo.slots if s.group == g))
            for g in mezo.cs
        }
    elif cfg.zo_variant == "grad_norm":  # c_g = ||grad_g|| from one backward in eval mode
        grads = dict(
            zip(
                [n for n, _ in start.named_parameters()],
                torch.autograd.grad(lm_loss(ids)(start.eval()), list(start.parameters())),
            )
        )
        cs = {
            g: torch.sqrt(sum((grads[s.name] ** 2).sum() for s in mezo.slots if s.group == g))
            for g in mezo.cs
        }
    else:
        cs = {}
    assert cs.keys() == (mezo.cs or {}).keys()
    # sqrt of a sum of n fp32 squares in another order: (n + 1) u relative each (Higham 4.2)
    for g in cs:
        n = sum(s.param.numel() for s in mezo.slots if s.group == g)
        assert (mezo.cs[g] - cs[g]).abs() <= 2 * (n + 1) * 2.0**-24 * cs[g], g
    c_of = lambda slot: cs[slot.group].item() if slot.group in cs else 1.0  # noqa: E731
    # z*c, or plain z (normalised)
    grad_factor = (lambda slot: 1.0) if cfg.change_grad_estimate else c_of
    # decay once per step
    step = {s.name: (wd if s.decay else 0.0) * before[s.name] for s in mezo.slots}
    # g = (L+ - L-) / (2 eps): both losses' tolerance (tests.helpers.zo.perturbed_loss_tolerance)
    # over 2 eps
    c_min = min([c.item() for c in cs.values()] + [1.0])
    g_tol = 2 * perturbed_loss_tolerance(tiny_lm(), lm_loss(ids), eps, c_min) / (2 * eps)
    for seed, g in estimates:
        dense_g = dense_projected_grad(start, mezo.slots, lm_loss(ids), seed, eps, c_of) / len(
            estimates
        )
        assert (g - dense_g).abs() <= g_tol / len(estimates), (seed, g, dense_g)
        for s in mezo.slots:
            step[s.name] = step[s.name] + g * grad_factor(s) * dense_z(s, seed)
    wrong_seed = dense_projected_grad(start, mezo.slots, lm_loss(ids), seed + 1, eps, c_of) / len(
        estimates
    )
    # negative control: another z breaks the bound
    assert (g - wrong_seed).abs() > g_tol / len(estimates)
    assert_step_matches(mezo, before, {n: before[n] - lr * d for n, d in step.items()})


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # with momentum: ZO-momentum
def test_momentum_and_adam_equal_their_dense_formula(optimizer):
    """ZO-momentum: buf = mu buf + (g z + wd theta); theta -= lr buf (torch SGD, coupled decay).
    ZO-Adam: AdamW on g z with bias correction and decoupled decay theta -= lr wd theta."""
    lr, wd, mu, (b1, b2), ae = 1e-2, 0.1, 0.9, (0.9, 0.999), 1e-8
    cfg = MeZOConfig(
        optimizer=optimizer,
        lr=lr,
        eps=1e-2,
        weight_decay=wd,
        momentum=mu if optimizer == "sgd" else 0.0,  # Adam reads no momentum: refused there
        adam_betas=(b1, b2),
        adam_eps=ae,
        seed=4,
    )
    model, ids, mezo, before, log = run_variant(cfg, steps=3)
    theta = {n: p.clone() for n, p in before.items()}
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in theta.items()}
    for t, [(seed, g)] in enumerate(log, start=1):
        for s in mezo.slots:
            grad, (m, v), p = g * dense_z(s, seed), state[s.name], theta[s.name]
            decay = wd if s.decay else 0.0
            if optimizer == "sgd":
                m = grad + decay * p if t == 1 else mu * m + grad + decay * p
                theta[s.name] = p - lr * m
            else:
                m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad * grad
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + ae)
                theta[s.name] = p * (1 - lr * decay) - lr * update
            state[s.name] = (m, v)
    assert_step_matches(mezo, before, theta)


def test_one_weight_decay_rule_for_mezo_and_fo():
    """zo.optim.decays decides for both trainers: OPT's and RoBERTa's norm and bias names are exempt
    by
    default (any case), wd_exempt=() decays everything (the original's RoBERTa runs)."""
    model = nn.ModuleDict(
        {
            "fc": nn.Linear(2, 2),
            "layer_norm": nn.LayerNorm(2),
            "LayerNorm": nn.LayerNorm(2),
            "input_layernorm": nn.LayerNorm(2),
            "out_proj": nn.Linear(2, 2, bias=False),
        }
    )
    for exempt, decayed in (
        (None, {"fc.weight", "out_proj.weight"}),
        ((), {n for n, _ in model.named_parameters()}),
    ):
        kw = {} if exempt is None else {"wd_exempt": exempt}
        mezo = MeZO(model, MeZOConfig(weight_decay=0.1, optimizer="adam", **kw))
        fo = FO(model, FOConfig(weight_decay=0.1, lr_scheduler="constant", **kw))
        assert {s.name for s in mezo.slots if s.decay} == decayed
        names = {id(p): n for n, p in model.named_parameters()}
        for opt in (mezo.update_rule.optimizer, fo.optimizer):
            assert {
                names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]
            } == decayed
