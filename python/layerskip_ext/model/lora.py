"""LoRA adapters on the decoder's linear layers: train a small low-rank delta, merge it into the weights at load.

``W' = W + (alpha / r) * B @ A`` with A [r, in], B [out, r]. B starts at zero, so a fresh adapter leaves the model
unchanged. Training wraps each ``nn.Linear`` in a ``LoRALinear`` (the base weight frozen); inference never sees
the wrapper: ``merge_adapter_`` adds the delta to the plain weights, so every kernel (and the fused path) runs
on a merged model at no extra cost per token.

Adapter tensor names are the wrapped linear's HF name plus ``.lora_a`` / ``.lora_b``, e.g.
``model.layers.3.self_attn.q_proj.lora_a``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, LayerSkipError

# every linear layer of a Llama decoder layer (the LM head is shared with the embedding: left alone)
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base(x) + scaling * (x A^T) B^T``; the base ``nn.Linear`` is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise LayerSkipError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        base.weight.requires_grad_(False)
        out_features, in_features = base.weight.shape
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.enabled = True  # False: the layer is its base (adapters_disabled gives the base model for free)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=w.device))
        # as in the LoRA paper / peft: A random (Kaiming-uniform with a = sqrt(5): bound 1/sqrt(in)), B zero
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            a = torch.rand(self.lora_a.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            self.lora_a.copy_(a)

    def delta(self) -> torch.Tensor:
        """[out, in] float32: the weight change this adapter makes."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scaling


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block, every LoRALinear of ``model`` computes its frozen base only: the base model's outputs
    without a second copy of its weights (the training anchor's teacher)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


def _decoder_linears(model: nn.Module, targets: Iterable[str]):
    """(HF-style name, parent module, attribute) of each targeted linear in the decoder layers."""
    targets = set(targets)
    unknown = targets - set(ALL_LINEARS)
    if unknown:
        raise LayerSkipError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(ALL_LINEARS)}")
    for name, module in model.named_modules():
        for attr in ALL_LINEARS:
            if attr in targets and isinstance(getattr(module, attr, None), (nn.Linear, LoRALinear)):
                yield clean_name(f"{name}.{attr}"), module, attr


def clean_name(name: str) -> str:
    """Drop wrapper path components (training wrappers add ``.layer``) so names match the HF state dict."""
    parts = [p for p in name.split(".") if p not in ("layer", "_orig_mod", "module")]
    return ".".join(parts)


def apply_lora(model: nn.Module, rank: int, alpha: Optional[float] = None,
               targets: Iterable[str] = ALL_LINEARS, seed: int = 0) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` and wrap the targeted linears in LoRA adapters (in place).

    The A matrices are drawn from a generator seeded with ``seed`` (reproducible runs). Returns the adapter
    parameters (the only trainable ones)."""
    generator = torch.Generator().manual_seed(int(seed))
    alpha = float(2 * rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    found = list(_decoder_linears(model, targets))
    if not found:
        raise LayerSkipError("apply_lora found no decoder linear layers to adapt")
    for _, parent, attr in found:
        lin = getattr(parent, attr)
        if isinstance(lin, LoRALinear):
            raise LayerSkipError("apply_lora: the model already has LoRA adapters")
        wrapped = LoRALinear(lin, rank, alpha, generator)
        setattr(parent, attr, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name.lora_a / name.lora_b: tensor} for every adapter in ``model`` (detached, on CPU, float32)."""
    out = {}
    for name, parent, attr in _decoder_linears(model, ALL_LINEARS):
        lin = getattr(parent, attr)
        if isinstance(lin, LoRALinear):
            out[f"{name}.lora_a"] = lin.lora_a.detach().float().cpu().contiguous()
            out[f"{name}.lora_b"] = lin.lora_b.detach().float().cpu().contiguous()
    return out


def load_adapter_state_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model wrapped by ``apply_lora`` (names and shapes must match exactly)."""
    mine = {}
    for name, parent, attr in _decoder_linears(model, ALL_LINEARS):
        lin = getattr(parent, attr)
        if isinstance(lin, LoRALinear):
            mine[f"{name}.lora_a"], mine[f"{name}.lora_b"] = lin.lora_a, lin.lora_b
    if set(mine) != set(tensors):
        missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        raise CheckpointError(f"adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, p in mine.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise CheckpointError(f"adapter tensor {k} has shape {tuple(tensors[k].shape)}, the model's "
                                      f"adapter expects {tuple(p.shape)} (a different rank?)")
            p.copy_(tensors[k])


def merge_lora_(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by its base ``nn.Linear`` with the delta added (in place)."""
    with torch.no_grad():
        for _, parent, attr in list(_decoder_linears(model, ALL_LINEARS)):
            lin = getattr(parent, attr)
            if isinstance(lin, LoRALinear):
                w = lin.base.weight
                w.copy_((w.float() + lin.delta().to(w.device)).to(w.dtype))
                w.requires_grad_(False)
                setattr(parent, attr, lin.base)
    return model
