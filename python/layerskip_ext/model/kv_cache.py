"""Static KV cache: fixed-capacity buffers written in place.

The cache holds no lengths: every forward call says where its tokens go (``start[b]``, the position of the first
new token of sequence b) and attention reads slots [0, start[b] + t]. Rolling back rejected speculative tokens is
therefore just starting the next call at a lower position: stale slots are never read, and are overwritten by
the next write, so nothing is copied or cropped.
"""
from __future__ import annotations

import torch

from ..errors import GenerationError


class StaticKVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity <= 0:
            raise GenerationError(f"KV cache capacity must be positive, got {capacity}")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        # [L] x [B, nKV, S, D]; separate tensors per layer so each is contiguous for the kernels.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.batch_size = batch_size

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype: torch.dtype, device="cpu") -> "StaticKVCache":
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim,
                   dtype, device)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def layer(self, index: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer, optionally for a contiguous range of sequences (a view: writes go through)."""
        if rows is None:
            return self.k[index], self.v[index]
        return self.k[index][rows], self.v[index][rows]
