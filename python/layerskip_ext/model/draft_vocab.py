"""Draft vocabulary: the tokens a self-speculative draft's exit head scores (a frequency-ranked subset).

A shallow draft (layers < E) pays for the whole LM head on every drafted token; on a small model the head is a
large share of that cost (SmolLM2-135M: the 49152 x 576 head weighs as much as ~8 of its 30 layers). Scoring only
the N most frequent tokens of a corpus cuts it by V / N. Losslessness is untouched: verification always uses the
full head, so a draft outside the subset is simply never proposed (the full model's token is emitted instead).

File format (``draft_vocab.json``, stored with the model, see :func:`stored_draft_vocab_path`)::

    {"format": "layerskip-draft-vocab", "version": 1, "vocab_size": 49152, "size": 8192,
     "token_ids": [...ascending...], "corpus": "...", "corpus_tokens": 123456, "coverage": 0.97,
     "always_included": [0, 1, 2]}

``token_ids`` are ascending (the head kernel then streams the chosen rows in memory order, and argmax ties go to
the lowest id, as over the full vocabulary). ``coverage`` is the share of the corpus's tokens inside the subset.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import numpy as np
import torch

from ..corpus import read_corpus, tokenize_corpus
from ..errors import LayerSkipError
from ..io import packaged
from ..io.packaged import PACKAGED_MODELS

FORMAT = "layerskip-draft-vocab"
FILE_NAME = "draft_vocab.json"
# Draft vocabularies shipped with this package for packaged model names (layerskip_ext/models/<name>/).
PACKAGE_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


class DraftVocabError(LayerSkipError):
    pass


def count_tokens(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """[vocab_size] int64 occurrence counts of the ids in a token stream."""
    stream = np.asarray(stream).astype(np.int64, copy=False)
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise DraftVocabError(f"token ids outside [0, {vocab_size}) in the corpus stream (wrong tokenizer?)")
    return np.bincount(stream, minlength=vocab_size).astype(np.int64)


def select_draft_vocab(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` ids to keep: every id of ``always`` (special / EOS tokens: a draft must be able to propose
    the end of a sequence), then the most frequent others (ties: lower id first). -> ascending int64 [size]."""
    vocab_size = len(counts)
    if not isinstance(size, int) or not 1 <= size <= vocab_size:
        raise DraftVocabError(f"draft vocabulary size must be an integer in [1, {vocab_size}], got {size!r}")
    forced = sorted({int(t) for t in always if 0 <= int(t) < vocab_size})
    if len(forced) > size:
        raise DraftVocabError(f"size {size} is smaller than the {len(forced)} special tokens it must include")
    order = np.lexsort((np.arange(vocab_size), -np.asarray(counts, dtype=np.int64)))  # by count desc, then id
    chosen = set(forced)
    for t in order:
        if len(chosen) >= size:
            break
        chosen.add(int(t))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def special_token_ids(tokenizer, config=None) -> list[int]:
    """EOS / BOS ids of the model and tokenizer, and the tokenizer's added special tokens."""
    ids: set[int] = set()
    if config is not None:
        ids.update(int(t) for t in getattr(config, "eos_token_ids", []) or [])
        if getattr(config, "bos_token_id", None) is not None:
            ids.add(int(config.bos_token_id))
    if tokenizer is not None:
        ids.update(int(t) for t in tokenizer.eos_token_ids)
        if tokenizer.bos_token_id is not None:
            ids.add(int(tokenizer.bos_token_id))
        backend = getattr(tokenizer, "backend", None)
        decoder = getattr(backend, "get_added_tokens_decoder", None)
        if decoder is not None:
            ids.update(int(i) for i, tok in decoder().items() if getattr(tok, "special", False))
    return sorted(ids)


def build_draft_vocab(corpus: str, tokenizer, config, size: int, text_field: str = "text",
                      max_bytes: Optional[int] = None, exclude: Optional[list[str]] = None
                      ) -> tuple[torch.Tensor, dict]:
    """Count the tokenizer's ids over a corpus (a folder, JSONL or text file) and pick the draft vocabulary.
    exclude: paths inside a folder corpus to leave out. -> (ascending ids, metadata for :func:`save_draft_vocab`)."""

    kw = dict(exclude=exclude) if exclude else {}
    docs = read_corpus(corpus, text_field=text_field, max_bytes=max_bytes, **kw)
    eos = config.eos_token_ids[0] if getattr(config, "eos_token_ids", None) else tokenizer.eos_token_id
    stream = tokenize_corpus(docs, tokenizer, eos)
    counts = count_tokens(stream, config.vocab_size)
    always = special_token_ids(tokenizer, config)
    ids = select_draft_vocab(counts, size, always)
    coverage = float(counts[ids.numpy()].sum()) / max(int(counts.sum()), 1)
    meta = dict(corpus=os.path.abspath(os.path.expanduser(corpus)), excluded=list(exclude or []),
                corpus_documents=len(docs),
                corpus_tokens=int(counts.sum()), coverage=round(coverage, 6), always_included=always)
    return ids, meta


