"""The Llama decoder layers as plain-PyTorch modules: differentiable, wrappable (layer dropout, LoRA adapters), the
definition the kernels are tested against. They run without a KV cache (training, scoring, analysis); decoding
with a cache goes through the model's Decoder (model/decoder.py), which runs the same layers from their weights.
Parameter names match Hugging Face's ``LlamaForCausalLM``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import LlamaConfig
from .kv_cache import StaticKVCache


@dataclass
class ForwardState:
    """Where one call's new tokens sit. positions [B, T] int64 (or [1, T] when every sequence starts at 0, as in
    training), start [B] int64 (the first new token's position: where its cache slots begin), cos / sin [P, D/2]
    float32, the KV cache (None: attention over the call's own tokens) and which of its rows the call covers."""
    positions: torch.Tensor
    start: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: Optional[StaticKVCache] = None
    rows: Optional[slice] = None

    def caches(self, start_layer: int, end_layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The per-layer (k, v) views of layers [start_layer, end_layer) for this call's rows."""
        return self.cache.layer_views(start_layer, end_layer, self.rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)
        self.scale = D ** -0.5
        self.layer_index = layer_index

    def forward(self, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        """Causal attention over this call's own tokens (the cache-free path)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = ops.rope_reference(q, st.positions, st.cos, st.sin)
        k = ops.rope_reference(k, st.positions, st.cos, st.sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.scale, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, st: ForwardState) -> torch.Tensor:
        """h [B, T, H] -> [B, T, H]. Only h carries a batch dimension that wrappers may subset (positions are
        [1, T] in training), so layer dropout can run a layer on some samples of the batch only."""
        h = h + self.self_attn(self.input_layernorm(h), st)
        return h + self.mlp(self.post_attention_layernorm(h))
