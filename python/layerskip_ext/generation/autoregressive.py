"""Plain autoregressive decoding over the static KV cache (the baseline every other strategy must reproduce)."""
from __future__ import annotations

import functools

import torch

from .batch import DecodeBatch
from .core import GenerationResult, Timer
from .cuda_graph import StepGraphs
from .sampling import SamplingParams, choose_tokens


def _step(decoder, batch: DecodeBatch, end_layer: int, sampling: SamplingParams, generator) -> torch.Tensor:
    """One token for every live sequence, all on the model's device: -> its tokens [n]. Advances the batch's newest
    tokens and positions in place, so the next step reads them from the same tensors (what lets a CUDA graph replay
    steps: generation/cuda_graph.py)."""
    # The step's inputs are the batch's own tensors (tokens the model chose, positions the loop advanced): already
    # valid, so the state reads nothing back from them (max_start from the emitted tokens).
    tokens, start = batch.last_tokens, batch.positions
    st = decoder.state(start, 1, batch.cache, batch.rows, max_start=batch.top)
    hidden = decoder.layers(decoder.embed(tokens.view(-1, 1)), 0, end_layer, st)[:, -1]
    next_tokens = choose_tokens(decoder, hidden, sampling, generator)
    tokens.copy_(next_tokens)
    start += 1
    return next_tokens


@torch.no_grad()
def generate_autoregressive(decoder, batch: DecodeBatch, sampling: SamplingParams, result: GenerationResult,
                            exit_layer: int | None = None, cuda_graph: bool = False) -> GenerationResult:
    """One token per forward pass. With exit_layer set, every pass stops after that layer (early exit).
    cuda_graph (CUDA): replay the steps as CUDA graphs (sampling: the generator registered with them)."""
    generator = sampling.generator(decoder.device)
    end_layer = decoder.num_layers if exit_layer is None else exit_layer
    timer = Timer()
    batch.emit_first(choose_tokens(decoder, batch.prefill(exit_layer), sampling, generator))
    result.prefill_s = timer.lap()
    step = functools.partial(_step, decoder, batch, end_layer, sampling, generator)
    graphs = StepGraphs(step, decoder.device, generator) if cuda_graph else None

    while batch.active:
        out = graphs.run((len(batch.active),)) if graphs is not None else step()
        for row, t in enumerate(out.tolist()):  # the step's only host read
            batch.emit(row, (t,))
        batch.drop_finished()
    result.decode_s = timer.lap()
    return result
