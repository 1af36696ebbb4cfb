"""Update rules: turn a step's (seed, projected_grad) estimates into a parameter change.

- `ZOSGD` (optimizer="sgd", MeZO): theta <- theta - lr * (sum_k g_k z_k + wd * theta), one fused
  pass per z (large_models/trainer.py zo_update), weight decay once per step; nothing materialised.
  The update is MeZO's own (zo/mezo.py `apply_update`): this rule builds nothing.
- `Momentum`, `Adam` (optimizer="sgd" with momentum > 0: torch SGD; "adam"/"adamw": AdamW): MeZO
  accumulates p.grad = sum_k g_k z_k, then `TorchStep` steps the torch optimizer (medium_models
  `--zero_order_use_trainer_optim`): one extra copy of the trainable weights plus the optimizer's
  state, saved in checkpoints under "optimizer".

Their fields have no flags of their own: train.py's --optimizer, --momentum and --max_grad_norm are
shared with the backprop trainer, in the same vocabulary (zo/methods.py `update_rule`).
"""

import torch

from .optim import build_optimizer, set_lr
from .part import ALL, IN_UNIT_INTERVAL, Field, Part


class ZOSGD(Part):
    NAME = "sgd"

    @staticmethod
    def build(slots, cfg) -> None:
        return None  # MeZO's fused update


class TorchOptimizer(Part):
    FIELDS = (Field("clip_grad_norm", None, float),)  # --zero_order_clip_grad
    KIND = ""  # zo.optim.build_optimizer's

    @staticmethod
    def supports(cfg) -> frozenset:
        return ALL - {"cuda_graphs"}  # the torch optimizer steps from host code

    @staticmethod
    def requires(cfg) -> frozenset:
        return frozenset({"dense_grad"})  # p.grad = g * z, materialised

    @classmethod
    def build(cls, slots, cfg) -> "TorchStep":
        return TorchStep(slots, cfg, cls.KIND)


class Momentum(TorchOptimizer):
    NAME, KIND = "momentum", "sgd"
    FIELDS = TorchOptimizer.FIELDS + (Field("momentum", 0.0, float, check=IN_UNIT_INTERVAL),)


class Adam(TorchOptimizer):
    NAME, KIND = "adam", "adam"
    FIELDS = TorchOptimizer.FIELDS + (
        Field("adam_betas", (0.9, 0.999), tuple),
        Field("adam_eps", 1e-8, float),
    )


class TorchStep:
    """The torch optimizer of a run, stepped on the p.grad MeZO accumulated."""

    def __init__(self, slots, cfg, kind: str):
        self.params, self.clip = [s.param for s in slots], cfg.clip_grad_norm
        self.optimizer = build_optimizer(
            kind,
            [(s.name, s.param) for s in slots],
            cfg.lr,
            cfg.weight_decay,
            cfg.wd_exempt,
            cfg.momentum,
            cfg.adam_betas,
            cfg.adam_eps,
        )

    def step(self, lr: float) -> None:
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        for p in self.params:
            p.grad = None  # the dense g*z lives only inside the update

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state)
