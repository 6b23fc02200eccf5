"""``layerskip reproduce``: train a LayerSkip model and its plain control from scratch on this Python's standard
library, then measure both (per-layer exit quality, the (E, d) sweep with dynamic drafting, where a decode step's
time goes) and write one report. Resumable: run the same command again after an interruption.

    layerskip reproduce --out repro                       # defaults fit in about an hour on 2 cores
    layerskip reproduce --out quick --budget-min 15       # fewer steps, same stages
"""
from __future__ import annotations

import argparse
import json
import sys

from ..reproduce.pipeline import Reproduction, ReproduceConfig
from .common import float_list, int_list, setup_threads, str_list

NAME = "reproduce"
HELP = "train a LayerSkip model and a baseline from scratch here, measure both, write a report"
D = ReproduceConfig  # the defaults live in one place: the config's fields


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--out", required=True, help="output folder (models, evaluations, report.md); rerun to resume")
    p.add_argument("--budget-min", type=float, default=D.budget_min,
                   help=f"minutes the whole run may take; fewer steps are planned where the default's do not fit "
                        f"(default {D.budget_min:g})")
    p.add_argument("--data", default=None, help="a folder of code to train on (default: this Python's stdlib)")
    p.add_argument("--held-out", type=str_list, default=None, metavar="DIR1,DIR2",
                   help="sub-folders of --data held out for evaluation (default asyncio,email,json)")
    p.add_argument("--arch", default=None, metavar="L,H,HEADS,KV,MLP",
                   help="the model's shape: layers,hidden,heads,kv_heads,intermediate (default 20,192,6,2,512: "
                        "the shape that paid, docs/reproduce.md; the plan still times and predicts the candidates)")
    p.add_argument("--candidates", nargs="+", default=None, metavar="L,H,HEADS,KV,MLP",
                   help="let the cost model choose the shape among these (e.g. 16,192,6,2,512 24,160,5,1,448) and "
                        "train its pick")
    p.add_argument("--steps", type=int, default=None,
                   help="exactly this many training steps per model (default: --max-steps, fewer where the budget "
                        "cannot fit them)")
    p.add_argument("--max-steps", type=int, default=D.max_steps,
                   help=f"the steps a default plan trains, the same on a fast machine as on a slow one; fewer only "
                        f"where --budget-min cannot fit them (default {D.max_steps})")
    p.add_argument("--vocab", type=int, default=D.vocab, help=f"tokenizer vocabulary (default {D.vocab})")
    p.add_argument("--batch-size", type=int, default=D.batch_size,
                   help=f"sequences a training step (default {D.batch_size}: more steps for the same tokens)")
    p.add_argument("--seq-len", type=int, default=D.seq_len)
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--function-prompts", type=int, default=D.function_prompts,
                   help=f"held-out function prompts (default {D.function_prompts})")
    p.add_argument("--humaneval-prompts", type=int, default=D.humaneval_prompts,
                   help=f"HumanEval prompts (default {D.humaneval_prompts}; 0: none)")
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens)
    p.add_argument("--exit-layers", default=None, metavar="E1,E2,...", help="sweep exits (default: shallow spread)")
    p.add_argument("--draft-stops", default=None, metavar="P1,P2,...",
                   help="dynamic drafting thresholds the sweep tries (default 0.05,0.1; '' for none)")
    p.add_argument("--draft-growths", default=None, metavar="G1,G2,...",
                   help="dynamic drafting: adaptive round-length growths the sweep tries (default 4; '' for none)")
    p.add_argument("--dynamic-depths", default=None, metavar="D1,D2,...",
                   help="the most drafts a dynamic round may make (default 16)")
    p.add_argument("--fitted-stops", default=None, metavar="P1,P2,...",
                   help="thresholds of a fitted draft stop model confirmed at the best dynamic exit (default "
                        + ",".join(f"{x:g}" for x in D.fitted_stops) + "; '' for none)")
    p.add_argument("--stop-fit-prompts", type=int, default=D.stop_fit_prompts,
                   help=f"functions and HumanEval prompts each, none evaluated, the stop model is fitted on "
                        f"(default {D.stop_fit_prompts})")
    p.add_argument("--eval-sequences", type=int, default=D.eval_sequences,
                   help=f"held-out sequences scored for the per-layer table (default {D.eval_sequences})")
    p.add_argument("--no-compile", action="store_true",
                   help="train eager (default: torch.compile the decoder layers where that is measured faster)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    setup_threads(args.threads)
    kw = {}
    if args.candidates:
        kw["candidates"] = tuple(args.candidates)
    if args.held_out:
        kw["held_out"] = tuple(args.held_out)
    if args.exit_layers:
        kw["exit_layers"] = tuple(int_list(args.exit_layers, "--exit-layers"))
    if args.draft_stops is not None:
        kw["draft_stops"] = tuple(float_list(args.draft_stops, "--draft-stops"))
    if args.draft_growths is not None:
        kw["draft_growths"] = tuple(int_list(args.draft_growths, "--draft-growths"))
    if args.fitted_stops is not None:
        kw["fitted_stops"] = tuple(float_list(args.fitted_stops, "--fitted-stops"))
    kw["stop_fit_prompts"] = args.stop_fit_prompts
    if args.dynamic_depths:
        kw["dynamic_depths"] = tuple(int_list(args.dynamic_depths, "--dynamic-depths"))
    cfg = ReproduceConfig(out=args.out, budget_min=args.budget_min, data=args.data, arch=args.arch, vocab=args.vocab,
                          steps=args.steps, max_steps=args.max_steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, lr=args.lr,
                          seed=args.seed, function_prompts=args.function_prompts,
                          humaneval_prompts=args.humaneval_prompts, max_new_tokens=args.max_new_tokens,
                          eval_sequences=args.eval_sequences, threads=args.threads, progress=not args.no_progress,
                          compile=not args.no_compile,
                          **kw)
    report = Reproduction(cfg).run()
    s = report["summary"]
    if args.json:
        print(json.dumps(s))
    else:
        for c in s["checks"]:
            print(f"{'met    ' if c['met'] else 'NOT met'}  {c['target']}: {c['value']}")
        print(f"report: {report['markdown']}", file=sys.stderr)
    return 0
