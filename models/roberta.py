"""RoBERTa (Liu et al. 2019) encoder with its masked-LM head: MeZO's medium models
(`medium_models/`).

Module and parameter names follow the Hugging Face checkpoints
(`roberta.encoder.layer.{i}.attention.self.query` ...), so weights load without a renaming table.
Post-LayerNorm blocks; the MLM head is dense -> GELU (exact erf) -> LayerNorm -> decoder + bias. The
decoder weight is tied to the word embeddings (the same Parameter, owned by two modules) unless the
checkpoint stores its own copy, as roberta-large's does (the original's
`RobertaModelForPromptFinetuning` in medium_models/src/models.py never ties them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ACTIVATIONS, attend, keep_positions


@dataclass
class RobertaConfig:
    """Hugging Face `config.json` fields of RoBERTa. Defaults are transformers' `RobertaConfig()`
    defaults, so a config.json that omits a field reads as transformers reads it (careful:
    roberta-base
    itself has type_vocab_size 1, layer_norm_eps 1e-5, max_position_embeddings 514)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    tie_word_embeddings: bool = True
    model_type: str = "roberta"


class RobertaEmbeddings(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.padding_idx = cfg.pad_token_id
        self.dropout = cfg.hidden_dropout_prob
        # Order word, position, token_type, LayerNorm: the original's
        # (medium_models/src/modeling_roberta.py and transformers 4 RobertaEmbeddings); transformers
        # 5 registers position_embeddings last.
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(
            cfg.max_position_embeddings, d, padding_idx=cfg.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None):
        # fairseq positions: real tokens count from padding_idx + 1, pads sit at padding_idx.
        real = (input_ids != self.padding_idx).long()
        positions = real.cumsum(1) * real + self.padding_idx
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class RobertaSelfAttention(nn.Module):
    lora_targets = ("query", "value")  # peft.apply_lora (loralib on query/value in `medium_models`)
    kv_projections = ("key", "value")  # peft.apply_prefix: real-activation init

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.register_parameter("prefix_keys", None)  # filled by peft.apply_prefix
        self.register_parameter("prefix_values", None)

    def forward(self, x, mask):
        B, T, C = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        y = attend(
            q,
            k,
            v,
            mask,
            self.prefix_keys,
            self.prefix_values,
            self.dropout if self.training else 0.0,
        )
        return y.transpose(1, 2).reshape(B, T, C)


class AddNorm(nn.Module):
    """LayerNorm(residual + dropout(dense(h))): the `attention.output` and `output` sub-blocks."""

    def __init__(self, d_in: int, cfg: RobertaConfig):
        super().__init__()
        self.dropout = cfg.hidden_dropout_prob
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(residual + F.dropout(self.dense(h), self.dropout, self.training))


class RobertaAttention(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.self = RobertaSelfAttention(cfg)  # checkpoint name: `attention.self.query` ...
        self.output = AddNorm(cfg.hidden_size, cfg)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class RobertaIntermediate(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return self.act(self.dense(x))


class RobertaLayer(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.attention = RobertaAttention(cfg)
        self.intermediate = RobertaIntermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class RobertaEncoder(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.layer = nn.ModuleList(RobertaLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class RobertaModel(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.embeddings = RobertaEmbeddings(cfg)
        self.encoder = RobertaEncoder(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        # Bidirectional: only padded keys are hidden. [B, 1, 1, S] broadcasts over heads and
        # queries.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


class RobertaLMHead(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        # The decoder's bias is the checkpoint's `lm_head.bias`, which transformers' RobertaLMHead
        # owns directly, so it is the head's first parameter in named_parameters(). Registering the
        # decoder first puts it there too (its tied weight is listed under the word embeddings; an
        # untied decoder weight comes first here, where transformers lists it after layer_norm).
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))


class RobertaMLM(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.config = cfg
        self.roberta = RobertaModel(cfg)
        self.lm_head = RobertaLMHead(cfg)
        self.tie_weights()

    def tie_weights(self):
        """The head's weight IS the embedding Parameter (used by both modules' forwards)."""
        if self.config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.roberta.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, logits_to_keep=0):
        """Masked-LM logits [B, T, V] (right padding is the convention, any padding works) of the
        positions kept: logits_to_keep as in CausalLM.forward (int k: the last k, 0: all; or
        indices)."""
        return self.lm_head(
            keep_positions(self.roberta(input_ids, attention_mask, token_type_ids), logits_to_keep)
        )
