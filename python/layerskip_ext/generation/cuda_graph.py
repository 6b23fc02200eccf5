"""Decode steps replayed as CUDA graphs (on a GPU, greedy or sampling): self-speculative rounds and autoregressive
steps.

A round (generation/self_speculative.py ``_round``), like an autoregressive step (generation/autoregressive.py
``_step``), reads and writes only tensors that live for the whole
generation: the KV cache, the batch's positions and newest tokens (advanced in place by the verification op), the
model's weights. Its kernels launch on the current stream without host synchronisation, and with the cache's
capacity fixed their launch shapes do not depend on the positions (the kernels read those from device memory).
So one captured round replays as any later round of the same shape: a fixed launch sequence, one graph launch
instead of dozens of kernel launches and the Python around them (an autoregressive step of an L-layer model is
1 + (1 + 9 L) + 3 launches: docs/gpu.md). The host reads the result once (a round's [n, d + 2], a step's [n] tokens,
to emit them), which is the only synchronisation. Live sequences are always the first rows of the batch's tensors
(generation/batch.py), so a given number of them always means the same device addresses.

A graph is kept per key: (d, live sequences) for rounds, (live sequences,) for steps. Rounds of another shape (the
last ones, drafting fewer tokens; after a sequence finishes) run eagerly or capture their own. The first round of a
shape runs eagerly on a side stream (PyTorch's warm-up before capture: lazy initialisations must not happen inside a
capture), the second is captured and replayed. Capture runs the Python of a round once: its host-side checks (cache
room) hold for later rounds because the decode loop never drafts past the cache (``batch.room()``).

Sampling draws its uniforms from the generation's torch.Generator (torch.rand inside the round or step: no host
sync, the native sampling kernels flag bad values in the device error word instead of raising). The generator is
registered with each graph before capture (CUDAGraph.register_generator_state), so a replay draws from the
generator's current Philox offset and advances it by the capture's total, exactly as the eager step would: a seeded
graphed generation samples the eager tokens. (A dynamic-drafting round is not graphed: generate() refuses the
combination.)

Unverified: no GPU has been available where this was written; tests/test_cuda_graph.py checks it against eager
decoding (greedy and sampled) on a CUDA machine and skips elsewhere.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class StepGraphs:
    """step_fn(*args) -> a device tensor, run eagerly once per key, then captured and replayed for that key.
    generator: the torch.Generator step_fn draws from (sampling), registered with every graph; None: none (greedy,
    or only the device's default generator, which capture registers itself)."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], device: torch.device,
                 generator: Optional[torch.Generator] = None):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {device}")
        if generator is not None and generator.device.type != "cuda":
            raise ValueError(f"a graphed step draws from a CUDA generator, got one on {generator.device}")
        self.step_fn = step_fn
        self.device = torch.device(device)
        self.generator = generator
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captures = self.replays = 0

    def run(self, key: tuple, *args) -> torch.Tensor:
        """step_fn(*args) for the shape ``key`` names -> its result (a device tensor; a replay overwrites it)."""
        entry = self.graphs.get(key)
        if entry is not None:
            graph, out = entry
            graph.replay()
            self.replays += 1
            return out
        if key not in self.seen:  # warm-up: a real step, eagerly, on a side stream
            self.seen.add(key)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.step_fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # replays then draw from, and advance, the generator's state
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):  # records the step; nothing runs until replay
            out = self.step_fn(*args)
        self.graphs[key] = (graph, out)
        self.captures += 1
        graph.replay()
        self.replays += 1
        return out
