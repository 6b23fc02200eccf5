"""exit_head_sample and exit_head_log_softmax: agreement with the references (the same native logits: tokens exact;
PyTorch logits: tolerances tied to the dtype), filtered_probs semantics, the token drawn from the returned
probabilities, outputs poisoned before the kernels write them, batch / thread / ISA invariance, opcheck, argument
errors, the generation path that uses them, CUDA twins."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.generation import generate
from layerskip_ext.generation.sampling import SamplingParams, choose_tokens, filtered_probs, head_probs, sample_with_probs
from helpers import CUDA, assert_bitwise, gemm_isa, gemm_isas, poisoned_outputs, randn, seeded, tiny_model

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5
# (temperature, top_k, top_p): plain, top-k, top-p, both, a top-k wider than V, a tiny top-p (first token only)
PARAMS = [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.9), (0.8, 50, 0.6), (1.0, 5000, 1.0), (2.0, 0, 1e-6)]
# shapes: h's leading dims, H, V
SHAPES = [((1,), 64, 300), ((5,), 96, 1000), ((2, 3), 64, 2049), ((0,), 64, 50)]
# Native logits vs the float64-exact PyTorch reference's: float32 rounding, or one bfloat16 ulp of a logit
# (~1.6% of a probability at |logit| ~ 4) where the two sit on opposite sides of a rounding boundary.
PROB_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=5e-2, atol=2e-3)}
LOGP_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=1e-2, atol=5e-2)}


def head_case(lead, H, V, dtype, g, device="cpu"):
    h = randn((*lead, H), dtype, g, scale=2.0)
    nw = randn((H,), dtype, g)
    head = randn((V, H), dtype, g, scale=0.5)
    u = torch.rand(lead, generator=g)
    return tuple(t.to(device) for t in (h, nw, head, u))


def native_composed_sample(h, nw, head, u, T, k, p, subset=None):
    return ops.exit_head_sample_composed(h, nw, EPS, head, u, T, k, p, subset, ops.rms_norm, ops.linear)


# --------------------------------------------------------------------------------------------------------------
# exit_head_sample
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_matches_reference_on_native_logits(shape, dtype, params):
    """Same native logits: the kernels' arithmetic is mirrored step by step, so tokens match exactly."""
    lead, H, V = shape
    T, k, p = params
    h, nw, head, u = head_case(lead, H, V, dtype, seeded("sample", shape, dtype, params))
    with poisoned_outputs():
        tokens, probs = ops.exit_head_sample(h, nw, EPS, head, u, T, k, p)
    assert tokens.dtype == torch.int64 and tokens.shape == lead
    assert probs.dtype == torch.float32 and probs.shape == (*lead, V)
    ref_tokens, ref_probs = native_composed_sample(h, nw, head, u, T, k, p)
    assert torch.equal(tokens, ref_tokens)
    # float64 exp may differ in its last bit between libm and torch; rounded to float32 that is ~never visible
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-9)
    if probs.numel():
        assert not probs.isnan().any()
        torch.testing.assert_close(probs.sum(-1), torch.ones(lead), rtol=0, atol=1e-5)


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_probs_are_filtered_probs(dtype, params):
    """generation/sampling.py's filtered_probs of the same logits: the semantics the op implements."""
    T, k, p = params
    h, nw, head, u = head_case((6,), 64, 700, dtype, seeded("semantics", dtype, params))
    _, probs = ops.exit_head_sample(h, nw, EPS, head, u, T, k, p)
    logits = ops.linear(ops.rms_norm(h, nw, EPS), head)
    expected = filtered_probs(logits, SamplingParams(temperature=T, top_k=k, top_p=p))
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(probs > 0, expected > 0)  # the same tokens survive top-k / top-p


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_matches_pytorch_reference(dtype):
    """The plain-PyTorch reference (float32 logits computed by torch): tolerances tied to the dtype."""
    h, nw, head, u = head_case((4, 2), 128, 900, dtype, seeded("torch-ref", dtype))
    tokens, probs = ops.exit_head_sample(h, nw, EPS, head, u, 0.9, 0, 1.0)
    ref_tokens, ref_probs = ops.exit_head_sample_reference(h, nw, EPS, head, u, 0.9)
    torch.testing.assert_close(probs, ref_probs, **PROB_TOL[dtype])
    # a token can move only if its uniform sits within the two CDFs' difference of a CDF step
    cdf = ref_probs.double().cumsum(-1)
    gap = (probs.double().cumsum(-1) - cdf).abs().amax(-1, keepdim=True) + 1e-6
    near = ((cdf - u.double().unsqueeze(-1)).abs() < gap).any(-1)
    assert (~near).sum() >= near.numel() // 2
    assert torch.equal(tokens[~near], ref_tokens[~near])


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_is_drawn_from_the_returned_probs(dtype):
    """Inverse CDF of the returned row (ops.sample_inverse_cdf_reference) gives the returned token, and a grid of
    uniforms hits every token about V * p times (deterministic: quantiles, not random draws)."""
    g = seeded("drawn", dtype)
    h, nw, head, _ = head_case((1,), 64, 40, dtype, g)
    N = 4000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    hh = h.expand(N, -1).contiguous()
    tokens, probs = ops.exit_head_sample(hh, nw, EPS, head, u.float(), 1.1, 0, 0.95)
    assert torch.equal(probs, probs[:1].expand_as(probs))  # the same row everywhere
    for i in range(0, N, 397):
        assert int(tokens[i]) == ops.sample_inverse_cdf_reference(probs[i], float(u[i]))
    counts = torch.bincount(tokens, minlength=40).double()
    assert (counts - N * probs[0].double()).abs().max() <= 2.0
    assert counts[probs[0] == 0].sum() == 0  # never a filtered-out token


