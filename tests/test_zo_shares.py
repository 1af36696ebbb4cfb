"""Directions across ranks (zo/shares.py) and the fused update of a step's N directions
(zo/kernels.py get_update_many), in one process: the ranks are threads with a gather over a
barrier, so the sharing logic runs without torch.distributed (tests/test_train_distributed.py runs
it on real gloo ranks)."""

import copy
import threading

import pytest
import torch

from tests.helpers.zo import lm_batch, lm_loss, tiny_lm
from zo import DirectionShare, MeZO, MeZOConfig, check_supported
from zo.kernels import get_kernels, get_update_many


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("n", [2, 3])
def test_update_many_is_bitwise_the_n_update_passes(dtype, masked, n):
    """One pass, each direction's term rounded to the weights' dtype as the n passes round it (in
    bf16 Inductor drops that rounding unless told to emulate it)."""
    p = torch.randn(40_000, generator=torch.Generator().manual_seed(n)).to(dtype)
    q = p.clone()
    t = lambda v, dtype=torch.float32: torch.tensor(v, dtype=dtype)  # noqa: E731
    seeds, grads = t([11 + 1_000_003 * k for k in range(n)], torch.int64), t([3.0, -2.0, 5.0][:n])
    wds = t([0.1] + [0.0] * (n - 1))
    common = dict(key=t(7, torch.int64), offset=t(0, torch.int64), lr=t(1e-2))
    common |= {"threshold": t(0.8)} if masked else {}
    update_ = get_kernels("normal", masked=masked).update_
    for k in range(n):
        update_(p, seed=seeds[k], grad=grads[k], wd=wds[k], **common)
    get_update_many("normal", masked=masked, n=n)(q, seeds=seeds, grads=grads, wds=wds, **common)
    assert not torch.equal(p, p.new_zeros(p.shape)) and torch.equal(p, q)


DIRECTIONS = {"dense": {}, "sparse": {"sparse_mezo": 0.5}, "lozo": {"lozo": True, "lozo_nu": 1}}


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS)
def test_a_steps_n_updates_in_one_pass_equal_n_passes(direction):
    """MeZO applies an n-SPSA step's 3 updates in one pass per parameter: bitwise the 3 update
    passes of the same estimates (weight decay once, with the first), for each direction."""
    model, batch = tiny_lm(), lm_batch()
    cfg = MeZOConfig(n_spsa=3, lr=1e-2, weight_decay=0.1, wd_exempt=(), **direction)
    reference = copy.deepcopy(model)
    mezo = MeZO(model, cfg)
    separate = []  # the update passes of one z each, not taken by a step with several z
    mezo.perturbation.update = lambda *args: separate.append(args)
    mezo.step(model, lm_loss(batch))
    assert separate == []
    passes = MeZO(reference, cfg)
    passes.direction.prepare(0, [seed for seed, _ in mezo.estimates])
    passes.lr.set(cfg.lr)
    for k, (seed, g) in enumerate(mezo.estimates):
        passes.zo_random_seed = seed
        wd = cfg.weight_decay if k == 0 else 0.0
        passes.perturbation.update(passes.seed, passes.lr, passes.grad_scales(g), wd)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_lm().parameters())]
    assert all(moved)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def threads_sharing_directions(model, cfg, groups, loss_fn, steps):
    """`groups` replicas of model, each in a thread with its DirectionShare; the gather waits for
    every thread's losses (an all-gather). -> each replica's (model, MeZO) after `steps` steps."""
    posted, barrier = [None] * groups, threading.Barrier(groups)

    def gather_of(group):
        def gather(losses):
            posted[group] = losses.float()
            barrier.wait()
            every = torch.stack(posted)
            barrier.wait()  # nobody posts the next step's losses before all have read these
            return every

        return gather

    replicas = [copy.deepcopy(model) for _ in range(groups)]
    trainers = [
        MeZO(m, cfg, share=DirectionShare(g, groups, gather_of(g))) for g, m in enumerate(replicas)
    ]
    errors = []

    def run(m, trainer):
        try:
            for _ in range(steps):
                trainer.step(m, loss_fn)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=pair) for pair in zip(replicas, trainers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return list(zip(replicas, trainers))


ESTIMATORS = {"nspsa": {"n_spsa": 4}, "fzoo": {"estimator": "fzoo", "fzoo_n": 4}}


@pytest.mark.parametrize("estimator", ESTIMATORS.values(), ids=ESTIMATORS)
def test_two_direction_groups_equal_one_process_bitwise(estimator):
    """Two groups evaluate two of the 4 z each; every group ends with the one-process estimates
    (seeds and projected grads, in order), losses and weights, bitwise."""
    cfg = MeZOConfig(lr=1e-2, eps=1e-2, perturbation="eager", **estimator)
    model, loss_fn = tiny_lm(), lm_loss(lm_batch())
    alone = copy.deepcopy(model)
    one = MeZO(alone, cfg)
    losses = [one.step(alone, loss_fn) for _ in range(2)]
    for replica, trainer in threads_sharing_directions(model, cfg, 2, loss_fn, steps=2):
        assert [s for s, _ in trainer.estimates] == [s for s, _ in one.estimates]
        assert torch.equal(
            torch.stack([g for _, g in trainer.estimates]),
            torch.stack([g for _, g in one.estimates]),
        )
        assert trainer.forward_passes == one.forward_passes
        assert all(torch.equal(a, b) for a, b in zip(replica.parameters(), alone.parameters()))
    assert torch.isfinite(torch.stack(losses)).all()


def test_each_group_evaluates_its_own_seeds_only():
    """A group's forwards perturb its share of the step's z (k = N / groups), not all of them."""
    model, loss_fn = tiny_lm(), lm_loss(lm_batch())
    cfg = MeZOConfig(n_spsa=4, perturbation="eager")
    trainer = MeZO(model, cfg, share=DirectionShare(1, 2, lambda t: torch.stack([t, t])))
    evaluated = []
    zo_losses = trainer.zo_losses
    trainer.zo_losses = lambda m, f, seed: evaluated.append(seed) or zo_losses(m, f, seed)
    trainer.step(model, loss_fn)
    assert evaluated == [s for s, _ in trainer.estimates][2:]


@pytest.mark.parametrize(
    "cfg, what",
    [
        (dict(n_spsa=3), "3 z per step (n_spsa) do not split evenly among 2 direction groups"),
        (dict(n_spsa=4, perturbation="reference"), "perturbation=reference does not support"),
        (dict(n_spsa=4, n_spsa_schedule="linear", max_steps=10), "n_spsa=4 does not support"),
        (dict(fzoo_n=3, estimator="fzoo"), "3 z per step (fzoo_n) do not split evenly"),
    ],
)
def test_directions_that_cannot_be_shared_are_refused(cfg, what):
    model = tiny_lm()
    with pytest.raises(ValueError, match="unsupported combination") as e:
        MeZO(model, MeZOConfig(**cfg), share=DirectionShare(0, 2, lambda t: t[None]))
    assert what in str(e.value)


def test_cuda_graphs_do_not_share_directions():
    with pytest.raises(ValueError, match="CUDA graphs run in a single process"):
        check_supported(MeZOConfig(), cuda_graphs=True, direction_groups=1)
