"""The LLaMA family for causal LM: Llama 2 and 3, Qwen2 / Qwen2.5, Mistral, SmolLM2, TinyLlama.

Pre-RMSNorm blocks, rotary positions (RoPE, `rope_theta`, Llama-3 `rope_scaling`), grouped-query
attention, a SwiGLU feed-forward, optional q/k/v biases (Qwen2) and a tied or untied head.
Module and parameter names, and their order, are those of transformers' LlamaForCausalLM /
Qwen2ForCausalLM / MistralForCausalLM (`model.layers.{i}.self_attn.q_proj` ...), so checkpoints load
without a renaming table and `named_parameters()` walks the parameters in the Hugging Face order.

Contract kept for zo/: every parameter is used only inside the forward of the module that owns it;
the tied head is a module `lm_head` whose `.weight` IS `model.embed_tokens.weight`. No buffers: the
rotary frequencies are recomputed from the config at each forward (head_dim / 2 numbers), so a model
built on the meta device needs nothing besides its checkpoint tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import ModelError
from .layers import ACTIVATIONS, CausalLM, KVCache, attend, query_key_mask

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    """Hugging Face `config.json` fields of the family (defaults are transformers' LlamaConfig's).

    transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...}); older files write
    `rope_theta` and `rope_scaling`. Both are read; the older spelling is kept (both versions load
    it).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no grouping)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rope_parameters: dict | None = None  # transformers 5's spelling; folded into the two above
    attention_bias: bool = False  # bias on q, k, v and o (Llama); Qwen2 always has q/k/v biases
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None  # Mistral v0.1: 4096
    use_sliding_window: bool = False  # Qwen2's switch
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            self.rope_theta = params.pop("rope_theta", self.rope_theta)
            if params.get("rope_type", params.get("type", "default")) != "default":
                self.rope_scaling = params
            self.rope_parameters = None
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ModelError(
                f"unsupported rope_scaling type {rope_type!r}, "
                f"expected one of {ROPE_TYPES} (config.json)"
            )
        if self.model_type == "qwen2" and self.use_sliding_window:
            raise ModelError(
                "unsupported Qwen2 sliding-window attention (use_sliding_window) (config.json)"
            )
        if self.model_type != "mistral":  # Llama has none; Qwen2's is off (refused above when on)
            self.sliding_window = None
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (config.json)"
            )

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))


def rope_inv_freq(cfg: LlamaConfig, device) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, as transformers' rope initialisation
    functions."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    s = cfg.rope_scaling or {}
    if cfg.rope_type == "linear":
        return inv_freq / s["factor"]
    # Llama 3.1: stretch low frequencies by `factor`, blend the middle band
    if cfg.rope_type == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and scaled in the input dtype (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    lora_targets = ("q_proj", "v_proj")  # peft.apply_lora (MeZO `lora.py`)
    kv_projections = ("k_proj", "v_proj")  # peft.apply_prefix: real-activation init

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.model_type == "qwen2"
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=cfg.attention_bias)
        # Filled by peft.apply_prefix ([P, kv_heads * head_dim]); None means no prefix.
        self.register_parameter("prefix_keys", None)
        self.register_parameter("prefix_values", None)

    def forward(self, x, mask, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
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
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):  # SwiGLU (Shazeer 2020)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, mask, cos, sin, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask, cache: KVCache | None = None, position_ids=None):
        """input_ids [B, T] (the new tokens); attention_mask [B, cached + T] or a block mask (see
        CausalLM.forward) -> hidden [B, T, D]."""
        T = input_ids.shape[1]
        # positions count real tokens only, so left padding works (as transformers' generate)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(1) - 1).masked_fill(attention_mask == 0, 1)[
                :, -T:
            ]
        x = self.embed_tokens(input_ids)
        freqs = position_ids[..., None].float() * rope_inv_freq(self.config, x.device)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = query_key_mask(attention_mask, T)
        # Mistral: key j visible from i only if i - j < window (indices in the row; a packed row's
        # candidates are far shorter than any window)
        if self.config.sliding_window is not None:
            S = mask.shape[-1]
            kpos = torch.arange(S, device=mask.device)
            mask = mask & (kpos > kpos[S - T :, None] - self.config.sliding_window)
        for layer in self.layers:
            x = layer(x, mask, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)


class LLaMA(CausalLM):
    body = "model"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
