"""Dynamic drafting's fitted stop (generation/draft_stop.py): exit_head_top2 against its reference, the n-gram match
against a brute-force count, draft_greedy with a stop model == its steps with the native ops (bitwise) and == the
reference's decisions, argument errors, lossless generation (greedy equals autoregressive on every prompt), the
tuned model's stop model used by default, and the fit (AUC, recovering a known logistic model)."""
from __future__ import annotations

import math

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.analysis.draft_stop_fit import auc, fit_logistic, fit_stop_model
from layerskip_ext.errors import GenerationError
from layerskip_ext.generation import generate
from layerskip_ext.generation.draft_stop import as_stop_model, tuned_stop_model
from helpers import CUDA, argument_error_test, assert_bitwise, poisoned_outputs, randn, seeded, tiny_model
from test_draft_greedy import CASES, case_args, with_fresh_caches

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")

DTYPES = [torch.float32, torch.bfloat16]


# ---- exit_head_top2 ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, H, V, n_sub", [((1,), 64, 300, 0), ((5,), 96, 1000, 0), ((2, 3), 64, 2049, 100),
                                               ((0,), 64, 50, 0), ((4,), 32, 2, 0)])
def test_exit_head_top2_matches_the_argmax_and_the_logits(lead, H, V, n_sub, dtype):
    """tokens == exit_head_argmax (same native logits, same tie rule); top2 == the two largest of the reference's
    logits within the dtype's rounding, the first >= the second."""
    g = seeded("top2", lead, H, V, dtype)
    h, nw, head = randn((*lead, H), dtype, g, scale=2.0), randn((H,), dtype, g), randn((V, H), dtype, g, scale=0.5)
    subset = torch.randperm(V, generator=g)[:n_sub] if n_sub else None
    with poisoned_outputs():
        tokens, top2 = ops.exit_head_top2(h, nw, 1e-5, head, subset)
    assert tokens.shape == lead and top2.shape == (*lead, 2) and top2.dtype == torch.float32
    assert torch.equal(tokens, ops.exit_head_argmax(h, nw, 1e-5, head, subset))
    _, want = ops.exit_head_top2_reference(h, nw, 1e-5, head, subset)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(top2, want, **tol)
    assert bool((top2[..., 0] >= top2[..., 1]).all())


def test_exit_head_top2_ties_take_the_lowest_id_and_report_equal_logits():
    H, V = 8, 6
    head = torch.zeros(V, H)
    head[[1, 4]] = 1.0  # columns 1 and 4 tie for the largest logit
    tokens, top2 = ops.exit_head_top2(torch.ones(1, H), torch.ones(H), 1e-6, head, None)
    assert tokens.tolist() == [1] and top2[0, 0] == top2[0, 1]


test_exit_head_top2_errors = argument_error_test({
    "one column": (lambda: ops.exit_head_top2(torch.ones(1, 8), torch.ones(8), 1e-6, torch.ones(1, 8), None),
                   "exit_head_top2: needs at least 2 vocabulary columns, got V = 1"),
    "subset id": (lambda: ops.exit_head_top2(torch.ones(1, 8), torch.ones(8), 1e-6, torch.ones(4, 8),
                                             torch.tensor([0, 9])), "exit_head_top2: vocab_subset[1] = 9"),
    "width": (lambda: ops.exit_head_top2(torch.ones(1, 8), torch.ones(8), 1e-6, torch.ones(4, 6), None),
              "exit_head_top2"),
})


def test_exit_head_top2_opcheck():
    g = seeded("top2-opcheck")
    torch.library.opcheck(torch.ops.layerskip.exit_head_top2.default,
                          (randn((3, 64), torch.float32, g), randn((64,), torch.float32, g),
                           1e-5, randn((100, 64), torch.float32, g), None))


# ---- the n-gram match and the chance ----

def brute_match(seq, nxt):
    """The longest k <= 4 with seq[-k:] + [nxt] a window of seq (by searching every window)."""
    best = 0
    for k in range(1, ops.LONGEST_MATCH + 1):
        if len(seq) < k:
            break
        pat = list(seq[len(seq) - k:]) + [nxt]
        if any(list(seq[i:i + k + 1]) == pat for i in range(len(seq) - k)):
            best = k
    return best


