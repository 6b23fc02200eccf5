"""verify_greedy and verify_sampling: exact agreement with the references, the emitted distribution (chi-square),
reads confined to what the rule needs (NaN-poisoned rows), batch invariance, opcheck, errors, CUDA twins."""
from __future__ import annotations

import math

import pytest
import torch

from layerskip_ext import ops
from helpers import CUDA, argument_error_test, seeded

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="native extension not built (tests/test_build.py reports it)")


def random_probs(shape, g, sharp=1.0):
    x = torch.randn(shape, generator=g) * sharp
    return torch.softmax(x, dim=-1).contiguous()


def sampling_case(B, d, V, g, agree=0.5):
    """Drafts drawn from q; p = a mix of q and something else (so both accepts and rejects happen)."""
    q = random_probs((B, d, V), g, 2.0)
    other = random_probs((B, d + 1, V), g, 2.0)
    p = other.clone()
    p[:, :d] = agree * q + (1 - agree) * other[:, :d]
    p = (p / p.sum(-1, keepdim=True)).contiguous()
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, d) if d else torch.zeros(B, 0, dtype=torch.int64)
    u = torch.rand(B, d + 1, generator=g)
    return drafts, q, p, u


# --------------------------------------------------------------------------------------------------------------
# verify_greedy
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,d", [(1, 0), (1, 1), (3, 4), (8, 6), (0, 3), (5, 12)])
def test_verify_greedy_matches_reference(B, d):
    g = seeded("vg", B, d)
    for trial in range(20):
        target = torch.randint(0, 5, (B, d + 1), generator=g)
        drafts = target[:, :d].clone()
        # break agreement at a random place in some rows
        for b in range(B):
            if d and torch.rand((), generator=g) < 0.7:
                j = int(torch.randint(0, d, (), generator=g))
                drafts[b, j] = (drafts[b, j] + 1 + int(torch.randint(0, 3, (), generator=g))) % 7
        pos = torch.randint(0, 100, (B,), generator=g)
        pos_ref = pos.clone()
        acc, nxt = ops.verify_greedy(drafts, target, pos)
        acc_ref, nxt_ref = ops.verify_greedy_reference(drafts, target, pos_ref)
        assert acc.dtype == nxt.dtype == torch.int64 and acc.shape == nxt.shape == (B,)
        assert torch.equal(acc, acc_ref) and torch.equal(nxt, nxt_ref) and torch.equal(pos, pos_ref)


def test_verify_greedy_semantics():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7], [1, 2, 3]])
    target = torch.tensor([[5, 6, 7, 8], [5, 0, 7, 8], [9, 6, 7, 8], [1, 2, 4, 4]])
    pos = torch.tensor([10, 20, 30, 40])
    acc, nxt = ops.verify_greedy(drafts, target, pos)
    assert acc.tolist() == [3, 1, 0, 2]
    assert nxt.tolist() == [8, 0, 9, 4]
    assert pos.tolist() == [14, 22, 31, 43]


# --------------------------------------------------------------------------------------------------------------
# verify_sampling
# --------------------------------------------------------------------------------------------------------------

def test_inverse_cdf_reference_is_proportional_and_skips_zero_weights():
    w = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])
    picks = [ops.sample_inverse_cdf_reference(w, u) for u in torch.linspace(0, 0.999, 400).tolist()]
    assert set(picks) == {1, 3}
    assert abs(picks.count(1) / 400 - 0.25) < 0.01
    assert ops.sample_inverse_cdf_reference(torch.zeros(4), 0.5) == -1
    # across chunks of 256
    w = torch.zeros(1000)
    w[[3, 300, 999]] = torch.tensor([1.0, 1.0, 2.0])
    assert [ops.sample_inverse_cdf_reference(w, u) for u in (0.1, 0.3, 0.6, 0.99)] == [3, 300, 999, 999]


