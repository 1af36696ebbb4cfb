"""Wall time per forward pass of FZOO and Sparse-MeZO against MeZO's (issue rows of `make bench`).

One step of each estimator on the same MeZO-LoRA model and batch, interleaved after a warm-up (as
bench_model), divided by the forward passes the step makes: MeZO 2, FZOO N + 1 (N perturbed, one
clean), Sparse-MeZO 2 (plus the per-parameter thresholds it recomputes at every step). The ratio is
the median of per-repetition ratios. The model and batch are bench_scoring's: the real SmolLM2-135M-
Instruct with LoRA on real review snippets (the tiny OPT with --quick).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from bench_model import interleaved, medians_ms  # noqa: E402
from bench_scoring import REAL_SNIPPETS, smollm2  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
from data.evaluate import encode_samples  # noqa: E402
from zo import MeZO, MeZOConfig  # noqa: E402

ESTIMATORS = {
    "MeZO": {},
    "FZOO N=8": {"estimator": "fzoo", "fzoo_n": 8},
    "Sparse-MeZO 0.75": {"sparse_mezo": 0.75},
}


def forwards_per_step(cfg: MeZOConfig) -> int:
    return cfg.fzoo_n + 1 if cfg.estimator == "fzoo" else 2


def lora_model_and_batch(plan) -> dict:
    """{"model", "batch", and what they are}: bench_scoring's SmolLM2-135M-Instruct with LoRA and a
    shared-prompt batch of real review snippets (the tiny OPT and the bundled sample with --quick);
    {"skipped": why} without the real model."""
    quick = plan["quick"]
    real = None if quick else smollm2()
    if real is None and not quick:
        return {"skipped": "SmolLM2-135M-Instruct is missing: `make smollm2` converts it"}
    model, tok = real or (
        models.load_model(models.TINY_OPT),
        models.load_tokenizer(models.TINY_OPT),
    )
    task = data.get_task("SST2", family=model.config.model_type)
    real_text = not quick and (REAL_SNIPPETS / "train.tsv").is_file()
    examples = encode_samples(
        task, task.load(str(REAL_SNIPPETS) if real_text else None)["train"][: plan["batch"]], tok
    )
    models.apply_lora(model, r=8, alpha=16, generator=torch.Generator().manual_seed(0))
    return {
        "model": model,
        "batch": data.collate(examples, "classification", tok.pad_token_id, shared=True),
        "model_name": "SmolLM2-135M-Instruct + LoRA" if real else "tiny OPT + LoRA",
        "rows": len(examples),
        "text": "real review snippets" if real_text else "the bundled SST-2 sample",
    }


def run(plan):
    """-> {"ms_per_forward": {name: median ms}, "ratio": {name: [per-repetition per-forward time /
    MeZO's]}, ...}."""
    setup = lora_model_and_batch(plan)
    if "skipped" in setup:
        return setup
    model, batch = setup["model"], setup["batch"]
    lr = 1e-7
    configs = {name: MeZOConfig(lr=lr, eps=1e-2, **kw) for name, kw in ESTIMATORS.items()}
    fns = {}
    for name, cfg in configs.items():
        mezo = MeZO(model, cfg)
        fns[name] = lambda m=mezo: m.step(model, lambda mm: data.batch_loss(mm, batch))
    times = interleaved(fns, plan["step_repeats"])
    per_forward = {
        name: [t / forwards_per_step(configs[name]) for t in ts] for name, ts in times.items()
    }
    ratios = {
        name: [x / y for x, y in zip(ts, per_forward["MeZO"])]
        for name, ts in per_forward.items()
        if name != "MeZO"
    }
    return {
        "model": setup["model_name"],
        "batch": setup["rows"],
        "text": setup["text"],
        "ms_per_forward": medians_ms(per_forward),
        "ratio": ratios,
        "repeats": plan["step_repeats"],
        "forwards_per_step": {name: forwards_per_step(cfg) for name, cfg in configs.items()},
    }
