"""A sweep's outputs: sweep.json (every cell), sweep.md (tables: rows E, columns d) and sweep.png (heat-map)."""
from __future__ import annotations

import json
import os
from typing import Optional

from .sweep import Cell, SweepResult


def _r(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def cell_dict(c: Cell) -> dict:
    out = setting_key(c)
    if c.measured:
        out.update(acceptance=_r(c.acceptance), tokens_per_round=_r(c.tokens_per_round),
                   tokens_per_s=_r(c.tokens_per_s, 2), speedup=_r(c.speedup), equal_to_ar=c.equal_to_ar)
    if c.predicted is not None:
        p = c.predicted
        out["predicted"] = {"alpha": _r(p.alpha), "acceptance": _r(p.acceptance),
                            "tokens_per_round": _r(p.tokens_per_round), "round_s": _r(p.round_s, 6),
                            "tokens_per_s": _r(p.tokens_per_s, 2), "speedup": _r(p.speedup),
                            "replay_tokens_per_round": _r(p.replay_tokens_per_round),
                            "replay_speedup": _r(p.replay_speedup)}
    return out


def setting_key(c: Optional[Cell]) -> Optional[dict]:
    """A cell's setting as a dict (analysis.confirm.Setting.of reads it back): E and d, and the dynamic-drafting
    fields when it uses them."""
    if c is None:
        return None
    out = {"exit_layer": c.exit_layer, "num_speculations": c.num_speculations}
    if c.dynamic:
        out.update(draft_stop=c.draft_stop, draft_growth=c.draft_growth)
    if c.draft_stop_model is not None:
        out["draft_stop_model"] = [round(w, 6) for w in c.draft_stop_model]
    return out


def _best_dict(c: Optional[Cell]) -> Optional[dict]:
    return dict(setting_key(c), speedup=_r(c.speedup), acceptance=_r(c.acceptance)) if c is not None else None


def dynamic_gain(res: SweepResult) -> Optional[float]:
    """Best dynamic cell's speedup over the best static one's, minus 1 (None without both)."""
    b, dyn = res.best(), res.best_dynamic()
    return dyn.speedup / b.speedup - 1.0 if b is not None and dyn is not None and b.speedup else None


def to_json(res: SweepResult) -> dict:
    best, pbest = res.best(), res.predicted_best()
    return {
        "settings": res.settings,
        "autoregressive": {"tokens_per_s": _r(res.ar_tokens_per_s, 2),
                           "tokens_per_s_runs": [_r(x, 2) for x in res.ar_tokens_per_s_runs]},
        "alpha": {str(E): _r(a) for E, a in sorted(res.alpha.items())},
        "stage_costs": res.stage_costs.to_dict() if res.stage_costs else None,
        "cells": [cell_dict(c) for c in res.cells],
        "dynamic_cells": [cell_dict(c) for c in res.dynamic],
        "stop_fits": [f.to_dict() for f in res.stop_fits],
        "stop_fit_errors": list(res.stop_fit_errors),
        "best": _best_dict(best),
        "best_dynamic": _best_dict(res.best_dynamic()),
        "dynamic_gain": _r(dynamic_gain(res)),
        "best_overall": _best_dict(res.best_overall()),
        "predicted_best": dict(setting_key(pbest), speedup=_r(pbest.predicted.speedup)) if pbest else None,
        "predicted_best_rank": res.predicted_best_rank(),
        "cells_measured": sum(1 for c in res.cells if c.measured),
    }


def _grid(res: SweepResult) -> tuple[list[int], list[int], dict]:
    exits = sorted({c.exit_layer for c in res.cells})
    depths = sorted({c.num_speculations for c in res.cells})
    return exits, depths, {c.key: c for c in res.cells}


def _table(res: SweepResult, fmt) -> list[str]:
    exits, depths, by = _grid(res)
    lines = ["| E \\ d | " + " | ".join(str(d) for d in depths) + " |",
             "|---:|" + "---:|" * len(depths)]
    for E in exits:
        lines.append(f"| {E} | " + " | ".join(fmt(by[(E, d)]) for d in depths) + " |")
    return lines


def format_markdown(res: SweepResult, title: str) -> str:
    lines = [f"# Self-speculation sweep: {title}", ""]
    s = res.settings
    if s:
        lines += [", ".join(f"{k} {v}" for k, v in s.items()), ""]
    lines += [f"Autoregressive baseline: {res.ar_tokens_per_s:.2f} tokens/s (decode; runs: "
              + ", ".join(f"{x:.2f}" for x in res.ar_tokens_per_s_runs) + ")", ""]
    if any(c.measured for c in res.cells):
        lines += ["## Measured: speedup vs autoregressive (acceptance rate)", ""]
        lines += _table(res, lambda c: f"{c.speedup:.2f}x ({c.acceptance:.2f})" + ("" if c.equal_to_ar else " ≠AR"))
        best = res.best()
        lines += ["", f"Best: E={best.exit_layer}, d={best.num_speculations}: {best.speedup:.2f}x, "
                      f"acceptance {best.acceptance:.3f}, {best.tokens_per_s:.2f} tokens/s", ""]
        if res.dynamic:
            lines += dynamic_table(res)
        if not all(c.equal_to_ar for c in res.cells + res.dynamic if c.measured):
            lines += ["≠AR: the cell's greedy outputs differ from the autoregressive ones (not lossless).", ""]
    if any(c.predicted is not None for c in res.cells):
        lines += ["## Predicted by the cost model: speedup (acceptance); exact-replay speedup", ""]
        lines += _table(res, lambda c: f"{c.predicted.speedup:.2f}x ({c.predicted.acceptance:.2f}); "
                                       f"{c.predicted.replay_speedup or 0:.2f}x")
        pb = res.predicted_best()
        line = f"Predicted best: E={pb.exit_layer}, d={pb.num_speculations}: {pb.predicted.speedup:.2f}x"
        rank = res.predicted_best_rank()
        if rank is not None:
            line += f"; its measured rank: {rank} of {sum(1 for c in res.cells if c.measured)}"
        lines += ["", line]
        lines += ["", "alpha(E), the exit-E greedy token's agreement with the full model along its own outputs: "
                  + ", ".join(f"E={E} {a:.3f}" for E, a in sorted(res.alpha.items())), ""]
        if res.stage_costs is not None:
            c = res.stage_costs
            lines += [f"Stage costs (ms): layer {1e3 * c.layer_s[1]:.3f} (T=1), head {1e3 * c.head_s[1]:.3f} (T=1), "
                      f"call {1e3 * c.call_s[1]:.3f}, step overhead {1e3 * c.overhead_s:.3f}, "
                      f"autoregressive step {1e3 * c.ar_step_s:.3f}", ""]
    return "\n".join(lines)


def dynamic_table(res: SweepResult) -> list[str]:
    """Markdown: the dynamic-drafting cells (a round stops drafting where the exit head's top probability, or a
    fitted stop model's chance that the round's drafts are all accepted, falls below the threshold; a round's
    length grows after a fully accepted round), and the best of them against the best static cell."""
    lines = ["## Dynamic drafting: speedup (acceptance, tokens per round)", "",
             "| E | max d | growth | stop below | speedup | acceptance | tokens/round | output |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in sorted(res.dynamic, key=lambda c: (c.exit_layer, c.num_speculations, c.draft_stop_model is not None,
                                                 c.draft_growth, c.draft_stop)):
        if c.measured:
            stop = (f"{c.draft_stop:g} fitted" if c.draft_stop_model is not None else f"{c.draft_stop:g}") \
                if c.draft_stop else "-"
            lines.append(f"| {c.exit_layer} | {c.num_speculations} | {c.draft_growth or '-'} | "
                         f"{stop} | {c.speedup:.2f}x | {c.acceptance:.2f} | {c.tokens_per_round:.2f} | "
                         f"{'=AR' if c.equal_to_ar else '≠AR'} |")
    for f in res.stop_fits:
        lines += ["", f"Fitted stop at E={f.exit_layer} (generation/draft_stop.py, on other prompts than these): "
                      f"{f.tokens} draft positions, agreement {f.agreement:.3f}, AUC {f.auc:.3f}; weights "
                      + ", ".join(f"{w:.4g}" for w in f.weights)]
    for e in res.stop_fit_errors:
        lines += ["", f"No fitted stop: {e}"]
    b, dyn, gain = res.best(), res.best_dynamic(), dynamic_gain(res)
    if gain is not None:
        lines += ["", f"Best dynamic: {dyn.label}: {dyn.speedup:.2f}x against the best static {b.label}: "
                      f"{b.speedup:.2f}x ({100 * gain:+.1f}%)"]
    return lines + [""]


