"""How stable `layerskip reproduce`'s choice of shape is: the plan's decode timing of its candidate shapes, done
several times in one process, each time as the plan does it (reproduce/plan.py: DECODE_PASSES interleaved passes,
each shape's medians), with the cost model's best prediction per shape and the shape the plan would pick (equal
training steps for all, as under the default --max-steps, so predictions alone decide).

    python benchmarks/plan_shapes.py --repeats 3                # the plan as it is
    python benchmarks/plan_shapes.py --repeats 3 --passes 1     # one timing per shape, as before 2026-12-02

Random weights, vocabulary --vocab (the reproduction's 4096): no tokenizer or training needed.
"""
from __future__ import annotations

import argparse
import json

from layerskip_ext.reproduce import plan as planning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="whole plans timed (default 3)")
    ap.add_argument("--passes", type=int, default=planning.DECODE_PASSES,
                    help=f"interleaved passes per plan (default the plan's {planning.DECODE_PASSES})")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--depths", default="1,2,3,4,6")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    candidates = list(planning.CANDIDATES)
    plans = []
    for rep in range(args.repeats):
        costs = planning.time_candidates(candidates, args.vocab, depths, args.passes)
        rows = [planning.decode_costs(arch, args.vocab, c, depths) for arch, c in zip(candidates, costs)]
        for r in rows:
            r["tokens_in_budget"] = 1  # equal steps for every shape: the default plan's case
        pick = planning.choose_shape(rows)["label"]
        cells = "  ".join(f"{r['label'].split()[0]} {r['best']['speedup']:.2f}x (E={r['best']['exit_layer']} "
                          f"d={r['best']['num_speculations']}, layer {r['layer_ms']['1']:.3f} ms)" for r in rows)
        print(f"plan {rep + 1}: {cells}  -> {pick.split()[0]}", flush=True)
        plans.append({"rows": rows, "pick": pick})
    picks = [p["pick"].split()[0] for p in plans]
    print(f"picks over {args.repeats} plans of {args.passes} pass(es): "
          + ", ".join(f"{s} x{picks.count(s)}" for s in dict.fromkeys(picks)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(plans, f, indent=1)


if __name__ == "__main__":
    main()
