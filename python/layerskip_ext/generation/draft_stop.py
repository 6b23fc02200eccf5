"""Dynamic drafting's fitted stop: where a draft is unlikely to be accepted, stop drafting.

The exit head's own confidence says little about whether the full model will agree with a draft (on the
nano-layerskip model, layer 4's greedy token agrees with the last layer's on .80 of the tokens where its top
probability is under .05), so a stop on it drafts past rejections or stops before acceptances. Two features that
cost nothing at draft time say much more: the margin between the exit head's two largest logits, and whether the
draft continues an n-gram already in the context (code repeats itself: names, calls, indentation). A logistic model
over them,

    chance(draft) = sigmoid(w0 + w1 margin + w2 [match >= 1] + w3 [match >= 2] + w4 [match >= 3] + w5 [match >= 4])

(match: the longest k <= 4 such that the last k tokens followed by the draft occur earlier in the context;
ops.match_level), is fitted per model and exit layer on the model's own greedy outputs
(analysis/draft_stop_fit.py), and a round drafts while the product of its drafts' chances, the chance that the
whole run is accepted, stays >= draft_stop; a batch drafts while its rows' mean chance does, every row proposing
its drafts (csrc/draft.cpp computes it, ops.draft_greedy_reference is its twin).
Lossless by construction: only how many tokens are drafted changes; verification decides what is emitted.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..errors import GenerationError
from ..ops import STOP_MODEL_SIZE

FEATURES = ("bias", "margin", "match>=1", "match>=2", "match>=3", "match>=4")  # the weights' order


def as_stop_model(weights: Optional[Sequence[float]]) -> Optional[torch.Tensor]:
    """A stop model's weights -> the [6] float64 CPU tensor the draft op takes (None: none)."""
    if weights is None:
        return None
    values = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    if (not isinstance(values, (list, tuple)) or len(values) != STOP_MODEL_SIZE
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values)):
        raise GenerationError(f"draft_stop_model must be {STOP_MODEL_SIZE} finite numbers ({', '.join(FEATURES)}), "
                              f"got {weights!r}")
    return torch.tensor([float(x) for x in values], dtype=torch.float64)


def tuned_stop_model(model, exit_layer: Optional[int]) -> Optional[list[float]]:
    """The stop model stored with the model's tuned setting (config ``layerskip.draft_stop_model``), when
    exit_layer is the exit it was fitted at (``layerskip.exit_layer``)."""
    block = getattr(model.config, "layerskip", None) or {}
    weights = block.get("draft_stop_model")
    return list(weights) if weights is not None and exit_layer == block.get("exit_layer") else None
