"""Text and code corpora: read the documents of a folder, JSONL or text file, and tokenize them into one stream.
(A leaf module: training, the draft vocabulary and analysis all read corpora.)"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from .errors import TrainingError

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


