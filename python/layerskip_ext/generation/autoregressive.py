"""Plain autoregressive decoding over the static KV cache (the baseline every other strategy must reproduce)."""
from __future__ import annotations

import torch

from .batch import DecodeBatch
from .core import GenerationResult, Timer
from .sampling import SamplingParams, choose_tokens


@torch.no_grad()
def generate_autoregressive(decoder, batch: DecodeBatch, sampling: SamplingParams, result: GenerationResult,
                            exit_layer: int | None = None) -> GenerationResult:
    """One token per forward pass. With exit_layer set, every pass stops after that layer (early exit)."""
    generator = sampling.generator(decoder.device)
    end_layer = decoder.num_layers if exit_layer is None else exit_layer
    timer = Timer()
    batch.emit_first(choose_tokens(decoder, batch.prefill(exit_layer), sampling, generator))
    result.prefill_s = timer.lap()

    while batch.active:
        # The step's inputs are the batch's own tensors (tokens the model chose, positions the loop advanced):
        # already valid, so the state reads nothing back from them (max_start from the emitted tokens).
        tokens, start = batch.last_tokens, batch.positions
        st = decoder.state(start, 1, batch.cache, batch.rows, max_start=batch.top)
        hidden = decoder.layers(decoder.embed(tokens.view(-1, 1)), 0, end_layer, st)[:, -1]
        next_tokens = choose_tokens(decoder, hidden, sampling, generator)
        tokens.copy_(next_tokens)
        start += 1
        for row, t in enumerate(next_tokens.tolist()):
            batch.emit(row, (t,))
        batch.drop_finished()
    result.decode_s = timer.lap()
    return result
