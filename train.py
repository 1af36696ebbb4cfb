"""MeZO fine-tuning (Malladi et al. 2023): `torchrun --nproc 8 train.py --task SST2 --mode ft`.

The loop reads side by side with the original's `_inner_training_loop` (large_models/trainer.py,
search "MeZO added") and `run.py main`: per batch `zo_step` then `zo_update`; the mean L(theta+eps
z) logged every `logging_steps`; dev loss at every multiple of `eval_steps`, keeping the best model
(lowest dev loss for OPT, highest dev accuracy for RoBERTa, as the original; `--select_by` changes
it; a run never evaluated, and a --non_diff run, keep the last model); at the end the selected model
is evaluated on dev and test. `--trainer fo` swaps in backprop (the FT rows).
"""

import json
import math
import os
import sys
import time

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
from data.files import atomic_write
from program import flags
from program import replay as rebuild
from program.checkpoint import (
    find_checkpoint,
    load_trainable,
    restore,
    save_checkpoint,
    save_trainable,
    trainable,
)
from program.folder_lock import hold
from program.json_files import dumps, read_json, write_json
from program.paper import grid, presets
from program.progress import dev_record, logging_record, peak_memory, stop_on_signals
from program.run_folder import (
    check_resumable,
    check_run_folder,
    prepare_run_folder,
    resume_conflicts,
)
from program.trajectory import Trajectory
from zo import distributed

# what --resume may change: where and how fast it runs, and how long (the checkpoint holds the rest)
RESUME_FREE = {
    "resume",
    "overwrite_output_dir",
    "device",
    "dist_timeout",
    "max_steps",
    "eval_batch_size",
    "kind",
}


def model_type(args):
    """The family of --model (`model_type` of its config.json); a --dry-run may name a model that
    is not here (a preset's facebook/opt-13b): then the task decides."""
    try:
        return models.checkpoint.read_config(models.resolve_model_path(args.model)).model_type
    except models.ModelError:
        if not args.dry_run:
            raise
        return None