def test_top_k_keeps_ties_and_top_p_breaks_ties_by_id():
    H, V = 4, 8
    nw = torch.ones(H)
    head = torch.zeros(V, H)
    # logits (up to the common norm scale): ids 1, 3, 6 share the largest value, 2 and 5 the next
    for i, v in {1: 3.0, 3: 3.0, 6: 3.0, 2: 1.0, 5: 1.0}.items():
        head[i, 0] = v
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([0.5])
    _, probs = ops.exit_head_sample(h, nw, EPS, head, u, 1.0, 2, 1.0)  # 2nd largest = 3.0: all three stay
    assert (probs[0] > 0).nonzero().flatten().tolist() == [1, 3, 6]
    torch.testing.assert_close(probs[0, [1, 3, 6]], torch.full((3,), 1 / 3))
    _, probs = ops.exit_head_sample(h, nw, EPS, head, u, 1.0, 0, 0.4)  # top mass ~1/3 each: the two lowest ids
    assert (probs[0] > 0).nonzero().flatten().tolist() == [1, 3]
    _, probs = ops.exit_head_sample(h, nw, EPS, head, u, 1.0, 0, 1e-9)  # only the first token in order
    assert (probs[0] > 0).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_vocab_subset(dtype):
    g = seeded("subset", dtype)
    h, nw, head, u = head_case((5,), 64, 500, dtype, g)
    subset = torch.randperm(500, generator=g)[:130]
    with poisoned_outputs():
        tokens, probs = ops.exit_head_sample(h, nw, EPS, head, u, 0.8, 10, 0.9, subset)
    assert probs.shape == (5, 130)
    assert all(int(t) in set(subset.tolist()) for t in tokens)
    ref_tokens, ref_probs = native_composed_sample(h, nw, head, u, 0.8, 10, 0.9, subset)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-9)


