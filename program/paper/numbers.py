"""The MeZO paper's numbers as data (Malladi et al. 2023, arXiv 2305.17333 v3).

Transcribed by hand from the paper's tables; the report (`program/paper/report.py`) prints them
beside our results. Scores are percentages (accuracy, or F1 for
SQuAD/DROP), memory is in GB, wall-clock in seconds per step. `None` marks a cell the paper
leaves without a number.

Tasks and methods use short canonical keys (below) so that the report can look a cell up from a
run's config; `TASK_LABELS` and `METHOD_LABELS` give the names the paper prints.
"""

OPT_TASKS = (
    "sst2",
    "rte",
    "cb",
    "boolq",
    "wsc",
    "wic",
    "multirc",
    "copa",
    "record",
    "squad",
    "drop",
)
ROBERTA_TASKS = ("sst2", "sst5", "snli", "mnli", "rte", "trec")
GENERATION_TASKS = ("squad", "drop")  # scored by F1 (SQuAD-style token F1, also for DROP)

TASK_LABELS = {
    "sst2": "SST-2",
    "rte": "RTE",
    "cb": "CB",
    "boolq": "BoolQ",
    "wsc": "WSC",
    "wic": "WIC",
    "multirc": "MultiRC",
    "copa": "COPA",
    "record": "ReCoRD",
    "squad": "SQuAD",
    "drop": "DROP",
    "sst5": "SST-5",
    "snli": "SNLI",
    "mnli": "MNLI",
    "trec": "TREC",
}

# Paper row order; `-nondiff` rows are Table 3 (MeZO optimising accuracy / F1 directly), FT with
# SGD is a Table 15 baseline.
METHOD_LABELS = {
    "zero-shot": "Zero-shot",
    "icl": "ICL",
    "lp": "LP",
    "mezo": "MeZO",
    "mezo-lora": "MeZO (LoRA)",
    "mezo-prefix": "MeZO (prefix)",
    "mezo-adam": "MeZO-Adam",
    "mezo-nondiff": "MeZO (non-diff)",
    "mezo-prefix-nondiff": "MeZO (prefix, non-diff)",
    "ft": "FT",
    "ft-lora": "FT (LoRA)",
    "ft-prefix": "FT (prefix)",
    "ft-sgd": "FT (SGD)",
}


def _rows(columns, rows):
    """{method: (v1, v2, ...)} -> {method: {column: v}}; strict so a missing cell cannot shift a
    row."""
    return {method: dict(zip(columns, values, strict=True)) for method, values in rows.items()}


# Table 1: OPT-13B, 1000 train / 500 dev / 1000 test examples, seed 0.
TABLE1 = _rows(
    OPT_TASKS,
    {
        "zero-shot": (58.8, 59.6, 46.4, 59.0, 38.5, 55.0, 46.9, 80.0, 81.2, 46.2, 14.6),
        "icl": (87.0, 62.1, 57.1, 66.9, 39.4, 50.5, 53.1, 87.0, 82.5, 75.9, 29.6),
        "lp": (93.4, 68.6, 67.9, 59.3, 63.5, 60.2, 63.5, 55.0, 27.1, 3.7, 11.1),
        "mezo": (91.4, 66.1, 67.9, 67.6, 63.5, 61.1, 60.1, 88.0, 81.7, 84.7, 30.9),
        "mezo-lora": (89.6, 67.9, 66.1, 73.8, 64.4, 59.7, 61.5, 84.0, 81.2, 83.8, 31.4),
        "mezo-prefix": (90.7, 70.8, 69.6, 73.1, 60.6, 59.9, 63.7, 87.0, 81.4, 84.2, 28.9),
        "ft": (92.0, 70.8, 83.9, 77.1, 63.5, 70.1, 71.1, 79.0, 74.1, 84.9, 31.3),
    },
)

