"""The training loop's state and the components train.py's loop calls after each step. Each
component owns its condition (when it acts) and its part of the state:

    LoopState     what the loop carries from step to step; a checkpoint saves it (state.json "loop")
    MetricsLog    metrics.jsonl and the logging window: the mean loss every `logging_steps`,
                  non-finite losses counted, `max_nonfinite` in a row stop the run
    Selection     dev evaluation every `eval_steps` and the best model so far (best.safetensors),
                  the original's load_best_model_at_end
    Checkpoints   a checkpoint every `save_steps` and on an interruption; restoring one
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from data.files import atomic_write

from .checkpoint import find_checkpoint, restore, save_checkpoint, save_trainable
from .json_files import dumps, read_json
from .progress import dev_record, peak_memory, show_step
from .run_folder import check_belongs, check_resumable, run_settings

# state.json "loop": the types of its fields (older checkpoints lack the optional ones)
FIELDS = {"best": (float, int), "best_step": int, "best_dev": dict}
COUNTS = ("nonfinite", "nonfinite_run", "metrics_lines")


@dataclass
class LoopState:
    """What the loop carries from step to step. `window` holds the losses of the unfinished
    logging window (device tensors while running, floats in a checkpoint)."""

    best: float | None = None  # the best dev score so far (higher is better)
    best_step: int | None = None
    best_dev: dict | None = None  # the selected model's dev metrics, measured when selected
    nonfinite: int = 0  # steps with a non-finite loss or estimate so far (updates skipped)
    nonfinite_run: int = 0  # ... in a row
    metrics_lines: int = 0  # lines of metrics.jsonl (a resume cuts the file back to them)
    window: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**vars(self), "window": [float(x) for x in self.window]}

    @classmethod
    def from_dict(cls, saved) -> "LoopState":
        """The state a checkpoint saved; ValueError if it is not one."""
        ok = isinstance(saved, dict) and set(saved) <= {*FIELDS, *COUNTS, "window"}
        ok = ok and all(isinstance(saved.get(k, 0), int) for k in COUNTS)
        ok = ok and all(saved.get(k) is None or isinstance(saved[k], t) for k, t in FIELDS.items())
        window = saved.get("window", []) if ok else None
        if not (isinstance(window, list) and all(isinstance(x, (float, int)) for x in window)):
            raise ValueError("bad loop state")
        return cls(**{**saved, "window": [torch.tensor(x) for x in window]})


class MetricsLog:
    """metrics.jsonl (rank 0 writes; on resume first cut back to the lines the checkpoint
    counted), and the logging window: every `logging_steps` and at the last step, the mean of the
    window's finite losses, the one host sync of the window."""

    def __init__(self, run, trainer, state: LoopState):
        self.run, self.trainer, self.state = run, trainer, state
        self.path, self.file = os.path.join(run.out, "metrics.jsonl"), None
        if run.dist.is_main:
            if run.args.resume:  # drop lines written after the checkpoint
                with open(self.path) as f:
                    atomic_write(self.path, "".join(f.readlines()[: state.metrics_lines]))
            self.file = open(self.path, "a")
        self.t0, self.start_step = None, None  # start_clock: after --eval_on_start's evaluation

    def write(self, record: dict) -> None:
        if self.run.args.trainer == "zo":  # estimators compare on this x-axis (README)
            record["forward_passes"] = self.trainer.forward_passes
        if self.file:
            self.file.write(dumps(record) + "\n")
            self.file.flush()
            self.state.metrics_lines += 1

    def start_clock(self) -> None:
        """Steps per second count from here."""
        self.t0, self.start_step = time.time(), self.trainer.global_step

    def time_per_step(self) -> float:
        return (time.time() - self.t0) / max(self.trainer.global_step - self.start_step, 1)

    def after_step(self, step: int, loss: torch.Tensor, last: bool) -> bool:
        """Add the step's loss; at the end of a window, log it. -> whether it logged. Raises
        FloatingPointError after `max_nonfinite` non-finite losses in a row."""
        a, state = self.run.args, self.state
        state.window.append(loss)
        if step % a.logging_steps and not last:
            return False
        losses = torch.stack(state.window).float().cpu()
        finite = torch.isfinite(losses)
        for ok in finite.tolist():
            state.nonfinite_run = 0 if ok else state.nonfinite_run + 1
            state.nonfinite += not ok
        record = {
            "step": step,
            "loss": float(losses[finite].mean()) if finite.any() else float("nan"),
            "lr": self.trainer.learning_rate(),
            "steps_per_s": (self.trainer.global_step - self.start_step) / (time.time() - self.t0),
            "nonfinite": state.nonfinite,
            "peak_memory_bytes": peak_memory(self.run.dist.device),
        }
        if self.run.dist.is_main:
            show_step(record, a.max_steps)
        if state.nonfinite_run >= a.max_nonfinite:
            raise FloatingPointError(
                f"{state.nonfinite_run} non-finite losses in a row at step {step}; "
                f"lower --learning_rate or use --dtype fp32 (training)"
            )
        self.write(record)
        state.window = []
        return True


