"""LOZO (Chen et al., ICLR 2025, "Enhancing Zeroth-order Fine-tuning for Language Models with
Low-rank Structures"; the authors' large_models/LOZOtrainer.py `lowrank_zo_perturb_parameters`,
`lowrank_zo_update`): a low-rank z for each weight matrix.

    W (m x n, a parameter of 2 or more dims):  z = U V^T   U (m x r) drawn every step,
                                                           V (n x r) every nu steps, kept between
    any other parameter (biases, norms):       z ~ N(0, 1) elementwise, as MeZO (the authors' code
                                               does the same for ndim < 2)

The step is MeZO's: projected_grad = (L(theta + eps z) - L(theta - eps z)) / (2 eps), then
theta <- theta - lr (g z + wd theta); like the authors' code, no 1/r factor (lr absorbs it). U and V
come from the counter-based hash (zo/rng.py): U from the step's seed, V from the seed of the step
that drew it (the last step t with t mod nu = 0), each with its own key per parameter, so replay
(the trajectory holds that seed) and resume (`state_dict`: that seed) rebuild them bitwise. z is
materialised per matrix inside a forward hook or the update (m x n floats, as large as the transient
perturbed copy), never kept. Defaults r = 2, nu = 50: the authors' README (OPT-13B, full parameter).

Not supported: FSDP (a shard's z needs the whole U V^T), CUDA graphs, the reference mode and the
variance-modified variants. LOZO-M (momentum on the low-rank factor) is not implemented.
"""

import torch

from .directions import Dense
from .kernels import Kernels
from .part import ALL, MEMORY_BYTES, Field, at_least
from .perturb import StepScalar
from .rng import name_key, normal


class LOZO(Dense):
    NAME = "lozo"
    FIELDS = (
        Field("lozo", False, bool, "LOZO: z = U V^T of rank --lozo_rank per weight matrix"),
        Field("lozo_rank", 2, int, "LOZO: rank r of z = U V^T (the authors' RANK)", at_least(1)),
        Field("lozo_nu", 50, int, "LOZO: V is redrawn every nu steps (STEP_INTERVAL)", at_least(1)),
    )
    TAG = ("lozo", "lozo_rank", "LOZO r={}")

    def __init__(self, slots, cfg, compiled: bool):
        super().__init__(slots, cfg, compiled)
        self.nu = cfg.lozo_nu
        device = slots[0].param.device
        self.v_seed = StepScalar(torch.int64, device)  # seed of the step that drew V
        self.v_keys = {
            s: torch.full((), name_key(f"{s.name}#V"), dtype=torch.int64, device=device)
            for s in slots
        }
        self.low_rank = _kernels(cfg.lozo_rank, cfg.normal_z)
        # z of the largest matrix materialises U [rows, r] and V [cols, r]: refused now, not as an
        # allocation failure at the first step
        sizes = [s.param.shape[0] + s.param[0].numel() for s in slots if s.param.dim() >= 2]
        needed = max(sizes, default=0) * cfg.lozo_rank * 4
        if needed > MEMORY_BYTES:
            raise ValueError(
                f"LOZO's U and V of rank {cfg.lozo_rank} take {needed} bytes, more than this "
                f"machine's memory ({MEMORY_BYTES} bytes) (lozo_rank={cfg.lozo_rank})"
            )

    @staticmethod
    def selected(cfg) -> bool:
        return cfg.lozo

    @staticmethod
    def supports(cfg) -> frozenset:
        return ALL - {"cuda_graphs", "fsdp", "reference", "variants"}

    def kernels(self, slot) -> Kernels:
        return self.low_rank if slot.param.dim() >= 2 else self.dense

    def args(self, slot) -> dict:
        if slot.param.dim() < 2:
            return {}
        return {
            "rows": slot.param.shape[0],
            "v_seed": self.v_seed.tensor,
            "v_key": self.v_keys[slot],
        }

    def update_many(self, slot, n: int):
        """A matrix's n updates one after another (each materialises its U V^T)."""
        if slot.param.dim() < 2:
            return super().update_many(slot, n)

        def update_many_(p, seeds, grads, wds, **args):
            for k in range(n):
                self.low_rank.update_(p, seed=seeds[k], grad=grads[k], wd=wds[k], **args)

        return update_many_

    def prepare(self, step: int, seeds: list[int]) -> None:
        if step % self.nu == 0:
            self.v_seed.set(seeds[0])

    def state_dict(self):
        return {"v_seed": self.v_seed.value}

    def load_state_dict(self, state) -> None:
        if state is not None and state["v_seed"] is not None:
            self.v_seed.set(state["v_seed"])


def _kernels(rank: int, normal_z: str) -> Kernels:
    """The fused kernels' three operations with z = U V^T (plain torch: one matmul per matrix), U
    and V normal z with normal_z's cos."""

    def z(like, seed, key, v_seed, v_key, rows):
        zero = torch.zeros((), dtype=torch.int64, device=like.device)
        cols = like.numel() // rows
        u = normal(seed, key, zero, rows * rank, like.device, normal_z).view(rows, rank)
        v = normal(v_seed, v_key, zero, cols * rank, like.device, normal_z).view(cols, rank)
        return (u @ v.T).reshape(-1)

    def compute(t):
        return t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def perturb_(p, seed, key, offset, scale, rows, v_seed, v_key):
        pf = compute(p)
        p.view(-1).copy_((pf + scale * z(p, seed, key, v_seed, v_key, rows)).to(p.dtype))

    @torch.no_grad()
    def perturbed_(out, src, seed, key, offset, scale, rows, v_seed, v_key):
        sf = compute(src)
        out.view(-1).copy_((sf + scale * z(src, seed, key, v_seed, v_key, rows)).to(src.dtype))

    @torch.no_grad()
    def update_(p, seed, key, offset, lr, grad, wd, rows, v_seed, v_key):
        pf = compute(p)
        step = grad * z(p, seed, key, v_seed, v_key, rows) + wd * pf
        p.view(-1).copy_((pf - lr * step).to(p.dtype))

    @torch.no_grad()
    def perturbed_pair_(out, src, minus, seed, key, offset, scale, rows, v_seed, v_key):
        sf = compute(src)
        step = scale * z(src, seed, key, v_seed, v_key, rows)
        out.view(-1).copy_((sf + step).to(src.dtype))
        minus.view(-1).copy_((sf - step).to(src.dtype))

    return Kernels(perturb_, perturbed_, update_, perturbed_pair_)
