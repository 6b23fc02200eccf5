"""Measure self-speculative decoding over a grid of exit layers E and speculation depths d.

Every cell decodes the same prompts greedily, one prompt at a time (batch 1, the latency setting), and is
compared with the autoregressive baseline measured in the same run: its tokens per second, and whether its
outputs equal the baseline's token for token. The baseline is measured before and after the grid and averaged,
so a machine whose load drifts during the run biases no cell's speedup in one direction only.
Tokens per second counts decode only (tokens after each prompt's first, over the time after the prefill), as
``layerskip generate`` reports it: the prefill is the same full-model pass for every strategy.

Dynamic drafting (``draft_stops``, ``draft_growths``): cells that draft up to d tokens but stop a round's draft
where the exit head's top probability falls below a threshold, or adapt a round's length to the last round's
acceptance (generation/draft_length.py), or both; measured on the same prompts against the same baseline, so the
best dynamic cell compares directly with the best static (E, d).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from ..errors import LayerSkipError
from .cost_measure import measure_agreement, measure_stage_costs
from .cost_model import Prediction, StageCosts, predict, rank_of
from .decode_runs import RunStats, run_prompts
from .draft_stop_fit import StopModelFit, fit_stop_model


def setting_label(exit_layer: int, d: int, draft_stop: float = 0.0, draft_growth: int = 0,
                  fitted_stop: bool = False) -> str:
    """"E=6 d=6" (static); dynamic: "E=6 d<=16 grow 4 stop<0.05" (the parts it uses; "fitted stop<0.4": the
    threshold is on a fitted stop model's chance, generation/draft_stop.py)."""
    if not (draft_stop or draft_growth):
        return f"E={exit_layer} d={d}"
    return (f"E={exit_layer} d<={d}" + (f" grow {draft_growth}" if draft_growth else "")
            + ((" fitted" if fitted_stop else "") + f" stop<{draft_stop:g}" if draft_stop else ""))


@dataclasses.dataclass
class Cell:
    exit_layer: int
    num_speculations: int
    draft_stop: float = 0.0    # dynamic drafting threshold (0: none)
    draft_growth: int = 0      # dynamic drafting: adaptive round length (0: every round drafts d)
    draft_stop_model: Optional[list[float]] = None  # draft_stop is on this fitted model's chance (draft_stop.py)
    acceptance: Optional[float] = None
    tokens_per_round: Optional[float] = None
    tokens_per_s: Optional[float] = None
    speedup: Optional[float] = None
    equal_to_ar: Optional[bool] = None
    predicted: Optional[Prediction] = None

    @property
    def key(self) -> tuple[int, int]:
        return self.exit_layer, self.num_speculations

    @property
    def dynamic(self) -> bool:
        return self.draft_stop > 0 or self.draft_growth > 0

    @property
    def label(self) -> str:
        return setting_label(self.exit_layer, self.num_speculations, self.draft_stop, self.draft_growth,
                             self.draft_stop_model is not None)

    @property
    def measured(self) -> bool:
        return self.speedup is not None


@dataclasses.dataclass
class SweepResult:
    cells: list[Cell]
    ar_tokens_per_s: float
    ar_tokens_per_s_runs: list[float]   # the baseline measured before (and after) the grid
    alpha: dict[int, float]
    stage_costs: Optional[StageCosts]
    settings: dict
    dynamic: list[Cell] = dataclasses.field(default_factory=list)   # dynamic drafting, same prompts and baseline
    stop_fits: list[StopModelFit] = dataclasses.field(default_factory=list)  # the fitted stops' models, per exit
    stop_fit_errors: list[str] = dataclasses.field(default_factory=list)    # exits where no stop model could fit

    @staticmethod
    def _best_of(cells: Sequence[Cell]) -> Optional[Cell]:
        measured = [c for c in cells if c.measured]
        lossless = [c for c in measured if c.equal_to_ar] or measured
        return max(lossless, key=lambda c: c.speedup) if lossless else None

    def best(self) -> Optional[Cell]:
        """Highest measured speedup among the static cells whose outputs equal the baseline's (all cells if none
        does)."""
        return self._best_of(self.cells)

    def best_dynamic(self) -> Optional[Cell]:
        return self._best_of(self.dynamic)

    def best_overall(self) -> Optional[Cell]:
        """The faster of the best static and the best dynamic cell (lossless ones first)."""
        return self._best_of([c for c in (self.best(), self.best_dynamic()) if c is not None])

    def predicted_best(self) -> Optional[Cell]:
        predicted = [c for c in self.cells if c.predicted is not None]
        return max(predicted, key=lambda c: c.predicted.speedup) if predicted else None

    def predicted_best_rank(self) -> Optional[int]:
        """Rank (1 = fastest) of the predicted best cell among the measured cells."""
        pb = self.predicted_best()
        scores = {c.key: c.speedup for c in self.cells if c.measured}
        return rank_of(pb.key, scores) if pb is not None and pb.key in scores else None


def check_grid(num_layers: int, exit_layers: Sequence[int], depths: Sequence[int]) -> None:
    """One-line errors for a grid generate() would reject cell by cell."""
    if not exit_layers or not depths:
        raise LayerSkipError("empty grid: give at least one exit layer and one speculation depth")
    for E in exit_layers:
        if not 1 <= E <= num_layers:
            raise LayerSkipError(f"exit layer {E} is outside [1, {num_layers}] (the model has {num_layers} layers)")
    for d in depths:
        if d < 1:
            raise LayerSkipError(f"speculation depth {d} must be >= 1")


def default_exit_layers(num_layers: int, count: int = 6) -> list[int]:
    """A spread over the depth: every (L / count)-th layer, the last one excluded (it drafts with every layer)."""
    if num_layers <= 1:
        return [1]
    step = max(1, num_layers // count)
    return list(range(step, num_layers, step))[:count]


def warm_up(model, prompt: Sequence[int], exit_layer: int, d: int, stop_ids: Iterable[int]) -> None:
    """One short generation per strategy: first calls allocate buffers and page weights in."""
    run_prompts(model, [prompt], 4, stop_ids)
    run_prompts(model, [prompt], 4, stop_ids, exit_layer, d)


def predict_grid(model, prompts, ar: RunStats, exit_layers, depths, max_new_tokens: int, repeats: int = 5):
    """-> (alpha, stage costs, {(E, d): Prediction}) from one teacher-forced pass per prompt + microbenchmarks."""

    alpha, agreements = measure_agreement(model, prompts, ar.outputs, exit_layers)
    ar_step_s = ar.decode_s / ar.decode_tokens if ar.decode_tokens else 0.0
    position = int(sum(len(p) for p in prompts) / len(prompts)) + max_new_tokens // 2
    costs = measure_stage_costs(model, position, depths, ar_step_s, repeats=repeats)
    preds = {(E, d): predict(costs, alpha[E], E, d, agreements[E], max_new_tokens)
             for E in exit_layers for d in depths}
    return alpha, costs, preds


def check_draft_stops(draft_stops: Sequence[float]) -> None:
    for s in draft_stops:
        if not 0.0 < s < 1.0:
            raise LayerSkipError(f"draft-stop threshold {s} must be a probability strictly between 0 and 1")


def check_fitted_stops(fitted_stops: Sequence[float], fit_prompts) -> None:
    check_draft_stops(fitted_stops)
    if fitted_stops and not fit_prompts:
        raise LayerSkipError("fitted stops need prompts to fit the stop model on (other than the swept ones)")


def check_draft_growths(draft_growths: Sequence[int]) -> None:
    for g in draft_growths:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise LayerSkipError(f"draft growth {g!r} must be an integer >= 1 (drafts added after a fully "
                                 f"accepted round)")


def dynamic_cells(exit_layers: Sequence[int], depths: Sequence[int], draft_stops: Sequence[float],
                  draft_growths: Sequence[int]) -> list[Cell]:
    """Every exit x depth x (threshold or none) x (growth or none), the static combination left out."""
    return [Cell(E, d, s, g) for E in exit_layers for d in depths for s in [0.0, *draft_stops]
            for g in [0, *draft_growths] if s or g]


def run_sweep(model, prompts: Sequence[Sequence[int]], exit_layers: Sequence[int], depths: Sequence[int],
              max_new_tokens: int, stop_ids: Iterable[int], *, measure: bool = True, with_prediction: bool = True,
              progress: bool = False, settings: Optional[dict] = None, draft_stops: Sequence[float] = (),
              draft_growths: Sequence[int] = (), dynamic_depths: Optional[Sequence[int]] = None,
              dynamic_exits: Optional[int] = None, fitted_stops: Sequence[float] = (),
              fit_prompts: Sequence[Sequence[int]] = ()) -> SweepResult:
    """The autoregressive baseline, then (with_prediction) the cost model, then (measure) every grid cell, then
    (draft_stops, draft_growths) the dynamic cells: every exit layer x dynamic_depths (default: the grid's deepest
    d) x (threshold or none) x (growth or none); with dynamic_exits = k, only the k exit layers whose best grid cell
    was fastest get dynamic cells (dynamic drafting pays where drafting from that exit already does).
    fitted_stops: at each of those exits, a stop model fitted on fit_prompts' greedy outputs (never the swept
    prompts: analysis/draft_stop_fit.py), then a cell per dynamic depth x threshold on its chance."""
    exit_layers, depths = sorted(set(exit_layers)), sorted(set(depths))
    check_grid(model.num_layers, exit_layers, depths)
    draft_stops = sorted(set(float(s) for s in draft_stops))
    check_draft_stops(draft_stops)
    draft_growths = sorted(set(draft_growths))
    check_draft_growths(draft_growths)
    fitted_stops = sorted(set(float(s) for s in fitted_stops))
    check_fitted_stops(fitted_stops, fit_prompts)
    dynamic_depths = sorted(set(dynamic_depths or [depths[-1]]))
    check_grid(model.num_layers, exit_layers, dynamic_depths)
    if dynamic_exits is not None and dynamic_exits < 1:
        raise LayerSkipError(f"dynamic_exits must be >= 1, got {dynamic_exits}")
    if not prompts:
        raise LayerSkipError("no prompts to sweep over")
    if max_new_tokens < 2:
        raise LayerSkipError(f"--max-new-tokens must be >= 2 to time decoding, got {max_new_tokens}")
    stop_ids = list(stop_ids)
    warm_up(model, prompts[0], exit_layers[0], depths[0], stop_ids)
    ar = run_prompts(model, prompts, max_new_tokens, stop_ids)
    runs = [ar.tokens_per_s]
    cells = {(E, d): Cell(E, d) for E in exit_layers for d in depths}
    alpha, costs = {}, None
    if with_prediction:
        alpha, costs, preds = predict_grid(model, prompts, ar, exit_layers, depths, max_new_tokens)
        for key, pred in preds.items():
            cells[key].predicted = pred
    dynamic, fits, fit_errors = [], [], []
    if measure:
        n_dyn = len(exit_layers) if dynamic_exits is None else min(dynamic_exits, len(exit_layers))
        per_exit = len(dynamic_cells([0], dynamic_depths, draft_stops, draft_growths))
        per_exit += len(dynamic_depths) * len(fitted_stops)
        bar = tqdm(total=len(cells) + n_dyn * per_exit, desc="sweeping (E, d)", unit="cell", disable=not progress)

        def measure_cells(todo):
            out = []
            for c in todo:
                out.append((c, run_prompts(model, prompts, max_new_tokens, stop_ids, c.exit_layer,
                                           c.num_speculations, c.draft_stop, c.draft_growth, c.draft_stop_model)))
                bar.update()
            return out

        measured = measure_cells(cells.values())
        dyn_exits = exit_layers
        if n_dyn < len(exit_layers) and per_exit:
            best = {E: max(st.tokens_per_s for c, st in measured if c.exit_layer == E) for E in exit_layers}
            dyn_exits = sorted(sorted(exit_layers, key=lambda E: -best[E])[:n_dyn])
        dynamic = dynamic_cells(dyn_exits, dynamic_depths, draft_stops, draft_growths)
        if fitted_stops:
            fit_outputs = run_prompts(model, fit_prompts, max_new_tokens, stop_ids).outputs
            for E in dyn_exits:
                try:
                    fits.append(fit_stop_model(model, fit_prompts, E, max_new_tokens, outputs=fit_outputs))
                except ValueError as e:  # every draft accepted (or none): nothing to stop on at this exit
                    fit_errors.append(str(e))
            dynamic += [Cell(f.exit_layer, d, t, draft_stop_model=f.weights) for f in fits for d in dynamic_depths
                        for t in fitted_stops]
        measured += measure_cells(dynamic)
        bar.close()
        runs.append(run_prompts(model, prompts, max_new_tokens, stop_ids).tokens_per_s)
        base = sum(runs) / len(runs)
        for c, st in measured:
            c.acceptance, c.tokens_per_round, c.tokens_per_s = st.acceptance, st.tokens_per_round, st.tokens_per_s
            c.speedup = st.tokens_per_s / base if base > 0 else 0.0
            c.equal_to_ar = st.outputs == ar.outputs
    return SweepResult(list(cells.values()), sum(runs) / len(runs), runs, alpha, costs, dict(settings or {}),
                       dynamic, fits, fit_errors)
