"""``layerskip check-lossless``: self-speculative greedy vs autoregressive greedy over many prompts and (E, d)
pairs, every mismatch reported with its first differing token (exit status 1 if any)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import LayerSkipError
from ..generation.lossless import check_lossless
from ..model import load_model
from ..prompts import humaneval_path, read_prompts
from .common import add_runtime_args, int_list, setup_threads

NAME = "check-lossless"
HELP = "self-speculative greedy vs autoregressive greedy, token for token"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True,
                   help="JSONL(.gz) with a 'prompt' field, a text file (blank-line separated), or 'humaneval'")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--exit-layers", default="4,8,15,24")
    p.add_argument("--num-speculations", default="1,3,6")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_runtime_args(p)
    p.add_argument("--json", default=None, help="also write the report to this file")


def run(args) -> int:
    setup_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, progress=True,
                                  device=args.device)
    if tokenizer is None:
        raise LayerSkipError(f"{args.model} has no tokenizer")
    texts = read_prompts(humaneval_path() if args.prompts == "humaneval" else args.prompts)
    if args.limit:
        texts = texts[:args.limit]
    if args.chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    prompts = [tokenizer.encode(t) for t in texts]
    exits = int_list(args.exit_layers, "--exit-layers")
    depths = int_list(args.num_speculations, "--num-speculations")
    for E in exits:
        if not 1 <= E <= model.num_layers:
            raise LayerSkipError(f"exit layer {E} is outside [1, {model.num_layers}]")
    if not depths or min(depths) < 1:
        raise LayerSkipError("--num-speculations values must be >= 1")
    stop_ids = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)

    def write_json(reports):
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{"exit_layer": r.exit_layer, "num_speculations": r.num_speculations, "prompts": r.prompts,
                            "mismatches": r.mismatches, "acceptance_rate": r.acceptance_rate,
                            "tokens_per_full_pass": r.tokens_per_full_pass} for r in reports], f, indent=1)

    def progress(done, total, reports):
        print(f"\r{done}/{total} prompts", end="", file=sys.stderr, flush=True)
        write_json(reports)  # a long run leaves its partial report behind

    reports = check_lossless(model, prompts, [(E, d) for E in exits for d in depths], args.max_new_tokens,
                             stop_token_ids=stop_ids, progress=progress)
    print(file=sys.stderr)
    print(f"{'E':>3} {'d':>3} {'prompts':>8} {'mismatches':>10} {'acceptance':>10} {'tokens/full pass':>16}  "
          f"first mismatch")
    for r in reports:
        first = f"prompt {r.mismatches[0][0]} at token {r.mismatches[0][1]}" if r.mismatches else "-"
        print(f"{r.exit_layer:>3} {r.num_speculations:>3} {r.prompts:>8} {len(r.mismatches):>10} "
              f"{r.acceptance_rate:>10.3f} {r.tokens_per_full_pass:>16.2f}  {first}")
    write_json(reports)
    total = sum(len(r.mismatches) for r in reports)
    print(f"{total} mismatches over {len(prompts)} prompts x {len(reports)} (E, d) pairs")
    return 1 if total else 0
