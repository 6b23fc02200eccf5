"""Self-speculative rounds as CUDA graphs: same tokens as eager greedy decoding (CUDA only), and clear errors where
they do not apply (everywhere)."""
from __future__ import annotations

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.errors import GenerationError
from layerskip_ext.generation import generate
from tiny_checkpoints import make_tiny_model

CUDA = torch.cuda.is_available()


def test_cuda_graph_argument_errors():
    model = make_tiny_model(0, torch.float32)
    with pytest.raises(GenerationError, match="needs the model on a CUDA device"):
        generate(model, [1, 2, 3], max_new_tokens=4, strategy="self_speculative", exit_layer=1,
                 num_speculations=2, cuda_graph=True)
    with pytest.raises(GenerationError, match="needs the model on a CUDA device"):
        generate(model, [1, 2, 3], max_new_tokens=4, strategy="autoregressive", cuda_graph=True)
    for strategy in ("autoregressive", "self_speculative"):  # sampling is graphed too: the same device check
        with pytest.raises(GenerationError, match="needs the model on a CUDA device"):
            generate(model, [1, 2, 3], max_new_tokens=4, strategy=strategy, exit_layer=1 if strategy != "autoregressive"
                     else None, num_speculations=2 if strategy != "autoregressive" else None, temperature=0.8,
                     cuda_graph=True)
    for dynamic in (dict(draft_stop=0.5), dict(draft_growth=2)):
        with pytest.raises(GenerationError, match="does not combine with dynamic drafting"):
            generate(model, [1, 2, 3], max_new_tokens=4, strategy="self_speculative", exit_layer=1,
                     num_speculations=2, cuda_graph=True, **dynamic)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False])
def test_cuda_graph_rounds_equal_eager_and_autoregressive(dtype, native):
    if native and not ops.native_available():
        pytest.skip("native extension not built")
    model = make_tiny_model(6, dtype, num_hidden_layers=4).cuda()
    model.build_decoder("native" if native else "reference")
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7], [11, 12]]
    ar = generate(model, prompts, max_new_tokens=40, stop_token_ids=[7])
    for E, d in ((1, 3), (2, 2), (3, 5)):
        kw = dict(max_new_tokens=40, stop_token_ids=[7], strategy="self_speculative", exit_layer=E,
                  num_speculations=d)
        eager = generate(model, prompts, **kw)
        graphed = generate(model, prompts, cuda_graph=True, **kw)
        assert [s.tokens for s in graphed.sequences] == [s.tokens for s in eager.sequences], (E, d)
        assert [s.tokens for s in graphed.sequences] == [s.tokens for s in ar.sequences], (E, d)
        assert graphed.stats["rounds"] == eager.stats["rounds"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_eager_autoregressive_and_early_exit(dtype):
    """Autoregressive and early-exit steps replayed as graphs: the eager tokens, sequences finishing at different
    steps (a new graph per number of live sequences)."""
    model = make_tiny_model(6, dtype, num_hidden_layers=4).cuda()
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7], [11, 12]]
    for kw in (dict(strategy="autoregressive"), dict(strategy="early_exit", exit_layer=2)):
        eager = generate(model, prompts, max_new_tokens=40, stop_token_ids=[7], **kw)
        graphed = generate(model, prompts, max_new_tokens=40, stop_token_ids=[7], cuda_graph=True, **kw)
        assert [s.tokens for s in graphed.sequences] == [s.tokens for s in eager.sequences], kw
        assert [s.finish_reason for s in graphed.sequences] == [s.finish_reason for s in eager.sequences], kw


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("native", [True, False])
def test_cuda_graph_sampling_draws_the_eager_tokens(native):
    """Sampling with cuda_graph: the generator registered with each graph, a replay draws what the eager step would,
    so a seeded graphed generation emits the eager tokens (autoregressive and self-speculative, top-p too)."""
    if native and not ops.native_available():
        pytest.skip("native extension not built")
    model = make_tiny_model(6, torch.float32, num_hidden_layers=4).cuda()
    model.build_decoder("native" if native else "reference")
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7], [11, 12]]
    for kw in (dict(strategy="autoregressive"), dict(strategy="self_speculative", exit_layer=2, num_speculations=3,
                                                     draft_growth=0, draft_stop=0.0)):
        for draw in (dict(temperature=0.9, seed=3), dict(temperature=1.2, top_p=0.9, seed=4)):
            eager = generate(model, prompts, max_new_tokens=40, stop_token_ids=[7], **kw, **draw)
            graphed = generate(model, prompts, max_new_tokens=40, stop_token_ids=[7], cuda_graph=True, **kw, **draw)
            assert [s.tokens for s in graphed.sequences] == [s.tokens for s in eager.sequences], (kw, draw)
            other = generate(model, prompts, max_new_tokens=40, stop_token_ids=[7], cuda_graph=True, **kw,
                             **dict(draw, seed=draw["seed"] + 10))
            assert [s.tokens for s in other.sequences] != [s.tokens for s in graphed.sequences]  # replays draw anew


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_step_graphs_replay_after_capture():
    from layerskip_ext.generation.cuda_graph import StepGraphs
    x = torch.zeros(3, device="cuda")

    def round_fn(d):
        x.add_(d)
        return x * 2

    g = StepGraphs(round_fn, torch.device("cuda"))
    outs = [g.run((1, 3), 1).clone() for _ in range(4)]  # warm-up, capture + replay, replay, replay
    assert [float(o[0]) for o in outs] == [2.0, 4.0, 6.0, 8.0]
    assert g.captures == 1 and g.replays == 3
    with pytest.raises(ValueError, match="CUDA device"):
        StepGraphs(round_fn, torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA generator"):
        StepGraphs(round_fn, torch.device("cuda"), torch.Generator())
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    drawn = StepGraphs(lambda: torch.rand(4, generator=gen, device="cuda"), torch.device("cuda"), gen)
    graphed = [drawn.run(()).clone() for _ in range(4)]  # warm-up, capture + replay, replay, replay
    gen.manual_seed(0)
    eager = [torch.rand(4, generator=gen, device="cuda") for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager)), "a replay must draw as the eager call would"
