"""Write a model's tuned self-speculation setting: the ``layerskip`` block that ``--strategy auto`` reads.

An adapter keeps it in adapter_config.json (merged into model.config at load), a Hugging Face folder in
config.json. A GGUF file has no place for it (we do not rewrite GGUF metadata).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import LayerSkipError
from .adapter import ADAPTER_CONFIG, is_adapter_folder
from .packaged import resolve_model_path


def layerskip_config_path(model: str) -> str:
    """The JSON file holding ``model``'s layerskip block (model: a path or a packaged name)."""

    path = resolve_model_path(model)
    if is_adapter_folder(path):
        return os.path.join(path, ADAPTER_CONFIG)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return os.path.join(path, "config.json")
    raise LayerSkipError(f"cannot store a default setting for {model!r}: only adapter folders and Hugging Face "
                         f"folders have a config to write it in (not a GGUF file)")


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise LayerSkipError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise LayerSkipError(f"{path} does not hold a JSON object")
    return cfg


def write_layerskip_block(model: str, exit_layer: int, num_speculations: int,
                          extra: Optional[dict] = None) -> str:
    """Set {"exit_layer": E, "num_speculations": d, **extra} as the layerskip block (the greedy setting); other
    keys are kept, and so is the block's sampling setting (a measurement of its own: write_sampling_setting).
    Written to a temporary file and renamed, so an interrupted write never leaves a broken config."""
    if exit_layer < 1 or num_speculations < 1:
        raise LayerSkipError(f"invalid setting E={exit_layer}, d={num_speculations}")
    path = layerskip_config_path(model)
    cfg = _read_config(path)
    old = cfg.get("layerskip") if isinstance(cfg.get("layerskip"), dict) else {}
    block = {"exit_layer": int(exit_layer), "num_speculations": int(num_speculations)}
    if "sampling" in old:
        block["sampling"] = old["sampling"]
    block.update(extra or {})
    cfg["layerskip"] = block
    return _write_config(path, cfg)


def write_sampling_setting(model: str, exit_layer: int, num_speculations: int, extra: Optional[dict] = None) -> str:
    """Set the layerskip block's sampling setting (generation/defaults.tuned_block: what sampling decodes with by
    default) to {"exit_layer": E, "num_speculations": d, **extra}; the greedy setting is kept."""
    if exit_layer < 1 or num_speculations < 1:
        raise LayerSkipError(f"invalid setting E={exit_layer}, d={num_speculations}")
    path = layerskip_config_path(model)
    cfg = _read_config(path)
    block = cfg.get("layerskip") if isinstance(cfg.get("layerskip"), dict) else {}
    block["sampling"] = {"exit_layer": int(exit_layer), "num_speculations": int(num_speculations), **(extra or {})}
    cfg["layerskip"] = block
    return _write_config(path, cfg)


def _write_config(path: str, cfg: dict) -> str:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise LayerSkipError(f"cannot write {path}: {e.strerror or e}") from None
    return path
