"""Early-exit loss: the model's own final norm + LM head on chosen layers' outputs, without materialising logits.

Per step, the active exits (1-based layer numbers ``E``; the last layer is always one) get weights

    raw_E = S(E) * (e_scale if E < L else 1),   w_E = raw_E / sum(raw)     (``normalize=True``, the paper's)

with ``S`` one of sum-l, linear-l, uniform, sqrt-l, inv-l, inv-sqrt-l, and the loss is
``sum_E w_E * CE_E + distill * sum_{E<L} w_E * KL(final || exit_E) + anchor * w_L * KL(reference || final)``,
each term a mean over the valid tokens (labels != -100). The distill term pulls an exit's distribution toward
the final layer's detached distribution. The anchor term keeps the final layer near a reference model's
distribution (for LoRA training: the base model, i.e. the adapters switched off), so that teaching the early
layers to exit does not cost the last layer its quality.

Curricula choose which exits are active at step ``t``:
  * ``none``: every candidate exit, every step;
  * ``rotational``: every R-th layer, shifted by one layer each step (``(E - 1 + t) % R == R - 1``);
  * ``gradual``: exits are enabled from the last layer downward; all are on after
    ``gradual_fraction * total_steps`` steps.

Memory: the fused path (``_ExitHeadLoss``) walks the tokens in chunks, and for each chunk and exit computes the
logits, the loss, and right away the gradients with respect to the exit's normed hidden states and the head
weight (softmax minus target), so neither the forward nor the backward ever holds more than one chunk's
``[chunk, vocab]`` logits (plus the teacher's when distilling). Backward only scales the stored gradients.
The naive path (``naive=True``) is the plain autograd formulation, kept for tests and measurements.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from .scales import EXIT_CURRICULA, EXIT_LOSS_SCALES, canonical, exit_scale

IGNORE_INDEX = -100


@dataclasses.dataclass
class EarlyExitLossConfig:
    e_scale: float = 1.0
    scale: str = "sum-l"
    curriculum: str = "none"
    rotation_interval: int = 2
    gradual_fraction: float = 0.5
    layers: Optional[list[int]] = None   # candidate exits (1-based); None = every layer
    distill: float = 0.0
    anchor: float = 0.0                  # weight of KL(reference final || final); needs the reference's states
    normalize: bool = True
    chunk_tokens: Optional[int] = None   # None: default_chunk(vocab)
    naive: bool = False

    def __post_init__(self):
        for name in ("e_scale", "distill", "anchor", "gradual_fraction"):
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise TrainingError(f"early-exit {name} must be a number, got {getattr(self, name)!r}") from None
            if not math.isfinite(getattr(self, name)):
                raise TrainingError(f"early-exit {name} must be finite, got {getattr(self, name)}")
        if self.e_scale < 0:
            raise TrainingError(f"early-exit e_scale must be >= 0, got {self.e_scale}")
        if self.distill < 0:
            raise TrainingError(f"early-exit distill weight must be >= 0, got {self.distill}")
        if self.anchor < 0:
            raise TrainingError(f"early-exit anchor weight must be >= 0, got {self.anchor}")
        if not 0.0 < self.gradual_fraction <= 1.0:
            raise TrainingError(f"early-exit gradual_fraction must be in (0, 1], got {self.gradual_fraction}")
        self.scale = canonical(self.scale, EXIT_LOSS_SCALES, "early-exit loss scale")
        self.curriculum = canonical(self.curriculum, EXIT_CURRICULA, "early-exit curriculum")
        if not isinstance(self.rotation_interval, int) or self.rotation_interval < 1:
            raise TrainingError(f"early-exit rotation interval must be an integer >= 1, got {self.rotation_interval!r}")
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1):
            raise TrainingError(f"early-exit chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")
        if self.layers is not None:
            self.layers = sorted({int(x) for x in self.layers})

    def check_layers(self, num_layers: int) -> None:
        for e in self.layers or ():
            if not 1 <= e <= num_layers:
                raise TrainingError(f"early-exit layer {e} is outside [1, {num_layers}] (exits are 1-based: "
                                    f"E means the output of the first E layers)")


def exit_weights(config: EarlyExitLossConfig, num_layers: int, step: int = 0,
                 total_steps: Optional[int] = None) -> tuple[list[int], list[float], list[float]]:
    """(active exits ascending, CE weights, KL weights) at ``step``; the last exit is always ``num_layers``.
    An exit's KL weight is its distillation toward the final layer; the final layer's is the anchor's."""
    L = num_layers
    candidates = [e for e in (config.layers or range(1, L + 1)) if e < L]
    if config.e_scale == 0.0:
        candidates = []
    if config.curriculum == "rotational":
        R = config.rotation_interval
        candidates = [e for e in candidates if (e - 1 + step) % R == R - 1]
    elif config.curriculum == "gradual":
        horizon = max(1.0, config.gradual_fraction * (total_steps or 1))
        n_on = math.ceil((L - 1) * min(1.0, (step + 1) / horizon))
        candidates = [e for e in candidates if e >= L - n_on]
    exits = candidates + [L]
    raw = [exit_scale(config.scale, e) * (config.e_scale if e < L else 1.0) for e in exits]
    total = sum(raw) if config.normalize else 1.0
    ce = [r / total for r in raw]
    kl = [(config.distill if e < L else config.anchor) * w for e, w in zip(exits, ce)]
    return exits, ce, kl


