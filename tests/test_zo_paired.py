"""The paired step (zo/paired.py, `perturbation="paired"`): one forward over 2B rows instead of the
+eps and -eps forwards, z evaluated once for both.

The bound on its losses against exact restore's: zero, on the models here. Derivation: each owning
module's half runs the module's own code on bitwise today's weights (perturbed_pair_ is bitwise
perturbed_ with +eps and -eps: test below) and on today's B rows (the halves are the rows of the
same tensors), so its output is bitwise today's. Every other op runs once over 2B rows; the ones
these models use (elementwise ops, LayerNorm, GELU, the residual adds, the embedding gather, the
per-row cross-entropy of each half) compute a row from that row alone by the same arithmetic
whatever the row count, so their rows are bitwise today's too. What can differ elsewhere: a
non-owned op whose per-row arithmetic depends on the row count (a BLAS matmul of a frozen module
may block 2B rows differently, moving each output by a few ulps of its dot product); the slow
tests of train.py (tests/test_train_paired.py) measure that on the real models' layers.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.zo import lm_batch, lm_loss, paired_lm_loss, tiny_lm
from zo import MeZO, MeZOConfig, PairedLoss, collect_slots, get_kernels, methods, paired, replay
from zo.lozo import LOZO


def scalars(**extra):
    return dict(
        seed=torch.tensor(11),
        key=torch.tensor(987654321),
        offset=torch.tensor(5),
        scale=torch.tensor(1e-2),
        **extra,
    )


@pytest.mark.parametrize(
    "dist, masked", [("normal", False), ("rademacher", False), ("normal", True)]
)
def test_pair_kernel_is_bitwise_perturbed_with_plus_and_minus_scale(dist, masked):
    kernels = get_kernels(dist, compiled=True, masked=masked)
    src = torch.randn(70_001)  # the parallel build (>= 32768 elements) with a vector tail
    extra = {"threshold": torch.tensor(0.7)} if masked else {}
    plus, minus, out_plus, out_minus = (torch.empty_like(src) for _ in range(4))
    kernels.perturbed_pair_(out_plus, src=src, minus=out_minus, **scalars(**extra))
    kernels.perturbed_(plus, src=src, **scalars(**extra))
    kernels.perturbed_(minus, src=src, **{**scalars(**extra), "scale": torch.tensor(-1e-2)})
    assert torch.equal(out_plus, plus) and torch.equal(out_minus, minus)
    assert not torch.equal(plus, src)


def test_lozo_pair_kernel_is_bitwise_its_perturbed():
    layer = nn.Linear(7, 12)
    slots = collect_slots(layer, ())
    lozo = LOZO(slots, MeZOConfig(lozo=True, lozo_rank=2), compiled=False)
    lozo.prepare(0, [3])
    kernels, low_rank = lozo.kernels(slots[0]), lozo.args(slots[0])
    src = layer.weight.detach()
    out_plus, out_minus, plus, minus = (torch.empty_like(src) for _ in range(4))
    kernels.perturbed_pair_(out_plus, src, out_minus, **scalars(**low_rank))
    kernels.perturbed_(plus, src, **scalars(**low_rank))
    kernels.perturbed_(minus, src, **{**scalars(**low_rank), "scale": torch.tensor(-1e-2)})
    assert torch.equal(out_plus, plus) and torch.equal(out_minus, minus)
    assert kernels.perturbed_at_ is None  # low-rank z is not a function of the index alone


def trained(model, perturbation, loss_fn, steps=3, **cfg):
    mezo = MeZO(model, MeZOConfig(lr=1e-3, eps=1e-3, perturbation=perturbation, **cfg))
    out = []
    for _ in range(steps):
        loss, g = mezo.zo_step(model, loss_fn)
        mezo.zo_update(model)
        out.append((loss, g))
    return out, mezo


CONFIGS = {
    "normal": {},
    "rademacher": dict(distribution="rademacher"),
    "n-SPSA": dict(n_spsa=2),
    "Sparse-MeZO": dict(sparse_mezo=0.5),
    "LOZO": dict(lozo=True),
    "momentum": dict(momentum=0.9),
    "variants": dict(zo_variant="param_norm"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_paired_steps_equal_exact_steps_bitwise(name):
    """Losses, estimates and weights of three steps (tied head, LayerNorms; micro-batches): the
    bound of the module docstring, zero."""
    ids = lm_batch(n=6)
    fns = [paired_lm_loss(ids[:3]), paired_lm_loss(ids[3:])]  # gradient accumulation
    runs = {}
    for perturbation in ("exact", "paired"):
        model = tiny_lm()
        steps, mezo = trained(model, perturbation, fns, **CONFIGS[name])
        runs[perturbation] = (steps, [p.detach().clone() for p in model.parameters()])
    (exact, w_exact), (paired, w_paired) = runs.values()
    for (l1, g1), (l2, g2) in zip(exact, paired):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert all(torch.equal(a, b) for a, b in zip(w_exact, w_paired))
    assert not mezo.perturbation.unseen()


def test_paired_step_evaluates_z_once_per_weight_in_the_forward(monkeypatch):
    """One pair kernel per trainable parameter and forward (the tied embedding/head once, at the
    head), no single perturbation, and no weight written before the update."""
    model, ids = tiny_lm(), lm_batch()
    mezo = MeZO(model, MeZOConfig(lr=0.0, perturbation="paired"))
    calls, kernels = [], mezo.direction.dense

    def counted(name):
        return lambda *a, **k: (calls.append(name), getattr(kernels, name)(*a, **k))[1]

    monkeypatch.setattr(
        mezo.direction, "dense", kernels._replace(**{n: counted(n) for n in kernels._fields})
    )
    before = [p.detach().clone() for p in model.parameters()]
    mezo.zo_step(model, paired_lm_loss(ids))
    # the embedding: its gathered rows, once per half; the tied TiedHead pairs the whole table
    assert calls == ["perturbed_at_"] * 2 + ["perturbed_pair_"] * len(mezo.slots)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_tied_head_runs_by_chunks_and_the_embedding_perturbs_its_rows_only(monkeypatch):
    """An nn.Embedding perturbs the rows it gathers (z at row * D + column), the tied nn.Linear head
    pairs HEAD_CHUNK rows of the table at a time: no whole perturbed copy of the table exists, and
    the steps are exact restore's, bitwise."""
    monkeypatch.setattr(paired, "HEAD_CHUNK", 16)
    ids, vocab, dim = lm_batch(vocab=40), 40, 16

    def model():
        m = tiny_lm(vocab=vocab, dim=dim)
        m.lm_head = nn.Linear(dim, vocab, bias=False)
        m.lm_head.weight = m.embed_tokens.weight
        return m

    runs = []
    for perturbation in ("exact", "paired"):
        m = model()
        mezo = MeZO(m, MeZOConfig(lr=1e-3, perturbation=perturbation))
        calls, kernels = [], mezo.direction.dense
        tied = mezo.slots[0].key_t

        def counted(name):
            def call(out, **k):
                if k["key"] is tied:
                    calls.append((name, out.numel()))
                return getattr(kernels, name)(out, **k)

            return call

        monkeypatch.setattr(
            mezo.direction, "dense", kernels._replace(**{n: counted(n) for n in kernels._fields})
        )
        steps = []
        for _ in range(2):
            steps.append(mezo.zo_step(m, paired_lm_loss(ids)))
            mezo.zo_update(m)
        runs.append((steps, [p.detach().clone() for p in m.parameters()], calls))
    (exact, w1, _), (pairs, w2, calls) = runs
    assert all(torch.equal(a, b) for x, y in zip(exact, pairs) for a, b in zip(x, y))
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    rows = ids.shape[0] * (ids.shape[1] - 1) * dim  # the tokens of one half, D values each
    chunks = [("perturbed_pair_", 16 * dim)] * 2 + [("perturbed_pair_", 8 * dim)]
    step = [("perturbed_at_", rows)] * 2 + chunks + [("update_", vocab * dim)]
    assert calls == step * 2


