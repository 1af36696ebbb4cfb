"""Batches: encoded examples -> padded tensors with the keys each loss reads (data/losses.py).

Every batch has `input_ids [N, T]` and `attention_mask [N, T]`; OPT batches are padded on the left
with the pad id (`tokenizer.padding_side = "left"` in run.py) to a multiple of 8 (the original's
collators use `pad_to_multiple_of=8`), so all options end at the last position. Kinds:

  "classification"  every candidate of every example: labels [B] (correct candidate), num_options
  [B],
                    option_index [B, K] (flat index of candidate k of example b; padding slots point
                    at the example's first candidate), and the scoring fields below, one per
                    candidate.
                    Two layouts: per candidate (`shared=False`): one row per candidate (N = sum of
                    num_options), as
                      `DataCollatorWithPaddingAndNesting`;
                    shared prompt (`shared=True`, see `shared_rows`): one row per example; the
                      candidates' tokens after the common prompt are packed behind it.
  "option_lm"       the correct candidate only (`DataCollatorForTokenClassification` path), one row
  each. "prompt"          the prompt without its answer (non-differentiable training: the
  gold-verbalized
                    encoding minus its option tokens; generation at test time: option_len is 0)
                    plus `gold`, a list of gold-answer lists (not a tensor).
  "mlm"             RoBERTa, right padding: mask_pos [B], labels [B], label_word_ids [C], and
                    logits_to_keep [B, 1] (the <mask> positions: the head runs there only).

Scoring fields (classification, option_lm): candidate i's option tokens `targets [N, L]` (L = max
option_len, right-aligned; `option_mask [N, L]` is True on them, `option_len [N]` counts them) are
predicted by the logits of row `score_row [N]` at `score_pos [N, L]`, an index into the logits kept
at `logits_to_keep [W]` (positions of the row: the model's head runs on those W alone).
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
            raise DataError(
                f"the non-differentiable objective (F1) needs a generation task, not {task.name} "
                f"(non_diff)"
            )
        return "prompt"
    if not training:
        return "prompt" if task.generation else "classification"
    if train_as_classification is None:
        train_as_classification = task.train_as_classification
    if train_as_classification and task.generation:
        raise DataError(
            f"{task.name} is a generation task and cannot train as classification "
            f"(train_as_classification)"
        )
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


def _option_mask(option_len, width):
    return torch.arange(width).unsqueeze(0) >= width - torch.tensor(option_len).unsqueeze(1)


def per_row_scoring(ids, option_len):
    """Scoring fields when row i holds sequence i whole: its last option_len[i] tokens are the
    targets, read from the L + 1 last positions (the last predicts nothing scored)."""
    width, T = max(option_len), ids.shape[1]
    return {
        "targets": ids[:, T - width :],
        "option_len": torch.tensor(option_len),
        "option_mask": _option_mask(option_len, width),
        "score_row": torch.arange(len(option_len)),
        "score_pos": torch.arange(width).expand(len(option_len), width),
        "logits_to_keep": torch.arange(T - width - 1, T),
    }


def split_prompt(sequences, option_len):
    """-> (prompt, the candidates' rest): the longest common prefix of the candidates' sequences,
    cut where the first option token of any candidate starts, so every option token is in the
    rest."""
    shortest = min(len(s) - n for s, n in zip(sequences, option_len))
    length = 0
    while length < shortest and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return sequences[0][:length], [s[length:] for s in sequences]


def shared_rows(examples, pad_token_id, multiple):
    """One row per example: prompt + rest_1[:-1] + rest_2[:-1] + ... (a rest's last token predicts
    nothing).

    Causal attention makes the prompt's positions independent of what follows it, so they serve
    every candidate. Single-token candidates (SST-2, RTE, CB, BoolQ, WiC, MultiRC) leave the prompt
    alone in its row and are all read at its last position. Longer rests (Copa, ReCoRD) need a
    block mask: each rest sees the prompt and itself, with positions restarting at the prompt's end
    for each, so each candidate's tokens see exactly what they see in their own sequence.
    """
    rows, segments, positions, reads = [], [], [], []
    for e in examples:
        prompt, rests = split_prompt(e.input_ids, e.option_len)
        row, segment, position, read = list(prompt), [0] * len(prompt), list(range(len(prompt))), []
        for c, (rest, n) in enumerate(zip(rests, e.option_len)):
            # rest[j] is predicted at the row index of rest[j - 1], or the prompt's last
            start = len(row)
            read.append(
                (
                    [
                        len(prompt) - 1 if j == 0 else start + j - 1
                        for j in range(len(rest) - n, len(rest))
                    ],
                    rest[len(rest) - n :],
                )
            )
            row += rest[:-1]
            segment += [c + 1] * (len(rest) - 1)
            position += range(len(prompt), len(prompt) + len(rest) - 1)
        rows.append(row), segments.append(segment), positions.append(position), reads.append(read)
    ids, mask = pad(rows, pad_token_id, left=True, multiple=multiple)
    T = ids.shape[1]
    reads = [
        [([T - len(row) + p for p in at], tokens) for at, tokens in read]
        for row, read in zip(rows, reads)
    ]
    first = min(p for read in reads for at, _ in read for p in at)
    option_len = [n for e in examples for n in e.option_len]
    width = max(option_len)
    score_pos = torch.zeros(len(option_len), width, dtype=torch.long)
    targets = torch.full((len(option_len), width), pad_token_id, dtype=torch.long)
    for i, (at, tokens) in enumerate(r for read in reads for r in read):
        if tokens:
            score_pos[i, width - len(at) :] = torch.tensor(at) - first
            targets[i, width - len(tokens) :] = torch.tensor(tokens)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "targets": targets,
        "option_len": torch.tensor(option_len),
        "option_mask": _option_mask(option_len, width),
        "score_row": torch.tensor([b for b, e in enumerate(examples) for _ in e.input_ids]),
        "score_pos": score_pos,
        "logits_to_keep": torch.arange(first, T),
    }
    if any(any(segment) for segment in segments):  # some rest has more than one token
        batch.update(packed_mask(rows, segments, positions, T))
    return batch


def packed_mask(rows, segments, positions, T):
    """Block mask [B, 1, T, T] and position_ids [B, T] of left-padded packed rows: key j is visible
    from query i if j <= i and j is in the prompt (segment 0) or in i's segment; pads see
    themselves."""
    segment = torch.full((len(rows), T), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (seg, pos) in enumerate(zip(segments, positions)):
        segment[b, T - len(seg) :] = torch.tensor(seg, dtype=torch.long)
        position_ids[b, T - len(pos) :] = torch.tensor(pos, dtype=torch.long)
    index = torch.arange(T)
    causal = index[None, :] <= index[:, None]
    key, query = segment[:, None, :], segment[:, :, None]
    visible = causal & (key >= 0) & ((key == 0) | (key == query))
    return {
        "attention_mask": (visible | torch.eye(T, dtype=torch.bool))[:, None],
        "position_ids": position_ids,
    }


def collate(examples, kind, pad_token_id, pad_to_multiple_of=8, shared=False):
    """-> batch dict (see the module docstring). `examples`: Encoded (OPT) or MLMEncoded
    (RoBERTa)."""
    if kind not in KINDS:
        raise DataError(
            f"unknown batch kind {kind!r}, expected one of {', '.join(KINDS)} (collate)"
        )
    if not examples:
        raise DataError(f"empty batch (collate {kind})")
    if kind == "mlm":
        ids, mask = pad(
            [e.input_ids for e in examples], pad_token_id, left=False, multiple=pad_to_multiple_of
        )
        mask_pos = torch.tensor([e.mask_pos for e in examples])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mask_pos": mask_pos,
            "labels": torch.tensor([e.label for e in examples]),
            "label_word_ids": torch.tensor(examples[0].label_word_ids),
            "logits_to_keep": mask_pos[:, None],
        }
    if kind == "classification":
        num_options = [len(e.input_ids) for e in examples]
        starts = list(itertools.accumulate([0] + num_options[:-1]))
        width = max(num_options)
        index = [
            [start + (k if k < n else 0) for k in range(width)]
            for start, n in zip(starts, num_options)
        ]
        if shared:
            rows = shared_rows(examples, pad_token_id, pad_to_multiple_of)
        else:
            ids, mask = pad(
                [s for e in examples for s in e.input_ids],
                pad_token_id,
                left=True,
                multiple=pad_to_multiple_of,
            )
            rows = {
                "input_ids": ids,
                "attention_mask": mask,
                **per_row_scoring(ids, [n for e in examples for n in e.option_len]),
            }
        return {
            **rows,
            "labels": torch.tensor([e.correct[0] for e in examples]),
            "num_options": torch.tensor(num_options),
            "option_index": torch.tensor(index),
        }
    chosen = [(e.input_ids[e.correct[0]], e.option_len[e.correct[0]]) for e in examples]
    if kind == "option_lm":
        ids, mask = pad(
            [s for s, _ in chosen], pad_token_id, left=True, multiple=pad_to_multiple_of
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            **per_row_scoring(ids, [n for _, n in chosen]),
        }
    if any(e.gold is None for e in examples):
        raise DataError(
            "prompt batches need generation examples with gold answers (collate prompt)"
        )
    ids, mask = pad(
        [s[: len(s) - n] for s, n in chosen], pad_token_id, left=True, multiple=pad_to_multiple_of
    )
    return {"input_ids": ids, "attention_mask": mask, "gold": [list(e.gold) for e in examples]}
