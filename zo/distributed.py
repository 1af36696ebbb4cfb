"""Data-parallel MeZO under torchrun, replicated or sharded (FSDP2), with the numbers of one
process.

    d = setup(timeout_s=600)                    # torchrun's environment -> a process group (none
    alone) rows = split(global_batch_size, d.rank, d.world_size)   # this rank's examples of the
    GLOBAL batch
    # replicated: every rank holds the whole model
    mezo = MeZO(model.to(d.device), cfg, reduce_losses=d.reduce_losses)
    # sharded: FSDP2 on every block and the root; fp32 master shards, bf16 compute on GPU model =
    shard_model(model, d) mezo = MeZO(model, cfg, local_view=local_view,
    reduce_losses=d.reduce_losses) with d.guard():                             # a lost peer ends
    this rank with one clear error line
        loss, projected_grad = mezo.zo_step(model, loss_fn); mezo.zo_update(model)
    plain = full_model(model)                   # rank 0: a plain CPU model for models.save_model;
    else None d.shutdown()

The loss contract (--batch_size is the global batch, and 1, 2 or N ranks give the same step). MeZO
only needs the two losses L(theta + eps z), L(theta - eps z) of the global batch. Rank r computes
its TERM of that loss from its slice `split(n, r, world)` of the global batch, pre-weighted by its
share of the global normaliser, and `Dist.reduce_losses` SUMs the terms across ranks:

    example-mean losses (classification CE, label-word CE):  term_r = sum_{examples of r} loss_i /
    n_examples token-mean losses (LM loss over option tokens):          term_r = sum_{tokens of r}
    nll_t / n_tokens

where n_examples / n_tokens count the GLOBAL batch; every rank sees the global batch, so it counts
them itself, without communication. (With a loss that returns the local mean: mean_r * n_r / n,
except that a rank with an empty slice contributes 0, not NaN.) In sharded mode that rank must still
run the forward, on its empty batch: FSDP's all-gathers are collectives every rank joins. The sum
equals the single-process loss up to floating-point summation order, the only difference between
world sizes: z is a function of (seed, parameter key, global element index) (zo/rng.py), so the
perturbation and the update are the same numbers on any number of ranks.

Directions across ranks (`Dist.use_directions(G)`, train.py --parallel directions): the ranks form
a G x W/G mesh, rank = g * (W/G) + d. The W/G ranks of direction group g split the batch as above
and sum their terms over the "data" dimension (`reduce_losses`); the G groups each evaluate their
share of the step's z (zo/shares.py) and exchange the losses in one all-gather over the
"directions" dimension (`gather_losses`). Every rank then computes and applies the same N updates:
no parameter is communicated. G = W is pure directions (no reduce), G = 1 data parallelism.

Communication per z (tests/bench/comm_counter.py measures it): replicated, one all-reduce of two
fp32 scalars (8 bytes); sharded, in each of the two forwards one all-gather per FSDP unit (each
block, then the root's own parameters), plus the same 8-byte all-reduce. No reduce-scatter (no
gradients) and no restore pass: the perturbation is applied by zo/perturb.py's hooks to the
transient all-gathered copy, and the update writes each rank's local shard with the z of its global
indices (`local_view`). Sharded mode therefore needs MeZOConfig(perturbation="exact" or "eager"):
the "reference" mode draws torch.normal over whole tensors in place. Build MeZO after shard_model
(it holds the DTensor parameters). With bf16 compute the hooks perturb the bf16 all-gathered copy
(theta rounded to bf16, then theta + eps z rounded again), while the update writes the fp32 master
shards.
"""

import contextlib
import copy
import math
import os
import re
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

# ---------------------------------------------------------------- processes


