"""The reproduction's report: OUT/report.md (tables), OUT/report.json (every number), OUT/agreement.png (both
models' per-layer agreement and perplexity), and the shipped model's card (OUT/export/layerskip/README.md)."""
from __future__ import annotations

import json
import os
import platform
from typing import Optional

import torch

from ..analysis.confirm import Setting

# the issue's targets: LayerSkip's tuned speedup, the baseline's best, the perplexity gap, dynamic over static
TARGET_SPEEDUP, BASELINE_MAX, PPL_GAP, DYNAMIC_GAIN, TRAIN_EFFICIENCY = 1.6, 1.2, 0.05, 0.10, 0.5


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _trained_dtype(throughput: dict) -> str:
    return "fp32" if throughput.get("autocast") == "none" else str(throughput.get("autocast"))


def _best(ev: dict, key: str) -> Optional[dict]:
    """The confirmed best setting (interleaved repeats: pipeline.confirm) where there is one, else the sweep's."""
    conf = ev.get("confirm")
    if conf and key == "best_overall":
        return conf.get("best")
    return ev["sweep"].get(key)


def _dynamic_gain(ev: dict) -> Optional[float]:
    conf = ev.get("confirm")
    return conf["dynamic_gain"] if conf and "dynamic_gain" in conf else ev["sweep"].get("dynamic_gain")


def _last(ev: dict) -> dict:
    return ev["per_layer"][-1]


