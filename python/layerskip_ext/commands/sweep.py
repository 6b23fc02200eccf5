"""``layerskip sweep``: acceptance rate and tokens/s of self-speculation over a grid of (E, d), and the cost model.

    layerskip sweep --model smollm2-135m-layerskip --out sweep/            # measured grid + predictions
    layerskip sweep --model smollm2-135m-layerskip --predict               # cost model only (fast)
    layerskip sweep --model smollm2-135m-layerskip --write-default         # store the best (E, d) in its config
    layerskip sweep --model nano-layerskip --draft-growths 4 --draft-stops 0.05 --dynamic-depths 8,16   # + dynamic
    layerskip sweep --model nano-layerskip --fitted-stops 0.3,0.4 --dynamic-depths 16 --write-default  # fitted stop
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..analysis.sweep import check_draft_growths, check_draft_stops, check_grid, default_exit_layers, run_sweep
from ..analysis.sweep_report import format_markdown, write_reports
from ..errors import LayerSkipError
from ..io.layerskip_block import layerskip_config_path, write_layerskip_block
from ..model import load_model
from .common import add_runtime_args, float_list, int_list, prompt_texts, setup_threads

NAME = "sweep"
HELP = "acceptance and speedup over a grid of exit layers and depths, cost model"


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Measure self-speculative decoding (acceptance rate, tokens/s, speedup over autoregressive "
                     "decoding measured in the same run) over a grid of exit layers E and speculation depths d, "
                     "with the cost model's prediction for every cell. Writes DIR/sweep.json, DIR/sweep.md and "
                     "DIR/sweep.png and prints the best (E, d).")
    p.add_argument("--model", required=True, help="HF folder, .gguf file, adapter folder, or a packaged name")
    p.add_argument("--exit-layers", default=None, metavar="E1,E2,...",
                   help="exit layers to try (default: a spread of about six over the depth)")
    p.add_argument("--num-speculations", default="1,2,3,4,6", metavar="D1,D2,...",
                   help="speculation depths to try (default 1,2,3,4,6)")
    p.add_argument("--draft-stops", default="", metavar="P1,P2,...",
                   help="dynamic drafting: also measure every exit layer with these thresholds (a round stops "
                        "drafting where the exit head's top probability falls below one; default none)")
    p.add_argument("--draft-growths", default="", metavar="G1,G2,...",
                   help="dynamic drafting: also measure every exit layer with adaptive round lengths (start at G, "
                        "G more after a fully accepted round, the accepted run + 1 after a rejection; default none)")
    p.add_argument("--fitted-stops", default="", metavar="P1,P2,...",
                   help="dynamic drafting: fit a stop model (the chance that a round's drafts are all accepted, "
                        "from the exit head's top-2 margin and the draft's n-gram match with the context) at every "
                        "dynamic exit on --stop-fit-prompts other prompts, and measure these thresholds on it "
                        "(default none)")
    p.add_argument("--stop-fit-prompts", type=int, default=24, metavar="N",
                   help="with --fitted-stops: fit on the N prompts after the first --num-prompts of --prompts "
                        "(default 24)")
    p.add_argument("--dynamic-depths", default=None, metavar="D1,D2,...",
                   help="the most drafts a dynamic round may make (default: the deepest --num-speculations)")
    p.add_argument("--dynamic-exits", type=int, default=None, metavar="K",
                   help="dynamic cells only at the K exit layers whose static cells were fastest (default: all)")
    p.add_argument("--prompts", default="humaneval",
                   help="'humaneval' (default), a JSONL(.gz) with a 'prompt' field, or a text file of prompts "
                        "separated by blank lines")
    p.add_argument("--num-prompts", type=int, default=8, help="use the first N prompts (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    add_runtime_args(p)
    p.add_argument("--out", default="layerskip_sweep", help="output folder (default layerskip_sweep)")
    p.add_argument("--predict", action="store_true",
                   help="only the cost model: predicted table and best (E, d) without decoding the full grid")
    p.add_argument("--write-default", action="store_true",
                   help="write the best (E, d) as the 'layerskip' block of the model's adapter_config.json "
                        "(adapter) or config.json (HF folder), which --strategy auto then uses")


def _check_args(args) -> tuple[list[int] | None, list[int]]:
    exits = int_list(args.exit_layers, "--exit-layers") if args.exit_layers is not None else None
    depths = int_list(args.num_speculations, "--num-speculations")
    args.draft_stops = float_list(args.draft_stops, "--draft-stops")
    check_draft_stops(args.draft_stops)
    args.draft_growths = int_list(args.draft_growths, "--draft-growths")
    check_draft_growths(args.draft_growths)
    args.fitted_stops = float_list(args.fitted_stops, "--fitted-stops")
    check_draft_stops(args.fitted_stops)
    if args.fitted_stops and args.stop_fit_prompts < 1:
        raise LayerSkipError(f"--stop-fit-prompts must be >= 1, got {args.stop_fit_prompts}")
    args.dynamic_depths = int_list(args.dynamic_depths, "--dynamic-depths") if args.dynamic_depths else None
    if args.dynamic_depths and any(d < 1 for d in args.dynamic_depths):
        raise LayerSkipError("--dynamic-depths: every depth must be >= 1")
    if exits is not None and not exits:
        raise LayerSkipError("empty grid: --exit-layers lists no exit layer")
    if not depths:
        raise LayerSkipError("empty grid: --num-speculations lists no depth")
    bad = [d for d in depths if d < 1]
    if bad:
        raise LayerSkipError(f"--num-speculations: depth {bad[0]} must be >= 1")
    if args.num_prompts < 1:
        raise LayerSkipError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_new_tokens < 2:
        raise LayerSkipError(f"--max-new-tokens must be >= 2, got {args.max_new_tokens}")
    return exits, depths


def run(args) -> int:
    exits, depths = _check_args(args)
    setup_threads(args.threads)
    all_texts = prompt_texts(args.prompts)  # before loading: a bad prompts file fails fast
    texts = all_texts[:args.num_prompts]
    fit_texts = all_texts[args.num_prompts:args.num_prompts + args.stop_fit_prompts] if args.fitted_stops else []
    if args.fitted_stops and not fit_texts:
        raise LayerSkipError(f"--fitted-stops: {args.prompts} has {len(all_texts)} prompts, none left to fit the stop "
                             f"model on after the first --num-prompts {args.num_prompts} (fewer --num-prompts, or "
                             "more prompts)")
    if args.write_default:

        layerskip_config_path(args.model)  # a GGUF has nowhere to store it: say so before the long run
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, progress=True,
                                  device=args.device)
    if tokenizer is None:
        raise LayerSkipError(f"{args.model} has no tokenizer")
    exits = exits if exits is not None else default_exit_layers(model.num_layers)
    check_grid(model.num_layers, exits, depths)
    prompts = [tokenizer.encode(t) for t in texts]
    stop_ids = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    settings = {"model": args.model, "dtype": args.dtype, "backend": model.decoder.name,
                "threads": torch.get_num_threads(), "prompts": args.prompts, "num_prompts": len(prompts),
                "max_new_tokens": args.max_new_tokens, "load_average_1m": round(os.getloadavg()[0], 2)}
    if fit_texts:
        settings["stop_fit_prompts"] = len(fit_texts)
    print(f"sweeping {len(exits)} exit layers x {len(depths)} depths over {len(prompts)} prompts"
          + (" (cost model only)" if args.predict else ""), file=sys.stderr)
    res = run_sweep(model, prompts, exits, depths, args.max_new_tokens, stop_ids, measure=not args.predict,
                    with_prediction=True, progress=True, settings=settings, draft_stops=args.draft_stops,
                    draft_growths=args.draft_growths, dynamic_depths=args.dynamic_depths,
                    dynamic_exits=args.dynamic_exits, fitted_stops=args.fitted_stops,
                    fit_prompts=[tokenizer.encode(t) for t in fit_texts])
    title = f"{args.model} ({args.dtype}, {settings['threads']} threads)"
    print(format_markdown(res, title))
    paths, note = write_reports(res, args.out, title)
    if note:
        print(note, file=sys.stderr)
    print("wrote " + ", ".join(paths), file=sys.stderr)

    best = res.predicted_best() if args.predict else res.best_overall()
    speedup = best.predicted.speedup if args.predict else best.speedup
    label = "predicted best" if args.predict else "best"
    print(f"{label}: {best.label} ({speedup:.2f}x vs autoregressive)")
    if args.write_default:
        _write_default(args.model, best, speedup, args.predict)
    return 0


def _write_default(model: str, best, speedup: float, predicted: bool) -> None:
    extra = {"speedup": round(speedup, 3), "source": "layerskip sweep" + (" --predict" if predicted else ""),
             "draft_stop": best.draft_stop, "draft_growth": best.draft_growth}
    if best.draft_stop_model is not None:  # read back by generation/draft_stop.tuned_stop_model at this exit
        extra["draft_stop_model"] = [round(w, 6) for w in best.draft_stop_model]
    if not predicted:
        extra["acceptance"] = round(best.acceptance, 4)
    path = write_layerskip_block(model, best.exit_layer, best.num_speculations, extra)
    print(f"wrote exit_layer={best.exit_layer}, num_speculations={best.num_speculations} to {path}",
          file=sys.stderr)
    if speedup <= 1.0:
        # Still written, as asked (layerskip demo and --strategy self_speculative use it); the recorded speedup
        # makes --strategy auto decode autoregressively, the faster choice for this model.
        print(f"note: the best setting is not faster than autoregressive decoding ({speedup:.2f}x); "
              f"--strategy auto will keep decoding autoregressively", file=sys.stderr)
