"""Fixture builders for the models/ tests: tiny random transformers checkpoints (the oracle),
batches,
and a tiny byte-level BPE. Built once per test session (functools.cache) in a temporary
directory."""

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

# 125m-style pre-LN; 350m-style post-LN with project_in/out; other activation, no biases
OPT_LAYOUTS = {
    "opt125": dict(),
    "opt350": dict(word_embed_proj_dim=32, do_layer_norm_before=False),
    "opt-gelu-nobias": dict(activation_function="gelu", enable_bias=False),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (LayerNorm gains too), so a swapped or skipped tensor
    shows."""
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

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        **OPT_LAYOUTS[layout],
    )
    torch.manual_seed(0)
    model = randomize_(OPTForCausalLM(cfg), seed=1).eval()
    path = ROOT / layout
    model.save_pretrained(path)
    return path, model


@functools.cache
def hf_roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=66,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
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
    tok.train_from_iterator(
        CORPUS, vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS, show_progress=False
    )
    path = ROOT / "bpe"
    path.mkdir()
    tok.save_model(str(path))
    tok.save(str(path / "raw_tokenizer.json"))
    return path


# the LLaMA family's variants, each with grouped-query attention (4 query, 2 kv heads)
LLAMA_LAYOUTS = {
    "llama3": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-bias": dict(
        model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    # window < sequences
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=4),
}


@functools.cache
def hf_llama(layout: str = "llama3"):
    """(checkpoint dir, transformers model) of a tiny random LLaMA-family model
    (save_pretrained)."""
    import transformers

    options = dict(LLAMA_LAYOUTS[layout])
    model_type = options.pop("model_type")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **options,
    )
    torch.manual_seed(0)
    model = randomize_(model_cls(cfg), seed=3).eval()
    path = ROOT / layout
    model.save_pretrained(path)
    return path, model


@functools.cache
def tiny_llama_dir() -> Path:
    """The tiny Qwen2 checkpoint with the tiny BPE as its tokenizer (add_bos_token, BOS `<s>`)."""
    import json
    import shutil

    path, _ = hf_llama("qwen2")
    out = ROOT / "qwen2-with-tokenizer"
    shutil.copytree(path, out)
    shutil.copyfile(bpe_dir() / "raw_tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )
    return out


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (transformers' generate; its forward takes them as
    given)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def llama_logits(hf, ids, mask):
    """transformers' LLaMA-family logits with the positions our models compute from the mask."""
    return hf(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits


# ---------------------------------------------------------------- the original's parameter order
# The original walks named_parameters() of the transformers model it ran: its step draws one z per
# parameter in that order (large_models/trainer.py zo_perturb_parameters).


def hf_as_original(kind: str):
    """(checkpoint dir, a fresh transformers model of it, parameters registered as the original's
    transformers registered them). The cached oracle of hf_opt / hf_roberta is never modified."""
    path, hf = hf_roberta() if kind == "roberta" else hf_opt(kind)
    model = type(hf).from_pretrained(path).eval()
    if kind == "roberta":
        # transformers 5 creates position_embeddings after LayerNorm. The original's
        # RobertaEmbeddings (transformers 4, and medium_models/src/modeling_roberta.py) assigns it
        # second, then assigns it again after LayerNorm, which keeps its first slot: word, position,
        # token_type, LayerNorm.
        children = model.roberta.embeddings._modules
        for name in [n for n in children if n not in ("word_embeddings", "position_embeddings")]:
            children[name] = children.pop(name)
    return path, model


class OriginalLoRALinear(torch.nn.Linear):
    """large_models/lora.py LoRALinear with merge_weights=False and no dropout: nn.Linear's weight
    and
    bias, then lora_A [r, in] and lora_B [out, r]; y = x W^T + b + (x A^T B^T) * alpha / r."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight.data = base.weight.data  # the original reassigns the pretrained tensors
        if base.bias is not None:
            self.bias.data = base.bias.data
        self.lora_A = torch.nn.Parameter(self.weight.new_zeros(r, base.in_features))
        self.lora_B = torch.nn.Parameter(self.weight.new_zeros(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x):
        out = torch.nn.functional.linear(x, self.weight, self.bias)
        return out + (x @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling


def original_lora(model: torch.nn.Module, r: int = 8, alpha: float = 16) -> torch.nn.Module:
    """large_models/lora.py `LoRA`: in every module whose name ends with "attn", q_proj and v_proj
    are replaced (each keeps its slot among the module's children), then every parameter without
    "lora" in its name is frozen. RoBERTa: query and value of each `attention.self`
    (medium_models'
    modeling_roberta.py builds them as loralib Linear layers, same parameter order)."""
    opt = model.config.model_type == "opt"
    suffix, targets = (
        ("attn", ("q_proj", "v_proj")) if opt else ("attention.self", ("query", "value"))
    )
    for name, module in list(model.named_modules()):
        if name.endswith(suffix):
            for target in targets:
                setattr(module, target, OriginalLoRALinear(getattr(module, target), r, alpha))
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    return model


def original_prefix(model: torch.nn.Module, num_prefix: int = 5) -> torch.nn.Module:
    """large_models/prefix.py `PrefixTuning` without reparameterisation, parameters only (no forward
    hook): prefix_keys then prefix_values [num_prefix, hidden] as new Parameters of every module
    whose name ends with "attn" (OPT) or "attention" (RoBERTa, medium_models/src/prefix.py); every
    parameter
    without "prefix" in its name is frozen."""
    suffix = "attn" if model.config.model_type == "opt" else "attention"
    hidden = model.config.hidden_size
    for name, module in list(model.named_modules()):
        if name.endswith(suffix):
            module.prefix_keys = torch.nn.Parameter(torch.randn(num_prefix, hidden))
            module.prefix_values = torch.nn.Parameter(torch.randn(num_prefix, hidden))
    for name, p in model.named_parameters():
        p.requires_grad_("prefix" in name)
    return model


def trainable(
    model: torch.nn.Module, rename=lambda name: name
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each trainable parameter in named_parameters() order."""
    return [(rename(n), tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
