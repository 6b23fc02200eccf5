"""cache_attention with T > 1 (verification, prefill): the rows of a GQA group are computed together, and every
row stays bitwise equal to computing it alone (T = 1) -- across key blocks, chunkings, thread counts and head dims."""
from __future__ import annotations

import math

import pytest
import torch

from layerskip_ext import ops
from helpers import TOL, assert_bitwise, make_cache, randn, seeded

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

SHAPES = [  # B, T, nH, nKV, S, D
    (1, 7, 9, 3, 300, 64),    # SmolLM2 verification, keys over several 64-key blocks
    (2, 16, 4, 1, 200, 128),  # group of 4 x 16 tokens
    (1, 1, 9, 3, 2048, 64),   # decode at a long context
    (2, 5, 6, 2, 131, 72),    # head dim known only at run time
    (3, 3, 2, 2, 70, 32),     # no GQA sharing
    (1, 7, 5, 1, 300, 32),    # nano-layerskip verification: MQA, 35 rows of head dim 32 (the 2-block value sum)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_rows_equal_rows_alone(shape, dtype, restore_threads):
    B, T, nH, nKV, S, D = shape
    g = seeded("attn-group", shape, dtype)
    start = torch.randint(0, S - T + 1, (B,), generator=g)
    start[0] = S - T  # one sequence at the very end of the cache
    q = randn((B, T, nH, D), dtype, g)
    (kc_clean, vc_clean), (kc, vc) = make_cache(B, nKV, S, D, dtype, start, T, g)  # NaN beyond start + T
    scale = 1.0 / math.sqrt(D)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        full = ops.cache_attention(q, kc, vc, start, scale)
        assert not full.isnan().any()
        results[n] = full
        for b in range(B):
            kb, vb = kc[b:b + 1].contiguous(), vc[b:b + 1].contiguous()
            for t in range(T):
                one = ops.cache_attention(q[b:b + 1, t:t + 1].contiguous(), kb, vb, start[b:b + 1] + t, scale)
                assert_bitwise(one[0, 0], full[b, t], f"b={b} t={t} alone, {n} threads")
            for h in range(0, nH, max(1, nH // nKV)):  # a single head's rows (GQA group of one)
                hq = q[b:b + 1, :, h:h + 1].contiguous()
                kv = h // (nH // nKV)
                one = ops.cache_attention(hq, kb[:, kv:kv + 1].contiguous(), vb[:, kv:kv + 1].contiguous(),
                                          start[b:b + 1], scale)
                assert_bitwise(one[0, :, 0], full[b, :, h], f"b={b} head {h} alone")
    assert_bitwise(results[1], results[2], "1 vs 2 threads")
    torch.testing.assert_close(results[1], ops.cache_attention_reference(q, kc_clean, vc_clean, start, scale),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_isa_tables_agree_bitwise(dtype):
    """The score dot and the weighted value sum come from the gemm kernel tables: all tables, the same bits."""
    from test_ops_linear import gemm_isa, gemm_isas

    isas = gemm_isas()
    if len(isas) < 2:
        pytest.skip(f"only {isas} available here")
    g = seeded("attn-isa", dtype)
    cases = []
    for B, T, nH, nKV, S, D in [(1, 7, 9, 3, 150, 64), (2, 3, 4, 2, 40, 128), (1, 2, 2, 1, 33, 40),
                                (1, 7, 5, 1, 150, 32)]:
        start = torch.randint(0, S - T + 1, (B,), generator=g)
        q = randn((B, T, nH, D), dtype, g)
        _, (kc, vc) = make_cache(B, nKV, S, D, dtype, start, T, g)
        cases.append((q, kc, vc, start, D ** -0.5))
    expected = [ops.cache_attention(*c) for c in cases]
    for isa in isas:
        with gemm_isa(isa):
            for c, e in zip(cases, expected):
                assert_bitwise(ops.cache_attention(*c), e, f"{isa} vs {isas[0]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_scores_match_the_reference(dtype):
    """Scores of -inf (a key the query cannot see) weigh nothing; a NaN score makes its row NaN, as in the
    reference softmax (the row maximum is taken lane by lane: a NaN must neither win it nor vanish)."""
    B, T, nH, nKV, S, D = 1, 3, 4, 1, 90, 32
    g = seeded("attn-special", dtype)
    start = torch.tensor([80])
    q = randn((B, T, nH, D), dtype, g).abs()  # positive: a key of -inf scores -inf
    (kc, vc), _ = make_cache(B, nKV, S, D, dtype, start, T, g, poison=False)
    kc[0, 0, [0, 17, 33, 34, 79]] = float("-inf")  # in lanes, in a tail, and the first key
    scale = 1.0 / math.sqrt(D)
    out = ops.cache_attention(q, kc, vc, start, scale)
    ref = ops.cache_attention_reference(q, kc, vc, start, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    kc[0, 0, 40, 3] = float("nan")  # key 40: every query's score is NaN from position 40 on
    out = ops.cache_attention(q, kc, vc, start, scale)
    ref = ops.cache_attention_reference(q, kc, vc, start, scale)
    assert out.isnan().all() and ref.isnan().all()
