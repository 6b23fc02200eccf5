"""Build a ready-to-run model (and its tokenizer) from any supported checkpoint."""
from __future__ import annotations

import torch

from ..errors import LayerSkipError
from .llama import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name)
    if name not in DTYPES:
        raise LayerSkipError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(path_or_name: str, dtype: str | torch.dtype = "float32", backend: str = "auto",
               progress: bool = False):
    """-> (LlamaForCausalLM in eval mode, Tokenizer or None).

    backend: "native" (the layerskip kernels), "reference" (plain PyTorch), or "auto" (native when built).
    """
    from .. import ops
    from ..io import load_checkpoint

    dtype = parse_dtype(dtype)
    if backend not in ("auto", "native", "reference"):
        raise LayerSkipError(f"unknown backend {backend!r}; choose auto, native or reference")
    ckpt = load_checkpoint(path_or_name, dtype=dtype, progress=progress)
    model = LlamaForCausalLM.from_state_dict(ckpt.config, ckpt.state_dict, dtype=dtype)
    if backend == "native" or (backend == "auto" and ops.native_available()):
        model.use_native_ops(True)
    model.source = ckpt.source
    return model, ckpt.tokenizer