def summary(cfg, data: dict, plan: dict, runs: dict, evals: dict, minutes: float) -> dict:
    base, ls = evals["baseline"], evals["layerskip"]
    ppl_b, ppl_l = _last(base)["perplexity"], _last(ls)["perplexity"]
    ls_best, base_best = _best(ls, "best_overall"), _best(base, "best_overall")
    all_equal = all(c.get("equal_to_ar", True) for ev in (base, ls)
                    for c in ev["sweep"]["cells"] + ev["sweep"]["dynamic_cells"]
                    + (ev.get("confirm") or {}).get("settings", []))
    gain = _dynamic_gain(ls)
    # the target is the issue's: tokens/s against what the fp32 matmul rate allows (under bf16 autocast the run
    # may exceed it; the training table also gives the fraction of the bf16 rate it trained at)
    eff = {n: r["throughput"].get("fraction_of_fp32_rate") for n, r in runs.items()}
    checks = [
        ("LayerSkip tuned speedup >= 1.6x, lossless", ls_best and ls_best["speedup"] >= TARGET_SPEEDUP and all_equal,
         f"{_f(ls_best and ls_best['speedup'])}x"),
        ("baseline best <= 1.2x", base_best and base_best["speedup"] <= BASELINE_MAX,
         f"{_f(base_best and base_best['speedup'])}x"),
        ("last-layer perplexity within 5% of the baseline", ppl_l <= ppl_b * (1 + PPL_GAP),
         f"{ppl_l:.2f} vs {ppl_b:.2f} ({100 * (ppl_l / ppl_b - 1):+.1f}%)"),
        ("dynamic drafting >= 10% over the best static", gain is not None and gain >= DYNAMIC_GAIN,
         "-" if gain is None else f"{100 * gain:+.1f}%"),
        (f"finished within {cfg.budget_min:g} min", minutes <= cfg.budget_min, f"{minutes:.1f} min"),
        ("training >= 50% of the fp32 matmul rate", all(v is not None and v >= TRAIN_EFFICIENCY for v in eff.values()),
         ", ".join(f"{n} {_f(v and 100 * v, '.0f')}%" for n, v in eff.items())),
        ("every sweep cell token-identical to autoregressive", all_equal, "yes" if all_equal else "no"),
    ]
    return {"checks": [{"target": t, "met": bool(ok), "value": v} for t, ok, v in checks],
            "ppl_ratio": ppl_l / ppl_b, "layerskip_best": ls_best, "baseline_best": base_best,
            "dynamic_gain": gain, "all_lossless": all_equal, "minutes": round(minutes, 1)}


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _per_layer_rows(base: list, ls: list) -> list[str]:
    lines = ["| layer | baseline accuracy | perplexity | agreement | LayerSkip accuracy | perplexity | agreement |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for b, s in zip(base, ls):
        lines.append(f"| {b['layer']} | {b['accuracy']:.3f} | {b['perplexity']:.1f} | {b['agreement']:.3f} | "
                     f"{s['accuracy']:.3f} | {s['perplexity']:.1f} | {s['agreement']:.3f} |")
    return lines


def _sweep_md(ev: dict) -> list[str]:
    sw = ev["sweep"]
    exits = sorted({c["exit_layer"] for c in sw["cells"]})
    depths = sorted({c["num_speculations"] for c in sw["cells"]})
    by = {(c["exit_layer"], c["num_speculations"]): c for c in sw["cells"]}
    lines = ["| E \\ d | " + " | ".join(map(str, depths)) + " |", "|---:|" + "---:|" * len(depths)]
    for E in exits:
        cells = []
        for d in depths:
            c = by[(E, d)]
            cells.append(f"{c['speedup']:.2f}x ({c['acceptance']:.2f})" + ("" if c["equal_to_ar"] else " ≠AR"))
        lines.append(f"| {E} | " + " | ".join(cells) + " |")
    if sw["dynamic_cells"]:
        def key(c):
            return c["exit_layer"], c["num_speculations"], c.get("draft_growth", 0), c.get("draft_stop", 0.0)
        dyn = {key(c): c for c in sw["dynamic_cells"]}
        stops = sorted({k[3] for k in dyn})
        lines += ["", "Dynamic drafting (d is the most drafts a round may make; growth g: a round's length starts at "
                  "g, grows by g after a fully accepted round and falls to the accepted run + 1 after a rejection; "
                  "a round stops where the exit head's top probability falls below the threshold):", "",
                  "| E | max d | growth | " + " | ".join(f"stop < {s:g}" if s else "no stop" for s in stops) + " |",
                  "|---:|---:|---:|" + "---:|" * len(stops)]
        for E, d, g in sorted({k[:3] for k in dyn}):
            row = [dyn.get((E, d, g, s)) for s in stops]
            lines.append(f"| {E} | {d} | {g or '-'} | " + " | ".join(
                "-" if c is None else f"{c['speedup']:.2f}x ({c['acceptance']:.2f})"
                + ("" if c["equal_to_ar"] else " ≠AR") for c in row) + " |")
    b, dy = sw["best"], sw["best_dynamic"]
    lines += ["", f"Autoregressive: {sw['autoregressive']['tokens_per_s']:.1f} tokens/s (runs "
              + ", ".join(f"{x:.1f}" for x in sw["autoregressive"]["tokens_per_s_runs"]) + ")"]
    if b:
        lines.append(f"Best static: E={b['exit_layer']} d={b['num_speculations']} {b['speedup']:.2f}x "
                     f"(acceptance {b['acceptance']:.3f})")
    if dy:
        lines.append(f"Best dynamic: {Setting.of(dy).label} "
                     f"{dy['speedup']:.2f}x ({100 * (sw['dynamic_gain'] or 0):+.1f}% over the best static)")
    pb = sw.get("predicted_best")
    if pb:
        lines.append(f"Cost model (measured alpha, stage costs): predicted best E={pb['exit_layer']} "
                     f"d={pb['num_speculations']} {pb['speedup']:.2f}x; its measured rank "
                     f"{sw.get('predicted_best_rank')} of {sw['cells_measured']}")
    return lines


def _confirm_md(name: str, ev: dict) -> list[str]:
    conf = ev.get("confirm")
    if not conf:
        return []
    lines = [f"**{name}** (autoregressive tokens/s per repeat: "
             + ", ".join(f"{x:.1f}" for x in conf["autoregressive_tokens_per_s"]) + ")", "",
             "| setting | sweep | confirmed (median) | per repeat | identical to AR |", "|---|---:|---:|---|---|"]
    for st in conf["settings"]:
        sweep = "-" if st["sweep_speedup"] is None else f"{st['sweep_speedup']:.2f}x"
        lines.append(f"| {Setting.of(st).label} | {sweep} | **{st['speedup']:.2f}x** | "
                     + ", ".join(f"{x:.2f}" for x in st["speedups"]) + f" | {'yes' if st['equal_to_ar'] else 'NO'} |")
    sm = conf.get("stop_model")
    if sm:
        lines.append(f"\nFitted stop (generation/draft_stop.py): exit {sm['exit_layer']}, fitted on {sm['tokens']} draft "
                     f"positions of {sm['prompts']} prompts not evaluated (agreement {sm['agreement']:.3f}, AUC "
                     f"{sm['auc']:.3f}); weights " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(sm["features"],
                                                                                        sm["weights"])) + ".")
    if "dynamic_gain" in conf:
        lines.append(f"\nDynamic over static, same repeats: {100 * conf['dynamic_gain']:+.1f}% (median of the "
                     "per-repeat ratios).")
    return lines + [""]


