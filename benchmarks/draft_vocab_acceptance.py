"""What a draft vocabulary costs in acceptance: self-speculative greedy decoding with the whole vocabulary and with a
draft vocabulary, same prompts, (E, d) grid; counts only (deterministic, so no quiet machine needed).

    python benchmarks/draft_vocab_acceptance.py --model smollm2-135m --draft-vocab auto --spec 15:3,24:4 \
        --limit 8 --new-tokens 64 --json benchmarks/results/draft_vocab_acceptance.json

Per (E, d): acceptance (accepted / drafted) and tokens per round with each vocabulary, whether both outputs equal
autoregressive greedy's, and the share of the autoregressive output's tokens inside the draft vocabulary (the
tokens a draft could still propose).
"""
from __future__ import annotations

import argparse
import json
import os

from layerskip_ext.generation import generate
from layerskip_ext.model import load_model
from layerskip_ext.model.draft_vocab import load_draft_vocab, stored_draft_vocab_path
from layerskip_ext.prompts import humaneval_path, read_prompts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft-vocab", default="auto", help="a file, or 'auto' (the model's stored one)")
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spec", default="15:3,24:4")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model, tok = load_model(args.model, dtype=args.dtype, draft_vocab=None)
    source = stored_draft_vocab_path(args.model) if args.draft_vocab == "auto" else args.draft_vocab
    if not source:
        raise SystemExit(f"no draft vocabulary stored with {args.model}; pass --draft-vocab FILE")
    dv = load_draft_vocab(source, model.config.vocab_size)
    texts = read_prompts(humaneval_path() if args.prompts == "humaneval" else args.prompts)[: args.limit]
    prompts = [tok.encode(t) for t in texts]
    kw = dict(max_new_tokens=args.new_tokens, stop_token_ids=[])
    ar = [generate(model, p, strategy="autoregressive", **kw).sequences[0].tokens for p in prompts]
    inside = set(dv.tolist())
    coverage = sum(t in inside for o in ar for t in o) / max(sum(len(o) for o in ar), 1)
    rows = []
    for pair in [x for x in args.spec.split(",") if x]:
        E, d = (int(v) for v in pair.split(":"))
        row = dict(exit_layer=E, num_speculations=d)
        for name, vocab in (("full", None), ("draft_vocab", dv)):
            acc = drafted = rounds = emitted = 0
            same = True
            for p, expected in zip(prompts, ar):
                r = generate(model, p, strategy="self_speculative", exit_layer=E, num_speculations=d,
                             draft_vocab=vocab, **kw)
                same &= r.sequences[0].tokens == expected
                acc += r.stats["accepted_tokens"]
                drafted += r.stats["draft_tokens"]
                rounds += r.stats["rounds"]
                emitted += len(r.sequences[0].tokens) - 1
            row[name] = dict(acceptance=round(acc / max(drafted, 1), 4), tokens_per_round=round(emitted / rounds, 3),
                             equals_ar=same)
        rows.append(row)
        print(f"E={E:2d} d={d}  acceptance full {row['full']['acceptance']:.3f} -> draft vocab "
              f"{row['draft_vocab']['acceptance']:.3f}   tokens/round {row['full']['tokens_per_round']:.2f} -> "
              f"{row['draft_vocab']['tokens_per_round']:.2f}   == AR {row['full']['equals_ar']} "
              f"{row['draft_vocab']['equals_ar']}", flush=True)
    print(f"{100 * coverage:.1f}% of the autoregressive output's tokens are in the {dv.numel()}-token draft vocabulary")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, source=getattr(model, "source", ""), draft_vocab=source,
                           draft_vocab_size=int(dv.numel()), prompts=len(prompts), new_tokens=args.new_tokens,
                           ar_output_coverage=round(coverage, 4), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
