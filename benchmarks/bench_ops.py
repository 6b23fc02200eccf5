"""Microbenchmarks of the native ops against their PyTorch references on decode shapes (SmolLM2-135M).

    python -m pytest benchmarks/bench_ops.py -q                      # all (CPU; CUDA too when a GPU is there)
    python -m pytest benchmarks/bench_ops.py -q -k "attention and native" --benchmark-json=out.json

Each benchmark records in ``extra_info``: the bytes a kernel must move at least (inputs read once, outputs written
once; for cache_attention the valid part of the K/V cache), and the GB/s that makes at the measured mean time.
Machines are shared and noisy: compare side by side, in one run.
"""
from __future__ import annotations

import math

import pytest
import torch

from layerskip_ext import ops

# SmolLM2-135M
H, NH, NKV, D, S = 576, 9, 3, 64, 2048
EPS = 1e-5

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["native", "reference"]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}

if not ops.native_available():
    IMPLS = ["reference"]


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _run(benchmark, fn, nbytes: int, device: str) -> None:
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()  # warm up (allocations, lazy init)
    benchmark(timed)
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.mean > 0:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.mean / 1e9, 3)
    benchmark.extra_info["threads"] = torch.get_num_threads()


def _pick(name: str, impl: str):
    return getattr(ops, name if impl == "native" else f"{name}_reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 5])
def test_rms_norm(benchmark, impl, dtype, device, T):
    benchmark.group = f"rms_norm T={T} {dtype} {device}"
    x = torch.randn(1, T, H, dtype=DTYPES[dtype], device=device)
    w = torch.randn(H, dtype=DTYPES[dtype], device=device)
    f = _pick("rms_norm", impl)
    _run(benchmark, lambda: f(x, w, EPS), 2 * _nbytes(x) + _nbytes(w), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 5])
