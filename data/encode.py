"""Prompt encoding for decoder-only models, OPT and the LLaMA family (large_models/utils.py
`encode_prompt` of the original).

For one evaluation sample and its demonstrations:
  demos        = "\\n\\n".join(verbalize(d, d.correct).strip() for d in demos).strip()
  unverbalized = encode(sample).strip(" ")                  (a trailing "\\n" survives)
  verbalized_c = verbalize(sample, c).strip(" ")           for each candidate c
  option_len_c = len(tok(verbalized_c)) - len(tok(unverbalized))   (BPE prefix stability, §10.8)
  prompt_c     = (demos + "\\n\\n" + verbalized_c).lstrip().strip(" ")
Generation tasks (SQuAD, DROP) have one sequence: for training the prompt with the gold answer and
its trailing "\\n" (`generation_with_gold`), for inference the prompt alone (option_len 0).
SFC calibration (`sfc`) uses the template's SFC prompt and no demonstrations; `icl_sfc` keeps them.

Sequences are cut on the left (demonstrations matter least) to max_length, minus max_new_tokens for
generation tasks, keeping the BOS. The original forces BOS id 0 (`<s>`) for OPT
(`tokenizer.bos_token_id = 0`, "HF tokenizer bug fix" in large_models/run.py); that is the default
for OPT tokenizers here, and `bos_override=False` uses the tokenizer's own BOS (`</s>`=2 for OPT).
Every other model follows its tokenizer's configuration (`add_bos_token`; SmolLM2 adds none).
"""

import logging
from dataclasses import dataclass

from . import DataError

logger = logging.getLogger(__name__)

OPT_BOS_OVERRIDE = 0


@dataclass(frozen=True)
class Encoded:
    input_ids: list  # one token list per candidate (one for generation tasks)
    option_len: list  # per sequence: how many final tokens are the option / answer
    correct: list  # indices of the correct candidates; correct[0] is the one trained on
    gold: list | None = None  # gold answer strings of generation tasks


def prompt_texts(task, demos, sample, *, sfc=False, icl_sfc=False, generation_with_gold=False):
    """-> (final prompts, unverbalized prompt, verbalized prompts or None), as strings."""
    t, sep = task.template, task.train_sep
    demo_text = sep.join(t.verbalize(d, d.correct_candidate).strip() for d in demos).strip()
    encode_fn, verbalize_fn = (
        (t.encode_sfc, t.verbalize_sfc) if sfc or icl_sfc else (t.encode, t.verbalize)
    )
    unverbalized = encode_fn(sample).strip(" ")
    if task.generation:
        if sfc or icl_sfc:
            raise DataError(f"SFC calibration is not defined for generation task {task.name} (sfc)")
        if not generation_with_gold:
            return [(demo_text + sep + unverbalized).lstrip().strip(" ")], unverbalized, None
        # not stripped, as the original
        verbalized = [verbalize_fn(sample, sample.correct_candidate)]
    else:
        verbalized = [verbalize_fn(sample, c).strip(" ") for c in sample.candidates]
    if sfc:
        return verbalized, unverbalized, verbalized
    return [(demo_text + sep + v).lstrip().strip(" ") for v in verbalized], unverbalized, verbalized


def overrides_bos(tokenizer, bos_override=True) -> bool:
    """Whether the original's BOS-id-0 rule applies: asked for, and an OPT tokenizer
    (`model_type`)."""
    return bool(bos_override) and getattr(tokenizer, "model_type", None) == "opt"


def tokenize(tokenizer, text, bos_override=True):
    """`tokenizer.encode(text)` as the original sees it: with BOS id 0 when overriding (OPT
    only)."""
    if not overrides_bos(tokenizer, bos_override):
        return list(tokenizer.encode(text, add_special_tokens=True))
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return [OPT_BOS_OVERRIDE] + ids if tokenizer.add_bos_token else ids


def encode_prompt(
    task,
    demos,
    sample,
    tokenizer,
    max_length=2048,
    *,
    sfc=False,
    icl_sfc=False,
    generation_with_gold=False,
    max_new_tokens=50,
    bos_override=True,
):
    """-> Encoded for one sample of an OPT-side task (see the module docstring).

    max_length and max_new_tokens default to run.py's --max_length 2048 and --max_new_tokens 50.
    """
    finals, unverbalized, verbalized = prompt_texts(
        task, demos, sample, sfc=sfc, icl_sfc=icl_sfc, generation_with_gold=generation_with_gold
    )
    if verbalized is None:
        option_len = [0]
    else:
        base = len(tokenize(tokenizer, unverbalized, bos_override))
        option_len = [len(tokenize(tokenizer, v, bos_override)) - base for v in verbalized]
    sequences = [tokenize(tokenizer, text, bos_override) for text in finals]

    if task.generation and max_new_tokens is not None:
        max_length -= max_new_tokens
    if any(len(s) > max_length for s in sequences):
        logger.warning(
            "%s prompt longer than %d tokens, cut on the left (example id %s)",
            task.name,
            max_length,
            sample.id,
        )
    if tokenizer.add_bos_token:
        sequences = [s[:1] + s[1:][-(max_length - 1) :] for s in sequences]
    else:
        sequences = [s[-max_length:] for s in sequences]
    # An option longer than what survives the cut can only score the tokens left (no effect at
    # 2048).
    option_len = [min(n, len(s) - 1) for n, s in zip(option_len, sequences)]

    if task.generation:
        return Encoded(sequences, option_len, correct=[0], gold=list(sample.correct_candidate))
    golds = (
        sample.correct_candidate
        if isinstance(sample.correct_candidate, list)
        else [sample.correct_candidate]
    )
    return Encoded(sequences, option_len, correct=[sample.candidates.index(c) for c in golds])


def encode(task, sample, tokenizer, demos=(), **kwargs):
    """Encode one sample for its family: OPT -> Encoded (kwargs of encode_prompt), RoBERTa ->
    MLMEncoded."""
    if task.family == "roberta":
        if demos or kwargs:
            raise DataError(
                "RoBERTa prompts take no demonstrations or options, "
                f"got {sorted(kwargs) or 'demos'} "
                f"({task.name})"
            )
        return task.encode(sample, tokenizer)
    return encode_prompt(task, demos, sample, tokenizer, **kwargs)
