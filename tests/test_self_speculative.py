"""Self-speculative decoding: greedy output identical to autoregressive; sampling follows the full model."""
import itertools

import pytest
import torch

from layerskip_ext.errors import GenerationError
from layerskip_ext.generation import SamplingParams, generate
from layerskip_ext.generation.draft_length import DraftLength
from layerskip_ext.generation.sampling import filtered_probs
from helpers import decoders, make_model


@pytest.mark.parametrize("op_set", list(decoders()))
def test_greedy_equals_autoregressive_for_every_exit_and_depth(op_set):
    model = make_model(op_set)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 8)]
    kw = dict(max_new_tokens=14, stop_token_ids=[])
    for prompt in prompts:
        expected = generate(model, prompt, **kw).sequences[0].tokens
        for E, d in itertools.product((1, 2, 3, 4), (1, 3, 6)):
            result = generate(model, prompt, strategy="self_speculative", exit_layer=E, num_speculations=d, **kw)
            assert result.sequences[0].tokens == expected, (E, d)
            s = result.stats
            assert 0 <= s["accepted_tokens"] <= s["draft_tokens"]
            assert s["rounds"] * (d + 1) >= len(expected) - 1  # at most d+1 tokens per round
            if E == model.num_layers:
                assert s["accepted_tokens"] == s["draft_tokens"]  # the draft is the full model


def test_greedy_ragged_batch_equals_each_alone():
    model = make_model("rowwise")
    prompts = [[5, 6, 7], list(range(20, 31)), [1, 2, 3, 4, 5, 6]]
    kw = dict(max_new_tokens=10, stop_token_ids=[], strategy="self_speculative", exit_layer=2, num_speculations=3)
    batch = generate(model, prompts, **kw)
    for p, out in zip(prompts, batch.sequences):
        assert out.tokens == generate(model, p, max_new_tokens=10, stop_token_ids=[]).sequences[0].tokens


def test_stop_token_and_context_limit_inside_a_round():
    model = make_model("rowwise", max_position_embeddings=24)
    prompt = [9, 8, 7]
    free = generate(model, prompt, max_new_tokens=12, stop_token_ids=[]).sequences[0].tokens
    stop = free[5]
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=4)
    out = generate(model, prompt, max_new_tokens=12, stop_token_ids=[stop], **kw).sequences[0]
    assert out.tokens == free[:free.index(stop) + 1] and out.finish_reason == "stop"
    full = generate(model, prompt, max_new_tokens=100, stop_token_ids=[], **kw).sequences[0]
    assert full.finish_reason == "context_full" and len(full.tokens) == 21
    assert full.tokens == generate(model, prompt, max_new_tokens=100, stop_token_ids=[]).sequences[0].tokens


def _exact_marginals(model, prompt, params, steps):
    """Exact distribution of each of the first `steps` emitted tokens under the full model (enumerates paths)."""
    V = model.config.vocab_size
    paths = {(): 1.0}
    marginals = []
    for _ in range(steps):
        m = torch.zeros(V, dtype=torch.float64)
        nxt = {}
        for path, w in paths.items():
            p = filtered_probs(model(torch.tensor([prompt + list(path)]))[0, -1], params).double()
            m += w * p
            for t in torch.nonzero(p).flatten().tolist():
                nxt[path + (t,)] = w * float(p[t])
        marginals.append(m)
        paths = nxt
    return marginals


@pytest.mark.parametrize("op_set", list(decoders()))
def test_sampling_follows_the_full_model_distribution(op_set):
    """Chi-square of the 2nd and 3rd emitted tokens (both speculative) against the exact marginals."""
    model = make_model(op_set, vocab_size=6)
    params = SamplingParams(temperature=1.3)
    prompt = [1, 2, 3]
    exact = _exact_marginals(model, prompt, params, 3)
    n = 1500
    counts = torch.zeros(3, 6, dtype=torch.float64)
    accepted = 0
    for seed in range(n):
        r = generate(model, prompt, max_new_tokens=3, temperature=1.3, seed=seed, stop_token_ids=[],
                     strategy="self_speculative", exit_layer=1, num_speculations=2)
        for i, t in enumerate(r.sequences[0].tokens):
            counts[i, t] += 1
        accepted += r.stats["accepted_tokens"]
    assert 0 < accepted < n * 2  # both acceptance and rejection happened
    for i in (1, 2):
        chi2 = (((counts[i] - n * exact[i]) ** 2) / (n * exact[i])).sum().item()
        assert chi2 < 20.5, (i, counts[i], n * exact[i])  # 5 d.o.f., p = 0.001


