"""Training hooks: scales and curricula, per-sample layer dropout, the chunked early-exit loss, prepare_model on our
model and on Hugging Face's, torch.compile / activation checkpointing, the train recipe (resume, atomic saves,
bad input), 2-rank DDP on CPU, and the analysis command. Tiny models only: the whole file runs in about a minute.
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from layerskip_ext.errors import CheckpointError
from layerskip_ext.model.llama import LlamaForCausalLM
from layerskip_ext.training import (EXIT_LOSS_SCALES, LAYER_SCALES, TIME_CURRICULA, EarlyExitLossConfig,
                                    LayerDropoutConfig, TrainingError, TrainingForward, exit_scale, exit_weights,
                                    layer_outputs, layer_scale, prepare_model, shift_labels, time_scale,
                                    unprepare_model)
from tiny_checkpoints import make_tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON_DIR = os.path.join(ROOT, "python")


def tiny(layers=4, seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(make_tiny_config(num_hidden_layers=layers, **overrides)).train()


def grads(model) -> dict:
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# scales and curricula
# ---------------------------------------------------------------------------------------------------------------
def test_scale_functions():
    L = 5
    for l in range(L):  # the paper's exponential scale
        assert layer_scale("exponential", l, L) == pytest.approx(math.exp(l * math.log(2) / (L - 1)) - 1)
    for name in LAYER_SCALES:
        vals = [layer_scale(name, l, L) for l in range(L)]
        assert all(0 <= v <= 1 + 1e-12 for v in vals) and vals == sorted(vals), name
        assert vals[-1] == pytest.approx(1.0), name
        if name != "uniform":
            assert vals[0] == pytest.approx(0.0, abs=1e-12), name
    assert layer_scale("linear", 2, 5) == 0.5 and layer_scale("step", 1, 5) == 0 and layer_scale("step", 2, 5) == 1
    assert layer_scale("log", 1, 5) == pytest.approx(math.log(2) / math.log(5))
    for name in TIME_CURRICULA:
        assert time_scale(name, 9, 10) == pytest.approx(1.0)
    assert time_scale("none", 0, 10) == 1 and time_scale("exp", 0, 10) == 0 and time_scale("exponential", 3, None) == 1
    assert [exit_scale(n, 4) for n in EXIT_LOSS_SCALES] == pytest.approx([10, 4, 1, 2, 0.25, 0.5])
    with pytest.raises(TrainingError, match="unknown layer-dropout scale 'cubic'"):
        layer_scale("cubic", 0, 4)
    with pytest.raises(TrainingError, match=r"p_max must be in \[0, 1\]"):
        LayerDropoutConfig(p_max=1.5)
    with pytest.raises(TrainingError, match=r"p_max must be in \[0, 1\]"):
        LayerDropoutConfig(p_max=-0.1)
    with pytest.raises(TrainingError, match="unknown layer-dropout time curriculum"):
        LayerDropoutConfig(p_max=0.1, time_curriculum="later")
    with pytest.raises(TrainingError, match="unknown early-exit loss scale 'sum'"):
        EarlyExitLossConfig(scale="sum")
    with pytest.raises(TrainingError, match="unknown early-exit curriculum 'random'"):
        EarlyExitLossConfig(curriculum="random")
    with pytest.raises(TrainingError, match="outside"):
        prepare_model(tiny(2), early_exit_loss=EarlyExitLossConfig(layers=[3]))


def test_exit_weights_and_curricula():
    cfg = EarlyExitLossConfig(e_scale=1.0, scale="sum-l")
    exits, ce, kl = exit_weights(cfg, 4)
    assert exits == [1, 2, 3, 4] and sum(ce) == pytest.approx(1) and ce == pytest.approx([1 / 20, 3 / 20, 6 / 20, 10 / 20])
    assert kl == [0, 0, 0, 0]
    exits, ce, _ = exit_weights(EarlyExitLossConfig(e_scale=0.5, scale="uniform"), 4)
    assert ce == pytest.approx([0.5 / 2.5] * 3 + [1 / 2.5])
    assert exit_weights(EarlyExitLossConfig(e_scale=0.0), 4)[:2] == ([4], [1.0])
    rot = EarlyExitLossConfig(curriculum="rotational", rotation_interval=2)
    assert [exit_weights(rot, 4, step)[0] for step in range(3)] == [[2, 4], [1, 3, 4], [2, 4]]
    grad = EarlyExitLossConfig(curriculum="gradual", gradual_fraction=0.5)
    assert [exit_weights(grad, 4, s, 10)[0] for s in (0, 2, 4, 9)] == [[3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    exits, ce, kl = exit_weights(EarlyExitLossConfig(layers=[2], distill=0.5), 4)
    assert exits == [2, 4] and kl == pytest.approx([0.5 * ce[0], 0.0])


# ---------------------------------------------------------------------------------------------------------------
# early-exit loss
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distill,anchor", [(0.0, 0.0), (0.7, 0.0), (0.0, 0.6), (0.7, 1.3)])
def test_chunked_loss_equals_naive(distill, anchor):
    base = tiny(4)
    tokens = torch.randint(0, 300, (3, 11))
    labels = shift_labels(tokens)
    labels[1, :4] = -100
    reference = tiny(4, seed=5).hidden_states(tokens)[-1].detach() if anchor else None  # another model's states

    def run(naive):
        m = copy.deepcopy(base)
        fn = prepare_model(m, early_exit_loss=EarlyExitLossConfig(e_scale=0.5, distill=distill, anchor=anchor,
                                                                  naive=naive, chunk_tokens=7))
        hs = m.hidden_states(tokens)
        for h in hs:
            h.retain_grad()
        out = fn(hs, labels, anchor_hidden=reference)
        out.loss.backward()
        return out, grads(m), [h.grad for h in hs]

    (a, ga, ha), (b, gb, hb) = run(False), run(True)
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-6)
    assert torch.allclose(a.exit_losses, b.exit_losses, rtol=1e-6)
    assert torch.allclose(a.distill_losses, b.distill_losses, rtol=1e-5, atol=1e-7)
    assert (a.distill_losses[:-1] > 0).all() == (distill > 0)
    assert (a.distill_losses[-1] > 0) == (anchor > 0)  # the final exit's KL is the anchor's
    assert max_diff(ga, gb) < 1e-6
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(ha, hb))
    # per-exit CE equals a direct computation
    logits = base.head(base.hidden_states(tokens)[1]).reshape(-1, 320)
    assert float(a.exit_losses[1]) == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits, labels.reshape(-1), ignore_index=-100).detach()), rel=1e-5)
    assert "L4: ce" in a.report()


def test_anchor_states_are_required_exactly_when_the_anchor_is_on():
    m = tiny(3)
    tokens = torch.randint(0, 300, (2, 6))
    hs = m.hidden_states(tokens)
    on = prepare_model(m, early_exit_loss=EarlyExitLossConfig(anchor=1.0))
    with pytest.raises(TrainingError, match="no reference final states"):
        on(hs, shift_labels(tokens))
    with pytest.raises(TrainingError, match="does not match the last layer's output"):
        on(hs, shift_labels(tokens), anchor_hidden=hs[-1][:, :3])
    off = prepare_model(m, early_exit_loss=EarlyExitLossConfig(anchor=0.0))
    with pytest.raises(TrainingError, match="the anchor weight is 0"):
        off(hs, shift_labels(tokens), anchor_hidden=hs[-1])


def test_chunked_loss_never_keeps_full_logits():
    """Autograd saves no [tokens, vocab] tensor in the fused path (the naive one saves one per exit)."""
    base = tiny(3)
    tokens = torch.randint(0, 300, (2, 16))
    N, V = tokens.numel(), 320

    def biggest_saved(naive):
        m = copy.deepcopy(base)
        fn = prepare_model(m, early_exit_loss=EarlyExitLossConfig(naive=naive, chunk_tokens=8))
        hs = m.hidden_states(tokens)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = fn(hs, shift_labels(tokens))
        out.loss.backward()
        return max(sizes)

    assert biggest_saved(naive=True) >= N * V
    assert biggest_saved(naive=False) < 8 * V


# ---------------------------------------------------------------------------------------------------------------
# layer dropout
# ---------------------------------------------------------------------------------------------------------------
def _record_inner_calls(model):
    calls = []
    for i, w in enumerate(model.model.layers):
        w.layer.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args[0].shape[0])))
    return calls


def test_layer_dropout_is_per_sample_reproducible_and_off_in_eval():
    base = tiny(4)
    tokens = torch.randint(0, 300, (6, 9))

    def run(seed, p=0.5):
        m = copy.deepcopy(base)
        fn = prepare_model(m, layer_dropout=LayerDropoutConfig(p, scale="uniform", seed=seed))
        calls = _record_inner_calls(m)
        ios = []
        for w in m.model.layers:
            w.register_forward_hook(lambda mod, args, out: ios.append((args[0].detach(), out.detach())))
        out = fn(m.hidden_states(tokens), shift_labels(tokens))
        out.loss.backward()
        return fn, calls, ios, float(out.loss.detach()), m

    fn, calls, ios, loss, m = run(seed=3)
    kept = fn.layer_dropout.kept_rows()
    assert [b for _, b in calls] == kept and len(calls) == 4   # every layer called once, on its kept rows
    assert 0 < sum(kept) < 24
    plan = fn.layer_dropout._plan
    for layer, (inp, outp) in enumerate(ios):
        idx = plan.keep[layer]
        keep = set(range(6)) if idx is None else set(idx.tolist())
        for row in range(6):
            same = torch.equal(inp[row], outp[row])
            assert same == (row not in keep), (layer, row)   # a dropped sample skips the layer exactly
    fn2, _, _, loss2, _ = run(seed=3)
    assert loss2 == loss and fn2.layer_dropout.kept_rows() == kept
    assert fn.layer_dropout.counter == 1
    _, _, _, loss3, _ = run(seed=4)
    assert loss3 != loss
    # eval mode: no dropout; the wrapped model computes what the plain one does
    m.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(m(tokens), base(tokens))
    assert list(m.state_dict()) == list(base.state_dict())   # names unchanged by the wrappers
    unprepare_model(m)
    assert type(m.model.layers[0]).__name__ == "DecoderLayer"


def test_every_layer_runs_even_with_no_kept_rows():
    m = tiny(3)
    fn = prepare_model(m, layer_dropout=LayerDropoutConfig(1.0, scale="uniform"))
    calls = _record_inner_calls(m)
    tokens = torch.randint(0, 300, (2, 8))
    hs = m.hidden_states(tokens)
    assert calls == [(0, 0), (1, 0), (2, 0)]
    assert all(torch.equal(h, hs[0]) for h in hs)
    fn(hs, shift_labels(tokens)).loss.backward()
    layer_grads = [p.grad for p in m.model.layers.parameters()]
    assert all(g is not None and not g.any() for g in layer_grads)   # zero (not missing) gradients


def test_rates_follow_scale_and_time_curriculum():
    m = tiny(4)
    fn = prepare_model(m, layer_dropout=LayerDropoutConfig(0.4, scale="linear", time_curriculum="linear"))
    fn.set_step(0, 11)
    assert fn.layer_dropout.rates() == pytest.approx([0, 0, 0, 0])
    fn.set_step(10, 11)
    assert fn.layer_dropout.rates() == pytest.approx([0, 0.4 / 3, 0.8 / 3, 0.4])
    fn.set_step(5, 11)
    assert fn.layer_dropout.rates()[-1] == pytest.approx(0.2)
    # the empirical keep rate matches
    fn.set_step(10, 11)
    mask = fn.layer_dropout.draw(0, 20000)
    assert (1 - mask.double().mean(1)).tolist() == pytest.approx([0, 0.4 / 3, 0.8 / 3, 0.4], abs=0.015)


def test_activation_checkpointing_and_recompute_keep_the_plan():
    base = tiny(3)
    tokens = torch.randint(0, 300, (4, 8))
    ld = LayerDropoutConfig(0.6, scale="uniform", seed=5)

    def run(mode):
        m = copy.deepcopy(base)
        fn = prepare_model(m, layer_dropout=ld, early_exit_loss=True, activation_checkpointing=(mode == "layers"))
        if mode == "whole":   # user checkpoints the whole forward: the recompute must reuse the same drops
            from torch.utils.checkpoint import checkpoint
            hs = checkpoint(lambda t: torch.stack(m.hidden_states(t)), tokens, use_reentrant=False)
        else:
            hs = m.hidden_states(tokens)
        out = fn(list(hs), shift_labels(tokens))
        out.loss.backward()
        return float(out.loss.detach()), grads(m), fn.layer_dropout.counter

    ref, g0, c0 = run("none")
    for mode in ("layers", "whole"):
        loss, g, c = run(mode)
        assert loss == pytest.approx(ref, rel=1e-6) and max_diff(g0, g) < 1e-6 and c == c0 == 1, mode


def test_runs_under_torch_compile():
    base = tiny(2)
    tokens = torch.randint(0, 300, (4, 8))
    labels = shift_labels(tokens)

    def run(compiled):
        torch._dynamo.reset()
        m = copy.deepcopy(base)
        fn = prepare_model(m, layer_dropout=LayerDropoutConfig(0.5, scale="uniform", seed=1),
                           early_exit_loss=EarlyExitLossConfig(distill=0.2))
        fwd = TrainingForward(m, fn)
        runner = torch.compile(fwd, backend="aot_eager") if compiled else fwd
        losses = []
        for _ in range(1):   # one step: compiling again for the next step's kept-row counts costs ~10 s
            loss, _, _ = runner(tokens, labels)
            loss.backward()
            losses.append(float(loss.detach()))
        return losses, grads(m)

    (l1, g1), (l2, g2) = run(False), run(True)
    assert l1 == pytest.approx(l2, rel=1e-5) and max_diff(g1, g2) < 1e-5


def test_hugging_face_model_matches_ours():
    transformers = pytest.importorskip("transformers")
    ours = tiny(4, vocab_size=300)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.config.to_hf_dict()))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.train()
    keys = list(hf.state_dict())
    tokens = torch.randint(0, 300, (4, 10))
    labels = shift_labels(tokens)
    ld = LayerDropoutConfig(0.7, scale="uniform", seed=1)   # some layers keep no row (HF runs a dummy row)
    ee = EarlyExitLossConfig(e_scale=1.0, distill=0.3)
    f1 = prepare_model(ours, layer_dropout=ld, early_exit_loss=ee)
    f2 = prepare_model(hf, layer_dropout=ld, early_exit_loss=ee)
    assert list(hf.state_dict()) == keys
    for step in range(3):
        f1.set_step(step)
        f2.set_step(step)
        o1 = f1(layer_outputs(ours, tokens), labels)
        hf.model(input_ids=tokens, use_cache=False)
        o2 = f2(None, labels)                        # the recorded layer outputs
        assert f1.layer_dropout.kept_rows() == f2.layer_dropout.kept_rows()
        assert torch.allclose(o1.exit_losses, o2.exit_losses, atol=1e-5)
        o1.loss.backward()
        o2.loss.backward()
    g1, g2 = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name, p in g2.items():
        assert torch.allclose(p.grad, g1[name].grad, atol=1e-5), name
    unprepare_model(hf)
    assert type(hf.model.layers[0]).__name__ == "LlamaDecoderLayer"


# ---------------------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        text = "".join(f"def func_{i}_{j}(x, y):\n    return x * {j} + y - {i}  # add {j}\n\n" for j in range(40))
        (d / f"mod{i}.py").write_text(text)
    (d / "notes.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (d / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    return str(d)


@pytest.fixture(scope="module")
def init_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                                "num_key_value_heads": 1, "intermediate_size": 64,
                                "max_position_embeddings": 64}))
    return str(path)


def train_cfg(out, corpus, init_config, **kw):
    from layerskip_ext.training.trainer import TrainConfig

    base = dict(out=str(out), data=corpus, init_config=init_config, train_tokenizer=300, steps=4, batch_size=4,
                seq_len=32, lr=3e-3, layer_dropout=0.3, ld_scale="uniform", early_exit=1.0,
                ee_curriculum="rotational", distill=0.2, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_train_from_scratch_output_reloads_and_analyzes(tmp_path, corpus, init_config, capsys, monkeypatch):
    from layerskip_ext.generation import generate
    from layerskip_ext.model import load_model
    from layerskip_ext.commands import analyze
    from layerskip_ext.training.trainer import run_training

    out = tmp_path / "run"
    summary = run_training(train_cfg(out, corpus, init_config, steps=4, grad_accum=2))
    assert summary["step"] == 4 and math.isfinite(summary["loss"])
    log = [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 5))
    assert list(log[0]["exits"]) == ["2", "3"] and list(log[1]["exits"]) == ["1", "3"]   # rotational
    assert log[-1]["loss"] < log[0]["loss"]
    model, tok = load_model(str(out), backend="reference")
    assert tok is not None and tok.vocab_size == 300 and model.config.vocab_size == 300
    ids = tok.encode("def func_1_2(x, y):")
    assert tok.decode(ids) == "def func_1_2(x, y):"
    res = generate(model, [ids], max_new_tokens=4)
    assert len(res.sequences[0].tokens) == 4

    import argparse
    p = argparse.ArgumentParser()
    analyze.add_args(p)
    png = tmp_path / "layers.png"
    args = p.parse_args(["--model", str(out), "--data", corpus, "--seq-len", "32", "--max-tokens", "256",
                         "--plot", str(png)])
    pytest.importorskip("matplotlib")
    assert analyze.run(args) == 0
    text = capsys.readouterr().out
    assert "layer  accuracy" in text and len([ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]) == 3
    assert png.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # the [plot] extra missing: say so, no PNG
    png.unlink()
    args.json = True
    assert analyze.run(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["plot"] is None and "matplotlib is not installed" in res["plot_note"] and not png.exists()
    assert [r["layer"] for r in res["layers"]] == [1, 2, 3] and res["layers"][2]["agreement"] == 1.0


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_continues_exactly_and_refuses_changes(tmp_path, corpus, init_config):
    from layerskip_ext.training.trainer import run_training

    run_training(train_cfg(tmp_path / "a", corpus, init_config, grad_accum=2))
    b = tmp_path / "b"
    s = run_training(train_cfg(b, corpus, init_config, grad_accum=2, stop_at=2))
    assert s["step"] == 2 and (b / "model.safetensors").exists()
    with pytest.raises(TrainingError, match="--lr changed"):
        run_training(train_cfg(b, corpus, init_config, grad_accum=2, lr=1e-3))
    with pytest.raises(TrainingError, match="--layer-dropout changed"):
        run_training(train_cfg(b, corpus, init_config, grad_accum=2, layer_dropout=0.5))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                                 "intermediate_size": 64, "max_position_embeddings": 64}))
    with pytest.raises(CheckpointError, match="different model .hidden_size: 32 there, 64 now"):
        run_training(train_cfg(b, corpus, str(other), grad_accum=2))
    s = run_training(train_cfg(b, corpus, init_config, grad_accum=2))       # resumes at step 2
    assert s["step"] == 4
    wa, wb = _weights(tmp_path / "a"), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = [json.loads(x)["step"] for x in (b / "training" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    s = run_training(train_cfg(b, corpus, init_config, grad_accum=2, lr=1e-3, fresh=True, steps=1))
    assert s["step"] == 1


def test_kill_during_save_keeps_last_good_checkpoint(tmp_path, corpus, init_config):
    from layerskip_ext.training.checkpoint import load_state
    from layerskip_ext.training.trainer import run_training

    out = tmp_path / "run"
    run_training(train_cfg(out, corpus, init_config, steps=4, stop_at=2))
    state_path = out / "training" / "state.pt"
    before = state_path.read_bytes()
    flag = tmp_path / "mid-save"
    script = f"""
