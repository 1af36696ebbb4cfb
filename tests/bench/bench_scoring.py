"""Shared-prompt scoring and logits only where read, against the original's way (issue rows of `make
bench`).

"old" is the original's computation: one sequence per candidate, the LM head on every position
(`FullLogits` runs the model's head everywhere and then keeps the positions the loss reads, so the
numbers are the same and the cost is the old one). "new" is the default: one shared prompt per
example, logits where read. "per candidate" (`--per_candidate`: one sequence per candidate, logits
where read) separates the two effects. Timing as bench_model: interleaved after a warm-up (for an
evaluation, one batch of each layout), the median of per-repetition ratios. Memory: each (layout,
what) in a fresh process, VmHWM of the second call (after a warm-up), as bench_model.measure_memory.

Inputs: the real SmolLM2-135M-Instruct (.cache/smollm2-135m-instruct, `make smollm2`) on the real
review snippets (.cache/rotten-tomatoes, `make rotten-tomatoes`; without them the bundled SST-2
sample's 420 rows), the bundled Copa and CB samples; OPT-125m's shape with random weights on random
SST-2-like prompts (16 examples x 63 prompt tokens + 1 candidate token).
"""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_model import _status_mib, build, interleaved, medians_ms, ratio  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
from data.evaluate import encode_samples, predict  # noqa: E402
from models.layers import keep_positions  # noqa: E402
from zo import MeZO, MeZOConfig  # noqa: E402

SMOLLM2 = Path(__file__).resolve().parents[2] / ".cache" / "smollm2-135m-instruct"
# `make rotten-tomatoes`
REAL_SNIPPETS = Path(__file__).resolve().parents[2] / ".cache" / "rotten-tomatoes"
LAYOUTS = ("old", "new", "per candidate")


class FullLogits(nn.Module):
    """The model as it was before logits_to_keep: the head on every position (then the kept ones
    are picked, so the losses read the same numbers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, logits_to_keep=0, **kwargs):
        return keep_positions(self.model(input_ids, attention_mask, **kwargs), logits_to_keep)


def scorer(model, layout):
    """-> (model to call, shared): what each layout runs."""
    return (FullLogits(model) if layout == "old" else model), layout == "new"


def sst2_like(size, prompt_len, vocab, seed=0):
    """SST-2-like encoded examples: a random prompt and two single-token candidates."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(size):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        out.append(data.Encoded([prompt + [vocab - 1], prompt + [vocab - 2]], [1, 1], correct=[0]))
    return out


def step_times(model, examples, kind, pad_token_id, repeats, lr=1e-7):
    """One MeZO step per layout on the same examples, interleaved."""
    mezo = MeZO(model, MeZOConfig(lr=lr, eps=1e-3))
    fns = {}
    for layout in LAYOUTS:
        m, shared = scorer(model, layout)
        batch = data.collate(examples, kind, pad_token_id, shared=shared)
        fns[layout] = lambda m=m, b=batch: mezo.step(model, lambda _: data.batch_loss(m, b))
    return interleaved(fns, repeats)


def eval_times(model, tok, task, samples, repeats, demo_sets=None, batch_size=8, max_length=2048):
    preds = {}

    def run(layout, n=len(samples)):
        m, shared = scorer(model, layout)
        preds[layout] = predict(
            m,
            tok,
            task,
            samples[:n],
            demo_sets=demo_sets and demo_sets[:n],
            batch_size=batch_size,
            max_length=max_length,
            shared=shared,
        )[0]

    # warm-up: one batch each; nothing a layout builds or caches depends on the row count
    for layout in LAYOUTS:
        run(layout, batch_size)
    times = interleaved(
        {layout: (lambda layout=layout: run(layout)) for layout in LAYOUTS}, repeats, warmup=False
    )
    return times, all(p == preds["old"] for p in preds.values())


def summary(times, **extra):
    return {
        "ms": medians_ms(times),
        "new/old": ratio(times, "new", "old"),
        "per candidate/old": ratio(times, "per candidate", "old"),
        "repeats": len(times["old"]),
        **extra,
    }


def smollm2():
    if not (SMOLLM2 / "config.json").is_file():
        return None
    return models.load_model(str(SMOLLM2)).eval(), models.load_tokenizer(str(SMOLLM2))


