"""End-to-end decode speed, every engine measured in the same run on the same prompts and weights.

    python benchmarks/e2e.py --model smollm2-135m --prompts humaneval --limit 8 --new-tokens 128 \
        --spec 8:3,15:3,24:6 --json benchmarks/results/e2e_smollm2.json

Rows: our autoregressive decode, early exit at each E given, self-speculative at each (E, d), and Hugging Face
transformers (optional extra) as a peer. Each row: decode tokens/s (median over prompts, after one warm-up
prompt), the fraction of the memory-bandwidth floor (weight bytes read per full-model token / --bandwidth), and
for self-speculation the acceptance rate, tokens per full-model pass and whether the output equals AR's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from layerskip_ext.generation import generate
from layerskip_ext.model import load_model
from layerskip_ext.prompts import humaneval_path, read_prompts


def weight_bytes(model) -> int:
    """Bytes of weights one full-model decode step reads (embedding row excluded, tied head counted once)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def run_engine(fn, prompts):
    """fn(prompt) -> (tokens, decode tokens/s, stats). First prompt is warm-up."""
    fn(prompts[0])
    speeds, outs, stats = [], [], []
    for p in prompts:
        toks, tps, st = fn(p)
        speeds.append(tps)
        outs.append(toks)
        stats.append(st)
    return statistics.median(speeds), outs, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--early-exit", default="", help="comma-separated exit layers for lossy early exit rows")
    ap.add_argument("--spec", default="8:3,15:3,24:6", help="comma-separated E:d pairs")
    ap.add_argument("--transformers", action="store_true", help="add a Hugging Face transformers row")
    ap.add_argument("--bandwidth", type=float, default=52.9e9, help="read bandwidth, bytes/s (measurements.md)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=args.dtype, backend=args.backend)
    texts = read_prompts(humaneval_path() if args.prompts == "humaneval" else args.prompts)[: args.limit]
    prompts = [tok.encode(t) for t in texts]
    n = args.new_tokens
    floor_tps = args.bandwidth / weight_bytes(model)

    def ours(strategy, **kw):
        def fn(p):
            r = generate(model, p, strategy=strategy, max_new_tokens=n, stop_token_ids=[], **kw)
            return r.sequences[0].tokens, r.decode_tokens_per_s, r.stats
        return fn

    rows = []
    ar_tps, ar_out, _ = run_engine(ours("autoregressive"), prompts)
    rows.append(dict(engine="ours autoregressive", tokens_per_s=ar_tps))
    for E in [int(x) for x in args.early_exit.split(",") if x]:
        tps, _, _ = run_engine(ours("early_exit", exit_layer=E), prompts)
        rows.append(dict(engine=f"ours early exit E={E} (lossy)", tokens_per_s=tps))
    for pair in [x for x in args.spec.split(",") if x]:
        E, d = (int(v) for v in pair.split(":"))
        tps, outs, stats = run_engine(ours("self_speculative", exit_layer=E, num_speculations=d), prompts)
        drafted = sum(s["draft_tokens"] for s in stats)
        rows.append(dict(engine=f"ours self-speculative E={E} d={d}", tokens_per_s=tps,
                         acceptance=sum(s["accepted_tokens"] for s in stats) / max(drafted, 1),
                         tokens_per_pass=sum(len(o) - 1 for o in outs) / max(sum(s["rounds"] for s in stats), 1),
                         equals_ar=outs == ar_out))
    if args.transformers:
        import transformers

        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
        hf.load_state_dict(model.state_dict(), strict=False)
        hf = hf.to(model.dtype).eval()

        def hf_fn(p):
            ids = torch.tensor([p])
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            t2 = time.perf_counter()
            return out[0, len(p):].tolist(), (n - 1) / ((t2 - t1) - (t1 - t0)), {}
        tps, outs, _ = run_engine(hf_fn, prompts)
        rows.append(dict(engine="transformers autoregressive", tokens_per_s=tps, equals_ar=outs == ar_out))

    print(f"{args.model} {args.dtype} backend={model.ops.name} threads={torch.get_num_threads()} "
          f"prompts={len(prompts)} new_tokens={n}; floor {floor_tps:.0f} tokens/s "
          f"({weight_bytes(model) / 1e6:.0f} MB / {args.bandwidth / 1e9:.1f} GB/s)")
    print(f"{'engine':<38} {'tok/s':>7} {'vs AR':>6} {'floor':>6} {'accept':>7} {'tok/pass':>8} {'==AR':>5}")
    for r in rows:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar_tps
        r["fraction_of_floor"] = r["tokens_per_s"] / floor_tps
        acc = f"{r['acceptance']:.3f}" if "acceptance" in r else "-"
        tpp = f"{r['tokens_per_pass']:.2f}" if "tokens_per_pass" in r else "-"
        eq = str(r.get("equals_ar", "-"))
        print(f"{r['engine']:<38} {r['tokens_per_s']:>7.1f} {r['speedup_vs_ar']:>5.2f}x {r['fraction_of_floor']:>6.2f} "
              f"{acc:>7} {tpp:>8} {eq:>5}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), floor_tokens_per_s=floor_tps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