class Selection:
    """Dev loss (and accuracy) every `eval_steps`, at the last step with --eval_final_step and at
    step 0 with --eval_on_start (the base model, never selected); the best finite score's
    trainable tensors go to best.safetensors. Nothing is evaluated without --select_by."""

    def __init__(self, run, state: LoopState, metrics: MetricsLog):
        self.run, self.state, self.metrics = run, state, metrics
        self.best_path = os.path.join(run.out, "best.safetensors")

    def evaluate(self, step: int) -> dict:
        a = self.run.args
        dev = self.run.evaluate_dev(with_metric=a.select_by == "accuracy")
        show = self.run.dist.is_main
        self.metrics.write(dev_record(dev, step=step, max_steps=a.max_steps, show=show))
        return dev

    def on_start(self, step: int) -> None:
        if self.run.args.eval_on_start and self.run.args.select_by and step == 0:
            self.evaluate(0)

    def after_step(self, step: int, last: bool) -> None:
        a, state = self.run.args, self.state
        if not a.select_by or step % a.eval_steps and not (last and a.eval_final_step):
            return
        dev = self.evaluate(step)
        score = (
            -dev["loss"]
            if a.select_by == "loss"
            else next(v for k, v in dev.items() if k != "loss")
        )
        if math.isfinite(score) and (state.best is None or score > state.best):
            state.best, state.best_step, state.best_dev = score, step, dev
            save_trainable(self.run.model, self.best_path, write=self.run.dist.is_main)


class Checkpoints:
    """A checkpoint every `save_steps` and when the run is interrupted: the trainable tensors, the
    trainer's state, torch's RNG and the loop state (program/checkpoint.py), the trajectory flushed
    first. Every rank calls (sharded tensors are gathered); rank 0 writes."""

    def __init__(self, run, trainer, state: LoopState, trajectory):
        self.run, self.trainer, self.state, self.trajectory = run, trainer, state, trajectory
        self.path = os.path.join(run.out, "checkpoint")
        # the settings that name this run (check_belongs); rank 0 wrote config.json and saves
        config = read_json(os.path.join(run.out, "config.json")) if run.dist.is_main else {}
        self.run_record = run_settings(config)

    def after_step(self, step: int, interrupted: bool) -> None:
        if step % self.run.args.save_steps == 0 or interrupted:
            self.save()

    def save(self) -> None:
        if self.trajectory:
            self.trajectory.flush()
        saved = {
            "trainer": self.trainer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loop": self.state.to_dict(),
            "run": self.run_record,
        }
        save_checkpoint(self.path, self.run.model, saved, write=self.run.dist.is_main)
        self.run.dist.barrier()


def start(run, trainer) -> LoopState:
    """The loop's state: on --resume the checkpoint's (model, trainer and torch's RNG restored,
    the files it extends checked), else fresh with torch's RNG (dropout) seeded by --seed. Reads
    only: a corrupt checkpoint fails before any write."""
    if not run.args.resume:
        torch.manual_seed(run.args.seed)
        return LoopState()
    directory = find_checkpoint(os.path.join(run.out, "checkpoint"))
    if not check_belongs(directory, run.out) and run.dist.is_main:
        print(
            f"note: the checkpoint predates its run's record; not checked against config.json "
            f"({directory})",
            file=sys.stderr,
        )
    saved = restore(directory, run.model, trainer)
    try:
        state = LoopState.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint: {e} ({directory})") from None
    check_resumable(run.out, run.model, state, trajectory=run.args.trainer == "zo")
    return state