# Table 20: OPT-30B and OPT-66B (no intermediate validation: the last checkpoint is used).
TABLE20_TASKS = ("sst2", "rte", "boolq", "wsc", "wic", "squad")
TABLE20 = {
    "30b": _rows(
        TABLE20_TASKS,
        {
            "zero-shot": (56.7, 52.0, 39.1, 38.5, 50.2, 46.5),
            "icl": (81.9, 66.8, 66.2, 56.7, 51.3, 78.0),
            "mezo": (90.6, 66.4, 67.2, 63.5, 56.3, 85.2),
            "mezo-prefix": (87.5, 72.6, 73.5, 55.8, 59.1, 83.9),
        },
    ),
    "66b": _rows(
        TABLE20_TASKS,
        {
            "zero-shot": (57.5, 67.2, 66.8, 43.3, 50.6, 48.1),
            "icl": (89.3, 65.3, 62.8, 52.9, 54.9, 81.3),
            "mezo": (91.2, 65.7, 72.7, 63.5, 58.9, None),  # printed "*": needs further tuning
            "mezo-prefix": (93.6, 66.4, 73.7, 57.7, 58.6, 85.0),
        },
    ),
}

# Table 18: RoBERTa-large, (mean, std) over the data seeds 13, 21, 42, 87, 100.
# The zero-shot (prompt) row has no std and is the same for both k.
ROBERTA_ZERO_SHOT = dict(zip(ROBERTA_TASKS, (79.0, 35.5, 50.2, 48.8, 51.4, 32.0), strict=True))
TABLE18 = {
    16: _rows(
        ROBERTA_TASKS,
        {
            "lp": ((76.0, 2.8), (40.3, 1.9), (66.0, 2.7), (56.5, 2.5), (59.4, 5.3), (51.3, 5.5)),
            "mezo": ((90.5, 1.2), (45.5, 2.0), (68.5, 3.9), (58.7, 2.5), (64.0, 3.3), (76.9, 2.7)),
            "mezo-lora": (
                (91.4, 0.9),
                (43.0, 1.6),
                (69.7, 6.0),
                (64.0, 2.5),
                (64.9, 3.6),
                (73.1, 6.5),
            ),
            "mezo-prefix": (
                (90.8, 1.7),
                (45.8, 2.0),
                (71.6, 2.5),
                (63.4, 1.8),
                (65.4, 3.9),
                (80.3, 3.6),
            ),
            "mezo-adam": (
                (90.4, 1.4),
                (45.4, 1.5),
                (74.1, 2.7),
                (64.3, 0.8),
                (59.2, 11.1),
                (78.3, 1.4),
            ),
            "ft": ((91.9, 1.8), (47.5, 1.9), (77.5, 2.6), (70.0, 2.3), (66.4, 7.2), (85.0, 2.5)),
            "ft-lora": (
                (91.4, 1.7),
                (46.7, 1.1),
                (74.9, 4.3),
                (67.7, 1.4),
                (66.1, 3.5),
                (82.7, 4.1),
            ),
            "ft-prefix": (
                (91.9, 1.0),
                (47.7, 1.1),
                (77.2, 1.3),
                (66.5, 2.5),
                (66.6, 2.0),
                (85.7, 1.3),
            ),
        },
    ),
    512: _rows(
        ROBERTA_TASKS,
        {
            "lp": ((91.3, 0.5), (51.7, 0.5), (80.9, 1.0), (71.5, 1.1), (73.1, 1.5), (89.4, 0.5)),
            "mezo": ((93.3, 0.7), (53.2, 1.4), (83.0, 1.0), (78.3, 0.5), (78.6, 2.0), (94.3, 1.3)),
            "mezo-lora": (
                (93.4, 0.4),
                (52.4, 0.8),
                (84.0, 0.8),
                (77.9, 0.6),
                (77.6, 1.3),
                (95.0, 0.7),
            ),
            "mezo-prefix": (
                (93.3, 0.1),
                (53.6, 0.5),
                (84.8, 1.1),
                (79.8, 1.2),
                (77.2, 0.8),
                (94.4, 0.7),
            ),
            "mezo-adam": (
                (93.3, 0.6),
                (53.9, 0.8),
                (85.3, 0.8),
                (79.6, 0.4),
                (79.2, 1.2),
                (95.1, 0.3),
            ),
            "ft": ((93.9, 0.7), (55.9, 0.9), (88.7, 0.8), (84.4, 0.8), (82.7, 1.4), (97.3, 0.2)),
            "ft-lora": (
                (94.2, 0.2),
                (55.3, 0.7),
                (88.3, 0.5),
                (83.9, 0.6),
                (83.2, 1.3),
                (97.0, 0.3),
            ),
            "ft-prefix": (
                (93.7, 0.3),
                (54.6, 0.7),
                (88.3, 0.7),
                (83.3, 0.5),
                (82.5, 0.8),
                (97.4, 0.2),
            ),
        },
    ),
}

