"""What the test modules share: seeded inputs, bitwise comparisons, tolerances, small builders of op arguments and
models. (Fixtures are in conftest.py; test modules import from here, never from each other.)"""
from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from layerskip_ext import _native, ops
from tiny_checkpoints import make_tiny_model

EPS32 = 2.0 ** -24
CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16]
# fp32: ~1e-5 relative; bf16 / fp16: ~1 ulp of the output type (both sides compute in fp32 and round once).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test parameters: fresh inputs per case, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (NaN-aware bitwise comparison)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if not torch.equal(bits(a), bits(b)):
        diff = (a.float() - b.float()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (max abs diff {diff})")


def rope_tables(P: int, D: int, base: float = 10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float().contiguous(), ang.sin().float().contiguous()


def make_cache(B, nKV, S, D, dtype, start, T, g, poison=True):
    """(clean, poisoned) caches: random in slots [0, start[b] + T), zeros (clean) / NaN (poisoned) beyond."""
    k = randn((B, nKV, S, D), dtype, g)
    v = randn((B, nKV, S, D), dtype, g)
    valid = (torch.arange(S)[None, :] < (start[:, None] + T))[:, None, :, None]  # [B, 1, S, 1]
    clean = (k.masked_fill(~valid, 0), v.masked_fill(~valid, 0))
    bad = (k.masked_fill(~valid, float("nan")), v.masked_fill(~valid, float("nan"))) if poison else clean
    return clean, bad


def random_start(B, T, S, g):
    return torch.randint(0, S - T + 1, (B,), generator=g, dtype=torch.int64)


def argument_error_test(cases: dict):
    """The parametrized test that each case's call, {name: (fn, message)}, raises a RuntimeError containing its
    message (every native op's bad-argument table uses it)."""
    @pytest.mark.parametrize("name", sorted(cases))
    def test_argument_errors(name):
        fn, message = cases[name]
        with pytest.raises(RuntimeError) as info:
            fn()
        assert message in str(info.value), f"{name}: got {str(info.value).splitlines()[0]!r}"

    return test_argument_errors


# ---- layer-range op arguments ----

def random_layers(L, H, nH, nKV, D, I, dtype, g, f32_norms=False):
    ws = []
    for _ in range(L):
        norm = lambda: (1 + 0.1 * torch.randn(H, generator=g)).to(torch.float32 if f32_norms else dtype)  # noqa: E731
        lin = lambda n, k: (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)  # noqa: E731
        ws += [norm(), lin(nH * D, H), lin(nKV * D, H), lin(nKV * D, H), lin(H, nH * D), norm(), lin(I, H), lin(I, H),
               lin(H, I)]
    return ws


def caches(L, B, nKV, S, D, dtype, g):
    k = [(torch.randn(B, nKV, S, D, generator=g)).to(dtype) for _ in range(L)]
    v = [(torch.randn(B, nKV, S, D, generator=g)).to(dtype) for _ in range(L)]
    return k, v


def clone_all(ts):
    return [t.clone() for t in ts]


# ---- native-op switches ----

@contextlib.contextmanager
def poisoned_outputs():
    prev = _native._C._set_poison_outputs(True)
    try:
        yield
    finally:
        _native._C._set_poison_outputs(prev)


def gemm_isas() -> list[str]:
    return list(_native.build_info().get("gemm_isas", []))


@contextlib.contextmanager
def gemm_isa(name: str):
    prev = _native._C._set_gemm_isa(name)
    try:
        yield
    finally:
        _native._C._set_gemm_isa(prev)


def poisoned(shape, dtype, g, scale=1.0, pad=64):
    """A contiguous tensor whose storage continues with NaN after its last element (catches over-reads)."""
    n = 1
    for s in shape:
        n *= s
    store = torch.full((n + pad,), float("nan"), dtype=dtype)
    store[:n] = randn((n,), dtype, g, scale)
    return store[:n].view(shape)


def check_linear_bound(out, x, w):
    """|out - exact| within the worst-case float32 error of a 16-lane fused-multiply-add sum plus the tree
    ((K/16 + 5) roundings of a partial sum of |x||w|), plus the final rounding to bfloat16 / float16."""
    xd, wd = x.double().reshape(-1, x.shape[-1]), w.double()
    exact = xd @ wd.T
    mag = xd.abs() @ wd.abs().T
    K = x.shape[-1]
    bound = (K // 16 + 6) * EPS32 * mag + 1e-30
    if out.dtype in (torch.bfloat16, torch.float16):
        bound = bound + 2.0 ** (-8 if out.dtype == torch.bfloat16 else -11) * exact.abs()
    err = (out.double().reshape(exact.shape) - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3f} x the bound"


# ---- models ----

def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, backend: str = "auto", **overrides):
    """A tiny random model (tests/tiny_checkpoints.py) with its decoder built for backend."""
    model = make_tiny_model(seed, dtype, **overrides)
    model.build_decoder(backend)
    return model


needs_native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


# ---- a batch-invariant reference decoder ----
# Exact greedy equality of self-speculative and autoregressive decoding needs kernels whose result for a row does
# not depend on the other rows; torch's CPU matmul is not such a kernel. These reference kernels are, by running
# every row (and attention every token) alone: slow, and a stand-in for the native ones where they are not built.

def _per_row(fn):
    def wrapped(x, *args):
        flat = x.reshape(-1, 1, x.shape[-1])
        return torch.cat([fn(r, *args) for r in flat]).reshape(*x.shape[:-1], -1)
    return wrapped


def _attention_per_token(q, k_cache, v_cache, start, scale):
    B, T = q.shape[:2]
    out = torch.empty_like(q)
    for b in range(B):
        for t in range(T):
            out[b:b + 1, t:t + 1] = ops.cache_attention_reference(q[b:b + 1, t:t + 1], k_cache[b:b + 1],
                                                                   v_cache[b:b + 1], start[b:b + 1] + t, scale)
    return out


_row_linear, _row_norm = _per_row(torch.nn.functional.linear), _per_row(ops.rms_norm_reference)


def _rowwise_layers(*args):
    return ops.layer_range_forward_composed(*args, rms_norm_fn=_row_norm, linear_fn=_row_linear,
                                            rope_fn=ops.rope_reference, kv_cache_write_fn=ops.kv_cache_write_reference,
                                            cache_attention_fn=_attention_per_token)


def _rowwise_argmax(h, norm_weight, eps, lm_head, vocab_subset):
    return ops.exit_head_argmax_composed(h, norm_weight, eps, lm_head, vocab_subset, _row_norm, _row_linear)


def _rowwise_log_softmax(h, norm_weight, eps, lm_head, vocab_subset):
    return ops.exit_head_log_softmax_composed(h, norm_weight, eps, lm_head, vocab_subset, _row_norm, _row_linear)


def _rowwise_draft(*args):
    return ops.draft_greedy_composed(*args, layer_range_fn=_rowwise_layers, head_argmax_fn=_rowwise_argmax,
                                     head_log_softmax_fn=_rowwise_log_softmax)


def rowwise_kernels():
    from layerskip_ext.model.decoder import REFERENCE
    import dataclasses
    return dataclasses.replace(REFERENCE, name="rowwise", layer_range_forward=_rowwise_layers,
                               draft_greedy=_rowwise_draft, exit_head_argmax=_rowwise_argmax,
                               exit_head_log_softmax=_rowwise_log_softmax)


def decoders():
    """The batch-invariant decoders: rowwise always, native when built."""
    yield "rowwise"
    if ops.native_available():
        yield "native"


def make_model(backend: str, **kw):
    """A 4-layer tiny model decoding with a batch-invariant decoder ("rowwise" or "native")."""
    model = make_tiny_model(0, torch.float32, **dict(dict(num_hidden_layers=4), **kw))
    model.build_decoder(rowwise_kernels() if backend == "rowwise" else backend)
    return model
