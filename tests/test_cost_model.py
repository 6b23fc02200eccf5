"""The self-speculation cost model: its arithmetic, the exact replay of greedy rounds, and its measurements on a
tiny model (structure only: performance is never asserted)."""
import math

import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.analysis.cost_measure import measure_agreement, measure_stage_costs
from layerskip_ext.analysis.cost_model import (StageCosts, ar_step_model_s, expected_acceptance,
                                               expected_tokens_per_round, overhead_from_ar, predict, rank_of,
                                               replay_rounds, round_time_s)
from layerskip_ext.analysis.cost_model import alpha_needed, speedup_ceiling
from layerskip_ext.analysis.decode_runs import run_prompts
from layerskip_ext.analysis.sweep import Cell, SweepResult, check_grid, default_exit_layers, run_sweep
from layerskip_ext.errors import LayerSkipError
from tiny_checkpoints import make_tiny_model

needs_native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


def costs(**kw):
    fields = dict(num_layers=10, layer_s={1: 1.0, 3: 2.0}, call_s={1: 0.5, 3: 0.7}, head_s={1: 3.0, 3: 4.0},
                  overhead_s=0.25, ar_step_s=13.75)
    fields.update(kw)
    return StageCosts(**fields)


@pytest.mark.parametrize("alpha,d,expected", [(0.0, 3, 1.0), (1.0, 4, 5.0), (0.5, 2, 1.75), (0.9, 1, 1.9)])
def test_tokens_per_round_is_a_truncated_geometric_sum(alpha, d, expected):
    assert expected_tokens_per_round(alpha, d) == pytest.approx(expected)


def test_expected_acceptance_is_accepted_over_drafted():
    assert expected_acceptance(0.5, 2) == pytest.approx((0.5 + 0.25) / 2)
    assert expected_acceptance(1.0, 6) == pytest.approx(1.0)
    assert expected_acceptance(0.0, 3) == 0.0
    with pytest.raises(ValueError):
        expected_tokens_per_round(1.5, 2)


def test_round_time_adds_draft_verify_and_overhead():
    c = costs()
    # draft: 3 x (0.5 + 4 x 1.0) + 2 x 3.0 = 19.5; verify: 0.7 + 6 x 2.0 + 4.0 = 16.7; overhead 0.25
    assert round_time_s(c, 4, 2) == pytest.approx(36.45)
    # E = L: nothing left to verify but the head on d + 1 rows
    assert round_time_s(c, 10, 2) == pytest.approx(3 * 10.5 + 6.0 + 0.7 + 4.0 + 0.25)
    with pytest.raises(ValueError):
        round_time_s(c, 11, 2)
    with pytest.raises(ValueError):
        round_time_s(c, 4, 3)  # no T = 4 measurements


def test_overhead_is_what_the_model_calls_leave_of_a_step():
    c = costs()
    assert ar_step_model_s(c) == pytest.approx(13.5)
    assert overhead_from_ar(1.0, 0.5, 3.0, 10, 13.75) == pytest.approx(0.25)
    assert overhead_from_ar(1.0, 0.5, 3.0, 10, 12.0) == 0.0  # never negative


def test_predicted_speedup():
    c = costs()
    p = predict(c, 0.5, 4, 2)
    assert p.tokens_per_round == pytest.approx(1.75)
    assert p.round_s == pytest.approx(36.45)
    assert p.speedup == pytest.approx(1.75 * 13.75 / 36.45)
    assert p.tokens_per_s == pytest.approx(1.75 / 36.45)
    assert p.replay_speedup is None
    # with agreement sequences the replay gives exact tokens per round: 1 round emitting 3 tokens
    p = predict(c, 0.5, 4, 2, agreements=[[False, True, True, False]], max_new_tokens=4)
    assert p.replay_tokens_per_round == pytest.approx(3.0)
    assert p.replay_speedup == pytest.approx(3.0 * 13.75 / 36.45)


