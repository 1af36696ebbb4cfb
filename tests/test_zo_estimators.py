"""FZOO and Sparse-MeZO against dense transcriptions of their papers' updates (the authors'
trainer.py for FZOO), on a quadratic and on the tiny LM; deliberate breaks of each transcription
must fail the
same comparison (negative controls). Also: the one check of what the parts support together."""

import math

import pytest
import torch
from torch import nn

from program.trajectory import Trajectory, read_trajectory
from tests.helpers.zo import dense_z, lm_batch, lm_loss, params, tiny_lm
from zo import MeZO, MeZOConfig, check_supported, replay
from zo.rng import rademacher

EPS, LR = 1e-2, 1e-2


def dense_rademacher(slot, seed) -> torch.Tensor:
    t = lambda v: torch.full((), v, dtype=torch.int64)  # noqa: E731
    return rademacher(t(seed), slot.key_t, t(0), slot.param.numel(), "cpu").view(slot.param.shape)


def quadratic(d=64, seed=0):
    """loss = 0.5 * ||W x - y||^2 / n: a smooth function of every weight (known gradient W x x^T - y
    x^T)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, d, generator=gen), torch.randn(32, 4, generator=gen)
    torch.manual_seed(seed)
    model = nn.Linear(d, 4, bias=False)
    return model, (lambda m: 0.5 * ((m(x) - y) ** 2).sum(1).mean())


def loss_at(model, slots, loss_fn, shifts: dict) -> torch.Tensor:
    """loss_fn at theta + shifts (a dense copy per parameter, restored after), dropout off as
    zo_forward."""
    model.eval()
    saved = {s: s.param.detach().clone() for s in slots}
    with torch.no_grad():
        for s in slots:
            s.param.add_(shifts[s])
        loss = loss_fn(model).detach().float()
        for s in slots:
            s.param.copy_(saved[s])
    return loss


def fzoo_transcription(model, slots, loss_fn, seeds, *, std_over="n", sided="one"):
    """The authors' trainer.py zo_step / zo_update, densely: N Rademacher z, l_i = L(theta + eps
    z_i), l_0 = L(theta), g_i = (l_i - l_0) / (N * std(l_1..l_N), population), theta -= lr *
    sum_i g_i z_i.
    std_over="n+1" and sided="two" are the deliberate breaks."""
    zs = [{s: dense_rademacher(s, seed) for s in slots} for seed in seeds]
    l0 = loss_at(model, slots, loss_fn, {s: 0.0 for s in slots})
    plus = torch.stack([loss_at(model, slots, loss_fn, {s: EPS * z[s] for s in slots}) for z in zs])
    if sided == "two":  # MeZO's two-sided difference in place of the clean forward
        minus = torch.stack(
            [loss_at(model, slots, loss_fn, {s: -EPS * z[s] for s in slots}) for z in zs]
        )
        diffs = (plus - minus) / 2
    else:
        diffs = plus - l0
    spread = torch.cat([plus, l0[None]]) if std_over == "n+1" else plus
    gs = diffs / (len(seeds) * torch.std(spread, unbiased=False))
    with torch.no_grad():
        for g, z in zip(gs, zs):
            for s in slots:
                s.param.sub_(LR * g * z[s])
    return l0, gs


def sparse_transcription(
    model, slots, loss_fn, seed, sparsity, *, keep="small", masked_update=True
):
    """Sparse-MeZO densely: m = 1[|theta| <= h], h the k-th smallest |theta| of the parameter
    (k = ceil((1 - sparsity) * numel)); SPSA with m * z; theta -= lr * g * m * z. keep="large" (the
    wrong end) and masked_update=False are the deliberate breaks."""
    masks = {}
    for s in slots:
        mag = s.param.detach().abs().flatten()
        k = max(1, math.ceil((1 - sparsity) * mag.numel()))
        if keep == "small":
            masks[s] = (s.param.detach().abs() <= torch.kthvalue(mag, k).values).float()
        else:
            masks[s] = (
                s.param.detach().abs() >= torch.kthvalue(mag, mag.numel() - k + 1).values
            ).float()
    z = {s: dense_z(s, seed) for s in slots}
    plus = loss_at(model, slots, loss_fn, {s: EPS * masks[s] * z[s] for s in slots})
    minus = loss_at(model, slots, loss_fn, {s: -EPS * masks[s] * z[s] for s in slots})
    g = (plus - minus) / (2 * EPS)
    with torch.no_grad():
        for s in slots:
            s.param.sub_(LR * g * (masks[s] if masked_update else 1.0) * z[s])
    return plus, g, masks


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# FZOO is compared bitwise: Rademacher z is the hash alone (the same eager and compiled, zo/rng.py),
# and the fused kernels round theta + eps*z and theta - lr*g*z once in fp32 as the transcription
# does.


def run_ours(model, cfg, loss_fn, steps=3):
    """Our steps; yields each step's seeds and projected grads after its update."""
    mezo = MeZO(model, cfg)
    for _ in range(steps):
        mezo.zo_step(model, loss_fn)
        seeds, gs = zip(*mezo.estimates)
        mezo.zo_update(model)
        yield list(seeds), list(gs)


