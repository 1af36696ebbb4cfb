"""Task names: one registry for both model families.

OPT tasks keep the original's names (`SST2`, `RTE`, `CB`, `BoolQ`, `WSC`, `WIC`, `MultiRC`, `Copa`,
`ReCoRD`, `SQuAD`, `DROP`); RoBERTa tasks keep LM-BFF's (`SST-2`, `sst-5`, `SNLI`, `MNLI`, `RTE`,
`trec`). Names match case-insensitively. RTE exists on both sides, so a name may carry its family,
`opt/RTE` or `roberta/RTE`, or the caller passes `family=` (train.py passes the model's type).
Decoder-only families run the OPT-side tasks: `family="llama"` (or qwen2, mistral) means `opt`.
When no exact name matches, dashes and underscores are ignored: `get_task("sst5")` is LM-BFF's
sst-5 and `get_task("sst2", family="roberta")` its SST-2 (while `get_task("sst2")` is OPT's SST2).
"""

from . import DataError
from .lmbff import MLM_TASKS
from .tasks import OPT_TASKS

FAMILIES = {"opt": OPT_TASKS, "roberta": MLM_TASKS}
DECODER_FAMILIES = ("llama", "qwen2", "mistral")  # model_type values that take the OPT-side tasks
TASKS = tuple(f"{family}/{name}" for family, tasks in FAMILIES.items() for name in tasks)


def _squash(name):
    return name.lower().replace("-", "").replace("_", "")


def get_task(name, family=None):
    """-> OPTTask or MLMTask. Unknown or ambiguous names raise DataError listing the known ones."""
    if "/" in name:
        family, name = name.split("/", 1)
    if family is not None and family.lower() in DECODER_FAMILIES:
        family = "opt"
    if family is not None and family.lower() not in FAMILIES:
        raise DataError(
            f"unknown model family {family!r}, expected one of "
            f"{', '.join([*FAMILIES, *DECODER_FAMILIES])} (task {name!r})"
        )
    families = [family.lower()] if family is not None else list(FAMILIES)
    for match in (str.lower, _squash):  # exact (case-insensitive) first, then ignoring - and _
        found = [t for f in families for n, t in FAMILIES[f].items() if match(n) == match(name)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            options = " or ".join(f"{t.family}/{t.name}" for t in found)
            raise DataError(
                f"task {name!r} exists for several model families: write {options} (task name)"
            )
    raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (task name)")