@pytest.mark.parametrize("B,d,V", [(1, 0, 10), (4, 1, 7), (6, 3, 300), (3, 6, 1000), (2, 4, 1), (5, 2, 513)])
def test_verify_sampling_matches_reference_exactly(B, d, V):
    g = seeded("vs", B, d, V)
    for agree in (0.0, 0.6, 1.0):
        drafts, q, p, u = sampling_case(B, d, V, g, agree)
        pos = torch.arange(B) * 3
        pos_ref = pos.clone()
        acc, nxt = ops.verify_sampling(drafts, q, p, u, pos)
        acc_ref, nxt_ref = ops.verify_sampling_reference(drafts, q, p, u, pos_ref)
        assert torch.equal(acc, acc_ref), (acc, acc_ref)
        assert torch.equal(nxt, nxt_ref), (nxt, nxt_ref)
        assert torch.equal(pos, pos_ref)
        assert bool(((nxt >= 0) & (nxt < V)).all())


def test_verify_sampling_rule_details():
    V = 4
    q = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    p = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]])
    drafts = torch.tensor([[1, 2]])
    # draft 0: p == q -> always accepted; draft 1: p(2) = 0 -> rejected; the residual is all on token 3
    for uval in (0.0, 0.5, 0.999):
        pos = torch.zeros(1, dtype=torch.int64)
        acc, nxt = ops.verify_sampling(drafts, q, p, torch.full((1, 3), uval), pos)
        assert acc.tolist() == [1] and nxt.tolist() == [3] and pos.tolist() == [2]
    # all accepted: the bonus comes from p[:, d] (token 1)
    drafts = torch.tensor([[0, 3]])
    acc, nxt = ops.verify_sampling(drafts, q, p, torch.tensor([[0.3, 0.1, 0.7]]), torch.zeros(1, dtype=torch.int64))
    assert acc.tolist() == [2] and nxt.tolist() == [1]
    # rejected where the residual has no mass (p == q, drafted token with q = p = 0): falls back to p
    q2 = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    p2 = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    acc, nxt = ops.verify_sampling(torch.tensor([[2]]), q2, p2, torch.tensor([[0.5, 0.5]]),
                                   torch.zeros(1, dtype=torch.int64))
    assert acc.tolist() == [0] and nxt.tolist() == [1]
    assert ops.verify_sampling_reference(torch.tensor([[2]]), q2, p2, torch.tensor([[0.5, 0.5]]),
                                         torch.zeros(1, dtype=torch.int64))[1].tolist() == [1]
    del V


def chi2_sf_df4(x: float) -> float:
    """Survival function of the chi-square distribution with 4 degrees of freedom (closed form)."""
    return math.exp(-x / 2) * (1 + x / 2)


def chi2_stat(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_verify_sampling_emits_the_target_distribution():
    """With drafts drawn from q, every emitted token follows p (chi-square, V = 5, p-values > 1e-6): the first
    token, the second one given the first draft was accepted, and the bonus given all were accepted."""
    g = seeded("vs-stat")
    V, d, N = 5, 3, 60000
    q1 = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    qs = torch.stack([q1, q1.flip(0), torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])])
    ps = torch.stack([torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15]), torch.tensor([0.3, 0.3, 0.1, 0.2, 0.1]),
                      torch.tensor([0.05, 0.05, 0.5, 0.2, 0.2]), torch.tensor([0.25, 0.05, 0.3, 0.3, 0.1])])
    q = qs.expand(N, d, V).contiguous()
    p = ps.expand(N, d + 1, V).contiguous()
    drafts = torch.stack([torch.multinomial(qs[j], N, replacement=True, generator=g) for j in range(d)], dim=1)
    u = torch.rand(N, d + 1, generator=g)
    acc, nxt = ops.verify_sampling(drafts, q, p, u, torch.zeros(N, dtype=torch.int64))
    first = torch.where(acc >= 1, drafts[:, 0], nxt)
    assert chi2_sf_df4(chi2_stat(first, ps[0])) > 1e-6
    sel = acc >= 1
    second = torch.where(acc[sel] >= 2, drafts[sel, 1], nxt[sel])
    assert chi2_sf_df4(chi2_stat(second, ps[1])) > 1e-6
    bonus = nxt[acc == d]
    assert bonus.numel() > 1000
    assert chi2_sf_df4(chi2_stat(bonus, ps[d])) > 1e-6
    # and the test has power: the drafts' own distribution is rejected
    assert chi2_sf_df4(chi2_stat(drafts[:, 0], ps[0])) < 1e-6


