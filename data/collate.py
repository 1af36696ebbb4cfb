"""Batches: encoded examples -> padded tensors with the keys each loss reads (data/losses.py).

Every batch has `input_ids [N, T]` and `attention_mask [N, T]`; OPT batches are padded on the left
with the pad id (`tokenizer.padding_side = "left"` in run.py) to a multiple of 8 (the original's
collators use `pad_to_multiple_of=8`), so all options end at the last position. Kinds:

  "classification"  every candidate of every example, flattened (N = sum of num_options), as
                    `DataCollatorWithPaddingAndNesting`; plus option_len [N], option_mask [N, L]
                    (True on the option tokens among the last L targets, L = max option_len),
                    labels [B] (correct candidate), num_options [B], option_index [B, K] (row of
                    candidate k of example b; padding slots point at the example's first row).
  "option_lm"       the correct candidate only (`DataCollatorForTokenClassification` path):
                    option_len [B], option_mask [B, L].
  "prompt"          the prompt without its answer (non-differentiable training: the gold-verbalized
                    encoding minus its option tokens; generation at test time: option_len is 0)
                    plus `gold`, a list of gold-answer lists (not a tensor).
  "mlm"             RoBERTa, right padding: mask_pos [B], labels [B], label_word_ids [C].
"""
import itertools

import torch

from . import DataError

KINDS = ("classification", "option_lm", "prompt", "mlm")


def batch_kind(task, *, training=True, train_as_classification=None, non_diff=False):
    """The batch kind a run needs, with the original's defaults (mezo.sh, run.py)."""
    if task.family == "roberta":
        return "mlm"
    if non_diff:
        if not task.generation:
            raise DataError(f"the non-differentiable objective (F1) needs a generation task, not {task.name} "
                            f"(non_diff)")
        return "prompt"
    if not training:
        return "prompt" if task.generation else "classification"
    if train_as_classification is None:
        train_as_classification = task.train_as_classification
    if train_as_classification and task.generation:
        raise DataError(f"{task.name} is a generation task and cannot train as classification "
                        f"(train_as_classification)")
    return "classification" if train_as_classification else "option_lm"


def pad(sequences, pad_id, left, multiple=None):
    """-> (ids [N, T], attention_mask [N, T]) with T the longest length rounded up to `multiple`."""
    length = max(len(s) for s in sequences)
    if multiple:
        length = -(-length // multiple) * multiple
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _option_fields(option_len):
    width = max(option_len)
    mask = torch.arange(width).unsqueeze(0) >= width - torch.tensor(option_len).unsqueeze(1)
    return {"option_len": torch.tensor(option_len), "option_mask": mask}


def collate(examples, kind, pad_token_id, pad_to_multiple_of=8):
    """-> batch dict (see the module docstring). `examples`: Encoded (OPT) or MLMEncoded (RoBERTa)."""
    if kind not in KINDS:
        raise DataError(f"unknown batch kind {kind!r}, expected one of {', '.join(KINDS)} (collate)")
    if not examples:
        raise DataError(f"empty batch (collate {kind})")
    if kind == "mlm":
        ids, mask = pad([e.input_ids for e in examples], pad_token_id, left=False, multiple=pad_to_multiple_of)
        return {"input_ids": ids, "attention_mask": mask,
                "mask_pos": torch.tensor([e.mask_pos for e in examples]),
                "labels": torch.tensor([e.label for e in examples]),
                "label_word_ids": torch.tensor(examples[0].label_word_ids)}
    if kind == "classification":
        sequences = [s for e in examples for s in e.input_ids]
        num_options = [len(e.input_ids) for e in examples]
        starts = list(itertools.accumulate([0] + num_options[:-1]))
        width = max(num_options)
        index = [[start + (k if k < n else 0) for k in range(width)] for start, n in zip(starts, num_options)]
        ids, mask = pad(sequences, pad_token_id, left=True, multiple=pad_to_multiple_of)
        return {"input_ids": ids, "attention_mask": mask,
                **_option_fields([n for e in examples for n in e.option_len]),
                "labels": torch.tensor([e.correct[0] for e in examples]),
                "num_options": torch.tensor(num_options), "option_index": torch.tensor(index)}
    chosen = [(e.input_ids[e.correct[0]], e.option_len[e.correct[0]]) for e in examples]
    if kind == "option_lm":
        ids, mask = pad([s for s, _ in chosen], pad_token_id, left=True, multiple=pad_to_multiple_of)
        return {"input_ids": ids, "attention_mask": mask, **_option_fields([n for _, n in chosen])}
    if any(e.gold is None for e in examples):
        raise DataError("prompt batches need generation examples with gold answers (collate prompt)")
    ids, mask = pad([s[:len(s) - n] for s, n in chosen], pad_token_id, left=True, multiple=pad_to_multiple_of)
    return {"input_ids": ids, "attention_mask": mask, "gold": [list(e.gold) for e in examples]}
