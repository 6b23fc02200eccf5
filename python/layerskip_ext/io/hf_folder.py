"""Hugging Face model folders: config.json + safetensors (single or sharded; pytorch_model.bin as fallback)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..config import LlamaConfig
from ..errors import CheckpointError
from .checkpoint import Checkpoint, check_dtype, dtype_name, finalize_state_dict
from .tokenizer import Tokenizer

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({_first_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def read_config(folder: str) -> tuple[LlamaConfig, dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    raw = _read_json(path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{path}: unsupported hidden_act {act!r} (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported")
    try:
        config = LlamaConfig.from_hf_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid config ({_first_line(e)})") from None
    return config, raw


def _weight_files(folder: str) -> tuple[list[str], str]:
    """The weight files to read and their kind ('safetensors' or 'bin')."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"),
                             ("pytorch_model.bin.index.json", "bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            data = _read_json(index, index_name)
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{index}: no weight_map")
            files = []
            for shard in dict.fromkeys(wmap.values()):
                shard_path = os.path.join(folder, str(shard))
                if not os.path.isfile(shard_path):
                    raise CheckpointError(f"{index}: shard {shard} is missing from {folder}")
                files.append(shard_path)
            return files, kind
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single], "safetensors"
    shards = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
    if shards:
        return [os.path.join(folder, f) for f in shards], "safetensors"
    single = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return [single], "bin"
    raise CheckpointError(f"{folder}: no weights file (expected model.safetensors, sharded "
                          f"model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)")


def hf_name(key: str) -> Optional[str]:
    """Normalise a checkpoint key to the LlamaForCausalLM name, or None for buffers to ignore."""
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    for prefix in ("module.", "base_model.model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("model.model."):
        key = key[len("model."):]
    if key.startswith(("layers.", "embed_tokens.", "norm.")):
        key = "model." + key
    return key


def _iter_tensors(path: str, kind: str, dtype: torch.dtype):
    """Yields (hf_name, tensor) from one weight file, converting to ``dtype`` tensor by tensor."""
    if kind == "safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
                for key in keys:
                    name = hf_name(key)
                    if name is None:
                        continue
                    t = f.get_tensor(key)
                    yield name, (t.to(dtype) if t.is_floating_point() else t)
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError, OSError, RuntimeError on truncated data
            raise CheckpointError(f"corrupt or truncated safetensors file {path}: {_first_line(e)}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read PyTorch weights {path}: {_first_line(e)}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict")
        for key, t in sd.items():
            name = hf_name(key)
            if name is not None and isinstance(t, torch.Tensor):
                yield name, (t.to(dtype) if t.is_floating_point() else t)


def load_hf_folder(folder: str, dtype: torch.dtype = torch.float32, progress: bool = False) -> Checkpoint:
    check_dtype(dtype)
    config, raw_config = read_config(folder)
    files, kind = _weight_files(folder)
    source = f"HF folder {folder}"
    state: dict[str, torch.Tensor] = {}
    iterator = files
    if progress and len(files) > 1:
        iterator = tqdm(files, desc="loading shards", unit="file")
    for path in iterator:
        for name, t in _iter_tensors(path, kind, dtype):
            if name in state:
                raise CheckpointError(f"{source}: tensor {name} appears in more than one weight file")
            state[name] = t
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = finalize_state_dict(state, config, dtype, source)
    config = dataclasses.replace(config, torch_dtype=dtype_name(dtype))
    tokenizer = Tokenizer.from_hf_folder(folder, raw_config)
    shards = f", {len(files)} shards" if len(files) > 1 else ""
    return Checkpoint(config=config, state_dict=state, tokenizer=tokenizer,
                      source=f"{source} ({kind}{shards}, {dtype_name(dtype)})")


def save_hf_folder(out_dir, config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                   tokenizer: Optional[Tokenizer] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Write config.json, model.safetensors (no lm_head when tied) and, with a tokenizer, its files."""

    if dtype is not None:
        check_dtype(dtype)
    out_dir = os.fspath(out_dir)
    state = dict(state_dict)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = finalize_state_dict(state, config, dtype, f"state dict for {out_dir}")
    seen: set[int] = set()
    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    dtypes = {t.dtype for t in tensors.values()}
    saved_dtype = dtype_name(dtypes.pop()) if len(dtypes) == 1 else config.torch_dtype

    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, weights_path, metadata={"format": "pt"})
    # safetensors writes through a private temp file (mode 0600); give it the permissions of any new file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights_path, 0o666 & ~umask)
    cfg = dataclasses.replace(config, torch_dtype=saved_dtype).to_hf_dict()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer is not None:
        eos = sorted(tokenizer.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id] + [e for e in eos if e != tokenizer.eos_token_id]
        gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
        tokenizer.save(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