def test_replay_rounds():
    # token 0 is the prefill's; round 1 accepts 2 drafts (+1), round 2 accepts the last token as a draft
    assert replay_rounds([[False, True, True, False, True]], 2) == (2, 4, 3)
    # all drafts rejected: one token per round
    assert replay_rounds([[True] + [False] * 5], 3) == (5, 5, 0)
    # the last rounds draft no further than max_new_tokens allows (remaining - 1)
    assert replay_rounds([[True] * 6], 4, max_new_tokens=6) == (1, 5, 4)
    assert replay_rounds([[True] * 6], 2, max_new_tokens=6) == (2, 5, 3)
    # prompts add up; an empty or one-token output has no round
    assert replay_rounds([[True, True], [], [False]], 1) == (1, 1, 1)
    with pytest.raises(ValueError):
        replay_rounds([[True]], 0)


def test_rank_of():
    scores = {(1, 1): 0.5, (1, 2): 1.5, (2, 1): 1.2, (2, 2): 1.5}
    assert rank_of((1, 2), scores) == 1 and rank_of((2, 2), scores) == 1
    assert rank_of((2, 1), scores) == 3 and rank_of((1, 1), scores) == 4
    with pytest.raises(KeyError):
        rank_of((3, 3), scores)


def test_sweep_result_best_prefers_lossless_and_ranks_the_prediction():
    def cell(E, d, speedup, equal, pred):
        c = Cell(E, d, acceptance=0.5, tokens_per_round=1.5, tokens_per_s=10 * speedup, speedup=speedup,
                 equal_to_ar=equal)
        c.predicted = predict(costs(), 0.5, 4, 2)
        c.predicted.speedup = pred
        return c

    res = SweepResult([cell(1, 1, 2.0, False, 0.9), cell(1, 2, 1.4, True, 1.1), cell(2, 1, 1.2, True, 1.3)],
                      10.0, [10.0], {}, None, {})
    assert res.best().key == (1, 2)           # (1, 1) is faster but not lossless
    assert res.predicted_best().key == (2, 1)
    assert res.predicted_best_rank() == 3     # measured: 2.0, 1.4, 1.2


def test_check_grid_and_default_exit_layers():
    check_grid(4, [1, 4], [1, 2])
    for exits, depths, msg in (([], [1], "empty grid"), ([1], [], "empty grid"), ([5], [1], "outside [1, 4]"),
                               ([0], [1], "outside [1, 4]"), ([2], [0], ">= 1")):
        with pytest.raises(LayerSkipError, match=msg.replace("[", r"\[")):
            check_grid(4, exits, depths)
    assert default_exit_layers(30) == [5, 10, 15, 20, 25]
    assert default_exit_layers(32) == [5, 10, 15, 20, 25, 30]
    assert default_exit_layers(4) == [1, 2, 3]
    assert default_exit_layers(1) == [1]


def damped_model():
    """A tiny model whose deeper layers barely move the residual stream, so early exits agree with the last
    layer often but not always (a random model's exits almost never agree)."""
    model = make_tiny_model(seed=5, num_hidden_layers=4, vocab_size=300, max_position_embeddings=128)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i >= 1:
                layer.self_attn.o_proj.weight.mul_(0.4)
                layer.mlp.down_proj.weight.mul_(0.4)
    model.build_decoder("native")
    return model


@needs_native
def test_replay_of_measured_agreement_equals_real_self_speculation():
    """The agreement sequences from one teacher-forced pass replay generate()'s greedy rounds exactly."""
    model = damped_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 14)]
    max_new = 24
    ar = run_prompts(model, prompts, max_new, [])
    alpha, agreements = measure_agreement(model, prompts, ar.outputs, [1, 2, 3, 4])
    assert alpha[4] == 1.0  # the last layer agrees with itself
    assert any(0.1 < alpha[E] < 0.9 for E in (1, 2, 3)), alpha  # the test needs a model with partial agreement
    for E in (1, 2, 3):
        for d in (1, 3, 5):
            ss = run_prompts(model, prompts, max_new, [], E, d)
            assert ss.outputs == ar.outputs
            rounds, emitted, accepted = replay_rounds(agreements[E], d, max_new)
            assert (rounds, emitted, accepted) == (ss.rounds, ss.decode_tokens, ss.accepted), (E, d)


