"""Issue 32: the variance-modified variants on a step's micro-batches."""
import torch

from helpers_zo import lm_batch, lm_loss, tiny_lm
from zo import MeZO, MeZOConfig


# --- the variants' control variates from the step's micro-batches ------------------------------------------
def test_grad_norm_c_is_the_gradient_norm_of_the_steps_micro_batches():
    """train.py passes a step's micro-batch closures as a list (one per accumulation step); c_g is
    ||grad_g|| of their mean loss, the loss zo_forward estimates."""
    ids = lm_batch(n=6)
    parts = [lm_loss(ids[:3]), lm_loss(ids[3:])]
    model = tiny_lm()
    mean = sum(fn(model.eval()) for fn in parts) / len(parts)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(mean, list(model.parameters()))))
    mezo = MeZO(model, MeZOConfig(zo_variant="grad_norm", perturbation="eager"))  # eager: nothing compiled
    mezo.initialize_c(model, parts)  # as zo_step's first call and train.py's epoch start
    for group, c in mezo.cs.items():
        norms = [grads[s.name] for s in mezo.slots if s.group == group]
        expected = torch.sqrt(sum((g**2).sum() for g in norms))
        n = sum(g.numel() for g in norms)  # fp32 sums of n squares in another order: (n + 1) u each
        assert (c - expected).abs() <= 2 * (n + 1) * 2.0**-24 * expected, group
    assert all(p.grad is None for p in model.parameters())
