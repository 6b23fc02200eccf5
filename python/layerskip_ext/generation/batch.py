"""Per-sequence decoding state shared by all strategies.

Cache row i holds sequence ``active[i]``; the live rows are always the first ``len(active)``, so every forward call
covers one contiguous slice of the cache. When sequences finish, the remaining rows are moved up (one copy per
finishing event), so finished sequences cost no more work.

Per row, two int64 tensors on the model's device live here for the whole generation (instead of being rebuilt
from Python lists every step): ``pos`` (the position of the newest token, where the next forward call starts)
and ``last`` (the newest token, emitted but not yet in the cache). The strategies advance them in place (the
verification ops add accepted + 1 to the positions themselves). The Python-side outputs stay the record of what
was emitted; ``max_position`` reads them, so no step reads a device tensor back just to check bounds.
"""
from __future__ import annotations

import torch

from .core import StopRules, to_tensor


class DecodeBatch:
    """rows / positions / last_tokens are attributes for the live rows (views of pos and last, writes go
    through), and top the largest newest-token position among them: the decode loops read them every step, so
    they are kept current (by emit and drop_finished) rather than recomputed."""

    def __init__(self, decoder, rules: StopRules, capacity: int):
        self.decoder = decoder
        self.rules = rules
        self.outputs = rules.outputs
        self.cache = decoder.new_cache(len(self.outputs), capacity)
        self.capacity = capacity
        self.active = list(range(len(self.outputs)))
        dev = decoder.device
        self.pos = torch.tensor([len(o.prompt_tokens) - 1 for o in self.outputs], dtype=torch.int64, device=dev)
        self.last = torch.tensor([o.prompt_tokens[-1] for o in self.outputs], dtype=torch.int64, device=dev)
        self._context: torch.Tensor | None = None  # context()'s buffer, made on its first call
        self._context_len: list[int] = []
        self._live()

    def _live(self) -> None:
        n = len(self.active)
        self.rows = slice(0, n)
        self.positions = self.pos[:n]    # [n] each live sequence's newest position: where the next call starts
        self.last_tokens = self.last[:n]  # [n] its newest token (emitted, not yet in the cache)
        self.top = max([self._newest(b) for b in self.active], default=-1)

    def _newest(self, b: int) -> int:
        """The position of sequence b's newest token, from what it emitted (no device read)."""
        return len(self.outputs[b].prompt_tokens) + len(self.outputs[b].tokens) - 1

    def prefill(self, exit_layer: int | None = None) -> torch.Tensor:
        """Each prompt in one pass into its own cache row. -> last position's hidden state [B, H] (only that
        position needs the head)."""
        last = []
        for b in self.active:
            tokens = to_tensor(self.outputs[b].prompt_tokens).view(1, -1)
            h = self.decoder.forward_hidden(tokens, None, self.cache, exit_layer, slice(b, b + 1))
            last.append(h[0, -1])
        return torch.stack(last)

    def context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each live sequence's prompt and emitted tokens (ending with its newest) -> (tokens [n, capacity] int64,
        -1 past each length; lengths [n] int64), on the CPU: what a draft stop model reads (generation/draft_stop.py).
        One buffer for the whole generation: a call writes only the tokens emitted since the last one (a round's
        worth), not the whole context again (the draft op still reads it: O(C) per draft step, in C++)."""
        if self._context is None:
            self._context = torch.full((len(self.outputs), self.capacity), -1, dtype=torch.int64)
            self._context_len = [0] * len(self.outputs)
        for b in self.active:
            o, have = self.outputs[b], self._context_len[b]
            total = len(o.prompt_tokens) + len(o.tokens)
            if have < total:
                new = o.prompt_tokens[have:] + o.tokens[max(0, have - len(o.prompt_tokens)):]
                self._context[b, have:total] = torch.tensor(new, dtype=torch.int64)
                self._context_len[b] = total
        n = len(self.active)
        tokens = self._context[:n] if self.active == list(range(n)) else self._context[self.active]
        return tokens, torch.tensor([self._context_len[b] for b in self.active], dtype=torch.int64)

    def room(self) -> int:
        """How many positions past the newest token every live sequence still has in the cache."""
        return self.capacity - 1 - self.top

    def emit(self, row: int, tokens) -> None:
        """Emit tokens for the sequence in cache row `row`, stopping where it finishes."""
        b = self.active[row]
        for t in tokens:
            if not self.rules.emit(b, t):
                break
        self.top = max(self.top, len(self.outputs[b].prompt_tokens) + len(self.outputs[b].tokens) - 1)

    def emit_first(self, first: torch.Tensor) -> None:
        """The prompt pass's token of every sequence: emitted, and the newest token at position len(prompt)."""
        for row, t in enumerate(first.tolist()):
            self.emit(row, [t])
        self.last_tokens.copy_(first.to(self.last.device))
        self.positions += 1
        self.drop_finished()

    def drop_finished(self) -> None:
        keep = [i for i, b in enumerate(self.active) if self.outputs[b].finish_reason is None]
        if len(keep) == len(self.active):
            return
        if keep and keep != list(range(len(keep))):
            index = torch.tensor(keep, device=self.cache.k[0].device)
            for buffers in (self.cache.k, self.cache.v):
                for t in buffers:
                    t[:len(keep)] = t.index_select(0, index)
            for t in (self.pos, self.last):
                t[:len(keep)] = t.index_select(0, index.to(t.device))
        self.active = [self.active[i] for i in keep]
        self._live()
