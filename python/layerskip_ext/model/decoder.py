"""The decoder: what generation runs, built once per loaded model.

    decoder = model.build_decoder("native")          # or "reference" / "auto"; load_model does it
    st = decoder.state(start, T, cache, rows)         # where a call's tokens sit (validated)
    h = decoder.layers(decoder.embed(tokens), 0, E, st)
    ids = decoder.head_argmax(h[:, -1])

A Decoder holds the model's weights packed for its kernels (a LayerWeights per layer: the nine tensors of a decoder
layer, named) and one kernel table: NATIVE calls ``torch.ops.layerskip.*`` directly, REFERENCE the plain-PyTorch
definitions in ops.py (the same functions the native ops are tested against, the greedy draft loop included). Which
one runs was decided when the decoder was built, never per call. Building checks that every layer is the plain
module (a wrapped or replaced layer, e.g. a LoRA adapter in training, is an error naming it); the weights are
referenced, not copied, so in-place updates are seen, while replacing modules or moving the model needs a new
decoder (``model.build_decoder()``; ``model.to()`` rebuilds it itself).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import GenerationError, LayerSkipError
from .kv_cache import StaticKVCache
from .layers import MLP, Attention, DecoderLayer, ForwardState, RMSNorm


class DecoderError(LayerSkipError):
    """The model cannot be run by a decoder (a wrapped or unsupported module), or its decoder is out of date."""


class LayerWeights(NamedTuple):
    """One decoder layer's weights in the order ops.layer_range_forward takes them (Hugging Face names)."""
    input_layernorm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor


@dataclass(frozen=True)
class Kernels:
    """The functions a decoder runs (all with the native ops' signatures; csrc/ops.cpp documents them)."""
    name: str
    layer_range_forward: Callable
    draft_greedy: Callable
    exit_head_argmax: Callable
    exit_head_sample: Callable
    exit_head_log_softmax: Callable
    verify_greedy: Callable
    verify_sampling: Callable

    def timed(self, clock: list) -> "Kernels":
        """The same kernels, each adding its wall time to clock[0] (benchmarks/e2e.py's profile)."""
        def wrap(f):
            def timed_call(*args):
                t = time.perf_counter()
                out = f(*args)
                clock[0] += time.perf_counter() - t
                return out
            return timed_call
        fields = {k: wrap(v) for k, v in vars(self).items() if k != "name"}
        return Kernels(self.name, **fields)


REFERENCE = Kernels("reference", ops.layer_range_forward_reference, ops.draft_greedy_reference,
                    ops.exit_head_argmax_reference, ops.exit_head_sample_reference,
                    ops.exit_head_log_softmax_reference, ops.verify_greedy_reference, ops.verify_sampling_reference)


def native_kernels() -> Kernels:
    if not ops.native_available():
        raise DecoderError("the layerskip_ext native extension is not built: reinstall with "
                           "`pip install --no-build-isolation .` (see README), or use backend='reference'")
    lib = torch.ops.layerskip
    return Kernels("native", lib.layer_range_forward.default, lib.draft_greedy.default, lib.exit_head_argmax.default,
                   lib.exit_head_sample.default, lib.exit_head_log_softmax.default, lib.verify_greedy.default,
                   lib.verify_sampling.default)


def kernels_for(backend: "str | Kernels") -> Kernels:
    """"native", "reference", "auto" (native when the extension is built) or a Kernels table of one's own."""
    if isinstance(backend, Kernels):
        return backend
    if backend == "auto":
        backend = "native" if ops.native_available() else "reference"
    if backend == "native":
        return native_kernels()
    if backend == "reference":
        return REFERENCE
    raise DecoderError(f"unknown backend {backend!r}; choose auto, native or reference")


def _plain(module: nn.Module, cls: type, where: str) -> nn.Module:
    if type(module) is not cls:
        raise DecoderError(f"{where} is a {type(module).__name__}, not a plain {cls.__name__}: decoding runs "
                           f"plain layers only (merge adapters with model.lora.merge_lora_, remove training "
                           f"wrappers), then call model.build_decoder()")
    return module


