"""Per-sample layer dropout without host synchronisation.

How rows are chosen (the design choice): a decoder layer runs only on the samples of the batch that keep it,
``h.index_copy(0, keep, layer(h.index_select(0, keep), ...))``. The number of kept rows decides tensor shapes,
so deciding it on the device would need a device->host copy per layer. Instead the whole step's decisions are
drawn up front, on the host, from a CPU ``torch.Generator`` seeded with ``(seed, forward counter)``: one
``[layers, global batch]`` uniform draw per forward pass, triggered by a forward pre-hook on the token
embedding (the first thing every forward does). Kept-row indices are then plain CPU tensors whose lengths the
host knows; on an accelerator they are copied once per forward, non-blocking, before the first layer runs.

* The draw covers the *global* batch (all ranks' samples, rank r owning rows ``[r*B, (r+1)*B)``), so a
  2-rank run drops exactly what a 1-process run over the same global batch drops.
* Every layer is called on every rank, even with no kept rows (an empty batch goes through the layer and
  its parameters receive zero gradients), so DDP/FSDP collectives stay aligned.
* Recomputation (activation checkpointing) never redraws: the plan changes only when the embedding runs
  outside a backward pass.
* In eval mode (``module.eval()``) layers always run on the whole batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import TrainingError
from .common import dist_info, mix_seed
from .scales import LAYER_SCALES, TIME_CURRICULA, canonical, layer_scale, time_scale


@dataclasses.dataclass
class LayerDropoutConfig:
    """``p_max``: the largest rate (the last layer's, for rising scales); ``scale``: how rates grow with
    depth; ``time_curriculum``: how p_max grows over training (``none`` = constant, ``exponential`` = the
    paper's rising schedule); ``seed``: the drop decisions' seed."""
    p_max: float = 0.0
    scale: str = "exponential"
    time_curriculum: str = "none"
    seed: int = 0

    def __post_init__(self):
        try:
            self.p_max = float(self.p_max)
        except (TypeError, ValueError):
            raise TrainingError(f"layer-dropout p_max must be a number in [0, 1], got {self.p_max!r}") from None
        if not 0.0 <= self.p_max <= 1.0:
            raise TrainingError(f"layer-dropout p_max must be in [0, 1], got {self.p_max}")
        self.scale = canonical(self.scale, LAYER_SCALES, "layer-dropout scale")
        self.time_curriculum = canonical(self.time_curriculum, TIME_CURRICULA, "layer-dropout time curriculum")
        self.seed = int(self.seed)


@dataclasses.dataclass
class _Plan:
    batch: int                      # local rows
    keep: list                      # per layer: None (all rows kept) or a LongTensor of kept row indices
    kept_rows: list                 # per layer: number of kept rows (host ints, for reports)


def _in_backward() -> bool:
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f is not None and f() != -1


class LayerDropout:
    """Holds the rates and the current forward pass's drop plan for ``num_layers`` wrapped layers."""

    def __init__(self, config: LayerDropoutConfig, num_layers: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.config = config
        self.num_layers = num_layers
        self._rank, self._world = rank, world_size
        self.step = 0
        self.total_steps: Optional[int] = None
        self.counter = 0          # forward passes planned so far (the RNG stream position)
        self._plan: Optional[_Plan] = None
        self.enabled = True

    # ---- rates ----------------------------------------------------------------------------------------------
    def set_step(self, step: int, total_steps: Optional[int] = None) -> None:
        self.step = int(step)
        if total_steps is not None:
            self.total_steps = int(total_steps)

    def rates(self) -> list[float]:
        c = self.config
        d = time_scale(c.time_curriculum, self.step, self.total_steps)
        return [c.p_max * d * layer_scale(c.scale, i, self.num_layers) for i in range(self.num_layers)]

    @property
    def active(self) -> bool:
        return self.enabled and self.config.p_max > 0.0

    # ---- plans ----------------------------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        r, w = dist_info()
        return (self._rank if self._rank is not None else r), (self._world if self._world is not None else w)

    def draw(self, counter: int, global_batch: int) -> torch.Tensor:
        """keep mask [layers, global_batch] (bool, CPU) for forward pass number ``counter``."""
        g = torch.Generator().manual_seed(mix_seed(self.config.seed, counter))
        u = torch.rand(self.num_layers, global_batch, generator=g, dtype=torch.float64)
        p = torch.tensor(self.rates(), dtype=torch.float64).view(-1, 1)
        return u >= p

    def new_plan(self, local_batch: int, device: torch.device | str = "cpu") -> None:
        """Draw the next forward pass's decisions (called by the embedding pre-hook, or by hand)."""
        if not self.active:
            self._plan = None
            return
        rank, world = self.rank_world()
        mask = self.draw(self.counter, local_batch * world)[:, rank * local_batch:(rank + 1) * local_batch]
        self.counter += 1
        device = torch.device(device)
        keep, kept = [], []
        for row in mask:
            n = int(row.sum())
            kept.append(n)
            if n == local_batch:
                keep.append(None)
                continue
            idx = torch.nonzero(row).view(-1)
            if device.type != "cpu":
                if device.type == "cuda":
                    idx = idx.pin_memory()
                idx = idx.to(device, non_blocking=True)
            keep.append(idx)
        self._plan = _Plan(local_batch, keep, kept)

    def on_embed(self, tokens: torch.Tensor) -> None:
        if not self.active or _in_backward():
            return
        batch = tokens.shape[0] if tokens.dim() >= 2 else 1
        self.new_plan(batch, tokens.device)

    def rows(self, layer: int, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """Kept-row indices for ``layer`` in the current plan, or None for 'all rows'."""
        if not self.active:
            return None
        if self._plan is None or self._plan.batch != batch:
            # no embedding call announced this batch (e.g. inputs_embeds): plan now
            self.new_plan(batch, device)
        return self._plan.keep[layer]

    def kept_rows(self) -> Optional[list[int]]:
        return None if self._plan is None else list(self._plan.kept_rows)

    def state_dict(self) -> dict:
        return {"counter": self.counter, "step": self.step, "total_steps": self.total_steps,
                "config": dataclasses.asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])
        self.step = int(state.get("step", 0))
        self.total_steps = state.get("total_steps", self.total_steps)
        self._plan = None


# ---------------------------------------------------------------------------------------------------------------
# the layer wrapper
# ---------------------------------------------------------------------------------------------------------------
_PREFIX = "layer."


def _strip_prefix_hook(module, state_dict, prefix, local_metadata):
    for key in list(state_dict.keys()):
        if key.startswith(prefix + _PREFIX):
            state_dict[prefix + key[len(prefix + _PREFIX):]] = state_dict.pop(key)
    return state_dict


def _add_prefix_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in list(state_dict.keys()):
        if key.startswith(prefix) and not key.startswith(prefix + _PREFIX):
            state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


class _ZeroTie(torch.autograd.Function):
    """A zero scalar that depends on ``x``: backward sends zeros to ``x`` (keeps an unused layer in the graph
    so data-parallel wrappers see every parameter receive a (zero) gradient, without NaN risk)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return g.new_zeros(ctx.shape, dtype=ctx.dtype)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out, h):
    if isinstance(out, tuple):
        return (h,) + tuple(out[1:])
    if isinstance(out, list):
        return [h] + list(out[1:])
    return h


class LayerSkipLayer(nn.Module):
    """A decoder layer that runs on the kept samples only (training mode), and optionally records its output.

    ``kind`` says how the layer's other arguments carry the batch:
      * ``"layerskip"``: ``forward(h, st)`` of our model: only ``h`` (and ``st.positions``/``st.start`` when they
        are per-sample) has a batch dimension;
      * ``"hf"``: Hugging Face decoder layers: every tensor argument with at least 2 dimensions whose dim 0 is
        the batch size is sliced, also inside tuples (``position_embeddings``); 1-D tensors such as
        ``cache_position`` are left alone.
    The state dict keeps the wrapped layer's names (no ``layer.`` prefix), so checkpoints stay interchangeable.
    """

    def __init__(self, layer: nn.Module, index: int, dropout: LayerDropout, kind: str,
                 checkpoint: bool = False, recorder: Optional[dict] = None):
        super().__init__()
        self.layer = layer
        self.index = index
        self.kind = kind
        self.checkpoint = checkpoint
        object.__setattr__(self, "_dropout", dropout)     # not a submodule
        object.__setattr__(self, "_recorder", recorder)
        self._register_state_dict_hook(_strip_prefix_hook)
        self._register_load_state_dict_pre_hook(_add_prefix_hook)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("_") or not modules or "layer" not in modules:
                raise
            return getattr(modules["layer"], name)   # attributes of the wrapped layer (e.g. self_attn)

    def _run(self, *args, **kwargs):
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return self.layer(*args, **kwargs)

    def _slice(self, value, idx: torch.Tensor, batch: int):
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2 and value.shape[0] == batch:
                return value.index_select(0, idx)
            return value
        if isinstance(value, tuple):
            return tuple(self._slice(v, idx, batch) for v in value)
        if isinstance(value, list):
            return [self._slice(v, idx, batch) for v in value]
        return value

    def _slice_state(self, st, idx: torch.Tensor, batch: int):
        changes = {}
        pos = getattr(st, "positions", None)
        if isinstance(pos, torch.Tensor) and pos.shape[0] == batch and batch > 1:
            changes["positions"] = pos.index_select(0, idx)
        start = getattr(st, "start", None)
        if isinstance(start, torch.Tensor) and start.dim() == 1 and start.shape[0] == batch:
            changes["start"] = start.index_select(0, idx)
        if getattr(st, "cache", None) is not None:
            raise TrainingError("layer dropout runs on a cache-free forward pass only (training mode with a "
                                "KV cache): call model.eval() for generation")
        return dataclasses.replace(st, **changes) if changes else st

    def forward(self, h: torch.Tensor, *args, **kwargs):
        idx = None
        if self.training and self._dropout is not None:
            idx = self._dropout.rows(self.index, h.shape[0], h.device)
        if idx is None:
            out = self._run(h, *args, **kwargs)
            full = _first(out)
        else:
            batch = h.shape[0]
            if self.kind == "layerskip":
                args = tuple(self._slice_state(a, idx, batch) if dataclasses.is_dataclass(a) else a for a in args)
            else:
                args = tuple(self._slice(a, idx, batch) for a in args)
                kwargs = {k: self._slice(v, idx, batch) for k, v in kwargs.items()}
            if idx.numel() == 0 and self.kind != "layerskip":
                # Hugging Face layers reject an empty batch: run one row and discard it (zero gradients)
                idx = idx.new_zeros(1)
                out = self._run(h.index_select(0, idx), *args, **kwargs)
                full = h + _ZeroTie.apply(_first(out)).to(h.dtype)
            else:
                out = self._run(h.index_select(0, idx), *args, **kwargs)
                full = h.index_copy(0, idx, _first(out).to(h.dtype))
            out = _replace_first(out, full)
        if self._recorder is not None:
            self._recorder[self.index] = full
        return out
