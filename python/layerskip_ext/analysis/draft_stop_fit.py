"""Fit dynamic drafting's stop model (generation/draft_stop.py) to a model's own greedy outputs.

Greedy self-speculation along the model's greedy output is fixed by which exits agree with the last layer at each
token, so the stop model's training data is one teacher-forced pass per prompt: at each output token j >= 1 (token
0 comes from the prefill), the exit head's features where a draft after an accepted prefix would propose it, and
whether the exit's token is the full model's. Fit by logistic regression (L-BFGS, a small L2 on the weights but the
bias). Fit on prompts other than those the setting is then measured on.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..generation.draft_stop import FEATURES
from ..ops import LONGEST_MATCH, match_level
from .decode_runs import run_prompts


@dataclasses.dataclass(frozen=True)
class StopModelFit:
    exit_layer: int
    weights: list[float]   # in generation/draft_stop.FEATURES order
    tokens: int            # the draft positions fitted on
    agreement: float       # the fraction of them the full model accepts
    auc: float             # how well the chance ranks accepted above rejected drafts, on the fitted tokens

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "features": list(FEATURES)}


def draft_features(model, prompt: Sequence[int], output: Sequence[int], exit_layer: int
                   ) -> tuple[list[list[float]], list[bool]]:
    """Per output token j >= 1: (the stop model's features [1, margin, match >= 1..4], exit E agrees with token j)."""
    n, p = len(output), len(prompt)
    if n < 2:
        return [], []
    seq = list(prompt) + list(output)
    hidden = model.hidden_states(torch.tensor([seq[:-1]], dtype=torch.int64, device=model.device))
    logp = model.decoder.head_log_softmax(hidden[exit_layer - 1][0, p - 1:p - 1 + n]).float()
    top = logp.topk(2, dim=-1)
    drafts = logp.argmax(-1).tolist()  # exit_head_argmax's tie rule (the lowest id)
    margins = (top.values[:, 0] - top.values[:, 1]).tolist()
    rows, agree = [], []
    for j in range(1, n):
        m = match_level(seq[:p + j], drafts[j])
        rows.append([1.0, margins[j]] + [float(m >= k) for k in range(1, LONGEST_MATCH + 1)])
        agree.append(drafts[j] == output[j])
    return rows, agree


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The chance a random accepted draft scores above a random rejected one (ties: half)."""
    pairs = sorted(zip(scores, labels))
    pos = sum(labels)
    neg = len(labels) - pos
    if not pos or not neg:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += sum(1 for _, y in pairs[i:j] if y) * (i + j + 1) / 2
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> list[float]:
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + l2 * (w[1:] ** 2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return [float(x) for x in w.detach()]


@torch.no_grad()
def fit_stop_model(model, prompts: Sequence[Sequence[int]], exit_layer: int, max_new_tokens: int,
                   stop_token_ids=None, outputs=None) -> StopModelFit:
    """The stop model for exit_layer fitted on the model's greedy outputs of prompts (given, or decoded here)."""
    if outputs is None:
        stops = model.config.eos_token_ids if stop_token_ids is None else stop_token_ids
        outputs = run_prompts(model, prompts, max_new_tokens, stops).outputs
    rows, labels = [], []
    for prompt, out in zip(prompts, outputs):
        r, a = draft_features(model, prompt, out, exit_layer)
        rows += r
        labels += a
    if not rows or all(labels) or not any(labels):
        raise ValueError(f"fit_stop_model: exit {exit_layer} needs both accepted and rejected drafts to fit; "
                         f"{len(rows)} draft positions, {sum(labels)} accepted")
    X = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    w = fit_logistic(X, y)
    scores = (X @ torch.tensor(w, dtype=torch.float64)).tolist()
    return StopModelFit(exit_layer, w, len(rows), sum(labels) / len(labels), auc(scores, labels))
