"""MeZO fine-tuning (Malladi et al. 2023): `torchrun --nproc 8 train.py --task SST2 --mode ft`.

Top to bottom as nanoGPT's train.py: configure (flags, presets, the family's defaults, --resume's
config.json), build (output folder and its lock, model, data, trainer), restore (a checkpoint),
the loop, finish. The loop reads side by side with the original's `_inner_training_loop`
(large_models/trainer.py, search "MeZO added") and `run.py main`: per batch `zo_step` then
`zo_update`; the mean L(theta+eps z) logged every `logging_steps`; dev loss at every multiple of
`eval_steps`, keeping the best model (lowest dev loss for OPT, highest dev accuracy for RoBERTa,
as the original; `--select_by` changes it; a run never evaluated, and a --non_diff run, keep the
last model); at the end the selected model is evaluated on dev and test. `--trainer fo` swaps in
backprop (the FT rows). The loop's parts live in program/ (run.py, loop.py).
"""

import json
import os
import sys

import data
import models
import zo
from data.evaluate import to_device
from program import config, flags, replay
from program.checkpoint import load_trainable, trainable
from program.folder_lock import hold
from program.json_files import read_json, write_json
from program.loop import Checkpoints, MetricsLog, Selection, start
from program.paper import grid, presets
from program.progress import peak_memory, stop_on_signals
from program.run import Run
from program.run_folder import check_run_folder, prepare_run_folder, resume_conflicts
from program.trajectory import Trajectory
from zo import distributed


def model_type(args):
    """The family of --model (`model_type` of its config.json); a --dry-run may name a model that
    is not here (a preset's facebook/opt-13b): then the task decides."""
    try:
        return models.checkpoint.read_config(models.resolve_model_path(args.model)).model_type
    except models.ModelError:
        if not args.dry_run:
            raise
        return None


def configure(argv, args):
    """The run's flags: --resume's config.json supplies every flag not given now, then the
    family's defaults. -> (args, the saved config.json or None)."""
    saved = None
    if args.resume:
        folder = check_run_folder(args.output_dir, resume=True, overwrite=False)
        saved = read_json(os.path.join(folder, "config.json"))
        config.check_saved(saved, os.path.join(folder, "config.json"))
        saved = config.as_recorded(saved)
        args = flags.resumed_args(argv, saved)
    return flags.resolve(args, model_type(args)), saved


def claim_folder(args, dist):
    """Model and data folders by real path, the output folder checked (it may not overlap what
    the run reads) and locked. -> (args, lock)."""
    real = {k: getattr(args, k) for k in ("model", "data_dir")}
    real = {k: os.path.realpath(p) if p and os.path.isdir(p) else p for k, p in real.items()}
    reads = [
        ("model", str(models.resolve_model_path(real["model"]))),
        ("data", real["data_dir"] or data.SAMPLES_DIR),
    ]
    out = check_run_folder(
        args.output_dir, resume=args.resume, overwrite=args.overwrite_output_dir, protected=reads
    )
    return flags.replace(args, **real, output_dir=out), hold(out, dist)


def train(run, trainer, state):
    """The original's _inner_training_loop for MeZO (trainer.py "MeZO added") -> exit status."""
    a, model, dist = run.args, run.model, run.dist
    trajectory = None
    if a.trainer == "zo" and dist.is_main:
        path = os.path.join(run.out, "trajectory.jsonl")
        trajectory = trainer.trajectory = Trajectory(path, keep_before_step=trainer.global_step)
    metrics = MetricsLog(run, trainer, state)
    selection = Selection(run, state, metrics)
    checkpoints = Checkpoints(run, trainer, state, trajectory)
    graphed = (
        zo.CudaGraphStep(trainer, model, data.batch_loss, run.closure_of_batch)
        if a.cuda_graphs
        else None
    )
    selection.on_start(trainer.global_step)  # --eval_on_start: the base model's point
    metrics.start_clock()
    interrupted = False
    with stop_on_signals() as stop:  # the original's --save_on_interrupt; handlers restored after
        while trainer.global_step < a.max_steps and not interrupted:
            step = trainer.global_step
            if graphed is not None:  # the same MeZO step, replayed as a CUDA graph (zo/graphs.py)
                tr_loss_step = graphed(to_device(run.collate(run.batch(step)), dist.device))
            elif a.trainer == "zo":
                loss_fns = run.loss_fns(run.batch(step))
                if a.recompute_norms and step > 0 and step % run.batches_per_epoch == 0:
                    trainer.initialize_c(model, loss_fns[0])  # medium_models: per epoch
                tr_loss_step, _ = trainer.zo_step(model, loss_fns)  # MeZO added: estimate gradient
                trainer.zo_update(model)  # MeZO added: update model with the estimated gradient
            else:
                tr_loss_step = trainer.step(model, run.loss_fns(run.batch(step)))  # backprop
            last = step + 1 == a.max_steps
            if metrics.after_step(step + 1, tr_loss_step, last):
                interrupted = dist.any(bool(stop))  # ranks agree once per logging window
            elif stop and not dist.grouped:  # a lone process stops at once
                interrupted = True
            selection.after_step(step + 1, last)  # load_best_model_at_end
            checkpoints.after_step(step + 1, interrupted)
    if interrupted:
        step = trainer.global_step
        print(
            f"\ninterrupted at step {step}: checkpoint saved, continue with --resume",
            file=sys.stderr,
        )
        return 130
    if trajectory:
        trajectory.flush()
    finish(run, state, metrics.time_per_step())
    return 0


