"""Greedy decode tokens/s: ours (native ops and reference path) vs Hugging Face transformers, same weights, one run.

    python benchmarks/decode_vs_transformers.py --model smollm2-135m --new-tokens 128 --repeats 3 --json out.json

transformers (an optional extra) gets the very tensors we loaded, so both engines compute with identical weights.
Each engine is warmed up once, then timed `--repeats` times; the median is reported. Decode tokens/s counts the
tokens after the first (the first comes out of the prompt pass), per second after the first.
Also reported: whether greedy tokens agree across engines, and the max logit difference at the prompt's last
position.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from layerskip_ext.generation import generate
from layerskip_ext.model import load_model

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def time_ours(model, prompt_ids, new_tokens, repeats):
    runs = []
    for i in range(repeats + 1):
        r = generate(model, prompt_ids, max_new_tokens=new_tokens, stop_token_ids=[], strategy="autoregressive")
        if i:  # the first run is warm-up
            runs.append((r.decode_tokens_per_s, r.prefill_s))
        tokens = r.sequences[0].tokens
    return statistics.median(t for t, _ in runs), statistics.median(p for _, p in runs), tokens


def time_transformers(hf, prompt_ids, new_tokens, repeats):
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    runs = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        t2 = time.perf_counter()
        if i:
            prefill = t1 - t0
            runs.append(((new_tokens - 1) / max(t2 - t1 - prefill, 1e-9), prefill))
    return statistics.median(t for t, _ in runs), statistics.median(p for _, p in runs), out[0, len(prompt_ids):].tolist()


def build_transformers(model):
    """A transformers LlamaForCausalLM holding copies of our tensors (same values, same dtype)."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
    hf.load_state_dict(model.state_dict(), strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.dtype).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    native, tokenizer = load_model(args.model, dtype=args.dtype, backend="native")
    reference, _ = load_model(args.model, dtype=args.dtype, backend="reference")
    prompt_ids = tokenizer.encode(PROMPT)
    rows = {}
    for name, model in (("ours (native ops)", native), ("ours (reference path)", reference)):
        rows[name] = time_ours(model, prompt_ids, args.new_tokens, args.repeats)
    try:
        hf = build_transformers(native)
        rows["transformers (eager)"] = time_transformers(hf, prompt_ids, args.new_tokens, args.repeats)
        with torch.no_grad():
            hf_logits = hf(torch.tensor([prompt_ids])).logits[0, -1].float()
        max_diff = (native(torch.tensor([prompt_ids]))[0, -1].float() - hf_logits).abs().max().item()
    except ImportError:
        max_diff = None
        print("transformers is not installed (pip install .[hf]); skipping it")

    base = rows.get("transformers (eager)", rows["ours (reference path)"])
    ref_tokens = rows["ours (reference path)"][2]
    print(f"model {args.model}, {args.dtype}, {torch.get_num_threads()} threads, prompt {len(prompt_ids)} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'engine':<24} {'decode tok/s':>12} {'prefill s':>10} {'vs transformers':>16} {'tokens == ref':>14}")
    for name, (tps, prefill, toks) in rows.items():
        print(f"{name:<24} {tps:>12.1f} {prefill:>10.3f} {tps / base[0]:>15.2f}x {str(toks == ref_tokens):>14}")
    if max_diff is not None:
        print(f"max |logit difference| ours native vs transformers at the last prompt position: {max_diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "new_tokens": args.new_tokens, "repeats": args.repeats, "max_logit_diff": max_diff,
                       "engines": {n: {"decode_tokens_per_s": t, "prefill_s": p, "tokens_equal_reference": k == ref_tokens}
                                   for n, (t, p, k) in rows.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
