"""A few self-speculative settings measured against autoregressive decoding, robustly to a drifting machine.

A sweep cell (analysis/sweep.py) is one pass over the prompts against the mean of two autoregressive passes at the
sweep's start and end; on a shared machine a pass's tokens/s drifts by 10-20%, so the best of dozens of cells is
biased up. Here every prompt is decoded back to back by autoregressive decoding and by each setting (the order
rotating from prompt to prompt and repeat to repeat), so drift over seconds hits them alike; a repeat's speedup is a
setting's tokens/s over the autoregressive tokens/s of the same repeat, and a setting's speedup is the median over
the repeats. Sampling (a Sampling from decode_runs): the same, each setting and autoregressive decoding drawing
with the same seeds; outputs differ (a draw depends on how it was made), so equal_to_ar is None, not compared.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .decode_runs import Sampling, run_prompts
from .sweep import setting_label


@dataclass
class Setting:
    exit_layer: int
    num_speculations: int
    draft_stop: float = 0.0
    draft_growth: int = 0
    draft_stop_model: Optional[list[float]] = None  # fitted (generation/draft_stop.py): draft_stop is its threshold
    speedups: list[float] = field(default_factory=list)   # per repeat
    tokens_per_s: list[float] = field(default_factory=list)
    equal_to_ar: Optional[bool] = True  # None: sampled, not compared
    drafted: int = 0    # over every repeat
    accepted: int = 0

    @classmethod
    def of(cls, d: dict) -> "Setting":
        """The setting a reproduce stage's dict describes (exit_layer, num_speculations, draft_stop,
        draft_growth)."""
        return cls(d["exit_layer"], d["num_speculations"], d.get("draft_stop", 0.0), d.get("draft_growth", 0),
                   d.get("draft_stop_model"))

    @property
    def speedup(self) -> float:
        return statistics.median(self.speedups) if self.speedups else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def label(self) -> str:
        return setting_label(self.exit_layer, self.num_speculations, self.draft_stop, self.draft_growth,
                             self.draft_stop_model is not None)


def interleaved_speedups(model, prompts: Sequence[Sequence[int]], settings: Sequence[Setting], repeats: int,
                         max_new_tokens: int, stop_ids: Iterable[int], batch_size: int = 1,
                         sampling: Optional[Sampling] = None) -> list[float]:
    """Fills each setting's speedups / tokens_per_s / equal_to_ar / drafted / accepted; -> the autoregressive
    tokens/s per repeat. batch_size > 1: the prompts decoded that many at a time (one generate call per group, each
    group in turn). sampling: sampled instead of greedy (prompt group q drawing with seed sampling.seed + q)."""
    stop_ids = list(stop_ids)
    runs = [None, *settings]  # None: autoregressive

    def once(r, ps, n, q=0):
        args = () if r is None else (r.exit_layer, r.num_speculations, r.draft_stop, r.draft_growth, r.draft_stop_model)
        draw = None if sampling is None else dataclasses.replace(sampling, seed=sampling.seed + q)
        return run_prompts(model, ps, n, stop_ids, *args, batch_size=batch_size, sampling=draw)

    for r in runs:  # warm-up: first calls allocate buffers and page weights in
        once(r, prompts[:1], 8)
    groups = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    ar_tps, reference = [], None
    for i in range(repeats):
        tokens, seconds, outputs = [0] * len(runs), [0.0] * len(runs), [[] for _ in runs]
        for q, group in enumerate(groups):
            for j in [(i + q + k) % len(runs) for k in range(len(runs))]:
                st = once(runs[j], group, max_new_tokens, q)
                tokens[j] += st.decode_tokens
                seconds[j] += st.decode_s
                outputs[j] += st.outputs
                if j > 0:
                    runs[j].drafted += st.drafted
                    runs[j].accepted += st.accepted
        tps = [t / s if s > 0 else 0.0 for t, s in zip(tokens, seconds)]
        reference = reference or outputs[0]
        ar_tps.append(tps[0])
        for j, s in enumerate(settings, start=1):
            s.tokens_per_s.append(tps[j])
            s.speedups.append(tps[j] / tps[0] if tps[0] > 0 else 0.0)
            if sampling is None:
                s.equal_to_ar = s.equal_to_ar and outputs[j] == reference and outputs[0] == reference
            else:
                s.equal_to_ar = None
    return ar_tps