def write_reports(res: SweepResult, out_dir: str, title: str) -> tuple[list[str], Optional[str]]:
    """-> (paths written, note on stderr when the PNG was skipped)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "sweep.json"), os.path.join(out_dir, "sweep.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(to_json(res), f, indent=1)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(format_markdown(res, title))
    png = os.path.join(out_dir, "sweep.png")
    note = plot_heatmap(res, png, title)
    if note is None:
        paths.append(png)
    return paths, note


def plot_heatmap(res: SweepResult, path: str, title: str) -> Optional[str]:
    """Speedup heat-map (measured; predicted when nothing was measured). None, or why no PNG was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'layerskip_ext[plot]'); skipped sweep.png"
    exits, depths, by = _grid(res)
    measured = any(c.measured for c in res.cells)
    value = (lambda c: c.speedup) if measured else (lambda c: c.predicted.speedup)
    grid = [[value(by[(E, d)]) for d in depths] for E in exits]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(exits) + 2))
    lo, hi = min(min(r) for r in grid), max(max(r) for r in grid)
    span = max(abs(1 - lo), abs(hi - 1), 1e-6)  # centre the colours on 1x: red slower, blue faster
    im = ax.imshow(grid, cmap="RdBu", vmin=1 - span, vmax=1 + span, aspect="auto")
    for i in range(len(exits)):
        for j in range(len(depths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(exits)), [str(E) for E in exits])
    ax.set_xlabel("speculation depth d")
    ax.set_ylabel("exit layer E")
    ax.set_title(f"{'measured' if measured else 'predicted'} speedup vs autoregressive\n{title}", fontsize=10)
    fig.colorbar(im, ax=ax, label="speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