class Run:
    """Everything a run needs: model, data, trainer, and its output folder."""

    def __init__(self, args, dist):
        self.args, self.dist, self.out = args, dist, args.output_dir
        path = models.resolve_model_path(args.model)
        self.task = data.get_task(args.task, family=args.family)
        self.model = models.load_model(path, dtype=DTYPES[args.dtype], device=dist.device)
        self.positions = models.max_positions(self.model.config)
        self.tok = models.load_tokenizer(path)
        models.check_tokenizer(self.model, self.tok, path)
        # the base weights, before PEFT (config.json)
        self.fingerprint = models.fingerprint(self.model)
        # its init encodes num_prefix tokens
        if args.mode == "prefix" and args.num_prefix > self.positions:
            raise models.ModelError(
                f"{args.num_prefix} prefix tokens, the model has {self.positions} positions "
                f"(--num_prefix {args.num_prefix})"
            )
        # LoRA / prefix init: part of the run, replayable
        gen = torch.Generator().manual_seed(args.seed)
        if args.mode == "lora":
            models.apply_lora(self.model, r=args.lora_r, alpha=args.lora_alpha, generator=gen)
        elif args.mode == "prefix":
            models.apply_prefix(self.model, num_prefix=args.num_prefix, generator=gen)
        if args.fsdp:  # after PEFT, so adapters are sharded too; fp32 shards, bf16 compute on GPU
            self.model = distributed.shard_model(self.model, dist)
        self.load_data()

    def load_data(self):
        a, task = self.args, self.task
        if task.family == "roberta":  # k-shot folders: k per class for train and for dev (LM-BFF)
            parts = task.load(a.data_dir, k=a.k, seed=a.train_set_seed)
        # one permutation of train -> train + dev tail; test = permuted validation (tasks.py
        # sample_train_sets)
        else:
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
        # config.json records what the run used: a small split is used whole
        if task.family != "roberta":
            a.num_train, a.num_dev, a.num_eval = (len(parts[s]) for s in ("train", "dev", "test"))
        # the model's positions bound every encoding
        a.max_length = min(a.max_length, self.positions)
        self.samples = parts
        # run.py: without a dev set the trainer evaluates (and selects) on the evaluation set
        self.selection_split = "dev" if parts["dev"] else "test"
        if self.selection_split == "test" and a.select_by:
            print(
                f"no dev examples (--num_dev {a.num_dev}): model selection uses the evaluation set, as the "
                "original's run.py",
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
                parts[split],
                self.tok,
                generation_with_gold=True,
                max_length=a.max_length,
                bos_override=not a.no_bos_override,
            )
            for split in ("train", self.selection_split)
        }
        if not self.encoded["train"]:
            raise data.DataError(
                f"no training examples for {task.name} (--data_dir {a.data_dir or data.SAMPLES_DIR})"
            )
        self.batches_per_epoch = math.ceil(len(self.encoded["train"]) / a.batch_size)
        if a.num_train_epochs:  # HF: epochs x ceil(num_train / batch)
            a.max_steps = math.ceil(a.num_train_epochs * self.batches_per_epoch)

    def batch(self, step):
        """The global batch of a step: epoch-wise permutation seeded by (seed, epoch),
        drop_last=False,
        so any step's batch is known without replaying the data order (exact resume)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.args.seed, epoch]).permutation(
            len(self.encoded["train"])
        )
        return [
            self.encoded["train"][j]
            for j in order[i * self.args.batch_size : (i + 1) * self.args.batch_size]
        ]

    def weight(self, examples):
        """What the loss averages over: option tokens for the token-mean LM loss, else examples."""
        if self.kind == "option_lm":
            return sum(e.option_len[e.correct[0]] for e in examples)
        return len(examples)

    def loss_fns(self, examples):
        """One closure per micro-batch (one z across them). With data parallelism each rank scores
        its slice and weights it by its share of the global normaliser, so the all-reduced SUM is
        the single-process loss."""
        a, closures = self.args, []
        for micro in chunks(examples, math.ceil(len(examples) / a.gradient_accumulation_steps)):
            local = micro[distributed.split(len(micro), self.dist.rank, self.dist.world_size)]
            share = self.weight(local) / self.weight(micro)
            if not local:  # still run the (empty) forward: FSDP's all-gathers need every rank
                empty = torch.zeros((0, 8), dtype=torch.long, device=self.dist.device)
                closures.append(lambda m, e=empty: m(e, e).sum() * 0.0)
                continue
            b = to_device(self.collate(local), self.dist.device)
            # -accuracy (medium_models --optimize_acc)
            if a.non_diff and self.task.family == "roberta":
                closures.append(
                    lambda m, b=b, s=share: data.neg_accuracy(data.batch_logits(m, b), b) * s
                )
            elif a.non_diff:  # -F1 of greedy generations (zo_forward_nondiff)
                closures.append(
                    lambda m, b=b, s=share: (
                        data.neg_f1(
                            generate_text(m, self.tok, b, max_length=a.max_length), b["gold"]
                        )
                        * s
                    )
                )
            else:
                closures.append(lambda m, b=b, s=share: data.batch_loss(m, b) * s)
        return closures

    def shared(self):
        """Shared-prompt scoring, unless asked for the original's per-candidate sequences (reference
        mode keeps them: its promise is the original's run, bitwise)."""
        return not (self.args.per_candidate or self.args.perturbation == "reference")

    def collate(self, examples):
        return data.collate(examples, self.kind, self.tok.pad_token_id, shared=self.shared())

    def evaluate_dev(self, with_metric):
        """Dev loss on the training encoding (HF `evaluate`) and dev accuracy from the same
        forwards; when selection or reporting needs it, the task metric of a generation task; on
        the evaluation
        set when there is no dev set (run.py)."""
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
        a = self.args
        if a.trainer == "fo":
            return zo.FO(self.model, flags.fo_config(a))
        return zo.MeZO(self.model, flags.mezo_config(a), **self.mezo_kwargs())

    def mezo_kwargs(self):
        """Replicated: all-reduce the two losses; sharded: also update local shards at global
        indices."""
        kwargs = {"reduce_losses": self.dist.reduce_losses} if self.dist.grouped else {}
        return {**kwargs, "local_view": distributed.local_view} if self.args.fsdp else kwargs


