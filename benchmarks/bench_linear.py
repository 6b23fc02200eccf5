"""Weight-streaming GB/s of ops.linear vs torch F.linear on SmolLM2-135M shapes, as in decode / verification.

    python benchmarks/bench_linear.py                    # M = 1 and 7, float32 and bfloat16, 1 and 2 threads
    python benchmarks/bench_linear.py --M 1 2 7 16 64 --dtypes float32 --threads 2 --json out.json

Every matrix of the model (30 layers x q, k, v, o, gate, up, down, plus the 49152 x 576 LM head: 538 MB in
float32) is allocated once and a "sweep" runs one linear per matrix in model order, so weights stream from memory
as in a real decode step (one matrix timed in a loop would sit in cache). Reported per (impl, dtype, M, threads):
best-of-N sweep time, GB/s of weight bytes read, and per-kind GB/s. Machines are shared and noisy: compare within
one run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from layerskip_ext import ops

H, I, NH, NKV, D, L, V = 576, 1536, 9, 3, 64, 30, 49152
KINDS = {"q": (NH * D, H), "k": (NKV * D, H), "v": (NKV * D, H), "o": (H, NH * D), "gate": (I, H), "up": (I, H),
         "down": (H, I)}


def make_weights(dtype):
    g = torch.Generator().manual_seed(0)
    ws = []
    for _ in range(L):
        for kind, shape in KINDS.items():
            ws.append((kind, (torch.randn(shape, generator=g) * 0.05).to(dtype)))
    ws.append(("head", (torch.randn((V, H), generator=g) * 0.05).to(dtype)))
    return ws


def sweep_time(fn, ws, xs, reps):
    best = float("inf")
    per_kind = {}
    for r in range(reps):
        kind_t = {}
        t0 = time.perf_counter()
        for kind, w in ws:
            t = time.perf_counter()
            fn(xs[w.shape[1]], w)
            kind_t[kind] = kind_t.get(kind, 0.0) + time.perf_counter() - t
        dt = time.perf_counter() - t0
        if dt < best:
            best, per_kind = dt, kind_t
    return best, per_kind


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, nargs="+", default=[1, 7])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--impls", nargs="+", default=["native", "torch"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    impls = {"native": ops.linear, "torch": F.linear}
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ws = make_weights(dtype)
        kind_bytes = {}
        for kind, w in ws:
            kind_bytes[kind] = kind_bytes.get(kind, 0) + w.numel() * w.element_size()
        total = sum(kind_bytes.values())
        for M in args.M:
            xs = {K: torch.randn(M, K).to(dtype) for K in (H, I)}
            for threads in args.threads:
                torch.set_num_threads(threads)
                for impl in args.impls:
                    fn = impls[impl]
                    sweep_time(fn, ws, xs, 1)  # warm up
                    best, per_kind = sweep_time(fn, ws, xs, args.reps)
                    row = dict(impl=impl, dtype=dtype_name, M=M, threads=threads, sweep_ms=round(best * 1e3, 2),
                               MB=round(total / 1e6, 1), GBps=round(total / best / 1e9, 2),
                               per_kind_GBps={k: round(kind_bytes[k] / t / 1e9, 1) for k, t in per_kind.items()})
                    rows.append(row)
                    print(f"{impl:7s} {dtype_name:9s} M={M:<3d} threads={threads}  sweep {row['sweep_ms']:8.2f} ms"
                          f"  {row['GBps']:6.2f} GB/s   " +
                          " ".join(f"{k}={v}" for k, v in row["per_kind_GBps"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
