"""Every CUDA launcher (csrc/cuda/launchers.h) executed on the CPU: kernels.cu compiled by g++ under the CUDA
emulator with AddressSanitizer + UBSan (tests/emulated_cuda.py), compared with its CPU twin and the ops.py
references on fresh random inputs of awkward shapes, outputs and scratch poisoned, every tensor between guard
zones, in three thread orders (forward, reverse, seeded random) that must agree bit for bit; batch invariance
(a row alone vs in a batch) bitwise. The emulator's own checks (barriers, shuffles, launch configurations,
shared-memory poison, sanitizer reports) are tested first, with kernels that break the rules on purpose.

Not executed here: csrc/cuda/ops_cuda.cpp (device guards, streams); its argument checks are common/validate.h,
which the CPU ops run. The harness does what ops_cuda.cpp does around each launcher.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import emulated_cuda as E
from layerskip_ext import ops
from helpers import TOL, assert_bitwise, check_linear_bound, randn, rope_tables, seeded

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")


def _library_or_skip():
    try:
        return E.library()
    except E.Unavailable as e:
        if os.environ.get("LAYERSKIP_EXPECT_CUDA") == "1":  # CI has the toolkit: a missing build is a failure
            raise
        pytest.skip(f"emulated CUDA build unavailable: {e}")


@pytest.fixture(scope="module", autouse=True)
def lib():
    return _library_or_skip()


ORDERS = [("forward", 0), ("reverse", 0), ("random", 20261201)]
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5


def in_all_orders(fn, misalign: int = 0):
    """fn(emulated) in every thread order; the results (a tensor or a tuple of them) must agree bitwise."""
    results = [fn(E.Emulated(order, seed, misalign)) for order, seed in ORDERS]
    first = results[0] if isinstance(results[0], tuple) else (results[0],)
    for (order, _), r in zip(ORDERS[1:], results[1:]):
        for a, b in zip(first, r if isinstance(r, tuple) else (r,)):
            if a.dtype.is_floating_point:
                assert_bitwise(a, b, f"{order} vs forward thread order")
            else:
                assert torch.equal(a, b), f"{order} vs forward thread order"
    return results[0]


def assert_same_nans_and_close(got, want, **tol):
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ"
    ok = ~want.isnan()
    torch.testing.assert_close(got[ok].float(), want[ok].float(), **tol)


# --------------------------------------------------------------------------------------------------------------
# the emulator itself
# --------------------------------------------------------------------------------------------------------------

def _selftest(lib, fn, *args):
    getattr(lib, fn)(*args)
    E.take_error(lib)


MISUSE = {
    0: r"__syncthreads at .*cuda_emulator_selftest.cu:\d+ in .*partial_barrier_kernel.* reached by only 48 of 64",
    1: r"__syncthreads at .*divergent_barrier_kernel.* reached by only 32 of 64 .*\n.*\n  thread \d+ waits at",
    2: r"__shfl_xor_sync at .*missing_lanes_kernel.* lanes missing .*\n  lane 1 returned",
    3: r"__shfl_down_sync at .*short_warp_kernel.*: mask 0xffffffff names lane 16, which does not exist",
    4: r"invalid launch configuration at .*cuda_emulator_selftest.cu:\d+ .*block \(2048, 1, 1\)",
    5: r"invalid launch configuration at .*grid \(1, 70000, 1\)",
}


@pytest.mark.parametrize("which", sorted(MISUSE))
def test_emulator_reports_misuse_with_site(lib, which):
    out = torch.zeros(64)
    with pytest.raises(E.EmulatorError, match=MISUSE[which]):
        _selftest(lib, "ls_emu_selftest_misuse", which, out.data_ptr())
    # the error is taken: the next launch runs
    _selftest(lib, "ls_emu_selftest_neighbour", out.data_ptr(), 1, 1)


def test_missing_barrier_shows_in_some_thread_order(lib):
    want = ((torch.arange(64) + 1) % 64).float().add(0.5).repeat(2)
    results = {}
    for order, seed in ORDERS:
        for barrier in (0, 1):
            lib.ls_emu_set_order(E.ORDERS[order], seed)
            out = torch.full((128,), float("nan"))
            _selftest(lib, "ls_emu_selftest_neighbour", out.data_ptr(), 2, barrier)
            results[order, barrier] = out
    for order, _ in ORDERS:
        assert torch.equal(results[order, 1], want), order
    # without the barrier, forward order reads the neighbour's slot before it is written: the poison (NaN)
    assert results["forward", 0].isnan().sum() >= 64
    assert not torch.equal(results["forward", 0], results["reverse", 0])


def test_shared_memory_is_poisoned_at_every_block_start(lib):
    out = torch.zeros(64, dtype=torch.int32)
    _selftest(lib, "ls_emu_selftest_read_before_write", out.data_ptr())
    assert (out == -1).all(), "a read before any write must see all bits set, in every block"


def test_warp_collectives_semantics(lib):
    for order, seed in ORDERS:
        lib.ls_emu_set_order(E.ORDERS[order], seed)
        out = torch.full((64, 8), -99, dtype=torch.int32)
        _selftest(lib, "ls_emu_selftest_collectives", out.data_ptr())
        for t in range(64):
            lane = t % 32
            up = lane - 3 if lane % 8 >= 3 else lane
            ballot = sum(1 << i for i in range(32) if i % 3 == 0)
            want = [(lane ^ 5) * 10, (lane + 3 if lane + 3 < 32 else lane) * 10, up * 10,
                    ((lane // 16) * 16 + 7) * 10, ballot - (1 << 32 if ballot >= 1 << 31 else 0), 1, 0, lane ^ 1]
            assert out[t].tolist() == want, (order, t)


def test_shared_atomics(lib):
    n = 1000
    bins = torch.randint(0, 16, (n,), generator=seeded("hist"), dtype=torch.int32)
    counts = torch.zeros(16, dtype=torch.int32)
    weights = torch.zeros(16, dtype=torch.int64)
    _selftest(lib, "ls_emu_selftest_histogram", bins.data_ptr(), n, counts.data_ptr(), weights.data_ptr())
    assert torch.equal(counts.long(), torch.bincount(bins.long(), minlength=16))
    assert torch.equal(weights, torch.zeros(16, dtype=torch.int64).index_add_(0, bins.long(), torch.arange(n)))


def test_out_of_bounds_reads_are_reported(lib):
    L = E.Launch(lib)
    x = L.copy(torch.arange(10, dtype=torch.float32))
    out = L.output((1,), torch.float32)
    L.run("ls_emu_selftest_over_read", x.data_ptr(), 9, out.data_ptr())  # the last element: fine
    assert out.item() == 9.0
    with pytest.raises(E.EmulatorError, match=r"(?s)AddressSanitizer: use-after-poison.*over_read_kernel"):
        L.run("ls_emu_selftest_over_read", x.data_ptr(), 10, out.data_ptr())
    out8 = torch.zeros(8)
    _selftest(lib, "ls_emu_selftest_shared_over_read", out8.data_ptr(), 7)
    with pytest.raises(E.EmulatorError, match=r"(?s)shared_over_read_kernel|index 8 out of bounds"):
        _selftest(lib, "ls_emu_selftest_shared_over_read", out8.data_ptr(), 8)


# --------------------------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("rows,H", [(1, 1), (3, 7), (2, 64), (5, 577), (2, 1000), (1, 4096)])
@pytest.mark.parametrize("w_f32", [False, True])
def test_rms_norm(rows, H, dtype, w_f32):
    g = seeded("emu-rms", rows, H, dtype, w_f32)
    x = randn((rows, H), dtype, g, scale=3.0)
    w = randn((H,), torch.float32 if w_f32 else dtype, g)
    y = in_all_orders(lambda e: e.rms_norm(x, w, EPS))
    torch.testing.assert_close(y, ops.rms_norm(x, w, EPS), **TOL[dtype])
    torch.testing.assert_close(y, ops.rms_norm_reference(x, w, EPS), **TOL[dtype])
    e = E.Emulated()
    assert_bitwise(e.rms_norm(x[-1:], w, EPS)[0], y[-1], "row alone vs in the batch")
    assert_bitwise(E.Emulated(misalign=x.element_size()).rms_norm(x, w, EPS), y, "misaligned")


# --------------------------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 3, 4, 8), (1, 7, 3, 64), (2, 2, 2, 80), (2, 4, 4, 128),
                                   (1, 2, 1, 256)])
def test_rope(shape, dtype):
    B, T, nH, D = shape
    g = seeded("emu-rope", shape, dtype)
    P = 50
    cos, sin = rope_tables(P, D)
    x = randn(shape, dtype, g)
    positions = torch.randint(0, P, (B, T), generator=g)
    out = in_all_orders(lambda e: e.rope(x, positions, cos, sin))
    assert_bitwise(out, ops.rope(x, positions, cos, sin), "CPU twin")  # the same float32 operations
    shared = positions[:1]
    assert_bitwise(E.Emulated().rope(x, shared, cos, sin), ops.rope(x, shared, cos, sin), "positions [1, T]")
    # A position outside [0, P) gives NaN in its row (the CPU op raises instead; the kernels never read out of range).
    bad = positions.clone()
    bad[0, 0], bad[-1, -1] = P, -1
    out = E.Emulated("random", 5).rope(x, bad, cos, sin)
    assert out[0, 0].isnan().all() and out[-1, -1].isnan().all()
    ok = torch.ones(B, T, dtype=torch.bool)
    ok[0, 0] = ok[-1, -1] = False
    assert_bitwise(out[ok], ops.rope(x, positions, cos, sin)[ok], "other rows")


# --------------------------------------------------------------------------------------------------------------
# kv_cache_write
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("B,T,nKV,S,D", [(1, 1, 1, 4, 7), (2, 3, 2, 9, 64), (3, 7, 1, 16, 80), (2, 1, 4, 5, 128),
                                         (2, 4, 2, 16, 128)])
def test_kv_cache_write(B, T, nKV, S, D, dtype):
    g = seeded("emu-kv", B, T, nKV, S, D, dtype)
    kc = randn((B, nKV, S, D), dtype, g)
    vc = randn((B, nKV, S, D), dtype, g)
    k = randn((B, T, nKV, D), dtype, g)
    v = randn((B, T, nKV, D), dtype, g)
    start = torch.randint(0, S - T + 1, (B,), generator=g)
    got_k, got_v = in_all_orders(lambda e: e.kv_cache_write(kc, vc, k, v, start))
    want_k, want_v = kc.clone(), vc.clone()
    ops.kv_cache_write(want_k, want_v, k, v, start)
    assert_bitwise(got_k, want_k, "k cache")
    assert_bitwise(got_v, want_v, "v cache")
    # Slots past the cache are not written (the CPU op raises); the others are.
    start[0] = S - 1
    got_k, _ = E.Emulated("reverse").kv_cache_write(kc, vc, k, v, start)
    want = kc.clone()
    want[0, :, S - 1] = k[0, 0]
    assert_bitwise(got_k[0], want[0], "a write running past the cache")


# --------------------------------------------------------------------------------------------------------------
# cache_attention
# --------------------------------------------------------------------------------------------------------------

ATTN_CASES = [  # B, T, nH, nKV, S, D
    (1, 1, 1, 1, 1, 7), (2, 1, 4, 4, 9, 64), (1, 4, 8, 2, 33, 80), (2, 7, 6, 1, 70, 128), (1, 2, 2, 2, 300, 64),
    (1, 3, 2, 1, 10, 32), (1, 1, 3, 3, 5, 256),
]


def attention_inputs(B, T, nH, nKV, S, D, dtype, g):
    q = randn((B, T, nH, D), dtype, g)
    kc = randn((B, nKV, S, D), dtype, g)
    vc = randn((B, nKV, S, D), dtype, g)
    start = torch.randint(0, S - T + 1, (B,), generator=g)
    start[0] = S - T  # the longest cache
    return q, kc, vc, start


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("B,T,nH,nKV,S,D", ATTN_CASES)
def test_cache_attention(B, T, nH, nKV, S, D, dtype):
    g = seeded("emu-attn", B, T, nH, nKV, S, D, dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    scale = 1.0 / math.sqrt(D)
    out = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, scale))
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ops.cache_attention(q, kc, vc, start, scale), **tol)
    torch.testing.assert_close(out, ops.cache_attention_reference(q, kc, vc, start, scale), **tol)
    # Token t verified with the others (T = d + 1) is bitwise token t decoded alone (T = 1).
    e = E.Emulated()
    for t in range(T):
        alone = e.cache_attention(q[:, t:t + 1].contiguous(), kc, vc, start + t, scale)
        assert_bitwise(alone[:, 0], out[:, t], f"token {t} alone vs verified with {T}")
    # A row whose position is outside the cache is NaN (the CPU op raises).
    far = start.clone()
    far[-1] = S - T + 1
    out = E.Emulated("random", 3).cache_attention(q, kc, vc, far, scale)
    assert out[-1, -1].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_special_scores(dtype):
    """-inf, +inf and NaN scores as the CPU twin treats them (a -inf key weighs 0; NaN and +inf give NaN)."""
    B, T, nH, nKV, S, D = 1, 2, 4, 2, 40, 64
    g = seeded("emu-attn-special", dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    q[0, :, 0] = 0.0
    q[0, :, 0, 0] = 1.0             # head 0: q = e_0
    kc[0, 0, 0, 0] = float("-inf")  # so the first key of kv head 0 scores -inf for query head 0 (others: NaN)
    kc[0, 0, 5, 0] = float("-inf")  # and a later one
    kc[0, 1, 3, 0] = float("inf")   # kv head 1: +inf / NaN scores
    q[0, 1, 3, 7] = float("nan")    # a NaN query
    scale = 0.125
    out = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, scale))
    want = ops.cache_attention(q, kc, vc, start, scale)
    assert_same_nans_and_close(out, want, **(TOL[dtype] if dtype != torch.float32 else dict(rtol=2e-5, atol=2e-5)))
    assert not out[0, :, 0].isnan().any(), "a key scoring -inf must weigh 0, not poison the row"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_inf", [32, 40, 64, 70])
def test_cache_attention_whole_tiles_scoring_minus_inf(n_inf, dtype):
    """The first n_inf keys score -inf for query head 0: a whole 32-key tile (and for 64+, a whole 64-key chunk)
    the row sees contributes nothing. The online softmax then steps from m = -inf to m = -inf, where
    exp(m_old - m_new) is NaN unless guarded: the row must stay the twin's finite result."""
    B, T, nH, nKV, S, D = 1, 2, 2, 1, 100, 64
    g = seeded("emu-attn-tiles", n_inf, dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    q[0, :, 0] = 0.0
    q[0, :, 0, 0] = 1.0                      # head 0: q = e_0
    kc[0, 0, :n_inf, 0] = float("-inf")     # keys 0 .. n_inf - 1 score -inf for head 0 (NaN for head 1: 0 * inf)
    scale = 0.125
    out = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, scale))
    want = ops.cache_attention(q, kc, vc, start, scale)
    assert not out[:, :, 0].isnan().any(), "keys scoring -inf must weigh 0, not poison the row"
    assert_same_nans_and_close(out, want, **(TOL[dtype] if dtype != torch.float32 else dict(rtol=2e-5, atol=2e-5)))


