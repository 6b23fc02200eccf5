"""``layerskip generate``: text from a prompt, streamed or as one JSON object."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import LayerSkipError
from ..generation import generate
from ..model import load_model
from .common import add_runtime_args, setup_threads

NAME = "generate"
HELP = "generate text from a prompt"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, .gguf file, or a packaged name (smollm2-135m)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--strategy", default="auto",
                   help="autoregressive | early_exit | self_speculative | auto (default: self_speculative with "
                        "the model's tuned setting when it has one, else autoregressive)")
    p.add_argument("--exit-layer", type=int, default=None, help="E: run layers < E, then the shared exit head")
    p.add_argument("--num-speculations", type=int, default=None, help="d: draft tokens per self-speculative round")
    p.add_argument("--draft-stop", type=float, default=None,
                   help="dynamic drafting: a round stops drafting where the exit head's top probability (when "
                        "sampling: of the draft's distribution) falls below this (default: the model's tuned "
                        "setting when greedy, else 0 = off)")
    p.add_argument("--draft-growth", type=int, default=None,
                   help="dynamic drafting: a round's length adapts, growing by G after a fully accepted round, up "
                        "to d (default: the model's tuned setting, else 0 = every round drafts d)")
    add_runtime_args(p)
    p.add_argument("--draft-vocab", default="auto",
                   help="self-speculative greedy drafts score only these tokens: a draft_vocab.json file, 'none' "
                        "(the whole vocabulary), or 'auto' (default: the model's stored one, if any); lossless")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise LayerSkipError(f"cannot read prompt file {args.prompt_file!r}: {e.strerror}") from None


def run(args) -> int:
    if args.max_new_tokens < 0:
        raise LayerSkipError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    setup_threads(args.threads)
    prompt = _read_prompt(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, progress=not args.json,
                                  draft_vocab=args.draft_vocab, device=args.device)
    if tokenizer is None:
        raise LayerSkipError(f"{args.model} has no tokenizer; text generation needs one")
    if args.chat:
        if not tokenizer.chat_template:
            raise LayerSkipError(f"{args.model} has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt)
    stop_ids = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)

    on_token = None
    if not args.json:
        stream = tokenizer.stream_decoder()

        def on_token(_seq: int, token: int) -> None:
            if token not in stop_ids:
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()

    result = generate(model, [prompt_ids], strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      stop_token_ids=stop_ids, exit_layer=args.exit_layer, num_speculations=args.num_speculations,
                      on_token=on_token, draft_stop=args.draft_stop, draft_growth=args.draft_growth)
    seq = result.sequences[0]
    if args.json:
        out = {
            "text": tokenizer.decode(seq.tokens, skip_special_tokens=True),
            "tokens": seq.tokens,
            "prompt_tokens": len(prompt_ids),
            "new_tokens": len(seq.tokens),
            "time_s": round(result.time_s, 4),
            "tokens_per_s": round(result.decode_tokens_per_s, 2),
            "prefill_s": round(result.prefill_s, 4),
            "strategy": result.strategy,
            "finish_reason": seq.finish_reason,
            "model": args.model,
            "dtype": args.dtype,
            "backend": model.decoder.name,
            **result.stats,
        }
        print(json.dumps(out))
    else:
        sys.stdout.write(stream.flush() + "\n")
        print(f"[{len(seq.tokens)} tokens, {result.decode_tokens_per_s:.1f} tokens/s decode, "
              f"prefill {result.prefill_s:.2f}s, {seq.finish_reason}]", file=sys.stderr)
    return 0
