"""Lossless check: self-speculative greedy output must equal autoregressive greedy output, token for token."""
from __future__ import annotations

from dataclasses import dataclass, field

from .api import generate


@dataclass
class PairReport:
    exit_layer: int
    num_speculations: int
    prompts: int = 0
    mismatches: list[tuple[int, int]] = field(default_factory=list)  # (prompt index, first differing position)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_full_pass(self) -> float:
        """Emitted tokens per verification (one pass of the deep layers)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def check_lossless(model, prompts: list[list[int]], pairs: list[tuple[int, int]], max_new_tokens: int,
                   stop_token_ids=None, progress=None) -> list[PairReport]:
    reports = [PairReport(E, d) for E, d in pairs]
    for i, prompt in enumerate(prompts):
        expected = generate(model, prompt, strategy="autoregressive", max_new_tokens=max_new_tokens,
                            stop_token_ids=stop_token_ids).sequences[0].tokens
        for report in reports:
            r = generate(model, prompt, strategy="self_speculative", exit_layer=report.exit_layer,
                         num_speculations=report.num_speculations, max_new_tokens=max_new_tokens,
                         stop_token_ids=stop_token_ids)
            got = r.sequences[0].tokens
            report.prompts += 1
            if got != expected:
                report.mismatches.append((i, first_difference(got, expected)))
            report.draft_tokens += r.stats["draft_tokens"]
            report.accepted_tokens += r.stats["accepted_tokens"]
            report.rounds += r.stats["rounds"]
            report.new_tokens += len(got) - 1  # the first token comes from the prompt pass
        if progress is not None:
            progress(i + 1, len(prompts), reports)
    return reports