# --------------------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------------------

LINEAR_CASES = [(1, 1, 1), (1, 16, 5), (3, 17, 33), (7, 576, 40), (8, 100, 31), (9, 64, 65), (16, 577, 3),
                (17, 15, 100), (2, 1000, 257)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("M,K,N", LINEAR_CASES)
def test_linear(M, K, N, dtype):
    g = seeded("emu-linear", M, K, N, dtype)
    x = randn((M, K), dtype, g)
    w = randn((N, K), dtype, g, scale=0.2)
    out = in_all_orders(lambda e: e.linear(x, w))
    assert out.shape == (M, N) and out.dtype == dtype
    check_linear_bound(out, x, w)
    e = E.Emulated()
    for i in {0, M // 2, M - 1}:
        assert_bitwise(e.linear(x[i:i + 1], w)[0], out[i], f"row {i} alone vs in {M}")
    assert_bitwise(E.Emulated(misalign=x.element_size()).linear(x, w), out, "misaligned (scalar loads)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_special_values(dtype):
    g = seeded("emu-linear-special", dtype)
    x = randn((3, 40), dtype, g)
    w = randn((9, 40), dtype, g)
    x[0, 5] = float("inf")
    x[1, 7] = float("nan")
    w[4] = float("-inf")
    out = in_all_orders(lambda e: e.linear(x, w))
    want = x.double() @ w.double().T
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())


# --------------------------------------------------------------------------------------------------------------
# exit heads
# --------------------------------------------------------------------------------------------------------------

def head_inputs(M, H, V, dtype, g, nw_dtype=None):
    h = randn((M, H), dtype, g, scale=3.0)
    nw = randn((H,), nw_dtype or dtype, g)
    head = randn((V, H), dtype, g)
    return h, nw, head


HEAD_CASES = [(1, 16, 1, None), (4, 64, 33, None), (9, 577, 257, None), (3, 100, 1000, 300), (2, 48, 600, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,V,subset_len", HEAD_CASES)
def test_exit_head_argmax(M, H, V, subset_len, dtype):
    g = seeded("emu-argmax", M, H, V, subset_len, dtype)
    h, nw, head = head_inputs(M, H, V, dtype, g)
    subset = None if subset_len is None else torch.randperm(V, generator=g)[:subset_len]
    if V > 40:  # exact ties between columns in one warp, one block apart, and in the last partial block
        head[V - 3] = head[V // 2]
        head[7] = head[3]
        head[V - 1] = head[1]
    got = in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head, subset))
    e = E.Emulated()
    assert torch.equal(got, ops.exit_head_argmax_composed(h, nw, EPS, head, subset, e.rms_norm, e.linear))
    # The CPU twin's logits differ in their last bits: its choice scores the same up to that.
    cpu = ops.exit_head_argmax(h, nw, EPS, head, subset)
    cpu_logits = ops.linear(ops.rms_norm(h, nw, EPS), head).float()
    gap = cpu_logits.gather(1, cpu[:, None]) - cpu_logits.gather(1, got[:, None])
    rel = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    assert (gap.abs() <= rel * cpu_logits.abs().amax(1, keepdim=True)).all()
    assert torch.equal(e.exit_head_argmax(h[-1:], nw, EPS, head, subset)[0], got[-1]), "row alone"


@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_head_argmax_ties_nan_inf(dtype):
    """torch.argmax's order: the first NaN wins, then the largest (+inf included), ties to the lowest id."""
    M, H, V = 3, 32, 300
    g = seeded("emu-argmax-special", dtype)
    base = randn((H,), dtype, g)
    h = (base + 0.01 * randn((M, H), dtype, g)).to(dtype)
    nw = torch.ones(H, dtype=dtype)
    head = 0.1 * randn((V, H), dtype, g)
    head[40] = head[250] = (5 * base).to(dtype)  # the clear winner, twice: 40 wins
    got = in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head))
    assert got.tolist() == [40] * M
    assert torch.equal(got, ops.exit_head_argmax(h, nw, EPS, head)), "CPU twin"
    head[260] = float("nan")
    head[280] = float("nan")
    assert in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head)).tolist() == [260] * M
    head[260] = head[280] = 0.0
    head[270] = 3e38 * torch.sign(base).to(dtype)  # overflows to +inf
    got = in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head))
    assert got.tolist() == [270] * M and torch.equal(got, ops.exit_head_argmax(h, nw, EPS, head))
    sub = torch.tensor([250, 12, 40, 270])
    assert in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head, sub)).tolist() == [270] * M
    head[270] = 0.0
    assert in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head, sub)).tolist() == [250] * M