def test_verify_sampling_reads_only_what_the_rule_needs():
    """Rows after the rejection point, and entries of accepted rows other than the drafted token, are never read."""
    g = seeded("vs-poison")
    B, d, V = 3, 5, 600
    drafts, q, p, u = sampling_case(B, d, V, g, 0.7)
    p[:, 2, :] = p[:, 2, :] * 0  # drafted token of row 2 has p = 0: rejection at j = 2 unless earlier
    p[:, 2, 7] = 1.0
    pos = torch.zeros(B, dtype=torch.int64)
    acc, nxt = ops.verify_sampling(drafts, q, p, u, pos.clone())
    assert bool((acc <= 2).all())
    qb, pb = q.clone(), p.clone()
    for b in range(B):
        j = int(acc[b])
        qb[b, j + 1:] = float("nan")
        pb[b, j + 1:] = float("nan")
        for i in range(j):  # accepted rows: only the drafted entry matters
            y = int(drafts[b, i])
            keep_q, keep_p = qb[b, i, y].item(), pb[b, i, y].item()
            qb[b, i] = float("nan")
            pb[b, i] = float("nan")
            qb[b, i, y], pb[b, i, y] = keep_q, keep_p
    acc2, nxt2 = ops.verify_sampling(drafts, qb, pb, u, pos.clone())
    assert torch.equal(acc2, acc) and torch.equal(nxt2, nxt)


def test_verify_batch_invariant(restore_threads):
    g = seeded("vs-inv")
    B, d, V = 9, 4, 2000
    drafts, q, p, u = sampling_case(B, d, V, g, 0.8)
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        acc, nxt = ops.verify_sampling(drafts, q, p, u, torch.zeros(B, dtype=torch.int64))
        results[n] = (acc, nxt)
        for b in range(B):
            a1, n1 = ops.verify_sampling(drafts[b:b + 1], q[b:b + 1], p[b:b + 1], u[b:b + 1],
                                         torch.zeros(1, dtype=torch.int64))
            assert (a1.item(), n1.item()) == (acc[b].item(), nxt[b].item())
    assert all(torch.equal(x, y) for x, y in zip(results[1], results[2]))


# --------------------------------------------------------------------------------------------------------------
# opcheck, errors
# --------------------------------------------------------------------------------------------------------------

def _opcheck_cases(device):
    g = seeded("opcheck-verify", device)
    drafts, q, p, u = sampling_case(3, 2, 50, g)
    target = torch.cat((drafts, torch.randint(0, 50, (3, 1), generator=g)), dim=1)
    target[1, 0] = 49 - target[1, 0]
    to = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    lib = torch.ops.layerskip
    pos = torch.tensor([4, 0, 9])
    return [
        (lib.verify_greedy.default, to(drafts, target, pos.clone())),
        (lib.verify_sampling.default, to(drafts, q, p, u, pos.clone())),
    ]


@pytest.mark.parametrize("case", range(2))
def test_opcheck_cpu(case):
    op, args = _opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(2))
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_opcheck_cuda(case):
    op, args = _opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)


