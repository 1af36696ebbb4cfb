"""Metrics (the original's `large_models/metrics.py`).

SQuAD-style answer normalisation (lower case, no punctuation, no articles a/an/the, single spaces),
exact match and token F1 taking the best gold, as the official SQuAD v1.1 evaluation. One addition
of the original: when the first gold is "CANNOTANSWER" or "no answer", F1 is exact match against it.
DROP is scored with the same SQuAD F1, not the official DROP F1.
"""

import re
import string
from collections import Counter

import torch

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_ANSWER = ("CANNOTANSWER", "no answer")


def normalize_answer(s):
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _token_f1(prediction, gold):
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction, golds):
    """Best token F1 of `prediction` over the gold answers."""
    if golds[0] in _NO_ANSWER:
        return float(normalize_answer(golds[0]) == normalize_answer(prediction))
    return max(_token_f1(prediction, g) for g in golds)


def exact_match(prediction, golds):
    return float(any(normalize_answer(g) == normalize_answer(prediction) for g in golds))


def accuracy(predicted, correct):
    """Mean of `predicted[i] == correct[i]`; a list-valued correct[i] (ReCoRD) means "is among"."""
    hits = [p in c if isinstance(c, (list, tuple)) else p == c for p, c in zip(predicted, correct)]
    return sum(hits) / len(hits)


def calculate_metric(name, predicted, correct):
    """The original's `calculate_metric`: "accuracy", "em" or "f1" averaged over examples."""
    if name == "accuracy":
        return accuracy(predicted, correct)
    score = {"em": exact_match, "f1": f1}[name]
    return sum(score(p, g) for p, g in zip(predicted, correct)) / len(predicted)


def neg_f1(predictions, golds):
    """The non-differentiable MeZO objective for SQuAD: -(mean F1 of the batch), a float32 0-d
    tensor."""
    return -torch.tensor(
        sum(f1(p, g) for p, g in zip(predictions, golds)) / len(golds), dtype=torch.float32
    )
