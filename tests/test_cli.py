"""The `layerskip` command on tiny checkpoints written to disk (HF folder and GGUF), bad input included."""
import json
import os
import subprocess
import sys

import pytest

from layerskip_ext import ops
from layerskip_ext.cli import main
from layerskip_ext.generation import generate
from layerskip_ext.model import load_model
from tiny_checkpoints import make_random_state_dict, make_tiny_config, make_tiny_tokenizer, write_gguf, write_hf_folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    config = make_tiny_config(num_hidden_layers=3, max_position_embeddings=64)
    sd = make_random_state_dict(config, seed=3)
    tok = make_tiny_tokenizer()
    write_hf_folder(root / "hf", config, sd, tok)
    write_gguf(root / "m.gguf", config, sd, tok, tensor_type="F32")
    return {"hf": str(root / "hf"), "gguf": str(root / "m.gguf"), "root": root}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_generate_json_matches_library_greedy(checkpoints, capsys, fmt):
    code, out, _ = run_cli(capsys, "generate", "--model", checkpoints[fmt], "--prompt", "def add(a, b):",
                           "--max-new-tokens", "12", "--json", "--backend", "reference")
    assert code == 0
    res = json.loads(out)
    for key in ("text", "tokens", "prompt_tokens", "new_tokens", "time_s", "tokens_per_s", "prefill_s", "strategy",
                "finish_reason"):
        assert key in res
    model, tok = load_model(checkpoints[fmt], backend="reference")
    ids = tok.encode("def add(a, b):")
    stops = set(model.config.eos_token_ids) | tok.eos_token_ids
    expected = generate(model, ids, max_new_tokens=12, stop_token_ids=stops).sequences[0].tokens
    assert res["tokens"] == expected and res["prompt_tokens"] == len(ids) and res["new_tokens"] == len(expected)
    assert res["strategy"] == "autoregressive"


def test_streaming_text_equals_json_text(checkpoints, capsys):
    args = ["generate", "--model", checkpoints["hf"], "--prompt", "The quick", "--max-new-tokens", "16"]
    code, streamed, err = run_cli(capsys, *args)
    assert code == 0 and "tokens/s" in err
    _, out, _ = run_cli(capsys, *args, "--json")
    assert streamed.rstrip("\n") == json.loads(out)["text"]


