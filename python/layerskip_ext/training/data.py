"""Text/code corpora for training and analysis: read, tokenize, pack into fixed-length sequences, and walk them
in a seeded order that a checkpoint can resume exactly (the position is one integer)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch

from .common import TrainingError

_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "node_modules", ".mypy_cache", ".pytest_cache"}
_BINARY_EXT = {".pyc", ".pyo", ".so", ".o", ".a", ".dll", ".exe", ".png", ".jpg", ".jpeg", ".gif", ".ico",
               ".zip", ".gz", ".bz2", ".xz", ".tar", ".pdf", ".whl", ".pt", ".bin", ".safetensors", ".gguf",
               ".wav", ".mp3", ".mp4", ".db", ".sqlite", ".npy", ".npz", ".pkl", ".pickle", ".dylib", ".class"}


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_jsonl(path: str, text_field: str) -> list[str]:
    docs = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TrainingError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise TrainingError(f"{path}:{n}: not valid JSON ({e})") from None
            if isinstance(obj, str):
                text = obj
            elif isinstance(obj, dict):
                text = obj.get(text_field)
                if text is None:
                    raise TrainingError(f"{path}:{n}: no {text_field!r} field (choose one with --text-field; "
                                        f"fields here: {', '.join(sorted(obj)[:8])})")
                if not isinstance(text, str):
                    raise TrainingError(f"{path}:{n}: field {text_field!r} is not a string")
            else:
                raise TrainingError(f"{path}:{n}: expected a JSON object or string per line")
            if text:
                docs.append(text)
    return docs


def read_corpus(path: str, text_field: str = "text", max_bytes: Optional[int] = None,
                exclude: Optional[list[str]] = None) -> list[str]:
    """Documents of a corpus: a folder (every UTF-8 text file below it, sorted, binaries skipped), a JSONL file
    (one JSON object per line, its ``text_field``; or JSON strings) or a single text file.

    ``exclude``: paths relative to a folder corpus (files or sub-folders) to leave out, e.g. a held-out split."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise TrainingError(f"dataset not found: {path}")
    docs: list[str] = []
    excluded = {os.path.normpath(e) for e in (exclude or [])}
    if excluded and not os.path.isdir(path):
        raise TrainingError(f"--exclude needs a folder corpus; {path} is a file")
    if os.path.isdir(path):
        total = 0
        for root, dirs, files in os.walk(path):
            rel = os.path.relpath(root, path)
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")
                             and os.path.normpath(os.path.join(rel, d)) not in excluded)
            for name in sorted(files):
                if name.startswith(".") or os.path.splitext(name)[1].lower() in _BINARY_EXT:
                    continue
                if os.path.normpath(os.path.join(rel, name)) in excluded:
                    continue
                full = os.path.join(root, name)
                if name.endswith(".jsonl"):
                    got = _read_jsonl(full, text_field)
                else:
                    text = _read_text(full)
                    got = [text] if text and text.strip() else []
                for d in got:
                    docs.append(d)
                    total += len(d)
                if max_bytes is not None and total >= max_bytes:
                    break
            if max_bytes is not None and total >= max_bytes:
                break
    elif path.endswith((".jsonl", ".ndjson")):
        docs = _read_jsonl(path, text_field)
    else:
        text = _read_text(path)
        if text is None:
            raise TrainingError(f"{path}: not a UTF-8 text file")
        docs = [text] if text.strip() else []
    if not docs:
        raise TrainingError(f"dataset {path} is empty: no text found")
    return docs


def tokenize_corpus(docs: list[str], tokenizer, eos_id: Optional[int]) -> np.ndarray:
    """One token stream: each document's ids (BOS when the tokenizer adds one) followed by EOS."""
    backend = tokenizer.backend
    encs = backend.encode_batch(docs, add_special_tokens=False)
    parts = []
    bos = tokenizer.bos_token_id if tokenizer.add_bos_token else None
    for enc in encs:
        ids = enc.ids
        if not ids:
            continue
        if bos is not None:
            parts.append(np.array([bos], dtype=np.int32))
        parts.append(np.asarray(ids, dtype=np.int32))
        if eos_id is not None:
            parts.append(np.array([eos_id], dtype=np.int32))
    if not parts:
        raise TrainingError("dataset is empty after tokenization")
    return np.concatenate(parts)


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


def iter_batches(seqs: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for s in range(0, seqs.shape[0], batch_size):
        yield seqs[s:s + batch_size]