def test_exit_head_argmax_many_rows():
    """More rows than the final argmax's 1-D grid holds at once (its grid-stride loop: LAYERSKIP_GRID_1D_CAP)."""
    M, H, V = 600, 8, 3
    g = seeded("emu-argmax-rows")
    h, nw, head = head_inputs(M, H, V, torch.float32, g)
    got = E.Emulated().exit_head_argmax(h, nw, EPS, head)
    assert torch.equal(got, ops.exit_head_argmax(h, nw, EPS, head))


SAMPLE_PARAMS = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.9, 50, 0.8), (1.0, 1, 1.0), (0.6, 0, 0.3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", SAMPLE_PARAMS)
def test_exit_head_sample(params, dtype):
    T, k, p = params
    M, H, V = 3, 40, 700
    g = seeded("emu-sample", params, dtype)
    h, nw, head = head_inputs(M, H, V, dtype, g)
    head[10] = head[600]  # tied probabilities (at the top-k / top-p thresholds when they fall there)
    u = torch.rand(M, generator=g)
    subset = torch.randperm(V, generator=g)[:500]
    e = E.Emulated()
    for sub in (None, subset):
        tokens, probs = in_all_orders(lambda e: e.exit_head_sample(h, nw, EPS, head, u, T, k, p, sub))
        ref_tokens, ref_probs = ops.exit_head_sample_composed(h, nw, EPS, head, u, T, k, p, sub, e.rms_norm, e.linear)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-9)
        t1, p1 = e.exit_head_sample(h[1:2], nw, EPS, head, u[1:2], T, k, p, sub)
        assert t1.item() == tokens[1].item()
        assert_bitwise(p1[0], probs[1], "row alone vs in the batch")
        cpu_tokens, cpu_probs = ops.exit_head_sample(h, nw, EPS, head, u, T, k, p, sub)
        torch.testing.assert_close(probs, cpu_probs, rtol=1e-3, atol=1e-6)  # the CPU logits' last bits differ