def _linear(module: nn.Module, where: str) -> torch.Tensor:
    lin = _plain(module, nn.Linear, where)
    if lin.bias is not None:
        raise DecoderError(f"{where} has a bias, which Llama layers do not")
    return lin.weight


def pack_layer(layer: nn.Module, index: int, eps: float) -> LayerWeights:
    """A plain DecoderLayer's weights, or a DecoderError naming what is not plain."""
    where = f"model.layers.{index}"
    _plain(layer, DecoderLayer, where)
    attn = _plain(layer.self_attn, Attention, f"{where}.self_attn")
    mlp = _plain(layer.mlp, MLP, f"{where}.mlp")
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = _plain(getattr(layer, name), RMSNorm, f"{where}.{name}")
        if float(norm.eps) != eps:
            raise DecoderError(f"{where}.{name} has eps {norm.eps}, the model's layers {eps}: one eps per "
                               f"model")
    a, m = f"{where}.self_attn", f"{where}.mlp"
    w = LayerWeights(layer.input_layernorm.weight, _linear(attn.q_proj, f"{a}.q_proj"),
                     _linear(attn.k_proj, f"{a}.k_proj"), _linear(attn.v_proj, f"{a}.v_proj"),
                     _linear(attn.o_proj, f"{a}.o_proj"), layer.post_attention_layernorm.weight,
                     _linear(mlp.gate_proj, f"{m}.gate_proj"), _linear(mlp.up_proj, f"{m}.up_proj"),
                     _linear(mlp.down_proj, f"{m}.down_proj"))
    for name, t in zip(LayerWeights._fields, w):
        if not t.is_contiguous():
            raise DecoderError(f"{where} {name} weight is not contiguous")
    return LayerWeights(*(t.detach() for t in w))


def check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.dim() != 2:
        raise GenerationError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise GenerationError(f"token ids must be in [0, {vocab_size}), got [{int(tokens.min())}, "
                              f"{int(tokens.max())}]")


def check_exit(exit_layer: Optional[int], num_layers: int) -> int:
    """exit_layer (None: all layers) checked to be in [1, num_layers]."""
    E = num_layers if exit_layer is None else exit_layer
    if not isinstance(E, int) or not 1 <= E <= num_layers:
        raise GenerationError(f"exit layer must be in [1, {num_layers}], got {exit_layer!r}")
    return E


