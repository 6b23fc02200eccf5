"""Before training: choose the architecture by the cost model, and check the steps fit the budget.

For each candidate shape a random-weight model is built and its decode stages are timed on this machine (one layer
at T = 1 and at T = d + 1, the exit head, an autoregressive step: analysis/cost_measure.py; DECODE_PASSES passes
over the candidates, each shape's medians used); the cost model
(analysis/cost_model.py) then predicts each (E, d)'s speedup from an *assumed* agreement curve alpha(E / L) (what
LayerSkip training from scratch reached in earlier runs here: PRIOR_AGREEMENT). A shape that cannot see enough
training tokens within the budget is not chosen, and predictions within the timings' noise of the best are a tie,
which the shape with (nearly) the most training tokens wins (choose_shape). A default run records that pick and
trains DEFAULT_ARCH, the shape that paid in trained runs here (the predictions cannot tell the shapes apart). The
prediction is recorded, and the report compares it with what the trained model measures.

Steps: a fixed number (--max-steps, the same for both models: equal tokens), so that a fast machine trains the
same models as a slow one; both configurations (baseline, LayerSkip) are timed for a few optimizer steps on random
tokens, and where the training share of the budget cannot fit that many, the step count is what fits. The shapes
are compared on eager steps; the chosen one is then timed eager against its layers compiled (torch.compile), step
by step alternately, and trains compiled where that is faster and works here (what fits is then refitted to the
compiled steps).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from ..analysis.cost_measure import measure_stage_costs
from ..analysis.cost_model import StageCosts, overhead_from_ar, predict
from ..config import LlamaConfig
from ..generation import generate
from ..model import LlamaForCausalLM
from ..training.machine import choose_autocast
from ..training.prepare import TrainingForward, compile_layers, prepare_model
from ..training.trainer import TrainConfig, init_weights, new_model, new_optimizer

# (relative exit depth E / L, agreement of exit E with the last layer on held-out code), interpolated linearly: what
# the recipe of this commit (pipeline.LAYERSKIP_RECIPE: fixed shallow exits, self-distillation) reached in the shipped
# run (20x192, 816 steps x 8 x 256: .57 at 2/20, .65 at 4/20, .69 at 5/20, .79 at 10/20; the first run's 24x160 read
# alike: .61 at 3/24, .72 at 6/24, .82 at 12/24). The prior this replaced came from an older recipe (exit loss on
# every 2nd layer: .46 at 4/16, .71 at 8/16) and, too low at the shallow exits, left every shape predicted at
# 1.0-1.07x, so that a noise-level tie decided the shape (12x256 on 2026-12-02; 20x192 under this prior, 1.37x
# against 1.16-1.22x, from the same timings).
PRIOR_AGREEMENT = ((0.0, 0.0), (0.1, 0.57), (0.2, 0.65), (0.25, 0.69), (0.5, 0.79), (1.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    def config(self, vocab: int, context: int = 1024) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=context,
                           tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)

    @classmethod
    def parse(cls, text: str) -> "Arch":
        return cls(*(int(x) for x in text.split(",")))

    def __str__(self) -> str:
        return f"{self.layers}x{self.hidden} (heads {self.heads}/{self.kv_heads}, MLP {self.intermediate})"


CANDIDATES = (Arch(16, 192, 6, 2, 512), Arch(20, 192, 6, 2, 512), Arch(24, 160, 5, 1, 448), Arch(12, 256, 8, 2, 704))
# The shape a default run trains. The plan times and predicts every candidate (the report's table), but its
# predictions under the prior agreement move by 15-20% between plans (PREDICTION_TIE), more than the shapes differ,
# and at the default's 816 steps x 8 x 256 tokens trained models differed far more than predicted: 20x192 paid
# (LayerSkip 1.93x confirmed, its control 1.20x, perplexity -13.1%: the shipped run), 16x192 did not (1.38x, the
# control 1.04x, perplexity +10.0%), and 24x160's control looped (1.69x at E=12, drafts accepted on .94 of its own
# output; LayerSkip 1.35x) (2026-12-02, docs/reproduce.md). A reproduction should train what was shown, so the
# default is the shape that paid; --arch or --candidates let the plan choose.
DEFAULT_ARCH = CANDIDATES[1]


def prior_alpha(relative_depth: float) -> float:
    pts = PRIOR_AGREEMENT
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= relative_depth <= x1:
            return y0 + (y1 - y0) * (relative_depth - x0) / (x1 - x0)
    return 1.0


def random_model(arch: Arch, vocab: int, seed: int = 0) -> LlamaForCausalLM:
    model = LlamaForCausalLM(arch.config(vocab))
    init_weights(model, 0.02, seed)   # in place: the tied head stays tied
    model.eval().build_decoder()
    return model


@torch.no_grad()
def measure_decode(arch: Arch, vocab: int, depths: list[int], new_tokens: int = 48) -> StageCosts:
    """One timing of a random-weight model of this shape: its autoregressive step (median of 3 decodes) and its
    decode stages (analysis/cost_measure.py)."""
    model = random_model(arch, vocab)
    prompt = list(range(1, 33))
    kw = dict(max_new_tokens=new_tokens, stop_token_ids=[], strategy="autoregressive")
    generate(model, prompt, **kw)
    steps = []
    for _ in range(3):
        r = generate(model, prompt, **kw)
        steps.append(r.decode_s / max(1, len(r.sequences[0].tokens) - 1))
    return measure_stage_costs(model, len(prompt) + new_tokens // 2, depths, statistics.median(steps), repeats=5)


def median_costs(timings: list[StageCosts]) -> StageCosts:
    """Field by field, the median of several timings of one shape (the overhead recomputed from the medians)."""
    med = statistics.median
    first = timings[0]
    table = {name: {t: med(getattr(c, name)[t] for c in timings) for t in getattr(first, name)}
             for name in ("layer_s", "call_s", "head_s")}
    ar = med(c.ar_step_s for c in timings)
    overhead = overhead_from_ar(table["layer_s"][1], table["call_s"][1], table["head_s"][1], first.num_layers, ar)
    draft_heads = [c.draft_head_s for c in timings if c.draft_head_s is not None]
    return StageCosts(first.num_layers, table["layer_s"], table["call_s"], table["head_s"], overhead, ar,
                      med(draft_heads) if draft_heads else None)


# The candidates' decode stages are timed this many times, one candidate after another in each pass, and each
# shape's medians are used. Timed once each, in sequence, one shape's layer cost read 44 us in one plan and 85 us in
# the next (16x192 at T = 1, 2026-12-02), enough to reorder the shapes: on a shared machine a slow minute hits one
# candidate, and interleaved passes spread it over all of them.
DECODE_PASSES = 3


def time_candidates(candidates: list[Arch], vocab: int, depths: list[int], passes: int = DECODE_PASSES,
                    say=lambda msg: None) -> list[StageCosts]:
    """Each candidate's decode stages, timed in ``passes`` passes over all of them -> each one's medians."""
    timings: list[list[StageCosts]] = [[] for _ in candidates]
    for i in range(passes):
        say(f"timing the decode stages of {len(candidates)} candidate shapes (pass {i + 1} of {passes})")
        for arch, timed in zip(candidates, timings):
            timed.append(measure_decode(arch, vocab, depths))
    return [median_costs(t) for t in timings]


def decode_costs(arch: Arch, vocab: int, costs: StageCosts, depths: list[int]) -> dict:
    """A timed shape's row: its size, its stage costs and the cost model's best (E, d) under PRIOR_AGREEMENT."""
    L = arch.layers
    exits = sorted({max(1, L // 8), max(1, L // 4), max(1, 3 * L // 8), L // 2})
    preds = [predict(costs, prior_alpha(E / L), E, d) for E in exits for d in depths]
    best = max(preds, key=lambda p: p.speedup)
    params = arch.config(vocab).num_parameters  # the head tied: counted once
    return {"arch": dataclasses.asdict(arch), "label": str(arch), "params": params,
            "fp32_mb": round(params * 4 / 2 ** 20, 1), "bf16_mb": round(params * 2 / 2 ** 20, 1),
            "ar_step_ms": round(costs.ar_step_s * 1e3, 3),
            "layer_ms": {str(t): round(v * 1e3, 4) for t, v in costs.layer_s.items()},
            "head_ms": {str(t): round(v * 1e3, 4) for t, v in costs.head_s.items()},
            "overhead_ms": round(costs.overhead_s * 1e3, 3), "stage_costs": costs.to_dict(),
            "best": {"exit_layer": best.exit_layer, "num_speculations": best.num_speculations,
                     "assumed_alpha": round(best.alpha, 3), "speedup": round(best.speedup, 3)}}


@dataclasses.dataclass(frozen=True)
class StepTiming:
    step_s: float   # median seconds of the timed optimizer steps
    first_s: float  # the warm-up step: buffers allocated, and with compiled layers their compilation


def _training_step(cfg: TrainConfig, model_config: LlamaConfig, compiled: bool):
    """-> a function that runs one optimizer step of this configuration on random tokens (with the autocast the run
    will choose, the layers compiled or not) and returns its seconds."""
    autocast = choose_autocast(cfg.autocast, torch.device("cpu"))
    model = new_model(model_config, cfg).train()
    loss_fn = prepare_model(model, layer_dropout=cfg.dropout_config(), early_exit_loss=cfg.exit_config())
    if compiled:
        compile_layers(model)
    fwd = TrainingForward(model, loss_fn)
    opt = new_optimizer([p for p in fwd.parameters() if p.requires_grad], cfg)
    g = torch.Generator().manual_seed(0)
    done = [0]

    def step() -> float:
        loss_fn.set_step(done[0], cfg.steps)
        done[0] += 1
        t = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = torch.randint(0, model_config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g)
            with autocast.context():
                loss, _, _ = fwd(batch[:, :-1], batch[:, 1:])
            (loss / cfg.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    return step


def time_training_steps(cfg: TrainConfig, model_config: LlamaConfig, steps: int = 3) -> StepTiming:
    """Optimizer steps of this configuration (one warm-up step, then ``steps`` timed), its layers compiled where
    ``cfg.compile`` says so."""
    run = _training_step(cfg, model_config, cfg.compile)
    first = run()
    return StepTiming(statistics.median(run() for _ in range(steps)), first)


def time_eager_and_compiled(cfg: TrainConfig, model_config: LlamaConfig, steps: int = 4
                            ) -> tuple[StepTiming, StepTiming]:
    """(eager, compiled) steps of one configuration, alternating step by step so that a drifting machine slows
    both alike (timed minutes apart, two timings of one shape differ by 5-10% here)."""
    runs = [_training_step(cfg, model_config, False), _training_step(cfg, model_config, True)]
    firsts = [run() for run in runs]
    times: list[list[float]] = [[], []]
    for i in range(steps):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[j].append(runs[j]())
    eager, compiled = (StepTiming(statistics.median(t), f) for t, f in zip(times, firsts))
    return eager, compiled


# Below about this many optimizer steps per model, the runs here produced models whose greedy continuations of
# held-out prompts loop, so that even the control's shallow exits predict them. Steps, not tokens, decide it at this
# scale: at batch 16 the baseline's best confirmed speedup was 2.27x after 164 steps and 1.30x after 235, against
# 0.77x after 358 and 0.94x after 419 (2026-12-01); at batch 8, 327 steps (0.67M tokens, which had looped at batch
# 16) gave a control whose d=1 drafts at layer 4 were accepted on .33 of its own greedy output, against .78 after
# 164 steps of 16 (2026-12-02). A plan short of it says so, with the budget that would reach it.
MEANINGFUL_STEPS = 330

# Predictions closer than this are a tie. On this shared machine one shape's prediction moves by 15-20% between
# plans of the same process (benchmarks/plan_shapes.py, 2026-12-02, 3 plans of 3 interleaved passes: 16x192
# 1.10-1.56x, 24x160 1.41-1.46x, 20x192 1.32-1.42x, 12x256 1.34-1.36x), more than the shapes differ.
PREDICTION_TIE = 0.15
# A shape that would see less than this share of the best-funded shape's tokens is not chosen; within TOKEN_TIE of
# the most, the tokens are a tie too.
MIN_TOKEN_SHARE = 0.7
TOKEN_TIE = 0.05


def choose_shape(rows: list[dict]) -> dict:
    """The plan's pick among timed candidates (each with "tokens_in_budget" and the cost model's "best"
    {"speedup"}): of the shapes that see enough tokens, those whose predicted speedup ties the highest; of those,
    one that trains on (nearly) the most tokens (an early exit is only as good as the training behind it), then the
    higher prediction. (Depth as the tie-break was tried and refuted: 24x160, the deepest, trained a looping
    control at 816 steps; DEFAULT_ARCH.)"""
    most = max(r["tokens_in_budget"] for r in rows)
    funded = [r for r in rows if r["tokens_in_budget"] >= MIN_TOKEN_SHARE * most] or rows
    top = max(r["best"]["speedup"] for r in funded)
    tied = [r for r in funded if r["best"]["speedup"] >= (1 - PREDICTION_TIE) * top]
    fullest = max(r["tokens_in_budget"] for r in tied)
    return max(tied, key=lambda r: (r["tokens_in_budget"] >= (1 - TOKEN_TIE) * fullest, r["best"]["speedup"]))
