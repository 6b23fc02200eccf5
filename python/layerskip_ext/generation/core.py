"""What every decoding strategy shares: argument checks, stop rules, per-sequence bookkeeping, the result."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from ..errors import GenerationError

# on_token(sequence_index, token_id) is called for every emitted token, in order, as soon as it is final.
TokenCallback = Callable[[int, int], None]


@dataclass
class SequenceOutput:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)  # new tokens, stop token included if one ended it
    finish_reason: Optional[str] = None  # "stop" | "length" | "context_full"


@dataclass
class GenerationResult:
    sequences: list[SequenceOutput]
    strategy: str
    prefill_s: float = 0.0   # prompt processing up to and including the first new token of every sequence
    decode_s: float = 0.0    # everything after that
    stats: dict = field(default_factory=dict)  # strategy-specific counters (later: acceptance, rounds, ...)

    @property
    def time_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def new_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after the first one of each sequence, per second of decoding."""
        n = self.new_tokens - sum(1 for s in self.sequences if s.tokens)
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0


def check_prompts(prompts: list[list[int]], vocab_size: int, context_length: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty (it needs at least one token)")
        if len(p) >= context_length:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is {context_length} "
                                  f"positions, which leaves no room to generate")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


class StopRules:
    """Decides when each sequence is done and records why."""

    def __init__(self, outputs: list[SequenceOutput], max_new_tokens: int, stop_token_ids: Iterable[int],
                 capacity: int, on_token: Optional[TokenCallback] = None):
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.outputs = outputs
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(int(t) for t in stop_token_ids)
        self.capacity = capacity
        self.on_token = on_token

    def done(self, b: int) -> bool:
        return self.outputs[b].finish_reason is not None

    def emit(self, b: int, token: int) -> bool:
        """Append a token (a Python int) to sequence b; returns False once the sequence is finished (the token is
        still kept)."""
        out = self.outputs[b]
        out.tokens.append(token)
        if self.on_token is not None:
            self.on_token(b, token)
        if token in self.stop_ids:
            out.finish_reason = "stop"
        elif len(out.tokens) >= self.max_new_tokens:
            out.finish_reason = "length"
        elif len(out.prompt_tokens) + len(out.tokens) >= self.capacity:
            # The next step would need a cache slot beyond the capacity: end cleanly, with the reason.
            out.finish_reason = "context_full"
        return out.finish_reason is None


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


def to_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)
