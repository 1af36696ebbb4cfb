"""What a training run is built from: the model (PEFT, sharding), its data (splits, encodings,
batches, loss closures), evaluation on dev and test, the trainer, and how its result is saved.

`Run(args, dist)` reads, never writes, and leaves `args` as it was: what the data decides (split
sizes, the length bound, --num_train_epochs as steps) is in `run.args`, the flags config.json
records. train.py and `train.py --replay` (program/replay.py) build the same Run.
"""

import math
import sys

import numpy as np
import torch

import data
import models
import zo
from data.evaluate import (
    DTYPES,
    chunks,
    dev_loss,
    encode_samples,
    evaluate,
    generate_text,
    to_device,
)
from zo import distributed
from zo.part import MEMORY_BYTES

from . import flags


def paired_loss(loss_of_logits, b: dict, share: float) -> zo.PairedLoss:
    """A micro-batch's closure `loss_of_logits(data.batch_logits(m, b), b) * share`, which can also
    score the batch for both signs of a paired step (zo/paired.py): one forward over the model
    inputs' rows stacked twice (a per-row logits_to_keep too), each half's logits scored with the
    batch's own index tensors."""
    rows = b["input_ids"].shape[0]
    inputs = {
        k: t
        for k, t in b.items()
        if k in ("input_ids", "attention_mask", "position_ids")
        or (k == "logits_to_keep" and t.dim() == 2)
    }
    doubled = {**b, **{k: torch.cat([t, t]) for k, t in inputs.items()}}

    def paired(m):
        logits = data.batch_logits(m, doubled)
        halves = (loss_of_logits(logits[:rows], b), loss_of_logits(logits[rows:], b))
        return torch.stack(halves) * share

    return zo.PairedLoss(
        lambda m: loss_of_logits(data.batch_logits(m, b), b) * share, paired, tuple(inputs.values())
    )