def test_sample_is_deterministic_given_uniforms_and_depends_on_them():
    h, nw, head, u = head_case((8,), 64, 300, torch.float32, seeded("det"))
    a = ops.exit_head_sample(h, nw, EPS, head, u, 1.5, 0, 1.0)
    b = ops.exit_head_sample(h, nw, EPS, head, u, 1.5, 0, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ops.exit_head_sample(h, nw, EPS, head, (u + 0.5) % 1.0, 1.5, 0, 1.0)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_batch_invariant(dtype, restore_threads):
    g = seeded("sample-inv", dtype)
    h, nw, head, u = head_case((3, 5), 576, 3000, dtype, g)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        tokens, probs = ops.exit_head_sample(h, nw, EPS, head, u, 0.9, 40, 0.95)
        results[n] = (tokens, probs)
        for b, t in itertools.product(range(3), range(5)):
            t1, p1 = ops.exit_head_sample(h[b, t:t + 1], nw, EPS, head, u[b, t:t + 1], 0.9, 40, 0.95)
            assert t1.item() == tokens[b, t].item()
            assert_bitwise(p1[0], probs[b, t], f"row {b}, {t}")
    assert torch.equal(results[1][0], results[2][0])
    assert_bitwise(results[1][1], results[2][1], "threads")
    for isa in gemm_isas():
        with gemm_isa(isa):
            tokens, probs = ops.exit_head_sample(h, nw, EPS, head, u, 0.9, 40, 0.95)
        assert torch.equal(tokens, results[1][0]), isa
        assert_bitwise(probs, results[1][1], isa)


# --------------------------------------------------------------------------------------------------------------
# exit_head_log_softmax
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_matches_references(shape, dtype):
    lead, H, V = shape
    h, nw, head, _ = head_case(lead, H, V, dtype, seeded("logsm", shape, dtype))
    with poisoned_outputs():
        out = ops.exit_head_log_softmax(h, nw, EPS, head)
    assert out.dtype == torch.float32 and out.shape == (*lead, V)
    native_logits = ops.linear(ops.rms_norm(h, nw, EPS), head)
    composed = ops.exit_head_log_softmax_composed(h, nw, EPS, head, None, ops.rms_norm, ops.linear)
    torch.testing.assert_close(out, composed, rtol=1e-7, atol=1e-6)  # same logits, float64 arithmetic
    torch.testing.assert_close(out, torch.log_softmax(native_logits.double(), -1).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out, ops.exit_head_log_softmax_reference(h, nw, EPS, head), **LOGP_TOL[dtype])
    if out.numel():
        torch.testing.assert_close(out.double().exp().sum(-1), torch.ones(lead, dtype=torch.float64), rtol=0,
                                   atol=1e-5)


def test_log_softmax_vocab_subset_and_batch_invariance(restore_threads):
    g = seeded("logsm-subset")
    h, nw, head, _ = head_case((4, 3), 256, 1500, torch.bfloat16, g)
    subset = torch.randperm(1500, generator=g)[:700]
    out = ops.exit_head_log_softmax(h, nw, EPS, head, subset)
    assert out.shape == (4, 3, 700)
    torch.testing.assert_close(out, ops.exit_head_log_softmax_composed(h, nw, EPS, head, subset, ops.rms_norm,
                                                                       ops.linear), rtol=1e-7, atol=1e-6)
    for n in (1, 2):
        torch.set_num_threads(n)
        assert_bitwise(ops.exit_head_log_softmax(h, nw, EPS, head, subset), out, f"{n} threads")
        for b, t in itertools.product(range(4), range(3)):
            assert_bitwise(ops.exit_head_log_softmax(h[b, t:t + 1], nw, EPS, head, subset)[0], out[b, t], "row")


# --------------------------------------------------------------------------------------------------------------
# opcheck, errors
# --------------------------------------------------------------------------------------------------------------

def _opcheck_cases(device):
    g = seeded("opcheck-head", device)
    h, nw, head, u = head_case((3,), 64, 90, torch.bfloat16, g)
    h2, nw2, head2, u2 = head_case((2, 2), 64, 300, torch.float32, g)
    to = lambda *ts: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ts)  # noqa: E731
    lib = torch.ops.layerskip
    return [
        (lib.exit_head_sample.default, to(h, nw, EPS, head, u, 0.8, 0, 1.0, None)),
        (lib.exit_head_sample.default, to(h2, nw2, EPS, head2, u2, 1.2, 30, 0.9, torch.tensor([3, 1, 80, 299]))),
        (lib.exit_head_log_softmax.default, to(h, nw, EPS, head, None)),
        (lib.exit_head_log_softmax.default, to(h2, nw2, EPS, head2, torch.tensor([5, 7]))),
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


def test_sample_traces_under_torch_compile():
    h, nw, head, u = head_case((2,), 32, 50, torch.float32, seeded("compile"))
    f = lambda h, u: ops.exit_head_sample(h, nw, EPS, head, u, 0.7, 5, 0.9)[1] * 2  # noqa: E731
    assert_bitwise(torch.compile(f, backend="aot_eager", fullgraph=True)(h, u), f(h, u), "compiled")


def _err_cases():
    h, nw, head, u = torch.randn(2, 64), torch.ones(64), torch.randn(50, 64), torch.rand(2)
    smp, lsm = ops.exit_head_sample, ops.exit_head_log_softmax
    return {
        "temperature 0": (lambda: smp(h, nw, EPS, head, u, 0.0, 0, 1.0),
                          "exit_head_sample: temperature must be a finite number > 0, got 0"),
        "temperature < 0": (lambda: smp(h, nw, EPS, head, u, -1.0, 0, 1.0), "exit_head_sample: temperature"),
        "temperature nan": (lambda: smp(h, nw, EPS, head, u, float("nan"), 0, 1.0), "exit_head_sample: temperature"),
        "temperature inf": (lambda: smp(h, nw, EPS, head, u, float("inf"), 0, 1.0), "exit_head_sample: temperature"),
        "top_k < 0": (lambda: smp(h, nw, EPS, head, u, 1.0, -1, 1.0),
                      "exit_head_sample: top_k must be >= 0 (0 disables it), got -1"),
        "top_p 0": (lambda: smp(h, nw, EPS, head, u, 1.0, 0, 0.0), "exit_head_sample: top_p must be in (0, 1]"),
        "top_p > 1": (lambda: smp(h, nw, EPS, head, u, 1.0, 0, 1.5), "exit_head_sample: top_p must be in (0, 1]"),
        "uniform 1": (lambda: smp(h, nw, EPS, head, torch.tensor([0.2, 1.0]), 1.0, 0, 1.0),
                      "exit_head_sample: uniforms[1] (flat index) = 1 is outside [0, 1)"),
        "uniform < 0": (lambda: smp(h, nw, EPS, head, torch.tensor([-0.1, 0.5]), 1.0, 0, 1.0),
                        "exit_head_sample: uniforms[0] (flat index) = -0.1 is outside [0, 1)"),
        "uniform nan": (lambda: smp(h, nw, EPS, head, torch.tensor([0.1, float("nan")]), 1.0, 0, 1.0),
                        "exit_head_sample: uniforms[1]"),
        "uniforms shape": (lambda: smp(h, nw, EPS, head, torch.rand(3), 1.0, 0, 1.0),
                           "exit_head_sample: uniforms must have the shape of h without its last dim [2]"),
        "uniforms dtype": (lambda: smp(h, nw, EPS, head, u.double(), 1.0, 0, 1.0),
                           "exit_head_sample: uniforms must be float32, got float64"),
        "sample h dtype": (lambda: smp(h.half(), nw.half(), EPS, head.half(), u, 1.0, 0, 1.0),
                           "exit_head_sample: h must be float32 or bfloat16, got float16"),
        "sample head dtype": (lambda: smp(h, nw, EPS, head.bfloat16(), u, 1.0, 0, 1.0),
                              "exit_head_sample: lm_head must have the dtype of h (float32), got bfloat16"),
        "sample head shape": (lambda: smp(h, nw, EPS, head[:, :32], u, 1.0, 0, 1.0),
                              "exit_head_sample: lm_head.size(1) (H = h.size(-1)) must be 64, got 32"),
        "sample norm shape": (lambda: smp(h, nw[:10], EPS, head, u, 1.0, 0, 1.0),
                              "exit_head_sample: norm_weight.size(0) (H = h.size(-1)) must be 64"),
        "sample subset range": (lambda: smp(h, nw, EPS, head, u, 1.0, 0, 1.0, torch.tensor([0, 50])),
                                "exit_head_sample: vocab_subset[1] = 50 is out of range [0, V)"),
        "sample subset dtype": (lambda: smp(h, nw, EPS, head, u, 1.0, 0, 1.0, torch.tensor([0, 5], dtype=torch.int32)),
                                "exit_head_sample: vocab_subset must be int64, got int32"),
        "sample h noncontig": (lambda: smp(torch.randn(64, 2).t(), nw, EPS, head, u, 1.0, 0, 1.0),
                               "exit_head_sample: h must be contiguous"),
        "logsm h dtype": (lambda: lsm(h.double(), nw, EPS, head),
                          "exit_head_log_softmax: h must be float32 or bfloat16, got float64"),
        "logsm head rank": (lambda: lsm(h, nw, EPS, head[0]), "exit_head_log_softmax: lm_head must be 2-D [V, H]"),
        "logsm subset range": (lambda: lsm(h, nw, EPS, head, torch.tensor([-1])),
                               "exit_head_log_softmax: vocab_subset[0] = -1 is out of range"),
        "logsm empty vocab": (lambda: lsm(h, nw, EPS, head[:0]),
                              "exit_head_log_softmax: lm_head must have at least one row"),
    }


@pytest.mark.parametrize("case", list(_err_cases()))
def test_bad_arguments_raise_clear_errors(case):
    fn, message = _err_cases()[case]
    with pytest.raises(RuntimeError) as info:
        fn()
    assert message in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------------------------
# generation through the fused heads
# --------------------------------------------------------------------------------------------------------------

def _native_model():
    return tiny_model(num_hidden_layers=2, backend="native")


def test_generation_helpers_use_the_fused_heads():
    model = _native_model()
    calls = []

    def spy(name):
        fn = getattr(model.decoder.kernels, name)
        return lambda *a: calls.append(name) or fn(*a)

    kernels = dataclasses.replace(model.decoder.kernels, exit_head_sample=spy("exit_head_sample"),
                                  exit_head_log_softmax=spy("exit_head_log_softmax"))
    dec = model.build_decoder(kernels)
    h = torch.randn(3, model.config.hidden_size, generator=seeded("helpers"))
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.95)
    g = torch.Generator().manual_seed(3)
    tokens, probs = sample_with_probs(dec, h, params, g)
    assert calls == ["exit_head_sample"]
    u = torch.rand(3, generator=torch.Generator().manual_seed(3))  # the uniforms sample_with_probs drew
    assert torch.equal(tokens, ops.exit_head_sample(h, model.model.norm.weight, model.model.norm.eps,
                                                    model.lm_head.weight, u, 0.9, 30, 0.95)[0])
    expected = filtered_probs(model.head(h), params)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head_probs(dec, h.view(1, 3, -1), params)[0], probs, rtol=0, atol=0)
    torch.testing.assert_close(dec.head_log_softmax(h), torch.log_softmax(model.head(h).double(), -1).float(),
                               rtol=1e-6, atol=1e-5)
    assert calls == ["exit_head_sample"] * 2 + ["exit_head_log_softmax"]
    assert torch.equal(choose_tokens(dec, h, params, torch.Generator().manual_seed(3)), tokens)
    assert torch.equal(choose_tokens(dec, h, SamplingParams(), None), model.head(h).argmax(-1))  # greedy


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_native_sampling_is_reproducible_with_seed(strategy):
    model = _native_model()
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, stop_token_ids=[], strategy=strategy)
    if strategy == "self_speculative":
        kw.update(exit_layer=1, num_speculations=3)
    a = generate(model, [4, 5, 6], seed=11, **kw).sequences[0].tokens
    assert a == generate(model, [4, 5, 6], seed=11, **kw).sequences[0].tokens
    assert a != generate(model, [4, 5, 6], seed=12, **kw).sequences[0].tokens


