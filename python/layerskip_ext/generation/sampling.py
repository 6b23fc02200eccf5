"""Token choice from logits: greedy, or temperature / top-k / top-p sampling from a seeded generator."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: Optional[int] = None
    greedy: bool = field(init=False, repr=False)  # temperature == 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "greedy", self.temperature == 0)  # a plain attribute: read on every step


    def generator(self, device: torch.device | str = "cpu") -> Optional[torch.Generator]:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T) restricted to top-k and top-p, renormalised.

    logits [..., V] -> probs [..., V] float32. This is the target distribution p of speculative sampling too.
    """
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        # stable: equal probabilities in id order, so which of them top-p keeps is defined (and the native head's)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_with_probs(decoder, hidden: torch.Tensor, params: SamplingParams,
                      generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling (not greedy) through the shared exit head: hidden [..., H] -> (tokens [...] int64, the filtered
    distribution they were drawn from [..., V] float32: speculative sampling's q). One uniform of ``generator``
    per row draws its token by inverse CDF (the decoder's exit_head_sample: native or its reference, the same
    tokens for the same seed)."""
    uniforms = torch.rand(hidden.shape[:-1], generator=generator, device=hidden.device)
    return decoder.head_sample(hidden, uniforms, params.temperature, params.top_k, params.top_p)


def head_probs(decoder, hidden: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The filtered distribution [..., V] float32 of the exit head at hidden [..., H] (speculative sampling's
    target p); its token is not used, so its uniforms are zeros: no generator state is consumed."""
    uniforms = torch.zeros(hidden.shape[:-1], device=hidden.device)
    return decoder.head_sample(hidden, uniforms, params.temperature, params.top_k, params.top_p)[1]


def choose_tokens(decoder, hidden: torch.Tensor, params: SamplingParams,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """hidden [B, H] (a layer's output) -> token ids [B] (int64), through the shared exit head. Neither greedy nor
    sampling materialises logits outside the decoder's exit-head kernel."""
    if params.greedy:
        return decoder.head_argmax(hidden)
    return sample_with_probs(decoder, hidden, params, generator)[0]
