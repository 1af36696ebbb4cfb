"""Worker for tests/test_distributed.py: a few MeZO steps on the tiny OPT, alone or under torchrun.

    python tests/dist_worker.py single OUT                         # one process, no process group
    python tests/dist_worker.py single OUT --n_spsa 2              # two z a step
    torchrun --nproc_per_node 2 --standalone tests/dist_worker.py replicated|sharded OUT
    torchrun ... tests/dist_worker.py directions OUT --n_spsa 2    # each rank one z, whole batch
    torchrun ... tests/dist_worker.py replicated OUT --fail-at 2 --failure exit|hang

Each rank writes OUT/<mode>.rank<r>.json (losses, projected grads and the checks below); rank 0
writes the final full weights to OUT/<mode>.pt. The test asserts on them.
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from comm_counter import CommCounter  # noqa: E402

import models  # noqa: E402
from zo import DirectionShare, MeZO, MeZOConfig, whole  # noqa: E402
from zo import distributed as zd  # noqa: E402

LR, EPS, WD, SEED, STEPS, RESUME_AT = 1e-3, 1e-3, 0.1, 7, 5, 3
VOCAB, POSITIONS = 1499, 513  # odd row counts: the tied embedding/head splits 750/749 over 2 ranks
ROWS, T = 5, 12  # global batch 5 rows (3/2 over 2 ranks); the last step has 1 row (rank 1: empty)


def tiny_opt() -> nn.Module:
    """models.TINY_OPT with its tied vocabulary and position tables cut to odd sizes."""
    model = models.load_model(models.TINY_OPT)
    dec = model.decoder
    vocab = nn.Parameter(dec.embed_tokens.weight.detach()[:VOCAB].clone())
    dec.embed_tokens.weight = model.lm_head.weight = vocab
    dec.embed_tokens.num_embeddings = model.lm_head.out_features = model.config.vocab_size = VOCAB
    dec.embed_positions.weight = nn.Parameter(
        dec.embed_positions.weight.detach()[:POSITIONS].clone()
    )
    dec.embed_positions.num_embeddings = POSITIONS
    model.config.max_position_embeddings = POSITIONS - 2  # OPT's learned positions are offset by 2
    return model


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded (ids, attention_mask) per step, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for step in range(STEPS):
        n = 1 if step == STEPS - 1 else ROWS
        ids = torch.randint(3, VOCAB, (n, T), generator=g)
        lengths = torch.randint(4, T + 1, (n,), generator=g)
        mask = (torch.arange(T) >= T - lengths[:, None]).long()
        batches.append((ids.masked_fill(mask == 0, 1), mask))
    return batches


def loss_closure(ids, mask, d: zd.Dist, single: bool):
    """Token-mean next-token cross-entropy of the GLOBAL batch. One process: the plain mean. Ranks:
    the sum over this rank's rows divided by the global number of target tokens
    (zo/distributed.py)."""
    rows = zd.split(len(ids), d.data_rank, d.data_size)
    n_tokens = int(mask[:, 1:].sum())
    ids, mask = ids[rows].to(d.device), mask[rows].to(d.device)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def loss_fn(model):
        # also on an empty slice (collectives)
        logits = model(ids, mask)[:, :-1].float().flatten(0, 1)
        if single:
            return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
        return (
            F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
            / n_tokens
        )

    return loss_fn


def run_steps(mezo, model, batches, d, single, steps, record, fail=None):
    for step in steps:
        if fail is not None and step == fail[0] and d.rank == 1:
            (fail[2] / "failed_at").write_text(repr(time.time()))
            if fail[1] == "exit":
                os._exit(1)
            time.sleep(3600)  # "hang": rank 0 must give up after the collective timeout
        with CommCounter() as comm:
            loss, g = mezo.zo_step(model, loss_closure(*batches[step], d, single))
            mezo.zo_update(model)
        record["loss"].append(loss.item())
        record["projected_grad"].append(g.item())
        record["comm"].append({"calls": comm.calls, "bytes": comm.bytes})
        record["all_dtensor_after_step"].append(
            all(isinstance(p, DTensor) for p in model.parameters())
        )


def check_z_slices(mezo) -> list[dict]:
    """Each parameter's local-shard z against the matching slice of the whole tensor's z."""
    seed, one = torch.tensor(123456789), torch.tensor(1.0)
    rows = []
    for s in mezo.slots:
        k = mezo.direction.kernels(s)
        local, offset = zd.local_view(s.param)
        z_local, z_full = torch.zeros(local.numel()), torch.zeros(s.param.numel())
        k.perturb_(z_local, seed=seed, key=s.key_t, offset=torch.tensor(offset), scale=one)
        k.perturb_(z_full, seed=seed, key=s.key_t, offset=torch.tensor(0), scale=one)
        rows.append(
            {
                "name": s.name,
                "rows": s.param.shape[0],
                "local_rows": local.shape[0],
                "offset": offset,
                "equal": torch.equal(z_local, z_full[offset : offset + local.numel()]),
            }
        )
    return rows


def probe_hooks(model) -> tuple[list, object]:
    """Pre-forward hooks that record what zo's hooks will perturb (registered before theirs)."""
    seen, handles = [], []
    for name in ("decoder.embed_tokens", "lm_head", "decoder.layers.0.fc1"):
        module = model.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, name=name: seen.append(
                    [name, type(m.weight).__name__, list(m.weight.shape)]
                )
            )
        )
    return seen, lambda: [h.remove() for h in handles]


