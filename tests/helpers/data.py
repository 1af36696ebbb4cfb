"""A tiny byte-level BPE tokenizer for the data tests (the `tokenizers` library, no download),
duck-typed like models.load_tokenizer: OPT style (BOS `</s>`=2 prepended, no mask) or RoBERTa
style
(`<s> ... </s>`, mask id 4). Special ids: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, as OPT/RoBERTa."""

import functools
import glob
import os

from tokenizers import ByteLevelBPETokenizer

import data

LABEL_WORDS = [
    "terrible",
    "bad",
    "okay",
    "good",
    "great",
    "Yes",
    "No",
    "Maybe",
    "Description",
    "Entity",
    "Expression",
    "Human",
    "Location",
    "Number",
]


@functools.lru_cache(maxsize=1)
def _bpe():
    corpus = []
    for path in sorted(glob.glob(os.path.join(data.SAMPLES_DIR, "**", "*.*"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            corpus.append(f.read())
    corpus += [" ".join(" " + w for w in LABEL_WORDS) + " It was\n"] * 200
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(
        corpus,
        vocab_size=1200,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    return tok


class TinyTokenizer:
    pad_token_id, eos_token_id = 1, 2

    def __init__(self, model_type):
        self.model_type = model_type
        self._tok = _bpe()
        self.add_bos_token = model_type == "opt"
        self.bos_token_id = 2 if model_type == "opt" else 0  # real OPT's BOS is </s>
        self.mask_token_id = None if model_type == "opt" else 4
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text, add_special_tokens=True):
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return ids
        return [self.bos_token_id] + ids if self.model_type == "opt" else [0] + ids + [2]

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token):
        return self._tok.token_to_id(token)


def opt_tokenizer():
    return TinyTokenizer("opt")


def roberta_tokenizer():
    return TinyTokenizer("roberta")
