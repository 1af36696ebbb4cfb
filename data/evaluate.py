"""Evaluation shared by train.py and eval.py: encoding, greedy generation, test metrics, dev loss.

A model is any callable `model(input_ids, attention_mask, logits_to_keep=, [position_ids=]) ->
logits` (data/losses.py batch_logits) with `.parameters()`, and, for generation tasks,
`model.generate(input_ids, attention_mask, max_new_tokens=, eos_token_ids=)`. Scoring is the
original's (run.py `Framework.one_step_pred`), batched: classification = argmax over candidates of
the mean option-token log-prob (or the SFC-calibrated sum difference with --sfc); SQuAD/DROP =
greedy generation up to 50 new tokens or "\\n", scored by SQuAD F1 / EM; RoBERTa = argmax over the
label words' logits at <mask>.
"""

import torch

from data.collate import batch_kind, collate
from data.encode import encode_prompt
from data.losses import batch_logits, loss_terms, predictions, sfc_scores
from data.metrics import accuracy, calculate_metric

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encode_samples(
    task,
    samples,
    tok,
    *,
    demo_sets=None,
    generation_with_gold=False,
    sfc=False,
    icl_sfc=False,
    max_length=2048,
    max_new_tokens=50,
    bos_override=True,
):
    """Encode each sample (with its own demonstrations, if any) for the task's model family."""
    if task.family == "roberta":
        return [task.encode(s, tok) for s in samples]
    demo_sets = demo_sets or [()] * len(samples)
    return [
        encode_prompt(
            task,
            demos,
            s,
            tok,
            max_length,
            sfc=sfc,
            icl_sfc=icl_sfc,
            generation_with_gold=generation_with_gold,
            max_new_tokens=max_new_tokens,
            bos_override=bos_override,
        )
        for s, demos in zip(samples, demo_sets)
    ]


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def by_length(encoded, keep_order=False):
    """Indices of `encoded`, shortest first, so that a batch pads little (BENCHMARKS.md gives the
    padding saved on the real snippets). Each row's score is a function of its own tokens only (fp
    rounding aside: other padded shapes), so the order changes no prediction."""

    def length(e):
        return (
            max(map(len, e.input_ids))
            if e.input_ids and isinstance(e.input_ids[0], list)
            else len(e.input_ids)
        )

    return (
        list(range(len(encoded)))
        if keep_order
        else sorted(range(len(encoded)), key=lambda i: length(encoded[i]))
    )


def in_order(order, values):
    """Undo by_length: values[j] belongs to item order[j]."""
    out = [None] * len(order)
    for i, value in zip(order, values):
        out[i] = value
    return out


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def stop_ids(tok):
    """The original stops generation at "\\n" or </s> (`eos_token="\\n"` in run.py)."""
    return [tok.encode("\n", add_special_tokens=False)[-1], tok.eos_token_id]


def generate_text(model, tok, batch, max_new_tokens=50, max_length=2048):
    """Greedy continuations as stripped strings (run.py: `max_new_tokens=min(50, max_length -
    len)`)."""
    budget = min(max_new_tokens, max_length - batch["input_ids"].shape[1])
    new = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=max(budget, 1),
        eos_token_ids=stop_ids(tok),
    )
    return [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]


def evaluate(model, tok, task, samples, **options):
    """Test metrics of `model` on `samples`: {"accuracy": ..} or {"f1": .., "em": ..} (options:
    predict's)."""
    predicted, correct = predict(model, tok, task, samples, **options)
    if task.generation:
        return {m: calculate_metric(m, predicted, correct) for m in ("f1", "em")}
    return {"accuracy": accuracy(predicted, correct)}


