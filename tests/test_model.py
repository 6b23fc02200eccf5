"""The plain-PyTorch Llama model: agreement with Hugging Face, cache consistency, native-vs-reference paths."""
import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.errors import CheckpointError, GenerationError
from layerskip_ext.config import LlamaConfig
from layerskip_ext.model.llama import LlamaForCausalLM
from layerskip_ext.model.rope import rope_inv_freq
from helpers import tiny_model

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
needs_native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_matches_transformers(tie, scaling):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(tie_word_embeddings=tie, rope_scaling=scaling)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.config.to_hf_dict())).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    if tie:
        hf.tie_weights()
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(ours(tokens), expected, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies():
    plain = rope_inv_freq(64, 500000.0)
    scaled = rope_inv_freq(64, 500000.0, dict(LLAMA3_SCALING, original_max_position_embeddings=8192))
    assert torch.equal(scaled[:4], plain[:4])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # longest wavelength slowed by `factor`


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_chunks_equal_one_pass(dtype):
    """Prefill in pieces through the static cache == one pass over the whole sequence."""
    model = tiny_model(dtype=dtype)
    tokens = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = model.new_cache(2, 64)
    pieces, start = [], 0
    for n in (20, 1, 9, 7):
        pieces.append(model(tokens[:, start:start + n], start=torch.tensor([start, start]), cache=cache))
        start += n
    # bf16: chunking changes which rows share a matmul, so roundings differ; logits are O(1) after 3 layers and
    # carry a few bf16 ulps (2^-8 relative) of error from each layer.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.15)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **tol)


def test_ragged_batch_rows_are_independent():
    model = tiny_model()
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 5))
    cache = model.new_cache(2, 32)
    la = model(a, cache=cache, rows=slice(0, 1))
    lb = model(b, cache=cache, rows=slice(1, 2))
    step = model(torch.tensor([[7], [9]]), start=torch.tensor([12, 5]), cache=cache)
    alone = model(torch.cat([a, torch.tensor([[7]])], 1))[:, -1]
    alone_b = model(torch.cat([b, torch.tensor([[9]])], 1))[:, -1]
    torch.testing.assert_close(step[0, -1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[1, -1], alone_b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la[0, -1], model(a)[0, -1])
    torch.testing.assert_close(lb[0, -1], model(b)[0, -1])


def test_exit_layer_uses_shared_head_on_intermediate_state():
    model = tiny_model()
    tokens = torch.randint(0, 300, (1, 10))
    hidden = model.hidden_states(tokens)
    with torch.no_grad():
        for E in range(1, model.num_layers + 1):
            torch.testing.assert_close(model(tokens, exit_layer=E), model.head(hidden[E - 1]))


def test_hidden_states_are_differentiable():
    model = tiny_model().train()
    hidden = model.hidden_states(torch.randint(0, 300, (2, 8)))
    model.head(hidden[0]).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.model.layers[2].self_attn.q_proj.weight.grad is None  # layer 2 did not feed exit 1


def test_bad_inputs_have_clear_errors():
    model = tiny_model()
    cache = model.new_cache(1, 16)
    with pytest.raises(GenerationError, match="do not fit the KV cache"):
        model(torch.zeros(1, 17, dtype=torch.long), cache=cache)
    with pytest.raises(GenerationError, match="exit layer"):
        model(torch.zeros(1, 2, dtype=torch.long), exit_layer=4)
    with pytest.raises(GenerationError, match="token ids"):
        model(torch.tensor([[300]]))
    with pytest.raises(GenerationError, match="context length"):
        model.new_cache(1, 257)
    with pytest.raises(GenerationError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))


def test_from_state_dict_rejects_mismatched_checkpoints():
    model = tiny_model()
    sd = model.state_dict()
    config = model.config
    missing = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        LlamaForCausalLM.from_state_dict(config, missing)
    wrong = dict(sd, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(CheckpointError, match="model.norm.weight.*shape"):
        LlamaForCausalLM.from_state_dict(config, wrong)
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        LlamaForCausalLM.from_state_dict(config, dict(sd, extra=torch.ones(1)))


def test_config_validation():
    with pytest.raises(CheckpointError, match="multiple of"):
        LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        LlamaConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="rope_scaling"):
        LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=4, rope_scaling={"rope_type": "yarn"})


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_path_matches_reference_path(dtype):
    ref = tiny_model(dtype=dtype, num_attention_heads=8, num_key_value_heads=2, hidden_size=128, backend="reference")
    nat = tiny_model(dtype=dtype, num_attention_heads=8, num_key_value_heads=2, hidden_size=128, backend="native")
    tokens = torch.randint(0, 300, (2, 21))
    outs = []
    for model in (ref, nat):
        cache = model.new_cache(2, 32)
        first = model(tokens[:, :17], cache=cache)
        rest = model(tokens[:, 17:], start=torch.tensor([17, 17]), cache=cache)
        outs.append(torch.cat([first, rest], 1).float())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.08)
    torch.testing.assert_close(outs[1], outs[0], **tol)


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_config_written_by_transformers_round_trips(scaling):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(rope_scaling=scaling).config
    hf_dict = transformers.LlamaConfig(**ours.to_hf_dict()).to_dict()  # transformers' own layout
    back = LlamaConfig.from_hf_dict(hf_dict)
    assert back.rope_theta == ours.rope_theta
    assert (back.rope_scaling or {}).get("factor") == (scaling or {}).get("factor")