class Inner(nn.Module):
    """Owns a gain around a Linear that owns its weights (nested owners); reads a table [T, D]
    that is not a row tensor, a keyword tensor and a number."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, h, table, shift=None, scale=1.0):
        return self.fc(h * self.gain + table + shift) * scale


class Outer(nn.Module):
    def __init__(self, vocab=30, dim=8, positions=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("table", torch.randn(positions, dim))
        self.inner = Inner(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        shift = ids[..., None].float() / 100  # a row tensor passed by keyword
        return self.head(self.inner(h, self.table[: ids.shape[1]], shift=shift, scale=2.0))


def outer_loss(ids):
    def loss(model):
        return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    def paired(model):
        logits, n = model(torch.cat([ids, ids])[:, :-1]), ids.shape[0]
        target = ids[:, 1:].flatten()
        halves = (logits[:n], logits[n:])
        return torch.stack([F.cross_entropy(x.flatten(0, 1), target) for x in halves])

    return PairedLoss(loss, paired, (ids[:, :-1],))


@pytest.mark.parametrize("seq", [5, 8])
def test_nested_owners_and_non_row_arguments_equal_exact(seq):
    """seq 5: the table [5, D] goes whole to both halves (5 != 2B = 8), the Linear inside Inner
    sees its half's sign; seq 8: the table has 2B rows, the batch is declined (`pairable`) and the
    step runs today's two forwards: equal to exact either way, never split wrongly."""
    ids = torch.randint(0, 30, (4, seq + 1), generator=torch.Generator().manual_seed(0))
    fn = outer_loss(ids)
    assert fn.pairable() == (seq != 8)
    runs = []
    for perturbation in ("exact", "paired"):
        torch.manual_seed(0)
        model = Outer()
        steps, mezo = trained(model, perturbation, fn, steps=2)
        runs.append((steps, [p.detach().clone() for p in model.parameters()]))
    (exact, w1), (paired, w2) = runs
    for (l1, g1), (l2, g2) in zip(exact, paired):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert not mezo.perturbation.unseen()


