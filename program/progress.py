"""Progress of a run on the terminal: the live training line, evaluation lines, peak memory, and
SIGINT / SIGTERM. Shared by MeZO and the backprop baseline; writes no file and no loop state."""

import contextlib
import signal
import sys
import time

import torch


def peak_memory(device) -> int:
    """Bytes: CUDA's max_memory_allocated, else the process's resident high-water mark (VmHWM)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def show_step(record, max_steps) -> None:
    """The live training line (in place on a terminal): loss, lr, speed and time left."""
    step, speed = record["step"], record["steps_per_s"]
    eta = time.strftime("%H:%M:%S", time.gmtime((max_steps - step) / max(speed, 1e-9)))
    print(
        f"step {step}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"{speed:.2f} steps/s | ETA {eta}",
        end="\r" if sys.stderr.isatty() else "\n",
        file=sys.stderr,
    )


def dev_record(dev, *, step, max_steps, show) -> dict:
    """The metrics.jsonl record of an evaluation ({"loss": .., "accuracy": ..} -> dev_loss,
    dev_accuracy); `show` prints it as a progress line."""
    if show:
        values = " | ".join(f"dev {k} {v:.4f}" for k, v in dev.items())
        clear = "\r\033[K" if sys.stderr.isatty() else ""  # over the in-place training line, kept
        print(f"{clear}step {step}/{max_steps} | {values}", file=sys.stderr)
    return {"step": step, **{f"dev_{k}": v for k, v in dev.items()}}


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM append to the yielded list (the loop saves a checkpoint and stops: the
    original's --save_on_interrupt); the previous handlers are back when the block ends, however."""
    stop, previous = [], {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda s, f: stop.append(s))
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
