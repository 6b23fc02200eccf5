"""Llama-family causal LM: the plain-PyTorch modules (model/layers.py) and the decoder that runs them
(model/decoder.py).

Two ways through the same function:
  * the modules, cache-free and differentiable: ``hidden_states(tokens)``, ``head(h)``, ``model(tokens)`` (training,
    scoring, analysis; layers may be wrapped, e.g. by layer dropout or LoRA adapters);
  * the decoder, over the static KV cache (``model.decoder``, built once: generation, and ``model(tokens,
    cache=...)``): native kernels or their plain-PyTorch references.
Parameter names match Hugging Face ``LlamaForCausalLM`` so state dicts load unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import LlamaConfig
from ..errors import CheckpointError, GenerationError
from .decoder import Decoder, check_exit, check_tokens, kernels_for
from .kv_cache import StaticKVCache
from .layers import DecoderLayer, ForwardState, RMSNorm
from .rope import rope_tables


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._decoder: Optional[Decoder] = None
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # Ascending token ids a self-speculative greedy draft scores instead of the whole vocabulary (set by
        # load_model from the model's stored draft vocabulary; see model/draft_vocab.py). None: all of them.
        self.draft_vocab: Optional[torch.Tensor] = None
        self.source = ""  # where the weights came from (load_model), for known-checkpoint defaults

    # ----------------------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> "LlamaForCausalLM":
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        state_dict = {k: v for k, v in state_dict.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        unexpected = sorted(set(state_dict) - set(expected))
        if unexpected:
            raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(state_dict[name].shape)}, "
                                      f"config expects {tuple(shape)}")
        model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
        model.tie_weights()
        return model.eval()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_decoder(self, backend="auto") -> Decoder:
        """(Re)build the decoder generation runs: "native" (the layerskip kernels), "reference" (plain PyTorch),
        "auto" (native when the extension is built), or a decoder.Kernels table. Call it after replacing modules or
        parameters; model.to() rebuilds it with the same kernels."""
        self._decoder = Decoder(self, kernels_for(backend))
        return self._decoder

    @property
    def decoder(self) -> Decoder:
        """The decoder built by build_decoder (load_model builds one); built with backend "auto" on first use."""
        if self._decoder is None:
            self.build_decoder()
        return self._decoder

    def _apply(self, fn, recurse=True):
        # model.to(device / dtype), .cuda(), .half(), ...: the tied head, the RoPE tables, the draft vocabulary and
        # the decoder follow the weights.
        super()._apply(fn, recurse)
        self.tie_weights()
        self._rope_cache = None
        if self.draft_vocab is not None:
            self.draft_vocab = self.draft_vocab.to(self.device)
        if self._decoder is not None:
            self._decoder = Decoder(self, self._decoder.kernels)
        return self

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int, capacity: int) -> StaticKVCache:
        return self.decoder.new_cache(batch_size, capacity)

    def rope_tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [P, D/2] on the model's device, grown on demand (a 128k-context table would be large)."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < num_positions:
            c = self.config
            self._rope_cache = rope_tables(num_positions, c.head_dim, c.rope_theta, c.rope_scaling, self.device)
        return self._rope_cache

    # ----------------------------------------------------------------------------------------------------------
    # the modules: cache-free, differentiable
    # ----------------------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Shared exit head: final RMSNorm + LM head, applicable to the output of any layer. -> logits [..., V]"""
        return self.lm_head(self.model.norm(h))

    def hidden_states(self, tokens: torch.Tensor, num_layers: Optional[int] = None) -> list[torch.Tensor]:
        """The output of each of the first num_layers layers (all by default) [L] x [B, T, H] for tokens [B, T] at
        positions 0 .. T-1 (training, analysis)."""
        T = tokens.shape[1]
        cos, sin = self.rope_tables(T)
        positions = torch.arange(T, device=self.device).view(1, T)
        st = ForwardState(positions, positions[0, :1], cos, sin)
        h = self.embed(tokens.to(self.device))
        outs = []
        for layer in self.model.layers[:num_layers]:
            h = layer(h, st)
            outs.append(h)
        return outs

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start: Optional[torch.Tensor] = None,
                cache: Optional[StaticKVCache] = None, exit_layer: Optional[int] = None,
                rows: Optional[slice] = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T] through layers < exit_layer (all by default): with a cache, through
        the decoder at positions start[b] + t (writing the cache); without one, through the modules from 0."""
        return self.head(self.forward_hidden(tokens, start, cache, exit_layer, rows))

    @torch.no_grad()
    def forward_hidden(self, tokens: torch.Tensor, start: Optional[torch.Tensor] = None,
                       cache: Optional[StaticKVCache] = None, exit_layer: Optional[int] = None,
                       rows: Optional[slice] = None) -> torch.Tensor:
        """Like forward, but the hidden state [B, T, H] after layer exit_layer - 1 (before the head)."""
        if cache is not None:
            return self.decoder.forward_hidden(tokens, start, cache, exit_layer, rows)
        check_tokens(tokens, self.config.vocab_size)
        E = check_exit(exit_layer, self.num_layers)
        if start is not None and bool((start != 0).any()):
            raise GenerationError("without a KV cache, tokens start at position 0")
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise GenerationError(f"position {tokens.shape[1]} exceeds the model's context length "
                                  f"{self.config.max_position_embeddings}")
        return self.hidden_states(tokens, E)[-1]
