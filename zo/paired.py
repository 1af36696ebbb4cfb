"""The paired step (`perturbation="paired"`): both forwards of an SPSA estimate as one forward over
2B rows, each owning module computing theta + eps z and theta - eps z from one evaluation of z.

Today's exact restore (zo/perturb.py) evaluates z three times per weight and step: in the +eps
forward, in the -eps forward, and in the update. Here the loss closure runs the model once on its
batch stacked twice (rows [0, B) and [B, 2B), `PairedLoss.paired`), and the forward of every module
that owns a trainable parameter is replaced, for that forward only, by `PairedHooks._paired`:

    W+, W- = W + eps z, W - eps z          one kernel, one z (kernels.py perturbed_pair_)
    out    = cat(forward(first half) with W+, forward(second half) with W-)

so z is evaluated twice a step (this forward, then the unchanged update), no weight is written and
nothing is restored. Each half of an owning module runs with bitwise the weights today's forwards
see (perturbed_pair_ is bitwise perturbed_ with +eps and with -eps) on the same B rows.

Which arguments carry the rows: the row count R = 2B is known from the paired call; a tensor
argument (positional or keyword, also inside a tuple or list) whose dim 0 is R is split in halves,
anything else is passed whole to both halves, and each half's output tensors must have B rows (then
they are concatenated). A module called with no argument of R rows is an error. A tensor that is
not a row tensor but has R as its dim 0 would be split wrongly: `PairedLoss.pairable` declines a
batch whose other dimensions (its sequence length, say) equal R, and the step then runs today's two
forwards (a sharded step, whose ranks must run the same forwards, raises instead).

Nesting: inside one half of an owning module (a LoRA wrapper, an attention module owning prefix
parameters), a child that owns trainable parameters too sees that half's sign for all its rows
(today's single transient copy).

Memory: at most the two transient copies of one module's weights exist at a time, with two
exceptions kept small. An nn.Embedding perturbs only the rows it gathers (z is a function of the
element index: row * D + column; kernels.py perturbed_at_), and a tied nn.Linear head (its weight
the embedding's) pairs HEAD_CHUNK rows of the table at a time, so the perturbed pair of the
vocabulary table never exists whole. Any other tied parameter is paired once, at its first owner,
and both copies are kept until the forward ends.

Falls back to today's two forwards (said here, done by zo/mezo.py): a loss closure that is not a
`PairedLoss` (a library caller's own loss) and a batch that is not pairable. FZOO's one-sided
forwards have no pair: zo/fzoo.py refuses perturbation=paired, and train.py refuses greedy
generations (the non-differentiable objective) with it.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .perturb import ExactRestore, PerturbHooks

# rows of a tied head's weight perturbed at a time: 4096 x 576 fp32 (SmolLM2) is 9 MiB a copy
HEAD_CHUNK = 4096


@dataclass(frozen=True)
class PairedLoss:
    """A micro-batch's loss closure that can also score both signs in one forward.

    loss(model) -> 0-d: the batch's loss (today's closure; also what the exact path calls).
    paired(model) -> [2]: one forward over the batch stacked twice; the loss of rows [0, B) and the
        loss of rows [B, 2B), each over the original batch's B rows.
    inputs: the model inputs of the batch (B rows each in dim 0).
    """

    loss: Callable[[nn.Module], torch.Tensor]
    paired: Callable[[nn.Module], torch.Tensor]
    inputs: tuple[torch.Tensor, ...]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.loss(model)

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    def pairable(self) -> bool:
        """Rows are told apart by a dim 0 of 2B: no other dimension of the inputs may be 2B."""
        others = {d for t in self.inputs for d in t.shape[1:]}
        return all(t.shape[0] == self.rows for t in self.inputs) and 2 * self.rows not in others


def _halves(value, rows: int, found: list):
    """(first half, second half) of an argument: split along dim 0 when it has `rows` rows."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
        found.append(True)
        return value[: rows // 2], value[rows // 2 :]
    if isinstance(value, (tuple, list)):
        pairs = [_halves(v, rows, found) for v in value]
        return type(value)(a for a, _ in pairs), type(value)(b for _, b in pairs)
    return value, value


def _cat(first, second, rows: int, module: nn.Module):
    """The two halves' outputs as one output of 2 * rows rows."""
    if isinstance(first, torch.Tensor):
        if first.dim() == 0 or first.shape[0] != rows or second.shape[0] != rows:
            raise ValueError(
                f"the paired step needs each half of a module's output to keep its {rows} rows "
                f"in dim 0 ({type(module).__name__} returned {tuple(first.shape)}); use "
                "perturbation='exact'"
            )
        return torch.cat([first, second])
    if isinstance(first, (tuple, list)):
        return type(first)(_cat(a, b, rows, module) for a, b in zip(first, second))
    if first is None:
        return None
    raise ValueError(
        f"the paired step cannot join a module's {type(first).__name__} output "
        f"({type(module).__name__}); use perturbation='exact'"
    )


class PairedHooks(PerturbHooks):
    """PerturbHooks plus the paired forward: `activate_pair(seed, scales)`, then `rows(R)` around
    each paired model call. While paired, each owning module's `forward` is an instance attribute
    that runs its halves (removed again by `deactivate`)."""

    def __init__(self, slots, direction, keep_pool: bool = False):
        super().__init__(slots, direction, keep_pool)
        self.num_rows: int | None = None  # R of the paired call now running
        self.sign: float | None = None  # inside an owning module's half: +1 or -1
        self.pair_scales: dict = {}
        self.shared_pairs: dict = {}  # tied slot -> (W+, W-), this forward
        self.replaced: dict[nn.Module, object] = {}  # module -> its own instance `forward`, if any
        self.offsets: dict[int, torch.Tensor] = {}  # global offsets of the head's chunks

    def activate_pair(self, seed: torch.Tensor, scales: dict) -> None:
        self.deactivate(end_of_step=False)
        self.seed, self.pair_scales = seed, scales
        for module in self.owned:
            own = module.__dict__.get("forward")
            self.replaced[module] = own
            forward = own if own is not None else module.forward
            module.forward = self._paired_forward(module, forward)

    def deactivate(self, end_of_step: bool = True) -> None:
        for module, own in self.replaced.items():
            del module.forward
            if own is not None:
                module.forward = own
        self.replaced, self.pair_scales, self.sign = {}, {}, None
        self._release_pairs()
        super().deactivate(end_of_step)

    @contextlib.contextmanager
    def rows(self, num_rows: int):
        """Around one paired model call over num_rows = 2B rows."""
        self.num_rows = num_rows
        try:
            yield
        finally:
            self.num_rows = None
            self._release_pairs()

    def _paired_forward(self, module: nn.Module, forward):
        def paired(*args, **kwargs):
            if self.num_rows is None:  # a call outside the paired forward: unperturbed
                return forward(*args, **kwargs)
            if self.sign is not None:  # inside an enclosing owner's half: that half, all rows
                return self._one_sign(module, forward, args, kwargs)
            found: list = []
            a_halves = _halves(list(args), self.num_rows, found)
            k_halves = {k: _halves(v, self.num_rows, found) for k, v in kwargs.items()}
            if not found:
                raise ValueError(
                    f"the paired step found no argument with the batch's {self.num_rows} rows in "
                    f"dim 0 ({type(module).__name__}); use perturbation='exact'"
                )
            if self._rows_only(module):  # an embedding: the rows it gathers, not the table
                return self._embedding_rows(module, args[0])
            if self._by_chunks(module):  # a tied head: the pair a chunk of the vocabulary at a time
                return self._head_chunks(module, args[0])
            pairs = self._pairs(module)
            outs = []
            try:
                for half, sign in ((0, 1.0), (1, -1.0)):
                    self.sign = sign
                    for attr, current, weights in pairs:
                        module._parameters[attr] = weights[half].view(current.shape)
                    outs.append(
                        forward(*a_halves[half], **{k: v[half] for k, v in k_halves.items()})
                    )
            finally:
                self.sign = None
                for attr, current, weights in pairs:
                    module._parameters[attr] = current
                    if weights[2]:
                        self._free(weights[0])
                        self._free(weights[1])
            return _cat(*outs, self.num_rows // 2, module)

        return paired

    def _slot(self, module: nn.Module):
        """The perturbed slot of a module whose only perturbed parameter is `weight`, else None."""
        perturbed = [(a, s) for a, s in self.owned[module] if s in self.pair_scales]
        return perturbed[0][1] if [a for a, _ in perturbed] == ["weight"] else None

    def _rows_only(self, module: nn.Module) -> bool:
        slot = self._slot(module)
        return (
            isinstance(module, nn.Embedding)
            and module.max_norm is None
            and slot is not None
            and self.direction.kernels(slot).perturbed_at_ is not None
        )

    def _by_chunks(self, module: nn.Module) -> bool:
        """A Linear whose weight is tied (its pair would otherwise live from the embedding to the
        head) and has more rows than a chunk; its embedding twin perturbs rows only."""
        slot = self._slot(module)
        return (
            isinstance(module, nn.Linear)
            and module.bias is None
            and slot is not None
            and len(slot.owners) > 1
            and module.weight.shape[0] > HEAD_CHUNK
            and all(self._rows_only(m) or m is module for m, _ in slot.owners)
        )

    def _embedding_rows(self, module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Each half's rows of the table, gathered, plus or minus eps z at their global indices
        (row * D + column): bitwise the rows of today's perturbed table, z only where read."""
        slot, weight = self._slot(module), module._parameters["weight"]
        rows = F.embedding(ids, weight.detach())
        width = weight.shape[1]
        index = ids[..., None] * width + torch.arange(width, device=ids.device)
        out, half = torch.empty_like(rows), ids.shape[0] // 2
        scale = self.pair_scales[slot]
        for part, signed in ((slice(None, half), scale), (slice(half, None), -scale)):
            self.direction.kernels(slot).perturbed_at_(
                out[part],
                src=rows[part],
                index=index[part],
                seed=self.seed,
                key=slot.key_t,
                scale=signed,
                **self.direction.args(slot),
            )
        self.seen.add(slot)
        return out

    def _head_chunks(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Both halves' logits, HEAD_CHUNK rows of the weight at a time: the pair of a chunk (at
        its global offset) exists, never the whole perturbed table."""
        slot, weight = self._slot(module), module._parameters["weight"].detach()
        half, width = x.shape[0] // 2, weight.shape[1]
        outs: tuple[list, list] = ([], [])
        for start in range(0, weight.shape[0], HEAD_CHUNK):
            chunk = weight[start : start + HEAD_CHUNK]
            plus, minus = self._buffer(chunk), self._buffer(chunk)
            self.direction.kernels(slot).perturbed_pair_(
                plus,
                src=chunk,
                minus=minus,
                seed=self.seed,
                key=slot.key_t,
                offset=self._offset(start * width),
                scale=self.pair_scales[slot],
                **self.direction.args(slot),
            )
            outs[0].append(F.linear(x[:half], plus.view(chunk.shape)))
            outs[1].append(F.linear(x[half:], minus.view(chunk.shape)))
            self._free(plus)
            self._free(minus)
        self.seen.add(slot)
        return torch.cat([torch.cat(outs[0], -1), torch.cat(outs[1], -1)])

    def _offset(self, value: int) -> torch.Tensor:
        if value not in self.offsets:
            self.offsets[value] = torch.full((), value, dtype=torch.int64, device=self.zero.device)
        return self.offsets[value]

    def _pairs(self, module: nn.Module) -> list:
        """(attr, stored tensor, (W+, W-, free after this module)) of each perturbed parameter."""
        out = []
        for attr, slot in self.owned[module]:
            scale = self.pair_scales.get(slot)
            if scale is None:
                continue
            current = module._parameters[attr]  # the Parameter, or FSDP2's unsharded copy of it
            pair = self.shared_pairs.get(slot)
            if pair is None:
                pair = (*self._perturbed(slot, current, scale, minus=True), len(slot.owners) == 1)
                if len(slot.owners) > 1:
                    self.shared_pairs[slot] = pair
            self.seen.add(slot)
            out.append((attr, current, pair))
        return out

    def _one_sign(self, module: nn.Module, forward, args, kwargs):
        """A nested owner inside one half: one transient copy with the half's sign, as today's
        hooks make it (a tied slot paired already: its copy of that sign)."""
        half = 0 if self.sign > 0 else 1
        swapped = []
        try:
            for attr, slot in self.owned[module]:
                scale = self.pair_scales.get(slot)
                if scale is None:
                    continue
                current = module._parameters[attr]
                pair = self.shared_pairs.get(slot)
                signed = scale if half == 0 else -scale
                buf = None if pair is not None else self._perturbed(slot, current, signed)
                swapped.append((attr, current, buf))
                self.seen.add(slot)
                module._parameters[attr] = (pair[half] if buf is None else buf).view(current.shape)
            return forward(*args, **kwargs)
        finally:
            for attr, current, buf in swapped:
                module._parameters[attr] = current
                if buf is not None:
                    self._free(buf)

    def _release_pairs(self) -> None:
        for plus, minus, _ in self.shared_pairs.values():
            self._free(plus)
            self._free(minus)
        self.shared_pairs = {}


class Paired(ExactRestore):
    """`perturbation="paired"`: exact restore whose two forwards of an SPSA estimate run as one
    (`perturb_pair`, then one `PairedLoss.paired` forward per micro-batch); anything else (FZOO's
    one-sided forwards, a closure that does not pair) runs as ExactRestore does."""

    def __init__(self, slots, direction, local_view):
        super().__init__(slots, direction, local_view)
        self.hooks = PairedHooks(slots, direction)

    def perturb_pair(self, seed, eps: float, cs: dict, slots) -> None:
        """The paired forwards now see theta + eps z in rows [0, B), theta - eps z in [B, 2B)."""
        self.hooks.activate_pair(seed.tensor, self._scales(eps, cs, slots))
