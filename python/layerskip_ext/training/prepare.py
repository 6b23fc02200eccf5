"""``prepare_model``: LayerSkip training hooks for our Llama model or a Hugging Face ``LlamaForCausalLM``.

    loss_fn = prepare_model(model, layer_dropout=LayerDropoutConfig(0.2), early_exit_loss=EarlyExitLossConfig())
    for step, (tokens, labels) in enumerate(batches):        # labels[b, t] = target of position t (-100: none)
        loss_fn.set_step(step, total_steps)                   # curricula (optional)
        out = loss_fn(layer_outputs(model, tokens), labels)   # or: model.hidden_states(tokens) for ours
        out.loss.backward()
        print(out.report())                                   # per-exit losses

With a Hugging Face model, run ``model.model(input_ids, use_cache=False)`` (the decoder without the full
logits) and call ``loss_fn(None, labels)``: the wrapped layers record their outputs. (HF's own
``output_hidden_states`` replaces the last entry by the normed state and records the dropped layers' inner
calls, so it is not used.)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
from torch import nn

from ..errors import TrainingError
from ..model.llama import LlamaForCausalLM
from ..model.lora import adapters_disabled, has_lora
from .early_exit import IGNORE_INDEX, EarlyExitLossConfig, default_chunk, exit_head_loss, exit_weights, naive_exit_loss
from .layer_dropout import LayerDropout, LayerDropoutConfig, LayerSkipLayer


def model_kind(model: nn.Module) -> str:
    """'layerskip' (ours), 'hf' (a transformers Llama-style causal LM), else TrainingError."""

    if isinstance(model, LlamaForCausalLM):
        return "layerskip"
    inner = getattr(model, "model", None)
    if (isinstance(getattr(inner, "layers", None), nn.ModuleList) and hasattr(model, "lm_head")
            and hasattr(inner, "norm") and hasattr(inner, "embed_tokens")):
        return "hf"
    raise TrainingError(f"prepare_model supports layerskip_ext's LlamaForCausalLM and Hugging Face Llama-style "
                        f"causal LMs (model.model.layers, model.model.norm, model.lm_head); got "
                        f"{type(model).__name__}")


def shift_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: labels[:, t] = tokens[:, t + 1], the last position ignored."""
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = tokens[:, 1:]
    return labels


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor                    # the weighted total (differentiable)
    exits: list[int]                      # active exits, 1-based layer numbers, the last layer last
    exit_losses: torch.Tensor             # [E] cross-entropy per exit, mean per valid token (detached)
    distill_losses: torch.Tensor          # [E] KL(final || exit) per exit (zeros where off)
    weights: list[float]                  # CE weight per exit
    distill_weights: list[float]

    def per_layer(self) -> dict[int, float]:
        """{layer number: CE loss} (one host sync)."""
        return dict(zip(self.exits, self.exit_losses.float().tolist()))

    def report(self) -> str:
        losses = self.exit_losses.float().tolist()
        kls = self.distill_losses.float().tolist()
        parts = []
        for e, ce, kl, w, kw in zip(self.exits, losses, kls, self.weights, self.distill_weights):
            parts.append(f"L{e}: ce {ce:.4f} (w {w:.3f})" + (f" kl {kl:.4f}" if kw else ""))
        return f"loss {float(self.loss.detach()):.4f} | " + ", ".join(parts)


