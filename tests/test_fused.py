"""layer_range_forward and the decoder built on it: bitwise the native ops one by one, caches written identically,
batch invariance, the decoder's build-time checks, device / dtype moves, opcheck, argument errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from helpers import (CUDA, argument_error_test, assert_bitwise, caches, clone_all, random_layers, rope_tables, seeded,
                     tiny_model)
from layerskip_ext import ops
from layerskip_ext.model import DecoderError
from layerskip_ext.model.hugepages import HUGE_PAGE, move_weights_to_hugepages
from tiny_checkpoints import make_tiny_model

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

DTYPES = [torch.float32, torch.bfloat16]


OP_CASES = [  # L, B, T, H, nH, nKV, D, I, S
    (2, 1, 1, 64, 4, 2, 16, 96, 30),     # decode
    (3, 2, 7, 96, 6, 2, 16, 160, 40),    # verification, GQA 3
    (1, 1, 20, 64, 2, 2, 32, 128, 24),   # prefill-like, no GQA
    (2, 3, 4, 128, 2, 1, 64, 256, 90),   # head dim 64, MQA, keys over several blocks
    (1, 2, 17, 48, 3, 3, 16, 80, 40),    # M = 34 rows: the compute-bound gemm path
    (1, 1, 205, 32, 2, 1, 16, 80, 210),  # prefill: silu * up in 2 chunks (16400 elements, a scalar tail of 16)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OP_CASES)
def test_layer_range_forward_equals_ops_one_by_one(case, dtype):
    L, B, T, H, nH, nKV, D, I, S = case
    g = seeded("fused-op", case, dtype)
    for f32_norms, shared_positions in ((False, False), (True, False), (False, True)):
        ws = random_layers(L, H, nH, nKV, D, I, dtype, g, f32_norms)
        k, v = caches(L, B, nKV, S, D, dtype, g)
        if shared_positions:
            start = torch.full((B,), int(torch.randint(0, S - T + 1, (), generator=g)))
            pos = (start[:1, None] + torch.arange(T)[None]).contiguous()  # [1, T]
        else:
            start = torch.randint(0, S - T + 1, (B,), generator=g)
            pos = (start[:, None] + torch.arange(T)[None]).contiguous()
        cos, sin = rope_tables(S, D)
        h = torch.randn(B, T, H, generator=g).to(dtype)
        k2, v2 = clone_all(k), clone_all(v)
        scale = D ** -0.5
        got = ops.layer_range_forward(h, ws, k, v, start, pos, cos, sin, nH, nKV, 1e-5, scale)
        want = ops.layer_range_forward_native_composed(h, ws, k2, v2, start, pos, cos, sin, nH, nKV, 1e-5, scale)
        assert_bitwise(got, want, f"output (f32 norms {f32_norms}, shared positions {shared_positions})")
        for layer in range(L):
            assert_bitwise(k[layer], k2[layer], f"k_cache {layer}")
            assert_bitwise(v[layer], v2[layer], f"v_cache {layer}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_range_forward_close_to_reference(dtype):
    L, B, T, H, nH, nKV, D, I, S = 2, 2, 5, 64, 4, 2, 16, 128, 32
    g = seeded("fused-ref", dtype)
    ws = random_layers(L, H, nH, nKV, D, I, dtype, g)
    k, v = caches(L, B, nKV, S, D, dtype, g)
    start = torch.tensor([0, 20])
    pos = (start[:, None] + torch.arange(T)[None]).contiguous()
    cos, sin = rope_tables(S, D)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    k2, v2 = clone_all(k), clone_all(v)
    got = ops.layer_range_forward(h, ws, k, v, start, pos, cos, sin, nH, nKV, 1e-5, D ** -0.5)
    want = ops.layer_range_forward_reference(h, ws, k2, v2, start, pos, cos, sin, nH, nKV, 1e-5, D ** -0.5)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_range_forward_batch_invariant(dtype, restore_threads):
    """Verification (T = d + 1 rows at once) == decoding the same tokens one by one, at 1 and 2 threads."""
    L, B, T, H, nH, nKV, D, I, S = 2, 2, 6, 96, 6, 2, 16, 160, 30
    g = seeded("fused-inv", dtype)
    ws = random_layers(L, H, nH, nKV, D, I, dtype, g)
    k0, v0 = caches(L, B, nKV, S, D, dtype, g)
    start = torch.tensor([3, 11])
    cos, sin = rope_tables(S, D)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        k, v = clone_all(k0), clone_all(v0)
        pos = (start[:, None] + torch.arange(T)[None]).contiguous()
        full = ops.layer_range_forward(h, ws, k, v, start, pos, cos, sin, nH, nKV, 1e-5, 0.25)
        results[n] = full
        k1, v1 = clone_all(k0), clone_all(v0)
        for t in range(T):  # decode: one token at a time, each sequence alone
            for b in range(B):
                kb = [c[b:b + 1] for c in k1]
                vb = [c[b:b + 1] for c in v1]
                st = start[b:b + 1] + t
                one = ops.layer_range_forward(h[b:b + 1, t:t + 1].contiguous(), ws, kb, vb, st, st[:, None].contiguous(),
                                              cos, sin, nH, nKV, 1e-5, 0.25)
                assert_bitwise(one[0, 0], full[b, t], f"b={b} t={t}, {n} threads")
        for layer in range(L):
            assert_bitwise(k1[layer], k[layer], "caches written the same")
    assert_bitwise(results[1], results[2], "1 vs 2 threads")


def test_layer_range_forward_empty_range_and_batch():
    h = torch.randn(2, 3, 64)
    out = ops.layer_range_forward(h, [], [], [], torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64),
                                  torch.zeros(8, 8), torch.zeros(8, 8), 4, 2, 1e-5, 0.25)
    assert_bitwise(out, h, "no layers: a copy of h")
    assert out.data_ptr() != h.data_ptr()


# --------------------------------------------------------------------------------------------------------------
# the decoder on a model
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_layers_equal_the_ops_one_by_one(dtype):
    """decoder.layers over cache rows == ops.layer_range_forward_native_composed on the same views, caches too."""
    model = tiny_model(0, dtype, num_hidden_layers=4, backend="native")
    dec = model.decoder
    g = seeded("fused-model", dtype)
    B, S = 3, 48
    cache_a, cache_b = model.new_cache(B + 1, S), model.new_cache(B + 1, S)
    for c in (cache_a, cache_b):  # the same random history in both
        for t in c.k + c.v:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
    steps = [(0, 4, 5, None), (0, 2, 1, None), (2, 4, 3, slice(1, 4)), (1, 3, 7, slice(0, 2)), (0, 4, 12, None)]
    for start_layer, end_layer, T, rows in steps:
        nb = B + 1 if rows is None else rows.stop - rows.start
        start = torch.randint(0, S - T, (nb,), generator=g)
        h = (torch.randn(nb, T, model.config.hidden_size, generator=g) * 2).to(dtype)
        got = dec.layers(h, start_layer, end_layer, dec.state(start, T, cache_a, rows))
        st = dec.state(start, T, cache_b, rows)
        ks, vs = st.caches(start_layer, end_layer)
        want = ops.layer_range_forward_native_composed(h, dec.weights(start_layer, end_layer), ks, vs, st.start,
                                                       st.positions, st.cos, st.sin, dec.num_heads, dec.num_kv_heads,
                                                       dec.eps, dec.scale)
        assert_bitwise(got, want, f"layers [{start_layer}, {end_layer}) T={T} rows={rows}")
        for t_a, t_b in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v):
            assert_bitwise(t_a, t_b, "caches")
    with pytest.raises(Exception, match="layer range"):
        dec.layers(h, 2, 5, dec.state(start, T, cache_a, rows))


def test_native_and_reference_decoders_decode_alike():
    """Prefill + greedy decode steps: the native decoder and the plain-PyTorch one choose the same tokens."""
    model = tiny_model(3, torch.float32)
    tokens = torch.randint(0, 300, (2, 9), generator=seeded("fused-decode"))
    outs = []
    for backend in ("native", "reference"):
        dec = model.build_decoder(backend)
        cache = model.new_cache(2, 40)
        h = dec.forward_hidden(tokens, None, cache)
        tok = dec.head_argmax(h[:, -1:])
        seq = [tok]
        for i in range(10):
            h = dec.layers(dec.embed(tok), 0, model.num_layers, dec.state(torch.full((2,), 9 + i), 1, cache))
            tok = dec.head_argmax(h)
            seq.append(tok)
        outs.append(torch.cat(seq, 1))
    assert torch.equal(outs[0], outs[1])


def test_decoder_rejects_wrapped_layers_at_build_and_stale_use():
    """A wrapped layer (an adapter, a training wrapper) is an error when the decoder is built, naming it; a
    decoder built before modules were replaced refuses to run until rebuilt."""
    from layerskip_ext.generation import generate

    model = tiny_model(2, torch.float32, backend="native")
    before = generate(model, [1, 2, 3], max_new_tokens=6, stop_token_ids=[]).sequences[0].tokens
    up = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = nn.Sequential(up, nn.Dropout(0.0))
    with pytest.raises(DecoderError, match="changed after its decoder was built"):
        generate(model, [1, 2, 3], max_new_tokens=6)
    with pytest.raises(DecoderError, match=r"model\.layers\.1\.mlp\.up_proj is a Sequential"):
        model.build_decoder("native")
    with pytest.raises(DecoderError, match="model.layers.1.mlp.up_proj is a Sequential"):
        model.build_decoder("reference")
    model.model.layers[1].mlp.up_proj = up
    model.build_decoder("native")
    assert generate(model, [1, 2, 3], max_new_tokens=6, stop_token_ids=[]).sequences[0].tokens == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_to_dtype_keeps_head_rope_draft_vocab_and_decoder(dtype):
    """model.to(dtype) moves the weights; the tied head stays tied, the RoPE tables and draft vocabulary follow and
    the decoder is rebuilt with the same kernels over the new tensors."""
    from layerskip_ext.generation import generate

    model = tiny_model(4, torch.float32 if dtype == torch.bfloat16 else torch.bfloat16, tie_word_embeddings=True,
                       backend="native")
    model.draft_vocab = torch.arange(0, 300, 2)
    model.rope_tables(64)
    old = model.decoder
    model.to(dtype)
    assert model.dtype == dtype and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.decoder is not old and model.decoder.name == "native" and model.decoder.dtype == dtype
    assert model.decoder.lm_head.data_ptr() == model.lm_head.weight.data_ptr()
    assert model._rope_cache is None and model.draft_vocab.device == model.device
    fresh = tiny_model(4, dtype, tie_word_embeddings=True, backend="native")
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), model.parameters()):
            p.copy_(q)
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    assert generate(model, [5, 6, 7], **kw).sequences[0].tokens == generate(fresh, [5, 6, 7], **kw).sequences[0].tokens


# --------------------------------------------------------------------------------------------------------------
# opcheck, errors
# --------------------------------------------------------------------------------------------------------------

def _opcheck_args(device, dtype=torch.float32):
    g = seeded("fused-opcheck", device, dtype)
    L, B, T, H, nH, nKV, D, I, S = 2, 2, 3, 32, 4, 2, 8, 48, 16
    ws = random_layers(L, H, nH, nKV, D, I, dtype, g)
    k, v = caches(L, B, nKV, S, D, dtype, g)
    start = torch.tensor([0, 9])
    pos = (start[:, None] + torch.arange(T)[None]).contiguous()
    cos, sin = rope_tables(S, D)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    to = lambda x: [t.to(device) for t in x] if isinstance(x, list) else x.to(device)  # noqa: E731
    return (to(h), to(ws), to(k), to(v), to(start), to(pos), to(cos), to(sin), nH, nKV, 1e-5, D ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cpu(dtype):
    torch.library.opcheck(torch.ops.layerskip.layer_range_forward.default, _opcheck_args("cpu", dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cuda(dtype):
    torch.library.opcheck(torch.ops.layerskip.layer_range_forward.default, _opcheck_args("cuda", dtype))


def _err_cases():
    h, ws, k, v, start, pos, cos, sin, nH, nKV, eps, scale = _opcheck_args("cpu")
    f = ops.layer_range_forward

    def call(**kw):
        a = dict(h=h, ws=ws, k=k, v=v, start=start, pos=pos, cos=cos, sin=sin, nH=nH, nKV=nKV)
        a.update(kw)
        return lambda: f(a["h"], a["ws"], a["k"], a["v"], a["start"], a["pos"], a["cos"], a["sin"], a["nH"], a["nKV"],
                         eps, scale)

    bad_q = list(ws)
    bad_q[10] = ws[10][:, :16].contiguous()
    bad_dtype = list(ws)
    bad_dtype[15] = ws[15].bfloat16()
    return {
        "h rank": (call(h=h[0]), "layer_range_forward: h must be 3-D [B, T, H], got 2-D"),
        "h dtype": (call(h=h.half()), "layer_range_forward: h must be float32 or bfloat16, got float16"),
        "weights count": (call(ws=ws[:8]), "layer_range_forward: weights must hold 9 tensors per layer"),
        "caches count": (call(k=k[:1]), "layer_range_forward: k_caches must hold one tensor per layer (2), got 1"),
        "weight shape": (call(ws=bad_q), "layer_range_forward: weights[10] (layer 1 q_proj) must be [32, 32], got shape"),
        "weight dtype": (call(ws=bad_dtype),
                         "layer_range_forward: weights[15] (layer 1 gate_proj) must have the dtype of h (float32), got bfloat16"),
        "cache shape": (call(v=[v[0], v[1][:, :, :8].contiguous()]),
                        "layer_range_forward: v_caches[1] must be [B, nKV, S, D] = [2, 2, 16, 8], got shape"),
        "heads": (call(nH=3), "layer_range_forward: num_heads (3) must be a positive multiple of num_kv_heads (2)"),
        "start value": (call(start=torch.tensor([0, 14])), "layer_range_forward: start[1] = 14 is out of range"),
        "start dtype": (call(start=start.int()), "layer_range_forward: start must be int64, got int32"),
        "positions value": (call(pos=pos + 20), "layer_range_forward: positions[0, 0] = 20 is out of range [0, P)"),
        "positions shape": (call(pos=pos[:, :2].contiguous()), "layer_range_forward: positions.size(1) (T = h.size(1)) must be 3"),
        "cos shape": (call(cos=cos[:, :2].contiguous(), sin=sin[:, :2].contiguous()),
                      "layer_range_forward: cos.size(1) (D/2) must be 4, got 2"),
        "cache alias": (call(v=[k[0], v[1]]), "layer_range_forward: k_caches[0] and v_caches[0] must be different"),
        "weight noncontig": (call(ws=[w.t().contiguous().t() if i == 1 else w for i, w in enumerate(ws)]),
                             "layer_range_forward: weights[1] (layer 0 q_proj) must be contiguous"),
    }


test_argument_errors = argument_error_test(_err_cases())


# --------------------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OP_CASES)
def test_cuda_layer_range_forward_equals_ops_one_by_one(case, dtype):
    L, B, T, H, nH, nKV, D, I, S = case
    g = seeded("cuda-fused", case, dtype)
    ws = [w.cuda() for w in random_layers(L, H, nH, nKV, D, I, dtype, g)]
    k, v = caches(L, B, nKV, S, D, dtype, g)
    k, v = [c.cuda() for c in k], [c.cuda() for c in v]
    start = torch.randint(0, S - T + 1, (B,), generator=g)
    pos = (start[:, None] + torch.arange(T)[None]).contiguous().cuda()
    start = start.cuda()
    cos, sin = (t.cuda() for t in rope_tables(S, D))
    h = torch.randn(B, T, H, generator=g).to(dtype).cuda()
    k2, v2 = clone_all(k), clone_all(v)
    got = ops.layer_range_forward(h, ws, k, v, start, pos, cos, sin, nH, nKV, 1e-5, D ** -0.5)
    want = ops.layer_range_forward_native_composed(h, ws, k2, v2, start, pos, cos, sin, nH, nKV, 1e-5, D ** -0.5)
    if T > 16 and not start.any():  # a prompt: cuBLAS + SDPA (csrc/cuda/prefill_cuda.h), close to the ops
        tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(got.cpu(), want.cpu(), **tol)
        for a, b in itertools.chain(zip(k, k2), zip(v, v2)):
            torch.testing.assert_close(a.cpu(), b.cpu(), **tol)
        return
    assert_bitwise(got.cpu(), want.cpu(), "output")
    for a, b in itertools.chain(zip(k, k2), zip(v, v2)):
        assert_bitwise(a.cpu(), b.cpu(), "caches")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_prompt_path_and_decoding_after_it(dtype):
    """A prompt (T > 16, start 0) goes through cuBLAS + SDPA, close to the ops one by one; the decode steps after it
    and a 17-token verification (start > 0) stay on the kernels: bitwise a token decoded alone."""
    L, B, T, H, nH, nKV, D, I, S = 2, 2, 40, 128, 4, 2, 32, 256, 96
    g = seeded("cuda-prompt", dtype)
    ws = [w.cuda() for w in random_layers(L, H, nH, nKV, D, I, dtype, g)]
    k, v = caches(L, B, nKV, S, D, dtype, g)
    k, v = [c.cuda() for c in k], [c.cuda() for c in v]
    cos, sin = (t.cuda() for t in rope_tables(S, D))
    h = torch.randn(B, T + 17, H, generator=g).to(dtype).cuda()
    start = torch.zeros(B, dtype=torch.long, device="cuda")
    pos = torch.arange(T, device="cuda")[None].expand(B, T).contiguous()
    k2, v2 = clone_all(k), clone_all(v)
    got = ops.layer_range_forward(h[:, :T].contiguous(), ws, k, v, start, pos, cos, sin, nH, nKV, 1e-5, D ** -0.5)
    want = ops.layer_range_forward_native_composed(h[:, :T].contiguous(), ws, k2, v2, start, pos, cos, sin, nH, nKV,
                                                   1e-5, D ** -0.5)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got, want, **tol)
    start = torch.full((B,), T, dtype=torch.long, device="cuda")
    pos = (T + torch.arange(17, device="cuda"))[None].expand(B, 17).contiguous()
    ks, vs = clone_all(k), clone_all(v)
    verified = ops.layer_range_forward(h[:, T:].contiguous(), ws, k, v, start, pos, cos, sin, nH, nKV, 1e-5, D ** -0.5)
    for t in range(17):
        one = ops.layer_range_forward(h[:, T + t:T + t + 1].contiguous(), ws, ks, vs, start + t,
                                      pos[:, t:t + 1].contiguous(), cos, sin, nH, nKV, 1e-5, D ** -0.5)
        assert_bitwise(one[:, 0].cpu(), verified[:, t].cpu(), f"token {t} alone vs verified with 17")


def test_move_weights_to_hugepages_keeps_model_and_results():
    model = make_tiny_model(2, torch.float32, tie_word_embeddings=True)
    tokens = torch.randint(0, 300, (2, 11), generator=seeded("thp"))
    before = model(tokens)
    params = list(model.parameters())
    moved = move_weights_to_hugepages(model)
    assert moved >= sum(p.numel() * p.element_size() for p in params)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ptrs = sorted(p.data_ptr() for p in params)
    assert ptrs[0] % HUGE_PAGE == 0 and ptrs[-1] - ptrs[0] < moved, "one arena"
    assert_bitwise(model(tokens), before, "same logits after the move")
    dec = model.build_decoder("native")  # built after the move: it packs the moved tensors
    assert dec.layer_weights[0].q_proj.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()
