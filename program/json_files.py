"""The JSON files of a run folder (config.json, results.json, metrics.jsonl, trajectory.jsonl):
strict JSON, written atomically (data/files.py), read back with one-line errors.

    write_json("config.json", {"kind": "train"})   # strict JSON: NaN / inf as null (`dumps`)
    read_json("config.json")                         # ValueError `<what> (<path>)` if unreadable
"""

import json
import math
import os

from data.files import atomic_write

# The fields of results.json and metrics.jsonl that are measurements (times, memory): the only bytes
# in which two runs of the same command differ (tests/test_one_writer.py compares two runs' bytes).
MEASUREMENTS = ("time_per_step_s", "steps_per_s", "peak_memory_bytes", "time_s")


def read_json(path):
    if not os.path.isfile(path):
        raise ValueError(f"missing file ({path})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON file: {e} ({path})") from None


def write_json(path, obj) -> None:
    atomic_write(path, dumps(obj, indent=1) + "\n")


def dumps(obj, **kwargs) -> str:
    """Strict JSON, which every parser reads: a non-finite number is written as null, and beside it
    `<key>_nonfinite` says which it was ("nan", "inf" or "-inf")."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        out[k] = _finite(v)
        if isinstance(v, float) and not math.isfinite(v):
            out[f"{k}_nonfinite"] = str(v)  # "nan", "inf", "-inf"
    return out
