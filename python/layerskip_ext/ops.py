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
  linear(x[..., K], weight[N, K]) -> [..., N]   (float32 or bfloat16; x and weight of one dtype)
  exit_head_argmax(h[..., H], norm_weight[H], eps, lm_head[V, H], vocab_subset[V'] int64 or None) -> [...] int64
      argmax over the vocabulary of linear(rms_norm(h)), without materialising the logits; ties -> lowest index.
  exit_head_sample(h[..., H], norm_weight[H], eps, lm_head[V, H], uniforms[...] f32, temperature, top_k, top_p,
                   vocab_subset[V'] or None) -> (tokens[...] int64, probs[..., V] f32)
      the token drawn by inverse CDF with each row's uniform from the filtered distribution of softmax(logits / T)
      (top-k, top-p, renormalised: sampling_probs_reference), and that distribution (verify_sampling's q / p).
  exit_head_log_softmax(h[..., H], norm_weight[H], eps, lm_head[V, H], vocab_subset[V'] or None) -> [..., V] f32
  exit_head_top2(h[..., H], norm_weight[H], eps, lm_head[V, H], vocab_subset[V'] or None)
      -> (tokens[...] int64 (exit_head_argmax's), top2[..., 2] f32: the two largest logits)
  verify_greedy(drafts[B, d] int64, target[B, d+1] int64, positions[B] int64!) -> (accepted[B], next_token[B])
  verify_sampling(drafts[B, d], q[B, d, V] f32, p[B, d+1, V] f32, uniforms[B, d+1] f32, positions[B]!)
      -> (accepted[B], next_token[B]); both add accepted + 1 to positions in place.
  layer_range_forward(h[B, T, H], weights (9 per layer), k_caches!, v_caches! (one [B, nKV, S, D] per layer),
                      start[B], positions[B, T], cos, sin, num_heads, num_kv_heads, eps, scale) -> h after the range
      decoder layers in one call; bitwise the native ops one by one (layer_range_forward_composed).
All math is done in float32 and rounded once to the input dtype at the end, so a row's result does not depend
on how many other rows were computed with it (batch invariance, needed for lossless self-speculation).
"""
from __future__ import annotations

import math

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


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in float32, rounded once to x's dtype. (The native kernel fixes the summation order, so it
    agrees with this to float32 rounding, not bitwise; torch's own order changes with the number of rows.)"""
    return torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)


def exit_head_argmax_reference(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                               vocab_subset: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over the vocabulary (or over vocab_subset, returning the chosen token id) of the shared exit head's
    logits linear(rms_norm(h)), computed with the given linear (default: the reference)."""
    return exit_head_argmax_composed(h, norm_weight, eps, lm_head, vocab_subset, rms_norm_reference,
                                     linear_reference)


def exit_head_argmax_composed(h, norm_weight, eps, lm_head, vocab_subset, rms_norm_fn, linear_fn) -> torch.Tensor:
    """exit_head_argmax from separate norm / linear functions (the native op equals this with the native ones)."""
    w = lm_head if vocab_subset is None else lm_head[vocab_subset]
    logits = linear_fn(rms_norm_fn(h, norm_weight, eps), w.contiguous())
    idx = logits.argmax(-1)
    return idx if vocab_subset is None else vocab_subset[idx]


SAMPLE_CHUNK = 256  # csrc/common/sampling.h kSampleChunk


def sample_inverse_cdf_reference(w: torch.Tensor, u: float) -> int:
    """One token from weights w[V] >= 0 (float32) with uniform u in [0, 1), exactly as the kernels do it
    (csrc/common/sampling.h): float64 chunk sums of 256 weights in ascending order, target = u * total, the first
    chunk whose running end passes the target, then the first token in it whose running sum (from the chunk's
    start) passes the target (or the chunk's last positive weight if rounding leaves none). -1: no mass."""
    V = w.shape[0]
    wd = w.to(torch.float32).double()
    nchunks = (V + SAMPLE_CHUNK - 1) // SAMPLE_CHUNK
    padded = torch.zeros(nchunks * SAMPLE_CHUNK, dtype=torch.float64)
    padded[:V] = wd
    S = padded.view(nchunks, SAMPLE_CHUNK).cumsum(1)[:, -1]  # torch's CPU cumsum adds in order
    ends = S.cumsum(0)  # P_c + S_c
    total = float(ends[-1])
    target = float(torch.tensor(u, dtype=torch.float32)) * total
    hit = (ends > target).nonzero()
    if hit.numel() == 0:
        return -1
    c = int(hit[0])
    prefix = float(ends[c - 1]) if c > 0 else 0.0
    chunk = wd[c * SAMPLE_CHUNK:(c + 1) * SAMPLE_CHUNK]
    run = torch.cat((torch.tensor([prefix], dtype=torch.float64), chunk)).cumsum(0)[1:]
    inside = (run > target).nonzero()
    if inside.numel():
        return c * SAMPLE_CHUNK + int(inside[0])
    positive = (chunk > 0).nonzero()
    return c * SAMPLE_CHUNK + int(positive[-1]) if positive.numel() else -1


def chunked_sum_reference(w: torch.Tensor) -> torch.Tensor:
    """w[..., V] float64 -> [...] float64, summed as the kernels do (csrc/common/sampling.h): chunks of 256 in
    ascending order, then the chunk sums in order (torch's CPU cumsum adds in order; padding zeros add nothing)."""
    V = w.shape[-1]
    n = (V + SAMPLE_CHUNK - 1) // SAMPLE_CHUNK
    padded = torch.nn.functional.pad(w.double().cpu(), (0, n * SAMPLE_CHUNK - V))
    S = padded.view(*w.shape[:-1], n, SAMPLE_CHUNK).cumsum(-1)[..., -1]
    return S.cumsum(-1)[..., -1].to(w.device)


PROB_FIXED_ONE = 2 ** 60  # csrc/common/head_filter.h kProbFixedOne: top-p's exact integer unit of probability


def sampling_probs_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution exit_head_sample draws from, with the kernels' arithmetic (csrc/common/head_filter.h):
    generation/sampling.py's ``filtered_probs`` (softmax(logits / T), top-k with ties at the k-th value kept, then
    the smallest prefix in (p descending, id ascending) order whose mass reaches top_p (the first token always),
    renormalised), computed so the kernels can match it bit for bit: float32 x = logits / T, exp in float64 rounded
    once to float32, normalising sums in float64 chunks, top-p masses as exact integers floor(p * 2^60).
    logits [..., V] -> probs [..., V] float32."""
    x = logits.float() / torch.full_like(logits, temperature, dtype=torch.float32)
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    m = x.max(-1, keepdim=True).values
    e = torch.exp(x.double() - m.double()).float()
    p = (e.double() / chunked_sum_reference(e.double()).unsqueeze(-1)).float()
    if top_p < 1.0:
        limit = max(1, int(top_p * PROB_FIXED_ONE))
        fixed = (p.double() * PROB_FIXED_ONE).to(torch.int64)  # exact: a power-of-two scaling of a float32 <= 1
        _, order = torch.sort(p, dim=-1, descending=True, stable=True)  # ties: lower id first
        fs = fixed.gather(-1, order)
        keep_sorted = (torch.cumsum(fs, -1) - fs) < limit
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        p = p.masked_fill(~keep, 0.0)
        p = (p.double() / chunked_sum_reference(p.double()).unsqueeze(-1)).float()
    return p


def exit_head_sample_composed(h, norm_weight, eps, lm_head, uniforms, temperature, top_k, top_p, vocab_subset,
                              rms_norm_fn, linear_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """exit_head_sample from separate norm / linear functions: with the native ones, the logits are the native op's
    bit for bit, and so (but for a float64 exp differing in its last bit, which then rounds to the same float32
    all but ~2^-29 of the time) are the probabilities and tokens."""
    w = lm_head if vocab_subset is None else lm_head[vocab_subset]
    logits = linear_fn(rms_norm_fn(h, norm_weight, eps), w.contiguous())
    probs = sampling_probs_reference(logits, temperature, top_k, top_p)
    V = probs.shape[-1]
    flat, u = probs.reshape(-1, V).cpu(), uniforms.reshape(-1).cpu()
    cols = [sample_inverse_cdf_reference(flat[i], float(u[i])) for i in range(flat.shape[0])]
    tokens = torch.tensor([c if c >= 0 else V - 1 for c in cols], dtype=torch.int64, device=h.device)
    if vocab_subset is not None:
        tokens = vocab_subset[tokens]
    return tokens.view(h.shape[:-1]), probs


def exit_head_sample_reference(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                               uniforms: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                               vocab_subset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens[...], probs[..., V]): each row's token drawn with its uniform by inverse CDF
    (:func:`sample_inverse_cdf_reference`) from :func:`sampling_probs_reference` of the exit head's logits
    (over lm_head[vocab_subset] when given, returning those ids)."""
    return exit_head_sample_composed(h, norm_weight, eps, lm_head, uniforms, temperature, top_k, top_p, vocab_subset,
                                     rms_norm_reference, linear_reference)


def log_softmax_reference(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim with the kernels' arithmetic: float64, max subtracted, exp sums in chunks
    (:func:`chunked_sum_reference`), rounded once to float32."""
    x = logits.double()
    m = x.max(-1, keepdim=True).values
    lse = m + torch.log(chunked_sum_reference(torch.exp(x - m))).unsqueeze(-1)
    return (x - lse).float()


def exit_head_log_softmax_composed(h, norm_weight, eps, lm_head, vocab_subset, rms_norm_fn,
                                   linear_fn) -> torch.Tensor:
    w = lm_head if vocab_subset is None else lm_head[vocab_subset]
    return log_softmax_reference(linear_fn(rms_norm_fn(h, norm_weight, eps), w.contiguous()))


def exit_head_log_softmax_reference(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                                    vocab_subset: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax of the exit head's logits linear(rms_norm(h)) (over lm_head[vocab_subset] when given),
    float32 [..., V]."""
    return exit_head_log_softmax_composed(h, norm_weight, eps, lm_head, vocab_subset, rms_norm_reference,
                                          linear_reference)


def exit_head_top2_composed(h, norm_weight, eps, lm_head, vocab_subset, rms_norm_fn,
                            linear_fn) -> tuple[torch.Tensor, torch.Tensor]:
    w = lm_head if vocab_subset is None else lm_head[vocab_subset]
    logits = linear_fn(rms_norm_fn(h, norm_weight, eps), w.contiguous()).float()
    top2 = logits.topk(2, dim=-1).values
    col = logits.argmax(-1)  # (argmax: ties -> the lowest index; topk's order among ties is unspecified)
    return (col if vocab_subset is None else vocab_subset[col]), top2


def exit_head_top2_reference(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                             vocab_subset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the exit head's argmax [...] int64, its two largest logits [..., 2] float32, the larger first): the
    features dynamic drafting's stop model reads (their difference is a log-probability margin: no softmax)."""
    return exit_head_top2_composed(h, norm_weight, eps, lm_head, vocab_subset, rms_norm_reference, linear_reference)


def verify_greedy_reference(drafts: torch.Tensor, target: torch.Tensor,
                            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """accepted[b] = length of the prefix where drafts[b] == target[b, :d]; next_token[b] = target[b, accepted[b]];
    positions[b] += accepted[b] + 1 (in place)."""
    d = drafts.shape[1]
    agree = (drafts == target[:, :d]).to(torch.int64)
    accepted = agree.cumprod(dim=1).sum(dim=1) if d else torch.zeros(drafts.shape[0], dtype=torch.int64,
                                                                   device=drafts.device)
    next_token = target.gather(1, accepted.view(-1, 1)).view(-1)
    positions += accepted + 1
    return accepted, next_token


def verify_sampling_reference(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, uniforms: torch.Tensor,
                              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (Leviathan et al.), deterministic given the uniforms: draft j is accepted while
    uniforms[b, j] * q[b, j, y] < p[b, j, y] (float32); the first rejected j emits a token drawn from
    norm(max(p[b, j] - q[b, j], 0)) (p[b, j] if that has no mass), and when all d are accepted the bonus is drawn
    from p[b, d]; both use uniforms[b, d] by inverse CDF (:func:`sample_inverse_cdf_reference`)."""
    B, d = drafts.shape
    V = p.shape[2]
    accepted = torch.zeros(B, dtype=torch.int64)
    next_token = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        j = 0
        while j < d:
            y = int(drafts[b, j])
            if not bool(uniforms[b, j] * q[b, j, y] < p[b, j, y]):
                break
            j += 1
        u = float(uniforms[b, d])
        tok = -1
        if j < d:
            tok = sample_inverse_cdf_reference((p[b, j] - q[b, j]).clamp_min(0), u)
        if tok < 0:
            tok = sample_inverse_cdf_reference(p[b, j], u)
        accepted[b] = j
        next_token[b] = tok if tok >= 0 else V - 1
    positions += (accepted + 1).to(positions.device)
    return accepted.to(drafts.device), next_token.to(drafts.device)


LAYER_WEIGHTS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm", "gate_proj",
                 "up_proj", "down_proj")


def layer_range_forward_composed(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads: int,
                                 num_kv_heads: int, eps: float, scale: float, *, rms_norm_fn, linear_fn, rope_fn,
                                 kv_cache_write_fn, cache_attention_fn) -> torch.Tensor:
    """The decoder layers of model/llama.py, op by op, with the given ops (reference or native ones)."""
    B, T, H = h.shape
    for layer in range(len(weights) // len(LAYER_WEIGHTS)):
        in_norm, wq, wk, wv, wo, post_norm, wg, wu, wd = weights[layer * 9:(layer + 1) * 9]
        D = wq.shape[0] // num_heads
        x = rms_norm_fn(h, in_norm, eps)
        q = linear_fn(x, wq).view(B, T, num_heads, D)
        k = linear_fn(x, wk).view(B, T, num_kv_heads, D)
        v = linear_fn(x, wv).view(B, T, num_kv_heads, D)
        q = rope_fn(q, positions, cos, sin)
        k = rope_fn(k, positions, cos, sin)
        kv_cache_write_fn(k_caches[layer], v_caches[layer], k, v, start)
        a = cache_attention_fn(q, k_caches[layer], v_caches[layer], start, scale)
        h = h + linear_fn(a.reshape(B, T, num_heads * D), wo)
        x = rms_norm_fn(h, post_norm, eps)
        gate = torch.nn.functional.silu(linear_fn(x, wg))
        h = h + linear_fn(gate * linear_fn(x, wu), wd)
    return h


def layer_range_forward_reference(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads: int,
                                  num_kv_heads: int, eps: float, scale: float) -> torch.Tensor:
    """Plain-PyTorch decoder layers (writes the caches in place, like the native op)."""
    return layer_range_forward_composed(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                        num_kv_heads, eps, scale, rms_norm_fn=rms_norm_reference,
                                        linear_fn=linear_reference, rope_fn=rope_reference,
                                        kv_cache_write_fn=kv_cache_write_reference,
                                        cache_attention_fn=cache_attention_reference)


STOP_MODEL_SIZE = 6     # csrc/draft.cpp kStopModelSize: bias, margin, match >= 1, 2, 3, 4
LONGEST_MATCH = 4       # csrc/draft.cpp kLongestMatch


def match_level(seq, nxt: int) -> int:
    """The longest k <= LONGEST_MATCH such that seq's last k tokens followed by nxt occur in seq (csrc/draft.cpp)."""
    n, best = len(seq), 0
    for j in range(1, n):
        if seq[j] != nxt:
            continue
        k = 0
        while k < LONGEST_MATCH and j - 1 - k >= 0 and seq[j - 1 - k] == seq[n - 1 - k]:
            k += 1
        best = max(best, k)
        if best == LONGEST_MATCH:
            break
    return best


def acceptance_log_chance(stop_model, margin: float, seq, draft: int) -> float:
    """log sigmoid(w . features) of one draft (csrc/draft.cpp): stop_model [6] (a tensor or a sequence), margin = the
    exit head's largest logit minus the next, seq the row's context before the draft."""
    w = [float(x) for x in stop_model]
    m = match_level(seq, draft)
    z = w[0] + w[1] * margin
    for k in range(1, LONGEST_MATCH + 1):  # (the native op's order of additions: the same bits)
        z += w[1 + k] * float(m >= k)
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def mean_chance_below(log_chances, log_stop: float) -> bool:
    """Dynamic drafting's batch rule (csrc/draft.cpp's host loop, the same arithmetic): whether the rows' mean
    chance, from each row's log chance (max-shifted log-sum-exp minus log B; one row: exactly its own), is below
    exp(log_stop)."""
    top = max(log_chances)
    return top + math.log(sum(math.exp(c - top) for c in log_chances)) - math.log(len(log_chances)) < log_stop


def draft_greedy_composed(tokens, embed, weights, k_caches, v_caches, start, cos, sin, num_heads: int,
                          num_kv_heads: int, eps: float, scale: float, norm_weight, norm_eps: float, lm_head,
                          vocab_subset, num_drafts: int, stop_below: float = 0.0, stop_model=None, context=None,
                          context_len=None, *, layer_range_fn, head_argmax_fn, head_log_softmax_fn=None,
                          head_top2_fn=None):
    """The greedy draft stage from separate layer-range / exit-head functions: d + 1 steps of embedding, layers
    [0, E) at position start + i, and (but after the last) the exit head's argmax as the next token.
    -> drafts [B, d] int64, hidden [B, d+1, H] (layer E's output per step).

    stop_below > 0 (dynamic drafting, csrc/draft.cpp's host loop): the stage drafts while the rows' mean chance that
    their drafts so far are all accepted stays >= stop_below, and ends (d' < d drafts, d' + 1 hidden states) at the
    first step where it falls below, without that step's drafts. A row's chance is the least of its drafts'
    probabilities (head_log_softmax_fn's most probable column), or, with stop_model [6] float64 and context [B, C] /
    context_len [B] int64, generation/draft_stop.py's (head_top2_fn's margin and the context's n-gram match)
    multiplied over its drafts."""
    B = tokens.shape[0]
    token, drafts, hidden = tokens, [], []
    modelled = stop_model is not None
    seqs = [context[b, :int(context_len[b])].tolist() for b in range(B)] if modelled else None
    chance = [0.0] * B  # log of each row's chance (csrc/draft.cpp's host loop, step for step)
    log_stop = math.log(stop_below) if stop_below > 0 else 0.0
    for i in range(num_drafts + 1):
        pos = start + i
        h = layer_range_fn(torch.nn.functional.embedding(token.view(B, 1), embed), weights, k_caches, v_caches, pos,
                           pos.view(B, 1), cos, sin, num_heads, num_kv_heads, eps, scale)
        hidden.append(h)
        if i == num_drafts:
            break
        if stop_below <= 0:
            token = head_argmax_fn(h.view(B, -1), norm_weight, norm_eps, lm_head, vocab_subset)
            drafts.append(token)
            continue
        if modelled:
            token, step = head_top2_fn(h.view(B, -1), norm_weight, norm_eps, lm_head, vocab_subset)
        else:
            step, col = head_log_softmax_fn(h.view(B, -1), norm_weight, norm_eps, lm_head, vocab_subset).max(-1)
            token = col if vocab_subset is None else vocab_subset[col]
        for b, (t, v) in enumerate(zip(token.tolist(), step.float().tolist())):
            if modelled:  # the product over the row's drafts; v = the two largest logits
                chance[b] += acceptance_log_chance(stop_model, v[0] - v[1], seqs[b], t)
                seqs[b].append(t)
            else:  # the least probable of the row's drafts
                chance[b] = v if i == 0 else min(chance[b], v)
        if mean_chance_below(chance, log_stop):
            break
        drafts.append(token)
    drafts = torch.stack(drafts, dim=1) if drafts else tokens.new_empty(B, 0)
    return drafts, torch.cat(hidden, dim=1)


def draft_greedy_reference(tokens, embed, weights, k_caches, v_caches, start, cos, sin, num_heads: int,
                           num_kv_heads: int, eps: float, scale: float, norm_weight, norm_eps: float, lm_head,
                           vocab_subset, num_drafts: int, stop_below: float = 0.0, stop_model=None, context=None,
                           context_len=None):
    """Plain-PyTorch greedy draft stage (writes the caches of layers < E in place, like the native op)."""
    return draft_greedy_composed(tokens, embed, weights, k_caches, v_caches, start, cos, sin, num_heads,
                                 num_kv_heads, eps, scale, norm_weight, norm_eps, lm_head, vocab_subset, num_drafts,
                                 stop_below, stop_model, context, context_len,
                                 layer_range_fn=layer_range_forward_reference,
                                 head_argmax_fn=exit_head_argmax_reference,
                                 head_log_softmax_fn=exit_head_log_softmax_reference,
                                 head_top2_fn=exit_head_top2_reference)


# --------------------------------------------------------------------------------------------------------------
# Native ops: torch.ops.layerskip.* (csrc/ops.cpp has the schemas; csrc/cpu, csrc/cuda the kernels)
#
# Supported: float32, bfloat16, float16 (positions / start int64; cos / sin float32); every tensor contiguous and on
# one device; D <= 256 (cache_attention, rope), D even (rope), nH % nKV == 0. Bad arguments raise RuntimeError
# naming the argument. On CPU the values of start (0 <= start[b], start[b] + T <= S) and positions (< cos.size(0))
# are checked too; the CUDA kernels never read them on the host (no synchronisation): the caller validates them,
# and out-of-range rows come out NaN (rope, cache_attention) or are not written (kv_cache_write).
# --------------------------------------------------------------------------------------------------------------

from . import _native  # noqa: E402


def native_available() -> bool:
    """True when the compiled extension is loaded (``torch.ops.layerskip.*`` registered)."""
    return _native.native_available()


def _missing(name: str):
    def op(*args, **kwargs):
        _native.require_native()
        raise RuntimeError(f"torch.ops.layerskip.{name} is not registered")  # pragma: no cover

    return op


if _native.native_available():
    _rms_norm_op = torch.ops.layerskip.rms_norm.default
    _rope_op = torch.ops.layerskip.rope.default
    _kv_cache_write_op = torch.ops.layerskip.kv_cache_write.default
    _cache_attention_op = torch.ops.layerskip.cache_attention.default
    _linear_op = torch.ops.layerskip.linear.default
    _exit_head_argmax_op = torch.ops.layerskip.exit_head_argmax.default
    _exit_head_sample_op = torch.ops.layerskip.exit_head_sample.default
    _exit_head_log_softmax_op = torch.ops.layerskip.exit_head_log_softmax.default
    _exit_head_top2_op = torch.ops.layerskip.exit_head_top2.default
    _verify_greedy_op = torch.ops.layerskip.verify_greedy.default
    _verify_sampling_op = torch.ops.layerskip.verify_sampling.default
    _layer_range_forward_op = torch.ops.layerskip.layer_range_forward.default
    _draft_greedy_op = torch.ops.layerskip.draft_greedy.default
    _take_device_errors_op = torch.ops.layerskip.take_device_errors.default
else:
    _rms_norm_op = _missing("rms_norm")
    _rope_op = _missing("rope")
    _kv_cache_write_op = _missing("kv_cache_write")
    _cache_attention_op = _missing("cache_attention")
    _linear_op = _missing("linear")
    _exit_head_argmax_op = _missing("exit_head_argmax")
    _exit_head_sample_op = _missing("exit_head_sample")
    _exit_head_log_softmax_op = _missing("exit_head_log_softmax")
    _exit_head_top2_op = _missing("exit_head_top2")
    _verify_greedy_op = _missing("verify_greedy")
    _verify_sampling_op = _missing("verify_sampling")
    _layer_range_forward_op = _missing("layer_range_forward")
    _draft_greedy_op = _missing("draft_greedy")
    _take_device_errors_op = _missing("take_device_errors")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Native :func:`rms_norm_reference`: x[..., H], weight[H] (x's dtype or float32) -> [..., H]."""
    return _rms_norm_op(x, weight, eps)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Native :func:`rope_reference`: x[B, T, nH, D], positions[B, T] (or [1, T], shared) int64, cos/sin[P, D/2] f32."""
    return _rope_op(x, positions, cos, sin)


def kv_cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   start: torch.Tensor) -> None:
    """Native :func:`kv_cache_write_reference` (in place); k/v must have the caches' dtype."""
    _kv_cache_write_op(k_cache, v_cache, k, v, start)


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Native :func:`cache_attention_reference`; q and the caches share one dtype."""
    return _cache_attention_op(q, k_cache, v_cache, start, scale)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Native :func:`linear_reference`, batch invariant: x[..., K], weight[N, K] -> [..., N]."""
    return _linear_op(x, weight)


def exit_head_argmax(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                     vocab_subset: torch.Tensor | None = None) -> torch.Tensor:
    """Native greedy exit head: bitwise ``linear(rms_norm(h, norm_weight, eps), lm_head).argmax(-1)`` of the
    native ops (over ``lm_head[vocab_subset]`` when given, returning token ids), without the [..., V] logits."""
    return _exit_head_argmax_op(h, norm_weight, eps, lm_head, vocab_subset)


def exit_head_sample(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                     uniforms: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     vocab_subset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Native sampling exit head (:func:`exit_head_sample_reference`): (tokens[...] int64, probs[..., V] float32),
    the probabilities being the filtered distribution each token was drawn from with its uniform (uniforms[...] in
    [0, 1), one per row of h). Logits bitwise the native ops'; rows independent (batch invariant); deterministic
    given the uniforms. On CUDA the uniforms' and vocab_subset's values are not checked on the host."""
    return _exit_head_sample_op(h, norm_weight, eps, lm_head, uniforms, temperature, top_k, top_p, vocab_subset)


def exit_head_log_softmax(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                          vocab_subset: torch.Tensor | None = None) -> torch.Tensor:
    """Native :func:`exit_head_log_softmax_reference`: log-probabilities [..., V] float32 of the exit head."""
    return _exit_head_log_softmax_op(h, norm_weight, eps, lm_head, vocab_subset)


def exit_head_top2(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                   vocab_subset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Native :func:`exit_head_top2_reference`: the argmax and the two largest logits of the exit head (CUDA: the
    logits kernel, then ATen's argmax and topk on the device)."""
    return _exit_head_top2_op(h, norm_weight, eps, lm_head, vocab_subset)


def verify_greedy(drafts: torch.Tensor, target: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native :func:`verify_greedy_reference` (positions updated in place)."""
    return _verify_greedy_op(drafts, target, positions)


def verify_sampling(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, uniforms: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native :func:`verify_sampling_reference`, bitwise the same decisions (positions updated in place). On CUDA
    the draft ids are not range-checked on the host; an out-of-range draft is rejected and flagged
    (:func:`check_device_errors`)."""
    return _verify_sampling_op(drafts, q, p, uniforms, positions)


# Bits of the device error word (csrc/cuda/launchers.h kDeviceError*): values the CPU ops reject at once, which the
# CUDA kernels can only flag (reading them on the host would synchronise every call).
DEVICE_ERRORS = {
    1: "a vocab_subset entry outside [0, lm_head.size(0)) (its logit was NaN)",
    2: "a sampling uniform outside [0, 1)",
    4: "a draft token outside [0, V) (it was rejected)",
}


def check_device_errors(device: torch.device | str) -> None:
    """Raise ValueError if the CUDA kernels on this device met bad values since the last check (see
    DEVICE_ERRORS); clears them. Synchronises with the device; a no-op on the CPU, whose ops raise at once."""
    device = torch.device(device)
    if device.type != "cuda" or not native_available():
        return
    bits = int(_take_device_errors_op(torch.empty(0, device=device)))
    if bits:
        found = [msg for bit, msg in DEVICE_ERRORS.items() if bits & bit]
        raise ValueError("layerskip CUDA kernels met bad values: " + "; ".join(found))


def layer_range_forward(h: torch.Tensor, weights: list[torch.Tensor], k_caches: list[torch.Tensor],
                        v_caches: list[torch.Tensor], start: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float,
                        scale: float) -> torch.Tensor:
    """Native decoder layers in one call (see :func:`layer_range_forward_composed` for what each layer does):
    bitwise the native ops one by one. Writes the caches in place; returns the hidden state after the last layer."""
    return _layer_range_forward_op(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                   num_kv_heads, eps, scale)


def draft_greedy(tokens: torch.Tensor, embed: torch.Tensor, weights: list[torch.Tensor], k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], start: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, num_kv_heads: int, eps: float, scale: float, norm_weight: torch.Tensor,
                 norm_eps: float, lm_head: torch.Tensor, vocab_subset: torch.Tensor | None,
                 num_drafts: int, stop_below: float = 0.0, stop_model: torch.Tensor | None = None,
                 context: torch.Tensor | None = None,
                 context_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Native :func:`draft_greedy_reference`: the greedy draft stage in one call, bitwise
    :func:`draft_greedy_native_composed` (the native layer-range and exit-head ops step by step)."""
    return _draft_greedy_op(tokens, embed, weights, k_caches, v_caches, start, cos, sin, num_heads, num_kv_heads, eps,
                            scale, norm_weight, norm_eps, lm_head, vocab_subset, num_drafts, stop_below, stop_model,
                            context, context_len)


def draft_greedy_native_composed(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft stage step by step with the native ops (what draft_greedy must equal bitwise)."""
    return draft_greedy_composed(*args, layer_range_fn=layer_range_forward, head_argmax_fn=exit_head_argmax,
                                 head_log_softmax_fn=exit_head_log_softmax, head_top2_fn=exit_head_top2)


def layer_range_forward_native_composed(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                        num_kv_heads, eps, scale) -> torch.Tensor:
    """The same layers op by op with the native kernels (what layer_range_forward must equal bitwise)."""
    return layer_range_forward_composed(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                        num_kv_heads, eps, scale, rms_norm_fn=rms_norm, linear_fn=linear,
                                        rope_fn=rope, kv_cache_write_fn=kv_cache_write,
                                        cache_attention_fn=cache_attention)


# Fake (meta) kernels: output metadata only, for torch.compile / FakeTensor tracing. Outputs are contiguous.
if _native.native_available():

    @torch.library.register_fake("layerskip::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        torch._check(weight.dim() == 1 and x.dim() >= 1, lambda: "rms_norm: x must be [..., H] and weight [H]")
        torch._check(weight.shape[0] == x.shape[-1], lambda: "rms_norm: weight.size(0) must be x.size(-1)")
        return x.new_empty(x.shape)

    @torch.library.register_fake("layerskip::rope")
    def _rope_fake(x, positions, cos, sin):
        torch._check(x.dim() == 4, lambda: f"rope: x must be 4-D [B, T, nH, D], got {x.dim()}-D")
        torch._check(positions.dim() == 2, lambda: f"rope: positions must be 2-D [B, T], got {positions.dim()}-D")
        return x.new_empty(x.shape)

    @torch.library.register_fake("layerskip::kv_cache_write")
    def _kv_cache_write_fake(k_cache, v_cache, k, v, start):
        torch._check(k.dim() == 4, lambda: f"kv_cache_write: k must be 4-D [B, T, nKV, D], got {k.dim()}-D")
        torch._check(k_cache.dim() == 4,
                     lambda: f"kv_cache_write: k_cache must be 4-D [B, nKV, S, D], got {k_cache.dim()}-D")
        return None

    @torch.library.register_fake("layerskip::cache_attention")
    def _cache_attention_fake(q, k_cache, v_cache, start, scale):
        torch._check(q.dim() == 4, lambda: f"cache_attention: q must be 4-D [B, T, nH, D], got {q.dim()}-D")
        torch._check(k_cache.dim() == 4,
                     lambda: f"cache_attention: k_cache must be 4-D [B, nKV, S, D], got {k_cache.dim()}-D")
        return q.new_empty(q.shape)

    @torch.library.register_fake("layerskip::linear")
    def _linear_fake(x, weight):
        torch._check(x.dim() >= 1, lambda: "linear: x must have at least 1 dim [..., K], got 0-D")
        torch._check(weight.dim() == 2, lambda: f"linear: weight must be 2-D [N, K], got {weight.dim()}-D")
        torch._check(weight.shape[1] == x.shape[-1], lambda: "linear: weight.size(1) must be x.size(-1)")
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("layerskip::exit_head_argmax")
    def _exit_head_argmax_fake(h, norm_weight, eps, lm_head, vocab_subset):
        torch._check(h.dim() >= 1, lambda: "exit_head_argmax: h must have at least 1 dim [..., H], got 0-D")
        torch._check(lm_head.dim() == 2, lambda: f"exit_head_argmax: lm_head must be 2-D [V, H], got {lm_head.dim()}-D")
        return h.new_empty(h.shape[:-1], dtype=torch.int64)

    def _head_columns(op, h, lm_head, vocab_subset):
        torch._check(h.dim() >= 1, lambda: f"{op}: h must have at least 1 dim [..., H], got 0-D")
        torch._check(lm_head.dim() == 2, lambda: f"{op}: lm_head must be 2-D [V, H], got {lm_head.dim()}-D")
        return lm_head.shape[0] if vocab_subset is None else vocab_subset.shape[0]

    @torch.library.register_fake("layerskip::exit_head_sample")
    def _exit_head_sample_fake(h, norm_weight, eps, lm_head, uniforms, temperature, top_k, top_p, vocab_subset):
        V = _head_columns("exit_head_sample", h, lm_head, vocab_subset)
        torch._check(uniforms.shape == h.shape[:-1],
                     lambda: "exit_head_sample: uniforms must have the shape of h without its last dim")
        return (h.new_empty(h.shape[:-1], dtype=torch.int64),
                h.new_empty((*h.shape[:-1], V), dtype=torch.float32))

    @torch.library.register_fake("layerskip::exit_head_log_softmax")
    def _exit_head_log_softmax_fake(h, norm_weight, eps, lm_head, vocab_subset):
        V = _head_columns("exit_head_log_softmax", h, lm_head, vocab_subset)
        return h.new_empty((*h.shape[:-1], V), dtype=torch.float32)

    @torch.library.register_fake("layerskip::exit_head_top2")
    def _exit_head_top2_fake(h, norm_weight, eps, lm_head, vocab_subset):
        _head_columns("exit_head_top2", h, lm_head, vocab_subset)
        return h.new_empty(h.shape[:-1], dtype=torch.int64), h.new_empty((*h.shape[:-1], 2), dtype=torch.float32)

    @torch.library.register_fake("layerskip::verify_greedy")
    def _verify_greedy_fake(drafts, target, positions):
        torch._check(drafts.dim() == 2, lambda: f"verify_greedy: drafts must be 2-D [B, d], got {drafts.dim()}-D")
        return drafts.new_empty(drafts.shape[:1]), drafts.new_empty(drafts.shape[:1])

    @torch.library.register_fake("layerskip::verify_sampling")
    def _verify_sampling_fake(drafts, q, p, uniforms, positions):
        torch._check(drafts.dim() == 2, lambda: f"verify_sampling: drafts must be 2-D [B, d], got {drafts.dim()}-D")
        return drafts.new_empty(drafts.shape[:1]), drafts.new_empty(drafts.shape[:1])

    @torch.library.register_fake("layerskip::draft_greedy")
    def _draft_greedy_fake(tokens, embed, weights, k_caches, v_caches, start, cos, sin, num_heads, num_kv_heads, eps,
                           scale, norm_weight, norm_eps, lm_head, vocab_subset, num_drafts, stop_below=0.0,
                           stop_model=None, context=None, context_len=None):
        torch._check(tokens.dim() == 1, lambda: f"draft_greedy: tokens must be 1-D [B], got {tokens.dim()}-D")
        torch._check(embed.dim() == 2, lambda: f"draft_greedy: embed must be 2-D [V, H], got {embed.dim()}-D")
        torch._check(num_drafts >= 0, lambda: f"draft_greedy: num_drafts must be >= 0, got {num_drafts}")
        B = tokens.shape[0]
        d = num_drafts if stop_below <= 0 else torch.library.get_ctx().new_dynamic_size(max=num_drafts)
        return tokens.new_empty(B, d), embed.new_empty(B, d + 1, embed.shape[1])

    @torch.library.register_fake("layerskip::layer_range_forward")
    def _layer_range_forward_fake(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                  num_kv_heads, eps, scale):
        torch._check(h.dim() == 3, lambda: f"layer_range_forward: h must be 3-D [B, T, H], got {h.dim()}-D")
        torch._check(len(weights) % 9 == 0, lambda: "layer_range_forward: weights must hold 9 tensors per layer")
        return h.new_empty(h.shape)
