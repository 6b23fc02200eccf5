"""Where a decode step's time goes: inside the decoder's kernels vs outside them, against the weight-traffic and
compute floors of this machine, and the regime (weights in the last-level cache or streamed from memory).

``timed_decode`` times every decoder kernel of one generate() (the decoder's ``Kernels.timed``); ``floors`` reads
the machine (memory bandwidth of a model-sized and of a large buffer, the fp32 matmul rate) and says how long a
step must take at least. A model whose weights fit in the last-level cache is not limited by DRAM: its layers run
near the cache's bandwidth or the core's arithmetic, and verifying d + 1 tokens costs visibly more than one step
(``verify_cost``), unlike the bandwidth-bound regime of real models where it is nearly free.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Optional

import torch

from ..generation import generate
from .cost_model import StageCosts


def timed_decode(model, prompt, n: int, **kw) -> dict:
    """One generate() with every decoder kernel timed -> per step (AR) or round (self-speculative): step_ms,
    kernels_ms (inside the decoder's kernels), outside_ms / outside_pct (Python, bookkeeping, host reads),
    tokens_per_step."""
    plain = model.decoder
    spent = [0.0]
    mark = []

    def on_token(_seq, _tok):  # the first token ends the prompt pass: kernel time from here on is decode
        if not mark:
            mark.append(spent[0])

    model.build_decoder(plain.kernels.timed(spent))
    try:
        r = generate(model, prompt, max_new_tokens=n, stop_token_ids=[], on_token=on_token, **kw)
    finally:
        model.build_decoder(plain.kernels)
    steps = max(1, r.stats.get("rounds", len(r.sequences[0].tokens) - 1))
    inside = spent[0] - mark[0]
    return dict(step_ms=1e3 * r.decode_s / steps, kernels_ms=1e3 * inside / steps,
                outside_ms=1e3 * (r.decode_s - inside) / steps, outside_pct=100 * (1 - inside / r.decode_s),
                tokens_per_step=(len(r.sequences[0].tokens) - 1) / steps)


def llc_bytes() -> Optional[int]:
    """The last-level cache of CPU 0, from sysfs (None where it is not there)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        levels = sorted(n for n in os.listdir(base) if n.startswith("index"))
        with open(os.path.join(base, levels[-1], "size")) as f:
            text = f.read().strip()
    except (OSError, IndexError):
        return None
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMG")) * mult
    except ValueError:
        return None


@functools.lru_cache(maxsize=None)
def read_bandwidth(nbytes: int, reps: int = 7) -> float:
    """Best-of-reps bytes/s of summing an fp32 buffer of nbytes (all threads): for a buffer the size of the
    model's weights this is the rate its weights can be read at, cache-resident or not."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table (one row of it),
    the tied head counted once."""
    seen, total = set(), 0
    emb = model.model.embed_tokens.weight
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    tied = model.lm_head.weight is emb
    if not tied:
        total -= emb.numel() * emb.element_size()
    return total


def step_flops(model) -> float:
    """Multiply-adds x 2 of one token through the layers and the head (attention over the cache left out: at the
    positions measured here it is a small part)."""
    cfg = model.config
    return 2.0 * (cfg.num_hidden_layers * cfg.layer_matmul_params + cfg.vocab_size * cfg.hidden_size)


def floors(model, fp32_gflops: float) -> dict:
    """The floors of one autoregressive step on this machine, ms: weights read at the rate a buffer of their size
    is read (``cached`` when they fit in the last-level cache) and at the large-buffer (DRAM) rate, and the FLOPs
    at the fp32 matmul rate."""
    wb = weight_bytes(model)
    llc = llc_bytes()
    bw_model = read_bandwidth(wb)
    bw_dram = read_bandwidth(max(256 << 20, 8 * (llc or 0)))
    return {"weight_mb": round(wb / 2 ** 20, 2), "llc_mb": None if llc is None else round(llc / 2 ** 20, 1),
            "regime": ("weights fit in the last-level cache: latency / compute bound" if llc and wb < llc
                       else "weights exceed the last-level cache: memory-bandwidth bound"),
            "read_gbs_model_sized": round(bw_model / 1e9, 1), "read_gbs_dram": round(bw_dram / 1e9, 1),
            "weight_floor_ms": round(1e3 * wb / bw_model, 4), "dram_floor_ms": round(1e3 * wb / bw_dram, 4),
            "flops_per_token": step_flops(model),
            "compute_floor_ms": round(1e3 * step_flops(model) / (fp32_gflops * 1e9), 4)}


def verify_cost(costs: StageCosts, exit_layer: int, depths) -> list[dict]:
    """What verifying d + 1 tokens costs against one token: per layer and for the head, and the verification pass
    of (E, d) (layers >= E and the head on d + 1 rows) against the same layers on one row."""
    out = []
    L = costs.num_layers
    for d in sorted(depths):
        T = d + 1
        if T not in costs.layer_s:
            continue
        one = costs.call_s[1] + (L - exit_layer) * costs.layer_s[1] + costs.head_s[1]
        many = costs.call_s[T] + (L - exit_layer) * costs.layer_s[T] + costs.head_s[T]
        out.append({"d": d, "tokens": T, "layer_ratio": _ratio(costs.layer_s[T], costs.layer_s[1]),
                    "head_ratio": _ratio(costs.head_s[T], costs.head_s[1]),
                    "verify_ms": round(1e3 * many, 4), "one_token_ms": round(1e3 * one, 4),
                    "verify_ratio": _ratio(many, one)})
    return out


def _ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 3) if b > 0 else None  # a fitted per-layer cost can be 0 on a tiny model (noise)
