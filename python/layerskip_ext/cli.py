"""The ``layerskip`` command."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .commands.common import int_list, setup_threads
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
    p.add_argument("--strategy", default="auto",
                   help="autoregressive | early_exit | self_speculative | auto (default: self_speculative with "
                        "the model's tuned setting when it has one, else autoregressive)")
    p.add_argument("--exit-layer", type=int, default=None, help="E: run layers < E, then the shared exit head")
    p.add_argument("--num-speculations", type=int, default=None, help="d: draft tokens per self-speculative round")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "reference"),
                   help="native kernels or the plain PyTorch reference (auto: native when built)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
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


def cmd_generate(args) -> int:
    from .generation import generate
    from .model import load_model

    if args.max_new_tokens < 0:
        raise LayerSkipError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    setup_threads(args.threads)
    prompt = _read_prompt(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, progress=not args.json,
                                  draft_vocab=args.draft_vocab)
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
                      on_token=on_token)
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


def cmd_check_lossless(args) -> int:
    from .generation.lossless import check_lossless
    from .model import load_model
    from .prompts import humaneval_path, read_prompts

    setup_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, progress=True)
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
    print(f"{'E':>3} {'d':>3} {'prompts':>8} {'mismatches':>10} {'acceptance':>10} {'tokens/full pass':>16}  first mismatch")
    for r in reports:
        first = f"prompt {r.mismatches[0][0]} at token {r.mismatches[0][1]}" if r.mismatches else "-"
        print(f"{r.exit_layer:>3} {r.num_speculations:>3} {r.prompts:>8} {len(r.mismatches):>10} "
              f"{r.acceptance_rate:>10.3f} {r.tokens_per_full_pass:>16.2f}  {first}")
    write_json(reports)
    total = sum(len(r.mismatches) for r in reports)
    print(f"{total} mismatches over {len(prompts)} prompts x {len(reports)} (E, d) pairs")
    return 1 if total else 0


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
    from .training.cli_commands import add_analyze_args, add_train_args, cmd_analyze, cmd_train

    p_train = sub.add_parser("train", help="train with layer dropout + early-exit loss (LayerSkip recipe)")
    add_train_args(p_train)
    p_train.set_defaults(func=cmd_train)
    p_an = sub.add_parser("analyze", help="per-layer next-token accuracy, perplexity, agreement with the last layer")
    add_analyze_args(p_an)
    p_an.set_defaults(func=cmd_analyze)
    p_chk = sub.add_parser("check-lossless", help="self-speculative greedy vs autoregressive greedy, token for token")
    p_chk.add_argument("--model", required=True)
    p_chk.add_argument("--prompts", required=True,
                       help="JSONL(.gz) with a 'prompt' field, a text file (blank-line separated), or 'humaneval'")
    p_chk.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p_chk.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p_chk.add_argument("--exit-layers", default="4,8,15,24")
    p_chk.add_argument("--num-speculations", default="1,3,6")
    p_chk.add_argument("--max-new-tokens", type=int, default=64)
    p_chk.add_argument("--dtype", default="float32")
    p_chk.add_argument("--backend", default="auto", choices=("auto", "native", "reference"))
    p_chk.add_argument("--threads", type=int, default=None)
    p_chk.add_argument("--json", default=None, help="also write the report to this file")
    p_chk.set_defaults(func=cmd_check_lossless)
    from .commands.draft_vocab import add_draft_vocab_args, cmd_draft_vocab

    p_dv = sub.add_parser("draft-vocab", help="store a frequency-ranked draft vocabulary with a model "
                                              "(cheaper self-speculative drafts, same output)")
    add_draft_vocab_args(p_dv)
    p_dv.set_defaults(func=cmd_draft_vocab)
    from .commands.demo import add_demo_args, cmd_demo
    from .commands.sweep import add_sweep_args, cmd_sweep

    p_demo = sub.add_parser("demo", help="self-speculative vs autoregressive on one prompt: outputs, speed, acceptance")
    add_demo_args(p_demo)
    p_demo.set_defaults(func=cmd_demo)
    p_sweep = sub.add_parser("sweep", help="acceptance and speedup over a grid of exit layers and depths, cost model")
    add_sweep_args(p_sweep)
    p_sweep.set_defaults(func=cmd_sweep)
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
