"""The training loop's bookkeeping: the logged loss window, non-finite counts, the live line, peak
memory, and SIGINT / SIGTERM. Shared by MeZO and the backprop baseline; knows no model family."""

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


def logging_record(
    window, state, *, step, max_steps, lr, steps_per_s, device, max_nonfinite, show
) -> dict:
    """HF logs mean(loss1) over the window; here the one host sync of the window. Non-finite losses
    (their updates were skipped) are counted in `state`, and `max_nonfinite` of them in a row raise
    FloatingPointError. `show` prints the live line (in place on a terminal)."""
    losses = torch.stack(window).float().cpu()
    for finite in torch.isfinite(losses).tolist():
        state["nonfinite_run"] = 0 if finite else state["nonfinite_run"] + 1
        state["nonfinite"] += not finite
    finite = torch.isfinite(losses)
    record = {
        "step": step,
        "loss": float(losses[finite].mean()) if finite.any() else float("nan"),
        "lr": lr,
        "steps_per_s": steps_per_s,
        "nonfinite": state["nonfinite"],
        "peak_memory_bytes": peak_memory(device),
    }
    if show:
        eta = time.strftime("%H:%M:%S", time.gmtime((max_steps - step) / max(steps_per_s, 1e-9)))
        print(
            f"step {step}/{max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
            f"{steps_per_s:.2f} steps/s | ETA {eta}",
            end="\r" if sys.stderr.isatty() else "\n",
            file=sys.stderr,
        )
    if state["nonfinite_run"] >= max_nonfinite:
        raise FloatingPointError(
            f"{state['nonfinite_run']} non-finite losses in a row at step {step}; "
            f"lower --learning_rate or use --dtype fp32 (training)"
        )
    return record


def dev_record(dev, *, step, max_steps, show) -> dict:
    """The metrics.jsonl record of an evaluation ({"loss": .., "accuracy": ..} -> dev_loss,
    dev_accuracy);
    `show` prints it as a progress line."""
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