@pytest.mark.parametrize("problem", ["quadratic", "tiny_lm"])
def test_fzoo_matches_the_authors_update_and_breaks_fail(problem):
    n = 4
    make = (
        (lambda: quadratic())
        if problem == "quadratic"
        else (lambda: (tiny_lm(), lm_loss(lm_batch())))
    )
    ours, loss_fn = make()
    cfg = MeZOConfig(estimator="fzoo", fzoo_n=n, eps=EPS, lr=LR)
    refs = {how: make()[0] for how in ("right", "std_n+1", "two_sided")}
    for seeds, gs in run_ours(ours, cfg, loss_fn):
        for how, ref in refs.items():
            slots = MeZO(ref, cfg).slots
            _, ref_gs = fzoo_transcription(
                ref,
                slots,
                loss_fn,
                seeds,
                std_over="n+1" if how == "std_n+1" else "n",
                sided="two" if how == "two_sided" else "one",
            )
            if how == "right":
                assert torch.equal(torch.stack(gs), ref_gs), (gs, ref_gs)
    assert max_diff(params(ours), params(refs["right"])) == 0
    for broken in ("std_n+1", "two_sided"):  # the negative controls: the same comparison fails
        assert max_diff(params(ours), params(refs[broken])) > 0, broken


def test_fzoo_step_reduces_n_plus_1_losses_once_and_counts_forwards():
    model, loss_fn = quadratic()
    calls = []

    def reduce_losses(t):
        calls.append(tuple(t.shape))
        return t

    mezo = MeZO(model, MeZOConfig(estimator="fzoo", fzoo_n=5), reduce_losses=reduce_losses)
    loss, _ = mezo.zo_step(model, loss_fn)
    mezo.zo_update(model)
    assert calls == [(6,)]  # N + 1 scalars, one all-reduce
    assert mezo.forward_passes == 6 and len(mezo.estimates) == 5
    spsa = MeZO(model, MeZOConfig(n_spsa=3))
    spsa.step(model, loss_fn)
    assert spsa.forward_passes == 6


def test_fzoo_returns_the_clean_loss():
    model, loss_fn = quadratic()
    before = loss_fn(model).detach().float()
    mezo = MeZO(model, MeZOConfig(estimator="fzoo", fzoo_n=3))
    loss, _ = mezo.zo_step(model, loss_fn)
    assert torch.equal(loss, before)  # l_0 = L(theta), the authors' logged loss


