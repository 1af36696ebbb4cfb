"""Write the embedded tiny checkpoints `models/tiny/opt/` and `models/tiny/roberta/` (run: python -m
models.make_tiny).

Random-init (seeded) OPT and RoBERTa of a few hundred thousand parameters, in the Hugging Face
layout with tokenizer files, for tests and the demo: no hub, no transformers. The tokenizer is a
byte-level BPE trained here on the project's own text: every text file under `data/samples/` (when
present) plus the sentences below, which use every verbalizer / label word of the paper after a
space, so that each ` word` is a single BPE token as it is in the real GPT-2 vocabulary. Same inputs
give the same files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, ByteLevelBPETokenizer, processors

from .checkpoint import save_model
from .opt import OPT, OPTConfig
from .roberta import RobertaConfig, RobertaMLM

HERE = Path(__file__).parent
SAMPLES = HERE.parent / "data" / "samples"
TEXT_SUFFIXES = {".txt", ".tsv", ".csv", ".json", ".jsonl"}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, the order of OPT and RoBERTa
VOCAB_SIZE = 1500
SEED = 0

# Label words of the paper (large_models/templates.py and LM-BFF's label words) that must each be
# one token after a space.
LABEL_WORDS = [
    "great",
    "terrible",
    "bad",
    "okay",
    "good",
    "Yes",
    "No",
    "Maybe",
    "Description",
    "Entity",
    "Expression",
    "Human",
    "Location",
    "Number",
    "so",
    "because",
]
SENTENCES = [
    "The film was a joy from start to end. It was great.",
    "The plot made no sense and the acting was worse. It was terrible.",
    "A dull script, but the music saves a few scenes. It was bad.",
    "Nothing special, nothing awful either. It was okay.",
    "Warm, funny and well paced. It was good.",
    "Does the first sentence imply the second? Yes, No or Maybe? Yes",
    "The man is sleeping. Question: The man is running. True, False or Neither? No",
    "A dog plays in the park. Question: The animal is outside. Yes or No? Maybe",
    "What is the capital of France? Location",
    "How many legs does a spider have? Number",
    "Who wrote the first dictionary of English? Human",
    "What does the word cascade mean? Description",
    "What is the name of the largest ocean? Entity",
    "What does the abbreviation NASA stand for? Expression",
    "The ground was wet, so the game was delayed.",
    "The game was delayed because the ground was wet.",
    "The bridge was closed, so we took the ferry because it was faster.",
    # the wording of the OPT prompt templates (large_models/templates.py)
    "Suppose the river flooded the valley. Can we infer that the farmers lost their harvest? "
    "Yes, no, or maybe?",
    "Passage: Glaciers carve wide valleys over thousands of years. "
    "Question: do glaciers shape valleys? Answer: Yes",
    'Does the word "bank" have the same meaning in these two sentences? Yes, No?',
    "She sat on the river bank. He deposited money at the bank. Answer: No",
    "Title: Photosynthesis\n"
    "Context: Plants convert sunlight, water and carbon dioxide into sugar.\n"
    "Question: What do plants convert into sugar?\nAnswer: sunlight, water and carbon dioxide\n",
    "Passage: The home team scored 24 points in the first half and 17 in the second.\n"
    "Question: How many points did the home team score?\nAnswer: 41\n",
    'In the previous sentence, does the pronoun "it" refer to the trophy? Yes',
    "I was confident that the answer to the question was correct. Is it true? No",
    "The woman dropped her keys on the stairs, so she walked back to find them.",
    "Alice went to the market on Monday morning, bought fresh bread, apples, cheese "
    "and a newspaper, then returned home before the heavy rain started in the afternoon.",
]


def corpus() -> list[str]:
    """Sample files (sorted, so the result is reproducible) and the label-word sentences, repeated
    so
    that each label word is frequent enough to become a merge."""
    files = (
        sorted(p for p in SAMPLES.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if SAMPLES.is_dir()
        else []
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    words = " ".join(f"{w} {w}." for w in LABEL_WORDS)
    return texts + SENTENCES * 20 + [words] * 50


def train_bpe() -> ByteLevelBPETokenizer:
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(
        corpus(),
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        show_progress=False,
    )
    for w in LABEL_WORDS:
        if len(tok.encode(" " + w).ids) != 1:
            raise SystemExit(
                f"error: label word {w!r} is not a single token after a space (make_tiny)"
            )
    return tok


def write_tokenizer(tok: ByteLevelBPETokenizer, model_type: str, directory: Path) -> None:
    """tokenizer.json, vocab.json + merges.txt and tokenizer_config.json as transformers writes
    them."""
    backend = tok._tokenizer  # a copy per model type, since the post-processor differs
    backend = type(backend).from_str(backend.to_str())
    if model_type == "opt":  # OPT prepends </s> (id 2), adds no EOS
        backend.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
        )
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "</s>",
            "eos_token": "</s>",
            "unk_token": "</s>",
            "pad_token": "<pad>",
            "add_bos_token": True,
        }
    # RoBERTa wraps in <s> ... </s>; <mask> takes the space before it (lstrip), as roberta-base does
    else:
        backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        backend.add_special_tokens(
            [AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)]
        )
        config = {
            "tokenizer_class": "RobertaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            # its lstrip flag lives in tokenizer.json
            "mask_token": "<mask>",
            "trim_offsets": True,
        }
    config.update(add_prefix_space=False, model_max_length=512)
    backend.save(str(directory / "tokenizer.json"))
    backend.model.save(str(directory))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"
    )


@torch.no_grad()
def init_weights_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """transformers' init: N(0, std) matrices, zero biases, unit LayerNorm gains; seeded."""
    g = torch.Generator().manual_seed(SEED)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)
    return model


def main() -> None:
    tok = train_bpe()
    vocab = tok.get_vocab_size()
    configs = {
        "opt": OPTConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=256,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        ),
        "roberta": RobertaConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        ),
    }
    for model_type, cfg in configs.items():
        model = init_weights_((OPT if model_type == "opt" else RobertaMLM)(cfg))
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer(tok, model_type, Path(tmp))
            out = save_model(model, HERE / "tiny" / model_type, tokenizer_dir=tmp)
        print(
            f"wrote {out} ({sum(p.numel() for p in model.parameters())} parameters, vocab {vocab})"
        )


if __name__ == "__main__":
    main()
