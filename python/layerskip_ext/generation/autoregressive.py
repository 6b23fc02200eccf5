"""Plain autoregressive decoding over the static KV cache (the baseline every other strategy must reproduce)."""
from __future__ import annotations

import torch

from .core import GenerationResult, SequenceOutput, StopRules, Timer, to_tensor
from .sampling import SamplingParams, choose_tokens


def prefill(model, cache, prompts: list[list[int]], exit_layer: int | None = None) -> torch.Tensor:
    """Run each prompt in one pass (each sequence into its own cache row). -> last-position logits [B, V]."""
    last = []
    for b, prompt in enumerate(prompts):
        tokens = to_tensor(prompt).view(1, -1)
        logits = model(tokens, start=to_tensor([0]), cache=cache, exit_layer=exit_layer, rows=slice(b, b + 1))
        last.append(logits[0, -1])
    return torch.stack(last)


@torch.no_grad()
def generate_autoregressive(model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
                            stop_token_ids, capacity: int, on_token=None, exit_layer: int | None = None,
                            strategy: str = "autoregressive") -> GenerationResult:
    """One token per forward pass. With exit_layer set, every pass stops after that layer (early exit)."""
    outputs = [SequenceOutput(list(p)) for p in prompts]
    rules = StopRules(outputs, max_new_tokens, stop_token_ids, capacity, on_token)
    result = GenerationResult(outputs, strategy)
    if max_new_tokens == 0:
        return result
    generator = sampling.generator(model.device)
    cache = model.new_cache(len(prompts), capacity)
    timer = Timer()

    logits = prefill(model, cache, prompts, exit_layer)
    next_tokens = choose_tokens(logits, sampling, generator)
    for b in range(len(prompts)):
        rules.emit(b, int(next_tokens[b]))
    result.prefill_s = timer.lap()

    while not rules.all_done():
        # Finished sequences ride along (batch shape stays fixed) at their last slot; their output is ignored.
        positions = [min(len(o.prompt_tokens) + len(o.tokens) - 1, capacity - 1) for o in outputs]
        tokens = to_tensor([o.tokens[-1] for o in outputs]).view(-1, 1)
        logits = model(tokens, start=to_tensor(positions), cache=cache, exit_layer=exit_layer)[:, -1]
        next_tokens = choose_tokens(logits, sampling, generator)
        for b in range(len(prompts)):
            if not rules.done(b):
                rules.emit(b, int(next_tokens[b]))
    result.decode_s = timer.lap()
    return result
