"""Cost of a T-token pass relative to a 1-token decode step, at a realistic cache depth.

    python benchmarks/verify_cost.py --model smollm2-135m --context 256 --depths 1,2,4,5,7 --exit-layer 15

For each T: the full model (all layers + head) over T new tokens, and the verification stage of
self-speculation (layers >= E + head over T = d+1 tokens), each as a ratio to one full decode step (T = 1).
Design target: a full pass over d+1 <= 7 tokens costs < 1.5x one decode step (the weights are read once).
Median of --repeats timings after --warmup, all measured in this one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerskip_ext.model import load_model


def median_time(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    ap.add_argument("--depths", default="1,2,4,5,7", help="T values (d+1)")
    ap.add_argument("--exit-layer", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = load_model(args.model, dtype=args.dtype, backend=args.backend)
    depths = [int(x) for x in args.depths.split(",")]
    cache = model.new_cache(1, args.context + max(depths) + 1)
    g = torch.Generator().manual_seed(0)
    model(torch.randint(0, model.config.vocab_size, (1, args.context), generator=g), cache=cache)
    start = torch.tensor([args.context])
    E = args.exit_layer

    def full(T):
        tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
        return lambda: model(tokens, start=start, cache=cache)

    def verify(T):
        h = torch.randn(1, T, model.config.hidden_size, generator=g).to(model.dtype)

        def run():
            dec = model.decoder
            dec.head_argmax(dec.layers(h, E, model.num_layers, dec.state(start, T, cache)))
        return run

    base = median_time(full(1), args.warmup, args.repeats)
    print(f"{args.model} {args.dtype} backend={model.decoder.name} threads={torch.get_num_threads()} "
          f"context={args.context}; one decode step (T=1, all {model.num_layers} layers + logits): {base * 1e3:.2f} ms")
    print(f"{'T':>3} {'full T / full 1':>16} {'verify (layers >= %d) / full 1' % E:>32}")
    for T in depths:
        f = median_time(full(T), args.warmup, args.repeats)
        v = median_time(verify(T), args.warmup, args.repeats)
        print(f"{T:>3} {f / base:>16.2f} {v / base:>32.2f}")


if __name__ == "__main__":
    main()
