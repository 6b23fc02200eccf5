"""load_checkpoint: any supported checkpoint (Hugging Face folder, GGUF file, LoRA adapter folder merged into its
base, packaged name) as a Checkpoint."""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..errors import CheckpointError
from .adapter import is_adapter_folder, merge_adapter_into_state_dict_, read_adapter, resolve_base
from .checkpoint import Checkpoint, check_dtype, sniff_format
from .gguf_file import load_gguf
from .hf_folder import load_hf_folder
from .packaged import resolve_model_path


def load_checkpoint(path_or_name: str, dtype: torch.dtype = torch.float32, progress: bool = False) -> Checkpoint:
    """Load a Llama checkpoint: a Hugging Face folder, a GGUF file, a LoRA adapter folder (merged into its base),
    or a packaged model name."""
    check_dtype(dtype)
    path = resolve_model_path(path_or_name)
    fmt = sniff_format(path)
    if fmt == "gguf":
        return load_gguf(path, dtype=dtype, progress=progress)
    if is_adapter_folder(path):
        return load_adapter_checkpoint(path, dtype=dtype, progress=progress)
    return load_hf_folder(path, dtype=dtype, progress=progress)


def load_adapter_checkpoint(folder: str, dtype: torch.dtype, progress: bool = False):
    """Base checkpoint (float32) + merged adapter, converted to ``dtype``: a plain ``Checkpoint``."""

    meta, tensors = read_adapter(folder)
    base = resolve_base(folder, str(meta["base_model"]))
    if is_adapter_folder(base):
        raise CheckpointError(f"{folder}: the base model of an adapter cannot itself be an adapter")
    ckpt = load_checkpoint(base, dtype=torch.float32, progress=progress)
    state = dict(ckpt.state_dict)
    expected_a = {k for k in tensors if k.endswith(".lora_a")}
    for k in expected_a:
        if tensors[k].shape[0] != meta["rank"]:
            raise CheckpointError(f"{folder}: {k} has rank {tensors[k].shape[0]}, the config says {meta['rank']}")
    if progress:
        print(f"merging LoRA adapter {folder} (rank {meta['rank']}, {len(expected_a)} layers) into {base}",
              file=sys.stderr)
    merge_adapter_into_state_dict_(state, tensors, float(meta["alpha"]) / meta["rank"])
    if dtype != torch.float32:
        state = {k: v.to(dtype) for k, v in state.items()}
    config = ckpt.config
    if meta.get("layerskip"):
        config = dataclasses.replace(config, layerskip=dict(meta["layerskip"]))
    return dataclasses.replace(ckpt, config=config, state_dict=state, source=f"{ckpt.source} + adapter {folder}")
