"""Fused layer-range forward: the decoder layers of a :class:`LlamaForCausalLM` in one native call.

    fused = FusedLayers(model)                       # packs references to the layer weights once (no copies)
    h = fused.forward(h, start_layer, end_layer, st) # same contract as model.forward_layers(h, start, end, st)

One call of ``ops.layer_range_forward`` replaces the ~15 Python-level ops per layer of ``model.forward_layers``
(on a small model the per-op overhead is a large part of a decode step) and is bitwise equal to it with the
native op set. Where the fused path does not apply it falls back to ``model.forward_layers`` itself:
  * the model does not use the native op set (``model.ops.name != "native"``), or the extension is not built;
  * no KV cache (the training / scoring path), or tensors on another device than the weights;
  * a layer is wrapped or replaced (layer dropout, LoRA adapters: anything but the plain modules), or a weight is
    not contiguous, or the layers' norm eps differ.
The weights are referenced, not copied: in-place updates are seen, and replaced modules or parameters are noticed
and re-collected: global module / parameter registration hooks bump a counter, and only when it moved are the
layers checked again by identity (a call costs one integer comparison, not a walk over every module).
"""
from __future__ import annotations

import mmap
from typing import Iterable, Optional

import torch
from torch import nn

from .. import ops
from .llama import Attention, DecoderLayer, ForwardState, LlamaForCausalLM, MLP, RMSNorm

# Bumped whenever any module gets a submodule or parameter assigned (nn.Module.__setattr__ / register_*), e.g. a
# wrapper or adapter replacing a layer's linear. FusedLayers re-checks its layers only when this moved.
_structure_version = 0


def _bump(*_args):
    global _structure_version
    _structure_version += 1


nn.modules.module.register_module_module_registration_hook(_bump)
nn.modules.module.register_module_parameter_registration_hook(_bump)


