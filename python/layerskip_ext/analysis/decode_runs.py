"""Decoding of prompts one at a time (greedy, or sampling), timed: what the sweep, the confirmation and the
stop-model fit share."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

from ..generation import generate


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What run_prompts samples with instead of greedy decoding (generate's parameters of the same names)."""
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling needs a temperature > 0, got {self.temperature}")


@dataclasses.dataclass
class RunStats:
    outputs: list[list[int]]
    decode_tokens: int = 0   # tokens after each prompt's first
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.decode_tokens / self.rounds if self.rounds else 0.0


def run_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Iterable[int],
                exit_layer: Optional[int] = None, num_speculations: Optional[int] = None,
                draft_stop: float = 0.0, draft_growth: int = 0, draft_stop_model=None,
                batch_size: int = 1, sampling: Optional[Sampling] = None) -> RunStats:
    """Greedy decoding of each prompt alone (batch_size > 1: that many prompts per generate call, in order);
    autoregressive when exit_layer is None. Self-speculation drafts exactly as asked: draft_stop and draft_growth 0
    are static (a model's tuned dynamic drafting is not applied behind the caller's back), and a stop model is used
    only when given. sampling: sample instead (group g of the prompts seeded sampling.seed + g, so a run is
    repeatable and every group draws anew)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    strategy = "autoregressive" if exit_layer is None else "self_speculative"
    stats = RunStats([])
    stops = list(stop_ids)
    extra = {} if exit_layer is None else {"draft_stop": float(draft_stop), "draft_growth": int(draft_growth),
                                           "draft_stop_model": draft_stop_model}
    for g, i in enumerate(range(0, len(prompts), batch_size)):
        draw = {} if sampling is None else dict(temperature=sampling.temperature, top_k=sampling.top_k,
                                                top_p=sampling.top_p, seed=sampling.seed + g)
        r = generate(model, [list(p) for p in prompts[i:i + batch_size]], strategy=strategy,
                     max_new_tokens=max_new_tokens, stop_token_ids=stops, exit_layer=exit_layer,
                     num_speculations=num_speculations, **extra, **draw)
        for seq in r.sequences:
            stats.outputs.append(seq.tokens)
            stats.decode_tokens += max(0, len(seq.tokens) - 1)
        stats.decode_s += r.decode_s
        stats.drafted += r.stats.get("draft_tokens", 0)
        stats.accepted += r.stats.get("accepted_tokens", 0)
        stats.rounds += r.stats.get("rounds", 0)
    return stats
