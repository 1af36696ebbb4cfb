"""First-order baseline (`--trainer fo`): backprop with AdamW or SGD, the paper's FT rows.

It mirrors what the original gets from the HF Trainer (large_models/finetune.sh, medium_models
finetune.sh): dropout on (model.train()), linear decay by default, gradient clipping at 1.0,
AdamW with weight decay 0 on biases and LayerNorm weights (the same exemption rule as MeZO:
zo.optim.decays, `wd_exempt`). Same small interface as zo.MeZO, so the
training loop can swap trainers: `step(model, loss_fn) -> loss`, `learning_rate()`, `global_step`,
`state_dict()` / `load_state_dict()`.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .optim import WD_EXEMPT, build_optimizer, check_schedule, learning_rate, micro_batches, set_lr


@dataclass
class FOConfig:
    lr: float = 1e-5
    optimizer: str = "adam"  # "adam" | "adamw" (both AdamW) | "sgd", as train.py --optimizer
    weight_decay: float = 0.0
    # names exempt from weight decay (zo.optim.decays); () decays all
    wd_exempt: tuple[str, ...] = WD_EXEMPT
    momentum: float = 0.0  # sgd
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_scheduler: str = "linear"  # HF default; "constant"
    warmup_steps: int = 0
    max_steps: int = 0
    clip_grad_norm: float | None = 1.0  # HF max_grad_norm; None disables

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(
                f"unknown optimizer (optimizer={self.optimizer!r}; expected 'adam', 'adamw' or "
                "'sgd')"
            )
        check_schedule(self.lr_scheduler, self.max_steps, self.warmup_steps)


class FO:
    def __init__(self, model: nn.Module, config: FOConfig | None = None):
        self.cfg = cfg = config or FOConfig()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(
            "sgd" if cfg.optimizer == "sgd" else "adam",
            named,
            cfg.lr,
            cfg.weight_decay,
            cfg.wd_exempt,
            cfg.momentum,
            cfg.adam_betas,
            cfg.adam_eps,
        )
        self.global_step = 0

    def learning_rate(self) -> float:
        c = self.cfg
        return learning_rate(self.global_step, c.lr, c.lr_scheduler, c.max_steps, c.warmup_steps)

    def step(self, model: nn.Module, loss_fn) -> torch.Tensor:
        """One optimizer step; `loss_fn` is a closure or a list of micro-batch closures (gradient
        accumulation: each loss divided by their number). Returns the mean loss (device tensor)."""
        fns = micro_batches(loss_fn)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for fn in fns:
            loss = fn(model)
            (loss / len(fns)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        # a non-finite loss skips the update (a host sync; backprop is not sync-free)
        if torch.isfinite(total):
            if self.cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
            set_lr(self.optimizer, self.learning_rate())
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return total / len(fns)

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.optimizer.load_state_dict(state["optimizer"])