def test_match_level_equals_a_brute_force_search():
    g = torch.Generator().manual_seed(7)
    for n in (0, 1, 2, 5, 30, 200):
        for vocab in (2, 3, 20):
            seq = torch.randint(0, vocab, (n,), generator=g).tolist()
            for nxt in range(vocab):
                assert ops.match_level(seq, nxt) == brute_match(seq, nxt), (seq, nxt)
    assert ops.match_level([5, 6, 7, 8, 9, 5, 6, 7, 8], 9) == 4 and ops.match_level([1, 2, 3], 4) == 0


def test_acceptance_log_chance_is_log_sigmoid_of_the_features():
    w = [0.3, 1.5, 0.2, 0.4, 0.6, 0.8]
    seq = [1, 2, 3, 1, 2]
    z = 0.3 + 1.5 * 0.7 + 0.2 + 0.4  # match_level(seq, 3) == 2: the last 2 tokens then 3 occur earlier
    assert ops.match_level(seq, 3) == 2
    assert math.isclose(ops.acceptance_log_chance(w, 0.7, seq, 3), math.log(1 / (1 + math.exp(-z))), rel_tol=1e-12)
    assert math.isclose(ops.acceptance_log_chance([-50.0] + [0.0] * 5, 0.0, seq, 3), -50.0, rel_tol=1e-9)


# ---- draft_greedy with a stop model ----