# Table 3: non-differentiable objectives. OPT-13B SQuAD, MeZO (prefix) maximising F1;
# RoBERTa-large k=512, full-parameter MeZO maximising accuracy (single numbers, no std).
TABLE3_OPT_13B = {"mezo-prefix-nondiff": {"squad": 78.5}}
TABLE3_ROBERTA_512 = {"mezo-nondiff": {"sst2": 92.7, "sst5": 48.9, "snli": 82.7, "trec": 68.6}}

# Table 22: peak GPU memory on MultiRC (about 400 tokens per example, per-device batch 1),
# TABLE22[size][method] = (number of A100-80GB GPUs, total GB); GB is None where the paper gives
# only the GPU count.
MEMORY_METHODS = ("zero-shot/mezo", "icl", "prefix-ft", "ft")
TABLE22 = _rows(
    MEMORY_METHODS,
    {  # rows: OPT size
        "1.3b": ((1, 4), (1, 6), (1, 19), (1, 27)),
        "2.7b": ((1, 7), (1, 8), (1, 29), (1, 55)),
        "6.7b": ((1, 14), (1, 16), (1, 46), (2, 156)),
        "13b": ((1, 26), (1, 29), (2, 158), (4, 316)),
        "30b": ((1, 58), (1, 62), (4, 315), (8, 633)),
        "66b": ((2, 128), (2, 134), (8, None), (16, None)),
    },
)

# --- lookups for the report: the paper's figure for one cell, None where it has none ---------
OPT_TEST = {"13b": {**TABLE1, **TABLE3_OPT_13B}, **TABLE20}
ROBERTA_TEST = {
    k: {"zero-shot": {t: (v, None) for t, v in ROBERTA_ZERO_SHOT.items()}, **table}
    for k, table in TABLE18.items()
}
ROBERTA_TEST[512].update(
    {m: {t: (v, None) for t, v in row.items()} for m, row in TABLE3_ROBERTA_512.items()}
)
# Our method names -> Table 22's columns (MeZO needs the memory of inference: one column).
MEMORY_COLUMN = {
    "zero-shot": "zero-shot/mezo",
    "mezo": "zero-shot/mezo",
    "icl": "icl",
    "ft-prefix": "prefix-ft",
    "ft": "ft",
}


def opt_test(size, method, task):
    """Test score of OPT-`size` ("13b", ...): Table 1, 20 or 3."""
    return OPT_TEST.get(size, {}).get(method, {}).get(task)


def roberta_test(k, method, task):
    """(mean, std) of RoBERTa-large: Table 18 (or 3); the zero-shot row serves both k."""
    table = ROBERTA_TEST.get(16 if method == "zero-shot" else k, {})
    return table.get(method, {}).get(task, (None, None))


def memory(size, method):
    """(GPUs, GB) of Table 22 for OPT-`size`."""
    return TABLE22.get(size, {}).get(MEMORY_COLUMN.get(method), (None, None))
