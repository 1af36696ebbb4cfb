"""OPT (Zhang et al. 2022) for causal LM, every public size, in the style of nanoGPT / gpt-fast.

Module and parameter names follow the Hugging Face checkpoints
(`decoder.layers.{i}.self_attn.q_proj` ...; OPTForCausalLM's files put `model.` in front), and
modules are registered in transformers' order, so named_parameters() lists them as OPTForCausalLM
does: the original draws one z per parameter in that order (large_models/trainer.py
zo_perturb_parameters).
Two layouts exist:
  * 125m and 1.3b ... 66b: pre-LayerNorm blocks and a final LayerNorm;
  * 350m: post-LayerNorm blocks, no final LayerNorm, and `project_in` / `project_out` between the
    512-wide embeddings and the 1024-wide blocks (`word_embed_proj_dim != hidden_size`).

Contract kept for zo/: every parameter is used only inside the forward of the module that owns it.
The tied LM head is therefore a module `lm_head` whose `.weight` IS `decoder.embed_tokens.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from .layers import ACTIVATIONS, CausalLM, KVCache, attend, query_key_mask

# fairseq legacy: position rows 0 and 1 are reserved (padding_idx=1), real positions start at row 2.
POSITION_OFFSET = 2


@dataclass
class OPTConfig:
    """Hugging Face `config.json` fields of OPT (defaults are opt-125m's, as in transformers)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None -> hidden_size; 512 for opt-350m
    do_layer_norm_before: bool = True  # False only for opt-350m (post-LN)
    _remove_final_layer_norm: bool = False  # transformers' name; pre-v4.20 fine-tuned checkpoints
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    tie_word_embeddings: bool = True
    model_type: str = "opt"

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


class OPTAttention(nn.Module):
    lora_targets = ("q_proj", "v_proj")  # peft.apply_lora (MeZO `lora.py`)
    kv_projections = ("k_proj", "v_proj")  # peft.apply_prefix: real-activation init

    def __init__(self, cfg: OPTConfig, layer_idx: int):
        super().__init__()
        d, bias = cfg.hidden_size, cfg.enable_bias
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        # Registration order is transformers' OPTAttention (k, v, q, out): named_parameters() order
        # is the order the original draws z in (large_models/trainer.py zo_perturb_parameters).
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)
        # Filled by peft.apply_prefix; None means no prefix (and no entry in state_dict()).
        self.register_parameter("prefix_keys", None)
        self.register_parameter("prefix_values", None)

    def forward(self, x, mask, cache: KVCache | None = None):
        B, T, C = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        # OPT scales q after the projection, bias included (as fairseq and transformers do).
        q = (self.q_proj(x) * self.head_dim**-0.5).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attend(
            q,
            k,
            v,
            mask,
            self.prefix_keys,
            self.prefix_values,
            self.dropout if self.training else 0.0,
            scale=1.0,
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_idx: int):
        super().__init__()
        d, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_norm = cfg.do_layer_norm_before
        self.dropout = cfg.dropout
        self.act = ACTIVATIONS[cfg.activation_function]
        self.self_attn = OPTAttention(cfg, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, d, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(self, x, mask, cache: KVCache | None = None):
        p = self.dropout if self.training else 0.0
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + F.dropout(self.self_attn(h, mask, cache), p, self.training)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + F.dropout(self.fc2(self.act(self.fc1(h))), p, self.training)
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim, cfg.pad_token_id)
        self.embed_positions = nn.Embedding(
            cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size
        )
        projected = cfg.word_embed_proj_dim != cfg.hidden_size
        # project_out before project_in, as transformers' OPTDecoder registers them (parameter
        # order).
        self.project_out = (
            nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False) if projected else None
        )
        self.project_in = (
            nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False) if projected else None
        )
        has_final_norm = cfg.do_layer_norm_before and not cfg._remove_final_layer_norm
        self.final_layer_norm = (
            nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
            if has_final_norm
            else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))

    def forward(self, input_ids, attention_mask, cache: KVCache | None = None, position_ids=None):
        """input_ids [B, T] (the new tokens); attention_mask [B, cached + T] or a block mask (see
        CausalLM.forward) -> hidden [B, T, D]."""
        T = input_ids.shape[1]
        # learned positions count real tokens only, so left padding works (pads: row 1)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(1) * attention_mask - 1)[:, -T:]
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)
        mask = query_key_mask(attention_mask, T)
        for layer in self.layers:
            x = layer(x, mask, cache)
        if cache is not None:
            cache.length += T
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPT(CausalLM):
    body = "decoder"

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.config = cfg
        self.decoder = OPTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.tie_weights()
