"""The original's MeZO step, transcribed once: the oracle of every test that compares against it.

Source: princeton-nlp/MeZO at commit 552cb1b710767f9a6e1dc8f9645d7640376f9941 (the README pins it),
large_models/trainer.py, `zo_perturb_parameters`, `zo_forward`, `zo_step` and `zo_update`.
Differences from the original are only in how things are passed in: the loss is a closure
`loss_fn(model)` instead of `inputs`, and lr is a constant instead of `self._get_learning_rate()`
(the tests use no scheduler). medium_models/src/trainer.py (RoBERTa) makes the same step but decays
every parameter (its `weight_decay` line has no exemptions) and keeps projected_grad a tensor, which
multiplies an fp32 z exactly as its float value does: `medium_models=True`.
"""

import numpy as np
import torch


def two_sided_estimate(step, model, loss_fn, eps):
    """The body of the original's zo_step after its seed draw: perturb +eps, forward, perturb -2
    eps, forward, restore. Returns (loss1, (loss1 - loss2) / (2 eps) as a tensor). `step` is
    forward, restore. Returns (loss1, (loss1 - loss2) / (2 eps) as a tensor). `step` is anything
    with zo_perturb_parameters(scaling_factor=) and zo_forward(model, loss_fn): OriginalStep or
    zo.MeZO."""
    step.zo_perturb_parameters(scaling_factor=1)
    loss1 = step.zo_forward(model, loss_fn)
    step.zo_perturb_parameters(scaling_factor=-2)
    loss2 = step.zo_forward(model, loss_fn)
    # reset model back to its parameters at start of step
    step.zo_perturb_parameters(scaling_factor=1)
    return loss1, (loss1 - loss2) / (2 * eps)


class OriginalStep:
    """large_models/trainer.py's zo_* methods with their state (named_parameters_to_optim,
    zo_random_seed, projected_grad). The seed comes from numpy's global RNG, which the original's
    Trainer seeds through HF set_seed(args.seed): call np.random.seed(seed) first (or `run`)."""

    def __init__(self, lr, eps, weight_decay, medium_models=False):
        self.lr, self.eps, self.wd, self.medium_models = lr, eps, weight_decay, medium_models

    def zo_perturb_parameters(self, scaling_factor=1):
        torch.manual_seed(self.zo_random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(
                mean=0,
                std=1,
                size=param.data.size(),
                device=param.data.device,
                dtype=param.data.dtype,
            )
            param.data = param.data + scaling_factor * z * self.eps

    def zo_forward(self, model, loss_fn):
        model.eval()
        with torch.inference_mode():
            return loss_fn(model).detach()

    def zo_step(self, model, loss_fn):
        self.named_parameters_to_optim = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
        self.zo_random_seed = np.random.randint(1000000000)
        loss1, projected_grad = two_sided_estimate(self, model, loss_fn, self.eps)
        self.projected_grad = projected_grad.item()
        return loss1

    def zo_update(self, model=None):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(
                mean=0,
                std=1,
                size=param.data.size(),
                device=param.data.device,
                dtype=param.data.dtype,
            )
            if self.medium_models or (
                "bias" not in name and "layer_norm" not in name and "layernorm" not in name
            ):
                param.data = param.data - self.lr * (self.projected_grad * z + self.wd * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)

    def run(self, model, loss_fns, seed=42):
        """np.random.seed(seed), then one zo_step + zo_update per loss_fn; yields each step's
        loss1."""
        np.random.seed(seed)
        for loss_fn in loss_fns:
            loss1 = self.zo_step(model, loss_fn)
            self.zo_update(model)
            yield loss1
