"""linear and exit_head_argmax: error bounds against float64, batch invariance (rows, chunks, threads, ISA tables),
reads confined to the tensors (NaN-poisoned memory around them), opcheck, argument errors, CUDA twins."""
from __future__ import annotations

import itertools

import pytest
import torch

from layerskip_ext import _native, ops
from helpers import (CUDA, argument_error_test, assert_bitwise, check_linear_bound, gemm_isa, gemm_isas, poisoned,
                     randn, seeded)

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

DTYPES = [torch.float32, torch.bfloat16]
EPS32 = 2.0 ** -24


# --------------------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------------------

LINEAR_SHAPES = [  # x shape, N
    ((1, 576), 576), ((7, 576), 1536), ((3, 1536), 576), ((1, 16), 1), ((5, 17), 3), ((2, 3, 100), 25),
    ((33, 64), 40), ((9, 15), 7), ((16, 1), 5), ((4, 577), 49), ((20,), 30), ((2, 4, 2, 48), 24), ((70, 96), 130),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xshape,N", LINEAR_SHAPES)
def test_linear_error_bound_and_no_over_reads(xshape, N, dtype):
    g = seeded("linear", xshape, N, dtype)
    K = xshape[-1]
    x = poisoned(xshape, dtype, g)
    w = poisoned((N, K), dtype, g, scale=0.2)
    out = ops.linear(x, w)
    assert out.shape == (*xshape[:-1], N) and out.dtype == dtype
    assert not out.isnan().any(), "read memory past x or weight"
    check_linear_bound(out, x, w)
    torch.testing.assert_close(out, ops.linear_reference(x, w),
                               **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


def test_linear_empty_and_zero_k():
    w = torch.randn(5, 8)
    assert ops.linear(torch.randn(0, 8), w).shape == (0, 5)
    assert ops.linear(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    out = ops.linear(torch.randn(3, 0), torch.randn(4, 0))
    assert out.shape == (3, 4) and bool((out == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_nan_stays_in_its_row(dtype):
    g = seeded("linear-nan", dtype)
    x = randn((9, 64), dtype, g)
    w = randn((50, 64), dtype, g)
    clean = ops.linear(x, w)
    x[4, 10] = float("nan")
    out = ops.linear(x, w)
    assert out[4].isnan().all()
    keep = [i for i in range(9) if i != 4]
    assert_bitwise(out[keep], clean[keep], "other rows")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(576, 576), (576, 1536), (1536, 576), (100, 37)])
def test_linear_batch_invariant(K, N, dtype, restore_threads):
    """A row's bits: alone (decode), in any chunk (verification, d+1 rows), in a long prefill, as [B, T, K], at
    any thread count."""
    g = seeded("linear-inv", K, N, dtype)
    x = randn((40, K), dtype, g)
    w = randn((N, K), dtype, g, scale=0.1)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        full = ops.linear(x, w)
        results[n] = full
        for i in range(0, 40, 3):
            assert_bitwise(ops.linear(x[i:i + 1], w)[0], full[i], f"row {i} alone, {n} threads")
        for t0, t1 in ((0, 7), (5, 12), (11, 27), (3, 19), (0, 40)):
            assert_bitwise(ops.linear(x[t0:t1], w), full[t0:t1], f"rows {t0}:{t1}, {n} threads")
        assert_bitwise(ops.linear(x.view(5, 8, K), w).view(40, N), full, "[B, T, K]")
        assert_bitwise(ops.linear(x.flip(0).contiguous(), w).flip(0), full, "row order")
    assert_bitwise(results[1], results[2], "1 vs 2 threads")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_isa_tables_agree_bitwise(dtype):
    """The AVX-512, AVX2 and portable tables do the same IEEE operations: identical bits (those this CPU runs)."""
    isas = gemm_isas()
    if len(isas) < 2:
        pytest.skip(f"only {isas} available here")
    g = seeded("linear-isa", dtype)
    cases = [(randn((m, k), dtype, g), randn((n, k), dtype, g, 0.1)) for m, k, n in
             [(1, 576, 200), (7, 576, 61), (13, 100, 29), (3, 17, 9), (24, 1536, 48)]]
    expected = [ops.linear(x, w) for x, w in cases]
    for isa in isas:
        with gemm_isa(isa):
            for (x, w), e in zip(cases, expected):
                assert_bitwise(ops.linear(x, w), e, f"{isa} vs {isas[0]}, x {tuple(x.shape)}")


def test_linear_isa_hook_rejects_unknown():
    with pytest.raises(ValueError, match="not available"):
        _native._C._set_gemm_isa("sse9")


# --------------------------------------------------------------------------------------------------------------
# exit_head_argmax
# --------------------------------------------------------------------------------------------------------------

def composed(h, nw, eps, head, subset=None):
    return ops.exit_head_argmax_composed(h, nw, eps, head, subset, ops.rms_norm, ops.linear)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,V", [(1, 576, 3000), (7, 576, 1000), (3, 64, 320), (16, 100, 77), (2, 17, 1),
                                   (9, 48, 500)])
def test_exit_head_argmax_equals_norm_linear_argmax(M, H, V, dtype):
    g = seeded("head", M, H, V, dtype)
    h = randn((M, H), dtype, g, scale=3.0)
    nw = randn((H,), dtype, g)
    head = poisoned((V, H), dtype, g)
    # Duplicate rows make exact ties: the lowest index must win (as torch.argmax).
    if V > 10:
        head[V - 3] = head[V // 2]
        head[V - 1] = head[1]
    got = ops.exit_head_argmax(h, nw, 1e-5, head)
    assert got.dtype == torch.int64 and got.shape == (M,)
    assert torch.equal(got, composed(h, nw, 1e-5, head))
    # float32 norm weight with bfloat16 h, as rms_norm allows
    if dtype == torch.bfloat16:
        nw32 = randn((H,), torch.float32, g)
        assert torch.equal(ops.exit_head_argmax(h, nw32, 1e-6, head), composed(h, nw32, 1e-6, head))


def test_exit_head_argmax_ties_pick_lowest_index():
    H, V = 32, 200
    h = torch.ones(2, H)
    head = torch.zeros(V, H)
    head[[17, 42, 150]] = 1.0  # three equal maxima
    assert ops.exit_head_argmax(h, torch.ones(H), 1e-5, head).tolist() == [17, 17]
    sub = torch.tensor([150, 42, 3, 17])
    assert ops.exit_head_argmax(h, torch.ones(H), 1e-5, head, sub).tolist() == [150, 150]  # first in the subset


def test_exit_head_argmax_bf16_ties_after_rounding():
    """Logits that differ in float32 but round to the same bfloat16 tie, as they do in linear() + argmax."""
    H = 16
    h = torch.ones(1, H, dtype=torch.bfloat16)
    head = torch.zeros(3, H, dtype=torch.bfloat16)
    head[0, 0] = 1.0
    head[1, 0] = 1.0
    head[1, 1] = 2.0 ** -8  # row 1's float32 logit is larger, but equal to row 0's in bfloat16
    logits = ops.linear(ops.rms_norm(h, torch.ones(H, dtype=torch.bfloat16), 1e-5), head)
    assert logits[0, 0] == logits[0, 1]
    assert ops.exit_head_argmax(h, torch.ones(H, dtype=torch.bfloat16), 1e-5, head).tolist() == [0]


def test_exit_head_argmax_nan_like_torch():
    H, V = 16, 50
    g = seeded("head-nan")
    h = torch.randn(3, H, generator=g)
    h[1, 0] = float("nan")
    head = torch.randn(V, H, generator=g)
    head[30, 2] = float("nan")  # column 30 is NaN for every row: torch.argmax returns the first NaN
    got = ops.exit_head_argmax(h, torch.ones(H), 1e-5, head)
    assert torch.equal(got, composed(h, torch.ones(H), 1e-5, head))
    assert got.tolist() == [30, 0, 30]


@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_head_argmax_vocab_subset(dtype):
    g = seeded("head-subset", dtype)
    M, H, V = 5, 64, 900
    h = randn((M, H), dtype, g, scale=2.0)
    nw = randn((H,), dtype, g)
    head = randn((V, H), dtype, g)
    for subset in (torch.arange(0, V, 7), torch.randperm(V, generator=g)[:123], torch.tensor([5, 5, 899, 0]),
                   torch.tensor([311])):
        got = ops.exit_head_argmax(h, nw, 1e-5, head, subset)
        assert torch.equal(got, composed(h, nw, 1e-5, head, subset)), subset[:5]
        assert bool(torch.isin(got, subset).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_head_argmax_batch_invariant(dtype, restore_threads):
    g = seeded("head-inv", dtype)
    h = randn((2, 7, 576), dtype, g, scale=2.0)
    nw = randn((576,), dtype, g)
    head = randn((4000, 576), dtype, g)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        full = ops.exit_head_argmax(h, nw, 1e-5, head)
        assert full.shape == (2, 7)
        results[n] = full
        for b, t in itertools.product(range(2), range(7)):
            assert ops.exit_head_argmax(h[b, t:t + 1], nw, 1e-5, head).item() == full[b, t].item()
    assert torch.equal(results[1], results[2])
    for isa in gemm_isas():
        with gemm_isa(isa):
            assert torch.equal(ops.exit_head_argmax(h, nw, 1e-5, head), results[1]), isa


def test_exit_head_argmax_reference_agrees_on_clear_winners():
    g = seeded("head-ref")
    h = torch.randn(4, 64, generator=g)
    head = torch.randn(300, 64, generator=g)
    nw = torch.ones(64)
    logits = ops.linear_reference(ops.rms_norm_reference(h, nw, 1e-5), head)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    got = ops.exit_head_argmax(h, nw, 1e-5, head)
    assert torch.equal(got[clear], ops.exit_head_argmax_reference(h, nw, 1e-5, head)[clear])


# --------------------------------------------------------------------------------------------------------------
# opcheck, errors
# --------------------------------------------------------------------------------------------------------------

def _opcheck_cases(device):
    g = seeded("opcheck-linear", device)
    x, w = randn((2, 3, 64), torch.float32, g), randn((40, 64), torch.float32, g)
    h, nw, head = randn((3, 64), torch.bfloat16, g), randn((64,), torch.bfloat16, g), randn((90, 64), torch.bfloat16, g)
    to = lambda *ts: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ts)  # noqa: E731
    lib = torch.ops.layerskip
    return [
        (lib.linear.default, to(x, w)),
        (lib.linear.default, to(x.bfloat16(), w.bfloat16())),
        (lib.exit_head_argmax.default, to(h, nw, 1e-5, head, None)),
        (lib.exit_head_argmax.default, to(h.float(), nw.float(), 1e-6, head.float(), torch.tensor([3, 1, 80]))),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck_cpu(case):
    op, args = _opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(4))
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_opcheck_cuda(case):
    op, args = _opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)


def test_linear_traces_under_torch_compile():
    x, w = torch.randn(3, 32), torch.randn(8, 32)
    f = lambda x: ops.linear(x, w) * 2  # noqa: E731
    assert_bitwise(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x), "compiled")