def start(run):
    """The trainer and the loop's state: restored from the checkpoint on --resume, else fresh, with
    torch's RNG (dropout) seeded by --seed. Reads only: a corrupt checkpoint fails before any
    write."""
    trainer = run.trainer()
    if run.args.resume:
        loop = restore(find_checkpoint(os.path.join(run.out, "checkpoint")), run.model, trainer)
        check_resumable(run.out, run.model, loop, trajectory=run.args.trainer == "zo")
        return trainer, loop
    torch.manual_seed(run.args.seed)
    return trainer, {
        "best": None,
        "best_step": None,
        "nonfinite": 0,
        "nonfinite_run": 0,
        "metrics_lines": 0,
    }


def train(run, trainer, state):
    """The original's _inner_training_loop for MeZO (trainer.py "MeZO added"), and run.py's final
    evaluation."""
    a, model, dist, out = run.args, run.model, run.dist, run.out
    ckpt = os.path.join(out, "checkpoint")
    trajectory = None
    if a.trainer == "zo" and dist.is_main:
        trajectory = trainer.trajectory = Trajectory(
            os.path.join(out, "trajectory.jsonl"), keep_before_step=trainer.global_step
        )
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if dist.is_main else None
    if metrics and a.resume:  # drop lines written after the checkpoint
        metrics.close()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            atomic_write(
                os.path.join(out, "metrics.jsonl"), "".join(f.readlines()[: state["metrics_lines"]])
            )
        metrics = open(os.path.join(out, "metrics.jsonl"), "a")

    def log(record):
        # curves of different estimators share this x-axis (README: "Estimators")
        if a.trainer == "zo":
            record["forward_passes"] = trainer.forward_passes
        if metrics:
            metrics.write(dumps(record) + "\n")
            metrics.flush()
            state["metrics_lines"] += 1

    def checkpoint():
        if trajectory:
            trajectory.flush()
        state["window"] = [float(x) for x in window]  # the losses of the unfinished logging window
        save_checkpoint(
            ckpt,
            model,
            {"trainer": trainer.state_dict(), "torch_rng": torch.get_rng_state(), "loop": state},
            write=dist.is_main,
        )
        dist.barrier()

    graphed = None
    if a.cuda_graphs:  # the same MeZO step, replayed as a CUDA graph per batch shape (zo/graphs.py)
        graphed = zo.CudaGraphStep(trainer, model, data.batch_loss)
    window = [torch.tensor(x) for x in state.get("window", [])]
    # the base model's point of the curves
    if a.eval_on_start and a.select_by and trainer.global_step == 0:
        log(
            dev_record(
                run.evaluate_dev(with_metric=a.select_by == "accuracy"),
                step=0,
                max_steps=a.max_steps,
                show=dist.is_main,
            )
        )
    t0, start_step, interrupted = time.time(), trainer.global_step, False
    with stop_on_signals() as stop:  # the original's --save_on_interrupt; handlers restored after
        while trainer.global_step < a.max_steps and not interrupted:
            step = trainer.global_step
            loss_fns = run.loss_fns(run.batch(step)) if graphed is None else None
            if graphed is not None:
                tr_loss_step = graphed(to_device(run.collate(run.batch(step)), dist.device))
            elif a.trainer == "zo":
                if a.recompute_norms and step > 0 and step % run.batches_per_epoch == 0:
                    # medium_models: control variates per epoch
                    trainer.initialize_c(model, loss_fns[0])
                tr_loss_step, _ = trainer.zo_step(model, loss_fns)  # MeZO added: estimate gradient
                trainer.zo_update(model)  # MeZO added: update model with the estimated gradient
            else:
                tr_loss_step = trainer.step(model, loss_fns)  # training_step + optimizer.step
            window.append(tr_loss_step)
            last = step + 1 == a.max_steps
            if (step + 1) % a.logging_steps == 0 or last:
                log(
                    logging_record(
                        window,
                        state,
                        step=step + 1,
                        max_steps=a.max_steps,
                        lr=trainer.learning_rate(),
                        steps_per_s=(trainer.global_step - start_step) / (time.time() - t0),
                        device=dist.device,
                        max_nonfinite=a.max_nonfinite,
                        show=dist.is_main,
                    )
                )
                window = []
                # ranks agree on stopping here (one scalar per logging window), a lone process at
                # once
                interrupted = dist.any(bool(stop))
            elif stop and not dist.grouped:
                interrupted = True
            if a.select_by and ((step + 1) % a.eval_steps == 0 or last and a.eval_final_step):
                dev = run.evaluate_dev(with_metric=a.select_by == "accuracy")
                log(dev_record(dev, step=step + 1, max_steps=a.max_steps, show=dist.is_main))
                score = (
                    -dev["loss"]
                    if a.select_by == "loss"
                    else next(v for k, v in dev.items() if k != "loss")
                )
                # load_best_model_at_end
                if math.isfinite(score) and (state["best"] is None or score > state["best"]):
                    state["best"], state["best_step"], state["best_dev"] = score, step + 1, dev
                    save_trainable(model, os.path.join(out, "best.safetensors"), write=dist.is_main)
            if (step + 1) % a.save_steps == 0 or interrupted:
                checkpoint()
    if interrupted:
        print(
            f"\ninterrupted at step {trainer.global_step}: checkpoint saved, continue with --resume",
            file=sys.stderr,
        )
        return 130
    if trajectory:
        trajectory.flush()
    finish(run, state, (time.time() - t0) / max(trainer.global_step - start_step, 1))
    return 0


