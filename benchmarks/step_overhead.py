"""Where a decode step's time goes outside the kernels, and how many Python calls a round makes.

    python benchmarks/step_overhead.py                                   # 16 layers x 192 wide, random weights
    python benchmarks/step_overhead.py --model smollm2-135m --spec 8:3  # a real model
    python benchmarks/step_overhead.py --json out.json

For each run (several, to show how stable it is): an autoregressive decode and a greedy self-speculative one, with
every decoder kernel timed (Decoder kernels' ``timed``): the step / round time, the part inside the kernels
(layer ranges, exit heads, greedy drafts, verification) and the rest (Python, tensor bookkeeping, the host read),
as milliseconds and as a share. Then the Python function calls made inside the package per greedy round
(``sys.setprofile`` around one generate(): the decode loop's own calls, prefill and argument checks included).
On a small model the time outside the kernels is a large part of a step, which a speculative round amortises:
speedups measured at that size measure the loop unless this share is small.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import layerskip_ext
from layerskip_ext.analysis.step_profile import timed_decode
from layerskip_ext.config import LlamaConfig
from layerskip_ext.generation import generate
from layerskip_ext.model import LlamaForCausalLM, load_model

PKG = os.path.dirname(layerskip_ext.__file__)


def random_model(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int, seed: int = 0):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    sd = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) / s[-1] ** 0.5
          for k, s in shapes.items()}
    model = LlamaForCausalLM.from_state_dict(cfg, sd)
    model.build_decoder("native")
    return model


def calls_per_round(model, prompt, n: int, E: int, d: int) -> tuple[float, list]:
    counts: dict[str, int] = {}

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PKG):
            key = f"{os.path.relpath(frame.f_code.co_filename, PKG)}:{frame.f_code.co_name}"
            counts[key] = counts.get(key, 0) + 1

    kw = dict(max_new_tokens=n, stop_token_ids=[], strategy="self_speculative", exit_layer=E, num_speculations=d)
    generate(model, prompt, **kw)
    sys.setprofile(prof)
    try:
        r = generate(model, prompt, **kw)
    finally:
        sys.setprofile(None)
    rounds = r.stats["rounds"]
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
    return sum(counts.values()) / rounds, [(k, round(v / rounds, 2)) for k, v in top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint (default: a random model of --shape)")
    ap.add_argument("--shape", default="16,192,6,2,512,4096", help="layers,hidden,heads,kv_heads,intermediate,vocab")
    ap.add_argument("--spec", default="8:3", help="E:d of the self-speculative run")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model, tok = load_model(args.model, backend="native")
        prompt = tok.encode("def fibonacci(n):\n")
        label = args.model
    else:
        shape = [int(x) for x in args.shape.split(",")]
        model = random_model(*shape)
        prompt = torch.randint(0, shape[-1], (16,), generator=torch.Generator().manual_seed(1)).tolist()
        label = "random " + "x".join(map(str, shape))
    E, d = (int(x) for x in args.spec.split(":"))
    for kw in (dict(strategy="autoregressive"), dict(strategy="self_speculative", exit_layer=E, num_speculations=d)):
        generate(model, prompt, max_new_tokens=16, stop_token_ids=[], **kw)  # warm-up
    out = dict(model=label, threads=args.threads, new_tokens=args.new_tokens, runs={})
    for name, kw in (("autoregressive", dict(strategy="autoregressive")),
                     (f"self-speculative E={E} d={d}",
                      dict(strategy="self_speculative", exit_layer=E, num_speculations=d))):
        runs = [timed_decode(model, prompt, args.new_tokens, **kw) for _ in range(args.runs)]
        out["runs"][name] = runs
        step = [r["step_ms"] for r in runs]
        pct = [r["outside_pct"] for r in runs]
        print(f"{label} {name}: {'round' if 'spec' in name else 'step'} {statistics.median(step):.3f} ms "
              f"(runs {min(step):.3f}-{max(step):.3f}), outside the kernels {statistics.median(pct):.1f}% "
              f"(runs {min(pct):.1f}-{max(pct):.1f}%), {statistics.median(r['outside_ms'] for r in runs):.3f} ms")
    calls, top = calls_per_round(model, prompt, args.new_tokens, E, d)
    out["calls_per_round"], out["top_calls"] = round(calls, 1), top
    print(f"Python calls inside the package per greedy round (E={E} d={d}): {calls:.1f}")
    for k, v in top:
        print(f"  {v:6.2f}  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