@pytest.mark.parametrize("params", SAMPLE_PARAMS)
def test_exit_head_sample_several_blocks_a_row_equal_one(params):
    """The multi-block path (a launch per step over (P, M) blocks, exact cross-block reductions) gives the one-block
    kernel's tokens and distribution bit for bit: P forced to 2, 3 and 7 (a last block with a short chunk), and the
    launcher's own choice at a V where it takes several; ties at the thresholds; every thread order."""
    T, k, p = params
    M, H, V = 3, 24, 1800  # 8 chunks, the last one short
    g = seeded("emu-sample-blocks", params)
    h, nw, head = head_inputs(M, H, V, torch.float32, g)
    head[10] = head[1700]  # tied probabilities, in different blocks
    head[11] = head[600]
    u = torch.rand(M, generator=g)
    e = E.Emulated()
    one_t, one_p = e.exit_head_sample(h, nw, EPS, head, u, T, k, p, None, 1)
    for P in (2, 3, 7):
        t, pr = in_all_orders(lambda e: e.exit_head_sample(h, nw, EPS, head, u, T, k, p, None, P))
        assert torch.equal(t, one_t), P
        assert_bitwise(pr, one_p, f"{P} blocks a row vs one")
    # Top-p cutting through a tie group spread over every block: which ties stay is their rank in id order across
    # the blocks (12 equal top logits, top-p keeping some of them).
    top = int(ops.exit_head_argmax(h[:1], nw, EPS, head))
    tied = head.clone()
    tied[torch.arange(5, V, 150)] = head[top]
    one_t, one_p = e.exit_head_sample(h[:1], nw, EPS, tied, u[:1], 1.0, 0, 0.3, None, 1)
    kept = int((one_p[0] > 0).sum())
    assert 1 < kept < 12, kept  # the cut falls inside the tie group
    for P in (3, 7):
        t, pr = e.exit_head_sample(h[:1], nw, EPS, tied, u[:1], 1.0, 0, 0.3, None, P)
        assert torch.equal(t, one_t)
        assert_bitwise(pr, one_p, f"tied top-p, {P} blocks a row vs one")
    V2 = 2600  # 11 chunks: the launcher takes several blocks a row by itself
    assert e.lib.ls_emu_head_sample_blocks(V2) > 1 and e.lib.ls_emu_head_sample_blocks(V) == 1
    h2, nw2, head2 = head_inputs(2, H, V2, torch.float32, g)
    auto_t, auto_p = e.exit_head_sample(h2, nw2, EPS, head2, u[:2], T, k, p)
    one_t, one_p = e.exit_head_sample(h2, nw2, EPS, head2, u[:2], T, k, p, None, 1)
    assert torch.equal(auto_t, one_t)
    assert_bitwise(auto_p, one_p, "the launcher's blocks a row vs one")
    cpu_t, _ = ops.exit_head_sample(h2, nw2, EPS, head2, u[:2], T, k, p)
    ref_t, _ = ops.exit_head_sample_composed(h2, nw2, EPS, head2, u[:2], T, k, p, None, e.rms_norm, e.linear)
    assert torch.equal(auto_t, ref_t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_head_log_softmax(dtype):
    M, H, V = 5, 64, 900
    g = seeded("emu-logsm", dtype)
    h, nw, head = head_inputs(M, H, V, dtype, g)
    subset = torch.randperm(V, generator=g)[:333]
    e = E.Emulated()
    for sub in (None, subset):
        out = in_all_orders(lambda e: e.exit_head_log_softmax(h, nw, EPS, head, sub))
        composed = ops.exit_head_log_softmax_composed(h, nw, EPS, head, sub, e.rms_norm, e.linear)
        torch.testing.assert_close(out, composed, rtol=1e-7, atol=1e-6)
        torch.testing.assert_close(out, ops.exit_head_log_softmax(h, nw, EPS, head, sub), **TOL[dtype])
        assert_bitwise(e.exit_head_log_softmax(h[3:4], nw, EPS, head, sub)[0], out[3], "row alone")


# --------------------------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,D", [(1, 0), (1, 1), (5, 3), (33, 6), (600, 2)])
def test_verify_greedy(B, D):
    g = seeded("emu-vg", B, D)
    target = torch.randint(0, 5, (B, D + 1), generator=g)
    drafts = target[:, :D].clone()
    flip = torch.rand(B, D, generator=g) < 0.3
    drafts[flip] = (drafts[flip] + 1) % 5
    positions = torch.randint(0, 100, (B,), generator=g)
    accepted, nxt, pos = in_all_orders(lambda e: e.verify_greedy(drafts, target, positions))
    want_pos = positions.clone()
    want_acc, want_next = ops.verify_greedy_reference(drafts, target, want_pos)
    assert torch.equal(accepted, want_acc) and torch.equal(nxt, want_next) and torch.equal(pos, want_pos)


def distributions(shape, V, g, zeros=0.3):
    w = torch.rand(*shape, V, generator=g)
    w[torch.rand(*shape, V, generator=g) < zeros] = 0.0
    w[..., 0] += 1e-3  # never all zero
    return (w / w.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("B,D,V", [(1, 0, 1), (1, 1, 300), (3, 4, 1000), (2, 2, 257)])
def test_verify_sampling(B, D, V):
    g = seeded("emu-vs", B, D, V)
    p = distributions((B, D + 1), V, g)
    q = distributions((B, D), V, g)
    if D:
        q[0, 0] = p[0, 0]  # a residual with no mass: the token comes from p
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, D) if D else torch.zeros(B, 0, dtype=torch.long)
    u = torch.rand(B, D + 1, generator=g)
    positions = torch.randint(0, 50, (B,), generator=g)
    accepted, nxt, pos = in_all_orders(lambda e: e.verify_sampling(drafts, q, p, u, positions))
    cpu_pos = positions.clone()
    cpu_acc, cpu_next = ops.verify_sampling(drafts, q, p, u, cpu_pos)
    assert torch.equal(accepted, cpu_acc) and torch.equal(nxt, cpu_next) and torch.equal(pos, cpu_pos)
    ref_pos = positions.clone()
    ref_acc, ref_next = ops.verify_sampling_reference(drafts, q, p, u, ref_pos)
    assert torch.equal(accepted, ref_acc) and torch.equal(nxt, ref_next)


# --------------------------------------------------------------------------------------------------------------
# bad arguments the CUDA ops cannot check without a host sync
# --------------------------------------------------------------------------------------------------------------

def test_empty_lm_head_with_vocab_subset_is_rejected_and_never_read():
    h, nw = torch.randn(2, 16), torch.ones(16)
    empty = torch.empty(0, 16)
    subset = torch.tensor([0, 3])
    for op, extra in ((ops.exit_head_argmax, ()), (ops.exit_head_log_softmax, ()),
                      (ops.exit_head_sample, (torch.full((2,), 0.5), 1.0, 0, 1.0))):
        with pytest.raises(RuntimeError, match="lm_head must have at least one row"):
            op(h, nw, EPS, empty, *extra, subset) if extra else op(h, nw, EPS, empty, subset)
    # The kernels themselves: no read of the empty head (its guard zones are poisoned), NaN columns.
    e = E.Emulated()
    e.exit_head_argmax(h, nw, EPS, empty, subset)
    assert e.exit_head_log_softmax(h, nw, EPS, empty, subset).isnan().all()
    assert e.take_device_errors() == E.DEVICE_ERRORS["vocab_subset"]


def test_device_side_bad_ids_set_the_error_word():
    """What the CPU ops reject by reading values (a vocab_subset entry outside the head, a uniform outside [0, 1),
    a draft outside [0, V)) the CUDA kernels flag in the device error word; the output stays memory-safe."""
    g = seeded("emu-bad-ids")
    h, nw, head = head_inputs(2, 16, 50, torch.float32, g)
    e = E.Emulated("random", 9)
    good = torch.tensor([3, 49, 7])
    bad = torch.tensor([3, 50, -1])
    e.exit_head_argmax(h, nw, EPS, head, good)
    e.exit_head_sample(h, nw, EPS, head, torch.tensor([0.0, 0.999]), 1.0, 0, 1.0, good)
    assert e.take_device_errors() == 0
    for run in (lambda: e.exit_head_argmax(h, nw, EPS, head, bad),
                lambda: e.exit_head_log_softmax(h, nw, EPS, head, bad),
                lambda: e.exit_head_sample(h, nw, EPS, head, torch.full((2,), 0.5), 1.0, 0, 1.0, bad)):
        run()
        assert e.take_device_errors() == E.DEVICE_ERRORS["vocab_subset"]
        assert e.take_device_errors() == 0, "reading the word clears it"
    for u in (1.0, -0.25, float("nan")):
        e.exit_head_sample(h, nw, EPS, head, torch.tensor([0.5, u]), 1.0, 0, 1.0)
        assert e.take_device_errors() == E.DEVICE_ERRORS["uniform"], u
    p = distributions((1, 3), 10, g)
    q = distributions((1, 2), 10, g)
    u = torch.rand(1, 3, generator=g)
    accepted, _, _ = e.verify_sampling(torch.tensor([[10, 2]]), q, p, u, torch.zeros(1, dtype=torch.long))
    assert accepted.item() == 0 and e.take_device_errors() == E.DEVICE_ERRORS["draft"]
    e.verify_sampling(torch.tensor([[9, 2]]), q, p, u, torch.zeros(1, dtype=torch.long))
    assert e.take_device_errors() == 0


def test_verify_sampling_acceptance_boundary():
    """u * q(y) == p(y) exactly rejects (the rule is u * q < p), one float below accepts: as the CPU twin."""
    V = 8
    q = torch.full((2, 1, V), 1.0 / 16)  # q[y] = 0.5, p[y] = 0.25: exact in float32 (the rule needs no normalising)
    p = torch.full((2, 2, V), 1.0 / V)
    q[:, 0, 3], p[:, 0, 3] = 0.5, 0.25
    drafts = torch.tensor([[3], [3]])
    u = torch.tensor([[0.5, 0.3], [float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))), 0.3]])
    positions = torch.zeros(2, dtype=torch.long)
    accepted, nxt, _ = in_all_orders(lambda e: e.verify_sampling(drafts, q, p, u, positions))
    cpu_acc, cpu_next = ops.verify_sampling(drafts, q, p, u, positions.clone())
    assert accepted.tolist() == [0, 1] and torch.equal(accepted, cpu_acc) and torch.equal(nxt, cpu_next)
