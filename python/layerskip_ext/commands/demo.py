"""``layerskip demo``: the flagship command. One prompt, decoded self-speculatively and autoregressively:
both completions, whether they are token-identical, both speeds, the speedup and the acceptance rate.

    layerskip demo                              # both shipped LayerSkip models on HumanEval prompt 0
    layerskip demo --model nano-layerskip --prompt-index 3 --json
    layerskip demo --model path/to/model --prompt "def fib(n):" --exit-layer 8 --num-speculations 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..errors import LayerSkipError
from ..generation import generate
from ..generation.defaults import default_speculation, resolve_strategy
from ..generation.draft_stop import tuned_stop_model
from ..io import packaged
from ..model import load_model
from .common import add_runtime_args, prompt_texts, setup_threads

NAME = "demo"
HELP = "self-speculative vs autoregressive on one prompt: outputs, speed, acceptance"

DEFAULT_MODEL = "smollm2-135m-layerskip"
FALLBACK_MODEL = "smollm2-135m"
NANO_MODEL = "nano-layerskip"
# What each shipped model is, said before its numbers (the demo shows both by default).
LABELS = {
    DEFAULT_MODEL: "SmolLM2-135M-Instruct with the LayerSkip LoRA adapter trained here (continual pretraining on "
                   "~1M tokens of a CPU: self-speculation about at parity)",
    NANO_MODEL: "a 9M-parameter model trained from scratch on this project's 2-core CPU by `layerskip reproduce` "
                "(LayerSkip recipe, Python's standard library; 1.9x on held-out prompts); a demonstration, not a "
                "useful assistant",
}
DEFAULT_SPECULATIONS = 4  # what `layerskip generate --strategy self_speculative` uses without a tuned setting
WARMUP_TOKENS = 4


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Decode one prompt with self-speculation and autoregressively; show both completions, "
                     "whether they are token-identical, both speeds, the speedup and the acceptance rate.")
    p.add_argument("--model", default=None,
                   help=f"default: both shipped LayerSkip models in turn, {DEFAULT_MODEL} (the packaged adapter; "
                        f"{FALLBACK_MODEL} when it is not installed) and {NANO_MODEL}; or a packaged name, an HF "
                        f"folder, .gguf file, adapter folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: a HumanEval prompt)")
    src.add_argument("--prompt-index", type=int, default=0, help="HumanEval prompt number (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--exit-layer", type=int, default=None,
                   help="E (default: the model's tuned setting, else a quarter of its depth)")
    p.add_argument("--num-speculations", type=int, default=None,
                   help=f"d (default: the model's tuned setting, else {DEFAULT_SPECULATIONS})")
    add_runtime_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def resolve_demo_model(name: str) -> tuple[str, str | None]:
    """-> (model to load, note or None): the packaged adapter falls back to its base when it is not installed."""
    key = name.lower()
    if key in packaged.PACKAGED_ADAPTERS and not os.path.exists(os.path.expanduser(name)):
        folder = os.path.join(packaged.MODELS_DIR, packaged.PACKAGED_ADAPTERS[key])
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return FALLBACK_MODEL, (f"note: the packaged adapter {name!r} is not installed; showing its base "
                                    f"model {FALLBACK_MODEL} (not LayerSkip-trained: expect low acceptance)")
    return name, None


def choose_setting(model, source: str, exit_layer, num_speculations) -> tuple[int, int, str]:
    """-> (E, d, where they came from): the flags, else the model's tuned setting, else the fallbacks."""
    tuned = default_speculation(model, source)
    origin = "flags" if exit_layer is not None and num_speculations is not None else (
        "the model's tuned setting" if tuned else "defaults")
    if exit_layer is None:
        # A quarter of the depth, as the LayerSkip paper's Llama2-7B setting (E = 8 of 32 layers).
        exit_layer = tuned[0] if tuned else max(1, model.num_layers // 4)
    if num_speculations is None:
        num_speculations = tuned[1] if tuned else DEFAULT_SPECULATIONS
    if not 1 <= exit_layer <= model.num_layers:
        raise LayerSkipError(f"--exit-layer {exit_layer} is outside [1, {model.num_layers}]")
    if num_speculations < 1:
        raise LayerSkipError(f"--num-speculations must be >= 1, got {num_speculations}")
    return exit_layer, num_speculations, origin


def _prompt(args) -> tuple[str, str]:
    if args.prompt is not None:
        return args.prompt, "prompt"
    texts = prompt_texts("humaneval")
    if not 0 <= args.prompt_index < len(texts):
        raise LayerSkipError(f"--prompt-index {args.prompt_index} is outside [0, {len(texts) - 1}]")
    return texts[args.prompt_index], f"HumanEval prompt {args.prompt_index}"


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def default_models() -> list[str]:
    """The shipped LayerSkip models, those installed (the adapter always: it falls back to its base)."""
    names = [DEFAULT_MODEL]
    if os.path.isfile(os.path.join(packaged.MODELS_DIR, packaged.PACKAGED_FOLDERS[NANO_MODEL], "config.json")):
        names.append(NANO_MODEL)
    else:
        print(f"note: {NANO_MODEL} is not installed with this package; showing {DEFAULT_MODEL} only",
              file=sys.stderr)
    return names


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise LayerSkipError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    setup_threads(args.threads)
    prompt, label = _prompt(args)
    names = [args.model] if args.model is not None else default_models()
    for i, name in enumerate(names):
        if len(names) > 1 and not args.json:
            print(("\n" if i else "") + f"##### {name}: {LABELS.get(name, name)}")
        demo_one(args, name, prompt, label)
    return 0


def demo_one(args, name: str, prompt: str, label: str) -> None:
    """Both decodes of one model, printed (or one JSON line)."""
    name, note = resolve_demo_model(name)
    if note:
        print(note, file=sys.stderr)
    t0 = time.perf_counter()
    print(f"loading {name} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(name, dtype=args.dtype, backend=args.backend, progress=True, device=args.device)
    print(f"loaded in {time.perf_counter() - t0:.1f}s ({model.num_layers} layers, {model.decoder.name} kernels)",
          file=sys.stderr)
    if tokenizer is None:
        raise LayerSkipError(f"{name} has no tokenizer; the demo needs one")
    E, d, origin = choose_setting(model, f"{name} {getattr(model, 'source', '')}", args.exit_layer,
                                  args.num_speculations)
    ids = tokenizer.encode(prompt)
    stops = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)

    def run(strategy: str, header: str):
        kw = dict(exit_layer=E, num_speculations=d) if strategy == "self_speculative" else {}
        on_token, stream = None, None
        if not args.json:
            print(f"\n=== {header} ===")
            stream = tokenizer.stream_decoder()

            def on_token(_seq: int, token: int) -> None:
                if token not in stops:
                    sys.stdout.write(stream.push(token))
                    sys.stdout.flush()
        res = generate(model, [ids], strategy=strategy, max_new_tokens=args.max_new_tokens, stop_token_ids=stops,
                       on_token=on_token, **kw)
        if stream is not None:
            sys.stdout.write(stream.flush() + "\n")
        return res

    # Warm-up: the first generation of each strategy pays one-off allocation and page-in costs.
    for strategy, kw in (("self_speculative", dict(exit_layer=E, num_speculations=d)), ("autoregressive", {})):
        generate(model, [ids], strategy=strategy, max_new_tokens=min(WARMUP_TOKENS, args.max_new_tokens),
                 stop_token_ids=stops, **kw)
    if not args.json:
        print(f"=== {label} ({len(ids)} tokens) ===\n{prompt}")
    stop, growth = resolve_strategy(model, "self_speculative", E, d,
                                    source=f"{name} {getattr(model, 'source', '')}")[3:]
    fitted = tuned_stop_model(model, E) is not None
    dyn = (f", round length adapts by {growth}" if growth else "") + (
        (f", drafts stop where a fitted chance of acceptance falls below {stop:g}" if fitted else
         f", drafts stop below top probability {stop:g}") if stop else "")
    ss = run("self_speculative", f"self-speculative completion (E={E}, d={d}{dyn}: {origin})")
    ar = run("autoregressive", "autoregressive completion")
    ss_tokens, ar_tokens = ss.sequences[0].tokens, ar.sequences[0].tokens
    diff = _first_difference(ss_tokens, ar_tokens)
    speedup = ss.decode_tokens_per_s / ar.decode_tokens_per_s if ar.decode_tokens_per_s > 0 else 0.0
    rounds = ss.stats.get("rounds", 0)
    tokens_per_round = (len(ss_tokens) - 1) / rounds if rounds else 0.0
    if args.json:
        def part(r, tokens):
            return {"text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens,
                    "tokens_per_s": round(r.decode_tokens_per_s, 2), "time_s": round(r.time_s, 4),
                    "prefill_s": round(r.prefill_s, 4), "finish_reason": r.sequences[0].finish_reason}
        print(json.dumps({
            "model": name, "prompt": prompt, "prompt_label": label, "prompt_tokens": len(ids),
            "exit_layer": E, "num_speculations": d, "setting_from": origin,
            "self_speculative": dict(part(ss, ss_tokens), acceptance_rate=ss.stats.get("acceptance_rate", 0.0),
                                     rounds=rounds, tokens_per_round=round(tokens_per_round, 3)),
            "autoregressive": part(ar, ar_tokens),
            "identical": diff is None, "first_difference": diff, "speedup": round(speedup, 3),
            "draft_stop": ss.stats.get("draft_stop", 0.0), "draft_growth": ss.stats.get("draft_growth", 0),
            "about": LABELS.get(name),
            "dtype": args.dtype, "backend": model.decoder.name}))
        return
    print("\n=== summary ===")
    same = "yes" if diff is None else f"NO (first difference at new token {diff})"
    print(f"token-identical:   {same} ({len(ss_tokens)} vs {len(ar_tokens)} new tokens)")
    print(f"self-speculative:  {ss.decode_tokens_per_s:.1f} tokens/s, acceptance rate "
          f"{ss.stats.get('acceptance_rate', 0.0):.1%}, {tokens_per_round:.2f} tokens per round")
    print(f"autoregressive:    {ar.decode_tokens_per_s:.1f} tokens/s")
    print(f"speedup:           {speedup:.2f}x (decode tokens/s, after a warm-up)")
