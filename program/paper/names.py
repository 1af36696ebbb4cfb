"""What a run is called: the paper's method name of a set of flags (`method_id`) and a run
folder's stable, unique name (`run_name`), which the grid runner and `make results` use to find
finished runs.
"""

import hashlib
import json


def canonical_task(name):
    """'SST-2', 'roberta/SST-2', 'SST2' -> 'sst2': the key the presets and paper tables use."""
    return "".join(c for c in str(name).rsplit("/", 1)[-1].lower() if c.isalnum())


def method_id(flags):
    """The paper's method name of a run, e.g. 'mezo-prefix', 'ft', 'icl' (see paper.METHOD_LABELS).

    Variants that the paper tabulates apart get their own suffix so that a report never mixes
    them into one cell: n-SPSA, ZO momentum, non-differentiable objective.
    """
    if flags.get("kind") == "eval":
        return "icl" if flags.get("num_train") else "zero-shot"
    zo = flags.get("trainer", "zo") == "zo"
    optimizer = flags.get("optimizer") or ("sgd" if zo else "adamw")
    parts = ["mezo" if zo else "ft"]
    if zo and optimizer in ("adam", "adamw"):
        parts = ["mezo-adam"]
    elif zo and flags.get("momentum"):
        parts = ["mezo-momentum"]
    elif not zo and optimizer == "sgd":
        parts = ["ft-sgd"]
    if flags.get("mode", "ft") not in (None, "ft"):
        parts.append(flags["mode"])
    if zo:  # the estimator's and the direction's own part, e.g. fzoo8 (zo/methods.py)
        from zo import methods

        parts += methods.run_name_parts(flags)
    if flags.get("non_diff"):
        parts.append("nondiff")
    return "-".join(parts)


def fmt(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(point):
    """A stable, unique folder name: readable hyperparameters plus a hash of all the flags.

    The hash covers every flag except where things are stored (`output_dir`, `data_dir`), so the
    same configuration always maps to the same folder and the grid runner can skip finished runs.
    """
    key = {k: v for k, v in point.items() if k not in ("output_dir", "data_dir")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [canonical_task(point.get("task", "task")), method_id(point)]
    parts += [f"k{point['k']}"] if point.get("k") else []
    for flag, short in (
        ("batch_size", "bs"),
        ("learning_rate", "lr"),
        ("zo_eps", "eps"),
        ("weight_decay", "wd"),
        ("train_set_seed", "seed"),
        ("seed", "runseed"),
    ):
        if point.get(flag) is not None and not (flag == "zo_eps" and point.get("trainer") == "fo"):
            parts.append(short + fmt(point[flag]))
    return "-".join(parts + [digest])
