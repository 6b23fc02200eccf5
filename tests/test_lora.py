"""LoRA adapters: the wrapper, merging, the adapter folder format, loading through load_checkpoint, and LoRA
training with the recipe (resumable, only adapters change, continuing from an adapter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from layerskip_ext.errors import CheckpointError, LayerSkipError
from layerskip_ext.io import load_checkpoint
from layerskip_ext.io.adapter import read_adapter, save_adapter
from layerskip_ext.model.lora import (ALL_LINEARS, LoRALinear, adapter_state_dict, apply_lora, load_adapter_state_,
                                      merge_lora_)
from layerskip_ext.errors import TrainingError
from tiny_checkpoints import make_random_state_dict, make_tiny_config, make_tiny_model, make_tiny_tokenizer, \
    write_hf_folder


def randomize_adapters(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.copy_(torch.randn(m.lora_a.shape, generator=g) * scale)
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * scale)


def test_fresh_adapter_is_identity_and_merge_equals_wrapped():
    model = make_tiny_model(seed=1)
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(tokens)
    params = apply_lora(model, rank=4)
    assert len(params) == 2 * len(ALL_LINEARS) * model.config.num_hidden_layers
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)     # B = 0: exactly the base model
    randomize_adapters(model)
    wrapped = model(tokens)
    assert (wrapped - before).abs().max() > 1e-3
    merge_lora_(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(getattr(model.model.layers[0].self_attn, n)) is nn.Linear for n in ("q_proj", "o_proj"))
    torch.testing.assert_close(model(tokens), wrapped, rtol=1e-5, atol=1e-5)
    with pytest.raises(LayerSkipError, match="rank must be >= 1"):
        apply_lora(make_tiny_model(), rank=0)
    with pytest.raises(LayerSkipError, match="unknown LoRA target"):
        apply_lora(make_tiny_model(), rank=2, targets=["qkv"])
    m = make_tiny_model()
    apply_lora(m, rank=2)
    with pytest.raises(LayerSkipError, match="already has LoRA"):
        apply_lora(m, rank=2)


@pytest.fixture
def base_folder(tmp_path):
    config = make_tiny_config(num_hidden_layers=3)      # the tiny tokenizer's vocabulary
    state = make_random_state_dict(config, seed=3)
    return write_hf_folder(tmp_path / "base", config, state, tokenizer=make_tiny_tokenizer())


def _adapter_from_model(tmp_path, base_folder, rank=4, alpha=8.0, **kw):
    from layerskip_ext.model import load_model
    model, _ = load_model(base_folder, backend="reference")
    apply_lora(model, rank, alpha)
    randomize_adapters(model, seed=5)
    folder = save_adapter(str(tmp_path / "adapter"), adapter_state_dict(model), base_model=base_folder, rank=rank,
                          alpha=alpha, targets=ALL_LINEARS, dtype=torch.float32, **kw)
    return folder, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_folder_loads_merged_into_its_base(tmp_path, base_folder, dtype):
    from layerskip_ext.model import load_model
    folder, wrapped = _adapter_from_model(tmp_path, base_folder, layerskip={"exit_layer": 2, "num_speculations": 3})
    meta, tensors = read_adapter(folder)
    assert meta["rank"] == 4 and set(tensors) == set(adapter_state_dict(wrapped))
    merged, tok = load_model(folder, dtype=dtype, backend="reference")
    assert tok is not None                                   # the base's tokenizer
    assert merged.config.layerskip == {"exit_layer": 2, "num_speculations": 3}
    tokens = torch.randint(0, merged.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged(tokens).float(), wrapped(tokens), rtol=tol, atol=tol)
    ckpt = load_checkpoint(folder)
    assert "adapter" in ckpt.source


def test_bad_adapters_are_clear_errors(tmp_path, base_folder):
    folder, _ = _adapter_from_model(tmp_path, base_folder)
    cfg_path = os.path.join(folder, "adapter_config.json")
    good = json.loads(open(cfg_path).read())

    def with_config(**changes):
        cfg = dict(good, **changes)
        open(cfg_path, "w").write(json.dumps(cfg))

    with_config(format="peft")
    with pytest.raises(CheckpointError, match="not a layerskip-lora adapter"):
        load_checkpoint(folder)
    with_config(rank=8)
    with pytest.raises(CheckpointError, match="has rank 4, the config says 8"):
        load_checkpoint(folder)
    with_config(base_model=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(folder)
    with_config()
    weights = os.path.join(folder, "adapter.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt adapter weights"):
        load_checkpoint(folder)
    os.unlink(weights)
    with pytest.raises(CheckpointError, match="adapter weights adapter.safetensors are missing"):
        load_checkpoint(folder)
    # an adapter for a different model shape
    other = make_tiny_config(num_hidden_layers=3, hidden_size=48, num_attention_heads=4,
                             num_key_value_heads=2)
    other_base = write_hf_folder(tmp_path / "other", other, make_random_state_dict(other, seed=1))
    folder2, _ = _adapter_from_model(tmp_path / "x", base_folder)
    with_cfg = json.loads(open(os.path.join(folder2, "adapter_config.json")).read())
    with_cfg["base_model"] = other_base
    open(os.path.join(folder2, "adapter_config.json"), "w").write(json.dumps(with_cfg))
    with pytest.raises(CheckpointError, match="do not fit the weight"):
        load_checkpoint(folder2)
    r = subprocess.run([sys.executable, "-m", "layerskip_ext.cli", "generate", "--model", folder2, "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "do not fit" in r.stderr


def test_load_adapter_state_checks_names_and_shapes():
    model = make_tiny_model()
    apply_lora(model, rank=2)
    state = adapter_state_dict(model)
    load_adapter_state_(model, state)
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter_state_(model, dict(list(state.items())[1:]))
    bad = {k: (torch.zeros(3, v.shape[1]) if k.endswith("lora_a") else v) for k, v in state.items()}
    with pytest.raises(CheckpointError, match="different rank"):
        load_adapter_state_(model, bad)


def lora_cfg(out, corpus, base, **kw):
    from layerskip_ext.training.trainer import TrainConfig
    base_kw = dict(out=str(out), data=corpus, model=base, steps=4, batch_size=2, seq_len=16, lr=5e-3,
                   weight_decay=0.0, early_exit=1.0, ee_layers=[1, 2], distill=1.0, lora_rank=2, progress=False,
                   seed=1)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(30)))
    (d / "held_out").mkdir()
    (d / "held_out" / "h.py").write_text("print('held out')\n" * 50)
    return str(d)


def test_lora_training_changes_only_adapters_and_resumes_exactly(tmp_path, corpus, base_folder):
    from layerskip_ext.model import load_model
    from layerskip_ext.training.trainer import run_training

    a = tmp_path / "a"
    s = run_training(lora_cfg(a, corpus, base_folder, exclude=["held_out"]))
    assert s["step"] == 4
    assert sorted(os.listdir(a)) == ["adapter.safetensors", "adapter_config.json", "training"]
    meta, tensors = read_adapter(str(a))
    assert meta["base_model"] == os.path.abspath(base_folder) and meta["rank"] == 2 and meta["alpha"] == 4.0
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_b"))   # B moved off zero
    # the training state holds the adapters only
    state = torch.load(a / "training" / "state.pt", weights_only=False)
    assert set(state["model"]) == set(tensors)
    b = tmp_path / "b"
    run_training(lora_cfg(b, corpus, base_folder, exclude=["held_out"], stop_at=2))
    run_training(lora_cfg(b, corpus, base_folder, exclude=["held_out"]))
    _, tb = read_adapter(str(b))
    assert all(torch.equal(tensors[k], tb[k]) for k in tensors)
    merged, _ = load_model(str(a), backend="reference")
    base, _ = load_model(base_folder, backend="reference")
    for name, p in base.named_parameters():
        q = dict(merged.named_parameters())[name]
        if any(t in name for t in ALL_LINEARS):
            continue
        assert torch.equal(p, q), name                          # norms, embeddings untouched
    # continue from the adapter in a new run; a rank mismatch is refused
    c = tmp_path / "c"
    run_training(lora_cfg(c, corpus, base_folder, init_adapter=str(a), steps=1, lr=1e-9, warmup=0))
    _, tc = read_adapter(str(c))
    assert max((tc[k] - tensors[k]).abs().max().item() for k in tc) < 1e-4
    with pytest.raises(TrainingError, match="rank 2 / alpha 4.0; this run uses --lora-rank 3"):
        run_training(lora_cfg(tmp_path / "d", corpus, base_folder, init_adapter=str(a), lora_rank=3))
    with pytest.raises(TrainingError, match="--init-adapter needs --lora-rank"):
        run_training(lora_cfg(tmp_path / "e", corpus, base_folder, init_adapter=str(a), lora_rank=0))
    with pytest.raises(TrainingError, match="--exclude needs a folder"):
        run_training(lora_cfg(tmp_path / "f", os.path.join(corpus, "m0.py"), base_folder, exclude=["x"]))


def test_exclude_leaves_out_paths(corpus):
    from layerskip_ext.corpus import read_corpus
    every = read_corpus(corpus)
    kept = read_corpus(corpus, exclude=["held_out", "m1.py"])
    assert len(every) == 4 and len(kept) == 2 and not any("held out" in d for d in kept)


def test_packaged_adapter_name_resolves_or_explains(monkeypatch, tmp_path):
    from layerskip_ext.io import packaged
    monkeypatch.setattr(packaged, "MODELS_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="adapter is missing"):
        packaged.resolve_model_path("smollm2-135m-layerskip")
    (tmp_path / "smollm2-135m-layerskip").mkdir()
    (tmp_path / "smollm2-135m-layerskip" / "adapter_config.json").write_text("{}")
    assert packaged.resolve_model_path("smollm2-135m-layerskip") == str(tmp_path / "smollm2-135m-layerskip")


def test_adapters_disabled_gives_the_base_model():
    from layerskip_ext.model.lora import adapters_disabled, has_lora
    model = make_tiny_model()
    tokens = torch.randint(0, 300, (2, 7))
    base = model.hidden_states(tokens)[-1]
    assert not has_lora(model)
    apply_lora(model, rank=2)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_b"):
                m.lora_b.normal_()
    assert has_lora(model)
    adapted = model.hidden_states(tokens)[-1]
    assert (adapted - base).abs().max() > 1e-3
    with adapters_disabled(model):
        assert torch.equal(model.hidden_states(tokens)[-1], base)
    assert torch.equal(model.hidden_states(tokens)[-1], adapted), "switched back on after the block"


def test_lora_training_with_anchor(tmp_path, corpus, base_folder):
    """--anchor: the log records KL(base || final); it starts at 0 (B = 0: the adapted model is the base) and the
    run needs LoRA."""
    from layerskip_ext.training.trainer import run_training

    out = tmp_path / "anchored"
    run_training(lora_cfg(out, corpus, base_folder, anchor=2.0, exclude=["held_out"]))
    recs = [json.loads(line) for line in open(out / "training" / "log.jsonl")]
    assert recs[0]["anchor_kl"] == pytest.approx(0.0, abs=1e-4)
    assert recs[-1]["anchor_kl"] > 0, "the adapters moved the final layer away from the base"
    with pytest.raises(TrainingError, match="needs --lora-rank"):
        run_training(lora_cfg(tmp_path / "full", corpus, base_folder, anchor=1.0, lora_rank=0))
