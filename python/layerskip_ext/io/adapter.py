"""LoRA adapter folders: ``adapter_config.json`` + ``adapter.safetensors``, merged into their base model at load.

adapter_config.json::

    {"format": "layerskip-lora", "version": 1,
     "base_model": "smollm2-135m",          # packaged name, or a path relative to the folder / absolute
     "rank": 16, "alpha": 32.0, "targets": ["q_proj", ...],
     "layerskip": {"exit_layer": E, "num_speculations": d},   # optional: the tuned self-speculation setting
     "training": {...}}                                        # optional: how it was made (free-form)

A folder holding an ``adapter_config.json`` loads anywhere a checkpoint does (``load_checkpoint``, ``--model``).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "layerskip-lora"


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def save_adapter(folder: str, tensors: dict[str, torch.Tensor], *, base_model: str, rank: int, alpha: float,
                 targets, layerskip: Optional[dict] = None, training: Optional[dict] = None,
                 dtype: torch.dtype = torch.bfloat16) -> str:
    """Write the adapter (tensors stored as ``dtype``: bf16 halves the artefact; merge math is float32)."""

    os.makedirs(folder, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "base_model": base_model, "rank": int(rank), "alpha": float(alpha),
            "targets": list(targets)}
    if layerskip:
        meta["layerskip"] = layerskip
    if training:
        meta["training"] = training
    tmp = os.path.join(folder, ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sorted(tensors.items())}, tmp,
              metadata={"format": FORMAT})
    os.replace(tmp, os.path.join(folder, ADAPTER_WEIGHTS))
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return folder


def read_adapter(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (config dict, {name: float32 tensor}); CheckpointError on anything malformed."""

    cfg_path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable adapter config ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a {FORMAT} adapter (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    for key in ("base_model", "rank", "alpha"):
        if key not in meta:
            raise CheckpointError(f"{cfg_path}: missing {key!r}")
    if not isinstance(meta["rank"], int) or meta["rank"] < 1:
        raise CheckpointError(f"{cfg_path}: rank must be a positive integer, got {meta['rank']!r}")
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{folder}: adapter weights {ADAPTER_WEIGHTS} are missing")
    try:
        tensors = {k: v.float() for k, v in load_file(weights).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt adapter weights ({str(e).splitlines()[0]})") from None
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{weights}: tensor {k} has non-finite values")
    return meta, tensors


def resolve_base(folder: str, base: str) -> str:
    """A base given relative to the adapter folder is found there; packaged names and absolute paths as is."""
    local = os.path.join(folder, base)
    return local if not os.path.isabs(base) and os.path.exists(local) else base


def merge_adapter_into_state_dict_(state_dict: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                                   scaling: float) -> int:
    """Add ``scaling * B @ A`` to each adapted weight of an HF-named state dict (float32 math); -> count merged."""
    pairs = {}
    for k in tensors:
        if k.endswith(".lora_a") or k.endswith(".lora_b"):
            pairs.setdefault(k.rsplit(".", 1)[0], {})[k.rsplit(".", 1)[1]] = tensors[k]
        else:
            raise CheckpointError(f"adapter tensor {k!r} is neither a lora_a nor a lora_b")
    for base, ab in pairs.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise CheckpointError(f"adapter for {base} lacks {'lora_b' if 'lora_a' in ab else 'lora_a'}")
        key = f"{base}.weight"
        if key not in state_dict:
            raise CheckpointError(f"adapter targets {key}, which the base model does not have")
        w, a, b = state_dict[key], ab["lora_a"].float(), ab["lora_b"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"adapter for {key}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the "
                                  f"weight {tuple(w.shape)}")
        state_dict[key] = (w.float() + (b @ a) * scaling).to(w.dtype)
    return len(pairs)
