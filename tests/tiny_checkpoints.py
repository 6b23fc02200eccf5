"""Tiny Llama checkpoints on disk for tests (HF folders and GGUF files), built deterministically.

    config = make_tiny_config()                      # 2 layers, hidden 64, 4 heads / 2 kv heads
    sd = make_random_state_dict(config, seed=0)      # HF names, float32
    tok = make_tiny_tokenizer()                      # byte-level BPE, SmolLM2-style specials + ChatML
    write_hf_folder(tmp_path / "m", config, sd, tok)             # or shards=2
    write_gguf(tmp_path / "m.gguf", config, sd, tok, tensor_type="Q4_1")
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import numpy as np
import torch

from layerskip_ext.io import Tokenizer, save_hf_folder
from layerskip_ext.io.gguf_file import hf_to_gguf_name, permute_qk
from layerskip_ext.config import LlamaConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_VOCAB_SIZE = 320

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "LayerSkip trains early exit layers and uses self-speculative decoding.",
    "Numbers like 12345 and 3.14159 are split digit by digit.",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🙂.",
    "  leading spaces, trailing spaces  \n\n and tabs\tin text",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "import torch\nx = torch.zeros(3, 4)\nprint(x.shape)\n",
]


def make_tiny_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return LlamaConfig(**fields)


def make_random_state_dict(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights with HF Llama names (no lm_head when tied); norms around 1."""
    from layerskip_ext.io import expected_shapes
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * (1.0 / shape[1] ** 0.5)
    return out


@functools.lru_cache(maxsize=4)
def _tiny_backend_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer trained to {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok.to_str()


def make_tiny_tokenizer(add_bos: bool = False, vocab_size: int = TINY_VOCAB_SIZE,
                        chat_template: Optional[str] = CHATML_TEMPLATE) -> Tokenizer:
    """Byte-level BPE (SmolLM2-style pre-tokenizer) trained on a few sentences; ids 0-2 are
    <|endoftext|>, <|im_start|> (BOS), <|im_end|> (EOS)."""
    from tokenizers import Tokenizer as HFTokenizer
    backend = HFTokenizer.from_str(_tiny_backend_json(vocab_size))
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], eos_token_id=2, chat_template=chat_template,
                     add_bos_token=add_bos)


def write_hf_folder(out_dir, config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                    tokenizer: Optional[Tokenizer] = None, shards: int = 1, dtype: Optional[torch.dtype] = None,
                    ) -> str:
    """An HF folder; ``shards > 1`` writes model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    out_dir = os.fspath(out_dir)
    save_hf_folder(out_dir, config, state_dict, tokenizer, dtype=dtype)
    if shards > 1:
        from safetensors.torch import load_file, save_file
        single = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(single)
        os.remove(single)
        names = list(tensors)
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out_dir


def _llama3_rope_factors(config: LlamaConfig) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs tensor for a llama3 rope_scaling config."""
    rs = config.rope_scaling
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_w, high_w = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_w:
            out.append(1.0)
        elif wavelen > low_w:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_tokenizer_metadata(tokenizer: Tokenizer) -> dict:
    """tokens / token types / merges of a byte-level BPE tokenizer, as convert_hf_to_gguf writes them."""
    model = json.loads(tokenizer.backend.to_str())
    vocab = model["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["model"]["merges"]]
    n = tokenizer.vocab_size
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [1] * n
    for added in model.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(path, config: LlamaConfig, state_dict: dict[str, torch.Tensor],
               tokenizer: Optional[Tokenizer] = None, tensor_type: str = "F32", pre: str = "smollm",
               architecture: str = "llama", embed_type: Optional[str] = None,
               type_overrides: Optional[dict] = None) -> str:
    """A llama.cpp-style GGUF: q/k rows permuted like convert_hf_to_gguf.py, 2-D tensors in
    ``tensor_type`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1), norms in F32. ``embed_type`` sets the embedding's type
    and ``type_overrides`` {hf_name: type} any tensor's (e.g. an unsupported one, for error tests)."""
    import gguf
    from gguf.quants import quantize
    path = os.fspath(path)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    etype = gguf.GGMLQuantizationType[embed_type or tensor_type]
    w = gguf.GGUFWriter(path, architecture)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(int(qtype) if tensor_type != "F32" else 0)
    if tokenizer is not None:
        meta = gguf_tokenizer_metadata(tokenizer)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(meta["tokens"])
        w.add_token_types(meta["types"])
        w.add_token_merges(meta["merges"])
        if tokenizer.bos_token_id is not None:
            w.add_bos_token_id(tokenizer.bos_token_id)
        if tokenizer.eos_token_id is not None:
            w.add_eos_token_id(tokenizer.eos_token_id)
        w.add_add_bos_token(tokenizer.add_bos_token)
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
    if config.rope_scaling is not None:
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
    for name, t in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        a = t.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            a = permute_qk(a, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = permute_qk(a, config.num_key_value_heads)
        gname = hf_to_gguf_name(name)
        kind = etype if name == "model.embed_tokens.weight" else qtype
        if type_overrides and name in type_overrides:
            kind = gguf.GGMLQuantizationType[type_overrides[name]]
        if a.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            q = quantize(a.astype(np.float32), kind)
            w.add_tensor(gname, q, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_gguf_roundtrip(config: LlamaConfig, name: str, t: torch.Tensor, tensor_type: str) -> torch.Tensor:
    """What the GGUF loader should return for HF tensor ``name`` written with ``tensor_type``:
    dequantize(quantize(permute(w))), un-permuted."""
    import gguf
    from gguf.quants import dequantize, quantize
    from layerskip_ext.io.gguf_file import unpermute_qk
    a = t.detach().float().numpy()
    n = None
    if name.endswith("q_proj.weight"):
        n = config.num_attention_heads
    elif name.endswith("k_proj.weight"):
        n = config.num_key_value_heads
    if n:
        a = permute_qk(a, n)
    if a.ndim == 2 and tensor_type != "F32":
        kind = gguf.GGMLQuantizationType[tensor_type]
        if tensor_type == "F16":
            a = a.astype(np.float16).astype(np.float32)
        else:
            a = dequantize(quantize(a.astype(np.float32), kind), kind).reshape(a.shape)
    if n:
        a = unpermute_qk(a, n)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


__all__ = ["make_tiny_config", "make_random_state_dict", "make_tiny_tokenizer", "write_hf_folder", "write_gguf",
           "expected_gguf_roundtrip", "gguf_tokenizer_metadata", "SPECIAL_TOKENS", "CHATML_TEMPLATE",
           "TINY_VOCAB_SIZE", "CORPUS"]


def make_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """An in-memory LlamaForCausalLM with random weights (3 layers, vocab 300 unless overridden)."""
    from layerskip_ext.model.llama import LlamaForCausalLM

    fields = dict(vocab_size=300, num_hidden_layers=3, rope_theta=500.0)
    fields.update(overrides)
    config = make_tiny_config(**fields)
    return LlamaForCausalLM.from_state_dict(config, make_random_state_dict(config, seed), dtype=dtype)
