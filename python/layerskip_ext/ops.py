"""Python face of every native op.

For each op there is
  * ``<op>_reference``: plain PyTorch, the definition the kernels are tested against;
  * ``<op>``: the native op ``torch.ops.layerskip.<op>`` (CPU or CUDA kernel by the device of the inputs),
    with a fake (meta) kernel registered below so it traces under ``torch.compile``.

Shapes (B batch, T new tokens, S cache capacity, H hidden, nH query heads, nKV key/value heads, D head dim):
  rms_norm(x[..., H], weight[H], eps) -> [..., H]
  rope(x[B, T, nH, D], positions[B, T] int64, cos[P, D/2] f32, sin[P, D/2] f32) -> [B, T, nH, D]
      rotate-half convention (pairs i and i + D/2), as Hugging Face Llama.
  kv_cache_write(k_cache[B, nKV, S, D]!, v_cache[B, nKV, S, D]!, k[B, T, nKV, D], v[B, T, nKV, D], start[B] int64)
      writes token t of sequence b at cache slot start[b] + t, in place.
  cache_attention(q[B, T, nH, D], k_cache[B, nKV, S, D], v_cache[B, nKV, S, D], start[B] int64, scale)
      -> [B, T, nH, D]; query t of sequence b is at position start[b] + t and attends causally to cache
      slots [0, start[b] + t]. Query head h reads key/value head h // (nH // nKV) (GQA).
All math is done in float32 and rounded once to the input dtype at the end, so a row's result does not depend
on how many other rows were computed with it (batch invariance, needed for lossless self-speculation).
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv * weight.float()).to(x.dtype)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c = cos[positions].unsqueeze(2)  # [B, T, 1, D/2]
    s = sin[positions].unsqueeze(2)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def kv_cache_write_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             start: torch.Tensor) -> None:
    T = k.shape[1]
    for b in range(k.shape[0]):
        s = int(start[b])
        k_cache[b, :, s:s + T] = k[b].transpose(0, 1).to(k_cache.dtype)
        v_cache[b, :, s:s + T] = v[b].transpose(0, 1).to(v_cache.dtype)


def cache_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                              scale: float) -> torch.Tensor:
    B, T, nH, D = q.shape
    nKV, S = k_cache.shape[1], k_cache.shape[2]
    group = nH // nKV
    k = k_cache.float().repeat_interleave(group, dim=1)  # [B, nH, S, D]
    v = v_cache.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bthd,bhsd->bhts", q.float(), k) * scale  # [B, nH, T, S]
    qpos = start.view(B, 1) + torch.arange(T, device=q.device).view(1, T)  # [B, T]
    kpos = torch.arange(S, device=q.device)
    mask = kpos.view(1, 1, S) <= qpos.view(B, T, 1)  # [B, T, S]
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhts,bhsd->bthd", probs, v)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Native ops (filled in with torch.ops.layerskip.* and fake kernels once the extension is built)
# --------------------------------------------------------------------------------------------------------------

rms_norm = rms_norm_reference
rope = rope_reference
kv_cache_write = kv_cache_write_reference
cache_attention = cache_attention_reference


def native_available() -> bool:
    return False
