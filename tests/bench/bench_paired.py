"""The paired step's rows of `make bench` (issue 30; zo/paired.py): a full-parameter MeZO step with
`perturbation="paired"` (one forward over 2B rows, z evaluated twice a step) and with today's exact
restore (two forwards, z three times), each against two plain forwards, in one interleaving (the
method of bench_model.py): normal and Rademacher z at SmolLM2-135M's shape, normal z at
OPT-125m's; and the MeZO-LoRA step on real snippets (bench_estimators' model and batch), paired /
exact. Peak memory is bench_model's `mezo_paired` mode.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from bench_model import batch, build, interleaved, lm_loss, medians_ms, ratio  # noqa: E402

import data  # noqa: E402
from program.run import paired_loss  # noqa: E402
from zo import MeZO, MeZOConfig  # noqa: E402


def step_vs_forwards(model, vocab: int, size: int, seq: int, repeats: int, rademacher: bool):
    """-> {"ms": medians, "paired" / "exact": step / two forwards, "paired_over_exact", and with
    rademacher the same for Rademacher z}."""
    ids, mask = batch(size, seq, vocab)
    exact_fn, paired_fn = lm_loss(ids, mask), lm_loss(ids, mask, paired=True)

    def mezo(perturbation, distribution):
        cfg = MeZOConfig(lr=1e-7, eps=1e-3, perturbation=perturbation, distribution=distribution)
        return MeZO(model, cfg)

    @torch.no_grad()
    def two_forwards():
        exact_fn(model)
        exact_fn(model)

    fns = {"two forwards": two_forwards}
    for z in ("normal", "rademacher") if rademacher else ("normal",):
        exact, paired = mezo("exact", z), mezo("paired", z)
        fns[f"exact step, {z} z"] = lambda m=exact: m.step(model, exact_fn)
        fns[f"paired step, {z} z"] = lambda m=paired: m.step(model, paired_fn)
    times = interleaved(fns, repeats)
    out = {"ms": medians_ms(times), "repeats": repeats, "batch": [size, seq]}
    out["params"] = sum(p.numel() for p in model.parameters())
    for name in fns:
        if name != "two forwards":
            out[name] = ratio(times, name, "two forwards")
    for z in ("normal", "rademacher") if rademacher else ("normal",):
        out[f"paired over exact, {z} z"] = ratio(times, f"paired step, {z} z", f"exact step, {z} z")
    return out


def llama(shape: str, size: int, seq: int, repeats: int) -> dict:
    import bench_model

    vocab = bench_model.LLAMA_SHAPES[shape][-1]
    return step_vs_forwards(bench_model.build_llama(shape), vocab, size, seq, repeats, True)


def opt(shape: str, vocab: int, size: int, seq: int, repeats: int) -> dict:
    return step_vs_forwards(build(shape, vocab), vocab, size, seq, repeats, False)


def lora(plan) -> dict:
    """MeZO-LoRA step, paired / exact, on bench_estimators' model and batch."""
    import bench_estimators

    setup = bench_estimators.lora_model_and_batch(plan)
    if "skipped" in setup:
        return setup
    model, b = setup.pop("model"), setup.pop("batch")
    exact = MeZO(model, MeZOConfig(lr=1e-7, eps=1e-2))
    paired = MeZO(model, MeZOConfig(lr=1e-7, eps=1e-2, perturbation="paired"))
    exact_fn = lambda m: data.batch_loss(m, b)  # noqa: E731
    paired_fn = paired_loss(data.task_loss, b, 1.0)
    times = interleaved(
        {
            "exact step": lambda: exact.step(model, exact_fn),
            "paired step": lambda: paired.step(model, paired_fn),
        },
        plan["step_repeats"],
    )
    return setup | {
        "ms": medians_ms(times),
        "repeats": plan["step_repeats"],
        "paired over exact": ratio(times, "paired step", "exact step"),
    }
