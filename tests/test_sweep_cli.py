"""`layerskip sweep` on a tiny model with a tiny grid: outputs, the cost-model-only mode, --write-default, errors."""
import importlib.util
import json
import os

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.cli import main
from layerskip_ext.generation.defaults import default_speculation
from layerskip_ext.io.adapter import save_adapter
from layerskip_ext.model import load_model
from tiny_checkpoints import make_random_state_dict, make_tiny_config, make_tiny_tokenizer, write_gguf, write_hf_folder

PROMPTS = "def add(a, b):\n\nThe quick brown fox\n\nfor i in range(10):\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = make_tiny_config(num_hidden_layers=4, max_position_embeddings=128)
    sd = make_random_state_dict(config, seed=3)
    tok = make_tiny_tokenizer()
    write_hf_folder(root / "hf", config, sd, tok)
    write_gguf(root / "m.gguf", config, sd, tok)
    (root / "prompts.txt").write_text(PROMPTS)
    return {"hf": str(root / "hf"), "gguf": str(root / "m.gguf"), "prompts": str(root / "prompts.txt"),
            "root": root, "config": config}


def make_adapter(tiny, name, layerskip=None):
    """A rank-2 LoRA adapter on the tiny HF folder (small random deltas on q_proj of every layer)."""
    g = torch.Generator().manual_seed(1)
    c = tiny["config"]
    tensors = {}
    for i in range(c.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.lora_a"] = torch.randn(2, c.hidden_size, generator=g) * 0.01
        tensors[f"model.layers.{i}.self_attn.q_proj.lora_b"] = torch.randn(c.hidden_size, 2, generator=g) * 0.01
    return save_adapter(str(tiny["root"] / name), tensors, base_model=tiny["hf"], rank=2, alpha=4.0,
                        targets=["q_proj"], layerskip=layerskip)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sweep_args(tiny, out, *extra):
    return ["sweep", "--model", tiny["hf"], "--prompts", tiny["prompts"], "--num-prompts", "2",
            "--max-new-tokens", "8", "--exit-layers", "1,3", "--num-speculations", "1,2", "--out", str(out), *extra]


def test_sweep_writes_json_markdown_and_png(tiny, capsys, tmp_path):
    code, out, err = run_cli(capsys, *sweep_args(tiny, tmp_path / "s"))
    assert code == 0, err
    res = json.loads((tmp_path / "s" / "sweep.json").read_text())
    cells = {(c["exit_layer"], c["num_speculations"]): c for c in res["cells"]}
    assert set(cells) == {(1, 1), (1, 2), (3, 1), (3, 2)} and res["cells_measured"] == 4
    for c in cells.values():
        for key in ("acceptance", "tokens_per_round", "tokens_per_s", "speedup", "equal_to_ar"):
            assert key in c
        assert 0 <= c["acceptance"] <= 1 and c["tokens_per_round"] >= 1
        assert set(c["predicted"]) >= {"alpha", "speedup", "tokens_per_round", "replay_speedup"}
        if ops.native_available():
            assert c["equal_to_ar"] is True  # lossless: batch-invariant native kernels
    assert res["autoregressive"]["tokens_per_s"] > 0 and len(res["autoregressive"]["tokens_per_s_runs"]) == 2
    best = res["best"]
    top = max(c["speedup"] for c in cells.values() if c["equal_to_ar"] or not any(
        x["equal_to_ar"] for x in cells.values()))
    assert best["speedup"] == pytest.approx(top)
    assert f"best: E={best['exit_layer']} d={best['num_speculations']}" in out
    assert 1 <= res["predicted_best_rank"] <= 4
    assert set(res["alpha"]) == {"1", "3"}
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "| E \\ d | 1 | 2 |" in md and md.count("\n| 1 | ") == 2 and md.count("\n| 3 | ") == 2
    assert "Predicted best" in md and "measured rank" in md
    has_png = (tmp_path / "s" / "sweep.png").exists()
    assert has_png == (importlib.util.find_spec("matplotlib") is not None)


def test_sweep_png_is_skipped_with_a_note_without_matplotlib(tiny, capsys, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run_cli(capsys, *sweep_args(tiny, tmp_path / "s", "--predict"))
    assert code == 0 and "matplotlib is not installed" in err
    assert not (tmp_path / "s" / "sweep.png").exists() and (tmp_path / "s" / "sweep.json").exists()


def test_predict_only_skips_the_grid(tiny, capsys, tmp_path):
    code, out, err = run_cli(capsys, *sweep_args(tiny, tmp_path / "p", "--predict"))
    assert code == 0, err
    res = json.loads((tmp_path / "p" / "sweep.json").read_text())
    assert res["cells_measured"] == 0 and res["best"] is None and res["predicted_best_rank"] is None
    assert all("speedup" not in c and "predicted" in c for c in res["cells"])
    pb = res["predicted_best"]
    assert max(c["predicted"]["speedup"] for c in res["cells"]) == pytest.approx(pb["speedup"])
    assert f"predicted best: E={pb['exit_layer']} d={pb['num_speculations']}" in out
    assert "## Measured" not in out and "## Predicted" in out
    sc = res["stage_costs"]
    assert sc["num_layers"] == 4 and set(sc["layer_s"]) == {"1", "2", "3"}


def test_write_default_into_an_adapter_then_auto_uses_it(tiny, capsys, tmp_path):
    folder = make_adapter(tiny, "adapter_wd")
    args = sweep_args(tiny, tmp_path / "a", "--write-default")
    args[args.index("--model") + 1] = folder
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    best = json.loads((tmp_path / "a" / "sweep.json").read_text())["best"]
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert cfg["layerskip"]["exit_layer"] == best["exit_layer"]
    assert cfg["layerskip"]["num_speculations"] == best["num_speculations"]
    assert cfg["rank"] == 2 and cfg["base_model"] == tiny["hf"]  # the rest of the config is kept
    model, _ = load_model(folder)
    assert default_speculation(model) == (best["exit_layer"], best["num_speculations"])


def test_write_default_into_an_hf_folder(tiny, capsys, tmp_path):
    import shutil
    hf = shutil.copytree(tiny["hf"], tmp_path / "hf_copy")
    args = sweep_args(tiny, tmp_path / "h", "--predict", "--write-default")
    args[args.index("--model") + 1] = str(hf)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    pb = json.loads((tmp_path / "h" / "sweep.json").read_text())["predicted_best"]
    model, _ = load_model(str(hf))
    assert default_speculation(model) == (pb["exit_layer"], pb["num_speculations"])


@pytest.mark.parametrize("change,message", [
    (("--exit-layers", "1,9"), "exit layer 9 is outside [1, 4]"),
    (("--exit-layers", "0"), "exit layer 0 is outside [1, 4]"),
    (("--num-speculations", "2,0"), "depth 0 must be >= 1"),
    (("--exit-layers", ""), "empty grid"),
    (("--num-speculations", ","), "empty grid"),
    (("--exit-layers", "a,b"), "comma-separated list of integers"),
    (("--prompts", "/nonexistent/prompts.txt"), "cannot read prompts"),
    (("--num-prompts", "0"), "--num-prompts must be >= 1"),
    (("--max-new-tokens", "1"), "--max-new-tokens must be >= 2"),
])
def test_bad_input_is_a_one_line_error(tiny, capsys, tmp_path, change, message):
    args = sweep_args(tiny, tmp_path / "e")
    args[args.index(change[0]) + 1] = change[1]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()


def test_write_default_refuses_a_gguf_before_sweeping(tiny, capsys, tmp_path):
    args = sweep_args(tiny, tmp_path / "g", "--write-default")
    args[args.index("--model") + 1] = tiny["gguf"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "not a GGUF file" in err and err.count("\n") == 1
    assert not (tmp_path / "g").exists()


def test_empty_prompts_file_is_an_error(tiny, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = sweep_args(tiny, tmp_path / "x")
    args[args.index("--prompts") + 1] = str(empty)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "no prompts" in err


def test_fitted_stops_fit_on_the_prompts_after_the_swept_ones(tiny, capsys, tmp_path):
    """--fitted-stops: a stop model per dynamic exit, fitted on the --stop-fit-prompts after the first
    --num-prompts (never the swept ones), then a cell per threshold on its chance; lossless like every cell."""
    code, out, err = run_cli(capsys, *sweep_args(tiny, tmp_path / "f", "--fitted-stops", "0.3,0.6",
                                                 "--stop-fit-prompts", "1", "--dynamic-depths", "3"))
    assert code == 0, err
    res = json.loads((tmp_path / "f" / "sweep.json").read_text())
    assert res["settings"]["stop_fit_prompts"] == 1
    assert len(res["stop_fits"]) + len(res["stop_fit_errors"]) == 2  # exits 1 and 3
    assert res["stop_fits"], res["stop_fit_errors"]
    fitted = [c for c in res["dynamic_cells"] if "draft_stop_model" in c]
    assert sorted((c["exit_layer"], c["draft_stop"]) for c in fitted) == sorted(
        (f["exit_layer"], t) for f in res["stop_fits"] for t in (0.3, 0.6))
    for c in fitted:
        fit = next(f for f in res["stop_fits"] if f["exit_layer"] == c["exit_layer"])
        assert c["draft_stop_model"] == [round(w, 6) for w in fit["weights"]] and c["num_speculations"] == 3
        assert 0 <= c["acceptance"] <= 1
        if ops.native_available():
            assert c["equal_to_ar"] is True
    md = (tmp_path / "f" / "sweep.md").read_text()
    assert "0.3 fitted" in md and "Fitted stop at E=" in md


def test_write_default_stores_a_fitted_stop_and_drops_a_stale_one(tiny, tmp_path):
    import shutil

    from layerskip_ext.analysis.sweep import Cell
    from layerskip_ext.commands.sweep import _write_default
    from layerskip_ext.generation.draft_stop import tuned_stop_model

    hf = str(shutil.copytree(tiny["hf"], tmp_path / "hf_fit"))
    weights = [-0.5, 2.0, 0.1, 0.6, 0.8, 1.5]
    best = Cell(3, 6, 0.4, draft_stop_model=weights, acceptance=0.8)
    _write_default(hf, best, 1.7, predicted=False)
    model, _ = load_model(hf)
    assert model.config.layerskip["draft_stop"] == 0.4 and tuned_stop_model(model, 3) == weights
    _write_default(hf, Cell(2, 4, acceptance=0.5), 1.2, predicted=False)  # a later sweep's static best
    model, _ = load_model(hf)
    assert "draft_stop_model" not in model.config.layerskip and tuned_stop_model(model, 2) is None


def test_fitted_stops_need_prompts_left_to_fit_on(tiny, capsys, tmp_path):
    args = sweep_args(tiny, tmp_path / "n", "--fitted-stops", "0.3")
    args[args.index("--num-prompts") + 1] = "3"
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "none left to fit the stop model on" in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, *sweep_args(tiny, tmp_path / "n", "--fitted-stops", "1.5"))
    assert code == 2 and "draft-stop threshold 1.5 must be a probability" in err, err
    assert not (tmp_path / "n").exists()


def test_sampling_setting_is_written_beside_the_greedy_one(tiny, tmp_path):
    """write_sampling_setting keeps the greedy block; a later greedy --write-default keeps the sampling setting;
    sampling then decodes with it by default, greedy with the greedy one."""
    import shutil

    from layerskip_ext.analysis.sweep import Cell
    from layerskip_ext.commands.sweep import _write_default
    from layerskip_ext.errors import LayerSkipError
    from layerskip_ext.io.layerskip_block import write_sampling_setting

    hf = str(shutil.copytree(tiny["hf"], tmp_path / "hf_sampling"))
    _write_default(hf, Cell(3, 6, acceptance=0.8), 1.7, predicted=False)
    write_sampling_setting(hf, 2, 2, {"speedup": 1.3})
    model, _ = load_model(hf)
    assert default_speculation(model) == (3, 6) and default_speculation(model, greedy=False) == (2, 2)
    _write_default(hf, Cell(1, 4, acceptance=0.5), 1.2, predicted=False)  # a later greedy sweep
    model, _ = load_model(hf)
    assert default_speculation(model) == (1, 4) and model.config.layerskip["sampling"]["speedup"] == 1.3
    from layerskip_ext.generation import generate
    r = generate(model, [1, 2, 3], max_new_tokens=4, temperature=0.9, seed=0, stop_token_ids=[])
    assert (r.stats["exit_layer"], r.stats["num_speculations"]) == (2, 2)
    with pytest.raises(LayerSkipError, match="invalid setting"):
        write_sampling_setting(hf, 0, 2)
