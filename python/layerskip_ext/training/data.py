"""Text/code corpora for training and analysis: read, tokenize, pack into fixed-length sequences, and walk them
in a seeded order that a checkpoint can resume exactly (the position is one integer)."""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch

from ..errors import TrainingError


def stream_fingerprint(stream: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(len(stream)).encode())
    h.update(np.ascontiguousarray(stream).tobytes())
    return h.hexdigest()[:16]


class PackedSequences:
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs + next-token targets), stride ``seq_len``."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise TrainingError(f"sequence length must be >= 1, got {seq_len}")
        self.stream = torch.from_numpy(np.ascontiguousarray(stream).astype(np.int64))
        self.seq_len = seq_len
        self.count = (len(stream) - 1) // seq_len
        if self.count < 1:
            raise TrainingError(f"dataset too small: {len(stream)} tokens, need at least {seq_len + 1} "
                                f"for one sequence of --seq-len {seq_len}")

    def __len__(self) -> int:
        return self.count

    def get(self, indices) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64."""
        T = self.seq_len
        return torch.stack([self.stream[i * T:i * T + T + 1] for i in indices])


class BatchOrder:
    """Global batches in a seeded order: epoch e visits the sequences in ``randperm(count, seed e)``; the state
    is ``consumed`` (sequences handed out so far), so resuming continues exactly."""

    def __init__(self, data: PackedSequences, seed: int, shuffle: bool = True):
        self.data = data
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0
        self._perm_epoch = -1
        self._perm: Optional[torch.Tensor] = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            n = len(self.data)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, global_batch: int) -> list[int]:
        n = len(self.data)
        out = []
        for _ in range(global_batch):
            epoch, pos = divmod(self.consumed, n)
            out.append(int(self._order(epoch)[pos]))
            self.consumed += 1
        return out

    def next_batch(self, global_batch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's rows of the next global batch: [global_batch / world, seq_len + 1]."""
        idx = self.next_indices(global_batch)
        per = global_batch // world
        return self.data.get(idx[rank * per:(rank + 1) * per])

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.data)


def evaluation_sequences(stream: np.ndarray, seq_len: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """Evenly spaced windows over the whole stream (deterministic), [n, seq_len + 1]."""
    data = PackedSequences(stream, seq_len)
    n = len(data) if max_sequences is None else max(1, min(len(data), max_sequences))
    idx = np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64))
    return data.get([int(i) for i in idx])