class Run:
    """Model, data and trainer of a run; `out` is its output folder."""

    def __init__(self, args, dist):
        self.dist, self.out = dist, args.output_dir
        path = models.resolve_model_path(args.model)
        self.task = data.get_task(args.task, family=args.family)
        self.model = models.load_model(path, dtype=DTYPES[args.dtype], device=dist.device)
        self.positions = models.max_positions(self.model.config)
        self.tok = models.load_tokenizer(path)
        models.check_tokenizer(self.model, self.tok, path)
        # the base weights, before PEFT (config.json)
        self.fingerprint = models.fingerprint(self.model)
        self.adapter_base = models.base_fingerprints(self.model)  # the adapter file names its base
        # its init encodes num_prefix tokens
        if args.mode == "prefix" and args.num_prefix > self.positions:
            raise models.ModelError(
                f"{args.num_prefix} prefix tokens, the model has {self.positions} positions "
                f"(--num_prefix {args.num_prefix})"
            )
        # a rank the memory cannot hold: refused now, not as an allocation failure
        if args.mode == "lora" and models.lora_bytes(self.model, args.lora_r) > MEMORY_BYTES:
            raise models.ModelError(
                f"LoRA of rank {args.lora_r} adds {models.lora_bytes(self.model, args.lora_r)} "
                f"bytes, more than this machine's memory ({MEMORY_BYTES} bytes) "
                f"(--lora_r {args.lora_r})"
            )
        # LoRA / prefix init: part of the run, replayable
        gen = torch.Generator().manual_seed(args.seed)
        if args.mode == "lora":
            models.apply_lora(self.model, r=args.lora_r, alpha=args.lora_alpha, generator=gen)
        elif args.mode == "prefix":
            models.apply_prefix(self.model, num_prefix=args.num_prefix, generator=gen)
        if args.fsdp:  # after PEFT, so adapters are sharded too; fp32 shards, bf16 compute on GPU
            self.model = distributed.shard_model(self.model, dist)
        self.samples = self.load_samples(args)
        self.args = flags.replace(args, **self.data_settings(args))
        self.encode()
        if args.num_train_epochs:  # HF: epochs x ceil(num_train / batch)
            steps = math.ceil(args.num_train_epochs * self.batches_per_epoch)
            self.args = flags.replace(self.args, max_steps=steps)

    def load_samples(self, a):
        """The train / dev / test examples; every split the run needs is checked now."""
        task = self.task
        if task.family == "roberta":  # k-shot folders: k per class for train and for dev (LM-BFF)
            parts = task.load(a.data_dir, k=a.k, seed=a.train_set_seed)
        else:  # one permutation of train -> train + dev tail; test = permuted validation
            parts = data.opt_splits(
                task, task.load(a.data_dir), a.num_train, a.num_dev, a.num_eval, a.train_set_seed
            )
        if not parts["test"]:  # the run ends by evaluating it: known now, not at its end
            raise data.DataError(
                f"no evaluation examples for {task.name} (--num_eval {a.num_eval})"
            )
        if task.family == "roberta" and task.max_seq_length > self.positions:
            raise data.DataError(
                f"{task.name} prompts take {task.max_seq_length} tokens, the model has "
                f"{self.positions} positions (--model {a.model})"
            )
        return parts

    def data_settings(self, a) -> dict:
        """The flags the data decides: a small split is used whole (config.json records what the
        run used), and the model's positions bound every encoding."""
        settings = {"max_length": min(a.max_length, self.positions)}
        if self.task.family != "roberta":
            splits = {"num_train": "train", "num_dev": "dev", "num_eval": "test"}
            settings.update({flag: len(self.samples[s]) for flag, s in splits.items()})
        return settings

    def encode(self):
        a, task = self.args, self.task
        # run.py: without a dev set the trainer evaluates (and selects) on the evaluation set
        self.selection_split = "dev" if self.samples["dev"] else "test"
        if self.selection_split == "test" and a.select_by:
            print(
                f"no dev examples (--num_dev {a.num_dev}): model selection uses the evaluation "
                "set, as the original's run.py",
                file=sys.stderr,
            )
        self.kind = data.batch_kind(
            task,
            training=True,
            train_as_classification=a.train_as_classification,
            non_diff=a.non_diff,
        )
        self.encoded = {
            split: encode_samples(
                task,
                self.samples[split],
                self.tok,
                generation_with_gold=True,
                max_length=a.max_length,
                bos_override=not a.no_bos_override,
            )
            for split in ("train", self.selection_split)
        }
        if not self.encoded["train"]:
            raise data.DataError(
                f"no training examples for {task.name} "
                f"(--data_dir {a.data_dir or data.SAMPLES_DIR})"
            )
        self.batches_per_epoch = math.ceil(len(self.encoded["train"]) / a.batch_size)

    def batch(self, step):
        """The global batch of a step: epoch-wise permutation seeded by (seed, epoch),
        drop_last=False, so any step's batch is known without replaying the data order."""
        epoch, i = divmod(step, self.batches_per_epoch)
        rows = self.encoded["train"]
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(rows))
        size = self.args.batch_size
        return [rows[j] for j in order[i * size : (i + 1) * size]]

    def weight(self, examples):
        """What the loss averages over: option tokens for the token-mean LM loss, else examples."""
        if self.kind == "option_lm":
            return sum(e.option_len[e.correct[0]] for e in examples)
        return len(examples)

    def loss_fns(self, examples):
        """One closure per micro-batch (one z across them). With data parallelism each rank scores
        its slice and weights it by its share of the global normaliser, so the all-reduced SUM is
        the single-process loss (with directions across ranks: the ranks of a direction group)."""
        a, closures = self.args, []
        for micro in chunks(examples, math.ceil(len(examples) / a.gradient_accumulation_steps)):
            d = self.dist  # the ranks of one direction group split its batch
            local = micro[distributed.split(len(micro), d.data_rank, d.data_size)]
            share = self.weight(local) / self.weight(micro)
            if not local:  # still run the (empty) forward: FSDP's all-gathers need every rank
                empty = torch.zeros((0, 8), dtype=torch.long, device=self.dist.device)
                closures.append(
                    zo.PairedLoss(
                        lambda m, e=empty: m(e, e).sum() * 0.0,
                        lambda m, e=empty: m(e, e).sum() * torch.zeros(2, device=e.device),
                        (empty,),
                    )
                )
                continue
            b = to_device(self.collate(local), self.dist.device)
            if a.non_diff and self.task.family == "roberta":  # -accuracy (--optimize_acc)
                closures.append(paired_loss(data.neg_accuracy, b, share))
            elif a.non_diff:  # -F1 of greedy generations (zo_forward_nondiff): never paired
                closures.append(
                    lambda m, b=b, s=share: (
                        data.neg_f1(
                            generate_text(m, self.tok, b, max_length=a.max_length), b["gold"]
                        )
                        * s
                    )
                )
            else:
                closures.append(paired_loss(data.task_loss, b, share))
        return closures

    def closure_of_batch(self, b):
        """The loss closure of a whole collated batch on the device (a CUDA-graph step's)."""
        return paired_loss(data.task_loss, b, 1.0)

    def shared(self):
        """Shared-prompt scoring, unless asked for the original's per-candidate sequences
        (reference mode keeps them: its promise is the original's run, bitwise)."""
        return not (self.args.per_candidate or self.args.perturbation == "reference")

    def collate(self, examples):
        return data.collate(examples, self.kind, self.tok.pad_token_id, shared=self.shared())

    def evaluate_dev(self, with_metric):
        """Dev loss on the training encoding (HF `evaluate`) and dev accuracy from the same
        forwards; when selection or reporting needs it, the task metric of a generation task; on
        the evaluation set when there is no dev set (run.py)."""
        kind = "option_lm" if self.kind == "prompt" else self.kind
        split = self.selection_split
        out = dev_loss(
            self.model,
            self.encoded[split],
            kind,
            self.tok.pad_token_id,
            self.args.eval_batch_size,
            shared=self.shared(),
        )
        if with_metric and "accuracy" not in out:
            out.update(self.test_metrics(self.samples[split]))
        return out

    def test_metrics(self, samples):
        a = self.args
        return evaluate(
            self.model,
            self.tok,
            self.task,
            samples,
            batch_size=a.eval_batch_size,
            max_length=a.max_length,
            bos_override=not a.no_bos_override,
            shared=self.shared(),
        )

    def trainer(self):
        if self.args.trainer == "fo":
            return zo.FO(self.model, flags.fo_config(self.args))
        return zo.MeZO(self.model, flags.mezo_config(self.args), **self.mezo_kwargs())

    def mezo_kwargs(self):
        """Replicated: all-reduce the two losses; sharded: also update local shards at global
        indices; directions across ranks: this rank's seeds, the losses gathered."""
        d, kwargs = self.dist, {}
        if d.grouped and not (d.direction_groups > 1 and d.data_size == 1):  # shards to sum
            kwargs["reduce_losses"] = d.reduce_losses
        if d.direction_groups > 1:
            kwargs["share"] = zo.DirectionShare(
                d.direction_group, d.direction_groups, d.gather_losses
            )
        return {**kwargs, "local_view": distributed.local_view} if self.args.fsdp else kwargs

    def save_model(self, path):
        """ft: a Hugging Face checkpoint; lora / prefix: an adapter file that eval.py --adapter
        reads. Sharded models are gathered first (a collective); rank 0 writes."""
        a = self.args
        model = distributed.full_model(self.model) if a.fsdp else self.model
        if not self.dist.is_main:
            return
        if a.mode == "ft":
            models.save_model(model, path, tokenizer_dir=models.resolve_model_path(a.model))
            return
        keys = ("mode", "lora_r", "lora_alpha", "num_prefix")
        meta = {**{k: getattr(a, k) for k in keys}, "base_model": a.model, **self.adapter_base}
        models.save_adapter(model, path + ".adapter.safetensors", meta)