@needs_native
def test_batched_runs_give_each_prompt_its_own_output():
    """run_prompts(batch_size=3): the same outputs as each prompt alone (batch-invariant kernels), autoregressive and
    self-speculative, with a stop model too; every row's tokens counted."""
    model = damped_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 14, 3)]
    stop_model = [0.5, 0.3, 0.2, 0.4, 0.6, 0.8]
    for args in [(), (2, 4), (2, 8, 0.4, 0, stop_model)]:
        alone = run_prompts(model, prompts, 12, [], *args)
        batched = run_prompts(model, prompts, 12, [], *args, batch_size=3)
        assert batched.outputs == alone.outputs, args
        assert batched.decode_tokens == alone.decode_tokens == sum(len(o) - 1 for o in alone.outputs)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_prompts(model, prompts, 4, [], batch_size=0)


@needs_native
def test_sampled_runs_are_seeded_draws():
    """run_prompts(sampling=): repeatable for a seed, another seed draws otherwise; a sampled confirmation counts
    drafts and accepted tokens and leaves equal_to_ar None (draws are not compared); greedy-only errors stay."""
    from layerskip_ext.analysis.confirm import Setting, interleaved_speedups
    from layerskip_ext.analysis.decode_runs import Sampling
    model = damped_model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9)]
    greedy = run_prompts(model, prompts, 16, [])
    hot = Sampling(temperature=5.0, seed=3)
    draws = [run_prompts(model, prompts, 16, [], *args, sampling=hot).outputs for args in [(), (), (2, 4), (2, 4)]]
    assert draws[0] == draws[1] and draws[2] == draws[3], "the same seed must draw the same tokens"
    assert draws[0] != greedy.outputs  # a hot distribution: a draw that never leaves greedy is not sampling
    assert run_prompts(model, prompts, 16, [], sampling=Sampling(5.0, seed=4)).outputs != draws[0]
    settings = [Setting(2, 4), Setting(2, 8, 0.0, 2)]
    ar = interleaved_speedups(model, prompts, settings, 2, 16, [], sampling=hot)
    assert len(ar) == 2 and all(x > 0 for x in ar)
    for s in settings:
        assert s.equal_to_ar is None and len(s.speedups) == 2 and s.drafted > 0 and 0 <= s.acceptance <= 1
    with pytest.raises(ValueError, match="temperature > 0"):
        Sampling(temperature=0.0)
    assert run_prompts(model, prompts, 16, [], 2, 8, 0.5, sampling=hot).drafted < \
        run_prompts(model, prompts, 16, [], 2, 8, sampling=hot).drafted  # a sampled draft stops too
    with pytest.raises(LayerSkipError, match="greedy"):
        run_prompts(model, prompts, 4, [], 2, 4, 0.5, 0, [0.5, 0.3, 0.2, 0.4, 0.6, 0.8], sampling=hot)


def test_measure_stage_costs_structure():
    model = damped_model() if ops.native_available() else make_tiny_model(num_hidden_layers=4)
    c = measure_stage_costs(model, position=20, depths=[1, 3], ar_step_s=1e-3, repeats=2)
    assert c.num_layers == 4 and set(c.layer_s) == set(c.call_s) == set(c.head_s) == {1, 2, 4}
    values = list(c.layer_s.values()) + list(c.call_s.values()) + list(c.head_s.values()) + [c.overhead_s]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert c.overhead_s == pytest.approx(overhead_from_ar(c.layer_s[1], c.call_s[1], c.head_s[1], 4, 1e-3))
    assert round_time_s(c, 2, 3) > 0


def test_alpha_needed_inverts_the_prediction():
    c = costs()
    for E, d, target in ((1, 2, 1.1), (2, 2, 1.05), (3, 2, 0.5), (5, 2, 0.9)):
        a = alpha_needed(c, E, d, target)
        assert a is not None and 0.0 <= a <= 1.0
        if a > 0:
            assert predict(c, a, E, d).speedup == pytest.approx(target, rel=1e-9)
            assert predict(c, max(0.0, a - 1e-3), E, d).speedup < target
    # beyond the ceiling (every draft accepted) no alpha suffices
    ceiling = speedup_ceiling(c, 2, 2)
    assert ceiling == pytest.approx(predict(c, 1.0, 2, 2).speedup)
    assert alpha_needed(c, 2, 2, ceiling * 1.01) is None
    with pytest.raises(ValueError):
        alpha_needed(c, 2, 2, 0.0)