import sys, time, torch
sys.path.insert(0, {PYTHON_DIR!r})
from layerskip_ext.training.checkpoint import save_state
class Slow:
    def __reduce__(self):
        open({str(flag)!r}, "w").close()
        time.sleep(60)
        return (int, (0,))
save_state({{"version": 1, "step": 99, "model": {{"w": torch.zeros(1000)}}, "slow": Slow()}}, {str(state_path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline, "saver did not start"
            time.sleep(0.02)
        proc.kill()   # SIGKILL in the middle of writing the temp file
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in os.listdir(out / "training") if ".tmp." in p]
    assert leftovers, "the interrupted save should have left its temp file"
    assert state_path.read_bytes() == before and load_state(str(state_path))["step"] == 2
    s = run_training(train_cfg(out, corpus, init_config, steps=4))
    assert s["step"] == 4
    assert not [p for p in os.listdir(out / "training") if ".tmp." in p]
    # a damaged state file is reported, never silently replaced
    state_path.write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        run_training(train_cfg(out, corpus, init_config, steps=4))


def test_bad_inputs(tmp_path, corpus, init_config, capsys):
    from layerskip_ext.cli import main
    from layerskip_ext.corpus import read_corpus
    from layerskip_ext.training.trainer import run_training

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(TrainingError, match="is empty"):
        run_training(train_cfg(tmp_path / "o1", str(empty), init_config))
    small = tmp_path / "small.txt"
    small.write_text("hi")
    with pytest.raises(TrainingError, match="dataset too small"):
        run_training(train_cfg(tmp_path / "o2", str(small), init_config))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:2: not valid JSON"):
        read_corpus(str(bad))
    other = tmp_path / "other.jsonl"
    other.write_text('{"content": "x"}\n')
    with pytest.raises(TrainingError, match="no 'text' field"):
        read_corpus(str(other))
    assert read_corpus(str(other), text_field="content") == ["x"]
    with pytest.raises(TrainingError, match="not found"):
        read_corpus(str(tmp_path / "missing"))
    with pytest.raises(TrainingError, match="--train-tokenizer vocabulary size"):
        run_training(train_cfg(tmp_path / "o4", corpus, init_config, train_tokenizer=100))
    with pytest.raises(TrainingError, match="--init-config"):
        run_training(train_cfg(tmp_path / "o5", corpus, None))
    cases = [(["--layer-dropout", "1.5"], "p_max must be in [0, 1]"),
             (["--ld-scale", "cubic"], "unknown layer-dropout scale 'cubic'"),
             (["--ee-curriculum", "sometimes"], "unknown early-exit curriculum"),
             (["--ee-scale", "quadratic"], "unknown early-exit loss scale")]
    base = ["train", "--init-config", init_config, "--train-tokenizer", "300", "--data", corpus,
            "--out", str(tmp_path / "o6")]
    capsys.readouterr()
    for extra, msg in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    # the same through a fresh interpreter: exit status 2 and exactly one line on stderr
    proc = subprocess.run([sys.executable, "-m", "layerskip_ext.cli"] + base + ["--layer-dropout", "2"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: layer-dropout p_max must be in [0, 1], got 2.0"]


# ---------------------------------------------------------------------------------------------------------------
# 2 ranks on CPU (gloo, 127.0.0.1)
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=150):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PYTHON_DIR, HERE]), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-rank run hung (> {timeout}s): {' '.join(args)}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_ddp_equal_gradients_and_single_process_loss(tmp_path, corpus, init_config):
    """One torchrun launch: the hooks under DDP (compared with one process on the global batch), then the
    training recipe with 2 ranks x batch 2 (compared with the recipe in one process with batch 4)."""
    import dist_worker as w
    from layerskip_ext.training.trainer import run_training

    _torchrun([os.path.join(HERE, "dist_worker.py"), str(tmp_path), corpus, init_config])
    h0, h1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    model, fn, fwd = w.build(world_size=1, rank=0)
    ref = w.run(fwd, model, fn, slice(None))        # one process, the whole global batch
    saw_empty = False
    for (l0, g0, k0), (l1, g1, k1), (lr, gr, kr) in zip(h0, h1, ref):
        assert all(torch.equal(g0[n], g1[n]) for n in g0)                   # identical after all-reduce
        assert (l0 + l1) / 2 == pytest.approx(lr, rel=1e-5)
        assert max_diff(g0, gr) < 1e-5
        assert [a + b for a, b in zip(k0, k1)] == kr                        # the same drops, split by rank
        saw_empty |= 0 in k0 + k1
    assert saw_empty, "the test should cover a layer with no kept row on some rank"

    one = run_training(w.recipe_config(str(tmp_path / "one"), corpus, init_config, batch_size=4))
    wa, wb = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    log = [json.loads(x) for x in (tmp_path / "ddp" / "training" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_autocast_auto_picks_what_this_machine_runs_faster(monkeypatch):
    from layerskip_ext.training import machine

    rates = {}
    monkeypatch.setattr(machine, "matmul_gflops", lambda dtype, device, shape=None: rates[dtype])
    cpu = torch.device("cpu")
    rates.update({torch.float32: 150.0, torch.bfloat16: 3.0})  # AVX2: no native bf16
    a = machine.choose_autocast("auto", cpu)
    assert a.choice == "none" and "fp32 is faster" in a.reason
    rates.update({torch.float32: 150.0, torch.bfloat16: 390.0})  # AVX-512-BF16
    assert machine.choose_autocast("auto", cpu).choice == "bf16"
    assert machine.choose_autocast("none", cpu).choice == "none" and machine.choose_autocast("bf16", cpu).choice == "bf16"


def test_train_flops_per_token_counts_layers_attention_and_exit_heads():
    from layerskip_ext.config import LlamaConfig
    from layerskip_ext.training.machine import train_flops_per_token

    c = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)
    per_layer = 2 * (8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16) + 4 * (3 + 1) / 2 * 8
    assert train_flops_per_token(c, 3, exits_per_step=1) == 3 * (2 * per_layer + 2 * 100 * 8)
    assert train_flops_per_token(c, 3, 2, kept_layer_fraction=0.5) == 3 * (per_layer + 2 * 2 * 100 * 8)
