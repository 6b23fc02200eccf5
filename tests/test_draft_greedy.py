"""draft_greedy: the greedy draft stage in one native call == the native layer-range and exit-head ops step by step
(bitwise, caches included), close to the PyTorch reference, poisoned outputs fully written, opcheck, argument errors,
and the model / generation paths that use it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from layerskip_ext import _native, ops
from layerskip_ext.generation import generate
from helpers import (CUDA, DTYPES, argument_error_test, assert_bitwise, caches, clone_all, poisoned_outputs,
                     random_layers, rope_tables, seeded, tiny_model)
from layerskip_ext.model.decoder import native_kernels

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

CASES = [  # L (layers < E), B, H, nH, nKV, D, I, S, V, d, subset size (0: full vocabulary)
    (1, 1, 64, 4, 2, 16, 96, 30, 300, 0, 0),
    (2, 1, 64, 4, 2, 16, 96, 30, 300, 1, 0),
    (3, 2, 96, 6, 2, 16, 160, 40, 500, 4, 0),
    (2, 3, 128, 2, 1, 64, 256, 64, 257, 6, 40),
    (1, 2, 48, 3, 3, 16, 80, 20, 1000, 3, 999),
]


def case_args(case, dtype, device="cpu", tag="draft"):
    L, B, H, nH, nKV, D, I, S, V, d, n_sub = case
    g = seeded(tag, case, dtype)
    ws = random_layers(L, H, nH, nKV, D, I, dtype, g)
    k, v = caches(L, B, nKV, S, D, dtype, g)
    start = torch.randint(0, S - d, (B,), generator=g)
    cos, sin = rope_tables(S, D)
    embed = torch.randn(V, H, generator=g).to(dtype)
    norm = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    lm_head = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    subset = torch.randperm(V, generator=g)[:n_sub].sort().values if n_sub else None
    tokens = torch.randint(0, V, (B,), generator=g)
    to = lambda x: None if x is None else [t.to(device) for t in x] if isinstance(x, list) else x.to(device)  # noqa
    return [to(tokens), to(embed), to(ws), to(k), to(v), to(start), to(cos), to(sin), nH, nKV, 1e-5, D ** -0.5,
            to(norm), 1e-6, to(lm_head), to(subset), d]


def with_fresh_caches(args):
    a = list(args)
    a[3], a[4] = clone_all(a[3]), clone_all(a[4])
    return a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_draft_greedy_equals_ops_step_by_step(case, dtype):
    args = case_args(case, dtype)
    mine, theirs = with_fresh_caches(args), with_fresh_caches(args)
    with poisoned_outputs():
        drafts, hidden = ops.draft_greedy(*mine)
    want_drafts, want_hidden = ops.draft_greedy_native_composed(*theirs)
    d, B, H = case[9], case[1], case[2]
    assert drafts.shape == (B, d) and hidden.shape == (B, d + 1, H)
    assert torch.equal(drafts, want_drafts)
    assert_bitwise(hidden, want_hidden, "hidden")
    for a, b in zip(mine[3] + mine[4], theirs[3] + theirs[4]):
        assert_bitwise(a, b, "caches")
    if args[15] is not None:
        assert bool(torch.isin(drafts, args[15]).all()), "a draft outside the vocabulary subset"


@pytest.mark.parametrize("stop_below", [0.02, 0.2, 0.6, 1.0])
@pytest.mark.parametrize("case", [c for c in CASES if c[9] >= 3])
def test_dynamic_draft_equals_ops_step_by_step(case, stop_below):
    """stop_below > 0: the stage ends at the first step where the rows' mean chance (a row's: the least top
    probability of its drafts) falls below the threshold; bitwise the composed native ops, caches included; the
    kept drafts are each row's greedy drafts (the static stage's first columns), never -1."""
    args = case_args(case, torch.float32, tag="dynamic")
    mine, theirs = with_fresh_caches(args), with_fresh_caches(args)
    with poisoned_outputs():
        drafts, hidden = ops.draft_greedy(*mine, stop_below)
    want_drafts, want_hidden = ops.draft_greedy_native_composed(*theirs, stop_below)
    d, B, H = case[9], case[1], case[2]
    n = drafts.shape[1]
    assert n <= d and hidden.shape == (B, n + 1, H)
    assert torch.equal(drafts, want_drafts)
    assert_bitwise(hidden, want_hidden, "hidden")
    for a, b in zip(mine[3] + mine[4], theirs[3] + theirs[4]):
        assert_bitwise(a, b, "caches")
    if stop_below == 1.0:
        assert n == 0  # nothing is ever that sure: a round then verifies just the newest token
    static, _ = ops.draft_greedy(*with_fresh_caches(args))
    assert torch.equal(drafts, static[:, :n]), "every row proposes its greedy drafts while the stage runs"
    ref_drafts, _ = ops.draft_greedy_reference(*with_fresh_caches(args), stop_below)
    assert torch.equal(ref_drafts, drafts)  # the same decisions from the plain-PyTorch stage (no near-ties here)


@pytest.mark.parametrize("dtype", DTYPES)
def test_draft_greedy_close_to_reference(dtype):
    """Against the plain-PyTorch stage: the same drafts (random logits have no near-ties at this size) and layer
    outputs within the dtype's tolerance."""
    case = (2, 2, 64, 4, 2, 16, 96, 32, 200, 3, 0)
    args = case_args(case, dtype, tag="draft-ref")
    drafts, hidden = ops.draft_greedy(*with_fresh_caches(args))
    ref_drafts, ref_hidden = ops.draft_greedy_reference(*with_fresh_caches(args))
    assert torch.equal(drafts, ref_drafts)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
    torch.testing.assert_close(hidden, ref_hidden, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cpu(dtype):
    torch.library.opcheck(torch.ops.layerskip.draft_greedy.default, case_args(CASES[2], dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_cuda_draft_greedy_equals_ops_step_by_step(case, dtype):
    args = case_args(case, dtype, "cuda", tag="cuda-draft")
    mine, theirs = with_fresh_caches(args), with_fresh_caches(args)
    with poisoned_outputs():
        drafts, hidden = ops.draft_greedy(*mine)
    want_drafts, want_hidden = ops.draft_greedy_native_composed(*theirs)
    assert torch.equal(drafts, want_drafts)
    assert_bitwise(hidden, want_hidden, "hidden")
    torch.library.opcheck(torch.ops.layerskip.draft_greedy.default, case_args(case, dtype, "cuda"))


def _err_cases():
    base = case_args(CASES[2], torch.float32)

    def call(**kw):
        a = list(base)
        names = ["tokens", "embed", "ws", "k", "v", "start", "cos", "sin", "nH", "nKV", "eps", "scale", "norm",
                 "norm_eps", "lm_head", "subset", "d"]
        for name, value in kw.items():
            a[names.index(name)] = value
        return lambda: ops.draft_greedy(*with_fresh_caches(a))

    tokens, embed, start, lm_head = base[0], base[1], base[5], base[14]
    S = base[3][0].shape[2]
    return {
        "tokens rank": (call(tokens=tokens.view(-1, 1)), "draft_greedy: tokens must be 1-D [B], got 2-D"),
        "tokens dtype": (call(tokens=tokens.int()), "draft_greedy: tokens must be int64, got int32"),
        "embed rank": (call(embed=embed[0]), "draft_greedy: embed must be 2-D [V, H], got 1-D"),
        "start size": (call(start=start[:1]), "draft_greedy: start.size(0) (B = tokens.size(0)) must be 2"),
        "negative d": (call(d=-1), "draft_greedy: num_drafts must be >= 0, got -1"),
        "no layers": (call(ws=[], k=[], v=[]), "draft_greedy: weights is empty"),
        "round past the cache": (call(start=torch.full_like(start, S - 2)), "layer_range_forward: start[0] = "),
        "subset id": (call(subset=torch.tensor([0, lm_head.shape[0]])), "exit_head_argmax: vocab_subset"),
        "embed width": (call(embed=embed[:, :32].contiguous()), "layer_range_forward: weights[0] (layer 0 "
                                                                 "input_layernorm) must be [H] = [32]"),
    }


test_argument_errors = argument_error_test(_err_cases())


# ---------------------------------------------------------------------------------------------------------------
# the model and generation paths
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_draft_greedy_equals_its_own_steps(dtype, backend):
    """decoder.draft_greedy (one call) == state + embed + layers + head_argmax per step, rows slice and vocabulary
    subset included, for the native decoder (the op) and the reference one (ops.draft_greedy_composed)."""
    model = tiny_model(4, dtype, num_hidden_layers=5, backend=backend)
    dec = model.decoder
    g = seeded("model-draft", dtype)
    subset = torch.arange(0, 300, 3)
    for E, d, rows, sub in ((3, 4, None, None), (5, 2, slice(1, 3), subset), (1, 0, None, None)):
        n = 3 if rows is None else rows.stop - rows.start
        caches_ab = [model.new_cache(3, 40) for _ in range(2)]
        start = torch.randint(0, 30, (n,), generator=g)
        tokens = torch.randint(0, 300, (n,), generator=g)
        drafts, hidden = dec.draft_greedy(tokens, dec.state(start, d + 1, caches_ab[0], rows), E, d, sub)
        token, want_d, want_h = tokens.view(-1, 1), [], []
        for i in range(d + 1):
            h = dec.layers(dec.embed(token), 0, E, dec.state(start + i, 1, caches_ab[1], rows))
            want_h.append(h)
            if i < d:
                token = dec.head_argmax(h[:, -1], sub).view(-1, 1)
                want_d.append(token)
        assert torch.equal(drafts, torch.cat(want_d, 1) if want_d else drafts.new_empty(n, 0))
        assert_bitwise(hidden, torch.cat(want_h, 1), f"E={E} d={d}")
        for a, b in zip(caches_ab[0].k + caches_ab[0].v, caches_ab[1].k + caches_ab[1].v):
            assert_bitwise(a, b, "caches")
    cache = model.new_cache(1, 8)
    with pytest.raises(Exception, match="do not fit the KV cache"):
        dec.draft_greedy(torch.tensor([1]), dec.state(torch.tensor([5]), 4, cache), 2, 3)
    with pytest.raises(Exception, match="a draft of 3 tokens needs 4"):
        dec.draft_greedy(torch.tensor([1]), dec.state(torch.tensor([0]), 2, cache), 2, 3)


def test_self_speculative_uses_the_native_draft_and_stays_lossless():
    model = tiny_model(5, torch.float32, num_hidden_layers=4, backend="native")
    calls = []
    real = native_kernels().draft_greedy
    model.build_decoder(dataclasses.replace(native_kernels(), draft_greedy=lambda *a: calls.append(a[16]) or real(*a)))
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7]]
    ar = generate(model, prompts, max_new_tokens=20, stop_token_ids=[], strategy="autoregressive")
    for E, d in ((1, 3), (2, 1), (3, 5)):
        calls.clear()
        ss = generate(model, prompts, max_new_tokens=20, stop_token_ids=[], strategy="self_speculative",
                      exit_layer=E, num_speculations=d)
        assert [s.tokens for s in ss.sequences] == [s.tokens for s in ar.sequences], (E, d)
        assert calls and len(calls) == ss.stats["rounds"] and max(calls) == d


def test_native_extension_reports_the_op():
    assert hasattr(torch.ops.layerskip, "draft_greedy") and _native.native_available()
