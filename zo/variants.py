"""Control variates c of the variance-modified ZO variants (MeZO paper Appendix B;
medium_models/src/trainer.py `initialize_c`, `norm_perturb_parameters`).

Each parameter group g ('embed', 'lm_head', 'layer.{i}.' / 'layers.{i}.', see `cv_group`) gets a
scale c_g. The step perturbs with z/c_g; the gradient estimate uses z*c_g (variance-modified,
unbiased) or plain z with `change_grad_estimate` (expectation-modified: a normalised gradient).
Parameters outside every group use plain z. Here:

- `param_norm`: c_g = ||theta_g||;
- `grad_norm`: c_g = ||grad_g|| from one backward pass (the original's default), or with
  `use_zo_grad_est` c_g = |projected_grad| from a two-forward estimate that perturbs only group g
  (that one lives in `MeZO.initialize_c`, since it needs the step's machinery).

A c of 0 (a group with zero norm) is replaced by 1, as the original's `zo_by_layer` does; its
`norm_perturb_parameters` would divide by zero.
"""

import torch
from torch import nn

from .optim import micro_batches
from .perturb import ParamSlot


def supports(cfg) -> frozenset:
    # the c_g come from data (a backward pass or extra estimates), are not logged, and are per
    # process
    return frozenset({"reference", "dense_grad", "variants"})


def requires(cfg) -> frozenset:
    return frozenset({"variants"})


def groups_of(slots: list[ParamSlot]) -> dict[str, list[ParamSlot]]:
    groups: dict[str, list[ParamSlot]] = {}
    for slot in slots:
        if slot.group is not None:
            groups.setdefault(slot.group, []).append(slot)
    return groups


def _norms(groups: dict[str, list[ParamSlot]], tensor_of) -> dict[str, torch.Tensor]:
    return {
        g: torch.sqrt(sum((tensor_of(s).float() ** 2).sum() for s in gs))
        for g, gs in groups.items()
    }


def param_norms(groups: dict[str, list[ParamSlot]]) -> dict[str, torch.Tensor]:
    return _norms(groups, lambda s: s.param.detach())


def grad_norms(
    model: nn.Module, loss_fn, groups: dict[str, list[ParamSlot]]
) -> dict[str, torch.Tensor]:
    """One real backward pass in eval mode (as the original), then the gradient norm per group. A
    list of micro-batch closures (one step's) gives the gradient of their mean loss, as
    zo_forward."""
    model.eval()
    model.zero_grad(set_to_none=True)
    fns = micro_batches(loss_fn)
    for fn in fns:
        (fn(model) / len(fns)).backward()
    cs = _norms(
        groups, lambda s: s.param.grad if s.param.grad is not None else s.param.new_zeros(())
    )
    model.zero_grad(set_to_none=True)
    return cs


def nonzero(cs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.where(c == 0, torch.ones_like(c), c) for g, c in cs.items()}
