"""The ``layerskip`` command."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .errors import LayerSkipError


def _add_generate_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (weights and activations)")
    p.add_argument("--strategy", default="autoregressive", help="autoregressive | early_exit")
    p.add_argument("--exit-layer", type=int, default=None, help="E: run layers < E, then the shared exit head")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "reference"),
                   help="native kernels or the plain PyTorch reference (auto: native when built)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise LayerSkipError(f"cannot read prompt file {args.prompt_file!r}: {e.strerror}") from None


def cmd_generate(args) -> int:
    import torch

    from .generation import generate
    from .model import load_model

    if args.max_new_tokens < 0:
        raise LayerSkipError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise LayerSkipError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    prompt = _read_prompt(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, progress=not args.json)
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
                      stop_token_ids=stop_ids, exit_layer=args.exit_layer, on_token=on_token)
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
            "backend": model.ops.name,
            **result.stats,
        }
        print(json.dumps(out))
    else:
        sys.stdout.write(stream.flush() + "\n")
        print(f"[{len(seq.tokens)} tokens, {result.decode_tokens_per_s:.1f} tokens/s decode, "
              f"prefill {result.prefill_s:.2f}s, {seq.finish_reason}]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print build information (version, CUDA, CPU ISA)")
    p_info.add_argument("--json", action="store_true")
    p_info.set_defaults(func=cmd_info)
    p_gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_generate_args(p_gen)
    p_gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LayerSkipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
