"""EM / F1 against a transcription of the official SQuAD v1.1 evaluation script
(evaluate-v1.1.py)."""

import re
import string
from collections import Counter

import pytest
import torch

from data import metrics


# ---- official evaluate-v1.1.py, transcribed as the oracle -----------------------------------
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


# ----------------------------------------------------------------------------------------------


CASES = [
    ("The Eiffel Tower", ["Eiffel Tower"]),  # article
    ("an apple, a pear!", ["apple pear"]),  # articles and punctuation
    ("Denver Broncos", ["Broncos", "the Denver Broncos", "Carolina"]),  # several golds: best wins
    ("", ["something"]),  # empty prediction
    ("the", ["a"]),  # only articles: both empty
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"]),
    ("  1,200   people ", ["1200 people", "1,200"]),
    ("THE   Answer.", ["answer"]),
    # repeated tokens (Counter intersection)
    ("red red blue", ["red blue blue"]),
    # "the" inside a word is not an article
    ("theater", ["the ater"]),
]


@pytest.mark.parametrize("prediction,golds", CASES)
def test_em_f1_match_official(prediction, golds):
    assert metrics.normalize_answer(prediction) == official_normalize_answer(prediction)
    assert metrics.f1(prediction, golds) == pytest.approx(
        metric_max_over_ground_truths(official_f1_score, prediction, golds)
    )
    assert metrics.exact_match(prediction, golds) == float(
        metric_max_over_ground_truths(official_exact_match_score, prediction, golds)
    )


def test_dataset_averages_and_no_answer_case():
    preds = [p for p, _ in CASES]
    golds = [g for _, g in CASES]
    official = sum(metric_max_over_ground_truths(official_f1_score, p, g) for p, g in CASES) / len(
        CASES
    )
    assert metrics.calculate_metric("f1", preds, golds) == pytest.approx(official)
    official_em = sum(
        metric_max_over_ground_truths(official_exact_match_score, p, g) for p, g in CASES
    ) / len(CASES)
    assert metrics.calculate_metric("em", preds, golds) == pytest.approx(official_em)
    # The original's addition: a first gold of "CANNOTANSWER" / "no answer" is scored by exact
    # match.
    assert metrics.f1("no answer", ["no answer", "yes"]) == 1.0
    assert metrics.f1("no", ["no answer"]) == 0.0 and official_f1_score("no", "no answer") > 0
    assert metrics.neg_f1(["Eiffel Tower", ""], [["Eiffel Tower"], ["x"]]).item() == pytest.approx(
        -0.5
    )
    assert metrics.neg_f1(["a"], [["a"]]).dtype == torch.float32


def test_accuracy_with_multiple_correct():
    assert metrics.accuracy([1, 0, 2], [1, 1, [0, 2]]) == pytest.approx(2 / 3)
    assert metrics.calculate_metric("accuracy", [0, 3], [[0, 1], [2]]) == 0.5
