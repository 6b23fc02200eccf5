"""Self-speculative settings against autoregressive decoding, measured robustly to a drifting machine.

    python benchmarks/confirm_speedup.py --model nano-layerskip --settings 6:6,4:6,4:10:0.15,6:16:0:4
    python benchmarks/confirm_speedup.py --model repro/export/layerskip --prompts repro --settings 4:6 --repeats 5

Each setting is E:d (static drafting), E:d:stop or E:d:stop:growth (dynamic drafting: at most d drafts, stopping
where the exit head's top probability falls below stop (0: never), the round's length adapting by growth:
generation/draft_length.py); a stop ending in "m" (E:d:0.4m[:growth]) is a threshold on the chance of a stop model
fitted here, per exit, on other prompts than those measured (reproduce/data.stop_fit_prompts: 36 held-out functions
+ 36 HumanEval; generation/draft_stop.py). Every prompt is decoded back to back by autoregressive decoding and each setting
(analysis/confirm.py, the method of `layerskip reproduce`'s confirmation stage); a setting's speedup is the median
over the repeats of its tokens/s over the same repeat's autoregressive tokens/s. Greedy; outputs must be identical.
--prompts: 'humaneval', 'reproduce' (the prompts `layerskip reproduce` evaluates on: 12 held-out functions + 12
HumanEval), a JSONL with a 'prompt' field, or a reproduce output folder (its held-out prompts). --batch-size B: the
prompts decoded B at a time (one generate call per group; a setting's tokens/s then counts every row of a group).
--temperature T (> 0; with --top-k, --top-p, --seed): sampled instead of greedy, every setting and autoregressive
decoding drawing with the same seeds (prompt group q: seed + q). Outputs are draws, not compared (the sampling tests
show the distribution is the model's); a plain stop applies to the draft distributions, a fitted one is greedy-only.
--write-default (sampling): store the fastest setting as the model's sampling default (config.json
layerskip.sampling, what `generate(..., temperature > 0)` self-speculates with; the greedy setting is kept).

    python benchmarks/confirm_speedup.py --model nano-layerskip --prompts reproduce --settings 5:6,5:16:0:4 \
        --temperature 0.7 --top-p 0.95
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from layerskip_ext.analysis.confirm import Setting, interleaved_speedups
from layerskip_ext.analysis.decode_runs import Sampling
from layerskip_ext.analysis.draft_stop_fit import fit_stop_model
from layerskip_ext.generation.draft_stop import FEATURES
from layerskip_ext.io.layerskip_block import write_sampling_setting
from layerskip_ext.model import load_model
from layerskip_ext.prompts import humaneval_path, read_prompts
from layerskip_ext.reproduce.data import evaluation_prompts, held_out_dirs, stdlib_dir, stop_fit_prompts


def parse_setting(text: str) -> tuple[Setting, bool]:
    """-> (the setting, whether its stop is a fitted stop model's threshold)."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 4):
        raise SystemExit(f"--settings: {text!r} is not E:d, E:d:stop or E:d:stop:growth")
    fitted = len(parts) > 2 and parts[2].endswith("m")
    try:
        return Setting(int(parts[0]), int(parts[1]), float(parts[2].rstrip("m")) if len(parts) > 2 else 0.0,
                       int(parts[3]) if len(parts) > 3 else 0), fitted
    except ValueError:
        raise SystemExit(f"--settings: {text!r}: E, d and growth are integers, stop a probability") from None


def load_prompts(spec: str, limit: int) -> list[str]:
    if spec == "reproduce":
        return [p["text"] for p in evaluation_prompts(held_out_dirs(stdlib_dir()), 12, 12)][:limit]
    if os.path.isdir(spec):
        with open(os.path.join(spec, "stages", "data.json"), encoding="utf-8") as f:
            return [p["text"] for p in json.load(f)["prompts"]][:limit]
    return read_prompts(humaneval_path() if spec == "humaneval" else spec)[:limit]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--settings", required=True, help="E:d, E:d:stop or E:d:stop:growth, comma-separated")
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="decode the prompts this many at a time, one generate call per group (default 1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: sample (default 0: greedy)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-default", action="store_true",
                    help="with --temperature: store the fastest setting as the model's sampling default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    parsed = [parse_setting(s) for s in args.settings.split(",") if s]
    settings = [s for s, _ in parsed]
    sampling = None
    if args.write_default and not args.temperature:
        raise SystemExit("--write-default stores a sampling default (with --temperature); the greedy default is "
                         "layerskip sweep --write-default's")
    if args.temperature:
        try:
            sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        except ValueError as e:
            raise SystemExit(f"--temperature: {e}") from None
        if any(fitted for _, fitted in parsed):
            raise SystemExit("--temperature: a fitted stop (E:d:0.4m) is greedy-only; a plain stop (E:d:0.4) "
                             "samples")
    model, tokenizer = load_model(args.model, backend="auto")
    prompts = [tokenizer.encode(t) for t in load_prompts(args.prompts, args.num_prompts)]
    stops = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids or [])
    fits, fit_exits = {}, sorted({s.exit_layer for s, fitted in parsed if fitted})
    fit_on = [tokenizer.encode(t) for t in stop_fit_prompts(held_out_dirs(stdlib_dir()), 36, 36)] if fit_exits else []
    for E in fit_exits:
        fits[E] = fit_stop_model(model, fit_on, E, args.max_new_tokens, stops)
        print(f"stop model, exit {E}: fitted on {fits[E].tokens} draft positions of {len(fit_on)} other prompts "
              f"(agreement {fits[E].agreement:.3f}, AUC {fits[E].auc:.3f}): "
              + ", ".join(f"{n} {w:+.3f}" for n, w in zip(FEATURES, fits[E].weights)))
    for s, fitted in parsed:
        if fitted:
            s.draft_stop_model = fits[s.exit_layer].weights
    ar = interleaved_speedups(model, prompts, settings, args.repeats, args.max_new_tokens, stops, args.batch_size,
                              sampling)
    how = "greedy" if sampling is None else (f"sampled (temperature {sampling.temperature:g}, top-k {sampling.top_k}, "
                                             f"top-p {sampling.top_p:g}, seed {sampling.seed})")
    print(f"{args.model}: {len(prompts)} prompts x {args.max_new_tokens} new tokens, {how}, batch {args.batch_size}, "
          f"{args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; autoregressive tokens/s per repeat: "
          + ", ".join(f"{x:.1f}" for x in ar))
    print(f"{'setting':<34} {'speedup':>8} {'accept':>7}  per repeat")
    for s in settings:
        print(f"{s.label:<34} {s.speedup:7.2f}x {s.acceptance:7.3f}  " + ", ".join(f"{x:.3f}" for x in s.speedups)
              + ("  OUTPUT DIFFERS FROM AUTOREGRESSIVE" if s.equal_to_ar is False else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "batch_size": args.batch_size, "autoregressive_tokens_per_s": ar,
                       "sampling": None if sampling is None else vars(sampling),
                       "settings": [dict(label=s.label, exit_layer=s.exit_layer, num_speculations=s.num_speculations,
                                         draft_stop=s.draft_stop, draft_growth=s.draft_growth,
                                         draft_stop_model=s.draft_stop_model, speedup=s.speedup,
                                         speedups=s.speedups, acceptance=s.acceptance,
                                         equal_to_ar=s.equal_to_ar) for s in settings]},
                      f, indent=1)
    if args.write_default:
        best = max(settings, key=lambda s: s.speedup)
        path = write_sampling_setting(args.model, best.exit_layer, best.num_speculations, dict(
            draft_stop=best.draft_stop, draft_growth=best.draft_growth, speedup=round(best.speedup, 3),
            acceptance=round(best.acceptance, 4), measured_with=vars(sampling),
            source=f"benchmarks/confirm_speedup.py --prompts {args.prompts} ({args.repeats} interleaved repeats)"))
        print(f"wrote the sampling default {best.label} ({best.speedup:.2f}x) to {path}")
    return 1 if any(s.equal_to_ar is False for s in settings) else 0


if __name__ == "__main__":
    sys.exit(main())
