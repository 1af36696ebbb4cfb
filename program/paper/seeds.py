"""A table cell over a row's seeds (`make results`, `make results-estimators`): mean ± sample std of
the finite seeds; a diverged seed (its value null in strict JSON, NaN in an older file) is left out
and counted in a mark, "(†k)", which DIVERGED_NOTE under the table explains. One diverged seed
marks its cell and never takes the table down."""

import math
import statistics

DIVERGED = "†"
DIVERGED_NOTE = (
    f"({DIVERGED}k): k of the row's seeds diverged there (a non-finite dev loss or "
    "metric: null in metrics.jsonl or results.json, NaN in an older file); mean ± std "
    "over the other seeds."
)


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


def diverged(results: dict) -> bool:
    """A finished run's results.json says it diverged: its test metric, or the dev loss of the model
    it kept (a run without a finite dev loss keeps its last model), is not finite."""
    test, dev = results.get("test") or {}, results.get("dev") or {}
    headline = next((test[key] for key in ("f1", "accuracy", "em") if key in test), 0.0)
    return not finite(headline) or "loss" in dev and not finite(dev["loss"])


def stats(values) -> tuple[float, float, int, int]:
    """-> (mean, sample std, number kept, number diverged); mean NaN when every seed diverged."""
    kept = [v for v in values if finite(v)]
    mean = statistics.fmean(kept) if kept else math.nan
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return mean, std, len(kept), len(values) - len(kept)


def cell(mean, std, n_diverged, spread) -> str:
    mark = f" ({DIVERGED}{n_diverged})" if n_diverged else ""
    if math.isnan(mean):
        return f"diverged{mark}"
    return f"{mean:.1f}" + (f" ± {std:.1f}" if spread else "") + mark


def over_seeds(values, always_std=False) -> str:
    """'mean ± std' (the ± with two or more kept seeds, or always_std), diverged seeds marked."""
    mean, std, kept, n_diverged = stats(values)
    return cell(mean, std, n_diverged, always_std or kept > 1)


def with_note(lines) -> str:
    """The table's lines joined, and DIVERGED_NOTE under them when a cell is marked."""
    marked = any(f"({DIVERGED}" in line for line in lines)
    return "\n".join(list(lines) + (["", DIVERGED_NOTE] if marked else []))