def test_sampling_is_reproducible_with_seed():
    model = make_model("rowwise")
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, stop_token_ids=[], strategy="self_speculative",
              exit_layer=2, num_speculations=3)
    assert generate(model, [4, 5], seed=7, **kw).sequences[0].tokens == \
        generate(model, [4, 5], seed=7, **kw).sequences[0].tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(exit_layer=0, num_speculations=2), "exit_layer"),
    (dict(exit_layer=5, num_speculations=2), "exit_layer"),
    (dict(num_speculations=2), "need exit_layer"),
    (dict(exit_layer=2, num_speculations=0), "num_speculations"),
    (dict(exit_layer=2, num_speculations=300), "remaining context"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(make_model("rowwise"), [1, 2], strategy="self_speculative", **kwargs)


def test_num_speculations_defaults_to_the_tuned_setting_or_4():
    model = make_model("rowwise")
    r = generate(model, [1, 2], strategy="self_speculative", exit_layer=2, max_new_tokens=3, stop_token_ids=[])
    assert r.stats["num_speculations"] == 4
    model.config.layerskip = {"exit_layer": 3, "num_speculations": 2}
    try:
        r = generate(model, [1, 2], max_new_tokens=3, stop_token_ids=[])  # auto: the tuned setting
        assert r.strategy == "self_speculative" and (r.stats["exit_layer"], r.stats["num_speculations"]) == (3, 2)
        model.config.layerskip = {"exit_layer": 3, "num_speculations": 2, "speedup": 0.97}
        assert generate(model, [1, 2], max_new_tokens=3).strategy == "autoregressive"  # measured not to pay
    finally:
        model.config.layerskip = None


@pytest.mark.parametrize("backend", list(decoders()))
def test_dynamic_drafting_is_lossless_and_drafts_less(backend):
    """draft_stop: greedy output identical to autoregressive for every threshold; a higher threshold drafts less
    (never more than num_speculations per round)."""
    model = make_model(backend)
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7]]
    kw = dict(max_new_tokens=24, stop_token_ids=[])
    ar = [s.tokens for s in generate(model, prompts, strategy="autoregressive", **kw).sequences]
    drafted = []
    for stop in (0.0, 0.05, 0.3, 0.9):
        r = generate(model, prompts, strategy="self_speculative", exit_layer=2, num_speculations=5, draft_stop=stop,
                     **kw)
        assert [s.tokens for s in r.sequences] == ar, stop
        assert r.stats["draft_stop"] == stop and r.stats["accepted_tokens"] <= r.stats["draft_tokens"]
        drafted.append(r.stats["draft_tokens"] / r.stats["rounds"])
    assert drafted[0] == 5 * 2 or drafted[0] <= 10  # the last rounds draft fewer
    assert drafted == sorted(drafted, reverse=True) and drafted[-1] < drafted[0]
    with pytest.raises(GenerationError, match="self_speculative decoding only"):
        generate(model, [1, 2], strategy="autoregressive", draft_stop=0.5)
    with pytest.raises(GenerationError, match="probability"):
        generate(model, [1, 2], strategy="self_speculative", exit_layer=2, num_speculations=2, draft_stop=1.5)


def test_draft_length_adapts_to_acceptance():
    """Static: always d. Adaptive: starts at g, grows by g after a fully accepted round (capped at d), falls to the
    accepted run + 1 after a rejection (never below 1)."""
    static = DraftLength(6)
    assert static.first() == 6 and static.after(6, False, 0) == 6 and static.after(6, True, 6) == 6
    grow = DraftLength(10, 4)
    assert grow.first() == 4
    assert grow.after(4, True, 4) == 8 and grow.after(8, True, 8) == 10 and grow.after(10, True, 10) == 10
    assert grow.after(10, False, 3) == 4 and grow.after(10, False, 0) == 1
    assert grow.after(10, True, 2) == 10  # the draft stopped early and all 2 were accepted: the cap still grows
    assert DraftLength(3, 8).first() == 3


