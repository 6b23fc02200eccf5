"""Time one decode step (T = 1) and one verification pass (T = d + 1) of SmolLM2-135M: the decoder's layer range
(one native call) vs the same layers op by op (ops.layer_range_forward_native_composed), plus the exit head.

    python benchmarks/bench_step.py                        # float32 and bfloat16, context 128, 2 threads
    python benchmarks/bench_step.py --dtypes float32 --context 128 2048 --T 1 4 7 --threads 1 2 --json out.json
    python benchmarks/bench_step.py --hugepages            # weights moved onto 2 MB pages first

Each row: best-of-N milliseconds for all 30 layers, tokens/s this implies for autoregressive decoding
(layers + greedy head), GB/s of weights read, and the ratio of a T-token pass to the T = 1 pass.
Machines are shared and noisy: compare within one run; the script reports the CPU time other processes used.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from layerskip_ext import ops
from layerskip_ext.model import load_model


def busy_other(t0_stat):
    """Fraction of the machine's CPU time used while we ran (ours included), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    total = sum(v) - sum(t0_stat)
    idle = v[3] - t0_stat[3]
    return (total - idle) / total if total else 0.0


def stat_now():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:8]]


def best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, nargs="+", default=[128])
    ap.add_argument("--T", type=int, nargs="+", default=[1, 7])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--hugepages", action="store_true", help="move the weights onto 2 MB pages first")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes:
        model, _ = load_model(args.model, dtype=dtype, hugepages=args.hugepages, backend="native")
        dec = model.decoder
        L = model.num_layers

        def op_by_op(h, a, b, st):
            ks, vs = st.caches(a, b)
            return ops.layer_range_forward_native_composed(h, dec.weights(a, b), ks, vs, st.start, st.positions, st.cos,
                                                           st.sin, dec.num_heads, dec.num_kv_heads, dec.eps, dec.scale)

        layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
        for ctx in args.context:
            cache = model.new_cache(1, ctx + 16)
            for t in cache.k + cache.v:
                t.normal_()
            for threads in args.threads:
                torch.set_num_threads(threads)
                base = {}
                for T in args.T:
                    start = torch.tensor([ctx - 1])
                    st = dec.state(start, T, cache)
                    h = torch.randn(1, T, model.config.hidden_size).to(model.dtype)
                    s0 = stat_now()
                    head_ms = best_ms(lambda: dec.head_argmax(h[:, -1:]), args.reps)
                    for impl, fn in (("op_by_op", op_by_op), ("layer_range", dec.layers)):
                        ms = best_ms(lambda: fn(h, 0, L, st), args.reps)
                        if T == args.T[0]:
                            base[impl] = ms
                        row = dict(dtype=dtype, hugepages=args.hugepages, context=ctx, threads=threads, T=T, impl=impl, layers_ms=round(ms, 2),
                                   head_ms=round(head_ms, 2),
                                   ar_tokens_per_s=round(1e3 / (ms + head_ms), 1) if T == 1 else None,
                                   weights_GBps=round(layer_bytes / ms / 1e6, 1),
                                   vs_first_T=round(ms / base[impl], 2), busy=round(busy_other(s0), 2))
                        rows.append(row)
                        print(f"{dtype:9s} ctx={ctx:<5d} thr={threads} T={T:<2d} {impl:15s} layers {ms:7.2f} ms  "
                              f"head {head_ms:5.2f} ms  {row['weights_GBps']:5.1f} GB/s  x{row['vs_first_T']:.2f} "
                              f"vs T={args.T[0]}" + (f"  AR {row['ar_tokens_per_s']} tok/s" if T == 1 else "") +
                              f"  (machine busy {row['busy']:.0%})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