def test_rope(benchmark, impl, dtype, device, T):
    benchmark.group = f"rope T={T} {dtype} {device}"
    x = torch.randn(1, T, NH, D, dtype=DTYPES[dtype], device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    pos = torch.arange(S - T, S, device=device).view(1, T)
    f = _pick("rope", impl)
    _run(benchmark, lambda: f(x, pos, cos, sin), 2 * _nbytes(x) + _nbytes(pos) + 2 * T * (D // 2) * 4, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 5])
def test_kv_cache_write(benchmark, impl, dtype, device, T):
    benchmark.group = f"kv_cache_write T={T} {dtype} {device}"
    kc = torch.zeros(1, NKV, S, D, dtype=DTYPES[dtype], device=device)
    vc = torch.zeros_like(kc)
    k = torch.randn(1, T, NKV, D, dtype=DTYPES[dtype], device=device)
    v = torch.randn_like(k)
    start = torch.tensor([S // 2], device=device)
    f = _pick("kv_cache_write", impl)
    _run(benchmark, lambda: f(kc, vc, k, v, start), 2 * _nbytes(k, v), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 5, 7])
def test_cache_attention(benchmark, impl, dtype, device, T):
    """Decode (T=1) / verify (T=5) at the end of a full 2048-slot cache: every key is read."""
    benchmark.group = f"cache_attention T={T} {dtype} {device}"
    q = torch.randn(1, T, NH, D, dtype=DTYPES[dtype], device=device)
    kc = torch.randn(1, NKV, S, D, dtype=DTYPES[dtype], device=device)
    vc = torch.randn_like(kc)
    start = torch.tensor([S - T], device=device)
    f = _pick("cache_attention", impl)
    nbytes = 2 * _nbytes(q) + _nbytes(kc, vc)  # q in, out, the whole (valid) K/V cache once
    _run(benchmark, lambda: f(q, kc, vc, start, 1.0 / math.sqrt(D)), nbytes, device)


# linear / exit_head_argmax: decode (M = 1) and verification (M = 7) shapes. One matrix timed in a loop stays in
# cache when it is small (the MLP's 3.5 MB does not fit L2 but may fit L3): benchmarks/bench_linear.py streams the
# whole model's weights as a decode step does. The LM head (113 MB in float32) streams from memory either way.
LINEAR_SHAPES = {"gate": (1536, H), "down": (H, 1536), "head": (49152, H)}


def _linear_ref(x, w):
    return torch.nn.functional.linear(x, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
@pytest.mark.parametrize("M", [1, 7])
def test_linear(benchmark, impl, dtype, device, shape, M):
    """reference = torch's own F.linear (what the model used before the native kernel)."""
    benchmark.group = f"linear {shape} M={M} {dtype} {device}"
    N, K = LINEAR_SHAPES[shape]
    w = (torch.randn(N, K) * 0.05).to(DTYPES[dtype]).to(device)
    x = torch.randn(M, K, dtype=DTYPES[dtype], device=device)
    f = ops.linear if impl == "native" else _linear_ref
    _run(benchmark, lambda: f(x, w), _nbytes(w, x) + M * N * w.element_size(), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", [1, 7])
def test_exit_head_argmax(benchmark, impl, dtype, device, M):
    """Greedy exit head over the full 49152-token vocabulary; reference = rms_norm + F.linear + argmax."""
    benchmark.group = f"exit_head_argmax M={M} {dtype} {device}"
    w = (torch.randn(49152, H) * 0.05).to(DTYPES[dtype]).to(device)
    nw = torch.ones(H, dtype=DTYPES[dtype], device=device)
    h = torch.randn(M, H, dtype=DTYPES[dtype], device=device)
    if impl == "native":
        fn = lambda: ops.exit_head_argmax(h, nw, EPS, w)  # noqa: E731
    else:
        fn = lambda: _linear_ref(ops.rms_norm_reference(h, nw, EPS), w).argmax(-1)  # noqa: E731
    _run(benchmark, fn, _nbytes(w, h, nw), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["greedy", "sampling"])
def test_verify(benchmark, impl, device, kind):
    """One verification round's acceptance for 4 sequences, d = 6, full 49152-token distributions (sampling)."""
    benchmark.group = f"verify_{kind} {device}"
    B, d, V = 4, 6, 49152
    g = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, V, (B, d), generator=g).to(device)
    pos = torch.zeros(B, dtype=torch.int64, device=device)
    if kind == "greedy":
        target = torch.cat((drafts, drafts[:, :1]), 1)
        f = ops.verify_greedy if impl == "native" else ops.verify_greedy_reference
        _run(benchmark, lambda: f(drafts, target, pos), _nbytes(drafts, target, pos), device)
    else:
        q = torch.softmax(torch.randn(B, d, V, generator=g), -1).to(device)
        p = torch.softmax(torch.randn(B, d + 1, V, generator=g), -1).to(device)
        u = torch.rand(B, d + 1, generator=g).to(device)
        f = ops.verify_sampling if impl == "native" else ops.verify_sampling_reference
        # bytes: the distributions the rule reads at most (one residual row and one p row per sequence)
        _run(benchmark, lambda: f(drafts, q, p, u, pos), 3 * B * V * 4, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 7])
def test_layer_range_forward(benchmark, impl, dtype, device, T):
    """Four SmolLM2 decoder layers over a 512-slot cache: the fused op vs the reference ops one by one."""
    benchmark.group = f"layer_range_forward 4 layers T={T} {dtype} {device}"
    L, I, Sc = 4, 1536, 512
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    ws = []
    for _ in range(L):
        lin = lambda n, k: (torch.randn(n, k, generator=g) * k ** -0.5).to(dt).to(device)  # noqa: E731
        ones = torch.ones(H, dtype=dt, device=device)
        ws += [ones, lin(NH * D, H), lin(NKV * D, H), lin(NKV * D, H), lin(H, NH * D), ones, lin(I, H), lin(I, H),
               lin(H, I)]
    kc = [torch.randn(1, NKV, Sc, D, dtype=dt, device=device) for _ in range(L)]
    vc = [torch.randn(1, NKV, Sc, D, dtype=dt, device=device) for _ in range(L)]
    start = torch.tensor([Sc - T], device=device)
    pos = (start[:, None] + torch.arange(T, device=device)[None]).contiguous()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(Sc, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    h = torch.randn(1, T, H, dtype=dt, device=device)
    f = ops.layer_range_forward if impl == "native" else ops.layer_range_forward_reference
    nbytes = _nbytes(*ws) + _nbytes(*kc, *vc)
    _run(benchmark, lambda: f(h, ws, kc, vc, start, pos, cos, sin, NH, NKV, EPS, D ** -0.5), nbytes, device)
