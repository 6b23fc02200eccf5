"""Static KV cache: fixed-capacity buffers written in place.

The cache holds no lengths: every forward call says where its tokens go (``start[b]``, the position of the first
new token of sequence b) and attention reads slots [0, start[b] + t]. Rolling back rejected speculative tokens is
therefore just starting the next call at a lower position: stale slots are never read, and are overwritten by
the next write, so nothing is copied or cropped.

The cache also owns the per-layer views the kernels take (lists of [rows, nKV, S, D] tensors per layer range):
they are made on first use and live exactly as long as the cache, so a finished generation frees its memory.
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
        # [L] x [B, nKV, S, D]; a contiguous tensor per layer for the kernels, all views of ONE zeroed buffer: one
        # fill instead of 2L (each a parallel region: on a loaded 2-core machine the 60 fills of a 30-layer model
        # measured ~0.5 s per generate() call).
        buffer = torch.zeros((2, num_layers) + shape, dtype=dtype, device=device)
        # (single views by indexing, not unbind(): unbind's views may not be written in place under autograd)
        self.k = [buffer[0, i] for i in range(num_layers)]
        self.v = [buffer[1, i] for i in range(num_layers)]
        self.capacity = capacity
        self.batch_size = batch_size
        self._views: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

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

    def layer_views(self, start_layer: int, end_layer: int,
                    rows: slice | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([k], [v]) views of layers [start_layer, end_layer) for the given rows, made once per (range, rows)."""
        key = (start_layer, end_layer) if rows is None else (start_layer, end_layer, rows.start, rows.stop)
        views = self._views.get(key)
        if views is None:
            pairs = [self.layer(i, rows) for i in range(start_layer, end_layer)]
            views = self._views[key] = ([k for k, _ in pairs], [v for _, v in pairs])
        return views
