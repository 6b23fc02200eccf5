"""Which drafting policy could pay: static (E, d), adaptive length, and choosing the exit round by round, replayed.

    python benchmarks/exit_policy_sim.py --model nano-layerskip
    python benchmarks/exit_policy_sim.py --model nano-layerskip --exits 3,4,5,6 --depths 1-16

Greedy self-speculation along the model's own greedy outputs is fully determined by which exits agree with the
last layer at each output token (analysis/cost_measure.measure_agreement: one teacher-forced pass per prompt), so
any policy choosing (E, d) from earlier rounds can be replayed exactly; its time is the sum of its rounds' times,
each the measured mean round time of static (E, d) decoding on the same prompts (a table timed here: it includes
everything a real round costs, Python too, which stage microbenchmarks miss). An *oracle* that picks each
round's (E, d) knowing the agreements (dynamic programming) bounds what any per-round choice can gain.
Predictions from timed parts, not end-to-end timings: measure a policy that looks worth it with
benchmarks/confirm_speedup.py. The prompts are `layerskip reproduce`'s (12 held-out functions + 12 HumanEval)
unless --prompts says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import torch

from layerskip_ext.analysis.cost_measure import measure_agreement
from layerskip_ext.analysis.decode_runs import run_prompts
from layerskip_ext.generation.draft_length import DraftLength
from layerskip_ext.model import load_model
from layerskip_ext.prompts import humaneval_path, read_prompts
from layerskip_ext.reproduce.data import evaluation_prompts, held_out_dirs, stdlib_dir

# A policy: (state, last round's (E, d, accepted)) -> (next state, E, d). state is the policy's own.
Policy = Callable[[object, tuple], tuple]
# Seconds of one round drafting d tokens with exit E (d = 0: an autoregressive step).
RoundTime = Callable[[int, int], float]


def round_times(model, prompts, max_new_tokens: int, stops, exits, depths, passes: int) -> dict:
    """{(E, d): mean seconds per round of static (E, d) decoding of the prompts, (0, 0): per autoregressive
    step}, the mean over passes (the cells in a rotating order, so a drifting machine hits them alike)."""
    cells = [(0, 0)] + [(E, d) for E in exits for d in depths]
    total = {c: [0.0, 0] for c in cells}
    for i in range(passes):
        for j in range(len(cells)):
            E, d = cells[(j + i * 7) % len(cells)]
            st = run_prompts(model, prompts, max_new_tokens, stops, *((E, d) if E else ()))
            total[(E, d)][0] += st.decode_s
            total[(E, d)][1] += st.rounds if E else st.decode_tokens
    return {c: s / n for c, (s, n) in total.items()}


def smoothed(table: dict, num_layers: int) -> tuple[dict, float]:
    """The table fitted by least squares to a round's structure, t = b0 + b1 (d+1) + b2 E (d+1) + b3 (L-E)
    + b4 (L-E)(d+1) (the draft: d+1 steps through E layers; the verification: L-E layers over d+1 tokens), so
    that one lucky cell's noise does not pick the policy. -> ({(E, d): fitted seconds}, relative RMS residual)."""
    cells = sorted(c for c in table if c[0])
    X = torch.tensor([[1.0, d + 1, E * (d + 1), num_layers - E, (num_layers - E) * (d + 1)] for E, d in cells],
                     dtype=torch.float64)
    y = torch.tensor([table[c] for c in cells], dtype=torch.float64)
    beta = torch.linalg.lstsq(X, y.view(-1, 1)).solution.view(-1)
    fit = X @ beta
    rms = float(((fit - y) / y).pow(2).mean().sqrt())
    return {(0, 0): table[(0, 0)], **{c: float(v) for c, v in zip(cells, fit)}}, rms


def accepted_run(agree: Sequence[bool], pos: int, d: int) -> int:
    """How many of d drafts from position pos the full model accepts: the run of agreements there."""
    k = 0
    while k < d and pos + k < len(agree) and agree[pos + k]:
        k += 1
    return k