@torch.no_grad()
def predict(
    model,
    tok,
    task,
    samples,
    *,
    demo_sets=None,
    batch_size=8,
    sfc=False,
    icl_sfc=False,
    max_length=2048,
    max_new_tokens=50,
    bos_override=True,
    shared=True,
):
    """-> (predictions, gold answers) of `model` on `samples`: candidate indices, or generated
    strings.
    `shared`: one row per example for classification (collate's shared-prompt layout), else one per
    candidate."""
    model.eval()
    device = next(model.parameters()).device
    kind = batch_kind(task, training=False)
    opts = dict(max_length=max_length, max_new_tokens=max_new_tokens, bos_override=bos_override)
    encoded = encode_samples(task, samples, tok, demo_sets=demo_sets, **opts)
    order = by_length(encoded, keep_order=kind == "prompt")  # generation keeps its batches
    encoded = [encoded[i] for i in order]
    if sfc or icl_sfc:
        calib = encode_samples(
            task, samples, tok, demo_sets=demo_sets, sfc=sfc, icl_sfc=icl_sfc, **opts
        )
        calib = [calib[i] for i in order]
    predicted, correct = [], []
    for i, group in enumerate(chunks(encoded, batch_size)):
        batch = to_device(collate(group, kind, tok.pad_token_id, shared=shared), device)
        if kind == "prompt":
            predicted += generate_text(model, tok, batch, max_new_tokens, max_length)
            correct += batch["gold"]
            continue
        logits = batch_logits(model, batch)
        if sfc or icl_sfc:
            sfc_batch = to_device(
                collate(
                    calib[i * batch_size : (i + 1) * batch_size],
                    kind,
                    tok.pad_token_id,
                    shared=shared,
                ),
                device,
            )
            predicted += (
                sfc_scores(logits, batch, batch_logits(model, sfc_batch), sfc_batch)
                .argmax(-1)
                .tolist()
            )
        else:
            predicted += predictions(logits, batch).tolist()
        correct += (
            [e.label for e in group] if task.family == "roberta" else [e.correct for e in group]
        )
    return in_order(order, predicted), in_order(order, correct)


@torch.no_grad()
def dev_loss(model, encoded, kind, pad_token_id, batch_size, shared=True):
    """{"loss": the dev loss, "accuracy": dev accuracy from the same forwards} (no accuracy for
    generation tasks, whose metric needs generation).

    The loss is HF's evaluation loop's (Trainer.evaluation_loop) over the original's batches,
    `batch_size` examples in file order: each batch's mean loss repeated `find_batch_size(inputs)`
    times, i.e. weighted by the rows of input_ids of the original's collators (one per example,
    or one per candidate for the classification loss, whose collator flattens the candidates:
    large_models/utils.py DataCollatorWithPaddingAndNesting), then averaged. A batch's loss
    (token-level for the option-LM loss) depends on which examples share it, so the forwards run
    shortest first (by_length: less padding) and return per-example terms (losses.loss_terms),
    from which each file-order batch's loss is rebuilt. Classification tasks are scored on all
    candidates whatever the training loss (the option-LM loss reads the correct ones), so the
    accuracy comes with it."""
    model.eval()
    device = next(model.parameters()).device
    scored = kind == "classification" or kind == "option_lm" and encoded[0].gold is None
    num, den, rows, predicted = ([None] * len(encoded) for _ in range(4))
    for order in chunks(by_length(encoded), batch_size):
        group = [encoded[i] for i in order]
        batch = to_device(
            collate(group, "classification" if scored else kind, pad_token_id, shared=shared),
            device,
        )
        logits = batch_logits(model, batch)
        nums, dens = (t.float().tolist() for t in loss_terms(logits, batch, kind == "option_lm"))
        n = batch["num_options"].tolist() if kind == "classification" else [1] * len(group)
        preds = predictions(logits, batch).tolist() if scored or kind == "mlm" else n
        for j, i in enumerate(order):
            num[i], den[i], rows[i], predicted[i] = nums[j], dens[j], n[j], preds[j]
    total = sum(
        sum(num[i] for i in c) / sum(den[i] for i in c) * sum(rows[i] for i in c)
        for c in chunks(range(len(encoded)), batch_size)
    )
    correct = [e.label if kind == "mlm" else e.correct for e in encoded]
    return {
        "loss": total / sum(rows),
        **({"accuracy": accuracy(predicted, correct)} if scored or kind == "mlm" else {}),
    }
