"""Autoregressive and early-exit generation: correctness, stop rules, sampling, argument checks, memory."""
import gc
import weakref

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.errors import GenerationError
from layerskip_ext.generation import SamplingParams, generate
from layerskip_ext.generation.sampling import filtered_probs
from helpers import tiny_model


def naive_greedy(model, prompt, n, exit_layer=None):
    """No cache: recompute the whole sequence for every token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), exit_layer=exit_layer)[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("exit_layer", [None, 1, 2])
def test_greedy_equals_recomputation_without_cache(exit_layer):
    model = tiny_model()
    prompt = torch.randint(0, 300, (9,)).tolist()
    strategy = "autoregressive" if exit_layer is None else "early_exit"
    result = generate(model, prompt, strategy=strategy, exit_layer=exit_layer, max_new_tokens=15,
                      stop_token_ids=[])
    assert result.sequences[0].tokens == naive_greedy(model, prompt, 15, exit_layer)
    assert result.sequences[0].finish_reason == "length"
    assert result.strategy == strategy


def test_batch_of_ragged_prompts_equals_each_alone():
    model = tiny_model()
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 11, 6)]
    batch = generate(model, prompts, max_new_tokens=10, stop_token_ids=[])
    for p, out in zip(prompts, batch.sequences):
        assert out.tokens == generate(model, p, max_new_tokens=10, stop_token_ids=[]).sequences[0].tokens


def test_stop_token_ends_sequence_and_is_kept():
    model = tiny_model()
    prompt = [5, 6, 7]
    free = generate(model, prompt, max_new_tokens=12, stop_token_ids=[]).sequences[0].tokens
    stop = free[4]
    out = generate(model, prompt, max_new_tokens=12, stop_token_ids=[stop]).sequences[0]
    assert out.tokens == free[:free.index(stop) + 1]
    assert out.finish_reason == "stop"


def test_context_full_ends_cleanly_with_reason():
    model = tiny_model(max_position_embeddings=20)
    out = generate(model, list(range(15)), max_new_tokens=50, stop_token_ids=[]).sequences[0]
    assert out.finish_reason == "context_full"
    assert len(out.tokens) == 5  # positions 15..19 are the last ones the model has


def test_streaming_callback_sees_every_token_in_order():
    model = tiny_model()
    seen = []
    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, stop_token_ids=[],
                      on_token=lambda b, t: seen.append((b, t)))
    for b, seq in enumerate(result.sequences):
        assert [t for i, t in seen if i == b] == seq.tokens


def test_sampling_is_reproducible_with_seed_and_varies_without():
    model = tiny_model()
    kw = dict(max_new_tokens=20, temperature=1.0, stop_token_ids=[])
    a = generate(model, [1, 2, 3], seed=123, **kw).sequences[0].tokens
    b = generate(model, [1, 2, 3], seed=123, **kw).sequences[0].tokens
    c = generate(model, [1, 2, 3], seed=124, **kw).sequences[0].tokens
    assert a == b and a != c


def test_first_sampled_token_follows_model_distribution():
    """Chi-square goodness of fit of the first emitted token against softmax(logits / T) with top-k."""
    model = tiny_model(vocab_size=12)
    params = SamplingParams(temperature=0.8, top_k=6)
    prompt = [1, 2, 3]
    expected = filtered_probs(model(torch.tensor([prompt]))[0, -1], params)
    n = 3000
    counts = torch.zeros(12)
    for seed in range(n):
        t = generate(model, prompt, max_new_tokens=1, temperature=0.8, top_k=6, seed=seed).sequences[0].tokens[0]
        counts[t] += 1
    assert counts[expected == 0].sum() == 0  # never outside the top-k
    keep = expected > 0
    chi2 = (((counts[keep] - n * expected[keep]) ** 2) / (n * expected[keep])).sum().item()
    # 5 degrees of freedom; P(chi2 > 20.5) = 0.001
    assert chi2 < 20.5, (counts, expected * n)


def test_top_p_keeps_smallest_prefix_reaching_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_k=-3), "top_k"),
    (dict(strategy="early_exit", exit_layer=0), "exit_layer"),
    (dict(strategy="early_exit", exit_layer=4), "exit_layer"),
    (dict(strategy="early_exit"), "need exit_layer"),
    (dict(strategy="beam"), "unknown strategy"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(tiny_model(), [1, 2, 3], **kwargs)


def test_bad_prompts():
    model = tiny_model(max_position_embeddings=16)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[1, 2], []])
    with pytest.raises(GenerationError, match="context"):
        generate(model, list(range(16)))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [1, 999])


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_native_greedy_equals_reference_greedy():
    ref = tiny_model(backend="reference")
    nat = tiny_model(backend="native")
    prompt = torch.randint(0, 300, (12,)).tolist()
    kw = dict(max_new_tokens=24, stop_token_ids=[])
    assert generate(nat, prompt, **kw).sequences[0].tokens == generate(ref, prompt, **kw).sequences[0].tokens


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_generate_releases_its_kv_cache(backend):
    """Nothing outlives a generate() call's KV cache: the cache, its buffer and its per-layer views are freed when
    the call returns (they held ~GBs for a 7B model when a memo kept the last caches alive)."""
    if backend == "native" and not ops.native_available():
        pytest.skip("native extension not built")
    model = tiny_model(backend=backend)
    made = []
    new_cache = model.decoder.new_cache

    def tracked(*args):
        cache = new_cache(*args)
        made.append((weakref.ref(cache), weakref.ref(cache.k[0])))
        return cache

    model.decoder.new_cache = tracked
    kw = dict(max_new_tokens=6, stop_token_ids=[])
    generate(model, [[1, 2, 3], [4, 5]], **kw)
    generate(model, [1, 2, 3], strategy="self_speculative", exit_layer=2, num_speculations=2, **kw)
    gc.collect()
    assert len(made) == 2 and all(c() is None and k() is None for c, k in made)
