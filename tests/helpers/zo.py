"""Shared fixtures of the zo tests: a tiny LM with biases, LayerNorms, dropout and a tied head."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from zo.rng import MINUS_SIN_2PI, normal


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
U = 2.0**-24  # fp32 unit roundoff: one ulp of a value is at most 2 U times it


def normal_z_error(log_ulp=1.0, cos_ulp=1.0, sqrt_ulp=0.5) -> float:
    """Largest |z_computed - z_exact| of zo/rng.py's normal z = sqrt(-2 log u1) * cos(2 pi u2)
    with the library's cos, for a log, cos and sqrt accurate to the given ulps, where z_exact takes
    cos of the same fp32 argument. u1, u2 are exact 24-bit fractions and 2 pi u2 is one fp32
    product of the same fp32 constant on every backend, so every backend feeds cos the same value:
      r = sqrt(-2 log u1): relative error log_ulp*2U/2 (sqrt halves it) + sqrt_ulp*2U;  |cos| <= 1;
      cos(theta): absolute error cos_ulp*U (|cos| < 1 has ulp <= U; cos(0) = 1 is exact);
      r <= Z_MAX;  r * cos: relative error U;
    so |error| <= Z_MAX * U * (log_ulp + 2 sqrt_ulp + cos_ulp + 1)."""
    return Z_MAX * U * (log_ulp + 2 * sqrt_ulp + cos_ulp + 1)


# Eager (ATen) vs compiled (Inductor) normal z on a CPU: both call SLEEF's u10 functions (<= 1 ulp)
# or the C library's logf/cosf (< 1 ulp) depending on ATEN_CPU_CAPABILITY, and a correctly rounded
# sqrt: each is within normal_z_error() of the exact value, so they are within twice that of each
# other (2.75e-6). With the polynomial cos (normal_z="poly_cos") only log differs (cos_2pi_poly is
# bitwise the same: tests/test_zo_rng.py), so the same bound holds with room to spare.
NORMAL_Z_IMPL_BOUND = 2 * normal_z_error()


def sin_taylor_terms(coefs=MINUS_SIN_2PI) -> list:
    """T_j = |c_j| (1/4)^(2j+1): the largest |c_j t^(2j+1)| of cos_2pi_poly's terms, |t| <= 1/4.
    The terms alternate in sign and each is at most a sixteenth of the one before at |t| <= 1/4
    (asserted), so every tail c_j t^(2j+1) + c_(j+1) t^(2j+3) + ... is at most T_j (Leibniz)."""
    terms = [abs(c) * 0.25 ** (2 * j + 1) for j, c in enumerate(coefs)]
    assert all(a * b < 0 and abs(b) / 16 <= abs(a) for a, b in zip(coefs, coefs[1:]))
    return terms


def poly_cos_error(coefs=MINUS_SIN_2PI) -> float:
    """Largest |c - cos(2 pi u2)| of zo/rng.py's cos_2pi_poly (c its fp32 result, u2 any 24-bit
    fraction in [0, 1)), derived. t = 1/4 - |u2 - 1/2| is exact (u2 - 1/2 and 1/4 - |.| are
    multiples of 2^-24 below 1 in magnitude) and cos(2 pi u2) = -sin(2 pi t), |2 pi t| <= pi/2.
    coefs c_j (j = 0..n) are the fp32 roundings of the exact a_j = -(-1)^j (2 pi)^(2j+1)/(2j+1)!.
      truncation: sin's Taylor remainder after x^(2n+1) at |x| <= pi/2: (pi/2)^(2n+3) / (2n+3)!;
      coefficients: sum_j |c_j - a_j| (1/4)^(2j+1);
      rounding, to first order in U: s = fl(t t) = t^2 (1 + d), |d| <= U; Horner's
        q_n = c_n, q_j = fl(fl(q_(j+1) s) + c_j) carries s e_(j+1) from q_(j+1)'s error e_(j+1),
        2 U s |q_(j+1)| from s's rounding and the product's, U |q_j| from the sum's; c = fl(t q_0)
        adds U |t q_0|. Multiplied out: |c error| <= U (|t q_0| + sum_(j<n) |t| s^j (2 s |q_(j+1)|
        + |q_j|)), and |t| s^j |q_j| is the tail from term j, at most T_j (sin_taylor_terms);
        |t q_0| is the polynomial, within truncation + coefficients of |sin| <= 1, so it counts
        as T_0' = 1 + those. Summed: U (2 T_0' + 3 (T_1 + ... + T_(n-1)) + 2 T_n).
      second order (products of two roundings, at most 16 of them on a term, the terms summing to
      sinh(pi/2) < 2.31): below 16^2 U^2 2.31 < 2.2e-12; 1e-11 covers it."""
    n = len(coefs) - 1
    exact = [
        -((-1) ** j) * (2 * math.pi) ** (2 * j + 1) / math.factorial(2 * j + 1)
        for j in range(n + 1)
    ]
    truncation = (math.pi / 2) ** (2 * n + 3) / math.factorial(2 * n + 3)
    coefficients = sum(
        abs(c - a) * 0.25 ** (2 * j + 1) for j, (c, a) in enumerate(zip(coefs, exact))
    )
    terms = sin_taylor_terms(coefs)
    t0 = 1 + truncation + coefficients
    rounding = U * (2 * t0 + 3 * sum(terms[1:n]) + 2 * terms[n])
    return truncation + coefficients + rounding + 1e-11


def library_cos_argument_error() -> float:
    """How far the library cos's argument fl(fl32(2 pi) * u2) is from 2 pi u2: the constant's
    rounding times u2 < 1, plus the product's rounding, half an ulp of a value below 8 (2^-22)."""
    return abs(float(torch.tensor(2 * math.pi, dtype=torch.float32)) - 2 * math.pi) + 2.0**-22


def normal_z_exact_error(normal_z: str, log_ulp=1.0, cos_ulp=1.0, sqrt_ulp=0.5) -> float:
    """Largest |z - z_exact| of zo/rng.py's normal z with the given cos (NORMAL_Z), z_exact =
    sqrt(-2 ln u1) cos(2 pi u2) exactly, on the same 24-bit u1, u2. With C the cos's absolute
    error (poly_cos_error(); for the library's, cos_ulp U plus its argument's error, |cos'| <= 1):
    r = sqrt(-2 log u1) within relative U (log_ulp + 2 sqrt_ulp) of exact (normal_z_error),
    r <= Z_MAX, |c| <= 1 + C, and r * c rounds by relative U, so
    |z - z_exact| <= Z_MAX (C + (1 + C) U (log_ulp + 2 sqrt_ulp + 1))."""
    if normal_z == "poly_cos":
        cos_error = poly_cos_error()
    else:
        cos_error = cos_ulp * U + library_cos_argument_error()
    return Z_MAX * (cos_error + (1 + cos_error) * U * (log_ulp + 2 * sqrt_ulp + 1))


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
