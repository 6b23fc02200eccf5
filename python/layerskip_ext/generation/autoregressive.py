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
    end_layer = model.num_layers if exit_layer is None else exit_layer
    timer = Timer()
    batch.emit_first(choose_tokens(model, batch.prefill(exit_layer), sampling, generator))
    result.prefill_s = timer.lap()

    while not batch.done():
        # The step's inputs are the batch's own tensors (tokens the model chose, positions the loop advanced):
        # already valid, so the layers run without forward_hidden's checks (host reads of the tensors).
        tokens, start = batch.last_tokens(), batch.positions()
        st = model.forward_state(start, 1, batch.cache, batch.rows, max_start=batch.max_position())
        hidden = model.forward_layers(model.embed(tokens.view(-1, 1)), 0, end_layer, st)[:, -1]
        next_tokens = choose_tokens(model, hidden, sampling, generator)
        tokens.copy_(next_tokens)
        start += 1
        for row, t in enumerate(next_tokens.tolist()):
            batch.emit(row, (t,))
        batch.drop_finished()
    result.decode_s = timer.lap()
    return result