class Decoder:
    def __init__(self, model, kernels: Kernels):
        cfg = model.config
        self.model, self.config, self.kernels = model, cfg, kernels
        self.eps = float(cfg.rms_norm_eps)
        self.layer_weights = [pack_layer(layer, i, self.eps) for i, layer in enumerate(model.model.layers)]
        emb = _plain(model.model.embed_tokens, nn.Embedding, "model.embed_tokens")
        if emb.max_norm is not None:
            raise DecoderError("model.embed_tokens has max_norm set, which Llama embeddings do not")
        norm = _plain(model.model.norm, RMSNorm, "model.norm")
        self.embed_weight = emb.weight.detach()
        self.norm_weight, self.norm_eps = norm.weight.detach(), float(norm.eps)
        self.lm_head = _linear(model.lm_head, "lm_head").detach()
        self.num_layers = len(self.layer_weights)
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = cfg.head_dim ** -0.5
        self.device, self.dtype = self.embed_weight.device, self.embed_weight.dtype
        self._ranges: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._offsets: dict[int, torch.Tensor] = {}
        self._packed_from = list(map(id, self._sources(model)))
        # Acceptance: the kernels themselves (no Python in between).
        self.verify_greedy = kernels.verify_greedy
        self.verify_sampling = kernels.verify_sampling

    @property
    def name(self) -> str:
        return self.kernels.name

    @staticmethod
    def _sources(model) -> list:
        """The modules and parameters the weights were packed from (compared by identity, not value)."""
        return list(model.modules()) + list(model.parameters())

    def check_current(self, model) -> None:
        """Raise if model's modules or parameters were replaced since this decoder was built (O(modules): once per
        generate() call, not per step)."""
        # (the objects are alive: the decoder holds the model, so their ids cannot have been reused)
        if model is not self.model or list(map(id, self._sources(model))) != self._packed_from:
            raise DecoderError("the model's modules or parameters changed after its decoder was built: call "
                               "model.build_decoder() again")

    # ----------------------------------------------------------------------------------------------------------
    # where tokens sit
    # ----------------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int) -> StaticKVCache:
        if capacity > self.config.max_position_embeddings:
            raise GenerationError(f"cache capacity {capacity} exceeds the model's context length "
                                  f"{self.config.max_position_embeddings}")
        return StaticKVCache.for_model(self.config, batch_size, capacity, self.dtype, self.device)

    def state(self, start: torch.Tensor, num_tokens: int, cache: StaticKVCache, rows: Optional[slice] = None,
              max_start: Optional[int] = None) -> ForwardState:
        """The state of a call of num_tokens new tokens per sequence at start [B] (int64, on the decoder's device).

        max_start: max(start), when the caller knows it (and that start >= 0), e.g. the decode loop from its
        emitted tokens: then nothing is read back from ``start`` (a host read, and on a GPU a synchronisation)."""
        if max_start is None:
            if int(start.min()) < 0:
                raise GenerationError(f"negative start position {int(start.min())}")
            max_start = int(start.max())
        end = max_start + num_tokens
        if end > cache.capacity:
            raise GenerationError(f"tokens up to position {end} do not fit the KV cache (capacity {cache.capacity})")
        offsets = self._offsets.get(num_tokens)
        if offsets is None:
            offsets = self._offsets[num_tokens] = torch.arange(num_tokens, device=self.device).view(1, -1)
        cos, sin = self.model.rope_tables(cache.capacity)
        return ForwardState(start.view(-1, 1) + offsets, start, cos, sin, cache, rows)

    # ----------------------------------------------------------------------------------------------------------
    # the stages of a step or round
    # ----------------------------------------------------------------------------------------------------------
    def weights(self, start_layer: int, end_layer: int) -> list[torch.Tensor]:
        """The flat weight list of layers [start_layer, end_layer), made once per range."""
        key = (start_layer, end_layer)
        w = self._ranges.get(key)
        if w is None:
            if not 0 <= start_layer <= end_layer <= self.num_layers:
                raise GenerationError(f"layer range [{start_layer}, {end_layer}) is outside [0, {self.num_layers}]")
            w = self._ranges[key] = [t for lw in self.layer_weights[start_layer:end_layer] for t in lw]
        return w

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_weight)

    def layers(self, h: torch.Tensor, start_layer: int, end_layer: int, st: ForwardState) -> torch.Tensor:
        """Decoder layers [start_layer, end_layer) on h [B, T, H] at st's positions, writing their KV in place."""
        w = self._ranges.get((start_layer, end_layer)) or self.weights(start_layer, end_layer)
        ks, vs = st.cache.layer_views(start_layer, end_layer, st.rows)
        return self.kernels.layer_range_forward(h, w, ks, vs, st.start, st.positions, st.cos, st.sin, self.num_heads,
                                                self.num_kv_heads, self.eps, self.scale)

    def draft_greedy(self, tokens: torch.Tensor, st: ForwardState, exit_layer: int, num_drafts: int,
                     vocab_subset: Optional[torch.Tensor] = None,
                     stop_below: float = 0.0, stop_model: Optional[torch.Tensor] = None,
                     context: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy draft stage of a self-speculative round: tokens [n] (the newest, not yet cached) at st.start
        through layers < exit_layer, the exit head's argmax proposing the next, num_drafts times, the last proposal
        through layers < exit_layer too. st covers the round's num_drafts + 1 positions (the verification pass
        reuses it). -> (drafts [n, d] int64, layer exit_layer's outputs [n, d + 1, H]).
        stop_below > 0: dynamic drafting (csrc/draft.cpp): the stage stops (d' <= d columns) where the rows' mean
        chance falls below it: a row's chance is the least top probability of its drafts, or, with stop_model ([6]
        float64) and context ((tokens [n, C], lengths [n]) int64 on the CPU: each row's prompt and output so far),
        the fitted chance that its whole run is accepted (generation/draft_stop.py)."""
        if st.positions.shape[1] != num_drafts + 1:
            raise GenerationError(f"the state covers {st.positions.shape[1]} positions; a draft of {num_drafts} "
                                  f"tokens needs {num_drafts + 1}")
        w = self._ranges.get((0, exit_layer)) or self.weights(0, exit_layer)
        ks, vs = st.cache.layer_views(0, exit_layer, st.rows)
        return self.kernels.draft_greedy(tokens, self.embed_weight, w, ks, vs, st.start,
                                         st.cos, st.sin, self.num_heads, self.num_kv_heads, self.eps, self.scale,
                                         self.norm_weight, self.norm_eps, self.lm_head, vocab_subset, num_drafts,
                                         stop_below, stop_model, *(context or (None, None)))

    def head_argmax(self, h: torch.Tensor, vocab_subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """argmax of the shared exit head's logits at h [..., H] -> [...] int64 (over vocab_subset's ids when
        given), without materialising the logits (ties: the lowest id)."""
        flat = h.reshape(-1, h.shape[-1]).contiguous()
        out = self.kernels.exit_head_argmax(flat, self.norm_weight, self.norm_eps, self.lm_head, vocab_subset)
        return out.view(h.shape[:-1])

    def head_sample(self, h: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    vocab_subset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample from the exit head at h [..., H] with one uniform per row -> (tokens [...], the filtered
        distribution they were drawn from [..., V] float32)."""
        flat = h.reshape(-1, h.shape[-1]).contiguous()
        tokens, probs = self.kernels.exit_head_sample(flat, self.norm_weight, self.norm_eps, self.lm_head,
                                                      uniforms.reshape(-1), temperature, top_k, top_p, vocab_subset)
        return tokens.view(h.shape[:-1]), probs.view(*h.shape[:-1], probs.shape[-1])

    def head_log_softmax(self, h: torch.Tensor, vocab_subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log_softmax of the exit head's logits at h [..., H] -> [..., V] float32."""
        flat = h.reshape(-1, h.shape[-1]).contiguous()
        out = self.kernels.exit_head_log_softmax(flat, self.norm_weight, self.norm_eps, self.lm_head, vocab_subset)
        return out.view(*h.shape[:-1], out.shape[-1])

    # ----------------------------------------------------------------------------------------------------------
    # a validated pass (prompts, tests)
    # ----------------------------------------------------------------------------------------------------------
    def forward_hidden(self, tokens: torch.Tensor, start: Optional[torch.Tensor], cache: StaticKVCache,
                       exit_layer: Optional[int] = None, rows: Optional[slice] = None) -> torch.Tensor:
        """tokens [B, T] at positions start[b] + t (default 0) through layers < exit_layer (all by default),
        writing their KV into the cache rows -> the hidden state [B, T, H]. Every argument is checked."""
        check_tokens(tokens, self.config.vocab_size)
        E = check_exit(exit_layer, self.num_layers)
        B, T = tokens.shape
        n = (cache.batch_size if rows is None else len(range(*rows.indices(cache.batch_size))))
        if n != B:
            raise GenerationError(f"tokens have {B} sequences but the cache rows hold {n}")
        start = torch.zeros(B, dtype=torch.int64) if start is None else start.to(torch.int64)
        st = self.state(start.to(self.device), T, cache, rows)
        return self.layers(self.embed(tokens.to(self.device)), 0, E, st)