@pytest.mark.parametrize("problem", ["quadratic", "tiny_lm"])
def test_sparse_mezo_matches_the_dense_masked_update_and_breaks_fail(problem):
    sparsity = 0.75
    make = (
        (lambda: quadratic())
        if problem == "quadratic"
        else (lambda: (tiny_lm(), lm_loss(lm_batch())))
    )
    ours, loss_fn = make()
    cfg = MeZOConfig(sparse_mezo=sparsity, eps=EPS, lr=LR)
    refs = {how: make()[0] for how in ("right", "large", "unmasked_update")}
    for seeds, gs in run_ours(ours, cfg, loss_fn):
        for how, ref in refs.items():
            slots = MeZO(ref, cfg).slots
            _, g, masks = sparse_transcription(
                ref,
                slots,
                loss_fn,
                seeds[0],
                sparsity,
                keep="large" if how == "large" else "small",
                masked_update=how != "unmasked_update",
            )
            if how == "right":
                # normal z: compiled and eager z differ by <= NORMAL_Z_IMPL_BOUND = 2.75e-6
                # (tests/helpers/zo.py); through eps*grad.dz / (2 eps) that moves g by <= |grad|_1 *
                # 2.75e-6 / 2, under 1e-5 relative on these O(1)-gradient losses
                assert torch.allclose(gs[0], g, rtol=1e-4, atol=1e-6), (gs[0], g)
    # each weight moves by lr * (g dz + dg z): <= 1e-2 * (5 * 2.75e-6 + 1e-4 * 5) = 5.1e-6 per step,
    # 3 steps: < 2e-5
    assert max_diff(params(ours), params(refs["right"])) <= 2e-5
    # the negative controls: more than 100x that bound apart
    for broken in ("large", "unmasked_update"):
        assert max_diff(params(ours), params(refs[broken])) > 100 * 2e-5, broken


def test_sparse_mezo_updates_exactly_the_small_magnitude_fraction_and_stores_no_mask():
    model, loss_fn = quadratic(d=100)
    before = model.weight.detach().clone()
    mezo = MeZO(model, MeZOConfig(sparse_mezo=0.9, lr=1.0))
    mezo.step(model, loss_fn)
    changed = model.weight != before
    k = math.ceil(0.1 * before.numel())  # 40 of 400 distinct magnitudes
    assert int(changed.sum()) == k
    assert bool((before.abs()[changed].max() < before.abs()[~changed].min()))  # the smallest ones
    thresholds = mezo.direction.thresholds
    assert all(h.dim() == 0 for h in thresholds.values())  # one number per parameter, no dense mask


@pytest.mark.parametrize(
    "cfg",
    [
        dict(estimator="fzoo", fzoo_n=3),
        dict(sparse_mezo=0.5),
        dict(estimator="fzoo", fzoo_n=2, sparse_mezo=0.5, distribution="normal"),
    ],
)
def test_fzoo_and_sparse_mezo_replay_bitwise(tmp_path, cfg):
    config = MeZOConfig(
        lr=1e-2, eps=1e-2, weight_decay=0.1, lr_scheduler="linear", max_steps=6, **cfg
    )
    model, ids = tiny_lm(), lm_batch()
    trajectory = Trajectory(tmp_path / "t.jsonl", keep_before_step=0)
    mezo = MeZO(model, config, trajectory=trajectory)
    for _ in range(4):
        mezo.step(model, lm_loss(ids))
    trajectory.flush()
    base = tiny_lm()
    replay(base, read_trajectory(tmp_path / "t.jsonl"), config)
    assert not torch.equal(base.embed_tokens.weight, tiny_lm().embed_tokens.weight)
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "cfg, features, what",
    [
        (
            dict(perturbation="reference"),
            dict(fsdp=True),
            "perturbation=reference does not support FSDP",
        ),
        (
            dict(estimator="fzoo"),
            dict(cuda_graphs=True),
            "estimator=fzoo with fzoo_n=8 does not support CUDA graphs",
        ),
        (
            dict(estimator="fzoo", perturbation="reference", distribution="normal"),
            {},
            "estimator=fzoo with fzoo_n=8 does not support perturbation=reference",
        ),
        (dict(sparse_mezo=0.5), dict(fsdp=True), "sparse_mezo=0.5 does not support FSDP"),
        (
            dict(sparse_mezo=0.5, optimizer="adam"),
            {},
            "sparse_mezo=0.5 does not support a materialised p.grad",
        ),
        (
            dict(distribution="rademacher", perturbation="reference"),
            {},
            "distribution=rademacher does not support perturbation=reference",
        ),
        (
            dict(zo_variant="param_norm"),
            dict(replay=True),
            "zo_variant=param_norm does not support trajectory replay",
        ),
    ],
)
def test_one_check_refuses_unsupported_combinations(cfg, features, what):
    with pytest.raises(ValueError, match=f"unsupported combination: .*{what}"):
        check_supported(MeZOConfig(**cfg), **features)
    if features.get("fsdp"):  # MeZO itself: a local view is not silently ignored
        model, _ = quadratic()
        with pytest.raises(ValueError, match=what):
            MeZO(model, MeZOConfig(**cfg), local_view=lambda t: (t.detach(), 0))
    check_supported(MeZOConfig())  # MeZO's default supports itself