@pytest.mark.parametrize("backend", list(decoders()))
def test_adaptive_length_is_lossless_and_grows_when_drafts_are_accepted(backend):
    """draft_growth: greedy output identical to autoregressive, alone and with draft_stop, for a ragged batch;
    with the full model as its own draft (E = L: every draft accepted) the lengths run g, 2g, ... d, so the rounds
    are counted exactly."""
    model = make_model(backend)
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7]]
    kw = dict(max_new_tokens=24, stop_token_ids=[])
    ar = [s.tokens for s in generate(model, prompts, strategy="autoregressive", **kw).sequences]
    for E, d, g, stop in ((2, 8, 2, 0.0), (2, 8, 3, 0.3), (1, 12, 4, 0.0), (3, 5, 1, 0.05)):
        r = generate(model, prompts, strategy="self_speculative", exit_layer=E, num_speculations=d, draft_growth=g,
                     draft_stop=stop, **kw)
        assert [s.tokens for s in r.sequences] == ar, (E, d, g, stop)
        assert r.stats["draft_growth"] == g and r.stats["accepted_tokens"] <= r.stats["draft_tokens"]
    # 23 tokens after the prefill's: rounds of 2, 4, 6 drafts (+1 each), then 7 (what is left): 4 rounds
    r = generate(model, prompts[0], strategy="self_speculative", exit_layer=4, num_speculations=8, draft_growth=2,
                 **kw)
    assert r.sequences[0].tokens == ar[0] and r.stats["rounds"] == 4 and r.stats["draft_tokens"] == 2 + 4 + 6 + 7
    static = generate(model, prompts[0], strategy="self_speculative", exit_layer=4, num_speculations=8, **kw)
    assert static.stats["rounds"] == 3  # 8 + 8 + 5 drafts


def test_adaptive_length_sampling_follows_the_full_model_distribution():
    """Sampling with draft_growth: the length of a round depends on the last round's acceptance, never on its own
    draws, so the emitted tokens still follow the full model (chi-square of the 2nd to 4th tokens)."""
    model = make_model(list(decoders())[-1], vocab_size=6)
    params = SamplingParams(temperature=1.3)
    prompt = [1, 2, 3]
    exact = _exact_marginals(model, prompt, params, 4)
    n = 1500
    counts = torch.zeros(4, 6, dtype=torch.float64)
    lengths = set()
    for seed in range(n):
        r = generate(model, prompt, max_new_tokens=4, temperature=1.3, seed=seed, stop_token_ids=[],
                     strategy="self_speculative", exit_layer=1, num_speculations=3, draft_growth=1)
        for i, t in enumerate(r.sequences[0].tokens):
            counts[i, t] += 1
        lengths.add((r.stats["rounds"], r.stats["draft_tokens"]))
    assert len(lengths) > 2  # rounds of different lengths happened
    for i in (1, 2, 3):
        chi2 = (((counts[i] - n * exact[i]) ** 2) / (n * exact[i])).sum().item()
        assert chi2 < 20.5, (i, counts[i], n * exact[i])  # 5 d.o.f., p = 0.001


def test_dynamic_draft_sampling_follows_the_full_model_distribution():
    """Sampling with draft_stop: a round stops drafting where its draft distribution's top probability falls below
    the threshold, a decision on the draft's own prefix, so the emitted tokens still follow the full model
    (chi-square of the 2nd to 4th tokens); rounds of several lengths happen."""
    model = make_model(list(decoders())[-1], vocab_size=6)
    params = SamplingParams(temperature=1.3)
    prompt = [1, 2, 3]
    exact = _exact_marginals(model, prompt, params, 4)
    n = 1500
    counts = torch.zeros(4, 6, dtype=torch.float64)
    lengths = set()
    for seed in range(n):
        r = generate(model, prompt, max_new_tokens=4, temperature=1.3, seed=seed, stop_token_ids=[],
                     strategy="self_speculative", exit_layer=1, num_speculations=3, draft_stop=0.3)
        for i, t in enumerate(r.sequences[0].tokens):
            counts[i, t] += 1
        lengths.add((r.stats["rounds"], r.stats["draft_tokens"]))
    assert len(lengths) > 2  # the stop cut rounds at different lengths
    for i in (1, 2, 3):
        chi2 = (((counts[i] - n * exact[i]) ** 2) / (n * exact[i])).sum().item()
        assert chi2 < 20.5, (i, counts[i], n * exact[i])  # 5 d.o.f., p = 0.001