# --------------------------------------------------------------------------------------------------------------
# CUDA twins
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sample_matches_reference_on_cuda_logits(dtype, params):
    """The CUDA logits come from the CUDA linear kernel: the reference composed from the CUDA native ops."""
    T, k, p = params
    h, nw, head, u = head_case((4, 3), 192, 3000, dtype, seeded("cuda-sample", dtype, params), "cuda")
    subset = torch.randperm(3000, generator=seeded("cuda-subset"))[:1000].cuda()
    for sub in (None, subset):
        with poisoned_outputs():
            tokens, probs = ops.exit_head_sample(h, nw, EPS, head, u, T, k, p, sub)
        ref_tokens, ref_probs = native_composed_sample(h, nw, head, u, T, k, p, sub)
        assert torch.equal(tokens.cpu(), ref_tokens.cpu())
        torch.testing.assert_close(probs.cpu(), ref_probs.cpu(), rtol=1e-6, atol=1e-9)
        t1, p1 = ops.exit_head_sample(h[1, 2:3].contiguous(), nw, EPS, head, u[1, 2:3].contiguous(), T, k, p, sub)
        assert t1.item() == tokens[1, 2].item()
        assert_bitwise(p1[0].cpu(), probs[1, 2].cpu(), "cuda row alone vs in the batch")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_log_softmax_matches_reference(dtype):
    h, nw, head, _ = head_case((5,), 192, 3000, dtype, seeded("cuda-logsm", dtype), "cuda")
    with poisoned_outputs():
        out = ops.exit_head_log_softmax(h, nw, EPS, head)
    composed = ops.exit_head_log_softmax_composed(h, nw, EPS, head, None, ops.rms_norm, ops.linear)
    torch.testing.assert_close(out.cpu(), composed.cpu(), rtol=1e-7, atol=1e-6)
    assert_bitwise(ops.exit_head_log_softmax(h[3:4], nw, EPS, head)[0].cpu(), out[3].cpu(), "cuda row alone")
