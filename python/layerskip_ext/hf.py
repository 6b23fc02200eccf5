"""Drop-in for Hugging Face code: self-speculative decoding on an in-memory ``transformers.LlamaForCausalLM``.

    out = hf_model.generate(input_ids, max_new_tokens=64)                       # before
    out = layerskip_ext.hf.generate(hf_model, input_ids, max_new_tokens=64,      # after
                                    strategy="self_speculative", exit_layer=8, num_speculations=6)

Our engine shares the HF model's weight tensors (no copy); it is built once per HF model and kept on it.
transformers is an optional extra: nothing here imports it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import LlamaConfig
from .errors import LayerSkipError
from .generation import generate as _generate
from .model.llama import LlamaForCausalLM

_ENGINE_ATTR = "_layerskip_engine"


def from_hf(hf_model, backend: str = "auto") -> LlamaForCausalLM:
    """Our model over the very parameters of a transformers Llama model (changes to either are seen by both)."""
    cached = getattr(hf_model, _ENGINE_ATTR, None)
    if cached is not None:
        return cached
    config = LlamaConfig.from_hf_dict(hf_model.config.to_dict())
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = {name: t for name, t in hf_model.state_dict(keep_vars=True).items() if "rotary_emb" not in name}
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    missing = set(model.state_dict()) - set(params) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise LayerSkipError(f"the Hugging Face model lacks {sorted(missing)[0]!r}; is it a Llama model?")
    model.load_state_dict(params, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    model.build_decoder(backend)
    object.__setattr__(hf_model, _ENGINE_ATTR, model)  # not a submodule: keeps hf_model's state_dict unchanged
    return model


def generate(hf_model, input_ids: torch.Tensor, max_new_tokens: int = 128, *, strategy: str = "self_speculative",
             exit_layer: Optional[int] = None, num_speculations: Optional[int] = 4,
             attention_mask: Optional[torch.Tensor] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None) -> torch.Tensor:
    """Like ``hf_model.generate``: returns [B, prompt + new] token ids; rows that stop early are padded.

    Left padding in ``input_ids`` is removed using ``attention_mask`` (each row keeps its own length here).
    """
    model = from_hf(hf_model)
    if input_ids.dim() != 2:
        raise LayerSkipError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    prompts = []
    for b in range(input_ids.shape[0]):
        row = input_ids[b]
        if attention_mask is not None:
            row = row[attention_mask[b].bool()]
        prompts.append(row.tolist())
    if eos_token_id is None:
        eos_token_id = hf_model.config.eos_token_id
    stops = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if strategy == "self_speculative" and exit_layer is None:
        raise LayerSkipError("self-speculative decoding needs exit_layer (the draft uses layers < exit_layer)")
    result = _generate(model, prompts, strategy=strategy, max_new_tokens=max_new_tokens,
                       temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p, seed=seed,
                       stop_token_ids=stops, exit_layer=exit_layer, num_speculations=num_speculations)
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    rows = [s.prompt_tokens + s.tokens for s in result.sequences]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64)
