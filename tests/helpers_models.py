"""Fixture builders for the models/ tests: tiny random transformers checkpoints (the oracle), batches,
and a tiny byte-level BPE. Built once per test session (functools.cache) in a temporary directory."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(tempfile.mkdtemp(prefix="mezo-models-tests-"))
atexit.register(shutil.rmtree, ROOT, True)

VOCAB = 400
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in OPT / RoBERTa
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny byte-level tokenizer.",
    "The movie was great. It was terrible? No, it was okay, maybe good or bad.",
    "Question: what is the answer? Answer: Yes or No or Maybe.",
    "Zeroth-order optimisation fine-tunes language models with forward passes only.",
] * 20

OPT_LAYOUTS = {  # 125m-style pre-LN; 350m-style post-LN with project_in/out; other activation, no biases
    "opt125": dict(),
    "opt350": dict(word_embed_proj_dim=32, do_layer_norm_before=False),
    "opt-gelu-nobias": dict(activation_function="gelu", enable_bias=False),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (LayerNorm gains too), so a swapped or skipped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 and "norm" in name.lower() else 0.3 * noise)
    return model


@functools.cache
def hf_opt(layout: str = "opt125"):
    """(checkpoint dir, transformers model) of a tiny random OPT saved with save_pretrained."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    **OPT_LAYOUTS[layout])
    torch.manual_seed(0)
    model = randomize_(OPTForCausalLM(cfg), seed=1).eval()
    path = ROOT / layout
    model.save_pretrained(path)
    return path, model


@functools.cache
def hf_roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=66, type_vocab_size=1,
                        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = randomize_(RobertaForMaskedLM(cfg), seed=2).eval()
    path = ROOT / "roberta"
    model.save_pretrained(path)
    return path, model


def padded_batch(lengths, side: str, pad_id: int = 1, seed: int = 0):
    """input_ids, attention_mask with rows of the given lengths, padded on `side` to the longest.
    Real tokens avoid the special ids 0..4 (RoBERTa derives positions from pad ids)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(5, VOCAB, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


@functools.cache
def bpe_dir() -> Path:
    """A trained byte-level BPE saved as tokenizer.json and as vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    path = ROOT / "bpe"
    path.mkdir()
    tok.save_model(str(path))
    tok.save(str(path / "raw_tokenizer.json"))
    return path
