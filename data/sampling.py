"""Which examples an OPT run uses (the original's `large_models/tasks.py::sample_subset` and
`run.py::main`).

The original draws under `temp_seed(seed)`: save numpy's global state, `np.random.seed(seed)`, draw,
restore. `np.random.RandomState(seed)` produces the same numbers (both are the legacy MT19937 seeded
the same way) and never touches global state, so results do not depend on what ran before.

Training (mezo.sh: num_train 1000, num_dev 500, num_eval 1000, train_set_seed 0):
    train + dev = the first num_train + num_dev of one permutation of HF's train split;
    dev = its tail (num_dev), train = the rest; a small split is used whole (CB 150/100,
    Copa 300/100, WSC 54/500); test = the first num_eval of a permutation of the validation split.
ICL / zero-shot (icl.sh): test = permuted validation with seed 0; example i gets its own
    demonstrations, sample_subset(train, seeds[i], num_demos) with seeds = randint(0, 10000)
    drawn under temp_seed(0).
"""

import numpy as np

from . import DataError


def sample_subset(n_rows, seed, num):
    """Indices of the first `num` rows of a permutation of range(n_rows) under seed `seed`."""
    return np.random.RandomState(seed).permutation(n_rows)[:num].tolist()


def train_dev_split(rows, seed, num_train, num_dev):
    """-> (train, dev) as run.py: one draw of num_train + num_dev, dev is the tail.

    num_dev None or 0 means no dev set (the original's `train[:-0]` would leave no training data).
    """
    picked = [rows[i] for i in sample_subset(len(rows), seed, num_train + (num_dev or 0))]
    if not num_dev:
        return picked, []
    if len(picked) <= num_dev:
        raise DataError(
            f"only {len(rows)} training rows: num_dev={num_dev} leaves none for training, "
            f"lower num_dev (train split)"
        )
    return picked[:-num_dev], picked[-num_dev:]


def eval_subset(rows, seed, num_eval):
    """The test set: a permutation of the validation split, first num_eval; None keeps all, in
    order."""
    if num_eval is None:
        return list(rows)
    return [rows[i] for i in sample_subset(len(rows), seed, num_eval)]


def icl_demo_sets(train_rows, num_eval, num_demos, count=None):
    """One demonstration set per evaluation example (`sample_train_sets` with no seed).

    The original draws num_eval seeds even when the validation split is smaller; `count` keeps
    the sets of the first `count` examples only.
    """
    seeds = np.random.RandomState(0).randint(0, 10000, num_eval)[:count]
    return [
        [train_rows[i] for i in sample_subset(len(train_rows), int(s), num_demos)] for s in seeds
    ]


def opt_splits(task, splits, num_train=1000, num_dev=None, num_eval=1000, seed=0):
    """-> {"train", "dev", "test"} for a training run; num_dev None takes the task's default."""
    num_dev = task.num_dev if num_dev is None else num_dev
    train, dev = train_dev_split(splits["train"], seed, num_train, num_dev)
    return {"train": train, "dev": dev, "test": eval_subset(splits["valid"], seed, num_eval)}


def icl_splits(splits, num_demos=32, num_eval=1000):
    """-> (test examples, one demonstration list per test example) for zero-shot / ICL
    evaluation."""
    test = eval_subset(splits["valid"], 0, num_eval)
    num_seeds = len(test) if num_eval is None else num_eval
    return test, icl_demo_sets(splits["train"], num_seeds, num_demos, count=len(test))
