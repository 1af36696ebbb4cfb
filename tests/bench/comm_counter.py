"""CommCounter: the collectives issued through torch.distributed while it is active, counted per
operation with their payload bytes (bench_comm.py's workers and tests/dist_worker.py use it)."""

import torch
import torch.distributed as dist


class CommCounter:
    """Counts the collectives issued through torch.distributed while active (FSDP2's all-gathers
    and reduce-scatters go through these functions too), per operation:

        with CommCounter() as comm:
            mezo.step(model, loss_fn)
        comm.calls == {"all_gather_single": 6, "all_reduce": 1}; comm.bytes[...]; comm.total_bytes

    Bytes are the payload: the size of the collective's largest buffer (all-reduce / broadcast: the
    tensor; all-gather: the gathered output; reduce-scatter: the input). A collective called from
    inside another (deprecated aliases) counts once, as the outer one. Functional collectives
    (DTensor redistribution, e.g. inside full_state_dict) are not counted.
    """

    OPS = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "broadcast",
        "reduce",
        "all_to_all",
        "all_to_all_single",
    )

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._saved: list = []
        self._depth = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __enter__(self) -> "CommCounter":
        # holds the functions; torch.distributed re-exports them
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):
            for op in self.OPS:
                if hasattr(module, op):
                    self._saved.append((module, op, getattr(module, op)))
                    setattr(module, op, self._counting(op, getattr(module, op)))
        return self

    def __exit__(self, *exc) -> None:
        for module, op, fn in reversed(self._saved):
            setattr(module, op, fn)
        self._saved = []

    def _counting(self, op: str, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls[op] = self.calls.get(op, 0) + 1
                self.bytes[op] = self.bytes.get(op, 0) + max(
                    map(_nbytes, [*args, *kwargs.values()]), default=0
                )
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0
