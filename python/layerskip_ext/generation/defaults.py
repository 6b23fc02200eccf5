"""Which (exit layer, speculations) a model self-speculates with when the caller does not say."""
from __future__ import annotations

from typing import Optional

# Published LayerSkip checkpoints, matched by a case-insensitive substring of their path or name, with the
# setting their authors' README runs them with.
KNOWN_CHECKPOINTS = {
    "layerskip-llama2-7b": (8, 6),
}


def default_speculation(model, source: str = "") -> Optional[tuple[int, int]]:
    """(E, d) from the model's own config (``layerskip`` block), else from the table, else None."""
    block = getattr(model.config, "layerskip", None) or {}
    if "exit_layer" in block:
        return int(block["exit_layer"]), int(block.get("num_speculations", 4))
    name = source.lower()
    for key, setting in KNOWN_CHECKPOINTS.items():
        if key in name:
            return setting
    return None
