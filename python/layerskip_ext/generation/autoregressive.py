"""Plain autoregressive decoding over the static KV cache (the baseline every other strategy must reproduce)."""
from __future__ import annotations

import torch

from .batch import DecodeBatch
from .core import GenerationResult, Timer
from .sampling import SamplingParams, choose_tokens


@torch.no_grad()
def generate_autoregressive(model, batch: DecodeBatch, sampling: SamplingParams, result: GenerationResult,
                            exit_layer: int | None = None) -> GenerationResult:
    """One token per forward pass. With exit_layer set, every pass stops after that layer (early exit)."""
    generator = sampling.generator(model.device)
    timer = Timer()
    first = choose_tokens(model, batch.prefill(exit_layer), sampling, generator)
    for row in range(len(batch.active)):
        batch.emit(row, [first[row]])
    batch.drop_finished()
    result.prefill_s = timer.lap()

    while not batch.done():
        hidden = model.forward_hidden(batch.last_tokens().view(-1, 1), start=batch.positions(), cache=batch.cache,
                                      exit_layer=exit_layer, rows=batch.rows)[:, -1]
        next_tokens = choose_tokens(model, hidden, sampling, generator)
        for row in range(len(batch.active)):
            batch.emit(row, [next_tokens[row]])
        batch.drop_finished()
    result.decode_s = timer.lap()
    return result
