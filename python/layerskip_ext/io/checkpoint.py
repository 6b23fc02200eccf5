"""`Checkpoint`, `load_checkpoint` (format dispatch) and state-dict validation shared by all formats."""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch

from ..config import LlamaConfig
from ..errors import CheckpointError
from .tokenizer import Tokenizer

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass
class Checkpoint:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Optional[Tokenizer]
    source: str


def check_dtype(dtype) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype}: use torch.float32 or torch.bfloat16")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and shapes for ``config`` (lm_head only when untied)."""
    h, v, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def finalize_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig, dtype: Optional[torch.dtype],
                        source: str) -> dict[str, torch.Tensor]:
    """Check names and shapes against ``config``; convert to ``dtype`` (None: keep), contiguous, in order."""
    shapes = expected_shapes(config)
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        raise CheckpointError(f"{source}: missing tensor lm_head.weight (and tie_word_embeddings is false)")
    for name, shape in shapes.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor {name}")
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(got)}, expected {list(shape)} "
                                  f"from the config")
        if not state[name].is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has non-float dtype {state[name].dtype}")
    extra = sorted(set(state) - set(shapes) - {"lm_head.weight"})
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        warnings.warn(f"{source}: ignoring unexpected tensors {', '.join(extra[:5])}{more}", stacklevel=3)
    out = {}
    for name in shapes:
        t = state[name]
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def sniff_format(path: str) -> str:
    """'hf' for a folder, 'gguf' for a GGUF file; CheckpointError otherwise."""
    if os.path.isdir(path):
        return "hf"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if magic == GGUF_MAGIC:
        return "gguf"
    if path.lower().endswith(".gguf"):
        raise CheckpointError(f"{path} is not a GGUF file (bad magic {magic!r})")
    raise CheckpointError(f"{path}: unrecognised checkpoint (expected a Hugging Face model folder "
                          f"or a .gguf file)")
