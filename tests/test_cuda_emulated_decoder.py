"""The decode-path launchers of issue 13 executed under the CUDA emulator (tests/emulated_cuda.py; see
test_cuda_emulated.py for the harness's rules: three thread orders that must agree bitwise, guard zones, poisoned
outputs and scratch): the split-K GEMV on K that spans many chunks and row tiles, q/k/v and gate/up in one launch,
the residual (and gated) epilogue, flash-decoding attention across chunk boundaries and row groups, the decoder's
fused rope + kv write + attention, and launch_decoder_layers, the whole T <= 16 layer sequence of
layer_range_forward on a GPU:
  - bitwise equal to the emulated ops one by one (what test_fused.py checks on a real GPU), and close to the CPU op;
  - a verification (T = d + 1 tokens) bitwise equal to the same tokens decoded one at a time, hidden states and KV
    caches alike: greedy self-speculative decoding == autoregressive decoding, at the layer-stack level.
"""
from __future__ import annotations

import math

import pytest
import torch

import emulated_cuda as E
from layerskip_ext import ops
from test_cuda_emulated import EPS, _library_or_skip, attention_inputs, in_all_orders
from test_fused import caches, random_layers
from test_ops import TOL, assert_bitwise, randn, rope_tables, seeded
from test_ops_linear import check_linear_bound

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")


@pytest.fixture(scope="module", autouse=True)
def lib():
    return _library_or_skip()


DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------------------------------------------
# GEMV: the K split, row tiles, several matrices, the residual epilogue
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 4100, 9), (5, 2056, 6), (16, 1030, 5), (33, 520, 7)])
def test_linear_long_k_and_row_tiles(M, K, N, dtype):
    """K over many chunks (each warp several, a partial last one), M up to 2 row tiles: a row's bits never depend on
    M or the tile, nor on alignment."""
    g = seeded("emu-lin-long", M, K, N, dtype)
    x = randn((M, K), dtype, g)
    w = randn((N, K), dtype, g, scale=K ** -0.5)
    out = in_all_orders(lambda e: e.linear(x, w))
    check_linear_bound(out, x, w)
    e = E.Emulated()
    for i in sorted({0, M // 2, M - 1}):
        assert_bitwise(e.linear(x[i:i + 1], w)[0], out[i], f"row {i} alone vs in {M}")
        assert_bitwise(e.linear(x[:i + 1], w)[i], out[i], f"row {i} in {i + 1} vs in {M}")
    assert_bitwise(E.Emulated(misalign=x.element_size()).linear(x, w), out, "misaligned (element loads)")


GEMV_WARPS, GEMV_UNROLL = 4, 2  # csrc/cuda/gemv.cu kGemvWarps, kGemvUnroll: part of the documented order


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """linear(x, w) in gemv.cu's documented per-column order, float32 steps (fmaf emulated exactly enough in float64:
    the product of two float32 is exact there): the kernel's bits, so any change of the order is a failure."""
    kN = 16 // x.element_size()
    M, K = x.shape
    N = w.shape[0]
    chunk = 32 * GEMV_UNROLL
    nchunks = -(-(-(-K // kN)) // chunk)
    pad = nchunks * chunk * kN - K
    xv = torch.nn.functional.pad(x.double(), (0, pad)).view(M, nchunks, GEMV_UNROLL, 32, kN)
    wv = torch.nn.functional.pad(w.double(), (0, pad)).view(N, nchunks, GEMV_UNROLL, 32, kN)
    acc = torch.zeros(M, N, GEMV_WARPS, 32, dtype=torch.float64)
    for j in range(nchunks):  # a lane's chunks ascending, then u, then the vector's elements
        for u in range(GEMV_UNROLL):
            for e in range(kN):
                prod = xv[:, None, j, u, :, e] * wv[None, :, j, u, :, e]
                acc[:, :, j % GEMV_WARPS] = (prod + acc[:, :, j % GEMV_WARPS]).float().double()
    v = acc.float().flatten(2)  # [M, N, 128]: thread 32 warp + lane
    stride = v.shape[-1] // 2
    while stride >= 1:  # the block's fixed pairwise tree
        v = v[..., :stride] + v[..., stride:2 * stride]
        stride //= 2
    s = v[..., 0]
    return s.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(2, 1100, 3), (1, 77, 5), (3, 2300, 2)])
def test_linear_follows_the_documented_order(M, K, N, dtype):
    """The split-K order (chunks to warps, lanes, the block's pairwise tree) is the contract that makes a row
    give the same bits in any launch: checked bit for bit against a reference of it."""
    g = seeded("emu-lin-order", M, K, N, dtype)
    x = randn((M, K), dtype, g)
    w = randn((N, K), dtype, g, scale=K ** -0.5)
    assert_bitwise(E.Emulated().linear(x, w), gemv_reference(x, w), "the documented summation order")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("M,K,Ns", [(1, 72, (33, 6, 6)), (7, 600, (8, 3, 3)), (3, 40, (5, 5)), (17, 24, (2, 9, 1))])
def test_linear_multi_equals_separate_launches(M, K, Ns, dtype):
    g = seeded("emu-lin-multi", M, K, Ns, dtype)
    x = randn((M, K), dtype, g)
    ws = [randn((n, K), dtype, g, scale=K ** -0.5) for n in Ns]
    outs = in_all_orders(lambda e: tuple(e.linear_multi(x, ws)))
    e = E.Emulated()
    for i, (w, o) in enumerate(zip(ws, outs)):
        assert_bitwise(o, e.linear(x, w), f"matrix {i} in one launch vs alone")
    assert_bitwise(E.Emulated(misalign=x.element_size()).linear_multi(x, ws)[-1], outs[-1], "misaligned")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 100, 13), (6, 1100, 10), (17, 48, 3)])
