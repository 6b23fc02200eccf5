"""GGUF (llama.cpp) checkpoints: llama architecture, F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, dequantised.

llama.cpp's converter permutes the rows of the q and k projections (for its RoPE layout); the loader undoes
that so the returned state dict is in Hugging Face layout.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tqdm import tqdm

from ..config import LlamaConfig
from ..errors import CheckpointError
from .checkpoint import Checkpoint, check_dtype, dtype_name, finalize_state_dict
from .tokenizer import Tokenizer
from .vocab_build import build_byte_level_bpe, build_spm_bpe

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_IGNORED = {"rope_freqs.weight"}  # read for the rope scaling config, not a model weight


def gguf_to_hf_name(name: str) -> Optional[str]:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    for g, h in _GLOBAL_NAMES.items():
        if name == h:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        for g, h in _BLOCK_NAMES.items():
            if m.group(2) == h:
                return f"blk.{m.group(1)}.{g}"
    raise KeyError(name)


def permute_qk(w, n_head: int):
    """llama.cpp convert_hf_to_gguf.py's q/k row permutation (HF layout -> GGUF layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """Inverse of `permute_qk` (GGUF layout -> HF layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open_reader(path: str):
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # ValueError, IndexError, struct errors, unknown enum values, mmap errors...
        raise CheckpointError(f"corrupt or truncated GGUF file {path}: {_first_line(e)}") from None


def _fields(reader, path: str) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CheckpointError(f"corrupt GGUF metadata {key!r} in {path}: {_first_line(e)}") from None
    return out


def _f32(x) -> float:
    """GGUF float32 metadata as the short decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> Optional[dict]:
    """Recover HF llama3 rope_scaling from llama.cpp's rope_freqs tensor (per-frequency divisors)."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if factors.shape[0] != inv_freq.shape[0]:
        return "bad"
    factor = float(factors.max())
    wavelen = 2 * math.pi / inv_freq
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 2.0, 8.0, 1.0):
                if high <= low:
                    continue
                lo_w, hi_w = old_ctx / low, old_ctx / high
                smooth = (old_ctx / wavelen - low) / (high - low)
                expect = np.where(wavelen < hi_w, 1.0,
                                  np.where(wavelen > lo_w, factor, 1.0 / ((1 - smooth) / factor + smooth)))
                if np.allclose(expect, factors, rtol=1e-4, atol=1e-5):
                    return {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    return "bad"


def _config_from_metadata(meta: dict, tensors: dict, path: str, dtype: torch.dtype) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"unknown architecture {arch!r} in {path} (supported: llama)")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
               if get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: GGUF metadata lacks llama.{', llama.'.join(missing)}")
    ff = get("feed_forward_length")
    if isinstance(ff, (list, tuple)):  # per-layer lengths; Llama uses one value
        if len(set(ff)) != 1:
            raise CheckpointError(f"{path}: per-layer feed_forward_length is not supported")
        ff = ff[0]
    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // max(n_head, 1)
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != int(head_dim):
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count={rot}, "
                              f"head_dim={head_dim}) are not supported")
    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        embd = tensors.get("token_embd.weight")
        vocab = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else len(tokens or [])
    theta = _f32(get("rope.freq_base", 10000.0))
    rope_scaling = None
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported rope scaling type {kind!r} (supported: llama3 via rope_freqs)")
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        if t.tensor_type.name != "F32":
            raise CheckpointError(f"{path}: tensor rope_freqs.weight has unsupported type {t.tensor_type.name}")
        rope_scaling = _llama3_scaling_from_factors(np.array(t.data), theta, int(head_dim))
        if rope_scaling == "bad":
            raise CheckpointError(f"{path}: tensor rope_freqs.weight does not match Llama 3 rope scaling")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    try:
        return LlamaConfig(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(ff),
            num_hidden_layers=int(get("block_count")), num_attention_heads=n_head,
            num_key_value_heads=int(get("attention.head_count_kv", n_head)), head_dim=int(head_dim),
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
            rope_scaling=rope_scaling, max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
            torch_dtype=dtype_name(dtype))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid GGUF metadata ({_first_line(e)})") from None


