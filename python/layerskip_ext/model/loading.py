"""Build a ready-to-run model (and its tokenizer) from any supported checkpoint."""
from __future__ import annotations

from typing import Optional

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
               progress: bool = False, draft_vocab: Optional[str] = "auto", hugepages: bool = True):
    """-> (LlamaForCausalLM in eval mode, Tokenizer or None).

    backend: "native" (the layerskip kernels), "reference" (plain PyTorch), or "auto" (native when built).
    draft_vocab: "auto" (the draft vocabulary stored with the model, if any: model/draft_vocab.py), a file path,
    or None / "none". It becomes ``model.draft_vocab`` (ascending int64 ids, or None), which self-speculative
    greedy drafting scores instead of the whole vocabulary.
    hugepages: on CPU, move the weights onto 2 MB pages (model/fused.py); decode streams every weight once per
    token, and fewer TLB misses measured fp32 decode 55 -> 68 tokens/s on SmolLM2-135M.
    """
    from .. import ops
    from ..io import load_checkpoint
    from .draft_vocab import load_draft_vocab, stored_draft_vocab_path

    dtype = parse_dtype(dtype)
    if backend not in ("auto", "native", "reference"):
        raise LayerSkipError(f"unknown backend {backend!r}; choose auto, native or reference")
    ckpt = load_checkpoint(path_or_name, dtype=dtype, progress=progress)
    model = LlamaForCausalLM.from_state_dict(ckpt.config, ckpt.state_dict, dtype=dtype)
    if hugepages and model.device.type == "cpu":
        from .fused import move_weights_to_hugepages
        move_weights_to_hugepages(model)  # before FusedLayers collects references to the weights
    if backend == "native" or (backend == "auto" and ops.native_available()):
        model.use_native_ops(True)
    model.source = ckpt.source
    if draft_vocab == "auto":
        draft_vocab = stored_draft_vocab_path(path_or_name)
    if draft_vocab is not None and str(draft_vocab).lower() != "none":
        model.draft_vocab = load_draft_vocab(str(draft_vocab), model.config.vocab_size).to(model.device)
    return model, ckpt.tokenizer