def test_linear_residual_equals_add_of_linear(M, K, N, dtype):
    """h + linear(x, w), and h + linear(x * x2, w), as torch rounds them (the decoder's o_proj / down_proj)."""
    g = seeded("emu-lin-res", M, K, N, dtype)
    x, x2 = randn((M, K), dtype, g), randn((M, K), dtype, g)
    w = randn((N, K), dtype, g, scale=K ** -0.5)
    h = randn((M, N), dtype, g, scale=4.0)
    e = E.Emulated()
    got = in_all_orders(lambda e: e.linear_residual(x, w, h))
    assert_bitwise(got, h + e.linear(x, w), "h + linear(x, w)")
    got = in_all_orders(lambda e: e.linear_residual(x, w, h, x2))
    assert_bitwise(got, h + e.linear(x * x2, w), "h + linear(x * x2, w)")
    assert_bitwise(e.linear_residual(x[-1:], w, h[-1:], x2[-1:]), got[-1:], "row alone")


# --------------------------------------------------------------------------------------------------------------
# attention: chunks, row groups, the decoder's fused rope + kv write
# --------------------------------------------------------------------------------------------------------------

ATTN_CASES = [  # B, T, nH, nKV, S, D: positions across chunk boundaries, many rows (row groups), MQA, D = 256
    (1, 16, 8, 2, 130, 64), (2, 3, 8, 1, 200, 128), (1, 9, 2, 1, 70, 256), (1, 2, 4, 2, 129, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,nH,nKV,S,D", ATTN_CASES)
def test_cache_attention_chunks_and_row_groups(B, T, nH, nKV, S, D, dtype):
    g = seeded("emu-attn-chunks", B, T, nH, nKV, S, D, dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    if B > 1:
        start[1] = 63 - T // 2  # tokens on both sides of a chunk boundary
    scale = 1.0 / math.sqrt(D)
    out = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, scale))
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ops.cache_attention(q, kc, vc, start, scale), **tol)
    e = E.Emulated()
    for t in sorted({0, T // 2, T - 1}):
        alone = e.cache_attention(q[:, t:t + 1].contiguous(), kc, vc, start + t, scale)
        assert_bitwise(alone[:, 0], out[:, t], f"token {t} alone vs verified with {T}")
    assert_bitwise(E.Emulated(misalign=q.element_size()).cache_attention(q, kc, vc, start, scale), out, "misaligned")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_ignores_slots_past_position(dtype):
    """Slots after the last token's position hold NaN / inf (stale or never written cache memory): no row reads them
    into its result, in any chunk."""
    B, T, nH, nKV, S, D = 2, 3, 4, 2, 140, 64
    g = seeded("emu-attn-stale", dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    start[:] = torch.tensor([62, 5])
    clean_k, clean_v = kc.clone(), vc.clone()
    for b in range(B):
        kc[b, :, start[b] + T:] = float("nan")
        vc[b, :, start[b] + T:] = float("inf")
    scale = D ** -0.5
    got = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, scale))
    assert not got.isnan().any()
    assert_bitwise(got, E.Emulated().cache_attention(q, clean_k, clean_v, start, scale), "stale slots ignored")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_rows_never_read_later_tokens_values(dtype):
    """A verification's later tokens sit in the same key tile as its earlier rows; an earlier row weighs them 0, and
    must not even multiply their values in (0 * inf is NaN): the last token's values are inf, the rows before it
    stay bitwise what they are with clean values."""
    B, T, nH, nKV, S, D = 2, 4, 4, 2, 70, 64
    g = seeded("emu-attn-later", dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    start[:] = torch.tensor([9, 40])
    clean = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, D ** -0.5))
    for b in range(B):
        vc[b, :, start[b] + T - 1] = float("inf")
    got = in_all_orders(lambda e: e.cache_attention(q, kc, vc, start, D ** -0.5))
    assert not got[:, :T - 1].isnan().any()
    assert_bitwise(got[:, :T - 1], clean[:, :T - 1], "rows before the token whose values are inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,nH,nKV,S,D,shared", [(2, 3, 4, 2, 70, 16, False), (1, 5, 6, 3, 40, 64, True),
                                                   (1, 1, 2, 1, 66, 128, False)])
