"""Losses and scores as functions of the model's logits [N, T, V] and a batch (data/collate.py).

OPT (the original's `forward_wrap_with_option_len`, large_models/trainer.py): logits at position t
predict token t+1; only the last option_len targets of each row count. Because batches are padded
on the left, those targets all lie in the last L = option_mask.shape[1] positions, so we take the
log-softmax of that window only (the original takes it over the whole sequence: same numbers,
T/L times the memory). Everything runs in the logits' dtype, as the original (fp16 with fp16 models).
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


def option_logprobs(logits, batch):
    """-> (sum of option-token log-probs [N], number of option tokens [N])."""
    mask = batch["option_mask"]
    width, length = mask.shape[1], logits.shape[1]
    window = logits[:, length - 1 - width:length - 1]
    targets = batch["input_ids"][:, length - width:]
    token_logp = window.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return token_logp.masked_fill(~mask, 0.0).sum(-1), mask.sum(-1)


def per_example(values, batch):
    """Flat per-candidate values [N] -> [B, K], -inf where example b has fewer than K candidates."""
    table = values[batch["option_index"]]
    missing = torch.arange(table.shape[1], device=table.device) >= batch["num_options"].unsqueeze(1)
    return table.masked_fill(missing, float("-inf"))


def candidate_scores(logits, batch):
    """[B, K] length-normalised option log-likelihoods; the original's prediction is their argmax."""
    total, count = option_logprobs(logits, batch)
    return per_example(total / count, batch)


def sfc_scores(logits, batch, sfc_logits, sfc_batch):
    """[B, K] SFC-calibrated scores: sum log p(option | prompt) - sum log p(option | SFC prompt)."""
    return per_example(option_logprobs(logits, batch)[0] - option_logprobs(sfc_logits, sfc_batch)[0], batch)


def classification_loss(logits, batch):
    return F.cross_entropy(candidate_scores(logits, batch), batch["labels"])


def option_lm_loss(logits, batch):
    total, count = option_logprobs(logits, batch)
    return -total.sum() / count.sum()


def label_word_logits(logits, batch):
    """[B, C] logits of each label's word at the <mask> position."""
    at_mask = logits[torch.arange(logits.shape[0], device=logits.device), batch["mask_pos"]]
    return at_mask[:, batch["label_word_ids"]]


def mlm_loss(logits, batch):
    return F.cross_entropy(label_word_logits(logits, batch), batch["labels"])


def predictions(logits, batch):
    """[B] predicted candidate / label index (classification and RoBERTa batches)."""
    scores = label_word_logits(logits, batch) if "mask_pos" in batch else candidate_scores(logits, batch)
    return scores.argmax(-1)


def neg_accuracy(logits, batch):
    """-(batch accuracy): the non-differentiable objective of medium-model `--optimize_acc`."""
    return -(predictions(logits, batch) == batch["labels"]).float().mean()


def task_loss(logits, batch):
    """The training loss for any batch kind except "prompt" (which needs generation, see metrics.neg_f1)."""
    if "mask_pos" in batch:
        return mlm_loss(logits, batch)
    if "option_index" in batch:
        return classification_loss(logits, batch)
    if "option_mask" in batch:
        return option_lm_loss(logits, batch)
    raise DataError(f"no differentiable loss for a batch with keys {sorted(batch)} (task_loss)")
