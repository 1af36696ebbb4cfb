"""Where each OPT task's data comes from, and how official files become Hugging Face fields.

The original loads everything with `datasets.load_dataset` (large_models/tasks.py). We read the
official distributions instead and convert each row exactly as the HF builder scripts do
(`super_glue.py`, `squad.py`, `drop.py`, `glue.py`), so that a JSONL export of the HF dataset
(`ds[split].to_json(...)`: `train.jsonl` + `validation.jsonl`) and the official files give the same
examples. HF's "validation" split is what the original calls "valid" (its test set).

Lookup for an OPT task, given `data_dir` D (first hit wins):
  1. D/<dir> for each of the task's directory names (matched case-insensitively),
  2. D itself (D may point straight at a task folder),
  3. D/original/<dir> (LM-BFF's copy of GLUE, for SST-2),
and inside each directory the task's formats in order (official first, then the HF export),
recognised by their validation file. A directory holding a format's train file without its
validation file (or the reverse) is an error naming the missing file.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Callable

from . import DataError
from .readers import JsonWhere, field, read_json, read_jsonl, read_tsv


@dataclass(frozen=True)
class Format:
    name: str
    train_file: str
    valid_file: str
    read: Callable  # (path, split) -> [(where, row with HF fields)]


def find(task_name, dirnames, formats, data_dir):
    """-> (format, train path, validation path) following the lookup order above."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found ({data_dir})")
    wanted = {n.lower() for n in dirnames}
    dirs = [os.path.join(data_dir, e) for e in sorted(os.listdir(data_dir)) if e.lower() in wanted]
    dirs.append(data_dir)
    original = os.path.join(data_dir, "original")
    if os.path.isdir(original):
        dirs += [
            os.path.join(original, e) for e in sorted(os.listdir(original)) if e.lower() in wanted
        ]
    for d in dirs:
        # Formats are told apart by their validation file (train.jsonl is shared by three).
        for fmt in formats:
            train, valid = os.path.join(d, fmt.train_file), os.path.join(d, fmt.valid_file)
            if os.path.isfile(valid):
                if not os.path.isfile(train):
                    raise DataError(f"missing {fmt.name} file of {task_name} ({train})")
                return fmt, train, valid
        for fmt in formats:
            if os.path.isfile(os.path.join(d, fmt.train_file)):
                raise DataError(
                    f"missing {fmt.name} file of {task_name} ({os.path.join(d, fmt.valid_file)})"
                )
    looked = ", ".join(f"{f.train_file}+{f.valid_file}" for f in formats)
    raise DataError(
        f"no {task_name} data: looked for {looked} in {'/'.join(sorted(dirnames))}/, "
        f"the directory itself and original/ ({data_dir})"
    )


# ----------------------------------------------------------------------------------------------
# Formats shared by several tasks


def _hf_jsonl(path, split):
    return read_jsonl(path)


HF_JSONL = Format("Hugging Face JSONL export", "train.jsonl", "validation.jsonl", _hf_jsonl)


def _superglue(convert):
    """SuperGLUE v2 distribution: `train.jsonl`, `val.jsonl`; `convert` yields HF rows per line."""

    def read(path, split):
        return [(where, row) for where, raw in read_jsonl(path) for row in convert(raw, where)]

    return Format("SuperGLUE JSONL", "train.jsonl", "val.jsonl", read)


def _class_label(raw, where, classes=None):
    """HF ClassLabel id of a SuperGLUE label: the index in `classes` of a string label, or, for
    true/false tasks (HF's default ("False", "True") classes; COPA's choice1/choice2), 0 or 1."""
    label = field(raw, "label", (str, bool, int), where)
    if classes is None and (isinstance(label, bool) or label in (0, 1)):
        return int(label)
    if classes is not None and label in classes:
        return classes.index(label)
    expected = list(classes) if classes is not None else "true/false or 0/1"
    raise DataError(f"unknown label {label!r}, expected {expected} ({where})")


def _pick(raw, names, where):
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object ({where})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(f"missing field {missing[0]!r} ({where})")
    return {n: raw[n] for n in names}


def _labelled(features, classes=None):
    def convert(raw, where):
        yield {**_pick(raw, features + ("idx",), where), "label": _class_label(raw, where, classes)}

    return convert


# ----------------------------------------------------------------------------------------------
# Task-specific conversions (each mirrors the HF builder script named in its docstring)


