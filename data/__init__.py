"""Tasks, prompts, sampling, batches, losses and metrics of MeZO (Malladi et al. 2023).

Imports no model code: a tokenizer is duck-typed (`encode(text, add_special_tokens)`,
`convert_tokens_to_ids`, `bos/eos/pad/mask_token_id`, `add_bos_token`), logits are tensors.

Typical use (OPT, a MeZO training run as mezo.sh):

    task = data.get_task("SST2")                      # or get_task("SST-2", family="roberta")
    splits = task.load(data_dir)                      # {"train", "valid"}; no data_dir:
    data/samples parts = data.opt_splits(task, splits, num_train=1000, num_dev=None, num_eval=1000,
    seed=0) kind = data.batch_kind(task, training=True)       # "classification" / "option_lm" /
    "prompt" enc = [data.encode(task, s, tok, generation_with_gold=True, max_length=2048,
    max_new_tokens=50)
           for s in parts["train"]]
    batch = data.collate(enc[:16], kind, tok.pad_token_id, shared=True)  # dict of tensors (+ "gold"
    list) loss = data.batch_loss(model, batch)      # = task_loss(batch_logits(model, batch), batch)

Evaluation: `batch_kind(task, training=False)`; classification batches are scored with
`candidate_scores` (argmax = prediction, `sfc_scores` for --sfc), generation batches ("prompt")
are generated from and scored with `metrics.f1` / `calculate_metric`; ICL demonstrations come from
`icl_splits` (one set per test example) and go to `encode(..., demos=...)`. RoBERTa:
`task.load(data_dir, k=16, seed=42)` -> {"train", "dev", "test"}, kind "mlm", `predictions`.
Beside these: `data.evaluate` (test metrics, greedy generation, the dev loss), `data.files`
(atomic writes, used by data/, models/ and the program) and `data.rotten_tomatoes` (real review
snippets as a GLUE SST-2 folder). data/ imports nothing of models/, zo/ or the program; its
commands are the program's (`python -m program.prompts <task>` prints a task's prompts).
"""

import os


class DataError(ValueError):
    """A user mistake in data or task arguments; the message reads `<what> (<where>)`."""


# Defined before the submodules are imported: they import DataError and SAMPLES_DIR from here.
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")

from .collate import KINDS, batch_kind, collate, pad
from .encode import OPT_BOS_OVERRIDE, Encoded, encode, encode_prompt, prompt_texts
from .lmbff import MLM_TASKS, MLMEncoded, MLMTask
from .losses import (
    batch_logits,
    batch_loss,
    candidate_scores,
    classification_loss,
    label_word_logits,
    mlm_loss,
    neg_accuracy,
    option_lm_loss,
    option_logprobs,
    predictions,
    sfc_scores,
    task_loss,
)
from .metrics import accuracy, calculate_metric, exact_match, f1, neg_f1, normalize_answer
from .registry import TASKS, get_task
from .sampling import (
    eval_subset,
    icl_demo_sets,
    icl_splits,
    opt_splits,
    sample_subset,
    train_dev_split,
)
from .tasks import OPT_TASKS, OPTTask, Sample
