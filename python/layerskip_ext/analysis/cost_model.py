"""Cost model of self-speculative decoding: predicted tokens per round, round time and speedup for each (E, d).

Pure arithmetic over measured inputs (``cost_measure.py`` measures them), so it is unit-testable without timing.

One greedy round with exit layer E and d drafts (see generation/self_speculative.py) costs

    (d + 1) x [call(1) + E x layer(1)]          draft: x0, y1 .. yd through layers < E, one token each
  + d x head(1)                                 the exit head (full vocabulary) proposes y1 .. yd
  + call(d+1) + (L - E) x layer(d+1) + head(d+1)   verify: layers >= E and the head on d + 1 rows, one pass
  + overhead                                    bookkeeping outside the model calls (verify op, emit, stops)

and one autoregressive step costs call(1) + L x layer(1) + head(1) + overhead. ``overhead`` is what the measured
autoregressive step time leaves after its model calls; we assume a round's bookkeeping costs about the same as a
step's (both do one accept/choose, one emit, one stop check).

Tokens per round: with a per-token probability alpha that the exit-E greedy token equals the full model's, a
round emits 1 + alpha + ... + alpha^d tokens (the accepted prefix, truncated at d, plus the correction/bonus).
This treats agreements as independent; ``replay_rounds`` instead replays the measured agreement sequences
along the model's own greedy outputs, which gives the exact number of greedy rounds.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


@dataclasses.dataclass
class StageCosts:
    """Measured seconds of each piece of a decode step, for one sequence at a typical position."""
    num_layers: int
    layer_s: dict[int, float]   # T -> one decoder layer on T tokens (KV cache in use)
    call_s: dict[int, float]    # T -> fixed part of one layer-range call on T tokens (embed, state, dispatch)
    head_s: dict[int, float]    # T -> exit head with full-vocabulary argmax on T rows
    overhead_s: float           # per step / round, outside the model calls
    ar_step_s: float            # measured autoregressive seconds per token (decode)
    draft_head_s: Optional[float] = None  # a draft's exit head on 1 row over a draft vocabulary (None: full head)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "ar_step_s": self.ar_step_s, "overhead_s": self.overhead_s,
                "draft_head_s": self.draft_head_s,
                "layer_s": {str(t): v for t, v in sorted(self.layer_s.items())},
                "call_s": {str(t): v for t, v in sorted(self.call_s.items())},
                "head_s": {str(t): v for t, v in sorted(self.head_s.items())}}


@dataclasses.dataclass
class Prediction:
    exit_layer: int
    num_speculations: int
    alpha: float              # per-token agreement of exit E with the final layer
    tokens_per_round: float   # expected emitted tokens per round (geometric)
    acceptance: float         # expected accepted drafts / drafted
    round_s: float
    tokens_per_s: float
    speedup: float            # vs the measured autoregressive step
    replay_tokens_per_round: Optional[float] = None  # exact, from the agreement sequences (when given)
    replay_speedup: Optional[float] = None


def expected_tokens_per_round(alpha: float, d: int) -> float:
    """sum_{i=0..d} alpha^i: accepted drafts (a truncated geometric run) plus the full model's token."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    return float(sum(alpha ** i for i in range(d + 1)))


def expected_acceptance(alpha: float, d: int) -> float:
    """Expected accepted / drafted over a round: (tokens_per_round - 1) / d (what generate() reports)."""
    return (expected_tokens_per_round(alpha, d) - 1.0) / d if d > 0 else 0.0


def ar_step_model_s(c: StageCosts) -> float:
    """The model calls of one autoregressive step (without the bookkeeping overhead)."""
    L = c.num_layers
    return c.call_s[1] + L * c.layer_s[1] + c.head_s[1]


def overhead_from_ar(c_layer1: float, c_call1: float, c_head1: float, num_layers: int, ar_step_s: float) -> float:
    """The part of a measured autoregressive step its model calls do not explain (never negative)."""
    return max(0.0, ar_step_s - (c_call1 + num_layers * c_layer1 + c_head1))


