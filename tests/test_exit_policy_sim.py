"""benchmarks/exit_policy_sim.py's replay: a static policy replays to exactly the rounds generate() runs
(analysis/cost_model.replay_rounds, itself tested against generation), and the oracle bounds every policy."""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from exit_policy_sim import exit_bandit, exit_ladder, growing, oracle, replay, smoothed, static  # noqa: E402

from layerskip_ext.analysis.cost_model import replay_rounds  # noqa: E402


def _agreements(seed: int, exits=(2, 3, 4), prompts=5, n=40):
    rng = random.Random(seed)
    return {E: [[rng.random() < 0.3 + 0.15 * E for _ in range(n)] for _ in range(prompts)] for E in exits}


def _cost(E: int, d: int) -> float:  # a round's seconds: E layers per draft step, 6 - E layers verified
    return 1.0 if d == 0 else 0.1 + 0.05 * E * (d + 1) + 0.05 * (6 - E) * (1 + 0.1 * d)


def test_static_replay_counts_the_rounds_generate_runs():
    ag = _agreements(0)
    for E in ag:
        for d in (1, 3, 6):
            rounds, emitted, _ = replay_rounds(ag[E], d, max_new_tokens=40)
            seconds, replayed = replay(ag, lambda e, k: 1.0, static(E, d), 40)
            assert (seconds, replayed) == (rounds, emitted)


def test_oracle_bounds_every_policy():
    ag = _agreements(1)
    exits = sorted(ag)
    bound_s, bound_n = oracle(ag, _cost, exits, list(range(1, 9)), 40)
    policies = [static(E, d) for E in exits for d in range(1, 9)]
    policies += [growing(3, 8, 2), exit_ladder(exits, 8, 2), exit_bandit(exits, 8, 2, _cost)]
    for policy in policies:
        s, n = replay(ag, _cost, policy, 40)
        assert n == bound_n  # every policy emits the whole output
        assert s >= bound_s - 1e-9


def test_smoothed_recovers_a_round_time_of_the_fitted_form():
    table = {(0, 0): 1.0}
    table.update({(E, d): 0.2 + 0.01 * (d + 1) + 0.03 * E * (d + 1) + 0.02 * (10 - E) + 0.004 * (10 - E) * (d + 1)
                  for E in (2, 3, 4) for d in range(1, 7)})
    fitted, rms = smoothed(table, 10)
    assert rms < 1e-9 and all(abs(fitted[c] - v) < 1e-9 for c, v in table.items())