def finish(run, state, time_per_step):
    """run.py: load the best model, evaluate it on dev and test, write results and the model. A run
    never evaluated keeps its last model (HF without an evaluation: the original's non-diff
    runs)."""
    a, model, out = run.args, run.model, run.out
    if state["best_step"] is None:
        why = (
            "never evaluated during training (--non_diff without --select_by)"
            if not a.select_by
            else f"never evaluated during training (no step up to --max_steps {a.max_steps} is a multiple of "
            f"--eval_steps {a.eval_steps})"
            if a.max_steps < a.eval_steps and not a.eval_final_step
            else f"no model selected: every dev {a.select_by} was non-finite (NaN or inf)"
        )
        print(f"\nkeeping the last model: {why}", file=sys.stderr)
    else:
        load_trainable(model, os.path.join(out, "best.safetensors"))
    selection = (
        "last" if state["best_step"] is None else run.selection_split.replace("test", "eval")
    )
    dev = state.get("best_dev")  # the selected model's dev metrics, measured when it was selected
    # none, or no metric beside the loss
    if run.selection_split == "dev" and (dev is None or len(dev) == 1):
        dev = run.evaluate_dev(with_metric=True)
    results = {
        "dev": dev if run.selection_split == "dev" else {},
        "test": run.test_metrics(run.samples["test"]),
        "num_test": len(run.samples["test"]),
        "selection": selection,
        "best_step": state["best_step"] or a.max_steps,
        "nonfinite_losses": state["nonfinite"],
        "peak_memory_bytes": peak_memory(run.dist.device),
        "time_per_step_s": time_per_step,
        "device": str(run.dist.device),
        "num_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable(model).values()),
    }
    save_result_model(run, os.path.join(out, "model"))
    if run.dist.is_main:
        write_json(os.path.join(out, "results.json"), results)
        print(f"\n{json.dumps({k: results[k] for k in ('dev', 'test', 'selection', 'best_step')})}")
    return results


