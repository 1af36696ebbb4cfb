"""MeZO fine-tuning (Malladi et al. 2023): `torchrun --nproc 8 train.py --task SST2 --mode ft`.

The loop reads side by side with the original's `_inner_training_loop` (large_models/trainer.py,
search "MeZO added") and `run.py main`: per batch `zo_step` then `zo_update`; the mean L(theta+eps z)
logged every `logging_steps`; dev loss every `eval_steps`, keeping the best model (lowest dev loss
for OPT, highest dev accuracy for RoBERTa, as the original; `--select_by` changes it); at the end
the selected model is evaluated on dev and test. `--trainer fo` swaps in backprop (the FT rows).
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch

import data
import models
import zo
from data import presets, report
from zo import distributed
from eval import DTYPES, chunks, encode_samples, evaluate, generate_text, to_device
from zo.checkpoint import (find_checkpoint, load_checkpoint, read_json, save_checkpoint, save_trainable, load_trainable,
                           trainable, write_json, write_lines)

BOOL = dict(nargs="?", const=True, default=None, type=lambda s: s.lower() in ("1", "true", "yes"))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (DESIGN.md 3.7), instead of usage + message
        print(f"error: {message} (command line)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = Parser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--task", default="SST2"), a("--model", default=models.TINY_OPT, help="checkpoint dir or cached hub name")
    a("--mode", choices=("ft", "prefix", "lora"), default="ft"), a("--trainer", choices=("zo", "fo"), default="zo")
    a("--data_dir"), a("--output_dir")
    a("--preset", help="a configuration of the paper (see --list-presets); flags given here override it")
    a("--list-presets", dest="list_presets", action="store_true"), a("--dry-run", dest="dry_run", action="store_true")
    a("--grid", action="store_true", help="run every grid point of --preset under --output_dir, skipping finished ones")
    a("--slurm", metavar="DIR", help="with --preset: write one sbatch script per grid point into DIR")
    a("--nproc", type=int, default=1, help="GPUs per job in --slurm scripts")
    a("--resume", action="store_true"), a("--overwrite_output_dir", action="store_true")
    a("--replay", metavar="RUN_DIR", help="rebuild RUN_DIR's selected model from its base model and trajectory")
    a("--fsdp", action="store_true", help="shard parameters with FSDP2 (torchrun)")
    a("--dist_timeout", type=float, default=600.0, help="seconds before a rank gives up on a lost peer")
    # hyperparameters, with the original's defaults (mezo.sh, run.py, HF TrainingArguments)
    a("--batch_size", type=int, default=16, help="global batch"), a("--learning_rate", type=float, default=1e-5)
    a("--zo_eps", type=float, default=1e-3), a("--max_steps", type=int, default=20000)
    a("--num_train_epochs", type=float), a("--eval_steps", type=int, default=4000), a("--save_steps", type=int)
    a("--logging_steps", type=int, default=10), a("--seed", type=int, default=42)
    a("--train_set_seed", type=int, help="data seed (default 0 for OPT, 42 for RoBERTa)")
    a("--k", type=int, default=16), a("--num_train", type=int), a("--num_dev", type=int)
    a("--num_eval", type=int, default=1000), a("--dtype", choices=DTYPES, default="fp32")
    a("--weight_decay", type=float, default=0.0), a("--lr_scheduler_type", choices=("constant", "linear"))
    a("--optimizer", choices=("sgd", "adam", "adamw")), a("--momentum", type=float, default=0.0)
    a("--num_prefix", type=int, default=5), a("--lora_r", type=int, default=8), a("--lora_alpha", type=float, default=16)
    a("--perturbation", choices=("exact", "reference", "eager"), default="exact")
    a("--distribution", choices=("normal", "rademacher"), default="normal")
    a("--seed_source", choices=("generator", "numpy_global"), default="generator")
    a("--n_spsa", type=int, default=1), a("--n_spsa_schedule", choices=("constant", "linear"), default="constant")
    a("--zo_variant", choices=("param_norm", "grad_norm")), a("--change_grad_estimate", **BOOL)
    a("--recompute_norms", **BOOL), a("--use_zo_grad_est", **BOOL), a("--gradient_accumulation_steps", type=int, default=1)
    a("--select_by", choices=("loss", "accuracy")), a("--non_diff", **BOOL), a("--train_as_classification", **BOOL)
    a("--no_bos_override", **BOOL), a("--max_length", type=int, default=2048), a("--max_grad_norm", type=float, default=1.0)
    a("--max_nonfinite", type=int, default=20, help="stop after this many non-finite losses in a row")
    a("--eval_batch_size", type=int, default=8), a("--device", default="auto", help="auto: cuda:LOCAL_RANK when CUDA is there, else cpu")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.preset:  # the preset becomes the defaults, so flags given on the command line still win
        fixed, grid = presets.resolve(args.preset, args.task, args.k if args.preset.startswith("roberta") else None)
        p.set_defaults(**fixed, **{k: values[0] for k, values in grid.items()})
        args = p.parse_args(argv)
        args.grid_axes = grid
    return args


def resolve(args):
    """Fill the defaults that depend on the model family and trainer; check values (ValueError).
    The family comes from the model's config.json (a --dry-run without the model: from the task)."""
    try:
        family = models.checkpoint.read_config(models.resolve_model_path(args.model)).model_type
    except models.ModelError:
        if not args.dry_run:
            raise
        family = None
    task = data.get_task(args.task, family=family)
    family = task.family
    args.task, args.family = task.name, family
    args.train_set_seed = (0 if family == "opt" else 42) if args.train_set_seed is None else args.train_set_seed
    args.select_by = args.select_by or ("loss" if family == "opt" else "accuracy")
    args.lr_scheduler_type = args.lr_scheduler_type or ("constant" if args.trainer == "zo" else "linear")
    args.optimizer = args.optimizer or ("sgd" if args.trainer == "zo" else "adamw")
    args.save_steps = args.save_steps or args.eval_steps
    if args.num_train is None:  # the original's 1000 (mezo.sh); the bundled samples hold 80 SST-2 rows
        args.num_train = 1000 if args.data_dir else 64
    if args.num_dev is None and not args.data_dir and family == "opt":
        args.num_dev = min(task.num_dev, 16)
    if args.zo_eps <= 0:
        raise ValueError(f"zo_eps must be > 0 (--zo_eps {args.zo_eps})")
    for name in ("batch_size", "logging_steps", "eval_steps", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1 (--{name} {getattr(args, name)})")
    if args.non_diff and args.trainer != "zo":
        raise ValueError("the non-differentiable objective needs --trainer zo (--non_diff)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and (args.trainer == "fo" or args.zo_variant):
        raise ValueError("the backprop baseline and the variance-modified variants run on one process "
                         f"(WORLD_SIZE={world})")
    if args.fsdp and (args.non_diff or args.perturbation == "reference" or args.trainer == "fo"):
        raise ValueError("--fsdp runs MeZO with exact perturbations and a differentiable loss "
                         "(greedy generations differ in length across ranks) (--fsdp)")
    if args.output_dir is None:
        name = os.path.basename(os.path.normpath(str(args.model)))
        args.output_dir = os.path.join("runs", f"{task.name}-{name}-{args.trainer}-{args.mode}-{args.learning_rate}-"
                                       f"{args.zo_eps}-{args.train_set_seed}")
    return task


class Run:
    """Everything a run needs: model, data, trainer, and its output folder."""

    def __init__(self, args, dist):
        self.args, self.dist, self.out = args, dist, args.output_dir
        path = models.resolve_model_path(args.model)
        self.task = data.get_task(args.task, family=args.family)
        self.model = models.load_model(path, dtype=DTYPES[args.dtype], device=dist.device)
        self.tok = models.load_tokenizer(path)
        gen = torch.Generator().manual_seed(args.seed)  # LoRA / prefix init: part of the run, replayable
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
        else:  # one permutation of train -> train + dev tail; test = permuted validation (§2.2)
            parts = data.opt_splits(task, task.load(a.data_dir), a.num_train, a.num_dev, a.num_eval, a.train_set_seed)
        self.samples = parts
        self.kind = data.batch_kind(task, training=True, train_as_classification=a.train_as_classification,
                                    non_diff=a.non_diff)
        self.encoded = {split: encode_samples(task, parts[split], self.tok, generation_with_gold=True,
                                              max_length=a.max_length, bos_override=not a.no_bos_override)
                        for split in ("train", "dev")}
        if not self.encoded["train"]:
            raise data.DataError(f"no training examples for {task.name} (--data_dir {a.data_dir or data.SAMPLES_DIR})")
        self.batches_per_epoch = math.ceil(len(self.encoded["train"]) / a.batch_size)
        if a.num_train_epochs:  # HF: epochs x ceil(num_train / batch)
            a.max_steps = math.ceil(a.num_train_epochs * self.batches_per_epoch)

    def batch(self, step):
        """The global batch of a step: epoch-wise permutation seeded by (seed, epoch), drop_last=False,
        so any step's batch is known without replaying the data order (exact resume)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.encoded["train"]))
        return [self.encoded["train"][j] for j in order[i * self.args.batch_size:(i + 1) * self.args.batch_size]]

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
            b = to_device(data.collate(local, self.kind, self.tok.pad_token_id), self.dist.device)
            if a.non_diff:  # -F1 of greedy generations (zo_forward_nondiff)
                closures.append(lambda m, b=b, s=share: data.neg_f1(generate_text(m, self.tok, b), b["gold"]) * s)
            else:
                closures.append(lambda m, b=b, s=share: data.task_loss(m(b["input_ids"], b["attention_mask"]), b) * s)
        return closures

    @torch.no_grad()
    def evaluate_dev(self, with_metric):
        """Dev loss as HF `evaluate` computes it (training encoding, mean over batches) and, when
        selection or reporting needs it, the task metric."""
        self.model.eval()
        kind = "option_lm" if self.kind == "prompt" else self.kind
        losses = [data.task_loss(self.model(b["input_ids"], b["attention_mask"]), b).float().item()
                  for b in (to_device(data.collate(c, kind, self.tok.pad_token_id), self.dist.device)
                            for c in chunks(self.encoded["dev"], self.args.eval_batch_size))]
        out = {"loss": float(np.mean(losses))}
        if with_metric:
            out.update(self.test_metrics(self.samples["dev"]))
        return out

    def test_metrics(self, samples):
        a = self.args
        return evaluate(self.model, self.tok, self.task, samples, batch_size=a.eval_batch_size,
                        max_length=a.max_length, bos_override=not a.no_bos_override)

    def trainer(self):
        a = self.args
        if a.trainer == "fo":
            return zo.FO(self.model, zo.FOConfig(
                lr=a.learning_rate, optimizer="sgd" if a.optimizer == "sgd" else "adam", weight_decay=a.weight_decay,
                momentum=a.momentum, lr_scheduler=a.lr_scheduler_type, max_steps=a.max_steps, clip_grad_norm=a.max_grad_norm))
        return zo.MeZO(self.model, self.mezo_config(), **self.mezo_kwargs())

    def mezo_kwargs(self):
        """Replicated: all-reduce the two losses; sharded: also update local shards at global indices."""
        kwargs = {"reduce_losses": self.dist.reduce_losses} if self.dist.grouped else {}
        return {**kwargs, "local_view": distributed.local_view} if self.args.fsdp else kwargs

    def mezo_config(self):
        a = self.args
        optimizer = "adam" if a.optimizer in ("adam", "adamw") else ("momentum" if a.momentum else "sgd")
        return zo.MeZOConfig(
            lr=a.learning_rate, eps=a.zo_eps, weight_decay=a.weight_decay, lr_scheduler=a.lr_scheduler_type,
            max_steps=a.max_steps, perturbation={"exact": "fused"}.get(a.perturbation, a.perturbation),
            distribution=a.distribution, seed=a.seed, seed_source=a.seed_source, n_spsa=a.n_spsa,
            n_spsa_schedule=a.n_spsa_schedule, optimizer=optimizer, momentum=a.momentum or 0.9,
            zo_variant=a.zo_variant, change_grad_estimate=bool(a.change_grad_estimate),
            recompute_norms=bool(a.recompute_norms), use_zo_grad_est=bool(a.use_zo_grad_est))


def peak_memory(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:  # VmHWM: the process's resident high-water mark
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def prepare_output_dir(args, dist):
    """A folder holds one run: refuse another run's folder unless --resume or --overwrite_output_dir."""
    config = os.path.join(args.output_dir, "config.json")
    if os.path.exists(config) and not args.resume:
        if not args.overwrite_output_dir:
            raise ValueError(f"output folder belongs to another run; pass --resume or --overwrite_output_dir "
                             f"({args.output_dir})")
        if dist.is_main:
            shutil.rmtree(args.output_dir)
    if args.resume and not find_checkpoint(os.path.join(args.output_dir, "checkpoint")):
        raise ValueError(f"nothing to resume: no checkpoint ({args.output_dir}/checkpoint)")
    if args.resume:  # the same run, or the checkpoint would continue under other hyperparameters
        saved = read_json(config)
        free = {"resume", "overwrite_output_dir", "device", "dist_timeout", "max_steps", "eval_batch_size", "kind"}
        changed = sorted(k for k in saved if k not in free and saved[k] != vars(args).get(k, saved[k]))
        if changed:
            raise ValueError(f"--resume with other settings than the run's: {', '.join(changed)} ({config})")


def train(run):
    """The original's _inner_training_loop for MeZO (trainer.py "MeZO added"), and run.py's final evaluation."""
    a, model, dist, out = run.args, run.model, run.dist, run.out
    ckpt = os.path.join(out, "checkpoint")
    trainer = run.trainer()
    state = {"best": None, "best_step": None, "nonfinite": 0, "nonfinite_run": 0, "metrics_lines": 0}
    if a.resume:
        saved = load_checkpoint(ckpt, model)
        trainer.load_state_dict(saved["trainer"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["loop"]
    trajectory = None
    if a.trainer == "zo" and dist.is_main:
        trajectory = trainer.trajectory = zo.Trajectory(os.path.join(out, "trajectory.jsonl"),
                                                        keep_before_step=trainer.global_step)
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if dist.is_main else None
    if metrics and a.resume:  # drop lines written after the checkpoint
        metrics.close()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            write_lines(os.path.join(out, "metrics.jsonl"), f.readlines()[:state["metrics_lines"]])
        metrics = open(os.path.join(out, "metrics.jsonl"), "a")

    def log(record):
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            state["metrics_lines"] += 1

    def checkpoint():
        if trajectory:
            trajectory.flush()
        state["window"] = [float(x) for x in window]  # the losses of the unfinished logging window
        save_checkpoint(ckpt, model, {"trainer": trainer.state_dict(), "torch_rng": torch.get_rng_state(),
                                      "loop": state}, write=dist.is_main)
        dist.barrier()

    stop = []  # set by SIGINT / SIGTERM (the original's --save_on_interrupt)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    window = [torch.tensor(x) for x in state.get("window", [])]
    t0, start_step, interrupted = time.time(), trainer.global_step, False
    while trainer.global_step < a.max_steps and not interrupted:
        step = trainer.global_step
        loss_fns = run.loss_fns(run.batch(step))
        if a.trainer == "zo":
            if a.recompute_norms and step > 0 and step % run.batches_per_epoch == 0:
                trainer.initialize_c(model, loss_fns[0])  # medium_models: control variates per epoch
            tr_loss_step, _ = trainer.zo_step(model, loss_fns)  # MeZO added: estimate gradient
            trainer.zo_update(model)  # MeZO added: update model with the estimated gradient
        else:
            tr_loss_step = trainer.step(model, loss_fns)  # training_step + optimizer.step
        window.append(tr_loss_step)
        last = step + 1 == a.max_steps
        if (step + 1) % a.logging_steps == 0 or last:
            log(logging_record(run, trainer, state, window, step, t0, start_step))
            window = []
            # ranks agree on stopping here (one scalar per logging window), a lone process at once
            interrupted = dist.any(bool(stop))
        elif stop and not dist.grouped:
            interrupted = True
        if (step + 1) % a.eval_steps == 0 or last:
            dev = run.evaluate_dev(with_metric=a.select_by == "accuracy")
            log({"step": step + 1, **{f"dev_{k}": v for k, v in dev.items()}})
            score = -dev["loss"] if a.select_by == "loss" else next(v for k, v in dev.items() if k != "loss")
            if state["best"] is None or score > state["best"]:  # load_best_model_at_end
                state["best"], state["best_step"] = score, step + 1
                save_trainable(model, os.path.join(out, "best.safetensors"), write=dist.is_main)
        if (step + 1) % a.save_steps == 0 or interrupted:
            checkpoint()
    if interrupted:
        print(f"\ninterrupted at step {trainer.global_step}: checkpoint saved, continue with --resume", file=sys.stderr)
        return 130
    if trajectory:
        trajectory.flush()
    finish(run, state, (time.time() - t0) / max(trainer.global_step - start_step, 1))
    return 0


def logging_record(run, trainer, state, window, step, t0, start_step):
    """HF logs mean(loss1) over the window; here the one host sync of the window. Non-finite losses
    (their updates were skipped) are counted, and a run of them stops training."""
    losses = torch.stack(window).float().cpu()
    for finite in torch.isfinite(losses).tolist():
        state["nonfinite_run"] = 0 if finite else state["nonfinite_run"] + 1
        state["nonfinite"] += not finite
    finite = torch.isfinite(losses)
    speed = (trainer.global_step - start_step) / (time.time() - t0)
    record = {"step": step + 1, "loss": float(losses[finite].mean()) if finite.any() else float("nan"),
              "lr": trainer.learning_rate(), "steps_per_s": speed, "nonfinite": state["nonfinite"],
              "peak_memory_bytes": peak_memory(run.dist.device)}
    if run.dist.is_main:  # a live line: in place on a terminal, one line per window in a log file
        eta = time.strftime("%H:%M:%S", time.gmtime((run.args.max_steps - step - 1) / max(speed, 1e-9)))
        print(f"step {step + 1}/{run.args.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"{speed:.2f} steps/s | ETA {eta}", end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr)
    if state["nonfinite_run"] >= run.args.max_nonfinite:
        raise FloatingPointError(f"{state['nonfinite_run']} non-finite losses in a row at step {step + 1}; "
                                 f"lower --learning_rate or use --dtype fp32 (training)")
    return record


def finish(run, state, time_per_step):
    """run.py: load the best model, evaluate it on dev and test, write results and the model."""
    a, model, out = run.args, run.model, run.out
    load_trainable(model, os.path.join(out, "best.safetensors"))
    results = {"dev": run.evaluate_dev(with_metric=True), "test": run.test_metrics(run.samples["test"]),
               "best_step": state["best_step"], "nonfinite_losses": state["nonfinite"],
               "peak_memory_bytes": peak_memory(run.dist.device), "time_per_step_s": time_per_step,
               "device": str(run.dist.device), "num_params": sum(p.numel() for p in model.parameters()),
               "trainable_params": sum(p.numel() for p in trainable(model).values())}
    save_result_model(run, os.path.join(out, "model"))
    if run.dist.is_main:
        write_json(os.path.join(out, "results.json"), results)
        print(f"\n{json.dumps({'dev': results['dev'], 'test': results['test'], 'best_step': state['best_step']})}")
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
        meta = {"mode": a.mode, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "num_prefix": a.num_prefix,
                "base_model": a.model}
        models.save_adapter(model, path + ".adapter.safetensors", meta)


def replay(args, dist):
    """`--replay RUN_DIR`: the base model + RUN_DIR/trajectory.jsonl up to the selected step gives
    RUN_DIR's saved model bitwise (DESIGN.md 3.5): a MeZO run is its seeds and projected grads."""
    src = args.replay
    config, results = (read_json(os.path.join(src, f)) for f in ("config.json", "results.json"))
    if config.get("trainer") != "zo":
        raise ValueError(f"only ZO runs have a trajectory to replay ({src}/config.json)")
    # --fsdp as given now: the update is elementwise at global indices, so one process replays a
    # sharded run bitwise, and a sharded replay a single-process run
    run_args = argparse.Namespace(**{**config, "output_dir": args.output_dir or src + "-replay",
                                     "device": args.device, "resume": False, "fsdp": args.fsdp})
    if os.path.exists(os.path.join(run_args.output_dir, "config.json")) and not args.overwrite_output_dir:
        raise ValueError(f"output folder belongs to another run; pass --overwrite_output_dir ({run_args.output_dir})")
    run = Run(run_args, dist)
    records = [r for r in zo.read_trajectory(os.path.join(src, "trajectory.jsonl")) if r["step"] < results["best_step"]]
    zo.replay(run.model, records, run.mezo_config(), **{k: v for k, v in run.mezo_kwargs().items() if k == "local_view"})
    os.makedirs(run.out, exist_ok=True)
    save_result_model(run, os.path.join(run.out, "model"))
    if dist.is_main:
        write_json(os.path.join(run.out, "config.json"), {**vars(run_args), "kind": "replay", "replayed_from": src})
        print(f"replayed {len(records)} updates of {src} into {run.out}/model", file=sys.stderr)
    return 0


def grid(args, explicit):
    """`--preset P --grid`: every grid point of P (Tables 15/16) in its own folder under
    --output_dir, finished ones skipped, then the report and the best point by the original's rule;
    `--slurm DIR` writes one sbatch script per point instead. Flags given on the command line (e.g.
    --model, --max_steps) apply to every point."""
    root = args.output_dir or os.path.join("runs", "grid")
    k = args.k if args.preset.startswith("roberta") else None
    points = [{**p, **explicit} for p in presets.grid_points(args.preset, args.task, k)]
    if args.slurm:
        for point in points:
            os.makedirs(args.slurm, exist_ok=True)
            out = os.path.join(root, presets.run_name(point))
            write_lines(os.path.join(args.slurm, presets.run_name(point) + ".sbatch"),
                        [presets.slurm_script({**point, "output_dir": out}, nproc=args.nproc, runs_dir=root)])
        print(f"wrote {len(points)} sbatch scripts to {args.slurm}; submit: for f in {args.slurm}/*.sbatch; do sbatch $f; done")
        return 0
    dirs = presets.run_grid(points, root, [sys.executable, os.path.abspath(__file__)])
    best = report.select_best(report.load_runs(dirs), points[0].get("select_by") or "loss", [])
    print(report.render(dirs))
    print(f"best grid point by the original's rule (dev {points[0].get('select_by') or 'loss'}): {best.path}")
    return 0


def explicit_flags(argv):
    """The flags given on the command line (for --grid: they override every point)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    control = {"grid", "slurm", "preset", "output_dir", "nproc", "task", "k", "list_presets", "dry_run"}
    return {k: v for k, v in vars(p.parse_args(argv)).items() if k not in control}


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.list_presets:
            print("\n".join(f"{n}: {presets.describe(n)}" for n in presets.list_presets()))
            return 0
        if args.grid or args.slurm:
            if not args.preset:
                raise ValueError("--grid and --slurm need --preset (command line)")
            return grid(args, explicit_flags(argv))
        dist = distributed.setup(args.dist_timeout, device=None if args.device == "auto" else args.device)
        if args.replay:
            return replay(args, dist)
        resolve(args)
        if args.dry_run:
            print(json.dumps(vars(args), indent=1))
            return 0
        prepare_output_dir(args, dist)
        dist.barrier()  # every rank checked the folder before rank 0 writes into it
        run = Run(args, dist)
        if dist.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            write_json(os.path.join(args.output_dir, "config.json"), {**vars(args), "kind": "train"})
    except ValueError as e:  # ModelError, DataError and bad values: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    with dist.guard():  # a lost rank ends the others with one error line, not a hang
        try:
            code = train(run)
        except FloatingPointError as e:  # a diverged run: one line, not a traceback
            print(f"\nerror: {e}", file=sys.stderr)
            code = 1
    dist.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
