"""Losses and scores of a batch (data/collate.py) from the logits its model computes.

`batch_logits(model, batch)` runs the model on the positions the batch's losses read
(`logits_to_keep`); every function below takes those kept logits [N, W, V] and the batch.
OPT (the original's `forward_wrap_with_option_len`, large_models/trainer.py): logits at position t
predict token t+1; only the option tokens count. We take the log-softmax of the positions that
predict them only (the original takes it over the whole sequence: same numbers, T/L times the
memory). Everything runs in the logits' dtype, as the original (fp16 with fp16 models).
  classification: cross-entropy over candidates of the length-normalised option log-likelihood
                  (mean token log-prob); examples with different numbers of candidates are handled
                  by -inf padding, which equals the original's per-example loop.
  option LM:      token-level mean negative log-likelihood over all option tokens of the batch.
RoBERTa (LM-BFF `model_for_prompting_forward`): cross-entropy over the label words' logits at
the <mask> position.
"""

import torch
import torch.nn.functional as F

from . import DataError


def batch_logits(model, batch):
    """The model's logits at the positions the batch's losses read (`logits_to_keep`); a packed
    shared-prompt batch also passes its block mask and position_ids."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    return model(
        batch["input_ids"], batch["attention_mask"], logits_to_keep=batch["logits_to_keep"], **extra
    )


def kept(logits, batch):
    """The logits, checked to be the ones the batch's losses read: [N, W, V] at its W kept
    positions. Logits of every position index the wrong tokens without an error, so they are
    refused."""
    keep = batch["logits_to_keep"]
    if logits.shape[1] != keep.shape[-1]:
        raise DataError(
            f"logits of {logits.shape[1]} positions where the batch reads {keep.shape[-1]}: run "
            "the model with the batch's logits_to_keep (data.batch_logits)"
        )
    return logits


def option_logprobs(logits, batch):
    """-> (sum of option-token log-probs [N], number of option tokens [N]) of each candidate."""
    window = kept(logits, batch)[batch["score_row"][:, None], batch["score_pos"]]  # [N, L, V]
    token_logp = window.log_softmax(-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    mask = batch["option_mask"]
    return token_logp.masked_fill(~mask, 0.0).sum(-1), mask.sum(-1)


def per_example(values, batch):
    """Flat per-candidate values [N] -> [B, K], -inf where example b has fewer than K candidates."""
    table = values[batch["option_index"]]
    missing = torch.arange(table.shape[1], device=table.device) >= batch["num_options"].unsqueeze(1)
    return table.masked_fill(missing, float("-inf"))


def candidate_scores(logits, batch):
    """[B, K] length-normalised option log-likelihoods; the original's prediction is their
    argmax."""
    total, count = option_logprobs(logits, batch)
    return per_example(total / count, batch)


def sfc_scores(logits, batch, sfc_logits, sfc_batch):
    """[B, K] SFC-calibrated scores: sum log p(option | prompt) - sum log p(option | SFC prompt)."""
    return per_example(
        option_logprobs(logits, batch)[0] - option_logprobs(sfc_logits, sfc_batch)[0], batch
    )


def classification_loss(logits, batch):
    return F.cross_entropy(candidate_scores(logits, batch), batch["labels"])


def option_lm_loss(logits, batch):
    """Over the correct candidates of a classification batch, or every row of an option-LM batch."""
    total, count = option_logprobs(logits, batch)
    if "option_index" in batch:
        gold = batch["option_index"].gather(1, batch["labels"][:, None]).squeeze(1)
        total, count = total[gold], count[gold]
    return -total.sum() / count.sum()


def label_word_logits(logits, batch):
    """[B, C] logits of each label's word at the <mask> position (the one position kept)."""
    return kept(logits, batch)[:, 0, batch["label_word_ids"]]


def mlm_loss(logits, batch):
    return F.cross_entropy(label_word_logits(logits, batch), batch["labels"])


def predictions(logits, batch):
    """[B] predicted candidate / label index (classification and RoBERTa batches)."""
    scores = (
        label_word_logits(logits, batch) if "mask_pos" in batch else candidate_scores(logits, batch)
    )
    return scores.argmax(-1)


def neg_accuracy(logits, batch):
    """-(batch accuracy): the non-differentiable objective of medium-model `--optimize_acc`."""
    return -(predictions(logits, batch) == batch["labels"]).float().mean()


def task_loss(logits, batch):
    """The training loss for any batch kind except "prompt" (which needs generation, see
    metrics.neg_f1)."""
    if "mask_pos" in batch:
        return mlm_loss(logits, batch)
    if "option_index" in batch:
        return classification_loss(logits, batch)
    if "option_mask" in batch:
        return option_lm_loss(logits, batch)
    raise DataError(f"no differentiable loss for a batch with keys {sorted(batch)} (task_loss)")


def loss_terms(logits, batch, option_lm=False):
    """Per example, (numerator [B], denominator [B]) whose sums' ratio is the batch's loss
    (option_lm_loss with option_lm, else task_loss), so that the loss of any other grouping of
    the same examples can be rebuilt from them (data/evaluate.py dev_loss)."""
    if option_lm or "option_index" not in batch and "option_mask" in batch:
        total, count = option_logprobs(logits, batch)
        if "option_index" in batch:  # a classification batch: its correct candidates only
            gold = batch["option_index"].gather(1, batch["labels"][:, None]).squeeze(1)
            total, count = total[gold], count[gold]
        return -total, count.to(total.dtype)
    if "mask_pos" in batch:
        scores = label_word_logits(logits, batch)
    elif "option_index" in batch:
        scores = candidate_scores(logits, batch)
    else:
        raise DataError(f"no differentiable loss for a batch of keys {sorted(batch)} (loss_terms)")
    loss = F.cross_entropy(scores, batch["labels"], reduction="none")
    return loss, torch.ones_like(loss)


def batch_loss(model, batch):
    """task_loss of the batch under `model`: the closure body of a training step."""
    return task_loss(batch_logits(model, batch), batch)
