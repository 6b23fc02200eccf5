"""Which strategy and (exit layer, speculations) a model decodes with when the caller does not say."""
from __future__ import annotations

from typing import Optional

# Published LayerSkip checkpoints, matched by a case-insensitive substring of their path or name, with the
# setting their authors' README runs them with.
KNOWN_CHECKPOINTS = {
    "layerskip-llama2-7b": (8, 6),
}
DEFAULT_SPECULATIONS = 4


def tuned_block(model, greedy: bool = True) -> dict:
    """The tuned setting in the model's config for this kind of decoding: the ``layerskip`` block (greedy), or for
    sampling its ``sampling`` sub-block when it has one. Sampling's best setting differs: its acceptance is lower
    (accept min(1, p/q) against the full distribution) and a greedy draft stop does not apply to it, so a greedy
    d tuned with a stop (16 on nano-layerskip) drafts far past the rejections: 0.72x autoregressive there, against
    1.29x at d=2 (docs/reproduce.md, "Sampling")."""
    block = getattr(model.config, "layerskip", None) or {}
    if not greedy:
        sub = block.get("sampling")
        if isinstance(sub, dict) and "exit_layer" in sub:
            return sub
        if block.get("draft_stop") and "exit_layer" in block:  # no sampling setting: the greedy one, without its
            # stop, at a length that does not rely on one
            d = int(block.get("num_speculations", DEFAULT_SPECULATIONS))
            return {"exit_layer": block["exit_layer"], "num_speculations": min(d, DEFAULT_SPECULATIONS),
                    "draft_growth": block.get("draft_growth", 0)}
        return {k: v for k, v in block.items() if k not in ("draft_stop", "draft_stop_model")}
    return block


def default_speculation(model, source: str = "", greedy: bool = True) -> Optional[tuple[int, int]]:
    """(E, d) from the model's own config (tuned_block: the ``layerskip`` block, or its sampling setting), else
    from the table by the model's source (and `source`), else None."""
    block = tuned_block(model, greedy)
    if "exit_layer" in block:
        return int(block["exit_layer"]), int(block.get("num_speculations", DEFAULT_SPECULATIONS))
    name = f"{source} {getattr(model, 'source', '')}".lower()
    for key, setting in KNOWN_CHECKPOINTS.items():
        if key in name:
            return setting
    return None


def resolve_strategy(model, strategy: str, exit_layer: Optional[int], num_speculations: Optional[int],
                     draft_stop: Optional[float] = None, draft_growth: Optional[int] = None,
                     source: str = "", greedy: bool = True) -> tuple[str, Optional[int], Optional[int], float, int]:
    """-> (strategy, E, d, draft_stop, draft_growth): "auto" self-speculates with the model's tuned (E, d) (or when
    the caller gave an exit layer), unless the model's recorded speedup (``layerskip sweep --write-default``) is not
    above 1, and decodes autoregressively otherwise; self-speculation fills the E, d, draft_stop and draft_growth the
    caller left out from the tuned setting (the last two: 0 when it has none, or when the caller chose another E).
    greedy False: the tuned setting for sampling (tuned_block)."""
    tuned = default_speculation(model, source, greedy)
    block = tuned_block(model, greedy)
    if strategy == "auto":
        slower = isinstance(block.get("speedup"), (int, float)) and block["speedup"] <= 1.0
        strategy = "self_speculative" if (tuned and not slower) or exit_layer is not None else "autoregressive"
    if strategy == "self_speculative":
        if tuned:
            exit_layer = tuned[0] if exit_layer is None else exit_layer
            num_speculations = tuned[1] if num_speculations is None else num_speculations
        if num_speculations is None:
            num_speculations = DEFAULT_SPECULATIONS
        if tuned and exit_layer == tuned[0]:
            draft_stop = float(block.get("draft_stop", 0.0)) if draft_stop is None else draft_stop
            draft_growth = int(block.get("draft_growth", 0)) if draft_growth is None else draft_growth
    return (strategy, exit_layer, num_speculations, float(draft_stop or 0.0),
            draft_growth if draft_growth is not None else 0)