def replay(agreements: dict[int, list[list[bool]]], cost: RoundTime, policy: Policy, max_new_tokens: int
           ) -> tuple[float, int]:
    """-> (predicted decode seconds, emitted tokens) of a policy over every prompt's greedy output."""
    seconds, emitted = 0.0, 0
    for p in range(len(next(iter(agreements.values())))):
        n = len(agreements[next(iter(agreements))][p])
        pos, state, last = 1, None, None
        while pos < n:
            state, E, d = policy(state, last)
            d = max(0, min(d, max_new_tokens - pos - 1))
            k = accepted_run(agreements[E][p], pos, d)
            seconds += cost(E, d)
            step = min(k + 1, n - pos)
            emitted += step
            pos += step
            last = (E, d, k)
    return seconds, emitted


def exit_bandit(exits: Sequence[int], most: int, g: int, cost: RoundTime, explore_every: int = 8) -> Policy:
    """Length as growing(); the exit is the one with the most tokens per second so far in this generation (each
    exit's rounds' times summed: in an engine, a wall clock), every exit tried once at the start and the least
    tried one again every explore_every rounds."""
    exits, length = sorted(exits), DraftLength(most, g)

    def policy(state, last):
        if state is None:
            state = {"n": 0, "stats": {E: [0.0, 0, 0] for E in exits}, "len": length.first()}
        else:
            E, d, k = last
            st = state["stats"][E]
            st[0] += cost(E, d)
            st[1] += k + 1
            st[2] += 1
            state["len"] = length.after(d, k == d, k)
        state["n"] += 1
        untried = [E for E in exits if not state["stats"][E][2]]
        if untried:
            E = untried[0]
        elif state["n"] % explore_every == 0:
            E = min(exits, key=lambda e: state["stats"][e][2])
        else:
            E = max(exits, key=lambda e: state["stats"][e][1] / state["stats"][e][0])
        return state, E, state["len"]
    return policy


def top_probs(model, prompts, outputs, exits) -> dict[int, list[list[float]]]:
    """{E: per prompt, per output token j: the exit-E head's top probability where it predicts token j}."""
    out: dict[int, list[list[float]]] = {E: [] for E in exits}
    for prompt, o in zip(prompts, outputs):
        n, p = len(o), len(prompt)
        hidden = model.hidden_states(torch.tensor([list(prompt) + list(o)[:-1]], dtype=torch.int64))
        for E in exits:
            logp = model.decoder.head_log_softmax(hidden[E - 1][0, p - 1:p - 1 + n])
            out[E].append(logp.max(dim=-1).values.exp().tolist())
    return out


def stopping(agreements, probs, cost: RoundTime, E: int, most: int, g: int, tau: float, rule: str,
             max_new_tokens: int) -> tuple[float, int]:
    """A round drafts up to its length (growing()'s rule; g = 0: always most) and stops early by the exit head's
    top probability q_i: rule 'each' (csrc/draft.cpp today): stop before the first draft with q_i < tau;
    'product': stop before the draft that takes q_1 x ... x q_i below tau (the chance, if calibrated, that the
    whole run is accepted)."""
    seconds, emitted, length = 0.0, 0, DraftLength(most, g)
    for agree, q in zip(agreements[E], probs[E]):
        n, pos = len(agree), 1
        current = length.first()
        while pos < n:
            d = max(1, min(current, max_new_tokens - pos - 1))
            proposed, run = 0, 1.0
            while proposed < d and pos + proposed < n:
                run = run * q[pos + proposed] if rule == "product" else q[pos + proposed]
                if run < tau:
                    break
                proposed += 1
            k = accepted_run(agree, pos, proposed)
            seconds += cost(E, max(1, proposed))  # (a stopped round also ran the head of the draft it dropped)
            step = min(k + 1, n - pos)
            emitted += step
            pos += step
            current = length.after(current, k == proposed, k)
    return seconds, emitted


def static(E: int, d: int) -> Policy:
    return lambda state, last: (None, E, d)


def growing(E: int, most: int, g: int) -> Policy:
    """generation/draft_length.py's rule."""
    length = DraftLength(most, g)

    def policy(state, last):
        return None, E, (length.first() if last is None else length.after(last[1], last[2] == last[1], last[2]))
    return policy