def test_dynamic_draft_sampling_in_a_batch_stops_on_the_rows_mean():
    """A sampled batch with draft_stop: each row drafts as many tokens as the round (rows' mean rule), fewer
    than without the stop; a threshold of 1 drafts nothing past the first step; a stop model is greedy-only."""
    model = make_model("rowwise")
    kw = dict(max_new_tokens=16, temperature=0.5, seed=5, stop_token_ids=[], strategy="self_speculative",
              exit_layer=2, num_speculations=6)
    prompts = [[4, 5], [7, 8, 9], [1]]
    plain = generate(model, prompts, **kw)
    stopped = generate(model, prompts, draft_stop=0.1, **kw)  # (a random model: top probabilities ~.1)
    assert 0 < stopped.stats["draft_tokens"] < plain.stats["draft_tokens"]
    assert all(len(s.tokens) == 16 for s in stopped.sequences)
    never = generate(model, prompts, draft_stop=1.0, **kw)  # every top probability < 1: no drafts at all
    assert never.stats["draft_tokens"] == 0 and all(len(s.tokens) == 16 for s in never.sequences)
    with pytest.raises(GenerationError, match="greedy decoding only"):
        generate(model, prompts, draft_stop=0.5, draft_stop_model=[0.5, 0.3, 0.2, 0.4, 0.6, 0.8], **kw)


def test_bad_draft_growth_is_a_one_line_error():
    model = make_model("rowwise")
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(GenerationError, match="draft_growth must be an integer"):
            generate(model, [1, 2], draft_growth=bad, **kw)
    with pytest.raises(GenerationError, match="self_speculative decoding only"):
        generate(model, [1, 2], strategy="autoregressive", draft_growth=2)


def test_tuned_dynamic_drafting_comes_from_the_config():
    """auto uses the tuned block's draft_stop / draft_growth; another exit layer or an explicit value overrides."""
    model = make_model("rowwise")
    model.config.layerskip = {"exit_layer": 3, "num_speculations": 6, "draft_growth": 2, "draft_stop": 0.1}
    try:
        r = generate(model, [1, 2], max_new_tokens=5, stop_token_ids=[])
        assert (r.stats["draft_growth"], r.stats["draft_stop"]) == (2, 0.1)
        r = generate(model, [1, 2], max_new_tokens=5, stop_token_ids=[], draft_growth=0)
        assert (r.stats["draft_growth"], r.stats["draft_stop"]) == (0, 0.1)
        r = generate(model, [1, 2], max_new_tokens=5, stop_token_ids=[], strategy="self_speculative", exit_layer=2)
        assert (r.stats["draft_growth"], r.stats["draft_stop"]) == (0, 0.0)
        r = generate(model, [1, 2], max_new_tokens=5, stop_token_ids=[], temperature=0.8, seed=1)
        assert (r.stats["draft_growth"], r.stats["draft_stop"]) == (2, 0.0)  # the growth applies to sampling too
        assert r.stats["num_speculations"] == 4  # d = 6 was tuned with a stop sampling lacks: capped at 4
    finally:
        model.config.layerskip = None


def test_sampling_takes_the_tuned_sampling_setting():
    """A config's layerskip.sampling block is the sampling default (its own E, d, stop, growth, and "slower" by its
    own speedup); greedy keeps the main block; the greedy stop model never applies to sampling."""
    backend = list(decoders())[-1]
    model = make_model(backend)
    model.config.layerskip = {"exit_layer": 3, "num_speculations": 8, "draft_stop": 0.4,
                              "sampling": {"exit_layer": 2, "num_speculations": 2, "draft_growth": 1}}
    if backend == "native":  # (the test decoder "rowwise" has no exit_head_top2 for a stop model)
        model.config.layerskip["draft_stop_model"] = [0.5, 0.3, 0.2, 0.4, 0.6, 0.8]
    kw = dict(max_new_tokens=5, stop_token_ids=[])
    try:
        greedy = generate(model, [1, 2], **kw)
        assert (greedy.stats["exit_layer"], greedy.stats["num_speculations"], greedy.stats["draft_stop"]) == (3, 8, 0.4)
        sampled = generate(model, [1, 2], temperature=0.8, seed=1, **kw)
        assert (sampled.stats["exit_layer"], sampled.stats["num_speculations"], sampled.stats["draft_growth"],
                sampled.stats["draft_stop"]) == (2, 2, 1, 0.0)
        r = generate(model, [1, 2], temperature=0.8, seed=1, exit_layer=3, **kw)  # another E than sampling's
        assert (r.stats["exit_layer"], r.stats["num_speculations"], r.stats["draft_stop"]) == (3, 2, 0.0)
        model.config.layerskip["sampling"]["speedup"] = 0.9  # measured slower: auto samples autoregressively
        assert "rounds" not in generate(model, [1, 2], temperature=0.8, seed=1, **kw).stats
        assert generate(model, [1, 2], **kw).stats["rounds"] > 0  # greedy still self-speculates
    finally:
        model.config.layerskip = None
