"""Native ops (torch.ops.layerskip.*) against their PyTorch references, batch invariance, opcheck, argument errors.

CPU always; tests marked ``cuda`` compare the CUDA kernels with their CPU twins and skip without a GPU.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import (CUDA, DTYPES, TOL, argument_error_test, assert_bitwise, cuda_only, make_cache,  # noqa: F401
                     randn, random_start, rope_tables, seeded)
from layerskip_ext import ops

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

# --------------------------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------------------------

RMS_SHAPES = [(1, 1, 16), (2, 3, 64), (3, 9, 576), (1, 33, 100), (5, 1), (7,), (2, 2, 3, 128), (4, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("w_f32", [False, True])
def test_rms_norm_matches_reference(shape, dtype, w_f32):
    g = seeded("rms", shape, dtype, w_f32)
    x = randn(shape, dtype, g, scale=3.0)
    w = randn(shape[-1:], torch.float32 if w_f32 else dtype, g)
    for eps in (1e-5, 1e-6):
        torch.testing.assert_close(ops.rms_norm(x, w, eps), ops.rms_norm_reference(x, w, eps), **TOL[dtype])


def test_rms_norm_empty():
    x = torch.randn(0, 64)
    assert ops.rms_norm(x, torch.ones(64), 1e-5).shape == (0, 64)


# --------------------------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------------------------

ROPE_SHAPES = [(1, 1, 4, 16), (2, 3, 4, 64), (3, 9, 9, 64), (1, 33, 2, 128), (2, 5, 3, 2), (1, 2, 1, 256)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_matches_reference(shape, dtype):
    B, T, nH, D = shape
    g = seeded("rope", shape, dtype)
    P = 97
    cos, sin = rope_tables(P, D)
    x = randn(shape, dtype, g)
    positions = torch.randint(0, P, (B, T), generator=g)
    out = ops.rope(x, positions, cos, sin)
    ref = ops.rope_reference(x, positions, cos, sin)
    # Same float32 operations in the same order as the reference: equal up to nothing for fp32.
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if dtype == torch.float32:
        assert_bitwise(out, ref, "rope fp32 vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_positions_shared_by_the_batch(dtype):
    """positions [1, T] (every sequence at the same positions, as in training) broadcasts like the reference."""
    g = seeded("rope-bcast", dtype)
    cos, sin = rope_tables(40, 64)
    x = randn((3, 7, 4, 64), dtype, g)
    pos = torch.randint(0, 40, (1, 7), generator=g)
    assert_bitwise(ops.rope(x, pos, cos, sin), ops.rope_reference(x, pos, cos, sin), "broadcast positions")
    assert_bitwise(ops.rope(x, pos, cos, sin), ops.rope(x, pos.expand(3, 7).contiguous(), cos, sin), "vs [B, T]")


# --------------------------------------------------------------------------------------------------------------
# kv_cache_write
# --------------------------------------------------------------------------------------------------------------

CACHE_SHAPES = [  # B, T, nKV, S, D
    (1, 1, 4, 20, 16), (2, 3, 2, 40, 64), (3, 9, 3, 80, 64), (1, 33, 2, 80, 128), (3, 4, 1, 9, 128), (2, 8, 3, 8, 64),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", CACHE_SHAPES)
def test_kv_cache_write_matches_reference_and_touches_only_its_slots(shape, dtype):
    B, T, nKV, S, D = shape
    g = seeded("kvw", shape, dtype)
    start = random_start(B, T, S, g)
    k = randn((B, T, nKV, D), dtype, g)
    v = randn((B, T, nKV, D), dtype, g)
    # Poisoned caches: NaN everywhere but a few random values; slots outside [start, start + T) must keep their bits.
    kc = torch.full((B, nKV, S, D), float("nan"), dtype=dtype)
    kc[..., ::3] = randn((B, nKV, S, D), dtype, g)[..., ::3]
    vc = kc.clone() * 2
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ops.kv_cache_write(kc, vc, k, v, start)
    ops.kv_cache_write_reference(kc_ref, vc_ref, k, v, start)
    assert_bitwise(kc, kc_ref, "k_cache")
    assert_bitwise(vc, vc_ref, "v_cache")


def test_kv_cache_write_token_by_token_equals_all_at_once():
    B, T, nKV, S, D = 2, 5, 3, 16, 64
    g = seeded("kvw-steps")
    start = torch.tensor([0, 7])
    k, v = randn((B, T, nKV, D), torch.bfloat16, g), randn((B, T, nKV, D), torch.bfloat16, g)
    a = [torch.zeros(B, nKV, S, D, dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.zeros(B, nKV, S, D, dtype=torch.bfloat16) for _ in range(2)]
    ops.kv_cache_write(a[0], a[1], k, v, start)
    for t in range(T):
        ops.kv_cache_write(b[0], b[1], k[:, t:t + 1].contiguous(), v[:, t:t + 1].contiguous(), start + t)
    assert_bitwise(a[0], b[0])
    assert_bitwise(a[1], b[1])


def test_kv_cache_write_empty_T():
    kc, vc = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    ops.kv_cache_write(kc, vc, torch.zeros(1, 0, 2, 16), torch.zeros(1, 0, 2, 16), torch.tensor([8]))
    assert kc.abs().sum() == 0


# --------------------------------------------------------------------------------------------------------------
# cache_attention
# --------------------------------------------------------------------------------------------------------------

ATTN_SHAPES = [  # B, T, nH, nKV, S, D
    (1, 1, 4, 4, 20, 16), (2, 3, 4, 2, 40, 64), (3, 9, 9, 3, 80, 64), (1, 33, 4, 2, 80, 128), (3, 1, 9, 3, 80, 64),
    (2, 5, 4, 4, 37, 128), (2, 9, 9, 3, 9, 16), (1, 4, 2, 1, 70, 256), (3, 7, 4, 2, 24, 72),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_cache_attention_matches_reference_ignoring_poisoned_slots(shape, dtype):
    B, T, nH, nKV, S, D = shape
    g = seeded("attn", shape, dtype)
    start = random_start(B, T, S, g)
    q = randn((B, T, nH, D), dtype, g)
    (kc, vc), (kc_bad, vc_bad) = make_cache(B, nKV, S, D, dtype, start, T, g)
    scale = 1.0 / math.sqrt(D)
    out = ops.cache_attention(q, kc_bad, vc_bad, start, scale)
    ref = ops.cache_attention_reference(q, kc, vc, start, scale)
    assert out.shape == (B, T, nH, D) and out.dtype == dtype
    assert not out.isnan().any(), "read a poisoned (NaN) cache slot beyond start + T"
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_cache_attention_large_scores_are_stable():
    B, T, nH, nKV, S, D = 2, 3, 4, 2, 50, 64
    g = seeded("attn-large")
    start = torch.tensor([10, 47])
    q = randn((B, T, nH, D), torch.float32, g, scale=8.0)
    (kc, vc), _ = make_cache(B, nKV, S, D, torch.float32, start, T, g, poison=False)
    kc = kc * 8
    out = ops.cache_attention(q, kc, vc, start, 1.0)
    torch.testing.assert_close(out, ops.cache_attention_reference(q, kc, vc, start, 1.0), rtol=1e-4, atol=1e-4)


def test_cache_attention_full_cache_and_empty_T():
    g = seeded("attn-full")
    B, T, nH, nKV, S, D = 2, 6, 4, 2, 6, 32
    start = torch.zeros(B, dtype=torch.int64)
    q = randn((B, T, nH, D), torch.float32, g)
    (kc, vc), _ = make_cache(B, nKV, S, D, torch.float32, start, T, g, poison=False)
    torch.testing.assert_close(ops.cache_attention(q, kc, vc, start, 0.1),
                               ops.cache_attention_reference(q, kc, vc, start, 0.1), **TOL[torch.float32])
    empty = ops.cache_attention(q[:, :0].contiguous(), kc, vc, torch.tensor([6, 3]), 0.1)
    assert empty.shape == (B, 0, nH, D)


# --------------------------------------------------------------------------------------------------------------
# Batch invariance: a row's bits do not depend on the other rows, its batch position or the thread count
# --------------------------------------------------------------------------------------------------------------

THREADS = [1, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_batch_invariant(dtype, restore_threads):
    g = seeded("rms-inv", dtype)
    x = randn((3, 9, 576), dtype, g, scale=2.0)
    w = randn((576,), dtype, g)
    results = {}
    for n in THREADS:
        torch.set_num_threads(n)
        full = ops.rms_norm(x, w, 1e-5)
        results[n] = full
        for b, t in itertools.product(range(3), range(9)):
            assert_bitwise(ops.rms_norm(x[b, t:t + 1].contiguous(), w, 1e-5)[0], full[b, t], f"row {b},{t}")
        flipped = ops.rms_norm(x.flip(1).contiguous(), w, 1e-5)  # every row at another batch position
        assert_bitwise(flipped.flip(1), full, "batch position")
    assert_bitwise(results[1], results[2], "1 vs 2 threads")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_batch_invariant(dtype, restore_threads):
    B, T, nH, D = 3, 9, 9, 64
    g = seeded("rope-inv", dtype)
    cos, sin = rope_tables(128, D)
    x = randn((B, T, nH, D), dtype, g)
    pos = torch.randint(0, 128, (B, T), generator=g)
    results = {}
    for n in THREADS:
        torch.set_num_threads(n)
        full = ops.rope(x, pos, cos, sin)
        results[n] = full
        for b, t in itertools.product(range(B), range(T)):
            one = ops.rope(x[b:b + 1, t:t + 1].contiguous(), pos[b:b + 1, t:t + 1].contiguous(), cos, sin)
            assert_bitwise(one[0, 0], full[b, t], f"row {b},{t}")
    assert_bitwise(results[1], results[2], "1 vs 2 threads")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 9, 9, 3, 80, 64), (2, 5, 4, 2, 40, 128)])
def test_cache_attention_batch_invariant(shape, dtype, restore_threads):
    """Verify pass (T rows at once) == decode passes (T = 1) == any chunking, batch order and thread count."""
    B, T, nH, nKV, S, D = shape
    g = seeded("attn-inv", shape, dtype)
    start = random_start(B, T, S, g)
    q = randn((B, T, nH, D), dtype, g)
    _, (kc, vc) = make_cache(B, nKV, S, D, dtype, start, T, g)  # poisoned beyond start + T
    scale = 1.0 / math.sqrt(D)
    results = {}
    for n in THREADS:
        torch.set_num_threads(n)
        full = ops.cache_attention(q, kc, vc, start, scale)
        results[n] = full
        for b in range(B):
            kb, vb = kc[b:b + 1].contiguous(), vc[b:b + 1].contiguous()
            for t in range(T):  # decode: one token alone
                one = ops.cache_attention(q[b:b + 1, t:t + 1].contiguous(), kb, vb, start[b:b + 1] + t, scale)
                assert_bitwise(one[0, 0], full[b, t], f"row b={b} t={t} alone, {n} threads")
            for t0, t1 in ((0, T // 2), (T // 2, T)):  # chunks of the verify pass
                if t1 > t0:
                    part = ops.cache_attention(q[b:b + 1, t0:t1].contiguous(), kb, vb, start[b:b + 1] + t0, scale)
                    assert_bitwise(part[0], full[b, t0:t1], f"chunk {t0}:{t1} of b={b}")
        perm = torch.arange(B).flip(0)  # every sequence at another batch position
        flipped = ops.cache_attention(q[perm].contiguous(), kc[perm].contiguous(), vc[perm].contiguous(),
                                      start[perm].contiguous(), scale)
        assert_bitwise(flipped[perm], full, "batch position")
    assert_bitwise(results[1], results[2], "1 vs 2 threads")


# --------------------------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch)
# --------------------------------------------------------------------------------------------------------------

def _opcheck_cases(device: str):
    g = seeded("opcheck", device)
    B, T, nH, nKV, S, D = 2, 3, 4, 2, 16, 64
    start = torch.tensor([0, 5])
    cos, sin = rope_tables(32, D)
    q = randn((B, T, nH, D), torch.float32, g)
    (kc, vc), _ = make_cache(B, nKV, S, D, torch.float32, start, T, g, poison=False)
    k, v = randn((B, T, nKV, D), torch.float32, g), randn((B, T, nKV, D), torch.float32, g)
    x = randn((B, T, 576), torch.bfloat16, g)
    w = randn((576,), torch.bfloat16, g)
    pos = torch.randint(0, 32, (B, T), generator=g)
    to = lambda *ts: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ts)  # noqa: E731
    lib = torch.ops.layerskip
    return [
        (lib.rms_norm.default, to(x, w, 1e-5)),
        (lib.rms_norm.default, to(x.float(), w.float(), 1e-6)),
        (lib.rope.default, to(q, pos, cos, sin)),
        (lib.rope.default, to(q.bfloat16(), pos, cos, sin)),
        (lib.kv_cache_write.default, to(kc.clone(), vc.clone(), k, v, start)),
        (lib.cache_attention.default, to(q, kc, vc, start, 0.125)),
        (lib.cache_attention.default, to(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), start, 0.125)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck_cpu(case):
    op, args = _opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(7))
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_opcheck_cuda(case):
    op, args = _opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)


def test_ops_trace_under_torch_compile():
    B, T, nH, nKV, S, D = 1, 2, 4, 2, 8, 16
    g = seeded("compile")
    q = randn((B, T, nH, D), torch.float32, g)
    start = torch.tensor([3])
    (kc, vc), _ = make_cache(B, nKV, S, D, torch.float32, start, T, g, poison=False)
    cos, sin = rope_tables(16, D)
    pos = (start[:, None] + torch.arange(T)[None, :]).contiguous()
    w = torch.ones(D)

    def f(q, kc, vc):
        qn = ops.rms_norm(q, w, 1e-5)
        qr = ops.rope(qn, pos, cos, sin)
        ops.kv_cache_write(kc, vc, qr[:, :, :nKV].contiguous(), qr[:, :, :nKV].contiguous(), start)
        return ops.cache_attention(qr, kc, vc, start, 0.25)

    eager_k, eager_v = kc.clone(), vc.clone()
    expected = f(q, eager_k, eager_v)
    comp_k, comp_v = kc.clone(), vc.clone()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, comp_k, comp_v)
    assert_bitwise(got, expected, "compiled vs eager")
    assert_bitwise(comp_k, eager_k, "k_cache mutated under compile")


# --------------------------------------------------------------------------------------------------------------
# Argument errors: RuntimeError naming the argument, never a crash
# --------------------------------------------------------------------------------------------------------------

def _err_cases():
    bf16 = torch.bfloat16
    B, T, nH, nKV, S, D = 2, 3, 4, 2, 16, 64
    q = torch.randn(B, T, nH, D)
    kc, vc = torch.zeros(B, nKV, S, D), torch.zeros(B, nKV, S, D)
    k, v = torch.randn(B, T, nKV, D), torch.randn(B, T, nKV, D)
    start = torch.tensor([0, 5])
    cos, sin = rope_tables(32, D)
    pos = torch.zeros(B, T, dtype=torch.int64)
    x, w = torch.randn(B, T, 576), torch.randn(576)
    att, rope, kvw, rms = ops.cache_attention, ops.rope, ops.kv_cache_write, ops.rms_norm
    return {
        # cache_attention
        "attn q rank": (lambda: att(q[0], kc, vc, start, 1.0), "cache_attention: q must be 4-D [B, T, nH, D], got 3-D"),
        "attn k_cache rank": (lambda: att(q, kc[0], vc, start, 1.0), "cache_attention: k_cache must be 4-D"),
        "attn v_cache shape": (lambda: att(q, kc, vc[:, :, :8].contiguous(), start, 1.0),
                               "cache_attention: v_cache must have the shape of k_cache"),
        "attn dtype": (lambda: att(q, kc.to(bf16), vc.to(bf16), start, 1.0),
                       "cache_attention: k_cache must have the dtype of q (float32), got bfloat16"),
        "attn v dtype": (lambda: att(q, kc, vc.to(bf16), start, 1.0), "cache_attention: v_cache must have the dtype"),
        "attn q dtype": (lambda: att(q.double(), kc.double(), vc.double(), start, 1.0),
                         "cache_attention: q must be float32, bfloat16 or float16, got float64"),
        "attn q noncontig": (lambda: att(q.transpose(1, 2), kc, vc, start, 1.0), "cache_attention: q must be contiguous"),
        "attn cache noncontig": (lambda: att(q, kc.transpose(0, 1).contiguous().transpose(0, 1), vc, start, 1.0),
                                 "cache_attention: k_cache must be contiguous"),
        "attn start dtype": (lambda: att(q, kc, vc, start.int(), 1.0), "cache_attention: start must be int64, got int32"),
        "attn start shape": (lambda: att(q, kc, vc, start[:1], 1.0), "cache_attention: start.size(0) (B) must be 2"),
        "attn start high": (lambda: att(q, kc, vc, torch.tensor([0, 14]), 1.0),
                            "cache_attention: start[1] = 14 is out of range"),
        "attn start negative": (lambda: att(q, kc, vc, torch.tensor([-1, 0]), 1.0),
                                "cache_attention: start[0] = -1 is out of range"),
        "attn gqa": (lambda: att(torch.randn(B, T, 3, D), kc, vc, start, 1.0),
                     "cache_attention: q heads nH = q.size(2) = 3 must be a multiple"),
        "attn D": (lambda: att(q[..., :32].contiguous(), kc, vc, start, 1.0), "cache_attention: k_cache.size(3) (head dim D)"),
        "attn D max": (lambda: att(torch.randn(1, 1, 2, 320), torch.zeros(1, 2, 4, 320), torch.zeros(1, 2, 4, 320),
                                   torch.tensor([0]), 1.0), "cache_attention: q.size(3) (head dim D) must be in [1, 256]"),
        "attn batch": (lambda: att(q, kc[:1].contiguous(), vc[:1].contiguous(), start, 1.0),
                       "cache_attention: k_cache.size(0) (B) must be 2"),
        # kv_cache_write
        "kvw k rank": (lambda: kvw(kc, vc, k[0], v, start), "kv_cache_write: k must be 4-D [B, T, nKV, D], got 3-D"),
        "kvw v shape": (lambda: kvw(kc, vc, k, v[:, :2].contiguous(), start), "kv_cache_write: v must have the shape of k"),
        "kvw dtype": (lambda: kvw(kc, vc, k.to(bf16), v.to(bf16), start),
                      "kv_cache_write: k_cache must have the dtype of k (bfloat16), got float32"),
        "kvw v dtype": (lambda: kvw(kc, vc, k, v.to(bf16), start), "kv_cache_write: v must have the dtype of k"),
        "kvw heads": (lambda: kvw(kc, vc, torch.randn(B, T, 4, D), torch.randn(B, T, 4, D), start),
                      "kv_cache_write: k_cache.size(1) (nKV = k.size(2)) must be 4"),
        "kvw noncontig": (lambda: kvw(kc, vc, k.transpose(1, 2).contiguous().transpose(1, 2), v, start),
                          "kv_cache_write: k must be contiguous"),
        "kvw cache noncontig": (lambda: kvw(kc, vc.transpose(2, 3).contiguous().transpose(2, 3), k, v, start),
                                "kv_cache_write: v_cache must be contiguous"),
        "kvw start high": (lambda: kvw(kc, vc, k, v, torch.tensor([14, 0])), "kv_cache_write: start[0] = 14 is out of range"),
        "kvw start negative": (lambda: kvw(kc, vc, k, v, torch.tensor([0, -3])),
                               "kv_cache_write: start[1] = -3 is out of range"),
        "kvw start dtype": (lambda: kvw(kc, vc, k, v, start.float()), "kv_cache_write: start must be int64, got float32"),
        "kvw alias": (lambda: kvw(kc, kc, k, v, start), "kv_cache_write: k_cache and v_cache must be different"),
        # rope
        "rope x rank": (lambda: rope(q[0], pos, cos, sin), "rope: x must be 4-D [B, T, nH, D], got 3-D"),
        "rope positions rank": (lambda: rope(q, pos[0], cos, sin), "rope: positions must be 2-D [B, T], got 1-D"),
        "rope positions shape": (lambda: rope(q, pos[:, :2].contiguous(), cos, sin), "rope: positions.size(1) (T = x.size(1))"),
        "rope positions batch": (lambda: rope(torch.randn(3, T, nH, D), pos, cos, sin),
                                 "rope: positions.size(0) must be B = x.size(0) = 3 (or 1"),
        "rope positions dtype": (lambda: rope(q, pos.int(), cos, sin), "rope: positions must be int64, got int32"),
        "rope positions high": (lambda: rope(q, pos + torch.tensor([[0, 0, 40], [0, 0, 0]]), cos, sin),
                                "rope: positions[0, 2] = 40 is out of range [0, P) with P = cos.size(0) = 32"),
        "rope positions negative": (lambda: rope(q, pos - 1, cos, sin), "rope: positions[0, 0] = -1 is out of range"),
        "rope cos dtype": (lambda: rope(q, pos, cos.to(bf16), sin), "rope: cos must be float32, got bfloat16"),
        "rope cos shape": (lambda: rope(q, pos, cos[:, :16].contiguous(), sin), "rope: cos.size(1) (D/2 = x.size(3)/2) must be 32"),
        "rope sin shape": (lambda: rope(q, pos, cos, sin[:20].contiguous()), "rope: sin must have the shape of cos"),
        "rope odd D": (lambda: rope(torch.randn(1, 1, 1, 5), pos[:1, :1].contiguous(), cos, sin),
                       "rope: x.size(3) (head dim D) must be even, got 5"),
        "rope noncontig": (lambda: rope(q.transpose(1, 2).contiguous().transpose(1, 2), pos, cos, sin),
                           "rope: x must be contiguous"),
        "rope x dtype": (lambda: rope(q.double(), pos, cos, sin), "rope: x must be float32, bfloat16 or float16, got float64"),
        # rms_norm
        "rms weight shape": (lambda: rms(x, w[:100], 1e-5), "rms_norm: weight.size(0) (H = x.size(-1)) must be 576, got 100"),
        "rms weight rank": (lambda: rms(x, w[None], 1e-5), "rms_norm: weight must be 1-D [H], got 2-D"),
        "rms weight dtype": (lambda: rms(x.to(bf16), w.half(), 1e-5),
                             "rms_norm: weight must have the dtype of x (bfloat16) or be float32, got float16"),
        "rms x dtype": (lambda: rms(x.int(), w, 1e-5), "rms_norm: x must be float32, bfloat16 or float16, got int32"),
        "rms noncontig": (lambda: rms(x.transpose(0, 1), w, 1e-5), "rms_norm: x must be contiguous"),
        "rms 0-D": (lambda: rms(torch.tensor(1.0), w, 1e-5), "rms_norm: x must have at least 1 dim"),
    }


test_argument_errors = argument_error_test(_err_cases())


def test_rms_norm_weight_noncontiguous_named():
    x = torch.randn(2, 288)
    with pytest.raises(RuntimeError, match="rms_norm: weight must be contiguous"):
        ops.rms_norm(x, torch.randn(576)[::2], 1e-5)


# --------------------------------------------------------------------------------------------------------------
# CUDA: each op against its CPU twin, batch invariance on the device
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_cuda_rms_norm_and_rope_match_cpu(dtype):
    g = seeded("cuda-norm-rope", dtype)
    for shape in RMS_SHAPES:
        x = randn(shape, dtype, g, scale=3.0)
        for w in (randn(shape[-1:], dtype, g), randn(shape[-1:], torch.float32, g)):
            torch.testing.assert_close(ops.rms_norm(x.cuda(), w.cuda(), 1e-5).cpu(), ops.rms_norm(x, w, 1e-5),
                                       **TOL[dtype])
    for B, T, nH, D in ROPE_SHAPES:
        cos, sin = rope_tables(64, D)
        x = randn((B, T, nH, D), dtype, g)
        pos = torch.randint(0, 64, (B, T), generator=g)
        out = ops.rope(x.cuda(), pos.cuda(), cos.cuda(), sin.cuda()).cpu()
        torch.testing.assert_close(out, ops.rope(x, pos, cos, sin), **TOL[dtype])
        out = ops.rope(x.cuda(), pos[:1].contiguous().cuda(), cos.cuda(), sin.cuda()).cpu()  # shared positions
        torch.testing.assert_close(out, ops.rope(x, pos[:1].contiguous(), cos, sin), **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", CACHE_SHAPES)
def test_cuda_kv_cache_write_matches_cpu(shape, dtype):
    B, T, nKV, S, D = shape
    g = seeded("cuda-kvw", shape, dtype)
    start = random_start(B, T, S, g)
    k, v = randn((B, T, nKV, D), dtype, g), randn((B, T, nKV, D), dtype, g)
    kc = torch.full((B, nKV, S, D), float("nan"), dtype=dtype)
    vc = kc.clone()
    kc_d, vc_d = kc.cuda(), vc.cuda()
    ops.kv_cache_write(kc, vc, k, v, start)
    ops.kv_cache_write(kc_d, vc_d, k.cuda(), v.cuda(), start.cuda())
    assert_bitwise(kc_d.cpu(), kc, "k_cache")
    assert_bitwise(vc_d.cpu(), vc, "v_cache")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_cuda_cache_attention_matches_cpu(shape, dtype):
    B, T, nH, nKV, S, D = shape
    g = seeded("cuda-attn", shape, dtype)
    start = random_start(B, T, S, g)
    q = randn((B, T, nH, D), dtype, g)
    _, (kc, vc) = make_cache(B, nKV, S, D, dtype, start, T, g)
    scale = 1.0 / math.sqrt(D)
    out = ops.cache_attention(q.cuda(), kc.cuda(), vc.cuda(), start.cuda(), scale).cpu()
    assert not out.isnan().any()
    torch.testing.assert_close(out, ops.cache_attention(q, kc, vc, start, scale), **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cache_attention_batch_invariant(dtype):
    B, T, nH, nKV, S, D = 3, 9, 9, 3, 80, 64
    g = seeded("cuda-attn-inv", dtype)
    start = random_start(B, T, S, g)
    q = randn((B, T, nH, D), dtype, g).cuda()
    _, (kc, vc) = make_cache(B, nKV, S, D, dtype, start, T, g)
    kc, vc, start = kc.cuda(), vc.cuda(), start.cuda()
    full = ops.cache_attention(q, kc, vc, start, 0.125)
    for b, t in itertools.product(range(B), range(T)):
        one = ops.cache_attention(q[b:b + 1, t:t + 1].contiguous(), kc[b:b + 1].contiguous(),
                                  vc[b:b + 1].contiguous(), start[b:b + 1] + t, 0.125)
        assert_bitwise(one[0, 0].cpu(), full[b, t].cpu(), f"row b={b} t={t}")
    x = randn((3, 9, 576), dtype, g).cuda()
    w = randn((576,), dtype, g).cuda()
    full = ops.rms_norm(x, w, 1e-5)
    for b, t in itertools.product(range(3), range(9)):
        assert_bitwise(ops.rms_norm(x[b, t:t + 1].contiguous(), w, 1e-5)[0].cpu(), full[b, t].cpu(), "rms row")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_argument_errors_and_devices():
    q = torch.randn(1, 2, 4, 64, device="cuda")
    kc = torch.zeros(1, 2, 8, 64, device="cuda")
    with pytest.raises(RuntimeError, match="cache_attention: k_cache must be on the device of q"):
        ops.cache_attention(q, kc.cpu(), kc, torch.tensor([0], device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match="cache_attention: start must be on the device of q"):
        ops.cache_attention(q, kc, kc.clone(), torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="cache_attention: q must be 4-D"):
        ops.cache_attention(q[0], kc, kc.clone(), torch.tensor([0], device="cuda"), 1.0)