def _err_cases():
    x, w = torch.randn(3, 64), torch.randn(10, 64)
    h, nw, head = torch.randn(2, 64), torch.ones(64), torch.randn(50, 64)
    lin, arg = ops.linear, ops.exit_head_argmax
    return {
        "lin weight rank": (lambda: lin(x, w[0]), "linear: weight must be 2-D [N, K], got 1-D"),
        "lin K": (lambda: lin(x, w[:, :32].contiguous()), "linear: weight.size(1) (K = x.size(-1)) must be 64, got 32"),
        "lin x dtype": (lambda: lin(x.half(), w.half()), "linear: x must be float32 or bfloat16, got float16"),
        "lin w dtype": (lambda: lin(x, w.bfloat16()), "linear: weight must have the dtype of x (float32), got bfloat16"),
        "lin x noncontig": (lambda: lin(x.t(), torch.randn(10, 3)), "linear: x must be contiguous"),
        "lin w noncontig": (lambda: lin(x, torch.randn(64, 10).t()), "linear: weight must be contiguous"),
        "lin x 0-D": (lambda: lin(torch.tensor(1.0), w), "linear: x must have at least 1 dim"),
        "arg h dtype": (lambda: arg(h.double(), nw, 1e-5, head), "exit_head_argmax: h must be float32 or bfloat16, got float64"),
        "arg head dtype": (lambda: arg(h, nw, 1e-5, head.bfloat16()),
                           "exit_head_argmax: lm_head must have the dtype of h (float32), got bfloat16"),
        "arg head shape": (lambda: arg(h, nw, 1e-5, head[:, :32].contiguous()),
                           "exit_head_argmax: lm_head.size(1) (H = h.size(-1)) must be 64, got 32"),
        "arg head rank": (lambda: arg(h, nw, 1e-5, head[0]), "exit_head_argmax: lm_head must be 2-D [V, H], got 1-D"),
        "arg norm shape": (lambda: arg(h, nw[:10], 1e-5, head), "exit_head_argmax: norm_weight.size(0) (H = h.size(-1)) must be 64"),
        "arg norm dtype": (lambda: arg(h.bfloat16(), nw.half(), 1e-5, head.bfloat16()),
                           "exit_head_argmax: norm_weight must have the dtype of h (bfloat16) or be float32, got float16"),
        "arg subset dtype": (lambda: arg(h, nw, 1e-5, head, torch.tensor([1, 2], dtype=torch.int32)),
                             "exit_head_argmax: vocab_subset must be int64, got int32"),
        "arg subset rank": (lambda: arg(h, nw, 1e-5, head, torch.tensor([[1, 2]])),
                            "exit_head_argmax: vocab_subset must be 1-D [V'], got 2-D"),
        "arg subset high": (lambda: arg(h, nw, 1e-5, head, torch.tensor([3, 50])),
                            "exit_head_argmax: vocab_subset[1] = 50 is out of range [0, V) with V = lm_head.size(0) = 50"),
        "arg subset negative": (lambda: arg(h, nw, 1e-5, head, torch.tensor([-1])),
                                "exit_head_argmax: vocab_subset[0] = -1 is out of range"),
        "arg subset empty": (lambda: arg(h, nw, 1e-5, head, torch.zeros(0, dtype=torch.int64)),
                             "exit_head_argmax: vocab_subset must not be empty"),
        "arg empty vocab": (lambda: arg(h, nw, 1e-5, head[:0]), "exit_head_argmax: lm_head must have at least one row"),
        "arg h noncontig": (lambda: arg(torch.randn(64, 2).t(), nw, 1e-5, head), "exit_head_argmax: h must be contiguous"),
        "arg subset noncontig": (lambda: arg(h, nw, 1e-5, head, torch.arange(10)[::2]),
                                 "exit_head_argmax: vocab_subset must be contiguous"),
    }


