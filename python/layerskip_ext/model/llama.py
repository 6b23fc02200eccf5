"""Llama-family decoder in plain PyTorch, with an optional native-op path.

Two op sets compute the same function:
  * ``reference``: plain PyTorch (``ops.*_reference``), differentiable, the definition kernels are tested against;
  * ``native``: the ``torch.ops.layerskip`` kernels (RMSNorm, RoPE, cache write, attention over the cache).
Parameter names match Hugging Face ``LlamaForCausalLM`` so state dicts load unchanged.

The forward pass is exposed by layer range (``forward_layers(h, start_layer, end_layer, ...)``) because early
exit and self-speculative decoding run the first E layers and the remaining ones as separate stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import CheckpointError, GenerationError
from .config import LlamaConfig
from .kv_cache import StaticKVCache
from .rope import rope_tables


@dataclass(frozen=True)
class OpSet:
    name: str
    rms_norm: Callable
    rope: Callable
    kv_cache_write: Callable
    cache_attention: Callable
    linear: Callable  # y[..., N] = x[..., K] @ w[N, K]^T
    # (h[M, H], norm_weight, eps, lm_head[V, H], vocab_subset) -> argmax ids [M]; None: argmax of head()
    exit_head_argmax: Optional[Callable] = None
    # speculative acceptance: (drafts[B, d], target[B, d+1], positions[B]!) / (drafts, q, p, uniforms, positions!)
    # -> (accepted[B], next_token[B])
    verify_greedy: Callable = ops.verify_greedy_reference
    verify_sampling: Callable = ops.verify_sampling_reference
    # fused sampling head (h[M, H], norm_weight, eps, lm_head, uniforms[M], temperature, top_k, top_p, vocab_subset)
    # -> (tokens[M], probs[M, V]) and log-probs head (h, norm_weight, eps, lm_head, vocab_subset) -> [M, V];
    # None: generation/sampling.py composes head() with filtered_probs / log_softmax
    exit_head_sample: Optional[Callable] = None
    exit_head_log_softmax: Optional[Callable] = None


REFERENCE_OPS = OpSet("reference", ops.rms_norm_reference, ops.rope_reference, ops.kv_cache_write_reference,
                      ops.cache_attention_reference, F.linear)


def native_ops() -> OpSet:
    if not ops.native_available():
        raise RuntimeError("layerskip_ext native extension is not built: reinstall with "
                           "`pip install --no-build-isolation .` (see README)")
    return OpSet("native", ops.rms_norm, ops.rope, ops.kv_cache_write, ops.cache_attention, ops.linear,
                 ops.exit_head_argmax, ops.verify_greedy, ops.verify_sampling, ops.exit_head_sample,
                 ops.exit_head_log_softmax)


def linear(module: nn.Module, x: torch.Tensor, ops: OpSet) -> torch.Tensor:
    """A plain nn.Linear goes through the op set's kernel; a wrapped one (e.g. a LoRA adapter) runs itself."""
    if type(module) is nn.Linear:
        return ops.linear(x, module.weight)
    return module(x)