def finish(run, state, time_per_step):
    """run.py: load the best model, evaluate it on dev and test, write results and the model. A
    run never evaluated keeps its last model (HF without an evaluation: the original's non-diff
    runs)."""
    a, model, out = run.args, run.model, run.out
    if state.best_step is None:
        why = (
            "never evaluated during training (--non_diff without --select_by)"
            if not a.select_by
            else "never evaluated during training (no step up to --max_steps "
            f"{a.max_steps} is a multiple of --eval_steps {a.eval_steps})"
            if a.max_steps < a.eval_steps and not a.eval_final_step
            else f"no model selected: every dev {a.select_by} was non-finite (NaN or inf)"
        )
        print(f"\nkeeping the last model: {why}", file=sys.stderr)
    else:
        load_trainable(model, os.path.join(out, "best.safetensors"))
    split = run.selection_split
    dev = state.best_dev  # the selected model's dev metrics, measured when it was selected
    if split == "dev" and (dev is None or len(dev) == 1):  # none, or no metric beside the loss
        dev = run.evaluate_dev(with_metric=True)
    results = {
        "dev": dev if split == "dev" else {},
        "test": run.test_metrics(run.samples["test"]),
        "num_test": len(run.samples["test"]),
        "selection": "last" if state.best_step is None else split.replace("test", "eval"),
        "best_step": state.best_step or a.max_steps,
        "nonfinite_losses": state.nonfinite,
        "peak_memory_bytes": peak_memory(run.dist.device),
        "time_per_step_s": time_per_step,
        "device": str(run.dist.device),
        "num_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable(model).values()),
    }
    run.save_model(os.path.join(out, "model"))
    if run.dist.is_main:
        write_json(os.path.join(out, "results.json"), results)
        print(f"\n{json.dumps({k: results[k] for k in ('dev', 'test', 'selection', 'best_step')})}")


def main(argv=None):
    lock = None  # the output folder's, from its check to the end of the run (folder_lock.py)
    try:
        args = flags.parse_args(argv)
        args = flags.replace(args, model=args.model or models.TINY_OPT)
        if args.list_presets:
            print("\n".join(f"{n}: {presets.describe(n)}" for n in presets.list_presets()))
            return 0
        if args.grid or args.slurm:  # program/paper/grid.py runs or scripts every point
            command = [sys.executable, os.path.abspath(__file__)]
            return grid.main(args, flags.explicit_flags(argv), command)
        if args.replay:
            replay.check_flags(argv)
        flags.check_values(args)
        device = None if args.device == "auto" else args.device
        dist = distributed.setup(args.dist_timeout, device=device)
        if args.replay:
            return replay.replay(args, dist)
        args, saved = configure(argv, args)
        if args.dry_run:
            print(json.dumps(config.values(args), indent=1))
            return 0
        dist.use_directions(flags.direction_groups(args, dist.world_size))  # the mesh, if any
        # everything is checked before anything is written: folder, model, data, checkpoint
        args, lock = claim_folder(args, dist)
        run = Run(args, dist)
        settings = {**vars(run.args), "kind": "train", "base_fingerprint": run.fingerprint}
        changed = resume_conflicts(saved, settings, config.RESUME_FREE) if args.resume else []
        if changed:
            raise ValueError(
                f"--resume with other settings than the run's: {', '.join(changed)} "
                f"({args.output_dir}/config.json)"
            )
        trainer = run.trainer()
        state = start(run, trainer)
        if dist.is_main:
            prepare_run_folder(args.output_dir, resume=args.resume)
            os.makedirs(args.output_dir, exist_ok=True)
            write_json(os.path.join(args.output_dir, "config.json"), settings)
        dist.barrier()  # rank 0 prepared the folder before any rank writes into it
    except BaseException as e:  # nothing was written: the folder is left as it was
        if lock is not None:
            lock.abandon()
        if not isinstance(e, ValueError):  # a bug or an interrupt: its traceback
            raise
        print(f"error: {e}", file=sys.stderr)  # ModelError, DataError, bad values: one line
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