def test_a_module_without_the_row_dimension_is_an_error():
    class Table(nn.Module):  # owns a table it returns whatever the batch: no rows to split
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3))

        def forward(self, n):
            return self.weight[:n]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = Table()

        def forward(self, x):
            return x @ self.table(3).T

    x = torch.randn(2, 3)

    def paired(m):
        out = m(torch.cat([x, x]))
        return torch.stack([out[:2].sum(), out[2:].sum()])

    model = Model()
    mezo = MeZO(model, MeZOConfig(perturbation="paired"))
    with pytest.raises(ValueError, match="no argument with the batch's 4 rows"):
        mezo.zo_step(model, PairedLoss(lambda m: m(x).sum(), paired, (x,)))
    assert "forward" not in model.table.__dict__  # the hooks are off again


def test_a_plain_closure_falls_back_to_two_forwards():
    """A closure that is not a PairedLoss (a library caller's own loss) runs as exact restore: the
    same steps."""
    ids, runs = lm_batch(), []
    for perturbation in ("exact", "paired"):
        steps, _ = trained(tiny_lm(), perturbation, lm_loss(ids), steps=2)
        runs.append(steps)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(*runs))


def test_fzoo_one_sided_forwards_do_not_pair_and_are_refused():
    with pytest.raises(
        ValueError, match="estimator=fzoo's forwards are one-sided: nothing to pair"
    ):
        MeZO(tiny_lm(), MeZOConfig(estimator="fzoo", fzoo_n=2, perturbation="paired"))


def test_trajectories_of_exact_runs_replay_bitwise_under_paired():
    """The update is unchanged: a trajectory written by exact restore (before the paired step
    existed) replays to the same weights with perturbation="paired"."""
    ids, records = lm_batch(), []

    class Log:
        def append(self, step, seed, g, lr):
            records.append(dict(step=step, seed=seed, projected_grad=g.item(), lr=lr))

    model = tiny_lm()
    mezo = MeZO(model, MeZOConfig(lr=1e-3, perturbation="exact"), trajectory=Log())
    for _ in range(3):
        mezo.step(model, lm_loss(ids))
    base = tiny_lm()
    replay(base, records, MeZOConfig(lr=1e-3, perturbation="paired"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))


def test_paired_supports_what_exact_restore_supports():
    exact, paired = (
        methods.perturbation_class(MeZOConfig(perturbation=p)) for p in ("exact", "paired")
    )
    assert paired.supports(MeZOConfig()) == exact.supports(MeZOConfig())
    methods.check_supported(MeZOConfig(perturbation="paired"), cuda_graphs=True)
    methods.check_supported(MeZOConfig(perturbation="paired"), fsdp=True, replay=True)
