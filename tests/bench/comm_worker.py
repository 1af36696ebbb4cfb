"""Worker for bench_comm.py: MeZO steps on the tiny OPT under torchrun, replicated, sharded, then
directions across ranks (one z per rank, N = world size), each step inside CommCounter
(comm_counter.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/bench/comm_worker.py OUT
    [--steps N]

Each rank writes OUT/comm.rank<r>.json: per mode, the collectives of every step (calls and bytes per
op), plus what the model implies: its parameter bytes, the same padded to FSDP2's torch.chunk split
(dim 0 rounded up to a multiple of the world size), and the number of FSDP units; in directions
mode also the median time of the step's one collective, the all-gather of the losses.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from comm_counter import CommCounter  # noqa: E402  (this folder is the script's sys.path[0])

import models  # noqa: E402
from zo import DirectionShare, MeZO, MeZOConfig  # noqa: E402
from zo import distributed as zd  # noqa: E402

ROWS, T = 4, 16  # the global batch: 4 sequences of 16 tokens, split 2/2 over two ranks
GATHERS = 200  # timed all-gathers of one step's losses (directions mode)


def loss_closure(ids, d: zd.Dist):
    """This rank's term of the global token-mean next-token loss (zo/distributed.py docstring); in
    directions mode every rank's share is the whole batch."""
    n_tokens = ids[:, 1:].numel()
    mine = ids[zd.split(len(ids), d.data_rank, d.data_size)]

    def loss_fn(model):
        logits = model(mine, torch.ones_like(mine))[:, :-1].float()
        return (
            F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten(), reduction="sum") / n_tokens
        )

    return loss_fn


def model_bytes(model, world_size: int) -> dict:
    params = list(model.parameters())  # a tied parameter once
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "padded_param_bytes": sum(
            math.ceil(p.shape[0] / world_size) * world_size * p[0].numel() * p.element_size()
            for p in params
        ),
        "fsdp_units": sum(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList))
        + 1,
    }


def gather_us(d: zd.Dist) -> float:
    """Median microseconds of one all-gather of a rank's two losses (a directions step's only
    collective), after a barrier; the worker's ranks share the machine's cores."""
    losses, times = torch.zeros(2), []
    d.barrier()
    for _ in range(GATHERS):
        start = time.perf_counter()
        d.gather_losses(losses)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    d = zd.setup(timeout_s=120, device="cpu")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 1500, (ROWS, T), generator=g) for _ in range(args.steps)]
    record = {"rank": d.rank, "world_size": d.world_size, "steps": args.steps}
    with d.guard():
        for mode in ("replicated", "sharded", "directions"):
            model = models.load_model(models.TINY_OPT)
            info = model_bytes(model, d.world_size)
            kwargs = {"reduce_losses": d.reduce_losses}
            if mode == "sharded":
                model = zd.shard_model(model, d)
                kwargs["local_view"] = zd.local_view
            n_spsa = 1
            if mode == "directions":  # the mesh of train.py --parallel directions, one z a rank
                d.use_directions(d.world_size)
                n_spsa = d.world_size
                kwargs = {"share": DirectionShare(d.direction_group, d.world_size, d.gather_losses)}
            mezo = MeZO(model, MeZOConfig(lr=1e-4, eps=1e-3, n_spsa=n_spsa), **kwargs)
            per_step = []
            for ids in batches:
                with CommCounter() as comm:
                    mezo.step(model, loss_closure(ids, d))
                per_step.append({"calls": comm.calls, "bytes": comm.bytes})
            record[mode] = {**info, "n_spsa": n_spsa, "per_step": per_step}
        record["directions"]["gather_us"] = gather_us(d)
        (args.out / f"comm.rank{d.rank}.json").write_text(json.dumps(record))
        d.barrier()
    d.shutdown()


if __name__ == "__main__":
    main()