@dataclass
class ForwardState:
    """Where the new tokens of one forward call sit, and what computes them.

    positions [B, T] int64 (or [1, T] when every sequence starts at 0, as in training), start [B] int64.
    """
    positions: torch.Tensor
    start: torch.Tensor
    cos: torch.Tensor  # [P, D/2] float32
    sin: torch.Tensor
    cache: Optional[StaticKVCache]
    ops: OpSet
    rows: Optional[slice] = None  # which cache rows (sequences) this call covers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: OpSet = REFERENCE_OPS) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)
        self.scale = D ** -0.5
        self.layer_index = layer_index

    def forward(self, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        B, T, _ = x.shape
        ops = st.ops
        q = linear(self.q_proj, x, ops).view(B, T, self.num_heads, self.head_dim)
        k = linear(self.k_proj, x, ops).view(B, T, self.num_kv_heads, self.head_dim)
        v = linear(self.v_proj, x, ops).view(B, T, self.num_kv_heads, self.head_dim)
        q = ops.rope(q, st.positions, st.cos, st.sin)
        k = ops.rope(k, st.positions, st.cos, st.sin)
        if st.cache is None:
            # Training / scoring path: causal attention over this call's own tokens only.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=self.scale, enable_gqa=True)
            out = out.transpose(1, 2)
        else:
            k_cache, v_cache = st.cache.layer(self.layer_index, st.rows)
            ops.kv_cache_write(k_cache, v_cache, k, v, st.start)
            out = ops.cache_attention(q, k_cache, v_cache, st.start, self.scale)
        return linear(self.o_proj, out.reshape(B, T, self.num_heads * self.head_dim), ops)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor, ops: OpSet = REFERENCE_OPS) -> torch.Tensor:
        gate = F.silu(linear(self.gate_proj, x, ops))
        return linear(self.down_proj, gate * linear(self.up_proj, x, ops), ops)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, st: ForwardState) -> torch.Tensor:
        """h [B, T, H] -> [B, T, H]. Only h carries a batch dimension that wrappers may subset (positions are
        [1, T] in training), so layer dropout can run a layer on some samples of the batch only."""
        h = h + self.self_attn(self.input_layernorm(h, st.ops), st)
        return h + self.mlp(self.post_attention_layernorm(h, st.ops), st.ops)


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
        self.ops: OpSet = REFERENCE_OPS
        self._fused = None  # FusedLayers when the native op set is on: layers [a, b) in one native call
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # Ascending token ids a self-speculative greedy draft scores instead of the whole vocabulary (set by
        # load_model from the model's stored draft vocabulary; see model/draft_vocab.py). None: all of them.
        self.draft_vocab: Optional[torch.Tensor] = None
        self._arange: dict[tuple, torch.Tensor] = {}

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
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def use_native_ops(self, enabled: bool = True) -> "LlamaForCausalLM":
        """Switch to the native kernels (and the fused layer-range forward) or back to the reference path.
        Call again after replacing modules or parameters: the fused path holds references to the weights."""
        from .fused import FusedLayers

        self.ops = native_ops() if enabled else REFERENCE_OPS
        self._fused = FusedLayers(self) if enabled else None
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
        if capacity > self.config.max_position_embeddings:
            raise GenerationError(f"cache capacity {capacity} exceeds the model's context length "
                                  f"{self.config.max_position_embeddings}")
        return StaticKVCache.for_model(self.config, batch_size, capacity, self.dtype, self.device)

    def rope_tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [P, D/2], grown on demand (a 128k-context table would be large, so size it to the need)."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < num_positions:
            c = self.config
            self._rope_cache = rope_tables(num_positions, c.head_dim, c.rope_theta, c.rope_scaling, self.device)
        return self._rope_cache

    # ----------------------------------------------------------------------------------------------------------
    # forward pieces
    # ----------------------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def forward_state(self, start: torch.Tensor, num_tokens: int, cache: Optional[StaticKVCache],
                      rows: Optional[slice] = None, max_start: Optional[int] = None) -> ForwardState:
        """Validate positions and build the per-call state. start: [B] int64, first new token's position.

        max_start: max(start), when the caller already knows it (and that start >= 0), e.g. the decode loop from
        its emitted tokens: then no value is read back from ``start`` (a host read per call on the hot path, and
        a device synchronisation on a GPU)."""
        start = start.to(torch.int64)
        positions = start.view(-1, 1) + self._positions_offsets(num_tokens, start.device)
        if max_start is None:
            if int(start.min()) < 0:
                raise GenerationError(f"negative start position {int(start.min())}")
            max_start = int(start.max())
        end = max_start + num_tokens if num_tokens > 0 else 0
        if cache is not None and end > cache.capacity:
            raise GenerationError(f"tokens up to position {end} do not fit the KV cache (capacity {cache.capacity})")
        if end > self.config.max_position_embeddings:
            raise GenerationError(f"position {end} exceeds the model's context length "
                                  f"{self.config.max_position_embeddings}")
        cos, sin = self.rope_tables(end if cache is None else cache.capacity)
        dev = self.device
        if cache is None and bool((start == start[0]).all()):
            positions = positions[:1]  # broadcast over the batch (see DecoderLayer.forward)
        return ForwardState(positions.to(dev), start.to(dev), cos, sin, cache, self.ops, rows)

    def _positions_offsets(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """[1, T] = 0 .. T-1, kept per (T, device): a decode step asks for the same few every time."""
        key = (num_tokens, device)
        t = self._arange.get(key)
        if t is None:
            t = self._arange[key] = torch.arange(num_tokens, dtype=torch.int64, device=device).view(1, -1)
        return t

    def forward_layers(self, h: torch.Tensor, start_layer: int, end_layer: int, st: ForwardState) -> torch.Tensor:
        """Run decoder layers [start_layer, end_layer) on hidden states h [B, T, H]."""
        if not 0 <= start_layer <= end_layer <= self.num_layers:
            raise GenerationError(f"layer range [{start_layer}, {end_layer}) is outside [0, {self.num_layers}]")
        if self._fused is not None and self._fused.applies(h, start_layer, end_layer, st):
            return self._fused.forward(h, start_layer, end_layer, st)  # bitwise forward_layers_per_op, one call
        return self.forward_layers_per_op(h, start_layer, end_layer, st)

    def forward_layers_per_op(self, h: torch.Tensor, start_layer: int, end_layer: int,
                              st: ForwardState) -> torch.Tensor:
        """forward_layers as a Python loop over the layers, one op-set call per piece (never fused)."""
        for layer in self.model.layers[start_layer:end_layer]:
            h = layer(h, st)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Shared exit head: final RMSNorm + LM head, applicable to the output of any layer. -> logits [..., V]"""
        return linear(self.lm_head, self.model.norm(h, self.ops), self.ops)

    def fused_head(self, name: str) -> Optional[Callable]:
        """The op set's fused exit head ``name`` (exit_head_argmax / _sample / _log_softmax) when it applies (a
        plain nn.Linear LM head), else None: the caller composes head() with the rest."""
        op = getattr(self.ops, name, None)
        return op if op is not None and type(self.lm_head) is nn.Linear else None

    def run_fused_head(self, op: Callable, h: torch.Tensor, *args):
        """op(rows of h [..., H] flattened, final norm weight, eps, LM head weight, *args), its outputs reshaped
        back to h's leading dimensions (a tuple stays a tuple)."""
        flat = h.reshape(-1, h.shape[-1]).contiguous()
        n = self.model.norm
        out = op(flat, n.weight, n.eps, self.lm_head.weight, *args)
        lead = h.shape[:-1]
        if isinstance(out, tuple):
            return tuple(t.view(*lead, *t.shape[1:]) for t in out)
        return out.view(*lead, *out.shape[1:])

    def head_argmax(self, h: torch.Tensor, vocab_subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """argmax of head(h) over the vocabulary, [...] int64, without materialising logits where the op set
        has a fused exit head. Bitwise the same choice as head(h).argmax(-1) (ties: lowest id).
        vocab_subset (int64 ids on the model's device): score only those tokens; returns the chosen token id."""
        fused = self.fused_head("exit_head_argmax")
        if fused is not None:
            return self.run_fused_head(fused, h, vocab_subset)
        logits = self.head(h)
        if vocab_subset is None:
            return logits.argmax(-1)
        return vocab_subset[logits[..., vocab_subset].argmax(-1)]

    def draft_greedy(self, tokens: torch.Tensor, st: ForwardState, exit_layer: int, num_drafts: int,
                     vocab_subset: Optional[torch.Tensor] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The greedy draft stage of a self-speculative round in one native call (ops.draft_greedy): tokens [n]
        (the newest, not yet cached) at positions st.start [n] go through layers < exit_layer, the exit head's
        argmax proposes the next, num_drafts times, and the last proposal goes through layers < exit_layer too.
        st: forward_state(start, num_drafts + 1, cache, rows), which has checked the whole round's positions (the
        round's verification pass reuses it).
        -> (drafts [n, d] int64, layer exit_layer's outputs [n, d + 1, H]), or None where the native path does not
        apply (reference op set, wrapped layers or head): the caller then runs the same steps op by op."""
        if st.positions.shape[-1] != num_drafts + 1:
            raise GenerationError(f"the forward state covers {st.positions.shape[-1]} positions; a draft of "
                                  f"{num_drafts} tokens needs {num_drafts + 1}")
        emb = self.model.embed_tokens
        if self._fused is None or self.fused_head("exit_head_argmax") is None or not 1 <= exit_layer <= self.num_layers:
            return None
        if type(emb) is not nn.Embedding or emb.max_norm is not None:
            return None
        if not self._fused.applies_range(emb.weight.dtype, emb.weight.device, 0, exit_layer, st):
            return None
        return self._fused.draft_greedy(tokens.to(self.device), emb.weight, exit_layer, st, self.model.norm,
                                        self.lm_head.weight, vocab_subset, num_drafts)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start: Optional[torch.Tensor] = None,
                cache: Optional[StaticKVCache] = None, exit_layer: Optional[int] = None,
                rows: Optional[slice] = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T] at positions start[b] + t, through layers < exit_layer (all by default)."""
        return self.head(self.forward_hidden(tokens, start, cache, exit_layer, rows))

    @torch.no_grad()
    def forward_hidden(self, tokens: torch.Tensor, start: Optional[torch.Tensor] = None,
                       cache: Optional[StaticKVCache] = None, exit_layer: Optional[int] = None,
                       rows: Optional[slice] = None) -> torch.Tensor:
        """Like forward, but returns the hidden state [B, T, H] after layer exit_layer - 1 (before the head)."""
        if tokens.dim() != 2:
            raise GenerationError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise GenerationError(f"token ids must be in [0, {self.config.vocab_size}), got "
                                  f"[{int(tokens.min())}, {int(tokens.max())}]")
        B, T = tokens.shape
        if start is None:
            start = torch.zeros(B, dtype=torch.int64)
        st = self.forward_state(start, T, cache, rows)
        E = self.num_layers if exit_layer is None else exit_layer
        if not 1 <= E <= self.num_layers:
            raise GenerationError(f"exit layer must be in [1, {self.num_layers}], got {E}")
        return self.forward_layers(self.embed(tokens.to(self.device)), 0, E, st)

    def hidden_states(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Cache-free, differentiable: the output of every layer [L] x [B, T, H] (for training and analysis)."""
        B, T = tokens.shape
        st = self.forward_state(torch.zeros(B, dtype=torch.int64), T, None)
        h = self.embed(tokens.to(self.device))
        outs = []
        for layer in self.model.layers:
            h = layer(h, st)
            outs.append(h)
        return outs