def save_result_model(run, path):
    """ft: a Hugging Face checkpoint; lora / prefix: an adapter file that eval.py --adapter reads.
    Sharded models are gathered first (a collective); rank 0 writes."""
    a = run.args
    model = distributed.full_model(run.model) if a.fsdp else run.model
    if not run.dist.is_main:
        return
    if a.mode == "ft":
        models.save_model(model, path, tokenizer_dir=models.resolve_model_path(a.model))
    else:
        meta = {
            "mode": a.mode,
            "lora_r": a.lora_r,
            "lora_alpha": a.lora_alpha,
            "num_prefix": a.num_prefix,
            "base_model": a.model,
        }
        models.save_adapter(model, path + ".adapter.safetensors", meta)


def main(argv=None):
    lock = (
        None  # the output folder's, from its check to the end of the run (program/folder_lock.py)
    )
    try:
        args = flags.parse_args(argv)
        args.model = args.model or models.TINY_OPT
        if args.list_presets:
            print("\n".join(f"{n}: {presets.describe(n)}" for n in presets.list_presets()))
            return 0
        if args.grid or args.slurm:  # program/paper/grid.py runs or scripts every point of --preset
            return grid.main(
                args, flags.explicit_flags(argv), [sys.executable, os.path.abspath(__file__)]
            )
        flags.check_values(args)
        dist = distributed.setup(
            args.dist_timeout, device=None if args.device == "auto" else args.device
        )
        if args.replay:
            return rebuild.replay(args, dist, Run, save_result_model)
        if args.resume:  # the run's config.json supplies every flag not given now
            saved = read_json(
                os.path.join(
                    check_run_folder(args.output_dir, resume=True, overwrite=False), "config.json"
                )
            )
            args = flags.resumed_args(argv, saved)
        flags.resolve(args, model_type(args))
        if args.dry_run:
            print(json.dumps(vars(args), indent=1))
            return 0
        # everything is checked before anything is written: folder, model, data, checkpoint
        args.model, args.data_dir = (
            os.path.realpath(p) if p and os.path.isdir(p) else p
            for p in (args.model, args.data_dir)
        )
        reads = [
            ("model", str(models.resolve_model_path(args.model))),
            ("data", args.data_dir or data.SAMPLES_DIR),
        ]
        args.output_dir = check_run_folder(
            args.output_dir,
            resume=args.resume,
            overwrite=args.overwrite_output_dir,
            protected=reads,
        )
        lock = hold(args.output_dir, dist)
        run = Run(args, dist)
        changed = (
            resume_conflicts(
                saved, {**vars(args), "base_fingerprint": run.fingerprint}, RESUME_FREE
            )
            if args.resume
            else []
        )
        if changed:
            raise ValueError(
                f"--resume with other settings than the run's: {', '.join(changed)} "
                f"({args.output_dir}/config.json)"
            )
        trainer, state = start(run)
        if dist.is_main:
            prepare_run_folder(args.output_dir, resume=args.resume)
            os.makedirs(args.output_dir, exist_ok=True)
            write_json(
                os.path.join(args.output_dir, "config.json"),
                {**vars(args), "kind": "train", "base_fingerprint": run.fingerprint},
            )
        dist.barrier()  # rank 0 prepared the folder before any rank writes into it
    except ValueError as e:  # ModelError, DataError and bad values: one line, exit 2
        if lock is not None:
            lock.abandon()  # nothing was written: the folder is as it was
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with dist.guard():  # a lost rank ends the others with one error line, not a hang
            try:
                code = train(run, trainer, state)
            except FloatingPointError as e:  # a diverged run: one line, not a traceback
                print(f"\nerror: {e}", file=sys.stderr)
                code = 1
    finally:
        lock.release()
    dist.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
