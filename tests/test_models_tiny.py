"""The embedded tiny checkpoints (written by `python -m models.make_tiny`) load and fit the paper's
prompts."""

import pytest
import torch

from models import TINY_OPT, TINY_ROBERTA, load_model, load_tokenizer
from models.make_tiny import LABEL_WORDS


@pytest.mark.parametrize("path", [TINY_OPT, TINY_ROBERTA])
def test_tiny_checkpoint_and_tokenizer(path):
    from transformers import AutoTokenizer

    model, tok = load_model(path), load_tokenizer(path)
    assert model.config.vocab_size == tok.vocab_size and tok.model_type == model.config.model_type
    for word in LABEL_WORDS:  # each verbalizer is one token after a space, as in GPT-2's vocabulary
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    text = (
        "Review: a fine film. It was<mask> great. Question: Yes or No?"
        if "roberta" in path
        else "Review: a fine film. Sentiment: great\nQuestion: Yes or No?"
    )
    ids = tok.encode(text)
    assert ids == AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert logits.shape == (1, len(ids), tok.vocab_size) and torch.isfinite(logits).all()
    if "roberta" in path:
        assert (
            ids[0] == tok.bos_token_id == 0
            and ids[-1] == tok.eos_token_id == 2
            and tok.mask_token_id in ids
        )
    else:
        assert ids[0] == tok.bos_token_id == 2 and tok.mask_token_id is None