def sharded_checks(d, model, mezo, batches, record, out):
    record["z_slices"] = check_z_slices(mezo)
    seen, remove = probe_hooks(model)
    run_steps(mezo, model, batches, d, False, range(RESUME_AT), record)
    remove()
    record["hook_probe"] = seen[:6]  # the two forwards of the first step
    state, mezo_state = zd.full_state_dict(model), copy.deepcopy(mezo.state_dict())
    run_steps(mezo, model, batches, d, False, range(RESUME_AT, STEPS), record)

    # resume: a fresh sharded model (original weights) loads the step-3 state and continues
    resumed = zd.shard_model(tiny_opt(), d)
    # rank 0's full state dict, broadcast; every rank keeps its shard
    set_model_state_dict(
        resumed, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    mezo2 = MeZO(
        resumed,
        MeZOConfig(lr=LR, eps=EPS, weight_decay=WD, seed=SEED),
        local_view=zd.local_view,
        reduce_losses=d.reduce_losses,
    )
    mezo2.load_state_dict(mezo_state)
    again = {"loss": [], "projected_grad": [], "comm": [], "all_dtensor_after_step": []}
    run_steps(mezo2, resumed, batches, d, False, range(RESUME_AT, STEPS), again)
    record["resumed_loss"], record["resumed_projected_grad"] = (
        again["loss"],
        again["projected_grad"],
    )
    final, final_resumed = zd.full_state_dict(model), zd.full_state_dict(resumed)
    record["resumed_weights_equal"] = all(torch.equal(final[n], final_resumed[n]) for n in final)

    # a Hugging Face checkpoint from the gathered weights, and generation through FSDP
    plain = zd.full_model(model)
    ids, mask = batches[0]
    sharded_out = model.generate(ids[:2], mask[:2], max_new_tokens=3)
    with torch.no_grad():
        sharded_logits = model(ids, mask)
    if d.is_main:
        models.save_model(plain, out / "hf")
        loaded = models.load_model(out / "hf")
        record["hf_roundtrip_equal"] = all(
            torch.equal(loaded.state_dict()[n], final[n]) for n in final
        )
        record["plain_tied"] = plain.lm_head.weight is plain.decoder.embed_tokens.weight
        plain_out = plain.generate(ids[:2], mask[:2], max_new_tokens=3)
        record["generate_equal"] = torch.equal(plain_out, sharded_out)
        with torch.no_grad():
            record["forward_equal"] = torch.equal(plain(ids, mask), sharded_logits)
    return final


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "replicated", "sharded", "directions"])
    ap.add_argument("--n_spsa", type=int, default=1)
    ap.add_argument("out", type=Path)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--fail-at", type=int)
    ap.add_argument("--failure", choices=["exit", "hang"], default="exit")
    args = ap.parse_args()
    d = zd.setup(timeout_s=args.timeout, device="cpu")
    single = args.mode == "single"
    assert (d.world_size == 1 and not d.grouped) if single else d.world_size == 2
    if args.mode == "directions":  # every rank its own direction group: no data shards to sum
        d.use_directions(d.world_size)
    batches = global_batches()
    record = {
        "rank": d.rank,
        "world_size": d.world_size,
        "loss": [],
        "projected_grad": [],
        "comm": [],
        "all_dtensor_after_step": [],
    }
    with d.guard():
        model = tiny_opt().to(d.device)
        if args.mode == "sharded":
            model = zd.shard_model(model, d)
        local_view = zd.local_view if args.mode == "sharded" else whole
        shared = args.mode == "directions"
        mezo = MeZO(
            model,
            MeZOConfig(lr=LR, eps=EPS, weight_decay=WD, seed=SEED, n_spsa=args.n_spsa),
            local_view=local_view,
            reduce_losses=None if shared else d.reduce_losses,
            share=DirectionShare(d.direction_group, d.direction_groups, d.gather_losses)
            if shared
            else DirectionShare(),
        )
        if args.mode == "sharded":
            final = sharded_checks(d, model, mezo, batches, record, args.out)
        else:
            fail = None if args.fail_at is None else (args.fail_at, args.failure, args.out)
            run_steps(mezo, model, batches, d, single or shared, range(STEPS), record, fail)
            final = zd.full_state_dict(model) if d.grouped else model.state_dict()
        (args.out / f"{args.mode}.rank{d.rank}.json").write_text(json.dumps(record))
        if d.is_main:
            torch.save(final, args.out / f"{args.mode}.pt")
        d.barrier()
    d.shutdown()


if __name__ == "__main__":
    main()
