"""Shared fixtures of the zo tests: a tiny LM with biases, LayerNorms, dropout and a tied head."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from zo.rng import normal


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h):
        return h + self.dropout(self.fc(F.gelu(self.layer_norm(h))))


class TiedHead(nn.Module):
    """Owns the embedding's Parameter object and reads it as self.weight (the hooks' contract,
    zo/perturb.py)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, h):
        return F.linear(h, self.weight)


class TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=16, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(dim)
        self.lm_head = TiedHead(self.embed_tokens.weight)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for block in self.layers:
            h = block(h)
        return self.lm_head(self.final_layer_norm(h))


def tiny_lm(dtype=torch.float32, seed=0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so every parameter matters
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def lm_batch(n=4, t=9, vocab=40, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def lm_loss(ids):
    """loss_fn(model) for next-token cross-entropy on ids [N, T] (mean over tokens)."""

    def loss_fn(model):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    return loss_fn


def least_squares(seed=0, d=8):
    """A linear model and loss_fn of a noiseless least-squares problem (minimum 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, d, generator=gen)
    y = x @ torch.randn(d, 1, generator=gen)
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False), (lambda m: F.mse_loss(m(x), y))


def params(model) -> dict:
    """A copy of the trainable values, by canonical name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def dense_z(slot, seed) -> torch.Tensor:
    """z of a whole parameter from the eager (uncompiled) formula: the dense oracle of the
    kernels."""

    def t(v):
        return torch.full((), v, dtype=torch.int64)

    return normal(t(seed), slot.key_t, t(0), slot.param.numel(), "cpu").view(slot.param.shape)


# |z| of Box-Muller on 24-bit uniforms (zo/rng.py): 5.768
Z_MAX = math.sqrt(-2 * math.log(2.0**-24))


def normal_z_error(log_ulp=1.0, cos_ulp=1.0, sqrt_ulp=0.5) -> float:
    """Largest |z_computed - z_exact| of zo/rng.py's normal z = sqrt(-2 log u1) * cos(2 pi u2), for
    a log, cos and sqrt accurate to the given ulps. u1, u2 are exact 24-bit fractions and 2 pi u2
    is one fp32 product of the same fp32 constant on every backend, so every backend feeds cos
    the same value. With u = 2^-24 (fp32 unit roundoff, so one ulp of a value is at most 2u times
    it):
      r = sqrt(-2 log u1): relative error log_ulp*2u/2 (sqrt halves it) + sqrt_ulp*2u;  |cos| <= 1;
      cos(theta): absolute error cos_ulp*u (|cos| < 1 has ulp <= u; cos(0) = 1 is exact);  r <=
      Z_MAX;
      r * cos: relative error u;  so |error| <= Z_MAX * u * (log_ulp + 2 sqrt_ulp + cos_ulp + 1)."""
    return Z_MAX * 2.0**-24 * (log_ulp + 2 * sqrt_ulp + cos_ulp + 1)


# Eager (ATen) vs compiled (Inductor) normal z on a CPU: both call SLEEF's u10 functions (<= 1 ulp)
# or the C library's logf/cosf (< 1 ulp) depending on ATEN_CPU_CAPABILITY, and a correctly rounded
# sqrt: each is within normal_z_error() of the exact value, so they are within twice that of each
# other (2.75e-6).
NORMAL_Z_IMPL_BOUND = 2 * normal_z_error()


def perturbed_loss_tolerance(model, loss_fn, eps, c_min=1.0) -> float:
    """How far a loss at theta + eps z / c may move between the hooked (compiled z) and a dense
    (eager z) perturbation of the same weights: each weight differs by eps NORMAL_Z_IMPL_BOUND /
    c plus one fp32 rounding u |theta + eps z / c|; to first order the loss moves by ||grad L||_1
    times that, doubled for
    the gradient's change over eps z. (The forwards then run the same ops on those weights.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_l1 = sum(g.abs().sum().item() for g in torch.autograd.grad(loss_fn(model.eval()), params))
    theta_max = max(p.detach().abs().max().item() for p in params) + eps * Z_MAX / c_min
    return 2 * grad_l1 * (eps * NORMAL_Z_IMPL_BOUND / c_min + 2.0**-24 * theta_max)


def paired_lm_loss(ids):
    """lm_loss(ids) as a zo.PairedLoss: `paired` runs the model once over ids stacked twice and
    returns the loss of each half (the --perturbation paired protocol, zo/paired.py)."""
    from zo import PairedLoss

    loss, n = lm_loss(ids), ids.shape[0]

    def paired(model):
        logits = model(torch.cat([ids, ids])[:, :-1]).float()
        target = ids[:, 1:].flatten()
        return torch.stack(
            [F.cross_entropy(half.flatten(0, 1), target) for half in (logits[:n], logits[n:])]
        )

    return PairedLoss(loss, paired, (ids,))