def test_decoder_attention_equals_rope_write_attention(B, T, nH, nKV, S, D, shared, dtype):
    g = seeded("emu-dec-attn", B, T, nH, nKV, S, D, shared, dtype)
    q, kc, vc, start = attention_inputs(B, T, nH, nKV, S, D, dtype, g)
    k, v = randn((B, T, nKV, D), dtype, g), randn((B, T, nKV, D), dtype, g)
    if shared:
        start[:] = start[0]
    positions = (start[:1 if shared else B, None] + torch.arange(T)[None]).contiguous()
    cos, sin = rope_tables(S, D)
    scale = D ** -0.5
    out, kc2, vc2 = in_all_orders(lambda e: e.decoder_attention(q, k, v, positions, cos, sin, kc, vc, start, scale))
    e = E.Emulated()
    want_k, want_v = e.kv_cache_write(kc, vc, e.rope(k, positions, cos, sin), v, start)
    assert_bitwise(kc2, want_k, "k cache")
    assert_bitwise(vc2, want_v, "v cache")
    assert_bitwise(out, e.cache_attention(e.rope(q, positions, cos, sin), want_k, want_v, start, scale), "output")
    # A position outside the RoPE tables: NaN rows and keys, as rope (the cache write still happens).
    bad = positions.clone()
    bad[0, -1] = S
    out, kc2, _ = E.Emulated("random", 7).decoder_attention(q, k, v, bad, cos, sin, kc, vc, start, scale)
    assert out[0, -1].isnan().all() and kc2[0, :, start[0] + T - 1].isnan().all()


# --------------------------------------------------------------------------------------------------------------
# the decoder layers (layer_range_forward on a GPU for T <= 16)
# --------------------------------------------------------------------------------------------------------------

DECODER_CASES = [  # L, B, T, H, nH, nKV, D, I, S
    (2, 1, 1, 64, 4, 2, 16, 96, 30), (1, 2, 4, 96, 6, 2, 16, 160, 70), (1, 1, 16, 32, 2, 1, 16, 72, 40)]


def decoder_inputs(case, dtype, g, f32_norms=False):
    L, B, T, H, nH, nKV, D, I, S = case
    ws = random_layers(L, H, nH, nKV, D, I, dtype, g, f32_norms)
    k, v = caches(L, B, nKV, S, D, dtype, g)
    start = torch.randint(0, S - T + 1, (B,), generator=g)
    start[0] = S - T
    pos = (start[:, None] + torch.arange(T)[None]).contiguous()
    cos, sin = rope_tables(S, D)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    return ws, k, v, start, pos, cos, sin, h


