"""How good must an exit be? The per-token agreement alpha(E) that self-speculative greedy decoding needs to reach a
target speedup over autoregressive decoding on this machine, from the cost model fed with stage costs measured
here (analysis/cost_measure.py; the arithmetic is analysis/cost_model.py).

    python benchmarks/alpha_needed.py --model smollm2-135m --draft-vocab auto --targets 1.2,1.5,2 \
        --json benchmarks/results/alpha_needed.json

For each exit E and draft length d: the ceiling (speedup if every draft were accepted) and the alpha each target
needs ("-": out of reach even at alpha = 1). Put it next to a model's measured agreement per layer (layerskip
analyze) to see which (E, d) can pay, before training for it.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from layerskip_ext.analysis.cost_measure import measure_stage_costs
from layerskip_ext.analysis.cost_model import alpha_needed, speedup_ceiling
from layerskip_ext.analysis.decode_runs import run_prompts
from layerskip_ext.commands.common import int_list, setup_threads
from layerskip_ext.model import load_model
from layerskip_ext.model.draft_vocab import load_draft_vocab, stored_draft_vocab_path


def ar_step_seconds(model, prompt_len: int, new_tokens: int, repeats: int = 3) -> float:
    """Autoregressive decode seconds per token (after the prompt's token) over `repeats` runs, after a warm-up."""
    prompt = [(i * 7919) % (model.config.vocab_size - 100) + 50 for i in range(prompt_len)]
    run_prompts(model, [prompt], 8, [])
    ar = run_prompts(model, [prompt] * repeats, new_tokens, [])
    return ar.decode_s / ar.decode_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--draft-vocab", default="auto", help="a file, 'auto' (the model's stored one) or 'none'")
    ap.add_argument("--exit-layers", default=None, help="comma-separated; default: 2, 4, ..., L - 2")
    ap.add_argument("--num-speculations", default="1,2,3,4,6")
    ap.add_argument("--targets", default="1.2,1.5,2")
    ap.add_argument("--position", type=int, default=160, help="tokens in the cache while timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    depths = int_list(args.num_speculations, "--num-speculations")

    model, _ = load_model(args.model, dtype=args.dtype, draft_vocab=None)
    L = model.num_layers
    exits = int_list(args.exit_layers, "--exit-layers") if args.exit_layers else list(range(2, L - 1, 2))
    dv = None
    if args.draft_vocab != "none":
        source = stored_draft_vocab_path(args.model) if args.draft_vocab == "auto" else args.draft_vocab
        dv = load_draft_vocab(source, model.config.vocab_size) if source else None
    t0 = time.time()
    ar = ar_step_seconds(model, args.position, 48)
    costs = measure_stage_costs(model, args.position, depths, ar, draft_vocab=dv)
    rows = []
    for E in exits:
        for d in depths:
            rows.append(dict(exit_layer=E, d=d, ceiling=round(speedup_ceiling(costs, E, d), 3),
                             alpha={str(t): (None if (a := alpha_needed(costs, E, d, t)) is None else round(a, 3))
                                    for t in targets}))
    vocab = f"draft vocabulary of {len(dv)} tokens" if dv is not None else "full-vocabulary draft head"
    print(f"{args.model} {args.dtype}, {torch.get_num_threads()} threads, {vocab}; autoregressive step "
          f"{ar * 1e3:.2f} ms; measured in {time.time() - t0:.0f} s\n")
    print("| E | d | ceiling | " + " | ".join(f"alpha for {t:g}x" for t in targets) + " |")
    print("|---:|---:|---:|" + "---:|" * len(targets))
    for r in rows:
        cells = ["-" if r["alpha"][str(t)] is None else f"{r['alpha'][str(t)]:.2f}" for t in targets]
        print(f"| {r['exit_layer']} | {r['d']} | {r['ceiling']:.2f}x | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(model=args.model, dtype=args.dtype, threads=torch.get_num_threads(), draft_vocab=vocab,
                           stage_costs=costs.to_dict(), targets=targets, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
