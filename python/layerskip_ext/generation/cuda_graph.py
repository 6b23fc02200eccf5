"""Self-speculative rounds replayed as CUDA graphs (greedy decoding on a GPU).

A round (generation/self_speculative.py ``_round``) reads and writes only tensors that live for the whole
generation: the KV cache, the batch's positions and newest tokens (advanced in place by the verification op), the
model's weights. Its kernels launch on the current stream without host synchronisation, and with the cache's
capacity fixed their launch shapes do not depend on the positions (the kernels read those from device memory).
So one captured round replays as any later round of the same shape: a fixed launch sequence, one graph launch
instead of dozens of kernel launches and the Python around them. The host reads the round's [n, d + 2] result once
(to emit tokens), which is the only synchronisation.

A graph is kept per (d, live sequences): rounds of another shape (the last ones, drafting fewer tokens; after a
sequence finishes) run eagerly or capture their own. The first round of a shape runs eagerly on a side stream
(PyTorch's warm-up before capture: lazy initialisations must not happen inside a capture), the second is captured
and replayed. Capture runs the Python of a round once: its host-side checks (cache room) hold for later rounds
because the decode loop never drafts past the cache (``batch.room()``).

Unverified: no GPU has been available where this was written; tests/test_cuda_graph.py checks it against eager
greedy decoding on a CUDA machine and skips elsewhere.
"""
from __future__ import annotations

from typing import Callable

import torch


class RoundGraphs:
    def __init__(self, round_fn: Callable[[int], torch.Tensor], device: torch.device):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {device}")
        self.round_fn = round_fn
        self.device = torch.device(device)
        self.seen: set[tuple[int, int]] = set()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captures = self.replays = 0

    def run(self, d: int, rows: int) -> torch.Tensor:
        """One round with d drafts over ``rows`` live sequences -> its [rows, d + 2] result (device tensor)."""
        key = (d, rows)
        entry = self.graphs.get(key)
        if entry is not None:
            graph, out = entry
            graph.replay()
            self.replays += 1
            return out
        if key not in self.seen:  # warm-up: a real round, eagerly, on a side stream
            self.seen.add(key)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.round_fn(d)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the round; nothing runs until replay
            out = self.round_fn(d)
        self.graphs[key] = (graph, out)
        self.captures += 1
        graph.replay()
        self.replays += 1
        return out