def model_args(case, B, g):
    """A stop model and random contexts that repeat a few n-grams (so every match level occurs)."""
    stop_model = torch.tensor([0.5, 3.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    V = case[8]
    lens = torch.randint(1, 40, (B,), generator=g)
    ctx = torch.full((B, 40), -1, dtype=torch.int64)
    for b in range(B):
        pattern = torch.randint(0, V, (5,), generator=g)
        ctx[b, :lens[b]] = pattern.repeat(8)[:lens[b]]
    return stop_model, ctx, lens


@pytest.mark.parametrize("stop_below", [0.05, 0.3, 0.7, 0.999])
@pytest.mark.parametrize("case", [c for c in CASES if c[9] >= 3])
def test_fitted_stop_draft_equals_ops_step_by_step(case, stop_below):
    """Bitwise the native ops step by step (exit_head_top2 + the same arithmetic), caches included; the stage ends
    where the rows' mean chance (each row's: the product over its drafts) falls below the threshold, the kept
    drafts each row's greedy ones."""
    args = case_args(case, torch.float32, tag="fitted-stop")
    extra = model_args(case, case[1], seeded("fitted-stop-ctx", case))
    mine, theirs = with_fresh_caches(args), with_fresh_caches(args)
    with poisoned_outputs():
        drafts, hidden = ops.draft_greedy(*mine, stop_below, *extra)
    want_drafts, want_hidden = ops.draft_greedy_native_composed(*theirs, stop_below, *extra)
    B, H, d = case[1], case[2], case[9]
    n = drafts.shape[1]
    assert n <= d and hidden.shape == (B, n + 1, H)
    assert torch.equal(drafts, want_drafts)
    assert_bitwise(hidden, want_hidden, "hidden")
    for a, b in zip(mine[3] + mine[4], theirs[3] + theirs[4]):
        assert_bitwise(a, b, "caches")
    static, _ = ops.draft_greedy(*with_fresh_caches(args))
    assert torch.equal(drafts, static[:, :n]), "every row proposes its greedy drafts while the stage runs"
    ref, _ = ops.draft_greedy_reference(*with_fresh_caches(args), stop_below, *extra)
    assert torch.equal(ref, drafts)  # the same decisions from the plain-PyTorch stage (no near-ties here)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_exit_head_top2_and_fitted_stop_draft(dtype):
    """On the GPU: exit_head_top2's tokens == exit_head_argmax, its values close to the reference's logits; a
    stop-model draft bitwise the native ops step by step (the stop model and context stay on the CPU)."""
    g = seeded("cuda-top2", dtype)
    h, nw, head = (randn((5, 96), dtype, g, scale=2.0).cuda(), randn((96,), dtype, g).cuda(),
                   randn((1000, 96), dtype, g, scale=0.5).cuda())
    subset = torch.randperm(1000, generator=g)[:300].cuda()
    for sub in (None, subset):
        with poisoned_outputs():
            tokens, top2 = ops.exit_head_top2(h, nw, 1e-5, head, sub)
        assert torch.equal(tokens, ops.exit_head_argmax(h, nw, 1e-5, head, sub))
        _, want = ops.exit_head_top2_reference(h.cpu(), nw.cpu(), 1e-5, head.cpu(), None if sub is None else sub.cpu())
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
        torch.testing.assert_close(top2.cpu(), want, **tol)
    case = CASES[2]
    args = case_args(case, dtype, "cuda", tag="cuda-fitted-stop")
    extra = model_args(case, case[1], seeded("cuda-fitted-stop-ctx"))
    mine, theirs = with_fresh_caches(args), with_fresh_caches(args)
    with poisoned_outputs():
        drafts, hidden = ops.draft_greedy(*mine, 0.3, *extra)
    want_drafts, want_hidden = ops.draft_greedy_native_composed(*theirs, 0.3, *extra)
    assert torch.equal(drafts, want_drafts)
    assert_bitwise(hidden, want_hidden, "hidden")


def test_decode_batch_context_is_each_live_sequence_so_far():
    """DecodeBatch.context() == prompt + emitted tokens of each live row, in row order, after rounds of emits and
    after a sequence in the middle finishes (its row dropped, the others moved up)."""
    from types import SimpleNamespace

    from layerskip_ext.generation.batch import DecodeBatch
    from layerskip_ext.generation.core import SequenceOutput, StopRules

    cache = SimpleNamespace(k=[torch.zeros(3, 1, 20, 2)], v=[torch.zeros(3, 1, 20, 2)])
    decoder = SimpleNamespace(new_cache=lambda B, capacity: cache, device=torch.device("cpu"))
    prompts = [[5, 6, 7], [8], [9, 10]]
    rules = StopRules([SequenceOutput(list(p)) for p in prompts], 10, [99], 20)
    batch = DecodeBatch(decoder, rules, 20)

    def check():
        tokens, lengths = batch.context()
        want = [rules.outputs[b].prompt_tokens + rules.outputs[b].tokens for b in batch.active]
        assert lengths.tolist() == [len(w) for w in want]
        for row, w in enumerate(want):
            assert tokens[row, :len(w)].tolist() == w and bool((tokens[row, len(w):] == -1).all())

    check()
    for step in range(3):
        for row in range(len(batch.active)):
            batch.emit(row, [20 + 3 * step + row, 40 + row])
        check()
    batch.emit(1, [99])  # sequence 1 stops
    batch.drop_finished()
    assert batch.active == [0, 2]
    batch.emit(1, [77])
    check()


def row_alone(args, extra, b):
    """Row b of a draft_greedy case as a batch of one (its caches copied)."""
    a = list(args)
    a[0], a[5] = args[0][b:b + 1], args[5][b:b + 1]
    a[3], a[4] = [t[b:b + 1].clone() for t in args[3]], [t[b:b + 1].clone() for t in args[4]]
    stop_model, ctx, lens = extra
    return a, (stop_model, ctx[b:b + 1], lens[b:b + 1])


@pytest.mark.parametrize("fitted", [True, False])
def test_a_batch_drafts_while_its_rows_mean_chance_holds(fitted):
    """In a batch the stage's length lies between its rows' lengths drafted alone (the rows' mean chance is between
    their least and most confident), every row proposes its own greedy drafts (no -1: a row's drafts cost nothing
    more while the stage runs); in some case the batch stops before its most confident row would, in some after its
    least confident would."""
    below_max = above_min = 0
    for case in [c for c in CASES if c[9] >= 3 and c[1] >= 2]:
        for stop_below in (0.05, 0.3, 0.7) if fitted else (0.003, 0.01, 0.02, 0.03):  # (random logits: top p ~.02)
            args = case_args(case, torch.float32, tag="fitted-stop")
            extra = model_args(case, case[1], seeded("fitted-stop-ctx", case))
            extra = extra if fitted else ()
            drafts, _ = ops.draft_greedy(*with_fresh_caches(args), stop_below, *extra)
            static, _ = ops.draft_greedy(*with_fresh_caches(args))
            n = drafts.shape[1]
            assert torch.equal(drafts, static[:, :n]), "a batch proposes each row's greedy drafts"
            alone = []
            for b in range(case[1]):
                a, e = row_alone(args, model_args(case, case[1], seeded("fitted-stop-ctx", case)), b)
                alone.append(ops.draft_greedy(*a, stop_below, *(e if fitted else ()))[0].shape[1])
            assert min(alone) <= n <= max(alone), (case, stop_below, alone, n)
            below_max += int(n < max(alone))
            above_min += int(n > min(alone))
    assert below_max and above_min, "the mean decides: neither the most confident row nor the least"


def test_a_stop_model_that_always_accepts_drafts_like_static_and_one_that_never_does_drafts_nothing():
    case = CASES[2]
    args = case_args(case, torch.float32, tag="fitted-extremes")
    _, ctx, lens = model_args(case, case[1], seeded("fitted-extremes-ctx"))
    static, _ = ops.draft_greedy(*with_fresh_caches(args))
    sure = torch.tensor([60.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    drafts, _ = ops.draft_greedy(*with_fresh_caches(args), 0.5, sure, ctx, lens)
    assert torch.equal(drafts, static)
    never = torch.tensor([-60.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    drafts, hidden = ops.draft_greedy(*with_fresh_caches(args), 0.5, never, ctx, lens)
    assert drafts.shape[1] == 0 and hidden.shape[1] == 1


def _stop_err_cases():
    case = CASES[2]
    args = case_args(case, torch.float32, tag="fitted-errors")
    sm, ctx, lens = model_args(case, case[1], seeded("fitted-errors-ctx"))

    def call(stop_below=0.3, model=sm, context=ctx, context_len=lens):
        return lambda: ops.draft_greedy(*with_fresh_caches(args), stop_below, model, context, context_len)
    return {
        "model alone": (call(context=None, context_len=None), "draft_greedy: stop_model, context and context_len go "
                                                              "together"),
        "no threshold": (call(stop_below=0.0), "draft_greedy: a stop_model needs stop_below > 0"),
        "model size": (call(model=sm[:5]), "draft_greedy: stop_model must be a CPU float64 tensor [6]"),
        "model dtype": (call(model=sm.float()), "draft_greedy: stop_model must be a CPU float64 tensor [6]"),
        "context rank": (call(context=ctx[0]), "draft_greedy: context must be 2-D [B, C]"),
        "context rows": (call(context=ctx[:1]), "draft_greedy: context.size(0) (B = tokens.size(0))"),
        "length zero": (call(context_len=torch.zeros_like(lens)), "draft_greedy: context_len[0] = 0 is outside"),
        "length past": (call(context_len=lens + 100), "is outside [1, 40]"),
        "length dtype": (call(context_len=lens.int()), "draft_greedy: context_len must be int64"),
    }


test_stop_model_argument_errors = argument_error_test(_stop_err_cases())


# ---- generation ----

def test_generation_with_a_stop_model_is_lossless():
    """Greedy self-speculation with a stop model emits autoregressive greedy's tokens on every prompt, batched and
    alone, native and reference; the thresholds change how much is drafted, not what is emitted."""
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7], [3, 3, 3, 3]]
    weights = [0.5, 0.3, 0.4, 0.6, 0.9, 1.2]
    for backend in ("native", "reference"):
        model = tiny_model(5, torch.float32, num_hidden_layers=4, backend=backend)
        ar = generate(model, prompts, max_new_tokens=24, stop_token_ids=[], strategy="autoregressive")
        drafted = set()
        for E, tau, growth in ((1, 0.2, 0), (2, 0.5, 0), (3, 0.05, 2), (2, 0.9, 4)):
            ss = generate(model, prompts, max_new_tokens=24, stop_token_ids=[], strategy="self_speculative",
                          exit_layer=E, num_speculations=6, draft_stop=tau, draft_growth=growth,
                          draft_stop_model=weights)
            assert [s.tokens for s in ss.sequences] == [s.tokens for s in ar.sequences], (backend, E, tau)
            assert ss.stats["draft_stop_model"] == weights
            drafted.add(ss.stats["draft_tokens"])
        assert len(drafted) > 1, "the thresholds changed nothing"


def test_the_tuned_stop_model_is_used_by_default_and_only_with_its_threshold():
    model = tiny_model(6, torch.float32, num_hidden_layers=4)
    weights = [1.0, 0.2, 0.1, 0.2, 0.3, 0.4]
    model.config.layerskip = {"exit_layer": 2, "num_speculations": 6, "draft_stop": 0.4, "draft_stop_model": weights}
    prompt = [5, 9, 2, 7]
    r = generate(model, prompt, max_new_tokens=10, stop_token_ids=[])
    assert r.strategy == "self_speculative" and r.stats["draft_stop_model"] == weights and r.stats["draft_stop"] == 0.4
    r = generate(model, prompt, max_new_tokens=10, stop_token_ids=[], draft_stop=0.2)  # the caller's threshold
    assert r.stats["draft_stop_model"] is None
    r = generate(model, prompt, max_new_tokens=10, stop_token_ids=[], exit_layer=3)  # fitted at another exit
    assert r.stats["draft_stop_model"] is None
    assert tuned_stop_model(model, 2) == weights and tuned_stop_model(model, 1) is None
    r = generate(model, prompt, max_new_tokens=10, stop_token_ids=[], temperature=0.8, seed=1)  # sampling: off
    assert r.stats["draft_stop_model"] is None


@pytest.mark.parametrize("bad, message", [
    ([1.0] * 5, "draft_stop_model must be 6 finite numbers"),
    ([1.0, float("nan"), 0, 0, 0, 0], "draft_stop_model must be 6 finite numbers"),
    ("fitted", "draft_stop_model must be 'auto', None or 6 weights"),
])
def test_bad_stop_models_are_clear_errors(bad, message):
    model = tiny_model(5, torch.float32, num_hidden_layers=4)
    with pytest.raises(GenerationError, match=message):
        generate(model, [1, 2, 3], max_new_tokens=4, strategy="self_speculative", exit_layer=2, draft_stop=0.3,
                 draft_stop_model=bad)


def test_a_stop_model_needs_a_threshold():
    model = tiny_model(5, torch.float32, num_hidden_layers=4)
    with pytest.raises(GenerationError, match="draft_stop_model needs draft_stop > 0"):
        generate(model, [1, 2, 3], max_new_tokens=4, strategy="self_speculative", exit_layer=2, draft_stop=0.0,
                 draft_stop_model=[0.0] * 6)
    assert as_stop_model(None) is None and as_stop_model([1, 2, 3, 4, 5, 6]).dtype == torch.float64


# ---- fitting ----

def test_auc_equals_the_pairwise_count():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (60,), generator=g).tolist()  # many ties
    labels = (torch.rand(60, generator=g) < 0.6).tolist()
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    want = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert math.isclose(auc(scores, labels), want, rel_tol=1e-12)
    assert math.isnan(auc([1.0, 2.0], [True, True]))


def test_fit_logistic_recovers_a_known_model():
    g = torch.Generator().manual_seed(11)
    X = torch.cat([torch.ones(20000, 1), torch.randn(20000, 1, generator=g),
                   (torch.rand(20000, 4, generator=g) < 0.4).double()], dim=1).double()
    w_true = torch.tensor([-0.5, 1.5, 0.3, 0.6, -0.4, 1.0], dtype=torch.float64)
    y = (torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w_true)).double()
    w = torch.tensor(fit_logistic(X, y, l2=0.0), dtype=torch.float64)
    assert torch.allclose(w, w_true, atol=0.12), w


def test_fit_stop_model_on_a_tiny_model():
    """Features from one teacher-forced pass per prompt: as many draft positions as output tokens past the first,
    agreement in (0, 1); the fitted weights then drive a lossless generation."""
    model = tiny_model(5, torch.float32, num_hidden_layers=4)
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7], [3, 3, 3, 3], [8, 1, 8, 1]]
    fit = fit_stop_model(model, prompts, 2, 20, stop_token_ids=[])
    assert fit.tokens == 4 * 19 and 0 < fit.agreement < 1 and len(fit.weights) == 6 and 0 <= fit.auc <= 1
    ar = generate(model, prompts, max_new_tokens=20, stop_token_ids=[], strategy="autoregressive")
    ss = generate(model, prompts, max_new_tokens=20, stop_token_ids=[], strategy="self_speculative", exit_layer=2,
                  num_speculations=8, draft_stop=0.3, draft_stop_model=fit.weights)
    assert [s.tokens for s in ss.sequences] == [s.tokens for s in ar.sequences]
    with pytest.raises(ValueError, match="needs both accepted and rejected drafts"):
        fit_stop_model(model, prompts, 4, 20, stop_token_ids=[])  # the last layer agrees with itself everywhere