def test_a_draft_vocabulary_head_makes_rounds_cheaper():
    full, sub = costs(), costs(draft_head_s=1.0)
    assert round_time_s(full, 2, 2) - round_time_s(sub, 2, 2) == pytest.approx(2 * (3.0 - 1.0))
    assert alpha_needed(sub, 2, 2, 1.1) < alpha_needed(full, 2, 2, 1.1)


@needs_native
def test_sweep_dynamic_cells_are_lossless_and_draft_less():
    """Dynamic cells (draft_stop) decode the same prompts against the same baseline: identical outputs, fewer
    drafts per round than the static cell of the same (E, d); best_overall compares both kinds."""
    model = damped_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (6, 11)]
    res = run_sweep(model, prompts, [2], [4], 16, [], with_prediction=False, draft_stops=[0.5, 0.9],
                    dynamic_depths=[4])
    assert [c.draft_stop for c in res.dynamic] == [0.5, 0.9] and all(c.dynamic for c in res.dynamic)
    assert all(c.equal_to_ar for c in res.cells + res.dynamic)
    static = res.cells[0]
    drafted = {c.draft_stop: run_prompts(model, prompts, 16, [], 2, 4, c.draft_stop).drafted for c in res.dynamic}
    assert drafted[0.9] <= drafted[0.5] < run_prompts(model, prompts, 16, [], 2, 4).drafted
    assert res.best_overall() in (static, res.best_dynamic())
    with pytest.raises(LayerSkipError, match="strictly between 0 and 1"):
        run_sweep(model, prompts, [2], [4], 16, [], draft_stops=[1.0])


@needs_native
def test_sweep_growth_cells_cross_the_stops():
    """draft_growths with draft_stops: each (E, d) gets the stop alone, the growth alone and both, all lossless,
    labelled by what they use; a bad growth is a one-line error."""
    model = damped_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (6, 10)]
    res = run_sweep(model, prompts, [2], [2], 16, [], with_prediction=False, draft_stops=[0.5], draft_growths=[2],
                    dynamic_depths=[6])
    assert [c.label for c in res.dynamic] == ["E=2 d<=6 grow 2", "E=2 d<=6 stop<0.5", "E=2 d<=6 grow 2 stop<0.5"]
    assert all(c.equal_to_ar for c in res.cells + res.dynamic) and res.cells[0].label == "E=2 d=2"
    for bad in ([0], [1.5]):
        with pytest.raises(LayerSkipError, match="draft growth"):
            run_sweep(model, prompts, [2], [2], 16, [], draft_growths=bad)


@needs_native
def test_sweep_dynamic_cells_only_at_the_fastest_exits():
    """dynamic_exits=1: dynamic cells at one exit layer only, the one whose static cells were fastest."""
    model = damped_model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (6, 9)]
    res = run_sweep(model, prompts, [1, 2, 3], [2], 12, [], with_prediction=False, draft_stops=[0.5],
                    dynamic_depths=[3], dynamic_exits=1)
    fastest = max(res.cells, key=lambda c: c.tokens_per_s).exit_layer
    assert [(c.exit_layer, c.num_speculations) for c in res.dynamic] == [(fastest, 3)]
    assert all(c.equal_to_ar for c in res.cells + res.dynamic)
    with pytest.raises(LayerSkipError, match="dynamic_exits"):
        run_sweep(model, prompts, [1], [2], 12, [], with_prediction=False, draft_stops=[0.5], dynamic_exits=0)


def test_static_sweep_cells_ignore_a_tuned_draft_stop():
    """A model whose config carries a tuned draft_stop still gets static cells measured statically."""
    model = damped_model() if ops.native_available() else make_tiny_model(num_hidden_layers=4)
    prompts = [[5, 6, 7, 8]]
    plain = run_prompts(model, prompts, 12, [], 2, 3)
    model.config.layerskip = {"exit_layer": 2, "num_speculations": 3, "draft_stop": 0.99, "draft_growth": 1}
    try:
        again = run_prompts(model, prompts, 12, [], 2, 3)
    finally:
        model.config.layerskip = None
    assert again.drafted == plain.drafted and again.outputs == plain.outputs
