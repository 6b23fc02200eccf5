"""Token efficiency of `layerskip reproduce`'s training at a fixed token budget: the same shape trained with different
batch sizes (so different optimizer step counts) on the same tokens, then its held-out perplexity, its exits'
agreement with the last layer, and the share of its own greedy continuations that a shallow exit predicts (the
acceptance of d=1 drafts; near 1 when a weak model's output loops).

    python benchmarks/batch_size_tokens.py --out exp --tokens 670000 --runs b16:16,b8:8,b4:4,ls8:8:layerskip

Each run is NAME:BATCH[:RECIPE] (recipe baseline or layerskip, as the reproduction trains them; lr --lr for all).
Results accumulate in OUT/results.json (a finished run is not trained again); the data stage (tokenizer, held-out
sequences, prompts) is the reproduction's own.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from layerskip_ext.analysis.per_layer import per_layer_metrics
from layerskip_ext.generation import generate
from layerskip_ext.io import load_checkpoint, save_hf_folder
from layerskip_ext.model import load_model
from layerskip_ext.reproduce import plan as planning
from layerskip_ext.reproduce.pipeline import ReproduceConfig, Reproduction
from layerskip_ext.training.trainer import run_training

EXITS = (2, 3, 4, 6, 8)


def own_output_acceptance(model, prompts: list[list[int]], new_tokens: int) -> dict[int, float]:
    """{exit E: share of the model's own greedy tokens that exit E's top-1 predicts}: per-layer accuracy on
    prompt + continuation, minus what the prompt's own positions contribute (a causal model scores them alike)."""
    gens = [s.tokens for s in generate(model, prompts, strategy="autoregressive",
                                       max_new_tokens=new_tokens).sequences]
    hits = dict.fromkeys(EXITS, 0.0)
    n = 0
    for p, g in zip(prompts, gens):
        full = per_layer_metrics(model, torch.tensor([p + list(g)]), batch_size=1, layers=EXITS)
        head = per_layer_metrics(model, torch.tensor([p]), batch_size=1, layers=EXITS) if len(p) > 1 else None
        for i, e in enumerate(EXITS):
            hits[e] += full[i].accuracy * full[i].tokens - (head[i].accuracy * head[i].tokens if head else 0.0)
        n += len(g)
    return {str(e): max(0.0, round(h / max(1, n), 3)) for e, h in hits.items()}  # str keys: as JSON reads back


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=670_000, help="training tokens per run")
    ap.add_argument("--runs", required=True, metavar="NAME:BATCH[:RECIPE],...")
    ap.add_argument("--arch", default="16,192,6,2,512")
    ap.add_argument("--lr", type=float, default=ReproduceConfig.lr)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    arch = planning.Arch.parse(args.arch)
    rep = Reproduction(ReproduceConfig(out=args.out, progress=False))
    data = rep.stage("data", rep.prepare_data)
    with open(os.path.join(rep.stages, "eval_sequences.json"), encoding="utf-8") as f:
        seqs = torch.tensor(json.load(f), dtype=torch.int64)
    path = os.path.join(rep.out, "results.json")
    results = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    for spec in args.runs.split(","):
        name, batch, *rest = spec.split(":")
        recipe = rest[0] if rest else "baseline"
        if name in results:
            continue
        batch = int(batch)
        steps = max(1, args.tokens // (batch * ReproduceConfig.seq_len))
        tc = rep.train_config(recipe, arch, steps, data["vocab"], compile=not args.no_compile)
        tc.out, tc.batch_size, tc.lr, tc.save_every = os.path.join(rep.out, name), batch, args.lr, 0
        t = time.time()
        summary = run_training(tc, log=lambda m, name=name: print(name, m, flush=True))
        train_s = time.time() - t
        ckpt = load_checkpoint(tc.out, dtype=torch.float32)
        folder = os.path.join(rep.out, "export", name)
        save_hf_folder(folder, ckpt.config, ckpt.state_dict, tokenizer=ckpt.tokenizer, dtype=torch.bfloat16)
        model, tokenizer = load_model(folder, backend="auto")
        metrics = per_layer_metrics(model, seqs, batch_size=8)
        prompts = [tokenizer.encode(p["text"]) for p in data["prompts"]]
        results[name] = {"batch": batch, "recipe": recipe, "steps": steps, "tokens": steps * batch * tc.seq_len,
                         "lr": args.lr, "train_s": round(train_s, 1),
                         "tokens_per_s": summary["throughput"]["tokens_per_s"],
                         "perplexity": round(metrics[-1].perplexity, 1),
                         "agreement": {str(m.layer): round(m.agreement, 3) for m in metrics if m.layer in EXITS},
                         "own_output_d1_acceptance": own_output_acceptance(model, prompts, args.new_tokens)}
        print("RESULT", name, json.dumps(results[name]), flush=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    print(f"{'run':>6} {'batch':>5} {'steps':>5} {'tokens/s':>8} {'ppl':>7}  own-output d=1 acceptance at "
          f"{', '.join(map(str, EXITS))}")
    for name, r in results.items():
        acc = ", ".join(f"{r['own_output_d1_acceptance'][str(e)]:.2f}" for e in EXITS)
        print(f"{name:>6} {r['batch']:>5} {r['steps']:>5} {r['tokens_per_s']:>8.0f} {r['perplexity']:>7.1f}  {acc}")


if __name__ == "__main__":
    main()
