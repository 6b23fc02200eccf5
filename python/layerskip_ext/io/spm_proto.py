"""Minimal reader for SentencePiece ``tokenizer.model`` files (protobuf ModelProto), without protobuf.

Only the fields needed to rebuild the tokenizer are read: the pieces (text, score, type), the trainer's
model type and byte_fallback flag, and the normaliser's add_dummy_prefix / remove_extra_whitespaces flags.
"""
from __future__ import annotations

import dataclasses
import struct

from ..errors import CheckpointError

# sentencepiece_model.proto enums
SPM_UNIGRAM, SPM_BPE, SPM_WORD, SPM_CHAR = 1, 2, 3, 4
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6


@dataclasses.dataclass
class SpmModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = SPM_UNIGRAM
    byte_fallback: bool = False
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    precompiled_charsmap: bytes = b""


class _Corrupt(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Corrupt("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yields (field_number, wire_type, value) for one message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _Corrupt("truncated fixed64")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise _Corrupt("truncated length-delimited field")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _Corrupt("truncated fixed32")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise _Corrupt(f"unsupported wire type {wire}")
        yield field, wire, value


def parse_spm_model(data: bytes, source: str = "tokenizer.model") -> SpmModel:
    model = SpmModel(pieces=[], scores=[], types=[])
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:
                piece, score, ptype = "", 0.0, PIECE_NORMAL
                for f2, w2, v2 in _fields(value):
                    if f2 == 1 and w2 == 2:
                        piece = v2.decode("utf-8")
                    elif f2 == 2 and w2 == 5:
                        score = struct.unpack("<f", v2)[0]
                    elif f2 == 3 and w2 == 0:
                        ptype = v2
                model.pieces.append(piece)
                model.scores.append(score)
                model.types.append(ptype)
            elif field == 2 and wire == 2:  # TrainerSpec
                for f2, w2, v2 in _fields(value):
                    if f2 == 3 and w2 == 0:
                        model.model_type = v2
                    elif f2 == 35 and w2 == 0:
                        model.byte_fallback = bool(v2)
            elif field == 3 and wire == 2:  # NormalizerSpec
                for f2, w2, v2 in _fields(value):
                    if f2 == 2 and w2 == 2:
                        model.precompiled_charsmap = bytes(v2)
                    elif f2 == 3 and w2 == 0:
                        model.add_dummy_prefix = bool(v2)
                    elif f2 == 4 and w2 == 0:
                        model.remove_extra_whitespaces = bool(v2)
    except (_Corrupt, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt SentencePiece model {source}: {e}") from None
    if not model.pieces:
        raise CheckpointError(f"corrupt SentencePiece model {source}: no vocabulary pieces")
    return model