def composed_emulated(e, h, ws, k, v, start, pos, cos, sin, nH, nKV, scale):
    """The ops one by one, each an emulated kernel (silu, *, + by torch): layer_range_forward_native_composed."""
    k, v = [c.clone() for c in k], [c.clone() for c in v]

    def kv_write(kc, vc, kk, vv, st):
        nk, nv = e.kv_cache_write(kc, vc, kk, vv, st)
        kc.copy_(nk)
        vc.copy_(nv)

    out = ops.layer_range_forward_composed(h, ws, k, v, start, pos, cos, sin, nH, nKV, EPS, scale,
                                           rms_norm_fn=e.rms_norm, linear_fn=e.linear, rope_fn=e.rope,
                                           kv_cache_write_fn=kv_write, cache_attention_fn=e.cache_attention)
    return out, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_layers_equal_ops_one_by_one(case, dtype):
    L, B, T, H, nH, nKV, D, I, S = case
    g = seeded("emu-decoder", case, dtype)
    for f32_norms in ((False, True) if dtype == torch.float32 else (False,)):
        ws, k, v, start, pos, cos, sin, h = decoder_inputs(case, dtype, g, f32_norms)
        scale = D ** -0.5
        runs = [E.Emulated(order, seed).layer_range_forward(h, ws, k, v, start, pos, cos, sin, nH, nKV, EPS, scale)
                for order, seed in (("forward", 0), ("random", 11))]
        got, gk, gv = runs[0]
        for a, b in zip([got, *gk, *gv], [runs[1][0], *runs[1][1], *runs[1][2]]):
            assert_bitwise(a, b, "random vs forward thread order")
        want, wk, wv = composed_emulated(E.Emulated(), h, ws, k, v, start, pos, cos, sin, nH, nKV, scale)
        assert_bitwise(got, want, f"output (f32 norms {f32_norms})")
        for layer in range(L):
            assert_bitwise(gk[layer], wk[layer], f"k_cache {layer}")
            assert_bitwise(gv[layer], wv[layer], f"v_cache {layer}")
        k2, v2 = [c.clone() for c in k], [c.clone() for c in v]
        cpu = ops.layer_range_forward(h, ws, k2, v2, start, pos, cos, sin, nH, nKV, EPS, scale)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=4e-2, atol=4e-2)
        torch.testing.assert_close(got, cpu, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_layers_verification_equals_decoding(dtype):
    """T = d + 1 tokens through the layers in one call == the same tokens one call each, bitwise (hidden states and
    every cache slot): what makes greedy self-speculation give the autoregressive tokens."""
    case = (2, 2, 5, 64, 4, 2, 16, 96, 80)
    L, B, T, H, nH, nKV, D, I, S = case
    g = seeded("emu-decoder-verify", dtype)
    ws, k, v, start, pos, cos, sin, h = decoder_inputs(case, dtype, g)
    start[1] = 60  # the tokens cross a chunk boundary (64)
    pos = (start[:, None] + torch.arange(T)[None]).contiguous()
    scale = D ** -0.5
    e = E.Emulated("reverse")
    verified, vk, vv = e.layer_range_forward(h, ws, k, v, start, pos, cos, sin, nH, nKV, EPS, scale)
    ks, vs = k, v
    for t in range(T):
        one, ks, vs = E.Emulated().layer_range_forward(h[:, t:t + 1].contiguous(), ws, ks, vs, start + t,
                                                       pos[:, t:t + 1].contiguous(), cos, sin, nH, nKV, EPS, scale)
        assert_bitwise(one[:, 0], verified[:, t], f"token {t} decoded alone vs verified with {T}")
    for layer in range(L):
        assert_bitwise(ks[layer], vk[layer], f"k_cache {layer}")
        assert_bitwise(vs[layer], vv[layer], f"v_cache {layer}")
    one_row, _, _ = E.Emulated().layer_range_forward(h[1:], ws, [c[1:].clone() for c in k], [c[1:].clone() for c in v],
                                                     start[1:], pos[1:], cos, sin, nH, nKV, EPS, scale)
    assert_bitwise(one_row[0], verified[1], "sequence alone vs in the batch")


# --------------------------------------------------------------------------------------------------------------
# heads: the parallel final argmax over many partials, sampling histograms on hot bins
# --------------------------------------------------------------------------------------------------------------

def test_exit_head_argmax_many_partials():
    """More partials per row than the final block has threads: ties far apart (the lowest id wins), a NaN (the first
    NaN wins)."""
    M, H, V, dtype = 3, 16, 1101, torch.bfloat16
    g = seeded("emu-argmax-partials")
    h = randn((M, H), dtype, g)
    nw = torch.ones(H, dtype=dtype)
    head = 0.05 * randn((V, H), dtype, g)
    win = (4 * h[0]).to(dtype)
    head[1001] = head[17] = head[700] = win
    got = in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head))
    assert got[0].item() == 17
    assert torch.equal(got, ops.exit_head_argmax_composed(h, nw, EPS, head, None, E.Emulated().rms_norm,
                                                          E.Emulated().linear))
    head[1099] = head[555] = float("nan")
    assert in_all_orders(lambda e: e.exit_head_argmax(h, nw, EPS, head)).tolist() == [555] * M


def test_exit_head_sample_hot_bins():
    """Most of the mass in a few histogram bins (hundreds of equal probabilities): the split 32-bit weight sums
    carry exactly, top-p keeps the CPU's set."""
    M, H, V = 2, 24, 900
    g = seeded("emu-sample-hot")
    h = randn((M, H), torch.float32, g)
    nw = torch.ones(H)
    head = randn((V, H), torch.float32, g)
    head[100:700] = head[5]  # 600 equal logits
    u = torch.rand(M, generator=g)
    e = E.Emulated()
    for T, k, p in ((1.0, 0, 0.5), (0.8, 650, 0.95)):
        tokens, probs = in_all_orders(lambda e: e.exit_head_sample(h, nw, EPS, head, u, T, k, p))
        ref_tokens, ref_probs = ops.exit_head_sample_composed(h, nw, EPS, head, u, T, k, p, None, e.rms_norm, e.linear)
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(probs > 0, ref_probs > 0), "the kept set"
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-9)
