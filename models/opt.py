"""OPT (Zhang et al. 2022) for causal LM, every public size, in the style of nanoGPT / gpt-fast.

Module and parameter names follow the Hugging Face checkpoints
(`decoder.layers.{i}.self_attn.q_proj` ...) so weights load without a renaming table, and modules
are registered in transformers' order, so named_parameters() lists them as OPTForCausalLM does: the
original draws one z per parameter in that order (large_models/trainer.py zo_perturb_parameters).
Two layouts exist:
  * 125m and 1.3b ... 66b: pre-LayerNorm blocks and a final LayerNorm;
  * 350m: post-LayerNorm blocks, no final LayerNorm, and `project_in` / `project_out` between the
    512-wide embeddings and the 1024-wide blocks (`word_embed_proj_dim != hidden_size`).

Contract kept for zo/: every parameter is used only inside the forward of the module that owns it.
The tied LM head is therefore a module `lm_head` whose `.weight` IS `decoder.embed_tokens.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ModelError

# Hugging Face `ACT2FN` names used by OPT and RoBERTa configs ("gelu" is the exact erf form).
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}

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


def attend(q, k, v, mask, prefix_keys=None, prefix_values=None, dropout_p=0.0, scale=None):
    """Scaled dot-product attention over [prefix slots] + keys, shared by OPT and RoBERTa.

    q, k, v: [B, H, T, hd]; mask: bool, broadcastable to [B, 1, Tq, Tk] (True = may attend) or None.
    prefix_keys / prefix_values: [P, H*hd] (prefix tuning, Li & Liang 2021; MeZO `prefix.py`) or
    None. Every query sees every prefix slot: the original puts zeros in front of the additive mask.
    """
    if prefix_keys is not None:
        B, H, _, hd = k.shape
        P = prefix_keys.shape[0]
        k = torch.cat([prefix_keys.view(1, P, H, hd).transpose(1, 2).expand(B, H, P, hd), k], dim=2)
        v = torch.cat(
            [prefix_values.view(1, P, H, hd).transpose(1, 2).expand(B, H, P, hd), v], dim=2
        )
        if mask is not None:
            mask = F.pad(mask, (P, 0), value=True)
    # Grouped-query attention (LLaMA family): fewer key/value heads than query heads.
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def keep_positions(h, logits_to_keep):
    """h [B, T, D] -> the positions whose logits are asked for: an int k keeps the last k (0: all),
    as transformers; a 1-D index tensor [W] the same positions of every row, as transformers; a
    2-D one
    [B, W] its own positions in each row."""
    # contiguous: F.linear on a strided slice and a non-Parameter
    if isinstance(logits_to_keep, int):
        # weight runs as a slow bmm
        return h[:, -logits_to_keep:].contiguous() if logits_to_keep else h
    if logits_to_keep.dim() == 2:
        return h[torch.arange(h.shape[0], device=h.device)[:, None], logits_to_keep]
    return h[:, logits_to_keep]


class KVCache:
    """Keys/values of every layer for incremental decoding, preallocated once (gpt-fast style).

    Buffers are created lazily by the first `update` of each layer, so the cache needs no model
    dimensions. `length` counts the tokens stored; the model advances it after each forward.
    Prefix slots are not stored here: the attention prepends them at every step.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys = [None] * num_layers
        self.values = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, H, T, hd] after the cached tokens; return all keys and values so far."""
        if self.keys[layer] is None:
            B, H, _, hd = k.shape
            self.keys[layer] = k.new_zeros(B, H, self.max_len, hd)
            self.values[layer] = v.new_zeros(B, H, self.max_len, hd)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


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


def causal_padding_mask(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Bool mask [B, 1, num_new, S]: query i (the i-th of the last num_new tokens) may attend key j.

    attention_mask [B, S] covers cached and new tokens. Each query also sees itself, so the rows of
    left-padding tokens are never fully masked (those would give NaN in some SDPA kernels); their
    outputs are never read.
    """
    S = attention_mask.shape[1]
    kpos = torch.arange(S, device=attention_mask.device)
    qpos = kpos[S - num_new :, None]
    valid = attention_mask.bool()[:, None, None, :]
    return (kpos <= qpos) & (valid | (kpos == qpos))


def query_key_mask(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """The bool mask the attention takes: a block mask [B, 1, T, T] as given, else the causal
    padding mask of a padding mask [B, S]."""
    return (
        attention_mask
        if attention_mask.dim() == 4
        else causal_padding_mask(attention_mask, num_new)
    )


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


class CausalLM(nn.Module):
    """A decoder body under an LM head: the head, its tying, the forward and greedy generation,
    shared by OPT and the LLaMA family. `body` names the decoder attribute (Hugging Face's name:
    `decoder` for OPT, `model` for LLaMA), so checkpoints load without a renaming table."""

    body = "decoder"

    def tie_weights(self):
        """The head's weight IS the embedding Parameter (used by both modules' forwards)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = getattr(self, self.body).embed_tokens.weight

    def forward(
        self,
        input_ids,
        attention_mask=None,
        cache: KVCache | None = None,
        logits_to_keep=0,
        position_ids=None,
    ):
        """Logits [B, T, V] of the positions the caller reads. With a cache, input_ids are the new
        tokens and attention_mask [B, cached + T] covers cached + new tokens (left padding, as in
        transformers).

        logits_to_keep (transformers' argument, see keep_positions): the positions whose logits are
        computed; the LM head, about a fifth to a third of a forward's multiply-adds for the
        125m-135m models, then runs on those alone. A packed layout (several sequences sharing a
        prefix in one row, data/collate.py) passes attention_mask as a bool block mask [B, 1, T, T]
        (True = may attend) with its position_ids [B, T].
        """
        if attention_mask is None:
            past = cache.length if cache is not None else 0
            attention_mask = input_ids.new_ones(input_ids.shape[0], past + input_ids.shape[1])
        if attention_mask.dim() == 4 and (position_ids is None or cache is not None):
            raise ModelError(
                "a block attention mask needs position_ids and no KV cache (CausalLM.forward)"
            )
        if attention_mask.dim() == 2:
            attention_mask = attention_mask.long()
        h = getattr(self, self.body)(input_ids, attention_mask, cache, position_ids)
        return self.lm_head(keep_positions(h, logits_to_keep))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, eos_token_ids=()):
        """Greedy decoding of a left-padded batch with a KV cache, as transformers' greedy
        `generate`.

        Returns only the new tokens [B, <= max_new_tokens]; a row keeps its stop token and is padded
        with pad_token_id after it; decoding ends when every row has stopped.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat(
            [attention_mask.long(), attention_mask.new_ones(B, max_new_tokens).long()], 1
        )
        eos = torch.as_tensor(list(eos_token_ids or ()), dtype=torch.long, device=input_ids.device)
        cache = KVCache(self.config.num_hidden_layers, T + max_new_tokens)
        # transformers pads finished rows with the first stop token when the model has no pad token
        pad = (
            self.config.pad_token_id
            if self.config.pad_token_id is not None
            else int(eos[0])
            if len(eos)
            else 0
        )
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens, out = input_ids, []
        for _ in range(max_new_tokens):
            logits = self(
                tokens, mask[:, : cache.length + tokens.shape[1]], cache, logits_to_keep=1
            )
            nxt = logits[:, -1].argmax(-1).masked_fill(done, pad)
            out.append(nxt)
            done |= torch.isin(nxt, eos)
            if done.all():
                break
            tokens = nxt[:, None]
        return torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)


class OPT(CausalLM):
    hf_architecture = "OPTForCausalLM"

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.config = cfg
        self.decoder = OPTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.tie_weights()