class LayerSkipLoss:
    """The loss returned by ``prepare_model``; also holds the layer-dropout state (``.layer_dropout``)."""

    def __init__(self, model: nn.Module, kind: str, exit_config: EarlyExitLossConfig,
                 dropout: Optional[LayerDropout], recorder: Optional[dict], num_layers: int):
        self.model = model
        self.kind = kind
        self.config = exit_config
        self.layer_dropout = dropout
        self.recorder = recorder
        self.num_layers = num_layers
        self.step = 0
        self.total_steps: Optional[int] = None
        self._hooks: list = []

    # ---- schedule --------------------------------------------------------------------------------------------
    def set_step(self, step: int, total_steps: Optional[int] = None) -> None:
        """Position in training for the curricula (layer-dropout time curriculum, exit curriculum)."""
        self.step = int(step)
        if total_steps is not None:
            self.total_steps = int(total_steps)
        if self.layer_dropout is not None:
            self.layer_dropout.set_step(step, total_steps)

    def exits(self, step: Optional[int] = None) -> tuple[list[int], list[float], list[float]]:
        return exit_weights(self.config, self.num_layers, self.step if step is None else step, self.total_steps)

    # ---- the loss --------------------------------------------------------------------------------------------
    def _collect(self, hidden_states) -> dict[int, torch.Tensor]:
        L = self.num_layers
        if hidden_states is None:
            if not self.recorder:
                raise TrainingError("no hidden states: pass the per-layer outputs (model.hidden_states(tokens)) "
                                    "or run the prepared model's forward first")
            got = {i + 1: h for i, h in self.recorder.items()}
        elif isinstance(hidden_states, dict):
            got = {int(k): v for k, v in hidden_states.items()}
        elif isinstance(hidden_states, (list, tuple)):
            if len(hidden_states) != L:
                raise TrainingError(f"expected the outputs of all {L} layers, got {len(hidden_states)} tensors "
                                    f"(Hugging Face's output_hidden_states has L + 1 with a normed last entry: "
                                    f"pass None to use the recorded layer outputs)")
            got = {i + 1: h for i, h in enumerate(hidden_states)}
        else:
            raise TrainingError(f"hidden states must be a list of per-layer tensors, a dict, or None; got "
                                f"{type(hidden_states).__name__}")
        return got

    def _norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(h)

    def __call__(self, hidden_states=None, labels: Optional[torch.Tensor] = None, *,
                 step: Optional[int] = None, anchor_hidden: Optional[torch.Tensor] = None) -> LossOutput:
        """anchor_hidden [B, T, H]: the reference model's last-layer output (before the final norm), needed when
        the config's anchor weight is > 0 (``reference_last_hidden`` computes it for a LoRA-adapted model)."""
        if labels is None:
            raise TrainingError("labels are required (labels[b, t] = target of position t; -100 = ignore)")
        got = self._collect(hidden_states)
        exits, ce, kl = self.exits(step)
        missing = [e for e in exits if e not in got]
        if missing:
            raise TrainingError(f"no output for layer {missing[0]} (needed by the early-exit loss)")
        h_last = got[exits[-1]]
        if tuple(labels.shape) != tuple(h_last.shape[:-1]):
            raise TrainingError(f"labels shape {tuple(labels.shape)} does not match hidden states "
                                f"{tuple(h_last.shape[:-1])}")
        H = h_last.shape[-1]
        x = torch.stack([self._norm(got[e]).reshape(-1, H) for e in exits])      # [E, N, H]
        labels = labels.reshape(-1).to(x.device)
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
        ce_w = torch.tensor(ce, dtype=torch.float32, device=x.device) / n_valid
        kl_w = torch.tensor(kl, dtype=torch.float32, device=x.device) / n_valid
        kl_on = [k > 0 for k in kl]
        anchor_x = None  # the exit loss checks that it is given exactly when the anchor weight is on
        if anchor_hidden is not None:
            if tuple(anchor_hidden.shape) != tuple(h_last.shape):
                raise TrainingError(f"anchor_hidden shape {tuple(anchor_hidden.shape)} does not match the last "
                                    f"layer's output {tuple(h_last.shape)}")
            anchor_x = self._norm(anchor_hidden.detach()).reshape(-1, H)
        weight = self.model.lm_head.weight
        if self.config.naive:
            total, ce_sum, kl_sum = naive_exit_loss(x, weight, labels, ce_w, kl_w, kl_on, anchor_x)
        else:
            chunk = self.config.chunk_tokens or default_chunk(weight.shape[0])
            total, ce_sum, kl_sum = exit_head_loss(x, weight, labels, ce_w, kl_w, kl_on, chunk, anchor_x)
        if self.recorder is not None:
            self.recorder.clear()
        return LossOutput(total, exits, ce_sum / n_valid, kl_sum / n_valid, ce, kl)


def _as_dropout_config(value) -> Optional[LayerDropoutConfig]:
    if value is None or value is False:
        return None
    if isinstance(value, LayerDropoutConfig):
        return value
    if isinstance(value, dict):
        return LayerDropoutConfig(**value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return LayerDropoutConfig(p_max=float(value))
    raise TrainingError(f"layer_dropout must be a LayerDropoutConfig, a dict, a rate or None; got {value!r}")


def _as_exit_config(value) -> EarlyExitLossConfig:
    if value is None or value is False:
        return EarlyExitLossConfig(e_scale=0.0)
    if value is True:
        return EarlyExitLossConfig()
    if isinstance(value, EarlyExitLossConfig):
        return value
    if isinstance(value, dict):
        return EarlyExitLossConfig(**value)
    if isinstance(value, (int, float)):
        return EarlyExitLossConfig(e_scale=float(value))
    raise TrainingError(f"early_exit_loss must be an EarlyExitLossConfig, a dict, an e_scale or None; "
                        f"got {value!r}")


def unprepare_model(model: nn.Module) -> nn.Module:
    """Undo ``prepare_model``: the original decoder layers go back in place; hooks are removed."""
    state = getattr(model, "_layerskip_loss", None)
    if state is not None:
        for h in state._hooks:
            h.remove()
        del model._layerskip_loss
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, LayerSkipLayer):
            layers[i] = layer.layer
    return model


