"""Drop-in use on an in-memory transformers LlamaForCausalLM (optional extra)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from layerskip_ext import hf  # noqa: E402
from tiny_checkpoints import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    ours = make_tiny_model(num_hidden_layers=4, seed=5)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.config.to_hf_dict())).eval()
    model.load_state_dict(ours.state_dict(), strict=False)
    return model


def test_engine_shares_weights(hf_model):
    engine = hf.from_hf(hf_model)
    assert engine.model.layers[1].mlp.up_proj.weight.data_ptr() == hf_model.model.layers[1].mlp.up_proj.weight.data_ptr()
    assert hf.from_hf(hf_model) is engine
    assert "_layerskip_engine" not in dict(hf_model.named_modules())  # the HF model's modules are untouched


def test_greedy_drop_in_equals_hf_generate(hf_model):
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    for E, d in ((1, 3), (3, 2)):
        got = hf.generate(hf_model, ids, max_new_tokens=12, exit_layer=E, num_speculations=d, eos_token_id=[])
        assert torch.equal(got, expected), (E, d)


def test_left_padded_batch(hf_model):
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = hf.generate(hf_model, ids, attention_mask=mask, max_new_tokens=6, exit_layer=2, num_speculations=2,
                      eos_token_id=[])
    alone = hf.generate(hf_model, ids[:1, 2:], max_new_tokens=6, exit_layer=2, num_speculations=2, eos_token_id=[])
    assert out[0, :9].tolist() == alone[0].tolist()