def _err_cases():
    B, d, V = 2, 3, 10
    dr = torch.zeros(B, d, dtype=torch.int64)
    tg = torch.zeros(B, d + 1, dtype=torch.int64)
    pos = torch.zeros(B, dtype=torch.int64)
    q, p, u = torch.rand(B, d, V), torch.rand(B, d + 1, V), torch.rand(B, d + 1)
    vg, vs = ops.verify_greedy, ops.verify_sampling
    return {
        "vg drafts rank": (lambda: vg(dr[0], tg, pos), "verify_greedy: drafts must be 2-D [B, d], got 1-D"),
        "vg target shape": (lambda: vg(dr, tg[:, :d].contiguous(), pos),
                            "verify_greedy: target.size(1) (d+1 = drafts.size(1) + 1) must be 4, got 3"),
        "vg target dtype": (lambda: vg(dr, tg.int(), pos), "verify_greedy: target must be int64, got int32"),
        "vg positions dtype": (lambda: vg(dr, tg, pos.int()), "verify_greedy: positions must be int64, got int32"),
        "vg positions shape": (lambda: vg(dr, tg, pos[:1]), "verify_greedy: positions.size(0) (B = drafts.size(0)) must be 2"),
        "vg noncontig": (lambda: vg(torch.zeros(d, B, dtype=torch.int64).t(), tg, pos), "verify_greedy: drafts must be contiguous"),
        "vs q dtype": (lambda: vs(dr, q.double(), p, u, pos), "verify_sampling: q must be float32, got float64"),
        "vs p shape": (lambda: vs(dr, q, p[:, :d].contiguous(), u, pos),
                       "verify_sampling: p.size(1) (d+1 = drafts.size(1) + 1) must be 4, got 3"),
        "vs q vocab": (lambda: vs(dr, q[..., :5].contiguous(), p, u, pos), "verify_sampling: q.size(2) (V = p.size(2)) must be 10"),
        "vs uniforms shape": (lambda: vs(dr, q, p, u[:, :d].contiguous(), pos),
                              "verify_sampling: uniforms.size(1) (d+1 = drafts.size(1) + 1) must be 4"),
        "vs uniforms dtype": (lambda: vs(dr, q, p, u.bfloat16(), pos), "verify_sampling: uniforms must be float32, got bfloat16"),
        "vs draft range": (lambda: vs(dr + torch.tensor([[0, 0, 0], [0, 10, 0]]), q, p, u, pos),
                           "verify_sampling: drafts[1, 1] = 10 is out of range [0, V) with V = p.size(2) = 10"),
        "vs draft negative": (lambda: vs(dr - 1, q, p, u, pos), "verify_sampling: drafts[0, 0] = -1 is out of range"),
        "vs positions rank": (lambda: vs(dr, q, p, u, pos[None]), "verify_sampling: positions must be 1-D [B], got 2-D"),
        "vs empty vocab": (lambda: vs(dr, q[..., :0].contiguous(), p[..., :0].contiguous(), u, pos),
                           "verify_sampling: p.size(2) (vocabulary V) must be positive"),
        "vs p noncontig": (lambda: vs(dr, q, p.transpose(0, 1).contiguous().transpose(0, 1), u, pos),
                           "verify_sampling: p must be contiguous"),
    }


test_argument_errors = argument_error_test(_err_cases())


# --------------------------------------------------------------------------------------------------------------
# CUDA twins: the same decisions, bit for bit
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B,d,V", [(1, 0, 10), (6, 3, 300), (3, 6, 1000), (4, 5, 49152), (2, 4, 1)])
def test_cuda_verify_matches_cpu(B, d, V):
    g = seeded("cuda-verify", B, d, V)
    for agree in (0.0, 0.7, 1.0):
        drafts, q, p, u = sampling_case(B, d, V, g, agree)
        pos = torch.arange(B) * 5
        pos_d = pos.cuda()
        acc, nxt = ops.verify_sampling(drafts, q, p, u, pos)
        acc_d, nxt_d = ops.verify_sampling(drafts.cuda(), q.cuda(), p.cuda(), u.cuda(), pos_d)
        assert torch.equal(acc_d.cpu(), acc) and torch.equal(nxt_d.cpu(), nxt) and torch.equal(pos_d.cpu(), pos)
        target = torch.cat((drafts, nxt[:, None]), 1)
        target[::2, :d] = (target[::2, :d] + 1) % V
        pos = torch.zeros(B, dtype=torch.int64)
        pos_d = pos.cuda()
        a, n = ops.verify_greedy(drafts, target, pos)
        a_d, n_d = ops.verify_greedy(drafts.cuda(), target.cuda(), pos_d)
        assert torch.equal(a_d.cpu(), a) and torch.equal(n_d.cpu(), n) and torch.equal(pos_d.cpu(), pos)