def _profile_md(name: str, ev: dict) -> list[str]:
    p, fl = ev["step_profile"], ev["floors"]
    ar, ss, st = p["autoregressive"], p["self_speculative"], p["self_speculative_setting"]
    lines = [f"**{name}**: weights {fl['weight_mb']} MB ({fl['regime']}; last-level cache {fl['llc_mb']} MB).",
             "",
             "| | ms | inside the kernels | outside (Python, bookkeeping) | tokens |",
             "|---|---:|---:|---:|---:|",
             f"| autoregressive step | {ar['step_ms']:.3f} | {ar['kernels_ms']:.3f} | {ar['outside_ms']:.3f} "
             f"({ar['outside_pct']:.1f}%) | 1 |",
             f"| self-speculative round ({Setting.of(st).label}) | {ss['step_ms']:.3f} | "
             f"{ss['kernels_ms']:.3f} | {ss['outside_ms']:.3f} ({ss['outside_pct']:.1f}%) | "
             f"{ss['tokens_per_step']:.2f} |",
             "",
             f"Floors of one step: weights read at the rate a buffer of their size reads here "
             f"({fl['read_gbs_model_sized']} GB/s) {fl['weight_floor_ms']:.3f} ms; at the DRAM rate "
             f"({fl['read_gbs_dram']} GB/s) {fl['dram_floor_ms']:.3f} ms; {fl['flops_per_token'] / 1e6:.1f} MFLOP at "
             f"the fp32 matmul rate ({ev['fp32_matmul_gflops']} GFLOP/s) {fl['compute_floor_ms']:.3f} ms.", ""]
    if ev["verify_cost"]:
        lines += ["Verification of d + 1 tokens against one (layers >= E and the head; T = tokens):", "",
                  "| d | T | one layer T vs 1 | head T vs 1 | verify pass ms | same pass on 1 token ms | ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for v in ev["verify_cost"]:
            lines.append(f"| {v['d']} | {v['tokens']} | {_f(v['layer_ratio'])}x | {_f(v['head_ratio'])}x | "
                         f"{v['verify_ms']:.3f} | {v['one_token_ms']:.3f} | {_f(v['verify_ratio'])}x |")
        lines.append("")
    return lines


def format_report(cfg, data: dict, plan: dict, runs: dict, evals: dict, s: dict, exports: dict) -> str:
    m = _machine()
    lines = ["# LayerSkip reproduced from scratch", "",
             f"{m['cpu']}, torch {m['torch']} ({m['capability']}), {m['threads']} threads; {s['minutes']} minutes "
             f"in all (budget {cfg.budget_min:g}).", "",
             "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {c['target']} | {'yes' if c['met'] else '**no**'} | {c['value']} |" for c in s["checks"]]
    if plan.get("short_of_training"):
        lines += ["", f"**Too little training for a meaningful control**: {plan['short_of_training']}."]
    lines += ["", "## Data", "",
              f"Training: {data['training_files']} files of {data['root']} ({data['training_bytes'] / 1e6:.1f} MB, "
              f"{data['training_tokens']:,} tokens with the {data['vocab']}-token BPE tokenizer trained on them); "
              f"held out: {', '.join(data['held_out'])} ({data['held_out_tokens']:,} tokens; "
              f"{data['eval_tokens']:,} of them scored). Prompts: "
              + ", ".join(f"{sum(1 for p in data['prompts'] if p['source'] == src)} {src}"
                          for src in dict.fromkeys(p["source"] for p in data["prompts"])) + ".", "",
              "## Plan: the candidate shapes and the cost model", "",
              "Random-weight models of each shape, timed here; predicted best speedup under the prior agreement "
              "curve (alpha by relative depth " + ", ".join(f"{x:g}: {y:.2f}" for x, y in plan["prior_agreement"])
              + ").", "",
              "| shape | params | fp32 MB | AR step ms | layer ms (T=1) | head ms | predicted best | train step s "
              "(baseline / LayerSkip) | tokens in budget |", "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in plan["candidates"]:
        b = r["best"]
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['fp32_mb']} | {r['ar_step_ms']:.3f} | "
                     f"{r['layer_ms']['1']:.3f} | {r['head_ms']['1']:.3f} | E={b['exit_layer']} "
                     f"d={b['num_speculations']} {b['speedup']:.2f}x | {r['train_step_s']['baseline']:.2f} / "
                     f"{r['train_step_s']['layerskip']:.2f} | {r['tokens_in_budget']:,} |")
    why = "--steps" if cfg.steps else f"--max-steps {cfg.max_steps}"
    if plan.get("steps_fitting") is not None:
        why += f"; the budget fits {plan['steps_fitting']}"
    by = f" ({plan['chosen_by']})" if plan.get("chosen_by") else ""
    lines += ["", f"Chosen: **{plan['label']}**{by}, {plan['steps']} steps, {plan['tokens_per_model']:,} tokens per "
              f"model ({why}).", "", "## Training", "",
              "| model | steps | tokens | minutes | tokens/s | GFLOP/s achieved | of the fp32 matmul rate | "
              "of the rate of the dtype trained in | exit-loss share | final loss |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in runs.items():
        t = r["throughput"]
        lines.append(f"| {n} | {r['step']} | {r['tokens_seen']:,} | {r['time_s'] / 60:.1f} | "
                     f"{_f(t.get('tokens_per_s'), '.0f')} | {_f(t.get('achieved_gflops'), '.1f')} | "
                     f"{_pct(t.get('fraction_of_fp32_rate'))} | "
                     f"{_pct(t.get('fraction_of_matmul_rate'))} ({_trained_dtype(t)}) | "
                     f"{_f(t.get('exit_loss_share') and 100 * t['exit_loss_share'], '.0f')}% | {r['loss']:.3f} |")
    tc = runs["layerskip"]["train_config"]
    lines += ["", f"LayerSkip recipe: layer dropout {tc['layer_dropout']} ({tc['ld_scale']} over depth), early-exit "
              f"loss e_scale {tc['early_exit']} ({tc['ee_scale']}) at exits {tc['ee_layers']} plus the last layer, "
              f"self-distillation {tc['distill']}; both runs lr {tc['lr']}, seed {tc['seed']}, autocast "
              f"{runs['layerskip']['throughput'].get('autocast', '-')}, "
              f"{'compiled' if tc.get('compile') else 'eager'} layers"
              f"{' (' + plan['compile']['reason'] + ')' if plan.get('compile') else ''}.", "",
              "## Per-layer exit quality on held-out code", ""]
    lines += _per_layer_rows(evals["baseline"]["per_layer"], evals["layerskip"]["per_layer"])
    lines += ["", f"Last-layer perplexity LayerSkip / baseline: {s['ppl_ratio']:.3f}. Plot: agreement.png.", ""]
    for n in ("baseline", "layerskip"):
        lines += [f"## Sweep: {n} model (greedy, lossless speedup over its own autoregressive decode; acceptance)", ""]
        lines += _sweep_md(evals[n]) + [""]
    if any(evals[n].get("confirm") for n in ("baseline", "layerskip")):
        lines += ["## The best settings, measured again", "",
                  "A sweep cell is one run against the mean of two autoregressive runs (at the sweep's start and "
                  "end), so the best of dozens of cells is biased up. The fastest static and dynamic cells of "
                  "each model were measured again in repeats over every prompt, each prompt decoded back to back by "
                  "autoregressive decoding and each setting (the order rotating); a repeat's speedup is its "
                  "tokens/s over the autoregressive tokens/s of the same repeat. "
                  "The targets above use these.", ""]
        for n in ("baseline", "layerskip"):
            lines += _confirm_md(n, evals[n])
    lines += ["## Where a decode step's time goes", ""]
    for n in ("baseline", "layerskip"):
        lines += _profile_md(n, evals[n])
    best = plan["candidates"][[r["label"] for r in plan["candidates"]].index(plan["label"])]["best"]
    lsb = s["layerskip_best"]
    lines += ["## Cost model before training vs measured", "",
              f"Before training (prior agreement, random weights): E={best['exit_layer']} "
              f"d={best['num_speculations']} {best['speedup']:.2f}x. Measured on the trained LayerSkip model: "
              + (f"{Setting.of(lsb).label} {lsb['speedup']:.2f}x." if lsb else "-"), ""]
    ex = exports.get("layerskip")
    if ex:
        lines += ["## The shipped model", "",
                  f"{ex['folder']}: {ex['bytes'] / 2 ** 20:.1f} MiB (weights {ex['weights_bytes'] / 2 ** 20:.1f} MiB, "
                  "bf16), its tuned setting in config.json's layerskip block.", ""]
    return "\n".join(lines)


def plot_agreement(evals: dict, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'layerskip_ext[plot]'); skipped agreement.png"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for n, style in (("baseline", "o--"), ("layerskip", "s-")):
        pl = evals[n]["per_layer"]
        xs = [m["layer"] for m in pl]
        a1.plot(xs, [m["agreement"] for m in pl], style, label=n)
        a2.plot(xs, [m["perplexity"] for m in pl], style, label=n)
    a1.set_xlabel("exit layer")
    a1.set_ylabel("top-1 agreement with the last layer")
    a1.set_ylim(0, 1)
    a2.set_xlabel("exit layer")
    a2.set_ylabel("perplexity (held-out code)")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        a.legend()
    fig.suptitle("baseline vs LayerSkip, trained from scratch with the same tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def model_card(cfg, data: dict, plan: dict, runs: dict, evals: dict, s: dict) -> str:
    ls = evals["layerskip"]
    tuned = (ls.get("confirm") or {}).get("tuned", {})  # the confirmation stage writes the shipped setting
    r = runs["layerskip"]
    return "\n".join([
        "# nano-layerskip", "",
        "A small Llama-architecture code model **trained from scratch on this project's 2-core CPU machine** by "
        "`layerskip reproduce`, to show LayerSkip's self-speculative decoding paying off. It is a demonstration "
        f"model, not a useful code assistant: {r['time_s'] / 60:.0f} minutes of CPU training on Python's standard library.", "",
        f"- Shape: {plan['label']}, vocabulary {data['vocab']} (byte-level BPE trained on the same files); "
        f"tied embeddings; bf16 weights.",
        f"- Training: {r['tokens_seen']:,} tokens of the standard library ({', '.join(data['held_out'])} held out), "
        f"layer dropout {r['train_config']['layer_dropout']}, early-exit loss at layers "
        f"{r['train_config']['ee_layers']} with self-distillation {r['train_config']['distill']}.",
        f"- Held-out last-layer perplexity {_last(ls)['perplexity']:.1f} (the plain baseline trained on the same "
        f"tokens: {_last(evals['baseline'])['perplexity']:.1f}).",
        f"- Tuned self-speculation (config.json `layerskip`): E={tuned.get('exit_layer')}, "
        f"d={tuned.get('num_speculations')}, draft stop {tuned.get('draft_stop')}, draft growth "
        f"{tuned.get('draft_growth', 0)}: "
        f"{_f(tuned.get('speedup'))}x greedy decode tokens/s over its own autoregressive decoding on held-out "
        "prompts (median of interleaved repeats), token-identical output (measured on the CPU it was trained on).", "",
        "Reproduce: `layerskip reproduce --out repro` (see docs/reproduce.md).", ""])


def write_report(out: str, cfg, data: dict, plan: dict, runs: dict, evals: dict, minutes: float) -> dict:
    exports = {}
    for n in ("baseline", "layerskip"):
        p = os.path.join(out, "stages", f"export_{n}.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                exports[n] = json.load(f)
    s = summary(cfg, data, plan, runs, evals, minutes)
    md = os.path.join(out, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(format_report(cfg, data, plan, runs, evals, s, exports))
    js = os.path.join(out, "report.json")
    with open(js, "w", encoding="utf-8") as f:
        json.dump({"summary": s, "machine": _machine(), "data": {k: v for k, v in data.items() if k != "prompts"},
                   "prompts": data["prompts"], "plan": plan, "training": runs, "evaluation": evals,
                   "exports": exports}, f, indent=1)
    note = plot_agreement(evals, os.path.join(out, "agreement.png"))
    if "layerskip" in exports:
        with open(os.path.join(exports["layerskip"]["folder"], "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(cfg, data, plan, runs, evals, s))
    return {"markdown": md, "json": js, "plot_note": note, "summary": s}
