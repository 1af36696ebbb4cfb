"""Readers: every bundled sample file parses; official files and Hugging Face JSONL exports give the
same examples (HF rows written by hand from the HF builder scripts); bad input names
<file>:<line>."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
from data import DataError, get_task
from program.prompts import main as cli

S = data.SAMPLES_DIR


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _count(name, split):
    """Rows per split, counted straight from the bundled files."""
    p = lambda *a: os.path.join(S, *a)  # noqa: E731
    if name == "SST2":
        return (
            len(
                Path(p("original", "SST-2", "dev.tsv" if split == "valid" else "train.tsv"))
                .read_text()
                .splitlines()
            )
            - 1
        )
    if name == "SQuAD":
        doc = json.loads(
            Path(p("SQuAD", "dev-v1.1.json" if split == "valid" else "train-v1.1.json")).read_text()
        )
        return sum(len(par["qas"]) for a in doc["data"] for par in a["paragraphs"])
    if name == "DROP":
        doc = json.loads(
            Path(
                p("DROP", f"drop_dataset_{'dev' if split == 'valid' else 'train'}.json")
            ).read_text()
        )
        return sum(len(s["qa_pairs"]) for s in doc.values())
    folder = {"WIC": "WiC", "Copa": "COPA"}.get(name, name)
    rows = _jsonl(
        p(
            folder,
            ("dev.jsonl" if name == "BoolQ" else "val.jsonl")
            if split == "valid"
            else "train.jsonl",
        )
    )
    if name == "MultiRC":
        return sum(len(q["answers"]) for r in rows for q in r["passage"]["questions"])
    if name == "ReCoRD":
        return sum(len(r["qas"]) for r in rows)
    return len(rows)


@pytest.mark.parametrize("name", list(data.OPT_TASKS))
def test_bundled_opt_samples(name):
    splits = get_task(name, family="opt").load()
    for split in ("train", "valid"):
        assert len(splits[split]) == _count(name, split) >= 20
        assert all(str(s.where).startswith(S) for s in splits[split])


def test_bundled_roberta_samples():
    for name, task in data.MLM_TASKS.items():
        splits = task.load()
        folder = os.path.join(S, "k-shot-1k-test", name, "16-42")
        for split, rows in splits.items():
            fname = {
                "train": "train",
                "dev": task.dev_name if not task.csv else "dev",
                "test": "test_matched" if name == "MNLI" else "test",
            }[split]
            lines = Path(folder, fname + (".csv" if task.csv else ".tsv")).read_text().splitlines()
            assert len(rows) == len(lines) - (0 if task.csv else 1) > 0
            assert {s.correct_candidate for s in rows} <= set(task.labels)


# ---- official format vs HF export, one hand-written pair per task -----------------------------
def _dump(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


NO_DATE = {"day": "", "month": "", "year": ""}


def _answer(number="", date=NO_DATE, spans=()):
    return {"number": number, "date": date, "spans": list(spans)}


def _qa(query_id, question, answer, validated):
    return {
        "question": question,
        "answer": answer,
        "query_id": query_id,
        "validated_answers": validated,
    }


def _drop_row(query_id, question, spans, types):
    return {
        "section_id": "p1",
        "query_id": query_id,
        "passage": "The Bears scored 5.",
        "question": question,
        "answers_spans": {"spans": spans, "types": types},
    }


DROP_OFFICIAL = {
    "p1": {
        "passage": "The Bears scored 5.",
        "qa_pairs": [
            _qa("a", "How many?", _answer("5"), [_answer("5"), _answer(spans=["five"])]),
            _qa(
                "b",
                "When?",
                _answer(date={"day": "", "month": "May", "year": "1999"}),
                [_answer(date={"day": "3", "month": "", "year": "1999"})],
            ),
            _qa("c", "Who?", _answer(spans=["the Bears", "Lions"]), [_answer(spans=["Bears"])]),
        ],
    }
}
# HF drop.py: train from "answer", validation from "validated_answers"; dates "day month year"
DROP_HF = {
    "train": [
        _drop_row("a", "How many?", ["5"], ["number"]),
        _drop_row("b", "When?", ["May 1999"], ["date"]),
        _drop_row("c", "Who?", ["the Bears", "Lions"], ["span", "span"]),
    ],
    "validation": [
        _drop_row("a", "How many?", ["5", "five"], ["number", "span"]),
        _drop_row("b", "When?", ["3  1999"], ["date"]),
        _drop_row("c", "Who?", ["Bears"], ["span"]),
    ],
}

PASSAGE = "Anna met Bob in Paris. Anna smiled."
# name: (official dir, official files {file: rows}, HF rows (same for train and validation))
PAIRS = {
    "RTE": (
        "RTE",
        [
            {"premise": "P.", "hypothesis": "H.", "label": "not_entailment", "idx": 0},
            {"premise": "Q.", "hypothesis": "I.", "label": "entailment", "idx": 1},
        ],
        [
            {"premise": "P.", "hypothesis": "H.", "idx": 0, "label": 1},
            {"premise": "Q.", "hypothesis": "I.", "idx": 1, "label": 0},
        ],
    ),
    "CB": (
        "CB",
        [
            {"premise": "P.", "hypothesis": "H.", "label": "neutral", "idx": 0},
            {"premise": "P.", "hypothesis": "H.", "label": "contradiction", "idx": 1},
        ],
        [
            {"premise": "P.", "hypothesis": "H.", "idx": 0, "label": 2},
            {"premise": "P.", "hypothesis": "H.", "idx": 1, "label": 1},
        ],
    ),
    "BoolQ": (
        "BoolQ",
        [{"question": "is it", "passage": "It is.", "idx": 0, "label": True}],
        [{"question": "is it", "answer": True, "passage": "It is."}],
    ),
    "WSC": (
        "WSC",
        [
            {
                "text": "The trophy does not fit because it is big .",
                "idx": 0,
                "label": True,
                "target": {
                    "span2_index": 5,
                    "span1_index": 0,
                    "span1_text": "the trophy.",
                    "span2_text": "it",
                },
            }
        ],
        [
            {
                "text": "The trophy does not fit because it is big .",
                "span1_index": 0,
                "span2_index": 5,
                "span1_text": "The trophy",
                "span2_text": "it",
                "idx": 0,
                "label": 1,
            }
        ],
    ),
    "WIC": (
        "WiC",
        [
            {
                "word": "bank",
                "sentence1": "A bank.",
                "sentence2": "The bank.",
                "idx": 0,
                "label": False,
                "start1": 2,
                "start2": 4,
                "end1": 6,
                "end2": 8,
                "version": 1.1,
            }
        ],
        [
            {
                "word": "bank",
                "sentence1": "A bank.",
                "sentence2": "The bank.",
                "start1": 2,
                "start2": 4,
                "end1": 6,
                "end2": 8,
                "idx": 0,
                "label": 0,
            }
        ],
    ),
    "MultiRC": (
        "MultiRC",
        [
            {
                "idx": 3,
                "version": 1.1,
                "passage": {
                    "text": "T.",
                    "questions": [
                        {
                            "question": "Q?",
                            "idx": 0,
                            "answers": [
                                {"text": "A", "idx": 0, "label": 1},
                                {"text": "B", "idx": 1, "label": 0},
                            ],
                        }
                    ],
                },
            }
        ],
        [
            {
                "paragraph": "T.",
                "question": "Q?",
                "answer": "A",
                "idx": {"paragraph": 3, "question": 0, "answer": 0},
                "label": 1,
            },
            {
                "paragraph": "T.",
                "question": "Q?",
                "answer": "B",
                "idx": {"paragraph": 3, "question": 0, "answer": 1},
                "label": 0,
            },
        ],
    ),
    "Copa": (
        "COPA",
        [
            {
                "premise": "It rained.",
                "choice1": "I got wet.",
                "choice2": "I sang.",
                "question": "effect",
                "idx": 0,
                "label": 0,
            }
        ],
        [
            {
                "premise": "It rained.",
                "choice1": "I got wet.",
                "choice2": "I sang.",
                "question": "effect",
                "idx": 0,
                "label": 0,
            }
        ],
    ),
    "ReCoRD": (
        "ReCoRD",
        [
            {
                "source": "x",
                "idx": 0,
                "passage": {
                    "text": PASSAGE,
                    "entities": [
                        {"start": 23, "end": 26},
                        {"start": 9, "end": 11},
                        {"start": 16, "end": 20},
                        {"start": 0, "end": 3},
                    ],
                },
                "qas": [
                    {
                        "query": "@placeholder waved.",
                        "idx": 5,
                        "answers": [
                            {"start": 9, "end": 11, "text": "Bob"},
                            {"start": 9, "end": 11, "text": "Bob"},
                        ],
                    }
                ],
            }
        ],
        [
            {
                "passage": PASSAGE,
                "query": "@placeholder waved.",
                "entities": ["Anna", "Bob", "Paris"],
                "answers": ["Bob"],
                "idx": {"passage": 0, "query": 5},
            }
        ],
    ),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_superglue_equals_hf_export(tmp_path, name):
    folder, official, hf = PAIRS[name]
    for f in ("train.jsonl", "val.jsonl"):
        _dump(str(tmp_path / "off" / folder / f), official)
    for f in ("train.jsonl", "validation.jsonl"):
        _dump(str(tmp_path / "hf" / name.lower() / f), hf)
    task = get_task(name, family="opt")
    from_official, from_hf = task.load(str(tmp_path / "off")), task.load(str(tmp_path / "hf"))
    assert from_official == from_hf and len(from_hf["train"]) == len(hf)


def test_other_formats_equal_hf_export(tmp_path):
    (tmp_path / "off" / "SST-2").mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        (tmp_path / "off" / "SST-2" / f).write_text("sentence\tlabel\na fine film \t1\ndull\t0\n")
    hf = [
        {"sentence": "a fine film ", "label": 1, "idx": 0},
        {"sentence": "dull", "label": 0, "idx": 1},
    ]
    (
        _dump(str(tmp_path / "hf" / "sst2" / "train.jsonl"), hf),
        _dump(str(tmp_path / "hf" / "sst2" / "validation.jsonl"), hf),
    )
    assert get_task("SST2").load(str(tmp_path / "off")) == get_task("SST2").load(
        str(tmp_path / "hf")
    )

    google = [{"question": "is it", "title": "t", "answer": False, "passage": "It is not."}]
    (
        _dump(str(tmp_path / "off" / "boolq" / "train.jsonl"), google),
        _dump(str(tmp_path / "off" / "boolq" / "dev.jsonl"), google),
    )
    hf = [{"question": "is it", "answer": False, "passage": "It is not."}]
    (
        _dump(str(tmp_path / "hf" / "boolq" / "train.jsonl"), hf),
        _dump(str(tmp_path / "hf" / "boolq" / "validation.jsonl"), hf),
    )
    assert get_task("BoolQ").load(str(tmp_path / "off")) == get_task("BoolQ").load(
        str(tmp_path / "hf")
    )

    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "a b c",
                        "qas": [
                            {
                                "id": "1",
                                "question": "Q?",
                                "answers": [
                                    {"answer_start": 0, "text": "a"},
                                    {"answer_start": 2, "text": "b"},
                                ],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "off" / "squad").mkdir()
    for f in ("train-v1.1.json", "dev-v1.1.json"):
        (tmp_path / "off" / "squad" / f).write_text(json.dumps(squad))
    hf = [
        {
            "id": "1",
            "title": "T",
            "context": "a b c",
            "question": "Q?",
            "answers": {"text": ["a", "b"], "answer_start": [0, 2]},
        }
    ]
    (
        _dump(str(tmp_path / "hf" / "squad" / "train.jsonl"), hf),
        _dump(str(tmp_path / "hf" / "squad" / "validation.jsonl"), hf),
    )
    assert get_task("SQuAD").load(str(tmp_path / "off")) == get_task("SQuAD").load(
        str(tmp_path / "hf")
    )

    (tmp_path / "off" / "drop_dataset").mkdir()
    # number and span: HF drop.py skips it
    broken = _qa("z", "Bad?", _answer("1", spans=["x"]), [_answer()])
    doc = {"p1": dict(DROP_OFFICIAL["p1"], qa_pairs=DROP_OFFICIAL["p1"]["qa_pairs"] + [broken])}
    for f in ("drop_dataset_train.json", "drop_dataset_dev.json"):
        (tmp_path / "off" / "drop_dataset" / f).write_text(json.dumps(doc))
    for split, rows in DROP_HF.items():
        _dump(str(tmp_path / "hf" / "drop" / f"{split}.jsonl"), rows)
    with pytest.warns(UserWarning, match="skipped 1 DROP"):
        official = get_task("DROP").load(str(tmp_path / "off"))
    assert official == get_task("DROP").load(str(tmp_path / "hf"))
    assert [s.correct_candidate for s in official["valid"]] == [
        ["5", "five"],
        ["3  1999"],
        ["Bears"],
    ]


# ---- errors name <file>:<line> -----------------------------------------------------------------
def _rte_dir(tmp_path, val_lines):
    d = tmp_path / "RTE"
    d.mkdir()
    good = json.dumps({"premise": "P.", "hypothesis": "H.", "label": "entailment", "idx": 0})
    (d / "train.jsonl").write_text(good + "\n")
    if val_lines is not None:
        (d / "val.jsonl").write_text("\n".join(val_lines) + "\n")
    return str(tmp_path)


GOOD = json.dumps({"premise": "P.", "hypothesis": "H.", "label": "entailment", "idx": 0})


@pytest.mark.parametrize(
    "lines,message",
    [
        ([GOOD, "{not json"], r"malformed JSON line: .* \(.*RTE/val\.jsonl:2\)$"),
        (
            [GOOD, GOOD, json.dumps({"premise": "P.", "label": "entailment", "idx": 2})],
            r"missing field 'hypothesis' \(.*val\.jsonl:3\)$",
        ),
        (
            [json.dumps({"premise": "P.", "hypothesis": "H.", "label": "maybe", "idx": 0})],
            r"unknown label 'maybe'.* \(.*val\.jsonl:1\)$",
        ),
        (None, r"missing SuperGLUE JSONL file of RTE \(.*RTE/val\.jsonl\)$"),
    ],
)
def test_jsonl_errors(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        get_task("opt/RTE").load(_rte_dir(tmp_path, lines))


def test_tsv_csv_json_errors(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nodd\t2\n")
    with pytest.raises(DataError, match=r"unknown label '2'.*\(.*SST-2/dev\.tsv:3\)$"):
        get_task("SST2").load(str(tmp_path))
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nno tab here\n")
    with pytest.raises(DataError, match=r"columns, got 1 \(.*dev\.tsv:3\)$"):
        get_task("SST2").load(str(tmp_path))

    rte = tmp_path / "k-shot-1k-test" / "RTE" / "16-42"
    rte.mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        (rte / f).write_text("index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\tentailment\n")
    (rte / "test.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\tentailment\n1\tA b.\tentailment\n"
    )
    with pytest.raises(
        DataError, match=r"at least 4 tab-separated columns, got 3 \(.*RTE/16-42/test\.tsv:3\)$"
    ):
        get_task("roberta/RTE").load(str(tmp_path))

    shot = tmp_path / "k-shot-1k-test" / "trec" / "16-42"
    shot.mkdir(parents=True)
    (shot / "train.csv").write_text('0,"What is, in fact, tea ?"\n')
    (shot / "dev.csv").write_text("1,What color is tea ?\n")
    (shot / "test.csv").write_text("5,How many ?\nx,Who ?\n")
    with pytest.raises(
        DataError, match=r"label 'x' is not an integer \(.*trec/16-42/test\.csv:2\)$"
    ):
        get_task("trec").load(str(tmp_path))
    (shot / "test.csv").write_text("5,How many ?\n9,Who ?\n")
    with pytest.raises(DataError, match=r"unknown label 9.*\(.*test\.csv:2\)$"):
        get_task("trec").load(str(tmp_path))
    (shot / "test.csv").write_text("5,How many ?\n")
    assert (
        get_task("trec").load(str(tmp_path))["train"][0].data["text_a"] == "What is, in fact, tea ?"
    )
    os.remove(shot / "train.csv")
    with pytest.raises(DataError, match=r"missing file \(.*16-42/train\.csv\)$"):
        get_task("trec").load(str(tmp_path))

    squad = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {
                                "id": "ok",
                                "question": "Q?",
                                "answers": [{"answer_start": 0, "text": "c"}],
                            },
                            {"id": "bad", "answers": [{"answer_start": 0, "text": "c"}]},
                        ],
                    }
                ],
            }
        ]
    }
    text = json.dumps(squad, indent=1)
    (tmp_path / "SQuAD").mkdir()
    (tmp_path / "SQuAD" / "train-v1.1.json").write_text(text)
    (tmp_path / "SQuAD" / "dev-v1.1.json").write_text(text)
    # 1-based line of "{"
    brace_line = next(i for i, line in enumerate(text.splitlines()) if '"bad"' in line)
    with pytest.raises(
        DataError, match=rf"missing field 'question' \(.*train-v1\.1\.json:{brace_line}\)$"
    ):
        get_task("SQuAD").load(str(tmp_path))
    (tmp_path / "SQuAD" / "dev-v1.1.json").write_text('{"data": [\n}')
    (tmp_path / "SQuAD" / "train-v1.1.json").write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match=r"malformed JSON: .*\(.*dev-v1\.1\.json:2\)$"):
        get_task("SQuAD").load(str(tmp_path))


def test_unknown_task_lists_known_ones():
    with pytest.raises(
        DataError, match=r"unknown task 'sst3'; known tasks: opt/SST2, .*roberta/trec \(task name\)"
    ):
        get_task("sst3")
    assert get_task("sst2").family == "opt" and get_task("SST-2").family == "roberta"
    assert get_task("sst2", family="roberta").name == "SST-2" and get_task("SST5").name == "sst-5"
    assert get_task("roberta/rte").family == "roberta" and get_task("record").name == "ReCoRD"


def test_cli(tmp_path, capsys):
    cli(["Copa", "--show", "1", "--repr"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("--- ") and out[1].startswith("'") and len(out) == 4
    with pytest.raises(SystemExit) as exit_info:
        cli(["nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown task 'nope'")
    bad = _rte_dir(tmp_path, [GOOD, "{not json"])
    result = subprocess.run(
        [sys.executable, "-m", "program.prompts", "opt/RTE", "--data_dir", bad],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(S)),
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: malformed JSON line")
    assert result.stderr.rstrip().endswith("RTE/val.jsonl:2)")
