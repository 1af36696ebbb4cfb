"""Shared fixtures of the zo tests: a tiny LM with biases, LayerNorms, dropout and a tied head."""
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
    """Owns the embedding's Parameter object and reads it as self.weight (the hooks' contract, zo/perturb.py)."""

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
    """z of a whole parameter from the eager (uncompiled) formula: the dense oracle of the kernels."""
    t = lambda v: torch.full((), v, dtype=torch.int64)
    return normal(t(seed), slot.key_t, t(0), slot.param.numel(), "cpu").view(slot.param.shape)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of float32 values between a and b (0 for equal values, +0 and -0 included)."""
    def ordered(x):
        i = x.view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()
