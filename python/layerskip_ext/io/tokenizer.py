"""The tokenizer wrapper used everywhere in layerskip_ext.

Backed by a `tokenizers.Tokenizer` (from tokenizer.json or GGUF vocabulary metadata) or by the sentencepiece
library (a tokenizer.model, BPE or Unigram: io/spm_backend.py). BOS is handled here, not by the backend's
post-processor, so ``encode(add_bos=...)`` means the same thing for every source.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from ..errors import CheckpointError, GenerationError
from .chat_template import render_chat_template
from .spm_backend import MODEL_FILE, SentencePieceBackend


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json special tokens are strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return [int(value)] if isinstance(value, int) else []


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the newly printable text.

    Text is produced by decoding a short window of ids with one token of left context and emitting only the
    part that extends the context's decoding, so SentencePiece's leading-space handling and byte-level
    merging are exact. A piece whose decoding ends in an incomplete UTF-8 sequence (U+FFFD) is held back
    until more ids arrive or ``flush()`` is called.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0    # ids before this have been emitted

    def _decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]


class Tokenizer:
    """Tokenizer with model defaults (BOS/EOS ids, add_bos default, chat template)."""

    def __init__(self, backend: "HFTokenizer | SentencePieceBackend", bos_token_id: Optional[int] = None,
                 eos_token_ids: Iterable[int] = (), chat_template: Optional[str] = None,
                 add_bos_token: bool = False, eos_token_id: Optional[int] = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        eos = [int(e) for e in eos_token_ids]
        if eos_token_id is not None and eos_token_id not in eos:
            eos.insert(0, int(eos_token_id))
        self.eos_token_id: Optional[int] = eos_token_id if eos_token_id is not None else (eos[0] if eos else None)
        self.eos_token_ids: set[int] = set(eos)
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None

    # ---- basic properties -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> Optional[str]:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> Optional[str]:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={sorted(self.eos_token_ids)}, add_bos={self.add_bos_token}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    # ---- encode / decode --------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (e.g. ``<|im_start|>``) are recognised.

        ``add_bos=None`` uses the model's default. BOS is not doubled when the text already starts with it.
        """
        if not isinstance(text, str):
            raise GenerationError(f"text to encode must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise GenerationError("this model's tokenizer has no chat template")
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        variables.update(kwargs)
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **variables)

    # ---- persistence ------------------------------------------------------------------------------------
    def _backend_for_save(self) -> HFTokenizer:
        """A copy of the backend whose post-processor adds BOS exactly when ``add_bos_token`` says so."""
        tok = HFTokenizer.from_str(self.backend.to_str())
        if self.add_bos_token:
            bos = self.bos_token
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, self.bos_token_id)])
        else:
            probe = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            if probe != plain:
                tok.post_processor = None
        return tok

    def save(self, out_dir) -> None:
        """Write tokenizer.json (or the SentencePiece tokenizer.model) and tokenizer_config.json (loadable by this
        class and by transformers)."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        if isinstance(self.backend, SentencePieceBackend):
            self.backend.save(out_dir)
        else:
            self._backend_for_save().save(os.path.join(out_dir, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "eos_token_ids": sorted(self.eos_token_ids),
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")

    @classmethod
    def from_hf_folder(cls, folder: str, model_config: Optional[dict] = None) -> Optional["Tokenizer"]:
        """Tokenizer from a Hugging Face folder, or None when it has neither tokenizer.json nor tokenizer.model.

        ``model_config`` is the parsed config.json (for bos/eos ids); generation_config.json is read too.
        """
        tj = os.path.join(folder, "tokenizer.json")
        sp = os.path.join(folder, MODEL_FILE)
        if os.path.isfile(tj):
            try:
                backend = HFTokenizer.from_file(tj)
            except Exception as e:
                raise CheckpointError(f"cannot read {tj}: {str(e).splitlines()[0] if str(e) else e}") from None
        elif os.path.isfile(sp):
            backend = SentencePieceBackend.from_file(sp)
        else:
            return None

        tc_path = os.path.join(folder, "tokenizer_config.json")
        tc = _read_json(tc_path) if os.path.isfile(tc_path) else {}
        if not isinstance(tc, dict):
            raise CheckpointError(f"{tc_path}: expected a JSON object")
        gc_path = os.path.join(folder, "generation_config.json")
        gc = _read_json(gc_path) if os.path.isfile(gc_path) else {}
        gc = gc if isinstance(gc, dict) else {}
        mc = model_config or {}

        def tid(value):
            content = _token_content(value)
            return backend.token_to_id(content) if content is not None else None

        bos = tid(tc.get("bos_token"))
        if bos is None:
            ids = _as_id_list(gc.get("bos_token_id")) or _as_id_list(mc.get("bos_token_id"))
            bos = ids[0] if ids else None
        primary_eos = tid(tc.get("eos_token"))
        eos = ([primary_eos] if primary_eos is not None else []) + _as_id_list(tc.get("eos_token_ids")) \
            + _as_id_list(gc.get("eos_token_id")) + _as_id_list(mc.get("eos_token_id"))
        if primary_eos is None and eos:
            primary_eos = eos[0]

        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if not isinstance(template, str):
            template = None

        add_bos = tc.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # no explicit setting: whatever the backend's post-processor does
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, chat_template=template,
                   add_bos_token=add_bos, eos_token_id=primary_eos)
