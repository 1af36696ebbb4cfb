"""Collation and losses against direct computations written independently: loops over rows and
tokens with math.log / exp on small random logits (the losses read them at the batch's
logits_to_keep), and a transcription of the original's `forward_wrap_with_option_len`
(large_models/trainer.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

import data
from data import Encoded, MLMEncoded
from models.layers import keep_positions

PAD, V = 1, 11


def _examples(gen, num_options):
    """Random OPT examples: candidate sequences of random length, option length 1..3."""
    out = []
    for n in num_options:
        seqs, lens = [], []
        for _ in range(n):
            length = int(torch.randint(4, 12, (1,), generator=gen))
            seqs.append([0] + torch.randint(5, V, (length - 1,), generator=gen).tolist())
            lens.append(int(torch.randint(1, 4, (1,), generator=gen)))
        out.append(Encoded(seqs, lens, correct=[int(torch.randint(0, n, (1,), generator=gen))]))
    return out


def _kept(logits, batch):
    """What a model returns for the batch (data.batch_logits): the full logits at its
    logits_to_keep."""
    return data.batch_logits(
        lambda ids, mask, logits_to_keep: keep_positions(logits, logits_to_keep), batch
    )


def _log_softmax_at(row, target):
    """log p(target) from one row of logits, with math only."""
    m = max(row)
    return row[target] - (m + math.log(sum(math.exp(x - m) for x in row)))


def _mean_option_logprob(logits, ids, option_len):
    """Mean log-prob of the last option_len tokens of ids (right-aligned in the padded row)."""
    T = len(ids)
    return (
        sum(_log_softmax_at(logits[t - 1], ids[t]) for t in range(T - option_len, T)) / option_len
    )


def test_left_padding_to_multiple_of_8():
    gen = torch.Generator().manual_seed(0)
    examples = _examples(gen, [2, 3])
    batch = data.collate(examples, "classification", PAD)
    seqs = [s for e in examples for s in e.input_ids]
    N, T = batch["input_ids"].shape
    assert N == 5 and T % 8 == 0 and T >= max(map(len, seqs)) and T - 8 < max(map(len, seqs))
    for i, s in enumerate(seqs):
        assert batch["input_ids"][i, T - len(s) :].tolist() == s
        assert batch["input_ids"][i, : T - len(s)].eq(PAD).all()
        assert batch["attention_mask"][i].tolist() == [0] * (T - len(s)) + [1] * len(s)
    assert batch["option_len"].tolist() == [n for e in examples for n in e.option_len]
    assert batch["num_options"].tolist() == [2, 3] and batch["labels"].tolist() == [
        e.correct[0] for e in examples
    ]
    assert batch["option_index"].tolist() == [[0, 1, 0], [2, 3, 4]]
    assert data.collate(examples, "option_lm", PAD, pad_to_multiple_of=None)["input_ids"].shape[
        1
    ] == max(len(e.input_ids[e.correct[0]]) for e in examples)


@pytest.mark.parametrize("num_options", [[2, 2, 2], [2, 3, 1]])
def test_classification_loss_matches_direct_computation(num_options):
    gen = torch.Generator().manual_seed(1)
    examples = _examples(gen, num_options)
    batch = data.collate(examples, "classification", PAD)
    logits = torch.randn(*batch["input_ids"].shape, V, generator=gen, dtype=torch.float64)
    loss = data.task_loss(_kept(logits, batch), batch)

    rows, losses = 0, []
    for e in examples:
        scores = [
            _mean_option_logprob(
                logits[rows + j].tolist(), batch["input_ids"][rows + j].tolist(), e.option_len[j]
            )
            for j in range(len(e.input_ids))
        ]
        m = max(scores)
        losses.append(m + math.log(sum(math.exp(s - m) for s in scores)) - scores[e.correct[0]])
        rows += len(e.input_ids)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-12)
    assert data.predictions(_kept(logits, batch), batch).tolist() == [
        int(torch.tensor(s).argmax()) for s in _scores(examples, logits, batch)
    ]


def _scores(examples, logits, batch):
    rows, out = 0, []
    for e in examples:
        out.append(
            [
                _mean_option_logprob(
                    logits[rows + j].tolist(),
                    batch["input_ids"][rows + j].tolist(),
                    e.option_len[j],
                )
                for j in range(len(e.input_ids))
            ]
        )
        rows += len(e.input_ids)
    return out


def _original_loss(logits, input_ids, option_len, num_options, labels, pad_token_id):
    """Transcription of forward_wrap_with_option_len (labels per flattened row, as the original)."""
    shift_logits = logits[..., :-1, :]
    shift_labels = input_ids.clone()[..., 1:]
    shift_labels[shift_labels == pad_token_id] = -100
    for i, n in enumerate(option_len):
        shift_labels[i, :-n] = -100
    if num_options is None:
        return F.cross_entropy(
            shift_logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
        )
    log_probs = F.log_softmax(shift_logits, dim=-1)
    mask = shift_labels != -100
    shift_labels[~mask] = 0
    selected = torch.gather(log_probs, -1, shift_labels.unsqueeze(-1)).squeeze(-1)
    selected = (selected * mask).sum(-1) / mask.sum(-1)
    n = num_options[0]
    return F.cross_entropy(selected.view(-1, n), labels.view(-1, n)[:, 0])


def test_losses_match_original_formula():
    gen = torch.Generator().manual_seed(2)
    examples = _examples(gen, [3, 3])
    batch = data.collate(examples, "classification", PAD)
    logits = torch.randn(*batch["input_ids"].shape, V, generator=gen)
    flat_labels = batch["labels"].repeat_interleave(3)
    expected = _original_loss(
        logits, batch["input_ids"], batch["option_len"].tolist(), [3] * 6, flat_labels, PAD
    )
    assert data.classification_loss(_kept(logits, batch), batch).item() == pytest.approx(
        expected.item(), abs=1e-6
    )
    lm = data.collate(examples, "option_lm", PAD)
    logits = torch.randn(*lm["input_ids"].shape, V, generator=gen)
    expected = _original_loss(logits, lm["input_ids"], lm["option_len"].tolist(), None, None, PAD)
    assert data.task_loss(_kept(logits, lm), lm).item() == pytest.approx(expected.item(), abs=1e-6)


def test_option_lm_loss_is_token_mean():
    gen = torch.Generator().manual_seed(3)
    examples = _examples(gen, [2, 1, 3])
    batch = data.collate(examples, "option_lm", PAD)
    logits = torch.randn(*batch["input_ids"].shape, V, generator=gen, dtype=torch.float64)
    total, count = 0.0, 0
    for i, e in enumerate(examples):
        ids, n = batch["input_ids"][i].tolist(), e.option_len[e.correct[0]]
        for t in range(len(ids) - n, len(ids)):
            total -= _log_softmax_at(logits[i, t - 1].tolist(), ids[t])
            count += 1
    assert data.task_loss(_kept(logits, batch), batch).item() == pytest.approx(
        total / count, abs=1e-12
    )


def test_sfc_scores_are_sum_differences():
    gen = torch.Generator().manual_seed(4)
    examples, sfc_examples = _examples(gen, [2, 2]), _examples(gen, [2, 2])
    batch, sfc_batch = (
        data.collate(examples, "classification", PAD),
        data.collate(sfc_examples, "classification", PAD),
    )
    logits = torch.randn(*batch["input_ids"].shape, V, generator=gen, dtype=torch.float64)
    sfc_logits = torch.randn(*sfc_batch["input_ids"].shape, V, generator=gen, dtype=torch.float64)
    scores = data.sfc_scores(_kept(logits, batch), batch, _kept(sfc_logits, sfc_batch), sfc_batch)
    for b in range(2):
        for j in range(2):
            i = 2 * b + j
            mean = _mean_option_logprob(
                logits[i].tolist(), batch["input_ids"][i].tolist(), examples[b].option_len[j]
            )
            sfc = _mean_option_logprob(
                sfc_logits[i].tolist(),
                sfc_batch["input_ids"][i].tolist(),
                sfc_examples[b].option_len[j],
            )
            expected = mean * examples[b].option_len[j] - sfc * sfc_examples[b].option_len[j]
            assert scores[b, j].item() == pytest.approx(expected, abs=1e-12)


def test_mlm_loss_and_right_padding():
    gen = torch.Generator().manual_seed(5)
    words = [7, 9, 10]
    examples = [MLMEncoded([0, 5, 6, 4, 2], 3, 2, words), MLMEncoded([0, 4, 8, 2], 1, 0, words)]
    batch = data.collate(examples, "mlm", PAD)
    assert (
        batch["input_ids"][1].tolist()[:4] == [0, 4, 8, 2]
        and batch["input_ids"][1, 4:].eq(PAD).all()
    )
    assert batch["attention_mask"][1].tolist()[:5] == [1, 1, 1, 1, 0]
    logits = torch.randn(*batch["input_ids"].shape, V, generator=gen, dtype=torch.float64)
    losses = []
    for b, e in enumerate(examples):
        row = [logits[b, e.mask_pos, w].item() for w in words]
        losses.append(-(row[e.label] - math.log(sum(math.exp(x) for x in row))))
    assert data.task_loss(_kept(logits, batch), batch).item() == pytest.approx(
        sum(losses) / 2, abs=1e-12
    )
    hits = [
        max(range(3), key=lambda c: logits[b, e.mask_pos, words[c]].item()) == e.label
        for b, e in enumerate(examples)
    ]
    assert data.neg_accuracy(_kept(logits, batch), batch).item() == pytest.approx(-sum(hits) / 2)


def test_batch_kinds_follow_the_scripts():
    kind = data.batch_kind
    assert kind(data.get_task("SST2")) == "classification"
    assert kind(data.get_task("SST2"), train_as_classification=False) == "option_lm"
    assert (
        kind(data.get_task("Copa"))
        == kind(data.get_task("ReCoRD"))
        == kind(data.get_task("SQuAD"))
        == "option_lm"
    )
    assert kind(data.get_task("Copa"), training=False) == "classification"
    assert (
        kind(data.get_task("SQuAD"), training=False)
        == kind(data.get_task("DROP"), non_diff=True)
        == "prompt"
    )
    assert kind(data.get_task("trec")) == "mlm"
    with pytest.raises(data.DataError):
        kind(data.get_task("SST2"), non_diff=True)
    with pytest.raises(data.DataError):
        data.task_loss(torch.zeros(1, 2, V), {"input_ids": torch.zeros(1, 2), "gold": [["x"]]})
