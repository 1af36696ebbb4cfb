"""Models for MeZO: OPT, RoBERTa and the LLaMA family (Llama 2/3, Qwen2, Mistral, SmolLM2,
TinyLlama) in plain PyTorch, Hugging Face checkpoint I/O, GGUF import (`python -m models.gguf`),
tokenizers, LoRA and prefix.

    model = load_model("facebook/opt-13b", dtype=torch.bfloat16)   # a directory or a hub name in
    the HF cache logits = model(input_ids, attention_mask)                      # [B, T, V] last =
    model(input_ids, attention_mask, logits_to_keep=1)      # [B, 1, V]: the head runs there only
    new_tokens = model.generate(input_ids, attention_mask, max_new_tokens=50, eos_token_ids=[50118])
    tok = load_tokenizer("facebook/opt-13b") save_model(model, "out/final")
    # transformers can load it

Knows nothing of zeroth-order optimisation or FSDP. transformers is never imported here.
"""

from pathlib import Path


class ModelError(ValueError):
    """A user mistake about a model or tokenizer; the message reads `<what> (<file>)`."""


# after ModelError, which the submodules raise
from .checkpoint import check_tokenizer, load_model, max_positions, save_model
from .checkpoint import resolve as resolve_model_path
from .identity import base_fingerprints, fingerprint
from .peft import (
    adapter_state_dict,
    apply_adapter,
    apply_lora,
    apply_prefix,
    load_adapter,
    lora_bytes,
    read_adapter,
    save_adapter,
)
from .tokenizer import Tokenizer, load_tokenizer

TINY_OPT = str(Path(__file__).parent / "tiny" / "opt")  # written by `python -m models.make_tiny`
TINY_ROBERTA = str(Path(__file__).parent / "tiny" / "roberta")

__all__ = [
    "ModelError",
    "check_tokenizer",
    "fingerprint",
    "base_fingerprints",
    "load_model",
    "max_positions",
    "save_model",
    "load_tokenizer",
    "Tokenizer",
    "apply_lora",
    "apply_prefix",
    "adapter_state_dict",
    "apply_adapter",
    "load_adapter",
    "lora_bytes",
    "read_adapter",
    "save_adapter",
    "resolve_model_path",
    "TINY_OPT",
    "TINY_ROBERTA",
]
