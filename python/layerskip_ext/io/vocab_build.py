"""Build `tokenizers.Tokenizer` objects from raw vocabularies (GGUF metadata, SentencePiece models).

* byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"``): tokens + merges, pre-tokenizer chosen from
  ``tokenizer.ggml.pre`` to match llama.cpp's llama-vocab.cpp regexes.
* SentencePiece BPE (GGUF ``"llama"`` or ``tokenizer.model``): tokens + scores; merges are derived from the
  scores (a pair merges with the priority of the merged piece's score), byte fallback via ``<0xXX>`` pieces,
  ``▁`` as the space marker, a dummy prefix on each raw-text segment (llama.cpp / HF legacy behaviour).
"""
from __future__ import annotations

import warnings

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp pre-tokenizer families (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*), keyed by tokenizer.ggml.pre
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}
# "\p{N}" (each digit on its own) followed by the GPT-2 regex
_DIGITS_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"}
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_pre_tokenizer(pre: str | None):
    """The `tokenizers` pre-tokenizer equivalent to llama.cpp's handling of ``tokenizer.ggml.pre``."""
    pre = (pre or "default").lower()
    if pre in _DIGITS_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _GPT2_PRE:
        warnings.warn(f"GGUF tokenizer pre-type {pre!r} is not known to layerskip_ext; using the GPT-2 "
                      f"pre-tokenizer, so tokenization may differ slightly from llama.cpp", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # duplicate strings (rare padding entries) keep their first id
    return vocab


def _add_special(tok: HFTokenizer, tokens: list[str], types: list[int] | None,
                 special_types=(TOKEN_CONTROL,), plain_types=(TOKEN_USER_DEFINED,)) -> None:
    if not types:
        return
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in special_types]
    plain = [AddedToken(tokens[i], special=False, normalized=False)
             for i, t in enumerate(types) if t in plain_types]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


def build_byte_level_bpe(tokens: list[str], merges: list[str], types: list[int] | None = None,
                         pre: str | None = None) -> HFTokenizer:
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"malformed BPE merge {m!r} in tokenizer vocabulary")
        pairs.append((parts[0], parts[1]))
    ignore_merges = (pre or "").lower() in _LLAMA3_PRE
    try:
        model = models.BPE(_vocab_dict(tokens), pairs, fuse_unk=False, byte_fallback=False,
                           ignore_merges=ignore_merges)
    except Exception as e:  # merges naming tokens absent from the vocabulary
        raise CheckpointError(f"inconsistent BPE vocabulary/merges: {e}") from None
    tok = HFTokenizer(model)
    tok.pre_tokenizer = byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    _add_special(tok, tokens, types)
    return tok


def spm_merges(tokens: list[str], scores: list[float], types: list[int] | None) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE / llama.cpp SPM tokenization by piece score."""
    normal = {}
    for i, t in enumerate(tokens):
        if types is None or types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED):
            normal.setdefault(t, i)
    found = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                found.append((-scores[pid], pid, normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_spm_bpe(tokens: list[str], scores: list[float], types: list[int] | None = None,
                  add_space_prefix: bool = True, unk_id: int | None = None,
                  byte_fallback: bool | None = None) -> HFTokenizer:
    if len(scores) != len(tokens):
        raise CheckpointError(f"SentencePiece vocabulary has {len(tokens)} tokens but {len(scores)} scores")
    if byte_fallback is None:
        byte_fallback = bool(types) and TOKEN_BYTE in types
    if unk_id is None and types:
        unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(_vocab_dict(tokens), spm_merges(tokens, scores, types), unk_token=unk,
                       fuse_unk=True, byte_fallback=byte_fallback)
    tok = HFTokenizer(model)
    # As llama.cpp (and HF's legacy Llama tokenizer): spaces become "▁" and, with add_space_prefix, every
    # raw-text segment (the start, and text after a special token) gets a leading "▁".
    steps_n = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        steps_n.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps_n)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    _add_special(tok, tokens, types, special_types=(TOKEN_CONTROL, TOKEN_UNKNOWN))
    return tok