def round_time_s(c: StageCosts, exit_layer: int, d: int) -> float:
    """Predicted seconds of one self-speculative round (formula in the module docstring)."""
    L, E, T = c.num_layers, exit_layer, d + 1
    if not 1 <= E <= L:
        raise ValueError(f"exit layer {E} is outside [1, {L}]")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    for table, name in ((c.layer_s, "layer_s"), (c.call_s, "call_s"), (c.head_s, "head_s")):
        if 1 not in table or T not in table:
            raise ValueError(f"stage costs lack {name} for T = {T}")
    draft_head = c.head_s[1] if c.draft_head_s is None else c.draft_head_s
    draft = T * (c.call_s[1] + E * c.layer_s[1]) + d * draft_head
    verify = c.call_s[T] + (L - E) * c.layer_s[T] + c.head_s[T]
    return draft + verify + c.overhead_s


def replay_rounds(agreements: Sequence[Sequence[bool]], d: int, max_new_tokens: Optional[int] = None
                  ) -> tuple[int, int, int]:
    """Replay greedy self-speculation along known greedy outputs -> (rounds, emitted tokens, accepted drafts).

    agreements[p][j] says whether the exit-layer greedy token equals the full model's token j of prompt p's
    greedy output (j = 0 is the prefill's token and is never drafted; its entry is ignored). Drafts agree with
    the layers < E of the accepted context exactly, so this is the number of rounds generate() runs, including
    the last rounds drafting fewer than d tokens (never past max_new_tokens).
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    rounds = emitted = accepted = 0
    for agree in agreements:
        n = len(agree)
        limit = n + d + 1 if max_new_tokens is None else max_new_tokens  # None: only the output's end bounds it
        pos = 1  # token 0 comes from the prefill
        while pos < n:
            depth = max(0, min(d, limit - pos - 1))
            k = 0
            while k < depth and pos + k < n and agree[pos + k]:
                k += 1
            step = min(k + 1, n - pos)
            rounds += 1
            emitted += step
            accepted += k
            pos += step
    return rounds, emitted, accepted


def predict(c: StageCosts, alpha: float, exit_layer: int, d: int,
            agreements: Optional[Sequence[Sequence[bool]]] = None, max_new_tokens: Optional[int] = None
            ) -> Prediction:
    tpr = expected_tokens_per_round(alpha, d)
    round_s = round_time_s(c, exit_layer, d)
    tps = tpr / round_s
    speedup = tpr * c.ar_step_s / round_s
    out = Prediction(exit_layer, d, alpha, tpr, expected_acceptance(alpha, d), round_s, tps, speedup)
    if agreements:
        rounds, emitted, _ = replay_rounds(agreements, d, max_new_tokens)
        if rounds:
            out.replay_tokens_per_round = emitted / rounds
            out.replay_speedup = out.replay_tokens_per_round * c.ar_step_s / round_s
    return out


def speedup_ceiling(c: StageCosts, exit_layer: int, d: int) -> float:
    """The speedup of (E, d) if every draft were accepted (alpha = 1): d + 1 tokens per round."""
    return (d + 1) * c.ar_step_s / round_time_s(c, exit_layer, d)


def alpha_needed(c: StageCosts, exit_layer: int, d: int, target: float) -> Optional[float]:
    """The smallest per-token agreement alpha at which (E, d) reaches ``target`` speedup over autoregressive
    decoding, or None when even alpha = 1 does not (the round costs more than ``target`` times its d + 1 tokens'
    autoregressive steps). Tokens per round grow monotonically with alpha, so bisection finds it."""
    if target <= 0:
        raise ValueError(f"target speedup must be > 0, got {target}")
    need = target * round_time_s(c, exit_layer, d) / c.ar_step_s  # tokens per round needed
    if need > d + 1:
        return None
    if need <= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens_per_round(mid, d) >= need:
            hi = mid
        else:
            lo = mid
    return hi


def rank_of(target: tuple[int, int], scores: dict[tuple[int, int], float]) -> int:
    """1-based rank of ``target`` among ``scores`` (higher is better; ties share the better rank)."""
    if target not in scores:
        raise KeyError(f"{target} is not in the grid")
    return 1 + sum(1 for v in scores.values() if v > scores[target])