def prepare_model(model: nn.Module, layer_dropout=None, early_exit_loss=None, *,
                  activation_checkpointing: bool = False, rank: Optional[int] = None,
                  world_size: Optional[int] = None, record_outputs: Optional[bool] = None) -> LayerSkipLoss:
    """Wrap ``model.model.layers[i]`` in place (layer dropout per sample, optional activation checkpointing of
    each layer, output recording) and return the early-exit loss function.

    layer_dropout: LayerDropoutConfig, dict of its fields, a p_max, or None (off).
    early_exit_loss: EarlyExitLossConfig, dict, an e_scale, True (defaults) or None (final layer only, still
        chunked).
    rank/world_size: override torch.distributed's (the drop decisions cover the global batch).
    record_outputs: have the wrapped layers record their outputs for ``loss_fn(None, labels)``; default on
        for Hugging Face models, off for ours (whose ``hidden_states(tokens)`` returns them).
    """
    kind = model_kind(model)
    if getattr(model, "_layerskip_loss", None) is not None:
        unprepare_model(model)
    layers = model.model.layers
    L = len(layers)
    ld_cfg = _as_dropout_config(layer_dropout)
    ee_cfg = _as_exit_config(early_exit_loss)
    ee_cfg.check_layers(L)
    dropout = LayerDropout(ld_cfg, L, rank=rank, world_size=world_size) if ld_cfg is not None else None
    if record_outputs is None:
        record_outputs = kind == "hf"
    recorder: Optional[dict] = {} if record_outputs else None
    for i in range(L):
        layers[i] = LayerSkipLayer(layers[i], i, dropout, kind, checkpoint=activation_checkpointing,
                                   recorder=recorder)
    loss = LayerSkipLoss(model, kind, ee_cfg, dropout, recorder, L)
    if dropout is not None:
        def pre_hook(module, args, kwargs):
            tokens = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
            if module.training and isinstance(tokens, torch.Tensor):
                dropout.on_embed(tokens)
        loss._hooks.append(model.model.embed_tokens.register_forward_pre_hook(pre_hook, with_kwargs=True))
    object.__setattr__(model, "_layerskip_loss", loss)
    return loss


def layer_outputs(model: nn.Module, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer number (1-based): output [B, T, H]} of every decoder layer, differentiably, for ours or HF."""
    kind = model_kind(model)
    if kind == "layerskip":
        return {i + 1: h for i, h in enumerate(model.hidden_states(tokens))}
    state = getattr(model, "_layerskip_loss", None)
    if state is not None and state.recorder is not None:
        state.recorder.clear()
        model.model(input_ids=tokens, use_cache=False)
        return {i + 1: h for i, h in state.recorder.items()}
    got: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m, _a, out, i=i):
            got[i + 1] = out[0] if isinstance(out, (tuple, list)) else out
        handles.append(layer.register_forward_hook(hook))
    try:
        model.model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def reference_last_hidden(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The base model's last-layer output [B, T, H] for a LoRA-adapted ``model``: the same forward with the
    adapters switched off, in eval mode (no layer dropout), without gradients."""
    if not has_lora(model):
        raise TrainingError("the anchor's reference is the base model under LoRA adapters; this model has none "
                            "(train with --lora-rank, or set the anchor weight to 0)")
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return layer_outputs(model, tokens)[len(model.model.layers)].detach()
    finally:
        model.train(was_training)


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (parameter names unchanged), with dynamic shapes: under layer
    dropout the number of rows a layer runs on changes from step to step. Inductor fuses the norms, rotary
    embedding, SiLU gate and residual adds that eager mode runs as separate passes (24x160 and 16x192 training
    steps of both recipes 5-17% faster on the 2-core AVX2 machine of 2026-12-01, eager and compiled steps
    alternating; 45-50 s of compilation with a cold cache)."""
    for layer in model.model.layers:
        (layer.layer if isinstance(layer, LayerSkipLayer) else layer).compile(dynamic=True)


class TrainingForward(nn.Module):
    """One module whose forward is the whole training computation (layers + early-exit loss), so DDP and FSDP
    see every parameter used inside ``forward``. Returns (loss, per-exit CE [E], per-exit KL [E])."""

    def __init__(self, model: nn.Module, loss_fn: LayerSkipLoss):
        super().__init__()
        self.model = model
        object.__setattr__(self, "loss_fn", loss_fn)
        self.last: Optional[LossOutput] = None
        self.loss_s = 0.0  # wall time in the early-exit loss (its fused heads compute their gradients there too)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor):
        anchor = reference_last_hidden(self.model, tokens) if self.loss_fn.config.anchor > 0 else None
        hidden = layer_outputs(self.model, tokens)
        t = time.perf_counter()
        out = self.loss_fn(hidden, labels, anchor_hidden=anchor)
        self.loss_s += time.perf_counter() - t
        object.__setattr__(self, "last", out)
        return out.loss, out.exit_losses, out.distill_losses
