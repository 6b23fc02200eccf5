"""End-to-end greedy decoding and prefill of SmolLM2-135M with the native op set, optionally with the weights
moved onto 2 MB pages (model/hugepages.py).

    python benchmarks/bench_decode.py                            # float32 + bfloat16, 2 threads, both page sizes
    python benchmarks/bench_decode.py --dtypes float32 --threads 1 2 --pages huge --new-tokens 128 --runs 3

Each row: best-of-runs decode tokens/s (tokens after the first, as the CLI's tokens_per_s), prefill tokens/s of a
512-token prompt, and the share of decode time spent outside the two native calls of a step (layers, head).
Machines are shared and noisy: compare within one run.
"""
from __future__ import annotations

import argparse
import json

import torch

from layerskip_ext.generation import generate
from layerskip_ext.model import load_model
from layerskip_ext.model.decoder import native_kernels

_native_s = [0.0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--pages", nargs="+", default=["4k", "huge"], choices=["4k", "huge"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--json")
    args = ap.parse_args()
    kernels = native_kernels().timed(_native_s)  # each native call adds its time to _native_s[0]
    rows = []
    for dtype in args.dtypes:
        for pages in args.pages:
            model, tok = load_model(args.model, dtype=dtype, hugepages=pages == "huge")
            model.build_decoder(kernels)
            prompt = [tok.encode(args.prompt)]
            long_prompt = torch.randint(0, model.config.vocab_size, (512,)).tolist()
            for threads in args.threads:
                torch.set_num_threads(threads)
                generate(model, prompt, max_new_tokens=8, strategy="autoregressive")  # warm up
                best = None
                for _ in range(args.runs):
                    _native_s[0] = 0.0
                    r = generate(model, prompt, max_new_tokens=args.new_tokens, strategy="autoregressive")
                    outside = 1 - _native_s[0] / r.time_s
                    if best is None or r.decode_tokens_per_s > best[0]:
                        best = (r.decode_tokens_per_s, outside)
                prefill = max(512 / generate(model, [long_prompt], max_new_tokens=1).prefill_s
                              for _ in range(args.runs))
                row = dict(dtype=dtype, pages=pages, threads=threads, decode_tokens_per_s=round(best[0], 1),
                           prefill_tokens_per_s=round(prefill), outside_native_pct=round(100 * best[1], 1))
                rows.append(row)
                print(f"{dtype:9s} {pages:4s} pages  threads={threads}  decode {row['decode_tokens_per_s']:6.1f} tok/s"
                      f"  prefill(512) {row['prefill_tokens_per_s']:5d} tok/s"
                      f"  outside native calls {row['outside_native_pct']}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