class FusedLayers:
    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """(Re)collect the layer weights, e.g. after modules or parameters were replaced."""
        cfg = self.model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.eps = float(cfg.rms_norm_eps)
        self._weights: list[Optional[list[torch.Tensor]]] = [self._layer_weights(layer)
                                                             for layer in self.model.model.layers]
        # What the weights were collected from: checked by identity on every call, so a module or parameter
        # replaced later (an adapter, a wrapper) is noticed instead of silently bypassed.
        self._sources = [self._layer_sources(layer) for layer in self.model.model.layers]
        self._scale = [layer.self_attn.scale if self._weights[i] is not None else None
                       for i, layer in enumerate(self.model.model.layers)]
        self._ranges: dict[tuple[int, int], Optional[list[torch.Tensor]]] = {}
        self._caches: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._version = _structure_version

    @staticmethod
    def _layer_sources(layer: nn.Module) -> list:
        """The layer, its submodules and their parameters (the objects, not their values)."""
        return [layer] + list(layer.modules())[1:] + list(layer.parameters())

    def _unchanged(self, start_layer: int, end_layer: int) -> bool:
        layers = self.model.model.layers
        if len(layers) != len(self._sources):
            return False
        for i in range(start_layer, end_layer):
            seen = self._sources[i]
            now = self._layer_sources(layers[i])
            if len(now) != len(seen) or any(a is not b for a, b in zip(now, seen)):
                return False
        return True

    def _layer_weights(self, layer: nn.Module) -> Optional[list[torch.Tensor]]:
        """The 9 weights of a plain decoder layer, or None when the layer is wrapped / unsupported."""
        if type(layer) is not DecoderLayer:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention or type(mlp) is not MLP:
            return None
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n) is not RMSNorm or float(n.eps) != self.eps for n in norms):
            return None
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return None
        ws = [layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
              attn.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
              mlp.down_proj.weight]
        if any(not w.is_contiguous() for w in ws):
            return None
        return [w.detach() for w in ws]

    def _range(self, start_layer: int, end_layer: int) -> Optional[list[torch.Tensor]]:
        key = (start_layer, end_layer)
        if key not in self._ranges:
            per = self._weights[start_layer:end_layer]
            scales = set(self._scale[start_layer:end_layer])
            ok = all(w is not None for w in per) and len(scales) <= 1
            self._ranges[key] = [w for ws in per for w in ws] if ok else None
        return self._ranges[key]

    def _cache_lists(self, st: ForwardState, start_layer: int, end_layer: int):
        rows = st.rows
        key = (id(st.cache), None if rows is None else (rows.start, rows.stop, rows.step), start_layer, end_layer)
        lists = self._caches.get(key)
        if lists is None:
            if len(self._caches) > 64:  # caches come and go with generate() calls
                self._caches.clear()
            ks, vs = [], []
            for i in range(start_layer, end_layer):
                k, v = st.cache.layer(i, rows)
                ks.append(k)
                vs.append(v)
            lists = (ks, vs, st.cache)  # keep the cache alive while its id is a key
            self._caches[key] = lists
        return lists[0], lists[1]

    def applies(self, h: torch.Tensor, start_layer: int, end_layer: int, st: ForwardState) -> bool:
        """Whether forward() runs the fused native op (otherwise it falls back to model.forward_layers)."""
        return h.dim() == 3 and h.is_contiguous() and self.applies_range(h.dtype, h.device, start_layer, end_layer, st)

    def applies_range(self, dtype: torch.dtype, device: torch.device, start_layer: int, end_layer: int,
                      st: ForwardState) -> bool:
        """Whether layers [start_layer, end_layer) can run natively on hidden states of this dtype and device."""
        if end_layer <= start_layer or st.cache is None or getattr(st.ops, "name", None) != "native":
            return False
        if not ops.native_available():
            return False
        if self._version != _structure_version:  # something somewhere was re-assigned: is it ours?
            if self._unchanged(0, len(self._sources)):
                self._version = _structure_version
            else:
                self.refresh()
        w = self._range(start_layer, end_layer)
        return w is not None and dtype == w[1].dtype and device == w[1].device

    def forward(self, h: torch.Tensor, start_layer: int, end_layer: int, st: ForwardState) -> torch.Tensor:
        """Decoder layers [start_layer, end_layer) on h [B, T, H]: model.forward_layers' contract and result."""
        if not 0 <= start_layer <= end_layer <= len(self._weights):
            return self.model.forward_layers(h, start_layer, end_layer, st)  # raises its own error
        if not self.applies(h, start_layer, end_layer, st):
            per_op = getattr(self.model, "forward_layers_per_op", self.model.forward_layers)
            return per_op(h, start_layer, end_layer, st)
        weights = self._range(start_layer, end_layer)
        ks, vs = self._cache_lists(st, start_layer, end_layer)
        return ops.layer_range_forward(h, weights, ks, vs, st.start, st.positions, st.cos, st.sin, self.num_heads,
                                       self.num_kv_heads, self.eps, self._scale[start_layer])

    __call__ = forward

    def draft_greedy(self, tokens: torch.Tensor, embed: torch.Tensor, exit_layer: int, st: ForwardState,
                     norm: RMSNorm, lm_head: torch.Tensor, vocab_subset: Optional[torch.Tensor],
                     num_drafts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ops.draft_greedy over layers [0, exit_layer) (the caller checked applies_range): st covers the round's
        d + 1 positions from st.start."""
        weights = self._range(0, exit_layer)
        ks, vs = self._cache_lists(st, 0, exit_layer)
        return ops.draft_greedy(tokens, embed, weights, ks, vs, st.start, st.cos, st.sin, self.num_heads,
                                self.num_kv_heads, self.eps, self._scale[0], norm.weight, norm.eps, lm_head,
                                vocab_subset, num_drafts)


# --------------------------------------------------------------------------------------------------------------
# Transparent huge pages for weights (optional; Linux)
# --------------------------------------------------------------------------------------------------------------

HUGE_PAGE = 2 << 20


def hugepage_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of nbytes on 2 MB-aligned, private anonymous memory advised for transparent huge pages
    (MADV_HUGEPAGE before first touch, so the kernel backs it with 2 MB pages where it can). The mapping lives as
    long as the tensor's storage."""
    if not (hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")):  # not a POSIX system
        return torch.empty(nbytes, dtype=torch.uint8)
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled or unsupported: ordinary pages
            pass
    t = torch.frombuffer(mm, dtype=torch.uint8)  # keeps mm alive
    off = (-t.data_ptr()) % HUGE_PAGE
    return t[off:off + nbytes]


@torch.no_grad()
def move_to_hugepages(tensors: Iterable[torch.Tensor]) -> int:
    """Move CPU tensors (e.g. a model's parameters) into one huge-page buffer, in place: each tensor object keeps its
    identity, shape, dtype and values (``Tensor.set_`` onto the new storage; the old storage is freed when nothing
    else holds it), so modules, tied weights and optimizers holding the tensors see the move.

    Streaming weights from 2 MB pages instead of 4 KB ones saves a TLB miss per 4 KB: measured ~10-15% more
    bandwidth for the decode-shaped gemms on this machine kind. Skips tensors that are not CPU, not contiguous or
    views sharing storage. Returns the bytes moved. Copies the data once (the peak memory is old + new)."""
    chosen, seen = [], set()
    for t in tensors:
        if id(t) in seen or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        seen.add(id(t))
        storage = t.untyped_storage()
        if t.storage_offset() != 0 or storage.nbytes() != t.numel() * t.element_size():
            continue  # a view of a bigger storage: moving it alone would break the sharing
        chosen.append(t)
    if not chosen:
        return 0
    offsets, total = [], 0
    for t in chosen:
        offsets.append(total)
        total += (t.numel() * t.element_size() + 63) // 64 * 64
    arena = hugepage_buffer(total)
    for t, off in zip(chosen, offsets):
        n = t.numel() * t.element_size()
        view = arena[off:off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        t.set_(view.untyped_storage(), view.storage_offset(), t.shape, t.stride())
    return total


def move_weights_to_hugepages(model: LlamaForCausalLM) -> int:
    """:func:`move_to_hugepages` for all of a model's parameters (tied ones once). Build FusedLayers after this, or
    call its refresh(). Returns the bytes moved."""
    return move_to_hugepages(list(model.parameters()))
