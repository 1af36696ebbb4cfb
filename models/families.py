"""The Hugging Face model types read and written here, one table entry each (gpt-fast style): the
classes that hold a type's config.json and weights, the transformers class that loads what we save,
and where the tensor names in its files differ from our parameter names. checkpoint.py reads this
table and nothing else about a family, so adding one is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from .llama import LLaMA, LlamaConfig
from .opt import OPT, OPTConfig
from .roberta import RobertaConfig, RobertaMLM


@dataclass(frozen=True)
class Family:
    """One `model_type` of config.json: its classes, and its names in checkpoint files."""

    config: type  # the dataclass of config.json's fields
    model: type  # built from the config; its parameter names are "ours"
    architecture: str  # config.json `architectures` of a saved model: what transformers builds
    head: str = "lm_head.weight"  # the head's weight: not written while tied to the embedding
    renames: tuple[tuple[str, str], ...] = ()  # (prefix in files, prefix of ours)
    untied_copies: tuple[str, ...] = ()  # ours, also written under their own name when untied
    stored_head_unties: bool = False  # a head weight in the file is the head's own matrix
    reserved_positions: int = 0  # position rows no token can take

    def our_name(self, key: str) -> str:
        """The parameter that the tensor `key` of a checkpoint file loads into."""
        for theirs, ours in self.renames:
            if key.startswith(theirs):
                return ours + key.removeprefix(theirs)
        return key

    def file_name(self, name: str) -> str:
        """The name transformers writes our parameter `name` under."""
        for theirs, ours in self.renames:
            if name.startswith(ours):
                return theirs + name.removeprefix(ours)
        return name


FAMILIES = {
    # OPTForCausalLM writes `model.decoder.*`; hub OPT files (OPTModel's) `decoder.*`, as ours
    "opt": Family(OPTConfig, OPT, "OPTForCausalLM", renames=(("model.decoder.", "decoder."),)),
    "roberta": Family(
        RobertaConfig,
        RobertaMLM,
        "RobertaForMaskedLM",
        head="lm_head.decoder.weight",
        # transformers' head owns the decoder's bias, as `lm_head.bias`; untied, it reads the
        # decoder's own `lm_head.decoder.bias` too
        renames=(("lm_head.bias", "lm_head.decoder.bias"),),
        untied_copies=("lm_head.decoder.bias",),
        # the original never ties the decoder (medium_models' RobertaModelForPromptFinetuning):
        # roberta-large stores its own
        stored_head_unties=True,
        # fairseq positions start after padding_idx 1 (create_position_ids_from_input_ids)
        reserved_positions=2,
    ),
    "llama": Family(LlamaConfig, LLaMA, "LlamaForCausalLM"),
    "qwen2": Family(LlamaConfig, LLaMA, "Qwen2ForCausalLM"),
    "mistral": Family(LlamaConfig, LLaMA, "MistralForCausalLM"),
}
