"""A SentencePiece ``tokenizer.model`` (BPE or Unigram) as the backend of our Tokenizer, through the sentencepiece
library itself: the same encode / decode surface the ``tokenizers`` backend offers (the part Tokenizer uses).

Control pieces written in the text (``<s>``, ``</s>``) are recognised as those tokens, as Hugging Face's
SentencePiece tokenizers do; user-defined pieces are matched by sentencepiece itself.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import sentencepiece

from ..errors import CheckpointError

MODEL_FILE = "tokenizer.model"


@dataclass
class Encoding:
    ids: list[int]


class SentencePieceBackend:
    def __init__(self, model_proto: bytes, source: str = MODEL_FILE):
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{source}: not a valid SentencePiece model ({str(e).splitlines()[0]})") from None
        self.model_proto = model_proto
        n = self.sp.get_piece_size()
        self.control = {i for i in range(n) if self.sp.is_control(i)}
        specials = sorted((self.sp.id_to_piece(i) for i in self.control), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceBackend":
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        if self._split is None:
            return Encoding(self.sp.encode(text))
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # a control piece
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return Encoding(ids)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[Encoding]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.control]
        return self.sp.decode(ids)

    def token_to_id(self, token: str):
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int):
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.sp.get_piece_size()

    def save(self, out_dir: str) -> None:
        with open(os.path.join(out_dir, MODEL_FILE), "wb") as f:
            f.write(self.model_proto)
