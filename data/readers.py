"""Low-level readers of the distribution formats (TSV, CSV, JSONL, JSON), with positions.

Every row comes back with where it came from, `<file>:<line>`, so that a bad row is reported as
`<what> (<file>:<line>)`, the form of every error of this project. Nothing is skipped: a malformed
row is an error. For JSON documents (SQuAD, DROP) a record's line is found only when an error needs
it (`JsonWhere`), so reading a 40 MB file stays a plain `json.load`.
"""

import bisect
import contextlib
import csv
import functools
import json
import json.decoder
import json.scanner

from . import DataError


@contextlib.contextmanager
def _open(path, newline=None):
    """The file as text; a byte that is not UTF-8 is a DataError naming its line."""
    # utf-8-sig: GLUE files read by HF `DataProcessor._read_tsv` may start with a BOM.
    try:
        f = open(path, encoding="utf-8-sig", newline=newline)
    except FileNotFoundError:
        raise DataError(f"missing file ({path})") from None
    except IsADirectoryError:
        raise DataError(f"a directory, expected a file ({path})") from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror} ({path})") from None
    try:
        with f:
            yield f
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path) -> DataError:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(
                    f"not UTF-8 text: byte 0x{line[e.start]:02x} at column {e.start + 1} "
                    f"({path}:{number})"
                )
    return DataError(f"not UTF-8 text ({path})")


def read_lines(path):
    """Raw lines with their newline kept, as `[(where, line)]`.

    Universal newlines, as `open(...).readlines()` in LM-BFF's `generate_k_shot_data.py`: the
    k-shot writer copies GLUE lines verbatim.
    """
    with _open(path) as f:
        lines = f.readlines()
    return [(f"{path}:{i}", line) for i, line in enumerate(lines, start=1)]


def split_tsv(where, line, min_columns):
    """Fields of one TSV line: split on tabs, no quoting (HF GLUE uses csv.QUOTE_NONE)."""
    fields = line.rstrip("\r\n").split("\t")
    if line.strip() == "":
        raise DataError(f"empty row ({where})")
    if len(fields) < min_columns:
        raise DataError(
            f"expected at least {min_columns} tab-separated columns, got {len(fields)} ({where})"
        )
    return fields


def read_tsv(path, columns):
    """A TSV with a header line naming `columns` -> `[(where, {column: value})]`."""
    lines = read_lines(path)
    if not lines:
        raise DataError(f"empty file, expected a header ({path})")
    header = split_tsv(*lines[0], 1)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"header lacks column {missing[0]!r} ({lines[0][0]})")
    rows = []
    for where, line in lines[1:]:
        fields = split_tsv(where, line, len(header))
        rows.append((where, {c: fields[header.index(c)] for c in columns}))
    return rows


def read_csv(path):
    """Headerless CSV (LM-BFF sst-5/trec: `label,text`) -> `[(where, fields)]`.

    Standard quoting, as pandas `read_csv(header=None)`; blank lines are not rows (pandas skips
    them).
    """
    rows = []
    with _open(path, newline="") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for fields in reader:
                if fields:
                    rows.append((f"{path}:{start}", fields))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e} ({path}:{start})") from None
    return rows


def read_jsonl(path):
    """One JSON object per line -> `[(where, dict)]` (whitespace-only lines are not rows)."""
    rows = []
    with _open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON line: {e.msg} ({path}:{i})") from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object per line ({path}:{i})")
            rows.append((f"{path}:{i}", obj))
    return rows


def read_json(path):
    """A whole JSON document (SQuAD, DROP)."""
    with _open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} ({path}:{e.lineno})") from None


class JsonWhere:
    """The position of a record inside a JSON document, given by its key path.

    `str()` gives `<file>:<line>` of the record's opening brace, found by re-parsing the file
    with a position-recording decoder; that costs seconds on SQuAD, so it runs only when a
    message is actually printed.
    """

    def __init__(self, path, keys):
        self.path, self.keys = path, tuple(keys)

    def __str__(self):
        node = _located_tree(self.path)
        line = getattr(node, "line", 1)
        for k in self.keys:
            node = node[k]
            line = getattr(node, "line", line)
        return f"{self.path}:{line}"

    def __repr__(self):
        return f"JsonWhere({self.path!r}, {self.keys!r})"

    def child(self, *keys):
        return JsonWhere(self.path, self.keys + keys)


class _LocatedDict(dict):
    line = 1


@functools.lru_cache(maxsize=2)
def _located_tree(path):
    with _open(path) as f:
        text = f.read()
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def parse_object(s_and_end, *args):
        obj, end = json.decoder.JSONObject(s_and_end, *args)
        located = _LocatedDict(obj)
        located.line = bisect.bisect_left(newlines, s_and_end[1]) + 1
        return located, end

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the C scanner ignores parse_object
    return decoder.decode(text)


def field(row, name, kind, where):
    """`row[name]`, checked to be of `kind` (a type or tuple of types)."""
    if not isinstance(row, dict) or name not in row:
        raise DataError(f"missing field {name!r} ({where})")
    value = row[name]
    # bool is an int subclass: a JSON true must not pass as a label id.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        want = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise DataError(f"field {name!r} should be {want}, got {type(value).__name__} ({where})")
    return value


def _as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)
