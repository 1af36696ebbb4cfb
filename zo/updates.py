"""Update rules: turn a step's (seed, projected_grad) estimates into a parameter change. Each owns
its state (`state_dict` / `load_state_dict`, saved in checkpoints under "optimizer").

- `ZOSGD` (optimizer="sgd", MeZO): theta <- theta - lr * (sum_k g_k z_k + wd * theta), one fused
  pass per z (large_models/trainer.py zo_update), weight decay once per step; nothing materialised.
- `TorchOptimizer` (optimizer="momentum": torch SGD with momentum; "adam": AdamW): p.grad = sum_k
  g_k z_k, then the torch optimizer's step (medium_models `--zero_order_use_trainer_optim`): one
  extra copy of the trainable weights plus the optimizer's state.
"""

import torch

from .directions import ALL
from .optim import build_optimizer, set_lr


class ZOSGD:
    def __init__(self, slots, cfg):
        self.cfg = cfg

    @staticmethod
    def supports(cfg) -> frozenset:
        return ALL

    @staticmethod
    def requires(cfg) -> frozenset:
        return frozenset()

    def apply(self, mezo, estimates, lr: float) -> None:
        for k, (seed, g) in enumerate(estimates):
            mezo.zo_random_seed = seed
            mezo.perturbation.update(
                mezo.seed, mezo.lr, mezo.grad_scales(g), self.cfg.weight_decay if k == 0 else 0.0
            )

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass


class TorchOptimizer:
    def __init__(self, slots, cfg):
        self.cfg, self.params = cfg, [s.param for s in slots]
        self.optimizer = build_optimizer(
            "sgd" if cfg.optimizer == "momentum" else "adam",
            [(s.name, s.param) for s in slots],
            cfg.lr,
            cfg.weight_decay,
            cfg.wd_exempt,
            cfg.momentum,
            cfg.adam_betas,
            cfg.adam_eps,
        )

    @staticmethod
    def supports(cfg) -> frozenset:
        return ALL - {"cuda_graphs"}  # the torch optimizer steps from host code

    @staticmethod
    def requires(cfg) -> frozenset:
        return frozenset({"dense_grad"})  # p.grad = g * z, materialised

    def apply(self, mezo, estimates, lr: float) -> None:
        for seed, g in estimates:
            mezo.zo_random_seed = seed
            mezo.perturbation.accumulate_grad(mezo.seed, mezo.grad_scales(g))
        if self.cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        for p in self.params:
            p.grad = None  # the dense g*z lives only inside the update

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state)
