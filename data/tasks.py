"""OPT tasks of the paper (the original's `large_models/tasks.py`).

A task turns rows with Hugging Face field names (data/sources.py reads them from the official
files or an HF export) into `Sample`s: the fields its template reads, the candidates and the
correct candidate, exactly as the original's `build_sample`. Per-task defaults come from the
original scripts: `train_as_classification` (mezo.sh: off for Copa, ReCoRD, SQuAD, DROP) and
`num_dev` (mezo.sh: DEV=100 for CB and Copa, 500 otherwise).
"""

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Callable

from . import SAMPLES_DIR, DataError, sources
from .readers import field
from .templates import (
    BoolQTemplate,
    CBTemplate,
    CopaTemplate,
    DROPTemplate,
    MultiRCTemplate,
    ReCoRDTemplate,
    RTETemplate,
    SQuADTemplate,
    SST2Template,
    Template,
    WICTemplate,
    WSCTemplate,
)


@dataclass(frozen=True)
class Sample:
    data: dict  # the fields the template reads
    candidates: list | None  # label ids, words or strings; None for generation tasks
    correct_candidate: Any  # one candidate, or a list of gold strings (ReCoRD, SQuAD, DROP)
    id: Any = None
    # "<file>:<line>" for messages
    where: Any = dataclass_field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class OPTTask:
    name: str  # the original's class-name prefix: SST2, Copa, ReCoRD, ...
    template: Template
    build: Callable  # (HF row, where) -> Sample
    metric: str = "accuracy"  # "accuracy" or "f1" (the original's metric_name)
    generation: bool = False  # SQuAD / DROP: greedy generation at test time
    train_as_classification: bool = True
    num_dev: int = 500
    family: str = "opt"
    train_sep: str = "\n\n"  # between demonstrations (`Dataset.train_sep`)

    @property
    def key(self):
        """Lower-case key without dashes ("sst2", "record", ...), as program/paper/numbers.py
        uses."""
        return self.name.lower()

    def load(self, data_dir=None):
        """-> {"train": [Sample], "valid": [Sample]}; "valid" is HF's validation split (the test
        set)."""
        raw = sources.read_splits(self.name, data_dir or SAMPLES_DIR)
        return {
            split: [self.build(row, where) for where, row in rows] for split, rows in raw.items()
        }


def _texts(row, names, where):
    return {n: field(row, n, str, where) for n in names}


def _label(row, n_labels, where):
    label = field(row, "label", int, where)
    if not 0 <= label < n_labels:
        raise DataError(f"unknown label {label}, expected 0..{n_labels - 1} ({where})")
    return label


def _label_task(names, n_labels):
    """Label-id candidates [0, ..., n-1], verbalized by the template (SST2, RTE, CB, WSC, WIC,
    MultiRC)."""

    def build(row, where):
        return Sample(
            data=_texts(row, names, where),
            candidates=list(range(n_labels)),
            correct_candidate=_label(row, n_labels, where),
            id=row.get("idx"),
            where=where,
        )

    return build


def _build_boolq(row, where):
    answer = field(row, "answer", bool, where)
    return Sample(
        data=_texts(row, ("question", "passage"), where),
        candidates=["Yes", "No"],
        correct_candidate="Yes" if answer else "No",
        where=where,
    )


def _build_copa(row, where):
    data = _texts(row, ("premise", "choice1", "choice2", "question"), where)
    if data["question"] not in ("cause", "effect"):
        raise DataError(
            f"unknown COPA question {data['question']!r}, expected cause or effect ({where})"
        )
    candidates = [data["choice1"], data["choice2"]]
    return Sample(
        data=data,
        candidates=candidates,
        correct_candidate=candidates[_label(row, 2, where)],
        id=row.get("idx"),
        where=where,
    )


def _strings(row, name, where):
    values = field(row, name, list, where)
    if not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"field {name!r} should be a non-empty list of strings ({where})")
    return values


def _build_record(row, where):
    entities, answers = _strings(row, "entities", where), _strings(row, "answers", where)
    for a in answers:
        if a not in entities:  # the original looks answers up with candidates.index(...)
            raise DataError(f"answer {a!r} is not among the entities ({where})")
    return Sample(
        data=_texts(row, ("passage", "query"), where),
        candidates=entities,
        correct_candidate=answers,
        id=row.get("idx"),
        where=where,
    )


def _build_squad(row, where):
    answers = _strings(field(row, "answers", dict, where), "text", where)
    data = {**_texts(row, ("title", "context", "question"), where), "answers": answers}
    return Sample(
        data=data, candidates=None, correct_candidate=answers, id=row.get("id"), where=where
    )


def _build_drop(row, where):
    answers = _strings(field(row, "answers_spans", dict, where), "spans", where)
    texts = _texts(row, ("passage", "question"), where)
    data = {"context": texts["passage"], "question": texts["question"], "answers": answers}
    return Sample(
        data=data, candidates=None, correct_candidate=answers, id=row.get("query_id"), where=where
    )


OPT_TASKS = {
    t.name: t
    for t in (
        OPTTask("SST2", SST2Template(), _label_task(("sentence",), 2)),
        OPTTask("RTE", RTETemplate(), _label_task(("premise", "hypothesis"), 2)),
        OPTTask("CB", CBTemplate(), _label_task(("premise", "hypothesis"), 3), num_dev=100),
        OPTTask("BoolQ", BoolQTemplate(), _build_boolq),
        OPTTask("WSC", WSCTemplate(), _label_task(("text", "span1_text", "span2_text"), 2)),
        OPTTask("WIC", WICTemplate(), _label_task(("word", "sentence1", "sentence2"), 2)),
        OPTTask("MultiRC", MultiRCTemplate(), _label_task(("paragraph", "question", "answer"), 2)),
        OPTTask("Copa", CopaTemplate(), _build_copa, train_as_classification=False, num_dev=100),
        OPTTask("ReCoRD", ReCoRDTemplate(), _build_record, train_as_classification=False),
        OPTTask(
            "SQuAD",
            SQuADTemplate(),
            _build_squad,
            metric="f1",
            generation=True,
            train_as_classification=False,
        ),
        OPTTask(
            "DROP",
            DROPTemplate(),
            _build_drop,
            metric="f1",
            generation=True,
            train_as_classification=False,
        ),
    )
}
