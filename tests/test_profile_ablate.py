"""The ablation ranking: backward elimination keeps the heads whose joint loss is measured, not guessed."""

import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.profile.ablate import ablation_ranking, eliminate
from headwise.profile.select import ProbeSet, probe_set

HEADS = [(i, j) for i in range(4) for j in range(3)]


def test_elimination_keeps_the_costly_heads_last():
    cost = {h: 0.01 * n for n, h in enumerate(HEADS)}
    cost[(2, 1)] = 5.0
    cost[(0, 0)] = 3.0
    order, curve, finished = eliminate(HEADS, lambda s: sum(cost[h] for h in s), drop=0.3, progress=False)
    assert finished and sorted(order) == sorted(HEADS)
    assert order[-2:] == [(0, 0), (2, 1)]
    assert curve[0] == (12, 0.0) and curve[-1][0] == 1
    assert [n for n, _ in curve] == sorted((n for n, _ in curve), reverse=True)


def test_two_heads_that_back_each_other_up_are_not_switched_together():
    """Alone each of A and B costs nothing (the other covers for it); together they cost a lot. A per-head score
    ranks both at the bottom; the elimination switches one, then sees the other's cost and keeps it."""
    a, b = (1, 0), (3, 2)

    def loss(s: set) -> float:
        return 0.001 * len(s) + (4.0 if a in s and b in s else 0.0)

    order, _, _ = eliminate(HEADS, loss, drop=0.5, progress=False)
    assert {order[-1]} <= {a, b}  # one of the pair is the last head standing
    assert order.index(a) != order.index(b)


def test_time_limit_orders_the_rest_by_their_last_costs():
    cost = {h: float(n) for n, h in enumerate(HEADS)}
    order, curve, finished = eliminate(HEADS, lambda s: sum(cost[h] for h in s), drop=0.2, time_limit_s=0.0,
                                       progress=False)
    assert not finished and len(curve) == 1 and sorted(order) == sorted(HEADS)


def _answered_by_dense(lm, n: int = 3, length: int = 48) -> ProbeSet:
    """Probes whose answers are what the model itself writes greedily (so dense answers every one)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    with torch.no_grad():
        a1 = lm.model(input_ids=ids).logits[:, -1].argmax(-1)
        a2 = lm.model(input_ids=torch.cat([ids, a1[:, None]], 1)).logits[:, -1].argmax(-1)
    answer = torch.stack([a1, a2], 1)
    return ProbeSet({length: torch.cat([ids, answer], 1)}, {length: answer})


def test_ranking_runs_the_plan_masks(tiny_llama):
    res = ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), sink=2, window=4, drop=0.5, progress=False)
    assert res.probes == res.probes_asked == 3 and res.finished
    assert sorted(res.score.flatten().tolist()) == [0.25, 0.5, 0.75, 1.0]
    assert res.curve[0] == (4, 0.0) and res.curve[-1][0] == 1 and res.forwards >= 4


@pytest.mark.slow
def test_ranking_on_the_real_model(smollm2):
    """SmolLM2 on CPU, short probes: a score per KV head in (0, 1], a curve that starts at dense, and the heads a
    plan keeps scored highest."""
    probes = probe_set(smollm2.tokenizer, [192], 4)
    res = ablation_ranking(smollm2, probes, sink=8, window=16, drop=0.6, batch=4, progress=False)
    spec = smollm2.spec
    assert res.score.shape == (spec.num_layers, spec.num_kv_heads)
    assert float(res.score.min()) > 0 and float(res.score.max()) == 1.0
    assert len(set(res.score.flatten().tolist())) == spec.num_layers * spec.num_kv_heads
    assert 0 < res.probes <= res.probes_asked == 4 and res.finished
    assert res.curve[0] == (spec.num_layers * spec.num_kv_heads, 0.0)
    assert res.curve[-1][1] > 0.5  # one full head left: the probes are lost


def test_no_answerable_probe_is_a_clear_error(tiny_llama):
    with pytest.raises(HeadwiseError, match="answers none"):
        ablation_ranking(tiny_llama, probe_set(tiny_llama.tokenizer, [160], 2), progress=False)


def test_drop_out_of_range_is_refused(tiny_llama):
    with pytest.raises(HeadwiseError, match="drop"):
        ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), drop=1.0, progress=False)