def default_chunk(vocab: int) -> int:
    """Tokens per chunk: at most 512 (a [512, 4096] fp32 block, 8 MB, stays in the last-level cache across the
    loss's in-place passes: 4 exits of a 4096-token step took 1.0 s in 512-token chunks against 1.2 s in 2048,
    2026-12-01) and at most ~8M logits for large vocabularies."""
    return max(16, min(512, (1 << 23) // max(vocab, 1)))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return weight.dtype


class _ExitHeadLoss(torch.autograd.Function):
    """x [E, N, H] normed exit states (the final layer's last), weight [V, H], labels [N].
    anchor_x [N, H] or None: the reference model's normed final states, the final exit's KL teacher.

    ce_w, kl_w: [E] weights already divided by the number of valid tokens. Returns (total loss, per-exit CE
    sums [E], per-exit KL sums [E]); the sums are not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, labels, ce_w, kl_w, kl_on, chunk, compute_dtype, need_x, need_w, anchor_x):
        E, N, H = x.shape
        dev = x.device
        with torch.autocast(dev.type, enabled=False):
            wc = weight.to(compute_dtype)
            valid = labels != IGNORE_INDEX
            safe = labels.clamp(min=0).view(-1, 1)
            ce_sum = torch.zeros(E, dtype=torch.float32, device=dev)
            kl_sum = torch.zeros(E, dtype=torch.float32, device=dev)
            gx = torch.zeros_like(x) if need_x else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
            final = E - 1
            distill = any(kl_on[:final])
            order = [final] + list(range(E - 1))
            ce_w32, kl_w32 = ce_w.float(), kl_w.float()
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                lab = safe[s:e]
                v = valid[s:e].view(-1, 1).to(torch.float32)
                t_p = t_ent = None
                if kl_on[final]:  # the anchor: the reference's distribution over this chunk
                    za = (anchor_x[s:e].to(compute_dtype) @ wc.t()).float().softmax(dim=1)
                    a_ent = torch.special.xlogy(za, za).sum(dim=1, keepdim=True)
                for j in order:
                    # the final exit's teacher is the anchor; the others' is the final exit
                    teacher, teacher_ent = (za, a_ent) if j == final and kl_on[j] else (t_p, t_ent)
                    xj = x[j, s:e].to(compute_dtype)
                    z = (xj @ wc.t()).float()                                # [c, V] logits
                    # every step below is in place on z: one [c, V] buffer per exit (two with a teacher)
                    z.sub_(z.amax(dim=1, keepdim=True))
                    tgt = z.gather(1, lab)
                    if kl_on[j]:
                        pz = torch.bmm(teacher.unsqueeze(1), z.unsqueeze(2)).view(-1, 1)  # sum_v p_teacher * z
                    keep = j == final and distill  # the final exit's distribution teaches the others
                    ez = z.exp() if keep else z.exp_()
                    denom = ez.sum(dim=1, keepdim=True)
                    lse = denom.log()
                    ce_sum[j] += ((lse - tgt) * v).sum()
                    if kl_on[j]:
                        # KL(p || q) = sum p log p - sum p (z - lse)
                        kl_sum[j] += ((teacher_ent - pz + lse) * v).sum()
                    if keep:
                        # the teacher's sum p log p = sum p (z - lse), from the logits still in z (no log pass)
                        t_ent = torch.bmm(ez.unsqueeze(1), z.unsqueeze(2)).view(-1, 1) / denom - lse
                        t_p = ez.div_(denom)
                        z.copy_(t_p)
                    else:
                        z.div_(denom)                                         # softmax
                    if not (need_x or need_w):
                        continue
                    # (softmax - onehot) * ce_w + (softmax - teacher) * kl_w, on valid rows only: v folded into
                    # the row scales instead of a pass of its own
                    g = z
                    g.mul_(v * (ce_w32[j] + kl_w32[j]))
                    g.scatter_add_(1, lab, v * -ce_w32[j])
                    if kl_on[j]:
                        g.addcmul_(teacher, v * kl_w32[j], value=-1.0)
                    gc = g.to(compute_dtype)
                    if need_x:
                        gx[j, s:e] = (gc @ wc).to(gx.dtype)
                    if need_w:
                        if compute_dtype == torch.float32:
                            gw.addmm_(gc.t(), xj)
                        else:
                            gw += (gc.t() @ xj).float()
            total = (ce_sum * ce_w32).sum() + (kl_sum * kl_w32).sum()
        ctx.need_x, ctx.need_w = need_x, need_w
        ctx.w_dtype = weight.dtype
        # Kept as plain attributes (not save_for_backward) so backward can hand the buffers over without a
        # copy: scaled in place, the only reference returned, AccumulateGrad may adopt them as .grad.
        ctx.grads = [gx, gw]
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return total, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kl):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the early-exit loss's backward ran twice; its gradients were computed in the "
                               "forward and handed over the first time (recompute the loss instead of "
                               "retain_graph=True)")
        gx, gw = grads
        ctx.grads = None
        dx = gx.mul_(g_total.to(gx.dtype)) if ctx.need_x else None
        dw = gw.mul_(g_total.float()) if ctx.need_w else None
        if dw is not None and dw.dtype != ctx.w_dtype:
            dw = dw.to(ctx.w_dtype)
        del grads, gx, gw
        return dx, dw, None, None, None, None, None, None, None, None, None


def exit_head_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ce_w: torch.Tensor,
                   kl_w: torch.Tensor, kl_on: Sequence[bool], chunk: int, anchor_x: Optional[torch.Tensor] = None):
    """Fused, chunked loss of ``E`` exits (see ``_ExitHeadLoss``): (total, CE sums [E], KL sums [E])."""
    _check_anchor(x, kl_on, anchor_x)
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_w = grad and weight.requires_grad
    cd = _compute_dtype(x, weight)
    return _ExitHeadLoss.apply(x, weight, labels, ce_w, kl_w, tuple(bool(k) for k in kl_on), int(chunk), cd,
                               need_x, need_w, None if anchor_x is None else anchor_x.detach())


def _check_anchor(x: torch.Tensor, kl_on: Sequence[bool], anchor_x: Optional[torch.Tensor]) -> None:
    if bool(kl_on[-1]) != (anchor_x is not None):
        raise TrainingError("the anchor weight is on but no reference final states (anchor_hidden) were given"
                            if anchor_x is None else
                            "reference final states (anchor_hidden) were given but the anchor weight is 0")
    if anchor_x is not None and tuple(anchor_x.shape) != tuple(x.shape[1:]):
        raise TrainingError(f"anchor states {tuple(anchor_x.shape)} do not match the exits' {tuple(x.shape[1:])}")


def naive_exit_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ce_w: torch.Tensor,
                    kl_w: torch.Tensor, kl_on: Sequence[bool], anchor_x: Optional[torch.Tensor] = None):
    """The same quantity with plain autograd: all exits' [N, V] logits exist (and are saved) at once."""
    _check_anchor(x, kl_on, anchor_x)
    E = x.shape[0]
    logps = [F.log_softmax(F.linear(x[j], weight).float(), dim=-1) for j in range(E)]
    valid = (labels != IGNORE_INDEX).float()
    safe = labels.clamp(min=0).view(-1, 1)
    teacher = logps[-1].detach()
    ce_sums, kl_sums = [], []
    if anchor_x is not None:
        anchor = F.log_softmax(F.linear(anchor_x, weight).float(), dim=-1).detach()
    for j in range(E):
        ce_sums.append(-(logps[j].gather(1, safe).view(-1) * valid).sum())
        if kl_on[j] and j == E - 1:
            kl_sums.append(((anchor.exp() * (anchor - logps[j])).sum(-1) * valid).sum())
        elif kl_on[j]:
            kl_sums.append(((teacher.exp() * (teacher - logps[j])).sum(-1) * valid).sum())
        else:
            kl_sums.append(torch.zeros((), device=x.device))
    ce_sum, kl_sum = torch.stack(ce_sums), torch.stack(kl_sums)
    total = (ce_sum * ce_w.float()).sum() + (kl_sum * kl_w.float()).sum()
    return total, ce_sum.detach(), kl_sum.detach()
