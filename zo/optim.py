"""Learning-rate and sample schedules, weight-decay groups and torch optimizers (MeZO and FO).

The schedules reproduce the Hugging Face values the original used (`get_constant_schedule*`,
`get_linear_schedule_with_warmup` through `LambdaLR`): the lr applied at update `step` (0-based) is
the scheduler's value *before* `lr_scheduler.step()`, i.e. `_get_learning_rate()` in
large_models/trainer.py, computed with the same float operations.
"""

import torch

LR_SCHEDULES = ("constant", "linear")
SAMPLE_SCHEDULES = ("constant", "linear")


def learning_rate(
    step: int, base_lr: float, schedule: str, max_steps: int, warmup_steps: int = 0
) -> float:
    """HF LambdaLR value: base_lr * factor(step)."""
    if step < warmup_steps:
        return base_lr * (float(step) / float(max(1, warmup_steps)))
    if schedule == "constant":
        return base_lr * 1.0
    return base_lr * max(0.0, float(max_steps - step) / float(max(1, max_steps - warmup_steps)))


def num_samples(step: int, n: int, schedule: str, max_steps: int) -> int:
    """Number of z per step for n-SPSA (medium_models trainer.py `get_num_samples`)."""
    if schedule == "linear":
        return max(1, int(step / max_steps * n))
    return n


def micro_batches(loss_fn) -> list:
    """A step's loss closures: one, or the list of its micro-batches (gradient accumulation)."""
    return list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]


def check_schedule(
    schedule: str, max_steps: int, warmup_steps: int, what: str = "lr_scheduler"
) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown schedule ({what}={schedule!r}; expected one of {LR_SCHEDULES})")
    if schedule == "linear" and max_steps <= 0:
        raise ValueError(
            f"a linear schedule needs max_steps > 0 ({what}=linear, max_steps={max_steps})"
        )
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0 (warmup_steps={warmup_steps})")


# The one weight-decay policy of MeZO and FO: a parameter decays unless one of these substrings
# occurs in its name, compared case-insensitively. This is the list of large_models/trainer.py
# zo_update (OPT: biases and LayerNorms exempt); case-insensitive, it also exempts RoBERTa's
# `LayerNorm` names and LLaMA's `*_layernorm`. wd_exempt=() decays every parameter, as
# medium_models' ZO update and the RoBERTa runs of the original do.
WD_EXEMPT = ("bias", "layer_norm", "layernorm")


def decays(name: str, wd_exempt: tuple[str, ...]) -> bool:
    """Weight decay applies to `name` unless a substring of wd_exempt occurs in it (any case)."""
    name = name.lower()
    return not any(s.lower() in name for s in wd_exempt)


def build_optimizer(
    kind: str,
    named_params,
    lr: float,
    weight_decay: float,
    wd_exempt: tuple[str, ...],
    momentum: float = 0.0,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """SGD (coupled weight decay, as MeZO's update) or AdamW (decoupled, as HF/medium_models'
    AdamW),
    with weight decay 0 for the exempt names."""
    named_params = list(named_params)
    groups = [
        {
            "params": [p for n, p in named_params if decays(n, wd_exempt)],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in named_params if not decays(n, wd_exempt)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "adam":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer (optimizer={kind!r})")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