@dataclass
class Dist:
    """This process's place in the job. world_size 1 without torchrun (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0
    # the mesh (use_directions): rank = direction_group * data_size + data_rank
    direction_groups: int = 1
    data_group: object = None  # the ranks that sum a step's losses (None: all)
    directions_group: object = None  # the ranks whose losses are gathered (one per direction group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """A process group exists (launched by torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def data_size(self) -> int:
        """Ranks that split one batch (all of them in data parallelism, the default)."""
        return self.world_size // self.direction_groups

    @property
    def data_rank(self) -> int:
        return self.rank % self.data_size

    @property
    def direction_group(self) -> int:
        return self.rank // self.data_size

    def use_directions(self, groups: int) -> None:
        """Split the ranks into `groups` direction groups x world/groups data shards (a 2-D mesh,
        row-major: the ranks of a direction group are neighbours, as the GPUs of one host). A
        collective: every rank calls it."""
        if self.world_size % groups:
            raise ValueError(f"{self.world_size} ranks do not split into {groups} direction groups")
        self.direction_groups = groups
        if groups > 1:
            mesh = init_device_mesh(
                self.device.type,
                (groups, self.data_size),
                mesh_dim_names=("directions", "data"),
            )
            self.data_group = mesh.get_group("data")
            self.directions_group = mesh.get_group("directions")

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()

    def shutdown(self) -> None:
        """Every rank reaches this barrier before any tears its group down: a gloo rank that
        destroys its group and exits while rank 0 still writes the run's files can abort
        ("terminate called without an active exception")."""
        if self.grouped:
            with self.guard():
                dist.barrier()
            dist.destroy_process_group()

    def reduce_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """MeZO's `reduce_losses`: SUM across the data ranks of each rank's pre-weighted [loss1,
        loss2] (module docstring); fp32, so the step's only replicated communication is 8 bytes."""
        losses = losses.float()
        if self.grouped:
            dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=self.data_group)
        return losses

    def gather_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """MeZO's `gather_losses`: every direction group's losses (one all-gather), stacked in
        group order: (direction_groups, *losses.shape), fp32."""
        losses = losses.float().contiguous()
        if self.direction_groups == 1:
            return losses[None]
        parts = [torch.empty_like(losses) for _ in range(self.direction_groups)]
        dist.all_gather(parts, losses, group=self.directions_group)
        return torch.stack(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank: one scalar all-reduce, so that ranks
        agree on when to stop (a signal reaches them at different steps)."""
        if not self.grouped:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextlib.contextmanager
    def guard(self):
        """End this rank with exit status 1 when a collective fails (a peer died: its connection was
        reset or closed) or times out (a peer hangs: timeout_s), instead of a traceback or a hang;
        torchrun then stops the other ranks. The first rank to notice prints the one line of the
        job, `error: rank R lost contact with the group (<cause>): <detail> (torch.distributed)`.
        SystemExit, so the caller's `finally` blocks (log flushes) still run."""
        try:
            yield
        except RuntimeError as e:
            # NCCL raises DistError subclasses; gloo plain RuntimeErrors whose message names its
            # source
            if not (isinstance(e, dist.DistError) or "gloo" in str(e)):
                raise
            if _first_to_report():
                print(
                    lost_rank_line(self.rank, self.timeout_s, str(e)), file=sys.stderr, flush=True
                )
            raise SystemExit(1) from None


def lost_rank_line(rank: int, timeout_s: float, message: str) -> str:
    """The error line for a failed collective, naming the cause the message shows."""
    detail = (message.strip().splitlines() or ["no message"])[0]
    # gloo's source location, advice
    detail = re.sub(r"^\[[^\]]*\] ", "", detail).split(". This is typically")[0]
    lowered = detail.lower()
    if "reset by peer" in lowered or "closed by peer" in lowered or "broken pipe" in lowered:
        cause = "a peer's connection dropped: that rank died or was killed"
    elif "timed out" in lowered or "timeout" in lowered:
        cause = f"collective timeout {timeout_s:g} s"  # a peer hangs, or died without closing
    else:
        cause = "a collective failed"
    return f"error: rank {rank} lost contact with the group ({cause}): {detail} (torch.distributed)"


def _first_to_report() -> bool:
    """One line per job: the ranks count their reports in the job's store (held by rank 0's agent).
    When the store is gone with rank 0 (or its agent), the ranks of this host race to create one
    marker file named by the job instead: one line per host."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        return store.add("lost_contact_reports", 1) == 1
    except Exception:  # noqa: BLE001 (any failure of the store: fall back to the marker file)
        job = (
            f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-"
            f"{os.environ.get('MASTER_PORT', 'none')}-{os.getppid()}"
        )
        marker = os.path.join(
            tempfile.gettempdir(), f"mezo-lost-contact-{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}"
        )
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            return False
        except OSError:  # no temporary folder: report rather than stay silent
            return True


def setup(timeout_s: float = 600.0, device: str | None = None) -> Dist:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment): NCCL on cuda:LOCAL_RANK, gloo on CPU. Without torchrun: a plain single process.

    timeout_s bounds every collective: a rank whose peer died or hangs fails after it (see
    Dist.guard). device: "cpu" or "cuda" to override the automatic choice (cuda when available).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"no CUDA device (device={device!r})")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"), timeout_s=timeout_s)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=dev if use_cuda else None,
    )
    return Dist(rank, world_size, local_rank, dev, timeout_s)


def split(n_items: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous part of n_items: sizes differ by at most one, the first n % world ranks get
    the extra item, and a rank may get none when n_items < world_size (numpy.array_split's rule)."""
    size, extra = divmod(n_items, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


# ---------------------------------------------------------------- sharded mode (FSDP2)

# A meta-device copy of each sharded model's module tree (no storage): full_model fills it on rank
# 0.
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def shard_model(
    model: nn.Module,
    d: Dist,
    mixed_precision: bool | None = None,
    forward_methods: tuple[str, ...] = ("generate",),
) -> nn.Module:
    """Shard `model` in place with FSDP2 over all ranks and return it; build MeZO on it afterwards.

    Units: every child of every nn.ModuleList (the transformer blocks), innermost first, then the
    root (embeddings, final norm, tied head: one unit, so a tied Parameter stays one sharded
    tensor). reshard_after_forward=True on every unit: FSDP2 otherwise keeps the root unsharded
    after a no-grad forward, and an update written then is silently dropped at the next reshard
    (seen with torch 2.13; tests/test_distributed.py compares sharded updates with one process).
    mixed_precision (default: on CUDA): fp32 master shards, bf16 all-gather and compute, fp32
    reduce. forward_methods: methods other than forward that call submodules directly
    (OPT.generate), made to all-gather like forward does.
    """
    if mixed_precision is None:
        mixed_precision = d.device.type == "cuda"
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    _SKELETONS[model] = _meta_copy(model)
    for module in reversed(list(model.modules())):  # descendants before ancestors
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    for name in forward_methods:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def local_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """MeZO's `local_view` for FSDP2 parameters: (this rank's shard, global flat index of its first
    element). FSDP2 shards dim 0 in torch.chunk blocks, so the shard is one contiguous run of the
    row-major flattened tensor starting at row_offset * (elements per row)."""
    if not isinstance(t, DTensor):
        raise ValueError(
            f"expected a sharded DTensor parameter, got {type(t).__name__} of shape "
            f"{tuple(t.shape)}: FSDP2 leaves a unit unsharded unless reshard_after_forward=True "
            "(shard_model)"
        )
    if any(not (p.is_replicate() or (isinstance(p, Shard) and p.dim == 0)) for p in t.placements):
        raise ValueError(
            f"only dim-0 sharding maps a shard to one run of global indices ({t.placements})"
        )
    row_offset = _global_offset(t)[0] if t.ndim else 0
    return t.to_local().detach(), row_offset * math.prod(t.shape[1:])


def _global_offset(t: DTensor) -> tuple[int, ...]:
    # Private torch API (torch.distributed.tensor._utils), isolated here: the global coordinates of
    # this rank's shard, with FSDP2's uneven torch.chunk rule (ranks past the end get empty shards).
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, plain state dict gathered to CPU on rank 0 ({} on the other ranks); every rank must
    call it (it all-gathers each sharded tensor)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def full_model(model: nn.Module) -> nn.Module | None:
    """On rank 0, a plain model to hand to models.save_model (a Hugging Face checkpoint); None on
    the other ranks. Sharded: a CPU copy holding the gathered weights, tied parameters still tied
    (collective: every rank calls it). Not sharded (replicated or one process): the model itself."""
    if model not in _SKELETONS:
        return model if not dist.is_initialized() or dist.get_rank() == 0 else None
    state = full_state_dict(model)
    if not state:
        return None
    plain = copy.deepcopy(_SKELETONS[model])  # meta tensors: copying costs nothing
    new: dict[int, nn.Parameter] = {}
    buffers = dict(model.named_buffers(remove_duplicate=False))  # FSDP2 does not shard buffers
    for prefix, module in plain.named_modules(remove_duplicate=False):
        prefix = prefix + "." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(state[prefix + name], requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = buffers[prefix + name].detach().cpu()
    return plain


def _meta_copy(model: nn.Module) -> nn.Module:
    """The module tree with every parameter and buffer replaced by a meta tensor of its shape."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else meta
        )
    return copy.deepcopy(model, memo)