def tokenizer_from_metadata(meta: dict, path: str = "GGUF") -> Optional[Tokenizer]:
    """The tokenizer described by GGUF ``tokenizer.*`` metadata, or None when there is none."""

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        return None
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    types = list(types) if types is not None else None
    if model == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise CheckpointError(f"{path}: BPE tokenizer without tokenizer.ggml.merges")
        backend = build_byte_level_bpe(list(tokens), list(merges), types, meta.get("tokenizer.ggml.pre"))
        default_add_bos = False
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError(f"{path}: SentencePiece tokenizer without tokenizer.ggml.scores")
        backend = build_spm_bpe(list(tokens), [float(s) for s in scores], types,
                                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                unk_id=meta.get("tokenizer.ggml.unknown_token_id"))
        default_add_bos = True
    else:
        raise CheckpointError(f"{path}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")

    def tid(key):
        v = meta.get(key)
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos = tid("tokenizer.ggml.bos_token_id")
    eos = tid("tokenizer.ggml.eos_token_id")
    eos_ids = [e for e in (eos, tid("tokenizer.ggml.eot_token_id"), tid("tokenizer.ggml.eom_token_id"))
               if e is not None]
    template = meta.get("tokenizer.chat_template")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_add_bos)
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos_ids,
                     chat_template=template if isinstance(template, str) else None,
                     add_bos_token=bool(add_bos), eos_token_id=eos)


def _dequantize(t, path: str) -> np.ndarray:
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {t.name} has unsupported type {kind} "
                              f"(supported: {', '.join(SUPPORTED_TYPES)})")
    try:
        if kind == "F32":
            out = np.array(t.data, dtype=np.float32)
        else:
            out = dequantize(np.asarray(t.data), t.tensor_type)  # plain ndarray: memmap slicing is slow
    except Exception as e:
        raise CheckpointError(f"{path}: cannot decode tensor {t.name} ({kind}): {_first_line(e)}") from None
    hf_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return out.reshape(hf_shape)


def load_gguf(path: str, dtype: torch.dtype = torch.float32, progress: bool = False) -> Checkpoint:
    check_dtype(dtype)
    reader = _open_reader(path)
    meta = _fields(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise CheckpointError(f"truncated GGUF file {path}: tensor {t.name} extends past the end of the file")
    config = _config_from_metadata(meta, tensors, path, dtype)
    source = f"GGUF {path}"

    state: dict[str, torch.Tensor] = {}
    items = list(tensors.values())
    if progress:
        items = tqdm(items, desc="dequantising", unit="tensor")
    for t in items:
        if t.name in _IGNORED:
            continue
        name = gguf_to_hf_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} for the llama architecture")
        w = _dequantize(t, path)
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            n = config.num_attention_heads if name.endswith("q_proj.weight") else config.num_key_value_heads
            expected_rows = n * config.head_dim
            if w.ndim != 2 or w.shape[0] != expected_rows:
                raise CheckpointError(f"{source}: tensor {name} has shape {list(w.shape)}, expected "
                                      f"[{expected_rows}, {config.hidden_size}] from the config")
            w = unpermute_qk(w, n)
        state[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    state = finalize_state_dict(state, config, dtype, source)
    tokenizer = tokenizer_from_metadata(meta, path)
    counts: dict[str, int] = {}
    for t in tensors.values():
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    main = max(counts, key=counts.get) if counts else "F32"
    note = "dequantised" if main not in ("F32",) else "exact"
    return Checkpoint(config=config, state_dict=state, tokenizer=tokenizer,
                      source=f"{source} ({main}, {note}, {dtype_name(dtype)})")