def run(plan):
    """All rows' raw numbers. plan: quick (tiny OPT, few rows) or full."""
    quick, out = plan["quick"], {}
    real = None if quick else smollm2()
    model, tok = real or (
        models.load_model(models.TINY_OPT).eval(),
        models.load_tokenizer(models.TINY_OPT),
    )
    name = "SmolLM2-135M-Instruct" if real else ("tiny OPT" if quick else None)
    if name is None:
        out["skipped"] = f"{SMOLLM2} is missing: `make smollm2` converts it"
    else:
        sst2 = data.get_task("SST2", family=model.config.model_type)
        real = not quick and (REAL_SNIPPETS / "dev.tsv").is_file()
        splits = sst2.load(str(REAL_SNIPPETS) if real else None)
        out["text"] = (
            "real review snippets (.cache/rotten-tomatoes)" if real else "the bundled SST-2 sample"
        )
        rows = (list(splits["valid"]) + list(splits["train"]))[: plan["zero_shot_rows"]]
        times, same = eval_times(model, tok, sst2, rows, plan["eval_repeats"])
        out["zero_shot"] = summary(times, model=name, rows=len(rows), same_predictions=same)
        test, demos = data.icl_splits(splits, num_demos=16, num_eval=plan["icl_rows"])
        times, same = eval_times(model, tok, sst2, test, plan["eval_repeats"], demo_sets=demos)
        out["icl16"] = summary(times, model=name, rows=len(test), same_predictions=same)
        for task_name in ("Copa", "CB"):
            task = data.get_task(task_name, family=model.config.model_type)
            samples = task.load(None)["valid"]
            times, same = eval_times(model, tok, task, samples, plan["eval_repeats"])
            out[task_name] = summary(times, model=name, rows=len(samples), same_predictions=same)
        train = encode_samples(sst2, splits["train"][: plan["batch"]], tok)
        models.apply_lora(model, r=8, alpha=16, generator=torch.Generator().manual_seed(0))
        out["lora_step"] = summary(
            step_times(model, train, "classification", tok.pad_token_id, plan["step_repeats"]),
            model=name,
            batch=len(train),
        )
    shape, vocab = plan["opt_shape"], plan["vocab"]
    size, seq = plan["opt_batch"]
    opt = build(shape, vocab)
    out["ft_step"] = summary(
        step_times(opt, sst2_like(size, seq - 1, vocab), "classification", 1, plan["step_repeats"]),
        model=f"OPT-{shape} shape, random weights",
        batch=[size, seq],
    )
    cases = [(what, layout) for what in ("step", "eval") for layout in LAYOUTS]
    # --quick: the processes side by side
    with ThreadPoolExecutor(len(cases) if quick else 1) as pool:
        peaks = list(pool.map(lambda c: memory_in_subprocess(*c, shape, vocab, size, seq), cases))
    out["memory"] = {
        what: {layout: peak for (w, layout), peak in zip(cases, peaks) if w == what}
        for what in ("step", "eval")
    }
    return out


def measure_memory(what, layout, shape, vocab, size, seq):
    """In this (fresh) process: peak RSS of one MeZO step or one scoring forward, after a
    warm-up."""
    model = build(shape, vocab)
    m, shared = scorer(model, layout)
    batch = data.collate(sst2_like(size, seq - 1, vocab), "classification", 1, shared=shared)
    post_build = _status_mib("VmRSS")
    if what == "step":
        mezo = MeZO(model, MeZOConfig(lr=1e-7, eps=1e-3))
        call = lambda: mezo.step(model, lambda _: data.batch_loss(m, batch)).item()  # noqa: E731
    else:

        def call():
            with torch.no_grad():
                data.candidate_scores(data.batch_logits(m, batch), batch).sum().item()

    call()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    call()
    return {
        "what": what,
        "layout": layout,
        "post_build_MiB": round(post_build, 1),
        "peak_MiB": round(_status_mib("VmHWM"), 1),
        "s": round(time.perf_counter() - start, 3),
    }


def memory_in_subprocess(what, layout, shape, vocab, size, seq):
    cmd = [sys.executable, __file__, "memory", what, layout, shape, str(vocab), str(size), str(seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"scoring memory benchmark failed ({' '.join(cmd[2:])}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _, what, layout, shape, vocab, size, seq = sys.argv[1:]
    print(json.dumps(measure_memory(what, layout, shape, int(vocab), int(size), int(seq))))