test_argument_errors = argument_error_test(_err_cases())


# --------------------------------------------------------------------------------------------------------------
# CUDA twins
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xshape,N", LINEAR_SHAPES)
def test_cuda_linear_error_bound(xshape, N, dtype):
    g = seeded("cuda-linear", xshape, N, dtype)
    x = randn(xshape, dtype, g)
    w = randn((N, xshape[-1]), dtype, g, scale=0.2)
    out = ops.linear(x.cuda(), w.cuda()).cpu()
    assert not out.isnan().any()
    # The CUDA twin sums in another fixed order (32 lanes of a warp), so its bound is the same kind.
    check_linear_bound(out, x, w)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_linear_and_head_batch_invariant(dtype):
    g = seeded("cuda-linear-inv", dtype)
    x = randn((40, 576), dtype, g).cuda()
    w = randn((1536, 576), dtype, g, scale=0.1).cuda()
    full = ops.linear(x, w)
    for i in range(40):
        assert_bitwise(ops.linear(x[i:i + 1], w)[0].cpu(), full[i].cpu(), f"row {i}")
    for t0, t1 in ((0, 7), (5, 12), (3, 19)):
        assert_bitwise(ops.linear(x[t0:t1], w).cpu(), full[t0:t1].cpu(), f"rows {t0}:{t1}")
    nw = randn((576,), dtype, g).cuda()
    head = randn((5000, 576), dtype, g).cuda()
    head[4000] = head[17]  # a tie
    got = ops.exit_head_argmax(x, nw, 1e-5, head)
    assert torch.equal(got.cpu(), composed(x, nw, 1e-5, head).cpu())
    for i in range(0, 40, 7):
        assert ops.exit_head_argmax(x[i:i + 1], nw, 1e-5, head).item() == got[i].item()
    subset = torch.randperm(5000, generator=g)[:700].cuda()
    assert torch.equal(ops.exit_head_argmax(x, nw, 1e-5, head, subset).cpu(),
                       composed(x, nw, 1e-5, head, subset).cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_linear_errors():
    with pytest.raises(RuntimeError, match="linear: weight must be on the device of x"):
        ops.linear(torch.randn(2, 8, device="cuda"), torch.randn(3, 8))


# --------------------------------------------------------------------------------------------------------------
# The CPU work pool (csrc/cpu/pool.cpp): more threads than cores, fork
# --------------------------------------------------------------------------------------------------------------

def test_pool_more_threads_than_cores_same_bits(restore_threads):
    g = seeded("pool-threads")
    x, w = randn((7, 576), torch.float32, g), randn((3000, 576), torch.float32, g)
    h, nw = randn((5, 576), torch.bfloat16, g), randn((576,), torch.bfloat16, g)
    head = randn((4000, 576), torch.bfloat16, g)
    torch.set_num_threads(1)
    ref = (ops.linear(x, w), ops.exit_head_argmax(h, nw, 1e-5, head))
    for n in (2, 3, 8):
        torch.set_num_threads(n)
        for _ in range(20):  # many back-to-back jobs: helpers join late, early or not at all
            assert_bitwise(ops.linear(x, w), ref[0], f"{n} threads")
            assert torch.equal(ops.exit_head_argmax(h, nw, 1e-5, head), ref[1])


def test_pool_survives_fork(restore_threads):
    """A forked child (DataLoader workers, multiprocessing) has none of the parent's helper threads: ops still run."""
    import multiprocessing as mp

    torch.set_num_threads(2)
    x, w = torch.randn(3, 64), torch.randn(500, 64)
    expected = ops.linear(x, w)  # the parent's helpers exist now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as p:
        got = p.apply_async(_linear_in_child, (x, w)).get(timeout=60)
    assert_bitwise(got, expected, "child vs parent")


def _linear_in_child(x, w):
    torch.set_num_threads(2)
    return ops.linear(x, w)
