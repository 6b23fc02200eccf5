"""How many tokens a self-speculative round drafts: always the most (static), or adapted round by round.

Adaptive (growth g > 0, dynamic drafting): the first round drafts g; a round after one whose every proposal was
accepted drafts g more, up to the most; after a rejection at draft a, the next drafts a + 1, the run the full
model has just agreed with. A model whose drafts run long (code, repetitive text) then drafts long rounds without
paying for them where it does not. Lossless for greedy and for sampling: a round's length depends only on earlier
rounds, never on its own drafts or uniforms, and speculative sampling is exact for any length fixed before the
round (Leviathan et al.). A batch drafts one length: the shortest run over its live sequences.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftLength:
    most: int          # d: no round drafts more
    growth: int = 0    # 0: every round drafts `most`; g > 0: adaptive (see the module docstring)

    def first(self) -> int:
        return min(self.most, self.growth) if self.growth else self.most

    def after(self, current: int, all_accepted: bool, accepted: int) -> int:
        """The next round's length, after one that could draft `current`: all_accepted when every live sequence's
        full model took every proposal (fewer than `current` when the draft stopped on a low probability);
        accepted: the fewest any sequence had accepted."""
        if not self.growth:
            return self.most
        if all_accepted:
            return min(self.most, current + self.growth)
        return max(1, accepted + 1)