def exit_ladder(exits: Sequence[int], most: int, g: int) -> Policy:
    """Length as growing(); the exit steps one rung shallower after a fully accepted round of the longest length
    (easy text: cheaper drafts) and one rung deeper after a round whose first draft was rejected."""
    exits, length = sorted(exits), DraftLength(most, g)

    def policy(state, last):
        i = len(exits) // 2 if state is None else state
        if last is None:
            return i, exits[i], length.first()
        _, d, k = last
        if k == d and d == most:
            i = max(0, i - 1)
        elif k == 0:
            i = min(len(exits) - 1, i + 1)
        return i, exits[i], length.after(d, k == d, k)
    return policy


def oracle(agreements, cost: RoundTime, exits: Sequence[int], depths: Sequence[int], max_new_tokens: int,
           growth: int = 0) -> tuple[float, int]:
    """The fastest replay possible when each round's (E, d) is chosen knowing the agreements (dynamic programming
    over the output's positions): a bound on every policy. growth > 0: the length follows growing()'s rule and only
    the exit is chosen (what a per-round exit choice alone could gain); one exit: only the length is chosen (what
    a perfect draft stop could gain)."""
    most, length = depths[-1], DraftLength(depths[-1], growth)
    seconds, emitted = 0.0, 0
    for p in range(len(agreements[exits[0]])):
        n = len(agreements[exits[0]][p])
        lengths = range(1, most + 1) if growth else [0]  # the DP's second coordinate: the rule's current length
        best = {(n, c): 0.0 for c in lengths}  # seconds from a position (and current length) to the end
        for pos in range(n - 1, 0, -1):
            for c in lengths:
                options = []
                for E in exits:
                    for d in ([c] if growth else depths):
                        d = max(0, min(d, max_new_tokens - pos - 1))
                        k = accepted_run(agreements[E][p], pos, d)
                        nxt = length.after(d, k == d, k) if growth else 0
                        options.append(cost(E, d) + best[(min(n, pos + k + 1), max(nxt, 1) if growth else 0)])
                best[(pos, c)] = min(options)
        if n > 1:
            seconds += best[(1, length.first() if growth else 0)]
        emitted += max(0, n - 1)
    return seconds, emitted


