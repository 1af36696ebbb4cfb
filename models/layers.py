"""What the model families share: the activations their configs name, attention with prefix
slots, the choice of positions the head runs on, the KV cache and attention masks of incremental
decoding, and the causal-LM base (LM head, forward, greedy generation) of OPT and the LLaMA family.
RoBERTa, an encoder, takes the activations, the attention and the choice of positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ModelError

# Hugging Face `ACT2FN` names the configs use ("gelu" is the exact erf form).
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def attend(q, k, v, mask, prefix_keys=None, prefix_values=None, dropout_p=0.0, scale=None):
    """Scaled dot-product attention over [prefix slots] + keys, for every family.

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
    2-D one [B, W] its own positions in each row."""
    if isinstance(logits_to_keep, int):
        # contiguous: F.linear on a strided slice and a non-Parameter weight runs as a slow bmm
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


class CausalLM(nn.Module):
    """A decoder body under an LM head: the head, its tying, the forward and greedy generation,
    shared by OPT and the LLaMA family. A subclass sets `body`, the name of its decoder attribute
    (Hugging Face's: `decoder` for OPT, `model` for LLaMA), and builds config, body and lm_head.
    """

    body: str

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