def test_chat_prompt_file_and_strategies(checkpoints, capsys, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("What is the capital of France?")
    base = ["generate", "--model", checkpoints["hf"], "--prompt-file", str(prompt_file), "--chat", "--json",
            "--max-new-tokens", "10"]
    _, out, _ = run_cli(capsys, *base)
    ar = json.loads(out)
    tok = load_model(checkpoints["hf"])[1]
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert ar["prompt_tokens"] == len(tok.encode(chat))
    _, out, _ = run_cli(capsys, *base, "--strategy", "early_exit", "--exit-layer", "2")
    assert json.loads(out)["strategy"] == "early_exit" and json.loads(out)["exit_layer"] == 2
    _, out, _ = run_cli(capsys, *base, "--strategy", "self_speculative", "--exit-layer", "1",
                        "--num-speculations", "3")
    ss = json.loads(out)
    for key in ("exit_layer", "num_speculations", "draft_tokens", "accepted_tokens", "acceptance_rate", "rounds"):
        assert key in ss
    assert ss["strategy"] == "self_speculative" and ss["num_speculations"] == 3
    _, out, _ = run_cli(capsys, *base, "--strategy", "self_speculative", "--exit-layer", "1",
                        "--num-speculations", "6", "--draft-growth", "2", "--draft-stop", "0.1")
    dyn = json.loads(out)
    assert (dyn["draft_growth"], dyn["draft_stop"]) == (2, 0.1) and dyn["tokens"] == ar["tokens"]


def test_sampling_flags_are_reproducible(checkpoints, capsys):
    args = ["generate", "--model", checkpoints["gguf"], "--prompt", "Once", "--max-new-tokens", "12", "--json",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "11"]
    _, a, _ = run_cli(capsys, *args)
    _, b, _ = run_cli(capsys, *args)
    assert json.loads(a)["tokens"] == json.loads(b)["tokens"]


def test_bfloat16_generation(checkpoints, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", checkpoints["hf"], "--prompt", "Hi", "--dtype", "bfloat16",
                           "--max-new-tokens", "5", "--json")
    assert code == 0 and json.loads(out)["dtype"] == "bfloat16"


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--dtype", "float16"], "unsupported dtype"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--strategy", "early_exit", "--exit-layer", "9"], "exit_layer"),
    (["--strategy", "self_speculative", "--exit-layer", "2", "--num-speculations", "0"], "num_speculations"),
    (["--strategy", "nope"], "unknown strategy"),
    (["--strategy", "self_speculative", "--exit-layer", "2", "--draft-growth", "-2"], "draft_growth"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read prompt file"),
])
def test_bad_arguments_are_one_line_errors(checkpoints, capsys, extra, message):
    argv = ["generate", "--model", checkpoints["hf"], "--json"]
    argv += extra if "--prompt-file" in extra else ["--prompt", "hello", *extra]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_prompt_longer_than_context(checkpoints, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", checkpoints["hf"], "--prompt", "word " * 200)
    assert code == 2 and "context" in err


@pytest.mark.parametrize("corrupt", ["missing", "truncated_gguf", "not_a_checkpoint"])
def test_bad_checkpoints_exit_nonzero_with_one_line(checkpoints, corrupt, tmp_path):
    if corrupt == "missing":
        model = str(tmp_path / "nope")
    elif corrupt == "truncated_gguf":
        data = open(checkpoints["gguf"], "rb").read()
        model = str(tmp_path / "t.gguf")
        open(model, "wb").write(data[: len(data) // 2])
    else:
        model = str(tmp_path / "x.txt")
        open(model, "w").write("hello")
    proc = subprocess.run([sys.executable, "-m", "layerskip_ext.cli", "generate", "--model", model, "--prompt", "a"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_check_lossless_reports_zero_mismatches(checkpoints, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def add(a, b):", "The quick brown", "Hi"]))
    report = tmp_path / "r.json"
    code, out, _ = run_cli(capsys, "check-lossless", "--model", checkpoints["hf"], "--prompts", str(prompts),
                           "--exit-layers", "1,2", "--num-speculations", "1,3", "--max-new-tokens", "16",
                           "--backend", "native", "--json", str(report))
    assert code == 0, out
    rows = json.loads(report.read_text())
    assert len(rows) == 4 and all(r["mismatches"] == [] and r["prompts"] == 3 for r in rows)
    assert "0 mismatches" in out


def test_info_reports_build(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and "cuda_compiled" in info and "cpu_isa" in info and "version" in info


def test_train_then_analyze_then_generate(checkpoints, capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n" * 40)
    (data / "b.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "trained"
    code, _, err = run_cli(capsys, "train", "--model", checkpoints["hf"], "--data", str(data), "--out", str(out),
                           "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--layer-dropout", "0.2",
                           "--early-exit", "0.5", "--no-progress", "--threads", "1")
    assert code == 0, err
    code, table, err = run_cli(capsys, "analyze", "--model", str(out), "--data", str(data), "--seq-len", "32",
                               "--max-tokens", "256", "--no-plot")
    assert code == 0, err
    assert len([line for line in table.splitlines() if line.strip()[:1].isdigit()]) >= 3  # one row per layer
    code, res, err = run_cli(capsys, "generate", "--model", str(out), "--prompt", "def", "--max-new-tokens", "4",
                             "--json")
    assert code == 0, err
    assert json.loads(res)["new_tokens"] >= 1


def test_auto_strategy_uses_a_tuned_setting_only_when_it_was_faster(checkpoints, capsys, tmp_path):
    """--strategy auto self-speculates with the model's layerskip block, unless the block records a measured
    speedup <= 1 (layerskip sweep --write-default on a model whose best setting is slower than autoregressive)."""
    import shutil
    folder = tmp_path / "tuned"
    shutil.copytree(checkpoints["hf"], folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    strategies = {}
    for name, block in {"faster": {"exit_layer": 2, "num_speculations": 2, "speedup": 1.4},
                        "slower": {"exit_layer": 2, "num_speculations": 2, "speedup": 0.8},
                        "unmeasured": {"exit_layer": 2, "num_speculations": 2}}.items():
        cfg_path.write_text(json.dumps(dict(cfg, layerskip=block)))
        code, out, _ = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "def f(x):",
                               "--max-new-tokens", "4", "--json", "--backend", "reference")
        assert code == 0
        strategies[name] = json.loads(out)["strategy"]
    assert strategies == {"faster": "self_speculative", "slower": "autoregressive",
                          "unmeasured": "self_speculative"}