def test_a_changed_trainable_set_raises_at_the_next_step():
    model, loss_fn = quadratic()
    mezo = MeZO(model, MeZOConfig())
    mezo.step(model, loss_fn)
    model.weight.requires_grad_(False)
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="trainable parameters changed since MeZO was built"):
        mezo.step(model, loss_fn)


def test_unseen_parameters_are_checked_after_a_resume_too():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.unused = nn.Linear(2, 1), nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(x)

    model, x = Unused(), torch.ones(4, 2)
    loss_fn = lambda m: m(x).pow(2).mean()  # noqa: E731
    first = MeZO(model, MeZOConfig())
    with pytest.warns(UserWarning, match="unused.weight"):
        first.step(model, loss_fn)
    resumed = MeZO(model, MeZOConfig())
    resumed.load_state_dict(first.state_dict())
    assert resumed.global_step == 1
    with pytest.warns(UserWarning, match="unused.weight"):
        resumed.step(model, loss_fn)


def test_mezo_config_default_lr_is_the_command_line_default():
    from program import flags

    assert MeZOConfig().lr == flags.build_parser().parse_args([]).learning_rate


@pytest.mark.parametrize("field", ["n_spsa", "fzoo_n"])
def test_more_z_per_step_than_memory_holds_is_refused_before_any_seed(field):
    """A step keeps each z's seed and estimate until its update: an N that cannot fit is refused
    at once rather than drawing seeds until MemoryError."""
    with pytest.raises(ValueError, match=f"{field} must be in \\[.*memory"):
        MeZOConfig(estimator="fzoo" if field == "fzoo_n" else "spsa", **{field: 10**12})


def test_fzoo_with_equal_losses_skips_its_update_and_reports_the_step_non_finite():
    """eps too small to move the loss: N equal losses, std 0, and the authors' (l_i - l_0) /
    (N * std) is 0/0. The step keeps the formula's NaN, leaves theta as it was, and returns a
    non-finite loss, so the loop counts it (--max_nonfinite) instead of skipping it silently."""
    model, loss_fn = quadratic()
    before = params(model)
    mezo = MeZO(model, MeZOConfig(estimator="fzoo", fzoo_n=3, eps=1e-30, lr=LR))
    loss, _ = mezo.zo_step(model, loss_fn)
    seeds, gs = zip(*mezo.estimates)
    mezo.zo_update(model)
    plus = torch.stack([loss_fn(model).detach().float()] * 3)  # theta + 1e-30 z rounds to theta
    authors = (plus - plus[0]) / (3 * torch.std(plus, unbiased=False))
    assert torch.equal(torch.stack(gs).isnan(), authors.isnan()) and authors.isnan().all()
    assert max_diff(params(model), before) == 0
    assert not torch.isfinite(loss)


def test_a_finite_loss_with_a_non_finite_estimate_counts_as_non_finite():
    """SPSA: loss1 finite, loss2 NaN -> the update is skipped, and the step says so."""
    model, loss_fn = quadratic()
    calls = []

    def half_nan(m):
        calls.append(1)
        return loss_fn(m) if len(calls) % 2 else torch.tensor(float("nan"))

    loss, g = MeZO(model, MeZOConfig()).zo_step(model, half_nan)
    assert not torch.isfinite(g) and not torch.isfinite(loss)