def parse_range(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default=None, help="'humaneval' or a JSONL with a 'prompt' field")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--exits", default="2-8", help="exit layers to consider, e.g. 3,4,5,6 or 2-8")
    ap.add_argument("--depths", default="1-16")
    ap.add_argument("--timing-prompts", type=int, default=8, help="prompts the round-time table is timed on")
    ap.add_argument("--passes", type=int, default=2, help="timing passes over the table")
    ap.add_argument("--table", default=None, help="JSON of the round-time table: read if it exists, else written")
    args = ap.parse_args()
    model, tokenizer = load_model(args.model, backend="auto")
    if args.prompts is None:
        texts = [p["text"] for p in evaluation_prompts(held_out_dirs(stdlib_dir()), 12, 12)]
    else:
        texts = read_prompts(humaneval_path() if args.prompts == "humaneval" else args.prompts)
    prompts = [tokenizer.encode(t) for t in texts[:args.num_prompts]]
    stops = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids or [])
    exits, depths = parse_range(args.exits), parse_range(args.depths)
    run_prompts(model, prompts[:1], 8, stops)  # warm-up
    ar = run_prompts(model, prompts, args.max_new_tokens, stops)
    _, agreements = measure_agreement(model, prompts, ar.outputs, exits)
    timing = prompts[:args.timing_prompts]
    if args.table and os.path.exists(args.table):  # a table timed before: policies compared without re-timing
        with open(args.table, encoding="utf-8") as f:
            raw = {tuple(map(int, k.split(":"))): v for k, v in json.load(f).items()}
    else:
        raw = round_times(model, timing, args.max_new_tokens, stops, exits, depths, args.passes)
        if args.table:
            with open(args.table, "w", encoding="utf-8") as f:
                json.dump({f"{E}:{d}": v for (E, d), v in raw.items()}, f)
    table, rms = smoothed(raw, model.num_layers)
    ar_step_s = table[(0, 0)]
    table.update({(E, 0): ar_step_s for E in exits})
    cost = lambda E, d: table[(E, min(d, depths[-1]))]  # noqa: E731
    ar_s = ar_step_s * ar.decode_tokens
    print(f"{args.model}: {len(prompts)} prompts, {ar.decode_tokens} tokens; round times timed on "
          f"{len(timing)} prompts x {args.passes} passes, fitted (RMS residual {rms:.1%}); AR "
          f"{ar_step_s * 1e3:.3f} ms/token; round E=4 d=1 {table.get((4, 1), 0) * 1e3:.3f} ms, d=8 "
          f"{table.get((4, 8), 0) * 1e3:.3f} ms; predicted speedups:")

    def speedup(seconds: float, emitted: int) -> float:  # tokens/s against autoregressive decoding's
        return ar_s / seconds * emitted / ar.decode_tokens

    def show(label: str, seconds: float, emitted: int) -> float:
        speed = speedup(seconds, emitted)
        print(f"  {label:<34} {speed:5.2f}x")
        return speed

    rows = []
    for E in exits:
        for d in depths:
            s, e = replay(agreements, cost, static(E, d), args.max_new_tokens)
            rows.append((speedup(s, e), f"static E={E} d={d}"))
    rows.sort(reverse=True)
    for speed, label in rows[:3]:
        print(f"  {label:<34} {speed:5.2f}x")
    best_static = rows[0][0]
    results = []
    for E in exits:
        for g in (2, 4):
            results.append((f"E={E} d<={depths[-1]} growth {g}",
                            replay(agreements, cost, growing(E, depths[-1], g), args.max_new_tokens)))
    for lo in exits:
        for hi in exits:
            if hi - lo in (1, 2, 3):
                for g in (2, 4):
                    rung = list(range(lo, hi + 1))
                    results.append((f"ladder {lo}..{hi} d<={depths[-1]} growth {g}",
                                    replay(agreements, cost, exit_ladder(rung, depths[-1], g), args.max_new_tokens)))
    for ex in ([4, 5], [4, 5, 6], [3, 4, 5, 6], [4, 5, 6, 8]):
        if all(e in exits for e in ex):
            for g in (2, 4):
                results.append((f"bandit {ex} d<={depths[-1]} growth {g}",
                                replay(agreements, cost, exit_bandit(ex, depths[-1], g, cost), args.max_new_tokens)))
    scored = sorted(((speedup(s, e), label) for label, (s, e) in results), reverse=True)
    for speed, label in scored[:8]:
        print(f"  {label:<34} {speed:5.2f}x  ({speed / best_static - 1:+.1%} over the best static)")
    probs = top_probs(model, prompts, ar.outputs, exits)
    stops = []
    for E in exits:
        for most in (6, 8, 12, 16):
            for g in (0, 2, 4):
                for rule in ("each", "product"):
                    for tau in (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
                        s, e = stopping(agreements, probs, cost, E, most, g, tau, rule, args.max_new_tokens)
                        stops.append((speedup(s, e), f"stop {rule} {tau} E={E} d<={most} g{g}"))
    stops.sort(reverse=True)
    for rule in ("each", "product"):
        for speed, label in [x for x in stops if f" {rule} " in x[1]][:4]:
            print(f"  {label:<34} {speed:5.2f}x  ({speed / best_static - 1:+.1%} over the best static)")
    per_prompt = [0.0, 0]  # the exit chosen per prompt, knowing the prompt: what a slowly adapting choice could gain
    for p in range(len(prompts)):
        one = {E: [agreements[E][p]] for E in exits}
        best = min((replay(one, cost, growing(E, depths[-1], 2), args.max_new_tokens) for E in exits),
                   key=lambda r: r[0] / max(1, r[1]))
        per_prompt = [per_prompt[0] + best[0], per_prompt[1] + best[1]]
    speed = show("best exit per prompt, growth 2", *per_prompt)
    print(f"    ({speed / best_static - 1:+.1%} over the best static: a bound, not a policy)")
    bounds = [("oracle length, E=%d" % E, [E], 0) for E in (4, 5) if E in exits]
    bounds += [(f"oracle exit {ex[0]}..{ex[-1]}, growth {g}", ex, g)
               for ex in ([e for e in exits if 3 <= e <= 6], exits) for g in (2, 4)]
    bounds += [(f"oracle exit {exits[0]}..{exits[-1]} and length", exits, 0)]
    for label, ex, g in bounds:
        speed = show(label, *oracle(agreements, cost, ex, depths, args.max_new_tokens, g))
        print(f"    ({speed / best_static - 1:+.1%} over the best static: a bound, not a policy)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