def save_draft_vocab(path: str, ids: torch.Tensor, vocab_size: int, **meta) -> str:
    ids = check_draft_vocab(ids, vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"format": FORMAT, "version": 1, "vocab_size": int(vocab_size), "size": int(ids.numel()), **meta,
           "token_ids": ids.tolist()}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_draft_vocab(path: str, vocab_size: Optional[int] = None) -> torch.Tensor:
    """-> ascending int64 ids; DraftVocabError when the file is malformed or built for another vocabulary."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise DraftVocabError(f"cannot read draft vocabulary {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DraftVocabError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("token_ids"), list):
        raise DraftVocabError(f"{path}: not a draft vocabulary file (format {FORMAT!r} with token_ids)")
    if vocab_size is not None and int(doc.get("vocab_size", vocab_size)) != vocab_size:
        raise DraftVocabError(f"{path}: built for a vocabulary of {doc.get('vocab_size')} tokens, the model has "
                              f"{vocab_size}")
    try:
        ids = torch.tensor(doc["token_ids"], dtype=torch.int64)
    except (TypeError, ValueError, OverflowError):
        raise DraftVocabError(f"{path}: token_ids must be a list of integers") from None
    return check_draft_vocab(ids, vocab_size or int(doc.get("vocab_size", 0)) or None, where=path)


def check_draft_vocab(ids, vocab_size: Optional[int], where: str = "draft vocabulary") -> torch.Tensor:
    """Validate and normalise: 1-D, non-empty, unique ids in [0, vocab_size). -> ascending int64 CPU tensor."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.tensor(list(ids), dtype=torch.int64)
        except (TypeError, ValueError, OverflowError):
            raise DraftVocabError(f"{where}: expected a sequence of token ids") from None
    if ids.dim() != 1 or ids.numel() == 0:
        raise DraftVocabError(f"{where}: expected a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DraftVocabError(f"{where}: token ids must be integers, got {ids.dtype}")
    ids = ids.detach().to("cpu", torch.int64)
    if int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size):
        raise DraftVocabError(f"{where}: token ids must be in [0, {vocab_size}), got [{int(ids.min())}, "
                              f"{int(ids.max())}]")
    ids = torch.unique(ids)  # sorted ascending, duplicates dropped
    return ids.contiguous()


# ------------------------------------------------------------------------------------------------------------------
# Where a model's draft vocabulary is stored
# ------------------------------------------------------------------------------------------------------------------

def default_draft_vocab_path(path_or_name: str) -> str:
    """Where ``layerskip draft-vocab`` writes by default and load_model looks first:
    a folder model (HF or adapter): ``<folder>/draft_vocab.json``; a packaged model name: the package's own
    ``layerskip_ext/models/<name>/draft_vocab.json`` (the model file lives in another pip package, which we leave
    alone); a file (GGUF): ``<file without extension>.draft_vocab.json`` beside it."""

    raw = os.fspath(path_or_name)
    path = os.path.expanduser(raw)
    if not os.path.exists(path) and raw.lower() in PACKAGED_MODELS:
        return os.path.join(PACKAGE_MODELS_DIR, raw.lower(), FILE_NAME)
    if not os.path.exists(path) and raw.lower() in packaged.PACKAGED_FOLDERS:
        return os.path.join(PACKAGE_MODELS_DIR, packaged.PACKAGED_FOLDERS[raw.lower()], FILE_NAME)
    if os.path.isdir(path):
        return os.path.join(path, FILE_NAME)
    return os.path.splitext(path)[0] + "." + FILE_NAME


def stored_draft_vocab_path(path_or_name: str) -> Optional[str]:
    """The draft vocabulary stored with a model, or None: :func:`default_draft_vocab_path`, else (for a LoRA
    adapter folder, which keeps its base's tokenizer) its base model's."""

    first = default_draft_vocab_path(path_or_name)
    if os.path.isfile(first):
        return first
    raw = os.fspath(path_or_name)
    adapters = getattr(packaged, "PACKAGED_ADAPTERS", {})
    if not os.path.exists(os.path.expanduser(raw)) and raw.lower() not in adapters:
        return None
    try:
        folder = packaged.resolve_model_path(raw)
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            base = str(json.load(f)["base_model"])  # packaged name, or a path relative to the folder / absolute
    except (LayerSkipError, OSError, ValueError, KeyError, TypeError):
        return None  # not an adapter folder (or an unreadable one: loading it reports that)
    local = os.path.join(folder, base)
    if not os.path.isabs(base) and os.path.exists(local):
        base = local
    candidate = default_draft_vocab_path(base)
    return candidate if os.path.isfile(candidate) else None
