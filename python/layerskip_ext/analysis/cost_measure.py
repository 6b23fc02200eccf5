"""Measure the cost model's inputs on a real model: stage timings and per-exit agreement alpha(E).

Timings are medians of a few repeats after a warm-up (the machine may be shared, so single calls are noisy).
Layer cost is fitted, not taken from one call: a layer-range call on T tokens costs a + k x b for k layers
(a: embed, state and dispatch of the call, b: one layer), fitted by least squares over a few k.
"""
from __future__ import annotations

import statistics
import time
from typing import Iterable, Sequence

import torch

from .cost_model import StageCosts, overhead_from_ar


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and fill caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clamped at 0 (negative costs are noise)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    slope = max(0.0, slope)
    return max(0.0, my - slope * mx), slope


@torch.no_grad()
def measure_stage_costs(model, position: int, depths: Iterable[int], ar_step_s: float,
                        repeats: int = 5, draft_vocab=None) -> StageCosts:
    """Per-layer, per-call and exit-head seconds for T = 1 (draft) and T = d + 1 (verify) tokens of one sequence
    whose KV cache holds ``position`` tokens; ``ar_step_s`` (measured by decoding) gives the overhead.
    draft_vocab (ids): also time the draft's head over that subset (StageCosts.draft_head_s)."""
    L = model.num_layers
    dec = model.decoder
    Ts = sorted({1} | {int(d) + 1 for d in depths})
    context = model.config.max_position_embeddings
    position = max(0, min(position, context - max(Ts)))
    cache = model.new_cache(1, position + max(Ts))
    ks = sorted({1, (L + 1) // 2, L}) if L > 1 else [0, 1]
    start = torch.tensor([position], dtype=torch.int64, device=model.device)
    layer_s, call_s, head_s = {}, {}, {}
    for T in Ts:
        tokens = torch.full((1, T), model.config.bos_token_id or 0, dtype=torch.int64)

        def run(k: int) -> None:
            st = dec.state(start, T, cache)
            dec.layers(dec.embed(tokens.to(model.device)), 0, k, st)
            _sync(model)

        times = [_median_time(lambda k=k: run(k), repeats) for k in ks]
        call_s[T], layer_s[T] = _fit_line(ks, times)
        h = torch.randn(1, T, model.config.hidden_size, dtype=model.dtype, device=model.device)

        def head() -> None:
            dec.head_argmax(h)
            _sync(model)

        head_s[T] = _median_time(head, repeats)
    overhead = overhead_from_ar(layer_s[1], call_s[1], head_s[1], L, ar_step_s)
    draft_head_s = None
    if draft_vocab is not None:
        h1 = torch.randn(1, model.config.hidden_size, dtype=model.dtype, device=model.device)

        def draft_head() -> None:
            dec.head_argmax(h1, draft_vocab)
            _sync(model)

        draft_head_s = _median_time(draft_head, repeats)
    return StageCosts(L, layer_s, call_s, head_s, overhead, ar_step_s, draft_head_s)


@torch.no_grad()
def measure_agreement(model, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                      exit_layers: Iterable[int]) -> tuple[dict[int, float], dict[int, list[list[bool]]]]:
    """-> (alpha {E: fraction}, agreements {E: per prompt, per output token j: exit-E greedy == token j}).

    ``outputs`` are the model's own greedy continuations. One teacher-forced pass over prompt + output gives
    every layer's hidden state at the positions that predicted each output token; the exit head on layer E's
    state there is what a draft through layers < E proposes after an accepted prefix. alpha(E) averages over
    the tokens a round can draft (j >= 1: token 0 comes from the prefill).
    """
    exits = sorted(set(int(e) for e in exit_layers))
    agreements: dict[int, list[list[bool]]] = {E: [] for E in exits}
    for prompt, out in zip(prompts, outputs):
        if not out:
            for E in exits:
                agreements[E].append([])
            continue
        n, p = len(out), len(prompt)
        seq = torch.tensor([list(prompt) + list(out)[:-1]], dtype=torch.int64)  # the last token predicts nothing
        hidden = model.hidden_states(seq)
        target = torch.tensor(list(out), dtype=torch.int64)
        for E in exits:
            pred = model.decoder.head_argmax(hidden[E - 1][0, p - 1:p - 1 + n]).cpu()
            agreements[E].append((pred == target).tolist())
    alpha = {}
    for E in exits:
        drafted = [a for agree in agreements[E] for a in agree[1:]]
        alpha[E] = sum(drafted) / len(drafted) if drafted else 0.0
    return alpha, agreements
