"""Self-speculative decoding (LayerSkip section 4.3): draft with layers < E, verify with layers >= E.

One round, for every live sequence at once (each at its own position p, the newest token x0 not yet cached):
  1. draft: x0, y1, ..., yd each go through layers < E one at a time (T = 1), writing those layers' KV at
     p .. p+d in place; the shared exit head on layer E's output proposes y1 .. yd. The exit-layer hidden states
     h_E(x0), h_E(y1) .. h_E(yd) are kept (yd needs no head: it is only verified). Greedy drafts are one decoder
     call (decoder.draft_greedy: the native op, or ops.draft_greedy_composed's steps); sampling runs them here.
  2. verify: ONE pass of layers >= E over those d+1 hidden states (T = d+1), writing the deep layers' KV at
     p .. p+d. Layers < E are never recomputed.
  3. accept the longest prefix of drafts the full model agrees with, then one token of the full model's own
     (the correction, or a bonus when all d were accepted).
  4. roll back by position: the next round starts at the newest emitted token; stale cache slots past it are
     never read and get overwritten.
Greedy output equals autoregressive greedy output exactly when every op is batch-invariant (a row's result
does not depend on T), which the native kernels guarantee. Sampling follows Leviathan et al.: accept y with
probability min(1, p(y)/q(y)), else resample from norm(max(p - q, 0)); emitted tokens follow the full model.
Acceptance is the decoder's verify_greedy / verify_sampling (native kernels, or their PyTorch references).

Dynamic drafting: a round's draft stops where the exit head's top probability falls below draft_stop
(greedy: csrc/draft.cpp; sampling: the same rule on the draft distributions, _draft_sampled), or, greedy with a
fitted stop model, where the chance that its whole run is accepted does (generation/draft_stop.py), and a round's
length can adapt to the last round's acceptance (draft_growth: generation/draft_length.py, greedy and sampling).
All are lossless: they change only how much is drafted.

Draft vocabulary (greedy only): the draft's exit head may score only a subset of the vocabulary (``draft_vocab``,
e.g. a corpus's 8k most frequent tokens: model/draft_vocab.py), which cuts a shallow draft's head cost. Output is
unchanged: verification always scores the full vocabulary, so a token outside the subset is emitted as the full
model's correction. Sampling drafts ignore it for now: a draft distribution q restricted to the subset stays
lossless under the acceptance rule, but the native sampling path takes full-vocabulary q, so it is not wired up.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from ..ops import mean_chance_below
from .batch import DecodeBatch
from .core import GenerationResult, Timer
from .cuda_graph import StepGraphs
from .draft_length import DraftLength
from .sampling import SamplingParams, choose_tokens, head_probs, sample_with_probs


def _draft_sampled(decoder, batch: DecodeBatch, st, exit_layer: int, d: int, sampling: SamplingParams, generator,
                   draft_stop: float = 0.0):
    """The sampling draft: -> drafts [n, d'], their draft distributions q [n, d', V], layer exit_layer's outputs
    [n, d' + 1, H]; d' = d, or fewer with draft_stop > 0: the stage runs while the rows' mean chance stays
    >= draft_stop, a row's chance being the least top probability q.max() of its drafts (the greedy threshold
    rule, csrc/draft.cpp, on the draft distributions). (The greedy draft is one decoder call:
    decoder.draft_greedy.) st: the round's state.

    Stopping stays exact: whether to keep the draft of position i + 1 depends only on q_1 .. q_{i+1}, i.e. on the
    draft's prefix, never on the token drawn there, the full model or the acceptance draws; given the emitted
    prefix, the next token then comes either from accept / resample against q (distributed as p) or, the round
    stopped, from p itself. (A rule that looked at the drawn token would bias the output.)"""
    rows, start, top = batch.rows, batch.positions, batch.top
    token = batch.last_tokens.view(-1, 1)
    hidden, drafts, q = [], [], []
    n = len(batch.active)
    chance = None  # each row's log of its least top draft probability this round
    log_stop = math.log(draft_stop) if draft_stop else 0.0
    for i in range(d + 1):
        step = st if d == 0 else decoder.state(start + i, 1, batch.cache, rows, max_start=top + i)
        h = decoder.layers(decoder.embed(token), 0, exit_layer, step)
        hidden.append(h)
        if i == d:
            break
        token, probs = sample_with_probs(decoder, h[:, -1], sampling, generator)
        if draft_stop:  # the greedy rule (ops.mean_chance_below); one host read of n values per step
            peak = [math.log(v) if v > 0 else -math.inf for v in probs.max(dim=-1).values.tolist()]
            chance = peak if chance is None else [min(c, t) for c, t in zip(chance, peak)]
            if mean_chance_below(chance, log_stop):  # the step's draft is dropped: verify the i made so far
                break
        token = token.view(-1, 1)
        q.append(probs)
        drafts.append(token)
    drafts = torch.cat(drafts, dim=1) if drafts else torch.empty(n, 0, dtype=torch.int64, device=decoder.device)
    q = torch.stack(q, dim=1) if q else hidden[0].new_empty(n, 0, decoder.config.vocab_size, dtype=torch.float32)
    return drafts, q, torch.cat(hidden, dim=1)


def _round(decoder, batch: DecodeBatch, exit_layer: int, d: int, sampling: SamplingParams, generator,
           draft_vocab=None, draft_stop: float = 0.0, stop_model=None) -> torch.Tensor:
    """One draft-verify round, all on the model's device: -> [n, d + 2] int64 (see RoundRow: one tensor, so the
    host reads a round in one transfer). Advances the batch's positions (by accepted + 1, inside the verification
    op) and newest tokens in place, so the next round reads them from the same tensors (what lets a CUDA graph
    replay rounds: generation/cuda_graph.py)."""
    # One state for the round's d + 1 positions: the draft and the verification both run on it.
    st = decoder.state(batch.positions, d + 1, batch.cache, batch.rows, max_start=batch.top)
    if sampling.greedy:
        context = batch.context() if stop_model is not None else None
        drafts, hidden = decoder.draft_greedy(batch.last_tokens, st, exit_layer, d, draft_vocab, draft_stop,
                                              stop_model, context)
    else:
        drafts, q, hidden = _draft_sampled(decoder, batch, st, exit_layer, d, sampling, generator, draft_stop)
    if drafts.shape[1] < d:  # dynamic drafting stopped early: verify the positions drafted
        st = dataclasses.replace(st, positions=st.positions[:, :drafts.shape[1] + 1].contiguous())
    deep = decoder.layers(hidden, exit_layer, decoder.num_layers, st)
    n = drafts.shape[0]
    if sampling.greedy:
        target = decoder.head_argmax(deep)  # [n, d+1]: the full model's choice at each verified position
        accepted, next_token = decoder.verify_greedy(drafts, target, batch.positions)
    else:
        p = head_probs(decoder, deep, sampling)  # [n, d+1, V]
        uniforms = torch.rand(n, drafts.shape[1] + 1, generator=generator, device=p.device)
        accepted, next_token = decoder.verify_sampling(drafts, q, p, uniforms, batch.positions)
    batch.last_tokens.copy_(next_token)
    return torch.cat([accepted.view(n, 1), next_token.view(n, 1), drafts], dim=1)


class RoundRow(NamedTuple):
    """One sequence's round, read from _round's [n, d + 2] result; it emits drafts[:accepted] + [next_token]."""
    accepted: int       # how many drafts the full model agreed with
    next_token: int     # its own token after them: the correction, or the bonus when all d were accepted
    drafts: list[int]   # the drafted tokens (dynamic drafting: the d' <= d the round made)


@torch.no_grad()
def generate_self_speculative(decoder, batch: DecodeBatch, sampling: SamplingParams, result: GenerationResult,
                              exit_layer: int, num_speculations: int, draft_vocab=None,
                              cuda_graph: bool = False, draft_stop: float = 0.0,
                              draft_growth: int = 0, stop_model=None) -> GenerationResult:
    """draft_vocab: int64 ids on the model's device the greedy draft head scores (None: the whole vocabulary);
    ignored when sampling. cuda_graph (CUDA): replay full-length rounds as CUDA graphs. Dynamic drafting:
    draft_stop: a round drafts while the exit head's top probability stays >= draft_stop (0: off; a batch: while
    its rows' mean chance does, csrc/draft.cpp; sampling: the draft distributions' top probability);
    draft_growth: a round's length adapts to the last round's acceptance, up to num_speculations
    (generation/draft_length.py; 0: every round drafts num_speculations). stop_model (with draft_stop > 0): the
    draft stops where its fitted chance of acceptance falls below draft_stop (generation/draft_stop.py)."""
    generator = sampling.generator(decoder.device)
    timer = Timer()
    batch.emit_first(choose_tokens(decoder, batch.prefill(), sampling, generator))
    result.prefill_s = timer.lap()
    if not sampling.greedy:
        draft_vocab = None  # see the module docstring
    graphs = None
    if cuda_graph:
        graphs = StepGraphs(lambda d: _round(decoder, batch, exit_layer, d, sampling, generator, draft_vocab),
                             decoder.device, generator)

    drafted = accepted_total = rounds = 0
    longest = batch.rules.max_new_tokens
    length = DraftLength(num_speculations, draft_growth)
    current = length.first()
    while batch.active:
        # Never draft past the cache or past what any live sequence may still emit.
        remaining = longest - min([len(batch.outputs[b].tokens) for b in batch.active])
        d = max(0, min(current, batch.capacity - 1 - batch.top, remaining - 1))
        if graphs is not None and d == num_speculations:  # (a graph needs fixed shapes: not dynamic drafting)
            out = graphs.run((d, len(batch.active)), d)
        else:
            out = _round(decoder, batch, exit_layer, d, sampling, generator, draft_vocab, draft_stop, stop_model)
        all_accepted, least = True, d
        for row, (accepted, next_token, *drafts) in enumerate(out.tolist()):  # the round's only host read
            r = RoundRow(accepted, next_token, drafts)
            batch.emit(row, r.drafts[:r.accepted] + [r.next_token])
            proposed = len(r.drafts)
            accepted_total += r.accepted
            drafted += proposed
            all_accepted, least = all_accepted and r.accepted == proposed, min(least, r.accepted)
        current = length.after(current, all_accepted, least)
        rounds += 1
        batch.drop_finished()
    result.decode_s = timer.lap()
    result.stats.update(exit_layer=exit_layer, num_speculations=num_speculations, draft_tokens=drafted,
                        accepted_tokens=accepted_total, rounds=rounds,
                        acceptance_rate=round(accepted_total / drafted, 4) if drafted else 0.0)
    return result