def _glue_sst2(path, split):
    """GLUE SST-2 TSV (`sentence<TAB>label` header); HF `glue.py` numbers rows from 0 as idx."""
    rows = []
    for i, (where, r) in enumerate(read_tsv(path, ("sentence", "label"))):
        if r["label"] not in ("0", "1"):
            raise DataError(f"unknown label {r['label']!r}, expected 0 or 1 ({where})")
        rows.append((where, {"sentence": r["sentence"], "label": int(r["label"]), "idx": i}))
    return rows


def _google_boolq(path, split):
    """Google's BoolQ release (`train.jsonl`, `dev.jsonl`), the source of HF `boolq`."""
    return [
        (where, _pick(raw, ("question", "answer", "passage"), where))
        for where, raw in read_jsonl(path)
    ]


def _superglue_boolq(raw, where):
    row = _pick(raw, ("question", "passage"), where)
    row["answer"] = field(raw, "label", bool, where)
    yield row


def _fix_wsc_span(ex, key, where):
    """HF `super_glue.py::_fix_wst` (config wsc.fixed): make a span a substring of the text."""
    text, index = ex[key + "_text"], ex[key + "_index"]
    if text in ex["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
        return
    if "theyscold" in text:
        ex["span2_index"] = 10  # HF also calls text.replace(...) but discards its result
    words = ex["text"].split()
    if not 0 <= index < len(words):
        raise DataError(f"{key}_index {index} is outside the text ({where})")
    text = (text[:1].lower() if words[index][0].islower() else text[:1].upper()) + text[1:]
    text = text.rstrip(".").replace("\n", " ")
    if text not in ex["text"]:
        raise DataError(f"{key}_text {text!r} is not in the text ({where})")
    ex[key + "_text"] = text


def _superglue_wsc(raw, where):
    target = field(raw, "target", dict, where)
    ex = {
        **_pick(raw, ("text",), where),
        **_pick(target, ("span1_index", "span2_index", "span1_text", "span2_text"), where),
    }
    field(ex, "text", str, where)
    for key in ("span1", "span2"):
        field(ex, key + "_text", str, where)
        field(ex, key + "_index", int, where)
        _fix_wsc_span(ex, key, where)
    yield {**ex, "idx": field(raw, "idx", int, where), "label": _class_label(raw, where)}


def _superglue_multirc(raw, where):
    """One HF row per (question, answer) pair of a passage."""
    passage = field(raw, "passage", dict, where)
    for question in field(passage, "questions", list, where):
        for answer in field(question, "answers", list, where):
            yield {
                "paragraph": field(passage, "text", str, where),
                "question": field(question, "question", str, where),
                "answer": field(answer, "text", str, where),
                "idx": {
                    "paragraph": raw.get("idx"),
                    "question": question.get("idx"),
                    "answer": answer.get("idx"),
                },
                "label": _class_label(answer, where),
            }


def _superglue_record(raw, where):
    """One HF row per query; entities and answers become sorted sets of strings, as HF does."""
    passage = field(raw, "passage", dict, where)
    text = field(passage, "text", str, where)
    entities = sorted(
        {
            text[field(e, "start", int, where) : field(e, "end", int, where) + 1]
            for e in field(passage, "entities", list, where)
        }
    )
    for qa in field(raw, "qas", list, where):
        yield {
            "passage": text,
            "query": field(qa, "query", str, where),
            "entities": entities,
            "answers": sorted(
                {field(a, "text", str, where) for a in field(qa, "answers", list, where)}
            ),
            "idx": {"passage": raw.get("idx"), "query": qa.get("idx")},
        }


def _squad_json(path, split):
    """SQuAD v1.1 JSON (`train-v1.1.json`, `dev-v1.1.json`), flattened as HF `squad.py`."""
    doc = read_json(path)
    rows = []
    top = JsonWhere(path, ())
    for a, article in enumerate(field(doc, "data", list, top)):
        for p, par in enumerate(field(article, "paragraphs", list, top.child("data", a))):
            wp = top.child("data", a, "paragraphs", p)
            for q, qa in enumerate(field(par, "qas", list, wp)):
                where = wp.child("qas", q)
                answers = field(qa, "answers", list, where)
                rows.append(
                    (
                        where,
                        {
                            "id": field(qa, "id", str, where),
                            "title": article.get("title", ""),
                            "context": field(par, "context", str, wp),
                            "question": field(qa, "question", str, where),
                            "answers": {
                                "text": [field(x, "text", str, where) for x in answers],
                                "answer_start": [
                                    field(x, "answer_start", int, where) for x in answers
                                ],
                            },
                        },
                    )
                )
    return rows


def _drop_answer_spans(answers, where):
    """HF `drop.py::build_answers`: numbers, then dates ("day month year"), then spans; None if
    unparsable."""
    pairs = []  # (answer string, type)
    for answer in answers:
        number = field(answer, "number", str, where)
        date = field(answer, "date", dict, where)
        parts = [date.get("day", ""), date.get("month", ""), date.get("year", "")]
        span_list = field(answer, "spans", list, where)
        if sum(bool(x) for x in (number, any(parts), span_list)) > 1:
            return None  # HF: "This answer is both ..."
        if number:
            pairs.append((number, "number"))
        elif any(parts):
            pairs.append((" ".join(parts).strip(), "date"))
        pairs += [(span, "span") for span in span_list]
    if not pairs:
        return None  # HF: "Empty answer."
    return {"spans": [p for p, _ in pairs], "types": [t for _, t in pairs]}


def _drop_json(path, split):
    """DROP JSON; train uses `answer`, validation `validated_answers`, as HF `drop.py`.

    HF drops the few questions whose answers it cannot parse (9 in train, 1 in dev); we drop the
    same ones so both sources agree, and say so with a warning.
    """
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"expected a JSON object of passages ({path}:1)")
    rows, dropped = [], 0
    for section_id, section in doc.items():
        ws = JsonWhere(path, (section_id,))
        for j, qa in enumerate(field(section, "qa_pairs", list, ws)):
            where = ws.child("qa_pairs", j)
            if split == "train":
                answers = [field(qa, "answer", dict, where)]
            else:
                answers = field(qa, "validated_answers", list, where)
            spans = _drop_answer_spans(answers, where)
            if spans is None:
                dropped += 1
                continue
            rows.append(
                (
                    where,
                    {
                        "section_id": section_id,
                        "query_id": field(qa, "query_id", str, where),
                        "passage": field(section, "passage", str, ws),
                        "question": field(qa, "question", str, where),
                        "answers_spans": spans,
                    },
                )
            )
    if dropped:
        warnings.warn(
            f"skipped {dropped} DROP question(s) without a parsable answer, "
            f"as HF drop.py does ({path})"
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Per task: directory names and formats, official first.

_PAIR = ("premise", "hypothesis")
SOURCES = {
    "SST2": (("SST-2", "SST2"), (Format("GLUE TSV", "train.tsv", "dev.tsv", _glue_sst2), HF_JSONL)),
    "RTE": (("RTE",), (_superglue(_labelled(_PAIR, ("entailment", "not_entailment"))), HF_JSONL)),
    "CB": (
        ("CB",),
        (_superglue(_labelled(_PAIR, ("entailment", "contradiction", "neutral"))), HF_JSONL),
    ),
    "BoolQ": (
        ("BoolQ",),
        (
            Format("BoolQ JSONL", "train.jsonl", "dev.jsonl", _google_boolq),
            _superglue(_superglue_boolq),
            HF_JSONL,
        ),
    ),
    "WSC": (("WSC",), (_superglue(_superglue_wsc), HF_JSONL)),
    "WIC": (
        ("WiC",),
        (
            _superglue(
                _labelled(("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"))
            ),
            HF_JSONL,
        ),
    ),
    "MultiRC": (("MultiRC",), (_superglue(_superglue_multirc), HF_JSONL)),
    "Copa": (
        ("COPA",),
        (_superglue(_labelled(("premise", "choice1", "choice2", "question"))), HF_JSONL),
    ),
    "ReCoRD": (("ReCoRD",), (_superglue(_superglue_record), HF_JSONL)),
    "SQuAD": (
        ("SQuAD",),
        (Format("SQuAD v1.1 JSON", "train-v1.1.json", "dev-v1.1.json", _squad_json), HF_JSONL),
    ),
    "DROP": (
        ("DROP", "drop_dataset"),
        (
            Format("DROP JSON", "drop_dataset_train.json", "drop_dataset_dev.json", _drop_json),
            HF_JSONL,
        ),
    ),
}


def read_splits(task_name, data_dir):
    """-> {"train": [(where, row)], "valid": [(where, row)]} with HF field names."""
    dirnames, formats = SOURCES[task_name]
    fmt, train, valid = find(task_name, dirnames, formats, data_dir)
    return {"train": fmt.read(train, "train"), "valid": fmt.read(valid, "validation")}
